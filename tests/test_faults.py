"""Numerical faults: a NaN/inf loss or gradient skips the update (parameters and optimizer
moments untouched), is logged as optim/skipped, and after max_consecutive_nonfinite faults in
a row the run stops with NonFiniteError, leaving the last checkpoint written before the
faults intact and resumable."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import trustrl.algorithms.grpo as grpo_module
from trustrl.losses import LossSum
import trustrl.trainers.sft as sft_module
from trustrl.checkpoint import find_latest_checkpoint, list_checkpoints, verify_checkpoint
from trustrl.config import GRPOConfig, SFTConfig
from trustrl.logging import read_metrics
from trustrl.trainers.common import FaultCounter, NonFiniteError, guarded_step
from trustrl.algorithms.grpo import GRPOTrainer
from trustrl.trainers.sft import SFTTrainer

# ------------------------------------------------------------------------------------------
# guarded_step and FaultCounter on a hand-sized model
# ------------------------------------------------------------------------------------------


def _linear():
    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return model, opt, sched


def test_guarded_step_applies_a_finite_step():
    model, opt, sched = _linear()
    before = [p.detach().clone() for p in model.parameters()]
    loss = model(torch.ones(1, 2)).sum()
    loss.backward()
    # d loss / d w = x = (1, 1), d loss / d b = 1: global norm sqrt(3)
    norm, applied = guarded_step(model, opt, sched, None, FaultCounter(3), "unit", loss=loss)
    assert applied and norm == pytest.approx(math.sqrt(3))
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


@pytest.mark.parametrize("fault", ["nan_loss_finite_grads", "inf_loss", "nan_grad", "inf_grad"])
def test_guarded_step_skips_a_faulty_step(fault):
    model, opt, sched = _linear()
    before = [p.detach().clone() for p in model.parameters()]
    loss = model(torch.ones(1, 2)).sum()
    if fault == "nan_loss_finite_grads":
        # a NaN constant added to the loss: its value is NaN but the gradients are finite,
        # so a check of the gradient norm alone would let this step through
        loss = loss + torch.tensor(float("nan"))
    elif fault == "inf_loss":
        loss = loss + torch.tensor(float("inf"))
    loss.backward()
    if fault == "nan_grad":
        model.bias.grad[0] = float("nan")
    if fault == "inf_grad":
        model.weight.grad[0, 1] = float("inf")
    faults = FaultCounter(3)
    with pytest.warns(UserWarning, match="non-finite .*update skipped"):
        norm, applied = guarded_step(model, opt, sched, 1.0, faults, "unit", loss=loss)
    assert not applied
    if fault in ("nan_loss_finite_grads", "inf_loss"):
        assert norm == pytest.approx(math.sqrt(3))  # the gradients were fine
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert opt.state_dict()["state"] == {}  # no AdamW moment was touched
    assert all(p.grad is None for p in model.parameters())  # the bad gradients are dropped
    assert sched.last_epoch == 1  # a skipped step still counts as a step
    assert (faults.consecutive, faults.total) == (1, 1)


def test_fault_counter_raises_after_limit_in_a_row_and_resets():
    faults = FaultCounter(limit=3)
    # bad, bad, good (streak reset), bad, bad -> consecutive 2, total 4; the next bad is the 3rd in a row
    for ok in (False, False, True, False, False):
        faults.record(ok, "x")
    assert (faults.consecutive, faults.total) == (2, 4)
    with pytest.raises(NonFiniteError, match="3 consecutive non-finite .* in step 9"):
        faults.record(False, "step 9")
    restored = FaultCounter(limit=3)
    restored.load_state_dict(faults.state_dict())
    assert (restored.consecutive, restored.total) == (3, 5)


# ------------------------------------------------------------------------------------------
# GRPO: faults from step 3 on, limit 3 -> steps 3 and 4 skipped, step 5 stops the run
# ------------------------------------------------------------------------------------------


def count_a(prompts, completions, **columns):
    return [c.count("a") / max(len(c), 1) for c in completions]


def grpo_config(tiny_model_dir, addition_data, tmp_path, **overrides) -> GRPOConfig:
    base = dict(model=str(tiny_model_dir), dataset=str(addition_data["rl"]), output_dir=str(tmp_path / "run"),
                max_steps=8, save_every=1, max_consecutive_nonfinite=3, prompts_per_step=4, group_size=4,
                max_completion_length=4, max_prompt_length=16, learning_rate=1e-2, beta=0.04, device="cpu",
                progress=False, tensorboard=False, rewards=[], seed=0)
    base.update(overrides)
    return GRPOConfig(**base)


def _record_steps(monkeypatch, module):
    """Snapshot the parameters around every guarded step."""
    records = []
    original = module.guarded_step

    def recording(model, *args, **kwargs):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        try:
            return original(model, *args, **kwargs)
        finally:
            after = {n: p.detach().clone() for n, p in model.named_parameters()}
            records.append(all(torch.equal(before[n], after[n]) for n in before))

    monkeypatch.setattr(module, "guarded_step", recording)
    return records  # True where the step left every parameter as it was


def _check_stopped_run(cfg, trainer, unchanged):
    # steps 1-2 updated the parameters, 3-5 did not; step 5 raised before logging
    assert unchanged == [False, False, True, True, True]
    rows = read_metrics(cfg.output_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["optim/skipped"] for r in rows] == [0.0, 0.0, 1.0, 1.0]
    # the last good checkpoint (step 2) is the newest, verifies, and holds the current weights
    assert [s for s, _ in list_checkpoints(cfg.output_dir)] == [1, 2]
    latest = find_latest_checkpoint(cfg.output_dir)
    assert latest.name == "step_000002"
    verify_checkpoint(latest)
    saved = load_file(str(latest / "models" / "policy" / "state.safetensors"))
    current = trainer.policy.state_dict()
    assert all(torch.equal(saved[k], current[k]) for k in saved)
    return rows


def test_grpo_poisoned_gradient_skips_then_stops(tiny_model_dir, addition_data, tmp_path, monkeypatch):
    state = {"calls": 0}

    def reward(prompts, completions, **columns):  # one call per step (no eval set)
        state["calls"] += 1
        return count_a(prompts, completions)

    cfg = grpo_config(tiny_model_dir, addition_data, tmp_path)
    trainer = GRPOTrainer(cfg, reward_funcs=[reward])
    # one parameter's gradient turns NaN from step 3 on
    param = trainer.policy.model.norm.weight
    param.register_hook(lambda g: g * float("nan") if state["calls"] >= 3 else g)
    unchanged = _record_steps(monkeypatch, grpo_module)
    with pytest.raises(NonFiniteError, match=r"3 consecutive non-finite .*grpo step 5"):
        with pytest.warns(UserWarning, match="non-finite gradient norm"):
            trainer.train()
    rows = _check_stopped_run(cfg, trainer, unchanged)
    assert [r["optim/grad_norm"] for r in rows][2:] == [None, None]  # NaN is written as null

    # the stopped run resumes from its last good checkpoint once the fault is gone
    monkeypatch.undo()
    # (count_a replaces the counting wrapper: another function in config.yaml, a change to confirm)
    resumed = GRPOTrainer(grpo_config(tiny_model_dir, addition_data, tmp_path, resume="auto", allow_changed=["rewards"]),
                          reward_funcs=[count_a])
    summary = resumed.train()
    assert summary["resumed_from"].endswith("step_000002") and summary["steps"] == 8
    assert [r["step"] for r in read_metrics(cfg.output_dir)] == list(range(1, 9))


def test_grpo_nan_loss_with_finite_gradients_is_caught(tiny_model_dir, addition_data, tmp_path, monkeypatch):
    state = {"calls": 0}

    def reward(prompts, completions, **columns):
        state["calls"] += 1
        return count_a(prompts, completions)

    original = grpo_module.policy_loss_sum

    def nan_valued_loss(*args, **kwargs):
        part, metrics = original(*args, **kwargs)
        if state["calls"] >= 3:  # NaN value, untouched gradient
            part = LossSum(part.total + torch.tensor(float("nan")), part.count, part.unit)
        return part, metrics

    monkeypatch.setattr(grpo_module, "policy_loss_sum", nan_valued_loss)
    cfg = grpo_config(tiny_model_dir, addition_data, tmp_path)
    trainer = GRPOTrainer(cfg, reward_funcs=[reward])
    unchanged = _record_steps(monkeypatch, grpo_module)
    with pytest.raises(NonFiniteError, match="grpo step 5"):
        with pytest.warns(UserWarning, match="non-finite loss"):
            trainer.train()
    rows = _check_stopped_run(cfg, trainer, unchanged)
    for r in rows[2:]:
        assert r["loss/total"] is None  # NaN
        assert r["optim/grad_norm"] is not None and math.isfinite(r["optim/grad_norm"]) and r["optim/grad_norm"] > 0


# ------------------------------------------------------------------------------------------
# SFT: one transient fault is skipped and the run goes on
# ------------------------------------------------------------------------------------------


def test_sft_transient_fault_is_skipped_and_counted(tiny_model_dir, addition_data, tmp_path, monkeypatch):
    cfg = SFTConfig(model=str(tiny_model_dir), dataset=str(addition_data["sft"]), output_dir=str(tmp_path / "sft"),
                    max_steps=5, save_every=1, batch_size=4, max_length=32, learning_rate=1e-3, progress=False,
                    tensorboard=False, max_consecutive_nonfinite=2)
    trainer = SFTTrainer(cfg)
    steps = {"n": 0}

    def poison(g):  # the backward pass of step 3 runs after 2 guarded steps
        return g * float("inf") if steps["n"] == 2 else g

    unchanged = _record_steps(monkeypatch, sft_module)
    recording = sft_module.guarded_step

    def with_count(*args, **kwargs):
        steps["n"] += 1
        return recording(*args, **kwargs)

    monkeypatch.setattr(sft_module, "guarded_step", with_count)
    trainer.model.model.norm.weight.register_hook(poison)
    with pytest.warns(UserWarning, match="sft step 3: non-finite gradient norm"):
        summary = trainer.train()
    assert unchanged == [False, False, True, False, False]
    assert summary["nonfinite_skips"] == 1 and summary["steps"] == 5
    assert [r["optim/skipped"] for r in read_metrics(cfg.output_dir)] == [0.0, 0.0, 1.0, 0.0, 0.0]
    # no checkpoint is written on the skipped step itself (it stays out of keep-last pruning)
    assert [s for s, _ in list_checkpoints(cfg.output_dir)] == [4, 5]
