"""Tests for trustrl.logprobs: selective/chunked log-probs equal the naive log_softmax+gather
(values and gradients, with temperature and final-logit transforms), saved-tensor audit, and a
peak-RSS comparison."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trustrl.logprobs import (
    LogitTransform,
    apply_logit_transform,
    chunked_token_logprobs,
    naive_token_logprobs,
    selective_log_softmax,
)

FAST = settings(max_examples=25, deadline=None)


def _reference_logp(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Independent reference: full log_softmax then gather."""
    return torch.log_softmax(logits, dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)


# ----------------------------------------------------------------------------- selective
def test_selective_log_softmax_by_hand() -> None:
    # logits [0, ln 3] -> softmax [1/4, 3/4] -> log p = [ln 0.25, ln 0.75] = [-1.386294, -0.287682]
    logits = torch.tensor([[0.0, torch.log(torch.tensor(3.0)).item()]] * 2)
    out = selective_log_softmax(logits, torch.tensor([0, 1]))
    torch.testing.assert_close(out, torch.tensor([-1.386294, -0.287682]), atol=1e-6, rtol=0)


@FAST
@given(
    st.integers(1, 3),
    st.integers(1, 6),
    st.integers(2, 40),
    st.integers(1, 9),
    st.sampled_from([torch.float32, torch.float64]),
    st.integers(0, 2**16),
)
def test_selective_matches_naive_values_and_grads(
    b: int, t: int, v: int, chunk: int, dtype: torch.dtype, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    # a [B, T+1, V] tensor sliced to [B, T, V]: non-contiguous, exercises the no-copy walk
    full = (torch.randn(b, t + 1, v, generator=gen, dtype=dtype) * 5).requires_grad_(True)
    logits = full[:, :-1]
    ids = torch.randint(0, v, (b, t), generator=gen)
    w = torch.randn(b, t, generator=gen, dtype=dtype)
    out = selective_log_softmax(logits, ids, chunk_size=chunk)
    (g_out,) = torch.autograd.grad((out * w).sum(), full)
    ref = _reference_logp(logits, ids)
    (g_ref,) = torch.autograd.grad((ref * w).sum(), full)
    assert out.dtype == dtype
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(g_out, g_ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_selective_half_precision_is_float32_and_accurate(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 5, 300, generator=gen) * 3).to(dtype).requires_grad_(True)
    ids = torch.randint(0, 300, (3, 5), generator=gen)
    out = selective_log_softmax(logits, ids, chunk_size=4)
    assert out.dtype == torch.float32
    # the same (rounded) logits, log-softmaxed in float64
    ref = _reference_logp(logits.detach().double(), ids).float()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    out.sum().backward()
    assert logits.grad is not None and torch.isfinite(logits.grad.float()).all()


def test_selective_shape_errors() -> None:
    with pytest.raises(ValueError, match="token_ids shape"):
        selective_log_softmax(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))


# ----------------------------------------------------------------------------- chunked LM head
@FAST
@given(
    st.integers(1, 3),
    st.integers(1, 7),
    st.integers(1, 6),
    st.integers(2, 30),
    st.integers(1, 10),
    st.sampled_from([1.0, 0.7, 1.6]),
    st.booleans(),
    st.integers(0, 2**16),
)
def test_chunked_matches_naive_values_and_grads(
    b: int, t: int, h: int, v: int, chunk: int, temp: float, use_bias: bool, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    hidden = torch.randn(b, t, h, generator=gen, dtype=f64).requires_grad_(True)
    weight = torch.randn(v, h, generator=gen, dtype=f64).requires_grad_(True)
    bias = torch.randn(v, generator=gen, dtype=f64).requires_grad_(True) if use_bias else None
    ids = torch.randint(0, v, (b, t), generator=gen)
    upstream = torch.randn(b, t, generator=gen, dtype=f64)
    inputs = [hidden, weight] + ([bias] if bias is not None else [])

    out, ent = chunked_token_logprobs(
        hidden, weight, ids, bias=bias, temperature=temp, chunk_size=chunk, return_entropy=True
    )
    grads = torch.autograd.grad((out * upstream).sum(), inputs)

    # reference written out here: logits / T, log_softmax, gather (no trustrl code involved)
    logits = hidden @ weight.T + (bias if bias is not None else 0.0)
    logsm = torch.log_softmax(logits / temp, dim=-1)
    ref = logsm.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    ref_grads = torch.autograd.grad((ref * upstream).sum(), inputs)
    ref_ent = -(logsm.exp() * logsm).sum(-1)

    torch.testing.assert_close(out, ref)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg)
    torch.testing.assert_close(ent, ref_ent.detach())
    assert not ent.requires_grad
    # and the library's naive reference agrees too
    torch.testing.assert_close(naive_token_logprobs(hidden, weight, ids, bias, temp), ref)


