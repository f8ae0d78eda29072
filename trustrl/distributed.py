"""Collectives and data parallelism over ``torch.distributed`` (nothing RL-specific here: what
the RL loop builds on these is :mod:`trustrl.loop.data_parallel`): one process per device, each with a full copy
of the model, each working on its shard of every global batch; the result equals a
single-process run with the same global batch (up to float32 summation order).

Launch with ``torchrun --nproc_per_node N -m trustrl train grpo ...`` (see
``docs/distributed.md``). Without ``WORLD_SIZE > 1`` in the environment every helper here
is a no-op that returns its input, so the trainers run one code path.

The scheme, shared by every trainer (GRPO, PPO, reward model, SFT / pre-training):

* **Same global decisions on every rank.** Every rank seeds the same way and draws the same
  global batch from its :class:`~trustrl.trainers.common.PromptSampler`; it keeps the
  contiguous shard :func:`shard_range` gives it (whole GRPO groups: prompts are sharded,
  never completions). PPO's minibatch permutation is drawn from a generator that is equal on
  every rank, over the *global* rollout indices; each rank computes the members it holds.
* **Sampling does not depend on the split.** RL trainers pass
  :func:`trustrl.loop.data_parallel.sampling_row_seeds` to
  :func:`trustrl.rollout.generate`: the uniform number that picks row ``b``'s token ``t`` is a
  counter-based hash of (seed, sampler position, global prompt index, completion index, t), so
  a completion is the same whichever rank (or batch) samples it.
* **Global normalizers, summed gradients.** A trainer scales each micro-batch loss by its
  share of the *global* normalizer (tokens for token means, sequences for sequence means,
  pairs, ...), all-reduced once per update; :func:`all_reduce_gradients` (called by
  :func:`~trustrl.trainers.common.guarded_step`) then SUMS the gradients, which is exactly
  the gradient of the global loss. The skip-on-non-finite decision is taken jointly
  (:func:`all_true`), so parameters and optimizer moments stay equal on every rank.
* **Manual all-reduce instead of DDP.** ``DistributedDataParallel`` averages gradients (so a
  globally normalized loss would need rescaling), requires every rank to run the same number
  of backward passes (ours differ: uneven shards, PPO minibatch members, ranks without rows)
  and ``no_sync`` around accumulation. One bucketed all-reduce of the accumulated gradients
  per optimizer step is exact with any number of micro-batches per rank; what it gives up is
  overlapping communication with the backward pass.
* **Rank 0 writes.** Metrics are reduced across ranks before logging
  (:func:`reduce_metrics`, :func:`sum_across_ranks`); only rank 0 opens ``metrics.jsonl``,
  TensorBoard and progress bars, and writes checkpoints and final models (:func:`on_main`,
  which also acts as a barrier and re-raises rank 0's error on every rank). On resume every
  rank loads the checkpoint rank 0 picked.
"""

from __future__ import annotations

import datetime
import gc
import os
import time
import warnings
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "check_device", "init_from_env", "setup_device", "shutdown", "is_distributed", "world_size", "rank", "local_rank", "is_main",
    "barrier", "all_reduce_sum", "all_reduce_mean", "all_reduce_max", "all_true", "all_gather_objects",
    "broadcast_object", "sum_across_ranks", "reduce_metrics", "shard_range", "shard_indices", "shard_batch",
    "shard_groups", "all_reduce_gradients", "on_main", "gather_rows", "require_single_process",
    "check_parameters_equal", "user_error_text",
]

_STATE: dict[str, Any] = {"owned": False}

#: Metrics combined by max / by sum in :func:`reduce_metrics` (everything else: weighted mean).
MAX_SUFFIXES = ("max_length", "/max", "perf/step_seconds", "perf/generation_seconds")
SUM_SUFFIXES = ("perf/tokens_per_second", "/faults")


# -- process group ----------------------------------------------------------------------------------


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"distributed: environment variable {name}={value!r} is not an integer") from None


