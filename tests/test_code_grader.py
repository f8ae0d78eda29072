"""Tests for the ``code_tests`` grader (:mod:`trustrl.rewards.code_grader`) and the reward.

Two halves. The grader's pure parts (splitting asserts, the wire format, the judgement) are
checked against values worked out by hand in comments, and the wire format against a second,
independent encoder written here (hypothesis). Then end to end in the real sandbox: a correct
solution scores 1 in every test format, and hostile solutions that try to forge verdicts
(always-equal objects, ``str``/``int`` subclasses, patched builtins / ``AssertionError`` /
``compile`` / ``exec`` / ``sys.modules``, reading the harness's frames, ``gc`` and fds and
writing forged verdicts everywhere, exiting before the tests, forking a child that answers
after the parent exits, sabotaging the channel) each score 0 and leave no process behind.

The hostile tests use cases whose expected values are all different, so that a solution
returning one constant could pass at most one case; none of the hostile programs here
returns a right value, so each must score exactly 0.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trustrl.rewards import code as sandbox_mod
from trustrl.rewards.code import code_tests_reward
from trustrl.rewards.code_grader import (
    Check,
    Outcome,
    Step,
    case_passes,
    decode_value,
    judge,
    parse_tests,
    read_frames,
    stdout_matches,
)

W = "row 0"


def frame(obj) -> bytes:
    data = json.dumps(obj).encode()
    return len(data).to_bytes(4, "big") + data


# ------------------------------------------------------------------------------------------
# splitting asserts into (expression for the sandbox, check for the grader)


def test_assert_forms_are_split_as_worked_by_hand():
    src = (
        "import math\n"                                      # line 1: set-up, uncounted
        "assert f(2, 3) == 5\n"                              # 2: case 0
        "assert 5 == f(2, 3), 'message ignored'\n"           # 3: case 1, expected on the left
        "assert f(1) in (1, 2)\n"                            # 4: case 2
        "assert 3 not in f(0)\n"                             # 5: case 3, literal on the left
        "assert f(0) is None\n"                              # 6: case 4
        "assert math.isclose(f(1.5), 2.25, rel_tol=1e-3)\n"  # 7: case 5
        "assert abs(0.5 - f(2)) <= 1e-9\n"                   # 8: case 6, abs(E - X)
        "assert not f(3)\n"                                  # 9: case 7
        "assert set(f(4)) == set((4, 5))\n"                  # 10: case 8, expected built here
        "assert f(-1) == -1.5\n"                             # 11: case 9
        "assert f('x') >= float('inf')\n"                    # 12: case 10
        "assert f([1, {'a': b'z'}])\n"                       # 13: case 11, truthiness
    )
    plan = parse_tests(src, W)
    assert plan.mode == "call" and plan.n_cases == 12
    got = [(s.kind, s.payload, s.case, s.check) for s in plan.steps]
    assert got == [
        ("exec", "import math", None, None),
        ("eval", "f(2, 3)", 0, Check("compare", 5, "==", True)),
        ("eval", "f(2, 3)", 1, Check("compare", 5, "==", False)),
        ("eval", "f(1)", 2, Check("compare", (1, 2), "in", True)),
        ("eval", "f(0)", 3, Check("compare", 3, "not in", False)),
        ("eval", "f(0)", 4, Check("compare", None, "is", True)),
        ("eval", "f(1.5)", 5, Check("isclose", 2.25, rel_tol=1e-3, abs_tol=0.0)),
        ("eval", "f(2)", 6, Check("absdiff", 0.5, "<=", tol=1e-9)),
        ("eval", "f(3)", 7, Check("truthy", False)),
        ("eval", "set(f(4))", 8, Check("compare", {4, 5}, "==", True)),
        ("eval", "f(-1)", 9, Check("compare", -1.5, "==", True)),
        ("eval", "f('x')", 10, Check("compare", math.inf, ">=", True)),
        ("eval", "f([1, {'a': b'z'}])", 11, Check("truthy", True)),
    ]
    assert plan.steps[1].where == "row 0, line 2"


def test_list_of_cases_keeps_set_up_inside_its_case():
    plan = parse_tests(["x = [3, 1]\nassert g(x) == 4", "assert g([]) == 0"], W)
    # case 0 = a set-up step and a check (both must succeed); case 1 = one check
    assert [(s.kind, s.payload, s.case) for s in plan.steps] == [
        ("exec", "x = [3, 1]", 0), ("eval", "g(x)", 0), ("eval", "g([])", 1)]
    assert plan.n_cases == 2


@pytest.mark.parametrize("tests, message", [
    ("assert f(1) == g(1)", "neither side is an expected value"),
    ("assert 1 == 1", "compares two constants"),
    ("assert 0 < f(1) < 5", "chained comparison"),
    ("assert f(1) is 3", "only supported with None, True or False"),
    ("assert (f(1) == 3) == True", "decided in the sandbox"),
    ("assert all(f(x) == x for x in range(3))", "decided in the sandbox"),
    ("assert f(1) and f(2)", "decided in the sandbox"),
    ("assert not f(1) == 3", "decided in the sandbox"),
    ("assert [f(1) if True else 0] == [3]", "decided in the sandbox"),
    ("assert True", "asserts a constant"),
    ("for x in range(3):\n    assert f(x) == x", "line 1: .*inside a for/if/def/with"),
    ("def check(candidate):\n    assert candidate(1) == 2\ncheck(f)", "inside a for/if/def"),
    ("x = f(1)\nprint(x)", "no top-level assert"),
    ("assert math.isclose(f(1), g(2))", "one tested expression and one expected"),
    ("assert math.isclose(f(1), 2.0, rtol=1)", "keyword 'rtol'"),
    ("assert math.isclose(f(1), 'a')", "expected value must be a number"),
    ("assert abs(f(1) - 2) < 'x'", "tolerance must be a number"),
    ("assert f(", "row 0 is not valid Python"),
    (["assert f(1) == 1", "y = 2"], "row 0, case 1: no top-level assert"),
    ([], "empty list"),
    (42, "must be a string of asserts.*got int"),
    ({"inputs": ["1"], "outputs": ["1"], "fn_name": "f"}, "'fn_name'.*not supported"),
    ({"inputs": ["1"]}, "exactly the keys 'inputs' and 'outputs'"),
    ({"inputs": ["1", "2"], "outputs": ["1"]}, "2 inputs but 1 outputs"),
    ({"inputs": [], "outputs": []}, "no stdin/stdout test case"),
    ({"inputs": [1], "outputs": ["1"]}, "case 0: input and output must be strings"),
    ([{"input": "1", "expected": "1"}], "case 0 needs exactly the keys 'input' and 'output'"),
])
def test_forms_the_grader_cannot_judge_are_refused_by_name(tests, message):
    with pytest.raises(ValueError, match=message):
        parse_tests(tests, W)


def test_stdio_formats_parse_alike():
    a = parse_tests({"inputs": ["1 2\n", "3 4\n"], "outputs": ["3\n", "7\n"]}, W,
                    numeric_tolerance=0.5)
    b = parse_tests(json.dumps({"inputs": ["1 2\n", "3 4\n"], "outputs": ["3\n", "7\n"]}), W,
                    numeric_tolerance=0.5)
    c = parse_tests([{"input": "1 2\n", "output": "3\n"}, {"input": "3 4\n", "output": "7\n"}],
                    W, numeric_tolerance=0.5)
    assert a == b == c
    assert a.mode == "stdio" and a.n_cases == 2
    assert a.steps[1] == Step("run", "3 4\n", 1, Check("stdout", "7\n", tol=0.5), "row 0, case 1")


# ------------------------------------------------------------------------------------------
# the wire format


def test_decode_value_by_hand():
    text = ('[null, true, 3, 2.5, "s", {"t": [1, {"s": [2, 3]}]}, {"f": []}, '
            '{"d": [["k", {"b": "6869"}], [{"t": [1, 2]}, {"c": [1, -2.0]}]]}, NaN]')
    v = decode_value(json.loads(text))
    assert v[:8] == [None, True, 3, 2.5, "s", (1, {2, 3}), frozenset(),
                     {"k": b"hi", (1, 2): complex(1, -2)}]
    assert math.isnan(v[8])
    assert [type(x) for x in v] == [type(None), bool, int, float, str, tuple, frozenset, dict,
                                    float]


@pytest.mark.parametrize("text", [
    '{"x": [1]}',                 # unknown tag
    '{"t": [1], "s": [2]}',       # two keys: not a tag
    '{"s": [[1, 2]]}',            # a list is not hashable: no set of it
    '{"d": [[[1], 2]]}',          # nor a dict key
    '{"d": [[1, 2, 3]]}',         # a dict item is a pair
    '{"b": "zz"}',                # not hex
    '{"c": [1, "2"]}',            # complex of a string
    '{"c": [true, 0]}',           # bool is not a number here
    '{"t": 5}',                   # payload not a list
    "[" * 150 + "]" * 150,        # nested too deeply
])
def test_decode_value_refuses_everything_else(text):
    with pytest.raises(ValueError):
        decode_value(json.loads(text))


def _wire(v):
    """A second encoder, written from decode_value's docstring (not from the harness)."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, list):
        return [_wire(x) for x in v]
    if isinstance(v, tuple):
        return {"t": [_wire(x) for x in v]}
    if isinstance(v, frozenset):
        return {"f": [_wire(x) for x in v]}
    if isinstance(v, set):
        return {"s": [_wire(x) for x in v]}
    if isinstance(v, dict):
        return {"d": [[_wire(k), _wire(x)] for k, x in v.items()]}
    if isinstance(v, bytes):
        return {"b": v.hex()}
    if isinstance(v, complex):
        return {"c": [v.real, v.imag]}
    raise TypeError(type(v))


