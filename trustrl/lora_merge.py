"""Saving a LoRA (peft) policy merged, without copying its base model.

:func:`merged_lora_state_dict` gives the state dict that ``copy.deepcopy(model).merge_and_unload()``
would save, bitwise: each adapted weight ``W + s (B @ A)`` made anew (transposed for
``fan_in_fan_out`` layers such as GPT-2's Conv1D; ``s`` the active adapter's scaling), every
other tensor the live one, shared. What it cannot merge exactly raises :class:`UnmergeableLoRA`
(the caller, :func:`trustrl.models.save_model`, then falls back to peft's own merge of a copy).
"""

from __future__ import annotations

import copy
import re

import torch
import torch.nn as nn

from trustrl.errors import cause_summary
from trustrl.logging import quiet_transformers


class UnmergeableLoRA(ValueError):
    """A peft model whose merge :func:`merged_lora_state_dict` does not reproduce exactly."""


def merged_lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of ``copy.deepcopy(model).merge_and_unload()``, without copying the base.

    Keys are those of a plain model of the base class (``...q_proj.weight``, not
    ``...q_proj.base_layer.weight``; the ``lora_A`` / ``lora_B`` tensors dropped). For each
    LoRA-wrapped linear layer (``nn.Linear`` or GPT-2's ``Conv1D``), with A ``[r, in]``,
    B ``[out, r]`` and the active adapter's scaling ``s`` (peft's ``alpha / r``, or
    ``alpha / sqrt(r)`` with rank-stabilized LoRA)::

        weight = W + s * (B @ A)        W [out, in]  (nn.Linear)
        weight = W + s * (B @ A)^T      W [in, out]  (fan_in_fan_out: Conv1D)

    a new tensor in W's dtype and device, computed with the same operations as peft's merge
    (so bitwise equal to it); every other tensor is the live one (shared storage, no copy).
    Raises :class:`UnmergeableLoRA`, naming the reason, for anything else: several active
    adapters, non-LoRA or variant adapters (DoRA, ...), adapters on embeddings or convolutions,
    a LoRA bias, ``modules_to_save`` / trainable tokens, already merged layers, an adapted
    weight shared with another tensor (tied embeddings), or keys that differ from a plain model's.
    """
    from peft import PeftType
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    adapters = list(model.active_adapters)
    if len(adapters) != 1:
        raise UnmergeableLoRA(f"{len(adapters)} active adapters {adapters} (one is merged exactly)")
    adapter = adapters[0]
    config = model.peft_config[adapter]
    if getattr(config, "peft_type", None) != PeftType.LORA:
        raise UnmergeableLoRA(f"adapter {adapter!r} is {config.peft_type}, not LoRA")
    if getattr(config, "layer_replication", None):
        raise UnmergeableLoRA("LoRA with layer_replication (layers shared between positions)")
    base = model.get_base_model()
    layers: dict[str, nn.Module] = {}
    for name, module in base.named_modules():
        if isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper)):
            if _inside(name, layers):
                raise UnmergeableLoRA(f"{name}: an adapter layer inside the adapter layer {_inside(name, layers)}")
            _check_plain_lora_linear(name, module, adapter)
            layers[name] = module
    state = base.state_dict()  # detached views of the live tensors: no copy
    _check_not_shared(state, layers)
    merged: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        owner = _inside(key, layers)
        if owner is None:
            merged[key] = tensor
            continue
        rest = key[len(owner) + 1:]
        if rest == "base_layer.weight" and adapter in layers[owner].lora_A:
            merged[f"{owner}.weight"] = _merged_weight(layers[owner], adapter)
        elif rest.startswith("base_layer."):
            # the bias (LoRA does not change it), or the weight of a layer that only an
            # inactive adapter wraps (peft's merge leaves it as it is)
            merged[f"{owner}.{rest[len('base_layer.'):]}"] = tensor
        elif not re.fullmatch(r"lora_[AB]\.[^.]+\.weight", rest):
            raise UnmergeableLoRA(f"{key}: a tensor of the LoRA layer that a plain merge would drop")
    _check_plain_keys(base, merged)
    return merged


def _inside(key: str, layers: dict[str, nn.Module]) -> str | None:
    """The name in ``layers`` that is a proper dotted prefix of ``key`` (None if none)."""
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in layers:
            return prefix
    return None


def _check_plain_lora_linear(name: str, module: nn.Module, adapter: str) -> None:
    """Raise :class:`UnmergeableLoRA` unless ``module`` is peft's plain LoRA linear layer,
    unmerged, whose ``adapter`` (if it has it) is vanilla LoRA: no variant (DoRA, ...), no
    bias, a float scaling, and A / B plain linear maps."""
    from peft.tuners.lora.layer import Linear as LoraLinear
    from transformers.pytorch_utils import Conv1D

    if type(module) is not LoraLinear:
        raise UnmergeableLoRA(f"{name}: {type(module).__module__}.{type(module).__name__} is not a LoRA linear layer")
    kind = type(module.get_base_layer())
    if kind not in (nn.Linear, Conv1D):
        raise UnmergeableLoRA(f"{name}: LoRA on a {kind.__name__}, not nn.Linear or Conv1D")
    if module.merged:
        raise UnmergeableLoRA(f"{name}: adapters {module.merged_adapters} are already merged into the weight")
    if list(module.active_adapters) != [adapter]:
        raise UnmergeableLoRA(f"{name}: active adapters {list(module.active_adapters)}, the model's are [{adapter!r}]")
    if adapter not in module.lora_A:
        return  # peft's merge leaves such a layer as it is; so do we
    if adapter in module.lora_variant:
        raise UnmergeableLoRA(f"{name}: a LoRA variant ({type(module.lora_variant[adapter]).__name__}, e.g. DoRA)")
    if module.lora_bias.get(adapter, False):
        raise UnmergeableLoRA(f"{name}: a LoRA bias (lora_bias=True)")
    if type(module.lora_A[adapter]) is not nn.Linear or type(module.lora_B[adapter]) is not nn.Linear:
        raise UnmergeableLoRA(f"{name}: lora_A / lora_B are not plain nn.Linear")
    if not isinstance(module.scaling[adapter], (int, float)):
        raise UnmergeableLoRA(f"{name}: scaling {module.scaling[adapter]!r} is not a number")


def _check_not_shared(state: dict[str, torch.Tensor], layers: dict[str, nn.Module]) -> None:
    """An adapted weight must not share storage with any other tensor (a LoRA head tied to
    the input embedding): peft's in-place merge would change both, a new tensor only one."""
    owners: dict[tuple, list[str]] = {}
    for key, tensor in state.items():
        owners.setdefault((tensor.device, tensor.untyped_storage().data_ptr()), []).append(key)
    for name in layers:
        key = f"{name}.base_layer.weight"
        if key in state:
            shared = owners[(state[key].device, state[key].untyped_storage().data_ptr())]
            if len(shared) > 1:
                raise UnmergeableLoRA(f"{key} shares its storage with {[k for k in shared if k != key]} (tied weights)")


