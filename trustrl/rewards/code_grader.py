"""The ``code_tests`` grader: test cases parsed here, plain values back from the sandbox,
verdicts decided here.

This module runs in the trainer's process and never executes model-written code. It

1. turns a row's tests into a :class:`TestPlan` (:func:`parse_tests`): a list of
   :class:`Step` s to run in the sandbox, and for each value that comes back the
   :class:`Check` that judges it. Only the *actual* side of an assert travels to the sandbox;
   the expected value stays here;
2. gives the sandbox a fixed harness program (:data:`HARNESS`) that runs the steps and sends
   back, per step, one length-prefixed JSON frame holding a plain value (``None``, ``bool``,
   ``int``, ``float``, ``str``, ``bytes``, ``complex``, and ``list``/``tuple``/``dict``/
   ``set``/``frozenset`` of those), or an error name;
3. reads those frames strictly (:func:`read_frames`: in order, one per requested step,
   nothing else, the first malformed byte ends the reading) and rebuilds the values with
   built-in types only (:func:`decode_value`), whatever the sandbox sent. A value of any
   other type, subclasses included (``namedtuple``, ``IntEnum``, a ``str`` subclass,
   ``Decimal``, ``Fraction``), is not sent: its case fails;
4. judges each value here (:func:`judge`), with the grader's own ``==``, ``<``, ``in``,
   :func:`math.isclose`, ... on built-in types, and for programs, compares stdout tokens
   (:func:`stdout_matches`).

The threat model (what this guarantees and what it does not) is in the docstring of
:mod:`trustrl.rewards.code`.

Supported assert forms (``X`` is any expression without a comparison, ``and``/``or``,
``not`` or conditional expression in it: it is evaluated in the sandbox; ``E`` is an
*expected value*: a Python literal (``ast.literal_eval``: numbers, strings, bytes, ``None``,
``True``/``False``, tuples, lists, dicts, sets, ``-1``, ``1+2j``), or ``set(E)``,
``frozenset(E)``, ``tuple(E)``, ``list(E)``, ``sorted(E)``, ``float(E)`` of one, evaluated
here):

* ``assert X OP E`` and ``assert E OP X``, ``OP`` one of ``== != < <= > >= in not in``;
  ``is`` / ``is not`` only with ``None``, ``True`` or ``False``;
* ``assert math.isclose(X, E[, rel_tol=E][, abs_tol=E])`` (also ``isclose(...)``, either
  argument order);
* ``assert abs(X - E) < E`` (or ``<=``; also ``abs(E - X)``);
* ``assert X`` and ``assert not X`` (truthiness of the returned value);
* a message (``assert ..., "msg"``) is allowed and ignored.

Refused with a ``ValueError`` naming the row and line: chained comparisons, comparisons of two
expressions neither of which is an expected value, comparisons of two constants, ``is`` with
anything but the three singletons, and asserts nested in ``for``/``if``/``def``/``with``
(HumanEval's ``def check(candidate)`` included): in all of these the verdict would be decided
inside the sandbox. Top-level statements other than asserts (imports, helper definitions,
assignments) run in the sandbox as set-up, in order.

stdin/stdout cases (competitive-programming style, as APPS and DeepSeek-R1's code rewards):
``{"inputs": [str, ...], "outputs": [str, ...]}`` (also as a JSON string), or
``[{"input": str, "output": str}, ...]``. Each input runs the program afresh; the outputs
match when, after dropping blank lines and splitting each line on whitespace, the two have
the same lines of the same tokens, where two tokens that are both decimal numbers may differ
by ``numeric_tolerance`` (relative or absolute, :func:`math.isclose`), and the program exited
with status 0.
"""

from __future__ import annotations

import ast
import json
import math
import operator
import re
from dataclasses import dataclass
from typing import Any, Callable

__all__ = [
    "HARNESS",
    "Check",
    "Outcome",
    "Step",
    "TestPlan",
    "case_passes",
    "decode_value",
    "judge",
    "parse_tests",
    "read_frames",
    "stdout_matches",
]

#: Largest frame the grader accepts (bytes of JSON); the whole channel is capped by the caller.
MAX_FRAME_BYTES = 32 << 20
#: Deepest nesting of a value sent back (deeper values are refused as malformed).
MAX_DEPTH = 100


