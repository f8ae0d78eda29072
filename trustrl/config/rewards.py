"""How a reward is written in a config, or handed over from Python (no torch: the schemas
load without it).

In YAML a reward is ``{name: <built-in or "module:function">, weight, kwargs, alias}``. From
Python the same :class:`RewardSpec` also takes the function itself, and anything of the
forms below is turned into one (in ``rewards=[...]`` of a config and in ``reward_funcs=``
of a trainer alike)::

    "numeric_answer"                        a built-in name or "module:function"
    fn                                      a callable, weight 1, named fn.__name__
    (fn, 0.5)  or  (fn, 0.5, "len")         weight, and optionally the name in logs
    Reward(fn, weight=0.5, name="len")      the same, spelled out (also kwargs=)
    {"name": fn, "weight": 0.5, "alias": "len"}

A callable is recorded in ``config.yaml`` by its qualified name ``module:qualname``; one that
cannot be imported again under that name (a lambda, a closure, a bound method, a partial, a
callable object, anything defined in ``__main__``) is recorded with a ``note`` saying so: a
resumed run from that ``config.yaml`` must be handed the function again from Python.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_serializer, field_validator, model_serializer, model_validator

__all__ = ["Reward", "RewardSpec", "callable_path"]


def callable_path(fn: Any) -> tuple[str, str | None]:
    """``("module:qualname", note)`` of a callable; ``note`` is None when importing
    ``module`` and following ``qualname`` gives the function back, else says why not."""
    if isinstance(fn, functools.partial):
        path, _ = callable_path(fn.func)
        return path, "a functools.partial: its bound arguments are not recorded"
    if inspect.ismethod(fn):
        path, _ = callable_path(fn.__func__)
        return path, "a bound method: its object is not recorded"
    if inspect.isfunction(fn) or inspect.isbuiltin(fn):
        module = getattr(fn, "__module__", None) or "?"
        qualname = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", "?")
        path = f"{module}:{qualname}"
        if "<lambda>" in qualname:
            return path, "a lambda: it cannot be imported again"
        if "<locals>" in qualname:
            return path, "defined inside a function (a closure): it cannot be imported again"
        if module == "__main__":
            return path, "defined in the __main__ script: it cannot be imported by that name"
        return path, None
    cls = type(fn)
    return f"{cls.__module__}:{cls.__qualname__}", "an instance of a callable class: its state is not recorded"


@dataclass
class Reward:
    """A reward handed over from Python, with its weight and its name in logs and metrics.

    ``Reward(fn, weight=0.5, name="len")``; ``fn`` may also be a built-in name or
    ``"module:function"`` (then ``kwargs`` go to its factory, as in a config). See
    :func:`trustrl.rewards.registry.score_completions` for what ``fn`` is called with.
    """

    fn: Callable[..., Any] | str
    weight: float = 1.0
    name: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)


class RewardSpec(BaseModel):
    """A reward as written in a config.

    Attributes:
        name: a built-in name (see :data:`BUILTIN_REWARDS`), ``"package.module:function"``,
            or (from Python) the reward function itself.
        weight: multiplier of this reward in the total.
        kwargs: arguments for the built-in factory; for ``"module:function"`` or a callable,
            when non-empty the function is treated as a factory and called with them,
            otherwise it is itself the reward function.
        alias: the name used in logs and metrics (default: the built-in name, the attribute's
            name after the colon for ``"module:function"``, ``fn.__name__`` for a callable).
        note: written by trustrl into ``config.yaml`` when ``name`` records a callable that
            cannot be imported again (a lambda, closure, ...); ignored when read.
    """

    model_config = ConfigDict(extra="forbid")

    name: str | Callable[..., Any]
    weight: float = 1.0
    kwargs: dict[str, Any] = Field(default_factory=dict)
    alias: str | None = None
    note: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_python(cls, data: Any) -> Any:
        """The Python forms: a name or callable alone, ``(fn, weight[, alias])``, a Reward."""
        if isinstance(data, Reward):
            return {"name": data.fn, "weight": data.weight, "alias": data.name, "kwargs": dict(data.kwargs)}
        if isinstance(data, str) or (callable(data) and not isinstance(data, (dict, BaseModel))):
            return {"name": data}
        if isinstance(data, tuple):
            if not 1 <= len(data) <= 3:
                raise ValueError(f"a reward tuple is (fn, weight) or (fn, weight, name), got {len(data)} items")
            return dict(zip(("name", "weight", "alias"), data))
        return data

    @field_validator("name")
    @classmethod
    def _name_not_blank(cls, v: Any) -> Any:
        if isinstance(v, str):
            if not v.strip():
                raise ValueError("reward name must not be empty")
            return v.strip()
        return v

    @field_validator("weight")
    @classmethod
    def _weight_finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError(f"reward weight must be finite, got {v}")
        return v

    @field_validator("alias")
    @classmethod
    def _alias_not_blank(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("reward alias must not be empty")
        return v

    @field_serializer("name", when_used="json")
    def _name_path(self, v: Any) -> str:
        return callable_path(v)[0] if callable(v) else v

    @model_serializer(mode="wrap")
    def _record(self, handler: Any, info: Any) -> dict[str, Any]:
        """In JSON/YAML a callable becomes ``"module:qualname"`` (plus a ``note`` when that
        cannot be imported again); in Python mode it stays the callable."""
        out = handler(self)
        if info.mode == "json" and callable(self.name):
            out["note"] = callable_path(self.name)[1] or self.note
        if out.get("note") is None:
            out.pop("note", None)
        return out
