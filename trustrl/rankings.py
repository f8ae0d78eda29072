"""Rankings of K responses as data: the row format, the judgement log, and agreement.

A ranking row: ``{"prompt": ..., "responses": [r_1, ..., r_K], "ranks": [k_1, ..., k_K]}``
where ``k_i`` is response i's rank, 1 = best, equal ranks = a tie (``[2, 1, 2]``: the second
response is best, the other two are tied behind it). Any positive integers work; only their
order matters.

The judgement log (written by ``trustrl label``, read by ``trustrl train rm`` and ``trustrl
label stats``) is the same rows plus bookkeeping, appended one line per action and never
rewritten: ``action`` is ``"rank"`` (a ranking), ``"skip"`` (the annotator passed on the
item) or ``"undo"`` (``undoes`` names the ``id`` of an earlier rank/skip row, which no longer
counts). :func:`current_judgements` replays the log into the rows still in force.

Agreement where an item was ranked by two annotators: pairwise agreement (the share of
response pairs both order strictly that they order the same way) and Kendall's tau-b (Kendall
1945: ``(C - D) / sqrt((n0 - T1)(n0 - T2))``, ties counted per ranking). No torch here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from itertools import combinations
from typing import Any

from trustrl.errors import UserError

__all__ = ["ACTIONS", "check_ranks", "strict_pairs", "current_judgements", "kendall_tau_b",
           "pair_agreement", "agreement_stats"]

ACTIONS = ("rank", "skip", "undo")


class RankingError(UserError, ValueError):
    """A ranking or a judgement-log row that cannot be used; the message names where it is."""


def check_ranks(ranks: Any, n_responses: int, where: str) -> list[int]:
    """``ranks`` as a list of ints >= 1, one per response, or a ValueError naming ``where``."""
    if not isinstance(ranks, (list, tuple)) or len(ranks) != n_responses:
        got = f"{len(ranks)} ranks" if isinstance(ranks, (list, tuple)) else type(ranks).__name__
        raise RankingError(f"{where}: 'ranks' must be a list of {n_responses} integers (one per response), got {got}")
    for r in ranks:
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise RankingError(f"{where}: ranks must be integers >= 1 (1 = best), got {r!r} in {list(ranks)}")
    return list(ranks)


def strict_pairs(ranks: Sequence[int]) -> list[tuple[int, int]]:
    """``(winner, loser)`` index pairs of a ranking, ties left out: ``K(K-1)/2`` without ties."""
    return [(i, j) if ranks[i] < ranks[j] else (j, i)
            for i, j in combinations(range(len(ranks)), 2) if ranks[i] != ranks[j]]


def current_judgements(rows: Iterable[Mapping[str, Any]], where: str = "judgement log") -> list[dict[str, Any]]:
    """Replay a judgement log: the rank and skip rows not undone, in log order. Rows without
    an ``action`` are rankings (a plain rankings file). An ``undo`` must name an earlier rank
    or skip row by its ``id`` that is not undone yet (else a ValueError naming the line)."""
    kept: dict[str, dict[str, Any]] = {}
    order: list[str] = []
    for line, row in enumerate(rows, start=1):
        action = row.get("action", "rank")
        if action not in ACTIONS:
            raise RankingError(f"{where} line {line}: action must be one of {ACTIONS}, got {action!r}")
        if action == "undo":
            target = row.get("undoes")
            if target not in kept:
                raise RankingError(f"{where} line {line}: undo of {target!r}, which is no rank/skip row in force")
            del kept[target]
            continue
        key = str(row.get("id", f"line-{line}"))
        if key in kept:
            raise RankingError(f"{where} line {line}: id {key!r} is used twice (replaying a judgement log needs each "
                             "log listed once, with weight 1)")
        kept[key] = dict(row)
        order.append(key)
    return [kept[k] for k in order if k in kept]


def kendall_tau_b(a: Sequence[int], b: Sequence[int]) -> float | None:
    """Kendall's tau-b between two rankings of the same responses (ranks, ties allowed):
    ``(C - D) / sqrt((n0 - T_a)(n0 - T_b))`` over the ``n0 = K(K-1)/2`` pairs, where C / D
    count pairs ordered the same / opposite way and T_a, T_b pairs tied in a, in b. ``None``
    when either ranking ties everything (undefined)."""
    if len(a) != len(b):
        raise ValueError(f"kendall_tau_b: rankings of {len(a)} and {len(b)} responses")
    concordant = discordant = tied_a = tied_b = n0 = 0
    for i, j in combinations(range(len(a)), 2):
        n0 += 1
        da, db = (a[i] > a[j]) - (a[i] < a[j]), (b[i] > b[j]) - (b[i] < b[j])
        tied_a += da == 0
        tied_b += db == 0
        if da and db:
            concordant += da == db
            discordant += da != db
    denominator = math.sqrt((n0 - tied_a) * (n0 - tied_b))
    return None if denominator == 0 else (concordant - discordant) / denominator


def pair_agreement(a: Sequence[int], b: Sequence[int]) -> tuple[int, int]:
    """``(agreeing, compared)``: response pairs that both rankings order strictly, and how
    many of them they order the same way."""
    agree = compared = 0
    for i, j in combinations(range(len(a)), 2):
        if a[i] != a[j] and b[i] != b[j]:
            compared += 1
            agree += (a[i] < a[j]) == (b[i] < b[j])
    return agree, compared


def agreement_stats(judgements: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Counts and inter-annotator agreement of the judgements in force (see
    :func:`current_judgements`). An annotator's latest ranking of an item is theirs; every
    pair of annotators that ranked the same item (with the same responses) is compared once.

    Returns ``rankings``, ``skips``, ``items_ranked``, ``items_ranked_twice`` (by two or more
    annotators), ``per_annotator`` ({name: {"rankings", "skips"}}), ``compared_pairs``,
    ``pairwise_agreement`` (agreeing / compared response pairs, None without any),
    ``kendall_tau_mean`` (mean tau-b over annotator pairs where it is defined, None without)
    and ``kendall_tau_n``."""
    latest: dict[tuple[str, str], Mapping[str, Any]] = {}
    per_annotator: dict[str, dict[str, int]] = {}
    rankings = skips = 0
    for row in judgements:
        who = str(row.get("annotator", ""))
        counts = per_annotator.setdefault(who, {"rankings": 0, "skips": 0})
        if row.get("action", "rank") == "skip":
            skips += 1
            counts["skips"] += 1
            continue
        rankings += 1
        counts["rankings"] += 1
        latest[(str(row.get("item")), who)] = row
    by_item: dict[str, list[Mapping[str, Any]]] = {}
    for (item, _), row in latest.items():
        by_item.setdefault(item, []).append(row)
    agree = compared = 0
    taus: list[float] = []
    for rows in by_item.values():
        for x, y in combinations(rows, 2):
            if list(x.get("responses", [])) != list(y.get("responses", [])):
                continue  # different candidates under one item id: not the same question
            a, b = x["ranks"], y["ranks"]
            ok, n = pair_agreement(a, b)
            agree, compared = agree + ok, compared + n
            tau = kendall_tau_b(a, b)
            if tau is not None:
                taus.append(tau)
    return {
        "rankings": rankings, "skips": skips, "items_ranked": len(by_item),
        "items_ranked_twice": sum(len(r) >= 2 for r in by_item.values()),
        "per_annotator": per_annotator, "compared_pairs": compared,
        "pairwise_agreement": agree / compared if compared else None,
        "kendall_tau_mean": sum(taus) / len(taus) if taus else None, "kendall_tau_n": len(taus),
    }
