"""One GRPO step of a 0.5B-parameter Qwen2-shaped model on this CPU: peak RSS and step time.

    python bench/real_size.py                         # 4 cases, 2 new tokens per completion
    python bench/real_size.py --cases full-fp32 lora-bf16 --completion 16 --json real.json

Builds a Qwen2.5-0.5B-shaped ``Qwen2ForCausalLM`` with random weights (hidden 896, 24 layers,
14 heads / 2 KV heads, MLP 4864, its real vocabulary of 151,936 tokens, tied embeddings),
saved in float32 with ``save_pretrained`` to a temporary directory together with a word-level
tokenizer that covers the whole vocabulary (token ``i`` is the word ``w<i>``; prompts are 16
random in-range ids written as words). Each case then runs in a FRESH subprocess one GRPO step
through ``GRPOTrainer`` (2 prompts x 4 completions, ``--completion`` new tokens -- default 2,
because on the 2-core machine this was written on (AVX2, no bf16 instructions) a bfloat16 step
took 2-3 minutes even at 2 tokens; the model is never shrunk -- beta 0.04 so
a reference model is held, a rule reward (words per completion / 16), no eval, no report, no
TensorBoard, no progress bar), so the peak RSS
(``resource.getrusage(RUSAGE_SELF).ru_maxrss`` in the child) belongs to that case alone:

* full-fp32 / full-bf16: full fine-tuning, ``dtype`` float32 / bfloat16;
* lora-fp32 / lora-bf16: ``lora = {r: 8, alpha: 16}`` (all linear layers), same dtypes.

Printed per case: parameters, trainable parameters, peak RSS of the whole child (the larger of
VmHWM after loading the float32 checkpoint and ``ru_maxrss`` at the end -- the watermark reset
below resets ``ru_maxrss`` too), the peak during the step alone (``/proc/self/status`` VmHWM after resetting it through
``/proc/self/clear_refs`` once the trainer is built, read when ``update`` returns: sampling,
rewards, reference and old log-probs, loss, backward, AdamW; the checkpoint and ``final/``
writes that follow are reported apart), the step's wall seconds
(``perf/step_seconds`` of metrics.jsonl: sampling + rewards + update, model load excluded),
the whole child's wall seconds (imports, load, step, final checkpoint), and the memory plan
next to the measurement:

    plan = P x b                      policy parameters (b = 4 float32, 2 bfloat16)
         + P x b                      reference copy (full fine-tuning with beta > 0; with LoRA
                                      the reference is the base model with adapters off: 0)
         + T x b                      gradients of the T trainable parameters
         + 2 x T x b                  AdamW exp_avg + exp_avg_sq (torch keeps them in the
                                      parameter's dtype)
         + 2 x rows x V x 4           the chunked log-prob block [rows, V] float32 and its
                                      gradient (rows = 32 MiB / (4 V) on CPU, trustrl.logprobs)

and "plan + base" adds the child's RSS after ``import torch, transformers, trustrl`` (before
any model exists), which the plan does not model. Activations (16 + completion tokens x 8
sequences) are small next to these at this length and are not in the plan; the final
checkpoint write (model + optimizer) happens inside the child and is inside its peak.

A case whose dtype trustrl refuses on this machine is printed as refused with its message.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

SHAPE = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
             num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096,
             tie_word_embeddings=True, rope_theta=1000000.0)
CASES = {"full-fp32": ("float32", False), "full-bf16": ("bfloat16", False),
         "lora-fp32": ("float32", True), "lora-bf16": ("bfloat16", True)}
BLOCK_BYTES = 32 * 2**20  # trustrl.logprobs._CPU_BLOCK_BYTES


def build_word_tokenizer(vocab_size: int):
    """A word-level fast tokenizer with exactly ``vocab_size`` ids: <pad>, <s>, </s>, <unk>,
    then ``w4`` ... ``w<vocab_size-1>``; words are split on spaces and decoded space-joined."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from trustrl.tiny import BOS, EOS, PAD

    specials = [PAD, BOS, EOS, "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    vocab.update({f"w{i}": i for i in range(len(specials), vocab_size)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    backend.add_special_tokens(specials)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, bos_token=BOS, eos_token=EOS,
                                  unk_token="<unk>")
    tok.padding_side = "left"
    return tok


