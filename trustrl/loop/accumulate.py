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

from collections.abc import Iterable, Mapping, Sequence

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


def token_budget_micro_batches(lengths: Sequence[int], budget: int,
                               prefix_lengths: Sequence[int] | None = None, packed: bool = False) -> list[torch.Tensor]:
    """Row indices of micro-batches formed by a token budget: the rows sorted by length (longest
    first, ties in row order), cut greedily so that each micro-batch's padded size fits::

        rows(micro) * (max prefix(micro) + max length(micro)) <= budget

    (a row longer than the budget forms a micro-batch alone). ``lengths [N]``: tokens of each
    row (of the completion, with ``prefix_lengths`` the prompt's: a left-padded prompt and a
    right-padded completion pad separately). Returns ``[tensor(int64 indices)]`` covering every
    row exactly once. Sorting groups similar lengths, so the padding left is small; the loss is
    normalized once over the whole batch (:class:`BatchNormalizer`), so any split is exact.
    ``packed``: the micro-batch's rows are packed into one sequence without padding, so its
    size is ``sum(prefix + length)`` instead."""
    if budget < 1:
        raise ValueError(f"token_budget_micro_batches: budget must be >= 1, got {budget}")
    n = len(lengths)
    prefix = [0] * n if prefix_lengths is None else list(prefix_lengths)
    if len(prefix) != n:
        raise ValueError(f"token_budget_micro_batches: {len(prefix)} prefix lengths for {n} rows")
    order = sorted(range(n), key=lambda i: (-(int(lengths[i]) + int(prefix[i])), i))
    out: list[list[int]] = []
    width_p = width_c = total = 0
    for i in order:
        p, c = int(prefix[i]), int(lengths[i])
        size = total + p + c if packed else (len(out[-1]) + 1 if out else 1) * (max(width_p, p) + max(width_c, c))
        if out and size <= budget:
            out[-1].append(i)
            width_p, width_c, total = max(width_p, p), max(width_c, c), total + p + c
        else:
            out.append([i])
            width_p, width_c, total = p, c, p + c
    return [torch.tensor(rows, dtype=torch.long) for rows in out]


def row_micro_batches(n_rows: int, steps: int) -> list[torch.Tensor]:
    """``steps`` micro-batches of consecutive rows, sizes as equal as possible (the first ones
    larger), none empty: ``torch.arange(n_rows).tensor_split(min(steps, n_rows))``."""
    return list(torch.arange(n_rows).tensor_split(max(1, min(steps, n_rows))))


class MetricMeans:
    """Batch means of per-micro-batch metrics, each weighted by its micro-batch's share of a
    unit (tokens for token means, sequences for sequence means), summed across ranks; metrics
    named ``..._max`` (e.g. ``policy/ratio_max``) are maxima, not means: the largest over the
    micro-batches that count (weight > 0: not a stand-in pass) and over ranks."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.maxima: dict[str, float] = {}

    def add(self, metrics: Mapping[str, float], weight: float) -> None:
        for k, v in metrics.items():
            if k.endswith("_max"):
                if weight > 0:
                    self.maxima[k] = max(self.maxima.get(k, float("-inf")), float(v))
            else:
                self.sums[k] = self.sums.get(k, 0.0) + float(v) * weight

    def reduce(self) -> dict[str, float]:
        mine = (self.sums, self.maxima)
        parts = dist.all_gather_objects(mine) if dist.is_distributed() else [mine]
        out: dict[str, float] = {}
        for sums, maxima in parts:
            for k, v in sums.items():
                out[k] = out.get(k, 0.0) + v
            for k, v in maxima.items():
                out[k] = max(out.get(k, v), v)
        return out


class LogprobGap:
    """``rollout/logprob_diff_max`` and ``rollout/logprob_diff_mean``: ``|log pi_trainer - log mu|``
    over the sampled tokens of a step (every micro-batch, every rank), from the ``(max, sum,
    count)`` triples of :func:`trustrl.losses.logprob_gap`."""

    def __init__(self) -> None:
        self.max, self.sum, self.count = 0.0, 0.0, 0

    def add(self, part: tuple[float, float, int]) -> None:
        self.max, self.sum, self.count = max(self.max, part[0]), self.sum + part[1], self.count + part[2]

    def reduce(self) -> dict[str, float]:
        total = dist.sum_across_ranks({"sum": self.sum, "count": float(self.count)})
        if not total["count"]:
            return {}
        return {"rollout/logprob_diff_max": float(dist.all_reduce_max(self.max)),
                "rollout/logprob_diff_mean": total["sum"] / total["count"]}
