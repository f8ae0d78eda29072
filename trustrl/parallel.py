"""FSDP2 sharding (``torch.distributed.fsdp.fully_shard``) of transformers models, and the few
rules that keep a sharded run equal to a single process. Nothing RL-specific here: the
collectives are in :mod:`trustrl.distributed`, the trainers decide what to shard.

What :func:`shard_model` does: one FSDP unit per decoder layer (the classes a transformers
model lists in ``_no_split_modules``), then the root unit (embeddings, final norm, LM head,
tied or not, and any LoRA adapters outside the layers). Every parameter, its gradient and its
AdamW moments then live as a 1/N slice (a ``DTensor`` sharded on dim 0) on each of N ranks;
a unit's parameters are all-gathered just before its forward and freed after it, gathered
again for its backward, and its gradients are reduce-scattered (SUMMED: the losses are
normalized over the global batch, see :mod:`trustrl.loop.accumulate`, so the sum is the
gradient of the global loss, exactly as in :func:`trustrl.distributed.all_reduce_gradients`).

Rules the callers follow (each one keeps every rank's collectives in the same order):

* **Same number of passes on every rank.** Every forward of a sharded model is a collective.
  Loops over a rank's own rows (micro-batches, log-prob slices, PPO minibatch members) run
  :func:`lockstep` over them: ranks with fewer items run stand-in passes whose loss weight
  is 0 (their gradients are exactly zero, their outputs are dropped).
* **Generation on gathered parameters.** The sampler decodes until EOS, a different number
  of forwards on every rank (and none on a rank without prompts). Rather than keeping all
  ranks decoding in step (one all-gather per layer per generated token, for every rank, as
  long as the slowest row), :func:`gathered` all-gathers the whole model once, decodes
  without any collective, and frees it: one collective per rollout instead of T x layers,
  and the sampler stays the single-process one. Its price: the full parameters (not the
  gradients or optimizer states) are held during generation, as every RL framework does
  when it hands the weights to an inference engine.
* **The LM head outside the forward.** trustrl's log-probs read ``lm_head.weight`` directly
  (chunked over the vocabulary). A sharded model's hidden states therefore come from the
  ROOT forward (:func:`root_hidden_states`): the root unit -- embeddings, norm, head -- is
  gathered for it and stays gathered until its backward reduce-scatters its gradient
  (or :func:`reshard` frees it after a no-grad pass), so the head weight read afterwards
  is the full, current tensor.

Mixed precision (:func:`mixed_precision_policy`): bfloat16 parameters and compute with
float32 gradient reduction on GPUs; on CPUs float32 throughout (gloo and CPU kernels gain
nothing from bfloat16 and the equality tests are in float32). CPU offload: parameters,
gradients and optimizer states on the host (``CPUOffloadPolicy``), for GPUs.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch import nn

from trustrl import distributed as dist

__all__ = ["apply", "shard_model", "is_sharded", "sharded_root", "fsdp_units", "decoder_layers", "gathered",
           "reshard", "lockstep", "root_hidden_states", "full_state_dict", "load_full_state_dict", "local_numel",
           "memory_shares", "clip_grad_norm", "mixed_precision_policy", "original_class", "is_dtensor"]

_SHARDED_ATTR = "_trustrl_fsdp_root"


def _dtensor_cls():
    from torch.distributed.tensor import DTensor

    return DTensor


def original_class(module: nn.Module) -> type:
    """The class ``module`` had before :func:`shard_model` (FSDP2 swaps it for ``FSDP<cls>``)."""
    from torch.distributed.fsdp import FSDPModule

    cls = type(module)
    return cls.__mro__[cls._orig_cls_mro_index] if issubclass(cls, FSDPModule) else cls


def is_dtensor(t: Any) -> bool:
    return isinstance(t, _dtensor_cls())


def mixed_precision_policy(device: torch.device, param_dtype: str = "auto"):
    """``MixedPrecisionPolicy``: "auto" means bfloat16 parameters/compute with float32 gradient
    reduction on CUDA, and float32 (no policy) on CPU; "float32" never casts; "bfloat16"
    asks for it explicitly (refused on CPU, where gloo and the CPU kernels gain nothing)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if param_dtype not in ("auto", "float32", "bfloat16"):
        raise ValueError(f"parallelism.param_dtype: {param_dtype!r}; allowed: auto, float32, bfloat16")
    if param_dtype == "float32" or (param_dtype == "auto" and device.type != "cuda"):
        return MixedPrecisionPolicy()
    if device.type != "cuda":
        raise ValueError("parallelism.param_dtype=bfloat16 needs CUDA devices; on CPU FSDP keeps float32 "
                         "(param_dtype: auto or float32)")
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of a transformers model (peft-wrapped or not): the modules whose class
    is named in the model's ``_no_split_modules``. A model without any is refused (FSDP would
    hold it as one unit, gathering all of it at once: no memory saved)."""
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"parallelism.strategy=fsdp: {type(model).__name__} names no decoder layer class "
                         "(_no_split_modules); trustrl shards transformers decoder-only models layer by layer")
    return layers


def shard_model(model: nn.Module, device: torch.device, *, param_dtype: str = "auto", cpu_offload: bool = False,
                root: nn.Module | None = None) -> nn.Module:
    """Shard ``model`` in place with FSDP2: one unit per decoder layer, then ``root`` (default:
    ``model``) holding every remaining parameter. Gradients are summed over ranks (not
    averaged). No-op (``model`` returned as it is) when not distributed. ``root`` must be the
    module whose forward runs first (``model`` for a causal LM; the trunk of a scalar-head
    model, whose head then stays replicated and is all-reduced by
    :func:`trustrl.distributed.all_reduce_gradients`)."""
    if not dist.is_distributed():
        return model
    try:
        from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, OffloadPolicy, fully_shard
    except ImportError:
        FSDPModule = None
    if FSDPModule is None or not hasattr(FSDPModule, "set_force_sum_reduction_for_comms"):
        raise RuntimeError(f"parallelism.strategy=fsdp needs torch.distributed.fsdp.fully_shard with summed "
                           f"gradient reduction (torch >= 2.7); this is torch {torch.__version__}")

    if cpu_offload and device.type != "cuda":
        raise ValueError("parallelism.cpu_offload: the model is on the CPU already (offload is for GPU runs)")
    root = model if root is None else root
    kwargs: dict[str, Any] = {"mp_policy": mixed_precision_policy(device, param_dtype),
                              "offload_policy": CPUOffloadPolicy() if cpu_offload else OffloadPolicy()}
    for layer in decoder_layers(root):
        fully_shard(layer, **kwargs)
    fully_shard(root, **kwargs)
    for unit in fsdp_units(root):
        unit.set_gradient_divide_factor(1.0)  # the losses are globally normalized: SUM the gradients
        unit.set_force_sum_reduction_for_comms(True)
    model.__dict__[_SHARDED_ATTR] = root
    return model


def sharded_root(model: nn.Module) -> nn.Module | None:
    """The FSDP root unit of a model sharded by :func:`shard_model` (None: not sharded)."""
    return model.__dict__.get(_SHARDED_ATTR)


def is_sharded(model: nn.Module) -> bool:
    return sharded_root(model) is not None


def fsdp_units(module: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in module.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def gathered(*models: nn.Module | None) -> Iterator[None]:
    """Hold the full parameters of every sharded model in ``models`` (one all-gather per unit,
    on every rank) and keep them through any number of forwards with no collective; free
    them on exit. A collective itself: every rank enters it. No-op for unsharded models."""
    units = [u for m in models if m is not None and is_sharded(m) for u in fsdp_units(sharded_root(m))]
    roots = {id(sharded_root(m)) for m in models if m is not None and is_sharded(m)}
    for unit in units:
        unit.unshard()
        unit.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for unit in units:
            unit.set_reshard_after_forward(id(unit) not in roots, recurse=False)
            unit.reshard()


def reshard(model: nn.Module | None) -> None:
    """Free the gathered root unit of a sharded model (after no-grad passes; see the module
    docstring). Local: no collective. No-op for unsharded models."""
    if model is not None and is_sharded(model):
        sharded_root(model).reshard()


def root_hidden_states(model: nn.Module, trunk: nn.Module, **inputs: Any) -> torch.Tensor:
    """``trunk``'s ``last_hidden_state`` computed through the root forward of a sharded causal
    LM (``model(**inputs, logits_to_keep=1)``: the head runs on one position only), so the
    root unit is gathered for whatever reads its parameters next (the LM head weight)."""
    captured: list[torch.Tensor] = []

    def keep(_module, _args, output):
        captured.append(output.last_hidden_state)

    handle = trunk.register_forward_hook(keep)
    try:
        model(**inputs, logits_to_keep=1)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"root_hidden_states: the trunk ran {len(captured)} times in one forward of "
                           f"{type(model).__name__}; expected once")
    return captured[0]


def lockstep(items: Sequence[Any], standin: Any = None, sharded: bool = True) -> Iterator[tuple[Any, float]]:
    """``(item, 1.0)`` for each of this rank's ``items``, then ``(stand-in, 0.0)`` until every
    rank has yielded as many as the rank with the most: the same number of forward/backward
    passes everywhere, which FSDP needs (each pass is a collective). The stand-in is the last
    item (or ``standin`` when this rank has none); multiply its loss by the 0.0 and drop its
    outputs. One ``all_reduce_max`` when distributed and ``sharded``; else just the items."""
    items = list(items)
    n = dist.all_reduce_max(len(items)) if sharded and dist.is_distributed() else len(items)
    for item in items:
        yield item, 1.0
    if n > len(items):
        fill = items[-1] if items else standin
        if fill is None:
            raise ValueError("lockstep: this rank has no item and no stand-in, but another rank has items")
        for _ in range(n - len(items)):
            yield fill, 0.0


# -- gradients and memory --------------------------------------------------------------------------


def local_numel(t: torch.Tensor) -> int:
    """Elements this rank holds of ``t`` (its local shard for a DTensor)."""
    return t.to_local().numel() if is_dtensor(t) else t.numel()


def clip_grad_norm(params: Iterable[torch.nn.Parameter], max_norm: float) -> float:
    """``torch.nn.utils.clip_grad_norm_`` for parameters that may mix FSDP shards (DTensor
    gradients: the squared norm of each local shard, summed over ranks) and replicated
    parameters (counted once). Returns the global norm before clipping. No DTensor: torch's."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    if not any(is_dtensor(p.grad) for p in params):
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    sharded = torch.zeros((), dtype=torch.float64)
    replicated = torch.zeros((), dtype=torch.float64)
    for p in params:
        g = p.grad.to_local() if is_dtensor(p.grad) else p.grad
        sq = torch.linalg.vector_norm(g.detach().float()).double().cpu() ** 2
        if is_dtensor(p.grad):
            sharded += sq
        else:
            replicated += sq
    total = float((dist.all_reduce_sum(sharded) + replicated).sqrt())
    scale = max_norm / (total + 1e-6)  # torch's clip coefficient, applied when below 1
    if scale < 1.0:
        for p in params:
            (p.grad.to_local() if is_dtensor(p.grad) else p.grad).mul_(scale)
    return total