# --------------------------------------------------------------------------------------------
# the plan


@dataclass(frozen=True)
class Check:
    """How the grader judges the value that comes back for one step.

    ``kind``: ``"compare"`` (``op`` between the actual value and ``expected``; the actual
    value is on the left iff ``actual_left``), ``"truthy"`` (``bool(actual) == expected``),
    ``"isclose"`` (:func:`math.isclose` with ``rel_tol``/``abs_tol``), ``"absdiff"``
    (``abs(actual - expected) op tol``, ``op`` ``<`` or ``<=``) or ``"stdout"`` (the
    program's output against ``expected`` text, :func:`stdout_matches` with ``tol``).
    """

    kind: str
    expected: Any = None
    op: str = "=="
    actual_left: bool = True
    rel_tol: float = 1e-9
    abs_tol: float = 0.0
    tol: float | None = None


@dataclass(frozen=True)
class Step:
    """One unit of work in the sandbox, answered by exactly one frame.

    ``kind``: ``"exec"`` (a set-up statement; its frame says only whether it raised),
    ``"eval"`` (an expression whose value comes back) or ``"run"`` (the program, run afresh
    with ``payload`` as stdin; its stdout comes back). ``case``: index of the test case the
    step belongs to (``None``: uncounted set-up). ``check``: how to judge the value (``None``
    for ``exec``). ``where``: for messages.
    """

    kind: str
    payload: str
    case: int | None
    check: Check | None
    where: str


@dataclass(frozen=True)
class TestPlan:
    """The steps for one row, in order, and the number of counted test cases."""

    mode: str  # "call" (asserts on functions) or "stdio" (programs on stdin/stdout)
    steps: tuple[Step, ...]
    n_cases: int


# --------------------------------------------------------------------------------------------
# parsing the tests (trusted text from the dataset; nothing here runs it)

_OPS: dict[type, tuple[str, Callable[[Any, Any], Any]]] = {
    ast.Eq: ("==", operator.eq), ast.NotEq: ("!=", operator.ne),
    ast.Lt: ("<", operator.lt), ast.LtE: ("<=", operator.le),
    ast.Gt: (">", operator.gt), ast.GtE: (">=", operator.ge),
    ast.Is: ("is", operator.is_), ast.IsNot: ("is not", operator.is_not),
    ast.In: ("in", lambda a, b: a in b), ast.NotIn: ("not in", lambda a, b: a not in b),
}
_OP_FN = {name: fn for name, fn in _OPS.values()}
_SAFE_CONSTRUCTORS: dict[str, Callable[..., Any]] = {
    "set": set, "frozenset": frozenset, "tuple": tuple, "list": list, "sorted": sorted,
    "float": float,
}


class _NotExpected(Exception):
    """The expression is not an expected value the grader can evaluate itself."""


def _expected_value(node: ast.expr) -> Any:
    """Value of ``node`` if it is a literal or a safe constructor of one; else _NotExpected."""
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        pass
    try:
        # displays holding safe calls, e.g. (1, frozenset({3})): built element by element
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)) and not any(
                isinstance(e, ast.Starred) for e in node.elts):
            items = [_expected_value(e) for e in node.elts]
            return {ast.Tuple: tuple, ast.List: list, ast.Set: set}[type(node)](items)
        if isinstance(node, ast.Dict) and None not in node.keys:
            return {_expected_value(k): _expected_value(v)
                    for k, v in zip(node.keys, node.values)}  # type: ignore[arg-type]
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id in _SAFE_CONSTRUCTORS and not node.keywords
                and len(node.args) <= 1
                and not any(isinstance(a, ast.Starred) for a in node.args)):
            args = [_expected_value(a) for a in node.args]
            return _SAFE_CONSTRUCTORS[node.func.id](*args)
    except (TypeError, ValueError, OverflowError) as e:  # sorted([1, "a"]), {[1]: 2}, ...
        raise _NotExpected(f"{ast.unparse(node)} raises {type(e).__name__}") from None
    raise _NotExpected(ast.unparse(node))


def _is_expected(node: ast.expr) -> bool:
    try:
        _expected_value(node)
    except _NotExpected:
        return False
    return True


