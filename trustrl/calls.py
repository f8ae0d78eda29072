"""Calling user code (reward functions, environments, tools) with a time limit and a fault
policy. No torch; used by :mod:`trustrl.rewards.registry` and meant for any other place that
runs a user's function inside training.

* :func:`call_with_limit` -- one call, sync or ``async def``, waited for at most ``timeout_s``.
* :func:`gather_with_limit` -- several ``async`` calls awaited concurrently (``asyncio.gather``
  in one event loop), each with the same limit.
* :func:`guarded_call` -- one call under the policy ``on_error="raise"`` (a
  :class:`FunctionFault` naming the function) or ``"default"`` (the default value and the
  fault's message, for the caller to count).

Time limits: a call runs in a fresh *daemon* worker thread and the caller waits at most
``timeout_s``. Python cannot kill a thread, so a call that overruns is *abandoned*: it keeps
running in the background while training moves on. A daemon thread never blocks interpreter
exit (a ``concurrent.futures`` pool would: its exit hook joins every worker). A coroutine
function runs in a new event loop in that thread (so it also works when the caller's thread
has a running loop, as in a notebook); in :func:`gather_with_limit` the coroutines still
running at the limit are cancelled. A subprocess could be killed, but would have to pickle the
function and its arguments for each call, and lambdas, closures and wrappers holding a GPU
model do not pickle. Consequence of the thread: a function that relies on being in the main
thread (``signal.alarm``) must not do so when called with a time limit.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from trustrl.errors import UserError

__all__ = ["CallTimeout", "FunctionFault", "Outcome", "call_with_limit", "gather_with_limit", "guarded_call",
           "is_async_callable"]


class CallTimeout(Exception):
    """The call ran past its time limit (and was abandoned or cancelled)."""


class FunctionFault(UserError, RuntimeError):
    """A user's function failed: raised, timed out, or returned something unusable.

    Attributes:
        function: the function's name.
        sample_index: the sample at fault within the batch, or ``None`` when not attributable.
    """

    def __init__(self, message: str, *, function: str, sample_index: int | None = None) -> None:
        super().__init__(message)
        self.function = function
        self.sample_index = sample_index


@dataclass
class Outcome:
    """What one call gave: a value, an exception, or a timeout."""

    value: Any = None
    error: BaseException | None = None
    timed_out: bool = False


def is_async_callable(fn: Any) -> bool:
    """``async def`` functions, partials of them, and objects with an ``async def __call__``."""
    while hasattr(fn, "func") and callable(getattr(fn, "func")):  # functools.partial
        fn = fn.func
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))


def _run_to_value(fn: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    value = fn(*args, **kwargs)
    if inspect.isawaitable(value):  # an async function (or a sync one returning an awaitable)
        async def wait() -> Any:
            return await value

        value = asyncio.run(wait())
    return value


def call_with_limit(fn: Callable[..., Any], args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None, *,
                    timeout_s: float | None, name: str = "call") -> Any:
    """``fn(*args, **kwargs)``, awaited if it is a coroutine; at most ``timeout_s`` seconds
    (``None``: no limit; a sync function then runs in the calling thread).

    Raises:
        CallTimeout: past the limit (the worker thread is abandoned, see the module docstring).
        Exception: whatever ``fn`` raised.
    """
    kwargs = kwargs or {}
    if timeout_s is None and not is_async_callable(fn):
        return _run_to_value(fn, args, kwargs)
    box: dict[str, Any] = {}
    done = threading.Event()

    def target() -> None:
        try:
            box["value"] = _run_to_value(fn, args, kwargs)
        except BaseException as e:  # handed to the caller's thread below
            box["error"] = e
        finally:
            done.set()

    threading.Thread(target=target, name=f"trustrl-call-{name}", daemon=True).start()
    if not done.wait(None if timeout_s is None else max(timeout_s, 0.0)):
        raise CallTimeout(f"'{name}' exceeded timeout {float(timeout_s or 0)} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def gather_with_limit(calls: Sequence[tuple[Callable[..., Any], Sequence[Any], dict[str, Any]]], *,
                      timeout_s: float | None, name: str = "gather") -> list[Outcome]:
    """Run coroutine functions ``fn(*args, **kwargs)`` concurrently (``asyncio.gather`` in one
    event loop, in a daemon thread), each allowed ``timeout_s`` from the common start.

    Returns one :class:`Outcome` per call, in order; calls still running at the limit are
    cancelled (when the loop is not blocked by sync code inside them) and time out.
    """
    outcomes = [Outcome(timed_out=True) for _ in calls]
    if not calls:
        return outcomes
    done = threading.Event()
    state: dict[str, Any] = {}

    async def one(i: int, fn: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any]) -> None:
        try:
            value = fn(*args, **kwargs)
            if inspect.isawaitable(value):
                value = await value
            outcomes[i] = Outcome(value=value)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            outcomes[i] = Outcome(error=e)

    async def main() -> None:
        state["loop"] = asyncio.get_running_loop()
        state["tasks"] = [asyncio.ensure_future(one(i, *call)) for i, call in enumerate(calls)]
        await asyncio.gather(*state["tasks"], return_exceptions=True)

    def target() -> None:
        try:
            asyncio.run(main())
        except BaseException as e:  # pragma: no cover - the loop itself failed
            state["error"] = e
        finally:
            done.set()

    threading.Thread(target=target, name=f"trustrl-gather-{name}", daemon=True).start()
    if not done.wait(None if timeout_s is None else max(timeout_s, 0.0)):
        loop, tasks = state.get("loop"), state.get("tasks", [])
        if loop is not None:
            for task in tasks:
                loop.call_soon_threadsafe(task.cancel)
        return list(outcomes)  # a call that finished in time keeps its outcome; the others time out
    if "error" in state:  # pragma: no cover
        raise state["error"]
    return outcomes


def guarded_call(fn: Callable[..., Any], args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None, *,
                 name: str, timeout_s: float | None, on_error: Literal["raise", "default"], default: Any = None,
                 what: str = "function", fault: type[FunctionFault] = FunctionFault) -> tuple[Any, str | None]:
    """Call ``fn`` with a time limit under the fault policy.

    Returns ``(value, None)`` on success, ``(default, message)`` on a fault with
    ``on_error="default"``; with ``"raise"`` a fault raises ``fault(message, function=name)``
    chained to the cause. Messages read "``{what} 'name' raised ValueError: ...``" or
    "``{what} 'name' exceeded timeout 2.0 s``".
    """
    if on_error not in ("raise", "default"):
        raise ValueError(f"guarded_call: on_error must be 'raise' or 'default', got {on_error!r}")
    try:
        return call_with_limit(fn, args, kwargs, timeout_s=timeout_s, name=name), None
    except CallTimeout as e:
        message, cause = f"{what} '{name}' exceeded timeout {float(timeout_s or 0)} s", e
    except Exception as e:
        message, cause = f"{what} '{name}' raised {type(e).__name__}: {e}", e
    if on_error == "raise":
        raise fault(message, function=name) from cause
    return default, message
