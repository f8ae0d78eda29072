"""Resolving reward specifications to functions, and scoring completions with them safely.

A reward is named in a config as a :class:`RewardSpec` (a built-in name or a
``"module:function"`` path, a weight, keyword arguments, an optional alias for logs), or
handed over as a plain Python callable. :func:`resolve_reward` turns either into a
:class:`NamedReward`; :func:`score_completions` calls each one on a batch and checks what
comes back before anything reaches the advantage computation.

Time limits: each reward call runs in a fresh *daemon* worker thread and the caller waits at
most ``timeout_s``. Python cannot kill a thread, so a call that overruns is *abandoned*: it
keeps running in the background (using CPU, possibly holding whatever it holds) while
training moves on with an error or the default score. A daemon thread never blocks
interpreter exit (a ``concurrent.futures`` pool would: its exit hook joins every worker).
A subprocess could be killed, but would have to pickle the reward function and every column
for each call, and lambdas, closures and reward-model wrappers holding a GPU model do not
pickle; rewards that run untrusted code (``code_tests``) do their own process isolation.
Consequence of the thread: a reward function that relies on being in the main thread (for
example ``signal.alarm``) must not do so when called with a timeout -- see
:func:`trustrl.rewards.rules.math_equivalence_reward`.
"""

from __future__ import annotations

import importlib
import math
import numbers
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch


from trustrl.config.rewards import RewardSpec
from trustrl.rewards import rules

__all__ = [
    "BUILTIN_REWARDS",
    "NamedReward",
    "RewardError",
    "RewardSpec",
    "ScoreResult",
    "register_reward",
    "resolve_reward",
    "resolve_rewards",
    "score_completions",
]

RewardFn = Callable[..., Any]


class RewardError(RuntimeError):
    """A reward function failed, returned the wrong number of values, a non-number, NaN/inf,
    or ran past its time limit.

    Attributes:
        function: the reward's name.
        sample_index: the index of the sample at fault within the batch, or ``None`` when
            the fault is not attributable to one sample.
    """

    def __init__(self, message: str, *, function: str, sample_index: int | None = None) -> None:
        super().__init__(message)
        self.function = function
        self.sample_index = sample_index


@dataclass(frozen=True)
class NamedReward:
    """A resolved reward: ``fn(prompts, completions, **columns) -> list[float]``."""

    name: str
    fn: RewardFn
    weight: float = 1.0


# --------------------------------------------------------------------------------------------
# Built-ins
# --------------------------------------------------------------------------------------------


def _code_tests(**kwargs: Any) -> RewardFn:
    try:
        module = importlib.import_module("trustrl.rewards.code")
    except ImportError as e:
        raise ValueError(
            f"built-in reward 'code_tests' needs trustrl.rewards.code, which failed to import: {e}"
        ) from e
    factory = getattr(module, "code_tests_reward", None)
    if factory is None or not callable(factory):
        raise ValueError("built-in reward 'code_tests': trustrl.rewards.code has no callable 'code_tests_reward'")
    # Like every built-in, code_tests_reward is a factory: called with the spec's kwargs
    # (possibly none) it returns fn(prompts, completions, **columns).
    return factory(**kwargs)


def _reward_model(**kwargs: Any) -> RewardFn:
    """``{name: reward_model, kwargs: {path: DIR}}``: a model trained with ``trustrl train rm``."""
    if "path" not in kwargs:
        raise ValueError("built-in reward 'reward_model' needs kwargs.path: the directory of a trained reward model")
    from trustrl.rewards.reward_model import reward_model_reward

    return reward_model_reward(**kwargs)


#: Built-in reward factories by name. Each is called with the spec's ``kwargs``.
BUILTIN_REWARDS: dict[str, Callable[..., RewardFn]] = {
    "format": rules.format_reward,
    "numeric_answer": rules.numeric_answer_reward,
    "exact_answer": rules.exact_answer_reward,
    "math_equivalence": rules.math_equivalence_reward,
    "length_penalty": rules.length_penalty,
    "soft_overlong": rules.soft_overlong_reward,
    "code_tests": _code_tests,
    "reward_model": _reward_model,
}


def register_reward(name: str, factory: Callable[..., RewardFn], *, overwrite: bool = False) -> None:
    """Add a built-in reward factory under ``name`` (``overwrite=True`` to replace one)."""
    if ":" in name or not name.strip():
        raise ValueError(f"register_reward: invalid name {name!r} (no ':' and not empty)")
    if name in BUILTIN_REWARDS and not overwrite:
        raise ValueError(f"register_reward: {name!r} is already registered; pass overwrite=True")
    BUILTIN_REWARDS[name] = factory


