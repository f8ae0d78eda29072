"""`make demo`: the three stages of LLM training on a CPU in minutes.

1. pre-train a tiny Llama-style transformer from scratch on generated text ("47+38=580" lines:
   the sum written units digit first, zero-padded, see ``AdditionTask.reverse_answer``);
2. SFT it on examples in the answer format ("47+38=" -> "<answer>580</answer>") written by a
   sloppy teacher who forgets the carries in 60% of the sums that have one
   ("<answer>570</answer>"), as imperfect demonstration data is;
3. the RL stage, with held-out greedy accuracy measured before (``accuracy_before_rl``, the SFT
   model) and after (``accuracy_after_rl``) on sums never seen in any stage:
   - ``pipeline="grpo"`` (the default): GRPO with rule rewards (exact answer + format);
   - ``pipeline="rlhf"``: a Bradley-Terry reward model on preference pairs (right answer
     preferred to a slipped, wrong or badly formatted one), then PPO against that model alone;
   - ``pipeline="trpo"``: TRPO steps in a KL trust region on group advantages of the rule rewards.

Why the sloppy teacher: it is the situation RL with verifiable rewards is for. After SFT the
model can add (it writes the right sum for most prompts at least once in 16 samples) but its
greedy answer is the teacher's habit; the reward, which checks the sum, turns that pass@16
into pass@1. Without the slips, how well SFT alone does varies with the seed from mediocre
to nearly perfect on a model this small, which leaves RL nothing reliable to show. Measured
numbers and the commands are in the README.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from trustrl.config import GRPOConfig, PretrainConfig, SFTConfig
from trustrl.tasks.arithmetic import CHARS, SPECIAL_TOKENS, AdditionTask, write_task_data
from trustrl.tiny import create_tiny_model_dir

PIPELINES = ("grpo", "rlhf", "trpo")


@dataclass
class DemoSettings:
    """Budgets of the three stages (the defaults are what `make demo` runs)."""

    output_dir: str = "runs/demo"
    """Run directory: data/, init/, pretrain/, sft/, the RL stage's directory, summary.json."""
    seed: int = 0
    """Seeds data order, initialization and sampling of every stage (the held-out split is fixed)."""
    pipeline: str = "grpo"
    """The RL stage: grpo (the default), rlhf (reward model, then PPO against it) or trpo."""
    overwrite: bool = False
    """output_dir holds an earlier demo: move it aside whole to OUT.previous-<n> (without it,
    such a start is refused: a run directory never loses work)."""
    digits: int = 2
    """Operands have up to this many digits."""
    hidden_size: int = 64
    """Width of the tiny Llama-style model."""
    num_layers: int = 2
    """Decoder blocks."""
    num_heads: int = 4
    """Attention heads."""
    reverse_answer: bool = True
    """Write sums units digit first, zero-padded (see AdditionTask.reverse_answer)."""
    sft_carry_slip_rate: float = 0.6
    """Share of SFT demonstrations (among sums with a carry) whose teacher forgot the carries."""
    pretrain_steps: int = 1000
    """Pre-training optimizer steps (packed blocks of 48 tokens)."""
    pretrain_batch: int = 32
    """Blocks per pre-training step."""
    pretrain_lr: float = 3e-3
    """Peak pre-training learning rate (cosine schedule)."""
    sft_steps: int = 2000
    """SFT optimizer steps."""
    sft_batch: int = 32
    """SFT rows per step."""
    sft_lr: float = 1e-3
    """SFT learning rate (constant)."""
    grpo_steps: int = 100
    """GRPO steps (pipeline grpo)."""
    grpo_prompts: int = 16
    """Prompts per GRPO or TRPO step."""
    group_size: int = 16
    """Completions per prompt (GRPO and TRPO)."""
    grpo_lr: float = 3e-4
    """GRPO learning rate."""
    beta: float = 0.01
    """GRPO's KL coefficient (k3 estimator)."""
    eval_prompts: int = 200
    """Held-out prompts evaluated greedily."""
    eval_every: int = 25
    """Evaluate every this many RL steps (and after the last)."""
    progress: bool = True
    """Progress bars."""
    torch_threads: int | None = 1
    """Intra-op threads. The demo's matrices are tiny, so thread synchronisation costs more
    than it saves, and on a busy machine extra threads oversubscribe the cores (measured here:
    1 thread 0.3-0.6 s per pre-training step vs 7-8 s with 2 threads while other jobs ran)."""
    rm_pairs: int = 16000
    """Preference pairs for the reward model (pipeline rlhf)."""
    rm_slip_share: float = 0.6
    """Share of the wrong-number rejections that are the carry-dropping slip."""
    rm_steps: int = 2000
    """Reward-model steps (32 pairs each)."""
    rm_lr: float = 1e-3
    """Reward-model learning rate (cosine)."""
    ppo_steps: int = 200
    """PPO steps."""
    ppo_prompts: int = 32
    """Prompts per PPO step."""
    ppo_samples: int = 2
    """Completions per prompt in PPO."""
    ppo_lr: float = 1e-4
    """Actor learning rate."""
    ppo_critic_lr: float = 1e-3
    """Critic learning rate (the critic starts from the reward model)."""
    ppo_epochs: int = 4
    """K: passes over each rollout batch."""
    ppo_minibatch: int = 32
    """Completions per PPO update."""
    ppo_beta: float = 0.1
    """Initial KL coefficient in the per-token reward."""
    ppo_kl_target: float = 1.0
    """Adaptive KL controller's target, nats per completion."""
    ppo_kl_horizon: float = 1000.0
    """Adaptive KL controller's horizon, in samples."""
    ppo_target_kl: float | None = 0.05
    """Early stop of a step's epochs once approx KL(old || new) passes this."""
    trpo_steps: int = 100
    """TRPO steps (pipeline trpo)."""
    trpo_max_kl: float = 0.01
    """TRPO trust region: mean token KL after a step."""

    def with_overrides(self, items: list[str]) -> "DemoSettings":
        """A copy with ``key=value`` overrides (values parsed as YAML scalars), checked against
        the fields' annotations (not their current values: after ``ppo_target_kl=null``,
        ``ppo_target_kl=0.1`` is still a float): ``float`` accepts ints and YAML's dotless
        ``1e-4`` text, ``X | None`` also accepts null, ``int``/``bool``/``str`` only their own
        type. An unknown key or a value of the wrong type raises ConfigError naming it."""
        from dataclasses import fields, replace

        from trustrl.config import ConfigError, parse_overrides

        kinds = _field_kinds(type(self))
        changes: dict[str, Any] = {}
        for key, value in parse_overrides(items).items():
            if key not in kinds:
                raise ConfigError(f"demo setting {key!r} does not exist; settings are {sorted(f.name for f in fields(self))}")
            kind, optional = kinds[key]
            wanted = kind.__name__ + (" or null" if optional else "")
            if value is None:
                if not optional:
                    raise ConfigError(f"demo setting {key!r} must be {wanted}, got None")
                changes[key] = None
            elif kind is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
                try:  # YAML 1.1 reads "1e-4" (no dot) as a string
                    changes[key] = float(value)
                except ValueError:
                    raise ConfigError(f"demo setting {key!r} must be {wanted}, got {value!r}") from None
            elif type(value) is kind:  # exact: a bool is no int, an int no bool
                changes[key] = value
            else:
                raise ConfigError(f"demo setting {key!r} must be {wanted}, got {value!r}")
        return replace(self, **changes)

    @property
    def pipeline_dir(self) -> str:
        """The RL stage's run directory (under output_dir): grpo, ppo or trpo."""
        return {"grpo": "grpo", "rlhf": "ppo", "trpo": "trpo"}.get(self.pipeline, self.pipeline)

    @classmethod
    def quick(cls, **overrides: Any) -> "DemoSettings":
        """A shortened pipeline for the test suite (same code path, tiny budgets)."""
        base = dict(hidden_size=32, num_layers=1, num_heads=2, pretrain_steps=8, sft_steps=4, grpo_steps=3,
                    grpo_prompts=4, group_size=4, eval_prompts=16, eval_every=2, progress=False, rm_pairs=64,
                    rm_steps=4, ppo_steps=3, ppo_prompts=4, ppo_minibatch=4, trpo_steps=3)
        base.update(overrides)
        return cls(**base)