def _refuse(where: str, node: ast.AST, why: str) -> ValueError:
    text = ast.unparse(node)
    if len(text) > 120:
        text = text[:117] + "..."
    return ValueError(f"{where}: {text!r}: {why}")


def _sandbox_side(node: ast.expr, where: str, whole: ast.AST) -> str:
    """Source of the expression evaluated in the sandbox; refuses forms that would decide the
    verdict there (the comparison must be the assert's top level, done by the grader)."""
    for sub in ast.walk(node):
        if isinstance(sub, (ast.Compare, ast.BoolOp, ast.IfExp)) or (
                isinstance(sub, ast.UnaryOp) and isinstance(sub.op, ast.Not)):
            raise _refuse(where, whole, "a comparison, and/or, not or if-else inside the tested "
                                        "expression would be decided in the sandbox; put one "
                                        "comparison with an expected value at the top: "
                                        "assert f(x) == <literal>")
    if _is_expected(node):
        raise _refuse(where, whole, "asserts a constant: nothing from the solution is tested")
    return ast.unparse(node)


def _number(node: ast.expr, where: str, whole: ast.AST, what: str) -> int | float:
    try:
        v = _expected_value(node)
    except _NotExpected:
        v = None
    if type(v) not in (int, float):
        raise _refuse(where, whole, f"{what} must be a number literal")
    return v  # an int stays an int: no rounding of large ones


def _isclose_parts(call: ast.Call, where: str) -> tuple[str, Check] | None:
    f = call.func
    named = (isinstance(f, ast.Attribute) and f.attr == "isclose"
             and isinstance(f.value, ast.Name) and f.value.id == "math") or (
        isinstance(f, ast.Name) and f.id == "isclose")
    if not named:
        return None
    if len(call.args) != 2 or any(isinstance(a, ast.Starred) for a in call.args):
        raise _refuse(where, call, "isclose needs exactly two positional arguments")
    tols = {"rel_tol": 1e-9, "abs_tol": 0.0}
    for kw in call.keywords:
        if kw.arg not in tols:
            raise _refuse(where, call, f"isclose keyword {kw.arg!r} is not rel_tol or abs_tol")
        tols[kw.arg] = _number(kw.value, where, call, kw.arg)
    a, b = call.args
    left_expected, right_expected = _is_expected(a), _is_expected(b)
    if left_expected == right_expected:
        raise _refuse(where, call, "isclose needs one tested expression and one expected "
                                   "number literal")
    actual, expected = (b, a) if left_expected else (a, b)
    exp = _number(expected, where, call, "the expected value")
    return _sandbox_side(actual, where, call), Check("isclose", exp, rel_tol=tols["rel_tol"],
                                                     abs_tol=tols["abs_tol"])


def _absdiff_parts(cmp: ast.Compare, where: str) -> tuple[str, Check] | None:
    left = cmp.left
    if not (len(cmp.ops) == 1 and isinstance(cmp.ops[0], (ast.Lt, ast.LtE))
            and isinstance(left, ast.Call) and isinstance(left.func, ast.Name)
            and left.func.id == "abs" and len(left.args) == 1 and not left.keywords
            and isinstance(left.args[0], ast.BinOp) and isinstance(left.args[0].op, ast.Sub)):
        return None
    a, b = left.args[0].left, left.args[0].right
    left_expected, right_expected = _is_expected(a), _is_expected(b)
    if left_expected == right_expected:
        return None  # not of the form abs(X - E): handled (refused) as a plain comparison
    actual, expected = (b, a) if left_expected else (a, b)
    exp = _number(expected, where, cmp, "the expected value")
    tol = _number(cmp.comparators[0], where, cmp, "the tolerance")
    op = "<" if isinstance(cmp.ops[0], ast.Lt) else "<="
    return _sandbox_side(actual, where, cmp), Check("absdiff", exp, op=op, tol=tol)


