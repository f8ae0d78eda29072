"""Tests for the trackers (report_to: wandb, trackio) and the per-step sample tables
(trustrl.logging.SampleLog, samples.jsonl).

W&B and trackio are exercised for real and offline, in subprocesses (both keep process-wide
state; trackio reads TRACKIO_DIR once, at import): W&B with WANDB_MODE=offline, its history read
back from the run's ``.wandb`` transaction log with wandb's own protobuf schema; trackio in a
local SQLite store under TRACKIO_DIR=tmp_path, read back with trackio's own reader.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from trustrl.config import ConfigError, GRPOConfig, TrainConfig, load_config
from trustrl.logging import (
    MetricsLogger,
    NullMetricsLogger,
    SampleLog,
    Tracker,
    check_report_to,
    public_config,
    read_metrics,
    read_samples,
)

REPO = Path(__file__).resolve().parents[1]
HAS_WANDB = importlib.util.find_spec("wandb") is not None
HAS_TRACKIO = importlib.util.find_spec("trackio") is not None


# ------------------------------------------------------------------------------ report_to


def test_report_to_default_and_normalization() -> None:
    cfg = TrainConfig(model="m", dataset="d")
    assert cfg.report_to == ["tensorboard"]  # today's behaviour: metrics.jsonl + TensorBoard
    assert GRPOConfig(model="m", dataset="d").sample_every == 10
    assert TrainConfig(model="m", dataset="d", report_to=[]).report_to == []
    # a single name is a one-element list; duplicates are dropped, order kept
    assert check_report_to("tensorboard") == ["tensorboard"]
    assert check_report_to(["tensorboard", "tensorboard"]) == ["tensorboard"]


def test_report_to_unknown_name_refused_with_allowed_list() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(TrainConfig, None, ["model=m", "dataset=d", "report_to=[tensorboard,tensorbored]"])
    msg = str(err.value)
    assert "report_to" in msg and "tensorbored" in msg
    for allowed in ("tensorboard", "wandb", "trackio"):
        assert allowed in msg
    with pytest.raises(ValueError, match=r"unknown tracker 'mlflow'; allowed: tensorboard, wandb, trackio"):
        check_report_to(["mlflow"])


@pytest.mark.parametrize("name", ["wandb", "trackio"])
def test_report_to_missing_package_names_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                    name: str) -> None:
    # The package may well be installed here: hide it from the import system's finder.
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda mod, *a: None if mod == name else real(mod, *a))
    with pytest.raises(ValueError) as err:
        check_report_to(["tensorboard", name])
    assert f"pip install 'trustrl[{name}]'" in str(err.value)
    assert "\n" not in str(err.value)  # one line
    with pytest.raises(ConfigError, match=rf"trustrl\[{name}\]"):
        load_config(TrainConfig, None, ["model=m", "dataset=d", f"report_to={name}"])
    # refused before anything is written
    with pytest.raises(ValueError, match=rf"trustrl\[{name}\]"):
        MetricsLogger(tmp_path / "run", tensorboard=False, report_to=[name])
    assert not (tmp_path / "run").exists()


def test_public_config_drops_secrets_keeps_the_rest() -> None:
    cfg = {"learning_rate": 1e-3, "hub_token": "s3cret", "tokenizer": "tok/dir", "max_tokens": 5,
           "lora": {"r": 4, "api_key": "k", "WANDB_APIKEY": "k2"}, "db_password": "p",
           "rewards": [{"name": "format", "client_secret": "x"}]}
    assert public_config(cfg) == {"learning_rate": 1e-3, "tokenizer": "tok/dir", "max_tokens": 5,
                                  "lora": {"r": 4}, "rewards": [{"name": "format"}]}
    # a pydantic config is dumped to plain JSON types
    dumped = public_config(TrainConfig(model="m", dataset="d", adam_betas=(0.8, 0.9)))
    assert dumped["adam_betas"] == [0.8, 0.9] and dumped["model"] == "m"
    json.dumps(dumped, allow_nan=False)


# ------------------------------------------------------------------------ a tracker stand-in


class Recorder:
    """Implements the Tracker methods and records the calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def log(self, step: int, metrics: Any) -> None:
        self.calls.append(("log", step, dict(metrics)))

    def log_table(self, step: int, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        self.calls.append(("table", step, key, columns, rows))

    def close(self, exit_code: int = 0) -> None:
        self.calls.append(("close", exit_code))


def test_trackers_get_every_logged_record_on_the_same_step_axis(tmp_path: Path) -> None:
    rec = Recorder()
    assert isinstance(rec, Tracker)
    with MetricsLogger(tmp_path, tensorboard=False, trackers=[rec]) as log:
        log.log(1, {"reward/mean": 0.5, "kl/ref": None})
        log.log(7, {"reward/mean": float("nan"), "policy/entropy": 2, "ok": True})
    assert [c[:2] for c in rec.calls] == [("log", 1), ("log", 7), ("close", 0)]
    assert rec.calls[0][2] == {"reward/mean": 0.5}  # None left out (as for TensorBoard)
    second = rec.calls[1][2]
    assert math.isnan(second["reward/mean"]) and second["policy/entropy"] == 2 and second["ok"] == 1
    # metrics.jsonl holds the same steps
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 7]


