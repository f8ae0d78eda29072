"""Machinery every training loop shares: run directory, optimizer and schedule, a guarded
optimizer step (non-finite faults skip the update), a resumable prompt sampler, and
checkpoint save / resume.

What a trainer does to be resumable bit for bit (GRPO, SFT and pretrain do exactly this):

1. build everything that holds training state (models, optimizers, LR schedulers, a KL
   controller or anything else with ``state_dict`` / ``load_state_dict``, named
   ``torch.Generator`` objects, a :class:`PromptSampler`, a :class:`FaultCounter`);
2. ``state = run.restore(models, optimizers, schedulers, generators)``: with ``resume=auto``
   the newest checkpoint that verifies is loaded (partial or corrupt ones are skipped with a
   warning), the global RNGs (python, numpy, torch, CUDA) and the named generators are put
   back, and ``metrics.jsonl`` is cut back to the checkpoint's step;
3. put back what lives in ``state`` (``sampler``, ``faults``, ``eval_history``, ...);
4. in the loop, ``run.should_save(step, last, faults)`` then ``run.save(...)`` with the same
   dictionaries and the trainer state;
5. at the end, ``run.finish(summary)``: ``train_summary.json``, then ``report.html`` + plots.

The rules of the run directory itself (a new run never lands on an old one, a resume never
changes what the run means unnoticed) are in :mod:`trustrl.trainers.run_dir`.

The loops themselves live one per algorithm beside this file."""

from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trustrl import distributed as dist
from trustrl import parallel
from trustrl.checkpoint import find_latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint, save_sharded_checkpoint
from trustrl.config import ConfigError, TrainConfig, save_config
from trustrl.errors import UserError
from trustrl.logging import MetricsLogger, write_json_atomic
from trustrl.trainers.run_dir import (CONFIG_FILE, RunDirError, check_run_dir, record_resume, set_aside,
                                      settings_to_save)
from trustrl.utils import rng_state, set_rng_state


#: ``TRUSTRL_NO_REPORT=1`` skips report.html and plots/ whatever ``report`` says (the test
#: suite sets it: rendering the panels costs seconds per run; the report tests unset it).
NO_REPORT_ENV = "TRUSTRL_NO_REPORT"


class NonFiniteError(UserError, RuntimeError):
    """Too many consecutive non-finite losses or gradients: the run stops, last checkpoint intact."""


def make_optimizer(params, config: TrainConfig, lr: float | None = None) -> torch.optim.Optimizer:
    trainable = [p for p in params if p.requires_grad]
    if not trainable:
        raise ValueError("no trainable parameters")
    return torch.optim.AdamW(
        trainable, lr=lr or config.learning_rate, betas=tuple(config.adam_betas),
        weight_decay=config.weight_decay,
    )


