"""The architecture matrix: on tiny random models of every causal-LM architecture the README
lists, trustrl's log-probs are the model's own (its final-logit transform switched on:
Gemma's soft-cap, Cohere's logit scale, Granite's logits scaling), greedy decoding equals
transformers' ``generate``, the importance ratio is exactly 1 before the first update, and one
GRPO and one PPO step run.

Each model is built here from a config with tiny sizes (2 layers, hidden 32, vocabulary 128),
its LM head scaled up so that logits reach a few units (a fresh model's logits are ~0.1, where
a soft-cap of 3 would change nothing measurable), saved with ``save_pretrained`` and loaded
back through ``trustrl.models.load_policy`` (``AutoModelForCausalLM.from_pretrained``, the
attention implementation the loader picks: eager for Gemma 2, sdpa elsewhere).

The independent reference everywhere is transformers' own forward:
``log_softmax(model(input_ids, attention_mask, position_ids).logits / T)`` in float64, with the
position ids the sampler passes (0 on each row's first real token).
"""

from __future__ import annotations

import math

import pytest
import torch

from trustrl.logprobs import chunked_token_logprobs
from trustrl.models import LogitsMismatchError, VERIFIED_ARCHITECTURES, load_policy, load_tokenizer, logit_transform
from trustrl.rollout import (
    Rollout,
    batched_completion_logprobs,
    completion_logits,
    completion_logprobs,
    completion_logprobs_for_targets,
    generate,
    left_pad,
    positions_from_mask,
)

V = 128  # vocabulary: the character tokenizer below has exactly V tokens
TEMPERATURE = 0.7
# LM-head weights x gain: a fresh model's logit std ~0.1 becomes ~2 (measured at T = 0.7: mean
# entropy 0.5-2 nats, so samples differ and the soft-cap and scales bite). Tied embeddings
# (GPT-2, Cohere) scale the input too and need less; Gemma's cap and Granite's division more.
HEAD_GAIN = {"gpt2": 10.0, "cohere": 15.0, "gemma2": 40.0, "gemma3": 40.0, "granite": 40.0}
DEFAULT_GAIN = 20.0

# the transform each architecture is built with: soft-cap c = 3 (|logits| up to ~10 are
# squashed to < 3), Cohere logit_scale 0.5, Granite logits_scaling 4 (logits / 4)
SOFTCAP, LOGIT_SCALE, LOGITS_SCALING = 3.0, 0.5, 4.0


def _common() -> dict:
    return dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _config(name: str):
    import transformers as tf

    c = _common()
    builders = {
        "llama": lambda: tf.LlamaConfig(**c),
        "qwen2": lambda: tf.Qwen2Config(**c),
        "qwen3": lambda: tf.Qwen3Config(**c, head_dim=8),
        # sliding window 4 < the sequences' length: the window is exercised in both passes
        "mistral": lambda: tf.MistralConfig(**c, sliding_window=4),
        "gpt2": lambda: tf.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                      pad_token_id=0, bos_token_id=1, eos_token_id=2),
        "gpt_neox": lambda: tf.GPTNeoXConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, max_position_embeddings=64, pad_token_id=0,
                                             bos_token_id=1, eos_token_id=2),
        "phi3": lambda: tf.Phi3Config(**c),
        "gemma2": lambda: tf.Gemma2Config(**c, head_dim=8, query_pre_attn_scalar=8, sliding_window=4,
                                          final_logit_softcapping=SOFTCAP, attn_logit_softcapping=5.0),
        "gemma3": lambda: tf.Gemma3TextConfig(**c, head_dim=8, query_pre_attn_scalar=8, sliding_window=4,
                                              final_logit_softcapping=SOFTCAP),
        "cohere": lambda: tf.CohereConfig(**c, logit_scale=LOGIT_SCALE),
        "granite": lambda: tf.GraniteConfig(**c, logits_scaling=LOGITS_SCALING),
        "olmo2": lambda: tf.Olmo2Config(**c),
        "qwen2_moe": lambda: tf.Qwen2MoeConfig(**c, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                               shared_expert_intermediate_size=32),
        "mixtral": lambda: tf.MixtralConfig(**c, num_local_experts=4, num_experts_per_tok=2),
    }
    return builders[name]()


