"""TRPO on a tiny LM: an accepted step stays inside the trust region and improves the surrogate
(checked with an independent forward through transformers' own logits), a forced rejection
leaves every parameter bitwise identical, the parameter subsets move only what they name, and
a short GAE run logs the TRPO metrics."""

from __future__ import annotations

import math

import pytest
import torch

from trustrl.logging import read_metrics
from trustrl.rollout import positions_from_mask
from trustrl.trainers.common import PromptSampler
from trustrl.algorithms.trpo import TRPOConfig, TRPOTrainer, select_trpo_parameters


def count_a(prompts, completions, **columns):
    return [c.count("a") / max(len(c), 1) for c in completions]


def make_config(model_dir, addition_data, tmp_path, **overrides) -> TRPOConfig:
    base = dict(
        model=str(model_dir), dataset=str(addition_data["rl"]), output_dir=str(tmp_path / "run"), max_steps=1,
        prompts_per_step=4, group_size=4, max_completion_length=6, max_prompt_length=16, progress=False,
        tensorboard=False, seed=0, max_kl=0.01,
    )
    base.update(overrides)
    return TRPOConfig(**base)


@torch.no_grad()
def full_logprobs(model, rollout) -> torch.Tensor:
    """Independent path: transformers' forward (its own LM head, full logits) -> log_softmax
    at the positions predicting each completion token: [B, C, V]."""
    ids, mask = rollout.input_ids, rollout.attention_mask
    logits = model(input_ids=ids, attention_mask=mask.long(), position_ids=positions_from_mask(mask)).logits
    start = rollout.prompt_ids.shape[1]
    return torch.log_softmax(logits[:, start - 1:-1].double(), dim=-1)


def surrogate_and_kl(old_all, new_all, rollout, adv):
    """token_mean(exp(new - old) * A) and token_mean(KL(old || new)), in float64."""
    mask = rollout.completion_mask
    ids = rollout.completion_ids.unsqueeze(-1)
    ratio = torch.exp(new_all.gather(-1, ids) - old_all.gather(-1, ids)).squeeze(-1)
    adv = adv.double()[:, None] if adv.dim() == 1 else adv.double()
    surr = (ratio * adv)[mask].mean()
    kl = (old_all.exp() * (old_all - new_all)).sum(-1)[mask].mean()
    return float(surr), float(kl)


def one_step(trainer):
    batch, _ = trainer.collect(PromptSampler(len(trainer.prompts), 0))
    adv = trainer.advantages(batch)
    before = {n: p.detach().clone() for n, p in trainer.policy.named_parameters()}
    old_all = full_logprobs(trainer.policy, batch.rollout)
    result = trainer.trpo_step(batch.rollout, adv["advantages"])
    new_all = full_logprobs(trainer.policy, batch.rollout)
    return batch, adv, before, old_all, new_all, result


def test_accepted_step_is_inside_the_trust_region_and_improves(tiny_model_dir, addition_data, tmp_path):
    cfg = make_config(tiny_model_dir, addition_data, tmp_path, max_kl=0.01)
    trainer = TRPOTrainer(cfg, reward_funcs=[count_a])
    batch, adv, before, old_all, new_all, result = one_step(trainer)
    assert result.accepted
    surr_old, kl_old = surrogate_and_kl(old_all, old_all, batch.rollout, adv["advantages"])
    surr_new, kl_new = surrogate_and_kl(old_all, new_all, batch.rollout, adv["advantages"])
    assert kl_old == 0.0
    assert 0 < kl_new <= cfg.max_kl * (1 + 1e-3)  # inside the trust region
    assert surr_new > surr_old  # the surrogate improved
    # our closures' numbers agree with the independent forward (float32 vs float64)
    assert result.kl == pytest.approx(kl_new, rel=1e-3, abs=1e-6)
    assert result.improvement == pytest.approx(surr_new - surr_old, rel=1e-2, abs=1e-5)
    changed = [n for n, p in trainer.policy.named_parameters() if not torch.equal(before[n], p)]
    assert len(changed) == len(before)  # trpo_params = all