def _assert_parts(node: ast.Assert, where: str) -> tuple[str, Check]:
    """(expression for the sandbox, check for the grader) of one top-level assert."""
    test = node.test
    if isinstance(test, ast.Compare):
        parts = _absdiff_parts(test, where)
        if parts is not None:
            return parts
        if len(test.ops) != 1:
            raise _refuse(where, test, "chained comparison: write one assert per comparison")
        op_name, _ = _OPS[type(test.ops[0])]
        left, right = test.left, test.comparators[0]
        left_expected, right_expected = _is_expected(left), _is_expected(right)
        if left_expected and right_expected:
            raise _refuse(where, test, "compares two constants: nothing from the solution "
                                       "is tested")
        if not (left_expected or right_expected):
            raise _refuse(where, test, "neither side is an expected value the grader can "
                                       "evaluate (a literal, or set/frozenset/tuple/list/"
                                       "sorted/float of one); the grader must hold it")
        actual, expected = (right, left) if left_expected else (left, right)
        exp = _expected_value(expected)
        if op_name in ("is", "is not") and not (exp is None or exp is True or exp is False):
            raise _refuse(where, test, f"'{op_name}' is only supported with None, True or "
                                       "False; use == for values")
        return _sandbox_side(actual, where, test), Check("compare", exp, op=op_name,
                                                         actual_left=not left_expected)
    if isinstance(test, ast.Call):
        parts = _isclose_parts(test, where)
        if parts is not None:
            return parts
    if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
        return _sandbox_side(test.operand, where, test), Check("truthy", False)
    return _sandbox_side(test, where, test), Check("truthy", True)


def _python_steps(src: str, where: str, *, case: int | None) -> tuple[list[Step], int]:
    """Steps of one piece of Python test code. ``case=None``: every top-level assert is its
    own case (numbered from 0), other statements uncounted set-up. Else every step belongs
    to ``case``. Returns (steps, number of asserts)."""
    try:
        tree = ast.parse(src)
    except SyntaxError as e:
        raise ValueError(f"{where} is not valid Python: {e}") from None
    steps: list[Step] = []
    n_asserts = 0
    for node in tree.body:
        at = f"{where}, line {node.lineno}"
        if isinstance(node, ast.Assert):
            expr, check = _assert_parts(node, at)
            steps.append(Step("eval", expr, n_asserts if case is None else case, check, at))
            n_asserts += 1
            continue
        if any(isinstance(sub, ast.Assert) for sub in ast.walk(node)):
            raise _refuse(at, node, "an assert inside a for/if/def/with is run in the sandbox, "
                                    "which would decide its verdict; write top-level asserts")
        seg = ast.get_source_segment(src, node) or ast.unparse(node)
        steps.append(Step("exec", seg, case, None, at))
    return steps, n_asserts


def _stdio_plan(inputs: Any, outputs: Any, where: str, tol: float | None) -> TestPlan:
    if not isinstance(inputs, list) or not isinstance(outputs, list):
        raise ValueError(f"{where}: 'inputs' and 'outputs' must be lists of strings")
    if len(inputs) != len(outputs):
        raise ValueError(f"{where}: {len(inputs)} inputs but {len(outputs)} outputs")
    if not inputs:
        raise ValueError(f"{where}: no stdin/stdout test case")
    steps = []
    for i, (x, y) in enumerate(zip(inputs, outputs)):
        if not isinstance(x, str) or not isinstance(y, str):
            raise ValueError(f"{where}: case {i}: input and output must be strings, got "
                             f"{type(x).__name__} and {type(y).__name__}")
        steps.append(Step("run", x, i, Check("stdout", y, tol=tol), f"{where}, case {i}"))
    return TestPlan("stdio", tuple(steps), len(steps))


