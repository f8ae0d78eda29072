"""The human-feedback loop end to end (shortened): the demo's pre-training and SFT, K=3
completions per prompt sampled and ranked by the scripted annotator (rule reward + noise),
`train rm` on the rankings and on the same pairs as rows, PPO against the ranking reward model,
held-out accuracies before and after. The full-size numbers are in the README."""

from __future__ import annotations

import json

import pytest

from trustrl.rankings import strict_pairs
from trustrl.tasks.rank_feedback import (RankFeedbackSettings, format_summary, make_scripted_annotator,
                                         rankings_to_pairs, run_rank_feedback)


def test_scripted_annotator_by_hand():
    exact = make_scripted_annotator(noise=0.0)  # 2 digits, answers units first: 47+38 = 085 -> "580"
    assert exact(["47+38=", "47+38=", "47+38=", "47+38="],
                 ["<answer>580</answer>", "<answer>570</answer>", "580", "<answer>580</answer> "]) == [1.1, 0.1, 0.0, 1.1]
    noisy = make_scripted_annotator(noise=0.3, seed=1)
    a = noisy(["1+2=", "3+4="], ["<answer>300</answer>", "x"])
    assert noisy(["3+4="], ["x"]) == a[1:]  # the noise depends on the text only, not the batch
    assert a[0] != pytest.approx(1.1) and make_scripted_annotator(noise=0.3, seed=2)(["3+4="], ["x"]) != a[1:]
    with pytest.raises(ValueError, match="no 'a\\+b=' in the prompt"):
        exact(["hello"], ["x"])


def test_rankings_to_pairs_keeps_every_strict_pair():
    rows = [{"prompt": "p", "responses": ["a", "b", "c"], "ranks": [2, 1, 2]}]
    assert rankings_to_pairs(rows) == [{"prompt": "p", "chosen": "b", "rejected": "a"},
                                       {"prompt": "p", "chosen": "b", "rejected": "c"}]


def test_walkthrough_shortened(tmp_path):
    s = RankFeedbackSettings(output_dir=str(tmp_path / "rf"), quick=True, k=3, prompts=8, eval_prompts=6,
                             eval_noise=0.3, max_new_tokens=8, rm_steps=3, rm_batch=4)
    summary = run_rank_feedback(s)
    out = tmp_path / "rf"
    log = [json.loads(x) for x in (out / "judgements.jsonl").read_text().splitlines()]
    assert len(log) == 8 and {r["annotator"] for r in log} == {"judge:scripted"}
    assert all(len(r["responses"]) == 3 for r in log)
    # noise breaks every tie: 3 ordered pairs per ranking (rankings holding an empty response
    # are left out of both reward-model runs: pair rows cannot hold one)
    kept = [r for r in log if all(x.strip() for x in r["responses"])]
    assert summary["rankings"] == len(kept) > 0
    assert summary["pairs_in_rankings"] == sum(len(strict_pairs(r["ranks"])) for r in kept) == 3 * len(kept)
    for key in ("rm_rankings_accuracy_before", "rm_rankings_accuracy_after", "rm_pairs_accuracy_before",
                "rm_pairs_accuracy_after", "policy_accuracy_before_ppo", "policy_accuracy_after_ppo"):
        assert 0.0 <= summary[key] <= 1.0, key
    # the two reward models are evaluated on the same held-out pairs, from the same start
    assert summary["rm_rankings_accuracy_before"] == pytest.approx(summary["rm_pairs_accuracy_before"], abs=1e-6)
    assert summary["rm_pair_batch"] == 12  # 4 rankings x 3 pairs per step: the same comparisons per step
    assert (out / "ppo" / "metrics.jsonl").is_file() and (out / "rm_rankings" / "final").is_dir()
    assert "reward model from rankings: held-out pair accuracy" in format_summary(summary)