def _same(a, b) -> bool:
    """Equal and of the same types all the way down."""
    if type(a) is not type(b):
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a) and \
            sorted(type(k).__name__ for k in a) == sorted(type(k).__name__ for k in b)
    if isinstance(a, (set, frozenset)):
        return a == b and sorted(type(x).__name__ for x in a) == \
            sorted(type(x).__name__ for x in b)
    return a == b


_hashable = st.one_of(st.integers(), st.text(max_size=5),
                      st.tuples(st.integers(), st.text(max_size=3)))
_leaves = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=8),
                    st.floats(allow_nan=False), st.binary(max_size=8),
                    st.complex_numbers(allow_nan=False, allow_infinity=False))
_values = st.recursive(
    _leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.lists(inner, max_size=4).map(tuple),
        st.sets(_hashable, max_size=4), st.frozensets(_hashable, max_size=4),
        st.dictionaries(_hashable, inner, max_size=4)),
    max_leaves=20)


@settings(max_examples=200, deadline=None)
@given(_values)
def test_wire_round_trip_property(value):
    assert _same(decode_value(json.loads(json.dumps(_wire(value)))), value)


def test_read_frames_is_strict_and_in_order():
    steps = [Step("exec", "import math", None, None, "l1"),
             Step("eval", "f(1)", 0, Check("compare", 1), "l2"),
             Step("eval", "f(2)", 1, Check("compare", 2), "l3")]
    good = frame({"i": 0, "v": None}) + frame({"i": 1, "v": 1}) + frame({"i": 2, "e": "KeyError"})
    assert read_frames(good, steps) == [Outcome(True), Outcome(True, 1),
                                        Outcome(False, error="KeyError")]
    # surplus frames after the last step are never read
    assert len(read_frames(good + frame({"i": 3, "v": 2}), steps)) == 3
    # each of these ends the reading where it occurs:
    cases = {
        "out of order": (frame({"i": 0, "v": None}) + frame({"i": 2, "v": 2}), 1),
        "index True (== 1)": (frame({"i": 0, "v": None}) + frame({"i": True, "v": 1}), 1),
        "repeated index": (frame({"i": 0, "v": None}) + frame({"i": 0, "v": None}), 1),
        "exec step with a value": (frame({"i": 0, "v": 7}), 0),
        "extra key": (frame({"i": 0, "v": None}) + frame({"i": 1, "v": 1, "pass": True}), 1),
        "truncated": (frame({"i": 0, "v": None}) + frame({"i": 1, "v": 1})[:-1], 1),
        "not JSON": (frame({"i": 0, "v": None}) + b"\x00\x00\x00\x04PASS", 1),
        "a text line": (b"0 pass\n1 pass\n", 0),
        "undecodable value": (frame({"i": 0, "v": None}) + frame({"i": 1, "v": {"s": [[1]]}}), 1),
        "rc on a call step": (frame({"i": 0, "v": None}) + frame({"i": 1, "v": 1, "rc": 0}), 1),
    }
    for name, (data, n) in cases.items():
        assert len(read_frames(data, steps)) == n, name
    # a run step needs a str and an int return code
    run = [Step("run", "1\n", 0, Check("stdout", "1\n"), "c0")]
    assert read_frames(frame({"i": 0, "v": "1\n", "rc": 0}), run) == \
        [Outcome(True, "1\n", returncode=0)]
    assert read_frames(frame({"i": 0, "v": 1, "rc": 0}), run) == []
    assert read_frames(frame({"i": 0, "v": "1", "rc": "0"}), run) == []