def _field_kinds(cls: type) -> dict[str, tuple[type, bool]]:
    """``{field name: (scalar type, accepts None)}`` from the dataclass annotations of ``cls``
    (``float``, ``int | None``, ``Optional[str]``, ...). A field of any other shape raises
    TypeError naming it, so a new setting cannot reach users unparseable."""
    import types
    import typing
    from dataclasses import fields

    hints = typing.get_type_hints(cls)
    out: dict[str, tuple[type, bool]] = {}
    for f in fields(cls):
        hint = hints[f.name]
        args: tuple = (hint,)
        if typing.get_origin(hint) in (typing.Union, types.UnionType):
            args = typing.get_args(hint)
        scalars = [a for a in args if a is not type(None)]
        if len(scalars) != 1 or scalars[0] not in (bool, int, float, str):
            raise TypeError(f"{cls.__name__}.{f.name}: annotation {hint!r} is not a scalar or an optional scalar")
        out[f.name] = (scalars[0], len(scalars) != len(args))
    return out


def run_demo(settings: DemoSettings) -> dict[str, Any]:
    """Pre-train, SFT, then the RL stage of ``settings.pipeline``; writes and returns summary.json."""
    import torch

    from trustrl.logging import write_json_atomic
    from trustrl.report import write_report

    s = settings
    if s.pipeline not in PIPELINES:
        raise ValueError(f"DemoSettings.pipeline must be one of {PIPELINES}, got {s.pipeline!r}")
    check_demo_settings(s)
    if s.torch_threads:
        torch.set_num_threads(s.torch_threads)
    started = time.time()
    out = Path(s.output_dir)
    set_aside_earlier_demo(out, s.overwrite)
    out.mkdir(parents=True, exist_ok=True)
    task = AdditionTask(digits=s.digits, reverse_answer=s.reverse_answer)
    data = write_task_data(out / "data", task, seed=s.seed, n_eval=s.eval_prompts,
                           sft_carry_slip_rate=s.sft_carry_slip_rate)
    timings: dict[str, float] = {}
    pre_result, sft_result = _first_two_stages(s, out, data, timings)
    rl_stage = {"grpo": _grpo_stage, "rlhf": _rlhf_stage, "trpo": _trpo_stage}[s.pipeline]
    rl_result, extras = rl_stage(s, out, task, data, sft_result["model_dir"], timings)

    summary = {
        "pipeline": s.pipeline,
        "accuracy_before_rl": rl_result["accuracy_first"],
        "accuracy_after_rl": rl_result["accuracy_last"],
        "accuracy_gain_points": 100 * (rl_result["accuracy_last"] - rl_result["accuracy_first"]),
        "eval_prompts": s.eval_prompts,
        "pretrain_final_loss": pre_result["final_loss"],
        "sft_final_loss": sft_result["final_loss"],
        **extras,
        "stage_seconds": timings,
        "wall_seconds": time.time() - started,
        "final_model": rl_result["model_dir"],
        "settings": asdict(s),
    }
    write_json_atomic(out / "summary.json", summary)
    write_report(out / s.pipeline_dir)
    return summary


