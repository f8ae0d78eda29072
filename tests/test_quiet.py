"""transformers' own output stays off the user's terminal: no "Loading weights" / "Writing model
shards" bars and no library deprecation warnings around loads and saves, unless TRUSTRL_DEBUG
(the CLI's --debug) asks for everything."""

from __future__ import annotations

import warnings

import pytest


def _load_and_save(model_dir, out):
    from trustrl.models import load_policy, load_tokenizer, save_model

    tok = load_tokenizer(model_dir)
    model = load_policy(model_dir, tokenizer=tok)
    save_model(model, tok, out)


def test_loading_and_saving_print_no_transformers_bars_or_warnings(tiny_model_dir, tmp_path, capfd, monkeypatch):
    from transformers.utils import logging as hf_logging

    monkeypatch.delenv("TRUSTRL_DEBUG", raising=False)
    hf_logging.enable_progress_bar()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _load_and_save(tiny_model_dir, tmp_path / "saved")
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "Writing model shards" not in err, err
    assert [w for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))] == []
    # the process-wide transformers settings are as they were
    assert hf_logging.is_progress_bar_enabled()


def test_debug_shows_transformers_own_output(tiny_model_dir, tmp_path, capfd, monkeypatch):
    # the same calls with TRUSTRL_DEBUG=1 print transformers' bars (so the test above can fail)
    from transformers.utils import logging as hf_logging

    monkeypatch.setenv("TRUSTRL_DEBUG", "1")
    hf_logging.enable_progress_bar()
    _load_and_save(tiny_model_dir, tmp_path / "saved")
    err = capfd.readouterr().err
    assert "Loading weights" in err and "Writing model shards" in err


@pytest.mark.parametrize("debug", [False, True])
def test_cli_run_prints_no_transformers_output_unless_debug(tiny_model_dir, addition_data, tmp_path, debug):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("TRANSFORMERS_VERBOSITY", "TRUSTRL_DEBUG")}
    result = subprocess.run(
        [sys.executable, "-m", "trustrl", "train", "grpo", *(["--debug"] if debug else []), f"model={tiny_model_dir}", f"dataset={addition_data['rl']}",
         f"output_dir={tmp_path / 'run'}", "max_steps=1", "prompts_per_step=2", "group_size=2",
         "max_completion_length=3", "beta=0", "progress=false", "tensorboard=false", "rewards=[{name: numeric_answer}]"],
        capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    noise = [m for m in ("Loading weights", "Writing model shards", "FutureWarning", "DeprecationWarning",
                         "deprecated") if m in result.stderr]
    if debug:
        assert "Loading weights" in noise
    else:
        assert noise == [], result.stderr[-2000:]