def test_judge_by_hand():
    ok = lambda v: Outcome(True, v)  # noqa: E731
    assert judge(Check("compare", 5), ok(5))
    assert judge(Check("compare", 5), ok(5.0))                 # Python: 5 == 5.0
    assert not judge(Check("compare", [1, 2]), ok((1, 2)))     # Python: [1, 2] != (1, 2)
    assert not judge(Check("compare", 0.3), ok(0.1 + 0.2))     # 0.30000000000000004
    assert judge(Check("compare", 3, "not in", False), ok([1, 2]))   # 3 not in [1, 2]
    assert not judge(Check("compare", 3, "<", True), ok("a"))  # 'a' < 3 raises: fails
    assert judge(Check("compare", None, "is"), ok(None))
    assert not judge(Check("compare", True, "is"), ok(1))      # 1 is not True
    assert judge(Check("truthy", False), ok([]))
    assert not judge(Check("truthy", True), ok(0))
    # isclose(2.2501, 2.25, rel_tol=1e-3): |diff| 1e-4 <= 1e-3 * 2.2501
    assert judge(Check("isclose", 2.25, rel_tol=1e-3), ok(2.2501))
    assert not judge(Check("isclose", 2.25, rel_tol=1e-5), ok(2.2501))
    assert not judge(Check("isclose", 2.25, rel_tol=1.0), ok("2.25"))
    assert judge(Check("absdiff", 0.5, "<", tol=0.01), ok(0.505))   # 0.005 < 0.01
    assert not judge(Check("absdiff", 0.5, "<", tol=0.005), ok(0.51))
    assert not judge(Check("compare", 5), Outcome(False, error="KeyError"))
    # large integers stay exact: 12345678901234567891 - 12345678901234567000 = 891 > 2 (as
    # floats both round to 1.2345678901234567e19 and the difference would vanish)
    (big,) = parse_tests("assert abs(f(2) - 12345678901234567891) <= 2", W).steps
    assert not judge(big.check, ok(12345678901234567000))
    assert judge(big.check, ok(12345678901234567892))
    # a run: output and exit status 0
    assert judge(Check("stdout", "3\n"), Outcome(True, "3", returncode=0))
    assert not judge(Check("stdout", "3\n"), Outcome(True, "3", returncode=1))