def check_demo_settings(s: Any) -> None:
    """Refuse settings no demo can run, before anything is written or trained (a negative step
    count used to surface only in the RL stage, after minutes of pre-training and SFT).

    The rules, by the field's type and name, for :class:`DemoSettings` and the agent demo's
    settings alike: every int but ``seed`` counts something (>= 1; ``torch_threads`` may be
    null); ``*_rate`` and ``*_share`` are fractions in [0, 1]; ``beta`` and ``ppo_beta`` are
    KL coefficients (>= 0); every other float (learning rates, KL targets and limits, the
    controller's horizon) is > 0. ``output_dir`` must not be a file.

    Raises:
        ConfigError: naming the setting and its value.
    """
    import math
    from dataclasses import fields

    from trustrl.config import ConfigError

    for f in fields(s):
        name, value = f.name, getattr(s, f.name)
        if value is None or isinstance(value, (bool, str)) or name == "seed":
            continue
        if isinstance(value, int):
            ok, rule = value >= 1, "an integer >= 1"
        elif not math.isfinite(value):
            ok, rule = False, "a finite number"
        elif name.endswith(("_rate", "_share")):
            ok, rule = 0.0 <= value <= 1.0, "a fraction in [0, 1]"
        elif name in ("beta", "ppo_beta"):
            ok, rule = value >= 0.0, ">= 0"
        else:
            ok, rule = value > 0.0, "> 0"
        if not ok:
            raise ConfigError(f"demo setting {name}={value!r} must be {rule}")
    out = Path(s.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"demo output_dir {out} is a file, not a directory")


