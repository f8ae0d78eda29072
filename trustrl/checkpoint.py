"""Atomic, verifiable training checkpoints with keep-last-K retention and exact resume.

Layout of one checkpoint::

    run_dir/checkpoints/step_000123/
        models/<name>/            one folder per model
            config.json, model.safetensors, ...   (modules with ``save_pretrained``: loadable
                                                   with ``AutoModelForCausalLM.from_pretrained``
                                                   or, for peft, as an adapter)
            state.safetensors     full ``state_dict`` of such modules (what we load from)
            model.safetensors     full ``state_dict`` of plain ``nn.Module``s
        tokenizer/                ``tokenizer.save_pretrained`` output, if a tokenizer is given
        optimizers.pt             {name: optimizer.state_dict()}
        schedulers.pt             {name: scheduler.state_dict()}
        trainer_state.json        {"step": 123, **trainer_state}
        rng.pt                    RNG states (see :func:`trustrl.utils.rng_state`)
        COMPLETE                  JSON manifest: sha256 and size of every other file; written last

Sharded layout (``parallelism.strategy=fsdp``, :func:`save_sharded_checkpoint`): ``models/``
and ``optimizers.pt`` are replaced by ``dcp/``, a ``torch.distributed.checkpoint`` folder into
which every rank writes its own shard of every model and optimizer state (``__<rank>_0.distcp``,
plus the ``.metadata`` rank 0 writes); the rest is as above, written by rank 0, and the
manifest says ``"sharded": true`` and the world size. DCP re-slices on load, so such a
checkpoint resumes at any world size (one process included), bitwise at the same one.

Atomicity: everything is written into ``step_000123.tmp-<pid>``, every file and folder is
fsync'd, then the folder is renamed into place with ``os.replace``. A crash leaves at worst a
``.tmp-`` folder, which :func:`find_latest_checkpoint` ignores (with a warning) and the next
:func:`save_checkpoint` removes. Tied / shared tensors are handled by
``safetensors.torch.save_model`` / ``load_model``.

All ``.pt`` files contain only tensors and plain Python containers, and are read with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
import shutil
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from trustrl.errors import UserError
from trustrl.logging import _fsync_dir, quiet_transformers, to_jsonable, write_json_atomic
from trustrl.utils import rng_state as _capture_rng_state

__all__ = [
    "CHECKPOINTS_DIR",
    "CheckpointError",
    "checkpoint_dir",
    "save_checkpoint",
    "find_latest_checkpoint",
    "list_checkpoints",
    "verify_checkpoint",
    "load_checkpoint",
    "save_sharded_checkpoint",
]

CHECKPOINTS_DIR = "checkpoints"
MARKER = "COMPLETE"
FORMAT_VERSION = 1
_STEP_RE = re.compile(r"^step_(\d+)$")
_PARTIAL_RE = re.compile(r"^step_(\d+)\.(tmp|old)-(\d+)$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")
_RESERVED_STATE_KEYS = ("rng",)


class CheckpointError(UserError, RuntimeError):
    """A checkpoint folder is incomplete, corrupt or does not match what is being loaded."""


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def checkpoint_dir(run_dir: str | os.PathLike[str], step: int) -> Path:
    """``run_dir/checkpoints/step_<step, 6+ digits>``."""
    return Path(run_dir) / CHECKPOINTS_DIR / f"step_{int(step):06d}"


def _sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(root):
        for fn in filenames:
            _fsync_file(Path(dirpath) / fn)
        _fsync_dir(Path(dirpath))


def _check_name(kind: str, name: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name) or name in {".", ".."}:
        raise ValueError(
            f"save_checkpoint: {kind} name {name!r} must be non-empty and use only "
            "letters, digits, '_', '-', '.'"
        )


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftover from an earlier failed save in this process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _cleanup_partials(root: Path) -> None:
    """Remove ``step_*.tmp-<pid>`` / ``step_*.old-<pid>`` folders of processes no longer alive."""
    if not root.is_dir():
        return
    for p in root.iterdir():
        m = _PARTIAL_RE.match(p.name)
        if not (m and p.is_dir()) or _pid_alive(int(m.group(3))):
            continue
        final = root / f"step_{m.group(1)}"
        if m.group(2) == "old" and not final.exists() and (p / MARKER).is_file():
            # A re-save of the same step died between its two renames: put the old one back.
            os.replace(p, final)
        else:
            shutil.rmtree(p, ignore_errors=True)


def _save_pretrained_kwargs(fn: Any) -> dict[str, Any]:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return {}
    accepts = "safe_serialization" in params or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()
    )
    return {"safe_serialization": True} if accepts else {}


def _save_model(name: str, model: nn.Module, out: Path) -> dict[str, Any]:
    """Write one model folder; return its manifest entry."""
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"save_checkpoint: models[{name!r}] is a {type(model).__name__}, not nn.Module"
        )
    out.mkdir(parents=True)
    save_pretrained = getattr(model, "save_pretrained", None)
    if callable(save_pretrained):
        with quiet_transformers():
            save_pretrained(str(out), **_save_pretrained_kwargs(save_pretrained))
        state_file = "state.safetensors"
        if (out / state_file).exists():
            raise CheckpointError(
                f"save_checkpoint: models[{name!r}].save_pretrained wrote {state_file}, "
                "which trustrl reserves for the full state dict"
            )
        fmt = "save_pretrained"
    else:
        state_file = "model.safetensors"
        fmt = "state_dict"
    save_model(model, str(out / state_file), metadata={"trustrl_model": name})
    return {"format": fmt, "state_file": state_file, "class": type(model).__qualname__}


# --------------------------------------------------------------------------------------------
# save
# --------------------------------------------------------------------------------------------


def save_checkpoint(
    run_dir: str | os.PathLike[str],
    step: int,
    *,
    models: Mapping[str, nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer] | None = None,
    schedulers: Mapping[str, Any] | None = None,
    trainer_state: Mapping[str, Any] | None = None,
    tokenizer: Any = None,
    rng: Mapping[str, Any] | None = None,
    keep_last: int | None = 3,
) -> Path:
    """Atomically write a checkpoint for ``step`` and prune old ones.

    Args:
        run_dir: run directory; checkpoints go in ``run_dir/checkpoints/``.
        step: the training step just completed (non-negative int).
        models: ``{name: module}``; names become folder names.
        optimizers: ``{name: optimizer}``; their ``state_dict()`` go to ``optimizers.pt``.
        schedulers: ``{name: scheduler}``; anything with ``state_dict()`` (LR schedulers, a KL
            controller object, ...).
        trainer_state: JSON-able dict (data position, KL coefficient, ...). Saved as
            ``trainer_state.json`` with ``"step"`` added; floats round-trip exactly, but
            NaN/inf become ``null``. The key ``"rng"`` is reserved.
        tokenizer: anything with ``save_pretrained(dir)``; saved in ``tokenizer/``.
        rng: RNG states from :func:`trustrl.utils.rng_state` (pass it yourself to include named
            generators); ``None`` captures the global RNG states now.
        keep_last: after the new checkpoint is complete, delete older complete checkpoints so
            that this one plus the ``keep_last - 1`` highest-step others remain. ``None`` keeps
            all.

    Returns:
        The final checkpoint folder.
    """
    optimizers = dict(optimizers or {})
    schedulers = dict(schedulers or {})
    json_state = _check_save_args(step, keep_last, models, optimizers, schedulers, dict(trainer_state or {}))

    root = Path(run_dir) / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    _cleanup_partials(root)
    final = checkpoint_dir(run_dir, step)
    tmp = root / f"{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        model_meta = {n: _save_model(n, m, tmp / "models" / n) for n, m in models.items()}
        if tokenizer is not None:
            with quiet_transformers():
                tokenizer.save_pretrained(str(tmp / "tokenizer"))
        torch.save({n: o.state_dict() for n, o in optimizers.items()}, tmp / "optimizers.pt")
        torch.save({n: s.state_dict() for n, s in schedulers.items()}, tmp / "schedulers.pt")
        write_json_atomic(tmp / "trainer_state.json", json_state)
        torch.save(dict(rng) if rng is not None else _capture_rng_state(), tmp / "rng.pt")

        _seal(tmp, final, root, step, model_meta, optimizers, schedulers)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    if keep_last is not None:
        _prune(root, keep=final, keep_last=int(keep_last))
    return final


def _check_save_args(step, keep_last, models, optimizers, schedulers, state) -> dict[str, Any]:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"save_checkpoint: step must be a non-negative int, got {step!r}")
    if keep_last is not None and (isinstance(keep_last, bool) or int(keep_last) < 1):
        raise ValueError(f"save_checkpoint: keep_last must be >= 1 or None, got {keep_last!r}")
    if not models:
        raise ValueError("save_checkpoint: models must name at least one module")
    for key in _RESERVED_STATE_KEYS:
        if key in state:
            raise ValueError(f"save_checkpoint: trainer_state key {key!r} is reserved")
    if "step" in state and state["step"] != step:
        raise ValueError(f"save_checkpoint: trainer_state['step']={state['step']!r} disagrees with step={step}")
    state["step"] = step
    for kind, names in (("model", models), ("optimizer", optimizers), ("scheduler", schedulers)):
        for n in names:
            _check_name(kind, n)
    return to_jsonable(state)  # fail early, before writing anything


def _dcp_state(models: Mapping[str, nn.Module], optimizers: Mapping[str, torch.optim.Optimizer]) -> dict[str, Any]:
    """``{"models": {name: state}, "optimizers": {name: state}}`` in DCP's form (FQN keys; a
    sharded model's tensors are its DTensor shards). Every optimizer must share its model's name."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    from trustrl import parallel

    for name in optimizers:
        if name not in models:
            raise ValueError(f"sharded checkpoint: optimizer {name!r} has no model of the same name (models: "
                             f"{sorted(models)}); DCP keys an optimizer's state by its model's parameter names")
    for m in models.values():
        for unit in parallel.fsdp_units(m):  # no gathered copy: the shards are the state
            unit.reshard()
    return {"models": {n: get_model_state_dict(m) for n, m in models.items()},
            "optimizers": {n: get_optimizer_state_dict(models[n], o) for n, o in optimizers.items()}}


