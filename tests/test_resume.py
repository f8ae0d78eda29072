"""Checkpoint + resume: a run interrupted (SIGKILL, or an exception) and resumed with
resume=auto ends bit for bit where the uninterrupted run with the same seed ends, with no
duplicated or missing steps in metrics.jsonl; partial and corrupt checkpoints are skipped
with a warning.

The expected values here come from a second, independent run (the uninterrupted one), never
from the code under test. The GRPO reward adds a little noise drawn from python's, numpy's
and torch's global RNGs, so the trajectory also depends on those being restored; the
sampler position, the sampling generator, AdamW moments, the cosine schedule with warmup,
num_iterations = 2 (old log-probs) and the eval history are all on the path."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import trustrl.algorithms.grpo as grpo_module
import trustrl.trainers.sft as sft_module
from trustrl.checkpoint import list_checkpoints, verify_checkpoint
from trustrl.config import GRPOConfig, PretrainConfig, SFTConfig
from trustrl.logging import read_metrics
from trustrl.algorithms.grpo import GRPOTrainer
from trustrl.trainers.sft import PretrainTrainer, SFTTrainer

REWARD_MODULE = textwrap.dedent('''
    import random

    import numpy as np
    import torch


    def noisy_count_a(prompts, completions, **columns):
        """Learnable signal (share of 'a') plus noise from each global RNG."""
        return [c.count("a") / max(len(c), 1)
                + 1e-3 * (random.random() + float(np.random.rand()) + float(torch.rand(())))
                for c in completions]
''')


def noisy_count_a(prompts, completions, **columns):
    """In-process twin of the module above."""
    import random

    import numpy as np

    return [c.count("a") / max(len(c), 1) + 1e-3 * (random.random() + float(np.random.rand()) + float(torch.rand(())))
            for c in completions]


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final" / "model.safetensors"))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert different == [], f"parameters differ after resume: {different}"


def assert_same_metrics(ref_dir: Path, resumed_dir: Path, expected_steps: list[int]) -> None:
    """Same steps, each exactly once, and identical values except wall-clock timings."""
    ref, res = read_metrics(ref_dir), read_metrics(resumed_dir)
    assert [r["step"] for r in ref] == expected_steps
    assert [r["step"] for r in res] == expected_steps  # no duplicated, no missing step
    for a, b in zip(ref, res):
        a = {k: v for k, v in a.items() if not k.startswith("perf/")}
        b = {k: v for k, v in b.items() if not k.startswith("perf/")}
        assert a == b, f"step {a['step']}: {set(a.items()) ^ set(b.items())}"


def dead_pid() -> int:
    for pid in range(4_000_000, 3_000_000, -7919):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except OSError:
            continue
    pytest.skip("no free pid found")


# ------------------------------------------------------------------------------------------
# GRPO through the command line, killed with SIGKILL
# ------------------------------------------------------------------------------------------


GRPO_SETTINGS = [
    "max_steps=7", "save_every=1", "deterministic=true", "device=cpu", "seed=3",
    "prompts_per_step=4", "group_size=4", "max_completion_length=6", "max_prompt_length=16",
    "learning_rate=1e-2", "beta=0.04", "num_iterations=2", "lr_scheduler=cosine", "warmup_steps=2",
    "eval_every=3", "eval_prompts=4", "progress=false", "tensorboard=false",
    "rewards=[{name: 'resume_rewards:noisy_count_a'}]",
]


def _grpo_cli(tiny_model_dir, addition_data, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "trustrl", "train", "grpo", f"model={tiny_model_dir}",
            f"dataset={addition_data['rl']}", f"eval_dataset={addition_data['eval']}", f"output_dir={out}",
            *GRPO_SETTINGS, *extra]


@pytest.mark.slow  # two `trustrl` subprocesses (imports dominate: ~25 s on an idle 2-core box)
def test_grpo_killed_with_sigkill_resumes_bitwise(tiny_model_dir, addition_data, tmp_path, monkeypatch):
    from trustrl.config import load_config

    (tmp_path / "resume_rewards.py").write_text(REWARD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    # same intra-op thread count as this process (where the reference runs): same float order
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path]), "TRUSTRL_NO_PROGRESS": "1",
           "OMP_NUM_THREADS": str(torch.get_num_threads())}
    ref_dir, run_dir = tmp_path / "reference", tmp_path / "interrupted"

    # 1. the victim: `trustrl train grpo` in a subprocess, SIGKILLed once its 2nd checkpoint is
    #    complete (by a watcher thread, while this process trains the reference)
    victim = subprocess.Popen(_grpo_cli(tiny_model_dir, addition_data, run_dir), env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watch: dict[str, object] = {}

    def watcher():
        second = run_dir / "checkpoints" / "step_000002" / "COMPLETE"
        deadline = time.monotonic() + 240
        while not second.exists() and victim.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        watch["killed"] = victim.poll() is None
        victim.send_signal(signal.SIGKILL)
        watch["stderr"] = victim.communicate(timeout=60)[1]

    thread = threading.Thread(target=watcher, daemon=True)
    thread.start()
    # 2. the reference, uninterrupted, same settings and seed (through the same config parser)
    ref_cfg = load_config(GRPOConfig, None, [f"model={tiny_model_dir}", f"dataset={addition_data['rl']}",
                                             f"eval_dataset={addition_data['eval']}", f"output_dir={ref_dir}",
                                             *GRPO_SETTINGS])
    ref_summary = GRPOTrainer(ref_cfg).train()
    thread.join(timeout=300)
    assert watch.get("killed"), f"the run ended before its 2nd checkpoint: {str(watch.get('stderr'))[-3000:]}"
    assert victim.returncode == -signal.SIGKILL
    assert not (run_dir / "final").exists()  # it really died mid-run
    killed_at = max(step for step, _ in list_checkpoints(run_dir))
    assert 2 <= killed_at < 7

    # 3. resume it with --resume (resume=auto)
    resumed = subprocess.run(_grpo_cli(tiny_model_dir, addition_data, run_dir, "--resume"), env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["resumed_from"].endswith(f"step_{killed_at:06d}")
    assert_same_weights(final_weights(ref_dir), final_weights(run_dir))
    assert_same_metrics(ref_dir, run_dir, list(range(0, 8)))
    assert summary["eval_history"] == json.loads(json.dumps(ref_summary["eval_history"]))
    assert [h["step"] for h in summary["eval_history"]] == [0, 3, 6, 7]
    # the last checkpoints agree too: optimizer moments, schedule, sampler, RNG states
    for name in ("optimizers.pt", "schedulers.pt", "rng.pt"):
        a = torch.load(ref_dir / "checkpoints" / "step_000007" / name, weights_only=True)
        b = torch.load(run_dir / "checkpoints" / "step_000007" / name, weights_only=True)
        assert _nested_equal(a, b), name
    assert (json.loads((ref_dir / "checkpoints" / "step_000007" / "trainer_state.json").read_text())
            == json.loads((run_dir / "checkpoints" / "step_000007" / "trainer_state.json").read_text()))
    verify_checkpoint(run_dir / "checkpoints" / "step_000007")


def _nested_equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_nested_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_nested_equal(x, y) for x, y in zip(a, b))
    return a == b


# ------------------------------------------------------------------------------------------
# in-process: an exception mid-run, then resume=auto
# ------------------------------------------------------------------------------------------


class Crash(Exception):
    pass


def crash_at_call(monkeypatch, module, n: int) -> None:
    """Make the n-th optimizer step of ``module``'s trainer raise (the run dies there)."""
    original = module.guarded_step
    calls = {"n": 0}

    def crashing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise Crash(f"simulated crash at optimizer step {n}")
        return original(*args, **kwargs)

    monkeypatch.setattr(module, "guarded_step", crashing)