def build_assets(directory: Path) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from trustrl.data import write_jsonl

    tok = build_word_tokenizer(SHAPE["vocab_size"])
    assert len(tok) == SHAPE["vocab_size"], len(tok)
    config = Qwen2Config(**SHAPE, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(str(directory), safe_serialization=True)
    # The tokenizer lives in its own directory (config ``tokenizer``): beside a config.json of
    # model_type qwen2, transformers 5's AutoTokenizer loads it as a Qwen2Tokenizer (byte-level
    # BPE over this vocabulary), which encodes "w5 w77" to no ids at all.
    tok.save_pretrained(str(directory / "tokenizer"))
    from transformers import AutoTokenizer
    assert AutoTokenizer.from_pretrained(str(directory / "tokenizer"))("w5 w77")["input_ids"] == [5, 77]
    rng = random.Random(0)
    write_jsonl(directory / "prompts.jsonl",
                [{"prompt": " ".join(f"w{rng.randrange(4, SHAPE['vocab_size'])}" for _ in range(16))}
                 for _ in range(16)])


def words_reward(completions, **kwargs):
    """Number of words in the completion / 16 (a rule reward; any value works here)."""
    return [len(c.split()) / 16 for c in completions]


def proc_status(key: str) -> int | None:
    """Bytes of a /proc/self/status entry (VmRSS, VmHWM), None where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def child(args) -> None:
    """One case in this process; prints one JSON line."""
    import resource

    import torch  # noqa: F401
    import transformers  # noqa: F401

    from trustrl.algorithms.grpo import GRPOTrainer
    from trustrl.config import GRPOConfig, LoRAConfig
    from trustrl.logging import read_metrics

    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    dtype, lora = CASES[args.case]
    assets = Path(args.assets)
    out = Path(args.out)
    result = {"case": args.case, "dtype": dtype, "lora": lora, "base_rss": base_rss}
    t0 = time.time()
    try:
        cfg = GRPOConfig(model=str(assets), tokenizer=str(assets / "tokenizer"), dataset=str(assets / "prompts.jsonl"), output_dir=str(out),
                         device="cpu", dtype=dtype, max_steps=1, prompts_per_step=2, group_size=4,
                         max_prompt_length=32, max_completion_length=args.completion, beta=0.04,
                         learning_rate=1e-6, progress=False, tensorboard=False, report=False, seed=0,
                         rewards=[words_reward], lora=LoRAConfig(r=8, alpha=16) if lora else None)
        trainer = GRPOTrainer(cfg)
        result["load_seconds"] = time.time() - t0
        result["after_load_rss"] = proc_status("VmRSS")
        result["load_peak_rss"] = proc_status("VmHWM")
        try:  # reset the peak-RSS watermark, so VmHWM after train() is the step's own peak
            Path("/proc/self/clear_refs").write_text("5")
            result["step_peak_method"] = "VmHWM"
            update = trainer.update

            def update_and_read_peak(*a, **kw):  # the step = collect + update; checkpoints come after
                out = update(*a, **kw)
                result["step_peak_rss"] = proc_status("VmHWM")
                return out

            trainer.update = update_and_read_peak
        except OSError:
            result["step_peak_method"] = "unavailable"
        trainer.train()
    except Exception as exc:  # a refusal is a result: printed, never replaced by a number
        traceback.print_exc()
        result["refused"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        print(json.dumps(result), flush=True)
        return
    result["wall_seconds"] = time.time() - t0
    rows = [r for r in read_metrics(out) if "perf/step_seconds" in r]
    result["step_seconds"] = rows[-1]["perf/step_seconds"]
    result["generation_seconds"] = rows[-1].get("perf/generation_seconds")
    if result["step_peak_method"] == "VmHWM":
        result["after_step_peak_rss"] = proc_status("VmHWM")  # + the final checkpoint and final/ writes
    # ru_maxrss is the kernel's hiwater_rss, which clear_refs reset too: the child's peak is the
    # larger of the loading peak (read before the reset) and ru_maxrss now
    result["peak_rss"] = max(result["load_peak_rss"] or 0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    result["parameters"] = sum(p.numel() for p in trainer.policy.parameters())
    result["trainable"] = sum(p.numel() for p in trainer.policy.parameters() if p.requires_grad)
    print(json.dumps(result), flush=True)


def plan_bytes(params: int, trainable: int, dtype: str, lora: bool, vocab: int) -> int:
    """The memory plan (module docstring): policy + reference + grads + AdamW + log-prob block."""
    b = 4 if dtype == "float32" else 2
    rows = min(1024, max(32, BLOCK_BYTES // (4 * vocab)))
    reference = 0 if lora else params * b
    return params * b + reference + trainable * b + 2 * trainable * b + 2 * rows * vocab * 4


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    p.add_argument("--completion", type=int, default=2, help="max_completion_length")
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--assets", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--case", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker == "build":  # in a child too, so the parent never holds the model
        build_assets(Path(args.assets))
        return
    if args.worker:
        child(args)
        return
    env = {**os.environ, "TRUSTRL_NO_REPORT": "1"}
    gib = 2**30
    with tempfile.TemporaryDirectory(prefix="trustrl-real-size-") as tmp:
        assets = Path(tmp) / "model"
        t = time.time()
        subprocess.run([sys.executable, __file__, "--worker", "build", "--assets", str(assets)], check=True, env=env)
        print(f"model + tokenizer built in {time.time() - t:.0f} s: {assets}", flush=True)
        rows = []
        for case in args.cases:
            load_before = os.getloadavg()
            out = Path(tmp) / f"run-{case}"
            proc = subprocess.run([sys.executable, __file__, "--worker", "1", "--case", case, "--assets", str(assets),
                                   "--out", str(out), "--completion", str(args.completion)],
                                  env=env, capture_output=True, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if proc.returncode != 0 or not lines:
                row = {"case": case, "refused": f"child exit {proc.returncode}: {proc.stderr.strip()[-300:]}"}
            else:
                row = json.loads(lines[-1])
            row["load_avg"] = [round(x, 2) for x in os.getloadavg()]
            row["load_avg_before"] = [round(x, 2) for x in load_before]
            if "parameters" in row:
                row["plan_bytes"] = plan_bytes(row["parameters"], row["trainable"], row["dtype"], row["lora"],
                                               SHAPE["vocab_size"])
            rows.append(row)
            print(json.dumps(row), flush=True)
            subprocess.run(["rm", "-rf", str(out)])
    print(f"\n1 GRPO step, Qwen2-0.5B shape, V = {SHAPE['vocab_size']}, 2 prompts x 4 completions, "
          f"{args.completion} new tokens, CPU ({os.cpu_count()} cores)")
    print("| case | parameters | trainable | RSS after load GiB | peak during step GiB | plan GiB "
          "| plan + base GiB | peak with checkpoint writes GiB | peak of the whole child GiB "
          "| step s | child wall s | load avg (1 min) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "refused" in r:
            print(f"| {r['case']} | refused: {r['refused']} |||||||||| {r['load_avg'][0]} |")
            continue
        nan = float("nan")
        print(f"| {r['case']} | {r['parameters'] / 1e6:.1f}M | {r['trainable'] / 1e6:.2f}M "
              f"| {r['after_load_rss'] / gib:.2f} | {r.get('step_peak_rss', nan * gib) / gib:.2f} "
              f"| {r['plan_bytes'] / gib:.2f} | {(r['plan_bytes'] + r['base_rss']) / gib:.2f} "
              f"| {r.get('after_step_peak_rss', nan * gib) / gib:.2f} | {r['peak_rss'] / gib:.2f} "
              f"| {r['step_seconds']:.1f} | {r['wall_seconds']:.0f} | {r['load_avg_before'][0]} -> {r['load_avg'][0]} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
