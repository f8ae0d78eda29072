"""Config loading (YAML + key=value overrides, errors naming the key) and the command line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from trustrl.config import ConfigError, GRPOConfig, load_config, parse_overrides


def test_overrides_parse_nested_yaml_scalars():
    # "lora.r=8" becomes {"lora": {"r": 8}}; YAML typing turns "0" into int and "null" into None
    assert parse_overrides(["beta=0", "lora.r=8", "clip_high=null", "output_dir=runs/x"]) == {
        "beta": 0, "lora": {"r": 8}, "clip_high": None, "output_dir": "runs/x"}
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["beta"])


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: m\ndataset: d.jsonl\nbeta: 0.1\ngroup_size: 4\nrewards:\n  - name: format\n")
    cfg = load_config(GRPOConfig, path, ["beta=0", "loss_aggregation=seq_mean"])
    assert cfg.beta == 0 and cfg.group_size == 4 and cfg.loss_aggregation == "seq_mean"
    assert cfg.rollout_batch_size == 8 * 4  # derived in one place: prompts_per_step * group_size
    assert cfg.rewards[0].name == "format"


def test_typo_names_the_key_and_allowed_keys(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(GRPOConfig, None, ["model=m", "dataset=d", "betta=0.1"])
    assert "betta: unknown key; did you mean beta? (all keys: trustrl config-help grpo)" in str(err.value)
    with pytest.raises(ConfigError) as err:  # nothing close: the allowed keys
        load_config(GRPOConfig, None, ["model=m", "dataset=d", "xyzzy=1"])
    assert "xyzzy: unknown key; allowed keys: adam_betas, advantage_estimator, allow_changed, beta," in str(err.value)


def test_unknown_keys_get_trls_name_mapping_only_where_the_meaning_is_the_same():
    from trustrl.config import PPOConfig, SFTConfig, TRPOConfig

    def message(cls, key):
        with pytest.raises(ConfigError) as err:
            load_config(cls, None, ["model=m", "dataset=d", f"{key}=1"])
        return str(err.value)

    assert "num_generations: unknown key; TRL's num_generations is group_size here" in message(GRPOConfig, "num_generations")
    assert "TRL's num_generations is samples_per_prompt here" in message(PPOConfig, "num_generations")
    assert "TRL's epsilon is clip_low here" in message(GRPOConfig, "epsilon")
    assert "TRL's epsilon is clip_range here" in message(PPOConfig, "epsilon")
    assert "TRL's loss_type is loss_aggregation here (values: grpo -> seq_mean, dapo -> token_mean" in \
        message(GRPOConfig, "loss_type")
    assert "TRL's num_train_epochs is epochs here" in message(SFTConfig, "num_train_epochs")
    # kl_coef puts the KL term in the reward: beta means that in PPO / TRPO, not in GRPO (a loss term)
    assert "TRL's kl_coef is beta here" in message(PPOConfig, "kl_coef")
    assert "TRL's kl_coef is beta here" in message(TRPOConfig, "kl_coef")
    grpo = message(GRPOConfig, "kl_coef")
    assert "is beta here" not in grpo and "only ppo and trpo have" in grpo
    # a batch size per device per micro-step is not our batch of a whole step: no mapping, a note
    note = message(SFTConfig, "per_device_train_batch_size")
    assert "no exact equivalent here" in note and "batch_size (sft, rm, pretrain)" in note
    # a TRL name whose setting this trainer does not have
    assert "TRL's num_train_epochs is epochs in trustrl, a setting this trainer does not have" in \
        message(GRPOConfig, "num_train_epochs")
    # every mapping names a real key of some trainer
    from trustrl.config import CONFIG_CLASSES
    from trustrl.config.suggest import TRL_NAMES

    all_keys = {k for cls in (GRPOConfig, PPOConfig, TRPOConfig, *CONFIG_CLASSES.values()) for k in cls.model_fields}
    assert {k for ours, _ in TRL_NAMES.values() for k in ours} <= all_keys


def test_out_of_range_and_bad_choice_name_the_key():
    with pytest.raises(ConfigError) as err:
        load_config(GRPOConfig, None, ["model=m", "dataset=d", "group_size=1", "advantage_estimator=median"])
    text = str(err.value)
    assert "group_size" in text and "greater than or equal to 2" in text
    assert "advantage_estimator" in text and "'group_zscore'" in text and "median" in text


def test_every_field_is_documented():
    missing = [name for name, f in GRPOConfig.model_fields.items() if not f.description]
    assert missing == []


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "trustrl", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_cli_rejects_bad_config_before_loading_a_model(tmp_path):
    result = _cli("train", "grpo", "model=/does/not/exist", "dataset=x.jsonl", "clip_low=2")
    assert result.returncode == 2
    assert "clip_low" in result.stderr


def test_cli_trains_grpo_from_yaml(tiny_model_dir, addition_data, tmp_path):
    config = tmp_path / "grpo.yaml"
    config.write_text(
        f"model: {tiny_model_dir}\ndataset: {addition_data['rl']}\neval_dataset: {addition_data['eval']}\n"
        f"output_dir: {tmp_path / 'run'}\nmax_steps: 2\nprompts_per_step: 2\ngroup_size: 2\n"
        "max_completion_length: 4\neval_prompts: 4\nprogress: false\nrewards:\n  - name: numeric_answer\n"
    )
    result = _cli("train", "grpo", "--config", str(config), "beta=0", "save_every=1")
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [0, 1, 2]  # eval at step 0, then one line per step
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    assert (tmp_path / "run" / "checkpoints").is_dir()
    report = _cli("report", str(tmp_path / "run"))
    assert report.returncode == 0 and (tmp_path / "run" / "report.html").is_file()


def test_shipped_configs_validate():
    """Every recipe in configs/ loads into its trainer's config class (typos fail here)."""
    from pathlib import Path

    from trustrl.cli import _config_class

    root = Path(__file__).resolve().parents[1] / "configs"
    files = sorted(root.glob("*.yaml"))
    assert files
    for path in files:
        algo = path.stem.split("_")[0]
        load_config(_config_class(algo), path)


