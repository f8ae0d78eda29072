"""Saving a LoRA policy merged, without copying the base model (``trustrl.models.save_model``).

The reference everywhere is peft's own merge, ``copy.deepcopy(model).merge_and_unload()``,
an independent implementation: the saved tensors must equal its state dict bit for bit,
under the same key names, while the live model stays untouched and no module or tensor is
deep-copied. Configurations the exact merge does not cover must still save what peft's merge
gives (through the old deep-copy path, with a warning) or be refused, never something else.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")
tf = pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402

from trustrl.models import UnmergeableLoRA, merged_lora_state_dict, save_model  # noqa: E402
from trustrl.tiny import build_char_tokenizer  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning:peft")

TOK = build_char_tokenizer("abcdefgh")
V = len(TOK)


def _llama(dtype: torch.dtype = torch.float32, *, bias: bool = False, tie: bool = True):
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                         tie_word_embeddings=tie, attention_bias=bias, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return tf.LlamaForCausalLM(cfg).to(dtype).eval()


def _gpt2():
    torch.manual_seed(0)
    cfg = tf.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                        bos_token_id=1, eos_token_id=2)
    return tf.GPT2LMHeadModel(cfg).eval()


def _with_lora(base, adapter_dtype_autocast: bool = True, **lora) -> torch.nn.Module:
    """``base`` wrapped in LoRA whose A and B are both random (B starts at zero in peft, which
    would make the merge trivially equal to the base)."""
    model = peft.get_peft_model(base, peft.LoraConfig(lora_dropout=0.0, **lora),
                                autocast_adapter_dtype=adapter_dtype_autocast)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model.eval()


def _two_adapters():
    """Two adapters, "default" active: peft merges the active one only, drops the other."""
    model = _with_lora(_llama(), r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    model.add_adapter("other", peft.LoraConfig(r=3, lora_alpha=5, target_modules=["v_proj", "o_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".other." in name:
                p.fill_(0.5)
    model.set_adapter("default")
    return model


#: name -> a LoRA model the exact merge covers (non-zero adapters)
CASES = {
    # Llama, tied embeddings, every linear layer adapted (trustrl's default target_modules)
    "llama_all_linear": lambda: _with_lora(_llama(), r=4, lora_alpha=8, target_modules="all-linear"),
    # attention biases: ``q_proj.base_layer.bias`` must be saved as ``q_proj.bias``, unchanged
    "llama_bias_qv": lambda: _with_lora(_llama(bias=True, tie=False), r=2, lora_alpha=3.0,
                                        target_modules=["q_proj", "v_proj"]),
    # rank-stabilized scaling alpha / sqrt(r) = 8 / 2 instead of alpha / r = 8 / 4
    "llama_rslora": lambda: _with_lora(_llama(), r=4, lora_alpha=8, use_rslora=True, target_modules="all-linear"),
    # GPT-2: Conv1D stores W as [in, out], so the product is transposed (fan_in_fan_out)
    "gpt2_conv1d": lambda: _with_lora(_gpt2(), r=4, lora_alpha=8, fan_in_fan_out=True,
                                      target_modules=["c_attn", "c_proj", "c_fc"]),
    # bfloat16 base, float32 adapters (peft's autocast): the sum is rounded to bf16 once
    "llama_bf16": lambda: _with_lora(_llama(torch.bfloat16), r=4, lora_alpha=8, target_modules="all-linear"),
    # bfloat16 adapters too: on the CPU peft multiplies them in float32 and rounds the product
    # once, after the scaling (1.5: a power of two would scale bf16 exactly and hide a difference)
    "llama_bf16_adapters": lambda: _with_lora(_llama(torch.bfloat16), adapter_dtype_autocast=False, r=4,
                                              lora_alpha=6, target_modules="all-linear"),
    "two_adapters": _two_adapters,
}


def _no_module_deepcopy(monkeypatch) -> None:
    """Make deep copies of modules and tensors raise (transformers deep-copies config
    dictionaries while saving; those are fine)."""
    real = copy.deepcopy

    def guarded(obj, *args, **kwargs):
        if isinstance(obj, (torch.nn.Module, torch.Tensor)):
            raise AssertionError(f"copy.deepcopy({type(obj).__name__}) while saving")
        return real(obj, *args, **kwargs)

    monkeypatch.setattr(copy, "deepcopy", guarded)


def _ids() -> torch.Tensor:
    return torch.tensor([[1, 5, 6, 7, 8, 9, 10, 5], [1, 9, 8, 7, 6, 5, 4, 3]])


@pytest.mark.parametrize("case", sorted(CASES))
def test_saved_weights_equal_peft_merge(case: str, tmp_path: Path, monkeypatch) -> None:
    model = CASES[case]()
    live = {k: v.detach().clone() for k, v in model.state_dict().items()}
    live_config = model.get_base_model().config.to_dict()
    merged_by_peft = copy.deepcopy(model).merge_and_unload()
    expected = merged_by_peft.state_dict()
    merged_by_peft.save_pretrained(tmp_path / "peft", safe_serialization=True)  # the old save_model's output

    _no_module_deepcopy(monkeypatch)
    save_model(model, TOK, tmp_path / "new")
    monkeypatch.undo()

    saved = load_file(tmp_path / "new" / "model.safetensors")
    old = load_file(tmp_path / "peft" / "model.safetensors")
    assert saved.keys() == old.keys()  # plain names; tied copies dropped the same way
    assert not any("lora" in k or "base_layer" in k for k in saved)
    for key, tensor in saved.items():
        assert tensor.dtype == expected[key].dtype, key
        assert torch.equal(tensor, expected[key]), key  # bitwise
    assert json.loads((tmp_path / "new" / "config.json").read_text()) == json.loads(
        (tmp_path / "peft" / "config.json").read_text())
    assert (tmp_path / "new" / "tokenizer.json").is_file()

    # the merge is not a no-op: some saved weight differs from the live base weight
    base_sd = model.get_base_model().state_dict()
    assert any(not torch.equal(saved[k], base_sd[k.replace(".weight", ".base_layer.weight")])
               for k in saved if k.replace(".weight", ".base_layer.weight") in base_sd)

    # the live model is exactly as it was: tensors (bitwise), config, adapters unmerged
    after = model.state_dict()
    assert after.keys() == live.keys() and all(torch.equal(after[k], live[k]) for k in live)
    assert model.get_base_model().config.to_dict() == live_config
    assert not any(getattr(m, "merged", False) for m in model.modules())


@pytest.mark.parametrize("case", ["llama_all_linear", "gpt2_conv1d", "llama_bf16"])
def test_reloaded_model_reproduces_the_peft_model(case: str, tmp_path: Path) -> None:
    model = CASES[case]()
    copy.deepcopy(model).merge_and_unload().save_pretrained(tmp_path / "peft", safe_serialization=True)
    save_model(model, TOK, tmp_path / "new")

    def logits_of(m) -> torch.Tensor:
        with torch.no_grad():
            return m(input_ids=_ids()).logits

    peft_logits = logits_of(model)
    with model.disable_adapter():
        base_logits = logits_of(model)
    reloaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "new").eval()
    logits = logits_of(reloaded)
    # (both loaded by from_pretrained: a model cast with .to(bfloat16) also holds its rotary
    # frequencies in bfloat16, a reloaded one recomputes them in float32)
    merged_logits = logits_of(tf.AutoModelForCausalLM.from_pretrained(tmp_path / "peft").eval())
    assert type(reloaded) is type(model.get_base_model())
    assert logits.dtype == peft_logits.dtype
    assert torch.equal(logits, merged_logits)  # same weights, same forward: same bits
    # x (W + s B A) vs x W + s (x A^T) B^T: equal up to rounding (float32 ~1e-6, bf16 ~1e-2)
    gap = (logits.float() - peft_logits.float()).abs().max().item()
    assert gap < (1e-5 if logits.dtype == torch.float32 else 0.05), gap
    # the adapters count: without them the logits move by far more than that rounding
    assert (logits.float() - base_logits.float()).abs().max().item() > 0.3


def _dora():
    return _with_lora(_llama(), r=2, lora_alpha=4, use_dora=True, target_modules=["q_proj", "v_proj"])


def _embedding_lora():
    return _with_lora(_llama(), r=2, lora_alpha=4, target_modules=["q_proj", "embed_tokens"])


def _lora_bias():
    return _with_lora(_llama(bias=True, tie=False), r=2, lora_alpha=4, lora_bias=True, target_modules=["q_proj"])


def _modules_to_save():
    return _with_lora(_llama(tie=False), r=2, lora_alpha=4, target_modules=["q_proj"], modules_to_save=["lm_head"])


@pytest.mark.parametrize(("make", "reason"), [
    (_dora, "variant"), (_embedding_lora, "Embedding"), (_lora_bias, "lora_bias"),
    (_modules_to_save, "ModulesToSaveWrapper"),
])
def test_unsupported_lora_falls_back_to_peft_merge(make, reason: str, tmp_path: Path) -> None:
    model = make()
    with pytest.raises(UnmergeableLoRA, match=reason):
        merged_lora_state_dict(model)
    expected = copy.deepcopy(model).merge_and_unload().state_dict()
    with pytest.warns(UserWarning, match=f"save_model: .*{reason}.*full copy"):
        save_model(model, TOK, tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    assert saved and all(torch.equal(t, expected[k]) for k, t in saved.items())


def test_lora_on_a_tied_head_is_refused_by_the_exact_merge() -> None:
    # lm_head shares its weight with embed_tokens: peft's in-place merge changes both, a new
    # tensor would change one; the exact path must not pretend
    model = _with_lora(_llama(tie=True), r=2, lora_alpha=4, target_modules=["q_proj", "lm_head"])
    with pytest.raises(UnmergeableLoRA, match="tied"):
        merged_lora_state_dict(model)


def test_a_base_class_that_cannot_be_rebuilt_is_unmergeable_not_a_crash():
    """The key check builds a plain model of the base's class; when that fails the merge is
    refused (UnmergeableLoRA, so save_model falls back to peft's merge), naming the cause."""
    from trustrl.lora_merge import _check_plain_keys

    class Broken(torch.nn.Module):
        def __init__(self, config=None):
            super().__init__()
            if config is not None:
                raise RuntimeError("needs more than a config")
            self.config = object()

    with pytest.raises(UnmergeableLoRA, match=r"cannot build a plain Broken .*needs more than a config"):
        _check_plain_keys(Broken(), {})
