"""The RLHF and TRPO demo pipelines (`trustrl demo --pipeline rlhf|trpo`), in shortened form.

The numbers of the full pipelines are measured by the commands in the README; these tests run
the same code path with tiny budgets and check what a user gets: summary.json with the keys
the README promises, consistent with the run's own metrics.jsonl."""

from __future__ import annotations

import json

import pytest

from trustrl.cli import main as cli_main
from trustrl.tasks.demo import DemoSettings, format_table, run_demo


def _metrics(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_rlhf_pipeline_shortened(tmp_path):
    out = tmp_path / "rlhf"
    summary = run_demo(DemoSettings.quick(output_dir=str(out), pipeline="rlhf"))
    assert summary["pipeline"] == "rlhf"
    assert 0.0 <= summary["rm_heldout_accuracy"] <= 1.0
    assert (out / "rm" / "final").is_dir() and (out / "data" / "prefs_eval.jsonl").is_file()
    # the summary's KL figures are the mean and max of the per-step sequence KL in metrics.jsonl
    kls = [r["kl/ref_sequence"] for r in _metrics(out / "ppo" / "metrics.jsonl") if "kl/ref_sequence" in r]
    assert len(kls) == 3
    assert summary["kl_mean"] == pytest.approx(sum(kls) / 3) and summary["kl_max"] == max(kls)
    assert (out / "ppo" / "report.html").is_file()
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["accuracy_after_rl"] == summary["accuracy_after_rl"]
    table = format_table(summary)
    assert "reward model" in table and f"held-out pair accuracy {summary['rm_heldout_accuracy']:.3f}" in table
    assert f"target {summary['kl_target']:g}" in table


def test_trpo_pipeline_shortened(tmp_path):
    out = tmp_path / "trpo"
    summary = run_demo(DemoSettings.quick(output_dir=str(out), pipeline="trpo"))
    rows = [r for r in _metrics(out / "trpo" / "metrics.jsonl") if "trpo/accepted" in r]
    assert len(rows) == 3
    accepted = [r["trpo/kl"] for r in rows if r["trpo/accepted"]]
    assert summary["trpo_steps_accepted"] == len(accepted)
    assert summary["trpo_steps_rejected"] == 3 - len(accepted)
    if accepted:
        assert summary["trpo_accepted_kl_max"] == max(accepted) <= summary["max_kl"]
    assert f"{len(accepted)} steps accepted" in format_table(summary)


def test_demo_rejects_an_unknown_pipeline(tmp_path):
    with pytest.raises(ValueError, match=r"pipeline must be one of .*'rlhf'.* got 'dpo'"):
        run_demo(DemoSettings.quick(output_dir=str(tmp_path), pipeline="dpo"))
    with pytest.raises(SystemExit):
        cli_main(["demo", "--pipeline", "dpo"])


def test_demo_key_value_overrides(tmp_path, capsys):
    from trustrl.config import ConfigError

    base = DemoSettings()
    changed = base.with_overrides(["grpo_steps=7", "grpo_lr=1", "ppo_target_kl=null", "reverse_answer=false"])
    assert (changed.grpo_steps, changed.grpo_lr, changed.ppo_target_kl, changed.reverse_answer) == (7, 1.0, None, False)
    assert isinstance(changed.grpo_lr, float) and base.grpo_steps == 100  # a copy; the default untouched
    with pytest.raises(ConfigError, match=r"demo setting 'grpo_stepz' does not exist"):
        base.with_overrides(["grpo_stepz=3"])
    assert base.with_overrides(["grpo_lr=1e-4"]).grpo_lr == 1e-4  # YAML reads 1e-4 as a string
    with pytest.raises(ConfigError, match=r"demo setting 'grpo_lr' must be float, got 'fast'"):
        base.with_overrides(["grpo_lr=fast"])
    with pytest.raises(ConfigError, match=r"demo setting 'hidden_size' must be int, got True"):
        base.with_overrides(["hidden_size=true"])
    # from the command line: exit status 2, the key named, nothing written
    out = tmp_path / "never"
    assert cli_main(["demo", "--output-dir", str(out), "sft_steps=many"]) == 2
    assert "demo setting 'sft_steps' must be int, got 'many'" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("pipeline, setting, says", [
    # grpo_steps=-1 surfaced only in the GRPO stage, after minutes of pre-training and SFT
    ("grpo", "grpo_steps=-1", "grpo_steps=-1 must be an integer >= 1"),
    ("rlhf", "sft_carry_slip_rate=2", "sft_carry_slip_rate=2.0 must be a fraction in [0, 1]"),
    ("grpo", "grpo_lr=0", "grpo_lr=0.0 must be > 0"),
    ("grpo", "beta=-0.1", "beta=-0.1 must be >= 0"),
    ("trpo", "trpo_max_kl=.nan", "trpo_max_kl=nan must be a finite number"),
    ("agent", "rl_steps=0", "rl_steps=0 must be an integer >= 1"),
    ("agent", "slip_rate=-0.5", "slip_rate=-0.5 must be a fraction in [0, 1]"),
])
def test_demo_refuses_settings_out_of_range_before_writing(tmp_path, capsys, pipeline, setting, says):
    out = tmp_path / "never"
    assert cli_main(["demo", "--pipeline", pipeline, "--quick", "--output-dir", str(out), setting]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"trustrl: demo setting {says}"], err
    assert not out.exists()


@pytest.mark.parametrize("pipeline", ["grpo", "agent"])
def test_demo_output_dir_that_is_a_file_is_one_line(tmp_path, capsys, pipeline):
    afile = tmp_path / "afile"
    afile.write_text("mine\n")
    assert cli_main(["demo", "--pipeline", pipeline, "--quick", "--output-dir", str(afile)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"trustrl: demo output_dir {afile} is a file, not a directory"], err  # was a FileExistsError traceback
    assert afile.read_text() == "mine\n"


def test_agent_demo_rerun_is_refused_before_it_touches_the_earlier_demo(tmp_path, capsys):
    """The agent demo rewrote data/ and init/ of an earlier demo in the same directory, then the
    SFT stage refused to overwrite sft/: half of the earlier run replaced. Now it is refused
    first, as the other demos are, and --overwrite moves the earlier demo aside whole."""
    out = tmp_path / "demo"
    (out / "data").mkdir(parents=True)
    (out / "data" / "maze_train.jsonl").write_text("earlier\n")
    (out / "summary.json").write_text("{}\n")
    assert cli_main(["demo", "--pipeline", "agent", "--quick", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "holds an earlier demo; pass --overwrite" in err
    assert (out / "data" / "maze_train.jsonl").read_text() == "earlier\n"
    assert sorted(p.name for p in out.iterdir()) == ["data", "summary.json"]


def test_demo_overrides_take_their_type_from_the_field_annotation():
    from trustrl.config import ConfigError

    # ppo_target_kl is `float | None`: null, then a float again (the type is the field's, not
    # the current value's: after null the current value is None)
    off = DemoSettings().with_overrides(["ppo_target_kl=null"])
    assert off.ppo_target_kl is None
    back = off.with_overrides(["ppo_target_kl=0.1"])
    assert back.ppo_target_kl == 0.1 and isinstance(back.ppo_target_kl, float)
    # an int written for an optional float is that float; 1e-3 (YAML text) too
    assert off.with_overrides(["ppo_target_kl=1"]).ppo_target_kl == 1.0
    assert isinstance(off.with_overrides(["ppo_target_kl=1"]).ppo_target_kl, float)
    assert off.with_overrides(["ppo_target_kl=1e-3"]).ppo_target_kl == 0.001
    # torch_threads is `int | None`: null and back to an int; a float or a bool is refused
    none = DemoSettings().with_overrides(["torch_threads=null"])
    assert none.torch_threads is None and none.with_overrides(["torch_threads=4"]).torch_threads == 4
    with pytest.raises(ConfigError, match=r"demo setting 'torch_threads' must be int or null, got 2.5"):
        none.with_overrides(["torch_threads=2.5"])
    with pytest.raises(ConfigError, match=r"demo setting 'torch_threads' must be int or null, got True"):
        none.with_overrides(["torch_threads=true"])
    # a field that is not optional refuses null, naming the field and its type
    with pytest.raises(ConfigError, match=r"demo setting 'grpo_lr' must be float, got None"):
        DemoSettings().with_overrides(["grpo_lr=null"])
    with pytest.raises(ConfigError, match=r"demo setting 'pipeline' must be str, got None"):
        DemoSettings().with_overrides(["pipeline=null"])
    with pytest.raises(ConfigError, match=r"demo setting 'reverse_answer' must be bool, got 1"):
        DemoSettings().with_overrides(["reverse_answer=1"])
    # every field's annotation is one the parser understands (a new field of another type
    # fails here rather than at a user's command line)
    from dataclasses import fields

    for f in fields(DemoSettings):
        value = getattr(DemoSettings(), f.name)
        assert DemoSettings().with_overrides([f"{f.name}={value if value is not None else 'null'}"]) == DemoSettings()


def test_the_demo_is_reproducible_bit_for_bit(tmp_path):
    # same settings and seed, run twice (two CPU threads: a fixed setting, never a timing
    # decision): every logged number except wall-clock times is identical
    import hashlib

    from trustrl.logging import read_metrics

    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        summary = run_demo(DemoSettings.quick(output_dir=str(out), torch_threads=2))
        metrics = [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in read_metrics(out / "grpo")]
        weights = hashlib.sha256((out / "grpo" / "final" / "model.safetensors").read_bytes()).hexdigest()
        runs.append((summary["accuracy_before_rl"], summary["accuracy_after_rl"], metrics, weights))
    assert runs[0][2], "no metrics recorded"
    assert runs[0] == runs[1]


@pytest.mark.parametrize("pipeline, stage, absent", [("grpo", "pretrain", "sft"), ("agent", "sft", "agent")])
def test_a_stage_stopped_by_a_signal_ends_the_demo_there(tmp_path, capsys, monkeypatch, pipeline, stage, absent):
    """Ctrl-C stops a stage cleanly after its current step (a checkpoint, `stopped_early`, no
    final/). The demo handed that unfinished result on: the next stage started from a model
    directory of None. Now the demo ends with exit 130 and says which stage stopped."""
    from trustrl.loop import stops

    monkeypatch.setattr(stops.GracefulStop, "requested", lambda self: True)  # as if SIGINT came during step 1
    out = tmp_path / "demo"
    assert cli_main(["demo", "--pipeline", pipeline, "--quick", "--output-dir", str(out)]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"trustrl demo: the demo stopped during its {stage} stage"), err
    assert "ran 1 steps" in err[-1] and "--overwrite" in err[-1]
    assert not (out / absent).exists() and not (out / "summary.json").exists()
    assert list((out / stage / "checkpoints").iterdir())  # the stopped stage's step is kept