def parse_tests(tests: Any, where: str, *, numeric_tolerance: float | None = None) -> TestPlan:
    """The :class:`TestPlan` of one row's tests; ``ValueError`` (starting with ``where``) for
    anything the grader cannot judge itself.

    Formats: a string of Python (each top-level assert one case, other statements set-up);
    a list of strings (each one case, passed when all its asserts hold and nothing in it
    raises); a dict ``{"inputs": [...], "outputs": [...]}`` or its JSON text, or a list of
    ``{"input": ..., "output": ...}`` dicts (stdin/stdout cases; ``numeric_tolerance`` applies).
    """
    if isinstance(tests, str) and tests.lstrip().startswith("{"):
        try:
            as_json = json.loads(tests)
        except ValueError:
            as_json = None
        if isinstance(as_json, dict):
            tests = as_json
    if isinstance(tests, dict):
        keys = set(tests)
        if "fn_name" in keys:
            raise ValueError(f"{where}: call-based cases ('fn_name') are not supported; write "
                             "them as asserts, e.g. 'assert f(1, 2) == 3'")
        if keys != {"inputs", "outputs"}:
            raise ValueError(f"{where}: a dict of tests needs exactly the keys 'inputs' and "
                             f"'outputs', got {sorted(keys)}")
        return _stdio_plan(tests["inputs"], tests["outputs"], where, numeric_tolerance)
    if isinstance(tests, str):
        steps, n = _python_steps(tests, where, case=None)
        if n == 0:
            raise ValueError(f"{where}: no top-level assert: nothing the grader can check")
        return TestPlan("call", tuple(steps), n)
    if isinstance(tests, (list, tuple)) and tests and all(isinstance(t, dict) for t in tests):
        for i, t in enumerate(tests):
            if set(t) != {"input", "output"}:
                raise ValueError(f"{where}: case {i} needs exactly the keys 'input' and "
                                 f"'output', got {sorted(t)}")
        return _stdio_plan([t["input"] for t in tests], [t["output"] for t in tests], where,
                           numeric_tolerance)
    if isinstance(tests, (list, tuple)) and all(isinstance(t, str) for t in tests):
        if not tests:
            raise ValueError(f"{where} is an empty list of test cases")
        all_steps: list[Step] = []
        for i, t in enumerate(tests):
            steps, n = _python_steps(t, f"{where}, case {i}", case=i)
            if n == 0:
                raise ValueError(f"{where}, case {i}: no top-level assert: nothing the grader "
                                 "can check")
            all_steps += steps
        return TestPlan("call", tuple(all_steps), len(tests))
    raise ValueError(f"{where} must be a string of asserts, a list of strings, or stdin/stdout "
                     f"cases (a dict of 'inputs'/'outputs' or a list of 'input'/'output' "
                     f"dicts), got {type(tests).__name__}")


# --------------------------------------------------------------------------------------------
# the wire: frames from the sandbox, decoded with built-in types only


def decode_value(obj: Any, depth: int = 0) -> Any:
    """Rebuild a value from its wire form (the output of ``json.loads``); ``ValueError`` for
    anything else. JSON ``null``/``true``/``false``/numbers/strings/arrays are ``None``/
    ``bool``/``int``/``float``/``str``/``list``; a one-key object is a tag: ``{"t": [...]}``
    tuple, ``{"s": [...]}`` set, ``{"f": [...]}`` frozenset, ``{"d": [[k, v], ...]}`` dict,
    ``{"b": "hex"}`` bytes, ``{"c": [re, im]}`` complex. Everything returned is of an exact
    built-in type, so comparing it runs no code from the sandbox."""
    if depth > MAX_DEPTH:
        raise ValueError("value nested too deeply")
    t = type(obj)
    if obj is None or t in (bool, int, float, str):
        return obj
    if t is list:
        return [decode_value(x, depth + 1) for x in obj]
    if t is dict and len(obj) == 1:
        ((tag, payload),) = obj.items()
        if tag == "b" and type(payload) is str:
            return bytes.fromhex(payload)
        if type(payload) is not list:
            raise ValueError(f"tag {tag!r}: payload is not a list")
        if tag == "c" and len(payload) == 2 and all(type(x) in (int, float) for x in payload):
            return complex(payload[0], payload[1])
        items = [decode_value(x, depth + 1) for x in payload]
        try:
            if tag == "t":
                return tuple(items)
            if tag == "s":
                return set(items)
            if tag == "f":
                return frozenset(items)
            if tag == "d" and all(type(kv) is list and len(kv) == 2 for kv in items):
                return {k: v for k, v in items}
        except TypeError as e:  # unhashable element or key
            raise ValueError(str(e)) from None
        raise ValueError(f"unknown or malformed tag {tag!r}")
    raise ValueError(f"not a wire value: {t.__name__}")


@dataclass(frozen=True)
class Outcome:
    """What came back for one step: ``ok`` and its ``value`` (and ``returncode`` for a
    program run), or ``ok=False`` and an ``error`` name."""

    ok: bool
    value: Any = None
    error: str = ""
    returncode: int | None = None