def test_an_exception_closes_trackers_with_exit_code_1(tmp_path: Path) -> None:
    rec = Recorder()
    with pytest.raises(RuntimeError):
        with MetricsLogger(tmp_path, tensorboard=False, trackers=[rec]):
            raise RuntimeError("boom")
    assert rec.calls == [("close", 1)]


def test_an_object_without_the_tracker_methods_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="lacks log/log_table/close"):
        MetricsLogger(tmp_path, tensorboard=False, trackers=[object()])


def test_null_logger_has_the_loggers_methods() -> None:
    null = NullMetricsLogger()
    for name in ("log", "log_samples", "samples_due", "flush", "close"):
        assert callable(getattr(null, name)) and callable(getattr(MetricsLogger, name))
    assert null.log_samples(10, ["p"], ["c"], [1.0], {}) is False


# ------------------------------------------------------------------------------ sample tables


def _rows(n: int, step: int) -> tuple[list[str], list[str], list[float], dict[str, list[float]]]:
    prompts = [f"p{i // 2}" for i in range(n)]  # a GRPO prompt is repeated for its completions
    completions = [f"c{step}.{i}" for i in range(n)]
    correct = [float(i % 2) for i in range(n)]
    fmt = [0.5] * n
    total = [c + 0.1 * f for c, f in zip(correct, fmt)]  # weights 1.0 and 0.1
    return prompts, completions, total, {"correct": correct, "format": fmt}


def test_sample_log_writes_the_exact_format(tmp_path: Path) -> None:
    log = SampleLog(tmp_path, every=10, max_rows=3)
    assert log.maybe_log(10, *_rows(4, 10)) is True
    log.close()
    lines = (tmp_path / "samples.jsonl").read_text(encoding="utf-8").splitlines()
    # the first 3 of 4 rows; reward = correct + 0.1 * format, worked by hand
    assert [json.loads(x) for x in lines] == [
        {"step": 10, "prompt": "p0", "completion": "c10.0", "reward": 0.05, "rewards": {"correct": 0.0, "format": 0.5}},
        {"step": 10, "prompt": "p0", "completion": "c10.1", "reward": 1.05, "rewards": {"correct": 1.0, "format": 0.5}},
        {"step": 10, "prompt": "p1", "completion": "c10.2", "reward": 0.05, "rewards": {"correct": 0.0, "format": 0.5}},
    ]
    assert list(json.loads(lines[0])) == ["step", "prompt", "completion", "reward", "rewards"]


def test_sample_log_nonfinite_is_null_and_numpy_torch_scalars_accepted(tmp_path: Path) -> None:
    import numpy as np
    import torch

    log = SampleLog(tmp_path, every=1)
    log.maybe_log(1, ["p"], ["c"], [float("nan")], {"f": [np.float32(0.25)], "g": [torch.tensor(2.0)]})
    log.close()
    (row,) = read_samples(tmp_path)
    assert row == {"step": 1, "prompt": "p", "completion": "c", "reward": None, "rewards": {"f": 0.25, "g": 2.0}}


