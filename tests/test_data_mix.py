"""Datasets as lists of files and globs with mixing weights (``dataset: [a.jsonl, {path: b.jsonl,
weight: 2}]``), for every trainer. Expected counts and orders are worked by hand in comments."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trustrl.config import ConfigError, GRPOConfig, RewardConfig, SFTConfig, load_config
from trustrl.data import DataError, load_rows, mix_indices, source_name


def _write(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _prompts(tag: str, n: int) -> list[dict]:
    return [{"prompt": f"{tag}{i}", "answer": str(i)} for i in range(n)]


def test_mix_indices_by_hand():
    # W = 2.5, n = 10: the file twice (0..9, 0..9), then floor(0.5 * 10 + 1/2) = 5 rows evenly
    # spaced: floor(j * 10 / 5) = 0, 2, 4, 6, 8 -> 25 rows = round(2.5 * 10)
    assert mix_indices(10, 2.5) == list(range(10)) * 2 + [0, 2, 4, 6, 8]
    assert mix_indices(4, 1.0) == [0, 1, 2, 3]
    # W = 0.5, n = 3: floor(1.5 + 0.5) = 2 rows (halves round up): floor(0 * 3 / 2) = 0, floor(3 / 2) = 1
    assert mix_indices(3, 0.5) == [0, 1]
    # W = 0.15 as written: 0.15 * 10 = 1.5 exactly -> 2 rows, 0 and floor(10 / 2) = 5 (a binary
    # float product 1.4999... would give 1 row)
    assert mix_indices(10, 0.15) == [0, 5]
    # W = 1/3, n = 7: floor(7/3 + 1/2) = floor(2.83) = 2 rows: 0, floor(7 / 2) = 3
    assert mix_indices(7, 1 / 3) == [0, 3]
    assert mix_indices(10, 0.01) == []  # 0.1 rows rounds to none
    with pytest.raises(ValueError):
        mix_indices(3, 0.0)


def test_list_with_weights_mixes_by_repetition_and_keeps_file_and_row(tmp_path):
    a = _write(tmp_path / "a.jsonl", _prompts("a", 3))
    b = _write(tmp_path / "b.jsonl", _prompts("b", 4))
    loaded = load_rows([{"path": str(a), "weight": 2}, {"path": str(b), "weight": 0.5}])
    # a: 3 rows x 2 = a0 a1 a2 a0 a1 a2; b: round(0.5 * 4) = 2 rows, floor(j * 4 / 2) = b0, b2
    assert [r["prompt"] for r in loaded.rows] == ["a0", "a1", "a2", "a0", "a1", "a2", "b0", "b2"]
    assert loaded.origins[4] == (a, "line 2") and loaded.origins[7] == (b, "line 3")
    # limit keeps the first rows of the mix
    assert [r["prompt"] for r in load_rows([str(a), str(b)], limit=4).rows] == ["a0", "a1", "a2", "b0"]
    assert source_name([str(a), {"path": str(b), "weight": 2}]) == f"{a} + {b} x2"


def test_globs_expand_sorted_and_errors_name_the_file(tmp_path):
    _write(tmp_path / "d" / "2.jsonl", _prompts("two", 1))
    _write(tmp_path / "d" / "1.jsonl", _prompts("one", 2))
    _write(tmp_path / "d" / "10.jsonl", _prompts("ten", 1))
    loaded = load_rows(str(tmp_path / "d" / "*.jsonl"))
    # sorted by name: 1.jsonl, 10.jsonl, 2.jsonl
    assert [r["prompt"] for r in loaded.rows] == ["one0", "one1", "ten0", "two0"]
    # a glob with a weight: each match contributes weight x its rows
    assert len(load_rows([{"path": str(tmp_path / "d" / "1*.jsonl"), "weight": 3}])) == 3 * (2 + 1)
    with pytest.raises(DataError, match=r"nothing/\*\.parquet: the glob matches no file"):
        load_rows([str(tmp_path / "d" / "1.jsonl"), str(tmp_path / "nothing" / "*.parquet")])
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_rows([str(tmp_path / "d" / "1.jsonl"), str(tmp_path / "missing.jsonl")])
    # a bad row in the second file: the message names that file and its line
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": 5}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl: line 2: column 'prompt'"):
        load_rows([str(tmp_path / "d" / "1.jsonl"), str(bad)], types={"prompt": str})
    # a weight too small to take one row is refused, naming the file
    with pytest.raises(DataError, match=r"1\.jsonl: weight 0\.1 x 2 rows rounds to no row"):
        load_rows([{"path": str(tmp_path / "d" / "1.jsonl"), "weight": 0.1}])


def test_config_accepts_lists_and_refuses_bad_entries(tmp_path):
    cfg = load_config(GRPOConfig, None, ["model=m", "dataset=[a.jsonl, {path: 'd/*.parquet', weight: 2}]",
                                         "eval_dataset=[e.jsonl]"])
    dumped = cfg.model_dump(mode="json")
    assert dumped["dataset"] == ["a.jsonl", {"path": "d/*.parquet", "weight": 2.0}]
    assert dumped["eval_dataset"] == ["e.jsonl"]
    for bad, problem in [("dataset=[]", "at least one file"), ("dataset=[{path: a, weight: 0}]", "greater than 0"),
                         ("dataset=[{path: a, wieght: 2}]", "wieght"), ("dataset=[{path: a, weight: .inf}]", "finite")]:
        with pytest.raises(ConfigError, match=problem):
            load_config(GRPOConfig, None, ["model=m", bad])


def test_every_trainer_reads_the_mix(tiny_model_dir, tmp_path):
    """The mix equals the same rows written out by hand into one file, for the RL prompt set
    (GRPO, PPO and TRPO share it), SFT, the reward model and pretraining."""
    from trustrl.loop.experience import PromptSet
    from trustrl.models import load_tokenizer
    from trustrl.trainers.reward_model import load_pairs
    from trustrl.trainers.sft import PretrainTrainer, SFTTrainer

    tok = load_tokenizer(tiny_model_dir)
    a = _write(tmp_path / "a.jsonl", [{"prompt": "1+1=", "completion": "2", "chosen": "2", "rejected": "3",
                                       "text": "1+1=2"}])
    b = _write(tmp_path / "b.jsonl", [{"prompt": "2+2=", "completion": "4", "chosen": "4", "rejected": "5",
                                       "text": "2+2=4"},
                                      {"prompt": "3+3=", "completion": "6", "chosen": "6", "rejected": "7",
                                       "text": "3+3=6"}])
    mix = [{"path": str(a), "weight": 3}, str(b)]
    # by hand: a's row three times, then b's two rows
    flat = _write(tmp_path / "flat.jsonl", [json.loads(a.read_text())] * 3 + [json.loads(x) for x in b.read_text().splitlines()])
    common = dict(model=str(tiny_model_dir), output_dir=str(tmp_path / "run"), use_chat_template=False)

    rl = GRPOConfig(**common, dataset=mix, eval_dataset=mix, eval_prompts=4, rewards=[{"name": "format"}])
    prompts, by_hand = PromptSet(rl.dataset, rl, tok), PromptSet(str(flat), rl, tok)
    assert prompts.texts == by_hand.texts == ["1+1="] * 3 + ["2+2=", "3+3="]
    assert prompts.token_ids == by_hand.token_ids
    assert PromptSet(rl.eval_dataset, rl, tok, limit=rl.eval_prompts).texts == ["1+1="] * 3 + ["2+2="]

    rm = RewardConfig(**common, dataset=mix)
    pairs, pairs_by_hand = load_pairs(rm.dataset, rm, tok), load_pairs(str(flat), rm, tok)
    assert len(pairs) == 5 and pairs.chosen == pairs_by_hand.chosen and pairs.rejected == pairs_by_hand.rejected

    sft = SFTTrainer(SFTConfig(**common, dataset=mix, batch_size=2))
    assert sft.examples == SFTTrainer(SFTConfig(**common, dataset=str(flat), batch_size=2)).examples
    assert len(sft.examples) == 5

    from trustrl.config import PretrainConfig

    pre = PretrainTrainer(PretrainConfig(**{k: v for k, v in common.items() if k != "use_chat_template"},
                                         dataset=mix, block_size=4))
    pre_by_hand = PretrainTrainer(PretrainConfig(**{k: v for k, v in common.items() if k != "use_chat_template"},
                                                 dataset=str(flat), block_size=4))
    assert pre.examples == pre_by_hand.examples and len(pre.examples) > 0


def test_a_file_listed_twice_is_refused_naming_it(tmp_path):
    """Listing a file twice (or a path and a glob that matches it) would count its rows twice
    without saying so; weight is the one way to repeat a source."""
    a = _write(tmp_path / "a.jsonl", _prompts("a", 3))
    b = _write(tmp_path / "b.jsonl", _prompts("b", 2))
    assert len(load_rows([str(a), str(b)], required=["prompt"]).rows) == 5
    assert len(load_rows([{"path": str(a), "weight": 2}], required=["prompt"]).rows) == 6  # the way to repeat
    for spec in ([str(a), str(b), str(a)], [str(a), str(tmp_path / "*.jsonl")],
                 [str(a), str(tmp_path / "." / "a.jsonl")]):
        with pytest.raises(DataError, match=r"a\.jsonl.*in the dataset list twice.*weight: 2"):
            load_rows(spec, required=["prompt"])