def lr_multiplier(step: int, total: int, warmup: int, shape: str) -> float:
    """Linear warmup over ``warmup`` steps, then constant / linear decay to 0 / cosine to 0."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if shape == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    progress = min(max(progress, 0.0), 1.0)
    if shape == "linear":
        return 1.0 - progress
    if shape == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"lr_scheduler must be constant, linear or cosine, got {shape!r}")


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_multiplier(s, total_steps, config.warmup_steps, config.lr_scheduler)
    )


@dataclass
class FaultCounter:
    """Counts non-finite steps; raises :class:`NonFiniteError` once ``limit`` happen in a row.

    ``consecutive`` is the length of the current streak (0 after a good step), ``total`` the
    count over the run. Saved in checkpoints through :meth:`state_dict`."""

    limit: int
    consecutive: int = 0
    total: int = 0

    def record(self, ok: bool, where: str) -> None:
        if ok:
            self.consecutive = 0
            return
        self.consecutive += 1
        self.total += 1
        if self.consecutive >= self.limit:
            raise NonFiniteError(
                f"{self.consecutive} consecutive non-finite losses/gradients (last in {where}); "
                "stopping (max_consecutive_nonfinite). The last complete checkpoint is intact."
            )

    @property
    def in_streak(self) -> bool:
        """The last recorded step was skipped."""
        return self.consecutive > 0

    def state_dict(self) -> dict[str, int]:
        return {"consecutive": self.consecutive, "total": self.total}

    def load_state_dict(self, state: dict[str, int] | None) -> None:
        if state:
            self.consecutive, self.total = int(state["consecutive"]), int(state["total"])


def _as_float(value: float | torch.Tensor) -> float:
    return float(value.detach().float().sum()) if isinstance(value, torch.Tensor) else float(value)


def guarded_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    max_grad_norm: float | None,
    faults: FaultCounter,
    where: str,
    loss: float | torch.Tensor | None = None,
) -> tuple[float, bool]:
    """Clip and apply the accumulated gradients of ``model``, unless the step is faulty: the
    loss (when given) or any gradient is NaN/inf. A faulty step changes no parameter and no
    optimizer moment; its gradients are dropped; the scheduler still advances (a skipped step
    counts as a step) and ``faults`` records it, raising :class:`NonFiniteError` after
    ``faults.limit`` faults in a row.

    The loss is checked on its own because a NaN loss does not always reach the gradients
    (a NaN added as a constant, a fully masked batch): a finite gradient norm is no proof.

    Returns:
        (global gradient norm before clipping, applied).
    """
    (norm,), ok = guarded_steps([(model, optimizer, scheduler, loss)], max_grad_norm, faults, where)
    return norm, ok


def guarded_steps(
    parts: list[tuple[nn.Module, torch.optim.Optimizer, Any, float | torch.Tensor | None]],
    max_grad_norm: float | None,
    faults: FaultCounter,
    where: str,
) -> tuple[list[float], bool]:
    """:func:`guarded_step` for several models updated together from one batch (PPO's actor
    and critic): each ``(model, optimizer, scheduler, loss)`` is clipped on its own norm, and
    all are applied, or -- when any loss or gradient is non-finite -- none is, recorded as
    ONE fault. Returns (each model's gradient norm before clipping, applied)."""
    norms: list[float] = []
    ok = losses_ok = True
    for model, _, _, loss in parts:
        # data parallel: each rank holds its share of the global loss's gradient -> sum them;
        # skip jointly (no-ops in one process)
        dist.all_reduce_gradients(model)
        params = [p for p in model.parameters() if p.grad is not None]
        loss_ok = dist.all_true(loss is None or math.isfinite(_as_float(loss)))
        if params:  # (FSDP shards: the norm over every rank's slices)
            norms.append(parallel.clip_grad_norm(params, max_grad_norm if max_grad_norm else float("inf")))
        else:
            norms.append(0.0)
        losses_ok = losses_ok and loss_ok
        ok = ok and loss_ok and math.isfinite(norms[-1])
    for model, optimizer, scheduler, _ in parts:
        parallel.reshard(model)  # FSDP: no gathered copy may outlive the step (it would be stale)
        if ok:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None and ok:
            scheduler.step()
        elif scheduler is not None:
            with warnings.catch_warnings():
                # torch warns when the schedule moves before any optimizer.step(): on purpose here
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
                scheduler.step()
    if not ok:
        what = "loss" if not losses_ok else "gradient norm"
        losses = [None if loss is None else _as_float(loss) for *_, loss in parts]
        shown = losses[0] if len(parts) == 1 else losses
        norm_shown = norms[0] if len(parts) == 1 else norms
        warnings.warn(f"{where}: non-finite {what} (loss {shown!r}, grad norm {norm_shown!r}); update skipped",
                      stacklevel=3)
    faults.record(ok, where)
    return norms, ok


class PromptSampler:
    """Endless shuffled pass over row indices with a resumable position (epoch, cursor)."""

    def __init__(self, n_rows: int, seed: int):
        if n_rows <= 0:
            raise ValueError("the dataset has no rows")
        self.n_rows = n_rows
        self.seed = seed
        self.epoch = 0
        self.cursor = 0
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.n_rows, generator=g).tolist()

    def take(self, k: int) -> list[int]:
        out: list[int] = []
        while len(out) < k:
            if self.cursor >= self.n_rows:
                self.epoch += 1
                self.cursor = 0
                self._order = self._permutation()
            take = min(k - len(out), self.n_rows - self.cursor)
            out.extend(self._order[self.cursor:self.cursor + take])
            self.cursor += take
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor, "n_rows": self.n_rows, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["n_rows"] != self.n_rows:
            raise ConfigError(f"resume: the dataset has {self.n_rows} rows, the checkpoint expects {state['n_rows']}")
        self.seed, self.epoch, self.cursor = state["seed"], state["epoch"], state["cursor"]
        self._order = self._permutation()