def set_aside_earlier_demo(out: Path, overwrite: bool) -> None:
    """The demo's stages are runs: an earlier demo in ``out`` is refused, or with ``overwrite``
    moved aside whole (:mod:`trustrl.trainers.run_dir`'s rule, for the whole pipeline)."""
    import os

    from trustrl.trainers.run_dir import RunDirError, aside_path, run_files

    if not out.is_dir():
        return
    if not ((out / "summary.json").exists() or any(run_files(p) for p in out.iterdir() if p.is_dir())):
        return
    aside = aside_path(out)
    if not overwrite:
        raise RunDirError(f"{out} holds an earlier demo; pass --overwrite to move it aside to {aside}, "
                          "or choose another --output-dir")
    os.replace(out, aside)
    print(f"trustrl demo: moved the earlier demo in {out} to {aside}")


def _common(s: DemoSettings) -> dict[str, Any]:
    return dict(seed=s.seed, progress=s.progress, tensorboard=True, device="cpu")


class DemoStopped(Exception):
    """A stage stopped early (SIGINT/SIGTERM between two of its steps): the demo ends there
    instead of handing an unfinished stage's result to the next one."""

    def __init__(self, stage: str, result: dict[str, Any]):
        self.stage, self.result = stage, result
        super().__init__(f"the demo stopped during its {stage} stage ({result.get('stopped_early')}; "
                         f"{stage} ran {result.get('steps', '?')} steps); nothing after it ran")


def finished_stage(stage: str, result: dict[str, Any]) -> dict[str, Any]:
    """``result`` of a stage that ran to its end; :class:`DemoStopped` if it stopped early."""
    if result.get("stopped_early"):
        raise DemoStopped(stage, result)
    return result


