"""Tests for trustrl.trpo: CG vs linalg.solve, Fisher products vs closed form, step scaling and
line search worked by hand, exact (bitwise) parameter restoration."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trustrl.trpo import (
    LineSearchResult,
    conjugate_gradient,
    fisher_vector_product,
    flat_grad,
    get_flat_params,
    line_search,
    set_flat_params,
    trpo_update,
    trust_region_step,
)

FAST = settings(max_examples=30, deadline=None)
T_ = torch.tensor


@FAST
@given(st.integers(1, 12), st.integers(0, 2**16))
def test_conjugate_gradient_solves_random_spd(dim: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(dim, dim, generator=gen, dtype=torch.float64)
    a = m @ m.T + 0.5 * torch.eye(dim, dtype=torch.float64)  # SPD, condition number moderate
    b = torch.randn(dim, generator=gen, dtype=torch.float64)
    x = conjugate_gradient(lambda v: a @ v, b, iters=3 * dim, residual_tol=1e-24)
    torch.testing.assert_close(x, torch.linalg.solve(a, b), atol=1e-6, rtol=1e-6)


def test_conjugate_gradient_diagonal_by_hand() -> None:
    # A = diag(2, 4), b = [2, 2] -> x = [1, 0.5]; CG on 2-D is exact in 2 iterations
    a = torch.diag(T_([2.0, 4.0], dtype=torch.float64))
    x = conjugate_gradient(lambda v: a @ v, T_([2.0, 2.0], dtype=torch.float64), iters=2)
    torch.testing.assert_close(x, T_([1.0, 0.5], dtype=torch.float64))


def test_flat_params_round_trip_and_flat_grad() -> None:
    w = torch.arange(6.0).view(2, 3).requires_grad_(True)
    b = T_([7.0, 8.0], requires_grad=True)
    unused = torch.zeros(3, requires_grad=True)
    flat = get_flat_params([w, b])
    torch.testing.assert_close(flat, T_([0.0, 1, 2, 3, 4, 5, 7, 8]))
    set_flat_params([w, b], flat * 2)
    torch.testing.assert_close(w.detach(), 2 * torch.arange(6.0).view(2, 3))
    # d/dw sum(w^2) = 2w ; d/db sum(b) = 1 ; unused -> zeros
    out = (w**2).sum() + b.sum()
    g = flat_grad(out, (p for p in [w, b, unused]))
    torch.testing.assert_close(g, torch.cat([4 * torch.arange(6.0), torch.ones(2), torch.zeros(3)]))
    with pytest.raises(ValueError, match="elements"):
        set_flat_params([w, b], torch.zeros(3))


def _softmax_kl_fn(theta: torch.Tensor, old_logp: torch.Tensor):  # type: ignore[no-untyped-def]
    def kl() -> torch.Tensor:
        return (old_logp.exp() * (old_logp - torch.log_softmax(theta, -1))).sum()

    return kl


@FAST
@given(st.integers(2, 8), st.integers(0, 2**16))
def test_fisher_vector_product_matches_closed_form(k: int, seed: int) -> None:
    # KL(p_old || softmax(theta)) has Hessian diag(p) - p p^T (p = softmax(theta)); at theta_old
    # this is the Fisher of the categorical in logit coordinates.
    gen = torch.Generator().manual_seed(seed)
    theta = torch.randn(k, generator=gen, dtype=torch.float64).requires_grad_(True)
    old = torch.log_softmax(theta.detach(), -1)
    p = old.exp()
    fisher = torch.diag(p) - torch.outer(p, p)
    fvp = fisher_vector_product(_softmax_kl_fn(theta, old), [theta], damping=0.1)
    for _ in range(3):  # the closure is reusable
        v = torch.randn(k, generator=gen, dtype=torch.float64)
        torch.testing.assert_close(fvp(v), fisher @ v + 0.1 * v)


def test_trust_region_step_on_explicit_matrix() -> None:
    # F = diag(2, 8), s = [1, 1]: s^T F s = 10 ; delta 0.01 -> beta = sqrt(0.02/10) = 0.0447214
    # step = [0.0447214, 0.0447214] ; 0.5 step^T F step = 0.5 * 0.002 * 10 = 0.01
    f = torch.diag(T_([2.0, 8.0], dtype=torch.float64))
    s = T_([1.0, 1.0], dtype=torch.float64)
    for second in (f @ s, lambda v: f @ v):
        step = trust_region_step(s, second, 0.01)
        torch.testing.assert_close(step, torch.full((2,), math.sqrt(0.002), dtype=torch.float64))
        assert (0.5 * step @ f @ step).item() == pytest.approx(0.01)
    # zero direction -> zero step, no NaN
    assert bool((trust_region_step(torch.zeros(2), torch.zeros(2), 0.01) == 0).all())


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().view(torch.int32)


def test_line_search_restores_params_bitwise_when_surrogate_only_worsens() -> None:
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(3, 4, generator=gen) / 3).requires_grad_(True)
    b = (torch.randn(4, generator=gen) * 1e-7).requires_grad_(True)
    before = [_bits(w), _bits(b)]

    def surrogate() -> torch.Tensor:  # only gets worse away from 0 along +params
        return -(w.square().sum() + b.square().sum())

    full_step = get_flat_params([w, b]) * 0.37  # moves away from 0 -> surrogate decreases
    res = line_search([w, b], full_step, surrogate, lambda: torch.zeros(()), max_kl=0.01,
                      max_backtracks=7, shrink=0.6)
    assert res == LineSearchResult(accepted=False, steps=7, kl=0.0, improvement=0.0)
    assert torch.equal(_bits(w), before[0]) and torch.equal(_bits(b), before[1])


def test_line_search_rejects_kl_violations_and_restores() -> None:
    theta = T_([0.1, -0.2, 0.3]).requires_grad_(True)
    before = _bits(theta)
    # surrogate improves along the step, but KL is always too large
    res = line_search([theta], T_([1.0, 1.0, 1.0]), lambda: theta.sum(), lambda: T_(1.0), max_kl=0.01)
    assert not res.accepted and res.steps == 10
    assert torch.equal(_bits(theta), before)


def test_line_search_accepts_on_quadratic_by_hand() -> None:
    # surrogate f = -0.5 ||theta - [1, 1]||^2, KL = 0.5 ||theta||^2 from theta = 0, full step [1, 1]
    # k=0: KL 1 ; k=1: 0.25 ; k=2: 0.0625 ; k=3: 0.015625 ; k=4 (x 1/16): 0.00390625 <= 0.01 accept
    # theta = [0.0625, 0.0625] ; f = -(1 - 0.0625)^2 = -0.87890625 vs f0 = -1 -> improvement 0.12109375
    theta = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    target = torch.ones(2, dtype=torch.float64)
    res = line_search(
        [theta],
        torch.ones(2, dtype=torch.float64),
        lambda: -0.5 * (theta - target).square().sum(),
        lambda: 0.5 * theta.square().sum(),
        max_kl=0.01,
    )
    assert res.accepted and res.steps == 5
    assert res.kl == pytest.approx(0.00390625)
    assert res.improvement == pytest.approx(0.12109375)
    torch.testing.assert_close(theta.detach(), torch.full((2,), 0.0625, dtype=torch.float64))


def test_trpo_update_on_quadratic_by_hand() -> None:
    # f = -0.5 ||theta - [1, 1]||^2 -> g = [1, 1] at 0 ; KL = 0.5 ||theta - theta_old||^2 -> F = I
    # damped F = 1.1 I -> s = g / 1.1 ; scale so 0.5 * 1.1 ||step||^2 = 0.01 -> ||step||^2 = 0.02/1.1
    # step = [1,1]/sqrt2 * sqrt(0.0181818) = 0.0953463 each ; KL = 0.5 * 0.0181818 = 0.00909091
    theta = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    old = theta.detach().clone()
    target = torch.ones(2, dtype=torch.float64)
    res = trpo_update(
        [theta],
        lambda: -0.5 * (theta - target).square().sum(),
        lambda: 0.5 * (theta - old).square().sum(),
        max_kl=0.01,
        damping=0.1,
    )
    assert res.accepted and res.steps == 1
    torch.testing.assert_close(theta.detach(), torch.full((2,), 0.0953463, dtype=torch.float64), atol=1e-6, rtol=0)
    assert res.kl == pytest.approx(0.00909091, abs=1e-7)
    assert res.grad_norm == pytest.approx(math.sqrt(2))
    # expected improvement g . step = 2 * 0.0953463 = 0.1906925
    assert res.expected_improve == pytest.approx(0.1906925, abs=1e-6)


def test_trpo_update_on_softmax_bandit_respects_trust_region() -> None:
    gen = torch.Generator().manual_seed(1)
    theta = torch.randn(6, generator=gen, dtype=torch.float64).requires_grad_(True)
    old = torch.log_softmax(theta.detach(), -1)
    adv = torch.randn(6, generator=gen, dtype=torch.float64)

    def surrogate() -> torch.Tensor:  # E_{a~old}[ratio * A]
        return (old.exp() * torch.exp(torch.log_softmax(theta, -1) - old) * adv).sum()

    kl = _softmax_kl_fn(theta, old)
    s0 = surrogate().item()
    res = trpo_update([theta], surrogate, kl, max_kl=0.01)
    assert res.accepted
    assert 0.0 < kl().item() <= 0.01
    assert surrogate().item() - s0 == pytest.approx(res.improvement)
    assert res.improvement > 0


def test_trpo_update_with_zero_gradient_does_nothing() -> None:
    theta = T_([0.3, -0.1], requires_grad=True)
    before = _bits(theta)
    old = torch.log_softmax(theta.detach(), -1)
    res = trpo_update([theta], lambda: (theta * 0).sum(), _softmax_kl_fn(theta, old))
    assert not res.accepted and res.steps == 0
    assert torch.equal(_bits(theta), before)


def test_trpo_update_rejects_frozen_params() -> None:
    theta = T_([0.3, -0.1], requires_grad=True)
    frozen = T_([1.0])
    with pytest.raises(ValueError, match="require grad"):
        trpo_update([theta, frozen], lambda: theta.sum(), lambda: theta.square().sum())