def _callable_name(fn: Any) -> str:
    name = getattr(fn, "__name__", None)
    if isinstance(name, str) and name:
        return name
    inner = getattr(fn, "func", None)  # functools.partial
    if inner is not None:
        return _callable_name(inner)
    return type(fn).__name__


def _import_attr(path: str) -> Any:
    module_name, _, attr_path = path.partition(":")
    if not module_name or not attr_path:
        raise ValueError(f"reward {path!r}: expected 'module:function'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"reward {path!r}: cannot import module {module_name!r}: {e}") from e
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"reward {path!r}: module {module_name!r} has no attribute {attr_path!r}")
        obj = getattr(obj, part)
    return obj


def resolve_reward(spec: RewardSpec | Mapping[str, Any] | str | NamedReward | RewardFn) -> NamedReward:
    """Turn a spec (or a mapping / a bare name string parsed as one) or a callable into a
    :class:`NamedReward`.

    * a built-in name calls the registered factory with ``kwargs``;
    * ``"module:function"`` imports the module and takes the attribute: the attribute is the
      reward function itself, unless ``kwargs`` are given, in which case it is called with
      them to build the function;
    * a plain callable is used directly with weight 1.0 and name ``fn.__name__``;
    * a :class:`NamedReward` is returned unchanged.

    Raises:
        ValueError: unknown name (the message lists the built-ins), import failure, invalid
            spec, or a factory that does not return a callable.
        NotImplementedError: ``"reward_model"`` while it is not wired.
    """
    if isinstance(spec, NamedReward):
        return spec
    if isinstance(spec, str):
        spec = RewardSpec(name=spec)
    elif isinstance(spec, Mapping):
        spec = RewardSpec.model_validate(dict(spec))
    elif not isinstance(spec, RewardSpec):
        if callable(spec):
            return NamedReward(name=_callable_name(spec), fn=spec, weight=1.0)
        raise ValueError(
            f"resolve_reward: expected a RewardSpec, a mapping, a name or a callable, got {type(spec).__name__}"
        )

    if ":" in spec.name:
        attr = _import_attr(spec.name)
        if not callable(attr):
            raise ValueError(f"reward {spec.name!r}: attribute is a {type(attr).__name__}, not callable")
        try:
            fn = attr(**spec.kwargs) if spec.kwargs else attr
        except TypeError as e:
            raise ValueError(f"reward {spec.name!r}: calling it with kwargs {spec.kwargs} failed: {e}") from e
        default_name = spec.name.partition(":")[2].rsplit(".", 1)[-1]
    elif spec.name in BUILTIN_REWARDS:
        try:
            fn = BUILTIN_REWARDS[spec.name](**spec.kwargs)
        except TypeError as e:
            raise ValueError(f"reward {spec.name!r}: invalid kwargs {spec.kwargs}: {e}") from e
        default_name = spec.name
    else:
        raise ValueError(
            f"unknown reward {spec.name!r}; built-in rewards are {sorted(BUILTIN_REWARDS)}, "
            "or give 'module:function', or pass a callable"
        )
    if not callable(fn):
        raise ValueError(f"reward {spec.name!r}: factory returned {type(fn).__name__}, not a callable")
    return NamedReward(name=spec.alias or default_name, fn=fn, weight=float(spec.weight))


def resolve_rewards(specs: Sequence[Any]) -> list[NamedReward]:
    """:func:`resolve_reward` over a list; names must be unique (set ``alias`` to tell apart
    two uses of the same function)."""
    out = [resolve_reward(s) for s in specs]
    _check_unique(out)
    return out


def _check_unique(rewards: Sequence[NamedReward]) -> None:
    seen: set[str] = set()
    for r in rewards:
        if r.name in seen:
            raise ValueError(f"two rewards are named {r.name!r}; give one an alias")
        seen.add(r.name)


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------


@dataclass
class ScoreResult:
    """Scores of one batch.

    Attributes:
        total: ``[N]`` float32, ``sum_k weight_k * per_function[k]``.
        per_function: ``{name: [N] float32}`` raw (unweighted) scores, default scores filled in.
        n_faults: ``{name: int}`` how many samples got ``default_score`` from that function
            (always 0 with ``on_error="raise"``).
    """

    total: torch.Tensor
    per_function: dict[str, torch.Tensor]
    n_faults: dict[str, int] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        """``reward/<name>/mean``, ``reward/<name>/std`` (raw scores), ``reward/mean``,
        ``reward/std`` (weighted total). Standard deviations are population (``/N``), so a
        batch of one reads 0."""
        out: dict[str, float] = {}
        for name, values in self.per_function.items():
            out[f"reward/{name}/mean"] = float(values.mean())
            out[f"reward/{name}/std"] = float(values.std(unbiased=False))
        out["reward/mean"] = float(self.total.mean())
        out["reward/std"] = float(self.total.std(unbiased=False))
        return out


