"""PPO-RLHF: the per-token reward by hand, the missing-EOS penalty, the zero-initialized critic,
GAE assembly by hand, a short run (policy and critic change, every named metric logged),
the early stop on target_kl, the adaptive KL coefficient, and resume of the KL controller."""

from __future__ import annotations

import math

import pytest
import torch

from trustrl.logging import read_metrics
from trustrl.trainers.common import PromptSampler
from trustrl.algorithms.ppo import PPOConfig, PPOTrainer, apply_missing_eos_penalty, token_rewards


def count_a(prompts, completions, **columns):
    """A learnable, varied reward: the share of 'a' characters in the completion."""
    return [c.count("a") / max(len(c), 1) for c in completions]


def constant_one(prompts, completions, **columns):
    return [1.0] * len(completions)


def make_config(tiny_model_dir, addition_data, tmp_path, **overrides) -> PPOConfig:
    base = dict(
        model=str(tiny_model_dir), dataset=str(addition_data["rl"]), output_dir=str(tmp_path / "run"),
        max_steps=2, prompts_per_step=4, samples_per_prompt=2, minibatch_size=4, ppo_epochs=2,
        max_completion_length=6, max_prompt_length=16, learning_rate=1e-3, beta=0.05, progress=False,
        tensorboard=False, seed=0,
    )
    base.update(overrides)
    return PPOConfig(**base)


