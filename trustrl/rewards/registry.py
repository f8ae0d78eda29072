"""Resolving reward specifications to functions, and scoring completions with them safely.

A reward is named in a config as a :class:`RewardSpec` (a built-in name or a
``"module:function"`` path, a weight, keyword arguments, an optional alias for logs), or
handed over from Python as a callable, ``(fn, weight)``, ``Reward(fn, weight=, name=)`` or a
spec whose ``name`` is the function (see :mod:`trustrl.config.rewards`).
:func:`resolve_reward` turns any of them into a :class:`NamedReward`; :func:`score_completions`
calls each one on a batch and checks what comes back before anything reaches the advantage
computation.

What a reward function receives (the full signature)::

    def my_reward(prompts, completions, *, completion_ids, completion_lengths,
                  completion_messages, step, answer, **columns) -> list[float]: ...

* ``prompts``: the prompt texts as the model saw them (chat template applied), one per
  completion; ``completions``: the decoded completion texts.
* ``raw_prompts``: the dataset's prompts before formatting (a string or a list of chat
  messages), one per completion: for a scorer that formats them its own way (a reward model
  formats them as in its training, :mod:`trustrl.rewards.reward_model`). Not given to
  multi-turn agent rewards.
* ``completion_ids``: the sampled token ids of each completion (EOS included when sampled, no
  padding); ``completion_lengths``: their counts.
* ``completion_messages``: ``[{"role": "assistant", "content": text}]`` per completion, given
  when the dataset's prompts are conversations (``None`` for a row whose prompt is text).
* ``step``: the training step whose batch is scored (1-based; in held-out evaluation, the
  number of steps done).
* every other dataset column (``answer``, ``tests``, ...), aligned with ``completions``.

A function receives only the keyword arguments it declares, or all of them with
``**kwargs``, so ``fn(prompts, completions, **columns)`` keeps working. One that declares a
parameter named ``completions`` is called by keyword (TRL's ``fn(completions, **kwargs)``
works); otherwise ``prompts`` and ``completions`` are its first two positional arguments. A
declared argument without a default is a requirement: a column the dataset lacks is refused
before any model loads (:meth:`NamedReward.missing`); built-ins declare theirs in
``fn.required_columns``. ``async def`` functions are awaited concurrently with the batch's
other async rewards (``asyncio.gather``), under the same time limit and fault policy.

Time limits and the fault policy are :mod:`trustrl.calls` (daemon worker threads, abandoned
when they overrun; see there). A reward function that relies on being in the main thread
(``signal.alarm``) must not do so when called with a timeout -- see
:func:`trustrl.rewards.rules.math_equivalence_reward`.
"""

from __future__ import annotations

import importlib
import inspect
import math
import numbers
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from trustrl.calls import CallTimeout, FunctionFault, Outcome, call_with_limit, gather_with_limit, is_async_callable
from trustrl.config.rewards import Reward, RewardSpec, callable_path
from trustrl.errors import UserError
from trustrl.rewards import rules

__all__ = [
    "BUILTIN_REWARDS",
    "BATCH_ARGUMENTS",
    "check_unique_names",
    "NamedReward",
    "Reward",
    "RewardError",
    "RewardSpec",
    "RewardSpecError",
    "ScoreResult",
    "register_reward",
    "resolve_reward",
    "resolve_rewards",
    "score_completions",
    "to_spec",
]

RewardFn = Callable[..., Any]

#: Arguments the trainers pass besides the dataset columns; a dataset column may not use these names.
BATCH_ARGUMENTS = ("prompts", "completions", "raw_prompts", "completion_ids", "completion_lengths",
                   "completion_messages", "step")


class RewardError(FunctionFault):
    """A reward function failed, returned the wrong number of values, a non-number, NaN/inf,
    or ran past its time limit.

    Attributes:
        function: the reward's name.
        sample_index: the index of the sample at fault within the batch, or ``None`` when
            the fault is not attributable to one sample.
    """


class RewardSpecError(UserError, ValueError):
    """A reward that cannot be used as given: unknown name, import failure, bad kwargs, a
    signature it cannot be called with, a column the dataset lacks."""


