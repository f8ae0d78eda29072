"""Built-in rule-based reward functions.

Every reward function has the signature::

    fn(prompts: list[str], completions: list[str], **columns) -> list[float]

where each entry of ``columns`` is a list aligned with ``completions`` (a dataset column such
as ``columns["answer"]``, or ``columns["completion_lengths"]`` -- completion lengths in
tokens -- which the trainers pass). Reward functions must accept and ignore columns they do
not use, and must score each sample independently of the others (the scorer re-runs a
failing function one sample at a time to find the sample at fault).

The public names here are *factories*: ``format_reward()`` returns the reward function.
"""

from __future__ import annotations

import logging
import math
import re
import threading
from collections.abc import Callable, Sequence
from fractions import Fraction
from typing import Any, Literal

__all__ = [
    "RewardFn",
    "exact_answer_reward",
    "extract_answer",
    "format_reward",
    "length_penalty",
    "math_equivalence_reward",
    "numeric_answer_reward",
    "parse_number",
    "soft_overlong_reward",
]

RewardFn = Callable[..., list[float]]

DEFAULT_FORMAT_PATTERN = r"^<think>.*?</think>\s*<answer>.*?</answer>$"

_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
# One number: optional sign, digits with optional "," thousands groups, optional decimals and
# exponent -- or a bare ".5". A fraction is two numbers joined by "/".
_NUM = r"[-+]?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+)?"
_NUMBER_RE = re.compile(rf"(?<![\w.])({_NUM})(?:\s*/\s*({_NUM.replace('[-+]?', '', 1)}))?")
_FULL_NUMBER_RE = re.compile(rf"({_NUM})(?:\s*/\s*({_NUM.replace('[-+]?', '', 1)}))?")


def _named(fn: RewardFn, name: str, required_columns: tuple[str, ...] = ()) -> RewardFn:
    """Name a built-in's function; ``required_columns``: the dataset columns it reads, checked
    against the dataset before any model loads (:meth:`trustrl.rewards.NamedReward.required`)."""
    fn.__name__ = name
    fn.__qualname__ = name
    fn.required_columns = tuple(required_columns)  # type: ignore[attr-defined]
    return fn


def _column(columns: dict[str, Any], name: str, fn_name: str, n: int) -> Sequence[Any]:
    if name not in columns:
        raise KeyError(
            f"{fn_name}: needs column {name!r} but the batch has columns {sorted(columns)}"
        )
    col = columns[name]
    if len(col) != n:
        raise ValueError(f"{fn_name}: column {name!r} has {len(col)} values for {n} completions")
    return col


# --------------------------------------------------------------------------------------------
# format
# --------------------------------------------------------------------------------------------


def _parse_flags(flags: int | str) -> int:
    if isinstance(flags, int):
        return flags
    value = 0
    for part in filter(None, (p.strip() for p in flags.split("|"))):
        name = part.removeprefix("re.").upper()
        flag = getattr(re, name, None)
        if not isinstance(flag, re.RegexFlag):
            raise ValueError(f"format_reward: unknown regex flag {part!r} in flags={flags!r}")
        value |= flag
    return value