def read_frames(data: bytes, steps: tuple[Step, ...] | list[Step]) -> list[Outcome]:
    """Outcomes of the first steps, parsed strictly from the channel bytes.

    Frame ``k`` is a 4-byte big-endian length and that many bytes of UTF-8 JSON: an object
    ``{"i": k, "v": value}`` (``"rc": int`` added for ``run`` steps) or ``{"i": k, "e":
    str}``. Reading stops at the first frame that is incomplete, malformed, out of order, of
    the wrong shape for its step, or past the last step: the steps without an outcome are
    failures for the caller. Nothing else is ever read from the sandbox.
    """
    out: list[Outcome] = []
    pos = 0
    for k, step in enumerate(steps):
        if len(data) - pos < 4:
            break
        n = int.from_bytes(data[pos:pos + 4], "big")
        if n > MAX_FRAME_BYTES or n > len(data) - pos - 4:
            break
        try:
            frame = json.loads(data[pos + 4:pos + 4 + n].decode("utf-8"))
        except (ValueError, RecursionError, MemoryError):
            break
        pos += 4 + n
        if type(frame) is not dict or type(frame.get("i")) is not int or frame["i"] != k:
            break
        keys = set(frame)
        if keys == {"i", "e"} and type(frame["e"]) is str:
            out.append(Outcome(False, error=frame["e"][:200]))
            continue
        want = {"i", "v", "rc"} if step.kind == "run" else {"i", "v"}
        if keys != want:
            break
        try:
            value = decode_value(frame["v"])
        except (ValueError, RecursionError, MemoryError):
            break
        if step.kind == "run":
            if type(frame["rc"]) is not int or type(value) is not str:
                break
            out.append(Outcome(True, value, returncode=frame["rc"]))
        elif step.kind == "exec":
            if value is not None:
                break
            out.append(Outcome(True))
        else:
            out.append(Outcome(True, value))
    return out


# --------------------------------------------------------------------------------------------
# judging (plain built-in values only)

_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?\Z")


def _tokens(text: str) -> list[list[str]]:
    return [line.split() for line in text.splitlines() if line.strip()]


def stdout_matches(actual: str, expected: str, tol: float | None = None) -> bool:
    """Whether a program's stdout matches the expected output: blank lines dropped, each line
    split on whitespace, same number of lines and tokens; tokens equal as text, or (with
    ``tol``) both decimal numbers within ``tol`` relative or absolute
    (``math.isclose(a, b, rel_tol=tol, abs_tol=tol)``)."""
    a_lines, e_lines = _tokens(actual), _tokens(expected)
    if len(a_lines) != len(e_lines):
        return False
    for a_line, e_line in zip(a_lines, e_lines):
        if len(a_line) != len(e_line):
            return False
        for a, e in zip(a_line, e_line):
            if a == e:
                continue
            if tol is None or not (_NUMBER.match(a) and _NUMBER.match(e)):
                return False
            try:
                if not math.isclose(float(a), float(e), rel_tol=tol, abs_tol=tol):
                    return False
            except (OverflowError, ValueError):
                return False
    return True


def judge(check: Check, outcome: Outcome) -> bool:
    """Whether one outcome passes its check. Only ever handles values of built-in types
    (:func:`decode_value`), so no comparison runs code the sandbox chose; an operation that
    raises (``<`` between a list and an int, ...) fails."""
    if not outcome.ok:
        return False
    actual = outcome.value
    try:
        if check.kind == "compare":
            left, right = (actual, check.expected) if check.actual_left else \
                (check.expected, actual)
            return bool(_OP_FN[check.op](left, right))
        if check.kind == "truthy":
            return bool(actual) is check.expected
        if check.kind == "isclose":
            return type(actual) in (int, float) and math.isclose(
                actual, check.expected, rel_tol=check.rel_tol, abs_tol=check.abs_tol)
        if check.kind == "absdiff":
            if type(actual) not in (int, float):
                return False
            diff = abs(actual - check.expected)
            return diff < check.tol if check.op == "<" else diff <= check.tol
        if check.kind == "stdout":
            return outcome.returncode == 0 and stdout_matches(actual, check.expected,
                                                              check.tol)
    except (TypeError, ValueError, OverflowError, RecursionError, MemoryError):
        return False
    raise ValueError(f"judge: unknown check kind {check.kind!r}")


