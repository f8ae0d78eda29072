"""Bad input to the trainers other than GRPO (pretrain, sft, rm, ppo, trpo) and their stops:
each user error is one line naming the file / row / key at fault (a UserError, no
traceback), and rows left out are counted in a warning."""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest

from trustrl.errors import UserError


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------------------
# reward model: pairs and rankings
# ------------------------------------------------------------------------------------------

PAIRS = [{"prompt": f"{i}+1=", "chosen": f"<answer>{i + 1}</answer>", "rejected": f"<answer>{i + 2}</answer>"}
         for i in range(6)]
RANKINGS = [{"prompt": f"{i}+1=", "responses": [str(i + 1), str(i + 2), str(i + 3)], "ranks": [1, 2, 3]}
            for i in range(6)]


def rm_trainer(tiny_model_dir, dataset: Path, tmp_path, **overrides):
    from trustrl.trainers.reward_model import RewardConfig, RewardTrainer

    cfg = RewardConfig(model=str(tiny_model_dir), dataset=str(dataset), output_dir=str(tmp_path / "rm"), max_steps=1,
                       batch_size=2, max_length=32, device="cpu", progress=False, tensorboard=False, **overrides)
    return RewardTrainer(cfg)


def test_rm_pairs_with_chosen_equal_to_rejected_are_left_out_and_counted(tiny_model_dir, tmp_path):
    # 6 good pairs + 2 whose chosen == rejected: r_c - r_r is 0 for any weights, so such a pair
    # has no gradient and is never counted accurate (was: trained on and evaluated, silently)
    same = [{"prompt": "1+1=", "chosen": "2", "rejected": "2"}, {"prompt": "2+2=", "chosen": "x4", "rejected": "x4"}]
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS[:3] + same + PAIRS[3:])
    with pytest.warns(UserWarning, match=r"pairs\.jsonl: left out 2 pairs whose chosen and rejected"):
        trainer = rm_trainer(tiny_model_dir, data, tmp_path)
    assert len(trainer.pairs) == 6
    only_same = write_jsonl(tmp_path / "same.jsonl", same)
    with pytest.warns(UserWarning), pytest.raises(UserError, match=r"same\.jsonl: no pair whose chosen and rejected"):
        rm_trainer(tiny_model_dir, only_same, tmp_path)


@pytest.mark.parametrize("bad, match", [
    ({"prompt": "1+1=", "responses": ["2"], "ranks": [1]}, r"r\.jsonl: ranking 4: column 'responses': must be a list of 2"),
    ({"prompt": "1+1=", "responses": ["2", "3"], "ranks": [1, 2, 3]}, r"r\.jsonl ranking 4: 'ranks' must be a list of 2"),
    ({"prompt": "1+1=", "responses": ["2", "3"], "ranks": [0, 1]}, r"r\.jsonl ranking 4: ranks must be integers >= 1"),
    ({"prompt": "1+1=", "responses": ["2", "3"]}, r"r\.jsonl: ranking 4: column 'ranks' is missing"),
])
def test_rm_bad_ranking_is_a_one_line_user_error(tiny_model_dir, tmp_path, bad, match):
    # (was: a ValueError, shown with a traceback by the command line)
    data = write_jsonl(tmp_path / "r.jsonl", RANKINGS[:3] + [bad] + RANKINGS[3:])
    with pytest.raises(UserError, match=match):
        rm_trainer(tiny_model_dir, data, tmp_path)


def test_rm_settings_that_do_not_fit_the_data_are_config_errors(tiny_model_dir, tmp_path):
    from trustrl.config import ConfigError

    rankings = write_jsonl(tmp_path / "r.jsonl", RANKINGS)
    pairs = write_jsonl(tmp_path / "p.jsonl", PAIRS)
    with pytest.raises(ConfigError, match="center_rewards_coef is defined on pairs"):
        rm_trainer(tiny_model_dir, rankings, tmp_path, center_rewards_coef=0.01)
    with pytest.raises(ConfigError, match="must both hold pairs or both hold rankings"):
        rm_trainer(tiny_model_dir, pairs, tmp_path, eval_dataset=str(rankings))


# ------------------------------------------------------------------------------------------
# SFT: chat rows
# ------------------------------------------------------------------------------------------

CHAT = [{"messages": [{"role": "user", "content": f"{i}+1="}, {"role": "assistant", "content": str(i + 1)}]}
        for i in range(4)]


def sft_trainer(tiny_model_dir, dataset: Path, tmp_path, chat_template: bool, **overrides):
    from transformers import AutoTokenizer

    from trustrl.config import SFTConfig
    from trustrl.trainers.sft import SFTTrainer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    if chat_template:
        tok.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    cfg = SFTConfig(model=str(tiny_model_dir), dataset=str(dataset), output_dir=str(tmp_path / "sft"), max_steps=1,
                    batch_size=2, max_length=32, device="cpu", progress=False, tensorboard=False, **overrides)
    return SFTTrainer(cfg, tokenizer=tok)


