"""A run directory never loses work (issue 17, point 1), and every trainer reports alike
(point 2: report.html + plots at the end, the summary as a table).

* a new run where one exists is refused before any model loads, for every trainer, from the
  Python API and the CLI; ``--overwrite`` moves the old run aside whole, never deletes;
* ``--resume`` refuses a change of what the run computes (listing it) unless confirmed with
  ``allow_changed``, lets safe keys change, and keeps every accepted change on record;
* ``--resume`` with nothing to resume from is an error, never a silent fresh start;
* time-based checkpoints (``save_every_minutes``) change when checkpoints are written, never a
  number of the run.
"""

from __future__ import annotations

import json
import math
from unittest.mock import patch
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from trustrl.checkpoint import list_checkpoints
from trustrl.cli import TRAINERS, _config_class
from trustrl.cli import main as cli_main
from trustrl.config import GRPOConfig, SFTConfig
from trustrl.logging import format_summary, read_metrics
from trustrl.trainers.run_dir import RunDirError, aside_path, config_changes
from trustrl.trainers.sft import SFTTrainer


def _sft(tiny_model_dir, addition_data, out, **overrides) -> SFTConfig:
    base = dict(model=str(tiny_model_dir), dataset=str(addition_data["sft"]), output_dir=str(out), batch_size=4,
                max_length=32, max_steps=2, save_every=1, progress=False, tensorboard=False, seed=0, device="cpu",
                learning_rate=1e-3)
    return SFTConfig(**{**base, **overrides})


def _sft_args(tiny_model_dir, addition_data, out, *extra: str) -> list[str]:
    return ["train", "sft", f"model={tiny_model_dir}", f"dataset={addition_data['sft']}", f"output_dir={out}",
            "batch_size=4", "max_length=32", "max_steps=2", "save_every=1", "progress=false", "tensorboard=false",
            "device=cpu", "learning_rate=1e-3", *extra]


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------ a new run over an old one


@pytest.mark.parametrize("algo", sorted(TRAINERS))
def test_a_new_run_over_an_existing_one_is_refused_before_the_model_loads(tmp_path, algo):
    import importlib

    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss/nll": 2.0}\n')
    cfg = _config_class(algo)(model=str(tmp_path / "no-such-model"), dataset=str(tmp_path / "x.jsonl"),
                              output_dir=str(out))
    trainer_cls = getattr(importlib.import_module(TRAINERS[algo][0]), TRAINERS[algo][1])
    # the model directory does not exist: any other order would fail on it instead
    with pytest.raises(RunDirError, match=r"already holds a run \(metrics.jsonl\); continue it with --resume, start "
                                          r"a new one in another output_dir, or pass --overwrite to move it aside to "
                                          r".*run.previous-1"):
        trainer_cls(cfg)
    assert _files(out) == {"metrics.jsonl": b'{"step": 1, "loss/nll": 2.0}\n'}  # untouched