def test_stdout_matches_by_hand():
    assert stdout_matches("  3   4 \n\n5\n", "3 4\n5")         # whitespace and blank lines
    assert not stdout_matches("3 4 5", "3 4\n5")                 # line structure counts
    assert not stdout_matches("3.0", "3")                        # exact tokens by default
    assert stdout_matches("3.0", "3", tol=0.0)                   # numbers: 3.0 == 3
    # 0.3333 vs 0.333333333: diff 3.3e-5 <= 1e-4 (absolute) -> match; with 1e-6 -> no
    assert stdout_matches("0.3333", "0.333333333", tol=1e-4)
    assert not stdout_matches("0.3333", "0.333333333", tol=1e-6)
    assert stdout_matches("nan", "nan", tol=1.0)                 # equal as text
    assert not stdout_matches("1e5", "inf", tol=1.0)             # 'inf' is not a decimal
    assert not stdout_matches("YES", "yes")
    assert stdout_matches("", "\n\n")


def test_case_passes_needs_every_step_of_the_case():
    plan = parse_tests(["x = h()\nassert x == 1", "assert h() == 1"], W)
    ok = [Outcome(True), Outcome(True, 1), Outcome(True, 1)]
    assert case_passes(plan, ok) == [True, True]
    # the set-up of case 0 raised: case 0 fails even though its check got the right value
    assert case_passes(plan, [Outcome(False, error="E"), Outcome(True, 1), Outcome(True, 1)]) \
        == [False, True]
    # missing answers (the sandbox stopped after one step): both cases fail
    assert case_passes(plan, ok[:1]) == [False, False]


# ------------------------------------------------------------------------------------------
# end to end in the sandbox

ADD = ("assert add(1, 2) == 3\n"
       "assert add(10, 20) == 30\n"
       "assert add(-7, 2) == -5\n"
       "assert add(100, 1) == 101\n")