def save_sharded_checkpoint(
    run_dir: str | os.PathLike[str],
    step: int,
    *,
    models: Mapping[str, nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer] | None = None,
    schedulers: Mapping[str, Any] | None = None,
    trainer_state: Mapping[str, Any] | None = None,
    tokenizer: Any = None,
    rng: Mapping[str, Any] | None = None,
    keep_last: int | None = 3,
) -> Path:
    """:func:`save_checkpoint` for FSDP runs, called by EVERY rank: each writes its shard of the
    models and optimizer states with ``torch.distributed.checkpoint`` into the same partial
    folder; then rank 0 writes the rest (schedulers, trainer state, its RNG states, tokenizer),
    the checksummed manifest, renames the folder into place and prunes. Same arguments and
    guarantees (atomic, verifiable, keep-last-K) as :func:`save_checkpoint`; works in one
    process too (the same layout, so a run can resume at another world size)."""
    import torch.distributed.checkpoint as dcp

    from trustrl import distributed as dist

    optimizers = dict(optimizers or {})
    schedulers = dict(schedulers or {})
    json_state = _check_save_args(step, keep_last, models, optimizers, schedulers, dict(trainer_state or {}))
    root = Path(run_dir) / CHECKPOINTS_DIR
    final = checkpoint_dir(run_dir, step)

    def prepare() -> Path:
        root.mkdir(parents=True, exist_ok=True)
        _cleanup_partials(root)
        tmp = root / f"{final.name}.tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        return tmp

    tmp = dist.on_main(prepare)  # rank 0 names the partial folder; every rank writes into it
    try:
        with warnings.catch_warnings():  # (one process: DCP says it assumes one process, as meant)
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save(_dcp_state(models, optimizers), checkpoint_id=str(tmp / "dcp"), no_dist=not dist.is_distributed())
        written = True
    except Exception:
        written = False
        if not dist.is_distributed():
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    if not dist.all_true(written):
        dist.on_main(shutil.rmtree, tmp, True)
        raise CheckpointError(f"save_sharded_checkpoint: a rank failed writing its shard into {tmp}")

    def finish() -> Path:
        try:
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp / "tokenizer"))
            torch.save({n: s.state_dict() for n, s in schedulers.items()}, tmp / "schedulers.pt")
            write_json_atomic(tmp / "trainer_state.json", json_state)
            torch.save(dict(rng) if rng is not None else _capture_rng_state(), tmp / "rng.pt")
            meta = {n: {"format": "dcp", "class": type(m).__qualname__} for n, m in models.items()}
            _seal(tmp, final, root, step, meta, optimizers, schedulers,
                  extra={"sharded": True, "world_size": dist.world_size()})
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if keep_last is not None:
            _prune(root, keep=final, keep_last=int(keep_last))
        return final

    return dist.on_main(finish)


