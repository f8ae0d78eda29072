"""GRPO trainer: behaviour on tiny local models (reward rises, parameters change) and the
invariants of the method (accumulation, the ratio at the first inner iteration, no reference
model at beta = 0)."""

from __future__ import annotations

import math

import pytest
import torch

import trustrl.algorithms.grpo as grpo_module
from trustrl.config import GRPOConfig
from trustrl.algorithms.grpo import GRPOTrainer


def count_a(prompts, completions, **columns):
    """An easily learnable reward: the share of 'a' characters in the completion."""
    return [c.count("a") / max(len(c), 1) for c in completions]


def make_config(tiny_model_dir, addition_data, tmp_path, **overrides) -> GRPOConfig:
    base = dict(
        model=str(tiny_model_dir), dataset=str(addition_data["rl"]), output_dir=str(tmp_path / "run"),
        max_steps=2, prompts_per_step=4, group_size=4, max_completion_length=6, max_prompt_length=16,
        learning_rate=1e-3, beta=0.04, progress=False, tensorboard=False, seed=0,
        rewards=[{"name": "numeric_answer"}],
    )
    base.update(overrides)
    return GRPOConfig(**base)


def test_reward_rises_and_parameters_change(tiny_model_dir, addition_data, tmp_path):
    cfg = make_config(tiny_model_dir, addition_data, tmp_path, rewards=[], max_steps=16, learning_rate=1e-2,
                      prompts_per_step=4, group_size=8, beta=0.0, max_completion_length=4)
    trainer = GRPOTrainer(cfg, reward_funcs=[count_a])
    before = {n: p.detach().clone() for n, p in trainer.policy.named_parameters()}
    trainer.train()
    changed = [n for n, p in trainer.policy.named_parameters() if not torch.equal(before[n], p)]
    assert len(changed) == len(before)  # every parameter received an update
    from trustrl.logging import read_metrics

    rows = read_metrics(cfg.output_dir)
    assert all(math.isfinite(r["loss/total"]) for r in rows if "loss/total" in r)
    rewards = [r["reward/mean"] for r in rows if "reward/mean" in r]
    assert len(rewards) == 16
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    assert last > first + 0.2, (first, last)



ACCUMULATION_CASES = {
    "token_mean": dict(loss_aggregation="token_mean"),
    "seq_mean": dict(loss_aggregation="seq_mean"),
    "seq_sum_constant": dict(loss_aggregation="seq_sum_constant"),
    "token_mean_masked_truncations": dict(loss_aggregation="token_mean", mask_truncated_completions=True),
    # GSPO: the surrogate is a mean over sequences, the KL a mean over tokens; before the
    # loop normalized each by its own count, the KL was weighted by rows and 1 x 4 != 4 x 1
    "gspo_with_kl": dict(importance_level="sequence", beta=0.5),
    "gspo_without_kl": dict(importance_level="sequence", beta=0.0),
    "gspo_with_kl_masked_truncations": dict(importance_level="sequence", beta=0.5, mask_truncated_completions=True,
                                            max_completion_length=4),
}


@pytest.mark.parametrize("case", sorted(ACCUMULATION_CASES))
def test_gradient_accumulation_1xN_equals_Nx1(grpo_update_gradients, tiny_model_dir, addition_data, tmp_path,
                                              monkeypatch, case):
    grads = {}
    # 1 x 16, 4 x 4, and token-budget micro-batches (40 padded tokens: 1 to 3 length-sorted,
    # trimmed rows each, of unequal sizes)
    splits = {1: dict(gradient_accumulation_steps=1), 4: dict(gradient_accumulation_steps=4),
              "budget": dict(micro_batch_tokens=40)}
    for split, settings in splits.items():
        captured = grpo_update_gradients()
        cfg = make_config(tiny_model_dir, addition_data, tmp_path / str(split), max_steps=1,
                          rewards=[], **settings, **ACCUMULATION_CASES[case])
        GRPOTrainer(cfg, reward_funcs=[count_a]).train()
        grads[split] = captured[0]
        monkeypatch.undo()
    # same seed -> same rollouts; only the summation order of float32 terms differs.
    # Tolerance: 1e-5 relative to the largest gradient entry (float32 has ~1e-7 resolution;
    # a normalization bug would be off by a factor of order 1).
    scale = max(g.abs().max() for g in grads[1].values())
    assert scale > 0
    for name, g in grads[1].items():
        torch.testing.assert_close(grads[4][name], g, rtol=0, atol=1e-5 * float(scale))
        torch.testing.assert_close(grads["budget"][name], g, rtol=0, atol=1e-5 * float(scale))