ADD_STDIO = {"inputs": ["1 2\n", "10 20\n", "-7 2\n", "100 1\n"],
             "outputs": ["3\n", "30\n", "-5\n", "101\n"]}
GOOD_FN = "```python\ndef add(a, b):\n    print('debugging output is fine')\n    return a + b\n```"
GOOD_PROG = "```python\nimport sys\na, b = map(int, sys.stdin.read().split())\nprint(a + b)\nexit(0)\n```"


def _assert_nothing_left(fn) -> None:
    for g in fn.last_grades:
        assert g.leftover_processes == 0
        if g.uid is not None:
            assert [r for r in sandbox_mod._proc_table() if r[1] == g.uid] == [], g


def test_correct_solutions_score_one_in_every_format():
    fn = code_tests_reward(timeout_s=10.0)
    formats = [
        (GOOD_FN, ADD),                                              # string of asserts
        (GOOD_FN, ["assert add(1, 2) == 3", "x = add(2, 2)\nassert x == 4"]),  # list
        (GOOD_PROG, ADD_STDIO),                                      # dict of inputs/outputs
        (GOOD_PROG, json.dumps(ADD_STDIO)),                          # the same as JSON text
        (GOOD_PROG, [{"input": "2 2", "output": "4"}]),              # list of input/output
    ]
    scores = fn(["p"] * len(formats), [c for c, _ in formats], tests=[t for _, t in formats])
    assert scores == [1.0] * len(formats), fn.last_grades
    _assert_nothing_left(fn)


def test_values_cross_with_their_exact_types():
    sol = ("```python\n"
           "def f():\n"
           "    return (1, [2.5, None], {'a': b'x', (1, 2): frozenset({3})}, {True, 4}, 1+2j, 'é')\n"
           "def g():\n"
           "    return (1, 2)\n"
           "```")
    tests = [
        "assert f() == (1, [2.5, None], {'a': b'x', (1, 2): frozenset({3})}, {True, 4}, 1+2j, 'é')",
        "assert g() == (1, 2)",
        "assert g() == [1, 2]",          # a tuple is not a list: fails (as in Python)
        "assert g() != [1, 2]",          # ... so this passes
        "assert len(f()) == 6",
        "assert f()[3] == {1, 4}",       # True == 1 in a set, as in Python: passes
    ]
    fn = code_tests_reward(timeout_s=10.0)
    # 5 of 6 pass (all but the list comparison) -> 5/6
    assert fn(["p"], [sol], tests=[tests]) == [pytest.approx(5 / 6)]


_FORGE = r'''
import json as _j, os as _o
def _frame(obj):
    d = _j.dumps(obj).encode()
    return len(d).to_bytes(4, "big") + d
_FORGED = b"".join(_frame(f) for k in range(8) for f in (
    {"i": k, "v": True}, {"i": k, "ok": True}, {"i": k, "v": None, "pass": True}))
_LINES = "".join("%d pass\nPASS %d\nok %d\n" % (k, k, k) for k in range(8))
def _forge_everywhere():
    print(_LINES)
    for fd in range(0, 64):
        try:
            _o.write(fd, _FORGED + _LINES.encode())
        except OSError:
            pass
'''