def _seal(tmp: Path, final: Path, root: Path, step: int, model_meta: dict, optimizers, schedulers,
          extra: dict | None = None) -> None:
    """Checksum every file of ``tmp``, fsync, write the manifest last, rename into ``final``."""
    files: dict[str, dict[str, Any]] = {}
    for p in sorted(tmp.rglob("*")):
        if p.is_file():
            rel = p.relative_to(tmp).as_posix()
            files[rel] = {"sha256": _sha256(p), "size": p.stat().st_size}
    _fsync_tree(tmp)
    manifest = {"format_version": FORMAT_VERSION, "step": step, "created_unix": time.time(), "models": model_meta,
                "optimizers": sorted(optimizers), "schedulers": sorted(schedulers), "files": files, **(extra or {})}
    write_json_atomic(tmp / MARKER, manifest)
    _fsync_dir(tmp)
    if final.exists():  # re-saving the same step: move the old one aside first
        old = root / f"{final.name}.old-{os.getpid()}"
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)


def _load_sharded(path: Path, manifest: dict, models, optimizers) -> None:
    """Load a DCP checkpoint into ``models`` / ``optimizers`` (sharded or not, any world size)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    from trustrl import distributed as dist

    _pick("model", manifest.get("models", {}), models, path)
    _pick("optimizer", dict.fromkeys(manifest.get("optimizers", [])), optimizers, path)
    state = _dcp_state(models, optimizers)
    try:
        with warnings.catch_warnings():  # (one process: DCP says it assumes one process, as meant)
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=str(path / "dcp"), no_dist=not dist.is_distributed())
    except Exception as exc:
        raise CheckpointError(f"load_checkpoint: {path / 'dcp'}: {exc}") from exc
    for name, model in models.items():
        set_model_state_dict(model, state["models"][name])
    for name, opt in optimizers.items():
        set_optimizer_state_dict(models[name], opt, state["optimizers"][name])


def _prune(root: Path, *, keep: Path, keep_last: int) -> None:
    """Delete complete checkpoints beyond ``keep_last`` (never ``keep``)."""
    others = [
        (step, p)
        for step, p in list_checkpoints(root.parent)
        if p != keep and (p / MARKER).is_file()
    ]
    others.sort(key=lambda sp: sp[0], reverse=True)
    for _step, p in others[keep_last - 1 :]:
        shutil.rmtree(p, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# find / verify
# --------------------------------------------------------------------------------------------


def list_checkpoints(run_dir: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """All ``step_<n>`` folders under ``run_dir/checkpoints`` as ``(step, path)``, ascending by
    step, whether or not they are valid."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    out.sort(key=lambda sp: sp[0])
    return out


