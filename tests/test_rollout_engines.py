"""Rollout engines: trustrl's sampler and the vLLM adapter behind one interface.

vLLM does not run on this CPU machine: the adapter is tested against a stand-in with the
methods and attributes of vLLM's ``LLM`` that it uses (``generate`` with per-request
``SamplingParams`` and ``TokensPrompt``s returning ``RequestOutput``-shaped objects,
``collective_rpc`` reaching ``worker.get_model().load_weights``, ``reset_prefix_cache``,
``sleep`` / ``wake_up``). The stand-in samples with its own copy of the model through
trustrl's sampler, so the adapter's layout logic is checked against an independent engine
object: same rows, same tokens, same behaviour log-probs, and weights that really move."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

import trustrl.algorithms.base as base_module
from trustrl.algorithms.grpo import GRPOTrainer
from trustrl.config import GRPOConfig
from trustrl.logging import read_metrics
from trustrl.models import load_policy, load_tokenizer
from trustrl.rollout import generate, left_pad
from trustrl.rollout_engines import SamplingSettings, TrustrlEngine, VLLMEngine, make_engine


class StandInSamplingParams(SimpleNamespace):
    """vllm.SamplingParams(n, temperature, top_p, max_tokens, logprobs, seed, stop_token_ids)."""


def stand_in_tokens_prompt(prompt_token_ids):
    """vllm.inputs.TokensPrompt is a TypedDict: a plain dict with ``prompt_token_ids``."""
    return {"prompt_token_ids": prompt_token_ids}


class StandInModel:
    """The worker's model: ``load_weights(weights=[(hf_name, tensor)])``."""

    def __init__(self, hf_model):
        self.hf_model = hf_model
        self.loaded = 0

    def load_weights(self, weights):
        state = self.hf_model.state_dict()
        for name, tensor in weights:
            state[name].copy_(tensor)
        self.loaded += 1


class StandInLLM:
    """The slice of ``vllm.LLM`` the adapter uses, sampling with its own model copy."""

    def __init__(self, hf_model, eos_token_id, pad_token_id, scripted=None):
        self.model = StandInModel(hf_model)
        self.worker = SimpleNamespace(get_model=lambda: self.model)  # vLLM's Worker.get_model()
        self.eos, self.pad, self.scripted = eos_token_id, pad_token_id, scripted
        self.calls: list[str] = []

    def generate(self, prompts, sampling_params, use_tqdm=True):
        self.calls.append("generate")
        assert len(prompts) == len(sampling_params) and all(p.n == 1 and p.logprobs == 0 for p in sampling_params)
        if self.scripted is not None:
            return self.scripted
        sp = sampling_params[0]
        ids, mask = left_pad([p["prompt_token_ids"] for p in prompts], self.pad)
        r = generate(self.model.hf_model, ids, mask, max_new_tokens=sp.max_tokens, eos_token_id=sp.stop_token_ids[0],
                     pad_token_id=self.pad, temperature=sp.temperature, top_p=sp.top_p,
                     row_seeds=torch.tensor([p.seed for p in sampling_params]))
        outputs = []
        for row in range(len(prompts)):
            n = int(r.completion_mask[row].sum())
            tokens = r.completion_ids[row, :n].tolist()
            logprobs = [{tok: SimpleNamespace(logprob=float(r.behaviour_logprobs[row, t]), rank=1)}
                        for t, tok in enumerate(tokens)]
            finish = "stop" if tokens and tokens[-1] == sp.stop_token_ids[0] else "length"
            outputs.append(SimpleNamespace(outputs=[SimpleNamespace(token_ids=tokens, logprobs=logprobs,
                                                                    finish_reason=finish)]))
        return outputs

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        self.calls.append("collective_rpc")
        return [method(self.worker, *args, **(kwargs or {}))]

    def reset_prefix_cache(self):
        self.calls.append("reset_prefix_cache")

    def sleep(self, level=1):
        self.calls.append(f"sleep{level}")

    def wake_up(self, tags=None):
        self.calls.append("wake_up")