HOSTILE_FN = {
    "always_equal": (
        "class A:\n    def __eq__(s, o): return True\n    def __ne__(s, o): return False\n"
        "    __hash__ = object.__hash__\ndef add(a, b): return A()\n"),
    "str_subclass_equal_to_everything": (
        "class S(str):\n    def __eq__(s, o): return True\n    __hash__ = str.__hash__\n"
        "def add(a, b): return S('x')\n"),
    "int_subclass_equal_to_everything": (
        "class I(int):\n    def __eq__(s, o): return True\n    __hash__ = int.__hash__\n"
        "def add(a, b): return I(0)\n"),
    "patched_builtins": (
        "import builtins\nclass A:\n    __eq__ = lambda s, o: True\n"
        "builtins.eval = lambda *a, **k: A()\nbuiltins.exec = lambda *a, **k: None\n"
        "builtins.type = lambda *a: int\nbuiltins.isinstance = lambda *a: True\n"
        "def add(a, b): return None\n"),
    "patched_assertionerror_compile_exec_sys_modules": (
        "import builtins, sys\n"
        "builtins.AssertionError = type('Never', (Exception,), {})\n"
        "_real_compile = compile\n"
        "builtins.compile = lambda *a, **k: _real_compile('True', '<forged>', 'eval')\n"
        "builtins.exec = lambda *a, **k: None\n"
        "class J:\n    def dumps(self, o, **k): return '{\"i\": %d, \"v\": true}' % o['i']\n"
        "    loads = staticmethod(lambda s: {})\n"
        "sys.modules['json'] = J()\nimport json\n"
        "def add(a, b): return None\n"),
    "reads_frames_gc_fds_and_forges": _FORGE + (
        "import sys, gc\nseen = []\nf = sys._getframe()\nwhile f is not None:\n"
        "    seen.append(dict(f.f_locals))\n    f = f.f_back\n"
        "seen += [o for o in gc.get_objects() if isinstance(o, dict) and 'steps' in o]\n"
        "_forge_everywhere()\ndef add(a, b):\n    _forge_everywhere()\n    return True\n"),
    "sys_exit_before_tests": "import sys\ndef add(a, b): return None\nsys.exit(0)\n",
    "sys_exit_in_the_call": "import sys\ndef add(a, b):\n    sys.exit(0)\n",
    "os_exit_before_tests": "import os\ndef add(a, b): return a + b\nos._exit(0)\n",
    "fork_child_answers_after_parent_exits": _FORGE + (
        "import os, time\ndef add(a, b): return a + b\nif os.fork() == 0:\n"
        "    time.sleep(0.5)\n    _forge_everywhere()\n    os._exit(0)\nos._exit(0)\n"),
    "setsid_child_keeps_forging": _FORGE + (
        "import os, time\ndef add(a, b): return None\nif os.fork() == 0:\n    os.setsid()\n"
        "    for _ in range(30):\n        time.sleep(0.05)\n        _forge_everywhere()\n"
        "    os._exit(0)\n"),
    "writes_to_the_harness_fds": _FORGE + "_forge_everywhere()\nimport os\nos._exit(0)\n",
    "closes_the_channel": "import os\nos.close(3)\ndef add(a, b): return a + b\n",
    "floods_the_channel": (  # 48 MiB of frames claiming 'true' for step 0: over the 32 MiB cap
        "import os\nf = b'\\x00\\x00\\x00\\x10{\"i\":0,\"v\":true}'\n"
        "for _ in range(48):\n    os.write(3, f * (1 << 16))\n"
        "def add(a, b): return a + b\n"),
}


def test_hostile_solutions_score_zero_and_leave_nothing_running():
    names = ["good", *HOSTILE_FN, "good_again"]
    batch = [GOOD_FN, *("```python\n" + c + "```" for c in HOSTILE_FN.values()), GOOD_FN]
    fn = code_tests_reward(timeout_s=4.0)
    scores = fn(["p"] * len(batch), batch, tests=[ADD] * len(batch))
    assert dict(zip(names, scores)) == {n: (1.0 if n.startswith("good") else 0.0) for n in names}
    _assert_nothing_left(fn)
    assert fn.last_grades[names.index("floods_the_channel")].killed_reason == "output_limit"
    # the forked children were killed with the sandbox: none answered after the run
    if sandbox_mod.sandbox_capabilities()["uid_drop"] and not os.environ.get("PYTEST_XDIST_WORKER"):
        time.sleep(0.3)
        assert [r for r in sandbox_mod._proc_table()
                if sandbox_mod._UID_LOW <= r[1] < sandbox_mod._UID_HIGH] == []


@pytest.mark.skipif(sandbox_mod.sandbox_capabilities()["filesystem"] != "readonly_mounts",
                    reason="no private root here (mode plain): files are readable")
