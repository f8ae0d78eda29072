"""Seeding, RNG-state capture/restore and device selection.

Everything here acts on state the caller names: the process-wide RNGs of ``random``,
``numpy.random`` and ``torch`` (CPU and, when present, CUDA), plus any generator objects passed
in explicitly. Nothing is cached at module level.

The dictionaries produced by :func:`rng_state` hold only ``torch.Tensor``, ``int``, ``float``,
``str``, ``None``, lists, tuples and dicts, so they round-trip through
``torch.save`` / ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import random
import warnings
from collections.abc import Mapping
from typing import Any, Union

import numpy as np
import torch

__all__ = ["seed_everything", "rng_state", "set_rng_state", "get_device", "GeneratorLike"]

#: Generator objects :func:`rng_state` / :func:`set_rng_state` can capture and restore by name.
GeneratorLike = Union[torch.Generator, np.random.Generator, random.Random]


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python ``random``, NumPy's global RNG and torch (CPU and all CUDA devices).

    Args:
        seed: the seed; must be a non-negative int (NumPy rejects negatives and values
            ``>= 2**32``, so we do too).
        deterministic: also call ``torch.use_deterministic_algorithms(True, warn_only=True)``,
            switch cuDNN to deterministic mode without autotuning, and set
            ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` in ``os.environ`` (only if unset), which
            deterministic cuBLAS requires. These are process-wide switches by nature.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed_everything: seed must be an int, got {type(seed).__name__}")
    seed = int(seed)
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed_everything: seed must be in [0, 2**32), got {seed}")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def _numpy_state_to_plain(state: tuple[Any, ...]) -> dict[str, Any]:
    """Turn ``np.random.get_state()`` (legacy tuple form) into plain Python values."""
    name, keys, pos, has_gauss, cached_gaussian = state
    return {
        "bit_generator": str(name),
        "keys": [int(k) for k in np.asarray(keys).tolist()],
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached_gaussian),
    }


def _numpy_state_from_plain(state: Mapping[str, Any]) -> tuple[Any, ...]:
    return (
        state["bit_generator"],
        np.asarray(state["keys"], dtype=np.uint32),
        int(state["pos"]),
        int(state["has_gauss"]),
        float(state["cached_gaussian"]),
    )


def _generator_state(name: str, gen: GeneratorLike) -> dict[str, Any]:
    if isinstance(gen, torch.Generator):
        return {"kind": "torch", "device": str(gen.device), "state": gen.get_state()}
    if isinstance(gen, np.random.Generator):
        return {"kind": "numpy", "state": gen.bit_generator.state}
    if isinstance(gen, random.Random):
        return {"kind": "python", "state": gen.getstate()}
    raise TypeError(
        f"rng_state: generator {name!r} has unsupported type {type(gen).__name__}; "
        "expected torch.Generator, numpy.random.Generator or random.Random"
    )


def _python_state_from_saved(state: Any) -> tuple[Any, ...]:
    """``random.setstate`` needs tuples; a save/load round trip may have produced lists."""
    version, internal, gauss = state
    return (int(version), tuple(int(x) for x in internal), gauss)


def rng_state(generators: Mapping[str, GeneratorLike] | None = None) -> dict[str, Any]:
    """Capture the process-wide RNG states, plus the named generator objects given.

    Args:
        generators: optional ``{name: generator}``; each may be a ``torch.Generator``, a
            ``numpy.random.Generator`` or a ``random.Random``. Restore them by passing the same
            names to :func:`set_rng_state`.

    Returns:
        ``{"python": ..., "numpy": ..., "torch": ByteTensor, "cuda": [ByteTensor, ...] | None,
        "generators": {name: {"kind": ..., "state": ...}}}``. Safe for
        ``torch.load(weights_only=True)``.
    """
    cuda: list[torch.Tensor] | None = None
    if torch.cuda.is_available():
        cuda = [s.clone() for s in torch.cuda.get_rng_state_all()]
    return {
        "python": random.getstate(),
        "numpy": _numpy_state_to_plain(np.random.get_state(legacy=True)),
        "torch": torch.get_rng_state().clone(),
        "cuda": cuda,
        "generators": {name: _generator_state(name, g) for name, g in (generators or {}).items()},
    }


def set_rng_state(
    state: Mapping[str, Any], generators: Mapping[str, GeneratorLike] | None = None
) -> None:
    """Restore states captured by :func:`rng_state`.

    Args:
        state: the dict returned by :func:`rng_state` (possibly after a save/load round trip).
        generators: ``{name: generator}`` objects to restore in place; every name must be present
            in ``state["generators"]`` with a matching kind. Generators saved but not passed
            here are left alone.

    CUDA states are restored when CUDA is available; if they were saved but CUDA is now absent,
    or the device count differs, a warning is issued and what can be restored is restored.
    """
    for key in ("python", "numpy", "torch"):
        if key not in state:
            raise KeyError(f"set_rng_state: state has no {key!r} entry (not from rng_state()?)")
    random.setstate(_python_state_from_saved(state["python"]))
    np.random.set_state(_numpy_state_from_plain(state["numpy"]))
    torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8).cpu())

    cuda = state.get("cuda")
    if cuda is not None:
        if not torch.cuda.is_available():
            warnings.warn(
                "set_rng_state: CUDA RNG states were saved but CUDA is not available; "
                "they are not restored",
                stacklevel=2,
            )
        else:
            n = torch.cuda.device_count()
            if n != len(cuda):
                warnings.warn(
                    f"set_rng_state: {len(cuda)} CUDA RNG states saved but {n} devices visible; "
                    f"restoring the first {min(n, len(cuda))}",
                    stacklevel=2,
                )
            for i, s in enumerate(cuda[:n]):
                torch.cuda.set_rng_state(torch.as_tensor(s, dtype=torch.uint8).cpu(), device=i)

    saved = state.get("generators") or {}
    for name, gen in (generators or {}).items():
        if name not in saved:
            raise KeyError(
                f"set_rng_state: no state saved for generator {name!r} "
                f"(saved: {sorted(saved)})"
            )
        entry = saved[name]
        kind = entry.get("kind")
        if isinstance(gen, torch.Generator) and kind == "torch":
            gen.set_state(torch.as_tensor(entry["state"], dtype=torch.uint8).cpu())
        elif isinstance(gen, np.random.Generator) and kind == "numpy":
            gen.bit_generator.state = entry["state"]
        elif isinstance(gen, random.Random) and kind == "python":
            gen.setstate(_python_state_from_saved(entry["state"]))
        else:
            raise TypeError(
                f"set_rng_state: generator {name!r} is a {type(gen).__name__} but the saved "
                f"state is of kind {kind!r}"
            )


def get_device(preference: str | torch.device = "auto") -> torch.device:
    """Pick a torch device.

    Args:
        preference: ``"auto"`` picks CUDA, then Apple MPS, then CPU. Anything else is parsed by
            ``torch.device`` (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``) and checked for
            availability.

    Raises:
        ValueError: if an explicitly requested accelerator is not available.
    """
    if isinstance(preference, str) and preference.strip().lower() == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(preference)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"get_device: cannot parse device {preference!r} (not a torch device type)") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"get_device: {preference!r} requested but CUDA is not available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"get_device: {preference!r} requested but only "
                f"{torch.cuda.device_count()} CUDA device(s) are visible"
            )
    if device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError(f"get_device: {preference!r} requested but MPS is not available")
    return device