def test_chunked_2d_input_and_frozen_weight() -> None:
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(9, 4, generator=gen).requires_grad_(True)
    weight = torch.randn(17, 4, generator=gen)  # frozen head: no grad requested
    ids = torch.randint(0, 17, (9,), generator=gen)
    out = chunked_token_logprobs(hidden, weight, ids, chunk_size=4)
    assert isinstance(out, torch.Tensor) and out.shape == (9,)
    out.sum().backward()
    hidden2 = hidden.detach().clone().requires_grad_(True)
    _reference_logp(hidden2 @ weight.T, ids).sum().backward()
    torch.testing.assert_close(out, _reference_logp(hidden.detach() @ weight.T, ids))
    assert hidden.grad is not None and hidden2.grad is not None
    torch.testing.assert_close(hidden.grad, hidden2.grad)


def test_chunked_gradcheck_float64() -> None:
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64).requires_grad_(True)
    weight = torch.randn(7, 4, generator=gen, dtype=torch.float64).requires_grad_(True)
    bias = torch.randn(7, generator=gen, dtype=torch.float64).requires_grad_(True)
    ids = torch.randint(0, 7, (2, 3), generator=gen)
    assert torch.autograd.gradcheck(
        lambda hh, ww, bb: chunked_token_logprobs(hh, ww, ids, bias=bb, temperature=0.8, chunk_size=4),
        (hidden, weight, bias),
    )


def test_chunked_bf16_close_to_float32() -> None:
    gen = torch.Generator().manual_seed(7)
    hidden = torch.randn(2, 6, 16, generator=gen).bfloat16().requires_grad_(True)
    weight = (torch.randn(50, 16, generator=gen) / 4).bfloat16().requires_grad_(True)
    ids = torch.randint(0, 50, (2, 6), generator=gen)
    out = chunked_token_logprobs(hidden, weight, ids, chunk_size=5)
    assert out.dtype == torch.float32
    ref = _reference_logp((hidden.detach().float() @ weight.detach().float().T), ids)
    torch.testing.assert_close(out, ref, atol=3e-2, rtol=0)
    out.sum().backward()
    assert hidden.grad is not None and hidden.grad.dtype == torch.bfloat16
    assert weight.grad is not None and weight.grad.dtype == torch.bfloat16


# ----------------------------------------------------------------------------- transforms
ATANH_HALF = 0.5493061443340549  # atanh(0.5): tanh(ATANH_HALF) = 0.5


@pytest.mark.parametrize("transform, temperature, u, expected", [
    # soft-cap c = 2: u = [2 atanh(0.5), 0] -> z = 2 tanh(u / 2) = [1, 0];
    # log p(token 0) = 1 - ln(e + 1) = 1 - 1.3132617 = -0.3132617
    (LogitTransform(softcap=2.0), 1.0, [2 * ATANH_HALF, 0.0], -0.3132617),
    # same with T = 0.5: z / T = [2, 0]; log p(0) = 2 - ln(e^2 + 1) = 2 - 2.1269280 = -0.1269280
    (LogitTransform(softcap=2.0), 0.5, [2 * ATANH_HALF, 0.0], -0.1269280),
    # scale s = 0.5 (Cohere): u = [2 ln 3, 0] -> z = [ln 3, 0]; p(0) = 3/4, ln 0.75 = -0.2876821
    (LogitTransform(scale=0.5), 1.0, [2 * 1.0986123, 0.0], -0.2876821),
    # scale then cap: s = 2, c = 1: u = [atanh(0.5) / 2, 0] -> s u = atanh(0.5) -> z = [0.5, 0];
    # log p(0) = 0.5 - ln(e^0.5 + 1) = 0.5 - 0.9740770 = -0.4740770
    (LogitTransform(scale=2.0, softcap=1.0), 1.0, [ATANH_HALF / 2, 0.0], -0.4740770),
])
def test_transformed_logprob_by_hand(transform, temperature, u, expected) -> None:
    # hidden = u, W = identity: the LM-head output is u itself
    hidden = torch.tensor([u], dtype=torch.float64)
    weight = torch.eye(2, dtype=torch.float64)
    out = chunked_token_logprobs(hidden, weight, torch.tensor([0]), temperature=temperature, transform=transform)
    assert float(out[0]) == pytest.approx(expected, abs=1e-6)
    naive = naive_token_logprobs(hidden, weight, torch.tensor([0]), temperature=temperature, transform=transform)
    assert float(naive[0]) == pytest.approx(expected, abs=1e-6)