def memory_shares(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, float]:
    """What this rank holds of the parameters, gradients and optimizer states of ``model``, as
    a share of the whole, from the local shards (``DTensor.to_local()`` sizes; tensors that are
    not DTensors count in full): ``{"params": local/global, "grads": ..., "optimizer": ...}``
    (a kind with nothing in it is left out)."""
    out: dict[str, float] = {}

    def share(tensors) -> float | None:
        local = whole = 0
        for t in tensors:
            local += local_numel(t) * t.element_size()
            whole += t.numel() * t.element_size()
        return local / whole if whole else None

    kinds = {"params": list(model.parameters()),
             "grads": [p.grad for p in model.parameters() if p.grad is not None]}
    if optimizer is not None:
        kinds["optimizer"] = [v for state in optimizer.state.values() for v in state.values()
                              if isinstance(v, torch.Tensor) and v.dim() > 0]
    for kind, tensors in kinds.items():
        value = share(tensors)
        if value is not None:
            out[kind] = value
    return out


_WARNED: set[str] = set()


def warn_cpu_precision(device: torch.device, param_dtype: str) -> None:
    """Say once per run, on rank 0, that ``param_dtype: auto`` means float32 on a CPU (each
    sharded model and each rank used to repeat it)."""
    if device.type != "cuda" and param_dtype == "auto" and dist.is_distributed() and dist.is_main() \
            and "cpu_precision" not in _WARNED:
        _WARNED.add("cpu_precision")
        warnings.warn("parallelism.strategy=fsdp on CPU: float32 parameters, compute and gradient reduction "
                      "(the bfloat16 mixed-precision policy applies on GPUs)", stacklevel=2)