def test_sample_log_every_n_schedule(tmp_path: Path) -> None:
    log = SampleLog(tmp_path, every=10, max_rows=1)
    written = [s for s in range(1, 26) if log.maybe_log(s, *_rows(2, s))]
    log.close()
    assert written == [1, 10, 20]  # step 1 (the untrained policy), then every 10th
    assert [r["step"] for r in read_samples(tmp_path)] == [1, 10, 20]
    assert [s for s in range(1, 8) if SampleLog(tmp_path / "b", every=3).due(s)] == [1, 3, 6]


def test_sample_log_bad_input_is_refused(tmp_path: Path) -> None:
    log = SampleLog(tmp_path, every=1)
    p, c, t, per = _rows(4, 1)
    with pytest.raises(ValueError, match=r"per_function\['format'\] has 3 entries, completions has 4"):
        log.maybe_log(1, p, c, t, {**per, "format": [0.5] * 3})
    with pytest.raises(ValueError, match="prompts has 2 entries"):
        log.maybe_log(1, p[:2], c, t, per)
    with pytest.raises(TypeError, match="row 0: prompt and completion must be str"):
        log.maybe_log(1, [[{"role": "user", "content": "hi"}]] * 4, c, t, per)
    with pytest.raises(ValueError, match=r"rewards_total\[0\] is not a number"):
        log.maybe_log(1, p, c, ["1.0"] * 4, per)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="every must be an int >= 1"):
            SampleLog(tmp_path, every=bad)
    log.close()
    with pytest.raises(ValueError, match="closed"):
        log.maybe_log(1, p, c, t, per)
    assert read_samples(tmp_path) == []  # nothing half-written


def test_sample_log_resume_cuts_rows_past_the_checkpoint(tmp_path: Path) -> None:
    log = SampleLog(tmp_path, every=5, max_rows=2)
    for s in (1, 5, 10, 15):
        log.maybe_log(s, *_rows(2, s))
    log.close()
    # a crash tore the last write: half a line without its newline
    with open(tmp_path / "samples.jsonl", "a", encoding="utf-8") as f:
        f.write('{"step": 20, "prompt": "p0", "compl')
    # resume from the checkpoint of step 10: rows of steps 15 and the torn 20 go
    log = SampleLog(tmp_path, every=5, max_rows=2, resume_step=10)
    assert [r["step"] for r in read_samples(tmp_path)] == [1, 1, 5, 5, 10, 10]
    log.maybe_log(15, *_rows(2, 15))
    log.close()
    rows = read_samples(tmp_path)
    assert [r["step"] for r in rows] == [1, 1, 5, 5, 10, 10, 15, 15]
    assert rows[-1]["completion"] == "c15.1"
    # appending (resume_step=None) only repairs a torn tail
    with open(tmp_path / "samples.jsonl", "a", encoding="utf-8") as f:
        f.write('{"step": 20')
    SampleLog(tmp_path, every=5, resume_step=None).close()
    assert (tmp_path / "samples.jsonl").read_text(encoding="utf-8").endswith("}\n")
    assert len(read_samples(tmp_path)) == 8
    # a fresh start (resume_step=-1, what Run.restore passes) keeps none
    SampleLog(tmp_path, every=5, resume_step=-1).close()
    assert read_samples(tmp_path) == []