@dataclass(frozen=True)
class CallPlan:
    """How a reward function is called, read once from its signature.

    Attributes:
        keyword: it declares ``completions`` and is called with keywords only.
        accepts_all: it takes ``**kwargs`` (or its signature is unknown): every argument.
        names: the keyword arguments it declares (in positional mode, besides the first two).
        required: those of ``names`` without a default.
        is_async: an ``async def`` function (awaited).
    """

    keyword: bool
    accepts_all: bool
    names: frozenset[str]
    required: frozenset[str]
    is_async: bool


def call_plan(fn: RewardFn, name: str) -> CallPlan:
    """Read :class:`CallPlan` from ``inspect.signature(fn)``."""
    is_async = is_async_callable(fn)
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # no signature (some builtins): the old contract, everything
        return CallPlan(False, True, frozenset(), frozenset(), is_async)
    P = inspect.Parameter
    accepts_all = any(p.kind is P.VAR_KEYWORD for p in params)
    by_name = {p.name: p for p in params if p.kind in (P.POSITIONAL_OR_KEYWORD, P.KEYWORD_ONLY)}
    keyword = "completions" in by_name
    if not keyword:
        positional = [p for p in params if p.kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD)]
        if len(positional) < 2 and not any(p.kind is P.VAR_POSITIONAL for p in params):
            raise RewardSpecError(
                f"reward {name!r}: cannot be called as fn(prompts, completions, ...) nor declares a "
                f"`completions` parameter; its signature is {name}{inspect.signature(fn)}")
        for p in positional[:2]:
            by_name.pop(p.name, None)
    required = frozenset(n for n, p in by_name.items() if p.default is P.empty)
    return CallPlan(keyword, accepts_all, frozenset(by_name), required, is_async)


