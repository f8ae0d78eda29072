"""Reward models from rankings of K responses: the pairs a ranking gives, the pairwise
(InstructGPT) and Plackett-Luce losses by hand, their agreement with the pairwise loss at
K = 2, the judgement log's replay, agreement statistics, gradient accumulation 1 x 4 == 4 x 1
and a short training run on rankings."""

from __future__ import annotations

import itertools
import json
import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trustrl.data import write_jsonl
from trustrl.losses import bradley_terry_sum, plackett_luce_sum, ranking_pair_count, ranking_pairwise_sum
from trustrl.rankings import agreement_stats, current_judgements, kendall_tau_b, pair_agreement, strict_pairs


def _batch(rankings: list[tuple[list[float], list[int]]]):
    """(scores, ranks, valid) [N, K] from ragged (scores, ranks) lists, padded with 0."""
    k = max(len(s) for s, _ in rankings)
    scores = torch.zeros(len(rankings), k, dtype=torch.float64)
    ranks = torch.zeros(len(rankings), k, dtype=torch.long)
    valid = torch.zeros(len(rankings), k, dtype=torch.bool)
    for n, (s, r) in enumerate(rankings):
        scores[n, :len(s)] = torch.tensor(s, dtype=torch.float64)
        ranks[n, :len(r)] = torch.tensor(r)
        valid[n, :len(s)] = True
    return scores, ranks, valid


def nll(x: float) -> float:  # -log sigmoid(x)
    return math.log1p(math.exp(-x))


# ------------------------------------------------------------------------ number of pairs


def test_number_of_pairs_by_hand():
    # K = 4, no ties: 4 * 3 / 2 = 6 pairs
    assert len(strict_pairs([1, 2, 3, 4])) == 6
    # [1, 2, 2, 3]: the best beats 3 others, each of the two tied beats the last: 3 + 2 = 5
    # strict pairs, and one tied pair (counted by ties="half" only)
    assert sorted(strict_pairs([1, 2, 2, 3])) == [(0, 1), (0, 2), (0, 3), (1, 3), (2, 3)]
    _, ranks, valid = _batch([([0.0] * 4, [1, 2, 3, 4]), ([0.0] * 4, [1, 2, 2, 3]), ([0.0] * 3, [2, 1, 2])])
    assert ranking_pair_count(ranks, valid).tolist() == [6, 5, 2]
    assert ranking_pair_count(ranks, valid, ties="half").tolist() == [6, 6, 3]


# ------------------------------------------------------------------------ losses by hand


def test_pairwise_loss_of_a_three_item_ranking_by_hand():
    # scores [2, 1, 0] ranked 1 > 2 > 3: pairs d = 1, 2, 1:
    # -log sig(1) = 0.313262, -log sig(2) = 0.126928; mean of 3 = 0.753452 / 3 = 0.251150
    part = ranking_pairwise_sum(*_batch([([2.0, 1.0, 0.0], [1, 2, 3])]))
    assert float(part.total) == pytest.approx(0.2511505, abs=1e-6) and float(part.count) == 1
    # ranks [1, 2, 2]: skip -> (0.313262 + 0.126928) / 2 = 0.220095
    tied = _batch([([2.0, 1.0, 0.0], [1, 2, 2])])
    assert float(ranking_pairwise_sum(*tied).total) == pytest.approx(0.2200948, abs=1e-6)
    # half: the tied pair (d = 1) gives (-log sig(1) - log sig(-1)) / 2 = (0.313262 + 1.313262) / 2
    # = 0.813262; (0.313262 + 0.126928 + 0.813262) / 3 = 0.417817
    assert float(ranking_pairwise_sum(*tied, ties="half").total) == pytest.approx(0.4178171, abs=1e-6)
    # two rankings in a batch: each its own mean; a fully tied one has no pair under skip and
    # neither adds to the total nor counts
    both = ranking_pairwise_sum(*_batch([([2.0, 1.0, 0.0], [1, 2, 3]), ([5.0, 0.0], [1, 1])]))
    assert float(both.total) == pytest.approx(0.2511505, abs=1e-6) and float(both.count) == 1


