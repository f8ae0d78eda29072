"""Loading and saving the models a run needs, from local Hugging Face directories.

- ``load_tokenizer`` / ``load_policy``: ``AutoTokenizer`` / ``AutoModelForCausalLM.from_pretrained``
  on a directory, with clear errors for a missing tokenizer or a vocabulary mismatch.
- ``make_reference``: a frozen copy of the policy, or (with LoRA) nothing: the reference is
  the base model with adapters disabled, see ``reference_context``.
- ``lm_backbone_and_head``: the trunk that yields hidden states and the output projection,
  so log-probs can be computed chunk by chunk without [B, T, V] logits.
- ``logit_transform``: what the model's forward does to ``hidden @ W^T`` after the LM head
  (soft-capping, scaling), so those log-probs equal ``log_softmax(model(...).logits)``; models
  whose forward does something trustrl does not reproduce are refused (``LogitsMismatchError``).
- ``save_model``: a plain Hugging Face directory; a LoRA policy merged tensor by tensor
  (``merged_lora_state_dict``), without copying the base model.
"""

from __future__ import annotations

import contextlib
import copy
import math
import re
import warnings
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from trustrl.config import LoRAConfig
from trustrl.errors import UserError, cause_summary
from trustrl.logging import quiet_transformers
from trustrl.logprobs import IDENTITY, LogitTransform, chunked_token_logprobs
from trustrl.lora_merge import UnmergeableLoRA, merged_lora_state_dict

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(UserError, ValueError):
    """A model or tokenizer directory that cannot be used, naming the path and the problem."""


class LogitsMismatchError(ModelLoadError):
    """A model whose forward turns hidden states into logits in a way trustrl does not
    reproduce: its log-probs would differ from the distribution it samples from."""


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
        with quiet_transformers():
            tok = AutoTokenizer.from_pretrained(str(path))
    except Exception as err:  # transformers raises many types here
        raise ModelLoadError(f"could not load the tokenizer in {path}: {cause_summary(err)}") from err
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
        with quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=DTYPES[dtype])
    except Exception as err:
        raise ModelLoadError(f"could not load the model in {path}: {cause_summary(err)}") from err
    if tokenizer is not None:
        check_vocab(model, tokenizer, str(path))
    disable_dropout(model)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    if lora is not None:
        model = apply_lora(model, lora)
    model = model.to(device)
    logit_transform(model)  # refuse a forward trustrl cannot reproduce now, not mid-run
    return model


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


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on each row's first real token (left padding)."""
    return (mask.long().cumsum(dim=1) - 1).clamp(min=0)