def case_passes(plan: TestPlan, outcomes: list[Outcome]) -> list[bool]:
    """Per counted case: every step of it has an outcome, none raised, every check holds."""
    passed = [True] * plan.n_cases
    for k, step in enumerate(plan.steps):
        if step.case is None:
            continue
        if k >= len(outcomes) or not outcomes[k].ok or (
                step.check is not None and not judge(step.check, outcomes[k])):
            passed[step.case] = False
    return passed


# --------------------------------------------------------------------------------------------
# the harness run inside the sandbox (untrusted territory: nothing it says is believed
# beyond the plain values it sends, judged above)

HARNESS = r'''
def _trustrl_harness():
    import builtins, json, os, sys
    write, dumps = os.write, json.dumps

    def exit(code=None):  # as site.py would give (the sandbox runs python -S)
        raise SystemExit(code)
    builtins.exit = builtins.quit = exit
    spec = json.loads(sys.stdin.buffer.read().decode("utf-8"))
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    if spec["mode"] == "call":
        os.dup2(null, 1)  # the solution's prints go nowhere: nothing reads them
    os.close(null)
    chan = spec["fd"]

    def send(frame):
        data = dumps(frame).encode("utf-8")
        data = len(data).to_bytes(4, "big") + data
        while data:
            data = data[write(chan, data):]

    def enc(v, depth=0):
        if depth > 100:
            raise ValueError("nested too deeply")
        t = type(v)
        if v is None or t is bool or t is int or t is float or t is str:
            return v
        if t is list:
            return [enc(x, depth + 1) for x in v]
        if t is tuple:
            return {"t": [enc(x, depth + 1) for x in v]}
        if t is set:
            return {"s": [enc(x, depth + 1) for x in v]}
        if t is frozenset:
            return {"f": [enc(x, depth + 1) for x in v]}
        if t is dict:
            return {"d": [[enc(k, depth + 1), enc(x, depth + 1)] for k, x in v.items()]}
        if t is bytes:
            return {"b": v.hex()}
        if t is complex:
            return {"c": [v.real, v.imag]}
        raise TypeError("cannot send a value of type " + t.__name__)

    def report(i, make):
        try:
            frame = make()
        except BaseException as e:
            frame = {"i": i, "e": type(e).__name__}
        try:
            send(frame)
        except BaseException as e:
            send({"i": i, "e": "unsendable " + type(e).__name__})

    if spec["mode"] == "stdio":
        import subprocess
        cap = spec["max_stdout"]

        def run(i, text):
            path = "_stdin_%d" % i
            with open(path, "wb") as f:
                f.write(text.encode("utf-8"))
            fd = os.open(path, os.O_RDONLY)
            os.unlink(path)
            try:
                p = subprocess.Popen(spec["program"], stdin=fd, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, close_fds=True)
            finally:
                os.close(fd)
            data = p.stdout.read(cap + 1)
            if len(data) > cap:
                p.kill()
                p.wait()
                return {"i": i, "e": "output_limit"}
            p.stdout.close()
            return {"i": i, "v": data.decode("utf-8", "replace"), "rc": p.wait()}

        for i, text in enumerate(spec["steps"]):
            report(i, lambda: run(i, text))
        return

    try:
        with open("solution.py", "rb") as f:
            code = compile(f.read(), "solution.py", "exec")
    except BaseException as e:
        os.write(2, ("solution does not compile: %r\n" % (e,)).encode())
        return
    g = {"__name__": "solution", "__builtins__": __builtins__}
    try:
        exec(code, g)
    except BaseException as e:
        os.write(2, ("solution raised at import: %s\n" % type(e).__name__).encode())

    def step(i, kind, src):
        if kind == "exec":
            exec(compile(src, "<test step %d>" % i, "exec"), g)
            return {"i": i, "v": None}
        return {"i": i, "v": enc(eval(compile(src, "<test step %d>" % i, "eval"), g))}

    for i, (kind, src) in enumerate(spec["steps"]):
        report(i, lambda: step(i, kind, src))


_trustrl_harness()
'''