def test_config_help_shows_allowed_values_bounds_and_reward_arguments():
    result = _cli("config-help", "grpo")
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    # a Literal's values, a list of Literals, and bounds as declared (ge / gt / gt + le / ge + lt)
    assert "  lr_scheduler = 'constant'   [one of: constant, linear, cosine]" in out
    assert "  loss_aggregation = 'token_mean'   [one of: seq_mean, token_mean, seq_sum_constant]" in out
    assert "  report_to = ['tensorboard']   [each one of: tensorboard, wandb, trackio]" in out
    assert "  group_size = 8   [>= 2]" in out and "  temperature = 1.0   [> 0]" in out
    assert "  top_p = 1.0   [0 < x <= 1]" in out and "  clip_low = 0.2   [0 <= x < 1]" in out
    # nested sections list their own keys
    assert "LoRAConfig (lora):" in out and "  dropout = 0.0   [0 <= x < 1]" in out
    assert "DataSource (dataset, eval_dataset):" in out and "  weight = 1.0   [> 0]" in out
    # every built-in reward with the arguments of its factory (a pass-through wrapper resolved)
    assert "  length_penalty(target_length: int (required), coef: float = 0.001," in out
    assert "  soft_overlong(max_len: int (required), cache_len: int (required))" in out
    assert "  code_tests(timeout_s: float = 5.0, memory_mb: int = 512, tests_column: str = 'tests'," in out
    assert "  reward_model(path: str | Path (required)," in out
    from trustrl.rewards.registry import BUILTIN_REWARDS

    assert all(f"\n  {name}(" in out for name in BUILTIN_REWARDS)
    # supervised trainers have no rewards section
    sft = _cli("config-help", "sft").stdout
    assert "Built-in rewards" not in sft and "  max_length = 512   [>= 2]" in sft


def test_saved_config_has_absolute_paths_and_resumes_from_another_directory(tiny_model_dir, addition_data, tmp_path):
    import shutil

    from trustrl.config import PPOConfig, absolute_paths, save_config

    # by hand: relative paths are joined to the working directory and normalized
    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    cfg = PPOConfig(model="models/tiny", dataset=["data/a.jsonl", {"path": "data/*.parquet", "weight": 2}],
                    eval_dataset="../held/out.jsonl", critic_init="/abs/rm", output_dir="runs/x",
                    rewards=[{"name": "reward_model", "kwargs": {"path": "rm"}}, {"name": "format"}])
    import os

    here = os.getcwd()
    os.chdir(work)
    try:
        absolute = absolute_paths(cfg)
        save_config(cfg, work / "config.yaml")
    finally:
        os.chdir(here)
    assert absolute.model == f"{work}/models/tiny" and absolute.output_dir == f"{work}/runs/x"
    assert absolute.dataset[0] == f"{work}/data/a.jsonl"
    assert absolute.dataset[1].path == f"{work}/data/*.parquet" and absolute.dataset[1].weight == 2
    assert absolute.eval_dataset == f"{tmp_path}/held/out.jsonl" and absolute.critic_init == "/abs/rm"
    assert absolute.rewards[0].kwargs == {"path": f"{work}/rm"} and absolute.rewards[1].name == "format"
    assert cfg.model == "models/tiny"  # the config itself is left as written
    saved = load_config(PPOConfig, work / "config.yaml")
    assert saved.model_dump() == absolute.model_dump()

    # a run started with relative paths in one directory resumes from its config.yaml in another
    shutil.copytree(tiny_model_dir, work / "tiny")
    shutil.copy(addition_data["rl"], work / "data" / "rl.jsonl")
    first = _cli("train", "grpo", "model=tiny", "dataset=data/rl.jsonl", "output_dir=run", "max_steps=1",
                 "prompts_per_step=2", "group_size=2", "max_completion_length=3", "beta=0", "progress=false",
                 "tensorboard=false", "rewards=[{name: numeric_answer}]", cwd=work)
    assert first.returncode == 0, first.stderr[-2000:]
    text = (work / "run" / "config.yaml").read_text()
    assert f"model: {work}/tiny\n" in text and f"dataset: {work}/data/rl.jsonl\n" in text
    assert f"output_dir: {work}/run\n" in text
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    resumed = _cli("train", "grpo", "--config", str(work / "run" / "config.yaml"), "--resume", "max_steps=2",
                   cwd=elsewhere)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    steps = [json.loads(x)["step"] for x in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2] and not (elsewhere / "run").exists()
