"""Peak memory of token log-probs + loss + backward versus vocabulary size: chunked vs naive.

    python bench/vocab_memory.py                      # B 4 x T 256, H 256, V 8k / 32k / 128k
    python bench/vocab_memory.py --json vocab.json

At a fixed batch x length (N = B*T rows of hidden states), each measurement runs in its own
subprocess: build ``hidden [B, T, H]`` and an LM-head weight ``[V, H]`` (both requiring grad),
then ``loss = -(advantage * log p(token)).mean()`` and ``loss.backward()``. The reported number
is the peak RSS during that computation minus the RSS just before it (``/proc/self/status``
VmHWM after resetting it through ``/proc/self/clear_refs``; ``ru_maxrss`` where that reset is
not available), i.e. the extra memory the loss and its backward needed.

* naive:   ``log_softmax(hidden @ W^T)`` then gather (trustrl.logprobs.naive_token_logprobs):
  holds [N, V] float32 logits and log-softmax (and their gradient), O(N * V).
* chunked: trustrl.logprobs.chunked_token_logprobs: one reused [rows, V] block (rows =
  chunk_size, capped at ~32 MiB per block on CPU), plus the [V, H] weight gradient; nothing
  proportional to N * V.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, os, resource, sys
import torch
from trustrl.logprobs import chunked_token_logprobs, naive_token_logprobs

path, V, B, T, H, chunk = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
hidden = torch.randn(B, T, H, generator=g).requires_grad_()
weight = (torch.randn(V, H, generator=g) * 0.02).requires_grad_()
ids = torch.randint(0, V, (B, T), generator=g)
adv = torch.randn(B, T, generator=g)

def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) / 1024.0
    return None

try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS watermark (VmHWM) to the current RSS
    method = "VmHWM"
except OSError:
    method = "ru_maxrss"
before = status("VmRSS")
if path == "chunked":
    logp = chunked_token_logprobs(hidden, weight, ids, chunk_size=chunk)
else:
    logp = naive_token_logprobs(hidden, weight, ids)
loss = -(adv * logp).mean()
loss.backward()
peak = status("VmHWM") if method == "VmHWM" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
print(json.dumps({"path": path, "V": V, "rows": B * T, "extra_mb": peak - before, "method": method,
                  "rss_before_mb": before, "grad_ok": bool(torch.isfinite(weight.grad).all())}))
"""


def measure(path: str, vocab: int, batch: int, length: int, hidden: int, chunk: int) -> dict:
    cmd = [sys.executable, "-c", CHILD, path, str(vocab), str(batch), str(length), str(hidden), str(chunk)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=str(Path(__file__).resolve().parents[1]))
    if out.returncode != 0:
        raise RuntimeError(f"{path} V={vocab} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--vocabs", default="8192,32768,131072")
    ap.add_argument("--chunk-size", type=int, default=1024)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    rows = args.batch * args.length
    results = []
    print(f"loss + backward, N = {args.batch} x {args.length} = {rows} rows, H = {args.hidden}, "
          f"chunk_size = {args.chunk_size}; extra peak RSS over the RSS before the loss")
    print(f"{'V':>8s} {'[N,V] fp32 MB':>14s} {'naive MB':>10s} {'chunked MB':>11s} {'naive/chunked':>14s}")
    for vocab in [int(v) for v in args.vocabs.split(",")]:
        naive = measure("naive", vocab, args.batch, args.length, args.hidden, args.chunk_size)
        chunked = measure("chunked", vocab, args.batch, args.length, args.hidden, args.chunk_size)
        nv_mb = rows * vocab * 4 / 2**20
        results.append({"V": vocab, "rows": rows, "NV_fp32_mb": nv_mb, "naive_extra_mb": naive["extra_mb"],
                        "chunked_extra_mb": chunked["extra_mb"], "method": chunked["method"]})
        print(f"{vocab:8d} {nv_mb:14.0f} {naive['extra_mb']:10.0f} {chunked['extra_mb']:11.0f} "
              f"{naive['extra_mb'] / max(chunked['extra_mb'], 1e-9):14.1f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"config": vars(args), "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
