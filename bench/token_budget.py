"""Token-budget micro-batches against row-count micro-batches: one GRPO update on a batch whose
completion lengths vary 10x, both splits side by side in one run.

    python bench/token_budget.py                          # 32 completions of 20..200 tokens
    python bench/token_budget.py --rounds 5 --threads 1 --json out.json

The same ``GRPOTrainer.update`` (the trainer's own code: split, trim, log-probs, loss,
backward, optimizer step) runs on the same synthetic scored batch with three settings:

* ``rows``:   ``gradient_accumulation_steps = --accumulation`` (default 4: 8 rows per
  micro-batch, every row padded to the longest completion of the batch);
* ``budget``: ``micro_batch_tokens`` = the padded tokens of one row-count micro-batch
  (rows x (prompt + longest completion)), i.e. the same peak activation size; rows sorted by
  length, each micro-batch trimmed to its own longest row.
* ``packed``: the same budget with ``pack_sequences``: each micro-batch's rows packed into one
  sequence without padding (position ids restart per row; the budget counts real tokens).

A Llama-shaped model (hidden 256, 4 layers, vocabulary 8192 by default; random weights) is
built and saved to a temporary directory and loaded with ``from_pretrained``. Prompts have 16
tokens; completion lengths are spread evenly over [--min-len, --max-len] (10x by default), in
a shuffled order; EOS never occurs inside a completion. The weights are restored before each
update, so both settings see the same model; their loss and gradient norm are printed beside
the times (they agree to float32 summation order). Rounds alternate which setting goes first
(the machine may be shared); reported: median wall and CPU seconds per update, padded tokens
processed, and the ratio rows / budget. The 1-minute load average is printed at the start and
the end.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def build(args, directory: Path):
    from trustrl.data import write_jsonl
    from trustrl.tiny import build_char_tokenizer, build_tiny_llama

    tok = build_char_tokenizer("0123456789+=abcdefghijklmnopqrstuvwxyz ")
    model = build_tiny_llama(args.vocab, hidden_size=args.hidden, num_layers=args.layers, num_heads=4,
                             max_position_embeddings=1024, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                             eos_token_id=tok.eos_token_id, seed=0)
    model.save_pretrained(str(directory), safe_serialization=True)
    tok.save_pretrained(str(directory))
    write_jsonl(directory / "prompts.jsonl", [{"prompt": f"{i}+{i}="} for i in range(8)])


def scored_batch(args, tok):
    from trustrl.loop.experience import ScoredBatch
    from trustrl.rewards.registry import ScoreResult
    from trustrl.rollout import Rollout

    g = torch.Generator().manual_seed(0)
    n, prompt_len = args.rows, 16
    lengths = torch.linspace(args.min_len, args.max_len, n).round().long()[torch.randperm(n, generator=g)]
    width = int(lengths.max())
    low = tok.eos_token_id + 2  # ordinary ids only: no EOS, no padding inside a completion
    prompt_ids = torch.randint(low, args.vocab, (n, prompt_len), generator=g)
    completion_ids = torch.randint(low, args.vocab, (n, width), generator=g)
    mask = torch.arange(width)[None, :] < lengths[:, None]
    completion_ids[~mask] = tok.pad_token_id
    rollout = Rollout(prompt_ids, torch.ones(n, prompt_len, dtype=torch.bool), completion_ids, mask,
                      truncated=torch.zeros(n, dtype=torch.bool))
    total = torch.randn(n, generator=g)
    scores = ScoreResult(total=total, per_function={"synthetic": total}, n_faults={})
    return ScoredBatch(rollout, list(range(n)), [""] * n, [""] * n, scores), lengths


def padded_tokens(trainer, batch) -> int:
    """Tokens the update's forward passes process: rows x (prompt width + completion width)."""
    out = 0
    for rows in trainer.micro_batches(batch.rollout):
        micro = batch.rollout.select(rows)
        if trainer.config.pack_sequences:  # one packed sequence: the real tokens only
            out += int(micro.attention_mask.sum())
            continue
        if trainer.config.micro_batch_tokens:
            micro = micro.trim()
        out += micro.input_ids.numel()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--min-len", type=int, default=20)
    ap.add_argument("--max-len", type=int, default=200)
    ap.add_argument("--accumulation", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=str, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("TRUSTRL_NO_PROGRESS", "1")
    from trustrl.algorithms.grpo import GRPOTrainer
    from trustrl.config import GRPOConfig
    from trustrl.trainers.common import FaultCounter

    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        build(args, directory)
        group = 8
        base = GRPOConfig(model=str(directory), dataset=str(directory / "prompts.jsonl"), output_dir=str(directory / "run"),
                          prompts_per_step=args.rows // group, group_size=group, max_prompt_length=16,
                          max_completion_length=args.max_len, beta=0.0, learning_rate=1e-6, progress=False,
                          tensorboard=False, seed=0, rewards=[], cpu_threads=args.threads,
                          gradient_accumulation_steps=args.accumulation)
        trainer = GRPOTrainer(base, reward_funcs=[lambda prompts, completions, **kw: [0.0] * len(completions)])
        trainer.setup()
        batch, lengths = scored_batch(args, trainer.tokenizer)
        budget = -(-args.rows // args.accumulation) * (16 + args.max_len)
        configs = {"rows": base,
                   "budget": base.model_copy(update={"gradient_accumulation_steps": 1, "micro_batch_tokens": budget}),
                   "packed": base.model_copy(update={"gradient_accumulation_steps": 1, "micro_batch_tokens": budget,
                                                     "pack_sequences": True})}
        state = copy.deepcopy(trainer.policy.state_dict())
        results: dict[str, dict] = {k: {"wall": [], "cpu": []} for k in configs}
        order = list(configs)
        for rnd in range(args.rounds):
            for name in (order if rnd % 2 == 0 else order[::-1]):
                trainer.config = configs[name]
                trainer.policy.load_state_dict(state)
                t0, c0 = time.perf_counter(), time.process_time()
                metrics = trainer.update(batch, 1, FaultCounter(limit=3))
                results[name]["wall"].append(time.perf_counter() - t0)
                results[name]["cpu"].append(time.process_time() - c0)
                results[name]["loss"] = metrics["loss/total"]
                results[name]["grad_norm"] = metrics["optim/grad_norm"]
                trainer.config = configs[name]
                results[name]["padded_tokens"] = padded_tokens(trainer, batch)
                results[name]["micro_batches"] = len(trainer.micro_batches(batch.rollout))
    load_end = os.getloadavg()[0]
    valid = int(lengths.sum()) + 16 * args.rows
    print(f"batch: {args.rows} completions of {int(lengths.min())}..{int(lengths.max())} tokens "
          f"({int(lengths.max()) / int(lengths.min()):.0f}x), prompts of 16; {valid} real tokens; model hidden "
          f"{args.hidden}, {args.layers} layers, vocab {args.vocab}; threads {torch.get_num_threads()}; "
          f"budget {budget} tokens; load average {load_start:.2f} -> {load_end:.2f}")
    print(f"{'split':8} {'micro':>5} {'padded tok':>10} {'wall s':>8} {'cpu s':>8} {'loss':>14} {'grad norm':>12}")
    for name, r in results.items():
        r["wall_median"], r["cpu_median"] = statistics.median(r["wall"]), statistics.median(r["cpu"])
        print(f"{name:8} {r['micro_batches']:>5} {r['padded_tokens']:>10} {r['wall_median']:>8.3f} "
              f"{r['cpu_median']:>8.3f} {r['loss']:>14.8f} {r['grad_norm']:>12.8f}")
    for name in ("budget", "packed"):
        ratio = results["rows"]["wall_median"] / results[name]["wall_median"]
        cpu_ratio = results["rows"]["cpu_median"] / results[name]["cpu_median"]
        results[name]["speedup_wall"], results[name]["speedup_cpu"] = ratio, cpu_ratio
        print(f"speed-up rows / {name}: wall {ratio:.2f}x, cpu {cpu_ratio:.2f}x; processed tokens "
              f"{results['rows']['padded_tokens'] / results[name]['padded_tokens']:.2f}x fewer")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results, "load": [load_start, load_end]},
                                              indent=1))


if __name__ == "__main__":
    sys.exit(main())
