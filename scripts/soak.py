"""Soak test (outside CI): run the GRPO stage of the demo task for a fixed wall-clock time and
watch the process's resident memory, threads and open files for growth.

    .venv/bin/python scripts/soak.py                 # 30 minutes (the acceptance run)
    .venv/bin/python scripts/soak.py --minutes 3     # a smoke run

What runs: the demo's arithmetic task (trustrl.tasks.arithmetic) and tiny Llama
(trustrl.tiny) at the demo's size, a short pre-training + SFT warm start so completions look
like answers (``--pretrain-steps`` / ``--sft-steps``; or ``--model DIR`` to start from a
trained model, e.g. ``runs/demo/sft/final``), then GRPO with the demo's settings (read from
``trustrl.tasks.demo.DemoSettings``: prompts x completions per step, learning rate, KL to a
reference model, the two rewards, greedy evaluation every ``eval_every`` steps, torch threads)
plus a checkpoint every ``--save-every`` steps, until the time is up.

Every ``--sample-every`` GRPO steps (after a ``gc.collect()``) it records resident memory
(RSS: psutil when installed, else /proc/self/statm), live threads and open file descriptors.
Warm-up ends at the first sample taken once ``--warmup-fraction`` of the time has passed.
RSS moves by tens of MB from one sample to the next (allocator arenas), so "after warm-up"
and "at the end" are medians over a window of k samples (k = 10% of the post-warm-up
samples, at least 3); the single-sample values are reported beside them. It prints and
writes (``<output-dir>/soak.json``) RSS after warm-up and at the end, the growth in percent
(target: below ``--target-pct``, 5 by default), the least-squares slope of RSS over the
post-warm-up samples in MB per hour, and every sample. Exit status 0 when the growth is
within the target, 1 otherwise.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path


def rss_bytes() -> int:
    """Resident set size of this process."""
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        with open("/proc/self/statm") as f:
            resident_pages = int(f.read().split()[1])
        return resident_pages * os.sysconf("SC_PAGE_SIZE")


def open_fds() -> int | None:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return None


def slope_per_hour(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of y over x (x in seconds), scaled to units per hour."""
    if len(points) < 2:
        return None
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        return None
    sxy = sum((x - mx) * (y - my) for x, y in points)
    return sxy / sxx * 3600.0


class SoakDone(Exception):
    """Raised between two GRPO steps once the time is up."""


# Values that trustrl.tasks.demo.run_demo writes inline rather than in DemoSettings; keep them
# equal to the demo's (everything else comes from DemoSettings itself).
DEMO_MAX_POSITIONS = 96
DEMO_BLOCK_SIZE = 64
DEMO_SFT_MAX_LENGTH = 48
DEMO_MAX_COMPLETION = 28
DEMO_MAX_PROMPT = 16