def lm_hidden_states(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """:func:`trunk_hidden_states` of a causal LM's trunk. An FSDP-sharded model (see
    :mod:`trustrl.parallel`) runs them through its root forward instead, with the same
    arguments, so that its LM head weight is gathered (whole and current) when the log-prob
    code reads it next."""
    from trustrl import parallel

    backbone, _ = lm_backbone_and_head(model)
    if parallel.is_sharded(model):
        return parallel.root_hidden_states(model, backbone, input_ids=input_ids, attention_mask=attention_mask.long(),
                                           position_ids=positions_from_mask(attention_mask), use_cache=False)
    return trunk_hidden_states(backbone, input_ids, attention_mask)


def trunk_hidden_states(trunk: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``last_hidden_state [B, T, H]`` of a transformers trunk for left-padded rows: the
    attention mask as integers and position ids from :func:`positions_from_mask`, exactly the
    arguments the sampler passes to the full model, so the two see the same positions."""
    positions = positions_from_mask(attention_mask)
    return trunk(input_ids=input_ids, attention_mask=attention_mask.long(), position_ids=positions,
                 use_cache=False).last_hidden_state


# -- final-logit transforms ----------------------------------------------------------------------

#: Causal-LM classes whose ``forward`` is ``trunk -> lm_head -> f`` with ``f`` reproduced by
#: :class:`~trustrl.logprobs.LogitTransform`, read from the transformers source (5.x:
#: ``models/<name>/modeling_<name>.py``, ``*ForCausalLM.forward``) and checked, architecture
#: by architecture, against the installed transformers by ``tests/test_architectures.py``
#: (log-probs within 1e-5 of ``log_softmax(model(...).logits)``, with the transform switched on).
#: Value: ``(kind, config attribute)``; kind "plain" (f = identity), "softcap"
#: (``c tanh(u / c)``, ``c`` = the attribute, None = off), "scale" (``s u``), "divide" (``u / s``).
#: In bfloat16/float16 the model applies ``f`` in its own dtype and trustrl in float32 on the
#: upcast LM-head output: the two differ by half-precision rounding of the logits, the same
#: order as any bf16 log-prob, never by the transform itself.
VERIFIED_ARCHITECTURES: dict[str, tuple[str, str | None]] = {
    "LlamaForCausalLM": ("plain", None),
    "Qwen2ForCausalLM": ("plain", None),
    "Qwen3ForCausalLM": ("plain", None),
    "MistralForCausalLM": ("plain", None),
    "GPT2LMHeadModel": ("plain", None),
    "GPTNeoXForCausalLM": ("plain", None),
    "Phi3ForCausalLM": ("plain", None),
    "Olmo2ForCausalLM": ("plain", None),
    "Qwen2MoeForCausalLM": ("plain", None),
    "MixtralForCausalLM": ("plain", None),
    "Gemma2ForCausalLM": ("softcap", "final_logit_softcapping"),
    "Gemma3ForCausalLM": ("softcap", "final_logit_softcapping"),
    "CohereForCausalLM": ("scale", "logit_scale"),
    "GraniteForCausalLM": ("divide", "logits_scaling"),
}

#: Config attributes that, in some transformers architecture, change the logits after the LM
#: head (Gemma/NanoChat/VaultGemma ``final_logit_softcapping``, RecurrentGemma
#: ``logits_soft_cap``, xLSTM ``output_logit_soft_cap``, Cohere ``logit_scale``, Granite and
#: HyperCLOVAX ``logits_scaling``, FalconH1 ``lm_head_multiplier``, Inkling
#: ``logits_mup_width_multiplier``, ...). Attention soft-caps (``attn_logit_softcapping``)
#: act inside the trunk and are left out.
_TRANSFORM_ATTR = re.compile(r"soft_?cap|logits?_scal|lm_head_mult|logits?_.*mult|output_mult|mup", re.I)
_INSIDE_TRUNK = re.compile(r"^(attn|attention|router|query|embedding|residual)", re.I)

#: Largest |our log-prob - log_softmax(model(...).logits)| (and the same for the entropy)
#: accepted by the one-time check of an architecture not in VERIFIED_ARCHITECTURES. Both sides
#: compute the same trunk and the same LM-head product; what remains is float32 rounding of the
#: log-softmax (~1e-6), so 1e-4 leaves room and still catches any real transform.
CHECK_TOLERANCE = 1e-4

_CHECKED_ATTR = "_trustrl_logit_transform"


def _configs(config) -> list:
    """The config and its nested text config (multimodal wrappers keep the LM's there)."""
    if config is None:
        return []
    out = [config]
    text = getattr(config, "text_config", None) if config is not None else None
    if text is not None and text is not config:
        out.append(text)
    return out


def _active_transform_attributes(config) -> list[str]:
    """``name=value`` of every final-logit transform attribute of ``config`` that is switched
    on (a soft-cap that is not None/0, a scale or multiplier that is not 1)."""
    found = []
    for cfg in _configs(config):
        for name, value in sorted(vars(cfg).items()):
            if not _TRANSFORM_ATTR.search(name) or _INSIDE_TRUNK.match(name):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            neutral = 0.0 if re.search(r"soft_?cap", name, re.I) else 1.0
            if float(value) != neutral:
                found.append(f"{name}={value}")
    return found


def _verified_transform(cls_name: str, config) -> LogitTransform:
    kind, attr = VERIFIED_ARCHITECTURES[cls_name]
    if kind == "plain":
        return IDENTITY
    value = getattr(config, attr, None)
    where = f"{cls_name} config.{attr}={value!r}"
    if kind == "softcap" and value is None:
        return IDENTITY
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise LogitsMismatchError(f"{where}: expected a finite number > 0 (the forward uses it on every logit)")
    if kind == "softcap":
        return LogitTransform(softcap=float(value), source=f"config.{attr}")
    if kind == "scale":
        return LogitTransform(scale=float(value), source=f"config.{attr}")
    return LogitTransform(scale=1.0 / float(value), source=f"1 / config.{attr}")


def logit_transform(model: nn.Module) -> LogitTransform:
    """The final-logit transform of ``model``'s forward (after the LM head, before sampling),
    for :func:`trustrl.logprobs.chunked_token_logprobs`; raises :class:`LogitsMismatchError`
    for a forward trustrl does not reproduce.

    - A class in :data:`VERIFIED_ARCHITECTURES` (exactly that class, not a subclass, which may
      override ``forward``): the transform named there, read from its config.
    - Any other class is accepted only if (1) no config attribute of a known final-logit
      transform is switched on (refused naming it: trustrl would not know where the forward
      applies it) and (2) a one-time check passes: on a fixed two-row, left-padded input,
      trustrl's chunked log-probs and entropies (no transform) equal
      ``log_softmax(model(input_ids, attention_mask, position_ids).logits)`` within
      :data:`CHECK_TOLERANCE`; otherwise refused naming the class and the gap. The result is
      remembered on the model object, so the check costs one short forward per model.

    Why a check rather than refusing every unlisted class: most causal LMs in transformers
    are ``trunk -> lm_head`` and work as they are; the check proves it for the model at hand
    (and also that :func:`lm_backbone_and_head` found the right trunk), so nothing that
    differs is trained silently. Its blind spot is a transform that is invisible on the
    model's current weights (a soft-cap far above every logit of a freshly initialized
    model); attribute detection (1) covers the known ones.
    """
    from trustrl.parallel import original_class

    base = model.get_base_model() if is_peft(model) else model
    cls = original_class(base)  # (FSDP-sharded: the model's own class, not FSDP<cls>)
    cls_name = cls.__name__
    config = getattr(base, "config", None)
    if cls_name in VERIFIED_ARCHITECTURES and _is_transformers_class(cls, cls_name):
        return _verified_transform(cls_name, config)
    cached = base.__dict__.get(_CHECKED_ATTR)
    if cached is not None:
        return cached
    active = _active_transform_attributes(config)
    if active:
        raise LogitsMismatchError(
            f"{cls_name}: config sets {', '.join(active)}, a final-logit transform trustrl does not "
            f"reproduce for this class (verified classes: {', '.join(sorted(VERIFIED_ARCHITECTURES))}); "
            "its log-probs would differ from the distribution it samples from"
        )
    gap = _forward_gap(model)
    if not gap <= CHECK_TOLERANCE:
        raise LogitsMismatchError(
            f"{cls_name}: trustrl's log-probs differ from log_softmax({cls_name}(...).logits) by {gap:.2e} "
            f"(> {CHECK_TOLERANCE:.0e}) on a test input: its forward does something to the logits that "
            f"trustrl does not reproduce (verified classes: {', '.join(sorted(VERIFIED_ARCHITECTURES))})"
        )
    base.__dict__[_CHECKED_ATTR] = IDENTITY
    return IDENTITY


def _is_transformers_class(cls: type, name: str) -> bool:
    import transformers

    return getattr(transformers, name, None) is cls


@torch.no_grad()
def _forward_gap(model: nn.Module) -> float:
    """max |ours - theirs| over log-probs and entropies on a fixed 2 x 8 input whose second row
    is left-padded by 3 (ours: trunk + chunked LM head, no transform; theirs: the model's
    forward, float32 log-softmax)."""
    backbone, head = lm_backbone_and_head(model)
    vocab = head.weight.shape[0]
    device = head.weight.device
    ids = ((torch.arange(16, device=device).reshape(2, 8) * 7 + 3) % vocab).long()
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, :3] = False
    was_training = model.training
    model.eval()
    try:
        hidden = trunk_hidden_states(backbone, ids, mask)
        logp, ent = chunked_token_logprobs(hidden[:, :-1], head.weight, ids[:, 1:], bias=getattr(head, "bias", None),
                                           return_entropy=True)
        logits = model(input_ids=ids, attention_mask=mask.long(), position_ids=positions_from_mask(mask),
                       use_cache=False).logits
    except LogitsMismatchError:
        raise
    except Exception as err:  # transformers raises many types here
        raise LogitsMismatchError(
            f"{type(model).__name__}: could not compare trustrl's log-probs with the model's forward: {err}"
        ) from err
    finally:
        model.train(was_training)
    if tuple(logits.shape) != (*ids.shape, vocab):
        return math.inf
    ref = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    ref_logp = ref.gather(-1, ids[:, 1:, None]).squeeze(-1)
    ref_ent = -(ref.exp() * ref).sum(-1)
    keep = mask[:, :-1]
    gap = torch.maximum((logp.float() - ref_logp).abs(), (ent.float() - ref_ent).abs())[keep].max()
    return float(gap) if torch.isfinite(gap) else math.inf


def save_model(model: nn.Module, tokenizer, directory: str | Path) -> Path:
    """Save in safetensors with the tokenizer; loadable by AutoModelForCausalLM.from_pretrained.

    A LoRA (peft) policy is saved merged, as a plain model of its base class: the state dict
    of :func:`merged_lora_state_dict` (each adapted weight ``W + s (B @ A)`` made anew, every
    other tensor the live one, shared) written by the base model's ``save_pretrained``. The
    live model is not changed and the base is not copied. A LoRA configuration that this
    cannot merge exactly (:class:`UnmergeableLoRA`: DoRA, adapters on embeddings, a LoRA
    bias, ...) is saved the old way, a deep copy merged by peft, with a warning about memory.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if is_peft(model):
        try:
            state = merged_lora_state_dict(model)
        except UnmergeableLoRA as why:
            warnings.warn(f"save_model: {why}; merging a full copy of the model instead (needs memory "
                          "for a second copy of the base weights)", stacklevel=2)
            _save_pretrained(copy.deepcopy(model).merge_and_unload(), tokenizer, directory)
        else:
            _save_pretrained(model.get_base_model(), tokenizer, directory, state)
        return directory
    _save_pretrained(model, tokenizer, directory)
    return directory


def _save_pretrained(model: nn.Module, tokenizer, directory: Path,
                     state: dict[str, torch.Tensor] | None = None) -> None:
    """``model.save_pretrained(directory, state_dict=state)`` (safetensors) and the tokenizer.
    ``save_pretrained`` writes ``dtype`` and ``architectures`` into the model's own config
    object; they are put back, so saving leaves a live model as it was."""
    config = getattr(model, "config", None)
    saved = {k: getattr(config, k) for k in ("dtype", "architectures") if hasattr(config, k)}
    try:
        with quiet_transformers():
            model.save_pretrained(str(directory), state_dict=state, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(directory))
    finally:
        for k, v in saved.items():
            setattr(config, k, v)


def save_final_model(model: nn.Module, tokenizer, directory: str | Path) -> Path:
    """:func:`save_model` by rank 0 (data parallel), every rank returning its path. An
    FSDP-sharded model is gathered first (a collective: every rank calls this) into a plain
    copy on rank 0, so ``final/`` is the same ordinary directory either way."""
    from trustrl import distributed as dist
    from trustrl import parallel

    if not parallel.is_sharded(model):
        return dist.on_main(save_model, model, tokenizer, directory)
    state = parallel.full_state_dict(model)
    return dist.on_main(lambda: save_model(_plain_copy(model, state), tokenizer, directory))


def _plain_copy(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """An unsharded causal LM (LoRA adapters included) holding ``state`` (on the CPU)."""
    from transformers import AutoModelForCausalLM

    base = model.get_base_model() if is_peft(model) else model
    dtype = next(iter(state.values())).dtype
    plain = AutoModelForCausalLM.from_config(base.config, dtype=dtype)
    if is_peft(model):
        from peft import get_peft_model

        plain = get_peft_model(plain, model.peft_config[model.active_adapter])
    from trustrl import parallel

    parallel.load_full_state_dict(plain, state, f"final model ({type(base).__name__})")
    return plain


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