def test_plackett_luce_loss_of_a_three_item_ranking_by_hand():
    # order 1 > 2 > 3 with scores 2, 1, 0:
    # -log P = [log(e^2 + e^1 + e^0) - 2] + [log(e^1 + e^0) - 1] + [0 - 0]
    #        = [log(11.107338) - 2] + [log(3.718282) - 1] = 0.407606 + 0.313262 = 0.720868
    part = plackett_luce_sum(*_batch([([2.0, 1.0, 0.0], [1, 2, 3])]))
    assert float(part.total) == pytest.approx(0.720868, abs=1e-6) and float(part.count) == 1 and part.unit == "rows"
    # the same ranking with the responses listed in another order
    assert float(plackett_luce_sum(*_batch([([0.0, 2.0, 1.0], [3, 1, 2])])).total) == pytest.approx(0.720868, abs=1e-6)
    # a tie [1, 2, 2] (Breslow): both tied items drawn from {2, 3}: 0.407606 + [log(e + 1) - 1]
    # + [log(e + 1) - 0] = 0.407606 + 0.313262 + 1.313262 = 2.034130
    assert float(plackett_luce_sum(*_batch([([2.0, 1.0, 0.0], [1, 2, 2])])).total) == pytest.approx(2.034130, abs=1e-6)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-5, 5), min_size=2, max_size=2), st.lists(st.floats(-5, 5), min_size=2, max_size=2))
def test_both_ranking_losses_equal_the_pairwise_loss_at_k2(a, b):
    """At K = 2 a ranking is a pair: chosen = the rank-1 response."""
    scores = torch.tensor([a, b], dtype=torch.float64)  # two rankings of 2
    ranks = torch.tensor([[1, 2], [2, 1]])
    valid = torch.ones(2, 2, dtype=torch.bool)
    chosen, rejected = torch.stack([scores[0, 0], scores[1, 1]]), torch.stack([scores[0, 1], scores[1, 0]])
    bt = bradley_terry_sum(chosen, rejected)
    for part in (ranking_pairwise_sum(scores, ranks, valid), plackett_luce_sum(scores, ranks, valid)):
        assert float(part.total) == pytest.approx(float(bt.total), rel=1e-12, abs=1e-12)
        assert float(part.count) == float(bt.count) == 2


def _pairwise_by_loops(scores: list[float], ranks: list[int], ties: str) -> float | None:
    terms = []
    for i, j in itertools.combinations(range(len(ranks)), 2):
        if ranks[i] != ranks[j]:
            w, l = (i, j) if ranks[i] < ranks[j] else (j, i)
            terms.append(nll(scores[w] - scores[l]))
        elif ties == "half":
            terms.append(0.5 * (nll(scores[i] - scores[j]) + nll(scores[j] - scores[i])))
    return sum(terms) / len(terms) if terms else None


def _plackett_luce_by_order(scores: list[float], order: list[int]) -> float:
    """-log P(order) as the product of successive choices (order = indices, best first)."""
    total = 0.0
    for t, chosen in enumerate(order):
        rest = order[t:]
        total += math.log(sum(math.exp(scores[u]) for u in rest)) - scores[chosen]
    return total


rankings_strategy = st.integers(2, 5).flatmap(lambda k: st.tuples(
    st.lists(st.floats(-4, 4), min_size=k, max_size=k), st.lists(st.integers(1, 3), min_size=k, max_size=k)))


@settings(max_examples=60, deadline=None)
@given(st.lists(rankings_strategy, min_size=1, max_size=4), st.sampled_from(["skip", "half"]))
def test_pairwise_ranking_loss_against_loops(batch, ties):
    """Ragged rankings with ties, padded in one batch, against a loop over the pairs."""
    expected = [_pairwise_by_loops(s, r, ties) for s, r in batch]
    part = ranking_pairwise_sum(*_batch(batch), ties=ties)
    assert float(part.count) == sum(e is not None for e in expected)
    assert float(part.total) == pytest.approx(sum(e for e in expected if e is not None), rel=1e-9, abs=1e-9)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-4, 4), min_size=2, max_size=5))
def test_plackett_luce_is_a_distribution_over_orders(scores):
    """exp(-loss) over all K! orders sums to 1, and each equals the product of choices."""
    k = len(scores)
    orders = list(itertools.permutations(range(k)))
    batch = []
    for order in orders:
        ranks = [0] * k
        for position, i in enumerate(order):
            ranks[i] = position + 1
        batch.append((scores, ranks))
    per_order = []
    for (s, r), order in zip(batch, orders):
        loss = float(plackett_luce_sum(*_batch([(s, r)])).total)
        assert loss == pytest.approx(_plackett_luce_by_order(s, list(order)), abs=1e-9)
        per_order.append(math.exp(-loss))
    assert sum(per_order) == pytest.approx(1.0, abs=1e-9)


def test_padding_gives_finite_gradients_that_ignore_it():
    scores, ranks, valid = _batch([([1.0, 0.5], [1, 2]), ([0.2, 0.1, -0.3, 2.0], [2, 1, 3, 3])])
    scores.requires_grad_(True)
    for loss in (plackett_luce_sum(scores, ranks, valid), ranking_pairwise_sum(scores, ranks, valid, ties="half")):
        (grad,) = torch.autograd.grad(loss.total, scores)
        assert torch.isfinite(grad).all()
        assert float(grad[0, 2:].abs().sum()) == 0.0  # padded slots get nothing


