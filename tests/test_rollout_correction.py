"""Behaviour log-probs and importance correction: the sampler's log-probs of the tokens it drew
(by hand; against the trainer's recomputation: bit-equal in float64, the nucleus gap exactly
-log(nucleus mass)), the TIS / MIS weights by hand, and their wiring into GRPO and PPO."""

from __future__ import annotations

import math

import pytest
import torch

import trustrl.rollout_engines as rollout_engines
from trustrl.algorithms.grpo import GRPOTrainer
from trustrl.algorithms.ppo import PPOTrainer
from trustrl.config import ConfigError, GRPOConfig, PPOConfig, build_config
from trustrl.logging import read_metrics
from trustrl.logprobs import chunked_token_logprobs
from trustrl.losses import logprob_gap, policy_loss_sum, rollout_correction_weights
from trustrl.models import load_policy, load_tokenizer, positions_from_mask
from trustrl.rollout import _sample_inplace, completion_logprobs, generate, left_pad, sample_next


def count_a(prompts, completions, **columns):
    return [c.count("a") / max(len(c), 1) for c in completions]


# ------------------------------------------------------------------ the sampler's log-probs


def test_behaviour_logprobs_of_drawn_tokens_by_hand():
    # probabilities 0.5, 0.3, 0.15, 0.05 (logits = their logs)
    p = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    logits = p.log().expand(400, 4)
    g = torch.Generator().manual_seed(0)
    token, logp = sample_next(logits, 1.0, 1.0, g, return_logprobs=True)
    torch.testing.assert_close(logp, p.log()[token], rtol=0, atol=1e-15)
    # temperature 2: softmax(log p / 2) = sqrt(p) / sum(sqrt(p))
    token, logp = sample_next(logits, 2.0, 1.0, g, return_logprobs=True)
    q = p.sqrt() / p.sqrt().sum()
    torch.testing.assert_close(logp, q.log()[token], rtol=0, atol=1e-15)
    # top_p = 0.7 keeps {0, 1} (0.5 < 0.7 <= 0.8): drawn with p / 0.8 -> log 0.625 or log 0.375
    token, logp = sample_next(logits, 1.0, 0.7, g, return_logprobs=True)
    assert set(token.tolist()) == {0, 1}
    torch.testing.assert_close(logp, (p[:2] / 0.8).log()[token], rtol=0, atol=1e-15)
    # greedy: a point mass, log 1 = 0
    token, logp = sample_next(logits, 0.0, 1.0, None, return_logprobs=True)
    assert token.eq(0).all() and logp.eq(0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_on_equal_logits_the_sampler_and_the_trainer_agree_bitwise(dtype, temperature):
    """One code path: from the same hidden states and LM head, the sampler's behaviour log-prob
    and the trainer's chunked log-prob of the drawn token are the same number, bit for bit."""
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(64, 16, generator=gen, dtype=dtype)
    weight = torch.randn(300, 16, generator=gen, dtype=dtype)
    logits = hidden @ weight.t()
    token, behaviour = _sample_inplace(logits.clone(), temperature, 1.0, torch.Generator().manual_seed(1))
    trainer = chunked_token_logprobs(hidden, weight, token, temperature=temperature)
    assert torch.equal(behaviour, trainer)


def _rollout(model_dir, dtype, top_p):
    tok = load_tokenizer(model_dir)
    model = load_policy(model_dir)
    model = model.to(dtype)
    ids, mask = left_pad([tok(t)["input_ids"] for t in ["1+2=", "13+4=", "7+", "99+1="] * 4], tok.pad_token_id)
    rollout = generate(model, ids, mask, max_new_tokens=12, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id, temperature=0.7, top_p=top_p, row_seeds=torch.arange(16))
    return model, rollout


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_sampler_and_trainer_log_probs_are_one_code_path(tiny_model_dir, dtype, tolerance):
    """The KV-cache sampler's behaviour log-probs against the trainer's full-forward
    recomputation, same precision, same batch layout. Measured: float64 bit-equal on every
    token (max gap 0.0); float32 max 4.8e-7, ~90% of tokens bit-equal (the prompt forward and the
    one-token cache steps run attention on other shapes than the full forward)."""
    model, rollout = _rollout(tiny_model_dir, dtype, top_p=1.0)
    assert rollout.behaviour_logprobs.dtype == dtype
    with torch.no_grad():
        trainer = completion_logprobs(model, rollout, temperature=0.7)
    valid = rollout.completion_mask
    assert int(valid.sum()) > 100
    gap_max, gap_sum, n = logprob_gap(trainer, rollout.behaviour_logprobs, valid)
    assert gap_max <= tolerance, gap_max
    assert rollout.behaviour_logprobs[~valid].eq(0).all()


def test_top_p_behaviour_log_probs_are_the_renormalized_nucleus(tiny_model_dir):
    """With top_p < 1 the sampler draws from the nucleus renormalized; the trainer's log-probs
    are those of the full softmax. So per token: behaviour - trainer = -log(nucleus mass) >= 0,
    the nucleus recomputed here independently from the full forward's logits (float64)."""
    model, rollout = _rollout(tiny_model_dir, torch.float64, top_p=0.9)
    with torch.no_grad():
        trainer = completion_logprobs(model, rollout, temperature=0.7)
        full = model(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask.long(),
                     position_ids=positions_from_mask(rollout.attention_mask)).logits
    P = rollout.prompt_ids.shape[1]
    probs = torch.softmax(full[:, P - 1:-1] / 0.7, dim=-1)
    sorted_probs = probs.sort(dim=-1, descending=True).values
    before = sorted_probs.cumsum(dim=-1) - sorted_probs
    nucleus_mass = torch.where(before < 0.9, sorted_probs, torch.zeros_like(sorted_probs)).sum(dim=-1)
    valid = rollout.completion_mask
    gap = (rollout.behaviour_logprobs - trainer)[valid]
    torch.testing.assert_close(gap, -nucleus_mass.log()[valid], rtol=0, atol=1e-12)
    assert gap.min() >= 0 and gap.max() > 0.01


# ------------------------------------------------------------------ TIS / MIS weights by hand


def test_rollout_correction_weights_by_hand():
    # log pi_old - log mu per token: row 0 [log 3, log 0.25, -], row 1 [log 1.5, log 0.8, log 0.5]
    old = torch.tensor([[math.log(3.0), math.log(0.25), 9.0], [math.log(1.5), math.log(0.8), math.log(0.5)]],
                       dtype=torch.float64)
    mu = torch.zeros_like(old)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    # TIS, cap 2: min(rho, 2) -> [2, 0.25, 0], [1.5, 0.8, 0.5]; 1 of 5 tokens above the cap
    w, m = rollout_correction_weights(old, mu, mask, mode="tis", cap=2.0)
    torch.testing.assert_close(w, torch.tensor([[2.0, 0.25, 0.0], [1.5, 0.8, 0.5]], dtype=torch.float64))
    assert m["truncated_fraction"] == pytest.approx(0.2) and m["ratio_max"] == pytest.approx(3.0)
    assert m["weight_mean"] == pytest.approx((2 + 0.25 + 1.5 + 0.8 + 0.5) / 5)
    # MIS, band [1/2, 2]: rho 3 and 0.25 dropped; 0.5 sits on the edge and stays
    w, m = rollout_correction_weights(old, mu, mask, mode="mis", cap=2.0)
    torch.testing.assert_close(w, torch.tensor([[0.0, 0.0, 0.0], [1.5, 0.8, 0.5]], dtype=torch.float64))
    assert m["masked_fraction"] == pytest.approx(0.4)
    # MIS with lower = 0 (TRL's mask modes): only rho 3 is dropped
    w, _ = rollout_correction_weights(old, mu, mask, mode="mis", cap=2.0, lower=0.0)
    torch.testing.assert_close(w, torch.tensor([[0.0, 0.25, 0.0], [1.5, 0.8, 0.5]], dtype=torch.float64))
    # sequence level: rho_0 = 3 * 0.25 = 0.75, rho_1 = 1.5 * 0.8 * 0.5 = 0.6 on every valid token
    w, _ = rollout_correction_weights(old, mu, mask, mode="tis", level="sequence", cap=2.0)
    torch.testing.assert_close(w, torch.tensor([[0.75, 0.75, 0.0], [0.6, 0.6, 0.6]], dtype=torch.float64))
    # sequence MIS with the band [1/1.5, 1.5]: 0.75 stays, 0.6 < 0.667 drops the whole sequence
    w, _ = rollout_correction_weights(old, mu, mask, mode="mis", level="sequence", cap=1.5)
    torch.testing.assert_close(w, torch.tensor([[0.75, 0.75, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64))
    w, _ = rollout_correction_weights(old, mu, mask, mode="none")
    assert torch.equal(w, mask.double())
    with pytest.raises(ValueError, match="cap must be > 1"):
        rollout_correction_weights(old, mu, mask, mode="tis", cap=1.0)


def test_weighted_surrogate_by_hand_and_zero_weight_drops_only_the_gradient():
    # ratio 1 everywhere (logp = old), A = [1, -2]: J = w * A per token; token_mean over 3 tokens
    logp = torch.zeros(2, 2, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, True], [True, False]])
    w = torch.tensor([[2.0, 0.0], [0.5, 7.0]], dtype=torch.float64)
    part, _ = policy_loss_sum(logp, torch.zeros(2, 2, dtype=torch.float64), torch.tensor([1.0, -2.0]), mask,
                              weights=w)
    # -(2 * 1 + 0 * 1 + 0.5 * (-2)) = -1, over 3 tokens (the zero-weight token still counts)
    assert float(part.total) == pytest.approx(-1.0) and float(part.count) == 3
    part.total.backward()
    # d/dlogp of -(w r A): -w A at ratio 1
    torch.testing.assert_close(logp.grad, torch.tensor([[-2.0, 0.0], [1.0, 0.0]], dtype=torch.float64))


def test_logprob_gap_by_hand():
    a = torch.tensor([[0.0, -1.0, 5.0]])
    b = torch.tensor([[0.5, -1.25, 0.0]])
    assert logprob_gap(a, b, torch.tensor([[True, True, False]])) == (0.5, 0.75, 2)


# ------------------------------------------------------------------ wiring


def _grpo_config(tiny_model_dir, addition_data, tmp_path, **overrides):
    base = dict(model=str(tiny_model_dir), dataset=str(addition_data["rl"]), output_dir=str(tmp_path / "run"),
                max_steps=1, prompts_per_step=4, group_size=4, max_completion_length=6, max_prompt_length=16,
                learning_rate=1e-3, beta=0.0, progress=False, tensorboard=False, seed=0, rewards=[])
    base.update(overrides)
    return GRPOConfig(**base)



def test_grpo_logs_the_gap_and_tis_with_its_own_sampler_is_nearly_no_correction(grpo_update_gradients, tiny_model_dir,
                                                                                  addition_data, tmp_path, monkeypatch):
    grads = {}
    for mode in ("none", "tis"):
        captured = grpo_update_gradients()
        cfg = _grpo_config(tiny_model_dir, addition_data, tmp_path / mode, rollout_correction=mode)
        GRPOTrainer(cfg, reward_funcs=[count_a]).train()
        grads[mode] = captured[0]
        monkeypatch.undo()
        row = read_metrics(cfg.output_dir)[-1]
        assert 0 <= row["rollout/logprob_diff_max"] < 2e-6 and row["rollout/logprob_diff_mean"] <= row[
            "rollout/logprob_diff_max"]
    assert row["rollout/is_weight_mean"] == pytest.approx(1.0, abs=1e-5)
    scale = max(float(g.abs().max()) for g in grads["none"].values())
    for name, g in grads["none"].items():  # weights exp(gap) within 2e-6 of 1
        torch.testing.assert_close(grads["tis"][name], g, rtol=0, atol=1e-5 * scale)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_grpo_mis_drops_tokens_whose_engine_disagrees(grpo_update_gradients, tiny_model_dir, addition_data, tmp_path,
                                                     monkeypatch, level):
    """An engine whose log-probs are 5 nats above the trainer's on every token: rho = e^-5 is
    outside [1/2, 2], every token is masked, and (beta = 0) the policy gradient is exactly 0."""
    original = rollout_engines.generate  # what trustrl's engine samples with

    def off_by_five(*args, **kwargs):
        rollout = original(*args, **kwargs)
        rollout.behaviour_logprobs = rollout.behaviour_logprobs + 5.0
        return rollout

    monkeypatch.setattr(rollout_engines, "generate", off_by_five)
    captured = grpo_update_gradients()
    cfg = _grpo_config(tiny_model_dir, addition_data, tmp_path, rollout_correction="mis",
                       rollout_correction_level=level, rollout_correction_cap=2.0)
    GRPOTrainer(cfg, reward_funcs=[count_a]).train()
    assert captured and all(g.eq(0).all() for g in captured[0].values())
    row = read_metrics(cfg.output_dir)[-1]
    assert row["rollout/is_masked_fraction"] == 1.0 and row["rollout/is_weight_mean"] == 0.0
    assert row["rollout/logprob_diff_mean"] == pytest.approx(5.0, abs=1e-5)


def test_ppo_runs_with_tis_and_logs_the_gap(tiny_model_dir, addition_data, tmp_path):
    cfg = PPOConfig(model=str(tiny_model_dir), dataset=str(addition_data["rl"]), output_dir=str(tmp_path / "run"),
                    max_steps=1, prompts_per_step=4, samples_per_prompt=2, minibatch_size=4, ppo_epochs=1,
                    max_completion_length=6, max_prompt_length=16, progress=False, tensorboard=False, seed=0,
                    rollout_correction="tis", rollout_correction_level="sequence", micro_batch_tokens=40)
    PPOTrainer(cfg, reward_funcs=[count_a]).train()
    row = read_metrics(cfg.output_dir)[-1]
    assert 0 <= row["rollout/logprob_diff_max"] < 2e-6
    assert row["rollout/is_weight_mean"] == pytest.approx(1.0, abs=1e-4)


def test_settings_that_cannot_be_honoured_are_refused(tiny_model_dir, addition_data, tmp_path):
    base = dict(model="m", dataset="d")
    with pytest.raises(ConfigError, match="rollout_correction_level=sequence"):
        build_config(GRPOConfig, {**base, "importance_level": "sequence", "rollout_correction": "tis"})
    with pytest.raises(ConfigError, match="must be below rollout_correction_cap"):
        build_config(GRPOConfig, {**base, "rollout_correction": "mis", "rollout_correction_lower": 3.0})
    with pytest.raises(ConfigError, match="set one of micro_batch_tokens"):
        build_config(GRPOConfig, {**base, "micro_batch_tokens": 64, "gradient_accumulation_steps": 2})
    from trustrl.algorithms.trpo import TRPOTrainer
    from trustrl.config import TRPOConfig

    cfg = TRPOConfig(model=str(tiny_model_dir), dataset=str(addition_data["rl"]), output_dir=str(tmp_path / "t"),
                     progress=False, tensorboard=False, rollout_correction="tis")
    with pytest.raises(ValueError, match="rollout_correction: not implemented for trpo"):
        TRPOTrainer(cfg, reward_funcs=[count_a])