def check_device(device: str) -> None:
    """Refuse a ``device`` setting this machine cannot honour, naming it: a string torch does
    not parse (``"gpu"``), CUDA or MPS asked for where torch has none, or a CUDA index past the
    visible GPUs (the rules of :func:`trustrl.utils.get_device`). Without this the run would
    stop deep in model loading with torch's traceback. ``"auto"`` is always fine.

    Raises:
        trustrl.config.ConfigError: naming the ``device`` key and what this machine has.
    """
    from trustrl.config import ConfigError  # (no torch there; imported late to keep this module light)
    from trustrl.utils import get_device

    try:
        get_device(device)
    except ValueError as err:
        why = str(err).removeprefix("get_device: ")
        raise ConfigError(f"device={device!r}: {why} (torch {torch.__version__}, {torch.cuda.device_count()} "
                          "GPUs visible); use auto, cpu, cuda, cuda:N or mps") from err


def init_from_env(device: str = "auto", timeout_minutes: float | None = None) -> torch.device:
    """Join the process group described by the environment (``torchrun`` sets ``RANK``,
    ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) and return this rank's
    device. Idempotent; a process group that is already initialized (e.g. by the caller) is
    used as it is. ``WORLD_SIZE`` unset or 1: no process group, the device as configured.

    Backend: NCCL when the device is CUDA, gloo otherwise. With CUDA, ``device`` "auto" or
    "cuda" means ``cuda:LOCAL_RANK`` (and ``torch.cuda.set_device`` is called); an explicit
    ``cuda:i`` is kept (a warning when several ranks would then share it)."""
    check_device(device)
    world = _env_int("WORLD_SIZE", 1)
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
    if world <= 1:  # (trustrl.models.resolve_device, without importing it: models uses this module)
        return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    wants_cuda = (device in ("auto", "cuda") and torch.cuda.is_available()) or device.startswith("cuda")
    if wants_cuda:
        dev = torch.device("cuda" if device == "auto" else device)
        if dev.index is None:  # "auto" / "cuda": this rank's GPU
            dev = torch.device("cuda", _env_int("LOCAL_RANK", 0))
        elif device not in ("auto", "cuda"):
            warnings.warn(f"distributed: device={device!r} puts every local rank on the same GPU; "
                          "use device=auto to give each rank cuda:LOCAL_RANK", stacklevel=2)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu" if device == "auto" else device)
    if not (dist.is_available() and dist.is_initialized()):
        if not dist.is_available():
            raise RuntimeError("distributed: WORLD_SIZE > 1 but this torch build has no torch.distributed")
        for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
            if name not in os.environ:
                raise RuntimeError(f"distributed: WORLD_SIZE={world} but {name} is not set; launch with torchrun "
                                   "(see docs/distributed.md)")
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {}
        if timeout_minutes is not None:
            kwargs["timeout"] = datetime.timedelta(minutes=timeout_minutes)
        if dev.type == "cuda":
            kwargs["device_id"] = dev
        dist.init_process_group(backend=backend, init_method="env://", world_size=world, rank=_env_int("RANK", 0),
                                **kwargs)
        _STATE["owned"] = True
    return dev


def setup_device(device: str = "auto") -> torch.device:
    """What a trainer calls instead of ``resolve_device``: the process group joined when the
    environment asks for one, and this rank's device."""
    return init_from_env(device)


def shutdown() -> None:
    """Destroy the process group if :func:`init_from_env` created it (the CLI calls this)."""
    if _STATE["owned"] and dist.is_available() and dist.is_initialized():
        # The garbage that still refers to gloo state (trainers, FSDP modules: reference cycles)
        # is freed now, while the interpreter is whole, not during its finalization: a gloo
        # worker thread that needs the GIL then aborts the process ("terminate called without
        # an active exception", exit -6 after a finished run; seen once in CI, torch 2.13).
        # No barrier here: shutdown also runs while an error unwinds one rank only.
        gc.collect()
        dist.destroy_process_group()
        gc.collect()
    _STATE["owned"] = False


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def local_rank() -> int:
    return _env_int("LOCAL_RANK", 0) if is_distributed() else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def require_single_process(what: str) -> None:
    """For trainers without data parallelism yet: a clear error instead of N racing copies
    (a :class:`~trustrl.config.ConfigError`: one line, no traceback, printed once)."""
    if _env_int("WORLD_SIZE", 1) > 1:
        from trustrl.config import ConfigError

        raise ConfigError(f"{what} does not support data-parallel runs (WORLD_SIZE={os.environ.get('WORLD_SIZE')}, "
                          f"launched by torchrun); run it as a single process: trustrl train {what} ...")