def format_reward(pattern: str = DEFAULT_FORMAT_PATTERN, flags: int | str = re.DOTALL) -> RewardFn:
    """Reward 1.0 when the whitespace-stripped completion fully matches ``pattern``, else 0.0.

    Args:
        pattern: regular expression; the default requires ``<think>...</think>`` followed by
            ``<answer>...</answer>`` and nothing else.
        flags: ``re`` flags as an int, or as names such as ``"DOTALL|MULTILINE"`` (for YAML
            configs).
    """
    try:
        regex = re.compile(pattern, _parse_flags(flags))
    except re.error as err:  # not a ValueError: the registry would let it through as a traceback
        raise ValueError(f"format_reward: pattern {pattern!r} is not a valid regular expression: {err}") from err

    def fn(prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
        return [1.0 if regex.fullmatch(c.strip()) else 0.0 for c in completions]

    return _named(fn, "format")


# --------------------------------------------------------------------------------------------
# answer extraction and numbers
# --------------------------------------------------------------------------------------------


def extract_answer(
    text: str, *, fallback: Literal["last_number", "none"] = "last_number"
) -> str | None:
    """Return the stripped content of the last ``<answer>...</answer>`` in ``text``.

    Without a complete answer tag: with ``fallback="last_number"`` the last number in the
    text (as written, e.g. ``"1,234"`` or ``"3/4"``), with ``fallback="none"`` ``None``.
    ``None`` also when the fallback finds no number.
    """
    if fallback not in ("last_number", "none"):
        raise ValueError(f"extract_answer: fallback must be 'last_number' or 'none', got {fallback!r}")
    tags = _ANSWER_RE.findall(text)
    if tags:
        return tags[-1].strip()
    if fallback == "none":
        return None
    matches = list(_NUMBER_RE.finditer(text))
    return matches[-1].group(0) if matches else None


def _number_value(num: str, den: str | None) -> float | None:
    try:
        value = Fraction(num.replace(",", ""))
        if den is not None:
            d = Fraction(den.replace(",", ""))
            if d == 0:
                return None
            value /= d
    except (ValueError, ZeroDivisionError):
        return None
    return float(value)


def parse_number(text: str | int | float) -> float | None:
    """Parse one number written as ``42``, ``-3``, ``2.50``, ``1,234``, ``1e-3`` or ``3/4``.

    Surrounding whitespace, ``$`` signs and a trailing full stop are ignored. Returns
    ``None`` when ``text`` is not exactly one number (a division by zero is not a number).
    """
    if isinstance(text, bool):
        return None
    if isinstance(text, (int, float)):
        return float(text) if math.isfinite(text) else None
    s = text.strip().strip("$").strip()
    if s.endswith(".") and not s.endswith(".."):
        s = s[:-1]
    m = _FULL_NUMBER_RE.fullmatch(s)
    if m is None:
        return None
    return _number_value(m.group(1), m.group(2))


def _last_number(text: str) -> float | None:
    matches = list(_NUMBER_RE.finditer(text))
    if not matches:
        return None
    m = matches[-1]
    return _number_value(m.group(1), m.group(2))


def numeric_answer_reward(
    tolerance: float = 1e-6, answer_column: str = "answer", tag_required: bool = False
) -> RewardFn:
    """Reward 1.0 when the completion's answer equals the gold number within ``tolerance``.

    The predicted answer is the content of the last ``<answer>`` tag (if that content is not
    exactly one number, the last number inside it); without a tag, the last number in the
    completion -- or 0.0 when ``tag_required``. Numbers may be written ``1,234``, ``-3``,
    ``2.50`` or ``3/4`` (see :func:`parse_number`); the comparison is
    ``abs(pred - gold) <= tolerance``.

    Raises (per call, caught and attributed by the scorer):
        ValueError: a gold answer that is not a number, naming the sample index.
    """
    if tolerance < 0 or not math.isfinite(tolerance):
        raise ValueError(f"numeric_answer_reward: tolerance must be finite and >= 0, got {tolerance!r}")

    def fn(prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
        golds = _column(columns, answer_column, "numeric_answer_reward", len(completions))
        out: list[float] = []
        for i, (completion, gold_raw) in enumerate(zip(completions, golds)):
            gold = parse_number(gold_raw) if isinstance(gold_raw, (str, int, float)) else None
            if gold is None:
                raise ValueError(
                    f"numeric_answer_reward: gold answer {gold_raw!r} in column {answer_column!r} "
                    f"at sample {i} is not a number"
                )
            found = extract_answer(completion, fallback="none" if tag_required else "last_number")
            pred = None if found is None else parse_number(found)
            if pred is None and found is not None:
                pred = _last_number(found)
            out.append(1.0 if pred is not None and abs(pred - gold) <= tolerance else 0.0)
        return out

    return _named(fn, "numeric_answer", (answer_column,))


def exact_answer_reward(answer_column: str = "answer", tag_required: bool = True,
                        case_sensitive: bool = True) -> RewardFn:
    """Reward 1.0 when the completion's answer is exactly the gold string (both stripped).

    For answers whose form matters, where :func:`numeric_answer_reward` would accept
    ``"01"`` for ``"001"`` or ``"1.0"`` for ``"1"``. The answer is the content of the last
    ``<answer>`` tag; without a tag 0.0, or with ``tag_required=False`` the whole completion.

    Raises (per call, caught and attributed by the scorer):
        ValueError: a gold answer that is not a string or number, naming the sample index.
    """

    def norm(text: str) -> str:
        return text.strip() if case_sensitive else text.strip().lower()

    def fn(prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
        golds = _column(columns, answer_column, "exact_answer_reward", len(completions))
        out: list[float] = []
        for i, (completion, gold) in enumerate(zip(completions, golds)):
            if isinstance(gold, bool) or not isinstance(gold, (str, int)):
                raise ValueError(f"exact_answer_reward: gold answer {gold!r} in column {answer_column!r} "
                                 f"at sample {i} is not a string")
            found = extract_answer(completion, fallback="none")
            if found is None and not tag_required:
                found = completion
            out.append(1.0 if found is not None and norm(found) == norm(str(gold)) else 0.0)
        return out

    return _named(fn, "exact_answer", (answer_column,))


# --------------------------------------------------------------------------------------------
# math equivalence (math_verify)
# --------------------------------------------------------------------------------------------


def _mv_parse(text: str, timeout: int | None) -> list[Any]:
    from math_verify import parse

    parsed = parse(text, parsing_timeout=timeout)  # type: ignore[arg-type]
    if not parsed and "$" not in text and "\\boxed" not in text:
        # math_verify's LaTeX extraction looks for $...$ / \boxed{}; a bare "\frac{1}{2}" or
        # "x+1" only parses once delimited.
        parsed = parse(f"${text}$", parsing_timeout=timeout)  # type: ignore[arg-type]
    return list(parsed)


class _NoTimeoutNotice(logging.Filter):
    """Drops math_verify's "Timeout is disabled ... you must provide the logic for timeout
    interruption yourself" record: outside the main thread trustrl passes no timeout on purpose
    and the scorer's own time limit bounds the call (see :func:`math_equivalence_reward`), so
    the notice would only tell a user to do what is already done."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


_NO_TIMEOUT_NOTICE = _NoTimeoutNotice()


def _quiet_math_verify_timeout_notice() -> None:
    for name in ("math_verify.parser", "math_verify.grader"):
        log = logging.getLogger(name)
        if _NO_TIMEOUT_NOTICE not in log.filters:
            log.addFilter(_NO_TIMEOUT_NOTICE)


def math_equivalence_reward(
    answer_column: str = "answer", tag_required: bool = False, timeout_s: int | None = 5
) -> RewardFn:
    """Reward 1.0 when the completion's answer is mathematically equal to the gold answer.

    Uses ``math_verify.parse`` on both sides and ``math_verify.verify(gold, pred)``, so
    ``\\frac{1}{2}``, ``0.5``, ``1/2`` and ``$\\dfrac12$`` are all equal. The prediction is
    the content of the last ``<answer>`` tag; without one, the whole completion is handed to
    math_verify (which finds the last ``\\boxed{}`` / LaTeX / number), or 0.0 when
    ``tag_required``. A string that does not parse bare is retried wrapped in ``$...$``.

    Threads and timeouts (math_verify 0.9): ``parse``/``verify`` guard each step with
    ``signal.alarm``, which only works in the main thread; called from another thread with a
    timeout they raise ``ValueError("... doesn't support threaded environment ...")``. This
    function therefore uses math_verify's own timeout (``timeout_s`` whole seconds) only in
    the main thread and passes ``parsing_timeout=None`` / ``timeout_seconds=None`` elsewhere.
    :func:`trustrl.rewards.score_completions` runs reward functions in a worker thread with
    its own time limit, which then bounds a runaway sympy computation instead.

    Raises (per call, caught and attributed by the scorer):
        ValueError: a gold answer math_verify cannot parse, naming the sample index -- it
            would otherwise score every completion 0.0 silently.
    """
    if timeout_s is not None and (not isinstance(timeout_s, int) or timeout_s <= 0):
        raise ValueError(
            f"math_equivalence_reward: timeout_s must be a positive int (signal.alarm takes whole seconds) or None, got {timeout_s!r}"
        )
    _quiet_math_verify_timeout_notice()

    def fn(prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
        from math_verify import verify

        golds = _column(columns, answer_column, "math_equivalence_reward", len(completions))
        timeout = timeout_s if threading.current_thread() is threading.main_thread() else None
        gold_cache: dict[str, list[Any]] = {}
        out: list[float] = []
        for i, (completion, gold_raw) in enumerate(zip(completions, golds)):
            gold_text = str(gold_raw).strip() if gold_raw is not None else ""
            if gold_text not in gold_cache:
                gold_cache[gold_text] = _mv_parse(gold_text, timeout) if gold_text else []
            gold = gold_cache[gold_text]
            if not gold:
                raise ValueError(
                    f"math_equivalence_reward: gold answer {gold_raw!r} in column {answer_column!r} "
                    f"at sample {i} cannot be parsed by math_verify"
                )
            found = extract_answer(completion, fallback="none")
            if found is None:
                if tag_required:
                    out.append(0.0)
                    continue
                found = completion
            pred = _mv_parse(found, timeout) if found.strip() else []
            ok = bool(pred) and verify(gold, pred, timeout_seconds=timeout)
            out.append(1.0 if ok else 0.0)
        return out

    return _named(fn, "math_equivalence", (answer_column,))


# --------------------------------------------------------------------------------------------
# length shaping
# --------------------------------------------------------------------------------------------


def _lengths(columns: dict[str, Any], fn_name: str, n: int) -> list[int]:
    if "completion_lengths" not in columns:
        raise KeyError(
            f"{fn_name}: needs column 'completion_lengths' (completion length in tokens, passed "
            f"by the trainers) but the batch has columns {sorted(columns)}"
        )
    col = _column(columns, "completion_lengths", fn_name, n)
    return [int(x) for x in col]


def length_penalty(
    target_length: int, coef: float = 0.001, unit: Literal["chars", "words", "tokens"] = "chars"
) -> RewardFn:
    """Penalty ``-coef * max(0, L - target_length)`` for completions longer than the target.

    ``L`` is counted in ``unit``: ``"chars"`` (``len(completion)``), ``"words"``
    (whitespace-separated) or ``"tokens"`` (the ``completion_lengths`` column).
    """
    if unit not in ("chars", "words", "tokens"):
        raise ValueError(f"length_penalty: unit must be 'chars', 'words' or 'tokens', got {unit!r}")
    if target_length < 0:
        raise ValueError(f"length_penalty: target_length must be >= 0, got {target_length}")

    def fn(prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
        if unit == "tokens":
            lengths = _lengths(columns, "length_penalty", len(completions))
        elif unit == "words":
            lengths = [len(c.split()) for c in completions]
        else:
            lengths = [len(c) for c in completions]
        return [-coef * max(0, n - target_length) for n in lengths]

    return _named(fn, "length_penalty")


def soft_overlong_reward(max_len: int, cache_len: int) -> RewardFn:
    """DAPO's soft overlong punishment (Yu et al. 2025, "DAPO", eq. 13), lengths in tokens.

    With ``L`` the completion length (column ``completion_lengths``)::

        R(L) = 0                                   if L <= max_len - cache_len
               ((max_len - cache_len) - L) / cache_len   if max_len - cache_len < L <= max_len
               -1                                  if L > max_len

    so the penalty ramps linearly from 0 to -1 across the last ``cache_len`` tokens.
    """
    if cache_len <= 0 or max_len <= 0 or cache_len > max_len:
        raise ValueError(
            f"soft_overlong_reward: need 0 < cache_len <= max_len, got max_len={max_len}, cache_len={cache_len}"
        )
    free = max_len - cache_len

    def fn(prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
        out: list[float] = []
        for n in _lengths(columns, "soft_overlong_reward", len(completions)):
            if n <= free:
                out.append(0.0)
            elif n <= max_len:
                out.append((free - n) / cache_len)
            else:
                out.append(-1.0)
        return out

    return _named(fn, "soft_overlong")