def warm_start(out: Path, args, demo) -> Path:
    """Data, a demo-sized tiny model, and a short pre-training + SFT; returns the SFT model."""
    from trustrl.config import PretrainConfig, SFTConfig
    from trustrl.tasks.arithmetic import CHARS, SPECIAL_TOKENS
    from trustrl.tiny import create_tiny_model_dir
    from trustrl.trainers.sft import PretrainTrainer, SFTTrainer

    init = create_tiny_model_dir(out / "init", chars=CHARS + "\n", special_tokens=SPECIAL_TOKENS, seed=args.seed,
                                 hidden_size=demo.hidden_size, num_layers=demo.num_layers, num_heads=demo.num_heads,
                                 max_position_embeddings=DEMO_MAX_POSITIONS)
    common = dict(seed=args.seed, progress=False, tensorboard=False, device=args.device)
    model = init
    if args.pretrain_steps:
        pre = PretrainConfig(model=str(model), dataset=str(args.data["pretrain"]), output_dir=str(out / "pretrain"),
                             max_steps=args.pretrain_steps, batch_size=demo.pretrain_batch, block_size=DEMO_BLOCK_SIZE,
                             learning_rate=demo.pretrain_lr, **common)
        model = Path(PretrainTrainer(pre).train()["model_dir"])
    if args.sft_steps:
        sft = SFTConfig(model=str(model), dataset=str(args.data["sft"]), output_dir=str(out / "sft"),
                        max_steps=args.sft_steps, batch_size=demo.sft_batch, learning_rate=demo.sft_lr,
                        max_length=DEMO_SFT_MAX_LENGTH, **common)
        model = Path(SFTTrainer(sft).train()["model_dir"])
    return model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=30.0, help="GRPO wall-clock time (default 30)")
    p.add_argument("--output-dir", default="runs/soak")
    p.add_argument("--sample-every", type=int, default=5, help="GRPO steps between memory samples")
    p.add_argument("--warmup-fraction", type=float, default=0.2,
                   help="share of the time before the 'after warm-up' sample (default 0.2)")
    p.add_argument("--target-pct", type=float, default=5.0, help="allowed RSS growth after warm-up, percent")
    p.add_argument("--model", help="start GRPO from this model directory (skips the warm start)")
    p.add_argument("--pretrain-steps", type=int, default=60)
    p.add_argument("--sft-steps", type=int, default=30)
    p.add_argument("--save-every", type=int, default=50, help="checkpoint every N GRPO steps (0: never)")
    p.add_argument("--eval-every", type=int, default=None,
                   help="greedy evaluation every N GRPO steps (default: the demo's; 0: only before the first step)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: the demo's setting; 0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.minutes <= 0 or args.sample_every < 1 or not 0 <= args.warmup_fraction < 1:
        p.error("--minutes must be > 0, --sample-every >= 1, 0 <= --warmup-fraction < 1")

    os.environ.setdefault("TRUSTRL_NO_PROGRESS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import torch

    from trustrl.config import GRPOConfig
    from trustrl.tasks.arithmetic import FORMAT_PATTERN, AdditionTask, write_task_data
    from trustrl.tasks.demo import DemoSettings
    from trustrl.algorithms.grpo import GRPOTrainer

    demo = DemoSettings(seed=args.seed)
    threads = getattr(demo, "torch_threads", None) if args.threads is None else args.threads
    if threads:
        torch.set_num_threads(threads)
    eval_every = demo.eval_every if args.eval_every is None else args.eval_every
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    args.data = write_task_data(out / "data", AdditionTask(digits=demo.digits), seed=args.seed,
                                n_eval=demo.eval_prompts, sft_carry_slip_rate=demo.sft_carry_slip_rate)
    t = time.time()
    model = Path(args.model) if args.model else warm_start(out, args, demo)
    warm_start_seconds = time.time() - t

    # the demo's GRPO stage, with no step limit: the clock stops it
    cfg = GRPOConfig(
        model=str(model), dataset=str(args.data["rl"]), eval_dataset=str(args.data["eval"]),
        output_dir=str(out / "grpo"), max_steps=10**7, prompts_per_step=demo.grpo_prompts, group_size=demo.group_size,
        learning_rate=demo.grpo_lr, beta=demo.beta, max_completion_length=DEMO_MAX_COMPLETION,
        max_prompt_length=DEMO_MAX_PROMPT, temperature=1.0, eval_prompts=demo.eval_prompts,
        eval_every=eval_every, save_every=args.save_every, keep_last_checkpoints=2,
        rewards=[{"name": "numeric_answer", "alias": "correct"},
                 {"name": "format", "alias": "format", "weight": 0.1, "kwargs": {"pattern": FORMAT_PATTERN}}],
        eval_reward="correct", seed=args.seed, device=args.device, progress=False, tensorboard=False,
    )
    duration = args.minutes * 60.0
    samples: list[dict] = []

    class SoakTrainer(GRPOTrainer):
        """GRPO that samples memory between steps and stops when the time is up."""

        steps_done = 0
        started = 0.0

        def collect(self, sampler):
            elapsed = time.time() - self.started
            if self.steps_done % args.sample_every == 0 or elapsed >= duration:
                gc.collect()
                samples.append({"step": self.steps_done, "seconds": round(elapsed, 2),
                                "rss_mb": round(rss_bytes() / 2**20, 2), "threads": threading.active_count(),
                                "open_fds": open_fds()})
                s = samples[-1]
                print(f"step {s['step']:6d}  t={s['seconds']:8.1f}s  rss={s['rss_mb']:9.1f} MB  "
                      f"threads={s['threads']}  fds={s['open_fds']}", flush=True)
            if elapsed >= duration:
                raise SoakDone()
            self.steps_done += 1
            return super().collect(sampler)

    trainer = SoakTrainer(cfg)
    rss_before_grpo = rss_bytes() / 2**20
    trainer.started = time.time()
    try:
        trainer.train()
    except SoakDone:
        pass
    grpo_seconds = time.time() - trainer.started

    warmup_s = args.warmup_fraction * duration
    after_warmup = next((s for s in samples if s["seconds"] >= warmup_s), samples[-1])
    end = samples[-1]
    post_samples = [s for s in samples if s["seconds"] >= after_warmup["seconds"]]
    post = [(s["seconds"], s["rss_mb"]) for s in post_samples]
    # RSS moves by tens of MB between samples (allocator arenas), so the verdict compares the
    # median of a window of samples right after warm-up with the median of the last window
    k = max(1, min(len(post_samples) // 2, max(3, len(post_samples) // 10)))
    rss_warm = statistics.median(s["rss_mb"] for s in post_samples[:k])
    rss_end = statistics.median(s["rss_mb"] for s in post_samples[-k:])
    growth = 100.0 * (rss_end - rss_warm) / rss_warm
    result = {
        "minutes": args.minutes,
        "grpo_steps": trainer.steps_done,
        "grpo_seconds": round(grpo_seconds, 1),
        "seconds_per_step": round(grpo_seconds / max(trainer.steps_done, 1), 3),
        "warm_start_seconds": round(warm_start_seconds, 1),
        "warmup_seconds": warmup_s,
        "rss_mb_before_grpo": round(rss_before_grpo, 1),
        "rss_mb_first_sample": samples[0]["rss_mb"],
        "window_samples": k,
        "rss_mb_after_warmup": round(rss_warm, 2),
        "rss_mb_end": round(rss_end, 2),
        "growth_pct": round(growth, 3),
        "rss_mb_after_warmup_single_sample": after_warmup["rss_mb"],
        "rss_mb_after_warmup_at_step": after_warmup["step"],
        "rss_mb_end_single_sample": end["rss_mb"],
        "growth_pct_single_samples": round(100.0 * (end["rss_mb"] - after_warmup["rss_mb"]) / after_warmup["rss_mb"], 3),
        "rss_mb_max": max(s["rss_mb"] for s in samples),
        "slope_mb_per_hour_after_warmup": None if (m := slope_per_hour(post)) is None else round(m, 2),
        "target_pct": args.target_pct,
        "pass": growth < args.target_pct,
        "threads_after_warmup": after_warmup["threads"], "threads_end": end["threads"],
        "open_fds_after_warmup": after_warmup["open_fds"], "open_fds_end": end["open_fds"],
        "checkpoints_written": sorted(p.name for p in (out / "grpo" / "checkpoints").glob("step_*"))
        if (out / "grpo" / "checkpoints").is_dir() else [],
        "grpo_settings": {"prompts_per_step": cfg.prompts_per_step, "group_size": cfg.group_size,
                          "max_completion_length": cfg.max_completion_length, "beta": cfg.beta,
                          "eval_every": cfg.eval_every, "save_every": cfg.save_every,
                          "model": {"hidden_size": demo.hidden_size, "num_layers": demo.num_layers}
                          if not args.model else args.model},
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "torch_threads": torch.get_num_threads(), "device": args.device,
                        "cpus": os.cpu_count(), "platform": platform.platform()},
        "samples": samples,
    }
    path = out / "soak.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2))
    print(f"written: {path}")
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    raise SystemExit(main())