@dataclass(frozen=True)
class NamedReward:
    """A resolved reward: its name in logs, the function, its weight in the total, and how it
    is called (:class:`CallPlan`, read from the signature)."""

    name: str
    fn: RewardFn
    weight: float = 1.0
    plan: CallPlan | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.plan is None:
            object.__setattr__(self, "plan", call_plan(self.fn, self.name))

    def required_columns(self) -> list[str]:
        """Dataset columns this reward cannot do without: declared parameters without a
        default, and the built-in's ``fn.required_columns``, minus what the trainers pass."""
        declared = set(self.plan.required) | set(getattr(self.fn, "required_columns", ()) or ())
        return sorted(declared - set(BATCH_ARGUMENTS) - {"prompts", "completions"})

    def missing(self, available: set[str]) -> list[str]:
        """Required arguments (columns, or ``completion_messages``) not in ``available``."""
        needs = set(self.required_columns())
        if "completion_messages" in self.plan.required:
            needs.add("completion_messages")
        return sorted(needs - available)

    def arguments(self, prompts: Sequence[Any], completions: Sequence[Any], columns: Mapping[str, Any],
                  context: Mapping[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """``(args, kwargs)`` of one call: only what the function declares (all with ``**kwargs``)."""
        extra = {**columns, **context}
        plan = self.plan
        if plan.keyword:
            extra = {"prompts": list(prompts), "completions": list(completions), **extra}
        kwargs = extra if plan.accepts_all else {k: v for k, v in extra.items() if k in plan.names}
        if plan.keyword:
            return (), kwargs
        return (list(prompts), list(completions)), kwargs


# --------------------------------------------------------------------------------------------
# Built-ins
# --------------------------------------------------------------------------------------------


def _code_tests(**kwargs: Any) -> RewardFn:
    try:
        module = importlib.import_module("trustrl.rewards.code")
    except ImportError as e:
        raise RewardSpecError(
            f"built-in reward 'code_tests' needs trustrl.rewards.code, which failed to import: {e}"
        ) from e
    factory = getattr(module, "code_tests_reward", None)
    if factory is None or not callable(factory):
        raise RewardSpecError("built-in reward 'code_tests': trustrl.rewards.code has no callable 'code_tests_reward'")
    # Like every built-in, code_tests_reward is a factory: called with the spec's kwargs
    # (possibly none) it returns fn(prompts, completions, **columns).
    return factory(**kwargs)


def _reward_model(**kwargs: Any) -> RewardFn:
    """``{name: reward_model, kwargs: {path: DIR}}``: a model trained with ``trustrl train rm``."""
    if "path" not in kwargs:
        raise RewardSpecError("built-in reward 'reward_model' needs kwargs.path: the directory of a trained "
                              "reward model")
    from trustrl.rewards.reward_model import reward_model_reward

    return reward_model_reward(**kwargs)


def _judge(**kwargs: Any) -> RewardFn:
    """``{name: judge, kwargs: {path: DIR, template: ...}}``: a generative judge model
    (:func:`trustrl.rewards.judge.generative_judge_reward`)."""
    if "path" not in kwargs:
        raise ValueError("built-in reward 'judge' needs kwargs.path: the directory of the judge language model")
    from trustrl.rewards.judge import generative_judge_reward

    return generative_judge_reward(**kwargs)


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
    "judge": _judge,
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
        raise RewardSpecError(f"reward {path!r}: expected 'module:function'")
    if "<" in attr_path:  # recorded from a lambda or closure (config.yaml of a Python run)
        raise RewardSpecError(
            f"reward {path!r} was a Python lambda or closure and cannot be imported again; "
            "pass the function again from Python (reward_funcs=[...] or rewards=[{'name': fn}])")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise RewardSpecError(f"reward {path!r}: cannot import module {module_name!r}: {e}") from e
    except Exception as e:  # the module itself raised while importing
        raise RewardSpecError(f"reward {path!r}: importing module {module_name!r} raised "
                              f"{type(e).__name__}: {e}") from e
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise RewardSpecError(f"reward {path!r}: module {module_name!r} has no attribute {attr_path!r}")
        obj = getattr(obj, part)
    return obj


def to_spec(spec: Any) -> RewardSpec:
    """Any accepted form (:mod:`trustrl.config.rewards`) as a :class:`RewardSpec` (what
    ``reward_funcs=`` entries become in a trainer's config)."""
    if isinstance(spec, RewardSpec):
        return spec
    if isinstance(spec, NamedReward):
        return RewardSpec(name=spec.fn, weight=spec.weight, alias=spec.name)
    if isinstance(spec, Mapping):
        spec = dict(spec)
    elif not (isinstance(spec, (str, tuple, Reward)) or callable(spec)):
        raise RewardSpecError(f"a reward must be a name, a callable, (fn, weight), Reward(...), a mapping or a "
                              f"RewardSpec; got {type(spec).__name__}")
    from pydantic import ValidationError

    try:
        return RewardSpec.model_validate(spec)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, x['loc'])) or 'reward'}: {x['msg']}" for x in e.errors())
        raise RewardSpecError(f"invalid reward {spec!r}: {problems}") from None