def test_beta_zero_loads_no_reference_model(tiny_model_dir, addition_data, tmp_path, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("make_reference must not be called when beta = 0")

    monkeypatch.setattr("trustrl.models.make_reference", forbidden)
    cfg = make_config(tiny_model_dir, addition_data, tmp_path, beta=0.0, max_steps=1)
    trainer = GRPOTrainer(cfg)
    assert trainer.reference is None
    trainer.train()


@pytest.mark.parametrize("split", [dict(gradient_accumulation_steps=2), dict(micro_batch_tokens=50)])
def test_ratio_is_exactly_one_at_first_iteration_then_moves_and_clips(tiny_model_dir, addition_data, tmp_path, monkeypatch,
                                                                      split):
    calls = []
    original = grpo_module.policy_loss_sum

    def recording(logp, old_logp, advantages, mask, **kwargs):
        calls.append(((logp.detach() - old_logp)[mask], kwargs))
        part, metrics = original(logp, old_logp, advantages, mask, **kwargs)
        calls[-1] = calls[-1] + (metrics,)
        return part, metrics

    monkeypatch.setattr(grpo_module, "policy_loss_sum", recording)
    # a large learning rate so the second iteration's ratio leaves [1 - eps, 1 + eps]
    cfg = make_config(tiny_model_dir, addition_data, tmp_path, max_steps=1, num_iterations=3,
                      learning_rate=5e-2, clip_low=0.05, rewards=[], **split)
    GRPOTrainer(cfg, reward_funcs=[count_a]).train()
    n_micro = len(calls) // 3  # 3 iterations x the micro-batches (budget 50: rows of ~8-14 tokens)
    assert n_micro >= 2 and len(calls) == 3 * n_micro
    for log_ratio, _, metrics in calls[:n_micro]:
        assert torch.equal(log_ratio, torch.zeros_like(log_ratio))  # exactly 1, bitwise
        assert metrics["clip_fraction"] == 0.0
    moved = torch.cat([c[0] for c in calls[n_micro:]])
    assert moved.abs().max() > 0.05
    assert max(c[2]["clip_fraction"] for c in calls[n_micro:]) > 0


@pytest.mark.parametrize("overrides", [
    dict(importance_level="sequence", num_iterations=2),
    dict(advantage_scale="none", loss_aggregation="seq_sum_constant", clip_high=0.28, kl_estimator="k1"),
    dict(advantage_scale="batch", loss_aggregation="seq_mean", mask_truncated_completions=True, top_p=0.9),
    dict(dynamic_sampling=True, max_resample_rounds=2, overlong_cache_length=2, beta=0.0),
])
def test_variants_run_and_log(tiny_model_dir, addition_data, tmp_path, overrides):
    cfg = make_config(tiny_model_dir, addition_data, tmp_path, rewards=[], **overrides)
    trainer = GRPOTrainer(cfg, reward_funcs=[count_a])
    trainer.train()
    m = trainer.last_metrics
    for key in ("reward/mean", "completion/mean_length", "groups/zero_std_fraction", "perf/tokens_per_second"):
        assert key in m
    if cfg.beta > 0:
        assert math.isfinite(m["kl/ref"])
        if cfg.kl_estimator != "k1":  # k1 is unbiased but can be negative on a sample
            assert m["kl/ref"] >= 0


def test_dynamic_sampling_keeps_only_groups_with_spread(tiny_model_dir, addition_data, tmp_path):
    calls = {"n": 0}

    def half_constant(prompts, completions, **columns):
        # the first group of every batch is constant (dropped), the others vary
        calls["n"] += 1
        return [0.0 if i < 4 else float(i % 2) for i in range(len(completions))]

    cfg = make_config(tiny_model_dir, addition_data, tmp_path, rewards=[], dynamic_sampling=True, max_steps=1,
                      prompts_per_step=4, group_size=4, max_resample_rounds=3)
    trainer = GRPOTrainer(cfg, reward_funcs=[half_constant])
    from trustrl.trainers.common import PromptSampler

    batch, info = trainer.collect(PromptSampler(len(trainer.prompts), 0))
    # 3 groups with spread per round -> two rounds fill 4 groups
    assert calls["n"] == 2 and info["groups/kept"] == 4
    spread = batch.scores.total.view(-1, 4).std(dim=1, unbiased=False)
    assert (spread > 0).all() and batch.rollout.prompt_ids.shape[0] == 16


def test_demo_pipeline_shortened(tmp_path):
    from transformers import AutoModelForCausalLM

    from trustrl.tasks.demo import DemoSettings, run_demo

    summary = run_demo(DemoSettings.quick(output_dir=str(tmp_path / "demo")))
    for key in ("accuracy_before_rl", "accuracy_after_rl", "wall_seconds"):
        assert key in summary
    assert 0.0 <= summary["accuracy_after_rl"] <= 1.0
    assert (tmp_path / "demo" / "summary.json").is_file()
    assert (tmp_path / "demo" / "grpo" / "report.html").is_file()
    assert (tmp_path / "demo" / "grpo" / "metrics.jsonl").is_file()
    model = AutoModelForCausalLM.from_pretrained(summary["final_model"])
    assert model.config.num_hidden_layers == 1


def test_gspo_takes_the_papers_clip_range_unless_given():
    # Zheng et al. 2025: sequence ratios are clipped at 1 - 3e-4 / 1 + 4e-4; a token-level 0.2
    # would leave them effectively unclipped
    gspo = GRPOConfig(model="m", dataset="d", importance_level="sequence")
    assert (gspo.clip_low, gspo.clip_high) == (3e-4, 4e-4)
    assert GRPOConfig(model="m", dataset="d", importance_level="sequence", clip_low=0.1).clip_low == 0.1
    token = GRPOConfig(model="m", dataset="d")
    assert (token.clip_low, token.clip_high) == (0.2, None)


def test_older_advantage_scale_key_maps_to_the_estimator():
    assert GRPOConfig(model="m", dataset="d", advantage_scale="none").advantage_estimator == "dr_grpo"
    assert GRPOConfig(model="m", dataset="d", advantage_scale="group").advantage_estimator == "group_zscore"
    with pytest.raises(ValueError, match="not both"):
        GRPOConfig(model="m", dataset="d", advantage_scale="none", advantage_estimator="rloo")


@pytest.mark.parametrize("estimator", ["rloo", "reinforce_pp_baseline", "batch_scale"])
def test_every_estimator_trains(tiny_model_dir, addition_data, tmp_path, estimator):
    cfg = make_config(tiny_model_dir, addition_data, tmp_path, max_steps=1, rewards=[], advantage_estimator=estimator)
    trainer = GRPOTrainer(cfg, reward_funcs=[count_a])
    trainer.train()
    assert math.isfinite(trainer.last_metrics["loss/total"])


def test_top_p_below_one_is_said_at_start_up(tiny_model_dir, addition_data, tmp_path):
    # nucleus sampling draws from the truncated distribution while the losses use the full
    # softmax: the user is told before training (nothing was said before)
    cfg = make_config(tiny_model_dir, addition_data, tmp_path, max_steps=1, top_p=0.9)
    with pytest.warns(UserWarning, match="top_p=0.9.*full softmax"):
        GRPOTrainer(cfg, reward_funcs=[count_a])