def test_forced_rejection_restores_parameters_bitwise(tiny_model_dir, addition_data, tmp_path):
    # accept_ratio 1e6: the real gain must be a million times the linear prediction; no step
    # can do that, so the line search tries all 3 fractions and restores the parameters.
    cfg = make_config(tiny_model_dir, addition_data, tmp_path, max_kl=1e-6, accept_ratio=1e6, max_backtracks=3)
    trainer = TRPOTrainer(cfg, reward_funcs=[count_a])
    batch, adv, before, old_all, new_all, result = one_step(trainer)
    assert result.grad_norm > 0 and not result.accepted
    assert result.steps == 3 and result.kl == 0.0 and result.improvement == 0.0
    for n, p in trainer.policy.named_parameters():
        assert torch.equal(before[n], p), n
        assert p.grad is None


@pytest.fixture(scope="module")
def untied_model_dir(tmp_path_factory):
    from trustrl.tasks.arithmetic import CHARS, SPECIAL_TOKENS
    from trustrl.tiny import create_tiny_model_dir

    return create_tiny_model_dir(tmp_path_factory.mktemp("untied"), chars=CHARS + "abc\n",
                                 special_tokens=SPECIAL_TOKENS, seed=1, hidden_size=32, num_layers=2, num_heads=2,
                                 max_position_embeddings=64, tie_word_embeddings=False)


def test_parameter_subsets(untied_model_dir, addition_data, tmp_path):
    from trustrl.models import load_policy

    model = load_policy(untied_model_dir)
    names = [n for n, _ in select_trpo_parameters(model, "lm_head")]
    assert names == ["lm_head.weight"]
    names = {n for n, _ in select_trpo_parameters(model, "last_layers:1")}
    assert "lm_head.weight" in names and "model.norm.weight" in names
    assert any(n.startswith("model.layers.1.") for n in names)
    assert not any(n.startswith("model.layers.0.") or n.startswith("model.embed_tokens") for n in names)
    assert len(select_trpo_parameters(model, "all")) == len(list(model.parameters()))
    with pytest.raises(ValueError, match="only 2 decoder layers"):
        select_trpo_parameters(model, "last_layers:3")

    # an lm_head-only step moves the head and nothing else (trunk hidden states reused)
    cfg = make_config(untied_model_dir, addition_data, tmp_path, trpo_params="lm_head")
    trainer = TRPOTrainer(cfg, reward_funcs=[count_a])
    assert trainer.reuse_trunk
    batch, adv, before, old_all, new_all, result = one_step(trainer)
    assert result.accepted
    _, kl_new = surrogate_and_kl(old_all, new_all, batch.rollout, adv["advantages"])
    assert kl_new <= cfg.max_kl * (1 + 1e-3)
    changed = [n for n, p in trainer.policy.named_parameters() if not torch.equal(before[n], p)]
    assert changed == ["lm_head.weight"]


def test_short_gae_run_logs_trpo_metrics(tiny_model_dir, addition_data, tmp_path):
    cfg = make_config(tiny_model_dir, addition_data, tmp_path, max_steps=2, advantage="gae", group_size=2,
                      beta=0.05, learning_rate=1e-2, value_epochs=2, value_minibatch_size=4)
    trainer = TRPOTrainer(cfg, reward_funcs=[count_a])
    head_before = trainer.critic.head.weight.detach().clone()
    trainer.train()
    assert not torch.equal(head_before, trainer.critic.head.weight)
    rows = [r for r in read_metrics(cfg.output_dir) if "trpo/kl" in r]
    assert len(rows) == 2
    for r in rows:
        for key in ("trpo/kl", "trpo/surrogate_improvement", "trpo/line_search_steps", "trpo/accepted",
                    "loss/value", "value/explained_variance", "kl/ref", "reward/mean"):
            assert key in r and math.isfinite(r[key]), key
        if r["trpo/accepted"]:
            assert 0 <= r["trpo/kl"] <= cfg.max_kl and r["trpo/surrogate_improvement"] > 0


def test_config_validation_names_the_key():
    from trustrl.config import ConfigError, build_config

    with pytest.raises(ConfigError, match="trpo_params"):
        build_config(TRPOConfig, dict(model="m", dataset="d", trpo_params="last_layers:0"))
    with pytest.raises(ConfigError, match="group_size"):
        build_config(TRPOConfig, dict(model="m", dataset="d", advantage="group", group_size=1))
    assert build_config(TRPOConfig, dict(model="m", dataset="d", advantage="gae", group_size=1)).group_size == 1
