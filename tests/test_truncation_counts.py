"""Rows cut by a length limit are counted, warned about once and logged as data/ metrics
(RL prompt sets, SFT, reward model). The tiny tokenizer has one token per character and adds
no BOS, so every count below is worked by hand from the string lengths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trustrl.config import GRPOConfig, RewardConfig, SFTConfig
from trustrl.logging import read_metrics


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _common(tiny_model_dir, tmp_path, name):
    return dict(model=str(tiny_model_dir), output_dir=str(tmp_path / name), max_steps=1, progress=False,
                tensorboard=False, device="cpu", use_chat_template=False)


def test_rl_prompts_longer_than_max_prompt_length_are_counted(tiny_model_dir, tmp_path):
    from trustrl.algorithms.grpo import GRPOTrainer

    # 4, 6 and 6 tokens with max_prompt_length = 5: two prompts are cut
    data = _write(tmp_path / "rl.jsonl", [{"prompt": "1+1="}, {"prompt": "12+34="}, {"prompt": "123+4="}])
    cfg = GRPOConfig(**_common(tiny_model_dir, tmp_path, "grpo"), dataset=str(data), eval_dataset=str(data),
                     eval_prompts=1, max_prompt_length=5, prompts_per_step=2, group_size=2, max_completion_length=2,
                     beta=0.0, rewards=[{"name": "format"}])
    with pytest.warns(UserWarning, match=r"rl\.jsonl: 2 of 3 prompts are longer than max_prompt_length=5 tokens; "
                                         r".*\(metric data/truncated_prompts\)"):
        trainer = GRPOTrainer(cfg)
    assert trainer.prompts.truncated == 2 and trainer.eval_prompts.truncated == 0  # eval: only "1+1="
    trainer.train()
    first = [r for r in read_metrics(cfg.output_dir) if r["step"] == 1][0]
    assert first["data/truncated_prompts"] == 2 and first["data/truncated_eval_prompts"] == 0


def test_sft_counts_cut_and_dropped_examples(tiny_model_dir, tmp_path):
    from trustrl.trainers.sft import SFTTrainer

    rows = [{"prompt": "1+1=", "completion": "2"},       # 4 + 1 + EOS = 6 tokens: fits max_length 6
            {"prompt": "12+34=", "completion": "46"},    # the prompt alone is 6 tokens: dropped
            {"prompt": "1+2=", "completion": "345"},     # 4 + 3 + 1 = 8: cut, 2 completion tokens kept
            {"prompt": "123+4567=", "completion": "1"}]  # prompt 9 tokens: dropped
    data = _write(tmp_path / "sft.jsonl", rows)
    cfg = SFTConfig(**_common(tiny_model_dir, tmp_path, "sft"), dataset=str(data), max_length=6, batch_size=2)
    with pytest.warns(UserWarning) as record:
        trainer = SFTTrainer(cfg)
    text = "\n".join(str(w.message) for w in record)
    assert "sft.jsonl: 1 of 4 examples are longer than max_length=6 tokens" in text
    assert "sft.jsonl: 2 of 4 examples have a prompt of max_length=6 tokens or more; they are left out" in text
    assert len(trainer.examples) == 2 and [sum(m) for _, m in trainer.examples] == [2, 2]
    trainer.train()
    first = read_metrics(cfg.output_dir)[0]
    assert first["data/truncated_examples"] == 1 and first["data/dropped_examples"] == 2


def test_reward_model_counts_cut_pairs(tiny_model_dir, tmp_path):
    from trustrl.trainers.reward_model import RewardTrainer

    rows = [{"prompt": "1+1=", "chosen": "2", "rejected": "345"},  # rejected: 4 + 3 + EOS = 8 > 7: cut
            {"prompt": "2+2=", "chosen": "4", "rejected": "5"}]    # 6 tokens each: fit
    data = _write(tmp_path / "rm.jsonl", rows)
    cfg = RewardConfig(**_common(tiny_model_dir, tmp_path, "rm"), dataset=str(data), max_length=7, batch_size=2)
    with pytest.warns(UserWarning, match=r"rm\.jsonl: 1 of 2 pairs have a text .* longer than max_length=7"):
        trainer = RewardTrainer(cfg)
    assert [len(x) for x in trainer.pairs.rejected] == [7, 6]  # the last 7 tokens of the cut one
    trainer.train()
    assert read_metrics(cfg.output_dir)[0]["data/truncated_pairs"] == 1


def test_reward_model_counts_cut_rankings(tiny_model_dir, tmp_path):
    from trustrl.models import load_tokenizer
    from trustrl.trainers.reward_model import load_rankings

    # "1+1=" + "345" + EOS = 8 tokens > max_length 7: the first ranking has a cut response
    rows = [{"prompt": "1+1=", "responses": ["2", "345", "5"], "ranks": [1, 2, 3]},
            {"prompt": "2+2=", "responses": ["4", "5"], "ranks": [1, 2]}]
    data = _write(tmp_path / "rank.jsonl", rows)
    cfg = RewardConfig(**_common(tiny_model_dir, tmp_path, "rm"), dataset=str(data), max_length=7)
    with pytest.warns(UserWarning, match=r"rank\.jsonl: 1 of 2 rankings have a text .* longer than max_length=7"):
        rankings = load_rankings(cfg.dataset, cfg, load_tokenizer(tiny_model_dir))
    assert rankings.truncated == 1 and [len(t) for t in rankings.texts[0]] == [6, 7, 6]
