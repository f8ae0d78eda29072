"""Machinery every training loop shares: run directory, optimizer and schedule, a guarded
optimizer step (non-finite faults skip the update), a resumable prompt sampler, and
checkpoint save / resume. The loops themselves live one per algorithm beside this file."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trustrl.checkpoint import find_latest_checkpoint, load_checkpoint, save_checkpoint
from trustrl.config import TrainConfig, save_config
from trustrl.logging import MetricsLogger
from trustrl.utils import rng_state, set_rng_state


class NonFiniteError(RuntimeError):
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
    """Counts consecutive non-finite steps; raises once the configured limit is reached."""

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
                "stopping. The last complete checkpoint is intact."
            )


def guarded_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    max_grad_norm: float | None,
    faults: FaultCounter,
    where: str,
) -> tuple[float, bool]:
    """Clip and apply the accumulated gradients unless any is NaN/inf (then skip the update).
    Returns (grad_norm before clipping, applied)."""
    params = [p for p in model.parameters() if p.grad is not None]
    if params:
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm else float("inf"))
        grad_norm = float(norm)
    else:
        grad_norm = 0.0
    ok = math.isfinite(grad_norm)
    if ok:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if scheduler is not None:
        scheduler.step()
    faults.record(ok, where)
    return grad_norm, ok


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
            raise ValueError(f"resume: the dataset has {self.n_rows} rows, the checkpoint expects {state['n_rows']}")
        self.seed, self.epoch, self.cursor = state["seed"], state["epoch"], state["cursor"]
        self._order = self._permutation()


@dataclass
class Run:
    """A run directory with its logger; owns checkpoint save and resume for a trainer."""

    config: TrainConfig
    output_dir: Path
    logger: MetricsLogger | None = None
    start_step: int = 0
    resumed_from: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def open(cls, config: TrainConfig) -> "Run":
        out = Path(config.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_config(config, out / "config.yaml")
        return cls(config=config, output_dir=out)

    def resume_path(self) -> Path | None:
        mode = self.config.resume
        if mode == "never":
            return None
        if mode == "auto":
            return find_latest_checkpoint(self.output_dir)
        path = Path(mode)
        if not path.is_dir():
            raise FileNotFoundError(f"resume: checkpoint directory not found: {path}")
        return path

    def restore(self, models: dict[str, nn.Module], optimizers: dict, schedulers: dict, generators: dict) -> dict[str, Any]:
        """Restore from the configured checkpoint if any; returns its trainer_state ({} if none)."""
        path = self.resume_path()
        if path is None:
            self.logger = MetricsLogger(self.output_dir, tensorboard=self.config.tensorboard,
                                        resume_step=0 if self.config.resume == "never" else None)
            return {}
        loaded = load_checkpoint(path, models=models, optimizers=optimizers, schedulers=schedulers)
        rng = loaded.pop("rng", None)
        state = loaded
        if rng is not None:
            set_rng_state(rng, generators=generators)
        self.start_step = int(state.get("step", 0))
        self.resumed_from = path
        self.logger = MetricsLogger(self.output_dir, tensorboard=self.config.tensorboard, resume_step=self.start_step)
        return state

    def save(self, step: int, models: dict[str, nn.Module], optimizers: dict, schedulers: dict,
             trainer_state: dict[str, Any], generators: dict, tokenizer=None) -> Path:
        return save_checkpoint(
            self.output_dir, step, models=models, optimizers=optimizers, schedulers=schedulers,
            trainer_state={"step": step, **trainer_state}, tokenizer=tokenizer,
            rng=rng_state(generators=generators), keep_last=self.config.keep_last_checkpoints,
        )

    def should_save(self, step: int, last_step: int) -> bool:
        every = self.config.save_every
        return step == last_step or (every > 0 and step % every == 0)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self.logger is not None and (step % self.config.log_every == 0 or step == 1):
            self.logger.log(step, metrics)

    def close(self) -> None:
        if self.logger is not None:
            self.logger.close()


def warn_skipped(skipped: int, path: str) -> None:
    if skipped:
        warnings.warn(f"{path}: skipped {skipped} malformed rows (skip_bad_rows=true)", stacklevel=2)
