"""The human-feedback loop end to end on the addition task:

1. sample K completions per prompt from the demo's SFT model (``trustrl label --model``);
2. rank them -- here a scripted annotator, the rule reward (right answer, then right format)
   plus Gaussian noise, standing in for people in ``trustrl label``;
3. ``trustrl train rm`` on the rankings (all K(K-1)/2 pairs of a ranking as one batch element),
   and for comparison on the very same pairs given as independent pair rows;
4. PPO against the reward model trained from rankings.

Held-out: K completions of the held-out prompts ranked by the rule without noise (strictly
ordered pairs only count), and the policy's held-out accuracy before and after PPO.

Command line: ``python -m trustrl.tasks.rank_feedback OUT_DIR [--sft-model DIR] [--quick]``
(without ``--sft-model`` the demo's pre-training and SFT run first). The scripted annotator is
also a judge for the app: ``trustrl label ... --judge trustrl.tasks.rank_feedback:scripted_annotator``.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from trustrl.tasks.arithmetic import AdditionTask

__all__ = ["RankFeedbackSettings", "make_scripted_annotator", "scripted_annotator", "rankings_to_pairs",
           "run_rank_feedback"]

_PROMPT = re.compile(r"(\d+)\+(\d+)=")
_ANSWER = re.compile(r"<answer>(.*?)</answer>")


def make_scripted_annotator(noise: float = 0.3, seed: int = 0, digits: int = 2, reverse_answer: bool = True):
    """``fn(prompts, completions) -> scores``: ``1`` for the right sum, ``+0.1`` for the task's
    exact format, ``+ N(0, noise^2)`` drawn from a generator seeded by (seed, prompt,
    completion): the same text always gets the same score, whatever else is in the batch."""
    task = AdditionTask(digits=digits, reverse_answer=reverse_answer)

    def scripted_annotator(prompts: list[str], completions: list[str], **_: Any) -> list[float]:
        scores = []
        for prompt, completion in zip(prompts, completions):
            match = _PROMPT.search(prompt)
            if match is None:
                raise ValueError(f"scripted annotator: no 'a+b=' in the prompt {prompt[:60]!r}")
            right = task.answer_text(int(match.group(1)) + int(match.group(2)))
            answer = _ANSWER.search(completion)
            score = float(answer is not None and answer.group(1) == right)
            score += 0.1 * bool(re.fullmatch(task.format_pattern, completion.strip()))
            if noise:
                score += random.Random(f"{seed}|{prompt}|{completion}").gauss(0.0, noise)
            scores.append(score)
        return scores

    return scripted_annotator


scripted_annotator = make_scripted_annotator()


def rankings_to_pairs(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every strictly ordered pair of every ranking as its own (prompt, chosen, rejected) row."""
    from trustrl.rankings import strict_pairs

    return [{"prompt": r["prompt"], "chosen": r["responses"][w], "rejected": r["responses"][l]}
            for r in rows for w, l in strict_pairs(r["ranks"])]


@dataclass
class RankFeedbackSettings:
    output_dir: str = "runs/rank_feedback"
    seed: int = 0
    sft_model: str | None = None
    """An SFT model directory (e.g. runs/demo/sft/final); None: run the demo's first two stages."""
    k: int = 4
    """Completions sampled and ranked per prompt."""
    prompts: int = 400
    """Training prompts ranked."""
    eval_prompts: int = 100
    noise: float = 0.3
    """Annotator noise (std of the Gaussian added to the rule score)."""
    eval_noise: float = 0.0
    max_new_tokens: int = 12
    rm_steps: int = 300
    rm_batch: int = 8
    """Rankings per step (the pair run takes the same number of pairs per step)."""
    rm_lr: float = 1e-3
    ppo_steps: int = 100
    quick: bool = False
    """Tiny budgets everywhere (the test suite)."""