def grpo_config(tiny_model_dir, addition_data, out: Path, **overrides) -> GRPOConfig:
    base = dict(model=str(tiny_model_dir), dataset=str(addition_data["rl"]), eval_dataset=str(addition_data["eval"]),
                output_dir=str(out), max_steps=5, save_every=1, deterministic=True, device="cpu", seed=1,
                prompts_per_step=4, group_size=4, max_completion_length=6, max_prompt_length=16, learning_rate=1e-2,
                beta=0.04, lr_scheduler="linear", eval_every=2, eval_prompts=4, progress=False, tensorboard=False,
                rewards=[])
    base.update(overrides)
    return GRPOConfig(**base)


def test_grpo_resume_skips_corrupt_and_partial_checkpoints(tiny_model_dir, addition_data, tmp_path, monkeypatch):
    ref_dir, run_dir = tmp_path / "reference", tmp_path / "interrupted"
    GRPOTrainer(grpo_config(tiny_model_dir, addition_data, ref_dir), reward_funcs=[noisy_count_a]).train()

    crash_at_call(monkeypatch, grpo_module, 4)  # steps 1-3 complete and saved (keep_last=2: 2 and 3)
    with pytest.raises(Crash):
        GRPOTrainer(grpo_config(tiny_model_dir, addition_data, run_dir), reward_funcs=[noisy_count_a]).train()
    monkeypatch.undo()
    ckpts = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_000002", "step_000003"]
    # the newest checkpoint is corrupt (one byte flipped), and a dead process left a partial save
    opt = ckpts / "step_000003" / "optimizers.pt"
    data = bytearray(opt.read_bytes())
    data[len(data) // 2] ^= 0xFF
    opt.write_bytes(bytes(data))
    partial = ckpts / f"step_000004.tmp-{dead_pid()}"
    (partial / "models").mkdir(parents=True)

    trainer = GRPOTrainer(grpo_config(tiny_model_dir, addition_data, run_dir, resume="auto"),
                          reward_funcs=[noisy_count_a])
    with pytest.warns(UserWarning) as record:
        summary = trainer.train()
    messages = " | ".join(str(w.message) for w in record)
    assert "skipping invalid checkpoint" in messages and "step_000003" in messages and "sha256" in messages
    assert "ignoring partial checkpoint" in messages
    assert summary["resumed_from"].endswith("step_000002")
    assert not partial.exists()  # cleaned up by the next save
    assert_same_weights(final_weights(ref_dir), final_weights(run_dir))
    assert_same_metrics(ref_dir, run_dir, [0, 1, 2, 3, 4, 5])
    ref_summary = json.loads((ref_dir / "train_summary.json").read_text())
    assert summary["eval_history"] == ref_summary["eval_history"]


@pytest.mark.parametrize("stage", ["sft", "pretrain"])
def test_sft_and_pretrain_resume_bitwise(tiny_model_dir, addition_data, tmp_path, monkeypatch, stage):
    if stage == "sft":
        cls, trainer_cls = SFTConfig, SFTTrainer
        extra = dict(dataset=str(addition_data["sft"]), batch_size=8, max_length=32)
    else:
        cls, trainer_cls = PretrainConfig, PretrainTrainer
        extra = dict(dataset=str(addition_data["pretrain"]), batch_size=4, block_size=24)

    def config(out: Path, **overrides):
        return cls(model=str(tiny_model_dir), output_dir=str(out), max_steps=8, save_every=3, seed=5,
                   deterministic=True, device="cpu", learning_rate=3e-3, lr_scheduler="cosine", warmup_steps=3,
                   weight_decay=0.01, gradient_accumulation_steps=2, progress=False, tensorboard=False,
                   **extra, **overrides)

    ref_dir, run_dir = tmp_path / "reference", tmp_path / "interrupted"
    trainer_cls(config(ref_dir)).train()
    crash_at_call(monkeypatch, sft_module, 8)  # dies in step 8 (the last); newest checkpoint: step 6
    with pytest.raises(Crash):
        trainer_cls(config(run_dir)).train()
    monkeypatch.undo()
    assert [s for s, _ in list_checkpoints(run_dir)] == [3, 6]
    assert max(r["step"] for r in read_metrics(run_dir)) == 7  # steps after the checkpoint were logged
    summary = trainer_cls(config(run_dir, resume="auto")).train()
    assert summary["resumed_from"].endswith("step_000006")
    assert_same_weights(final_weights(ref_dir), final_weights(run_dir))
    assert_same_metrics(ref_dir, run_dir, list(range(1, 9)))  # 7 is not duplicated


def test_a_new_run_never_mixes_with_an_earlier_runs_checkpoints(tiny_model_dir, addition_data, tmp_path):
    def config(**overrides):
        settings = dict(model=str(tiny_model_dir), dataset=str(addition_data["sft"]), output_dir=str(tmp_path / "run"),
                        max_steps=3, save_every=1, batch_size=4, max_length=32, progress=False, tensorboard=False)
        return SFTConfig(**{**settings, **overrides})

    from trustrl.trainers.run_dir import RunDirError

    SFTTrainer(config(max_steps=4)).train()
    # a new run (resume=never) in the same directory would mix the two runs' checkpoints (a later
    # resume=auto would pick step 4 > this run's 3): refused; with overwrite the old run moves whole
    with pytest.raises(RunDirError, match="already holds a run"):
        SFTTrainer(config())
    SFTTrainer(config(overwrite=True)).train()
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [2, 3]
    assert [s for s, _ in list_checkpoints(tmp_path / "run.previous-1")] == [3, 4]
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3]
    # resume=auto on a finished run: nothing left to do, no step logged twice
    SFTTrainer(config(resume="auto")).train()
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3]


def test_resume_typo_fails_before_any_model_loads(tmp_path):
    from trustrl.config import ConfigError

    cfg = SFTConfig(model=str(tmp_path / "no-such-model"), dataset="x.jsonl", resume="atuo")
    with pytest.raises(ConfigError, match="resume.*'never', 'auto'"):
        SFTTrainer(cfg)