def resolve_reward(spec: Any) -> NamedReward:
    """Turn any accepted form of a reward into a :class:`NamedReward`.

    * a built-in name calls the registered factory with ``kwargs``;
    * ``"module:function"`` imports the module and takes the attribute: the attribute is the
      reward function itself, unless ``kwargs`` are given, in which case it is called with
      them to build the function;
    * a callable (alone, in ``(fn, weight[, name])``, in :class:`Reward` or as a spec's
      ``name``) is the reward function itself, or its factory when ``kwargs`` are given; its
      name in logs is ``alias`` / ``Reward.name``, else ``fn.__name__``;
    * a :class:`NamedReward` is returned unchanged.

    Raises:
        RewardSpecError (a ValueError): unknown name (the message lists the built-ins),
            import failure, invalid spec or kwargs, a factory that does not return a
            callable, a function that cannot be called with ``(prompts, completions)``.
        UserError: what a built-in's factory raises (a reward-model directory that is not
            one, a sandbox that cannot be set up).
    """
    if isinstance(spec, NamedReward):
        return spec
    spec = to_spec(spec)
    name = spec.name
    if callable(name):
        try:
            fn = name(**spec.kwargs) if spec.kwargs else name
        except (TypeError, ValueError) as e:
            raise RewardSpecError(f"reward {_callable_name(name)!r}: calling it with kwargs {spec.kwargs} "
                                  f"failed: {e}") from e
        default_name = _callable_name(name)
        shown = callable_path(name)[0]
    elif spec.note is not None:  # recorded in config.yaml from a callable that cannot be imported
        raise RewardSpecError(f"reward {name!r} was passed from Python ({spec.note}); pass the function "
                              "again from Python (reward_funcs=[...] or rewards=[{'name': fn}])")
    elif ":" in name:
        attr = _import_attr(name)
        if not callable(attr):
            raise RewardSpecError(f"reward {name!r}: attribute is a {type(attr).__name__}, not callable")
        try:
            fn = attr(**spec.kwargs) if spec.kwargs else attr
        except (TypeError, ValueError) as e:
            raise RewardSpecError(f"reward {name!r}: calling it with kwargs {spec.kwargs} failed: {e}") from e
        default_name, shown = name.partition(":")[2].rsplit(".", 1)[-1], name
    elif name in BUILTIN_REWARDS:
        try:
            fn = BUILTIN_REWARDS[name](**spec.kwargs)
        except (TypeError, ValueError) as e:
            if isinstance(e, UserError):
                raise
            raise RewardSpecError(f"reward {name!r}: invalid kwargs {spec.kwargs}: {e}") from e
        default_name = shown = name
    else:
        raise RewardSpecError(
            f"unknown reward {name!r}; built-in rewards are {sorted(BUILTIN_REWARDS)}, "
            "or give 'module:function', or pass a callable"
        )
    if not callable(fn):
        raise RewardSpecError(f"reward {shown!r}: factory returned {type(fn).__name__}, not a callable")
    return NamedReward(name=spec.alias or default_name, fn=fn, weight=float(spec.weight))


def resolve_rewards(specs: Sequence[Any]) -> list[NamedReward]:
    """:func:`resolve_reward` over a list; names must be unique (set ``alias`` to tell apart
    two uses of the same function)."""
    out = [resolve_reward(s) for s in specs]
    check_unique_names(out)
    return out


def check_unique_names(rewards: Sequence[NamedReward]) -> None:
    """Names are keys of logs and metrics: two rewards may not share one."""
    seen: set[str] = set()
    for r in rewards:
        if r.name in seen:
            raise RewardSpecError(
                f"two rewards are named {r.name!r}; name one: Reward(fn, name='...') or (fn, weight, 'name') "
                "from Python, alias: in a config")
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


class _BadOutput(Exception):
    def __init__(self, message: str, index: int | None) -> None:
        super().__init__(message)
        self.index = index


@dataclass
class _Fault:
    index: int | None
    message: str
    cause: BaseException | None = None