def _annotate(model_dir: str, prompt_rows: list[dict], out: Path, name: str, s: RankFeedbackSettings,
              noise: float) -> list[dict[str, Any]]:
    from trustrl.data import write_jsonl
    from trustrl.label.candidates import SampledCandidates
    from trustrl.label.judges import judge_items
    from trustrl.label.store import JudgementStore
    from trustrl.rankings import current_judgements
    from trustrl.rewards.registry import NamedReward

    write_jsonl(out / f"{name}_prompts.jsonl", [{"prompt": r["prompt"]} for r in prompt_rows])
    candidates = SampledCandidates(model_dir, out / f"{name}_prompts.jsonl", s.k, out / f"{name}.candidates.jsonl",
                                   max_new_tokens=s.max_new_tokens, seed=s.seed, ahead=len(prompt_rows))
    store = JudgementStore(out / f"{name}.jsonl")
    annotator = NamedReward(name="scripted", fn=make_scripted_annotator(noise, seed=s.seed))
    judge_items(candidates, store, annotator, timeout_s=None)
    candidates.close()
    return [r for r in current_judgements(store.judgements()) if r.get("action") == "rank"]


def run_rank_feedback(s: RankFeedbackSettings) -> dict[str, Any]:
    """The four steps above; writes and returns ``summary.json``."""
    from trustrl.algorithms.ppo import PPOConfig, PPOTrainer
    from trustrl.data import load_rows, write_jsonl
    from trustrl.logging import write_json_atomic
    from trustrl.rankings import strict_pairs
    from trustrl.tasks.arithmetic import write_task_data
    from trustrl.tasks.demo import DemoSettings, _first_two_stages, _rl_common, _rule_rewards, finished_stage
    from trustrl.trainers.reward_model import RewardConfig, RewardTrainer

    out = Path(s.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    demo = DemoSettings.quick(output_dir=str(out), seed=s.seed) if s.quick else DemoSettings(output_dir=str(out),
                                                                                            seed=s.seed)
    task = AdditionTask(digits=demo.digits, reverse_answer=demo.reverse_answer)
    data = write_task_data(out / "data", task, seed=s.seed, n_eval=max(s.eval_prompts, demo.eval_prompts),
                           sft_carry_slip_rate=demo.sft_carry_slip_rate)
    sft_dir = s.sft_model or _first_two_stages(demo, out, data, {})[1]["model_dir"]

    # 1 + 2. sample K per prompt, rank (scripted annotator; held out: the rule without noise)
    train_rows = load_rows(data["rl"]).rows[: s.prompts]
    eval_rows = load_rows(data["eval"]).rows[: s.eval_prompts]
    rankings = _annotate(sft_dir, train_rows, out, "judgements", s, s.noise)
    held_out = _annotate(sft_dir, eval_rows, out, "heldout", s, s.eval_noise)

    # 3. reward model on the rankings, and on the same pairs as independent rows. Pair files
    # refuse empty responses (an immediate EOS), so rankings holding one are left out of both.
    def usable(rows):
        return [r for r in rows if all(x.strip() for x in r["responses"])]

    dropped = len(rankings) - len(usable(rankings)) + len(held_out) - len(usable(held_out))
    rankings, held_out = usable(rankings), usable(held_out)
    write_jsonl(out / "rankings.jsonl", rankings)
    write_jsonl(out / "heldout_rankings.jsonl", held_out)
    pairs, eval_pairs = rankings_to_pairs(rankings), rankings_to_pairs(held_out)
    write_jsonl(out / "pairs.jsonl", pairs)
    write_jsonl(out / "heldout_pairs.jsonl", eval_pairs)
    common = dict(model=sft_dir, max_steps=s.rm_steps, learning_rate=s.rm_lr, lr_scheduler="cosine",
                  warmup_steps=min(10, s.rm_steps // 5), max_length=32, eval_every=max(1, s.rm_steps // 4),
                  save_every=0, seed=s.seed, progress=demo.progress, device="cpu")
    rm = RewardTrainer(RewardConfig(dataset=str(out / "rankings.jsonl"), eval_dataset=str(out / "heldout_rankings.jsonl"),
                                    output_dir=str(out / "rm_rankings"), batch_size=s.rm_batch, **common)).train()
    finished_stage("rm_rankings", rm)  # (stopped by Ctrl-C: the walkthrough ends there)
    # the same comparisons per step: rankings that tie everything (identical samples) carry none
    informative = sum(bool(strict_pairs(r["ranks"])) for r in rankings)
    pair_batch = max(1, round(s.rm_batch * len(pairs) / max(informative, 1)))
    rm_pairs = RewardTrainer(RewardConfig(dataset=str(out / "pairs.jsonl"), eval_dataset=str(out / "heldout_pairs.jsonl"),
                                          output_dir=str(out / "rm_pairs"), batch_size=pair_batch, **common)).train()
    finished_stage("rm_pairs", rm_pairs)

    # 4. PPO against the reward model trained from rankings (the rule only measures)
    ppo_cfg = PPOConfig(**{**_rl_common(demo, out, data, sft_dir), "output_dir": str(out / "ppo")},
                        max_steps=2 if s.quick else s.ppo_steps, prompts_per_step=demo.ppo_prompts,
                        samples_per_prompt=demo.ppo_samples, reward_model=rm["model_dir"],
                        rewards=_rule_rewards(task, correct_weight=0.0, format_weight=0.0),
                        learning_rate=demo.ppo_lr, critic_learning_rate=demo.ppo_critic_lr,
                        critic_init=rm["model_dir"], ppo_epochs=demo.ppo_epochs, minibatch_size=demo.ppo_minibatch,
                        beta=demo.ppo_beta, kl_control="adaptive", kl_target=demo.ppo_kl_target,
                        kl_horizon=demo.ppo_kl_horizon, target_kl=demo.ppo_target_kl, missing_eos_penalty=-1.0,
                        gamma=1.0, lam=0.95)
    ppo = finished_stage("ppo", PPOTrainer(ppo_cfg).train())
    summary = {
        "rankings": len(rankings), "rankings_left_out_empty_response": dropped, "k": s.k, "pairs_in_rankings": len(pairs), "heldout_rankings": len(held_out),
        "heldout_pairs": len(eval_pairs),
        "rm_rankings_accuracy_before": rm["accuracy_first"], "rm_rankings_accuracy_after": rm["accuracy_last"],
        "rm_pairs_accuracy_before": rm_pairs["accuracy_first"], "rm_pairs_accuracy_after": rm_pairs["accuracy_last"],
        "rm_pair_batch": pair_batch,
        "policy_accuracy_before_ppo": ppo["accuracy_first"], "policy_accuracy_after_ppo": ppo["accuracy_last"],
        "sft_model": sft_dir, "settings": asdict(s),
    }
    write_json_atomic(out / "summary.json", summary)
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    def pct(x):
        return "n/a" if x is None else f"{100 * x:.1f}%"

    return "\n".join([
        f"{summary['rankings']} rankings of K={summary['k']} ({summary['pairs_in_rankings']} ordered pairs); "
        f"held out: {summary['heldout_pairs']} pairs in {summary['heldout_rankings']} rankings",
        f"reward model from rankings: held-out pair accuracy {pct(summary['rm_rankings_accuracy_before'])} -> "
        f"{pct(summary['rm_rankings_accuracy_after'])}",
        f"reward model from the same pairs as rows: {pct(summary['rm_pairs_accuracy_before'])} -> "
        f"{pct(summary['rm_pairs_accuracy_after'])}",
        f"PPO against the ranking reward model: held-out accuracy {pct(summary['policy_accuracy_before_ppo'])} -> "
        f"{pct(summary['policy_accuracy_after_ppo'])}",
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("output_dir")
    p.add_argument("--sft-model", default=None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompts", type=int, default=RankFeedbackSettings.prompts)
    p.add_argument("--rm-steps", type=int, default=RankFeedbackSettings.rm_steps)
    p.add_argument("--ppo-steps", type=int, default=RankFeedbackSettings.ppo_steps)
    args = p.parse_args(argv)
    from trustrl.tasks.demo import DemoStopped

    try:
        summary = run_rank_feedback(RankFeedbackSettings(output_dir=args.output_dir, sft_model=args.sft_model,
                                                         quick=args.quick, seed=args.seed, prompts=args.prompts,
                                                         rm_steps=args.rm_steps, ppo_steps=args.ppo_steps))
    except DemoStopped as stop:
        print(f"rank_feedback: {str(stop).replace('the demo', 'the walkthrough')}", file=sys.stderr)
        return 130
    print(format_summary(summary))
    print(json.dumps({k: v for k, v in summary.items() if k != "settings"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
