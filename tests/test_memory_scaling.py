"""Memory of chunked token log-probs + backward: bounded by one vocabulary-wide block and the
weight gradient, independent of the number of rows (batch x length).

The bound, for N rows of hidden size H, vocabulary V and the CPU block of ``r`` rows
(``r = min(chunk_size, max(32, 32 MiB / 4V))``, see ``trustrl.logprobs._block_rows``):

    extra peak RSS <= 3 * r * V * 4 bytes        (the reused [r, V] workspace, a second one
                                                  for the entropy, one slack block)
                    + 2 * V * H * 4 bytes        (the weight gradient, plus one transient copy)
                    + 8 * N * H * 4 bytes        (hidden states, their gradient, reshapes)
                    + 24 MiB                     (allocator and interpreter slack)

nothing proportional to N * V. The naive path (full logits + log_softmax) needs about
3 * N * V * 4 bytes; a sanity test checks that the probe does see that.

Peak memory is measured in one child process (so the pytest process's own history does not
count): before each computation the kernel's peak-RSS watermark is reset
(``/proc/self/clear_refs`` <- 5) and VmHWM is read after it; where that reset is not
permitted, each measurement gets its own child and ``ru_maxrss``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")

MiB = 2**20
H = 64

CHILD = r"""
import json, resource, sys
import torch
from trustrl.logprobs import chunked_token_logprobs, naive_token_logprobs

torch.set_num_threads(1)
specs = json.loads(sys.argv[1])

def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(key)

out = []
for path, V, N, H, chunk in specs:
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, H, generator=g).requires_grad_()
    weight = (torch.randn(V, H, generator=g) * 0.05).requires_grad_()
    ids = torch.randint(0, V, (N,), generator=g)
    adv = torch.randn(N, generator=g)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        method = "VmHWM"
    except OSError:
        if len(specs) > 1:
            print(json.dumps({"error": "no clear_refs"}))
            sys.exit(3)
        method = "ru_maxrss"
    before = status("VmRSS")
    if path == "chunked":
        logp, ent = chunked_token_logprobs(hidden, weight, ids, chunk_size=chunk, return_entropy=True)
    else:
        logp = naive_token_logprobs(hidden, weight, ids)
    (-(adv * logp).mean()).backward()
    peak = status("VmHWM") if method == "VmHWM" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out.append({"path": path, "V": V, "N": N, "extra": peak - before, "finite": bool(torch.isfinite(weight.grad).all())})
    del hidden, weight, ids, adv, logp
print(json.dumps(out))
"""


def _run(specs: list[tuple[str, int, int, int, int]]) -> list[dict]:
    root = str(Path(__file__).resolve().parents[1])
    res = subprocess.run([sys.executable, "-c", CHILD, json.dumps(specs)], capture_output=True, text=True, cwd=root)
    if res.returncode == 3:  # no watermark reset here: one child (and ru_maxrss) per measurement
        return [_run([spec])[0] for spec in specs]
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def block_rows(chunk: int, vocab: int) -> int:
    # the documented CPU cap of trustrl.logprobs (32 MiB float32 blocks, at least 32 rows)
    return min(chunk, max(32, (32 * MiB) // (4 * vocab)))


def bound(vocab: int, rows: int, chunk: int) -> int:
    return 3 * block_rows(chunk, vocab) * vocab * 4 + 2 * vocab * H * 4 + 8 * rows * H * 4 + 24 * MiB


@pytest.fixture(scope="module")
def measured() -> dict[tuple[str, int, int], dict]:
    specs = [
        ("chunked", 8192, 1024, H, 1024),
        ("chunked", 131072, 1024, H, 1024),
        ("chunked", 32768, 512, H, 1024),
        ("chunked", 32768, 4096, H, 1024),
        ("naive", 32768, 2048, H, 1024),
    ]
    return {(r["path"], r["V"], r["N"]): r for r in _run(specs)}


def test_chunked_extra_memory_within_the_block_plus_weight_gradient_bound(measured):
    for (path, vocab, rows), r in measured.items():
        if path != "chunked":
            continue
        assert r["finite"]
        # e.g. V = 131072, N = 1024: 3 * 64 * 131072 * 4 B = 96 MiB + 2 * 32 MiB + 2 MiB + 24 MiB = 186 MiB,
        # while the [N, V] float32 logits alone would be 512 MiB.
        assert r["extra"] <= bound(vocab, rows, 1024), (vocab, rows, r["extra"] / MiB, bound(vocab, rows, 1024) / MiB)


def test_chunked_extra_memory_does_not_grow_with_rows(measured):
    small, large = measured[("chunked", 32768, 512)], measured[("chunked", 32768, 4096)]
    # 8x the rows: only O(N * H) terms may grow (3584 more rows x 64 x 4 B x 8 = 7 MiB) plus slack;
    # the naive path would grow by about 3 * 3584 * 32768 * 4 B = 1.3 GiB.
    assert large["extra"] - small["extra"] <= 8 * (4096 - 512) * H * 4 + 16 * MiB, (
        small["extra"] / MiB, large["extra"] / MiB)


def test_probe_sees_the_naive_paths_full_logits(measured):
    # sanity of the measurement: the naive path must show at least its [N, V] float32 logits
    # (2048 * 32768 * 4 B = 256 MiB) and more than the chunked bound at the same size.
    naive = measured[("naive", 32768, 2048)]
    assert naive["extra"] >= 2048 * 32768 * 4
    assert naive["extra"] > bound(32768, 2048, 1024)
