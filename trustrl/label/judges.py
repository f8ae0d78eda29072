"""Rankings from a judge instead of a person (AI feedback, RLAIF): each item's K responses
are scored by the judge and ranked by score (higher = better; equal scores tie). The rows go
to the same judgement log as a person's, with annotator ``judge:NAME``, so ``trustrl train rm``
and ``trustrl label stats`` (agreement of the judge with people) read them unchanged.

A judge is (``--judge SPEC``):

* a reward-model directory (``trustrl train rm`` output: it has ``trustrl_head.json``): it
  scores each (prompt, response) with the token ids its training fed it for that pair (the
  item's own prompt, string or chat messages, reaches it as ``raw_prompts`` and is formatted
  with the model's recorded ``prompt_format``, see :mod:`trustrl.rewards.reward_model`);
* a language-model directory: a generative judge with a prompt template, whose score is
  parsed from its output (:mod:`trustrl.rewards.judge`);
* a reward function, ``module:function`` or a built-in reward name.

Scoring goes through :func:`trustrl.rewards.registry.score_completions`: the same time limit
and fault policy as rewards in RL (``timeout_s``; ``on_error="raise"`` stops at the first
fault, ``"default"`` writes a skip row for an item with a fault instead of a ranking).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trustrl.label.candidates import prompt_as_text
from trustrl.label.store import JudgementStore
from trustrl.rewards.registry import NamedReward, RewardError, resolve_reward, score_completions

__all__ = ["resolve_judge", "ranks_from_scores", "judge_items"]


def resolve_judge(spec: str, *, template: str | None = None, score_pattern: str | None = None,
                  device: str = "cpu") -> NamedReward:
    """The judge named by ``spec`` (see the module docstring) as a reward."""
    path = Path(spec)
    if path.is_dir() and (path / "trustrl_head.json").is_file():
        from trustrl.rewards.reward_model import reward_model_reward

        return NamedReward(name=path.name or "reward_model", fn=reward_model_reward(path, device=device))
    if path.is_dir() and (path / "config.json").is_file():
        from trustrl.rewards.judge import DEFAULT_SCORE_PATTERN, DEFAULT_TEMPLATE, generative_judge_reward

        fn = generative_judge_reward(path, template=template or DEFAULT_TEMPLATE,
                                     score_pattern=score_pattern or DEFAULT_SCORE_PATTERN, device=device)
        return NamedReward(name=path.name or "judge", fn=fn)
    if path.is_dir():
        raise ValueError(f"--judge {spec}: a directory, but neither a reward model (trustrl_head.json) nor a "
                         "language model (config.json)")
    if template or score_pattern:
        raise ValueError("--judge-template / --judge-score-pattern apply to a generative judge model directory only")
    return resolve_reward(spec)


def ranks_from_scores(scores: list[float]) -> list[int]:
    """Rank 1 = the highest score; equal scores share a rank: ``1 + #{j: s_j > s_i}``
    (``[0.5, 2.0, 0.5]`` -> ``[2, 1, 2]``)."""
    return [1 + sum(other > s for other in scores) for s in scores]


def judge_items(candidates: Any, store: JudgementStore, judge: NamedReward, *, timeout_s: float | None = 60.0,
                on_error: str = "raise", limit: int | None = None) -> dict[str, int]:
    """Rank every item (or the first ``limit``) not yet judged by this judge; returns counts
    ``{"ranked", "skipped", "already"}``. Resumable: items the judge already ranked or skipped
    in the log are passed over."""
    annotator = f"judge:{judge.name}"
    done = {str(r["item"]) for r in store.judgements() if r.get("annotator") == annotator}
    counts = {"ranked": 0, "skipped": 0, "already": 0}
    for index, item_id in enumerate(candidates.item_ids[:limit]):
        if item_id in done:
            counts["already"] += 1
            continue
        item = candidates.wait(index)
        prompt = prompt_as_text(item.prompt)
        k = len(item.responses)
        try:  # raw_prompts: the item's prompt itself, for a judge that formats it (a reward model)
            result = score_completions([judge], [prompt] * k, item.responses, {"raw_prompts": [item.prompt] * k},
                                       timeout_s=timeout_s, on_error="raise")
        except RewardError as err:
            if on_error == "raise":
                raise RewardError(f"item {item_id!r}: {err}", function=err.function,
                                  sample_index=err.sample_index) from err
            store.skip(item_id, annotator, note=f"judge fault: {err}")
            counts["skipped"] += 1
            continue
        scores = result.total.tolist()
        store.rank(item_id, annotator, item.prompt, item.responses, ranks_from_scores(scores), note="",
                   scores=scores)
        counts["ranked"] += 1
    return counts
