"""The environment API for language agents, in Gymnasium's shape.

The LLM is the agent; the environment is everything outside it. An environment is a plain
Python class with two methods::

    reset(seed=None, options=None) -> (observation, info)
    step(action_text)              -> (observation, reward, terminated, truncated, info)

* ``options`` at reset is the dataset row (a dict of its columns): the episode's task.
* An observation is text (one ``user`` message) or a list of chat messages
  (``{"role": "user" | "tool" | "system", "content": ...}``); the first one opens the
  conversation, every later one is the environment's reply to the model's turn.
* ``action_text`` is the model's text for one turn (its sampled tokens decoded, special
  tokens dropped).
* ``reward`` is the reward of that step; ``terminated`` ends the episode in a terminal state,
  ``truncated`` ends it by a limit (Gymnasium's meaning). ``info["success"]`` (bool), when
  given, is counted as ``env/success``.
* Optional ``tools``: a list of Python callables offered to the model through the chat
  template (``apply_chat_template(tools=...)``, see :mod:`trustrl.envs.tools`).

Environments are made from ``env: "module:Class"`` plus ``env_kwargs`` in a config, or from a
class / factory in the Python API (:func:`resolve_env_factory`). One instance plays one
episode at a time; the episode runner makes one per episode of a step.

Every call into an environment goes through :func:`call_env` with a time limit and the same
error policy as rewards: ``raise`` (an :class:`EnvError` naming the environment, the episode
and the turn) or ``default`` (the episode ends there with ``env_default_reward`` and a
counted fault).
"""

from __future__ import annotations

import importlib
import inspect
import queue
import threading
from dataclasses import dataclass
from collections.abc import Mapping
from typing import Any, Callable, Protocol, runtime_checkable

from trustrl.errors import UserError


@runtime_checkable
class LanguageEnv(Protocol):
    """What the episode runner needs of an environment (a Gymnasium-shaped text env)."""

    def reset(self, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict]: ...

    def step(self, action: str) -> tuple[Any, float, bool, bool, dict]: ...


class EnvError(UserError, RuntimeError):
    """An environment call failed or overran its time limit (env_on_error = raise)."""


class EnvSpecError(UserError, ValueError):
    """``env:`` names nothing usable (no such module or attribute, not a class or factory)."""


class EnvTimeout(EnvError):
    pass


EnvFactory = Callable[..., LanguageEnv]


def resolve_env_factory(spec: str | EnvFactory, kwargs: dict[str, Any] | None = None) -> tuple[str, Callable[[], LanguageEnv]]:
    """``(name, make)`` from ``"module:Class"`` (or ``"module.Class"``) or a class / factory;
    ``make()`` builds one environment with ``kwargs``. An import that fails, a name that is not
    there, or an object that is not callable is refused with a message naming the spec."""
    kwargs = dict(kwargs or {})
    if isinstance(spec, str):
        module_name, sep, attr = spec.partition(":")
        if not sep:
            module_name, _, attr = spec.rpartition(".")
        if not module_name or not attr:
            raise EnvSpecError(f"env {spec!r}: expected 'module:Class' (e.g. trustrl.envs.maze:TextMaze)")
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise EnvSpecError(f"env {spec!r}: cannot import module {module_name!r} ({err})") from None
        if not hasattr(module, attr):
            raise EnvSpecError(f"env {spec!r}: module {module_name!r} has no attribute {attr!r}")
        factory, name = getattr(module, attr), spec
    else:
        factory, name = spec, getattr(spec, "__qualname__", type(spec).__name__)
    if not callable(factory):
        raise EnvSpecError(f"env {name!r} is not a class or factory (got {type(factory).__name__})")
    _check_env_kwargs(name, factory, kwargs)

    def make() -> LanguageEnv:
        env = factory(**kwargs)
        for method in ("reset", "step"):
            if not callable(getattr(env, method, None)):
                raise EnvSpecError(f"env {name!r}: the object it made has no {method}() method")
        return env

    return name, make