def test_metrics_logger_samples_follow_its_resume_and_reach_trackers(tmp_path: Path) -> None:
    rec = Recorder()
    with MetricsLogger(tmp_path, tensorboard=False, trackers=[rec], sample_every=2, sample_rows=2) as log:
        assert [s for s in range(1, 5) if log.samples_due(s)] == [1, 2, 4]
        for s in range(1, 5):
            log.log(s, {"reward/mean": s / 4})
            log.log_samples(s, *_rows(3, s))
    tables = [c for c in rec.calls if c[0] == "table"]
    assert [t[1] for t in tables] == [1, 2, 4]
    _, step, key, columns, rows = tables[1]
    assert key == "samples"
    assert columns == ["step", "prompt", "completion", "reward", "reward/correct", "reward/format"]
    assert rows == [[2, "p0", "c2.0", 0.05, 0.0, 0.5], [2, "p0", "c2.1", 1.05, 1.0, 0.5]]
    with MetricsLogger(tmp_path, tensorboard=False, resume_step=2, sample_every=2) as log:
        pass
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    assert [r["step"] for r in read_samples(tmp_path)] == [1, 1, 2, 2]
    # without sample_every nothing is written
    with MetricsLogger(tmp_path / "none", tensorboard=False) as log:
        assert log.log_samples(10, *_rows(2, 10)) is False
    assert not (tmp_path / "none" / "samples.jsonl").exists()


# ------------------------------------------------------------- W&B and trackio, offline, for real

# Phases of a run, as a trainer drives the logger (log steps, sample tables, close), one after
# the other in one process (a resume in a new process works the same: all state is in run_dir),
# then, for trackio, its records read back with trackio's own reader.
_PHASES = r"""
import json, os, sys
from trustrl.logging import MetricsLogger
run_dir, report_to, phases = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
config = {"learning_rate": 0.001, "hub_token": "s3cret", "lora": {"r": 4, "api_key": "k"}}
names = []
for phase in phases:
    os.environ.update(phase["env"])
    with MetricsLogger(run_dir, tensorboard=False, resume_step=phase["resume_step"], report_to=[report_to],
                       config=config, sample_every=2, sample_rows=2) as log:
        for step, value in phase["steps"]:
            log.log(step, {"reward/mean": value, "kl/ref": float("nan") if step == 2 else 0.01 * step})
            log.log_samples(step, ["p0", "p0", "p1"], [f"c{step}.0", f"c{step}.1", f"c{step}.2"],
                            [value, value + 1.0, 9.0], {"correct": [0.0, 1.0, 9.0]})
    names.append(json.load(open(os.path.join(run_dir, "trackers.json")))[report_to])
out = {"names": names}
if report_to == "trackio":
    from trackio.sqlite_storage import SQLiteStorage
    out["runs"] = SQLiteStorage.get_runs("trustrl")
    out["logs"] = {r: SQLiteStorage.get_logs("trustrl", r) for r in out["runs"]}
    out["configs"] = {r: SQLiteStorage.get_run_config("trustrl", r) for r in out["runs"]}
print("@@" + json.dumps(out, default=str))
"""


def _run_phases(run_dir: Path, report_to: str, phases: list[dict[str, Any]], env: dict[str, str]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-c", _PHASES, str(run_dir), report_to, json.dumps(phases)],
                          env=env, cwd=run_dir.parent, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.split("@@", 1)[1].splitlines()[0])


def _offline_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "TRACKIO_"))}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DISABLE_GIT="true",
               TRACKIO_DIR=str(tmp_path / "trackio"), HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]))
    return env