def test_transformed_softcap_gradient_by_hand() -> None:
    # c = 2, u = [2 atanh(0.5), 0], z = [1, 0], p = softmax(z) = [e/(e+1), 1/(e+1)] = [0.7310586, 0.2689414].
    # d log p(0) / d u_v = (1[v=0] - p_v) (1 - tanh^2(u_v / c)):
    #   v = 0: (1 - 0.7310586) (1 - 0.25) = 0.2017060;  v = 1: (0 - 0.2689414) (1 - 0) = -0.2689414
    u = torch.tensor([[2 * ATANH_HALF, 0.0]], dtype=torch.float64, requires_grad=True)
    out = chunked_token_logprobs(u, torch.eye(2, dtype=torch.float64), torch.tensor([0]),
                                 transform=LogitTransform(softcap=2.0))
    out.sum().backward()
    assert u.grad[0].tolist() == pytest.approx([0.2017060, -0.2689414], abs=1e-6)


@pytest.mark.parametrize("transform", [LogitTransform(scale=0.3), LogitTransform(softcap=1.5),
                                       LogitTransform(scale=2.5, softcap=0.7)])
def test_transformed_chunked_matches_written_out_reference_and_gradcheck(transform) -> None:
    gen = torch.Generator().manual_seed(11)
    f64 = torch.float64
    hidden = torch.randn(3, 5, 6, generator=gen, dtype=f64).requires_grad_(True)
    weight = torch.randn(13, 6, generator=gen, dtype=f64).requires_grad_(True)
    bias = torch.randn(13, generator=gen, dtype=f64).requires_grad_(True)
    ids = torch.randint(0, 13, (3, 5), generator=gen)
    upstream = torch.randn(3, 5, generator=gen, dtype=f64)
    temp = 0.7
    out, ent = chunked_token_logprobs(hidden, weight, ids, bias=bias, temperature=temp, chunk_size=4,
                                      return_entropy=True, transform=transform)
    grads = torch.autograd.grad((out * upstream).sum(), (hidden, weight, bias))
    # reference written out here (no trustrl code): s u, then c tanh(. / c), then / T
    z = (hidden @ weight.T + bias) * transform.scale
    if transform.softcap is not None:
        z = transform.softcap * torch.tanh(z / transform.softcap)
    logsm = torch.log_softmax(z / temp, dim=-1)
    ref = logsm.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    ref_grads = torch.autograd.grad((ref * upstream).sum(), (hidden, weight, bias))
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(ent, (-(logsm.exp() * logsm).sum(-1)).detach())
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg)
    assert torch.autograd.gradcheck(
        lambda hh, ww, bb: chunked_token_logprobs(hh, ww, ids, bias=bb, temperature=temp, chunk_size=4,
                                                  transform=transform),
        (hidden, weight, bias),
    )
    # apply_logit_transform is the same function, and differentiable twice (TRPO's KL)
    torch.testing.assert_close(apply_logit_transform(hidden @ weight.T + bias, transform) / temp, z / temp)
    assert torch.autograd.gradgradcheck(lambda x: apply_logit_transform(x, transform).sum(-1),
                                        (torch.randn(2, 4, generator=gen, dtype=f64).requires_grad_(True),))


def test_transformed_chunked_bf16_weights() -> None:
    gen = torch.Generator().manual_seed(13)
    hidden = torch.randn(2, 6, 16, generator=gen).bfloat16().requires_grad_(True)
    weight = torch.randn(50, 16, generator=gen).bfloat16().requires_grad_(True)  # logits ~4: the cap bites
    ids = torch.randint(0, 50, (2, 6), generator=gen)
    transform = LogitTransform(softcap=3.0)
    out = chunked_token_logprobs(hidden, weight, ids, chunk_size=5, transform=transform)
    assert out.dtype == torch.float32
    u = hidden.detach().float() @ weight.detach().float().T
    ref = _reference_logp(3.0 * torch.tanh(u / 3.0), ids)
    torch.testing.assert_close(out, ref, atol=3e-2, rtol=0)
    assert (out - _reference_logp(u, ids)).abs().max() > 0.5  # the cap matters at this scale
    out.sum().backward()
    assert hidden.grad is not None and hidden.grad.dtype == torch.bfloat16
    assert weight.grad is not None and weight.grad.dtype == torch.bfloat16


def test_identity_transform_is_bitwise_the_untransformed_path() -> None:
    gen = torch.Generator().manual_seed(17)
    hidden = torch.randn(7, 8, generator=gen)
    weight = torch.randn(20, 8, generator=gen)
    ids = torch.randint(0, 20, (7,), generator=gen)
    a = chunked_token_logprobs(hidden, weight, ids, temperature=0.9, chunk_size=3)
    b = chunked_token_logprobs(hidden, weight, ids, temperature=0.9, chunk_size=3, transform=LogitTransform())
    assert torch.equal(a, b)