def test_token_rewards_by_hand():
    # REFERENCES: R_RM = 0.8, KL = 0.05 over the completion, beta = 6 -> R_total = 0.5.
    # Row 0: two valid tokens with k1 = logp - ref = 0.02 and 0.03 (sum 0.05), then padding.
    #   r = [-6 * 0.02, -6 * 0.03 + 0.8, 0] = [-0.12, 0.62, 0]; sum = 0.5.
    # Row 1: one valid token with k1 = -0.01 (k1 can be negative): r = [0.06 + 0.3, 0, 0].
    logp = torch.tensor([[-1.00, -2.00, -9.0], [-0.50, -7.0, -7.0]])
    ref = torch.tensor([[-1.02, -2.03, -1.0], [-0.49, -1.0, -1.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    rewards, kl = token_rewards(torch.tensor([0.8, 0.3]), logp, ref, mask, beta=6.0)
    torch.testing.assert_close(kl, torch.tensor([[0.02, 0.03, 0.0], [-0.01, 0.0, 0.0]]), rtol=0, atol=1e-6)
    torch.testing.assert_close(rewards, torch.tensor([[-0.12, 0.62, 0.0], [0.36, 0.0, 0.0]]), rtol=0, atol=1e-5)
    assert float(rewards[0].sum()) == pytest.approx(0.5, abs=1e-5)
    # no reference: the score alone, at the last valid token
    rewards, kl = token_rewards(torch.tensor([0.8, 0.3]), logp, None, mask, beta=6.0)
    torch.testing.assert_close(rewards, torch.tensor([[0.0, 0.8, 0.0], [0.3, 0.0, 0.0]]), rtol=0, atol=0)
    assert not kl.any()


def test_missing_eos_penalty_replaces_the_score():
    scores = torch.tensor([0.8, 0.3, -0.2])
    truncated = torch.tensor([True, False, True])
    # truncated rows get the penalty instead of their score (not added to it)
    assert apply_missing_eos_penalty(scores, truncated, -1.0).tolist() == pytest.approx([-1.0, 0.3, -1.0])
    assert apply_missing_eos_penalty(scores, truncated, None) is scores


def test_penalty_zero_critic_and_gae_in_prepare(tiny_model_dir, addition_data, tmp_path):
    # constant reward 1, beta 0, gamma 1, lambda 0.95, no whitening, zero critic:
    # a completion of length L gets A_t = 0.95^(L-1-t) * 1 (V = 0 everywhere), returns = A.
    # With max_completion_length 3 most rows of the random tiny model are truncated -> score -7.
    cfg = make_config(tiny_model_dir, addition_data, tmp_path, beta=0.0, whiten_advantages=False,
                      missing_eos_penalty=-7.0, max_completion_length=3)
    trainer = PPOTrainer(cfg, reward_funcs=[constant_one])
    batch, _ = trainer.collect(PromptSampler(len(trainer.prompts), 0))
    pb = trainer.prepare(batch)
    truncated = batch.rollout.truncated
    assert truncated.any()
    expected_scores = torch.where(truncated, torch.tensor(-7.0), torch.tensor(1.0))
    assert torch.equal(pb.scores, expected_scores)
    # the zero-initialized head gives values that are exactly 0
    assert torch.count_nonzero(pb.old_values) == 0
    assert torch.count_nonzero(trainer.critic.completion_values(batch.rollout)) == 0
    for row in range(pb.mask.shape[0]):
        length = int(pb.mask[row].sum())
        s = float(expected_scores[row])
        want = [0.95 ** (length - 1 - t) * s for t in range(length)]
        assert pb.advantages[row, :length].tolist() == pytest.approx(want, rel=1e-5)
        assert pb.returns[row, :length].tolist() == pytest.approx(want, rel=1e-5)
        assert not pb.advantages[row, length:].any()


NAMED_METRICS = ["policy/approx_kl", "policy/clip_fraction", "loss/value", "value/explained_variance",
                 "policy/entropy", "kl/ref", "kl/coef", "reward/score", "returns/mean", "reward/count_a/mean",
                 "reward/mean", "ppo/epochs_run", "loss/policy", "loss/total"]


def test_short_run_changes_policy_and_critic_and_logs_metrics(tiny_model_dir, addition_data, tmp_path):
    cfg = make_config(tiny_model_dir, addition_data, tmp_path, max_steps=3, learning_rate=3e-3,
                      critic_learning_rate=1e-2, ent_coef=0.01, )
    trainer = PPOTrainer(cfg, reward_funcs=[count_a])
    policy_before = {n: p.detach().clone() for n, p in trainer.policy.named_parameters()}
    critic_before = {n: p.detach().clone() for n, p in trainer.critic.named_parameters()}
    summary = trainer.train()
    policy_changed = [n for n, p in trainer.policy.named_parameters() if not torch.equal(policy_before[n], p)]
    critic_changed = [n for n, p in trainer.critic.named_parameters() if not torch.equal(critic_before[n], p)]
    assert len(policy_changed) == len(policy_before)  # every actor parameter moved
    assert "head.weight" in critic_changed and "head.bias" in critic_changed
    assert any(n.startswith("trunk.") for n in critic_changed)  # after the head left 0, the trunk learns too
    rows = [r for r in read_metrics(cfg.output_dir) if "loss/value" in r]
    assert len(rows) == 3
    for r in rows:
        missing = [k for k in NAMED_METRICS if k not in r]
        assert not missing, missing
        assert math.isfinite(r["value/explained_variance"])
        assert r["ppo/epochs_run"] == 2
        assert r["kl/coef"] == 0.05  # fixed controller
    assert rows[0]["kl/ref"] == 0.0  # step 1 samples from the reference itself
    assert rows[-1]["kl/ref"] != 0.0
    assert summary["critic_dir"].endswith("final_critic")


def test_early_stop_on_target_kl(tiny_model_dir, addition_data, tmp_path):
    # one minibatch per epoch: epoch 1 starts at ratio 1 (approx KL ~ 0) and updates; epoch 2
    # measures the KL of that update, far above 1e-6, and stops before applying anything.
    cfg = make_config(tiny_model_dir, addition_data, tmp_path, max_steps=1, ppo_epochs=4, minibatch_size=8,
                      learning_rate=1e-2, target_kl=1e-6)
    trainer = PPOTrainer(cfg, reward_funcs=[count_a])
    trainer.train()
    row = [r for r in read_metrics(cfg.output_dir) if "ppo/epochs_run" in r][0]
    assert row["ppo/epochs_run"] == 2 < cfg.ppo_epochs
    assert row["ppo/early_stopped"] == 1.0 and row["ppo/updates"] == 1.0


def test_adaptive_kl_coefficient_moves_the_right_way(tiny_model_dir, addition_data, tmp_path):
    # n_steps = 8 completions per step, horizon 40: each update multiplies beta by 1 +- 0.2 * 8/40,
    # i.e. 1.04 or 0.96, once the error KL/target - 1 is clipped to +-0.2.
    # Step 1 samples from the reference: KL = 0 -> error -1 -> clipped -0.2 -> beta 0.1 * 0.96.
    # Step 2: the policy has moved; with target 1e-5 the KL is far above it -> * 1.04.
    cfg = make_config(tiny_model_dir, addition_data, tmp_path / "up", max_steps=2, beta=0.1, kl_control="adaptive",
                      kl_target=1e-5, kl_horizon=40, learning_rate=1e-2)
    trainer = PPOTrainer(cfg, reward_funcs=[count_a])
    trainer.train()
    rows = [r for r in read_metrics(cfg.output_dir) if "kl/coef" in r]
    assert rows[1]["kl/ref_sequence"] > 1.2e-5  # precondition of the clipped +0.2 error
    assert [r["kl/coef"] for r in rows] == pytest.approx([0.1, 0.096], rel=1e-9)
    assert [r["kl/coef_next"] for r in rows] == pytest.approx([0.096, 0.096 * 1.04], rel=1e-9)
    assert trainer.kl_ctl.value == pytest.approx(0.096 * 1.04, rel=1e-9)
    # a target far above any KL we reach: beta shrinks at every step, KL > 0 or not
    cfg = make_config(tiny_model_dir, addition_data, tmp_path / "down", max_steps=2, beta=0.1,
                      kl_control="adaptive", kl_target=100.0, kl_horizon=40, learning_rate=1e-2)
    PPOTrainer(cfg, reward_funcs=[count_a]).train()
    rows = [r for r in read_metrics(cfg.output_dir) if "kl/coef" in r]
    assert rows[1]["kl/ref_sequence"] != 0.0
    assert [r["kl/coef_next"] for r in rows] == pytest.approx([0.096, 0.096 * 0.96], rel=1e-9)


def test_resume_restores_kl_controller_and_matches_continuous_run(tiny_model_dir, addition_data, tmp_path):
    common = dict(beta=0.1, kl_control="adaptive", kl_target=1e-5, kl_horizon=40, learning_rate=1e-2, save_every=1)
    straight = make_config(tiny_model_dir, addition_data, tmp_path / "straight", max_steps=2, **common)
    PPOTrainer(straight, reward_funcs=[count_a]).train()
    first = make_config(tiny_model_dir, addition_data, tmp_path / "resumed", max_steps=1, **common)
    t1 = PPOTrainer(first, reward_funcs=[count_a])
    t1.train()
    saved_value = t1.kl_ctl.value
    assert saved_value == pytest.approx(0.096, rel=1e-12)  # 0.1 * (1 - 0.2 * 8 / 40)
    second = make_config(tiny_model_dir, addition_data, tmp_path / "resumed", max_steps=2, resume="auto", **common)
    t2 = PPOTrainer(second, reward_funcs=[count_a])
    assert t2.kl_ctl.value == 0.1  # fresh before train() restores
    t2.train()
    rows = {r["step"]: r for r in read_metrics(second.output_dir) if "kl/coef" in r}
    assert rows[2]["kl/coef"] == saved_value  # step 2 used the restored coefficient
    ref = {r["step"]: r for r in read_metrics(straight.output_dir) if "kl/coef" in r}
    assert rows[2]["kl/coef"] == ref[2]["kl/coef"]
    # the whole state came back (models, optimizers, RNGs, data position): step 2 continues
    # the uninterrupted run, and so does the controller's next value
    assert rows[2]["reward/score"] == pytest.approx(ref[2]["reward/score"], rel=1e-5, abs=1e-6)
    assert rows[2]["kl/ref_sequence"] == pytest.approx(ref[2]["kl/ref_sequence"], rel=1e-4, abs=1e-7)
    assert t2.kl_ctl.value == pytest.approx(ref[2]["kl/coef_next"], rel=1e-9)


def test_config_errors_name_the_key(tiny_model_dir, addition_data, tmp_path):
    from trustrl.config import ConfigError, build_config

    with pytest.raises(ConfigError, match="value_loss_type"):
        build_config(PPOConfig, dict(model="m", dataset="d", value_loss_type="l1"))
    with pytest.raises(ConfigError, match="minibatch_size"):
        build_config(PPOConfig, dict(model="m", dataset="d", prompts_per_step=2, minibatch_size=4))
    import trustrl

    assert trustrl.PPOConfig is PPOConfig


# -- the loop's exact normalization, vf_coef, one fault per bad minibatch -------------------------


def _capture_ppo_grads(monkeypatch):
    """Gradients of actor and critic at the first guarded update of the run."""
    import trustrl.algorithms.ppo as ppo_module

    captured = []
    original = ppo_module.guarded_steps

    def capturing(parts, *args, **kwargs):
        captured.append([{n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None}
                         for m, *_ in parts])
        return original(parts, *args, **kwargs)

    monkeypatch.setattr(ppo_module, "guarded_steps", capturing)
    return captured


def test_ppo_accumulation_1xN_equals_Nx1_policy_value_entropy(tiny_model_dir, addition_data, tmp_path, monkeypatch):
    # one minibatch of 8 completions of unequal lengths, as 1 micro-batch or as 4: policy,
    # clipped value and entropy terms are token means over the minibatch, normalized once
    # (and as token-budget micro-batches of 40 padded tokens: length-sorted, trimmed rows)
    grads = {}
    splits = {1: dict(gradient_accumulation_steps=1), 4: dict(gradient_accumulation_steps=4),
              "budget": dict(micro_batch_tokens=40)}
    for split, settings in splits.items():
        captured = _capture_ppo_grads(monkeypatch)
        cfg = make_config(tiny_model_dir, addition_data, tmp_path / str(split), max_steps=1, ppo_epochs=1,
                          minibatch_size=8, ent_coef=0.01, **settings)
        PPOTrainer(cfg, reward_funcs=[count_a]).train()
        grads[split] = captured[0]
        monkeypatch.undo()
    for model_index in (0, 1):  # actor, critic
        one = grads[1][model_index]
        scale = max(g.abs().max() for g in one.values())
        assert scale > 0
        for split in (4, "budget"):
            for name, g in one.items():
                torch.testing.assert_close(grads[split][model_index][name], g, rtol=0, atol=1e-5 * float(scale))


def test_vf_coef_is_refused_with_the_reason():
    from trustrl.config import ConfigError, build_config

    with pytest.raises(ConfigError, match="vf_coef.*critic_learning_rate"):
        build_config(PPOConfig, dict(model="m", dataset="d", vf_coef=0.5))


def test_a_bad_minibatch_is_one_fault_and_updates_neither_model(tiny_model_dir, addition_data, tmp_path, monkeypatch):
    # the critic's loss is NaN on the first minibatch: neither actor nor critic may move, and the
    # fault counter records one fault (it recorded two, one per optimizer, before)
    import trustrl.algorithms.ppo as ppo_module
    from trustrl.losses import LossSum

    calls = {"n": 0}
    original = PPOTrainer.critic_loss

    def nan_once(self, *args, **kwargs):
        part, m = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 1:
            part = LossSum(part.total * float("nan"), part.count, part.unit)
        return part, m

    monkeypatch.setattr(PPOTrainer, "critic_loss", nan_once)
    recorded = []
    original_steps = ppo_module.guarded_steps

    def recording(parts, max_grad_norm, faults, where):
        before = [{n: p.detach().clone() for n, p in m.named_parameters()} for m, *_ in parts]
        norms, ok = original_steps(parts, max_grad_norm, faults, where)
        moved = [any(not torch.equal(b[n], p) for n, p in m.named_parameters()) for b, (m, *_) in zip(before, parts)]
        recorded.append((ok, moved, faults.total))
        return norms, ok

    monkeypatch.setattr(ppo_module, "guarded_steps", recording)
    cfg = make_config(tiny_model_dir, addition_data, tmp_path, max_steps=1, ppo_epochs=1, minibatch_size=4)
    with pytest.warns(UserWarning, match="non-finite"):  # (a score of 1: non-zero returns for the critic)
        PPOTrainer(cfg, reward_funcs=[constant_one]).train()
    assert recorded[0] == (False, [False, False], 1)  # skipped: nothing moved, one fault
    assert recorded[1][0] and recorded[1][1] == [True, True] and recorded[1][2] == 1
