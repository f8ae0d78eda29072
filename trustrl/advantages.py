"""Advantage estimators and reward shaping: GRPO group baselines, GAE, whitening, DAPO overlong.

References
----------
* GRPO outcome supervision: Shao et al. 2024, "DeepSeekMath", arXiv 2402.03300, sec. 4.1.2.
* Dr. GRPO (no std scaling): Liu et al. 2025, arXiv 2503.20783.
* GAE: Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized
  Advantage Estimation", arXiv 1506.02438.
* Whitening: Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO".
* Soft overlong punishment: Yu et al. 2025, "DAPO", arXiv 2503.14476, eq. 13.
* RLOO: Ahmadian et al. 2024, "Back to Basics", arXiv 2402.14740.
* REINFORCE++-baseline: Hu et al. 2025, arXiv 2501.03262.
"""

from __future__ import annotations

import torch

from trustrl.losses import kl_penalty

__all__ = [
    "GROUP_SCALES",
    "group_advantages",
    "gae",
    "gae_time_major",
    "whiten",
    "soft_overlong_penalty",
    "apply_missing_eos_penalty",
    "token_rewards",
    "rloo_advantages",
    "reinforce_pp_baseline_advantages",
    "ADVANTAGE_ESTIMATORS",
    "outcome_advantages",
]