def test_overwrite_moves_the_old_run_aside_whole(tiny_model_dir, addition_data, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TRUSTRL_NO_REPORT", raising=False)  # reports are part of the run here
    out = tmp_path / "run"
    SFTTrainer(_sft(tiny_model_dir, addition_data, out, tensorboard=True)).train()
    first = _files(out)
    assert {"config.yaml", "metrics.jsonl", "train_summary.json", "report.html"} <= set(first)
    assert any(k.startswith("tb/") for k in first) and any(k.startswith("checkpoints/step_000002/") for k in first)

    capsys.readouterr()
    # the CLI without --overwrite: two lines on stderr, exit 2, no traceback, nothing touched
    assert cli_main(_sft_args(tiny_model_dir, addition_data, out, "max_steps=1")) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 2
    assert f"output_dir {out} already holds a run" in err and "--overwrite" in err and "--resume" in err
    assert _files(out) == first

    # with --overwrite: the whole old run, byte for byte, in run.previous-1; a new run in run/
    assert cli_main(_sft_args(tiny_model_dir, addition_data, out, "max_steps=1", "tensorboard=true",
                              "--overwrite")) == 0
    printed = capsys.readouterr().out
    assert _files(tmp_path / "run.previous-1") == first
    assert [r["step"] for r in read_metrics(out)] == [1]
    assert len(list((out / "tb").iterdir())) == 1  # TensorBoard: this run's events only
    saved = (out / "config.yaml").read_text()
    assert "overwrite: false" in saved and "resume: never" in saved  # actions are not settings
    # the summary prints as a table, not a Python dict
    assert "{'" not in printed and f"trustrl train sft: {out}" in printed
    assert any(line.split() == ["steps", "1"] for line in printed.splitlines())

    # once more from Python: previous-2, previous-1 untouched
    SFTTrainer(_sft(tiny_model_dir, addition_data, out, max_steps=1, overwrite=True)).train()
    assert _files(tmp_path / "run.previous-1") == first
    assert (tmp_path / "run.previous-2" / "metrics.jsonl").is_file()
    assert aside_path(out) == tmp_path / "run.previous-3"


def test_overwrite_refuses_to_move_the_inputs_away(tiny_model_dir, addition_data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("seed: 0\n")
    (out / "data.jsonl").write_text((addition_data["sft"]).read_text())
    cfg = _sft(tiny_model_dir, addition_data, out, dataset=str(out / "data.jsonl"), overwrite=True)
    with pytest.raises(RunDirError, match="dataset .*data.jsonl lies inside output_dir"):
        SFTTrainer(cfg)
    with pytest.raises(RunDirError, match="overwrite and resume=auto contradict"):
        SFTTrainer(_sft(tiny_model_dir, addition_data, out, overwrite=True, resume="auto"))


# ------------------------------------------------------------------ resume: what may change


def test_resume_refuses_a_change_of_meaning_unless_confirmed_and_keeps_the_history(tiny_model_dir, addition_data,
                                                                                  tmp_path, capsys):
    out = tmp_path / "run"
    SFTTrainer(_sft(tiny_model_dir, addition_data, out)).train()

    capsys.readouterr()
    # learning rate and batch size changed: refused (CLI: two lines, exit 2), nothing written
    before = _files(out)
    assert cli_main(_sft_args(tiny_model_dir, addition_data, out, "learning_rate=0.01", "batch_size=8",
                              "--resume")) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 2
    assert "learning_rate 0.001 -> 0.01, batch_size 4 -> 8" in err
    assert "--allow-changed learning_rate,batch_size" in err
    assert _files(out) == before
    with pytest.raises(RunDirError, match=r"allow_changed: lerning_rate is not a setting of SFTConfig"):
        SFTTrainer(_sft(tiny_model_dir, addition_data, out, resume="auto", allow_changed=["lerning_rate"]))

    # a safe key (max_steps) may change; the change is recorded before config.yaml takes it
    summary = SFTTrainer(_sft(tiny_model_dir, addition_data, out, resume="auto", max_steps=3)).train()
    assert summary["steps"] == 3 and summary["resumed_from"].endswith("step_000002")
    # confirmed: the learning rate, from the CLI flag
    assert cli_main(_sft_args(tiny_model_dir, addition_data, out, "max_steps=4", "learning_rate=0.01", "--resume",
                              "--allow-changed", "learning_rate")) == 0
    history = [json.loads(line) for line in (out / "config_history.jsonl").read_text().splitlines()]
    assert history[0]["step"] == 2 and history[0]["changed"] == {"max_steps": [2, 3]} and history[0]["confirmed"] == []
    assert history[1]["step"] == 3 and history[1]["confirmed"] == ["learning_rate"]
    assert history[1]["changed"] == {"learning_rate": [0.001, 0.01], "max_steps": [3, 4]}
    assert "learning_rate: 0.01" in (out / "config.yaml").read_text()
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4]


def test_paths_compare_by_what_they_name(tmp_path, monkeypatch, tiny_model_dir):
    monkeypatch.chdir(tmp_path)
    cfg = SFTConfig(model=str(tiny_model_dir), dataset=str(tmp_path / "d.jsonl"), output_dir="run")
    saved = {**cfg.model_dump(mode="json"), "dataset": "d.jsonl", "output_dir": str(tmp_path / "run")}
    assert config_changes(saved, cfg) == []  # relative vs absolute spelling of the same file
    saved["dataset"] = "other.jsonl"
    del saved["lora"]  # a key the saved file lacks counts as its default (None here): no change
    assert config_changes(saved, cfg) == [("dataset", "other.jsonl", str(tmp_path / "d.jsonl"))]


def test_resume_with_nothing_to_resume_from_says_so(tiny_model_dir, addition_data, tmp_path):
    # no run at all
    with pytest.raises(RunDirError, match=r"holds no run to resume; drop --resume"):
        SFTTrainer(_sft(tiny_model_dir, addition_data, tmp_path / "none", resume="auto"))
    # a run stopped before its first checkpoint
    early = tmp_path / "early"
    early.mkdir()
    (early / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(RunDirError, match=r"no checkpoint to resume from .*--overwrite .*early.previous-1"):
        SFTTrainer(_sft(tiny_model_dir, addition_data, early, resume="auto"))
    # only a corrupt checkpoint: found out when it is verified, still an error
    out = tmp_path / "run"
    SFTTrainer(_sft(tiny_model_dir, addition_data, out, max_steps=1)).train()
    (_, ckpt), = list_checkpoints(out)
    (ckpt / "optimizers.pt").write_bytes(b"corrupt")
    with pytest.warns(UserWarning, match="skipping invalid checkpoint"):
        with pytest.raises(RunDirError, match=r"no complete checkpoint to resume from \(1 incomplete or corrupt"):
            SFTTrainer(_sft(tiny_model_dir, addition_data, out, resume="auto", max_steps=2)).train()


# ------------------------------------------------------------------ time-based checkpoints


def _reports(monkeypatch, on: bool) -> None:
    if on:
        monkeypatch.delenv("TRUSTRL_NO_REPORT", raising=False)
    else:
        monkeypatch.setenv("TRUSTRL_NO_REPORT", "1")


def _no_perf(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]


def _same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "final" / "model.safetensors")), load_file(str(b / "final" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_time_based_checkpoints_change_when_not_what(tiny_model_dir, addition_data, tmp_path, monkeypatch):
    assert SFTConfig.model_fields["save_every_minutes"].default == 10.0  # on by default
    # SFT: a tiny interval writes a checkpoint after every step; 0 only at the end
    runs = {}
    for minutes in (0.0, 1e-9):
        _reports(monkeypatch, minutes == 0.0)  # (seconds per report: on for one run of each pair)
        out = tmp_path / f"sft-{minutes}"
        SFTTrainer(_sft(tiny_model_dir, addition_data, out, max_steps=3, save_every=0, save_every_minutes=minutes,
                        keep_last_checkpoints=10)).train()
        runs[minutes] = out
    assert [s for s, _ in list_checkpoints(runs[0.0])] == [3]
    assert [s for s, _ in list_checkpoints(runs[1e-9])] == [1, 2, 3]
    assert _no_perf(read_metrics(runs[0.0])) == _no_perf(read_metrics(runs[1e-9]))
    _same_weights(runs[0.0], runs[1e-9])

    # the RL loop (GRPO, PPO and TRPO share it): the same
    from trustrl.algorithms.grpo import GRPOTrainer

    def count_a(prompts, completions, **columns):
        return [c.count("a") / max(len(c), 1) for c in completions]

    for minutes in (0.0, 1e-9):
        _reports(monkeypatch, minutes == 0.0)
        out = tmp_path / f"grpo-{minutes}"
        cfg = GRPOConfig(model=str(tiny_model_dir), dataset=str(addition_data["rl"]), output_dir=str(out), max_steps=3,
                         prompts_per_step=2, group_size=4, max_completion_length=4, max_prompt_length=16,
                         learning_rate=1e-2, progress=False, tensorboard=False, seed=0, device="cpu",
                         save_every_minutes=minutes, keep_last_checkpoints=10)
        GRPOTrainer(cfg, reward_funcs=[count_a]).train()
        runs[f"grpo{minutes}"] = out
    assert [s for s, _ in list_checkpoints(runs["grpo1e-09"])] == [1, 2, 3]
    assert [s for s, _ in list_checkpoints(runs["grpo0.0"])] == [3]
    assert _no_perf(read_metrics(runs["grpo0.0"])) == _no_perf(read_metrics(runs["grpo1e-09"]))
    _same_weights(runs["grpo0.0"], runs["grpo1e-09"])
    # every trainer writes its report and plots at the end
    for out in (runs[0.0], runs["grpo0.0"]):
        assert (out / "report.html").is_file() and list((out / "plots").glob("*.png"))
        assert json.loads((out / "train_summary.json").read_text())["report"] == str(out / "report.html")
    assert not (runs[1e-9] / "report.html").exists()  # TRUSTRL_NO_REPORT=1 (as report=false)


# ------------------------------------------------------------------ the summary table


def test_the_summary_prints_as_a_table():
    summary = {"steps": 3, "final_loss": 0.123456, "model_dir": "runs/x/final", "resumed_from": None,
               "reward_faults": {}, "eval_history": [{"step": 0}], "data/skipped_rows": 0,
               "extra": {"kl": 0.5}}
    assert format_summary(summary, title="trustrl train sft: runs/x") == (
        "trustrl train sft: runs/x\n"
        "  steps              3\n"
        "  final_loss         0.1235\n"
        "  model_dir          runs/x/final\n"
        "  resumed_from       -\n"
        "  reward_faults      -\n"
        "  data/skipped_rows  0\n"
        "  extra.kl           0.5")


def test_the_demo_refuses_an_earlier_demo_and_moves_it_aside_with_overwrite(tmp_path, capsys):
    from trustrl.tasks.demo import DemoSettings, set_aside_earlier_demo, run_demo

    out = tmp_path / "demo"
    (out / "sft").mkdir(parents=True)
    (out / "sft" / "metrics.jsonl").write_text('{"step": 1}\n')
    before = _files(out)
    with pytest.raises(RunDirError, match=r"holds an earlier demo; pass --overwrite to move it aside to .*demo.previous-1"):
        run_demo(DemoSettings.quick(output_dir=str(out)))
    assert cli_main(["demo", "--quick", "--output-dir", str(out)]) == 2
    assert "Traceback" not in capsys.readouterr().err and _files(out) == before
    set_aside_earlier_demo(out, overwrite=True)  # what --overwrite does first
    assert not out.exists() and _files(tmp_path / "demo.previous-1") == before


def test_a_new_total_is_safe_only_under_a_constant_schedule(tmp_path, tiny_model_dir):
    """max_steps / epochs may change on resume while the learning rate is constant; a linear or
    cosine schedule is laid over the total (lr at step s = f(s / total)), so a new total would
    reshape the rest of it: refused with the reason unless confirmed."""
    from trustrl.trainers.common import lr_multiplier
    from trustrl.trainers.run_dir import CONFIG_FILE, check_run_dir, refused_changes

    # why it matters: cosine over 10 steps at step 5 is 0.5; over 20 steps at step 5, ~0.85
    assert lr_multiplier(5, 10, 0, "cosine") == pytest.approx(0.5)
    assert lr_multiplier(5, 20, 0, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    out = tmp_path / "run"
    (out / "checkpoints" / "step_000002").mkdir(parents=True)
    for schedule, refused in (("constant", False), ("cosine", True), ("linear", True)):
        saved = _sft(tiny_model_dir, {"sft": str(tmp_path / "d.jsonl")}, out, max_steps=2, lr_scheduler=schedule)
        (out / CONFIG_FILE).write_text(yaml.safe_dump(saved.model_dump(mode="json")))
        resumed = saved.model_copy(update={"resume": "auto", "max_steps": 4})
        assert bool(refused_changes(resumed)[2]) is refused, schedule
        confirmed = resumed.model_copy(update={"allow_changed": ["max_steps"]})
        assert refused_changes(confirmed)[2] == []
    with pytest.raises(RunDirError, match=r"max_steps 2 -> 4 \(lr_scheduler linear is laid over the total steps"):
        with patch("trustrl.trainers.run_dir.list_checkpoints", return_value=[out / "checkpoints" / "step_000002"]):
            check_run_dir(resumed)
