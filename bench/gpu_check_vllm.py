"""GPU check of the rollout engines (NOT run yet: no GPU has been lent to this project's tasks).

    bash bench/gpu_check.sh                 # = python bench/gpu_check_vllm.py --steps 3
    python bench/gpu_check_vllm.py --engines trustrl vllm --steps 3 --completion 256

Builds a Qwen2.5-0.5B-shaped model with random weights (hidden 896, 24 layers, 14 heads / 2
KV heads, MLP 4864, vocabulary 151,936, tied embeddings), saved in bfloat16 to a temporary
directory with a character tokenizer, and runs ``--steps`` GRPO steps on it in bf16 on
``cuda`` with each rollout engine (trustrl's sampler; vLLM colocated, ``rollout_correction=tis``
so the engine's behaviour log-probs are used). Printed per engine, from the run's
metrics.jsonl (steps after the first, which includes warm-up):

* generated tokens/s (``perf/tokens_per_second``: completion tokens / generation seconds),
* step seconds and generation seconds,
* peak GPU memory (``torch.cuda.max_memory_allocated``, the trainer's process; vLLM's own
  pool is counted by it only in-process and partly: also printed is the device-wide
  ``torch.cuda.mem_get_info`` low point),
* MFU of the update = 6 x parameters x trained tokens / (update seconds x peak bf16 FLOP/s)
  (``--peak-tflops``, default 989 for an H100/H200 SXM, dense),
* ``rollout/logprob_diff_max`` / ``_mean``: the gap between the engine's behaviour
  log-probs and the trainer's recomputation (trustrl's sampler: bf16 rounding only; vLLM:
  other kernels, other batch layout).

Nothing here is a claim until it has been run; the README says which numbers exist.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def build_model(directory: Path) -> int:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from trustrl.data import write_jsonl
    from trustrl.tiny import build_char_tokenizer

    tok = build_char_tokenizer("0123456789+=abcdefghijklmnopqrstuvwxyz ")
    config = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=True, rope_theta=1000000.0, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, torch_dtype="bfloat16")
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(str(directory), safe_serialization=True)
    tok.save_pretrained(str(directory))
    write_jsonl(directory / "prompts.jsonl", [{"prompt": f"{i} + {2 * i} = "} for i in range(256)])
    return n_params


def run(engine: str, directory: Path, args, n_params: int) -> dict:
    from trustrl.algorithms.grpo import GRPOTrainer
    from trustrl.config import GRPOConfig
    from trustrl.logging import read_metrics

    out = directory / f"run-{engine}"
    cfg = GRPOConfig(model=str(directory), dataset=str(directory / "prompts.jsonl"), output_dir=str(out),
                     device="cuda", dtype="bfloat16", max_steps=args.steps, prompts_per_step=args.prompts,
                     group_size=args.group, max_prompt_length=64, max_completion_length=args.completion,
                     beta=0.0, learning_rate=1e-6, progress=False, tensorboard=False, seed=0, rewards=[],
                     rollout_engine=engine, rollout_correction="tis", forward_batch_size=args.prompts * args.group,
                     micro_batch_tokens=args.micro_batch_tokens, vllm_gpu_memory_utilization=args.vllm_memory)
    torch.cuda.reset_peak_memory_stats()
    free_low = torch.cuda.mem_get_info()[0]
    trainer = GRPOTrainer(cfg, reward_funcs=[lambda prompts, completions, **kw: [c.count("1") / 10 for c in completions]])
    free_low = min(free_low, torch.cuda.mem_get_info()[0])
    started = time.time()
    trainer.train()
    free_low = min(free_low, torch.cuda.mem_get_info()[0])
    rows = [r for r in read_metrics(out) if "perf/step_seconds" in r][1:] or read_metrics(out)
    step = statistics.median(r["perf/step_seconds"] for r in rows)
    gen = statistics.median(r["perf/generation_seconds"] for r in rows)
    tokens = statistics.median(r["completion/mean_length"] for r in rows) * args.prompts * args.group
    trained = tokens + 64 * args.prompts * args.group  # completion + (at most) prompt tokens per step
    update = max(step - gen, 1e-9)
    result = {
        "engine": engine, "wall_s": time.time() - started,
        "tokens_per_s": statistics.median(r["perf/tokens_per_second"] for r in rows),
        "step_s": step, "generation_s": gen,
        "peak_alloc_gib": torch.cuda.max_memory_allocated() / 2**30,
        "device_used_peak_gib": (torch.cuda.mem_get_info()[1] - free_low) / 2**30,
        "mfu_update": 6 * n_params * trained / update / (args.peak_tflops * 1e12),
        "logprob_diff_max": max(r.get("rollout/logprob_diff_max", float("nan")) for r in rows),
        "logprob_diff_mean": statistics.mean(r.get("rollout/logprob_diff_mean", float("nan")) for r in rows),
    }
    del trainer
    torch.cuda.empty_cache()
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", nargs="+", default=["trustrl", "vllm"], choices=["trustrl", "vllm"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--completion", type=int, default=256)
    ap.add_argument("--micro-batch-tokens", type=int, default=16384)
    ap.add_argument("--vllm-memory", type=float, default=0.3)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check_vllm: no CUDA device here; run it on a GPU machine", file=sys.stderr)
        return 2
    os.environ.setdefault("TRUSTRL_NO_PROGRESS", "1")
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        n_params = build_model(directory)
        print(f"model: Qwen2.5-0.5B-shaped, {n_params / 1e6:.0f}M parameters, random weights, bf16")
        for engine in args.engines:
            try:
                results.append(run(engine, directory, args, n_params))
            except Exception as err:  # report and go on with the other engine
                print(f"{engine}: FAILED: {type(err).__name__}: {err}", file=sys.stderr)
    head = f"{'engine':8} {'gen tok/s':>10} {'step s':>8} {'gen s':>8} {'peak GiB':>9} {'dev GiB':>8} {'MFU upd':>8} " \
           f"{'lp diff max':>12} {'lp diff mean':>12}"
    print(head)
    for r in results:
        print(f"{r['engine']:8} {r['tokens_per_s']:>10.0f} {r['step_s']:>8.2f} {r['generation_s']:>8.2f} "
              f"{r['peak_alloc_gib']:>9.2f} {r['device_used_peak_gib']:>8.2f} {r['mfu_update']:>8.1%} "
              f"{r['logprob_diff_max']:>12.3g} {r['logprob_diff_mean']:>12.3g}")
    return 0 if len(results) == len(args.engines) else 1


if __name__ == "__main__":
    sys.exit(main())
