"""Tests for trustrl.rewards: rule rewards, the registry, and fault handling in scoring.

Expected values are worked by hand in the comments, or are hypothesis properties checked
against Python's own number formatting; none is computed with the function under test.
"""

from __future__ import annotations

import math
import sys
import textwrap
import threading
import time
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trustrl.rewards import (
    BUILTIN_REWARDS,
    NamedReward,
    RewardError,
    RewardSpec,
    exact_answer_reward,
    extract_answer,
    format_reward,
    length_penalty,
    math_equivalence_reward,
    numeric_answer_reward,
    parse_number,
    resolve_reward,
    resolve_rewards,
    score_completions,
    soft_overlong_reward,
)

# ---------------------------------------------------------------------------- rule rewards


def test_format_reward() -> None:
    fn = format_reward()
    completions = [
        "<think>a</think><answer>1</answer>",  # exact
        "  <think>x\ny</think>\n<answer>2</answer>\n",  # DOTALL, stripped, whitespace between
        "<answer>1</answer>",  # no think
        "<think>a</think><answer>1</answer> extra",  # trailing text
        "<think>a</think>",  # no answer
    ]
    assert fn(["p"] * 5, completions) == [1.0, 1.0, 0.0, 0.0, 0.0]
    # Flags given by name, as a YAML config would.
    upper = format_reward(pattern=r"yes", flags="IGNORECASE")
    assert upper(["p", "p"], ["YES", "no"]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="unknown regex flag"):
        format_reward(flags="NOPE")


def test_extract_answer() -> None:
    assert extract_answer("<answer>1</answer> then <answer> 42 </answer>") == "42"  # last tag
    assert extract_answer("no tag, 3 apples and 1,234 pears") == "1,234"  # last number
    assert extract_answer("half is 3/4.") == "3/4"
    assert extract_answer("no tag, 3 apples", fallback="none") is None
    assert extract_answer("nothing numeric") is None
    assert extract_answer("<answer>unclosed") is None


@pytest.mark.parametrize(
    ("text", "value"),
    [("42", 42.0), ("-3", -3.0), ("2.50", 2.5), ("1,234", 1234.0), ("3/4", 0.75), ("$5$", 5.0),
     ("7.", 7.0), ("1e-3", 0.001), ("-1,000.5", -1000.5), ("3/0", None), ("abc", None), ("1 2", None)],
)
def test_parse_number(text: str, value: float | None) -> None:
    assert parse_number(text) == value


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=-10**12, max_value=10**12))
def test_parse_number_reads_python_thousands_formatting(n: int) -> None:
    # Python's own "{:,}" formatting is the independent writer of the number.
    assert parse_number(f"{n:,}") == float(n)
    assert extract_answer(f"so the total is {n:,} units") == f"{n:,}"


@settings(max_examples=60, deadline=None)
@given(st.integers(-1000, 1000), st.integers(1, 1000))
def test_parse_number_fraction_property(a: int, b: int) -> None:
    assert parse_number(f"{a}/{b}") == pytest.approx(a / b, rel=1e-12)


def test_numeric_answer_reward() -> None:
    fn = numeric_answer_reward()
    completions = [
        "<answer>1,234</answer>",  # gold 1234 -> 1
        "I think it is -3",  # no tag, last number -3, gold -3 -> 1
        "<answer>2.50</answer>",  # gold "2.5" -> 1
        "<answer>3/4</answer>",  # gold 0.75 -> 1
        "<answer>8</answer> but maybe 7",  # tag wins: 8 != 7 -> 0
        "<answer>The answer is 12.</answer>",  # last number inside the tag: 12 -> 1
        "no number at all",  # -> 0
    ]
    golds = ["1234", "-3", "2.5", 0.75, "7", "12", "1"]
    assert fn(["p"] * 7, completions, answer=golds) == [1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0]
    strict = numeric_answer_reward(tag_required=True)
    assert strict(["p", "p"], ["so 7", "<answer>7</answer>"], answer=["7", "7"]) == [0.0, 1.0]
    tol = numeric_answer_reward(tolerance=1e-3)
    # |0.1004 - 0.1| = 4e-4 <= 1e-3 -> 1;  |0.102 - 0.1| = 2e-3 > 1e-3 -> 0
    assert tol(["p", "p"], ["0.1004", "0.102"], answer=["0.1", "0.1"]) == [1.0, 0.0]
    with pytest.raises(ValueError, match=r"gold answer 'n/a' .* at sample 1 is not a number"):
        fn(["p", "p"], ["1", "2"], answer=["1", "n/a"])
    with pytest.raises(KeyError, match=r"needs column 'answer'"):
        fn(["p"], ["1"])