class _Timeout(Exception):
    pass


class _BadOutput(Exception):
    def __init__(self, message: str, index: int | None) -> None:
        super().__init__(message)
        self.index = index


@dataclass
class _Fault:
    index: int | None
    message: str
    cause: BaseException | None = None


def _call(fn: RewardFn, args: tuple[Any, ...], kwargs: dict[str, Any], timeout_s: float | None, name: str) -> Any:
    """Call ``fn``; with a timeout, in a daemon thread that is abandoned if it overruns."""
    if timeout_s is None:
        return fn(*args, **kwargs)
    box: dict[str, Any] = {}
    done = threading.Event()

    def target() -> None:
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as e:  # handed to the caller's thread below
            box["error"] = e
        finally:
            done.set()

    threading.Thread(target=target, name=f"trustrl-reward-{name}", daemon=True).start()
    if not done.wait(max(timeout_s, 0.0)):
        raise _Timeout()
    if "error" in box:
        raise box["error"]
    return box["value"]


def _to_values(out: Any, n: int, name: str) -> list[Any]:
    if isinstance(out, torch.Tensor) or type(out).__module__ == "numpy":
        shape = tuple(getattr(out, "shape", ()))
        if len(shape) != 1:
            raise _BadOutput(
                f"reward function '{name}' returned an array of shape {shape}, expected [{n}]", None
            )
        out = out.tolist()
    if not isinstance(out, (list, tuple)):
        raise _BadOutput(
            f"reward function '{name}' returned {type(out).__name__}, expected a list of {n} floats", None
        )
    if len(out) != n:
        raise _BadOutput(
            f"reward function '{name}' returned {len(out)} values, expected {n} (one per completion)", None
        )
    return list(out)


def _to_float(v: Any, i: int, name: str, completion: str) -> float:
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        v = v.item()
    if not isinstance(v, numbers.Real):
        raise _BadOutput(
            f"reward function '{name}' returned non-numeric value {_preview(v)} "
            f"({type(v).__name__}) at sample {i} (completion: {_preview(completion)})",
            i,
        )
    f = float(v)
    if not math.isfinite(f):
        raise _BadOutput(
            f"reward function '{name}' returned {f} at sample {i} (completion: {_preview(completion)})", i
        )
    return f


def _preview(value: Any, n: int = 80) -> str:
    text = value if isinstance(value, str) else repr(value)
    if len(text) > n:
        text = text[: n - 3] + "..."
    return repr(text) if isinstance(value, str) else text


def _isolate(
    reward: NamedReward,
    prompts: Sequence[str],
    completions: Sequence[str],
    columns: Mapping[str, Sequence[Any]],
    timeout_s: float | None,
    error: Exception,
    stop_at_first: bool,
) -> tuple[list[float | None], list[_Fault]]:
    """After the batch call raised, score one sample at a time to find the sample(s) at fault.

    The whole search gets ``timeout_s`` in total; samples not reached are left unscored.
    """
    n = len(completions)
    name = reward.name
    values: list[float | None] = [None] * n
    faults: list[_Fault] = []
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    stopped = ""
    for i in range(n):
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            stopped = f"stopped at sample {i}: the search ran out of its {timeout_s} s"
            break
        cols = {k: v[i : i + 1] for k, v in columns.items()}
        try:
            out = _call(reward.fn, (list(prompts[i : i + 1]), list(completions[i : i + 1])), cols, remaining, name)
        except _Timeout:
            stopped = f"sample {i} alone ran past the remaining time"
            break
        except Exception as e:
            faults.append(
                _Fault(
                    i,
                    f"reward function '{name}' raised {type(e).__name__}: {e} "
                    f"at sample {i} (completion: {_preview(completions[i])})",
                    e,
                )
            )
            if stop_at_first:
                break
            continue
        try:
            values[i] = _to_float(_to_values(out, 1, name)[0], i, name, completions[i])
        except _BadOutput as b:
            faults.append(_Fault(i, f"{b} (scoring sample {i} alone after the batch call raised {type(error).__name__}: {error})", error))
            if stop_at_first:
                break
    if not faults:
        why = stopped or "every sample scored alone succeeded"
        return [None] * n, [
            _Fault(
                None,
                f"reward function '{name}' raised {type(error).__name__}: {error} "
                f"(could not isolate the failing sample: {why})",
                error,
            )
        ]
    return values, faults