# ------------------------------------------------------------------------ the judgement log


def test_current_judgements_replays_undo_and_skip():
    log = [
        {"id": "a", "item": "0", "annotator": "ann", "action": "rank", "ranks": [1, 2]},
        {"id": "b", "item": "1", "annotator": "ann", "action": "skip"},
        {"id": "c", "item": "2", "annotator": "ann", "action": "rank", "ranks": [2, 1]},
        {"id": "d", "action": "undo", "undoes": "c"},
        {"id": "e", "item": "2", "annotator": "ann", "action": "rank", "ranks": [1, 2]},
    ]
    assert [r["id"] for r in current_judgements(log)] == ["a", "b", "e"]
    with pytest.raises(ValueError, match=r"log line 2: undo of 'c', which is no rank/skip row in force"):
        current_judgements([log[0], {"action": "undo", "undoes": "c"}], where="log")
    with pytest.raises(ValueError, match="action must be one of"):
        current_judgements([{"action": "maybe"}])


def test_agreement_by_hand():
    # a = [1, 2, 3], b = [1, 3, 2]: pairs (0,1) and (0,2) agree, (1,2) does not:
    # agreement 2/3, tau = (2 - 1) / 3 = 1/3
    assert pair_agreement([1, 2, 3], [1, 3, 2]) == (2, 3)
    assert kendall_tau_b([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3)
    # a = [1, 1, 2] (a tie), b = [1, 2, 3]: C = 2, D = 0, n0 = 3, T_a = 1, T_b = 0:
    # tau_b = 2 / sqrt((3 - 1) * 3) = 0.816497
    assert kendall_tau_b([1, 1, 2], [1, 2, 3]) == pytest.approx(0.816497, abs=1e-6)
    assert kendall_tau_b([1, 1, 1], [1, 2, 3]) is None
    assert kendall_tau_b([3, 2, 1], [1, 2, 3]) == -1.0
    rows = [
        {"item": "0", "annotator": "ann", "responses": ["x", "y", "z"], "ranks": [1, 2, 3]},
        {"item": "0", "annotator": "bob", "responses": ["x", "y", "z"], "ranks": [1, 3, 2]},
        {"item": "1", "annotator": "ann", "responses": ["p", "q"], "ranks": [1, 2]},
        {"item": "1", "annotator": "bob", "action": "skip"},
        {"item": "2", "annotator": "ann", "responses": ["p", "q"], "ranks": [2, 1]},
        {"item": "2", "annotator": "bob", "responses": ["p", "q"], "ranks": [2, 1]},
    ]
    stats = agreement_stats(rows)
    assert stats["rankings"] == 5 and stats["skips"] == 1 and stats["items_ranked"] == 3
    assert stats["items_ranked_twice"] == 2
    assert stats["per_annotator"] == {"ann": {"rankings": 3, "skips": 0}, "bob": {"rankings": 2, "skips": 1}}
    # item 0: 2 of 3 pairs agree; item 2: 1 of 1 -> 3 / 4; tau: 1/3 and 1 -> mean 2/3
    assert stats["compared_pairs"] == 4 and stats["pairwise_agreement"] == 0.75
    assert stats["kendall_tau_mean"] == pytest.approx(2 / 3) and stats["kendall_tau_n"] == 2


# ------------------------------------------------------------------------ the trainer


def _ranking_rows(rng: random.Random, n: int, ties: bool = True) -> list[dict]:
    """Rankings of 2-4 responses: those with an 'a' best, then those with a 'c', then plain
    digits (tied with each other when ties=True)."""
    rows = []
    for _ in range(n):
        k = rng.randint(2, 4)
        kinds = [rng.choice("ac-") for _ in range(k)]
        if len(set(kinds)) == 1:
            kinds[0] = "a" if kinds[0] != "a" else "-"
        responses, ranks = [], []
        for i, kind in enumerate(kinds):
            digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 3)))
            responses.append(digits + ("" if kind == "-" else kind))
            ranks.append({"a": 1, "c": 2, "-": 3}[kind] * (1 if ties else 10) + (0 if ties else i))
        rows.append({"prompt": f"{rng.randint(0, 9)}+{rng.randint(0, 9)}=", "responses": responses, "ranks": ranks})
    return rows


