"""Tests for trustrl.logging (MetricsLogger, read_metrics, atomic JSON, progress) and
trustrl.report (write_report)."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trustrl.logging import (
    MetricsLogger,
    format_postfix,
    progress,
    read_metrics,
    write_json_atomic,
)
from trustrl.report import write_report


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


# ------------------------------------------------------------------------------- MetricsLogger


def test_logger_writes_valid_jsonl_with_null_for_nonfinite(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        log.log(1, {"reward/mean": 0.5, "kl/ref": float("nan")})
        log.log(2, {"reward/mean": float("inf"), "policy/entropy": np.float32(1.25)})
        log.log(3, {"completion/mean_length": torch.tensor(7.0), "groups/zero_std_fraction": 0})
    lines = _lines(tmp_path / "metrics.jsonl")
    assert len(lines) == 3
    # Strict parse: Python's json would accept the bare token NaN; reject it explicitly.
    def no_constants(tok: str) -> None:
        raise AssertionError(f"non-JSON constant {tok} in metrics.jsonl")

    parsed = [json.loads(line, parse_constant=no_constants) for line in lines]
    assert parsed[0] == {"step": 1, "reward/mean": 0.5, "kl/ref": None}
    assert parsed[1] == {"step": 2, "reward/mean": None, "policy/entropy": 1.25}
    assert parsed[2] == {"step": 3, "completion/mean_length": 7.0, "groups/zero_std_fraction": 0}
    assert read_metrics(tmp_path) == parsed


def test_logger_rejects_bad_input(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        with pytest.raises(ValueError, match="reserved"):
            log.log(1, {"step": 3.0})
        with pytest.raises(TypeError, match="reward/mean"):
            log.log(1, {"reward/mean": "high"})
        with pytest.raises(TypeError, match="not a scalar"):
            log.log(1, {"reward/mean": torch.ones(3)})
    with pytest.raises(ValueError, match="closed"):
        log.log(2, {"a": 1.0})


def _write_raw(run: Path, text: str) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text(text, encoding="utf-8")


def test_resume_truncates_later_steps_and_torn_line(tmp_path: Path) -> None:
    # A crashed run: steps 1..5 complete, then a torn half-line for step 6.
    full = "".join(json.dumps({"step": s, "loss/total": s / 10}) + "\n" for s in range(1, 6))
    _write_raw(tmp_path, full + '{"step": 6, "loss/to')
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5]  # torn line tolerated

    # Resuming from the checkpoint of step 3: steps 4, 5 and the torn line must go.
    with MetricsLogger(tmp_path, tensorboard=False, resume_step=3) as log:
        assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
        for s in (4, 5, 6):
            log.log(s, {"loss/total": s / 100})
    recs = read_metrics(tmp_path)
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]  # no duplicates, no gaps
    assert [r["loss/total"] for r in recs] == [0.1, 0.2, 0.3, 0.04, 0.05, 0.06]
    assert not list(tmp_path.glob(".metrics.jsonl.*"))  # atomic rewrite left no temp file


def test_resume_without_file_and_append_repairs_torn_tail(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path / "fresh", tensorboard=False, resume_step=10) as log:
        log.log(11, {"a": 1.0})
    assert read_metrics(tmp_path / "fresh") == [{"step": 11, "a": 1.0}]

    _write_raw(tmp_path / "torn", '{"step": 1, "a": 1.0}\n{"step": 2, "a"')
    with MetricsLogger(tmp_path / "torn", tensorboard=False) as log:  # plain append
        log.log(2, {"a": 2.0})
    assert _lines(tmp_path / "torn" / "metrics.jsonl") == ['{"step": 1, "a": 1.0}', '{"step": 2, "a": 2.0}']


def test_read_metrics_rejects_corrupt_middle_line(tmp_path: Path) -> None:
    _write_raw(tmp_path, '{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl: line 2"):
        read_metrics(tmp_path)
    assert read_metrics(tmp_path / "missing") == []


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(min_value=0, max_value=12),
    k=st.integers(min_value=-1, max_value=14),
    cut=st.integers(min_value=0, max_value=40),
)
def test_resume_property(tmp_path_factory: pytest.TempPathFactory, n: int, k: int, cut: int) -> None:
    """Any file of steps 1..n, optionally followed by a prefix of another record, resumed at k,
    holds exactly steps 1..min(n, k)."""
    run = tmp_path_factory.mktemp("prop")
    extra = json.dumps({"step": n + 1, "x": 0.123456789})[:cut]  # cut may be 0 (no torn line)
    _write_raw(run, "".join(json.dumps({"step": s, "x": float(s)}) + "\n" for s in range(1, n + 1)) + extra)
    MetricsLogger(run, tensorboard=False, resume_step=k).close()
    assert [r["step"] for r in read_metrics(run)] == list(range(1, min(n, k) + 1))


def test_tensorboard_scalars_and_purge(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path) as log:
        log.log(1, {"reward/mean": 1.0, "kl/ref": None})
    event_files = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert event_files, "TensorBoard event file not written"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert acc.Tags()["scalars"] == ["reward/mean"]  # None values are not sent to TB
    assert [(e.step, e.value) for e in acc.Scalars("reward/mean")] == [(1, 1.0)]


def test_tensorboard_missing_warns_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def fake_import(name: str, *args, **kwargs):  # type: ignore[no-untyped-def]
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("no tensorboard here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with MetricsLogger(tmp_path) as log:
            log.log(1, {"a": 1.0})
            log.log(2, {"a": 2.0})
    msgs = [str(w.message) for w in caught if "TensorBoard unavailable" in str(w.message)]
    assert len(msgs) == 1
    assert len(read_metrics(tmp_path)) == 2


# ------------------------------------------------------------------------------- helpers


def test_write_json_atomic(tmp_path: Path) -> None:
    p = write_json_atomic(tmp_path / "sub" / "s.json", {"a": float("nan"), "b": (1, 2), "c": np.int64(3)})
    assert json.loads(p.read_text()) == {"a": None, "b": [1, 2], "c": 3}
    write_json_atomic(p, {"a": 1})  # overwrite
    assert json.loads(p.read_text()) == {"a": 1}
    assert [q.name for q in p.parent.iterdir()] == ["s.json"]
    with pytest.raises(TypeError, match=r"\$\.bad"):
        write_json_atomic(p, {"bad": object()})
    assert json.loads(p.read_text()) == {"a": 1}  # failed write left the old file intact


def test_progress_env_disable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRUSTRL_NO_PROGRESS", "1")
    bar = progress(range(3), desc="x")
    assert bar.disable and list(bar) == [0, 1, 2]
    monkeypatch.delenv("TRUSTRL_NO_PROGRESS")
    bar = progress(total=2, desc="y")
    assert not bar.disable
    bar.set_postfix(format_postfix({"reward/mean": 0.123456, "n": 3}))
    assert "reward/mean=0.1235" in str(bar) and "n=3" in str(bar)
    bar.close()


# ------------------------------------------------------------------------------- report


def _synthetic_run(run: Path, steps: int = 20) -> None:
    recs = []
    for s in range(1, steps + 1):
        r = {
            "step": s,
            "reward/mean": s / steps,
            "reward/correctness/mean": s / (2 * steps),
            "reward/format/mean": 1.0,
            "reward/format/std": 0.0,
            "kl/ref": 0.01 * s,
            "policy/entropy": 2.0 - s / steps,
            "completion/mean_length": 30.0 + s,
            "loss/policy": -0.1,
            "optim/lr": 1e-5,
        }
        if s % 5 == 0:
            r["eval/accuracy"] = s / 40
        if s == 7:
            r["kl/ref"] = None  # was NaN at logging time
        recs.append(r)
    _write_raw(run, "".join(json.dumps(r) + "\n" for r in recs))


def test_report_files(tmp_path: Path) -> None:
    _synthetic_run(tmp_path)
    (tmp_path / "summary.json").write_text(json.dumps({"final": {"eval/accuracy": 0.5}, "seed": 1}))
    (tmp_path / "config.yaml").write_text("algo: grpo\nlr: 1.0e-5  # <tuned>\n")
    out = write_report(tmp_path)
    assert out == tmp_path / "report.html"
    pngs = sorted(p.name for p in (tmp_path / "plots").glob("*.png"))
    assert pngs == sorted(
        [
            "reward.png",
            "eval_accuracy.png",
            "kl.png",
            "entropy.png",
            "completion_length.png",
            "group_reward.png",  # reward/format/std, not in reward.png
            "group_loss.png",
            "group_optim.png",
        ]
    )
    for p in (tmp_path / "plots").glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = out.read_text()
    for name in pngs:
        assert f"src='plots/{name}'" in page  # relative references
    assert "data:image" not in page and "http" not in page  # self-contained, no remote assets
    assert "final.eval/accuracy" in page and "seed" in page  # summary table, flattened
    assert "&lt;tuned&gt;" in page  # config, escaped
    # final-metrics table: eval/accuracy last logged at step 20 with 20/40 = 0.5
    assert "<td>eval/accuracy</td><td>20</td><td>0.5</td>" in page


def test_report_edge_cases(tmp_path: Path) -> None:
    # single step, a metric that is only ever null, a non-numeric value
    single = tmp_path / "single"
    _write_raw(single, json.dumps({"step": 0, "reward/mean": 0.25, "kl/ref": None, "note": "x"}) + "\n")
    write_report(single)
    assert sorted(p.name for p in (single / "plots").glob("*.png")) == ["reward.png"]

    # no metrics file at all, no summary
    empty = tmp_path / "empty"
    empty.mkdir()
    page = write_report(empty).read_text()
    assert "No metrics logged" in page
    assert list((empty / "plots").glob("*.png")) == []

    # all values null for every metric
    nulls = tmp_path / "nulls"
    _write_raw(nulls, "".join(json.dumps({"step": s, "kl/ref": None}) + "\n" for s in range(3)))
    write_report(nulls)

    with pytest.raises(FileNotFoundError):
        write_report(tmp_path / "nope")


def test_report_from_logger_with_nan(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        for s in range(1, 4):
            log.log(s, {"reward/mean": math.nan if s == 2 else float(s), "policy/entropy": 1.0})
    write_report(tmp_path)
    assert (tmp_path / "plots" / "reward.png").is_file()
    assert (tmp_path / "plots" / "entropy.png").is_file()