@torch.no_grad()
def _merged_weight(layer: nn.Module, adapter: str) -> torch.Tensor:
    """``W + s * (B @ A)`` (transposed for fan_in_fan_out), a new tensor in W's dtype.

    The same operations as peft's merge (``weight += get_delta_weight``), so the result is
    bitwise that of ``merge_and_unload``: half-precision A, B on the CPU are multiplied in
    float32 and the product rounded back (CPU half matmuls are slow); the sum is computed in
    the promoted dtype of W and the product (float32 adapters on a bfloat16 base: float32)
    and rounded to W's dtype once, as the in-place ``+=`` does. Where it can, the sum is
    accumulated into the product's own buffer (``delta + W`` is ``W + delta`` bit for bit):
    one new tensor of W's size per layer rather than three, which the allocator may keep.
    """
    weight = layer.get_base_layer().weight
    a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    dtype = b.dtype
    upcast = b.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16)
    if upcast:
        a, b = a.float(), b.float()
    delta = b @ a  # [out, r] @ [r, in] -> [out, in]
    if layer.fan_in_fan_out:
        delta = delta.T  # Conv1D stores W as [in, out]
    delta.mul_(layer.scaling[adapter])
    if upcast:
        delta = delta.to(dtype)
    if delta.shape != weight.shape:
        raise UnmergeableLoRA(f"delta {tuple(delta.shape)} does not match the weight {tuple(weight.shape)}")
    delta = delta.to(weight.device)
    if delta.is_contiguous() and torch.result_type(weight, delta) == delta.dtype:
        return delta.add_(weight).to(weight.dtype)
    return torch.add(weight, delta).to(weight.dtype)


def _check_plain_keys(base: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """The merged keys must be exactly those of a plain model of ``base``'s class and config
    (built on the meta device: no memory), so ``from_pretrained`` loads every tensor."""
    try:
        with torch.device("meta"), quiet_transformers():
            plain = type(base)(copy.copy(base.config))
    except Exception as err:  # any model class may fail to build from its config alone
        raise UnmergeableLoRA(f"cannot build a plain {type(base).__name__} to check key names: "
                              f"{cause_summary(err)}") from err
    expected = set(plain.state_dict())
    if expected != set(state):
        extra, missing = sorted(set(state) - expected), sorted(expected - set(state))
        raise UnmergeableLoRA(f"merged keys differ from a plain {type(base).__name__}'s: "
                              f"extra {extra[:3]}, missing {missing[:3]}")