def check_resume_setting(config: TrainConfig) -> None:
    """Fail fast (before any model loads, every trainer calls it first) on what the run
    directory cannot do: a ``resume`` value that is neither "never", "auto" nor an existing
    directory (a typo such as ``resume=atuo`` must not silently start from scratch), then the
    rules of :func:`trustrl.trainers.run_dir.check_run_dir` (an existing run without
    --resume / --overwrite, nothing to resume, a resume that changes what the run means)."""
    mode = config.resume
    if mode not in ("never", "auto") and not Path(mode).is_dir():
        raise ConfigError(
            f"resume: {mode!r} is not an existing checkpoint directory; allowed values: "
            "'never', 'auto' (the newest complete checkpoint in output_dir) or a checkpoint path"
        )
    check_run_dir(config)


@dataclass
class Run:
    """A run directory with its logger; owns checkpoint save and resume for a trainer."""

    config: TrainConfig
    output_dir: Path
    logger: MetricsLogger | None = None
    start_step: int = 0
    resumed_from: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    skipped_rows: int = 0
    moved_aside: Path | None = None
    _pending: dict[str, float] = field(default_factory=dict)
    _last_save: float = field(default_factory=time.monotonic)

    @classmethod
    def open(cls, config: TrainConfig) -> "Run":
        """Check the run directory rules again, move an old run aside (``overwrite``), create
        the directory and, for a new run, write ``config.yaml`` (a resume writes it in
        :meth:`restore`, once the change is on record)."""
        out = Path(config.output_dir)
        # data parallel: every rank checked in the trainer's __init__; here (the barrier makes
        # sure none is still checking) rank 0 checks again and writes, and every rank follows
        dist.barrier()

        def prepare() -> Path | None:
            check_resume_setting(config)
            aside = set_aside(config)
            out.mkdir(parents=True, exist_ok=True)
            if config.resume == "never" or not (out / CONFIG_FILE).exists():
                save_config(settings_to_save(config), out / CONFIG_FILE)
            return aside

        moved = dist.on_main(prepare)  # data parallel: rank 0 writes the run directory; all wait
        return cls(config=config, output_dir=out, moved_aside=moved)

    def resume_path(self) -> Path | None:
        mode = self.config.resume
        if mode == "never":
            return None
        if mode == "auto":
            return find_latest_checkpoint(self.output_dir)
        path = Path(mode)
        if not path.is_dir():
            raise ConfigError(f"resume: checkpoint directory not found: {path}")
        return path

    def restore(self, models: dict[str, nn.Module], optimizers: dict, schedulers: dict, generators: dict) -> dict[str, Any]:
        """Restore from the configured checkpoint if any; returns its trainer_state ({} if none).

        Models, optimizers and schedulers (anything with ``load_state_dict``: LR schedulers,
        KL controllers) are loaded in place; the global RNGs and the named ``generators`` are
        set to their state at save time; the metrics file keeps exactly the steps up to the
        checkpoint (a fresh start keeps none). Call it once everything is built and before
        anything consumes randomness."""
        # data parallel: every rank loads the checkpoint rank 0 picked; only rank 0 writes
        path = dist.broadcast_object(self.resume_path() if dist.is_main() else None)
        if path is None:
            if self.config.resume != "never":  # every rank got the same None: all stop alike
                n = len(list_checkpoints(self.output_dir))
                raise RunDirError(f"resume: {self.output_dir} holds no complete checkpoint to resume from "
                                  f"({n} incomplete or corrupt ones skipped, see the warnings above)")
            self.logger = self._logger(-1)  # a new run (its directory holds no earlier one)
            return {}
        loaded = load_checkpoint(path, models=models, optimizers=optimizers, schedulers=schedulers)
        rng = loaded.pop("rng", None)
        state = loaded
        if rng is not None:
            set_rng_state(rng, generators=generators)
        elif generators:
            warnings.warn(f"resume: {path} holds no RNG states; sampling will not continue the "
                          "interrupted run exactly", stacklevel=2)
        self.start_step = int(state.get("step", 0))
        if self.start_step > self.config.max_steps:  # the run would "finish" at start_step, not at max_steps
            raise ConfigError(f"max_steps={self.config.max_steps}: the checkpoint to resume ({path}) is already at "
                              f"step {self.start_step}; set max_steps >= {self.start_step}, or start a new run")
        self.resumed_from = path
        if dist.is_main():  # the settings of the stretch before this resume stay on record
            record_resume(self.config, self.start_step, path)
            save_config(settings_to_save(self.config), self.output_dir / CONFIG_FILE)
        self.logger = self._logger(self.start_step)
        self._last_save = time.monotonic()
        return state

    def _logger(self, resume_step: int):
        from trustrl.logging import NullMetricsLogger

        if not dist.is_main():  # data parallel: rank 0 writes metrics, samples and trackers
            return NullMetricsLogger()
        cfg = self.config
        return MetricsLogger(self.output_dir, tensorboard=cfg.tensorboard and "tensorboard" in cfg.report_to,
                             resume_step=resume_step, report_to=cfg.report_to, config=cfg,
                             sample_every=getattr(cfg, "sample_every", 0))

    def save(self, step: int, models: dict[str, nn.Module], optimizers: dict, schedulers: dict,
             trainer_state: dict[str, Any], generators: dict, tokenizer=None) -> Path:
        if self.config.parallelism.strategy == "fsdp":  # every rank writes its shard (DCP), any world size
            path = save_sharded_checkpoint(
                self.output_dir, step, models=models, optimizers=optimizers, schedulers=schedulers,
                trainer_state={"step": step, **trainer_state}, tokenizer=tokenizer,
                rng=rng_state(generators=generators), keep_last=self.config.keep_last_checkpoints)
            self._last_save = time.monotonic()
            return path
        path = dist.on_main(  # data parallel: written once, by rank 0; every rank waits for it
            save_checkpoint, self.output_dir, step, models=models, optimizers=optimizers, schedulers=schedulers,
            trainer_state={"step": step, **trainer_state}, tokenizer=tokenizer,
            rng=rng_state(generators=generators), keep_last=self.config.keep_last_checkpoints,
        )
        self._last_save = time.monotonic()
        return path

    def should_save(self, step: int, last_step: int, faults: FaultCounter | None = None) -> bool:
        """Every ``save_every`` steps, once ``save_every_minutes`` of wall time passed since
        the last checkpoint, and at the last step; not while ``faults`` is in a streak of
        skipped steps (so keep-last-K pruning never pushes out the last checkpoint written
        before the faults), except at the last step.

        The clock decides only WHEN a checkpoint is written: writing one reads the state and
        changes nothing (no RNG drawn, no parameter touched), so the numbers of a run are the
        same with or without it (tests/test_run_dir.py checks it)."""
        if step == last_step:
            return True
        if faults is not None and faults.in_streak:
            return False
        every = self.config.save_every
        if every > 0 and step % every == 0:
            return True
        minutes = self.config.save_every_minutes
        if minutes <= 0:
            return False
        due = time.monotonic() - self._last_save >= 60.0 * minutes
        return bool(dist.broadcast_object(due))  # data parallel: rank 0's clock decides for all ranks

    def set_skipped_rows(self, n: int) -> None:
        """Record how many malformed dataset rows were skipped (skip_bad_rows=true): logged as
        ``data/skipped_rows`` with the first metrics record of the run (not again after a
        resume: that record is kept) and kept for the run summary. Call after :meth:`restore`."""
        self.skipped_rows = int(n)
        if self.start_step == 0:
            self._pending["data/skipped_rows"] = float(n)

    def record_data_counts(self, counts: dict[str, int]) -> None:
        """Counts about the dataset (``data/truncated_prompts``, ...): logged with the first
        metrics record of the run, as ``data/skipped_rows`` is (not again after a resume)."""
        if self.start_step == 0:
            self._pending.update({name: float(n) for name, n in counts.items()})

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self.logger is not None and (step % self.config.log_every == 0 or step == 1):
            if self._pending:
                metrics = {**metrics, **self._pending}
                self._pending = {}
            self.logger.log(step, metrics)

    def close(self) -> None:
        if self.logger is not None:
            self.logger.close()

    def finish(self, summary: dict[str, Any], write_summary: bool = True) -> dict[str, Any]:
        """End of ``train()``: close the logger, write ``train_summary.json`` (unless
        ``write_summary`` is false: a stopped run is not a finished one) and, with
        ``report=true``, ``report.html`` and ``plots/`` from the complete run directory (rank
        0). A report that cannot be written is a warning, not a failed run: training is done.
        Returns the summary with ``report`` (its path, or None) added."""
        self.close()
        report = self.config.report and os.environ.get(NO_REPORT_ENV, "").lower() not in ("1", "true", "yes")
        summary["report"] = str(self.output_dir / "report.html") if report else None
        if write_summary:
            dist.on_main(write_json_atomic, self.output_dir / "train_summary.json", summary)
        if report:
            summary["report"] = dist.on_main(_write_report, self.output_dir)
        return summary