def verify_checkpoint(path: str | os.PathLike[str], *, checksums: bool = True) -> dict[str, Any]:
    """Check a checkpoint folder against its ``COMPLETE`` manifest and return the manifest.

    Args:
        path: the ``step_<n>`` folder.
        checksums: recompute sha256 of every file (reads everything); ``False`` checks only
            presence and sizes.

    Raises:
        CheckpointError: marker missing or unreadable, a file missing, wrong size or checksum.
    """
    path = Path(path)
    marker = path / MARKER
    if not marker.is_file():
        raise CheckpointError(f"{path}: no {MARKER} marker (incomplete save)")
    try:
        manifest = json.loads(marker.read_text(encoding="utf-8"))
        files = manifest["files"]
        if not isinstance(files, dict):
            raise TypeError("'files' is not an object")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{marker}: unreadable manifest: {exc}") from exc
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{marker}: format_version {manifest.get('format_version')!r}, "
            f"expected {FORMAT_VERSION}"
        )
    for rel, info in files.items():
        f = path / rel
        try:
            size = f.stat().st_size
        except OSError as exc:
            raise CheckpointError(f"{path}: {rel} missing or unreadable: {exc}") from exc
        if size != info.get("size"):
            raise CheckpointError(
                f"{path}: {rel} has {size} bytes, manifest says {info.get('size')}"
            )
        if checksums:
            try:
                digest = _sha256(f)
            except OSError as exc:
                raise CheckpointError(f"{path}: {rel} unreadable: {exc}") from exc
            if digest != info.get("sha256"):
                raise CheckpointError(f"{path}: {rel} sha256 mismatch (file corrupt)")
    return manifest


