"""The RL loop across data-parallel ranks: world-size-invariant sampling seeds, whitening with
global statistics, gathering a draw's scored batches, and held-out evaluation split across
ranks. (:mod:`trustrl.distributed` holds the collectives; this is what RL builds on them.)"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable

import torch

from trustrl import distributed as dist
from trustrl.advantages import whiten as local_whiten
from trustrl.losses import explained_variance, masked_mean
from trustrl.rewards.registry import ScoreResult
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


# -- step statistics over every rank's completions ---------------------------------------------------
# An algorithm that keeps each rank's share of the rollout local (PPO: collects_local_share)
# computes a step's statistics from every rank's tokens, never as a mean of the ranks' own
# statistics (a rank-weighted mean of token means, stds or explained variances differs from the
# global one). One process: exactly the local functions. (global_whiten above makes the same
# two passes, in the data's dtype, as the local whitening it stands for.)


def _global_moments(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(count, mean, population variance)`` over the valid elements of every rank's ``x``,
    float64, two passes (mean, then ``mean((x - mean)^2)``), as the local formulas."""
    m = torch.broadcast_to(mask, x.shape)
    x = x.detach().double()
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    n = dist.all_reduce_sum(m.sum().double())
    mu = dist.all_reduce_sum(torch.where(m, x, zero).sum()) / n.clamp_min(1)
    var = dist.all_reduce_sum(torch.where(m, (x - mu).square(), zero).sum()) / n.clamp_min(1)
    return n, mu, var


def global_masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    """``masked_mean(x, mask)`` over every rank's valid elements."""
    if not dist.is_distributed():
        return float(masked_mean(x, mask))
    return float(_global_moments(x, mask)[1])


def global_masked_std(x: torch.Tensor, mask: torch.Tensor) -> float:
    """Population standard deviation ``sqrt(mean((x - mean)^2))`` over every rank's valid elements."""
    if not dist.is_distributed():
        return float(masked_mean((x - masked_mean(x, mask)).square(), mask).sqrt())
    return float(_global_moments(x, mask)[2].sqrt())


def global_explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """:func:`trustrl.losses.explained_variance` (``1 - Var[R - V] / Var[R]``, nan when
    ``Var[R] = 0``) over every rank's valid positions."""
    if not dist.is_distributed():
        return explained_variance(values, returns, mask)
    n, _, var_r = _global_moments(returns, mask)
    if float(n) == 0 or float(var_r) == 0.0:
        return float("nan")
    return float(1.0 - _global_moments(returns.double() - values.double(), mask)[2] / var_r)


def global_scores(scores: ScoreResult) -> ScoreResult:
    """Every rank's rows of ``total`` and ``per_function`` in rank order (so means and stds are
    the batch's); ``n_faults`` stays this rank's (reduce_metrics sums ``/faults`` keys)."""
    if not dist.is_distributed():
        return scores
    return ScoreResult(dist.gather_rows(scores.total), {k: dist.gather_rows(v) for k, v in scores.per_function.items()},
                       dict(scores.n_faults))