def test_exact_answer_reward() -> None:
    fn = exact_answer_reward()
    completions = [
        "<answer>001</answer>",  # gold "001" -> 1
        "<answer>01</answer>",  # "01" != "001" (numeric_answer would accept it) -> 0
        "<answer> 001 </answer>",  # stripped -> 1
        "001",  # no tag, tag_required -> 0
        "<answer>9</answer><answer>001</answer>",  # the last tag counts -> 1
    ]
    assert fn(["p"] * 5, completions, answer=["001"] * 5) == [1.0, 0.0, 1.0, 0.0, 1.0]
    loose = exact_answer_reward(tag_required=False, case_sensitive=False)
    assert loose(["p", "p"], [" Paris ", "<answer>paris</answer>"], answer=["paris", "PARIS"]) == [1.0, 1.0]
    assert fn(["p"], ["<answer>7</answer>"], answer=[7]) == [1.0]  # int golds compare as text
    with pytest.raises(ValueError, match=r"gold answer None in column 'answer' at sample 1"):
        fn(["p", "p"], ["1", "2"], answer=["1", None])
    assert resolve_reward("exact_answer").name == "exact_answer"


def test_math_equivalence_equivalent_forms() -> None:
    fn = math_equivalence_reward()
    completions = [
        "<answer>0.5</answer>",
        "<answer>1/2</answer>",
        "<answer>$\\frac{1}{2}$</answer>",
        "<answer>\\frac{1}{2}</answer>",  # bare LaTeX, retried inside $...$
        "Thus the result is \\boxed{\\dfrac12}.",  # no tag: math_verify scans the whole text
        "<answer>0.6</answer>",  # not equal
        "<answer>2</answer>",  # not equal
    ]
    golds = ["\\frac{1}{2}"] * 7
    assert fn(["p"] * 7, completions, answer=golds) == [1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    # Gold written as a decimal; a symbolic prediction sqrt(2)/2 == 1/sqrt(2).
    assert fn(["p"], ["<answer>\\frac{1}{2}</answer>"], answer=["0.5"]) == [1.0]
    assert fn(["p"], ["<answer>$\\frac{\\sqrt{2}}{2}$</answer>"], answer=["\\frac{1}{\\sqrt{2}}"]) == [1.0]
    tagged = math_equivalence_reward(tag_required=True)
    assert tagged(["p"], ["\\boxed{\\frac12}"], answer=["1/2"]) == [0.0]
    with pytest.raises(ValueError, match=r"gold answer '' .* at sample 0 cannot be parsed"):
        fn(["p"], ["<answer>1</answer>"], answer=[""])


def test_math_equivalence_works_in_a_worker_thread() -> None:
    # math_verify's default signal.alarm timeout raises ValueError outside the main thread;
    # our wrapper must turn it off there.
    fn = math_equivalence_reward()
    box: dict[str, Any] = {}
    t = threading.Thread(target=lambda: box.setdefault("v", fn(["p"], ["<answer>0.5</answer>"], answer=["1/2"])))
    t.start()
    t.join(30)
    assert box["v"] == [1.0]


def test_length_penalty() -> None:
    chars = length_penalty(target_length=5, coef=0.5)
    # len("abc")=3 <= 5 -> 0 ; len("abcdefgh")=8 -> -0.5*(8-5) = -1.5
    assert chars(["p", "p"], ["abc", "abcdefgh"]) == [0.0, -1.5]
    words = length_penalty(target_length=2, coef=0.25, unit="words")
    # 4 words -> -0.25*(4-2) = -0.5
    assert words(["p", "p"], ["a b c d", "a b"]) == [-0.5, 0.0]
    tokens = length_penalty(target_length=4, coef=0.1, unit="tokens")
    # 10 tokens -> -0.1*6 = -0.6 ; 3 tokens -> 0
    assert tokens(["p", "p"], ["x", "y"], completion_lengths=[10, 3]) == pytest.approx([-0.6, 0.0])
    with pytest.raises(KeyError, match="completion_lengths"):
        tokens(["p"], ["x"])


def test_soft_overlong_reward() -> None:
    fn = soft_overlong_reward(max_len=10, cache_len=4)
    # free zone ends at 10-4=6: L<=6 -> 0; 7 -> (6-7)/4=-0.25; 8 -> -0.5; 10 -> -1.0; 11 -> -1
    lengths = [5, 6, 7, 8, 10, 11]
    assert fn(["p"] * 6, ["c"] * 6, completion_lengths=lengths) == [0.0, 0.0, -0.25, -0.5, -1.0, -1.0]
    with pytest.raises(ValueError, match="cache_len"):
        soft_overlong_reward(max_len=4, cache_len=5)
    with pytest.raises(KeyError, match="completion_lengths"):
        fn(["p"], ["c"])


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 64), st.integers(0, 64), st.lists(st.integers(0, 200), min_size=1, max_size=8))
def test_soft_overlong_is_bounded_and_non_increasing(cache: int, extra: int, lengths: list[int]) -> None:
    max_len = cache + extra
    fn = soft_overlong_reward(max_len=max_len, cache_len=cache)
    ls = sorted(lengths)
    vals = fn(["p"] * len(ls), ["c"] * len(ls), completion_lengths=ls)
    assert all(-1.0 <= v <= 0.0 for v in vals)
    assert all(a >= b for a, b in zip(vals, vals[1:]))


