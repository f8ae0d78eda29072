"""Synthetic preference pairs for the addition task: the data for ``trustrl train rm``.

Each row is ``{"prompt": "47+38=", "chosen": "<answer>85</answer>", "rejected": ...}`` (prompt
and answers as the task writes them, e.g. "<answer>580</answer>" with ``reverse_answer``) where
the rejected completion is one of

- a wrong number in the right format (``"<answer>75</answer>"``: the sum with its carries
  dropped when there are any, else off by a small amount, or a random number), or
- the right number in a broken format (no tags, a missing closing tag, an empty answer,
  the answer repeated after the tag).

So a reward model trained on these rows learns both "correct" and "well formatted", and the
demo pipeline can run ``trustrl train rm`` and then ``trustrl train ppo reward_model=...``.
The held-out pairs of :class:`~trustrl.tasks.arithmetic.AdditionTask` are used only for the
evaluation file, as in every other stage.

Command line: ``python -m trustrl.tasks.preferences OUT_DIR [--digits 2] [--seed 0]`` writes
``OUT_DIR/prefs_train.jsonl`` and ``OUT_DIR/prefs_eval.jsonl``.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from trustrl.data import write_jsonl
from trustrl.tasks.arithmetic import ANSWER_CLOSE, ANSWER_OPEN, AdditionTask, sum_without_carry

__all__ = ["wrong_number", "broken_format", "preference_row", "preference_rows", "write_preference_data"]

REJECTION_KINDS = ("wrong_number", "broken_format")


def wrong_number(a: int, b: int, rng: random.Random, task: AdditionTask, slip_share: float = 0.4) -> str:
    """A well-formatted answer (written as ``task`` writes answers) with a number different
    from ``a + b``: the carry-dropping slip (share ``slip_share``, when it differs), a near
    miss, or a random number."""
    right = a + b
    top = 2 * (10 ** task.digits - 1)
    near = slip_share + (1 - slip_share) * 2 / 3
    while True:
        draw = rng.random()
        if draw < slip_share and sum_without_carry(a, b) != right:
            candidate = sum_without_carry(a, b)
        elif draw < near:
            candidate = right + rng.choice([-10, -2, -1, 1, 2, 10])
        else:
            candidate = rng.randint(0, top)
        if 0 <= candidate <= top and candidate != right:
            return f"{ANSWER_OPEN}{task.answer_text(candidate)}{ANSWER_CLOSE}"


def broken_format(a: int, b: int, rng: random.Random, task: AdditionTask = AdditionTask()) -> str:
    """The right number in a format the task's format pattern rejects."""
    n = task.answer_text(a + b)
    return rng.choice([
        f"{n}",                                   # no tags
        f"{ANSWER_OPEN}{n}",                      # no closing tag
        f"{ANSWER_OPEN}{ANSWER_CLOSE}",           # empty answer
        f"{ANSWER_OPEN}{n}{ANSWER_CLOSE}{n}",     # trailing text
        f"{n}{ANSWER_OPEN}{ANSWER_CLOSE}",        # number outside the tags
    ])


def preference_row(task: AdditionTask, a: int, b: int, rng: random.Random,
                   wrong_fraction: float = 0.5, slip_share: float = 0.4) -> dict[str, str]:
    """One (prompt, chosen, rejected) row for ``a + b``, the prompt written as ``task`` writes it."""
    if rng.random() < wrong_fraction:
        rejected = wrong_number(a, b, rng, task, slip_share)
    else:
        rejected = broken_format(a, b, rng, task)
    return {"prompt": task.prompt(a, b), "chosen": task.completion(a, b), "rejected": rejected}


def preference_rows(task: AdditionTask, pairs: list[tuple[int, int]], n: int, rng: random.Random,
                    wrong_fraction: float = 0.5, slip_share: float = 0.4) -> list[dict[str, str]]:
    """``n`` rows for problems drawn (with replacement) from ``pairs``."""
    if not pairs:
        raise ValueError("preference_rows: no problems to draw from")
    return [preference_row(task, *rng.choice(pairs), rng, wrong_fraction, slip_share) for _ in range(n)]


def write_preference_data(directory: str | Path, task: AdditionTask = AdditionTask(), *, seed: int = 0,
                          n_train: int = 2000, n_eval: int = 200, wrong_fraction: float = 0.5,
                          slip_share: float = 0.4) -> dict[str, Path]:
    """Write ``prefs_train.jsonl`` (training problems) and ``prefs_eval.jsonl`` (held-out
    problems) into ``directory``; returns ``{"train": path, "eval": path}``."""
    if not 0.0 <= wrong_fraction <= 1.0:
        raise ValueError(f"write_preference_data: wrong_fraction must be in [0, 1], got {wrong_fraction}")
    directory = Path(directory)
    rng = random.Random(seed)
    train, held = task.split()
    paths = {"train": directory / "prefs_train.jsonl", "eval": directory / "prefs_eval.jsonl"}
    if not 0.0 <= slip_share <= 1.0:
        raise ValueError(f"write_preference_data: slip_share must be in [0, 1], got {slip_share}")
    write_jsonl(paths["train"], preference_rows(task, train, n_train, rng, wrong_fraction, slip_share))
    write_jsonl(paths["eval"], preference_rows(task, held, n_eval, random.Random(seed + 12345), wrong_fraction,
                                               slip_share))
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trustrl.tasks.preferences",
                                     description="write preference pairs for the addition task")
    parser.add_argument("output_dir")
    parser.add_argument("--digits", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--n-eval", type=int, default=200)
    parser.add_argument("--reverse-answer", action="store_true", help="answers units digit first (as the demo)")
    parser.add_argument("--slip-share", type=float, default=0.4,
                        help="share of the wrong-number rejections that are the carry-dropping slip")
    args = parser.parse_args(argv)
    task = AdditionTask(digits=args.digits, reverse_answer=args.reverse_answer)
    paths = write_preference_data(args.output_dir, task, seed=args.seed,
                                  n_train=args.n_train, n_eval=args.n_eval, slip_share=args.slip_share)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