def _ranks_text(ranks: Sequence[int]) -> str:
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    shown = ", ".join(str(r) for r in ranks[:4])
    return f"ranks {shown}" + (f", ... ({len(ranks)} ranks)" if len(ranks) > 4 else "")


def user_error_text(message: str, wait_s: float = 5.0) -> str | None:
    """What this rank prints for a user error ``message`` under torchrun, or None: another rank
    prints the same text. Without ``WORLD_SIZE > 1``: ``message`` itself.

    Every rank that fails posts its message to the launcher's key-value store (torchrun's
    ``MASTER_ADDR:MASTER_PORT``, reachable before and after the process group) and waits up to
    ``wait_s`` seconds for the other ranks' messages: the lowest rank holding a message prints
    it, the others stay quiet, so an error every rank meets (a bad key, a missing dataset) is
    printed once and as it is; one that only some ranks meet (a reward that fails on rank 1's
    completions, a file one node lacks) is printed once per distinct message, prefixed with
    the ranks that met it ("rank 1 of 2: ..."). The ranks that did not fail are stuck in a
    collective: the failing rank gives up waiting for them after ``wait_s`` seconds, exits,
    and torchrun stops them. No store (a launch without torchrun): the prefixed message."""
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return message
    me = _env_int("RANK", 0)
    try:
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                              timeout=datetime.timedelta(seconds=max(wait_s, 1.0)), wait_for_workers=False)
        # (a restarted job, or another run on the same store, must not read old messages)
        prefix = (f"trustrl/user_error/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/"
                  f"{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}")
        store.set(f"{prefix}/{me}", message)
        deadline = time.monotonic() + wait_s
        while True:
            present = [r for r in range(world) if store.check([f"{prefix}/{r}"])]
            if len(present) == world or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        posted = {r: store.get(f"{prefix}/{r}").decode() for r in present}
    except Exception:  # no launcher store to talk to: say which rank this is, at least
        return f"rank {me} of {world}: {message}"
    same = sorted(r for r, text in posted.items() if text == message) or [me]
    if same[0] != me:
        return None
    return message if len(same) == world else f"{_ranks_text(same)} of {world}: {message}"


# -- collectives on numbers, tensors and objects ------------------------------------------------------


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _reduce(value, op):
    if not is_distributed():
        return value
    if isinstance(value, torch.Tensor):
        t = value.detach().to(_comm_device()).clone()
        dist.all_reduce(t, op=op)
        return t.to(value.device)
    is_int = isinstance(value, int) and not isinstance(value, bool)
    t = torch.tensor([float(value)], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=op)
    return int(t.item()) if is_int else float(t.item())


def all_reduce_sum(value):
    """Sum over ranks of a number (int or float, returned as the same kind) or a tensor (a new
    tensor on the input's device). Identity when not distributed."""
    return _reduce(value, dist.ReduceOp.SUM if is_distributed() else None)


def all_reduce_max(value):
    return _reduce(value, dist.ReduceOp.MAX if is_distributed() else None)


def all_reduce_mean(value):
    n = world_size()
    return all_reduce_sum(value) / n if n > 1 else value


def all_true(flag: bool) -> bool:
    """True on every rank iff ``flag`` is True on every rank."""
    if not is_distributed():
        return bool(flag)
    t = torch.tensor([0 if flag else 1], dtype=torch.int32, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item()) == 0


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable; keep tensors on the CPU), in rank order."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def sum_across_ranks(values: Mapping[str, float]) -> dict[str, float]:
    """Key-wise sum of ``{name: float}`` over ranks (a key missing on a rank counts as 0)."""
    if not is_distributed():
        return dict(values)
    out: dict[str, float] = {}
    for d in all_gather_objects({k: float(v) for k, v in values.items()}):
        for k, v in d.items():
            out[k] = out.get(k, 0.0) + v
    return out


def _kind(name: str) -> str:
    if name.endswith(MAX_SUFFIXES):
        return "max"
    if name.endswith(SUM_SUFFIXES):
        return "sum"
    return "mean"