# ---------------------------------------------------------------------------- registry


def test_resolve_builtins_specs_and_errors() -> None:
    r = resolve_reward("format")
    assert (r.name, r.weight) == ("format", 1.0)
    assert r.fn(["p"], ["<think>a</think><answer>b</answer>"]) == [1.0]
    spec = RewardSpec(name="numeric_answer", weight=2.0, kwargs={"tag_required": True}, alias="acc")
    r2 = resolve_reward(spec)
    assert (r2.name, r2.weight) == ("acc", 2.0)
    assert r2.fn(["p"], ["7"], answer=["7"]) == [0.0]  # tag_required reached the factory
    r3 = resolve_reward({"name": "soft_overlong", "kwargs": {"max_len": 8, "cache_len": 2}})
    assert r3.name == "soft_overlong"
    with pytest.raises(ValueError, match=r"unknown reward 'nope'.*'format'.*'math_equivalence'"):
        resolve_reward("nope")
    with pytest.raises(ValueError, match=r"'reward_model' needs kwargs.path"):
        resolve_reward("reward_model")
    with pytest.raises(ValueError, match=r"invalid kwargs"):
        resolve_reward(RewardSpec(name="format", kwargs={"bogus": 1}))
    with pytest.raises(ValueError, match="extra"):  # pydantic: unknown config key
        RewardSpec.model_validate({"name": "format", "wieght": 2})
    with pytest.raises(ValueError, match="finite"):
        RewardSpec(name="format", weight=float("nan"))
    assert set(BUILTIN_REWARDS) >= {
        "format", "numeric_answer", "math_equivalence", "length_penalty", "soft_overlong",
        "code_tests", "reward_model",
    }
    with pytest.raises(ValueError, match=r"two rewards are named 'format'"):
        resolve_rewards(["format", "format"])
    assert [r.name for r in resolve_rewards(["format", {"name": "format", "alias": "fmt2"}])] == ["format", "fmt2"]


def test_code_tests_is_imported_lazily_and_built_by_its_factory(monkeypatch: pytest.MonkeyPatch) -> None:
    # A stand-in for trustrl.rewards.code, so this test does not run the real sandbox.
    fake = types.ModuleType("trustrl.rewards.code")
    seen: dict[str, Any] = {}

    def code_tests_reward(**kwargs: Any) -> Any:
        seen.update(kwargs)

        def code_tests(prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
            return [0.5] * len(completions)

        return code_tests

    fake.code_tests_reward = code_tests_reward  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "trustrl.rewards.code", fake)
    r = resolve_reward(RewardSpec(name="code_tests", kwargs={"timeout_s": 2.0}))
    assert r.name == "code_tests" and seen == {"timeout_s": 2.0}
    assert r.fn(["p", "p"], ["a", "b"], tests=["", ""]) == [0.5, 0.5]
    assert resolve_reward("code_tests").fn(["p"], ["a"]) == [0.5]  # no kwargs: still built


