"""Per-token log-probabilities of chosen tokens, without materialising a full log-softmax.

Every policy-gradient method in trustrl needs ``log pi(y_t | x, y_<t)`` for the sampled tokens
only. The textbook route ``log_softmax(hidden @ W^T).gather(ids)`` builds (and, under autograd,
keeps) several ``[B, T, V]`` tensors; with a 32k-152k vocabulary that dominates peak memory.

* :func:`selective_log_softmax` -- logits already exist: ``logit[y] - logsumexp(logits)``,
  processed row-chunk by row-chunk so that no extra ``[N, V]`` temporary is created.
* :func:`chunked_token_logprobs` -- logits do not exist yet: a custom autograd function fuses
  the LM head, the log-softmax and the gather, processing ``chunk_size`` rows at a time in
  forward *and* backward (recomputing the chunk's logits), so peak extra memory is
  ``O(chunk_size * V)`` instead of ``O(B * T * V)``.
* :func:`naive_token_logprobs` -- the reference implementation, for tests and benchmarks.

Temperature: as in sampling, logits are divided by ``temperature`` before the softmax
(Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO", detail on temperature).

Final-logit transform: some models do more than ``hidden @ W^T`` in their forward -- Gemma 2/3
soft-cap the logits (``z <- c tanh(z / c)``, Gemma Team 2024, arXiv 2408.00118, sec. 2),
Cohere multiplies them by ``logit_scale``, Granite divides them by ``logits_scaling``. A
:class:`LogitTransform` describes that step; every function here applies it to the logits
before the temperature, so the log-probs are those of the distribution the model samples from.

Log-softmax identity used throughout::

    log p(y) = z_y - logsumexp_v z_v,        d log p(y) / d z_v = 1[v = y] - softmax(z)_v.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

__all__ = [
    "LogitTransform",
    "IDENTITY",
    "apply_logit_transform",
    "selective_log_softmax",
    "chunked_token_logprobs",
    "naive_token_logprobs",
]

_FULL_PRECISION = (torch.float32, torch.float64)


@dataclass(frozen=True)
class LogitTransform:
    """What a causal LM's forward does to the LM-head output ``u = h W^T + b`` before it
    returns logits: ``z = c tanh(s u / c)`` when ``softcap = c`` is set, else ``z = s u``.

    ``scale`` (``s``): Cohere's ``logit_scale``, or ``1 / logits_scaling`` for Granite.
    ``softcap`` (``c`` > 0, or None): Gemma 2/3's ``final_logit_softcapping``.
    ``source``: the config attribute(s) it was read from (for messages; not part of the math).

    Derivatives (used by the chunked backward)::

        dz/du = s                        (no soft-cap)
        dz/du = s (1 - tanh^2(s u / c))  (soft-cap; d/dx c tanh(x / c) = 1 - tanh^2(x / c))
    """

    scale: float = 1.0
    softcap: float | None = None
    source: str = ""

    def __post_init__(self) -> None:
        if not (self.scale > 0 and self.scale < float("inf")):
            raise ValueError(f"LogitTransform: scale must be finite and > 0, got {self.scale} ({self.source})")
        if self.softcap is not None and not (self.softcap > 0 and self.softcap < float("inf")):
            raise ValueError(f"LogitTransform: softcap must be None or finite and > 0, got {self.softcap} ({self.source})")

    @property
    def is_identity(self) -> bool:
        return self.scale == 1.0 and self.softcap is None


#: ``z = u``: the plain ``hidden @ W^T (+ b)`` of most causal LMs.
IDENTITY = LogitTransform()


def apply_logit_transform(logits: torch.Tensor, transform: LogitTransform | None) -> torch.Tensor:
    """``z = c tanh(s u / c)`` (or ``s u``) elementwise, out of place, with plain torch ops (so
    differentiable any number of times). Shapes: ``[..., V] -> [..., V]``. The soft-cap is
    evaluated as ``tanh(x / c) * c``, the order of transformers' Gemma forward."""
    if transform is None or transform.is_identity:
        return logits
    z = logits * transform.scale if transform.scale != 1.0 else logits
    if transform.softcap is not None:
        z = torch.tanh(z / transform.softcap) * transform.softcap
    return z


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else (float32, bf16, fp16) computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_ids(fn: str, lead_shape: torch.Size, token_ids: torch.Tensor) -> None:
    if tuple(token_ids.shape) != tuple(lead_shape):
        raise ValueError(
            f"{fn}: token_ids shape {tuple(token_ids.shape)} must equal the leading shape "
            f"{tuple(lead_shape)} of the scores"
        )
    if token_ids.dtype.is_floating_point or token_ids.dtype == torch.bool:
        raise ValueError(f"{fn}: token_ids must be an integer tensor, got {token_ids.dtype}")