def _call(reward: NamedReward, prompts: Sequence[Any], completions: Sequence[Any], columns: Mapping[str, Any],
          context: Mapping[str, Any], timeout_s: float | None) -> Any:
    """One call of ``reward`` with what it declares; raises CallTimeout past ``timeout_s``."""
    args, kwargs = reward.arguments(prompts, completions, columns, context)
    return call_with_limit(reward.fn, args, kwargs, timeout_s=timeout_s, name=reward.name)


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
    context: Mapping[str, Any],
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
            out = _call(reward, prompts[i : i + 1], completions[i : i + 1], cols, context, remaining)
        except CallTimeout:
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
    context: Mapping[str, Any],
    timeout_s: float | None,
    stop_at_first: bool,
    first: Outcome | None = None,
) -> tuple[list[float | None], list[_Fault]]:
    """Score the batch with one reward; ``first``: the batch call's outcome when it already
    ran (async rewards, gathered), else the call is made here."""
    n = len(completions)
    name = reward.name
    if first is None:
        try:
            first = Outcome(value=_call(reward, prompts, completions, columns, context, timeout_s))
        except CallTimeout:
            first = Outcome(timed_out=True)
        except Exception as e:
            first = Outcome(error=e)
    if first.timed_out:
        return [None] * n, [_Fault(None, f"reward function '{name}' exceeded timeout {float(timeout_s or 0)} s")]
    if first.error is not None:
        if not isinstance(first.error, Exception):  # pragma: no cover - KeyboardInterrupt and friends
            raise first.error
        return _isolate(reward, prompts, completions, columns, context, timeout_s, first.error, stop_at_first)
    try:
        raw = _to_values(first.value, n, name)
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
    rewards: Sequence[Any],
    prompts: Sequence[str],
    completions: Sequence[str],
    columns: Mapping[str, Sequence[Any]] | None = None,
    *,
    context: Mapping[str, Any] | None = None,
    timeout_s: float | None = 30.0,
    on_error: Literal["raise", "default"] = "raise",
    default_score: float = 0.0,
) -> ScoreResult:
    """Score ``N`` completions with every reward, check the values, and combine them.

    Each reward is called once on the whole batch with the arguments it declares (module
    docstring): ``prompts``, ``completions``, the ``columns`` (lists aligned with the
    completions: dataset columns, ``completion_ids``, ...) and the ``context`` (values for the
    whole batch, e.g. ``{"step": 3}``). ``async def`` rewards are started together and awaited
    concurrently, each within ``timeout_s``. A reward must return ``N`` finite real numbers (a
    list, tuple, or 1-D tensor/array). Faults:

    * the call raises -> the function is re-run one sample at a time (within ``timeout_s``
      in total) to find the failing sample(s); the error names the function, the sample
      index and a preview of the completion, or says the sample could not be isolated;
    * wrong number of values, or not a sequence -> names the function, expected and got;
    * a non-numeric, NaN or infinite value -> names the function and the sample index;
    * the call runs past ``timeout_s`` -> "reward function 'x' exceeded timeout 2.0 s"; the
      call is abandoned in its daemon thread (see :mod:`trustrl.calls`). ``timeout_s=None``
      calls a sync function in the current thread without a limit.

    With ``on_error="raise"`` the first fault raises :class:`RewardError`. With
    ``"default"`` the affected samples (all samples when the fault cannot be pinned to
    samples: timeout, wrong length, unisolated exception) get ``default_score`` and are
    counted in ``n_faults``; samples scored alone during isolation keep those scores.

    Example (a TRL-style function: only what it declares reaches it)::

        def brevity(completions, completion_ids, step, **kwargs):
            return [-len(ids) / 100 for ids in completion_ids]

        score_completions([Reward(brevity, weight=0.5)], prompts, completions,
                          {"completion_ids": ids}, context={"step": 1})

    Returns:
        :class:`ScoreResult` with ``total = sum_k weight_k * score_k`` ([N] float32).

    Raises:
        RewardError: a fault with ``on_error="raise"``.
        ValueError: mismatched lengths, an empty batch, no rewards, duplicate names, or a
            column named like an argument (``prompts``, ``completions``, a context key).
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
    check_unique_names(rewards)
    n = len(completions)
    if n == 0:
        raise ValueError("score_completions: no completions to score")
    if len(prompts) != n:
        raise ValueError(f"score_completions: {len(prompts)} prompts for {n} completions")
    columns = dict(columns or {})
    context = dict(context or {})
    for key, col in columns.items():
        if key in ("prompts", "completions") or key in context:
            raise ValueError(f"score_completions: column name {key!r} clashes with an argument of that name")
        if len(col) != n:
            raise ValueError(f"score_completions: column {key!r} has {len(col)} values for {n} completions")

    # async rewards: every batch call started at once and awaited together
    pending = [r for r in rewards if r.plan.is_async]
    calls = [(r.fn, *r.arguments(prompts, completions, columns, context)) for r in pending]
    gathered = dict(zip((r.name for r in pending), gather_with_limit(calls, timeout_s=timeout_s, name="rewards")))

    per_function: dict[str, torch.Tensor] = {}
    n_faults: dict[str, int] = {}
    total = torch.zeros(n, dtype=torch.float64)
    for reward in rewards:
        values, faults = _evaluate(reward, prompts, completions, columns, context, timeout_s, on_error == "raise",
                                   first=gathered.get(reward.name))
        if faults and on_error == "raise":
            f = faults[0]
            raise RewardError(f.message, function=reward.name, sample_index=f.index) from f.cause
        filled = [default_score if v is None else v for v in values]
        n_faults[reward.name] = sum(v is None for v in values)
        scores = torch.tensor(filled, dtype=torch.float64)
        per_function[reward.name] = scores.to(torch.float32)
        total += reward.weight * scores
    return ScoreResult(total=total.to(torch.float32), per_function=per_function, n_faults=n_faults)