def _engines(model_dir, **kwargs):
    tok = load_tokenizer(model_dir)
    policy = load_policy(model_dir)
    llm = StandInLLM(copy.deepcopy(policy), tok.eos_token_id, tok.pad_token_id)
    vllm = VLLMEngine(llm, StandInSamplingParams, stand_in_tokens_prompt, torch.device("cpu"), **kwargs)
    return tok, policy, llm, vllm, TrustrlEngine(policy, torch.device("cpu"))


def _prompts(tok):
    return [tok(t)["input_ids"] for t in ["1+2=", "13+4=", "7+", "99+1="] * 3]


@pytest.mark.parametrize("temperature, top_p", [(0.8, 1.0), (1.0, 0.9), (0.0, 1.0)])
def test_vllm_adapter_lays_out_what_trustrls_sampler_does(tiny_model_dir, temperature, top_p):
    tok, policy, llm, vllm, own = _engines(tiny_model_dir)
    settings = SamplingSettings(8, temperature, top_p, tok.eos_token_id, tok.pad_token_id)
    seeds = torch.arange(12) * 1000 + 7
    a = vllm.generate(_prompts(tok), settings, row_seeds=seeds)
    b = own.generate(_prompts(tok), settings, row_seeds=seeds)
    for field in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "truncated"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert torch.equal(a.behaviour_logprobs, b.behaviour_logprobs)
    if temperature > 0:
        assert b.truncated.any() and (~b.truncated).any()  # both kinds of ending occur


def test_vllm_outputs_to_rollout_by_hand():
    # row 0 ends with EOS (2) after 3 tokens; row 1 runs to max_tokens = 4 without it
    eos, pad = 2, 0
    scripted = [
        SimpleNamespace(outputs=[SimpleNamespace(token_ids=[5, 6, eos], finish_reason="stop",
                                                 logprobs=[{5: SimpleNamespace(logprob=-0.5)}, {6: SimpleNamespace(logprob=-1.0)},
                                                           {eos: SimpleNamespace(logprob=-0.25)}])]),
        SimpleNamespace(outputs=[SimpleNamespace(token_ids=[7, 8, 9, 10], finish_reason="length",
                                                 logprobs=[{t: SimpleNamespace(logprob=-0.1 * t)} for t in (7, 8, 9, 10)])]),
    ]
    llm = StandInLLM(None, eos, pad, scripted=scripted)
    engine = VLLMEngine(llm, StandInSamplingParams, stand_in_tokens_prompt, torch.device("cpu"))
    r = engine.generate([[11, 12, 13], [14]], SamplingSettings(4, 1.0, 1.0, eos, pad), row_seeds=torch.tensor([-3, 4]))
    assert r.prompt_ids.tolist() == [[11, 12, 13], [pad, pad, 14]]
    assert r.completion_ids.tolist() == [[5, 6, eos, pad], [7, 8, 9, 10]]
    assert r.completion_mask.tolist() == [[True, True, True, False], [True, True, True, True]]
    assert r.truncated.tolist() == [False, True]
    torch.testing.assert_close(r.behaviour_logprobs, torch.tensor([[-0.5, -1.0, -0.25, 0.0], [-0.7, -0.8, -0.9, -1.0]]))
    # no log-probs (an engine asked without logprobs=0): refused, never zeros
    scripted[0].outputs[0].logprobs = None
    with pytest.raises(ValueError, match="no log-prob"):
        engine.generate([[11], [14]], SamplingSettings(4, 1.0, 1.0, eos, pad), row_seeds=torch.tensor([1, 2]))


def test_weight_sync_moves_the_engines_weights_and_drops_its_prefix_cache(tiny_model_dir):
    tok, policy, llm, vllm, own = _engines(tiny_model_dir)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    settings = SamplingSettings(8, 1.0, 1.0, tok.eos_token_id, tok.pad_token_id)
    seeds = torch.arange(12)
    stale = vllm.generate(_prompts(tok), settings, row_seeds=seeds)
    fresh = own.generate(_prompts(tok), settings, row_seeds=seeds)
    assert not torch.equal(stale.behaviour_logprobs, fresh.behaviour_logprobs)  # the engine had the old weights
    vllm.sync_weights(policy)
    assert llm.calls[-2:] == ["collective_rpc", "reset_prefix_cache"] and llm.model.loaded == 1
    for name, t in policy.state_dict().items():
        assert torch.equal(llm.model.hf_model.state_dict()[name], t), name
    synced = vllm.generate(_prompts(tok), settings, row_seeds=seeds)
    assert torch.equal(synced.completion_ids, fresh.completion_ids)
    assert torch.equal(synced.behaviour_logprobs, fresh.behaviour_logprobs)