def apply(model: nn.Module | None, parallelism: Any, device: torch.device, root: nn.Module | None = None):
    """What a trainer calls on each model it trains or evaluates: :func:`shard_model` when
    ``parallelism.strategy`` is "fsdp" and the run is distributed, else nothing."""
    if model is None or getattr(parallelism, "strategy", "ddp") != "fsdp" or not dist.is_distributed():
        return model
    warn_cpu_precision(device, parallelism.param_dtype)
    return shard_model(model, device, param_dtype=parallelism.param_dtype, cpu_offload=parallelism.cpu_offload,
                       root=root)


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The whole ``state_dict`` of a sharded ``module`` gathered on rank 0, in CPU memory
    (``get_model_state_dict(full_state_dict=True, cpu_offload=True)``; other ranks get {}).
    A collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    for unit in fsdp_units(module):
        unit.reshard()
    state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if dist.is_main() else {}


def load_full_state_dict(plain: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Copy a gathered ``state`` into an unsharded module of the same architecture (strict,
    except for tied weights the gathered state names once)."""
    result = plain.load_state_dict(state, strict=False)
    tied = set(getattr(plain, "_tied_weights_keys", None) or [])
    missing = [k for k in result.missing_keys if not any(k.endswith(t) or t in k for t in tied)]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"{what}: the gathered state does not fit (missing {missing[:5]}, unexpected "
                           f"{result.unexpected_keys[:5]})")