def _evaluate(
    reward: NamedReward,
    prompts: Sequence[str],
    completions: Sequence[str],
    columns: Mapping[str, Sequence[Any]],
    timeout_s: float | None,
    stop_at_first: bool,
) -> tuple[list[float | None], list[_Fault]]:
    n = len(completions)
    name = reward.name
    try:
        out = _call(reward.fn, (list(prompts), list(completions)), dict(columns), timeout_s, name)
    except _Timeout:
        return [None] * n, [_Fault(None, f"reward function '{name}' exceeded timeout {float(timeout_s or 0)} s")]
    except Exception as e:
        return _isolate(reward, prompts, completions, columns, timeout_s, e, stop_at_first)
    try:
        raw = _to_values(out, n, name)
    except _BadOutput as b:
        return [None] * n, [_Fault(None, str(b))]
    values: list[float | None] = []
    faults: list[_Fault] = []
    for i, v in enumerate(raw):
        try:
            values.append(_to_float(v, i, name, completions[i]))
        except _BadOutput as b:
            values.append(None)
            faults.append(_Fault(i, str(b)))
            if stop_at_first:
                break
    return values, faults


def score_completions(
    rewards: Sequence[NamedReward],
    prompts: Sequence[str],
    completions: Sequence[str],
    columns: Mapping[str, Sequence[Any]] | None = None,
    *,
    timeout_s: float | None = 30.0,
    on_error: Literal["raise", "default"] = "raise",
    default_score: float = 0.0,
) -> ScoreResult:
    """Score ``N`` completions with every reward, check the values, and combine them.

    Each reward is called once on the whole batch as ``fn(prompts, completions, **columns)``.
    It must return ``N`` finite real numbers (a list, tuple, or 1-D tensor/array). Faults:

    * the call raises -> the function is re-run one sample at a time (within ``timeout_s``
      in total) to find the failing sample(s); the error names the function, the sample
      index and a preview of the completion, or says the sample could not be isolated;
    * wrong number of values, or not a sequence -> names the function, expected and got;
    * a non-numeric, NaN or infinite value -> names the function and the sample index;
    * the call runs past ``timeout_s`` -> "reward function 'x' exceeded timeout 2.0 s"; the
      call is abandoned in its daemon thread (see the module docstring). ``timeout_s=None``
      calls in the current thread without a limit.

    With ``on_error="raise"`` the first fault raises :class:`RewardError`. With
    ``"default"`` the affected samples (all samples when the fault cannot be pinned to
    samples: timeout, wrong length, unisolated exception) get ``default_score`` and are
    counted in ``n_faults``; samples scored alone during isolation keep those scores.

    Returns:
        :class:`ScoreResult` with ``total = sum_k weight_k * score_k`` ([N] float32).

    Raises:
        RewardError: a fault with ``on_error="raise"``.
        ValueError: mismatched lengths, an empty batch, no rewards, duplicate names, or a
            column named ``prompts``/``completions``.
    """
    if on_error not in ("raise", "default"):
        raise ValueError(f"score_completions: on_error must be 'raise' or 'default', got {on_error!r}")
    if timeout_s is not None and not timeout_s > 0:
        raise ValueError(f"score_completions: timeout_s must be > 0 or None, got {timeout_s!r}")
    if not math.isfinite(default_score):
        raise ValueError(f"score_completions: default_score must be finite, got {default_score}")
    if not rewards:
        raise ValueError("score_completions: no reward functions given")
    rewards = [resolve_reward(r) for r in rewards]
    _check_unique(rewards)
    n = len(completions)
    if n == 0:
        raise ValueError("score_completions: no completions to score")
    if len(prompts) != n:
        raise ValueError(f"score_completions: {len(prompts)} prompts for {n} completions")
    columns = dict(columns or {})
    for key, col in columns.items():
        if key in ("prompts", "completions"):
            raise ValueError(f"score_completions: column name {key!r} clashes with the positional argument")
        if len(col) != n:
            raise ValueError(f"score_completions: column {key!r} has {len(col)} values for {n} completions")

    per_function: dict[str, torch.Tensor] = {}
    n_faults: dict[str, int] = {}
    total = torch.zeros(n, dtype=torch.float64)
    for reward in rewards:
        values, faults = _evaluate(reward, prompts, completions, columns, timeout_s, on_error == "raise")
        if faults and on_error == "raise":
            f = faults[0]
            raise RewardError(f.message, function=reward.name, sample_index=f.index) from f.cause
        filled = [default_score if v is None else v for v in values]
        n_faults[reward.name] = sum(v is None for v in values)
        scores = torch.tensor(filled, dtype=torch.float64)
        per_function[reward.name] = scores.to(torch.float32)
        total += reward.weight * scores
    return ScoreResult(total=total.to(torch.float32), per_function=per_function, n_faults=n_faults)
