"""Rewards from Python as first-class as TRL's: weights and names (``(fn, w)``, ``Reward``,
``{"name": fn}``), recorded in config.yaml by qualified name, called with only the arguments
they declare (``completion_ids``, ``completion_messages``, ``step``, columns), and ``async``
functions awaited concurrently under the same time limit and fault policy."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import pytest
import torch
import yaml

from trustrl.algorithms.grpo import GRPOTrainer
from trustrl.calls import FunctionFault, guarded_call
from trustrl.config import GRPOConfig
from trustrl.config.rewards import Reward, callable_path
from trustrl.rewards.registry import (NamedReward, RewardError, RewardSpecError, resolve_reward, resolve_rewards,
                                      score_completions)
from trustrl.trainers.common import PromptSampler


def length(prompts, completions, **columns):
    return [float(len(c)) for c in completions]


def count_a(prompts, completions, **columns):
    return [float(c.count("a")) for c in completions]


def grpo_config(model_dir, dataset, tmp_path: Path, **overrides) -> GRPOConfig:
    base = dict(model=str(model_dir), dataset=str(dataset), output_dir=str(tmp_path / "run"), max_steps=1,
                prompts_per_step=2, group_size=2, max_completion_length=4, max_prompt_length=16, beta=0.0,
                progress=False, tensorboard=False, rewards=[], device="cpu", sample_every=0)
    base.update(overrides)
    return GRPOConfig(**base)


# ------------------------------------------------------------------------------------------
# weights and names
# ------------------------------------------------------------------------------------------


def test_every_python_form_takes_a_weight_and_a_name():
    completions = ["aa", "abc", ""]
    prompts = ["p"] * 3
    rewards = [(length, 0.5), Reward(count_a, weight=2.0, name="a_count"),
               {"name": lambda p, c, **k: [1.0] * len(c), "weight": -1.0, "alias": "one"},
               (lambda p, c, **k: [10.0] * len(c), 0.1, "ten")]
    result = score_completions(rewards, prompts, completions)
    assert list(result.per_function) == ["length", "a_count", "one", "ten"]
    # total = 0.5 * len + 2 * count("a") - 1 * 1 + 0.1 * 10:  "aa" -> 1 + 4 - 1 + 1 = 5;
    # "abc" -> 1.5 + 2 - 1 + 1 = 3.5;  "" -> 0 + 0 - 1 + 1 = 0
    assert result.total.tolist() == pytest.approx([5.0, 3.5, 0.0])


def test_two_lambdas_need_names_and_can_have_them():
    with pytest.raises(RewardSpecError, match=r"two rewards are named '<lambda>'; name one: Reward\(fn, name="):
        resolve_rewards([lambda p, c: [0.0] * len(c), lambda p, c: [1.0] * len(c)])
    named = resolve_rewards([(lambda p, c: [0.0] * len(c), 1.0, "zero"), Reward(lambda p, c: [1.0] * len(c), name="one")])
    assert [r.name for r in named] == ["zero", "one"]


def test_config_rewards_take_callables_and_record_qualified_names(tmp_path):
    cfg = GRPOConfig(model="m", dataset="d.jsonl", rewards=[{"name": length, "weight": 0.5}, (count_a, 2.0),
                                                           Reward(lambda p, c: [0.0] * len(c), name="zero")])
    assert [s.weight for s in cfg.rewards] == [0.5, 2.0, 1.0] and cfg.rewards[0].name is length
    recorded = cfg.model_dump(mode="json")["rewards"]
    assert recorded[0]["name"] == f"{__name__}:length" and "note" not in recorded[0]
    assert recorded[1]["name"] == f"{__name__}:count_a" and recorded[1]["weight"] == 2.0
    assert recorded[2]["name"].endswith(":test_config_rewards_take_callables_and_record_qualified_names.<locals>.<lambda>")
    assert "lambda" in recorded[2]["note"] and "cannot be imported again" in recorded[2]["note"]
    # read back (as --resume from config.yaml does): the lambda is refused, naming what to do
    back = GRPOConfig.model_validate(yaml.safe_load(yaml.safe_dump(cfg.model_dump(mode="json"))))
    with pytest.raises(RewardSpecError, match=r"cannot be imported again\); pass the function again from Python"):
        resolve_reward(back.rewards[2])


def test_callable_paths_and_notes():
    import functools
    import os.path

    assert callable_path(os.path.join) == ("posixpath:join", None)
    assert callable_path(length) == (f"{__name__}:length", None)
    assert "partial" in callable_path(functools.partial(length, ["p"]))[1]

    class Scorer:
        def __call__(self, prompts, completions):
            return [0.0] * len(completions)

        def method(self, prompts, completions):
            return [0.0] * len(completions)

    assert "state is not recorded" in callable_path(Scorer())[1]
    assert "bound method" in callable_path(Scorer().method)[1]


def test_reward_funcs_are_weighted_named_and_recorded_in_config_yaml(tiny_model_dir, addition_data, tmp_path):
    cfg = grpo_config(tiny_model_dir, addition_data["rl"], tmp_path)
    trainer = GRPOTrainer(cfg, reward_funcs=[(length, 0.5), Reward(count_a, weight=2.0, name="a_count")])
    assert cfg.rewards == []  # the caller's config is left as it was
    assert [(r.name, r.weight) for r in trainer.rewards.rewards] == [("length", 0.5), ("a_count", 2.0)]
    trainer.train()
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["rewards"]
    assert [(s["name"], s["weight"], s["alias"]) for s in saved] == [
        (f"{__name__}:length", 0.5, None), (f"{__name__}:count_a", 2.0, "a_count")]
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    m = metrics[-1]
    assert m["reward/mean"] == pytest.approx(0.5 * m["reward/length/mean"] + 2.0 * m["reward/a_count/mean"], abs=1e-5)


# ------------------------------------------------------------------------------------------
# what a reward function receives
# ------------------------------------------------------------------------------------------


def test_only_declared_arguments_are_passed():
    seen: dict[str, object] = {}

    def bare(prompts, completions):  # before: TypeError, the columns were always passed
        return [0.0] * len(completions)

    def trl_style(completions, **kwargs):  # TRL's convention: keywords, prompts among them
        seen["trl"] = sorted(kwargs)
        return [1.0] * len(completions)

    def picky(prompts, completions, answer, step):
        seen["picky"] = (answer, step)
        return [2.0] * len(completions)

    result = score_completions([bare, trl_style, picky], ["p1", "p2"], ["c1", "c2"],
                               {"answer": ["1", "2"], "completion_ids": [[5], [6, 7]]}, context={"step": 3})
    assert result.total.tolist() == [3.0, 3.0]
    assert seen["trl"] == ["answer", "completion_ids", "prompts", "step"]
    assert seen["picky"] == (["1", "2"], 3)


def test_a_function_that_cannot_take_prompts_and_completions_is_refused():
    with pytest.raises(RewardSpecError, match=r"reward 'one_arg': cannot be called as fn\(prompts, completions"):
        resolve_reward(Reward(lambda texts: [0.0] * len(texts), name="one_arg"))


def test_completion_ids_are_exactly_the_sampled_ids_and_step_counts(tiny_model_dir, addition_data, tmp_path):
    calls: list[dict] = []

    def recorder(prompts, completions, completion_ids, completion_lengths, step):
        calls.append({"ids": completion_ids, "lengths": completion_lengths, "step": step, "completions": completions})
        return [0.0] * len(completions)

    cfg = grpo_config(tiny_model_dir, addition_data["rl"], tmp_path, max_steps=2,
                      eval_dataset=str(addition_data["eval"]), eval_prompts=2)
    trainer = GRPOTrainer(cfg, reward_funcs=[recorder])
    batch, _ = trainer.collect(PromptSampler(len(trainer.prompts), seed=0))
    ids, mask = batch.rollout.completion_ids, batch.rollout.completion_mask
    assert calls[-1]["ids"] == [ids[i][mask[i]].tolist() for i in range(ids.shape[0])]
    assert calls[-1]["lengths"] == [len(x) for x in calls[-1]["ids"]]
    tok = trainer.tokenizer
    assert calls[-1]["completions"] == [tok.decode(x, skip_special_tokens=True) for x in calls[-1]["ids"]]
    calls.clear()
    trainer.train()
    # eval before step 1 (step 0), the steps 1 and 2, eval after step 2 (step 2)
    assert [c["step"] for c in calls] == [0, 1, 2, 2]


def test_chat_prompts_give_completion_messages(tiny_model_dir, tmp_path):
    from trustrl.models import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    rows = [{"prompt": [{"role": "user", "content": "1+1="}], "answer": "2"}, {"prompt": "2+2=", "answer": "4"}]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got: list = []

    def chatty(completions, completion_messages, **kwargs):
        got.append((completions, completion_messages))
        return [0.0] * len(completions)

    trainer = GRPOTrainer(grpo_config(tiny_model_dir, data, tmp_path), reward_funcs=[chatty], tokenizer=tok)
    batch, _ = trainer.collect(PromptSampler(len(trainer.prompts), seed=0))
    completions, messages = got[-1]
    for row, text, msg in zip(batch.row_indices, completions, messages):
        if row == 0:  # a conversation: the completion as the assistant's message
            assert msg == [{"role": "assistant", "content": text}]
        else:
            assert msg is None

    text_only = tmp_path / "text.jsonl"
    text_only.write_text(json.dumps(rows[1]) + "\n")
    with pytest.raises(RewardSpecError, match=r"reward 'chatty' requires completion_messages, given only when"):
        GRPOTrainer(grpo_config(tiny_model_dir, text_only, tmp_path), reward_funcs=[chatty], tokenizer=tok)


def test_dataset_column_named_like_an_argument_is_refused(tiny_model_dir, tmp_path):
    data = tmp_path / "rl.jsonl"
    data.write_text(json.dumps({"prompt": "1+1=", "step": 3}) + "\n")
    with pytest.raises(RewardSpecError, match=r"rl.jsonl: column 'step' has the name of an argument"):
        GRPOTrainer(grpo_config(tiny_model_dir, data, tmp_path), reward_funcs=[length])


# ------------------------------------------------------------------------------------------
# async rewards
# ------------------------------------------------------------------------------------------


def test_async_rewards_run_concurrently():
    # each waits for the other to have started: run one after the other, both would time out
    loop_events: dict[str, asyncio.Event] = {}
    started: list[str] = []

    def make(me: str, other: str):
        async def fn(prompts, completions):
            loop_events.setdefault(me, asyncio.Event()).set()
            started.append(me)
            await loop_events.setdefault(other, asyncio.Event()).wait()
            return [1.0 if me == "left" else 2.0] * len(completions)
        fn.__name__ = me
        return fn

    result = score_completions([make("left", "right"), make("right", "left"), length], ["p"], ["abc"], timeout_s=30)
    assert result.per_function["left"].tolist() == [1.0] and result.per_function["right"].tolist() == [2.0]
    assert result.total.tolist() == [1.0 + 2.0 + 3.0] and sorted(started) == ["left", "right"]


def test_async_faults_follow_the_same_policy():
    async def hang(prompts, completions):
        await asyncio.sleep(3600)

    async def explode(prompts, completions, answer):
        if "bad" in answer:
            raise ValueError(f"cannot grade {answer}")
        return [1.0] * len(completions)

    with pytest.raises(RewardError, match=r"reward function 'hang' exceeded timeout 0.2 s"):
        score_completions([hang], ["p"], ["c"], timeout_s=0.2)
    with pytest.raises(RewardError, match=r"reward function 'explode' raised ValueError: cannot grade \['bad'\] at sample 1"):
        score_completions([explode], ["p", "p"], ["c", "d"], {"answer": ["ok", "bad"]})
    result = score_completions([hang, explode], ["p", "p"], ["c", "d"], {"answer": ["ok", "bad"]}, timeout_s=0.2,
                               on_error="default", default_score=-1.0)
    assert result.per_function["hang"].tolist() == [-1.0, -1.0]
    assert result.per_function["explode"].tolist() == [1.0, -1.0]  # sample 0 kept its score alone
    assert result.n_faults == {"hang": 2, "explode": 1}


def test_async_reward_through_a_grpo_step(tiny_model_dir, addition_data, tmp_path):
    async def async_length(prompts, completions, completion_ids):
        await asyncio.sleep(0)
        return [float(len(ids)) for ids in completion_ids]

    summary = GRPOTrainer(grpo_config(tiny_model_dir, addition_data["rl"], tmp_path),
                          reward_funcs=[async_length]).train()
    assert summary["reward_faults"] == {"async_length": 0}


# ------------------------------------------------------------------------------------------
# the reusable fault policy (environments and tools use it too)
# ------------------------------------------------------------------------------------------


def test_guarded_call_policy():
    release = threading.Event()
    assert guarded_call(lambda x: x + 1, (1,), name="inc", timeout_s=1.0, on_error="raise") == (2, None)
    value, message = guarded_call(lambda: 1 / 0, name="div", timeout_s=None, on_error="default", default=-5,
                                  what="environment")
    assert value == -5 and message == "environment 'div' raised ZeroDivisionError: division by zero"
    try:
        with pytest.raises(FunctionFault, match=r"tool 'wait' exceeded timeout 0.1 s") as err:
            guarded_call(release.wait, (60,), name="wait", timeout_s=0.1, on_error="raise", what="tool")
        assert err.value.function == "wait"
    finally:
        release.set()

    async def add(a, b):
        return a + b

    assert guarded_call(add, (2, 3), name="add", timeout_s=None, on_error="raise") == (5, None)


def test_named_reward_required_columns():
    def user(prompts, completions, answer, tests=None, *, solution, **columns):
        return [0.0] * len(completions)

    assert NamedReward("user", user).required_columns() == ["answer", "solution"]
    assert resolve_reward("exact_answer").required_columns() == ["answer"]
    assert resolve_reward({"name": "numeric_answer", "kwargs": {"answer_column": "gold"}}).required_columns() == ["gold"]
    assert resolve_reward("format").required_columns() == []
    assert torch.is_tensor(score_completions([user], ["p"], ["c"], {"answer": ["1"], "solution": ["2"]}).total)
