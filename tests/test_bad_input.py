"""Bad input fails early and says where: dataset rows (file + row + column), config keys (key +
allowed values, before any model loads), model directories (ModelLoadError), and reward
functions (function + sample), with the opt-in fallbacks (skip_bad_rows, reward_on_error=
default) counted in a warning and in the metrics. Everything goes through real trainers."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from trustrl.config import ConfigError, GRPOConfig, PretrainConfig, SFTConfig
from trustrl.data import DataError
from trustrl.logging import read_metrics
from trustrl.models import ModelLoadError
from trustrl.rewards.registry import RewardError
from trustrl.algorithms.grpo import GRPOTrainer
from trustrl.trainers.sft import PretrainTrainer, SFTTrainer


def count_a(prompts, completions, **columns):
    return [c.count("a") / max(len(c), 1) for c in completions]


def grpo_config(tiny_model_dir, dataset, tmp_path, **overrides) -> GRPOConfig:
    base = dict(model=str(tiny_model_dir), dataset=str(dataset), output_dir=str(tmp_path / "run"), max_steps=1,
                prompts_per_step=4, group_size=4, max_completion_length=4, max_prompt_length=16, beta=0.0,
                progress=False, tensorboard=False, rewards=[], device="cpu")
    base.update(overrides)
    return GRPOConfig(**base)


def write_lines(path: Path, lines: list[bytes | dict]) -> Path:
    path.write_bytes(b"".join((json.dumps(x).encode() if isinstance(x, dict) else x) + b"\n" for x in lines))
    return path


GOOD = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(3) for b in range(3)]


# ------------------------------------------------------------------------------------------
# dataset rows
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad, column, problem", [
    ({"question": "1+1=", "answer": "2"}, "prompt", "required field missing"),
    ({"prompt": "   ", "answer": "2"}, "prompt", "empty or whitespace-only"),
    ({"prompt": 12, "answer": "2"}, "prompt", "got int"),
    (b'{"prompt": "1+1=\xff\xfe", "answer": "2"}', None, "invalid UTF-8"),
    (b'{"prompt": "1+1=", "answer": ', None, "invalid JSON"),
])
def test_grpo_bad_row_names_file_row_and_column(tiny_model_dir, tmp_path, bad, column, problem):
    data = write_lines(tmp_path / "rl.jsonl", [*GOOD[:2], bad, *GOOD[2:]])
    with pytest.raises(DataError) as err:
        GRPOTrainer(grpo_config(tiny_model_dir, data, tmp_path), reward_funcs=[count_a])
    text = str(err.value)
    assert str(data) in text and "line 3" in text and problem in text
    if column is not None:
        assert f"column {column!r}" in text


def test_a_prompt_encoded_to_no_tokens_names_its_row(tiny_model_dir, tmp_path, monkeypatch):
    # A tokenizer that does not belong to the data (e.g. a custom one reloaded as another class)
    # can encode a prompt to []: the model would then fail deep in its forward with a reshape
    # error. Stand-in: the encoder returns no ids for the third row's prompt only.
    import trustrl.loop.experience as experience

    real = experience.encode_prompt

    def encode(tokenizer, prompt, **kw):
        text, ids = real(tokenizer, prompt, **kw)
        return (text, []) if prompt == GOOD[2]["prompt"] else (text, ids)

    monkeypatch.setattr(experience, "encode_prompt", encode)
    data = write_lines(tmp_path / "rl.jsonl", GOOD)
    with pytest.raises(DataError, match=r"rl\.jsonl: line 3: column 'prompt': .*no tokens at all"):
        GRPOTrainer(grpo_config(tiny_model_dir, data, tmp_path), reward_funcs=[count_a])


def test_grpo_renamed_prompt_column_is_type_checked(tiny_model_dir, tmp_path):
    # load_rows checks the text of a column named "prompt"; PromptSet checks a renamed one
    for bad, where, problem in [(5, "line 2", "expected str or list, got int"),
                                ("  ", "line 2", "empty or whitespace-only"),
                                (["not", "messages"], "line 2", "chat")]:
        data = write_lines(tmp_path / "rl.jsonl", [{"question": "1+1="}, {"question": bad}])
        with pytest.raises(DataError, match=rf"rl\.jsonl: {where}: column 'question': .*{problem}"):
            GRPOTrainer(grpo_config(tiny_model_dir, data, tmp_path, prompt_column="question"), reward_funcs=[count_a])


def test_grpo_skip_bad_rows_warns_and_reports_the_count(tiny_model_dir, tmp_path):
    bad = [{"answer": "1"}, {"prompt": ""}, {"prompt": 3}, b"\xff\xfe{}", b"[1, 2]"]
    data = write_lines(tmp_path / "rl.jsonl", [GOOD[0], *bad[:2], *GOOD[1:5], *bad[2:], *GOOD[5:]])
    cfg = grpo_config(tiny_model_dir, data, tmp_path, skip_bad_rows=True)
    with pytest.warns(UserWarning, match=r"rl.jsonl: skipped 5 malformed rows"):
        trainer = GRPOTrainer(cfg, reward_funcs=[count_a])
    assert len(trainer.prompts) == len(GOOD)
    summary = trainer.train()
    assert summary["data/skipped_rows"] == 5
    first = read_metrics(cfg.output_dir)[0]
    assert first["step"] == 1 and first["data/skipped_rows"] == 5


def test_sft_and_pretrain_bad_rows(tiny_model_dir, tmp_path):
    rows = [{"prompt": "1+1=", "completion": "2"}, {"prompt": "2+2="}, {"prompt": "3+3=", "completion": "6"}]
    data = write_lines(tmp_path / "sft.jsonl", rows)
    cfg = SFTConfig(model=str(tiny_model_dir), dataset=str(data), output_dir=str(tmp_path / "sft"), max_steps=1,
                    batch_size=2, progress=False, tensorboard=False)
    with pytest.raises(DataError, match=r"sft\.jsonl: line 2: column 'completion': required field missing"):
        SFTTrainer(cfg)
    cfg.skip_bad_rows = True
    with pytest.warns(UserWarning, match="skipped 1 malformed rows"):
        trainer = SFTTrainer(cfg)
    assert trainer.train()["data/skipped_rows"] == 1
    assert read_metrics(cfg.output_dir)[0]["data/skipped_rows"] == 1

    text = write_lines(tmp_path / "pre.jsonl", [{"text": "1+1=2"}, {"text": [{"role": "user", "content": "1+1=2"}]}])
    pre = PretrainConfig(model=str(tiny_model_dir), dataset=str(text), output_dir=str(tmp_path / "pre"),
                         max_steps=1, block_size=4, progress=False, tensorboard=False)
    with pytest.raises(DataError, match=r"pre\.jsonl: line 2: column 'text': expected str, got list"):
        PretrainTrainer(pre)


# ------------------------------------------------------------------------------------------
# configuration
# ------------------------------------------------------------------------------------------


def test_cli_config_errors_name_keys_and_allowed_values_before_the_model(tmp_path):
    missing_model = tmp_path / "no-such-model"
    result = subprocess.run(
        [sys.executable, "-m", "trustrl", "train", "grpo", f"model={missing_model}", "dataset=x.jsonl",
         "lerning_rate=0.1", "group_size=1", "loss_aggregation=sum", "temperature=0", "lora.rr=8"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    err = result.stderr
    # the typo, with the closest known key
    assert "lerning_rate: unknown key; did you mean learning_rate?" in err
    assert "group_size" in err and "greater than or equal to 2" in err
    assert "loss_aggregation" in err and "'seq_mean', 'token_mean' or 'seq_sum_constant'" in err and "'sum'" in err
    assert "temperature" in err and "greater than 0" in err
    assert "lora.rr: unknown key; did you mean r?" in err  # among the keys of the lora section
    assert str(missing_model) not in err and "ModelLoadError" not in err  # the model was never looked at


def test_unknown_reward_and_resume_typo_fail_before_the_model(tmp_path):
    missing = str(tmp_path / "no-such-model")
    cfg = GRPOConfig(model=missing, dataset="x.jsonl", rewards=[{"name": "numeric_answr"}])
    with pytest.raises(ValueError, match=r"unknown reward 'numeric_answr'; built-in rewards are .*numeric_answer"):
        GRPOTrainer(cfg)
    cfg = GRPOConfig(model=missing, dataset="x.jsonl", rewards=[{"name": "format"}], resume="atuo")
    with pytest.raises(ConfigError, match="resume: 'atuo'.*allowed values: 'never', 'auto'"):
        GRPOTrainer(cfg)


# ------------------------------------------------------------------------------------------
# model directories
# ------------------------------------------------------------------------------------------


def test_model_dir_without_tokenizer(tiny_model_dir, addition_data, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(tiny_model_dir, bare)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (bare / name).unlink(missing_ok=True)
    with pytest.raises(ModelLoadError, match=r"no tokenizer in .*bare"):
        GRPOTrainer(grpo_config(bare, addition_data["rl"], tmp_path), reward_funcs=[count_a])
    with pytest.raises(ModelLoadError, match="no tokenizer in"):
        SFTTrainer(SFTConfig(model=str(bare), dataset=str(addition_data["sft"]), output_dir=str(tmp_path / "s")))


def test_vocabulary_larger_than_the_embedding(tiny_model_dir, addition_data, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trustrl.tasks.arithmetic import CHARS, SPECIAL_TOKENS
    from trustrl.tiny import build_char_tokenizer

    mismatched = tmp_path / "mismatched"
    shutil.copytree(tiny_model_dir, mismatched)
    rows = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).get_input_embeddings().weight.shape[0]
    big = build_char_tokenizer(CHARS + "abc\n" + "XYZWVUT", SPECIAL_TOKENS)  # 7 more characters
    assert len(big) > rows
    big.save_pretrained(str(mismatched))
    expected = rf"vocabulary mismatch in .*mismatched: the tokenizer has {len(big)} tokens but the model's embedding has {rows} rows"
    with pytest.raises(ModelLoadError, match=expected):
        GRPOTrainer(grpo_config(mismatched, addition_data["rl"], tmp_path), reward_funcs=[count_a])
    with pytest.raises(ModelLoadError, match=expected):
        PretrainTrainer(PretrainConfig(model=str(mismatched), dataset=str(addition_data["pretrain"]),
                                       output_dir=str(tmp_path / "p")))
    # a model object handed to the trainer is checked too
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    tok = AutoTokenizer.from_pretrained(str(mismatched))
    with pytest.raises(ModelLoadError, match="the model passed to GRPOTrainer"):
        GRPOTrainer(grpo_config(tiny_model_dir, addition_data["rl"], tmp_path), reward_funcs=[count_a],
                    model=model, tokenizer=tok)
    with pytest.raises(ModelLoadError, match="the model passed to SFTTrainer"):
        SFTTrainer(SFTConfig(model=str(tiny_model_dir), dataset=str(addition_data["sft"]),
                             output_dir=str(tmp_path / "s")), model=model, tokenizer=tok)


def test_model_dir_without_weights(tiny_model_dir, addition_data, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"could not load the model in .*broken"):
        GRPOTrainer(grpo_config(broken, addition_data["rl"], tmp_path), reward_funcs=[count_a])


# ------------------------------------------------------------------------------------------
# reward functions, through a real GRPO step
# ------------------------------------------------------------------------------------------


def explode(prompts, completions, **columns):
    raise ZeroDivisionError("the grader divided by zero")


def picky(prompts, completions, answer, **columns):
    """Fails on one kind of row only, so the batch call fails and the search finds the sample."""
    for a in answer:
        if a == "7":
            raise KeyError(f"no grading rule for answer {a}")
    return [0.5] * len(completions)


def one_short(prompts, completions, **columns):
    return [0.0] * (len(completions) - 1)


def nan_reward(prompts, completions, **columns):
    return [0.0] * (len(completions) - 1) + [math.nan]


@pytest.mark.parametrize("fn, pattern", [
    (explode, r"reward function 'explode' raised ZeroDivisionError: the grader divided by zero at sample 0 \(completion:"),
    (one_short, r"reward function 'one_short' returned 15 values, expected 16"),
    (nan_reward, r"reward function 'nan_reward' returned nan at sample 15 \(completion:"),
])
def test_reward_faults_name_the_function_and_sample(tiny_model_dir, addition_data, tmp_path, fn, pattern):
    trainer = GRPOTrainer(grpo_config(tiny_model_dir, addition_data["rl"], tmp_path), reward_funcs=[count_a, fn])
    with pytest.raises(RewardError, match=pattern) as err:
        trainer.train()
    assert err.value.function == fn.__name__


def test_reward_fault_isolated_to_one_sample(tiny_model_dir, addition_data, tmp_path):
    # every prompt in this file has answer 7 except the first rows; the sampler will hit one
    rows = [{"prompt": f"{a}+{7 - a}=", "answer": "7"} for a in range(8)]
    data = write_lines(tmp_path / "rl.jsonl", rows)
    trainer = GRPOTrainer(grpo_config(tiny_model_dir, data, tmp_path), reward_funcs=[picky])
    with pytest.raises(RewardError, match=r"reward function 'picky' raised KeyError: .*no grading rule for answer 7.* at sample 0") as err:
        trainer.train()
    assert err.value.sample_index == 0


def test_reward_on_error_default_counts_warns_and_logs(tiny_model_dir, addition_data, tmp_path):
    cfg = grpo_config(tiny_model_dir, addition_data["rl"], tmp_path, max_steps=2, reward_on_error="default",
                      reward_default=-1.0)
    trainer = GRPOTrainer(cfg, reward_funcs=[count_a, explode])
    with pytest.warns(UserWarning, match=r"reward function 'explode' failed on 16 of 16 samples; they got reward_default=-1.0"):
        summary = trainer.train()
    rows = read_metrics(cfg.output_dir)
    assert [r["reward/explode/faults"] for r in rows] == [16.0, 16.0]
    assert [r["reward/count_a/faults"] for r in rows] == [0.0, 0.0]
    assert [r["reward/explode/mean"] for r in rows] == [-1.0, -1.0]
    assert summary["reward_faults"] == {"count_a": 0, "explode": 32}


def test_hanging_reward_hits_the_time_limit(tiny_model_dir, addition_data, tmp_path):
    release = threading.Event()

    def hang(prompts, completions, **columns):
        release.wait(60)
        return [0.0] * len(completions)

    try:
        cfg = grpo_config(tiny_model_dir, addition_data["rl"], tmp_path, reward_timeout_s=0.3)
        with pytest.raises(RewardError, match=r"reward function 'hang' exceeded timeout 0.3 s"):
            GRPOTrainer(cfg, reward_funcs=[count_a, hang]).train()
        cfg = grpo_config(tiny_model_dir, addition_data["rl"], tmp_path / "default", reward_timeout_s=0.3,
                          reward_on_error="default")
        with pytest.warns(UserWarning, match="'hang' failed on 16 of 16"):
            summary = GRPOTrainer(cfg, reward_funcs=[count_a, hang]).train()
        assert summary["reward_faults"]["hang"] == 16
    finally:
        release.set()  # let the abandoned worker threads finish


# ------------------------------------------------------------------------------------------
# found by a new-user audit of the README's GRPO section: each printed a traceback (or a
# misleading line) before
# ------------------------------------------------------------------------------------------


def cli_error(capsys, *argv: str) -> str:
    """Run the CLI in-process; assert the one error style (status 2, 1-2 lines starting
    "trustrl: ", no traceback) and return the text."""
    from trustrl import cli

    capsys.readouterr()
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    text = captured.out + captured.err
    lines = [line for line in text.splitlines() if line.strip()]
    assert code == cli.USER_ERROR_STATUS, text
    assert "Traceback" not in text and 1 <= len(lines) <= 2 and lines[0].startswith("trustrl: "), text
    return text


def user_config(tmp_path: Path, model, dataset, **extra) -> Path:
    import yaml

    data = dict(model=str(model), dataset=str(dataset), output_dir=str(tmp_path / "run"), max_steps=1,
                prompts_per_step=2, group_size=2, max_completion_length=3, max_prompt_length=16, beta=0.0,
                progress=False, tensorboard=False, rewards=[{"name": "numeric_answer"}], **extra)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def _refuse_policy_load(monkeypatch) -> None:
    import trustrl.models

    def refuse(*args, **kwargs):
        raise AssertionError("the policy model was loaded before the error")

    monkeypatch.setattr(trustrl.models, "load_policy", refuse)


def _unavailable_devices() -> list[str]:
    import torch

    out = ["gpu"]  # not a torch device type at all
    if not torch.cuda.is_available():
        out += ["cuda", "cuda:0"]
    mps = getattr(torch.backends, "mps", None)
    if mps is None or not mps.is_available():
        out.append("mps")
    return out


@pytest.mark.parametrize("device", _unavailable_devices())
def test_a_device_this_machine_lacks_is_named_before_the_model(tiny_model_dir, tmp_path, capsys, monkeypatch,
                                                               device):
    # was torch's traceback from inside model loading ("Torch not compiled with CUDA enabled",
    # "Expected one of cpu, cuda, ... device type at start of device string: gpu")
    data = write_lines(tmp_path / "rl.jsonl", GOOD)
    _refuse_policy_load(monkeypatch)
    text = cli_error(capsys, "train", "grpo", "--config", str(user_config(tmp_path, tiny_model_dir, data)),
                     f"device={device}")
    assert f"device={device!r}" in text, text
    assert not (tmp_path / "run").exists()  # nothing written: the same command works once fixed


@pytest.mark.parametrize("below", ["", "sub"])
def test_output_dir_that_is_a_file(tiny_model_dir, tmp_path, capsys, monkeypatch, below):
    # was FileExistsError / NotADirectoryError with a traceback from the first mkdir
    data = write_lines(tmp_path / "rl.jsonl", GOOD)
    (tmp_path / "afile").write_text("not a directory")
    out = tmp_path / "afile" / below if below else tmp_path / "afile"
    _refuse_policy_load(monkeypatch)
    text = cli_error(capsys, "train", "grpo", "--config", str(user_config(tmp_path, tiny_model_dir, data)),
                     f"output_dir={out}")
    assert f"output_dir {out}" in text and "is a file" in text, text
    assert (tmp_path / "afile").read_text() == "not a directory"
    # and from Python, before any model loads
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        GRPOTrainer(grpo_config(tiny_model_dir, data, tmp_path, output_dir=str(out),
                                rewards=[{"name": "numeric_answer"}]))


def test_override_that_is_not_yaml_and_a_yaml_file_that_is_not(tiny_model_dir, tmp_path, capsys):
    # the override was a yaml.parser.ParserError traceback; the file error was 7 lines quoting
    # "<unicode string>" instead of the file's line
    data = write_lines(tmp_path / "rl.jsonl", GOOD)
    config = str(user_config(tmp_path, tiny_model_dir, data))
    text = cli_error(capsys, "train", "grpo", "--config", config, "rewards=[{name: format")
    assert "override 'rewards=[{name: format'" in text and "not valid YAML" in text, text
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: m\nrewards: [unclosed\n", encoding="utf-8")
    text = cli_error(capsys, "train", "grpo", "--config", str(bad))
    # the flow sequence opened on line 2 is still open at the end of the file: line 3, column 1
    assert f"config file {bad} is not valid YAML: line 3, column 1:" in text, text
    assert "<unicode string>" not in text


@pytest.mark.parametrize("kwargs, named", [
    ({"pattern": "(<answer>"}, "pattern '(<answer>' is not a valid regular expression"),
    ({"flags": "DOTAL"}, "unknown regex flag 'DOTAL'"),
])
def test_format_reward_with_a_bad_regex_is_named_before_the_model(tiny_model_dir, tmp_path, capsys, monkeypatch,
                                                                  kwargs, named):
    # the bad pattern was a re.error traceback (re.error is not a ValueError)
    data = write_lines(tmp_path / "rl.jsonl", GOOD)
    _refuse_policy_load(monkeypatch)
    text = cli_error(capsys, "train", "grpo", "--config",
                     str(user_config(tmp_path, tiny_model_dir, data)), f"rewards=[{{name: format, kwargs: {json.dumps(kwargs)}}}]")
    assert "reward 'format'" in text and named in text, text


def test_ctrl_c_before_the_first_checkpoint_does_not_promise_a_resume(tiny_model_dir, tmp_path, capsys,
                                                                      monkeypatch):
    # was "checkpoints already written in OUT are intact (resume with --resume)" when there was
    # no OUT at all, and --resume then refuses ("holds no run to resume")
    import trustrl.algorithms.grpo as grpo_module
    from trustrl import cli

    class Interrupted:
        def __init__(self, config):
            self.config = config

        def train(self):
            raise KeyboardInterrupt

    monkeypatch.setattr(grpo_module, "GRPOTrainer", Interrupted)
    data = write_lines(tmp_path / "rl.jsonl", GOOD)
    config = str(user_config(tmp_path, tiny_model_dir, data))
    capsys.readouterr()
    assert cli.main(["train", "grpo", "--config", config]) == 130
    err = capsys.readouterr().err
    assert "interrupted before the run started" in err and "--resume" not in err, err
    # a run directory with files but no checkpoint: --overwrite, not --resume
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("{}")
    assert cli.main(["train", "grpo", "--config", config]) == 130  # (the stand-in trainer checks no run dir)
    err = capsys.readouterr().err
    assert "before the run's first checkpoint" in err and "--resume" not in err, err
    # with a checkpoint there, --resume is the way on
    (tmp_path / "run" / "checkpoints" / "step_000003").mkdir(parents=True)
    assert cli.main(["train", "grpo", "--config", config, "--resume"]) == 130
    err = capsys.readouterr().err
    assert "checkpoints already written" in err and "--resume" in err, err