def _write_report(run_dir: Path) -> str | None:
    from trustrl.report import write_report  # matplotlib: imported only when a report is written

    try:
        return str(write_report(run_dir))
    except Exception as err:  # noqa: BLE001 -- the run is done; say why its report is missing
        warnings.warn(f"{run_dir}: report.html not written ({type(err).__name__}: {err}); "
                      f"try `trustrl report {run_dir}`", stacklevel=2)
        return None


def check_positions(model: nn.Module, longest: int, setting: str, model_dir: str) -> None:
    """Refuse examples longer than the model's position table (``max_position_embeddings`` in
    its config.json): learned positions (GPT-2) fail with an IndexError there, rotary ones
    run on positions the model never saw. ``setting`` is the key that lets them through."""
    n = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(n, int) and longest > n:
        raise ConfigError(f"{setting}: examples of up to {longest} tokens, but the model in {model_dir} has "
                          f"max_position_embeddings={n}; set {setting} <= {n}")


def warn_skipped(skipped: int, path: str) -> None:
    if skipped:
        warnings.warn(f"{path}: skipped {skipped} malformed rows (skip_bad_rows=true)", stacklevel=2)


def warn_truncated(count: int, source: str, text: str, metric: str) -> None:
    """One warning per dataset with how many rows a length limit cuts, e.g. "rl.jsonl: 3 of 50
    prompts are longer than max_prompt_length=16 tokens; ... (metric data/truncated_prompts)"."""
    if count:
        warnings.warn(f"{source}: {count} {text} (metric {metric})", stacklevel=3)


def restore_loop(run: Run, config: TrainConfig, n_examples: int, models: dict, optimizers: dict, schedulers: dict,
                 generators: dict) -> tuple[PromptSampler, FaultCounter, dict[str, Any]]:
    """Every trainer's start: restore the latest checkpoint when resuming (or start fresh),
    then the example sampler's position and the non-finite fault counter from its state.
    Returns ``(sampler, faults, checkpoint extra state)``."""
    sampler = PromptSampler(n_examples, config.seed)
    state = run.restore(models, optimizers, schedulers, generators)
    if state.get("sampler"):
        sampler.load_state_dict(state["sampler"])
    faults = FaultCounter(config.max_consecutive_nonfinite)
    faults.load_state_dict(state.get("faults"))
    return sampler, faults, state
