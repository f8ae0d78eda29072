"""The RL loop across data-parallel ranks: world-size-invariant sampling seeds, whitening with
global statistics, gathering a draw's scored batches, and held-out evaluation split across
ranks. (:mod:`trustrl.distributed` holds the collectives; this is what RL builds on them.)"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable

import torch

from trustrl import distributed as dist
from trustrl.advantages import whiten as local_whiten
from trustrl.rollout import Rollout, splitmix64


def sampling_row_seeds(seed: int, draw: Sequence[int], n_prompts: int, group_size: int) -> torch.Tensor:
    """Per-completion seeds for :func:`trustrl.rollout.generate` (``row_seeds``): int64
    ``[n_prompts * group_size]``, row ``p * group_size + j`` (completion ``j`` of the ``p``-th
    prompt of the global draw) seeded by a splitmix64 chain over ``(seed, *draw, p, j)``.

    ``draw`` names the global draw, e.g. the prompt sampler's ``(epoch, cursor)`` before it:
    unique over a run, equal on every rank, and restored on resume; so a completion's tokens
    depend neither on how the draw is split across ranks nor on an interrupted run."""
    h = splitmix64(torch.tensor([int(seed)], dtype=torch.int64))
    for value in list(draw):
        h = splitmix64(h ^ splitmix64(torch.tensor([int(value)], dtype=torch.int64)))
    p = torch.arange(n_prompts, dtype=torch.int64).repeat_interleave(group_size)
    j = torch.arange(group_size, dtype=torch.int64).repeat(n_prompts)
    h = splitmix64(h ^ splitmix64(p))
    return splitmix64(h ^ splitmix64(j + (1 << 32)))


def global_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """:func:`trustrl.advantages.whiten` with the mean and (population) variance taken over the
    valid elements of every rank's ``x`` (two all-reduces). Same formula; one process: that
    very function."""
    if not dist.is_distributed():
        return local_whiten(x, mask, shift_mean=shift_mean, eps=eps)
    m = torch.broadcast_to(mask, x.shape)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    n = dist.all_reduce_sum(m.sum().to(torch.float64)).clamp_min(1)
    mu = (dist.all_reduce_sum(torch.where(m, x, zero).sum().to(torch.float64)) / n).to(x.dtype)
    var = (dist.all_reduce_sum(torch.where(m, (x - mu).square(), zero).sum().to(torch.float64)) / n).to(x.dtype)
    y = (x - mu) * torch.rsqrt(var + eps)
    if not shift_mean:
        y = y + mu
    return torch.where(m, y, zero)


def _rollout_to(rollout: Rollout, device) -> Rollout:
    return rollout.to(device)


def gather_scored_batches(local, concat: Callable[[list, int], Any], pad_id: int, device):
    """The global :class:`~trustrl.loop.experience.ScoredBatch` of one draw, on every rank:
    each rank's shard (``None`` for a rank that held no prompts) concatenated in rank order,
    i.e. in the order of the draw. Cheap next to generation (token ids and scores only)."""
    if not dist.is_distributed():
        return local
    from dataclasses import replace

    if local is not None:
        local = replace(local, rollout=_rollout_to(local.rollout, "cpu"))
    parts = [b for b in dist.all_gather_objects(local) if b is not None]
    merged = concat(parts, pad_id)
    return replace(merged, rollout=_rollout_to(merged.rollout, device))


class _PromptShard:
    """A contiguous slice of a PromptSet, seen as a PromptSet by ``sample_and_score``."""

    def __init__(self, prompts, lo: int, hi: int):
        self.base, self.lo, self.hi = prompts, lo, hi
        self.token_ids = prompts.token_ids[lo:hi]
        self.texts = prompts.texts[lo:hi]
        self.is_conversation = prompts.is_conversation[lo:hi]

    def __len__(self) -> int:
        return self.hi - self.lo

    def columns(self, indices: list[int]) -> dict[str, list[Any]]:
        return self.base.columns([self.lo + i for i in indices])

    def raw_prompts(self, indices: list[int]) -> list[Any]:
        return self.base.raw_prompts([self.lo + i for i in indices])


def evaluate_sharded(evaluate: Callable[..., dict[str, float]], policy, tokenizer, prompts, config, rewards, device):
    """``evaluate(policy, tokenizer, prompts, config, rewards, device)`` (a greedy held-out
    evaluation whose metrics are means over its prompts) with the evaluated prompts split
    across ranks; the result is the mean over all of them, on every rank."""
    if not dist.is_distributed():
        return evaluate(policy, tokenizer, prompts, config, rewards, device)
    n = min(config.eval_prompts, len(prompts))
    lo, hi = dist.shard_range(n)
    local = evaluate(policy, tokenizer, _PromptShard(prompts, lo, hi), config, rewards, device) if hi > lo else {}
    return dist.reduce_metrics(local, weight=hi - lo)
