"""One GRPO step of trustrl against one of TRL's GRPOTrainer, on the same local model.

    python bench/grpo_vs_trl.py --json out.json            # full fine-tuning, both sides
    python bench/grpo_vs_trl.py --lora --json lora.json    # LoRA: memory saved vs a reference copy

What is compared (identical on both sides):
  * one Llama-style causal LM (4 layers, hidden 256, untied 32k-token embedding and LM head:
    about 21M parameters) with a byte-level BPE tokenizer trained here with `tokenizers` on
    generated text; both saved to one directory and loaded from it with `from_pretrained`;
  * the same 64 prompts of exactly 16 tokens, 8 prompts x 8 completions per step, completions
    of exactly 64 tokens, temperature 1, no top-p / top-k, beta 0.04 (k3 KL in the loss),
    mu = 1, AdamW at lr 1e-6, constant schedule, grad-norm clip 1.0, token-mean loss
    (TRL "dapo"), group-scaled advantages, one micro-batch of 64 completions, float32 on CPU;
  * equal workloads: EOS is suppressed during sampling on both sides by the same forward hook
    on the policy's LM head (the EOS logit is set to -inf, as `min_new_tokens` would do), so
    every completion has exactly `--max-completion-length` tokens and neither side can stop
    early; log-probs are of the unmodified model on both sides;
  * no checkpoint writes, no evaluation, no progress bars on either side.

Each side runs in its own subprocess (so peak RSS is per side), in alternation
(trustrl, TRL, trustrl, TRL, ...), because the machine is shared and noisy. Per run, the
first step is warm-up and not timed; the median is over all timed steps of all runs of a side,
peak RSS (ru_maxrss of the worker process) the median over its runs.

Both sides start with torch's default intra-op threads; `--threads N` pins both (trustrl's
`cpu_threads` setting; no thread count is ever chosen by timing). On a machine shared with
other jobs two threads stall on descheduled barriers, so `--threads 1` gives the steadier,
purely algorithmic comparison. CPU seconds per step (process time, all threads) are
reported beside wall time: on a shared machine they are the steadier number.

On CUDA (when present, or `--device cuda`) both sides run in bfloat16 with SDPA attention and
the peak GPU memory (torch.cuda.max_memory_allocated) is reported as well.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# ----------------------------------------------------------------------------------------------
# the shared workload
# ----------------------------------------------------------------------------------------------

MODEL = dict(vocab_size=32768, hidden_size=256, intermediate_size=1024, num_layers=4, num_heads=4)
PROMPT_TOKENS = 16
N_PROMPTS = 64


def _words(rng: random.Random, n: int) -> list[str]:
    """Pseudo-words from syllables, Zipf-ish over a fixed lexicon, so BPE has plenty to merge."""
    onsets = ["", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w",
              "z", "br", "ch", "cl", "dr", "fl", "gr", "pl", "pr", "sh", "st", "th", "tr", "qu"]
    nuclei = ["a", "e", "i", "o", "u", "ai", "ea", "ee", "oo", "ou", "y"]
    codas = ["", "", "", "n", "r", "s", "t", "l", "m", "ng", "ck", "st"]
    lexicon = []
    for _ in range(120_000):
        k = rng.choice([1, 2, 2, 3, 3, 4])
        lexicon.append("".join(rng.choice(onsets) + rng.choice(nuclei) + rng.choice(codas) for _ in range(k)))
    weights = [1.0 / (i + 10) for i in range(len(lexicon))]
    return rng.choices(lexicon, weights=weights, k=n)


def build_assets(root: Path, device_dtype: str = "float32") -> Path:
    """Tokenizer (byte-level BPE, 32k) + Llama model + prompts, saved under ``root`` (cached)."""
    key = hashlib.sha1(json.dumps([MODEL, PROMPT_TOKENS, N_PROMPTS, 2]).encode()).hexdigest()[:10]
    out = root / f"assets-{key}"
    if (out / "model" / "config.json").is_file() and (out / "prompts.jsonl").is_file():
        return out
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    rng = random.Random(0)
    words = _words(rng, 600_000)
    lines = [" ".join(words[i:i + 12]) + "." for i in range(0, len(words), 12)]
    specials = ["<pad>", "<s>", "</s>"]
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=MODEL["vocab_size"], special_tokens=specials, min_frequency=1,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(lines, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    tok.padding_side = "left"
    vocab = len(tok)
    if vocab < 32000:
        raise RuntimeError(f"BPE produced only {vocab} tokens; need >= 32000")
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=MODEL["hidden_size"], intermediate_size=MODEL["intermediate_size"],
        num_hidden_layers=MODEL["num_layers"], num_attention_heads=MODEL["num_heads"],
        num_key_value_heads=MODEL["num_heads"], max_position_embeddings=256, tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        attention_dropout=0.0,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    (out / "model").mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out / "model"), safe_serialization=True)
    tok.save_pretrained(str(out / "model"))
    # prompts of exactly PROMPT_TOKENS tokens, so both sides see the same padding-free shapes
    prompts: list[str] = []
    prng = random.Random(1)
    while len(prompts) < N_PROMPTS:
        text = " ".join(_pick(prng, words, 14))
        ids = tok(text)["input_ids"][:PROMPT_TOKENS]
        cand = tok.decode(ids)
        if len(tok(cand)["input_ids"]) == PROMPT_TOKENS and cand not in prompts:
            prompts.append(cand)
    with open(out / "prompts.jsonl", "w", encoding="utf-8") as f:
        for p in prompts:
            f.write(json.dumps({"prompt": p}) + "\n")
    return out


def _pick(rng: random.Random, words: list[str], k: int) -> list[str]:
    start = rng.randrange(0, len(words) - k)
    return words[start:start + k]


def count_a(prompts, completions, **columns):
    """The reward of both sides: the share of 'a' characters in the completion."""
    return [c.count("a") / max(len(c), 1) for c in completions]


def suppress_eos(model, eos_id: int):
    """Forward hook on the LM head: EOS logit -> -inf while sampling (equal-length completions)."""
    head = model.get_output_embeddings()

    def hook(_module, _inputs, logits):
        logits[..., eos_id] = float("-inf")
        return logits

    return head.register_forward_hook(hook)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# ----------------------------------------------------------------------------------------------
# workers (one side, one process)
# ----------------------------------------------------------------------------------------------


def _device_setup(args):
    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = "bfloat16" if device.startswith("cuda") else "float32"
    if args.threads:
        torch.set_num_threads(args.threads)
    return device, dtype


def worker_trustrl(args, assets: Path) -> dict:
    import torch

    device, dtype = _device_setup(args)
    from transformers import AutoModelForCausalLM

    import trustrl.trainers.common as common_module
    import trustrl.algorithms.grpo as grpo_module
    from trustrl.config import GRPOConfig, LoRAConfig
    from trustrl.logging import read_metrics

    # no checkpoint / final-model writes (TRL runs with save_strategy="no")
    common_module.Run.should_save = lambda self, *a, **k: False
    grpo_module.save_model = lambda model, tok, directory, *a, **k: Path(directory)
    model_dir = str(assets / "model")
    out_dir = tempfile.mkdtemp(prefix="trustrl-bench-")
    cfg = GRPOConfig(
        model=model_dir, dataset=str(assets / "prompts.jsonl"), output_dir=out_dir, seed=args.seed,
        device=device, dtype=dtype, max_steps=args.steps, prompts_per_step=args.prompts,
        group_size=args.group_size, max_completion_length=args.max_completion_length, max_prompt_length=64,
        learning_rate=1e-6, beta=args.beta, num_iterations=1, temperature=1.0, top_p=1.0,
        loss_aggregation="token_mean", advantage_scale="group", clip_low=0.2, kl_estimator="k3",
        max_grad_norm=1.0, gradient_accumulation_steps=1, forward_batch_size=args.prompts * args.group_size,
        progress=False, tensorboard=False, rewards=[],
        lora=LoRAConfig(r=16, alpha=32) if args.lora else None,
    )
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    policy = None
    if device.startswith("cuda"):
        # same loading path as load_policy, with SDPA attention requested explicitly
        from trustrl.models import apply_lora, disable_dropout

        policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation="sdpa")
        disable_dropout(policy)
        if cfg.lora is not None:
            policy = apply_lora(policy, cfg.lora)
        policy = policy.to(device)
    trainer = grpo_module.GRPOTrainer(cfg, reward_funcs=[count_a], model=policy)
    base = trainer.policy.get_base_model() if hasattr(trainer.policy, "get_base_model") else trainer.policy
    suppress_eos(base, trainer.tokenizer.eos_token_id)
    # process CPU seconds per step (all threads), from the step's first call to its log line
    cpu_marks: list[list[float]] = []
    collect = trainer.collect

    def timed_collect(*a, **k):
        cpu_marks.append([time.process_time()])
        return collect(*a, **k)

    trainer.collect = timed_collect
    log = common_module.Run.log

    def timed_log(self, step, metrics):
        if cpu_marks and len(cpu_marks[-1]) == 1:
            cpu_marks[-1].append(time.process_time())
        return log(self, step, metrics)

    common_module.Run.log = timed_log
    rss_loaded = current_rss_mb()
    trainer.train()
    rows = [r for r in read_metrics(out_dir) if "perf/step_seconds" in r]
    gen = [r.get("perf/generation_seconds") for r in rows]
    lengths = [r.get("completion/mean_length") for r in rows]
    return {
        "side": "trustrl", "lora": args.lora, "device": device, "dtype": dtype,
        "step_seconds": [r["perf/step_seconds"] for r in rows], "generation_seconds": gen,
        "step_cpu_seconds": [m[1] - m[0] for m in cpu_marks if len(m) == 2],
        "mean_completion_length": lengths, "rss_after_load_mb": rss_loaded, "peak_rss_mb": peak_rss_mb(),
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None,
        "n_params": sum(p.numel() for p in trainer.policy.parameters()),
        "n_trainable": sum(p.numel() for p in trainer.policy.parameters() if p.requires_grad),
        "reference_copy": trainer.reference is not None,
    }


def worker_trl(args, assets: Path) -> dict:
    import torch

    device, dtype = _device_setup(args)
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    model_dir = str(assets / "model")
    prompts = [json.loads(line) for line in open(assets / "prompts.jsonl", encoding="utf-8")]
    dataset = Dataset.from_list(prompts)
    tok = AutoTokenizer.from_pretrained(model_dir)
    on_cuda = device.startswith("cuda")
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.bfloat16 if on_cuda else torch.float32,
        **({"attn_implementation": "sdpa"} if on_cuda else {}),
    )
    batch = args.prompts * args.group_size
    cfg = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-bench-"), seed=args.seed, max_steps=args.steps,
        per_device_train_batch_size=batch, gradient_accumulation_steps=1, num_generations=args.group_size,
        max_completion_length=args.max_completion_length, learning_rate=1e-6, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, beta=args.beta, num_iterations=1, epsilon=0.2,
        temperature=1.0, top_p=1.0, top_k=0, loss_type="dapo", scale_rewards="group",
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, log_completions=False,
        use_cpu=not on_cuda, bf16=on_cuda, dataloader_num_workers=0,
        model_init_kwargs={"dtype": "bfloat16" if on_cuda else "float32",
                           **({"attn_implementation": "sdpa"} if on_cuda else {})},
    )
    peft_config = None
    if args.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                 task_type="CAUSAL_LM")

    class Timer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []
            self.cpu: list[float] = []
            self.t0 = self.c0 = 0.0

        def on_step_begin(self, *a, **k):
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self.t0)
            self.cpu.append(time.process_time() - self.c0)

    timer = Timer()
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer = GRPOTrainer(model=model, reward_funcs=[count_a], args=cfg, train_dataset=dataset,
                          processing_class=tok, callbacks=[timer], peft_config=peft_config)
    m = trainer.model
    base = m.get_base_model() if hasattr(m, "get_base_model") else m
    suppress_eos(base, tok.eos_token_id)
    rss_loaded = current_rss_mb()
    trainer.train()
    lengths = [h.get("completions/mean_length") for h in trainer.state.log_history if "completions/mean_length" in h]
    return {
        "side": "trl", "lora": args.lora, "device": device, "dtype": dtype,
        "step_seconds": timer.times, "generation_seconds": None, "step_cpu_seconds": timer.cpu, "mean_completion_length": lengths,
        "rss_after_load_mb": rss_loaded, "peak_rss_mb": peak_rss_mb(),
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if on_cuda else None,
        "n_params": sum(p.numel() for p in m.parameters()),
        "n_trainable": sum(p.numel() for p in m.parameters() if p.requires_grad),
        "reference_copy": getattr(trainer, "ref_model", None) is not None,
        "trl_version": __import__("trl").__version__,
    }


def profile_trustrl(args, assets: Path) -> dict:
    """Phase timers (wall and process CPU seconds) around one trustrl GRPO step, plus the top
    torch operators of the last step; what bench/README.md summarizes."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    _device_setup(args)
    import trustrl.trainers.common as common_module
    import trustrl.algorithms.grpo as grpo_module
    import trustrl.loop.experience as rl_module
    from trustrl.config import GRPOConfig, LoRAConfig

    common_module.Run.should_save = lambda self, *a, **k: False
    grpo_module.save_model = lambda model, tok, directory, *a, **k: Path(directory)
    phases: dict[str, list[float]] = {}

    def timed(name, fn):
        def wrapper(*a, **k):
            w, c = time.perf_counter(), time.process_time()
            try:
                return fn(*a, **k)
            finally:
                phases.setdefault(name, [0.0, 0.0])
                phases[name][0] += time.perf_counter() - w
                phases[name][1] += time.process_time() - c
        return wrapper

    rl_module.generate = timed("generate", rl_module.generate)
    rl_module.RewardSuite.score = timed("rewards", rl_module.RewardSuite.score)
    grpo_module.batched_completion_logprobs = timed("reference logprobs", grpo_module.batched_completion_logprobs)
    grpo_module.completion_logprobs = timed("policy logprobs (forward)", grpo_module.completion_logprobs)
    grpo_module.guarded_step = timed("clip + optimizer step", grpo_module.guarded_step)
    orig_backward = torch.Tensor.backward
    torch.Tensor.backward = timed("backward", orig_backward)
    cfg = GRPOConfig(
        model=str(assets / "model"), dataset=str(assets / "prompts.jsonl"), output_dir=tempfile.mkdtemp(),
        seed=args.seed, device="cpu", max_steps=args.steps, prompts_per_step=args.prompts,
        group_size=args.group_size, max_completion_length=args.max_completion_length, learning_rate=1e-6,
        beta=args.beta, progress=False, tensorboard=False, rewards=[],
        forward_batch_size=args.prompts * args.group_size,
        lora=LoRAConfig(r=16, alpha=32) if args.lora else None,
    )
    trainer = grpo_module.GRPOTrainer(cfg, reward_funcs=[count_a])
    base = trainer.policy.get_base_model() if hasattr(trainer.policy, "get_base_model") else trainer.policy
    suppress_eos(base, trainer.tokenizer.eos_token_id)
    step_times: list[float] = []
    orig_log = common_module.Run.log

    def log(self, step, metrics):
        step_times.append(metrics.get("perf/step_seconds", float("nan")))
        return orig_log(self, step, metrics)

    common_module.Run.log = log
    cfg.max_steps = args.steps
    wall, cpu = time.perf_counter(), time.process_time()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        trainer.train()
    total = [time.perf_counter() - wall, time.process_time() - cpu]
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)
    return {"phases": phases, "total": total, "step_seconds": step_times, "steps": args.steps,
            "peak_rss_mb": peak_rss_mb(), "top_ops": table}