def _rows_apply(
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    logits: torch.Tensor,
    ids: torch.Tensor,
    chunk_size: int,
) -> torch.Tensor:
    """Apply ``fn(rows [C, V], ids [C]) -> [C]`` over all rows, never copying ``logits``.

    ``logits[..., V]`` is viewed as ``[N, V]`` when its strides allow it; otherwise (e.g. a
    ``logits[:, :-1]`` slice) it is walked along dim 0, recursively, so no full-size copy is
    ever made by ``reshape``.
    """
    if logits.dim() == 2:
        outs = [fn(c, i) for c, i in zip(logits.split(chunk_size), ids.split(chunk_size))]
        return torch.cat(outs) if outs else logits.new_zeros(0, dtype=torch.float32)
    try:
        flat = logits.view(-1, logits.shape[-1])
    except RuntimeError:
        parts = [_rows_apply(fn, lg, ii, chunk_size) for lg, ii in zip(logits.unbind(0), ids.unbind(0))]
        return torch.stack(parts) if parts else logits.new_zeros(ids.shape, dtype=torch.float32)
    return _rows_apply(fn, flat, ids.reshape(-1), chunk_size).view(ids.shape)


def selective_log_softmax(
    logits: torch.Tensor, token_ids: torch.Tensor, *, chunk_size: int = 1024
) -> torch.Tensor:
    """Log-probability of the chosen tokens, ``log_softmax(logits)[..., token_ids]``.

    Shapes: ``logits [..., V]``, ``token_ids [...]`` (int) -> ``[...]``.

    Formula: ``log p(y) = z_y - logsumexp(z)``. For float32/float64 logits the chosen logit is
    gathered and the logsumexp is taken ``chunk_size`` rows at a time (the only ``[C, V]``
    temporaries are inside one chunk; autograd keeps views of ``logits`` only). For
    bfloat16/float16 logits, subtracting two large low-precision numbers loses the answer,
    so each row chunk is upcast to float32 and log-softmaxed in float32 (loop-safe path).

    Returns the logits' dtype for float32/float64 input and **float32** for half-precision
    input (log-ratios ``exp(logp - old_logp)`` are meaningless at bf16 resolution).
    Differentiable w.r.t. ``logits``. Callers divide by the sampling temperature first.
    """
    _check_ids("selective_log_softmax", logits.shape[:-1], token_ids)
    if chunk_size < 1:
        raise ValueError(f"selective_log_softmax: chunk_size must be >= 1, got {chunk_size}")
    if logits.dim() == 1:
        return selective_log_softmax(logits[None], token_ids[None], chunk_size=chunk_size)[0]
    ids = token_ids.long()

    if logits.dtype in _FULL_PRECISION:

        def fn(rows: torch.Tensor, ii: torch.Tensor) -> torch.Tensor:
            return rows.gather(-1, ii[:, None]).squeeze(-1) - torch.logsumexp(rows, dim=-1)

    else:

        def fn(rows: torch.Tensor, ii: torch.Tensor) -> torch.Tensor:
            return torch.log_softmax(rows.float(), dim=-1).gather(-1, ii[:, None]).squeeze(-1)

    return _rows_apply(fn, logits, ids, chunk_size)