def _check_env_kwargs(name: str, factory: Callable, kwargs: dict[str, Any]) -> None:
    """``env_kwargs`` that the factory's signature cannot take are refused before anything
    runs, naming what it accepts (a factory without an inspectable signature is not checked)."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        return
    try:
        signature.bind(**kwargs)
    except TypeError as err:
        accepted = [p.name for p in signature.parameters.values()
                    if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        raise EnvSpecError(f"env {name!r}: env_kwargs {sorted(kwargs)} do not fit it ({err}); it takes "
                           f"{', '.join(accepted) or 'no arguments'}") from None


class _Worker:
    """One long-lived *daemon* thread that runs time-limited calls in turn (starting a thread
    per call, as :func:`trustrl.calls.call_with_limit` does, costs more than a maze step). A
    call that overruns is abandoned with its thread, and the next call gets a fresh worker;
    being a daemon, an abandoned thread never blocks interpreter exit (a
    ``concurrent.futures`` pool would join it)."""

    def __init__(self) -> None:
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._serve, name="trustrl-env", daemon=True).start()

    def _serve(self) -> None:
        while True:
            fn, args, box, done = self.jobs.get()
            try:
                box["value"] = fn(*args)
            except BaseException as e:  # handed to the caller's thread
                box["error"] = e
            finally:
                done.set()

    def run(self, fn: Callable[..., Any], args: tuple, timeout_s: float) -> tuple[bool, dict]:
        box: dict[str, Any] = {}
        done = threading.Event()
        self.jobs.put((fn, args, box, done))
        return done.wait(max(timeout_s, 0.0)), box


_WORKERS = threading.local()


def call_with_time_limit(fn: Callable[..., Any], args: tuple, timeout_s: float | None, what: str) -> Any:
    """``fn(*args)``; with ``timeout_s``, on a worker thread, abandoned when it overruns
    (:class:`EnvTimeout` naming ``what``). The same policy as the reward time limit
    (trustrl.rewards.registry); a Python thread cannot be killed, so an overrunning call keeps
    running in the background until it returns."""
    if timeout_s is None:
        return fn(*args)
    worker = getattr(_WORKERS, "worker", None)
    if worker is None:
        worker = _WORKERS.worker = _Worker()
    finished, box = worker.run(fn, args, timeout_s)
    if not finished:
        _WORKERS.worker = None  # abandoned, busy with the overrunning call
        raise EnvTimeout(f"{what}: no answer within env_timeout_s={timeout_s:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


@dataclass(frozen=True)
class EnvPolicy:
    """Time limit and error policy of environment calls (``env_timeout_s``, ``env_on_error``,
    ``env_default_reward`` in the config)."""

    timeout_s: float | None = 60.0
    on_error: str = "raise"  # "raise" | "default"
    default_reward: float = 0.0


def call_env(policy: EnvPolicy, fn: Callable[..., Any], args: tuple, what: str) -> tuple[Any, str | None]:
    """``(result, None)``, or with ``on_error="default"`` ``(None, message)`` when the call failed
    or overran; with ``on_error="raise"`` an :class:`EnvError` naming ``what`` (environment,
    episode and turn) and the cause."""
    try:
        return call_with_time_limit(fn, args, policy.timeout_s, what), None
    except Exception as err:  # noqa: BLE001 - every failure of user code is a fault of the env
        # an EnvError (a timeout, a result of the wrong shape) already names ``what``
        named = isinstance(err, EnvError) and str(err).startswith(what)
        message = str(err) if named else f"{what}: {type(err).__name__}: {err}"
        if policy.on_error == "raise":
            raise EnvError(message) from (None if named else err)
        return None, message


def as_messages(observation: Any, what: str) -> list[dict[str, Any]]:
    """An observation as chat messages: text -> one user message; a message list as given."""
    if isinstance(observation, str):
        return [{"role": "user", "content": observation}]
    if isinstance(observation, dict) and "role" in observation:
        return [dict(observation)]
    if isinstance(observation, list) and all(isinstance(m, dict) and "role" in m for m in observation):
        return [dict(m) for m in observation]
    raise EnvError(f"{what}: an observation must be text or chat messages ({{'role': ..., 'content': ...}}), "
                     f"got {type(observation).__name__}")


def check_step_result(out: Any, what: str) -> tuple[Any, float, bool, bool, dict]:
    """A ``step`` result must be the 5-tuple of Gymnasium's API: an observation (text or chat
    messages; None only when the episode ends), a finite number reward, two flags and a dict
    ``info`` whose ``"success"``, when given, is a flag. Anything else is an :class:`EnvError`
    naming ``what``: a string ``"no"`` read as ``bool("no") = True`` would count a success the
    environment never meant."""
    import math

    if not isinstance(out, tuple) or len(out) != 5:
        raise EnvError(f"{what}: step() must return (observation, reward, terminated, truncated, info), "
                       f"got {type(out).__name__}{'' if not isinstance(out, tuple) else f' of {len(out)}'}")
    obs, reward, terminated, truncated, info = out
    try:
        reward = float(reward)
    except (TypeError, ValueError, RuntimeError):  # RuntimeError: a tensor of more than one element
        raise EnvError(f"{what}: reward must be a number, got {reward!r}") from None
    if not math.isfinite(reward):
        raise EnvError(f"{what}: reward is not finite ({reward})")
    terminated, truncated = _flag(terminated, "terminated", what), _flag(truncated, "truncated", what)
    if info is None:
        info = {}
    if not isinstance(info, Mapping):
        raise EnvError(f"{what}: info must be a dict, got {type(info).__name__}")
    info = dict(info)
    if info.get("success") is not None:
        info["success"] = _flag(info["success"], "info['success']", what)
    if obs is None:
        if not (terminated or truncated):
            raise EnvError(f"{what}: the observation is None but the episode goes on (terminated and truncated "
                           "are False); return the reply to the model's turn")
    else:
        as_messages(obs, what)  # text or chat messages, else an EnvError naming what
    return obs, reward, terminated, truncated, info


def _flag(value: Any, name: str, what: str) -> bool:
    """``value`` as a bool: True/False, 0/1, or a NumPy / torch boolean scalar; anything else
    (a string, None, a list) is refused rather than read by its truthiness."""
    if isinstance(value, (str, bytes)) or value is None:
        raise EnvError(f"{what}: {name} must be a bool, got {value!r}")
    try:
        if value in (True, False) and getattr(value, "ndim", 0) == 0:
            return bool(value)
    except (TypeError, ValueError, RuntimeError):
        pass
    raise EnvError(f"{what}: {name} must be a bool, got {value!r}")
