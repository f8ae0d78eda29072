"""A synthetic task family with verifiable answers: multi-digit addition, worked digit by digit.

Three kinds of data come from one generator, the way the three stages of LLM training
use data:
- pre-training text: solved sums, raw text with no tags ("47+38=85"; with ``scratchpad`` the
  work is written out: "47+38=7+8=15 4+3+1=8 => 85");
- SFT rows: prompt "47+38=" and the completion "<answer>85</answer>" (with ``scratchpad``, R1
  style: "<think>7+8=15 4+3+1=8</think><answer>85</answer>", units first, carries as "+1");
- RL prompts: the same prompts with an ``answer`` column for the verifiable reward.

A fixed, seed-independent subset of problems is held out of every training split, so the
held-out accuracy measures generalization to problems never seen in any stage.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass
from pathlib import Path

from trustrl.data import write_jsonl

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
SPECIAL_TOKENS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)
CHARS = "0123456789+= >"
FORMAT_PATTERN = r"^<answer>\d+</answer>$"
SCRATCHPAD_FORMAT_PATTERN = r"^<think>[0-9+= ]+</think><answer>\d+</answer>$"


@dataclass(frozen=True)
class AdditionTask:
    """Sums of two numbers with up to ``digits`` digits; 1 in ``holdout_every`` pairs is held out."""

    digits: int = 2
    holdout_every: int = 10
    scratchpad: bool = False
    """Write the column-by-column work in <think> before the answer (R1 style). Off in the
    demo: a 2-layer model copies operand digits into the scratchpad unreliably."""

    reverse_answer: bool = False
    """Write the answer units digit first, zero-padded to ``digits + 1`` digits (47+38 -> "580",
    i.e. 085 read backwards): the order column addition produces the digits in, so each digit
    depends only on one column and the carry before it. Small transformers learn addition far
    more reliably this way (Lee et al. 2023, "Teaching Arithmetic to Small Transformers",
    arXiv 2307.03381)."""

    def answer_text(self, total: int) -> str:
        """How the answer ``total`` is written in every stage's data."""
        if self.reverse_answer:
            return f"{total:0{self.digits + 1}d}"[::-1]
        return str(total)

    @property
    def format_pattern(self) -> str:
        if self.scratchpad:
            return SCRATCHPAD_FORMAT_PATTERN
        if self.reverse_answer:
            return rf"^<answer>\d{{{self.digits + 1}}}</answer>$"
        return FORMAT_PATTERN

    def is_held_out(self, a: int, b: int) -> bool:
        # a fixed hash of the pair, independent of any seed, so every stage agrees. (A linear
        # hash such as (7919a + 104729b) mod 10 would hold out exactly the sums ending in 0.)
        return zlib.crc32(f"{a}+{b}".encode()) % self.holdout_every == 0

    def all_pairs(self) -> list[tuple[int, int]]:
        top = 10 ** self.digits
        return [(a, b) for a in range(top) for b in range(top)]

    def split(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        pairs = self.all_pairs()
        train = [p for p in pairs if not self.is_held_out(*p)]
        held = [p for p in pairs if self.is_held_out(*p)]
        return train, held

    def prompt(self, a: int, b: int) -> str:
        # operands zero-padded to a fixed width: digit i of every operand sits at the same
        # position in every prompt, which is what lets a tiny transformer learn the carries
        return f"{a:0{self.digits}d}+{b:0{self.digits}d}="

    def worked(self, a: int, b: int, drop_carries: bool = False) -> tuple[str, int]:
        """Column addition from the units up: ("7+8=15 4+3+1=8", 85). With ``drop_carries``
        the carries are forgotten, the classic slip ("7+8=15 4+3=7", 75)."""
        steps, answer, carry = [], 0, 0
        for place in range(self.digits):
            x, y = (a // 10 ** place) % 10, (b // 10 ** place) % 10
            total = x + y + carry
            steps.append(f"{x}+{y}{'+1' if carry else ''}={total}")
            answer += (total % 10) * 10 ** place
            carry = 0 if drop_carries else total // 10
        answer += carry * 10 ** self.digits
        return " ".join(steps), answer

    def completion(self, a: int, b: int, drop_carries: bool = False) -> str:
        steps, answer = self.worked(a, b, drop_carries)
        if not self.scratchpad:
            return f"{ANSWER_OPEN}{self.answer_text(answer)}{ANSWER_CLOSE}"
        return f"{THINK_OPEN}{steps}{THINK_CLOSE}{ANSWER_OPEN}{self.answer_text(answer)}{ANSWER_CLOSE}"

    def text_line(self, a: int, b: int) -> str:
        steps, answer = self.worked(a, b)
        if not self.scratchpad:
            return f"{self.prompt(a, b)}{self.answer_text(answer)}"
        return f"{self.prompt(a, b)}{steps} => {self.answer_text(answer)}"


def sum_without_carry(a: int, b: int) -> int:
    """The classic slip: add digit by digit and drop every carry (47+38 -> 75, 87+45 -> 22)."""
    out, place = 0, 1
    while a or b:
        out += ((a % 10 + b % 10) % 10) * place
        a, b, place = a // 10, b // 10, place * 10
    return out


def write_task_data(directory: str | Path, task: AdditionTask, *, seed: int, n_pretrain_docs: int = 2000,
                    lines_per_doc: int = 8, n_sft: int = 2000, n_eval: int = 200,
                    sft_carry_slip_rate: float = 0.0) -> dict[str, Path]:
    """Write pretrain.jsonl, sft.jsonl, rl.jsonl and eval.jsonl into ``directory``.

    ``sft_carry_slip_rate``: the share of SFT demonstrations whose answer drops the carries
    (a sloppy teacher, as imperfect demonstration data is); rows whose sum has no carry are
    unaffected since both answers agree."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    train, held = task.split()
    docs = []
    for _ in range(n_pretrain_docs):
        lines = [task.text_line(a, b) for a, b in (rng.choice(train) for _ in range(lines_per_doc))]
        docs.append({"text": "\n".join(lines)})
    sft = []
    for a, b in (rng.choice(train) for _ in range(n_sft)):
        slip = rng.random() < sft_carry_slip_rate
        sft.append({"prompt": task.prompt(a, b), "completion": task.completion(a, b, drop_carries=slip)})
    rl = [{"prompt": task.prompt(a, b), "answer": task.answer_text(a + b)} for a, b in train]
    rng.shuffle(rl)
    held_rows = [{"prompt": task.prompt(a, b), "answer": task.answer_text(a + b)} for a, b in held]
    random.Random(12345).shuffle(held_rows)  # the same held-out sample for every seed
    paths = {
        "pretrain": directory / "pretrain.jsonl",
        "sft": directory / "sft.jsonl",
        "rl": directory / "rl.jsonl",
        "eval": directory / "eval.jsonl",
    }
    write_jsonl(paths["pretrain"], docs)
    write_jsonl(paths["sft"], sft)
    write_jsonl(paths["rl"], rl)
    write_jsonl(paths["eval"], held_rows[:n_eval])
    return paths
