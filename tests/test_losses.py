"""Tests for trustrl.losses: hand-worked numbers, hypothesis properties, two implementations."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from trustrl.losses import (
    aggregate,
    bradley_terry_loss,
    entropy_from_logits,
    explained_variance,
    huber_value_loss,
    kl_penalty,
    masked_mean,
    masked_sum,
    policy_loss,
    sequence_policy_loss,
    value_loss,
)

FAST = settings(max_examples=40, deadline=None)
T_ = torch.tensor
ONE = torch.ones(1, 1, dtype=torch.bool)


# ----------------------------------------------------------------------------- masked helpers
def test_masked_sum_and_mean_ignore_padding_even_inf() -> None:
    x = T_([[1.0, 2.0, float("inf")], [4.0, float("nan"), 6.0]])
    m = T_([[True, True, False], [True, False, True]])
    # 1 + 2 + 4 + 6 = 13 over 4 valid entries -> 3.25
    assert masked_sum(x, m).item() == pytest.approx(13.0)
    assert masked_mean(x, m).item() == pytest.approx(3.25)
    # per row: (1+2)/2 = 1.5 ; (4+6)/2 = 5
    torch.testing.assert_close(masked_mean(x, m, dim=1), T_([1.5, 5.0]))
    # empty mask -> 0, not NaN
    assert masked_mean(x, torch.zeros_like(m)).item() == 0.0


def test_masked_helpers_reject_float_mask() -> None:
    with pytest.raises(ValueError, match="bool"):
        masked_mean(torch.ones(2), torch.ones(2))


# ----------------------------------------------------------------------------- aggregations
# 2x3 example:  values [[1, 2, 3], [4, 5, 6]], mask [[T, T, F], [T, T, T]]
VALS = T_([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
MASK = T_([[True, True, False], [True, True, True]])


def test_aggregate_token_mean_by_hand() -> None:
    # (1 + 2 + 4 + 5 + 6) / 5 = 18 / 5 = 3.6
    assert aggregate(VALS, MASK, "token_mean").item() == pytest.approx(3.6)


def test_aggregate_seq_mean_by_hand() -> None:
    # row means (1+2)/2 = 1.5 and (4+5+6)/3 = 5 -> (1.5 + 5)/2 = 3.25
    assert aggregate(VALS, MASK, "seq_mean").item() == pytest.approx(3.25)


def test_aggregate_seq_sum_constant_by_hand() -> None:
    # 18 / (B * T) = 18 / 6 = 3.0 ; with max_len 4: 18 / 8 = 2.25
    assert aggregate(VALS, MASK, "seq_sum_constant").item() == pytest.approx(3.0)
    assert aggregate(VALS, MASK, "seq_sum_constant", max_len=4).item() == pytest.approx(2.25)


def test_aggregate_seq_mean_skips_empty_sequences() -> None:
    m = T_([[True, True, False], [False, False, False]])
    # only row 0 counts: (1 + 2)/2 = 1.5
    assert aggregate(VALS, m, "seq_mean").item() == pytest.approx(1.5)


def test_aggregate_unknown_names_allowed_values() -> None:
    with pytest.raises(ValueError, match="token_mean.*seq_mean.*seq_sum_constant"):
        aggregate(VALS, MASK, "mean")


@pytest.mark.parametrize(
    "aggregation, expected", [("token_mean", 3.6), ("seq_mean", 3.25), ("seq_sum_constant", 3.0)]
)
def test_policy_loss_aggregations_on_2x3(aggregation: str, expected: float) -> None:
    # logp == old_logp -> r = 1 (inside the clip range) -> objective = A = VALS; loss = -agg
    logp = torch.zeros(2, 3)
    loss, metrics = policy_loss(logp, logp.clone(), VALS, MASK, aggregation=aggregation)
    assert loss.item() == pytest.approx(-expected)
    assert metrics["clip_fraction"] == 0.0
    assert metrics["ratio_mean"] == pytest.approx(1.0)
    assert metrics["approx_kl"] == pytest.approx(0.0)


# ----------------------------------------------------------------------------- PPO clip
def test_ppo_worked_example_positive_advantage_clipped() -> None:
    # old logp -2.1, new -1.8 -> r = e^0.3 = 1.34986; eps 0.2 -> clip 1.2
    # A = 0.2: unclipped 0.26997, clipped 0.24 -> objective min = 0.24 -> loss -0.24
    logp = T_([[-1.8]], requires_grad=True)
    loss, metrics = policy_loss(logp, T_([[-2.1]]), T_([0.2]), ONE, clip_low=0.2)
    assert loss.item() == pytest.approx(-0.24, abs=1e-6)
    assert metrics["clip_fraction"] == 1.0
    assert metrics["ratio_mean"] == pytest.approx(1.349859, abs=1e-5)
    assert metrics["ratio_max"] == pytest.approx(1.349859, abs=1e-5)
    # approx_kl = k3(old||new) = (r - 1) - log r = 0.349859 - 0.3 = 0.049859
    assert metrics["approx_kl"] == pytest.approx(0.049859, abs=1e-5)
    loss.backward()
    assert logp.grad is not None and logp.grad.item() == 0.0


def test_ppo_worked_example_negative_advantage_unclipped() -> None:
    # A = -0.2: r A = -0.269972, clip(r) A = -0.24 -> min = -0.269972 -> loss +0.269972
    # d loss / d logp = -(r A) = 0.269972 (token mean over 1 token)
    logp = T_([[-1.8]], requires_grad=True)
    loss, metrics = policy_loss(logp, T_([[-2.1]]), T_([-0.2]), ONE)
    assert loss.item() == pytest.approx(0.269972, abs=1e-5)
    assert metrics["clip_fraction"] == 0.0
    loss.backward()
    assert logp.grad is not None and logp.grad.item() == pytest.approx(0.269972, abs=1e-5)


def test_clip_higher_dapo() -> None:
    # r = e^0.2231 = 1.25, A = 1: symmetric eps 0.2 clips at 1.2 -> objective 1.2;
    # clip_high 0.28 -> bound 1.28 not reached -> objective 1.25
    lp = T_([[math.log(1.25)]])
    old = torch.zeros(1, 1)
    loss_sym, m_sym = policy_loss(lp, old, T_([1.0]), ONE, clip_low=0.2)
    loss_hi, m_hi = policy_loss(lp, old, T_([1.0]), ONE, clip_low=0.2, clip_high=0.28)
    assert loss_sym.item() == pytest.approx(-1.2)
    assert loss_hi.item() == pytest.approx(-1.25)
    assert (m_sym["clip_fraction"], m_hi["clip_fraction"]) == (1.0, 0.0)


@FAST
@given(
    log_r=st.lists(st.floats(-1.0, 1.0), min_size=1, max_size=8),
    adv=st.floats(-3.0, 3.0),
    eps_low=st.floats(0.05, 0.4),
    eps_high=st.floats(0.05, 0.4),
)
def test_policy_gradient_zero_exactly_in_clipped_region(
    log_r: list[float], adv: float, eps_low: float, eps_high: float
) -> None:
    assume(abs(adv) > 1e-3)
    n = len(log_r)
    lr = torch.tensor(log_r, dtype=torch.float64)
    r = lr.exp()
    # stay away from the kinks, where the subgradient is ambiguous
    assume(bool(((r - (1 + eps_high)).abs() > 1e-6).all() and ((r - (1 - eps_low)).abs() > 1e-6).all()))
    old = torch.randn(1, n, dtype=torch.float64)
    logp = (old + lr).detach().requires_grad_(True)
    mask = torch.ones(1, n, dtype=torch.bool)
    loss, metrics = policy_loss(logp, old, torch.tensor([adv], dtype=torch.float64), mask, eps_low, eps_high)
    loss.backward()
    assert logp.grad is not None
    clipped = ((adv > 0) & (r > 1 + eps_high)) | ((adv < 0) & (r < 1 - eps_low))
    g = logp.grad[0]
    assert bool((g[clipped] == 0).all())
    # elsewhere d(-r A / n)/d logp = -r A / n, nonzero
    torch.testing.assert_close(g[~clipped], -(r * adv / n)[~clipped])
    assert metrics["clip_fraction"] == pytest.approx(clipped.double().mean().item())


def test_policy_loss_padding_garbage_is_harmless() -> None:
    logp = T_([[-1.0, float("inf")], [-0.5, -0.7]], requires_grad=True)
    old = T_([[-1.1, -1e30], [-0.5, float("nan")]])
    mask = T_([[True, False], [True, False]])
    adv = T_([[1.0, float("nan")], [-1.0, float("inf")]])  # token-level, garbage in padding
    loss, metrics = policy_loss(logp, old, adv, mask)
    loss.backward()
    assert torch.isfinite(loss)
    assert logp.grad is not None and torch.isfinite(logp.grad).all()
    assert logp.grad[0, 1] == 0 and logp.grad[1, 1] == 0
    assert all(math.isfinite(v) for v in metrics.values())


def _policy_metrics_reference(logp, old, adv, mask, clip_low, clip_high):
    """The metrics as separate masked means (the pre-batched implementation)."""
    m = torch.broadcast_to(mask, logp.shape)
    a = torch.where(m, torch.broadcast_to(adv[:, None] if adv.dim() == 1 else adv, logp.shape), 0.0)
    lr = torch.where(m, logp - old, 0.0)
    r = lr.exp()
    binding = ((a > 0) & (r > 1 + clip_high)) | ((a < 0) & (r < 1 - clip_low))
    return {
        "clip_fraction": float(masked_mean(binding.to(logp.dtype), m)),
        "approx_kl": float(masked_mean(torch.expm1(lr) - lr, m)),
        "ratio_mean": float(masked_mean(r, m)),
        "ratio_max": float(r[m].max()) if bool(m.any()) else 1.0,
    }


@pytest.mark.parametrize("mask_kind", ["full", "partial", "broadcast_row", "empty", "zero_size"])
def test_policy_loss_metrics_match_separate_reductions(mask_kind: str) -> None:
    torch.manual_seed(0)
    b, t = (0, 5) if mask_kind == "zero_size" else (4, 5)
    old = torch.randn(b, t)
    logp = old + 0.3 * torch.randn(b, t)
    adv = torch.randn(b)
    mask = {
        "full": torch.ones(b, t, dtype=torch.bool),
        "partial": torch.rand(b, t) > 0.4,
        "broadcast_row": torch.tensor([[True, True, False, True, False]]),  # [1, T] broadcasts to [B, T]
        "empty": torch.zeros(b, t, dtype=torch.bool),
        "zero_size": torch.ones(b, t, dtype=torch.bool),
    }[mask_kind]
    _, metrics = policy_loss(logp, old, adv, mask, clip_low=0.1, clip_high=0.15)
    ref = _policy_metrics_reference(logp, old, adv, mask, 0.1, 0.15)
    assert metrics.keys() == ref.keys()
    for k in ref:
        assert isinstance(metrics[k], float)
        assert metrics[k] == pytest.approx(ref[k], rel=1e-6, abs=1e-7), k
    if mask_kind in ("empty", "zero_size"):
        assert metrics == {"clip_fraction": 0.0, "approx_kl": 0.0, "ratio_mean": 0.0, "ratio_max": 1.0}


def test_mask_shape_errors_keep_their_message() -> None:
    x = torch.zeros(2, 3)
    for bad in (torch.ones(3, 3, dtype=torch.bool), torch.ones(2, 2, dtype=torch.bool),
                torch.ones(4, dtype=torch.bool)):
        with pytest.raises(ValueError, match=r"masked_sum: mask shape .* does not broadcast to \(2, 3\)"):
            masked_sum(x, bad)
    # broadcastable masks (fast path and general path) are accepted
    for ok in (torch.ones(2, 3, dtype=torch.bool), torch.ones(1, 3, dtype=torch.bool),
               torch.ones(2, 1, dtype=torch.bool), torch.ones(3, dtype=torch.bool), torch.ones((), dtype=torch.bool)):
        assert float(masked_sum(x + 1.0, ok)) == 6.0


def test_policy_loss_token_level_advantages_shape_check() -> None:
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3), MASK)


# ----------------------------------------------------------------------------- GSPO
def test_gspo_by_hand() -> None:
    # seq 0: log-ratios [0.001, 0.0] -> mean 0.0005 -> s = 1.0005 > 1 + 4e-4 with A = +1
    #        -> clipped objective 1.0004 (gradient 0)
    # seq 1: log-ratio [1e-4] (2nd token padded) -> s = e^1e-4 = 1 + 1e-4 + 5e-9 = 1.000100005,
    #        A = -1, inside [0.9997, 1.0004] -> objective -1.000100005
    # J = (1.0004 - 1.000100005) / 2 = 1.49997500e-4 -> loss -1.499975e-4 ; clip fraction 1/2
    # d loss / d logp[1,0] = -(1/2) * A * s * (1/|o_1|) = 0.5 * 1.000100005 = 0.5000500025
    old = torch.zeros(2, 2, dtype=torch.float64)
    logp = T_([[0.001, 0.0], [1e-4, 123.0]], dtype=torch.float64, requires_grad=True)
    mask = T_([[True, True], [True, False]])
    loss, metrics = sequence_policy_loss(logp, old, T_([1.0, -1.0], dtype=torch.float64), mask)
    assert loss.item() == pytest.approx(-1.499975e-4, abs=1e-10)
    assert metrics["clip_fraction"] == 0.5
    loss.backward()
    assert logp.grad is not None
    assert logp.grad[0].abs().max().item() == 0.0
    assert logp.grad[1, 0].item() == pytest.approx(0.5000500025, abs=1e-9)
    assert logp.grad[1, 1].item() == 0.0


# ----------------------------------------------------------------------------- KL estimators
def test_kl_estimators_by_hand() -> None:
    # logp = 0, ref = -0.5: log rho = -0.5
    # k1 = 0.5 ; k2 = 0.5 * 0.25 = 0.125 ; k3 = e^-0.5 - 1 + 0.5 = 0.106531
    lp, ref = T_([0.0]), T_([-0.5])
    assert kl_penalty(lp, ref, "k1").item() == pytest.approx(0.5)
    assert kl_penalty(lp, ref, "k2").item() == pytest.approx(0.125)
    assert kl_penalty(lp, ref, "k3").item() == pytest.approx(0.1065307, abs=1e-6)


def test_kl_unknown_estimator() -> None:
    with pytest.raises(ValueError, match="k1.*k2.*k3"):
        kl_penalty(T_([0.0]), T_([0.0]), "k4")


@FAST
@given(
    lp=st.lists(st.floats(-20.0, 0.0), min_size=1, max_size=16),
    delta=st.lists(st.floats(-5.0, 5.0), min_size=16, max_size=16),
)
def test_kl_estimator_signs_and_zero(lp: list[float], delta: list[float]) -> None:
    logp = torch.tensor(lp, dtype=torch.float64)
    ref = logp + torch.tensor(delta[: len(lp)], dtype=torch.float64)
    assert bool((kl_penalty(logp, ref, "k2") >= 0).all())
    assert bool((kl_penalty(logp, ref, "k3") >= 0).all())
    for est in ("k1", "k2", "k3"):
        assert bool((kl_penalty(logp, logp.clone(), est) == 0).all())


@FAST
@given(
    a=st.lists(st.floats(-3.0, 3.0), min_size=2, max_size=6),
    b=st.lists(st.floats(-3.0, 3.0), min_size=6, max_size=6),
)
def test_k1_k3_exact_expectation_equals_kl(a: list[float], b: list[float]) -> None:
    # E_{x~p}[k(x)] over the whole support equals KL(p||q) = sum p log(p/q) for k1 and k3
    pl = torch.log_softmax(torch.tensor(a, dtype=torch.float64), 0)
    ql = torch.log_softmax(torch.tensor(b[: len(a)], dtype=torch.float64), 0)
    p = pl.exp()
    exact = sum(pi * math.log(pi / qi) for pi, qi in zip(p.tolist(), ql.exp().tolist()))
    for est in ("k1", "k3"):
        assert (p * kl_penalty(pl, ql, est)).sum().item() == pytest.approx(exact, abs=1e-9)


def test_k1_k3_unbiased_monte_carlo() -> None:
    # p = [0.5, 0.3, 0.2], q = [0.2, 0.3, 0.5]
    # KL(p||q) = 0.5 ln 2.5 + 0.3 ln 1 + 0.2 ln 0.4 = 0.3 ln 2.5 = 0.274887
    p = T_([0.5, 0.3, 0.2], dtype=torch.float64)
    q = T_([0.2, 0.3, 0.5], dtype=torch.float64)
    exact = 0.3 * math.log(2.5)
    gen = torch.Generator().manual_seed(0)
    x = torch.multinomial(p, 200_000, replacement=True, generator=gen)
    lp, lq = p.log()[x], q.log()[x]
    # std of k1 is ~0.72, of k3 ~0.4 -> standard errors <= 0.0016; tolerance 0.01
    assert kl_penalty(lp, lq, "k1").mean().item() == pytest.approx(exact, abs=0.01)
    assert kl_penalty(lp, lq, "k3").mean().item() == pytest.approx(exact, abs=0.01)
    # k2 is biased here: E = 0.5*(0.5*0.8396 + 0.2*0.8396) = 0.29386 (not 0.2749)
    assert kl_penalty(lp, lq, "k2").mean().item() == pytest.approx(0.29386, abs=0.01)


# ----------------------------------------------------------------------------- value losses
def test_value_loss_clipped_by_hand() -> None:
    # pos 0: V 1.0, V_old 0.5, R 2.0 -> (V-R)^2 = 1 ; V_clip = 0.5 + 0.2 = 0.7 -> 1.69 ; max 1.69
    # pos 1: V 2.0, V_old 2.0, R 1.0 -> 1 ; V_clip = 2.0 -> 1 ; max 1
    # loss = 0.5 * (1.69 + 1) / 2 = 0.6725 ; clipped branch strictly larger at 1 of 2
    v, vo, r = T_([[1.0, 2.0, 9.0]]), T_([[0.5, 2.0, 0.0]]), T_([[2.0, 1.0, 0.0]])
    m = T_([[True, True, False]])
    loss, metrics = value_loss(v, vo, r, m, clip=0.2)
    assert loss.item() == pytest.approx(0.6725)
    assert metrics["value_clip_fraction"] == 0.5
    # unclipped: 0.5 * (1 + 1)/2 = 0.5
    loss_nc, metrics_nc = value_loss(v, vo, r, m)
    assert loss_nc.item() == pytest.approx(0.5)
    assert metrics_nc["value_clip_fraction"] == 0.0


def test_value_clip_never_binds_inside_the_range() -> None:
    """Within c of V_old the clipped value is V itself: float32 V_old + (V - V_old) can land one
    ulp off V (it does for the pair below), which made the clipped branch "bind" and the clip
    fraction move with rounding (seen as 1 vs 2 data-parallel processes)."""
    from trustrl.losses import value_loss_sum

    old, v = torch.tensor([0.034105025231838226]), torch.tensor([0.004326691385358572])
    round_trip = old + (v - old)
    assert round_trip.item() != v.item()  # the rounding this test is about
    # returns 1e-3 on the side where the round trip is farther: (V - R)^2 = 1e-6 < (rt - R)^2
    r = v - torch.sign(round_trip - v) * 1e-3
    assert ((round_trip - r).square() > (v - r).square()).item()
    mask = torch.tensor([True])
    loss, metrics = value_loss_sum(v[None], old[None], r[None], mask[None], clip=1.0)
    assert metrics["value_clip_fraction"] == 0.0
    assert loss.total.item() == 0.5 * (v - r).square().item()  # the unclipped error, exactly

def test_huber_value_loss_by_hand() -> None:
    # errors 0.5 and 3, delta 1: 0.5*0.25 = 0.125 and 1*(3 - 0.5) = 2.5 -> mean 1.3125
    v, r = T_([0.5, 3.0, 100.0]), T_([0.0, 0.0, 0.0])
    loss, metrics = huber_value_loss(v, r, T_([True, True, False]))
    assert loss.item() == pytest.approx(1.3125)
    assert metrics["value_huber_linear_fraction"] == 0.5


# ----------------------------------------------------------------------------- entropy
def test_entropy_by_hand_and_stable() -> None:
    ninf = float("-inf")
    logits = T_([[0.0, 0.0, 0.0, 0.0], [5.0, 5.0, ninf, ninf], [1e4, 1e4, -1e4, ninf], [ninf] * 4], dtype=torch.float64)
    h = entropy_from_logits(logits)
    # uniform over 4 -> ln 4 = 1.386294 ; two equal finite of 4 -> ln 2 ; all -inf -> 0
    torch.testing.assert_close(h, T_([math.log(4), math.log(2), math.log(2), 0.0], dtype=torch.float64))


@FAST
@given(st.integers(1, 5), st.integers(2, 50), st.integers(1, 7), st.integers(0, 2**16))
def test_entropy_matches_definition(rows: int, vocab: int, chunk: int, seed: int) -> None:
    z = torch.randn(rows, 3, vocab, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 4
    ref = -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1)
    torch.testing.assert_close(entropy_from_logits(z, chunk_size=chunk), ref)


def test_entropy_on_noncontiguous_slice() -> None:
    z = torch.randn(2, 5, 7, dtype=torch.float64)
    ref = -(torch.softmax(z[:, :-1], -1) * torch.log_softmax(z[:, :-1], -1)).sum(-1)
    torch.testing.assert_close(entropy_from_logits(z[:, :-1], chunk_size=3), ref)


# ----------------------------------------------------------------------------- Bradley-Terry
def test_bradley_terry_by_hand() -> None:
    # -log sigmoid(1) = log(1 + e^-1) = 0.3132617 ; margin 1 -> -log sigmoid(0) = ln 2
    loss = bradley_terry_loss(T_([1.0]), T_([0.0]))
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0
    assert loss.item() == pytest.approx(0.3132617, abs=1e-6)
    assert bradley_terry_loss(T_([1.0]), T_([0.0]), margin=1.0).item() == pytest.approx(math.log(2))
    # mean over pairs: (0.3132617 + ln 2)/2
    two = bradley_terry_loss(T_([1.0, 0.0]), T_([0.0, 0.0]))
    assert two.item() == pytest.approx((0.3132617 + math.log(2)) / 2, abs=1e-6)


def test_bradley_terry_stable_for_large_gaps() -> None:
    c = T_([-1000.0], requires_grad=True)
    loss = bradley_terry_loss(c, T_([0.0]))
    loss.backward()
    # -log sigmoid(-1000) = 1000 (+ e^-1000); gradient -1
    assert loss.item() == pytest.approx(1000.0)
    assert c.grad is not None and c.grad.item() == pytest.approx(-1.0)


# ----------------------------------------------------------------------------- explained variance
def test_explained_variance_by_hand() -> None:
    r = T_([1.0, 2.0, 3.0, 4.0])
    allm = torch.ones(4, dtype=torch.bool)
    assert explained_variance(r.clone(), r, allm) == pytest.approx(1.0)
    assert explained_variance(torch.full((4,), 2.5), r, allm) == pytest.approx(0.0)
    # R - V = [0, 0, 0, 4]: mean 1, var (1+1+1+9)/4 = 3 ; Var R = 1.25 -> 1 - 3/1.25 = -1.4
    v = T_([1.0, 2.0, 3.0, 0.0])
    assert explained_variance(v, r, allm) == pytest.approx(-1.4)
    # masking the bad entry leaves a perfect fit
    assert explained_variance(v, r, T_([True, True, True, False])) == pytest.approx(1.0)
    assert math.isnan(explained_variance(r, torch.ones(4), allm))


# -- sums and counts: one normalization over the whole batch -----------------------------------


def test_unit_counts_by_hand():
    from trustrl.losses import unit_counts

    mask = torch.tensor([[True, True, False], [False, False, False], [True, False, False]])
    # tokens 3, sequences with a token 2, rows 3
    assert unit_counts(mask) == {"tokens": 3, "sequences": 2, "rows": 3}


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n_micro=st.integers(1, 5),
       aggregation=st.sampled_from(["token_mean", "seq_mean", "seq_sum_constant", "gspo"]))
def test_sums_split_into_micro_batches_equal_the_batch_loss(seed, n_micro, aggregation):
    """sum over micro-batches of total_k / count_k(batch) == the batch's mean loss: the
    invariant that makes 1 x N == N x 1 hold by construction (two computations: the
    public (loss, metrics) function on the whole batch vs. LossSums of the parts)."""
    from trustrl.loop.accumulate import BatchNormalizer
    from trustrl.losses import policy_loss, policy_loss_sum, sequence_policy_loss, sequence_policy_loss_sum

    g = torch.Generator().manual_seed(seed)
    B, T = 6, 5
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = logp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) < 0.7
    mask[0] = False  # an empty row
    parts = list(torch.arange(B).tensor_split(n_micro))
    if aggregation == "gspo":
        whole, _ = sequence_policy_loss(logp, old, adv, mask, clip_low=0.1, clip_high=0.1)
        terms = [sequence_policy_loss_sum(logp[r], old[r], adv[r], mask[r], clip_low=0.1, clip_high=0.1)[0] for r in parts]
    else:
        whole, _ = policy_loss(logp, old, adv, mask, aggregation=aggregation, max_len=T)
        terms = [policy_loss_sum(logp[r], old[r], adv[r], mask[r], aggregation=aggregation, max_len=T)[0] for r in parts]
    normalizer = BatchNormalizer([mask[r] for r in parts])
    split = sum(normalizer.loss([(1.0, t)]) for t in terms)
    torch.testing.assert_close(split, whole, rtol=1e-12, atol=1e-12)


def test_value_loss_sum_counts_tokens():
    from trustrl.losses import value_loss_sum

    # V = [1, 2], R = [0, 0], mask [T, F]: 0.5 * 1^2 = 0.5 over 1 token
    part, _ = value_loss_sum(torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 2.0]]), torch.zeros(1, 2),
                             torch.tensor([[True, False]]))
    assert part.unit == "tokens" and float(part.count) == 1.0 and float(part.total) == 0.5