@pytest.mark.parametrize("last, shown", [
    ({"role": "assistant", "content": ""}, "got ''"),  # (was: trained on EOS alone, silently)
    ({"role": "assistant", "content": 7}, "got 7"),  # (was: a tokenizer ValueError traceback)
    ({"role": "assistant"}, "got None"),  # (was: KeyError 'content')
])
def test_sft_chat_row_whose_assistant_message_has_no_text(tiny_model_dir, tmp_path, last, shown):
    bad = {"messages": [{"role": "user", "content": "1+1="}, last]}
    data = write_jsonl(tmp_path / "chat.jsonl", CHAT[:2] + [bad] + CHAT[2:])
    with pytest.raises(UserError, match=r"chat\.jsonl: line 3: column 'messages': the last \(assistant\) message "
                                        rf"needs a non-empty string 'content', {shown}"):
        sft_trainer(tiny_model_dir, data, tmp_path, chat_template=True)
    # skip_bad_rows: left out and counted, like every other malformed row
    with pytest.warns(UserWarning, match="skipped 1 malformed rows"):
        trainer = sft_trainer(tiny_model_dir, data, tmp_path, chat_template=True, skip_bad_rows=True)
    assert len(trainer.examples) == 4 and trainer.skipped_rows == 1


def test_sft_chat_rows_without_a_chat_template_and_malformed_messages(tiny_model_dir, tmp_path):
    # (both were ValueError tracebacks from format_prompt, naming neither file nor row)
    data = write_jsonl(tmp_path / "chat.jsonl", CHAT)
    with pytest.raises(UserError, match=rf"chat\.jsonl: line 1: column 'messages': chat messages need a chat "
                                        rf"template and the tokenizer in {tiny_model_dir} has none"):
        sft_trainer(tiny_model_dir, data, tmp_path, chat_template=False)
    bad = {"messages": [{"role": "user"}, {"role": "assistant", "content": "2"}]}
    data = write_jsonl(tmp_path / "chat2.jsonl", CHAT + [bad])
    with pytest.raises(UserError, match=r"chat2\.jsonl: line 5: column 'messages': chat message 0 is not a"):
        sft_trainer(tiny_model_dir, data, tmp_path, chat_template=True)


# ------------------------------------------------------------------------------------------
# PPO / TRPO settings and critics
# ------------------------------------------------------------------------------------------


def test_trpo_settings_that_would_be_ignored_or_cut_are_refused():
    from trustrl.config import ConfigError, TRPOConfig, build_config

    base = dict(model="m", dataset="d", prompts_per_step=2, group_size=4)  # rollout batch 8
    # (was: accepted; the critic directory unused with group advantages, the minibatch cut to the batch)
    with pytest.raises(ConfigError, match="critic_init: only used with advantage: gae"):
        build_config(TRPOConfig, dict(base, critic_init="rm_dir"))
    with pytest.raises(ConfigError, match="critic_model: only used with advantage: gae"):
        build_config(TRPOConfig, dict(base, critic_model="lm_dir"))
    with pytest.raises(ConfigError, match=r"value_minibatch_size \(9\) is larger than the rollout batch .* = 8"):
        build_config(TRPOConfig, dict(base, advantage="gae", value_minibatch_size=9))
    assert build_config(TRPOConfig, dict(base, advantage="gae", value_minibatch_size=8)).value_minibatch_size == 8


def test_trpo_layers_and_sharding_it_cannot_do_are_config_errors(tiny_model_dir, addition_data, tmp_path):
    from trustrl.algorithms.trpo import TRPOTrainer
    from trustrl.config import ConfigError, TRPOConfig

    def config(**overrides):
        return TRPOConfig(model=str(tiny_model_dir), dataset=str(addition_data["rl"]), output_dir=str(tmp_path / "t"),
                          max_steps=1, prompts_per_step=2, group_size=2, max_completion_length=4, device="cpu",
                          progress=False, tensorboard=False, rewards=[{"name": "exact_answer"}], **overrides)

    # (both were plain ValueErrors: a traceback on the command line)
    with pytest.raises(ConfigError, match=r"trpo_params='last_layers:5': the model has only 1 decoder layers"):
        TRPOTrainer(config(trpo_params="last_layers:5"))
    with pytest.raises(ConfigError, match="parallelism.strategy=fsdp: trpo does not support sharded models"):
        TRPOTrainer(config(parallelism={"strategy": "fsdp"}))