ARCHITECTURES = ["llama", "qwen2", "qwen3", "mistral", "gpt2", "gpt_neox", "phi3", "gemma2", "gemma3", "cohere",
                 "granite", "olmo2", "qwen2_moe", "mixtral"]
TRANSFORMED = {"gemma2", "gemma3", "cohere", "granite"}


def _tokenizer():
    """A character tokenizer with exactly V tokens (every id the model can sample decodes to
    text, so rewards see what was sampled): the arithmetic task's characters, ASCII letters and
    punctuation, then Latin-Extended letters up to V."""
    import string

    from trustrl.tasks.arithmetic import CHARS, SPECIAL_TOKENS
    from trustrl.tiny import build_char_tokenizer

    chars = "".join(dict.fromkeys(CHARS + "\n" + string.ascii_letters + string.punctuation))
    n_specials = 4 + len(SPECIAL_TOKENS)  # pad, bos, eos, unk + the task's tags
    chars += "".join(chr(0x100 + i) for i in range(V - n_specials - len(chars)))
    tok = build_char_tokenizer(chars, SPECIAL_TOKENS)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2) and len(tok) == V
    return tok


def _save_tiny(directory, config, gain: float = DEFAULT_GAIN, seed: int = 0):
    from transformers import AutoModelForCausalLM

    tok = _tokenizer()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(gain)
    model.save_pretrained(str(directory), safe_serialization=True)
    tok.save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module", params=ARCHITECTURES)
def arch(request, tmp_path_factory):
    """(name, model directory) for each architecture of the matrix."""
    name = request.param
    return name, _save_tiny(tmp_path_factory.mktemp(f"arch_{name}"), _config(name), HEAD_GAIN.get(name, DEFAULT_GAIN))


def _rollout() -> Rollout:
    """Three left-padded prompts of 2, 5 and 7 tokens and completions of 4, 2 and 3 tokens
    (right-padded with 0), token ids fixed by a seeded generator."""
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, V, (n,), generator=g).tolist() for n in (2, 5, 7)]
    prompt_ids, prompt_mask = left_pad(prompts, pad_id=0)
    completion_ids = torch.randint(3, V, (3, 4), generator=g)
    completion_mask = torch.arange(4)[None, :] < torch.tensor([4, 2, 3])[:, None]
    completion_ids = completion_ids.masked_fill(~completion_mask, 0)
    return Rollout(prompt_ids, prompt_mask, completion_ids, completion_mask, truncated=torch.tensor([True, False, False]))


