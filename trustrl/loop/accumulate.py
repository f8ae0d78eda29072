"""One place that normalizes: loss sums divided by the count of the whole batch.

Every loss term of the functional core comes as a :class:`trustrl.losses.LossSum` (a masked
sum and the unit it averages over: tokens, sequences or rows). A batch is split into
micro-batches (gradient accumulation) and across data-parallel ranks; :class:`BatchNormalizer`
knows each unit's count over *all* of them before the first backward, so::

    loss(micro) = sum_k coef_k * total_k(micro) / count_k(whole batch, all ranks)

and the gradients summed over micro-batches and ranks are those of the whole batch's mean
loss, whatever the split: 1 x N == N x 1 by construction (up to float summation order).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from trustrl import distributed as dist
from trustrl.losses import UNITS, LossSum, unit_counts


class BatchNormalizer:
    """Global counts of every unit for one optimizer step (all micro-batches, all ranks).

    ``masks``: this rank's loss masks ``[b, T]`` (bool), one per micro-batch or one for all;
    ``share``: 0.0 for a rank that holds only a stand-in row (its counts must not enter)."""

    def __init__(self, masks: Iterable[torch.Tensor], share: float = 1.0):
        local = {u: 0 for u in UNITS}
        for mask in masks:
            for unit, n in unit_counts(mask).items():
                local[unit] += n if share else 0
        self.counts: dict[str, float] = {u: float(v) for u, v in dist.sum_across_ranks(local).items()}

    @classmethod
    def from_counts(cls, counts: Mapping[str, float]) -> "BatchNormalizer":
        """A normalizer from global counts the caller already has (no collective)."""
        self = cls.__new__(cls)
        self.counts = {u: float(counts.get(u, 0.0)) for u in UNITS}
        return self

    def weight(self, part: LossSum) -> float:
        """This part's share of the whole batch's normalizer: ``count(part) / count(batch)``."""
        return float(part.count) / max(self.counts[part.unit], 1.0)

    def loss(self, terms: Iterable[tuple[float, LossSum]]) -> torch.Tensor:
        """``sum_k coef_k * total_k / count_k(batch)``: a micro-batch's share of the batch loss."""
        out = None
        for coef, part in terms:
            if part.unit not in self.counts:
                raise ValueError(f"BatchNormalizer.loss: unknown unit {part.unit!r}; allowed: {UNITS}")
            term = part.total * (coef / max(self.counts[part.unit], 1.0))
            out = term if out is None else out + term
        if out is None:
            raise ValueError("BatchNormalizer.loss: no loss terms")
        return out


class MetricMeans:
    """Batch means of per-micro-batch metrics, each weighted by its micro-batch's share of a
    unit (tokens for token means, sequences for sequence means), summed across ranks."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}

    def add(self, metrics: Mapping[str, float], weight: float) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v) * weight

    def reduce(self) -> dict[str, float]:
        return dist.sum_across_ranks(self.sums)