def _wandb_records(run_file: Path) -> list[Any]:
    """The records of a ``.wandb`` file. Its framing is LevelDB's log format (32 KiB blocks;
    each record: crc32c uint32, length uint16, type uint8 FULL=1/FIRST=2/MIDDLE=3/LAST=4, then
    the payload; a block tail under 7 bytes is padding) after a 7-byte header ``:W&B``, magic
    0xBEE1, version; each payload is a ``wandb_internal_pb2.Record`` (wandb's own schema)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    assert data[:4] == b":W&B", run_file
    block, pos, parts, records = 32768, 7, [], []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and n == 0:  # zero padding to the end of the block
            pos += left
            continue
        parts.append(data[pos + 7:pos + 7 + n])
        pos += 7 + n
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(b"".join(parts))
            records.append(rec)
            parts = []
    return records


def _wandb_run(wandb_dir: Path) -> dict[str, Any]:
    (run_file,) = sorted(wandb_dir.glob("wandb/offline-run-*/run-*.wandb"))
    out: dict[str, Any] = {"history": [], "config": {}, "run_id": None, "exit_code": None, "dir": run_file.parent}
    for rec in _wandb_records(run_file):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            out["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
        elif kind == "run":
            out["run_id"] = rec.run.run_id
            out["config"].update({u.key: json.loads(u.value_json) for u in rec.run.config.update})
        elif kind == "config":
            out["config"].update({u.key: json.loads(u.value_json) for u in rec.config.update})
        elif kind == "exit":
            out["exit_code"] = rec.exit.exit_code
    return out


def _scalars(history: list[dict[str, Any]], key: str) -> list[tuple[int, Any]]:
    return [(h["step"], h[key]) for h in history if key in h]


@pytest.mark.skipif(not HAS_WANDB, reason="wandb not installed (pip install 'trustrl[wandb]')")
def test_wandb_offline_history_config_tables_and_resume(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    env = _offline_env(tmp_path)
    out = _run_phases(run_dir, "wandb", [
        {"resume_step": -1, "steps": [[1, 0.25], [2, 0.5], [3, 0.75]], "env": {"WANDB_DIR": str(tmp_path / "w1")}},
        # resume from the checkpoint of step 2 (the run had reached step 3)
        {"resume_step": 2, "steps": [[3, 0.9], [4, 1.0]], "env": {"WANDB_DIR": str(tmp_path / "w2")}},
    ], env)
    run_id = out["names"][0]["id"]
    assert out["names"][1]["id"] == run_id
    first, second = _wandb_run(tmp_path / "w1"), _wandb_run(tmp_path / "w2")
    assert first["run_id"] == second["run_id"] == run_id  # the resumed run continues the W&B run
    assert first["exit_code"] == 0 and second["exit_code"] == 0

    assert _scalars(first["history"], "reward/mean") == [(1, 0.25), (2, 0.5), (3, 0.75)]
    kl = dict(_scalars(first["history"], "kl/ref"))
    assert kl[1] == 0.01 and math.isnan(kl[2]) and kl[3] == pytest.approx(0.03)
    assert _scalars(second["history"], "reward/mean") == [(3, 0.9), (4, 1.0)]
    # the run config, without the secrets
    cfg = first["config"]
    assert cfg["learning_rate"] == 0.001 and cfg["lora"] == {"r": 4}
    assert "hub_token" not in cfg and "s3cret" not in json.dumps(cfg) and "api_key" not in json.dumps(cfg)

    # sample tables at steps 1 and 2 (sample_every=2), 2 rows each, as wandb.Table files
    tables = [(h["step"], h["samples/path"], h["samples/nrows"]) for h in first["history"] if "samples/path" in h]
    assert [(s, n) for s, _, n in tables] == [(1, 2), (2, 2)]
    table = json.loads((first["dir"] / "files" / tables[1][1]).read_text())
    assert table["columns"] == ["step", "prompt", "completion", "reward", "reward/correct"]
    assert table["data"] == [[2, "p0", "c2.0", 0.5, 0.0], [2, "p0", "c2.1", 1.5, 1.0]]
    assert [h["step"] for h in second["history"] if "samples/path" in h] == [4]
    # the files of the run directory: steps up to the checkpoint, then the resumed ones
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4]
    assert [r["step"] for r in read_samples(run_dir)] == [1, 1, 2, 2, 4, 4]


@pytest.mark.skipif(not HAS_TRACKIO, reason="trackio not installed (pip install 'trustrl[trackio]')")
def test_trackio_local_store_history_config_tables_and_resume(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    env = _offline_env(tmp_path)
    out = _run_phases(run_dir, "trackio", [
        {"resume_step": -1, "steps": [[1, 0.25], [2, 0.5], [3, 0.75]], "env": {}},
        {"resume_step": 2, "steps": [[3, 0.9], [4, 1.0]], "env": {}},  # resume: the same trackio run
        {"resume_step": -1, "steps": [[1, 0.3]], "env": {}},  # a fresh start in the same directory: a new run
    ], env)
    name, resumed, fresh = (n["name"] for n in out["names"])
    assert name.startswith("run-") and resumed == name and fresh != name
    assert sorted(out["runs"]) == sorted([name, fresh])
    logs = out["logs"][name]
    # trackio keeps what was logged before the resume (it cannot delete history): step 3 twice
    assert [(r["step"], r["reward/mean"]) for r in logs if "reward/mean" in r] == [
        (1, 0.25), (2, 0.5), (3, 0.75), (3, 0.9), (4, 1.0)]
    kl2 = [r.get("kl/ref") for r in logs if r["step"] == 2 and "reward/mean" in r]
    assert kl2 in ([None], [float("nan")]) or math.isnan(kl2[0])  # NaN arrives as null (orjson)
    tables = [(r["step"], r["samples"]) for r in logs if "samples" in r]
    assert [s for s, _ in tables] == [1, 2, 4]
    assert tables[1][1]["_type"] == "trackio.table"
    assert tables[1][1]["_value"] == [
        {"step": 2, "prompt": "p0", "completion": "c2.0", "reward": 0.5, "reward/correct": 0.0},
        {"step": 2, "prompt": "p0", "completion": "c2.1", "reward": 1.5, "reward/correct": 1.0}]
    cfg = out["configs"][name]
    assert cfg["learning_rate"] == 0.001 and cfg["lora"] == {"r": 4} and "hub_token" not in cfg
    assert [(r["step"], r["reward/mean"]) for r in out["logs"][fresh] if "reward/mean" in r] == [(1, 0.3)]



def count_a(prompts, completions, **columns):
    return [c.count("a") / max(len(c), 1) for c in completions]


@pytest.mark.skipif(not (HAS_WANDB and HAS_TRACKIO), reason="needs wandb and trackio (pip install 'trustrl[wandb,trackio]')")
def test_a_grpo_run_reports_the_same_records_to_every_tracker(tiny_model_dir, addition_data, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    for k in [k for k in os.environ if k.startswith(("WANDB_", "TRACKIO_"))]:
        monkeypatch.delenv(k)
    for k, v in _offline_env(tmp_path).items():
        if k.startswith(("WANDB_", "TRACKIO_", "HF_")):
            monkeypatch.setenv(k, v)
    from trustrl.algorithms.grpo import GRPOTrainer
    from trustrl.config import GRPOConfig

    run_dir = tmp_path / "run"
    cfg = GRPOConfig(model=str(tiny_model_dir), dataset=str(addition_data["rl"]), output_dir=str(run_dir), max_steps=2,
                     prompts_per_step=2, group_size=2, max_completion_length=4, max_prompt_length=16, learning_rate=1e-3,
                     beta=0.0, progress=False, seed=0, rewards=[], report_to=["tensorboard", "wandb", "trackio"],
                     sample_every=1)
    GRPOTrainer(cfg, reward_funcs=[count_a]).train()

    records = read_metrics(run_dir)
    expected = [(r["step"], r["reward/mean"]) for r in records if r.get("reward/mean") is not None]
    assert [s for s, _ in expected] == [1, 2]
    wb = _wandb_run(run_dir)  # no WANDB_DIR: W&B's files go to the run directory
    assert _scalars(wb["history"], "reward/mean") == expected
    assert wb["config"]["group_size"] == 2 and wb["config"]["report_to"] == ["tensorboard", "wandb", "trackio"]
    # trackio (its store is where this process first imported it: TRACKIO_DIR=tmp_path unless
    # imported earlier; the run name is unique either way)
    from trackio.sqlite_storage import SQLiteStorage

    name = json.loads((run_dir / "trackers.json").read_text())["trackio"]["name"]
    logs = SQLiteStorage.get_logs("trustrl", name)
    assert [(r["step"], r["reward/mean"]) for r in logs if "reward/mean" in r] == expected
    assert SQLiteStorage.get_run_config("trustrl", name)["group_size"] == 2
    assert (run_dir / "tb").is_dir()  # TensorBoard as before
    # the loop writes the sample table every step (sample_every=1): the first 8 rows, or all when fewer
    n_rows = min(8, cfg.prompts_per_step * cfg.group_size)
    assert [r["step"] for r in read_samples(run_dir)] == [1] * n_rows + [2] * n_rows