def _timed(timings: dict[str, float], name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    t = time.time()
    result = finished_stage(name, fn())
    timings[name] = time.time() - t
    return result


def _first_two_stages(s: DemoSettings, out: Path, data: dict[str, Path], timings: dict[str, float]):
    from trustrl.trainers.sft import PretrainTrainer, SFTTrainer

    init_dir = create_tiny_model_dir(out / "init", chars=CHARS + "\n", special_tokens=SPECIAL_TOKENS, seed=s.seed,
                                     hidden_size=s.hidden_size, num_layers=s.num_layers, num_heads=s.num_heads,
                                     max_position_embeddings=96)
    pre = PretrainConfig(model=str(init_dir), dataset=str(data["pretrain"]), output_dir=str(out / "pretrain"),
                         max_steps=s.pretrain_steps, batch_size=s.pretrain_batch, block_size=48,
                         learning_rate=s.pretrain_lr, lr_scheduler="cosine", warmup_steps=min(20, s.pretrain_steps // 5),
                         weight_decay=0.01, **_common(s))
    pre_result = _timed(timings, "pretrain", PretrainTrainer(pre).train)
    sft = SFTConfig(model=pre_result["model_dir"], dataset=str(data["sft"]), output_dir=str(out / "sft"),
                    max_steps=s.sft_steps, batch_size=s.sft_batch, learning_rate=s.sft_lr, lr_scheduler="constant",
                    max_length=32, **_common(s))
    sft_result = _timed(timings, "sft", SFTTrainer(sft).train)
    return pre_result, sft_result


def _rl_common(s: DemoSettings, out: Path, data: dict[str, Path], model_dir: str) -> dict[str, Any]:
    """Settings every RL stage shares: data, lengths, held-out evaluation, no checkpoints."""
    return dict(model=model_dir, dataset=str(data["rl"]), eval_dataset=str(data["eval"]),
                output_dir=str(out / s.pipeline_dir), max_completion_length=12, max_prompt_length=16,
                temperature=1.0, eval_prompts=s.eval_prompts, eval_every=s.eval_every, eval_reward="correct",
                save_every=0, **_common(s))


def _rule_rewards(task: AdditionTask, correct_weight: float = 1.0, format_weight: float = 0.1) -> list[dict]:
    rewards = [{"name": "exact_answer", "alias": "correct", "weight": correct_weight}]
    if format_weight:
        rewards.append({"name": "format", "alias": "format", "weight": format_weight,
                        "kwargs": {"pattern": task.format_pattern}})
    return rewards


def _grpo_stage(s, out, task, data, model_dir, timings):
    from trustrl.algorithms.grpo import GRPOTrainer

    cfg = GRPOConfig(**_rl_common(s, out, data, model_dir), max_steps=s.grpo_steps, prompts_per_step=s.grpo_prompts,
                     group_size=s.group_size, learning_rate=s.grpo_lr, beta=s.beta, rewards=_rule_rewards(task))
    return _timed(timings, "grpo", GRPOTrainer(cfg).train), {}


def _rlhf_stage(s, out, task, data, model_dir, timings):
    """A Bradley-Terry reward model on preference pairs, then PPO against it alone: the rule
    reward ``correct`` has weight 0 and only measures held-out accuracy."""
    from trustrl.algorithms.ppo import PPOConfig, PPOTrainer
    from trustrl.trainers.reward_model import RewardConfig, RewardTrainer
    from trustrl.tasks.preferences import write_preference_data

    prefs = write_preference_data(out / "data", task, seed=s.seed, n_train=s.rm_pairs, n_eval=s.eval_prompts,
                                  slip_share=s.rm_slip_share)
    rm_cfg = RewardConfig(model=model_dir, dataset=str(prefs["train"]), eval_dataset=str(prefs["eval"]),
                          output_dir=str(out / "rm"), max_steps=s.rm_steps, batch_size=32, learning_rate=s.rm_lr,
                          lr_scheduler="cosine", warmup_steps=min(10, s.rm_steps // 5), max_length=32,
                          center_rewards_coef=0.01, eval_every=max(1, s.rm_steps // 4), save_every=0, **_common(s))
    rm = _timed(timings, "reward_model", RewardTrainer(rm_cfg).train)
    ppo_cfg = PPOConfig(**_rl_common(s, out, data, model_dir), max_steps=s.ppo_steps, prompts_per_step=s.ppo_prompts,
                        samples_per_prompt=s.ppo_samples, reward_model=rm["model_dir"],
                        rewards=_rule_rewards(task, correct_weight=0.0, format_weight=0.0),
                        learning_rate=s.ppo_lr, critic_learning_rate=s.ppo_critic_lr, critic_init=rm["model_dir"],
                        ppo_epochs=s.ppo_epochs, minibatch_size=s.ppo_minibatch, beta=s.ppo_beta,
                        kl_control="adaptive", kl_target=s.ppo_kl_target, kl_horizon=s.ppo_kl_horizon,
                        target_kl=s.ppo_target_kl, missing_eos_penalty=-1.0, gamma=1.0, lam=0.95)
    ppo = _timed(timings, "ppo", PPOTrainer(ppo_cfg).train)
    rows = _metric_rows(out / s.pipeline_dir)
    kls = [r["kl/ref_sequence"] for r in rows if "kl/ref_sequence" in r]
    scores = [r["reward/score"] for r in rows if "reward/score" in r]
    k = max(1, len(scores) // 10)
    return ppo, {
        "rm_heldout_accuracy": rm["accuracy_last"],
        "rm_score_first_steps": sum(scores[:k]) / k if scores else None,
        "rm_score_last_steps": sum(scores[-k:]) / k if scores else None,
        "kl_target": s.ppo_kl_target,
        "kl_mean": sum(kls) / len(kls) if kls else None,
        "kl_max": max(kls) if kls else None,
    }


def _trpo_stage(s, out, task, data, model_dir, timings):
    from trustrl.algorithms.trpo import TRPOConfig, TRPOTrainer

    cfg = TRPOConfig(**_rl_common(s, out, data, model_dir), max_steps=s.trpo_steps, prompts_per_step=s.grpo_prompts,
                     group_size=s.group_size, rewards=_rule_rewards(task), advantage="group", max_kl=s.trpo_max_kl,
                     trpo_params="all", beta=0.0)
    result = _timed(timings, "trpo", TRPOTrainer(cfg).train)
    rows = [r for r in _metric_rows(out / s.pipeline_dir) if "trpo/accepted" in r]
    accepted = [r["trpo/kl"] for r in rows if r["trpo/accepted"]]
    return result, {
        "max_kl": s.trpo_max_kl,
        "trpo_steps_accepted": len(accepted),
        "trpo_steps_rejected": len(rows) - len(accepted),
        "trpo_accepted_kl_max": max(accepted) if accepted else None,
    }


def _metric_rows(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def format_table(summary: dict[str, Any]) -> str:
    st = summary["stage_seconds"]
    accuracy = (f"held-out accuracy {100 * summary['accuracy_before_rl']:.1f}% -> "
                f"{100 * summary['accuracy_after_rl']:.1f}%")
    rows = [
        ("stage", "result", "seconds"),
        ("pre-train", f"loss {summary['pretrain_final_loss']:.3f}", f"{st['pretrain']:.0f}"),
        ("SFT", f"loss {summary['sft_final_loss']:.3f}", f"{st['sft']:.0f}"),
    ]
    pipeline = summary.get("pipeline", "grpo")
    if pipeline == "rlhf":
        rows.append(("reward model", f"held-out pair accuracy {summary['rm_heldout_accuracy']:.3f}",
                     f"{st['reward_model']:.0f}"))
        rows.append(("PPO", f"{accuracy}; mean KL {summary['kl_mean']:.2f} (target {summary['kl_target']:g})",
                     f"{st['ppo']:.0f}"))
    elif pipeline == "trpo":
        kl = summary["trpo_accepted_kl_max"]
        rows.append(("TRPO", f"{accuracy}; {summary['trpo_steps_accepted']} steps accepted, max KL "
                             f"{'-' if kl is None else f'{kl:.4f}'} (max_kl {summary['max_kl']:g})", f"{st['trpo']:.0f}"))
    else:
        rows.append(("GRPO", accuracy, f"{st['grpo']:.0f}"))
    rows.append(("total", f"{summary['accuracy_gain_points']:+.1f} points from RL", f"{summary['wall_seconds']:.0f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


def summary_json(summary: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in summary.items() if k != "settings"}, indent=2)
