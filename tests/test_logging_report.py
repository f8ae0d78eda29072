"""Tests for trustrl.logging (MetricsLogger, read_metrics, atomic JSON, progress)."""

from __future__ import annotations

import json
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


# The run report (trustrl.report) is tested in test_report.py and test_report_browser.py.