def reduce_metrics(metrics: Mapping[str, float], weight: float = 1.0) -> dict[str, float]:
    """Combine per-rank metrics into one record: keys ending in :data:`MAX_SUFFIXES` take the
    max, :data:`SUM_SUFFIXES` the sum, every other key the mean weighted by ``weight`` (e.g.
    this rank's rows; ranks lacking a key are left out of its mean). Exact for means over rows
    when ``weight`` counts rows; for a standard deviation or an explained variance it is the
    weighted mean of the ranks' values, an approximation. Identical values stay identical (but
    for summed keys, which are always this rank's own counts: 1 fault on each of 2 ranks is 2)."""
    if not is_distributed():
        return dict(metrics)
    gathered = all_gather_objects(({k: (None if v is None else float(v)) for k, v in metrics.items()}, float(weight)))
    out: dict[str, float] = {}
    names: list[str] = []
    for d, _ in gathered:
        names.extend(k for k in d if k not in names)
    for name in names:
        pairs = [(d[name], w) for d, w in gathered if name in d and d[name] is not None]
        if not pairs:
            out[name] = None  # type: ignore[assignment]
            continue
        values = [v for v, _ in pairs]
        kind = _kind(name)
        if kind == "sum":  # counts and rates of this rank alone: equal ones add up as well
            out[name] = sum(values)
            continue
        if all(v == values[0] for v in values):
            out[name] = values[0]
            continue
        if kind == "max":
            out[name] = max(values)
        elif kind == "sum":
            out[name] = sum(values)
        else:
            total_w = sum(w for _, w in pairs)
            out[name] = (sum(v * w for v, w in pairs) / total_w) if total_w > 0 else sum(values) / len(values)
    return out


# -- sharding -----------------------------------------------------------------------------------------


