"""Losses and masked reductions for PPO / GRPO / GSPO / TRPO critics and reward models.

Conventions: masks are ``torch.bool`` with True = the position counts; every loss returns
``(loss, metrics)`` with ``metrics: dict[str, float]`` (except :func:`bradley_terry_loss`, which
returns the scalar loss only). Metric keys here are un-namespaced (``clip_fraction``,
``approx_kl``, ...); trainers prefix them (``policy/clip_fraction``) when logging.

Sums and counts: each loss also exists as ``*_sum`` returning a :class:`LossSum` -- the
differentiable masked *sum* and the *unit* it is averaged over (``tokens``, ``sequences``,
``rows``). The training loop divides every sum by its unit's count over the whole batch (all
micro-batches, all data-parallel ranks, see :func:`unit_counts`), once, so gradient
accumulation and data parallelism are exact by construction (1 x N == N x 1). The public
``(loss, metrics)`` functions are ``LossSum.mean()`` on one batch.

References
----------
* PPO: Schulman et al. 2017, "Proximal Policy Optimization Algorithms", arXiv 1707.06347.
* GRPO: Shao et al. 2024, "DeepSeekMath", arXiv 2402.03300 (sequence-mean aggregation).
* DAPO: Yu et al. 2025, arXiv 2503.14476 (token-mean aggregation, clip-higher).
* Dr. GRPO: Liu et al. 2025, "Understanding R1-Zero-Like Training", arXiv 2503.20783
  (token sum divided by a constant ``B * L_max``).
* GSPO: Zheng et al. 2025, "Group Sequence Policy Optimization", arXiv 2507.18071.
* KL estimators: J. Schulman, "Approximating KL Divergence" (2020 blog note).
* Value clipping / explained variance: Huang et al. 2024, "The N+ Implementation Details of
  RLHF with PPO"; Ziegler et al. 2019, arXiv 1909.08593.
* Bradley-Terry reward model: Bradley & Terry 1952; Ouyang et al. 2022, arXiv 2203.02155.
* Rankings of K: all pairs per ranking (Ouyang et al. 2022); Plackett-Luce (Plackett 1975;
  Luce 1959), ties by Breslow 1974.
* Rollout correction (behaviour policy = the sampling engine): truncated importance sampling,
  F. Yao, L. Liu et al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL
  Training" (blog, fengyao.notion.site); masked importance sampling as in IcePop (Ling Team
  2025, "Small Leak Can Sink a Great Ship") and veRL's ``docs/algo/rollout_corr.md``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "LossSum",
    "unit_counts",
    "aggregate_sum",
    "policy_loss_sum",
    "sequence_policy_loss_sum",
    "value_loss_sum",
    "huber_value_loss_sum",
    "AGGREGATIONS",
    "KL_ESTIMATORS",
    "masked_sum",
    "masked_mean",
    "aggregate",
    "kl_penalty",
    "policy_loss",
    "sequence_policy_loss",
    "value_loss",
    "huber_value_loss",
    "entropy_from_logits",
    "bradley_terry_loss",
    "explained_variance",
    "ranking_pair_count",
    "ranking_pairwise_sum",
    "plackett_luce_sum",
    "ROLLOUT_CORRECTIONS",
    "rollout_correction_weights",
    "logprob_gap",
]

AGGREGATIONS: tuple[str, ...] = ("token_mean", "seq_mean", "seq_sum_constant")
KL_ESTIMATORS: tuple[str, ...] = ("k1", "k2", "k3")


UNITS: tuple[str, ...] = ("tokens", "sequences", "rows")


@dataclass(frozen=True)
class LossSum:
    """One loss term before normalization.

    ``total``: scalar, differentiable sum over this batch's units; ``count``: how many units it
    holds (a float tensor, no gradient); ``unit``: ``"tokens"`` (valid tokens), ``"sequences"``
    (rows with at least one valid token) or ``"rows"`` (all rows). ``mean() = total / max(count, 1)``.
    """

    total: torch.Tensor
    count: torch.Tensor
    unit: str

    def mean(self) -> torch.Tensor:
        return self.total / self.count.clamp_min(1).to(self.total.dtype)


def unit_counts(mask: torch.Tensor) -> dict[str, int]:
    """Counts of every normalization unit under ``mask [B, T]`` (bool):
    ``tokens = sum(mask)``, ``sequences = #rows with a True``, ``rows = B``."""
    if mask.dtype != torch.bool or mask.dim() != 2:
        raise ValueError(f"unit_counts: mask must be a [B, T] bool tensor, got {mask.dtype} {tuple(mask.shape)}")
    return {"tokens": int(mask.sum()), "sequences": int(mask.any(dim=1).sum()), "rows": int(mask.shape[0])}