def test_sleep_mode_sleeps_during_the_update_and_wakes_before_sampling(tiny_model_dir):
    tok, policy, llm, vllm, _ = _engines(tiny_model_dir, sleep_mode=True)
    vllm.sleep()
    vllm.sleep()  # already asleep: one call
    vllm.sync_weights(policy)
    vllm.generate(_prompts(tok)[:2], SamplingSettings(2, 1.0, 1.0, tok.eos_token_id, tok.pad_token_id),
                  row_seeds=torch.arange(2))
    assert llm.calls == ["sleep1", "wake_up", "collective_rpc", "reset_prefix_cache", "generate"]
    _, _, llm2, plain, _ = _engines(tiny_model_dir)  # sleep_mode off: never sleeps
    plain.sleep()
    assert llm2.calls == []


def test_vllm_is_refused_with_a_clear_error_where_it_cannot_run(tiny_model_dir, addition_data, tmp_path):
    cfg = GRPOConfig(model=str(tiny_model_dir), dataset=str(addition_data["rl"]), output_dir=str(tmp_path),
                     rollout_engine="vllm", rewards=[{"name": "numeric_answer"}], progress=False)
    try:
        import vllm  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match=r"rollout_engine=vllm: vLLM is not importable"):
            make_engine(cfg, None, torch.device("cpu"))
    with pytest.raises(ValueError, match="rollout_engine=vllm: LoRA"):
        make_engine(cfg.model_copy(update={"lora": {"r": 4}}), None, torch.device("cpu"))
    assert isinstance(make_engine(cfg.model_copy(update={"rollout_engine": "trustrl"}), None, "cpu"), TrustrlEngine)


def test_grpo_with_the_vllm_adapter_syncs_after_every_update(tiny_model_dir, addition_data, tmp_path, monkeypatch):
    """GRPO end to end through the adapter (stand-in engine, its own model copy). A large
    learning rate moves the policy at every step; the trainer's recomputed log-probs match the
    engine's behaviour log-probs at every step (logprob_diff_max < 2e-6) only because the
    engine received the new weights before each generation."""
    engines = []

    def stand_in_engine(config, policy, device):
        tok = load_tokenizer(config.model)
        llm = StandInLLM(copy.deepcopy(policy), tok.eos_token_id, tok.pad_token_id)
        engines.append(VLLMEngine(llm, StandInSamplingParams, stand_in_tokens_prompt, device))
        return engines[-1]

    monkeypatch.setattr(base_module, "make_engine", stand_in_engine)
    cfg = GRPOConfig(model=str(tiny_model_dir), dataset=str(addition_data["rl"]), output_dir=str(tmp_path / "run"),
                     max_steps=3, prompts_per_step=2, group_size=4, max_completion_length=6, max_prompt_length=16,
                     learning_rate=5e-2, beta=0.0, progress=False, tensorboard=False, seed=0,
                     rewards=[], rollout_engine="vllm", rollout_correction="tis")

    def count_a(prompts, completions, **columns):
        return [c.count("a") / max(len(c), 1) for c in completions]

    GRPOTrainer(cfg, reward_funcs=[count_a]).train()
    engine = engines[0]
    assert engine.syncs == 3  # before steps 1 (a resumed run's weights), 2 and 3
    rows = [r for r in read_metrics(cfg.output_dir) if "rollout/logprob_diff_max" in r]
    assert len(rows) == 3 and all(r["rollout/logprob_diff_max"] < 2e-6 for r in rows)
    # without the sync the engine samples with stale weights: the gap shows it
    trainer = GRPOTrainer(cfg.model_copy(update={"output_dir": str(tmp_path / "stale")}), reward_funcs=[count_a])
    engines[-1].sync_weights = lambda policy: None
    trainer.train()
    stale = [r["rollout/logprob_diff_max"] for r in read_metrics(tmp_path / "stale") if "rollout/logprob_diff_max" in r]
    assert stale[0] < 2e-6 and max(stale[1:]) > 1e-3
