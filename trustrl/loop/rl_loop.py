"""The one RL loop: sample -> score -> advantages -> update -> refresh.

Every RL algorithm (GRPO, PPO, TRPO, and agents on top of them) is a plug-in of this loop
(:class:`trustrl.algorithms.base.RLAlgorithm`): the loop owns the run directory, resume,
held-out evaluation, checkpoints, non-finite faults, clean stops, progress and metrics, and
calls the plug-in for the two things that differ between algorithms::

    for step in 1..max_steps:
        batch, metrics = algorithm.collect(sampler)     # 1-3: prompts -> completions -> rewards
        metrics |= algorithm.update(batch, step)        # 4-6: advantages -> optimizer updates
        log, evaluate, checkpoint                       # 7: refresh (the updated policy samples next)

A stop signal (Ctrl-C, SIGTERM) ends the loop after the step in progress, with a checkpoint
of it and the command that resumes the run (:mod:`trustrl.loop.stops`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from trustrl import distributed as dist
from trustrl import parallel
from trustrl.logging import format_postfix, progress
from trustrl.loop.data_parallel import evaluate_sharded
from trustrl.loop.experience import evaluate_greedy
from trustrl.loop.stops import GracefulStop, announce_stop, resume_hint
from trustrl.trainers.common import FaultCounter, PromptSampler, Run, restore_loop


class RLAlgorithm(Protocol):
    """What the loop needs of a plug-in (:class:`trustrl.algorithms.base.RLAlgorithm` has it all)."""

    name: str
    config: Any
    policy: Any
    tokenizer: Any
    device: Any
    prompts: Any
    eval_prompts: Any
    rewards: Any
    postfix_keys: list[str]
    collects_local_share: bool
    last_metrics: dict[str, float]

    def setup(self) -> "TrainingState": ...
    def collect(self, sampler: PromptSampler) -> tuple[Any, dict[str, float]]: ...
    def update(self, batch: Any, step: int, faults: FaultCounter) -> dict[str, float]: ...
    def weights_changed(self) -> None: ...
    def log_samples(self, step: int, batch: Any) -> None: ...
    def checkpoint_extra(self) -> dict[str, Any]: ...
    def load_extra(self, state: dict[str, Any]) -> None: ...
    def save_final(self, output_dir: Path) -> dict[str, Any]: ...


@dataclass
class TrainingState:
    """Everything a checkpoint holds besides the loop's own state: named models, optimizers,
    schedulers (anything with ``state_dict``: LR schedules, a KL controller) and generators."""

    models: dict[str, Any]
    optimizers: dict[str, Any] = field(default_factory=dict)
    schedulers: dict[str, Any] = field(default_factory=dict)
    generators: dict[str, Any] = field(default_factory=dict)


@dataclass
class LoopState:
    """What the loop carries from step to step and checkpoints: the prompt sampler's position,
    the non-finite fault counter and the held-out evaluation history."""

    sampler: PromptSampler
    faults: FaultCounter
    history: list[dict[str, float]]

    def checkpoint_state(self, algorithm: RLAlgorithm) -> dict[str, Any]:
        return {"sampler": self.sampler.state_dict(), "eval_history": self.history,
                "faults": self.faults.state_dict(), "reward_faults": dict(algorithm.rewards.fault_totals),
                **algorithm.checkpoint_extra()}


def evaluate(algorithm: RLAlgorithm, history: list[dict[str, float]], step: int) -> dict[str, float]:
    """Greedy held-out evaluation of the policy now (prompts split across ranks), recorded."""
    a = algorithm
    with parallel.gathered(a.policy):  # FSDP: whole weights while decoding (every rank enters)
        if hasattr(a, "evaluate_heldout"):  # plug-ins with their own held-out episodes (agents)
            ev = a.evaluate_heldout()
        else:
            ev = evaluate_sharded(evaluate_greedy, a.policy, a.tokenizer, a.eval_prompts, a.config, a.rewards, a.device)
    history.append({"step": step, **ev})
    return ev


def _due_for_eval(algorithm: RLAlgorithm, step: int) -> bool:
    cfg = algorithm.config
    if algorithm.eval_prompts is None:
        return False
    return step == cfg.max_steps or (cfg.eval_every > 0 and step % cfg.eval_every == 0)


def resume_command(algorithm: RLAlgorithm) -> str:
    """The command that continues this run (its resolved config is saved in the run directory).
    An agent whose environment was passed in Python (``env=MyEnv``, ``env: null`` in
    config.yaml) cannot be continued from the command line: its script is run again with
    ``resume="auto"``."""
    out = Path(algorithm.config.output_dir)
    if "env" in type(algorithm.config).model_fields and algorithm.config.env is None:
        return (f"run the same script again with resume=\"auto\" in its config (the environment was passed in "
                f"Python; {out / 'config.yaml'} does not name it)")
    return resume_hint(algorithm.name, out)


def run_rl_loop(algorithm: RLAlgorithm) -> dict[str, Any]:
    """Train ``algorithm`` for ``config.max_steps`` steps (from its checkpoint when resuming);
    returns the run summary (also written to ``train_summary.json``)."""
    cfg = algorithm.config
    run = Run.open(cfg)
    state = algorithm.setup()
    started = time.time()
    sampler, faults, saved = restore_loop(run, cfg, len(algorithm.prompts), state.models, state.optimizers,
                                          state.schedulers, state.generators)
    algorithm.rewards.fault_totals.update(saved.get("reward_faults", {}))
    algorithm._sample_log = getattr(run.logger, "samples", None)  # samples.jsonl (None: off, or rank > 0)
    algorithm.load_extra(saved)
    eval_prompts = algorithm.eval_prompts
    run.set_skipped_rows(algorithm.prompts.skipped + (eval_prompts.skipped if eval_prompts else 0))
    run.record_data_counts({"data/truncated_prompts": algorithm.prompts.truncated,
                            **({"data/truncated_eval_prompts": eval_prompts.truncated} if eval_prompts else {})})
    loop = LoopState(sampler, faults, list(saved.get("eval_history", [])))
    if run.start_step == 0 and eval_prompts is not None:
        run.logger.log(0, evaluate(algorithm, loop.history, 0))

    def checkpoint(step: int, force: bool = False) -> Path | None:
        if force or run.should_save(step, cfg.max_steps, faults):
            return run.save(step, state.models, state.optimizers, state.schedulers, loop.checkpoint_state(algorithm),
                            state.generators, tokenizer=algorithm.tokenizer)
        return None

    bar = progress(total=cfg.max_steps, initial=run.start_step, desc=algorithm.name,
                   disable=not cfg.progress or None)
    step = run.start_step
    stopped_by: str | None = None
    with GracefulStop() as stop:
        while step < cfg.max_steps:
            t0 = time.time()
            algorithm.rewards.step = step + 1  # what reward functions get as `step`
            # 1-3. prompts -> completions from the current (old) policy -> rewards
            batch, metrics = algorithm.collect(sampler)
            gen_seconds = time.time() - t0
            # 4-6. advantages -> updates (None: nothing to learn from, e.g. all groups equal)
            if batch is None:
                metrics["optim/skipped"] = 1.0
            else:
                metrics.update(algorithm.update(batch, step + 1, faults))
                algorithm.weights_changed()  # a rollout engine gets the new weights before it samples
                algorithm.log_samples(step + 1, batch)
            # 7. refresh: the updated policy samples the next step; log, evaluate, checkpoint
            step += 1
            metrics["perf/step_seconds"] = time.time() - t0
            metrics["perf/generation_seconds"] = gen_seconds
            if batch is not None:
                n_tokens = int(batch.rollout.completion_mask.sum())
                if algorithm.collects_local_share:  # data parallel: each rank generated its share
                    n_tokens = dist.all_reduce_sum(n_tokens)
                metrics["perf/tokens_per_second"] = n_tokens / max(gen_seconds, 1e-9)
            if _due_for_eval(algorithm, step):
                metrics.update(evaluate(algorithm, loop.history, step))
            run.log(step, metrics)
            algorithm.last_metrics = metrics
            bar.update(1)
            bar.set_postfix(format_postfix(metrics, algorithm.postfix_keys))
            if stop.requested() and step < cfg.max_steps:
                stopped_by = stop.signal_name or "a signal on another rank"
                path = checkpoint(step, force=True)
                announce_stop(step, cfg.max_steps, stopped_by, path, resume_command(algorithm))
                break
            checkpoint(step)
    bar.close()
    extra = {} if stopped_by else algorithm.save_final(Path(cfg.output_dir))
    h = loop.history
    summary = {
        "steps": step, "wall_seconds": time.time() - started, **extra,
        "accuracy_first": h[0]["eval/accuracy"] if h else None,
        "accuracy_last": h[-1]["eval/accuracy"] if h else None,
        "eval_history": h, "nonfinite_skips": faults.total,
        "data/skipped_rows": run.skipped_rows, "reward_faults": dict(algorithm.rewards.fault_totals),
        "resumed_from": str(run.resumed_from) if run.resumed_from else None,
        "stopped_early": stopped_by,
    }
    return run.finish(summary, write_summary=stopped_by is None)  # + report.html and plots/
