"""Loading and saving the models a run needs, from local Hugging Face directories.

- ``load_tokenizer`` / ``load_policy``: ``AutoTokenizer`` / ``AutoModelForCausalLM.from_pretrained``
  on a directory, with clear errors for a missing tokenizer or a vocabulary mismatch.
- ``make_reference``: a frozen copy of the policy, or (with LoRA) nothing: the reference is
  the base model with adapters disabled, see ``reference_context``.
- ``lm_backbone_and_head``: the trunk that yields hidden states and the output projection,
  so log-probs can be computed chunk by chunk without [B, T, V] logits.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from trustrl.config import LoRAConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(ValueError):
    """A model or tokenizer directory that cannot be used, naming the path and the problem."""


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_tokenizer(path: str | Path):
    """Load the tokenizer saved beside a model; make sure it has pad and EOS tokens."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"model directory not found: {path}")
    names = {"tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "vocab.txt"}
    if not any((path / n).exists() for n in names):
        raise ModelLoadError(
            f"no tokenizer in {path}: expected one of {sorted(names)}; save one with "
            "tokenizer.save_pretrained(dir) or pass tokenizer=DIR"
        )
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except Exception as err:  # transformers raises many types here
        raise ModelLoadError(f"could not load the tokenizer in {path}: {err}") from err
    if tok.eos_token_id is None:
        raise ModelLoadError(f"tokenizer in {path} has no EOS token; completions could never end")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def disable_dropout(model: nn.Module) -> None:
    """RL log-probs must be deterministic functions of the parameters: dropout off everywhere."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    config = getattr(model, "config", None)
    if config is not None:
        for key in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
            if isinstance(getattr(config, key, None), float):
                setattr(config, key, 0.0)


def check_vocab(model: nn.Module, tokenizer, where: str) -> None:
    """Every token id the tokenizer can emit must have a row in the embedding matrix."""
    n_embed = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > n_embed:
        raise ModelLoadError(
            f"vocabulary mismatch in {where}: the tokenizer has {len(tokenizer)} tokens but the "
            f"model's embedding has {n_embed} rows"
        )


def load_policy(
    path: str | Path,
    *,
    dtype: str = "float32",
    device: torch.device | str = "cpu",
    tokenizer=None,
    lora: LoRAConfig | None = None,
    gradient_checkpointing: bool = False,
) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained(path)`` with dropout off, optionally wrapped in LoRA."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} is not a model directory (no config.json)")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=DTYPES[dtype])
    except Exception as err:
        raise ModelLoadError(f"could not load the model in {path}: {err}") from err
    if tokenizer is not None:
        check_vocab(model, tokenizer, str(path))
    disable_dropout(model)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    if lora is not None:
        model = apply_lora(model, lora)
    return model.to(device)


def apply_lora(model: nn.Module, lora: LoRAConfig) -> nn.Module:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:  # pragma: no cover - peft is a declared extra
        raise ModelLoadError("lora needs peft: pip install 'trustrl[lora]'") from err
    cfg = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules=lora.target_modules, task_type="CAUSAL_LM",
    )
    return get_peft_model(model, cfg)


def is_peft(model: nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "get_base_model")


def make_reference(policy: nn.Module) -> nn.Module | None:
    """A frozen copy of the policy; None for LoRA policies (use ``reference_context``)."""
    if is_peft(policy):
        return None
    ref = copy.deepcopy(policy)
    ref.eval()
    ref.requires_grad_(False)
    return ref


@contextlib.contextmanager
def reference_context(policy: nn.Module, reference: nn.Module | None) -> Iterator[nn.Module]:
    """Yield the module that computes reference log-probs: the frozen copy, or the LoRA
    policy with its adapters disabled (the base weights are the reference)."""
    if reference is not None:
        yield reference
    elif is_peft(policy):
        with policy.disable_adapter():
            yield policy
    else:
        raise ValueError("no reference model: beta > 0 needs one (make_reference)")


def lm_backbone_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(trunk returning last_hidden_state, output projection) of a causal LM, peft or not."""
    base = model.get_base_model() if is_peft(model) else model
    prefix = getattr(base, "base_model_prefix", "model")
    backbone = getattr(base, prefix, None)
    head = base.get_output_embeddings()
    if backbone is None or head is None:
        raise ModelLoadError(
            f"{type(base).__name__}: cannot find the trunk ({prefix!r}) and the LM head; "
            "trustrl supports decoder-only causal LMs in transformers"
        )
    return backbone, head


def save_model(model: nn.Module, tokenizer, directory: str | Path) -> Path:
    """Save in safetensors with the tokenizer; loadable by AutoModelForCausalLM.from_pretrained.
    LoRA policies are merged into a plain model first."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    to_save = model
    if is_peft(model):
        to_save = copy.deepcopy(model).merge_and_unload()
    to_save.save_pretrained(str(directory), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
    return directory


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