def _count(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return x.detach().to(dtype=like.dtype if like.dtype.is_floating_point else torch.float32, device=like.device)


def _check_mask(fn: str, mask: torch.Tensor, x: torch.Tensor) -> None:
    if mask.dtype != torch.bool:
        raise ValueError(f"{fn}: mask must be torch.bool (True = position counts), got {mask.dtype}")
    ms, xs = mask.shape, x.shape
    if ms == xs:  # fast path: the common case, and torch.broadcast_shapes costs ~50-100 us
        return
    if len(ms) <= len(xs) and all(a == b or a == 1 for a, b in zip(reversed(ms), reversed(xs))):
        return  # mask broadcasts to x (a subset of what broadcast_shapes accepts)
    try:
        torch.broadcast_shapes(mask.shape, x.shape)
    except RuntimeError as err:
        raise ValueError(
            f"{fn}: mask shape {tuple(mask.shape)} does not broadcast to {tuple(x.shape)}"
        ) from err


def masked_sum(
    x: torch.Tensor, mask: torch.Tensor, dim: int | tuple[int, ...] | None = None
) -> torch.Tensor:
    """Sum of ``x`` over positions where ``mask`` is True.

    Shapes: ``x [...]``, ``mask`` bool broadcastable to ``x`` -> scalar (``dim=None``) or ``x``
    reduced over ``dim``. Masked-out entries are replaced by 0 with ``torch.where`` (not
    multiplied), so inf/NaN in padding cannot leak into the result.
    """
    _check_mask("masked_sum", mask, x)
    zeroed = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return zeroed.sum() if dim is None else zeroed.sum(dim)


def masked_mean(
    x: torch.Tensor, mask: torch.Tensor, dim: int | tuple[int, ...] | None = None
) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is True: ``sum(x * m) / max(sum(m), 1)``.

    Shapes as :func:`masked_sum`. An all-False mask (or slice) gives 0, never NaN.
    """
    total = masked_sum(x, mask, dim)
    count = mask if mask.shape == x.shape else torch.broadcast_to(mask, x.shape)
    count = count.sum() if dim is None else count.sum(dim)
    return total / count.clamp_min(1).to(total.dtype)


def aggregate_sum(
    values: torch.Tensor,
    mask: torch.Tensor,
    aggregation: str = "token_mean",
    max_len: int | None = None,
) -> LossSum:
    """Numerator and unit of :func:`aggregate` (``aggregate = aggregate_sum(...).mean()``).

    * ``"token_mean"``: ``sum_{i,t} m_it x_it`` over ``tokens``.
    * ``"seq_mean"``: ``sum_i (1/|o_i|) sum_t m_it x_it`` over ``sequences`` (non-empty rows).
    * ``"seq_sum_constant"``: ``sum_{i,t} m_it x_it / max_len`` over ``rows``
      (``max_len`` defaulting to ``T``), i.e. Dr. GRPO's ``/ (B * max_len)``.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregate: unknown aggregation {aggregation!r}; allowed: {AGGREGATIONS}")
    if values.dim() != 2:
        raise ValueError(f"aggregate: values must be [B, T], got {tuple(values.shape)}")
    _check_mask("aggregate", mask, values)
    if mask.shape != values.shape:
        mask = torch.broadcast_to(mask, values.shape)
    if aggregation == "token_mean":
        return LossSum(masked_sum(values, mask), _count(mask.sum(), values), "tokens")
    if aggregation == "seq_mean":
        per_seq = masked_mean(values, mask, dim=1)
        nonempty = mask.any(dim=1)
        return LossSum(masked_sum(per_seq, nonempty), _count(nonempty.sum(), values), "sequences")
    if max_len is None:
        max_len = values.shape[1]
    if max_len < 1:
        raise ValueError(f"aggregate: max_len must be >= 1, got {max_len}")
    return LossSum(masked_sum(values, mask) / max_len, _count(torch.tensor(values.shape[0]), values), "rows")


def aggregate(
    values: torch.Tensor,
    mask: torch.Tensor,
    aggregation: str = "token_mean",
    max_len: int | None = None,
) -> torch.Tensor:
    """Reduce per-token ``values [B, T]`` under ``mask [B, T]`` (bool) to a scalar.

    * ``"token_mean"`` (DAPO): ``sum_{i,t} m_it x_it / sum_{i,t} m_it``.
    * ``"seq_mean"`` (GRPO paper): ``(1/G') sum_i (1/|o_i|) sum_t m_it x_it`` where ``G'`` is
      the number of sequences with at least one valid token (empty sequences are skipped).
    * ``"seq_sum_constant"`` (Dr. GRPO): ``sum_{i,t} m_it x_it / (B * max_len)``,
      ``max_len`` defaulting to ``T``; unbiased in length, constant denominator.

    Raises ``ValueError`` for an unknown ``aggregation`` (the message lists the allowed ones).
    """
    return aggregate_sum(values, mask, aggregation, max_len).mean()


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of ``KL(pi || pi_ref)`` for tokens sampled from ``pi``.

    Shapes: ``logp [...]``, ``ref_logp [...]`` -> ``[...]``. With ``log rho = ref_logp - logp``:

    * ``k1 = -log rho = logp - ref_logp``      (unbiased, high variance, can be negative)
    * ``k2 = 0.5 (log rho)^2``                 (biased, >= 0, low variance)
    * ``k3 = (rho - 1) - log rho``             (unbiased, >= 0, low variance; GRPO's choice)

    Reference: J. Schulman, "Approximating KL Divergence" (2020). ``k3`` is computed with
    ``expm1`` so it is exactly 0 (not a rounding residue) when ``logp == ref_logp``.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_penalty: unknown estimator {estimator!r}; allowed: {KL_ESTIMATORS}")
    log_rho = ref_logp - logp
    if estimator == "k1":
        return -log_rho
    if estimator == "k2":
        return 0.5 * log_rho.square()
    # (rho - 1) - log rho, clamped at 0 against rounding when rho ~ 1
    return (torch.expm1(log_rho) - log_rho).clamp_min(0.0)


def _as_token_adv(fn: str, advantages: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    if advantages.dim() == 1:
        if advantages.shape[0] != shape[0]:
            raise ValueError(f"{fn}: advantages [B] has B={advantages.shape[0]}, logp has B={shape[0]}")
        return advantages[:, None]
    if tuple(advantages.shape) != tuple(shape):
        raise ValueError(f"{fn}: advantages must be [B] or [B, T]={tuple(shape)}, got {tuple(advantages.shape)}")
    return advantages


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float | None = None,
    aggregation: str = "token_mean",
    max_len: int | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO clipped surrogate loss on one batch: :func:`policy_loss_sum` divided by its count."""
    part, metrics = policy_loss_sum(logp, old_logp, advantages, mask, clip_low, clip_high, aggregation, max_len)
    return part.mean(), metrics


def policy_loss_sum(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float | None = None,
    aggregation: str = "token_mean",
    max_len: int | None = None,
    weights: torch.Tensor | None = None,
) -> tuple[LossSum, dict[str, float]]:
    """PPO clipped surrogate loss (token-level importance ratios), GRPO/DAPO/Dr. GRPO variants.

    Shapes: ``logp, old_logp [B, T]``, ``advantages [B]`` (broadcast over tokens) or ``[B, T]``,
    ``mask [B, T]`` bool -> scalar loss.

    Formula (Schulman et al. 2017; DAPO clip-higher when ``clip_high`` is set)::

        r_t = exp(logp_t - old_logp_t)
        J_t = min(r_t A_t, clip(r_t, 1 - clip_low, 1 + clip_high) A_t)
        loss = -aggregate(J, mask, aggregation, max_len)     # see :func:`aggregate`

    Returned as a :class:`LossSum` (``-numerator`` of the aggregation and its unit).

    ``clip_high=None`` means ``clip_high = clip_low``. The log-ratio is zeroed at masked
    positions before ``exp`` so garbage padding can't produce inf/NaN gradients.

    ``weights`` ``[B, T]`` (optional, no gradient): each token's ``J_t`` is multiplied by it
    before aggregation (the rollout correction of :func:`rollout_correction_weights`; a weight
    of 0 drops the token's gradient while it still counts in the unit).

    Metrics (python floats, over valid tokens):
    ``clip_fraction`` -- fraction where the clipped term is the binding one, i.e. the gradient
    is zero (``A > 0 and r > 1 + clip_high`` or ``A < 0 and r < 1 - clip_low``);
    ``approx_kl`` -- mean of the k3 estimator of ``KL(pi_old || pi_theta)`` on tokens sampled
    from ``pi_old``: ``(r - 1) - log r``; ``ratio_mean``, ``ratio_max``.
    """
    fn = "policy_loss"
    if logp.shape != old_logp.shape or logp.dim() != 2:
        raise ValueError(f"{fn}: logp and old_logp must both be [B, T], got {tuple(logp.shape)} and {tuple(old_logp.shape)}")
    _check_mask(fn, mask, logp)
    if clip_high is None:
        clip_high = clip_low
    if clip_low < 0 or clip_high < 0:
        raise ValueError(f"{fn}: clip_low/clip_high must be >= 0, got {clip_low}/{clip_high}")
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    adv = torch.where(mask, _as_token_adv(fn, advantages, logp.shape).to(logp.dtype), zero)
    log_ratio = torch.where(mask, logp - old_logp, zero)
    ratio = torch.exp(log_ratio)
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * adv
    objective = torch.minimum(unclipped, clipped)
    if weights is not None:
        if tuple(weights.shape) != tuple(logp.shape):
            raise ValueError(f"{fn}: weights must be [B, T]={tuple(logp.shape)}, got {tuple(weights.shape)}")
        objective = objective * weights.detach().to(logp.dtype)
    part = aggregate_sum(objective, mask, aggregation, max_len)
    loss = LossSum(-part.total, part.count, part.unit)

    with torch.no_grad():
        # All four metrics in one batched reduction and a single host conversion: on small
        # batches (classic control) separate masked means and float() calls cost more than
        # the loss itself.
        m = mask if mask.shape == logp.shape else torch.broadcast_to(mask, logp.shape)
        adv_b = adv if adv.shape == logp.shape else torch.broadcast_to(adv, logp.shape)
        binding = ((adv_b > 0) & (ratio > 1.0 + clip_high)) | ((adv_b < 0) & (ratio < 1.0 - clip_low))
        per_token = torch.stack([binding.to(logp.dtype), torch.expm1(log_ratio) - log_ratio, ratio])
        count = m.sum().clamp_min(1).to(logp.dtype)
        means = torch.where(m, per_token, zero).sum(dim=(1, 2)) / count
        if logp.numel():
            r_max = torch.where(m, ratio, torch.full((), -float("inf"), dtype=logp.dtype, device=logp.device)).amax()
        else:
            r_max = torch.full((), -float("inf"), dtype=logp.dtype, device=logp.device)
        clip_fraction, approx_kl, ratio_mean, ratio_max = torch.cat([means, r_max[None]]).tolist()
        metrics = {
            "clip_fraction": clip_fraction,
            "approx_kl": approx_kl,
            "ratio_mean": ratio_mean,
            "ratio_max": ratio_max if ratio_max != -float("inf") else 1.0,  # -inf: no valid token
        }
    return loss, metrics


def sequence_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 3e-4,
    clip_high: float | None = 4e-4,
) -> tuple[torch.Tensor, dict[str, float]]:
    """GSPO loss on one batch: :func:`sequence_policy_loss_sum` divided by its count."""
    part, metrics = sequence_policy_loss_sum(logp, old_logp, advantages, mask, clip_low, clip_high)
    return part.mean(), metrics


def sequence_policy_loss_sum(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 3e-4,
    clip_high: float | None = 4e-4,
    weights: torch.Tensor | None = None,
) -> tuple[LossSum, dict[str, float]]:
    """GSPO: clipped surrogate with a length-normalised *sequence* importance ratio.

    Shapes: ``logp, old_logp [B, T]``, ``advantages [B]``, ``mask [B, T]`` bool -> scalar.

    Formula (Zheng et al. 2025, arXiv 2507.18071, eq. 5-7)::

        s_i = exp( (1/|o_i|) sum_t m_it (logp_it - old_logp_it) )
        J   = (1/B') sum_i min(s_i A_i, clip(s_i, 1 - clip_low, 1 + clip_high) A_i)
        loss = -J

    ``B'`` counts sequences with at least one valid token (the unit ``sequences`` of the
    returned :class:`LossSum`, whose total is ``-sum_i min(...)``). ``weights [B]`` (optional,
    no gradient) multiplies each sequence's term (sequence-level rollout correction). Defaults ``clip_low=3e-4`` and
    ``clip_high=4e-4`` are the paper's ranges (sequence ratios sit much closer to 1 than token
    ratios); ``clip_high=None`` means ``clip_high = clip_low``.

    Metrics: ``clip_fraction`` (fraction of sequences where the clipped term binds),
    ``approx_kl`` (token-mean k3 of ``KL(pi_old || pi_theta)``, as in :func:`policy_loss`),
    ``ratio_mean``, ``ratio_max`` (of the sequence ratios ``s_i``).
    """
    fn = "sequence_policy_loss"
    if logp.shape != old_logp.shape or logp.dim() != 2:
        raise ValueError(f"{fn}: logp and old_logp must both be [B, T], got {tuple(logp.shape)} and {tuple(old_logp.shape)}")
    _check_mask(fn, mask, logp)
    if advantages.shape != (logp.shape[0],):
        raise ValueError(f"{fn}: advantages must be [B={logp.shape[0]}], got {tuple(advantages.shape)}")
    if clip_high is None:
        clip_high = clip_low
    m = torch.broadcast_to(mask, logp.shape)
    log_ratio = torch.where(m, logp - old_logp, torch.zeros((), dtype=logp.dtype, device=logp.device))
    seq_log_ratio = masked_mean(log_ratio, m, dim=1)
    s = torch.exp(seq_log_ratio)
    adv = advantages.to(logp.dtype)
    objective = torch.minimum(s * adv, s.clamp(1.0 - clip_low, 1.0 + clip_high) * adv)
    if weights is not None:
        if tuple(weights.shape) != (logp.shape[0],):
            raise ValueError(f"{fn}: weights must be [B={logp.shape[0]}], got {tuple(weights.shape)}")
        objective = objective * weights.detach().to(logp.dtype)
    nonempty = m.any(dim=1)
    loss = LossSum(-masked_sum(objective, nonempty), _count(nonempty.sum(), logp), "sequences")
    with torch.no_grad():
        binding = ((adv > 0) & (s > 1.0 + clip_high)) | ((adv < 0) & (s < 1.0 - clip_low))
        any_valid = bool(nonempty.any())
        metrics = {
            "clip_fraction": float(masked_mean(binding.to(logp.dtype), nonempty)),
            "approx_kl": float(masked_mean(torch.expm1(log_ratio) - log_ratio, m)),
            "ratio_mean": float(masked_mean(s, nonempty)),
            "ratio_max": float(s[nonempty].max()) if any_valid else 1.0,
        }
    return loss, metrics


ROLLOUT_CORRECTIONS: tuple[str, ...] = ("none", "tis", "mis")


def rollout_correction_weights(
    old_logp: torch.Tensor,
    behaviour_logp: torch.Tensor,
    mask: torch.Tensor,
    *,
    mode: str,
    level: str = "token",
    cap: float = 2.0,
    lower: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Importance weights that correct for sampling from a behaviour policy ``mu`` (the
    rollout engine) while the surrogate's "old" policy is the trainer's ``pi_old``.

    Shapes: ``old_logp, behaviour_logp [B, T]``, ``mask [B, T]`` bool -> ``weights [B, T]``
    (float, no gradient; 0 at masked positions) and metrics. The ratio::

        token level:     rho_t = exp(log pi_old(y_t) - log mu(y_t))
        sequence level:  rho_i = exp(sum_t m_it (log pi_old(y_it) - log mu(y_it)))  (every token of i)

    * ``mode="tis"`` (truncated IS, Yao et al. 2025): ``w = min(rho, cap)``; the policy
      gradient becomes ``E_mu[min(rho, C) grad J_t]``: unbiased up to the truncation, variance
      bounded by ``C``.
    * ``mode="mis"`` (masked IS; IcePop's ``M(rho; alpha, beta)``, veRL's rejection masks):
      ``w = rho`` when ``lower <= rho <= cap``, else 0 -- a token (or a whole sequence) whose
      behaviour and trainer probabilities disagree by more than the band is dropped from the
      gradient (it still counts in the loss's unit, as in TRL and IcePop). ``lower`` defaults to
      ``1 / cap``; ``lower=0`` masks only above ``cap`` (TRL's ``*_mask`` modes).
    * ``mode="none"``: ``w = 1`` at every valid position.

    Metrics (over valid tokens): ``ratio_mean``, ``ratio_max``, ``ratio_min``, ``weight_mean``,
    ``truncated_fraction`` (TIS: ``rho > cap``) or ``masked_fraction`` (MIS: outside the band).
    """
    fn = "rollout_correction_weights"
    if mode not in ROLLOUT_CORRECTIONS:
        raise ValueError(f"{fn}: unknown mode {mode!r}; allowed: {ROLLOUT_CORRECTIONS}")
    if level not in ("token", "sequence"):
        raise ValueError(f"{fn}: level must be 'token' or 'sequence', got {level!r}")
    if not cap > 1.0:
        raise ValueError(f"{fn}: cap must be > 1, got {cap}")
    if old_logp.shape != behaviour_logp.shape or old_logp.dim() != 2:
        raise ValueError(f"{fn}: old_logp and behaviour_logp must both be [B, T], got "
                         f"{tuple(old_logp.shape)} and {tuple(behaviour_logp.shape)}")
    _check_mask(fn, mask, old_logp)
    lower = 1.0 / cap if lower is None else lower
    if not 0.0 <= lower < cap:
        raise ValueError(f"{fn}: lower must lie in [0, cap={cap}), got {lower}")
    with torch.no_grad():
        m = torch.broadcast_to(mask, old_logp.shape)
        dt = torch.promote_types(old_logp.dtype, behaviour_logp.dtype)
        zero = torch.zeros((), dtype=dt, device=old_logp.device)
        log_rho = torch.where(m, old_logp.to(dt) - behaviour_logp.to(dt), zero)
        if level == "sequence":
            log_rho = torch.where(m, log_rho.sum(dim=1, keepdim=True).expand_as(log_rho), zero)
        rho = torch.exp(log_rho)
        if mode == "tis":
            weights, flagged = rho.clamp(max=cap), rho > cap
        elif mode == "mis":
            flagged = (rho < lower) | (rho > cap)
            weights = torch.where(flagged, zero, rho)
        else:
            weights, flagged = torch.ones_like(rho), torch.zeros_like(m)
        weights = torch.where(m, weights, zero)
        n = m.sum().clamp_min(1).to(dt)
        valid = bool(m.any())
        metrics = {
            "ratio_mean": float(torch.where(m, rho, zero).sum() / n),
            "ratio_max": float(rho[m].max()) if valid else 1.0,
            "ratio_min": float(rho[m].min()) if valid else 1.0,
            "weight_mean": float(weights.sum() / n),
            ("masked_fraction" if mode == "mis" else "truncated_fraction"): float((flagged & m).sum() / n),
        }
    return weights, metrics


def logprob_gap(trainer_logp: torch.Tensor, behaviour_logp: torch.Tensor, mask: torch.Tensor) -> tuple[float, float, int]:
    """``(max, sum, count)`` of ``|log pi_trainer - log mu|`` over the valid tokens (``[B, T]``
    each, ``mask`` bool): the gap between the trainer's recomputed log-probs and the behaviour
    log-probs the sampler recorded. Sums and counts, so micro-batches and ranks combine exactly."""
    _check_mask("logprob_gap", mask, trainer_logp)
    with torch.no_grad():
        m = torch.broadcast_to(mask, trainer_logp.shape)
        gap = (trainer_logp.detach().double() - behaviour_logp.double()).abs()
        count = int(m.sum())
        return (float(gap[m].max()) if count else 0.0), float(gap[m].sum()), count


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Value loss on one batch: :func:`value_loss_sum` divided by its count."""
    part, metrics = value_loss_sum(values, old_values, returns, mask, clip)
    return part.mean(), metrics


def value_loss_sum(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float | None = None,
) -> tuple[LossSum, dict[str, float]]:
    """(Clipped) squared-error value loss.

    Shapes: ``values, old_values, returns [B, T]`` (or any equal shape), ``mask`` bool -> scalar.

    Formula (PPO value clipping, Huang et al. 2024 "N+ details", Ziegler et al. 2019)::

        V_clip = V_old + clip(V - V_old, -c, c)    (exactly V where |V - V_old| <= c)
        loss   = 0.5 * masked_mean( max((V - R)^2, (V_clip - R)^2) )

    With ``clip=None``: ``0.5 * masked_mean((V - R)^2)``. Returned as a :class:`LossSum`
    over ``tokens`` (valid positions of ``mask`` broadcast to ``values``).
    Metrics: ``value_clip_fraction`` -- fraction of valid positions where the clipped error is
    strictly larger (the clipped branch binds; 0 when ``clip`` is None).
    """
    _check_mask("value_loss", mask, values)
    err = (values - returns).square()
    count = _count(torch.broadcast_to(mask, values.shape).sum(), values)
    if clip is None:
        return LossSum(0.5 * masked_sum(err, mask), count, "tokens"), {"value_clip_fraction": 0.0}
    if clip < 0:
        raise ValueError(f"value_loss: clip must be >= 0 or None, got {clip}")
    # V itself where it lies within c of V_old: V_old + (V - V_old) can round away from V, and
    # then the clipped branch would "bind" by one ulp (a rounding-level clip fraction)
    step = values - old_values
    v_clip = torch.where(step.abs() > clip, old_values + step.clamp(-clip, clip), values)
    err_clip = (v_clip - returns).square()
    loss = LossSum(0.5 * masked_sum(torch.maximum(err, err_clip), mask), count, "tokens")
    with torch.no_grad():
        m = torch.broadcast_to(mask, values.shape)
        frac = float(masked_mean((err_clip > err).to(values.dtype), m))
    return loss, {"value_clip_fraction": frac}


def huber_value_loss(
    values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, delta: float = 1.0
) -> tuple[torch.Tensor, dict[str, float]]:
    """Huber value loss on one batch: :func:`huber_value_loss_sum` divided by its count."""
    part, metrics = huber_value_loss_sum(values, returns, mask, delta)
    return part.mean(), metrics


def huber_value_loss_sum(
    values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, delta: float = 1.0
) -> tuple[LossSum, dict[str, float]]:
    """Huber (smooth-L1) value loss, masked sum over ``tokens``.

    Shapes: ``values, returns [...]``, ``mask`` bool -> scalar. Per element, ``e = V - R``::

        h(e) = 0.5 e^2                    if |e| <= delta
             = delta (|e| - 0.5 delta)    otherwise

    (Huber 1964; used as the DQN/critic loss in Mnih et al. 2015.) Equals ``0.5 e^2`` for small
    errors, i.e. the unclipped :func:`value_loss`.
    Metrics: ``value_huber_linear_fraction`` -- fraction of valid positions with ``|e| > delta``.
    """
    if not delta > 0:
        raise ValueError(f"huber_value_loss: delta must be > 0, got {delta}")
    _check_mask("huber_value_loss", mask, values)
    per = F.huber_loss(values, returns, reduction="none", delta=delta)
    loss = LossSum(masked_sum(per, mask), _count(torch.broadcast_to(mask, values.shape).sum(), values), "tokens")
    with torch.no_grad():
        m = torch.broadcast_to(mask, values.shape)
        frac = float(masked_mean(((values - returns).abs() > delta).to(values.dtype), m))
    return loss, {"value_huber_linear_fraction": frac}


def entropy_from_logits(logits: torch.Tensor, *, chunk_size: int = 4096) -> torch.Tensor:
    """Entropy of ``softmax(logits)`` over the last dim.

    Shapes: ``logits [..., V]`` -> ``[...]`` (float32 for half-precision input).
    Formula: ``H = logsumexp(z) - sum_v p_v z_v`` with ``p = exp(z - logsumexp(z))``;
    ``-inf`` logits (masked vocabulary entries) contribute exactly 0 (``p_v z_v`` is taken
    as 0 where ``p_v == 0``), and a row that is entirely ``-inf`` gets entropy 0.
    Rows are processed ``chunk_size`` at a time so the ``[N, V]`` temporaries stay small, and a
    non-contiguous slice such as ``logits[:, :-1]`` is walked without copying it.
    """
    if chunk_size < 1:
        raise ValueError(f"entropy_from_logits: chunk_size must be >= 1, got {chunk_size}")
    lead = logits.shape[:-1]
    if logits.dim() > 2:
        try:
            flat = logits.view(-1, logits.shape[-1])
        except RuntimeError:  # e.g. logits[:, :-1]: walk dim 0 instead of copying everything
            parts = [entropy_from_logits(x, chunk_size=chunk_size) for x in logits.unbind(0)]
            return torch.stack(parts) if parts else logits.new_zeros(lead, dtype=torch.float32)
    else:
        flat = logits.reshape(-1, logits.shape[-1])

    def rows_entropy(z: torch.Tensor) -> torch.Tensor:
        if z.dtype not in (torch.float32, torch.float64):
            z = z.float()
        lse = torch.logsumexp(z, dim=-1, keepdim=True)
        finite_row = torch.isfinite(lse)
        safe_lse = torch.where(finite_row, lse, torch.zeros_like(lse))
        p = torch.exp(z - safe_lse)
        pz = torch.where(p > 0, p * z, torch.zeros_like(p))
        h = safe_lse.squeeze(-1) - pz.sum(-1)
        return torch.where(finite_row.squeeze(-1), h, torch.zeros_like(h))

    outs = [rows_entropy(c) for c in flat.split(chunk_size)]
    if not outs:
        return flat.new_zeros(lead, dtype=torch.float32)
    return torch.cat(outs).view(lead)


def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Bradley-Terry pairwise reward-model loss; returns the scalar loss tensor only.

    Shapes: ``chosen_rewards [N]``, ``rejected_rewards [N]``, ``margin`` scalar or ``[N]``.
    Formula: ``P(c > r) = sigmoid(r_c - r_r)``;
    ``loss = mean_i -log sigmoid(r_c,i - r_r,i - margin_i)`` computed with ``logsigmoid``
    (stable for large differences). Bradley & Terry 1952; Ouyang et al. 2022; the margin as in
    Llama 2 (Touvron et al. 2023).
    """
    if chosen_rewards.shape != rejected_rewards.shape:
        raise ValueError(
            f"bradley_terry_loss: chosen {tuple(chosen_rewards.shape)} and rejected "
            f"{tuple(rejected_rewards.shape)} shapes differ"
        )
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff).mean()


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Explained variance of the critic: ``1 - Var[R - V] / Var[R]`` over valid positions.

    Shapes: ``values, returns [...]``, ``mask`` bool or None (all valid) -> python float.
    Population variances. 1 = perfect, 0 = no better than the mean, < 0 = worse than the mean.
    Returns ``nan`` when ``Var[R] == 0`` or nothing is valid (undefined), as is customary.
    """
    with torch.no_grad():
        if mask is None:
            mask = torch.ones_like(values, dtype=torch.bool)
        _check_mask("explained_variance", mask, values)
        m = torch.broadcast_to(mask, values.shape)
        v = values.double()
        r = returns.double()
        if not bool(m.any()):
            return float("nan")

        def pvar(x: torch.Tensor) -> torch.Tensor:
            mu = masked_mean(x, m)
            return masked_mean((x - mu).square(), m)

        var_r = pvar(r)
        if float(var_r) == 0.0:
            return float("nan")
        return float(1.0 - pvar(r - v) / var_r)


# ------------------------------------------------------------ SFT and reward-model sums
# Each returns a LossSum (see the module docstring): the training loop divides the total by the
# count of its unit over the whole batch (all micro-batches, all data-parallel ranks), once.


def token_nll_sum(target_logp: torch.Tensor, mask: torch.Tensor) -> LossSum:
    """Next-token negative log-likelihood (pre-training, SFT), summed over ``tokens``.

    Shapes: ``target_logp [B, T]`` (log-prob of each target token), ``mask [B, T]`` bool
    (True = the token is a prediction target) -> ``LossSum`` with
    ``total = -sum_{i,t} m_it log p_it`` and ``count = sum_{i,t} m_it``. Masked positions count
    exactly 0 (``torch.where``), even where the log-prob there is ``-inf``.
    """
    _check_mask("token_nll_sum", mask, target_logp)
    m = torch.broadcast_to(mask, target_logp.shape)
    return LossSum(-masked_sum(target_logp, m), _count(m.sum(), target_logp), "tokens")


def bradley_terry_sum(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: torch.Tensor | float | None = None,
) -> LossSum:
    """Numerator and count of :func:`bradley_terry_loss`: ``total = sum_i -log sigmoid(r_c,i -
    r_r,i - margin_i)`` (``logsigmoid``, stable), ``count = N`` pairs (unit ``rows``: one row
    per pair). Shapes: ``chosen_rewards [N]``, ``rejected_rewards [N]``, ``margin`` scalar or
    ``[N]``. Bradley & Terry 1952; Ouyang et al. 2022; margin as in Llama 2 (Touvron et al. 2023).
    """
    if chosen_rewards.shape != rejected_rewards.shape:
        raise ValueError(
            f"bradley_terry_sum: chosen {tuple(chosen_rewards.shape)} and rejected "
            f"{tuple(rejected_rewards.shape)} shapes differ"
        )
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin
    n = torch.tensor(float(diff.numel()))
    return LossSum(-F.logsigmoid(diff).sum(), _count(n, diff), "rows")


def reward_centering_sum(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> LossSum:
    """The reward-centering penalty's numerator, ``total = sum_i (r_c,i + r_r,i)^2``, over
    ``N`` pairs (unit ``rows``); the loss adds ``coef * total / N`` (Eisenstein et al. 2023,
    "Helping or Herding?", arXiv 2312.09244). Shapes: ``[N]`` and ``[N]``."""
    if chosen_rewards.shape != rejected_rewards.shape:
        raise ValueError(
            f"reward_centering_sum: chosen {tuple(chosen_rewards.shape)} and rejected "
            f"{tuple(rejected_rewards.shape)} shapes differ"
        )
    both = chosen_rewards + rejected_rewards
    return LossSum(both.square().sum(), _count(torch.tensor(float(both.numel())), both), "rows")


# ------------------------------------------------------------ rankings of K responses
# A batch of N rankings: ``scores [N, K]`` (the reward model's score of each response),
# ``ranks [N, K]`` integers (1 = best; equal ranks = a tie; any increasing numbers work) and
# ``valid [N, K]`` bool (True = a real response; rankings of fewer than K are padded).
# Both losses are summed over rankings, unit ``rows`` (one row per ranking): every ranking
# weighs the same in the batch mean however many responses it holds (InstructGPT).


def _ranking_pair_masks(ranks: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``better[n, i, j]``: response i is ranked strictly above j; ``tied[n, i, j]``: i != j
    share a rank. Both ``[N, K, K]`` bool, False wherever i or j is padding."""
    if valid.dtype != torch.bool:
        raise ValueError(f"rankings: valid must be torch.bool (True = a real response), got {valid.dtype}")
    if ranks.shape != valid.shape or ranks.dim() != 2:
        raise ValueError(f"rankings: ranks {tuple(ranks.shape)} and valid {tuple(valid.shape)} must be the same [N, K]")
    both = valid[:, :, None] & valid[:, None, :]
    better = both & (ranks[:, :, None] < ranks[:, None, :])
    eye = torch.eye(ranks.shape[1], dtype=torch.bool, device=ranks.device)
    tied = both & (ranks[:, :, None] == ranks[:, None, :]) & ~eye
    return better, tied


def ranking_pair_count(ranks: torch.Tensor, valid: torch.Tensor, ties: str = "skip") -> torch.Tensor:
    """Comparisons each ranking contributes, ``[N]``: its strictly ordered pairs
    (``K(K-1)/2`` for a ranking of K without ties), plus each unordered tied pair when
    ``ties="half"``."""
    better, tied = _ranking_pair_masks(ranks, valid)
    count = better.sum(dim=(1, 2))
    if ties == "half":
        count = count + tied.sum(dim=(1, 2)) // 2
    return count


def ranking_pairwise_sum(scores: torch.Tensor, ranks: torch.Tensor, valid: torch.Tensor,
                         ties: str = "skip") -> LossSum:
    """Bradley-Terry over all pairs of each ranking, each ranking's pairs kept together as
    one batch element (Ouyang et al. 2022, arXiv 2203.02155, eq. 1: the ``K choose 2``
    comparisons of a prompt are one element, so one prompt's many pairs do not dominate and
    its scores are computed once)::

        loss_n = (1 / P_n) * [ sum_{i above j} -log sigmoid(s_i - s_j)
                               + sum_{i ~ j tied} (-log sigmoid(s_i - s_j) - log sigmoid(s_j - s_i)) / 2 ]

    ``total = sum_n loss_n`` over the rankings with ``P_n > 0``, ``count`` = those rankings
    (unit ``rows``). ``ties="skip"``: tied pairs are left out; ``ties="half"``: a tied pair
    is the cross-entropy with target probability 1/2 (margin 0: minimal at s_i = s_j) and
    counts as one comparison in ``P_n``. At K = 2 without ties this is
    :func:`bradley_terry_sum`. Shapes: ``scores, ranks, valid [N, K]``."""
    if ties not in ("skip", "half"):
        raise ValueError(f"ranking_pairwise_sum: ties must be 'skip' or 'half', got {ties!r}")
    if scores.shape != ranks.shape:
        raise ValueError(f"ranking_pairwise_sum: scores {tuple(scores.shape)} and ranks {tuple(ranks.shape)} differ")
    better, tied = _ranking_pair_masks(ranks, valid)
    diff = scores[:, :, None] - scores[:, None, :]  # [N, K, K]: s_i - s_j
    nll = -F.logsigmoid(diff)
    zero = torch.zeros((), dtype=nll.dtype, device=nll.device)
    per_ranking = torch.where(better, nll, zero).sum(dim=(1, 2))
    pairs = better.sum(dim=(1, 2)).to(nll.dtype)
    if ties == "half":  # every ordered tied pair (i, j) and (j, i) once, each at weight 1/2
        per_ranking = per_ranking + 0.5 * torch.where(tied, nll, zero).sum(dim=(1, 2))
        pairs = pairs + tied.sum(dim=(1, 2)).to(nll.dtype) / 2
    used = pairs > 0
    total = torch.where(used, per_ranking / pairs.clamp_min(1), zero).sum()
    return LossSum(total, _count(used.sum(), nll), "rows")


def plackett_luce_sum(scores: torch.Tensor, ranks: torch.Tensor, valid: torch.Tensor) -> LossSum:
    """Listwise Plackett-Luce negative log-likelihood of each ranking (Plackett 1975; Luce
    1959; as a ranking loss: ListMLE, Xia et al. 2008). For an order ``o_1 > ... > o_K``::

        -log P(o) = sum_{t=1..K} [ log sum_{u >= t} exp(s_{o_u}) - s_{o_t} ]

    written per response as ``sum_i [logsumexp_{j: rank_j >= rank_i} s_j - s_i]``, which is
    exactly the line above without ties, and for tied responses (equal ranks) Breslow's
    approximation: each member of a tied group is drawn from the same remaining set. At K = 2
    without a tie it is ``-log sigmoid(s_1 - s_2)``, the Bradley-Terry loss.
    ``total = sum_n -log P_n``, ``count = N`` rankings (unit ``rows``).
    Shapes: ``scores, ranks, valid [N, K]``."""
    if scores.shape != ranks.shape:
        raise ValueError(f"plackett_luce_sum: scores {tuple(scores.shape)} and ranks {tuple(ranks.shape)} differ")
    better, tied = _ranking_pair_masks(ranks, valid)
    eye = torch.eye(scores.shape[1], dtype=torch.bool, device=scores.device)
    # remaining[n, i, j]: j is still in the pool when i is drawn (j = i, below i, or tied with
    # it); j = i always, so no row is all -inf (a padded row's term is dropped below, and an
    # all -inf logsumexp would put NaN into the gradient even there)
    remaining = better | tied | eye
    pool = torch.where(remaining, scores[:, None, :].expand_as(remaining),
                       torch.full((), float("-inf"), dtype=scores.dtype, device=scores.device))
    lse = torch.logsumexp(pool, dim=2)  # [N, K], finite (padded scores must be finite)
    zero = torch.zeros((), dtype=scores.dtype, device=scores.device)
    terms = torch.where(valid, lse - scores, zero)
    return LossSum(terms.sum(), _count(torch.tensor(float(scores.shape[0])), scores), "rows")