def shard_range(n: int, rank_: int | None = None, world: int | None = None) -> tuple[int, int]:
    """The contiguous slice ``[lo, hi)`` of ``n`` items that rank ``rank_`` of ``world`` holds:
    the first ``n % world`` ranks hold one item more; a rank may hold none when ``n < world``."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    if w < 1 or not 0 <= r < w:
        raise ValueError(f"shard_range: rank {r} is not in [0, {w})")
    base, extra = divmod(n, w)
    lo = r * base + min(r, extra)
    return lo, lo + base + (1 if r < extra else 0)


def shard_indices(indices: Sequence[int], rank_: int | None = None, world: int | None = None,
                  group_size: int = 1) -> list[int]:
    """This rank's contiguous share of ``indices``, cut only between whole groups of
    ``group_size`` consecutive entries (so a GRPO group is never split across ranks)."""
    if group_size < 1 or len(indices) % group_size:
        raise ValueError(f"shard_indices: {len(indices)} indices are not whole groups of {group_size}")
    lo, hi = shard_range(len(indices) // group_size, rank_, world)
    return list(indices[lo * group_size: hi * group_size])


def shard_batch(indices: Sequence[int], key: str, group_size: int = 1) -> list[int]:
    """:func:`shard_indices` for a trainer's global batch, which must give every rank at least
    one group: a ValueError naming the config ``key`` otherwise."""
    n_groups = len(indices) // group_size
    if n_groups < world_size():
        raise ValueError(f"{key}: {n_groups} per step is fewer than the {world_size()} data-parallel ranks; every "
                         f"rank needs at least one (raise {key} or launch fewer processes)")
    return shard_indices(indices, group_size=group_size)


def shard_groups(n_groups: int) -> tuple[list[int], float]:
    """(group indices this rank trains on, share). ``share`` is 1.0, or 0.0 when there are
    fewer groups than ranks and this rank holds none: it then gets the last group as a
    stand-in whose loss is multiplied by 0, so it still runs every collective of the update."""
    lo, hi = shard_range(n_groups)
    if hi > lo:
        return list(range(lo, hi)), 1.0
    return [n_groups - 1], 0.0


# -- gradients ----------------------------------------------------------------------------------------


def all_reduce_gradients(module: nn.Module | Iterable[torch.nn.Parameter], bucket_mb: float = 64.0) -> None:
    """SUM the ``.grad`` of every trainable parameter over ranks, in place.

    A parameter with a gradient on some rank but ``None`` on another (that rank held no rows)
    gets zeros there first, so every rank applies the same update; parameters with no gradient
    anywhere keep ``None`` (AdamW then leaves them alone, as in one process). Gradients are
    flattened into buckets of at most ``bucket_mb`` MiB per (device, dtype) and reduced with
    one collective each. Parameters sharded by FSDP (:mod:`trustrl.parallel`) are left out:
    their gradients were reduce-scattered (summed) in the backward. No-op when not distributed."""
    if not is_distributed():
        return
    params = [p for p in (module.parameters() if isinstance(module, nn.Module) else module) if p.requires_grad]
    # FSDP-sharded parameters (DTensors) had their gradients reduce-scattered in the backward
    params = [p for p in params if not _is_dtensor(p)]
    if not params:
        return
    flags = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=_comm_device())
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    grads: list[torch.Tensor] = []
    for p, flag in zip(params, flags.tolist()):
        if not flag:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    limit = int(bucket_mb * 2**20)
    buckets: dict[tuple, list[list[torch.Tensor]]] = {}
    sizes: dict[tuple, int] = {}
    for g in grads:  # consecutive parameters share a bucket until it is full
        key = (g.device, g.dtype)
        nbytes = g.numel() * g.element_size()
        if key not in buckets or sizes[key] + nbytes > limit:
            buckets.setdefault(key, []).append([])
            sizes[key] = 0
        buckets[key][-1].append(g)
        sizes[key] += nbytes
    comm = _comm_device()
    for bucket_list in buckets.values():
        for bucket in bucket_list:
            flat = torch.cat([g.reshape(-1) for g in bucket]).to(comm)
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            offset = 0
            for g in bucket:
                g.copy_(flat[offset: offset + g.numel()].view_as(g))
                offset += g.numel()


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return False
    return isinstance(t, DTensor)


def check_parameters_equal(module: nn.Module, what: str = "model") -> None:
    """Raise if this rank's parameters differ from rank 0's (a debugging aid: the data-parallel
    update keeps them bitwise equal)."""
    if not is_distributed():
        return
    with torch.no_grad():
        replicated = [p for p in module.parameters() if not _is_dtensor(p)]  # (FSDP shards differ by design)
        if not replicated:
            return
        flat = torch.cat([p.detach().float().reshape(-1) for p in replicated]).to(_comm_device())
        ref = flat.clone()
        dist.broadcast(ref, src=0)
        diff = float((flat - ref).abs().max()) if flat.numel() else 0.0
    if not all_true(diff == 0.0):
        raise RuntimeError(f"distributed: the {what}'s parameters differ across ranks (rank {rank()}: max abs "
                           f"diff to rank 0 = {diff:g})")


# -- rank 0 writes ------------------------------------------------------------------------------------


def on_main(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run ``fn`` on rank 0 only and return its result on every rank (broadcast; this is also
    a barrier). If it raises on rank 0, every rank raises: a :class:`~trustrl.errors.UserError`
    with the same message when rank 0's error is one (so the CLI prints it once, without a
    traceback), else a RuntimeError naming it."""
    from trustrl.errors import UserError

    if not is_distributed():
        return fn(*args, **kwargs)
    result, failure = None, None
    error: BaseException | None = None
    if is_main():
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:  # re-raised below, once the other ranks have been told
            error = exc
            failure = (str(exc), True) if isinstance(exc, UserError) else (f"{type(exc).__name__}: {exc}", False)
    if error is not None:
        broadcast_object((failure, None))
        raise error
    failure, result = broadcast_object((failure, result))
    if failure is not None:
        text, user_error = failure
        if user_error:
            raise UserError(text)
        raise RuntimeError(f"rank 0 failed in {getattr(fn, '__name__', fn)}: {text}")
    return result


def gather_rows(values: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``values`` (first dimension may differ; other dimensions must
    match) in rank order, on the input's device."""
    if not is_distributed():
        return values
    parts = all_gather_objects(values.detach().cpu())
    return torch.cat(parts, dim=0).to(values.device)
