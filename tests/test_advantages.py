"""Tests for trustrl.advantages: hand-worked numbers, loop references, hypothesis properties."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from trustrl.advantages import gae, gae_time_major, group_advantages, soft_overlong_penalty, whiten
from trustrl.losses import kl_penalty

FAST = settings(max_examples=40, deadline=None)
T_ = torch.tensor


# ----------------------------------------------------------------------------- GRPO groups
def test_group_advantages_worked_example() -> None:
    # [1.0, 0.8, 0.4, 0.2]: mean 0.6; deviations [0.4, 0.2, -0.2, -0.4];
    # population var (0.16 + 0.04 + 0.04 + 0.16)/4 = 0.1 -> std 0.316228
    # -> [0.4, 0.2, -0.2, -0.4] / 0.316228 = [1.264911, 0.632456, -0.632456, -1.264911]
    adv = group_advantages(T_([1.0, 0.8, 0.4, 0.2]), group_size=4)
    torch.testing.assert_close(adv, T_([1.264911, 0.632456, -0.632456, -1.264911]), atol=1e-5, rtol=0)


def test_group_advantages_batch_and_none_scales() -> None:
    # groups [1, 1] and [0.4, 0.2] (G = 2): group means 1 and 0.3 -> centred [0, 0, 0.1, -0.1]
    # batch mean 0.65, deviations [.35, .35, -.25, -.45], squares sum 0.51 -> var 0.1275,
    # std 0.357071 -> batch-scaled [0, 0, 0.280056, -0.280056]
    r = T_([1.0, 1.0, 0.4, 0.2])
    torch.testing.assert_close(group_advantages(r, 2, "none"), T_([0.0, 0.0, 0.1, -0.1]))
    torch.testing.assert_close(
        group_advantages(r, 2, "batch"), T_([0.0, 0.0, 0.280056, -0.280056]), atol=1e-5, rtol=0
    )
    # per-group scale: the equal group gives zeros, the other one +-1 (0.1 / 0.1)
    torch.testing.assert_close(group_advantages(r, 2, "group"), T_([0.0, 0.0, 1.0, -1.0]), atol=1e-4, rtol=0)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_equal_rewards_give_zero_not_nan(scale: str) -> None:
    adv = group_advantages(torch.full((8,), 0.7), 4, scale)
    assert bool((adv == 0).all())


def test_group_advantages_errors() -> None:
    with pytest.raises(ValueError, match="multiple"):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="group.*batch.*none"):
        group_advantages(torch.zeros(4), 4, "std")


@FAST
@given(
    st.integers(1, 6),
    st.integers(1, 6),
    st.sampled_from(["group", "batch", "none"]),
    st.integers(0, 2**16),
)
def test_each_group_sums_to_zero(n_groups: int, g: int, scale: str, seed: int) -> None:
    r = torch.rand(n_groups * g, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    adv = group_advantages(r, g, scale)
    assert adv.shape == r.shape and torch.isfinite(adv).all()
    torch.testing.assert_close(adv.view(n_groups, g).sum(1), torch.zeros(n_groups, dtype=torch.float64))


# ----------------------------------------------------------------------------- GAE (LM)
def test_gae_value_of_prefixes_2_plus_2_is_4() -> None:
    # "2+2 is 4": reward 0.8 at the last valid token, values 0, lambda 1, gamma 0.9
    # returns from the end: 0.8, 0.8*0.9 = 0.72, 0.8*0.81 = 0.648 ; padding -> 0
    rewards = T_([[0.0, 0.0, 0.8, 5.0]])
    mask = T_([[True, True, True, False]])
    adv, ret = gae(rewards, torch.zeros(1, 4), mask, gamma=0.9, lam=1.0)
    torch.testing.assert_close(ret, T_([[0.648, 0.72, 0.8, 0.0]]))
    torch.testing.assert_close(adv, ret)  # V = 0


def test_rlhf_reward_with_k1_penalty() -> None:
    # R_RM 0.8, KL (k1) = logp - ref = -1.00 - (-1.05) = 0.05, beta 6
    # per-token reward = 0.8 - 6 * 0.05 = 0.5 ; single-token episode, V = 0 -> return 0.5
    kl = kl_penalty(T_([[-1.0]]), T_([[-1.05]]), "k1")
    assert kl.item() == pytest.approx(0.05, abs=1e-6)
    reward = 0.8 - 6.0 * kl
    assert reward.item() == pytest.approx(0.5, abs=1e-5)
    _, ret = gae(reward, torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool), gamma=1.0, lam=0.95)
    assert ret.item() == pytest.approx(0.5, abs=1e-5)


def test_gae_by_hand_with_values() -> None:
    # T = 2 valid, gamma 1, lambda 0.5, r = [0, 1], V = [0.5, 0.25]
    # delta_1 = 1 + 0 - 0.25 = 0.75 ; delta_0 = 0 + 0.25 - 0.5 = -0.25
    # A_1 = 0.75 ; A_0 = -0.25 + 0.5 * 0.75 = 0.125 ; returns = A + V = [0.625, 1.0]
    adv, ret = gae(T_([[0.0, 1.0]]), T_([[0.5, 0.25]]), torch.ones(1, 2, dtype=torch.bool), 1.0, 0.5)
    torch.testing.assert_close(adv, T_([[0.125, 0.75]]))
    torch.testing.assert_close(ret, T_([[0.625, 1.0]]))


def _gae_reference(rewards: list[list[float]], values: list[list[float]], lengths: list[int], gamma: float, lam: float) -> list[list[float]]:
    """Plain double loop: A_t = sum_l (gamma lam)^l delta_{t+l} over the valid prefix."""
    out = []
    for r, v, n in zip(rewards, values, lengths):
        row = [0.0] * len(r)
        for t in range(n):
            total = 0.0
            for k in range(t, n):
                v_next = v[k + 1] if k + 1 < n else 0.0
                delta = r[k] + gamma * v_next - v[k]
                total += (gamma * lam) ** (k - t) * delta
            row[t] = total
        out.append(row)
    return out


@FAST
@given(
    st.integers(1, 4),
    st.integers(1, 7),
    st.floats(0.5, 1.0),
    st.floats(0.0, 1.0),
    st.integers(0, 2**16),
)
def test_gae_matches_double_loop_reference(b: int, t: int, gamma: float, lam: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    rewards = torch.randn(b, t, generator=gen, dtype=torch.float64)
    values = torch.randn(b, t, generator=gen, dtype=torch.float64)
    lengths = torch.randint(0, t + 1, (b,), generator=gen).tolist()
    mask = torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]
    adv, ret = gae(rewards, values, mask, gamma, lam)
    ref = torch.tensor(_gae_reference(rewards.tolist(), values.tolist(), lengths, gamma, lam), dtype=torch.float64)
    torch.testing.assert_close(adv, ref)
    torch.testing.assert_close(ret, torch.where(mask, ref + values, torch.zeros(())))
    assert bool((adv[~mask] == 0).all() and (ret[~mask] == 0).all())


# ----------------------------------------------------------------------------- GAE (time major)
def test_gae_time_major_truncation_vs_termination_by_hand() -> None:
    # T = 2, one env, gamma 0.5, lambda 1, r = [1, 1], V = [0.5, 0.5], next V = [0.5, 2.0]
    r, v, nv = T_([[1.0], [1.0]]), T_([[0.5], [0.5]]), T_([[0.5], [2.0]])
    f, t = False, True
    # truncated at t=1 (done, not terminated): bootstrap from V(final obs) = 2.0
    # delta_1 = 1 + 0.5*2 - 0.5 = 1.5 ; delta_0 = 1 + 0.5*0.5 - 0.5 = 0.75 ; A_0 = 0.75 + 0.5*1.5 = 1.5
    adv, ret = gae_time_major(r, v, nv, T_([[f], [f]]), T_([[f], [t]]), 0.5, 1.0)
    torch.testing.assert_close(adv, T_([[1.5], [1.5]]))
    torch.testing.assert_close(ret, T_([[2.0], [2.0]]))
    # terminated at t=1: delta_1 = 1 - 0.5 = 0.5 ; A_0 = 0.75 + 0.5*0.5 = 1.0
    adv, _ = gae_time_major(r, v, nv, T_([[f], [t]]), T_([[f], [t]]), 0.5, 1.0)
    torch.testing.assert_close(adv, T_([[1.0], [0.5]]))
    # terminated at t=0 (new episode starts at t=1): delta_0 = 1 - 0.5 = 0.5, no recursion;
    # t=1 is the rollout end (not done): bootstrap -> delta_1 = 1.5
    adv, _ = gae_time_major(r, v, nv, T_([[t], [f]]), T_([[t], [f]]), 0.5, 1.0)
    torch.testing.assert_close(adv, T_([[0.5], [1.5]]))


def _gae_tm_reference(r, v, nv, term, done, gamma, lam):  # type: ignore[no-untyped-def]
    """Double loop per env: sum (gamma lam)^l delta_{t+l}, stopping after a done step."""
    n_t, n_e = len(r), len(r[0])
    out = [[0.0] * n_e for _ in range(n_t)]
    for e in range(n_e):
        for t in range(n_t):
            total, coef = 0.0, 1.0
            for k in range(t, n_t):
                delta = r[k][e] + (0.0 if term[k][e] else gamma * nv[k][e]) - v[k][e]
                total += coef * delta
                if done[k][e]:
                    break
                coef *= gamma * lam
            out[t][e] = total
    return out


@FAST
@given(st.integers(1, 8), st.integers(1, 4), st.floats(0.5, 1.0), st.floats(0.0, 1.0), st.integers(0, 2**16))
def test_gae_time_major_matches_double_loop(n_t: int, n_e: int, gamma: float, lam: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    r = torch.randn(n_t, n_e, generator=gen, dtype=torch.float64)
    v = torch.randn(n_t, n_e, generator=gen, dtype=torch.float64)
    nv = torch.randn(n_t, n_e, generator=gen, dtype=torch.float64)
    term = torch.rand(n_t, n_e, generator=gen) < 0.2
    trunc = torch.rand(n_t, n_e, generator=gen) < 0.2
    done = term | trunc
    adv, ret = gae_time_major(r, v, nv, term, done, gamma, lam)
    ref = torch.tensor(
        _gae_tm_reference(r.tolist(), v.tolist(), nv.tolist(), term.tolist(), done.tolist(), gamma, lam),
        dtype=torch.float64,
    )
    torch.testing.assert_close(adv, ref)
    torch.testing.assert_close(ret, ref + v)


@FAST
@given(st.integers(1, 4), st.integers(1, 7), st.floats(0.5, 1.0), st.floats(0.0, 1.0), st.integers(0, 2**16))
def test_gae_lm_agrees_with_time_major(b: int, t: int, gamma: float, lam: float, seed: int) -> None:
    # Build the time-major inputs by hand (loops): next value = V[t+1] inside the completion,
    # 0 with termination at the last valid token.
    gen = torch.Generator().manual_seed(seed)
    rewards = torch.randn(b, t, generator=gen, dtype=torch.float64)
    values = torch.randn(b, t, generator=gen, dtype=torch.float64)
    lengths = torch.randint(1, t + 1, (b,), generator=gen).tolist()
    mask = torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]
    nv = torch.zeros(t, b, dtype=torch.float64)
    term = torch.zeros(t, b, dtype=torch.bool)
    for i, n in enumerate(lengths):
        for k in range(t):
            if k + 1 < n:
                nv[k, i] = values[i, k + 1]
            else:
                term[k, i] = True
    r_tm = torch.where(mask, rewards, torch.zeros(())).T
    v_tm = torch.where(mask, values, torch.zeros(())).T
    adv_tm, _ = gae_time_major(r_tm, v_tm, nv, term, term, gamma, lam)
    adv, _ = gae(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(adv, torch.where(mask, adv_tm.T, torch.zeros(())))


def test_gae_shape_errors() -> None:
    with pytest.raises(ValueError, match="gae"):
        gae(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3))  # float mask
    with pytest.raises(ValueError, match="values"):
        gae_time_major(torch.zeros(2, 3), torch.zeros(3, 2), torch.zeros(2, 3),
                       torch.zeros(2, 3, dtype=torch.bool), torch.zeros(2, 3, dtype=torch.bool))


# ----------------------------------------------------------------------------- whitening
def test_whiten_by_hand() -> None:
    # [0, 1, 2]: mean 1, population var 2/3 -> [-1, 0, 1] / 0.816497 = [-1.224745, 0, 1.224745]
    y = whiten(T_([0.0, 1.0, 2.0, 50.0]), T_([True, True, True, False]))
    torch.testing.assert_close(y, T_([-1.224745, 0.0, 1.224745, 0.0]), atol=1e-5, rtol=0)
    # shift_mean=False adds the mean (1) back: [-0.224745, 1, 2.224745]
    y2 = whiten(T_([0.0, 1.0, 2.0]), shift_mean=False)
    torch.testing.assert_close(y2, T_([-0.224745, 1.0, 2.224745]), atol=1e-5, rtol=0)


@FAST
@given(st.lists(st.floats(-100.0, 100.0), min_size=2, max_size=40), st.integers(0, 2**16))
def test_whitened_mean_zero_var_one(xs: list[float], seed: int) -> None:
    x = torch.tensor(xs, dtype=torch.float64)
    mask = torch.rand(len(xs), generator=torch.Generator().manual_seed(seed)) < 0.7
    assume(int(mask.sum()) >= 2)
    sel = x[mask]
    assume(float(sel.var(correction=0)) > 1e-3)
    y = whiten(x, mask)
    ys = y[mask]
    assert ys.mean().item() == pytest.approx(0.0, abs=1e-9)
    # var(y) = var / (var + eps) with eps = 1e-8: 1 up to the epsilon (1 - 1e-5 at var = 1e-3)
    v = float(sel.var(correction=0))
    assert ys.var(correction=0).item() == pytest.approx(v / (v + 1e-8), rel=1e-9)
    assert bool((y[~mask] == 0).all())
    y_keep = whiten(x, mask, shift_mean=False)[mask]
    assert y_keep.mean().item() == pytest.approx(sel.mean().item(), abs=1e-9)


# ----------------------------------------------------------------------------- DAPO overlong
def test_soft_overlong_penalty_by_hand() -> None:
    # max_len 16, cache 4 -> L_exp 12: L<=12 -> 0 ; 13 -> -1/4 ; 14 -> -2/4 ; 16 -> -1 ; 17 -> -1
    out = soft_overlong_penalty(T_([10, 12, 13, 14, 16, 17]), max_len=16, cache_len=4)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, T_([0.0, 0.0, -0.25, -0.5, -1.0, -1.0]))


def test_soft_overlong_penalty_errors_and_hard_step() -> None:
    with pytest.raises(ValueError, match="cache_len"):
        soft_overlong_penalty(T_([1]), max_len=4, cache_len=5)
    torch.testing.assert_close(soft_overlong_penalty(T_([4, 5]), 4, 0), T_([0.0, -1.0]))


@FAST
@given(st.integers(1, 64), st.integers(0, 64), st.lists(st.integers(0, 200), min_size=1, max_size=20))
def test_soft_overlong_range_and_monotone(max_len: int, cache: int, lengths: list[int]) -> None:
    assume(cache <= max_len)
    ls = sorted(lengths)
    out = soft_overlong_penalty(torch.tensor(ls), max_len, cache)
    assert bool(((out <= 0) & (out >= -1)).all())
    assert bool((out[1:] <= out[:-1] + 1e-7).all())
    assert not math.isnan(out.sum().item())


# -- RLOO and REINFORCE++-baseline (worked by hand) ---------------------------------------------


def test_rloo_leave_one_out_by_hand():
    from trustrl.advantages import outcome_advantages, rloo_advantages

    # group [1, 0, 0, 0]: baselines are the others' means [0, 1/3, 1/3, 1/3]
    # -> [1 - 0, 0 - 1/3, 0 - 1/3, 0 - 1/3]; group [2, 4]: [2 - 4, 4 - 2]
    r = torch.tensor([1.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(rloo_advantages(r, 4), torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3]))
    torch.testing.assert_close(rloo_advantages(torch.tensor([2.0, 4.0]), 2), torch.tensor([-2.0, 2.0]))
    # the G/(G-1) identity, on the references' group [1, .8, .4, .2]: 4/3 * (r - 0.6)
    g = torch.tensor([1.0, 0.8, 0.4, 0.2])
    torch.testing.assert_close(outcome_advantages("rloo", g, 4), torch.tensor([0.4, 0.2, -0.2, -0.4]) * 4 / 3)
    with pytest.raises(ValueError, match="group_size >= 2"):
        rloo_advantages(r, 1)


def test_reinforce_pp_baseline_by_hand():
    from trustrl.advantages import reinforce_pp_baseline_advantages

    # groups [1, 0] and [3, 3]: centred [0.5, -0.5, 0, 0]; batch mean 0, population var
    # (0.25 + 0.25) / 4 = 0.125 -> [0.5, -0.5, 0, 0] / sqrt(0.125 + 1e-8) = [1.41421, -1.41421, 0, 0]
    out = reinforce_pp_baseline_advantages(torch.tensor([1.0, 0.0, 3.0, 3.0]), 2)
    expected = torch.tensor([0.5, -0.5, 0.0, 0.0]) / math.sqrt(0.125 + 1e-8)
    torch.testing.assert_close(out, expected)


def test_outcome_estimators_registry_names():
    from trustrl.advantages import ADVANTAGE_ESTIMATORS, outcome_advantages

    assert set(ADVANTAGE_ESTIMATORS) == {"group_zscore", "dr_grpo", "batch_scale", "rloo", "reinforce_pp_baseline"}
    # group_zscore on the references' example: +-1.26, +-0.63
    a = outcome_advantages("group_zscore", torch.tensor([1.0, 0.8, 0.4, 0.2]), 4)
    torch.testing.assert_close(a, torch.tensor([1.2649, 0.6325, -0.6325, -1.2649]), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="allowed"):
        outcome_advantages("median", torch.zeros(4), 2)