GROUP_SCALES: tuple[str, ...] = ("group", "batch", "none")


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-6
) -> torch.Tensor:
    """GRPO group-relative advantages (one scalar per completion).

    Shapes: ``rewards [N]`` where consecutive blocks of ``group_size`` completions share a
    prompt -> ``[N]``, same dtype (float).

    Formulas (``mu_g``, ``sigma_g`` = mean and *population* std of the group of ``r_i``)::

        "group": A_i = (r_i - mu_g) / (sigma_g + eps)        (GRPO, Shao et al. 2024)
        "batch": A_i = (r_i - mu_g) / (sigma_batch + eps)    (population std of all N rewards)
        "none":  A_i =  r_i - mu_g                           (Dr. GRPO, Liu et al. 2025)

    Example: ``[1.0, 0.8, 0.4, 0.2]`` -> mean 0.6, std sqrt(0.1) = 0.3162 ->
    ``[+1.265, +0.632, -0.632, -1.265]``. A group of equal rewards gives exact zeros.
    Raises ``ValueError`` if ``N % group_size != 0`` or ``scale`` is unknown.
    """
    fn = "group_advantages"
    if scale not in GROUP_SCALES:
        raise ValueError(f"{fn}: unknown scale {scale!r}; allowed: {GROUP_SCALES}")
    if rewards.dim() != 1:
        raise ValueError(f"{fn}: rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    if group_size < 1:
        raise ValueError(f"{fn}: group_size must be >= 1, got {group_size}")
    n = rewards.shape[0]
    if n % group_size != 0:
        raise ValueError(f"{fn}: number of rewards {n} is not a multiple of group_size {group_size}")
    r = rewards if rewards.dtype.is_floating_point else rewards.float()
    grouped = r.view(-1, group_size)
    centered = grouped - grouped.mean(dim=1, keepdim=True)
    if scale == "none":
        return centered.reshape(n)
    if scale == "group":
        std = grouped.std(dim=1, keepdim=True, correction=0)
    else:
        std = r.std(correction=0) if n > 0 else r.new_zeros(())
    return (centered / (std + eps)).reshape(n)


def gae_time_major(
    rewards: torch.Tensor,
    values: torch.Tensor,
    next_values: torch.Tensor,
    terminated: torch.Tensor,
    done: torch.Tensor,
    gamma: float = 0.99,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE(gamma, lambda) for vectorised environments, time-major.

    Shapes: all inputs ``[T, N]`` (``terminated``, ``done`` bool) -> ``(advantages, returns)``
    each ``[T, N]``.

    * ``next_values[t] = V(s_{t+1})`` of the true next observation (for a time-limit
      truncation the caller passes the value of the final observation, so we bootstrap);
    * ``terminated[t]``: the episode really ended -> next value counts 0;
    * ``done[t]`` (= terminated or truncated): the GAE recursion is cut after ``t``.

    Formula (Schulman et al. 2016, eq. 16 with episode boundaries)::

        delta_t = r_t + gamma * (1 - terminated_t) * V(s_{t+1}) - V(s_t)
        A_t     = delta_t + gamma * lam * (1 - done_t) * A_{t+1},      A_T = 0
        returns = A + V

    Python loop over T only (vectorised over N). Run under ``torch.no_grad()`` for targets.
    """
    fn = "gae_time_major"
    shape = rewards.shape
    for name, t in (("values", values), ("next_values", next_values), ("terminated", terminated), ("done", done)):
        if t.shape != shape:
            raise ValueError(f"{fn}: {name} shape {tuple(t.shape)} != rewards shape {tuple(shape)}")
    if terminated.dtype != torch.bool or done.dtype != torch.bool:
        raise ValueError(f"{fn}: terminated and done must be torch.bool")
    not_term = (~terminated).to(values.dtype)
    not_done = (~done).to(values.dtype)
    deltas = rewards + gamma * not_term * next_values - values
    # (gamma * lam) * not_done_t, hoisted out of the loop: the same products, element by element
    decay = gamma * lam * not_done
    carry = torch.zeros_like(deltas[0]) if shape[0] > 0 else deltas.new_zeros(shape[1:])
    out: list[torch.Tensor] = []
    for delta_t, decay_t in zip(reversed(deltas.unbind(0)), reversed(decay.unbind(0))):
        carry = delta_t + decay_t * carry
        out.append(carry)
    advantages = torch.stack(out[::-1]) if out else torch.zeros_like(deltas)
    return advantages, advantages + values


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE over right-padded LM completions (PPO-RLHF).

    Shapes: ``rewards, values [B, T]``, ``mask [B, T]`` bool (True = valid completion token,
    valid tokens form a prefix of each row) -> ``(advantages, returns)`` each ``[B, T]``.

    The value after the last valid token is 0 (the episode terminates at EOS/truncation)::

        delta_t = r_t + gamma * V_{t+1} - V_t,     V_{t+1} := 0 if t+1 is padding / past T
        A_t     = sum_l (gamma lam)^l delta_{t+l}
        returns = A + V

    Outputs are 0 where ``mask`` is False. Implemented on :func:`gae_time_major` (loop over T,
    vectorised over B). Schulman et al. 2016; Ziegler et al. 2019 (LM setting).
    """
    fn = "gae"
    if rewards.dim() != 2 or values.shape != rewards.shape or mask.shape != rewards.shape:
        raise ValueError(
            f"{fn}: rewards, values, mask must share shape [B, T]; got {tuple(rewards.shape)}, "
            f"{tuple(values.shape)}, {tuple(mask.shape)}"
        )
    if mask.dtype != torch.bool:
        raise ValueError(f"{fn}: mask must be torch.bool (True = valid token), got {mask.dtype}")
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    r = torch.where(mask, rewards, zero)
    v = torch.where(mask, values, zero)
    next_valid = torch.zeros_like(mask)
    next_valid[:, :-1] = mask[:, 1:]
    next_v = torch.where(next_valid, torch.roll(v, -1, dims=1), zero)
    end = ~next_valid  # no bootstrap and no recursion across the end of the valid prefix
    adv_tm, _ = gae_time_major(r.T, v.T, next_v.T, end.T, end.T, gamma, lam)
    advantages = torch.where(mask, adv_tm.T, zero)
    returns = torch.where(mask, advantages + v, zero)
    return advantages, returns


# -- per-token RLHF reward shaping (PPO, TRPO with GAE) --------------------------------------------


def apply_missing_eos_penalty(scores: torch.Tensor, truncated: torch.Tensor, penalty: float | None) -> torch.Tensor:
    """Replace the score of completions without EOS: ``[B]``, ``[B]`` bool -> ``[B]``."""
    if penalty is None:
        return scores
    return torch.where(truncated.to(scores.device), torch.full_like(scores, float(penalty)), scores)


def gae_over_positions(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`gae` over the positions where ``mask`` is True, which need not be a prefix: the
    masked positions of each row, in order, are the time steps (multi-turn episodes: the
    model's tokens, with the environment's tokens between turns skipped). Equal to
    :func:`gae` when every row's mask is a prefix.

    Shapes: ``rewards, values [B, T]``, ``mask [B, T]`` bool -> ``(advantages, returns)``, each
    ``[B, T]``, 0 where ``mask`` is False. With model positions ``p_1 < p_2 < ... < p_n``::

        delta_k = r_{p_k} + gamma * V_{p_{k+1}} - V_{p_k},   V_{p_{n+1}} := 0
        A_{p_k} = sum_l (gamma lam)^l delta_{k+l}

    so a reward on a later turn reaches earlier turns through gamma and lambda only, never
    through the number of environment tokens in between."""
    if mask.dtype != torch.bool or mask.shape != rewards.shape:
        raise ValueError("gae_over_positions: mask must be a torch.bool tensor shaped like rewards")
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)  # masked positions first, in order
    packed = [torch.gather(t, 1, order) for t in (rewards, values, mask)]
    adv_packed, ret_packed = gae(packed[0], packed[1], packed[2], gamma=gamma, lam=lam)
    advantages = torch.zeros_like(adv_packed).scatter(1, order, adv_packed)
    returns = torch.zeros_like(ret_packed).scatter(1, order, ret_packed)
    return advantages, returns


def token_rewards(
    scores: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor | None, mask: torch.Tensor, beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token RLHF reward (Ziegler et al. 2019, eq. 2; Stiennon et al. 2020)::

        kl_t = log pi(y_t) - log pi_ref(y_t)                   (k1, on valid tokens)
        r_t  = -beta * kl_t + [t is the last valid token] * score

    Shapes: ``scores [B]``, ``logp, ref_logp [B, T]``, ``mask [B, T]`` bool -> ``(rewards [B, T],
    kl [B, T])``, both 0 where the mask is False. ``ref_logp=None`` means no KL term.
    Summed over a completion: ``R = score - beta * KL(sequence)``."""
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    if ref_logp is None:
        kl = torch.zeros_like(logp)
    else:
        kl = torch.where(mask, kl_penalty(logp, ref_logp, "k1"), zero)
    rewards = -beta * kl
    has_tokens = mask.any(dim=1)
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = torch.where(mask, positions, torch.zeros_like(positions)).max(dim=1).values  # last valid token
    rows = torch.arange(mask.shape[0], device=mask.device)
    bonus = torch.zeros_like(rewards)
    bonus[rows, last] = torch.where(has_tokens, scores.to(rewards.dtype), zero)
    return rewards + bonus, kl


def whiten(
    x: torch.Tensor, mask: torch.Tensor | None = None, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """Whiten ``x`` with statistics over the valid elements.

    Shapes: ``x [...]``, ``mask`` bool broadcastable to ``x`` (or None = all) -> ``[...]``.
    Formula (population variance; Huang et al. 2024)::

        mu = mean(x[m]);  var = mean((x[m] - mu)^2)
        y  = (x - mu) / sqrt(var + eps);   if not shift_mean: y = y + mu

    Positions with ``mask`` False are returned as 0. An empty mask returns all zeros.
    """
    if mask is None:
        mu = x.mean()
        var = (x - mu).square().mean()
        y = (x - mu) * torch.rsqrt(var + eps)
        return y if shift_mean else y + mu
    if mask.dtype != torch.bool:
        raise ValueError(f"whiten: mask must be torch.bool, got {mask.dtype}")
    m = torch.broadcast_to(mask, x.shape)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    n = m.sum().clamp_min(1).to(x.dtype)
    mu = torch.where(m, x, zero).sum() / n
    var = torch.where(m, (x - mu).square(), zero).sum() / n
    y = (x - mu) * torch.rsqrt(var + eps)
    if not shift_mean:
        y = y + mu
    return torch.where(m, y, zero)


def soft_overlong_penalty(lengths: torch.Tensor, max_len: int, cache_len: int) -> torch.Tensor:
    """DAPO soft overlong punishment (Yu et al. 2025, eq. 13), added to the task reward.

    Shapes: ``lengths [N]`` int -> float32 ``[N]``. With ``L_exp = max_len - cache_len``::

        R(L) = 0                       if L <= L_exp
             = (L_exp - L) / cache_len if L_exp < L <= max_len     (linear from 0 to -1)
             = -1                      if L > max_len

    ``cache_len = 0`` degenerates to a hard step (0 up to ``max_len``, -1 beyond).
    """
    fn = "soft_overlong_penalty"
    if cache_len < 0 or cache_len > max_len:
        raise ValueError(f"{fn}: need 0 <= cache_len <= max_len, got cache_len={cache_len}, max_len={max_len}")
    lf = lengths.to(torch.float32)
    expected = float(max_len - cache_len)
    if cache_len > 0:
        inside = (expected - lf) / float(cache_len)
    else:
        inside = torch.zeros_like(lf)
    out = torch.where(lf <= expected, torch.zeros_like(lf), inside)
    return torch.where(lf > max_len, torch.full_like(lf, -1.0), out)


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE Leave-One-Out (Ahmadian et al. 2024, arXiv 2402.14740): each completion's
    baseline is the mean reward of the *other* completions of its prompt.

    Shapes: ``rewards [N]`` (consecutive groups of ``group_size`` >= 2) -> ``[N]`` float::

        A_i = r_i - (1 / (G - 1)) sum_{j != i} r_j = G / (G - 1) * (r_i - mean_g(r))

    Example: ``[1, 0, 0, 0]`` -> baselines ``[0, 1/3, 1/3, 1/3]`` -> ``[1, -1/3, -1/3, -1/3]``.
    """
    fn = "rloo_advantages"
    if rewards.dim() != 1:
        raise ValueError(f"{fn}: rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    if group_size < 2 or rewards.shape[0] % group_size:
        raise ValueError(f"{fn}: need group_size >= 2 dividing N={rewards.shape[0]}, got {group_size}")
    r = (rewards if rewards.dtype.is_floating_point else rewards.float()).view(-1, group_size)
    others = (r.sum(dim=1, keepdim=True) - r) / (group_size - 1)
    return (r - others).reshape(-1)


def reinforce_pp_baseline_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-8) -> torch.Tensor:
    """REINFORCE++-baseline (Hu et al. 2025, arXiv 2501.03262): subtract the group mean, then
    whiten over the whole batch (global statistics tame the variance of small groups).

    Shapes: ``rewards [N]`` -> ``[N]`` float::

        c_i = r_i - mean_g(r);   A_i = (c_i - mean(c)) / sqrt(var(c) + eps)   (population var)
    """
    centered = group_advantages(rewards, group_size, "none")
    return whiten(centered, eps=eps)


#: Outcome-level advantage estimators (one scalar per completion from its group's rewards),
#: selected by name in the GRPO config (``advantage_estimator``). GAE, which needs a critic
#: and per-token rewards, is :func:`gae`.
ADVANTAGE_ESTIMATORS = {
    "group_zscore": lambda r, g: group_advantages(r, g, "group"),   # GRPO
    "dr_grpo": lambda r, g: group_advantages(r, g, "none"),         # Dr. GRPO
    "batch_scale": lambda r, g: group_advantages(r, g, "batch"),    # group mean, batch std
    "rloo": rloo_advantages,
    "reinforce_pp_baseline": reinforce_pp_baseline_advantages,
}


def outcome_advantages(estimator: str, rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """``ADVANTAGE_ESTIMATORS[estimator](rewards [N], group_size) -> [N]``."""
    if estimator not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"outcome_advantages: unknown estimator {estimator!r}; allowed: {sorted(ADVANTAGE_ESTIMATORS)}")
    return ADVANTAGE_ESTIMATORS[estimator](rewards, group_size)