def test_expected_values_cannot_be_looked_up_on_disk():
    # A world-readable dataset (/tmp/<dir 0755>/train.jsonl, 0644) and this test file in the
    # repository both hold "assert add(10, 20) == 30" etc. A solution that reads them and
    # answers from the table would score 1 if it could open either (the sandbox before its
    # private root could: it scored 1); the sandbox's root holds neither -> None everywhere -> 0.
    shared = Path(tempfile.mkdtemp(prefix="trustrl_dataset_"))
    os.chmod(shared, 0o755)
    data = shared / "train.jsonl"
    data.write_text(json.dumps({"prompt": "add", "tests": ADD}) + "\n")
    os.chmod(data, 0o644)
    paths = [str(data), os.path.abspath(__file__)]
    lookup = (
        "```python\nimport re\nTABLE = {}\n"
        f"for path in {paths!r}:\n"
        "    try:\n        text = open(path).read().replace('\\\\n', '\\n')\n"
        "    except OSError:\n        continue\n"
        "    for a, b, e in re.findall(r'assert add\\((-?\\d+), (-?\\d+)\\) == (-?\\d+)', text):\n"
        "        TABLE[(int(a), int(b))] = int(e)\n"
        "def add(a, b):\n    return TABLE.get((a, b))\n```")
    fn = code_tests_reward(timeout_s=10.0)
    try:
        assert fn(["p"], [lookup], tests=[ADD]) == [0.0]
        # the same solution outside the sandbox finds every answer (the files are readable):
        ns: dict = {}
        exec(lookup.split("```python\n")[1].split("```")[0], ns)  # noqa: S102 - our own code
        assert [ns["add"](1, 2), ns["add"](10, 20), ns["add"](-7, 2), ns["add"](100, 1)] == \
            [3, 30, -5, 101]
    finally:
        data.unlink()
        shared.rmdir()


HOSTILE_PROG = {
    "exits_before_printing": "import os\nos._exit(0)\n",
    "right_output_then_crash": (
        "a, b = map(int, input().split())\nprint(a + b)\nraise SystemExit(3)\n"),
    "prints_verdicts_to_every_fd": _FORGE + "_forge_everywhere()\n",
    "opens_the_harness_channel_through_proc": _FORGE + (
        "import os\ntry:\n    fd = os.open('/proc/%d/fd/3' % os.getppid(), os.O_WRONLY)\n"
        "    os.write(fd, _FORGED)\nexcept OSError:\n    pass\n"),
    "fork_child_prints_after_parent_exits": (
        "import os, time\nif os.fork() == 0:\n    time.sleep(0.3)\n"
        "    print('PASS')\n    os._exit(0)\n"),
}


def test_hostile_programs_score_zero_and_timeouts_keep_earlier_cases():
    hang = "```python\na, b = map(int, input().split())\nwhile a == -7:\n    pass\nprint(a + b)\n```"
    names = ["good", *HOSTILE_PROG, "hang"]
    batch = [GOOD_PROG, *("```python\n" + c + "```" for c in HOSTILE_PROG.values()), hang]
    fn = code_tests_reward(timeout_s=3.0)
    scores = fn(["p"] * len(batch), batch, tests=[ADD_STDIO] * len(batch))
    # hang: cases 0 and 1 (inputs "1 2", "10 20") answered before case 2 ("-7 2") hangs
    # until the 3 s budget ends; case 3 never runs -> 2/4
    expected = {"good": 1.0, **{n: 0.0 for n in HOSTILE_PROG}, "hang": 0.5}
    assert dict(zip(names, scores)) == expected
    assert fn.last_grades[-1].killed_reason == "wall_time"
    _assert_nothing_left(fn)


def test_numeric_tolerance_for_program_output():
    tests = [[{"input": "", "output": "0.333333333\n"}]] * 2
    progs = ["```python\nprint(1 / 3)\n```", "```python\nprint(0.3334)\n```"]
    # 1/3 prints 0.3333333333333333: |diff| ~3e-10 <= 1e-6 -> pass; 0.3334: diff 6.7e-5 -> fail
    assert code_tests_reward(timeout_s=10.0, numeric_tolerance=1e-6)(["p"] * 2, progs,
                                                                    tests=tests) == [1.0, 0.0]
    # exact tokens by default: "0.3333333333333333" != "0.333333333"
    assert code_tests_reward(timeout_s=10.0)(["p"], progs[:1], tests=tests[:1]) == [0.0]
    with pytest.raises(ValueError, match="numeric_tolerance"):
        code_tests_reward(numeric_tolerance=-1.0)


def test_programs_without_a_network_namespace_get_the_socket_prelude(monkeypatch):
    caps = dict(sandbox_mod.sandbox_capabilities(), netns_available=False,
                network="socket_disabled")
    monkeypatch.setattr(sandbox_mod, "sandbox_capabilities", lambda: caps)
    net = ("```python\nimport socket\ntry:\n    socket.socket()\n    print('open')\n"
           "except PermissionError:\n    print('blocked')\n```")
    fn = code_tests_reward(timeout_s=10.0)
    scores = fn(["p"] * 2, [GOOD_PROG, net],
                tests=[ADD_STDIO, [{"input": "", "output": "blocked"}]])
    assert scores == [1.0, 1.0]