@pytest.mark.parametrize("loss", ["pairwise", "plackett_luce"])
def test_one_micro_batch_of_n_rankings_equals_n_micro_batches_of_one(tiny_model_dir, tmp_path, first_step_gradients,
                                                                    loss):
    """4 rankings of 2-4 responses (ties included) in one micro-batch give the gradient of 4
    micro-batches of one ranking (float64: only the summation order differs)."""
    from trustrl.models import load_tokenizer
    from trustrl.trainers.reward_model import RewardConfig, RewardTrainer
    from trustrl.value_model import scalar_model_from_lm

    write_jsonl(tmp_path / "rankings.jsonl", _ranking_rows(random.Random(3), 4))
    grads = {}
    # (and token-budget micro-batches of 100 padded tokens: rankings sorted by K_max x longest text)
    splits = {1: {}, 4: dict(gradient_accumulation_steps=4), "budget": dict(micro_batch_tokens=100)}
    for accum, split in splits.items():
        model = scalar_model_from_lm(tiny_model_dir, kind="reward", zero_head=False, seed=4).double()
        cfg = RewardConfig(model=str(tiny_model_dir), dataset=str(tmp_path / "rankings.jsonl"),
                           output_dir=str(tmp_path / f"{loss}{accum}"), max_steps=1, batch_size=4,
                           max_length=24, rank_loss=loss, rank_ties="half", **split,
                           progress=False, tensorboard=False, seed=0, device="cpu")
        grads[accum] = first_step_gradients(RewardTrainer(cfg, model=model, tokenizer=load_tokenizer(tiny_model_dir)))
    for split in (4, "budget"):
        assert grads[split].keys() == grads[1].keys()
        for name, g in grads[1].items():
            torch.testing.assert_close(grads[split][name], g, rtol=0, atol=1e-12, msg=lambda m: f"{name}: {m}")
    assert max(float(g.abs().max()) for g in grads[1].values()) > 1e-4  # not a vacuous comparison


def test_train_rm_on_a_judgement_log_raises_heldout_accuracy(tiny_model_dir, tmp_path):
    """`trustrl train rm` on a judgement log (with a skip and an undo in it) and held-out
    rankings: the share of held-out pairs ordered right rises above 0.8."""
    from trustrl.cli import main
    from trustrl.logging import read_metrics

    rng = random.Random(0)
    log = []
    for i, row in enumerate(_ranking_rows(rng, 96)):
        log.append({"id": f"j{i}", "item": str(i), "annotator": "ann", "action": "rank", **row})
    log.insert(3, {"id": "s", "item": "x", "annotator": "ann", "action": "skip"})
    # a wrong ranking, undone: it must not be trained on
    log.append({"id": "bad", "item": "0", "annotator": "ann", "action": "rank", "prompt": "1+1=",
                "responses": ["1a", "2"], "ranks": [2, 1]})
    log.append({"id": "u", "annotator": "ann", "action": "undo", "undoes": "bad"})
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    write_jsonl(tmp_path / "eval.jsonl", _ranking_rows(rng, 32, ties=False))
    out = tmp_path / "rm"
    rc = main(["train", "rm", f"model={tiny_model_dir}", f"dataset={tmp_path / 'log.jsonl'}",
               f"eval_dataset={tmp_path / 'eval.jsonl'}", f"output_dir={out}", "max_steps=12", "batch_size=8",
               "learning_rate=3e-3", "max_length=24", "eval_every=0", "progress=false", "tensorboard=false", "seed=2"])
    assert rc == 0
    evals = [r for r in read_metrics(out) if "rm/accuracy" in r]
    assert [r["step"] for r in evals] == [0, 12]
    assert evals[-1]["rm/accuracy"] > 0.8 and evals[-1]["rm/accuracy"] > evals[0]["rm/accuracy"] + 0.2, evals
    assert all(math.isfinite(r["loss/rank"]) for r in read_metrics(out) if "loss/rank" in r)


def test_ranking_file_errors_name_the_ranking(tiny_model_dir, tmp_path):
    from trustrl.trainers.reward_model import RewardConfig, RewardTrainer

    write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "1+1=", "responses": ["2", "3"], "ranks": [1, 2]},
                                         {"prompt": "1+2=", "responses": ["3", "4"], "ranks": [1]}])
    cfg = RewardConfig(model=str(tiny_model_dir), dataset=str(tmp_path / "bad.jsonl"), output_dir=str(tmp_path / "o"),
                       max_steps=1, max_length=24, progress=False, tensorboard=False)
    with pytest.raises(ValueError, match=r"bad.jsonl ranking 2: 'ranks' must be a list of 2 integers"):
        RewardTrainer(cfg)
    write_jsonl(tmp_path / "r.jsonl", [{"prompt": "1+1=", "responses": ["2", "3"], "ranks": [1, 2]}])
    with pytest.raises(ValueError, match="center_rewards_coef is defined on pairs"):
        RewardTrainer(cfg.model_copy(update={"dataset": str(tmp_path / "r.jsonl"), "center_rewards_coef": 0.1}))
