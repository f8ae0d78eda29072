"""One error style at the command line: every anticipated failure (data, model loading, config,
rewards, sandbox set-up) prints a few lines naming the file / row / key / function and exits
with status 2, without a traceback; ``--debug`` or ``TRUSTRL_DEBUG=1`` adds the traceback.
Reward requirements (a column, an importable ``module:function``, a reward-model directory)
are checked before the policy model loads.

The CLI runs in-process (``trustrl.cli.main``) on real tiny model directories; one case runs
in a fresh interpreter, as a user would."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from trustrl import cli

BASE = {"output_dir": None, "max_steps": 1, "prompts_per_step": 2, "group_size": 2, "max_completion_length": 3,
        "max_prompt_length": 16, "beta": 0.0, "progress": False, "tensorboard": False, "device": "cpu",
        "sample_every": 0}


def write_config(tmp_path: Path, model: Path, dataset: Path | str, **extra) -> Path:
    import yaml

    data = {**BASE, "output_dir": str(tmp_path / "run"), "model": str(model), "dataset": str(dataset), **extra}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out + out.err


def assert_clean(code: int, text: str, *names: str) -> None:
    """Non-zero exit, at most 3 lines, no traceback, every name mentioned."""
    assert code == cli.USER_ERROR_STATUS, text
    assert "Traceback" not in text, text
    lines = [line for line in text.splitlines() if line.strip()]
    assert 1 <= len(lines) <= 3, text
    assert lines[0].startswith("trustrl: "), text
    for name in names:
        assert name in text, (name, text)


@pytest.fixture
def no_policy_load(monkeypatch):
    """Fail the test if the policy model starts loading: the check must come before it."""
    import trustrl.models

    def refuse(*args, **kwargs):
        raise AssertionError("the policy model was loaded before the error")

    monkeypatch.setattr(trustrl.models, "load_policy", refuse)


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    """A module `user_rewards` on sys.path: a reward that fails on answer 3, and one that
    declares a column `solution` (no default, so the dataset must have it)."""
    (tmp_path / "user_rewards.py").write_text(
        "def picky(prompts, completions, answer):\n"
        "    if '3' in answer:\n"
        "        raise KeyError('no rule for 3')\n"
        "    return [0.0] * len(completions)\n"
        "\n"
        "def needs_solution(prompts, completions, solution, **columns):\n"
        "    return [0.0] * len(completions)\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "user_rewards"
    sys.modules.pop("user_rewards", None)


def write_rows(path: Path, rows: list[dict | bytes]) -> Path:
    path.write_bytes(b"".join((json.dumps(r).encode() if isinstance(r, dict) else r) + b"\n" for r in rows))
    return path


ROWS = [{"prompt": "1+2=", "answer": "3"}, {"prompt": "2+2=", "answer": "4"}]


# ------------------------------------------------------------------------------------------
# each anticipated failure: a few clean lines; --debug adds the traceback
# ------------------------------------------------------------------------------------------


def test_missing_dataset(tiny_model_dir, tmp_path, capsys, no_policy_load):
    missing = tmp_path / "nope.jsonl"
    cfg = write_config(tmp_path, tiny_model_dir, missing, rewards=[{"name": "format"}])
    assert_clean(*run_cli(capsys, "train", "grpo", "--config", str(cfg)), str(missing), "no such file")
    code, text = run_cli(capsys, "train", "grpo", "--config", str(cfg), "--debug")
    assert code == 2 and "Traceback" in text and "DataNotFoundError" in text and str(missing) in text.splitlines()[-1]


def test_bad_data_row(tiny_model_dir, tmp_path, capsys, no_policy_load):
    data = write_rows(tmp_path / "rl.jsonl", [ROWS[0], {"question": "1+1="}, ROWS[1]])
    cfg = write_config(tmp_path, tiny_model_dir, data, rewards=[{"name": "format"}])
    assert_clean(*run_cli(capsys, "train", "grpo", "--config", str(cfg)), str(data), "line 2", "column 'prompt'")
    code, text = run_cli(capsys, "--debug", "train", "grpo", "--config", str(cfg))  # --debug before the subcommand
    assert code == 2 and "Traceback" in text


def test_sft_bad_row_and_missing_file(tiny_model_dir, tmp_path, capsys):
    data = write_rows(tmp_path / "sft.jsonl", [{"prompt": "1+1=", "completion": "2"}, {"prompt": "2+2="}])
    args = ["train", "sft", f"model={tiny_model_dir}", f"output_dir={tmp_path / 'sft'}", "max_steps=1",
            "progress=false", "tensorboard=false", "device=cpu"]
    assert_clean(*run_cli(capsys, *args, f"dataset={data}"), str(data), "line 2", "column 'completion'")
    assert_clean(*run_cli(capsys, *args, f"dataset={tmp_path / 'none.jsonl'}"), "none.jsonl")


@pytest.mark.parametrize("damage", ["not_a_directory", "no_config", "bad_weights"])
def test_model_directory_errors_name_the_path(tiny_model_dir, tmp_path, capsys, damage):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    if damage == "not_a_directory":
        shutil.rmtree(model)
        model.write_text("a file, not a model\n")
    elif damage == "no_config":
        (model / "config.json").unlink()
    else:
        (model / "model.safetensors").write_bytes(b"\x00garbage that is not safetensors" * 10)
    data = write_rows(tmp_path / "rl.jsonl", ROWS)
    cfg = write_config(tmp_path, model, data, rewards=[{"name": "format"}])
    assert_clean(*run_cli(capsys, "train", "grpo", "--config", str(cfg)), str(model))
    code, text = run_cli(capsys, "train", "grpo", "--config", str(cfg), "--debug")
    assert code == 2 and "Traceback" in text


def test_config_error_stays_one_message(tmp_path, capsys):
    code, text = run_cli(capsys, "train", "grpo", "model=m", "dataset=d.jsonl", "lerning_rate=0.1")
    assert code == 2 and "Traceback" not in text and "lerning_rate: unknown key" in text


@pytest.mark.parametrize("settings, names", [
    ({"rewards": [{"name": "numeric_answr"}]}, ["unknown reward 'numeric_answr'", "numeric_answer"]),
    ({"rewards": [{"name": "no_such_module_xyz:score"}]}, ["no_such_module_xyz:score", "cannot import module"]),
    ({"rewards": [{"name": "json:no_such_function"}]}, ["json:no_such_function", "no attribute"]),
    ({"rewards": [{"name": "format", "kwargs": {"patern": "x"}}]}, ["reward 'format'", "patern"]),
    ({"rewards": [{"name": "format"}, {"name": "format"}]}, ["two rewards are named 'format'", "alias"]),
    ({"rewards": [{"name": "format", "alias": "fmt"}], "eval_reward": "correct"}, ["eval_reward 'correct'", "['fmt']"]),
])
def test_reward_spec_errors_before_the_model(tiny_model_dir, tmp_path, capsys, no_policy_load, settings, names):
    cfg = write_config(tmp_path, tiny_model_dir, write_rows(tmp_path / "rl.jsonl", ROWS), **settings)
    assert_clean(*run_cli(capsys, "train", "grpo", "--config", str(cfg)), *names)


def test_builtin_reward_needs_a_column_the_dataset_lacks(tiny_model_dir, tmp_path, capsys, no_policy_load,
                                                        reward_module):
    # before: found only after generation, and with reward_on_error=default the run scored 0 silently
    data = write_rows(tmp_path / "rl.jsonl", [{"prompt": "1+1="}, {"prompt": "2+2="}])
    cfg = write_config(tmp_path, tiny_model_dir, data, rewards=[{"name": "exact_answer"}],
                       reward_on_error="default")
    assert_clean(*run_cli(capsys, "train", "grpo", "--config", str(cfg)), "exact_answer", "'answer'", str(data))
    # present in some rows only: the first row lacking it is named
    data = write_rows(tmp_path / "rl2.jsonl", [ROWS[0], {"prompt": "2+2="}])
    cfg = write_config(tmp_path, tiny_model_dir, data, rewards=[{"name": "numeric_answer",
                                                                 "kwargs": {"answer_column": "answer"}}])
    assert_clean(*run_cli(capsys, "train", "grpo", "--config", str(cfg)), "numeric_answer", "'answer'",
                 f"{data} line 2")
    # a user function declaring the column without a default is checked the same way
    cfg = write_config(tmp_path, tiny_model_dir, data, rewards=[{"name": f"{reward_module}:needs_solution"}])
    assert_clean(*run_cli(capsys, "train", "grpo", "--config", str(cfg)), "needs_solution", "'solution'")


def test_reward_model_directory_that_is_not_one(tiny_model_dir, tmp_path, capsys, no_policy_load):
    cfg = write_config(tmp_path, tiny_model_dir, write_rows(tmp_path / "rl.jsonl", ROWS),
                       reward_model=str(tiny_model_dir))  # a causal LM, not a trained reward model
    assert_clean(*run_cli(capsys, "train", "grpo", "--config", str(cfg)), "reward model", str(tiny_model_dir),
                 "trustrl_head.json")
    cfg = write_config(tmp_path, tiny_model_dir, write_rows(tmp_path / "rl.jsonl", ROWS),
                       reward_model=str(tmp_path / "no_rm"))
    assert_clean(*run_cli(capsys, "train", "grpo", "--config", str(cfg)), "no_rm", "not found")


def test_reward_model_is_loaded_only_after_every_requirement(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """A reward-model directory that passes the cheap checks but does not load: a missing column
    is still reported first (nothing loaded yet); with the column, the load error names the file."""
    from trustrl.value_model import FORMAT_NAME, FORMAT_VERSION, HEAD_FILE, META_FILE

    rm = tmp_path / "rm"
    rm.mkdir()
    shutil.copy(tiny_model_dir / "config.json", rm / "config.json")
    (rm / META_FILE).write_text(json.dumps({"format": FORMAT_NAME, "version": FORMAT_VERSION}))
    (rm / HEAD_FILE).write_bytes(b"not safetensors")
    settings = {"rewards": [{"name": "exact_answer"}], "reward_model": str(rm)}
    cfg = write_config(tmp_path, tiny_model_dir, write_rows(tmp_path / "q.jsonl", [{"prompt": "1+1="}]), **settings)
    assert_clean(*run_cli(capsys, "train", "grpo", "--config", str(cfg)), "exact_answer", "'answer'")
    cfg = write_config(tmp_path, tiny_model_dir, write_rows(tmp_path / "rl.jsonl", ROWS), **settings)
    assert_clean(*run_cli(capsys, "train", "grpo", "--config", str(cfg)), str(rm))


def test_reward_failure_during_training(tiny_model_dir, tmp_path, capsys, reward_module):
    data = write_rows(tmp_path / "rl.jsonl", [ROWS[0]] * 2)
    cfg = write_config(tmp_path, tiny_model_dir, data, rewards=[{"name": f"{reward_module}:picky"}])
    assert_clean(*run_cli(capsys, "train", "grpo", "--config", str(cfg)), "reward function 'picky'",
                 "KeyError", "sample 0")
    # (the failed run left its run directory: the second attempt moves it aside)
    code, text = run_cli(capsys, "train", "grpo", "--config", str(cfg), "--debug", "--overwrite")
    assert code == 2 and "Traceback" in text and "RewardError" in text


def test_sandbox_that_cannot_be_set_up(tiny_model_dir, tmp_path, capsys, monkeypatch, no_policy_load):
    import trustrl.rewards.code as code

    def no_sandbox(*args, **kwargs):
        raise code.SandboxError("trustrl.rewards.code.sandbox_capabilities: no sandbox mode works here (test)")

    monkeypatch.setattr(code, "sandbox_capabilities", no_sandbox)
    data = write_rows(tmp_path / "rl.jsonl", [{"prompt": "1+1=", "tests": "assert f() == 2"}])
    cfg = write_config(tmp_path, tiny_model_dir, data, rewards=[{"name": "code_tests"}])
    assert_clean(*run_cli(capsys, "train", "grpo", "--config", str(cfg)), "sandbox_capabilities",
                 "no sandbox mode works here")


def test_a_fresh_interpreter(tiny_model_dir, tmp_path):
    """As a user runs it: nothing but the message on stderr, status 2."""
    cfg = write_config(tmp_path, tiny_model_dir, tmp_path / "nope.jsonl", rewards=[{"name": "format"}])
    env = {k: v for k, v in os.environ.items() if k != "TRUSTRL_DEBUG"}
    cmd = [sys.executable, "-m", "trustrl", "train", "grpo", "--config", str(cfg)]
    plain = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert plain.stderr.strip().splitlines()[-1] == f"trustrl: {tmp_path / 'nope.jsonl'}: no such file or directory"


def test_trustrl_debug_environment_variable(tiny_model_dir, tmp_path, capsys, monkeypatch):
    cfg = write_config(tmp_path, tiny_model_dir, tmp_path / "nope.jsonl", rewards=[{"name": "format"}])
    monkeypatch.setenv("TRUSTRL_DEBUG", "1")
    code, text = run_cli(capsys, "train", "grpo", "--config", str(cfg))
    assert code == 2 and "Traceback (most recent call last)" in text
    monkeypatch.setenv("TRUSTRL_DEBUG", "0")
    assert_clean(*run_cli(capsys, "train", "grpo", "--config", str(cfg)), "nope.jsonl")


def test_a_bug_keeps_its_traceback(monkeypatch, capsys):
    """Only anticipated failures are shortened: anything else is a bug and raises as usual."""
    def broken(args):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(cli, "cmd_config_help", broken)
    with pytest.raises(ZeroDivisionError):
        cli.main(["config-help", "grpo"])
