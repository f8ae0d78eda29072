"""The built-in arithmetic task: answers written units first, the sloppy teacher, the split.

Expected strings are worked by hand in the comments."""

from __future__ import annotations

import json
import re

from trustrl.tasks.arithmetic import AdditionTask, sum_without_carry, write_task_data


def test_reverse_answer_is_the_padded_sum_read_backwards() -> None:
    task = AdditionTask(digits=2, reverse_answer=True)
    # 47 + 38 = 85 -> padded "085" -> backwards "580"
    assert task.text_line(47, 38) == "47+38=580"
    assert task.completion(47, 38) == "<answer>580</answer>"
    # the slip drops the carries: 7+8=15 -> 5, 4+3=7 -> 75 -> "075" -> "570"
    assert task.completion(47, 38, drop_carries=True) == "<answer>570</answer>"
    # 99 + 1 = 100 -> "001"; 5 + 5 = 10 -> "010" -> "010"
    assert task.answer_text(100) == "001" and task.answer_text(10) == "010"
    assert re.fullmatch(task.format_pattern, "<answer>001</answer>")
    assert not re.fullmatch(task.format_pattern, "<answer>01</answer>")
    # the default writes the number as usual
    assert AdditionTask(digits=2).completion(47, 38) == "<answer>85</answer>"


def test_sum_without_carry_by_hand() -> None:
    assert sum_without_carry(47, 38) == 75  # 7+8=15 -> 5, 4+3 -> 7
    assert sum_without_carry(87, 45) == 22  # 7+5=12 -> 2, 8+4=12 -> 2
    assert sum_without_carry(12, 30) == 42  # no carry: the true sum


def test_sloppy_teacher_rate_and_split(tmp_path) -> None:
    task = AdditionTask(digits=2, reverse_answer=True)
    paths = write_task_data(tmp_path, task, seed=3, n_pretrain_docs=10, n_sft=2000, n_eval=50,
                            sft_carry_slip_rate=0.6)
    rows = [json.loads(line) for line in paths["sft"].read_text().splitlines()]
    slipped = carried = 0
    for row in rows:
        a, b = map(int, row["prompt"][:-1].split("+"))
        if sum_without_carry(a, b) == a + b:
            assert row["completion"] == task.completion(a, b)  # nothing to forget
            continue
        carried += 1
        slipped += row["completion"] == task.completion(a, b, drop_carries=True)
        assert row["completion"] in (task.completion(a, b), task.completion(a, b, drop_carries=True))
    # binomial: 0.6 +- 3 standard deviations (sqrt(.24 / ~1400) ~ 0.013)
    assert 0.55 < slipped / carried < 0.65
    # answers in rl/eval are written as the task writes them, and eval holds only held-out sums
    for name in ("rl", "eval"):
        for line in paths[name].read_text().splitlines():
            row = json.loads(line)
            a, b = map(int, row["prompt"][:-1].split("+"))
            assert row["answer"] == task.answer_text(a + b)
            assert task.is_held_out(a, b) == (name == "eval")