# ----------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------


def run_worker(side: str, args, assets: Path, lora: bool) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", side, "--assets", str(assets),
           "--steps", str(args.steps), "--prompts", str(args.prompts), "--group-size", str(args.group_size),
           "--max-completion-length", str(args.max_completion_length), "--beta", str(args.beta),
           "--seed", str(args.seed), "--device", args.device, "--threads", str(args.threads)]
    if lora:
        cmd.append("--lora")
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false",
               TRUSTRL_NO_PROGRESS="1", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    if args.malloc_mmap_threshold:
        # glibc: allocations above this size are mmap'd and returned to the OS when freed, so
        # peak RSS measures live tensors rather than heap fragmentation (both sides alike)
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    marker = "BENCH_RESULT "
    for line in proc.stdout.splitlines():
        if line.startswith(marker):
            return json.loads(line[len(marker):])
    raise RuntimeError(f"{side} worker failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")


def summarize(results: list[dict], tokens_per_step: int) -> dict:
    timed = [t for r in results for t in r["step_seconds"][1:]]  # first step of each run is warm-up
    med = statistics.median(timed)
    cpu = [t for r in results for t in r.get("step_cpu_seconds", [])[1:]]
    gpu = [r["peak_gpu_mb"] for r in results if r.get("peak_gpu_mb") is not None]
    return {
        "runs": len(results), "timed_steps": len(timed), "median_step_seconds": med,
        "min_step_seconds": min(timed), "max_step_seconds": max(timed),
        "tokens_per_second": tokens_per_step / med,
        "median_step_cpu_seconds": statistics.median(cpu) if cpu else None,
        "median_peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in results),
        "peak_rss_mb_runs": [round(r["peak_rss_mb"], 1) for r in results],
        "median_rss_after_load_mb": statistics.median(r["rss_after_load_mb"] for r in results),
        "median_peak_gpu_mb": statistics.median(gpu) if gpu else None,
        "mean_completion_length": [x for r in results for x in (r["mean_completion_length"] or [])],
        "n_params": results[0]["n_params"], "n_trainable": results[0]["n_trainable"],
        "reference_copy": results[0]["reference_copy"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4, help="GRPO steps per run (the first is warm-up)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating runs per side")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--max-completion-length", type=int, default=64)
    ap.add_argument("--beta", type=float, default=0.04)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--lora", action="store_true",
                    help="LoRA (r 16, all linear layers) on both sides, plus a trustrl full fine-tuning run "
                         "for the memory saved by not holding a reference copy")
    ap.add_argument("--sides", default="trustrl,trl", help="comma-separated: trustrl, trl")
    ap.add_argument("--malloc-mmap-threshold", type=int, default=0,
                    help="set glibc's MALLOC_MMAP_THRESHOLD_ (bytes) in both workers, e.g. 1048576: freed "
                         "large blocks go back to the OS, so peak RSS tracks live memory, not fragmentation")
    ap.add_argument("--assets", default=None, help="asset directory (default: a cache under the temp dir)")
    ap.add_argument("--json", default=None, help="write the summary here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        assets = Path(args.assets)
        fn = {"trustrl": worker_trustrl, "trl": worker_trl, "profile": profile_trustrl}[args.worker]
        result = fn(args, assets)
        print("BENCH_RESULT " + json.dumps(result), flush=True)
        return 0

    root = Path(args.assets) if args.assets else Path(tempfile.gettempdir()) / "trustrl-bench"
    t = time.time()
    assets = build_assets(root)
    print(f"assets: {assets} ({time.time() - t:.0f} s)", flush=True)
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    plan: list[tuple[str, bool]] = [(s, args.lora) for s in sides]
    if args.lora:
        plan.append(("trustrl", False))  # full fine-tuning with a reference copy, for the memory comparison
    results: dict[str, list[dict]] = {}
    for rnd in range(args.rounds):
        for side, lora in plan:
            name = side + ("-lora" if lora else "")
            t = time.time()
            r = run_worker(side, args, assets, lora)
            results.setdefault(name, []).append(r)
            steps = ", ".join(f"{x:.1f}" for x in r["step_seconds"])
            cpu = ", ".join(f"{x:.1f}" for x in r.get("step_cpu_seconds", []))
            print(f"round {rnd + 1}/{args.rounds} {name:13s} step s [{steps}] cpu s [{cpu}], "
                  f"peak RSS {r['peak_rss_mb']:.0f} MB (run {time.time() - t:.0f} s)", flush=True)
    tokens = args.prompts * args.group_size * args.max_completion_length
    summary = {name: summarize(rs, tokens) for name, rs in results.items()}
    report = {
        "workload": {"model": MODEL, "prompt_tokens": PROMPT_TOKENS, "prompts_per_step": args.prompts,
                     "group_size": args.group_size, "completion_tokens": args.max_completion_length,
                     "beta": args.beta, "mu": 1, "learning_rate": 1e-6, "lora": args.lora,
                     "steps_per_run": args.steps, "rounds": args.rounds,
                     "equal_length": "EOS logit set to -inf during sampling by the same LM-head hook on both sides",
                     "threads": args.threads or "torch default", "device": args.device,
                     "malloc_mmap_threshold": args.malloc_mmap_threshold or "glibc default"},
        "sides": summary,
    }
    a, b = ("trustrl-lora", "trl-lora") if args.lora else ("trustrl", "trl")
    if a in summary and b in summary:
        report["step_time_ratio"] = summary[a]["median_step_seconds"] / summary[b]["median_step_seconds"]
        report["peak_rss_ratio"] = summary[a]["median_peak_rss_mb"] / summary[b]["median_peak_rss_mb"]
        if summary[a].get("median_step_cpu_seconds") and summary[b].get("median_step_cpu_seconds"):
            report["step_cpu_ratio"] = summary[a]["median_step_cpu_seconds"] / summary[b]["median_step_cpu_seconds"]
        if summary[a].get("median_peak_gpu_mb") and summary[b].get("median_peak_gpu_mb"):
            report["peak_gpu_ratio"] = summary[a]["median_peak_gpu_mb"] / summary[b]["median_peak_gpu_mb"]
    if args.lora and "trustrl" in summary and "trustrl-lora" in summary:
        report["lora_peak_rss_saved_mb"] = summary["trustrl"]["median_peak_rss_mb"] - summary["trustrl-lora"]["median_peak_rss_mb"]
    print_table(report, args)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


def print_table(report: dict, args) -> None:
    s = report["sides"]
    print()
    print(f"GRPO step: {args.prompts} prompts x {args.group_size} completions x {args.max_completion_length} tokens, "
          f"beta {args.beta}, mu 1; {report['workload']['equal_length']}")
    print(f"{'side':14s} {'median step s':>14s} {'min..max s':>14s} {'CPU s/step':>11s} {'tok/s':>7s} "
          f"{'peak RSS MB':>12s} {'RSS loaded MB':>14s} {'trainable':>10s} {'ref copy':>9s}")
    for name, v in s.items():
        cpu = v.get("median_step_cpu_seconds")
        print(f"{name:14s} {v['median_step_seconds']:14.2f} "
              f"{v['min_step_seconds']:6.2f}..{v['max_step_seconds']:<6.2f} "
              f"{(f'{cpu:.2f}' if cpu else '-'):>11s} {v['tokens_per_second']:7.0f} "
              f"{v['median_peak_rss_mb']:12.0f} {v['median_rss_after_load_mb']:14.0f} {v['n_trainable']:10d} "
              f"{str(v['reference_copy']):>9s}")
    print("(tok/s: completion tokens per step / median step time; CPU s/step: process CPU time, all threads)")
    if "step_time_ratio" in report:
        extra = f"   step_cpu_ratio = {report['step_cpu_ratio']:.3f}" if "step_cpu_ratio" in report else ""
        print(f"step_time_ratio (trustrl/TRL) = {report['step_time_ratio']:.3f}   "
              f"peak_rss_ratio (trustrl/TRL) = {report['peak_rss_ratio']:.3f}{extra}")
    if "lora_peak_rss_saved_mb" in report:
        print(f"LoRA (base model as reference) vs full fine-tuning with a reference copy: "
              f"{report['lora_peak_rss_saved_mb']:.0f} MB less peak RSS")


if __name__ == "__main__":
    sys.exit(main())
