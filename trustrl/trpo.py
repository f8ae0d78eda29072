"""Trust Region Policy Optimization machinery, shared by LM TRPO and classic-control TRPO.

Reference: Schulman et al. 2015, "Trust Region Policy Optimization", arXiv 1502.05477
(appendix C: conjugate gradient on the Fisher, step scaling, backtracking line search).

Problem: maximise the surrogate ``L(theta) = E[r A]`` subject to
``KL_bar(theta_old, theta) <= delta``. With ``g = grad L`` and ``F`` the Fisher (the Hessian of
the mean KL at ``theta_old``) the step is ``s = F^{-1} g`` (conjugate gradient, using only
Fisher-vector products from double backprop), scaled so ``0.5 s^T F s = delta``, then shrunk
by a backtracking line search that accepts only a real surrogate improvement within the
KL limit.

All ``params`` arguments accept any iterable of tensors (it is materialised to a list once);
for :func:`flat_grad`, :func:`fisher_vector_product` and :func:`trpo_update` they must be the
trainable tensors (``requires_grad=True``), e.g.
``[p for p in model.parameters() if p.requires_grad]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

__all__ = [
    "LineSearchResult",
    "TRPOResult",
    "conjugate_gradient",
    "flat_grad",
    "get_flat_params",
    "set_flat_params",
    "fisher_vector_product",
    "trust_region_step",
    "line_search",
    "trpo_update",
]

MatVec = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class LineSearchResult:
    """Outcome of :func:`line_search`.

    ``accepted``: a step was applied. ``steps``: number of step sizes tried (1 = the full step
    was accepted; ``max_backtracks`` when none was). ``kl`` and ``improvement``: mean KL to the
    old policy and surrogate gain of the *applied* update (both 0.0 when nothing was accepted,
    since the parameters were restored).
    """

    accepted: bool
    steps: int
    kl: float
    improvement: float


@dataclass
class TRPOResult(LineSearchResult):
    """:class:`LineSearchResult` plus diagnostics of the whole :func:`trpo_update`.

    ``grad_norm``: ``||g||``; ``step_norm``: ``||full step||`` before backtracking;
    ``expected_improve``: first-order predicted gain ``g . full_step``.
    """

    grad_norm: float = 0.0
    step_norm: float = 0.0
    expected_improve: float = 0.0


def _as_list(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    out = list(params)
    if not out:
        raise ValueError("trpo: params is empty")
    return out


def conjugate_gradient(
    matvec: MatVec, b: torch.Tensor, iters: int = 10, residual_tol: float = 1e-10
) -> torch.Tensor:
    """Approximately solve ``A x = b`` for symmetric positive-definite ``A`` given ``x -> A x``.

    Shapes: ``b [D]`` -> ``x [D]``. Starts at ``x = 0``; stops after ``iters`` iterations or once
    ``r^T r < residual_tol`` (squared residual norm). Hestenes & Stiefel 1952; used as in
    Schulman et al. 2015, appendix C. Runs under ``torch.no_grad`` for its own arithmetic.
    """
    x = torch.zeros_like(b)
    r = b.detach().clone()
    p = r.clone()
    rr = torch.dot(r, r)
    for _ in range(iters):
        if float(rr) < residual_tol:
            break
        ap = matvec(p).detach()
        with torch.no_grad():
            pap = torch.dot(p, ap)
            if float(pap) <= 0.0:
                break  # not positive definite along p (or p == 0): keep the current iterate
            alpha = rr / pap
            x = x + alpha * p
            r = r - alpha * ap
            rr_new = torch.dot(r, r)
            p = r + (rr_new / rr) * p
            rr = rr_new
    return x


def flat_grad(
    output: torch.Tensor,
    params: Iterable[torch.Tensor],
    retain_graph: bool = False,
    create_graph: bool = False,
) -> torch.Tensor:
    """Gradient of scalar ``output`` w.r.t. ``params``, concatenated into one ``[D]`` vector.

    Parameters the output does not depend on contribute zeros.
    """
    plist = _as_list(params)
    grads = torch.autograd.grad(
        output,
        plist,
        retain_graph=retain_graph or create_graph,
        create_graph=create_graph,
        allow_unused=True,
    )
    return torch.cat(
        [(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, plist)]
    )


def get_flat_params(params: Iterable[torch.Tensor]) -> torch.Tensor:
    """Detached copy of all parameters as one ``[D]`` vector."""
    return torch.cat([p.detach().reshape(-1) for p in _as_list(params)]).clone()


def set_flat_params(params: Iterable[torch.Tensor], flat: torch.Tensor) -> None:
    """Copy ``flat [D]`` back into ``params`` in place (no autograd history)."""
    plist = _as_list(params)
    total = sum(p.numel() for p in plist)
    if flat.numel() != total:
        raise ValueError(f"set_flat_params: flat has {flat.numel()} elements, params need {total}")
    offset = 0
    with torch.no_grad():
        for p in plist:
            n = p.numel()
            p.copy_(flat[offset : offset + n].view_as(p))
            offset += n


def fisher_vector_product(
    kl_fn: Callable[[], torch.Tensor], params: Iterable[torch.Tensor], damping: float = 0.1
) -> MatVec:
    """Return ``v -> F v + damping * v`` where ``F`` is the Hessian of the mean KL.

    ``kl_fn()`` must return the scalar mean ``KL(pi_old || pi_theta)`` with ``pi_old`` frozen
    (detached) and ``pi_theta`` built from ``params``. Double backprop (Pearlmutter 1994)::

        F v = grad_theta( grad_theta(KL) . v )

    ``kl_fn`` is evaluated once, at the parameters current when this function is called, and
    its graph is kept for all products (each product costs one backward pass, not a forward):
    do not change ``params`` while using the closure. Shapes: ``v [D] -> [D]``.
    """
    plist = _as_list(params)
    kl = kl_fn()
    grad_kl = flat_grad(kl, plist, create_graph=True)

    def matvec(v: torch.Tensor) -> torch.Tensor:
        gv = torch.dot(grad_kl, v.detach().to(grad_kl.dtype))
        if not gv.requires_grad:  # KL does not depend on params at second order
            return damping * v.detach()
        fv = flat_grad(gv, plist, retain_graph=True)
        return fv + damping * v.detach()

    return matvec


def trust_region_step(
    direction: torch.Tensor,
    fvp_direction_product_or_matvec: torch.Tensor | MatVec,
    max_kl: float,
) -> torch.Tensor:
    """Scale the search direction ``s`` so the quadratic KL model hits the trust-region edge.

    Second argument: either the product ``F s [D]`` or a matvec ``v -> F v``.
    Formula (Schulman et al. 2015, appendix C)::

        beta = sqrt(2 delta / (s^T F s));   step = beta s   =>   0.5 step^T F step = delta

    Returns zeros if ``s^T F s`` is not positive and finite (e.g. ``s = 0``).
    """
    fs = (
        fvp_direction_product_or_matvec(direction)
        if callable(fvp_direction_product_or_matvec)
        else fvp_direction_product_or_matvec
    )
    with torch.no_grad():
        shs = float(torch.dot(direction.detach(), fs.detach()))
        if not (shs > 0.0 and math.isfinite(shs)):
            return torch.zeros_like(direction)
        return direction.detach() * (2.0 * max_kl / shs) ** 0.5


def line_search(
    params: Iterable[torch.Tensor],
    full_step: torch.Tensor,
    surrogate_fn: Callable[[], torch.Tensor | float],
    kl_fn: Callable[[], torch.Tensor | float],
    max_kl: float,
    max_backtracks: int = 10,
    shrink: float = 0.5,
    expected_improve: float | None = None,
    accept_ratio: float = 0.1,
    surrogate_before: float | None = None,
) -> LineSearchResult:
    """Backtracking line search on ``theta_old + shrink^k * full_step``, ``k = 0..max_backtracks-1``.

    ``surrogate_fn()`` returns the surrogate objective to **maximise** (e.g. ``E[r A]``);
    ``kl_fn()`` the mean ``KL(pi_old || pi_theta)``; both are evaluated under ``no_grad``.
    A step is accepted only if the surrogate improves (``> 0``, finite), the KL is finite and
    ``<= max_kl``, and, when ``expected_improve`` (``g . full_step``) is given, the actual gain
    is at least ``accept_ratio`` of the first-order prediction ``shrink^k * expected_improve``
    (Schulman et al. 2015). If no step is accepted the parameters are restored bit for bit.
    ``surrogate_before``: the surrogate at the current parameters if already known (saves one
    evaluation); otherwise it is computed first.
    """
    plist = _as_list(params)
    if not 0.0 < shrink < 1.0:
        raise ValueError(f"line_search: shrink must be in (0, 1), got {shrink}")
    saved = [p.detach().clone() for p in plist]
    old_flat = torch.cat([s.reshape(-1) for s in saved])
    step = full_step.detach().to(old_flat.dtype)
    def restore() -> None:
        with torch.no_grad():
            for p, s in zip(plist, saved):
                p.copy_(s)

    try:
        with torch.no_grad():
            f0 = float(surrogate_fn()) if surrogate_before is None else float(surrogate_before)
            for k in range(max_backtracks):
                frac = shrink**k
                set_flat_params(plist, old_flat + frac * step)
                f = float(surrogate_fn())
                kl = float(kl_fn())
                improvement = f - f0
                ok = math.isfinite(improvement) and improvement > 0.0 and math.isfinite(kl) and kl <= max_kl
                if ok and expected_improve is not None and expected_improve > 0:
                    ok = improvement / (frac * expected_improve) >= accept_ratio
                if ok:
                    return LineSearchResult(True, k + 1, kl, improvement)
    except BaseException:
        restore()  # never leave a half-tried step in place
        raise
    restore()
    return LineSearchResult(False, max_backtracks, 0.0, 0.0)


def trpo_update(
    params: Iterable[torch.Tensor],
    surrogate_fn: Callable[[], torch.Tensor],
    kl_fn: Callable[[], torch.Tensor],
    max_kl: float = 0.01,
    damping: float = 0.1,
    cg_iters: int = 10,
    max_backtracks: int = 10,
    shrink: float = 0.5,
    accept_ratio: float = 0.1,
    residual_tol: float = 1e-10,
) -> TRPOResult:
    """One full TRPO policy update, in place on ``params``.

    ``surrogate_fn()``: differentiable scalar surrogate to maximise, e.g.
    ``mean(exp(logp - old_logp) * A)``; ``kl_fn()``: differentiable scalar mean
    ``KL(pi_old || pi_theta)`` with ``pi_old`` detached. Steps (Schulman et al. 2015)::

        g = grad L;  s = CG(F + damping I, g);  full = s sqrt(2 delta / s^T F s)
        line search on theta + shrink^k full   (surrogate must improve, KL <= delta)

    Returns a :class:`TRPOResult` (a :class:`LineSearchResult` with extra diagnostics).
    """
    plist = _as_list(params)
    frozen = [i for i, p in enumerate(plist) if not p.requires_grad]
    if frozen:
        raise ValueError(f"trpo_update: params {frozen[:5]} do not require grad; pass trainable tensors only")
    surrogate = surrogate_fn()
    g = flat_grad(surrogate, plist).detach()
    f0 = float(surrogate.detach())
    grad_norm = float(g.norm())
    if not (grad_norm > 0.0 and math.isfinite(grad_norm)):
        return TRPOResult(False, 0, 0.0, 0.0, grad_norm=grad_norm)
    fvp = fisher_vector_product(kl_fn, plist, damping)
    direction = conjugate_gradient(fvp, g, iters=cg_iters, residual_tol=residual_tol)
    full_step = trust_region_step(direction, fvp, max_kl)
    del fvp  # free the retained double-backward graph before the line search
    expected = float(torch.dot(g, full_step))
    ls = line_search(
        plist,
        full_step,
        surrogate_fn,
        kl_fn,
        max_kl,
        max_backtracks=max_backtracks,
        shrink=shrink,
        expected_improve=expected,
        accept_ratio=accept_ratio,
        surrogate_before=f0,
    )
    return TRPOResult(
        ls.accepted,
        ls.steps,
        ls.kl,
        ls.improvement,
        grad_norm=grad_norm,
        step_norm=float(full_step.norm()),
        expected_improve=expected,
    )