def _write_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    (tmp_path / f"{name}.py").write_text(
        textwrap.dedent(
            """
            def exact_match(prompts, completions, **columns):
                return [float(c == a) for c, a in zip(completions, columns["answer"])]

            def make_contains(word):
                def contains(prompts, completions, **columns):
                    return [float(word in c) for c in completions]
                return contains

            NOT_CALLABLE = 3
            """
        ),
        encoding="utf-8",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)


def test_user_function_by_module_path_and_as_callable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_module(tmp_path, monkeypatch, "trustrl_test_user_rewards")
    plain = resolve_reward("trustrl_test_user_rewards:exact_match")
    assert plain.name == "exact_match"
    assert plain.fn(["p", "p"], ["a", "b"], answer=["a", "a"]) == [1.0, 0.0]
    built = resolve_reward(
        RewardSpec(name="trustrl_test_user_rewards:make_contains", kwargs={"word": "cat"}, weight=0.5)
    )
    assert (built.name, built.weight) == ("make_contains", 0.5)  # named after the spec path
    assert built.fn(["p", "p"], ["a cat", "a dog"]) == [1.0, 0.0]
    with pytest.raises(ValueError, match=r"has no attribute 'missing'"):
        resolve_reward("trustrl_test_user_rewards:missing")
    with pytest.raises(ValueError, match=r"not callable"):
        resolve_reward("trustrl_test_user_rewards:NOT_CALLABLE")
    with pytest.raises(ValueError, match=r"cannot import module 'no_such_module_xyz'"):
        resolve_reward("no_such_module_xyz:f")

    def my_reward(prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
        return [float(len(c)) for c in completions]

    r = resolve_reward(my_reward)
    assert (r.name, r.weight, r.fn) == ("my_reward", 1.0, my_reward)
    res = score_completions([r, plain], ["p", "p"], ["ab", "a"], {"answer": ["a", "a"]})
    # my_reward: [2, 1]; exact_match: [0, 1]; total = [2, 2]
    assert res.total.tolist() == [2.0, 2.0]


# ---------------------------------------------------------------------------- scoring


def test_weights_combine_and_metrics() -> None:
    rewards = resolve_rewards(
        [
            RewardSpec(name="format", weight=0.5),
            RewardSpec(name="numeric_answer", weight=2.0),
            RewardSpec(name="length_penalty", kwargs={"target_length": 20, "coef": 0.1}),
        ]
    )
    completions = [
        # len = 7 + 1 + 8 + 8 + 1 + 9 = 34 chars
        "<think>t</think><answer>5</answer>",
        "answer 4",  # 8 chars
    ]
    res = score_completions(rewards, ["p", "p"], completions, {"answer": ["5", "5"]})
    # sample 0: format 1, numeric 1, length -0.1*(34-20) = -1.4 -> 0.5*1 + 2*1 - 1.4 = 1.1
    # sample 1: format 0, numeric 0 (4 != 5), length 0 -> 0
    assert res.total.dtype == torch.float32 and res.total.shape == (2,)
    assert res.total.tolist() == pytest.approx([1.1, 0.0], abs=1e-6)
    assert res.per_function["format"].tolist() == [1.0, 0.0]
    assert res.per_function["numeric_answer"].tolist() == [1.0, 0.0]
    assert res.per_function["length_penalty"].tolist() == pytest.approx([-1.4, 0.0])
    assert res.n_faults == {"format": 0, "numeric_answer": 0, "length_penalty": 0}
    m = res.metrics()
    # population std of [1, 0] = 0.5 ; of [1.1, 0] = 0.55 ; of [-1.4, 0] = 0.7
    assert m["reward/format/mean"] == pytest.approx(0.5)
    assert m["reward/format/std"] == pytest.approx(0.5)
    assert m["reward/length_penalty/mean"] == pytest.approx(-0.7)
    assert m["reward/length_penalty/std"] == pytest.approx(0.7)
    assert m["reward/mean"] == pytest.approx(0.55)
    assert m["reward/std"] == pytest.approx(0.55)
    assert set(m) == {
        "reward/format/mean", "reward/format/std", "reward/numeric_answer/mean",
        "reward/numeric_answer/std", "reward/length_penalty/mean", "reward/length_penalty/std",
        "reward/mean", "reward/std",
    }


def test_math_equivalence_through_the_scorer_thread_and_main_thread() -> None:
    r = [resolve_reward("math_equivalence")]
    comps = ["<answer>0.5</answer>", "<answer>3</answer>"]
    cols = {"answer": ["1/2", "1/2"]}
    assert score_completions(r, ["p", "p"], comps, cols, timeout_s=30).total.tolist() == [1.0, 0.0]
    assert score_completions(r, ["p", "p"], comps, cols, timeout_s=None).total.tolist() == [1.0, 0.0]


def test_tensor_and_numpy_outputs_are_accepted() -> None:
    def t(prompts: list[str], completions: list[str], **c: Any) -> torch.Tensor:
        return torch.tensor([1.0, 2.0])

    def a(prompts: list[str], completions: list[str], **c: Any) -> Any:
        return np.array([0.5, np.float32(0.25)])

    res = score_completions([resolve_reward(t), resolve_reward(a)], ["p", "q"], ["x", "y"])
    assert res.total.tolist() == [1.5, 2.25]


PROMPTS = ["p0", "p1", "p2"]
COMPLETIONS = ["fine zero", "bad one here", "fine two"]


def boom(prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
    for c in completions:
        if c.startswith("bad"):
            raise ValueError("cannot score this")
    return [1.0] * len(completions)


def test_raising_function_names_function_and_sample() -> None:
    with pytest.raises(RewardError) as ei:
        score_completions([resolve_reward(boom)], PROMPTS, COMPLETIONS)
    err = ei.value
    assert err.function == "boom" and err.sample_index == 1
    assert "reward function 'boom' raised ValueError: cannot score this at sample 1" in str(err)
    assert "'bad one here'" in str(err)  # preview of the completion
    assert isinstance(err.__cause__, ValueError)


def test_raising_function_default_mode_isolates_the_sample() -> None:
    res = score_completions([resolve_reward(boom)], PROMPTS, COMPLETIONS, on_error="default", default_score=-1.0)
    # samples 0 and 2 scored alone -> 1.0 ; sample 1 -> default -1.0
    assert res.per_function["boom"].tolist() == [1.0, -1.0, 1.0]
    assert res.n_faults == {"boom": 1}


def test_unisolatable_failure() -> None:
    def batch_only(prompts: list[str], completions: list[str], **c: Any) -> list[float]:
        if len(completions) > 1:
            raise RuntimeError("batch broke")
        return [1.0]

    with pytest.raises(RewardError, match=r"'batch_only' raised RuntimeError: batch broke \(could not isolate") as ei:
        score_completions([resolve_reward(batch_only)], PROMPTS, COMPLETIONS)
    assert ei.value.sample_index is None
    res = score_completions([resolve_reward(batch_only)], PROMPTS, COMPLETIONS, on_error="default")
    assert res.per_function["batch_only"].tolist() == [0.0, 0.0, 0.0]
    assert res.n_faults == {"batch_only": 3}


def test_wrong_length_names_expected_and_got() -> None:
    def short(prompts: list[str], completions: list[str], **c: Any) -> list[float]:
        return [1.0]

    def scalar(prompts: list[str], completions: list[str], **c: Any) -> float:
        return 1.0

    with pytest.raises(RewardError, match=r"reward function 'short' returned 1 values, expected 3"):
        score_completions([resolve_reward(short)], PROMPTS, COMPLETIONS)
    with pytest.raises(RewardError, match=r"'scalar' returned float, expected a list of 3 floats"):
        score_completions([resolve_reward(scalar)], PROMPTS, COMPLETIONS)
    res = score_completions(
        [resolve_reward(short), resolve_reward(boom)], PROMPTS, COMPLETIONS, on_error="default", default_score=0.25
    )
    assert res.per_function["short"].tolist() == [0.25, 0.25, 0.25]
    assert res.n_faults == {"short": 3, "boom": 1}
    # total = short + boom = [0.25+1, 0.25+0.25, 0.25+1]
    assert res.total.tolist() == [1.25, 0.5, 1.25]


@pytest.mark.parametrize(
    ("bad_value", "index", "pattern"),
    [
        (float("nan"), 2, r"'bad_values' returned nan at sample 2"),
        (float("inf"), 0, r"'bad_values' returned inf at sample 0"),
        ("0.5", 1, r"'bad_values' returned non-numeric value '0.5' \(str\) at sample 1"),
        (None, 1, r"'bad_values' returned non-numeric value None \(NoneType\) at sample 1"),
    ],
)
def test_nan_inf_and_non_numeric_name_function_and_sample(bad_value: Any, index: int, pattern: str) -> None:
    def bad_values(prompts: list[str], completions: list[str], **c: Any) -> list[Any]:
        out: list[Any] = [1.0, 2.0, 3.0]
        out[index] = bad_value
        return out

    with pytest.raises(RewardError, match=pattern) as ei:
        score_completions([resolve_reward(bad_values)], PROMPTS, COMPLETIONS)
    assert ei.value.sample_index == index
    res = score_completions([resolve_reward(bad_values)], PROMPTS, COMPLETIONS, on_error="default")
    expected = [1.0, 2.0, 3.0]
    expected[index] = 0.0
    assert res.per_function["bad_values"].tolist() == expected
    assert res.n_faults == {"bad_values": 1}


def test_hanging_function_times_out() -> None:
    release = threading.Event()

    def hang(prompts: list[str], completions: list[str], **c: Any) -> list[float]:
        release.wait(20)
        return [1.0] * len(completions)

    try:
        t0 = time.monotonic()
        with pytest.raises(RewardError, match=r"reward function 'hang' exceeded timeout 0.5 s") as ei:
            score_completions([resolve_reward(hang)], PROMPTS, COMPLETIONS, timeout_s=0.5)
        assert ei.value.function == "hang" and ei.value.sample_index is None
        res = score_completions(
            [resolve_reward(hang), resolve_reward("format")], PROMPTS, COMPLETIONS,
            timeout_s=0.5, on_error="default", default_score=-2.0,
        )
        assert res.per_function["hang"].tolist() == [-2.0, -2.0, -2.0]
        assert res.n_faults == {"hang": 3, "format": 0}
        # two timed-out calls of 0.5 s each, plus overhead
        assert time.monotonic() - t0 < 5.0
    finally:
        release.set()  # let the abandoned daemon threads finish


def test_gold_answer_error_is_attributed_to_the_sample() -> None:
    r = resolve_reward("numeric_answer")
    with pytest.raises(RewardError, match=r"'numeric_answer' raised ValueError: .*gold answer 'x'.* at sample 1") as ei:
        score_completions([r], ["p", "p"], ["1", "2"], {"answer": ["1", "x"]})
    assert ei.value.sample_index == 1


def test_input_validation() -> None:
    r = [resolve_reward("format")]
    with pytest.raises(ValueError, match=r"column 'answer' has 1 values for 2 completions"):
        score_completions(r, ["p", "p"], ["a", "b"], {"answer": ["1"]})
    with pytest.raises(ValueError, match=r"1 prompts for 2 completions"):
        score_completions(r, ["p"], ["a", "b"])
    with pytest.raises(ValueError, match=r"no completions"):
        score_completions(r, [], [])
    with pytest.raises(ValueError, match=r"clashes"):
        score_completions(r, ["p"], ["a"], {"prompts": ["x"]})
    with pytest.raises(ValueError, match=r"two rewards are named"):
        score_completions([NamedReward("x", boom), NamedReward("x", boom)], ["p"], ["a"])
    assert math.isfinite(score_completions(r, ["p"], ["a"]).metrics()["reward/std"])


def test_math_equivalence_in_a_worker_thread_logs_no_timeout_notice(monkeypatch, caplog) -> None:
    # without a timeout (worker thread: the scorer bounds the call) math_verify logs "Timeout is
    # disabled ... you must provide the logic for timeout interuption yourself" once per process;
    # it reached the terminal of every `trustrl train` run using math_equivalence
    import logging

    import math_verify.grader
    import math_verify.parser

    monkeypatch.setattr(math_verify.parser, "TIMEOUT_WARNING_SHOWN", False)  # (once per process)
    monkeypatch.setattr(math_verify.grader, "TIMEOUT_WARNING_SHOWN", False)
    fn = math_equivalence_reward()
    box: dict[str, Any] = {}
    with caplog.at_level(logging.WARNING):
        t = threading.Thread(target=lambda: box.setdefault("v", fn(["p"], ["<answer>0.5</answer>"], answer=["1/2"])))
        t.start()
        t.join(30)
    assert box["v"] == [1.0]
    assert not [r for r in caplog.records if "Timeout is disabled" in r.getMessage()], caplog.text
    # other math_verify records still pass
    logging.getLogger("math_verify.parser").warning("something else")
    assert "something else" in caplog.text