def test_logit_transform_argument_errors() -> None:
    for bad in (dict(scale=0.0), dict(scale=-1.0), dict(scale=float("inf")), dict(softcap=0.0),
                dict(softcap=-2.0), dict(softcap=float("nan"))):
        with pytest.raises(ValueError, match="LogitTransform"):
            LogitTransform(**bad)
    h, w, ids = torch.zeros(2, 3), torch.zeros(5, 3), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="chunked_token_logprobs: transform must be a LogitTransform"):
        chunked_token_logprobs(h, w, ids, transform=3.0)


def test_chunked_argument_errors() -> None:
    h, w, ids = torch.zeros(2, 3), torch.zeros(5, 3), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="temperature"):
        chunked_token_logprobs(h, w, ids, temperature=0.0)
    with pytest.raises(ValueError, match="lm_head_weight"):
        chunked_token_logprobs(h, torch.zeros(5, 4), ids)
    with pytest.raises(ValueError, match="bias"):
        chunked_token_logprobs(h, w, ids, bias=torch.zeros(4))


# ----------------------------------------------------------------------------- memory
def test_chunked_saves_no_vocab_sized_activation() -> None:
    n, h, v = 64, 8, 1000  # N*V = 64000 ; largest legitimate saved tensor is W: V*H = 8000
    hidden = torch.randn(n, h, requires_grad=True)
    weight = torch.randn(v, h, requires_grad=True)
    out = chunked_token_logprobs(hidden, weight, torch.randint(0, v, (n,)), chunk_size=16)
    node = out.grad_fn
    while node is not None and not hasattr(node, "saved_tensors"):  # skip the view node
        node = node.next_functions[0][0]
    assert node is not None
    saved = [s for s in node.saved_tensors if s is not None]
    assert saved, "custom Function should save its inputs"
    assert max(s.numel() for s in saved) <= v * h < n * v
    # whereas the naive graph holds an [N, V] tensor
    naive = naive_token_logprobs(hidden, weight, torch.randint(0, v, (n,)))
    sizes = []
    stack = [naive.grad_fn]
    seen = set()
    while stack:
        fn = stack.pop()
        if fn is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        for name in dir(fn):
            if name.startswith("_saved_"):
                val = getattr(fn, name)
                if isinstance(val, torch.Tensor):
                    sizes.append(val.numel())
        stack.extend(f for f, _ in fn.next_functions)
    assert max(sizes) >= n * v


_RSS_SCRIPT = textwrap.dedent(
    """
    import json, resource, torch
    torch.set_num_threads(2)
    from trustrl.logprobs import chunked_token_logprobs, naive_token_logprobs
    N, H, V = 4096, 64, 32000
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, H, generator=g).requires_grad_(True)
    weight = (torch.randn(V, H, generator=g) / 8).requires_grad_(True)
    ids = torch.randint(0, V, (N,), generator=g)
    def run(mode, n):
        if mode == "naive":
            out = naive_token_logprobs(hidden[:n], weight, ids[:n])
        else:
            out = chunked_token_logprobs(hidden[:n], weight, ids[:n], chunk_size=256)
        out.sum().backward()
        hidden.grad = None
    def peak():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB -> MiB
    run("chunked", 8)  # warm-up: kernels, allocator, the [V, H] grad buffer of W
    run("naive", 8)
    base = peak()
    run("chunked", N)  # chunked first: ru_maxrss is a high-water mark
    chunked = peak() - base
    run("naive", N)  # measured above the chunked high-water mark: an underestimate
    naive = peak() - base
    print(json.dumps({"chunked_mb": chunked, "naive_mb": naive}))
    """
)


def test_chunked_peak_memory_much_lower_than_naive() -> None:
    # naive: logits [4096, 32000] fp32 = 500 MiB, plus log_softmax output and its gradient
    # chunked (256 rows): three [256, 32000] fp32 buffers ~ 94 MiB at most.
    # Peak RSS (ru_maxrss) of one subprocess, chunked run first, then naive; the naive figure
    # is measured from the same base, so it is the naive high-water mark above the baseline.
    proc = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT], capture_output=True, text=True, timeout=120, check=True
    )
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    naive_mb, chunked_mb = res["naive_mb"], res["chunked_mb"]
    assert naive_mb >= 500, f"naive peak delta only {naive_mb:.0f} MiB"
    assert chunked_mb < naive_mb / 4, f"chunked {chunked_mb:.0f} MiB vs naive {naive_mb:.0f} MiB"