def _reference_log_softmax(model, input_ids, attention_mask) -> torch.Tensor:
    """transformers' forward -> logits / T -> float64 log_softmax: ``[B, T, V]``."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask.long(),
                   position_ids=positions_from_mask(attention_mask)).logits
    return torch.log_softmax(logits.double() / TEMPERATURE, dim=-1)


def test_logprobs_entropy_and_gradients_equal_the_models_forward(arch):
    name, directory = arch
    model = load_policy(directory)
    rollout = _rollout()
    P, mask = rollout.prompt_ids.shape[1], rollout.completion_mask
    transform = logit_transform(model)
    assert transform.is_identity == (name not in TRANSFORMED)

    ref_all = _reference_log_softmax(model, rollout.input_ids, rollout.attention_mask)
    ref = ref_all[:, P - 1:-1]  # positions that predict the completion tokens
    ref_logp = ref.gather(-1, rollout.completion_ids[..., None]).squeeze(-1)
    ref_entropy = -(ref.exp() * ref).sum(-1)

    # rollout / old / reference / current log-probs and the entropy (chunk 3 < B * C rows)
    logp, entropy = completion_logprobs(model, rollout, temperature=TEMPERATURE, chunk_size=3, return_entropy=True)
    assert (logp.double() - ref_logp)[mask].abs().max() <= 1e-5
    assert (entropy.double() - ref_entropy)[mask].abs().max() <= 1e-5

    # full logits (TRPO's KL, PPO's entropy bonus): every vocabulary entry
    full = torch.log_softmax(completion_logits(model, rollout, temperature=TEMPERATURE).double(), dim=-1)
    assert (full - ref)[mask].abs().max() <= 1e-5

    # teacher forcing (SFT, pre-training): every position whose context and target are real
    ids, att = rollout.input_ids, rollout.attention_mask
    targets = completion_logprobs_for_targets(model, ids, att, temperature=TEMPERATURE, chunk_size=5)
    ref_targets = ref_all[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    both = att[:, :-1] & att[:, 1:]
    assert (targets.double() - ref_targets)[both].abs().max() <= 1e-5

    if name in TRANSFORMED:
        # the check has teeth: without the transform the log-probs are far off
        from trustrl.models import lm_backbone_and_head
        from trustrl.rollout import completion_hidden_states

        _, head = lm_backbone_and_head(model)
        plain = chunked_token_logprobs(completion_hidden_states(model, rollout), head.weight, rollout.completion_ids,
                                       bias=head.bias, temperature=TEMPERATURE)
        assert (plain.double() - ref_logp)[mask].abs().max() > 1e-2

    # gradients of sum(log-probs) w.r.t. every parameter: ours (chunked custom backward,
    # transform derivative included) against autograd through the model's own forward
    model.zero_grad()
    ours = completion_logprobs(model, rollout, temperature=TEMPERATURE, chunk_size=3)
    ours[mask].sum().backward()
    ours_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    logits = model(input_ids=ids, attention_mask=att.long(), position_ids=positions_from_mask(att)).logits
    theirs = torch.log_softmax(logits[:, P - 1:-1] / TEMPERATURE, dim=-1)
    theirs = theirs.gather(-1, rollout.completion_ids[..., None]).squeeze(-1)
    theirs[mask].sum().backward()
    theirs_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert ours_grads.keys() == theirs_grads.keys() and ours_grads
    scale = max(float(g.abs().max()) for g in theirs_grads.values())
    for n, g in theirs_grads.items():
        # float32 sums in different orders: 1e-4 of the largest entry (a missing transform
        # derivative is off by a factor of order 1)
        torch.testing.assert_close(ours_grads[n], g, rtol=0, atol=1e-4 * scale, msg=n)


def test_critic_trunk_sees_the_policys_hidden_states(arch):
    # PPO's critic is AutoModel on the same directory: its hidden states at the completion
    # positions must be the policy trunk's (same positions, same attention)
    from trustrl.models import lm_backbone_and_head, trunk_hidden_states
    from trustrl.value_model import scalar_model_from_lm

    name, directory = arch
    model = load_policy(directory)
    critic = scalar_model_from_lm(directory)
    rollout = _rollout()
    backbone, _ = lm_backbone_and_head(model)
    with torch.no_grad():
        ours = critic.hidden_states(rollout.input_ids, rollout.attention_mask)
        policy = trunk_hidden_states(backbone, rollout.input_ids, rollout.attention_mask)
    assert type(critic.trunk) is type(backbone)
    keep = rollout.attention_mask
    torch.testing.assert_close(ours[keep], policy[keep], rtol=0, atol=1e-6)


def test_greedy_generate_equals_transformers_generate(arch):
    name, directory = arch
    tok = load_tokenizer(directory)
    model = load_policy(directory)
    prompts = [tok(t)["input_ids"] for t in ("1+2=", "13+4=", "7")]
    ids, mask = left_pad(prompts, tok.pad_token_id)
    assert not mask.all()  # left padding is exercised
    ours = generate(model, ids, mask, max_new_tokens=6, eos_token_id=tok.eos_token_id,
                    pad_token_id=tok.pad_token_id, temperature=0.0)
    theirs = model.generate(input_ids=ids, attention_mask=mask.long(), max_new_tokens=6, do_sample=False,
                            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[:, ids.shape[1]:]
    assert torch.equal(ours.completion_ids, theirs)


def test_ratio_is_exactly_one_before_the_first_update(arch):
    # the trainers' way: old log-probs without gradients in eval mode, over the update's
    # micro-batches (here 2 + 1 rows); current log-probs with gradients in train mode
    _, directory = arch
    model = load_policy(directory)
    rollout = _rollout()
    old = batched_completion_logprobs(model, rollout, batch_size=2, temperature=TEMPERATURE, chunk_size=4)
    model.train()
    for rows in (torch.tensor([0, 1]), torch.tensor([2])):
        current = completion_logprobs(model, rollout.select(rows), temperature=TEMPERATURE, chunk_size=4,
                                      return_entropy=True)[0]
        assert current.requires_grad
        assert torch.equal(current.detach(), old[rows])  # exp(logp - old) == 1, bitwise


def char_code_reward(prompts, completions, **columns):
    """A reward that varies between completions (so advantages are not all 0)."""
    return [sum(map(ord, c)) % 7 / 7 for c in completions]


def test_one_grpo_step_and_one_ppo_step_run(arch, addition_data, tmp_path, monkeypatch):
    import trustrl.algorithms.grpo as grpo_module
    from trustrl.algorithms.grpo import GRPOTrainer
    from trustrl.algorithms.ppo import PPOConfig, PPOTrainer
    from trustrl.config import GRPOConfig
    from trustrl.logging import read_metrics

    name, directory = arch
    common = dict(model=str(directory), dataset=str(addition_data["rl"]), max_steps=1, max_completion_length=4,
                  max_prompt_length=16, learning_rate=1e-3, beta=0.04, progress=False, tensorboard=False, seed=0,
                  temperature=TEMPERATURE)

    # GRPO: two inner iterations over two micro-batches; record the log-ratio the loss sees
    log_ratios = []
    original = grpo_module.policy_loss_sum

    def recording(logp, old_logp, *args, **kwargs):
        log_ratios.append(logp.detach() - old_logp)
        return original(logp, old_logp, *args, **kwargs)

    monkeypatch.setattr(grpo_module, "policy_loss_sum", recording)
    cfg = GRPOConfig(**common, output_dir=str(tmp_path / "grpo"), prompts_per_step=2, group_size=4,
                     num_iterations=2, gradient_accumulation_steps=2)
    trainer = GRPOTrainer(cfg, reward_funcs=[char_code_reward])
    before = {n: p.detach().clone() for n, p in trainer.policy.named_parameters()}
    trainer.train()
    assert len(log_ratios) == 4  # 2 iterations x 2 micro-batches of 4 completions
    for log_ratio in log_ratios[:2]:  # first iteration: ratio exactly 1 (old from the same code path)
        assert torch.equal(log_ratio, torch.zeros_like(log_ratio))
    assert any(not torch.equal(before[n], p) for n, p in trainer.policy.named_parameters())
    rows = read_metrics(cfg.output_dir)
    assert math.isfinite([r for r in rows if "loss/total" in r][-1]["loss/total"])

    # PPO: one step (policy + critic on the same architecture; ent_coef > 0 takes the full-logits
    # path, completion_logits, for the entropy bonus)
    cfg = PPOConfig(**common, output_dir=str(tmp_path / "ppo"), prompts_per_step=2, samples_per_prompt=2,
                    minibatch_size=4, ppo_epochs=1, ent_coef=0.01)
    trainer = PPOTrainer(cfg, reward_funcs=[char_code_reward])
    before = {n: p.detach().clone() for n, p in trainer.policy.named_parameters()}
    trainer.train()
    assert any(not torch.equal(before[n], p) for n, p in trainer.policy.named_parameters())
    rows = read_metrics(cfg.output_dir)
    assert math.isfinite([r for r in rows if "loss/total" in r][-1]["loss/total"])


# -- refusals -------------------------------------------------------------------------------------


def test_every_matrix_architecture_is_verified_and_vice_versa(tmp_path):
    # the README's list, VERIFIED_ARCHITECTURES and this matrix name the same classes
    import transformers as tf

    classes = {type(tf.AutoModelForCausalLM.from_config(_config(n))).__name__ for n in ARCHITECTURES}
    assert classes == set(VERIFIED_ARCHITECTURES)


def test_unknown_forward_that_changes_logits_is_refused_naming_the_class():
    # a subclass may override forward, so the allow-list (exact classes) does not cover it;
    # this one halves the logits and sets no config attribute: the one-time check catches it
    from transformers import LlamaForCausalLM

    class HalvedLogitsLlama(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 0.5
            return out

    torch.manual_seed(0)
    model = HalvedLogitsLlama(_config("llama"))
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(DEFAULT_GAIN)
    with pytest.raises(LogitsMismatchError, match="HalvedLogitsLlama: trustrl's log-probs differ"):
        logit_transform(model)
    with pytest.raises(LogitsMismatchError, match="HalvedLogitsLlama"):
        completion_logprobs(model, _rollout())


def test_unknown_class_with_a_plain_forward_passes_the_check_once(monkeypatch):
    from transformers import LlamaForCausalLM

    import trustrl.models as models_module

    class PlainSubclass(LlamaForCausalLM):
        pass

    torch.manual_seed(0)
    model = PlainSubclass(_config("llama"))
    calls = []
    original = models_module._forward_gap
    monkeypatch.setattr(models_module, "_forward_gap", lambda m: calls.append(1) or original(m))
    assert logit_transform(model).is_identity
    assert logit_transform(model).is_identity
    assert len(calls) == 1  # remembered on the model object


@pytest.mark.parametrize("attribute, value", [("final_logit_softcapping", 30.0), ("logit_scale", 0.25),
                                              ("logits_scaling", 2.0), ("lm_head_multiplier", 0.5)])
def test_unknown_class_with_a_transform_attribute_is_refused_naming_it(attribute, value):
    from transformers import LlamaForCausalLM

    class CustomLM(LlamaForCausalLM):
        pass

    config = _config("llama")
    setattr(config, attribute, value)
    model = CustomLM(config)
    with pytest.raises(LogitsMismatchError, match=rf"CustomLM: config sets {attribute}={value}"):
        logit_transform(model)


def test_neutral_transform_attributes_are_not_refused():
    # attention soft-caps act inside the trunk; a scale of 1 or a soft-cap of None does nothing
    from transformers import LlamaForCausalLM

    class CustomLM(LlamaForCausalLM):
        pass

    config = _config("llama")
    config.attn_logit_softcapping = 50.0
    config.final_logit_softcapping = None
    config.logit_scale = 1.0
    assert logit_transform(CustomLM(config)).is_identity


def test_verified_architecture_with_a_bad_transform_value_is_refused_naming_it(tmp_path):
    from transformers import CohereForCausalLM

    config = _config("cohere")
    model = CohereForCausalLM(config)
    model.config.logit_scale = -1.0
    with pytest.raises(LogitsMismatchError, match=r"CohereForCausalLM config.logit_scale=-1.0"):
        logit_transform(model)


def test_real_unlisted_classes_checked_or_refused():
    # transformers classes outside the verified list: Starcoder2's forward is trunk -> lm_head
    # and passes the one-time check; FalconH1 multiplies the logits by lm_head_multiplier,
    # which trustrl does not apply for that class: refused, the attribute named
    import transformers as tf

    c = _common()
    torch.manual_seed(0)
    starcoder = tf.Starcoder2ForCausalLM(tf.Starcoder2Config(**c))
    with torch.no_grad():
        starcoder.get_output_embeddings().weight.mul_(DEFAULT_GAIN)
    assert logit_transform(starcoder).is_identity
    falcon = tf.FalconH1ForCausalLM(tf.FalconH1Config(**c, lm_head_multiplier=0.5))
    with pytest.raises(LogitsMismatchError, match=r"FalconH1ForCausalLM: config sets lm_head_multiplier=0.5"):
        logit_transform(falcon)
