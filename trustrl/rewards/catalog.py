"""The built-in rewards as ``trustrl config-help`` lists them: each name with the arguments its
factory takes (``kwargs:`` of a ``rewards:`` entry), read from the factories' signatures in
:data:`trustrl.rewards.registry.BUILTIN_REWARDS`, so the list cannot drift from the code."""

from __future__ import annotations

import importlib
import inspect
import textwrap
from typing import Any, Callable

#: Built-ins registered as a ``**kwargs`` wrapper that imports its real factory on first use
#: (to keep imports light): the factory whose arguments the wrapper passes through.
_PASSED_THROUGH = {
    "code_tests": "trustrl.rewards.code:code_tests_reward",
    "reward_model": "trustrl.rewards.reward_model:reward_model_reward",
}


def _factory_signature(name: str, factory: Callable[..., Any]) -> tuple[inspect.Signature, Callable[..., Any]]:
    sig = inspect.signature(factory)
    only_kwargs = all(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
    if only_kwargs and name in _PASSED_THROUGH:
        module, attr = _PASSED_THROUGH[name].split(":")
        target = getattr(importlib.import_module(module), attr)
        return inspect.signature(target), target
    return sig, factory


def _annotation(annotation: Any) -> str:
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", repr(annotation))
    return text.replace("typing.", "")


def builtin_reward_arguments() -> dict[str, list[tuple[str, str, str | None]]]:
    """``{reward name: [(argument, type, default repr or None when required)]}``."""
    from trustrl.rewards.registry import BUILTIN_REWARDS

    out: dict[str, list[tuple[str, str, str | None]]] = {}
    for name, factory in BUILTIN_REWARDS.items():
        sig, _ = _factory_signature(name, factory)
        out[name] = [(p.name, _annotation(p.annotation) if p.annotation is not inspect.Parameter.empty else "",
                      None if p.default is inspect.Parameter.empty else repr(p.default))
                     for p in sig.parameters.values()
                     if p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)]
    return out


def describe_builtin_rewards() -> str:
    """The ``rewards:`` section of ``trustrl config-help``: every built-in with its arguments
    (``name: type = default``; ``(required)`` when it has none) and its docstring's first line."""
    from trustrl.rewards.registry import BUILTIN_REWARDS

    lines = ["Built-in rewards (rewards: [{name: NAME, weight: W, kwargs: {ARGUMENT: VALUE}}], or "
             "name: package.module:function for your own):"]
    arguments = builtin_reward_arguments()
    for name, factory in BUILTIN_REWARDS.items():
        args = ", ".join(f"{a}: {t} = {d}" if d is not None else f"{a}: {t} (required)" for a, t, d in arguments[name])
        lines.append(f"  {name}({args})")
        doc = inspect.getdoc(_factory_signature(name, factory)[1]) or ""
        first = doc.split("\n\n")[0].replace("\n", " ").strip()
        if first:
            lines.append(textwrap.fill(first, width=100, initial_indent=" " * 6, subsequent_indent=" " * 6))
    return "\n".join(lines)