def naive_token_logprobs(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    token_ids: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    transform: LogitTransform | None = None,
) -> torch.Tensor:
    """Reference: full logits, float32 ``log_softmax``, gather. Memory ``O(B * T * V)``.

    Shapes: ``hidden [B, T, H]`` or ``[N, H]``, ``lm_head_weight [V, H]``, ``bias [V]``,
    ``token_ids [B, T]`` or ``[N]`` -> ``[B, T]`` or ``[N]``, float32 (float64 for float64
    weights).
    Formula: ``log_softmax(f(hidden @ W^T + b) / temperature)[..., token_ids]``, ``f`` the
    ``transform`` (:func:`apply_logit_transform`, in the accumulation dtype).
    """
    _check_ids("naive_token_logprobs", hidden.shape[:-1], token_ids)
    logits = F.linear(hidden, lm_head_weight, bias)
    logits = apply_logit_transform(logits.to(_acc_dtype(logits.dtype)), transform) / temperature
    return torch.log_softmax(logits, dim=-1).gather(-1, token_ids.long().unsqueeze(-1)).squeeze(-1)


def _chunk_logits(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    alpha: float,
    out: torch.Tensor,
    shift: torch.Tensor | None = None,
) -> torch.Tensor:
    """Write ``alpha (h W^T + b) - shift[:, None]`` for one row chunk into ``out`` (``alpha`` is
    ``s / T`` without soft-cap, ``s`` before a soft-cap).

    ``out`` is a reused workspace (``[rows, V]``, the accumulation dtype): allocating a fresh
    ``[chunk, V]`` block per chunk costs page faults comparable to the matmul itself on a
    CPU. When the weight is in ``out``'s dtype, the scale and the shift ride on one ``addmm``
    (``beta * input + alpha * h W^T``), so no extra pass over the block is made."""
    h = h.to(weight.dtype)
    if weight.dtype == out.dtype:
        if bias is None and shift is not None:
            return torch.addmm(shift[:, None].to(out.dtype), h, weight.t(), beta=-1.0, alpha=alpha, out=out)
        if bias is None:
            torch.mm(h, weight.t(), out=out)
        else:
            torch.addmm(bias, h, weight.t(), out=out)
    else:
        out.copy_(F.linear(h, weight, bias))
    if alpha != 1.0:
        out.mul_(alpha)
    if shift is not None:
        out.sub_(shift[:, None])
    return out


#: On a CPU, a [rows, V] float32 block of about this size keeps the elementwise passes
#: (max, shift, exp, sum) in cache while the LM-head matmul stays efficient: measured on a
#: 2-core Xeon with V = 32k, 128-256-row blocks ran the fused loop 10-15% faster than 1024
#: rows, whose elementwise passes cost 3x more. GPUs take the caller's chunk_size as is.
_CPU_BLOCK_BYTES = 32 * 2**20