def test_ppo_critic_of_another_vocabulary_names_the_key(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    from trustrl.algorithms.ppo import make_critic
    from trustrl.config import PPOConfig
    from trustrl.tiny import create_tiny_model_dir

    # more tokens than the policy's vocabulary, so its embedding has a row for every policy id
    other = create_tiny_model_dir(tmp_path / "other", chars=string.ascii_letters + string.digits, seed=0, hidden_size=32, num_layers=1,
                                  num_heads=2, max_position_embeddings=64)
    policy_tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    base = dict(model=str(tiny_model_dir), dataset="d", prompts_per_step=4, minibatch_size=4)
    # a causal LM of another vocabulary: the critic would read the policy's ids with other meanings
    # (was: accepted when its embedding had enough rows)
    with pytest.raises(UserError, match=rf"critic_model: {other}: its tokenizer differs from the policy's"):
        make_critic(PPOConfig(**base, critic_model=str(other)), policy_tok, "cpu")
    # a plain causal LM where a reward model is expected: the error says which setting
    with pytest.raises(UserError, match=rf"critic_init: {tiny_model_dir} is not a trustrl scalar model"):
        make_critic(PPOConfig(**base, critic_init=str(tiny_model_dir)), policy_tok, "cpu")


# ------------------------------------------------------------------------------------------
# the rankings of the README's loop: `trustrl label --judge` then `trustrl train rm`
# ------------------------------------------------------------------------------------------


def test_label_judge_exits_cleanly_and_its_rankings_train_a_reward_model(tiny_model_dir, addition_data, tmp_path):
    import os
    import subprocess
    import sys

    out = tmp_path / "judgements.jsonl"
    cmd = [sys.executable, "-m", "trustrl", "label", "--model", str(tiny_model_dir), "--prompts",
           str(addition_data["rl"]), "--k", "4", "--out", str(out), "--max-new-tokens", "6", "--judge",
           "trustrl.tasks.rank_feedback:scripted_annotator", "--limit", "5", "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "TRUSTRL_NO_PROGRESS": "1"})
    # (was: exit 134, "terminate called without an active exception": the sampler thread, still
    # sampling ahead inside torch, was not joined before the interpreter exited)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "terminate called" not in proc.stderr
    trainer = rm_trainer(tiny_model_dir, out, tmp_path)
    assert trainer.rankings and len(trainer.pairs) >= 1


# ------------------------------------------------------------------------------------------
# resume
# ------------------------------------------------------------------------------------------


def test_resume_with_max_steps_below_the_checkpoint_is_refused(tiny_model_dir, addition_data, tmp_path):
    from trustrl.config import ConfigError, SFTConfig
    from trustrl.trainers.sft import SFTTrainer

    def config(**overrides):
        return SFTConfig(model=str(tiny_model_dir), dataset=str(addition_data["sft"]), output_dir=str(tmp_path / "s"),
                         batch_size=4, max_length=32, device="cpu", progress=False, tensorboard=False, **overrides)

    SFTTrainer(config(max_steps=3)).train()  # its checkpoint: step 3
    # (was: accepted; the run "finished" at step 3 with max_steps=2 and rewrote final/ and config.yaml)
    with pytest.raises(ConfigError, match=r"max_steps=2: the checkpoint to resume \(.*step_000003\) is already at "
                                          r"step 3; set max_steps >= 3"):
        SFTTrainer(config(max_steps=2, resume="auto")).train()
    assert "max_steps: 3" in (tmp_path / "s" / "config.yaml").read_text()
    assert SFTTrainer(config(max_steps=3, resume="auto")).train()["steps"] == 3  # a finished run resumed: a no-op


def test_rm_ranking_that_ranks_one_response_twice_is_counted(tiny_model_dir, tmp_path):
    # "2" ranked 1 and 2 in one ranking: that comparison has r_i - r_j = 0 for any weights
    # (was: trained on and counted as a miss, silently)
    twice = {"prompt": "1+1=", "responses": ["2", "2", "3"], "ranks": [1, 2, 3]}
    tied = {"prompt": "1+1=", "responses": ["2", "2", "3"], "ranks": [1, 1, 3]}  # the same text tied: fine
    data = write_jsonl(tmp_path / "r.jsonl", RANKINGS[:3] + [twice, tied] + RANKINGS[3:])
    with pytest.warns(UserWarning, match=r"r\.jsonl: 1 rankings rank the same response \(same tokens\) at two"):
        trainer = rm_trainer(tiny_model_dir, data, tmp_path)
    assert len(trainer.pairs) == 8  # kept: their other comparisons are sound


def test_a_ppo_critic_is_not_taken_as_a_reward_model(tiny_model_dir, tmp_path):
    from trustrl.models import ModelLoadError
    from trustrl.rewards.reward_model import check_reward_model_dir
    from trustrl.value_model import save_final_scalar_model, scalar_model_from_lm

    critic = scalar_model_from_lm(str(tiny_model_dir), kind="value", zero_head=True, device="cpu")
    critic_dir = save_final_scalar_model(critic, tmp_path / "final_critic")
    # (was: accepted; a critic's value estimates scored the samples as if they were rewards)
    with pytest.raises(ModelLoadError, match=r"final_critic: a value model \(a PPO/TRPO critic"):
        check_reward_model_dir(critic_dir)
    critic.kind = "reward"
    assert check_reward_model_dir(save_final_scalar_model(critic, tmp_path / "rm")) == tmp_path / "rm"


@pytest.mark.parametrize("advantage", ["group", "gae"])
def test_trpo_stopped_by_ctrl_c_resumes_where_the_continuous_run_ends(tiny_model_dir, addition_data, tmp_path,
                                                                      advantage):
    import os
    import signal

    from trustrl.algorithms.trpo import TRPOTrainer
    from trustrl.checkpoint import list_checkpoints
    from trustrl.config import TRPOConfig
    from trustrl.logging import read_metrics

    def count_a(prompts, completions, **columns):
        return [c.count("a") / max(len(c), 1) for c in completions]

    def config(out, **overrides):
        return TRPOConfig(model=str(tiny_model_dir), dataset=str(addition_data["rl"]), output_dir=str(out),
                          max_steps=4, prompts_per_step=2, group_size=4, max_completion_length=4, device="cpu",
                          advantage=advantage, value_minibatch_size=4, learning_rate=1e-2, beta=0.05, seed=1,
                          deterministic=True, progress=False, tensorboard=False, rewards=[], **overrides)

    TRPOTrainer(config(tmp_path / "full"), reward_funcs=[count_a]).train()
    calls = {"n": 0}

    def signalling(prompts, completions, **columns):
        calls["n"] += 1
        if calls["n"] == 2:  # inside step 2, between sampling and the update
            os.kill(os.getpid(), signal.SIGINT)
        return count_a(prompts, completions)

    signalling.__name__ = "count_a"
    stopped = TRPOTrainer(config(tmp_path / "run"), reward_funcs=[signalling]).train()
    assert stopped["stopped_early"] == "SIGINT" and stopped["steps"] == 2
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [2]
    TRPOTrainer(config(tmp_path / "run", resume="auto", allow_changed=["rewards"]), reward_funcs=[count_a]).train()
    keys = ("reward/mean", "trpo/kl", "trpo/surrogate_improvement", "loss/value")
    full, again = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "run")
    assert [r["step"] for r in again] == [r["step"] for r in full] == [1, 2, 3, 4]
    assert [[r.get(k) for k in keys] for r in again] == [[r.get(k) for k in keys] for r in full]


# ------------------------------------------------------------------------------------------
# lengths beyond the model's position table
# ------------------------------------------------------------------------------------------


def test_examples_longer_than_the_models_positions_name_the_setting(tiny_model_dir, addition_data, tmp_path):
    import transformers as tf
    from transformers import AutoTokenizer

    from trustrl.config import ConfigError, PretrainConfig, SFTConfig
    from trustrl.trainers.sft import PretrainTrainer, SFTTrainer

    # GPT-2 has learned positions: a longer block was an IndexError traceback in the first step
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    gpt2 = tmp_path / "gpt2"
    tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=1, n_head=2, n_positions=24,
                                     pad_token_id=tok.pad_token_id)).save_pretrained(gpt2)
    tok.save_pretrained(gpt2)
    common = dict(model=str(gpt2), max_steps=1, batch_size=2, device="cpu", progress=False, tensorboard=False)
    with pytest.raises(ConfigError, match=r"block_size: examples of up to 32 tokens, but the model in .* has "
                                          r"max_position_embeddings=24; set block_size <= 24"):
        PretrainTrainer(PretrainConfig(**common, dataset=str(addition_data["pretrain"]), block_size=32,
                                       output_dir=str(tmp_path / "p")))
    PretrainTrainer(PretrainConfig(**common, dataset=str(addition_data["pretrain"]), block_size=24,
                                   output_dir=str(tmp_path / "p24"))).train()
    # SFT: the longest example decides (prompt "1+1=" + 30 digits + EOS = 35 tokens), not max_length
    data = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "1+1=", "completion": "2"},
                                                {"prompt": "1+1=", "completion": "2" * 30}])
    with pytest.raises(ConfigError, match=r"max_length: examples of up to 35 tokens, .* set max_length <= 24"):
        SFTTrainer(SFTConfig(**common, dataset=str(data), max_length=512, output_dir=str(tmp_path / "s")))