def find_latest_checkpoint(
    run_dir: str | os.PathLike[str], *, checksums: bool = True
) -> Path | None:
    """The highest-step valid checkpoint under ``run_dir/checkpoints``, or ``None``.

    Partial (``.tmp-``) folders and invalid checkpoints (missing marker, size or checksum
    mismatch, unreadable manifest) are skipped with a ``warnings.warn`` naming them.

    Args:
        run_dir: the run directory.
        checksums: verify sha256 of every file (see :func:`verify_checkpoint`).
    """
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return None
    for p in sorted(root.iterdir()):
        if _PARTIAL_RE.match(p.name):
            warnings.warn(f"find_latest_checkpoint: ignoring partial checkpoint {p}", stacklevel=2)
    for _step, p in reversed(list_checkpoints(run_dir)):
        try:
            verify_checkpoint(p, checksums=checksums)
        except CheckpointError as exc:
            warnings.warn(
                f"find_latest_checkpoint: skipping invalid checkpoint {p}: {exc}", stacklevel=2
            )
            continue
        return p
    return None


# --------------------------------------------------------------------------------------------
# load
# --------------------------------------------------------------------------------------------


def _torch_load(path: Path, map_location: Any) -> Any:
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot be loaded: {exc}") from exc


def _pick(kind: str, saved: Mapping[str, Any], wanted: Mapping[str, Any], where: Path) -> None:
    missing = sorted(set(wanted) - set(saved))
    if missing:
        raise CheckpointError(
            f"load_checkpoint: {where} has no {kind} named {missing} (it has {sorted(saved)})"
        )


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    models: Mapping[str, nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer] | None = None,
    schedulers: Mapping[str, Any] | None = None,
    map_location: str | torch.device = "cpu",
    checksums: bool = True,
) -> dict[str, Any]:
    """Restore a checkpoint in place into existing objects.

    Models are loaded strictly from the full state dict (``state.safetensors`` or
    ``model.safetensors``), so plain modules, ``transformers`` models and peft-wrapped models
    all work; tensors are copied into the existing parameters (their device and dtype are
    kept). Each requested name must exist in the checkpoint; saved entries not requested are
    ignored. Optimizers are loaded after the models; ``map_location`` applies to the optimizer
    and scheduler files (``Optimizer.load_state_dict`` then moves state to each parameter's
    device).

    Returns:
        The trainer state (``{"step": ..., **trainer_state}``) plus ``"rng"``: the saved RNG
        states (or ``None``), to pass to :func:`trustrl.utils.set_rng_state` when you are
        ready — restoring RNG is left to the caller so it happens after any RNG-consuming setup.

    Raises:
        CheckpointError: the checkpoint fails verification, lacks a requested entry, or a
            state dict does not fit (strict load).
    """
    path = Path(path)
    manifest = verify_checkpoint(path, checksums=checksums)
    optimizers = dict(optimizers or {})
    schedulers = dict(schedulers or {})

    from trustrl import parallel

    if manifest.get("sharded"):
        _load_sharded(path, manifest, models, optimizers)
        optimizers = {}  # loaded with the models
    elif any(parallel.is_sharded(m) for m in models.values()):
        raise CheckpointError(f"load_checkpoint: {path} was written without parallelism.strategy=fsdp; a sharded "
                              "run resumes from sharded (DCP) checkpoints only (resume it with strategy ddp)")
    saved_models = {} if manifest.get("sharded") else manifest.get("models", {})
    _pick("model", saved_models, {} if manifest.get("sharded") else models, path)
    for name, model in ({} if manifest.get("sharded") else models).items():
        state_file = path / "models" / name / saved_models[name]["state_file"]
        try:
            load_model(model, str(state_file), strict=True, device="cpu")
        except RuntimeError as exc:
            raise CheckpointError(
                f"load_checkpoint: models[{name!r}] from {state_file}: {exc}"
            ) from exc

    if optimizers:
        saved_opt = _torch_load(path / "optimizers.pt", map_location)
        _pick("optimizer", saved_opt, optimizers, path)
        for name, opt in optimizers.items():
            try:
                opt.load_state_dict(saved_opt[name])
            except (ValueError, KeyError, RuntimeError) as exc:
                raise CheckpointError(f"load_checkpoint: optimizers[{name!r}]: {exc}") from exc
    if schedulers:
        saved_sched = _torch_load(path / "schedulers.pt", map_location)
        _pick("scheduler", saved_sched, schedulers, path)
        for name, sched in schedulers.items():
            sched.load_state_dict(saved_sched[name])

    try:
        state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path / 'trainer_state.json'}: unreadable: {exc}") from exc
    rng_file = path / "rng.pt"
    state["rng"] = _torch_load(rng_file, "cpu") if rng_file.exists() else None
    return state