def _block_rows(chunk_size: int, vocab: int, device: torch.device) -> int:
    """Rows per block: ``chunk_size``, capped on CPU so a float32 block is ~32 MiB (>= 32 rows)."""
    if device.type != "cpu":
        return chunk_size
    return min(chunk_size, max(32, _CPU_BLOCK_BYTES // (4 * vocab)))


class _ChunkedLMHeadLogProbs(torch.autograd.Function):
    """Fused ``linear -> transform -> /temperature -> log_softmax -> gather``, chunked over rows.

    Forward saves only ``hidden [N, H]``, ``weight [V, H]``, ``bias [V]``, ``ids [N]`` and the
    per-row ``logsumexp [N]``; backward recomputes each chunk's logits and forms, with
    ``u = h W^T + b``, ``z = f(u) / T`` (``f`` the :class:`LogitTransform`) and ``g`` the
    incoming grad of log p::

        dL/du = g (onehot(y) - softmax(z)) f'(u) / T,   f'(u) = s  or  s (1 - tanh^2(s u / c)),

    then ``dL/dh = dL/du @ W``, ``dL/dW += dL/du^T @ h``, ``dL/db += sum_rows dL/du``.
    One ``[chunk, V]`` workspace is allocated per call (two with entropy or a soft-cap) and
    reused by every chunk; all elementwise work on it is in place.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        ids: torch.Tensor,
        temperature: float,
        chunk_size: int,
        return_entropy: bool,
        scale: float,
        softcap: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = hidden.shape[0]
        odt = _acc_dtype(weight.dtype)
        dev = hidden.device
        logp = torch.empty(n, dtype=odt, device=dev)
        lse = torch.empty(n, dtype=odt, device=dev)
        entropy = torch.empty(n if return_entropy else 0, dtype=odt, device=dev)
        chunk_size = _block_rows(chunk_size, weight.shape[0], dev)
        rows_max = min(chunk_size, n)
        z_buf = torch.empty((rows_max, weight.shape[0]), dtype=odt, device=dev)
        e_buf = torch.empty_like(z_buf) if return_entropy else None
        for start in range(0, n, chunk_size):
            sl = slice(start, min(start + chunk_size, n))
            rows = sl.stop - sl.start
            if softcap:
                # z = c tanh(s u / c) / T, in place (tanh(x / c) * c: transformers' Gemma order)
                z = _chunk_logits(hidden[sl], weight, bias, scale, out=z_buf[:rows])
                z.div_(softcap).tanh_().mul_(softcap / temperature)
            else:
                z = _chunk_logits(hidden[sl], weight, bias, scale / temperature, out=z_buf[:rows])
            z_y = z.gather(1, ids[sl, None]).squeeze(1)
            # z <- z - max; lse = max + log sum exp(z)   (in place, one pass each)
            m = z.amax(dim=-1)
            z.sub_(m[:, None])
            if return_entropy:
                # H = -sum_v p_v log p_v = log s - sum_v e_v (z_v - max) / s,  e = exp(z - max), s = sum e
                e = torch.exp(z, out=e_buf[:rows])
                s_c = e.sum(-1)
                dot = e.mul_(z).sum(-1)  # (a batched dot product through bmm is 5x slower on CPU)
                log_s = s_c.log()
                entropy[sl] = log_s - dot / s_c
            else:
                log_s = z.exp_().sum(-1).log_()
            lse_c = m + log_s
            lse[sl] = lse_c
            logp[sl] = z_y - lse_c
        del z_buf, e_buf
        ctx.save_for_backward(hidden, weight, bias, ids, lse)
        ctx.temperature = temperature
        ctx.chunk_size = chunk_size
        ctx.scale = scale
        ctx.softcap = softcap
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(  # type: ignore[override]
        ctx: Any, grad_logp: torch.Tensor | None, grad_entropy: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, bias, ids, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        n = hidden.shape[0]
        none = (None,) * 9
        if grad_logp is None or not (need_h or need_w or need_b):
            return none
        cdt = weight.dtype
        acc_dt = _acc_dtype(cdt)
        dev = weight.device
        temperature, scale, softcap = ctx.temperature, ctx.scale, ctx.softcap
        g = grad_logp.to(acc_dt) * (scale / temperature)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc_dt, device=dev) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc_dt, device=dev) if (need_b and bias is not None) else None
        rows_max = min(ctx.chunk_size, n)  # ctx.chunk_size is the block size the forward used
        z_buf = torch.empty((rows_max, weight.shape[0]), dtype=acc_dt, device=dev)
        p_buf = torch.empty_like(z_buf) if softcap else None
        row_index = torch.arange(rows_max, device=dev)
        for start in range(0, n, ctx.chunk_size):
            sl = slice(start, min(start + ctx.chunk_size, n))
            rows = sl.stop - sl.start
            h_c = hidden[sl].to(cdt)
            g_c = g[sl]
            if softcap:
                # t = tanh(s u / c); p = softmax(z) = exp(t c / T - lse), as in the forward
                t = _chunk_logits(h_c, weight, bias, scale, out=z_buf[:rows]).div_(softcap).tanh_()
                z = torch.mul(t, softcap / temperature, out=p_buf[:rows]).sub_(lse[sl, None]).exp_()
            else:
                # z <- softmax(z) = exp(s u / T - lse), the shift fused into the matmul
                t = None
                z = _chunk_logits(h_c, weight, bias, scale / temperature, out=z_buf[:rows], shift=lse[sl]).exp_()
            # dL/du = (onehot - p) * g s / T [* (1 - t^2)], in place (g already holds g s / T)
            z.mul_(g_c[:, None].neg())
            z[row_index[:rows], ids[sl]] += g_c
            if t is not None:
                z.mul_(t.mul_(t).neg_().add_(1.0))
            gz = z.to(cdt)
            if grad_h is not None:
                grad_h[sl] = (gz @ weight).to(hidden.dtype)
            if grad_w is not None:
                if acc_dt == cdt:
                    grad_w.addmm_(gz.t(), h_c)
                else:
                    grad_w.add_(gz.t() @ h_c)
            if grad_b is not None:
                grad_b.add_(gz.sum(0).to(acc_dt))
            del gz, z, t
        del z_buf, p_buf
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        if grad_b is not None:
            grad_b = grad_b.to(bias.dtype)
        return (grad_h, grad_w, grad_b) + none[3:]


def chunked_token_logprobs(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    token_ids: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    return_entropy: bool = False,
    transform: LogitTransform | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Memory-lean ``log_softmax(f(hidden @ W^T + b) / temperature)[..., token_ids]``.

    ``f`` is the model's final-logit ``transform`` (:class:`LogitTransform`; None = identity),
    applied in the accumulation dtype (float32 for float32/bf16/fp16 weights).

    Shapes: ``hidden [B, T, H]`` (or ``[N, H]``), ``lm_head_weight [V, H]``, ``bias [V]``,
    ``token_ids [B, T]`` (or ``[N]``) -> ``logp`` ``[B, T]`` (or ``[N]``), float32 (float64 for
    float64 weights, bf16/fp16 weights are upcast); with ``return_entropy=True`` also the
    (detached) per-token entropy of the tempered distribution, same shape and dtype:
    ``(logp, entropy)``.

    Differentiable w.r.t. ``hidden``, ``lm_head_weight`` and ``bias`` through a custom
    :class:`torch.autograd.Function`: forward keeps only the inputs and a per-row
    logsumexp, backward recomputes logits chunk by chunk, so the extra peak memory is
    ``O(chunk_size * V)`` rather than the ``O(B * T * V)`` of :func:`naive_token_logprobs`:
    one reused float32 ``[chunk_size, V]`` workspace (two in the forward with
    ``return_entropy``), plus the ``[V, H]`` weight gradient. ``chunk_size`` is the most rows
    processed at once; on a CPU blocks are further capped at about 32 MiB (``32 MiB / 4V``
    rows, at least 32), where the elementwise passes stay in cache. Not twice differentiable.

    Gradient (per row, ``u = h W^T + b``, logits ``z = f(u) / T``, incoming grad ``g``)::

        dL/du = g * (onehot(y) - softmax(z)) * f'(u) / T;  dL/dh = dL/du W;  dL/dW = sum_rows dL/du^T h,

    with ``f'(u) = s`` (scale), or ``s (1 - tanh^2(s u / c))`` with a soft-cap ``c``.
    """
    fn = "chunked_token_logprobs"
    _check_ids(fn, hidden.shape[:-1], token_ids)
    if lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{fn}: lm_head_weight must be [V, H={hidden.shape[-1]}], got {tuple(lm_head_weight.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (lm_head_weight.shape[0],):
        raise ValueError(f"{fn}: bias must be [V={lm_head_weight.shape[0]}], got {tuple(bias.shape)}")
    if not temperature > 0:
        raise ValueError(f"{fn}: temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"{fn}: chunk_size must be >= 1, got {chunk_size}")
    if transform is not None and not isinstance(transform, LogitTransform):
        raise ValueError(f"{fn}: transform must be a LogitTransform or None, got {type(transform).__name__}")
    transform = transform or IDENTITY
    lead = token_ids.shape
    h2 = hidden.reshape(-1, hidden.shape[-1])
    ids = token_ids.reshape(-1).long()
    logp, entropy = _ChunkedLMHeadLogProbs.apply(
        h2, lm_head_weight, bias, ids, float(temperature), int(chunk_size), bool(return_entropy),
        float(transform.scale), float(transform.softcap or 0.0),
    )
    logp = logp.view(lead)
    if return_entropy:
        return logp, entropy.view(lead)
    return logp
