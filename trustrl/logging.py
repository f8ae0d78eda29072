"""Metrics logging: crash-safe JSONL + TensorBoard, progress bars, atomic JSON writes.

``run_dir/metrics.jsonl`` holds one JSON object per logged step, ``{"step": k, "<name>": v}``,
with metric names as in ``docs/CONVENTIONS.md`` (``reward/mean``, ``kl/ref``, ...). Each line is
flushed and fsync'd as it is written, so after a crash at most the final line is torn;
:func:`read_metrics` tolerates that, and :class:`MetricsLogger` with ``resume_step=k`` rewrites
the file (atomically) to hold exactly the steps ``<= k`` so a resumed run neither duplicates
nor loses steps. Non-finite values (NaN, inf) are written as JSON ``null``.

Trackers (``report_to``): besides TensorBoard, :class:`MetricsLogger` forwards every record it
writes to Weights & Biases (:class:`WandbTracker`) and trackio (:class:`TrackioTracker`), both
optional extras (``pip install trustrl[wandb]`` / ``trustrl[trackio]``), or to any object with
the :class:`Tracker` methods. :class:`SampleLog` writes per-step sample tables (prompt,
completion, rewards) to ``run_dir/samples.jsonl`` and to the trackers.

(This module is ``trustrl.logging``; it does not shadow the standard library's ``logging``
for absolute imports.)
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import secrets
import string
import sys
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Protocol, runtime_checkable

from tqdm import tqdm

__all__ = [
    "METRICS_FILE",
    "MetricsLogger",
    "read_metrics",
    "progress",
    "format_postfix",
    "write_json_atomic",
    "write_text_atomic",
    "to_jsonable",
    "REPORT_TO",
    "SAMPLES_FILE",
    "TRACKERS_FILE",
    "check_report_to",
    "public_config",
    "Tracker",
    "WandbTracker",
    "TrackioTracker",
    "open_trackers",
    "SampleLog",
    "read_samples",
    "NullMetricsLogger",
    "hide_library_warnings",
    "quiet_transformers",
]

#: Name of the metrics file inside a run directory.
METRICS_FILE = "metrics.jsonl"
#: Name of the TensorBoard folder inside a run directory.
TB_DIR = "tb"
#: Environment variable that, set to 1/true/yes, disables progress bars.
NO_PROGRESS_ENV = "TRUSTRL_NO_PROGRESS"


# --------------------------------------------------------------------------------------------
# atomic writes
# --------------------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    """fsync a directory so a rename inside it is durable (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_writer(path: str | os.PathLike[str]) -> Iterator[IO[str]]:
    """``with atomic_writer(path) as f: f.write(...)``: UTF-8 text to a temporary file in the
    destination folder, flushed, fsynced and renamed over ``path`` only when the block ends
    without an error. Readers see the old file or the complete new one, never a partial
    write; an error (or a crash) leaves any previous file intact and no temporary behind.
    Parent folders are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_writer`)."""
    with atomic_writer(path) as f:
        f.write(text)
    return Path(path)


def to_jsonable(obj: Any) -> Any:
    """Convert ``obj`` into something ``json.dumps(..., allow_nan=False)`` accepts.

    Non-finite floats become ``None``; NumPy / torch scalars become Python numbers; tuples
    become lists; ``Path`` becomes ``str``. Dict keys must be strings.

    Raises:
        TypeError: for values with no JSON form, naming the offending key path.
    """
    return _to_jsonable(obj, "$")


def _to_jsonable(obj: Any, where: str) -> Any:
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, Mapping):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"to_jsonable: non-string key {k!r} at {where}")
            out[k] = _to_jsonable(v, f"{where}.{k}")
        return out
    if isinstance(obj, (list, tuple)):
        return [_to_jsonable(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    # numpy / torch scalars (and 0-d / 1-element arrays) expose .item()
    item = getattr(obj, "item", None)
    if callable(item):
        try:
            return _to_jsonable(item(), where)
        except (ValueError, RuntimeError) as exc:
            raise TypeError(f"to_jsonable: cannot convert {type(obj).__name__} at {where}") from exc
    raise TypeError(f"to_jsonable: {type(obj).__name__} at {where} has no JSON form")


def write_json_atomic(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 2) -> Path:
    """Serialize ``obj`` as JSON (via :func:`to_jsonable`: NaN/inf become null) and write it
    atomically to ``path``. Returns the path."""
    text = json.dumps(to_jsonable(obj), indent=indent, allow_nan=False) + "\n"
    return write_text_atomic(path, text)


# --------------------------------------------------------------------------------------------
# reading metrics.jsonl
# --------------------------------------------------------------------------------------------


def _metrics_path(run_dir: str | os.PathLike[str]) -> Path:
    p = Path(run_dir)
    return p if p.suffix == ".jsonl" else p / METRICS_FILE


def _parse_lines(path: Path, data: bytes) -> tuple[list[dict[str, Any]], int]:
    """Parse metrics JSONL bytes. Returns (records, byte length of the intact prefix).

    A final line that lacks its newline or fails to parse is a torn write and is dropped; a bad
    line anywhere else raises ``ValueError`` naming file and line.
    """
    records: list[dict[str, Any]] = []
    lines = data.split(b"\n")
    # After the last b"\n" comes lines[-1]: b"" if the file ends cleanly, else a torn fragment.
    complete, tail = lines[:-1], lines[-1]
    good_bytes = 0
    for lineno, raw in enumerate(complete, start=1):
        if raw.strip() == b"":
            good_bytes += len(raw) + 1
            continue
        try:
            rec = json.loads(raw.decode("utf-8"))
            if not isinstance(rec, dict) or "step" not in rec:
                raise ValueError("not an object with a 'step' key")
        except (ValueError, UnicodeDecodeError) as exc:
            if lineno == len(complete) and tail == b"":
                # Last line, newline present but content garbage: treat as torn as well.
                return records, good_bytes
            raise ValueError(f"{path}: line {lineno} is not a valid metrics record: {exc}") from exc
        records.append(rec)
        good_bytes += len(raw) + 1
    # A tail without trailing newline: the writer never finished it. Drop even if it parses,
    # since we write the newline in the same write() call and cannot vouch for it.
    return records, good_bytes


def read_metrics(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read ``run_dir/metrics.jsonl`` (or a ``.jsonl`` path) into a list of dicts, in file
    order. ``null`` values come back as ``None``. A torn final line is ignored; a missing file
    gives ``[]``.

    Raises:
        ValueError: a line other than the last is not valid JSON (message names file and line).
    """
    path = _metrics_path(run_dir)
    if not path.exists():
        return []
    records, _ = _parse_lines(path, path.read_bytes())
    return records


# --------------------------------------------------------------------------------------------
# trackers: Weights & Biases, trackio, or any object with the Tracker methods
# --------------------------------------------------------------------------------------------

#: Names ``report_to`` accepts. TensorBoard is written by :class:`MetricsLogger` itself.
REPORT_TO = ("tensorboard", "wandb", "trackio")
#: The optional trackers: name -> (module to import, pip extra that installs it).
_OPTIONAL_TRACKERS = {"wandb": ("wandb", "wandb"), "trackio": ("trackio", "trackio")}
#: File in the run directory that remembers each tracker's run (W&B id, trackio name) so a
#: resumed run continues the same tracker run.
TRACKERS_FILE = "trackers.json"
#: Name of the per-step sample table file inside a run directory.
SAMPLES_FILE = "samples.jsonl"
#: The x axis the trackers plot against: trustrl's step (the ``step`` of metrics.jsonl).
STEP_KEY = "step"
#: Key of the sample tables in the trackers.
SAMPLES_KEY = "samples"
#: Config keys whose name contains one of these ``_``-separated words (or ``api_key``/``apikey``)
#: never reach a tracker.
_SECRET_WORDS = frozenset({"token", "secret", "password", "passwd", "credential", "credentials", "apikey"})


def check_report_to(names: Sequence[str] | str) -> list[str]:
    """Validate ``report_to``: known names, optional packages installed. Returns the names
    in order without duplicates (a single string is taken as a one-element list).

    Raises:
        ValueError: an unknown name (message lists the allowed ones), or a tracker whose
            package is not installed (message names the pip extra to install).
    """
    if isinstance(names, str):
        names = [names]
    out: list[str] = []
    for name in names:
        if name not in REPORT_TO:
            raise ValueError(f"report_to: unknown tracker {name!r}; allowed: {', '.join(REPORT_TO)}")
        if name in _OPTIONAL_TRACKERS:
            module, extra = _OPTIONAL_TRACKERS[name]
            if importlib.util.find_spec(module) is None:
                raise ValueError(f"report_to: {name!r} needs the package {module!r}, which is not installed; "
                                 f"install it with: pip install 'trustrl[{extra}]'")
        if name not in out:
            out.append(name)
    return out


def _is_secret_key(key: str) -> bool:
    low = key.lower()
    if "api_key" in low or "apikey" in low:
        return True
    return any(part in _SECRET_WORDS for part in low.replace("-", "_").split("_"))


def public_config(config: Any) -> dict[str, Any]:
    """The run config as a plain JSON-able dict for the trackers: a pydantic model is dumped
    (``model_dump(mode="json")``), a mapping is copied; keys that look like secrets (a
    ``_``-separated word ``token``, ``secret``, ``password``, ``credential(s)``, or ``api_key``)
    are dropped at every depth. ``None`` gives ``{}``."""
    if config is None:
        return {}
    dump = getattr(config, "model_dump", None)
    data = dump(mode="json") if callable(dump) else config
    if not isinstance(data, Mapping):
        raise TypeError(f"public_config: expected a mapping or a pydantic model, got {type(config).__name__}")

    def clean(obj: Any) -> Any:
        if isinstance(obj, Mapping):
            return {str(k): clean(v) for k, v in obj.items() if not _is_secret_key(str(k))}
        if isinstance(obj, (list, tuple)):
            return [clean(v) for v in obj]
        return obj

    return to_jsonable(clean(data))


@runtime_checkable
class Tracker(Protocol):
    """What :class:`MetricsLogger` and :class:`SampleLog` call on a tracker (all on rank 0).

    ``log`` gets every record written to metrics.jsonl, without its ``step`` (non-finite
    values stay floats; ``None`` values are left out); ``log_table`` gets each sample table;
    ``close`` ends the tracker run (``exit_code`` 0 for a run that ended normally)."""

    def log(self, step: int, metrics: Mapping[str, float | int]) -> None: ...

    def log_table(self, step: int, key: str, columns: list[str], rows: list[list[Any]]) -> None: ...

    def close(self, exit_code: int = 0) -> None: ...


def _read_trackers_file(run_dir: Path) -> dict[str, Any]:
    path = run_dir / TRACKERS_FILE
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc}); delete it to start new tracker runs") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object; delete it to start new tracker runs")
    return data


def _remember_tracker_run(run_dir: Path, name: str, info: dict[str, Any]) -> None:
    data = _read_trackers_file(run_dir)
    data[name] = info
    write_json_atomic(run_dir / TRACKERS_FILE, data)


def _continues(resume_step: int | None) -> bool:
    """Whether a logger opened with ``resume_step`` continues the run directory's tracker runs:
    yes when resuming (``k >= 0``) or appending (``None``); no on a fresh start (``k < 0``)."""
    return resume_step is None or resume_step >= 0


def _recorded_or_new_run(run_dir: Path, tracker: str, field: str, resume_step: int | None, project_env: str,
                         new_value: Any) -> tuple[str, str]:
    """(run id or name, project) of ``tracker``: the one recorded in ``run_dir/trackers.json``
    when this run continues (a resume), else a new one (``new_value(8 random characters)``, the
    project from ``$<project_env>`` or "trustrl"); recorded either way."""
    known = _read_trackers_file(run_dir).get(tracker, {})
    value = known.get(field) if _continues(resume_step) else None
    if value:  # continue the recorded run, in its project
        project = known.get("project") or "trustrl"
    else:
        alphabet = string.ascii_lowercase + string.digits
        value = new_value("".join(secrets.choice(alphabet) for _ in range(8)))
        project = os.environ.get(project_env) or "trustrl"
    _remember_tracker_run(run_dir, tracker, {field: value, "project": project})
    return value, project


class WandbTracker:
    """Weights & Biases run: metrics against ``step`` (trustrl's step, declared with
    ``define_metric`` so that a resumed run may log a step again), config at init, sample
    tables as ``wandb.Table``.

    The run id is kept in ``run_dir/trackers.json``; a resumed trustrl run (``resume_step >=
    0``, or ``None``: appending) continues the same W&B run (``resume="allow"``), a fresh start
    (``resume_step < 0``) begins a new one. The W&B project is ``$WANDB_PROJECT`` or
    ``"trustrl"``, the run's name the run directory's name; files go to ``$WANDB_DIR`` or
    the run directory. ``WANDB_MODE=offline`` works as usual (``wandb sync`` later).
    """

    def __init__(self, run_dir: str | os.PathLike[str], *, config: Any = None,
                 resume_step: int | None = None) -> None:
        check_report_to(["wandb"])
        import wandb

        self._wandb = wandb
        run_dir = Path(run_dir)
        run_id, project = _recorded_or_new_run(run_dir, "wandb", "id", resume_step, "WANDB_PROJECT",
                                               lambda suffix: suffix)
        self.run_id = run_id
        try:
            self._run = wandb.init(
                project=project, name=run_dir.resolve().name, id=run_id, resume="allow",
                dir=os.environ.get("WANDB_DIR") or str(run_dir), config=public_config(config),
                settings=wandb.Settings(save_code=False),
            )
        except Exception as exc:  # e.g. not logged in: say which setting asked for W&B
            raise RuntimeError(f"report_to: 'wandb': wandb.init failed: {exc} (log in with `wandb login`, "
                               "set WANDB_MODE=offline, or drop wandb from report_to)") from exc
        self._run.define_metric(STEP_KEY)
        self._run.define_metric("*", step_metric=STEP_KEY)

    def log(self, step: int, metrics: Mapping[str, float | int]) -> None:
        self._run.log({STEP_KEY: step, **metrics})

    def log_table(self, step: int, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        self._run.log({STEP_KEY: step, key: self._wandb.Table(columns=columns, data=rows)})

    def close(self, exit_code: int = 0) -> None:
        self._run.finish(exit_code=exit_code)


class TrackioTracker:
    """trackio run (a local SQLite database under ``$TRACKIO_DIR``, by default the Hugging
    Face cache's ``trackio/``; ``trackio show`` opens the dashboard): metrics at ``step``,
    config at init, sample tables as ``trackio.Table``.

    The run name (``<run dir name>-<8 random characters>``) is kept in
    ``run_dir/trackers.json``; a resumed trustrl run continues that trackio run
    (``resume="allow"``), a fresh start begins a new one. The project is ``$TRACKIO_PROJECT``
    or ``"trustrl"``. trackio's automatic CPU/GPU logging is left off (trustrl logs its own
    ``perf/`` metrics).
    """

    def __init__(self, run_dir: str | os.PathLike[str], *, config: Any = None,
                 resume_step: int | None = None) -> None:
        check_report_to(["trackio"])
        import trackio

        self._trackio = trackio
        run_dir = Path(run_dir)
        name, project = _recorded_or_new_run(run_dir, "trackio", "name", resume_step, "TRACKIO_PROJECT",
                                             lambda suffix: f"{run_dir.resolve().name}-{suffix}")
        self.project, self.name = project, name
        try:
            self._run = trackio.init(project=project, name=name, config=public_config(config), resume="allow",
                                     embed=False, auto_log_gpu=False, auto_log_cpu=False)
        except Exception as exc:
            raise RuntimeError(f"report_to: 'trackio': trackio.init failed: {exc}") from exc

    def log(self, step: int, metrics: Mapping[str, float | int]) -> None:
        self._run.log(dict(metrics), step=step)

    def log_table(self, step: int, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        table = self._trackio.Table(data=[dict(zip(columns, row)) for row in rows])
        self._run.log({key: table}, step=step)

    def close(self, exit_code: int = 0) -> None:
        current = getattr(getattr(self._trackio, "context_vars", None), "current_run", None)
        if current is not None and current.get() is self._run:
            self._trackio.finish()  # also forgets it as the current run (no second finish at exit)
        else:
            self._run.finish()


def open_trackers(report_to: Sequence[str] | str, run_dir: str | os.PathLike[str], *,
                  config: Any = None, resume_step: int | None = None) -> list[Tracker]:
    """Start the trackers named in ``report_to`` ("wandb", "trackio"; "tensorboard" is
    :class:`MetricsLogger`'s own and skipped here). Call on rank 0 only.

    Args:
        report_to: tracker names, checked by :func:`check_report_to`.
        run_dir: the run directory (holds ``trackers.json``).
        config: the run config (pydantic model or mapping), sent through :func:`public_config`.
        resume_step: as for :class:`MetricsLogger`: ``k >= 0`` or ``None`` continue the
            tracker runs recorded in the run directory, ``k < 0`` starts new ones.
    """
    classes = {"wandb": WandbTracker, "trackio": TrackioTracker}
    trackers: list[Tracker] = []
    try:
        for name in check_report_to(report_to):
            if name in classes:
                trackers.append(classes[name](run_dir, config=config, resume_step=resume_step))
    except BaseException:
        for t in trackers:
            t.close(exit_code=1)
        raise
    return trackers


# --------------------------------------------------------------------------------------------
# MetricsLogger
# --------------------------------------------------------------------------------------------


class MetricsLogger:
    """Append per-step metrics to ``run_dir/metrics.jsonl``, TensorBoard (``run_dir/tb``) and
    the trackers (W&B, trackio, ...); optionally per-step sample tables (:class:`SampleLog`).

    Args:
        run_dir: the run directory (created if needed).
        tensorboard: also write TensorBoard scalars. If ``torch.utils.tensorboard`` cannot be
            imported, a warning is issued once (per logger) and JSONL logging continues.
        resume_step: when resuming from a checkpoint taken at step ``k``, pass ``k``: the
            existing ``metrics.jsonl`` is rewritten atomically to keep only records with
            ``step <= k`` (a torn last line is dropped), and TensorBoard events with
            ``step > k`` are purged (``SummaryWriter(purge_step=k + 1)``). Without it, an
            existing file is appended to after dropping a torn last line, if any. The same
            holds for ``samples.jsonl``; trackers continue their recorded runs for ``k >= 0``
            or ``None`` and start new ones for ``k < 0`` (see :func:`open_trackers`).
        report_to: trackers to start (:func:`open_trackers`): "wandb", "trackio";
            "tensorboard" here is ignored (the ``tensorboard`` argument decides).
        config: the run config given to the trackers at init (through :func:`public_config`).
        trackers: tracker objects already started (anything with the :class:`Tracker`
            methods), used besides those of ``report_to``; closed with the logger.
        sample_every, sample_rows: per-step sample tables (:class:`SampleLog`) at step 1 and
            every ``sample_every`` steps, ``sample_rows`` rows each; 0 (default) writes none.

    Use as a context manager or call :meth:`close`. Create it on rank 0 only (other ranks:
    :class:`NullMetricsLogger`).
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        *,
        tensorboard: bool = True,
        resume_step: int | None = None,
        report_to: Sequence[str] | str = (),
        config: Any = None,
        trackers: Sequence[Tracker] = (),
        sample_every: int = 0,
        sample_rows: int = 8,
    ) -> None:
        check_report_to(report_to)  # refuse a missing extra before anything is written
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        self.resume_step = resume_step
        self._want_tb = tensorboard
        self._tb_writer: Any = None
        self._tb_failed = False
        self._closed = False
        if resume_step is not None:
            if isinstance(resume_step, bool) or not isinstance(resume_step, int):
                raise TypeError(f"MetricsLogger: resume_step must be an int, got {resume_step!r}")
            self._truncate_to(resume_step)
        else:
            self._repair_torn_tail()
        for t in trackers:
            if not isinstance(t, Tracker):
                raise TypeError(f"MetricsLogger: tracker {t!r} lacks log/log_table/close")
        # the sample log's file checks first: nothing is started if its arguments are wrong
        self.samples = (SampleLog(self.run_dir, every=sample_every, max_rows=sample_rows,
                                  resume_step=resume_step) if sample_every else None)
        try:
            self.trackers: list[Tracker] = list(trackers) + open_trackers(
                report_to, self.run_dir, config=config, resume_step=resume_step)
        except BaseException:
            if self.samples is not None:
                self.samples.close()
            raise
        if self.samples is not None:
            self.samples.trackers = self.trackers
        self._file: IO[str] = open(self.path, "a", encoding="utf-8", newline="\n")

    # -- file maintenance ----------------------------------------------------------------

    def _truncate_to(self, k: int) -> None:
        if not self.path.exists():
            return
        records, _ = _parse_lines(self.path, self.path.read_bytes())
        kept = [r for r in records if isinstance(r.get("step"), (int, float)) and r["step"] <= k]
        text = "".join(json.dumps(r, allow_nan=False) + "\n" for r in kept)
        write_text_atomic(self.path, text)

    def _repair_torn_tail(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        _, good = _parse_lines(self.path, data)
        if good != len(data):
            write_text_atomic(self.path, data[:good].decode("utf-8"))

    # -- TensorBoard ---------------------------------------------------------------------

    def _tb(self) -> Any:
        if not self._want_tb or self._tb_failed:
            return None
        if self._tb_writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except Exception as exc:  # ImportError, or tensorboard's own import-time errors
                self._tb_failed = True
                warnings.warn(
                    f"MetricsLogger: TensorBoard unavailable ({exc}); logging only to "
                    f"{self.path}",
                    stacklevel=3,
                )
                return None
            purge = None if self.resume_step is None else self.resume_step + 1
            self._tb_writer = SummaryWriter(log_dir=str(self.run_dir / TB_DIR), purge_step=purge)
        return self._tb_writer

    # -- public API ----------------------------------------------------------------------

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Append ``{"step": step, **metrics}`` as one fsync'd JSON line (NaN/inf -> null) and
        write each metric as a TensorBoard scalar.

        Values may be Python numbers, bools, NumPy / torch scalars, or ``None``.

        Raises:
            ValueError: the logger is closed, or ``metrics`` contains the key ``"step"``.
            TypeError: a key is not a string or a value is not a scalar number.
        """
        if self._closed:
            raise ValueError(f"MetricsLogger.log: logger for {self.path} is closed")
        if isinstance(step, bool) or not isinstance(step, int):
            step_item = getattr(step, "item", None)
            if callable(step_item) and isinstance(step_item(), int):
                step = int(step_item())
            else:
                raise TypeError(f"MetricsLogger.log: step must be an int, got {step!r}")
        record: dict[str, Any] = {"step": int(step)}
        for name, value in metrics.items():
            if not isinstance(name, str):
                raise TypeError(f"MetricsLogger.log: metric name {name!r} is not a string")
            if name == "step":
                raise ValueError("MetricsLogger.log: 'step' is reserved; pass it as the argument")
            record[name] = self._scalar(name, value)
        line = json.dumps(to_jsonable(record), allow_nan=False) + "\n"
        self._file.write(line)
        self._file.flush()
        os.fsync(self._file.fileno())

        writer = self._tb()
        if writer is not None:
            for name, value in record.items():
                if name != "step" and value is not None:
                    writer.add_scalar(name, value, global_step=record["step"])
        if self.trackers:
            values = {k: v for k, v in record.items() if k != "step" and v is not None}
            for tracker in self.trackers:
                tracker.log(record["step"], values)

    def samples_due(self, step: int) -> bool:
        """Whether :meth:`log_samples` writes anything at ``step`` (so a caller can skip
        gathering the rows)."""
        return self.samples is not None and self.samples.due(step)

    def log_samples(
        self,
        step: int,
        prompts: Sequence[str],
        completions: Sequence[str],
        rewards_total: Sequence[float],
        per_function: Mapping[str, Sequence[float]],
    ) -> bool:
        """The sample table of ``step`` (see :meth:`SampleLog.maybe_log`); returns whether
        rows were written. Does nothing without ``sample_every``."""
        if self._closed:
            raise ValueError(f"MetricsLogger.log_samples: logger for {self.path} is closed")
        if self.samples is None:
            return False
        return self.samples.maybe_log(step, prompts, completions, rewards_total, per_function)

    @staticmethod
    def _scalar(name: str, value: Any) -> float | int | None:
        if value is None:
            return None
        if isinstance(value, bool):
            return int(value)
        if isinstance(value, (int, float)):
            return value
        item = getattr(value, "item", None)
        if callable(item):
            try:
                v = item()
            except (ValueError, RuntimeError) as exc:
                raise TypeError(f"MetricsLogger.log: metric {name!r} is not a scalar") from exc
            if isinstance(v, (bool, int, float)):
                return MetricsLogger._scalar(name, v)
        raise TypeError(
            f"MetricsLogger.log: metric {name!r} has non-numeric value of type "
            f"{type(value).__name__}"
        )

    def flush(self) -> None:
        """Flush TensorBoard (the JSONL file is flushed on every line)."""
        if self._tb_writer is not None:
            self._tb_writer.flush()

    def close(self, exit_code: int = 0) -> None:
        """Close the JSONL files, the TensorBoard writer and the trackers (``exit_code`` tells
        them how the run ended: 0 normally; the context manager passes 1 on an exception).
        Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._file.close()
        if self.samples is not None:
            self.samples.close()
        if self._tb_writer is not None:
            self._tb_writer.close()
            self._tb_writer = None
        errors: list[BaseException] = []
        for tracker in self.trackers:
            try:
                tracker.close(exit_code=exit_code)
            except Exception as exc:  # close every tracker, then report the first failure
                errors.append(exc)
        if errors:
            raise errors[0]

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(exit_code=0 if exc_type is None else 1)


# --------------------------------------------------------------------------------------------
# per-step sample tables
# --------------------------------------------------------------------------------------------


def read_samples(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read ``run_dir/samples.jsonl`` (or a ``.jsonl`` path): one dict per row, in file order;
    a torn final line is ignored, a missing file gives ``[]``.

    Raises:
        ValueError: a line other than the last is not valid JSON (message names file and line).
    """
    p = Path(run_dir)
    path = p if p.suffix == ".jsonl" else p / SAMPLES_FILE
    if not path.exists():
        return []
    records, _ = _parse_lines(path, path.read_bytes())
    return records


class SampleLog:
    """Per-step sample tables: at step 1 and every ``every`` steps, the first ``max_rows``
    completions of the step (the first group(s) of a GRPO batch) go to ``run_dir/samples.jsonl``,
    one JSON object per line::

        {"step": 10, "prompt": "...", "completion": "...", "reward": 1.0,
         "rewards": {"<reward function>": 1.0, ...}}

    (``reward`` is the weighted total the advantages were computed from, ``rewards`` each
    function's own score; NaN/inf are written as ``null``), and to each tracker as a table
    (key ``samples``; columns ``step, prompt, completion, reward, reward/<fn>...``).

    Crash-safe like metrics.jsonl: each step's rows are written with one ``write`` and
    fsync'd; ``resume_step=k`` keeps only rows with ``step <= k`` (``k < 0``: none), ``None``
    appends after dropping a torn last line.

    Args:
        run_dir: the run directory.
        every: write at step 1 and at every multiple of ``every`` (>= 1).
        max_rows: rows per written step (>= 1).
        resume_step: as for :class:`MetricsLogger`.
        trackers: trackers that get the tables (rank 0 only).
    """

    def __init__(self, run_dir: str | os.PathLike[str], every: int = 10, max_rows: int = 8, *,
                 resume_step: int | None = None, trackers: Sequence[Tracker] = ()) -> None:
        for name, v in (("every", every), ("max_rows", max_rows)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"SampleLog: {name} must be an int >= 1, got {v!r}")
        if resume_step is not None and (isinstance(resume_step, bool) or not isinstance(resume_step, int)):
            raise TypeError(f"SampleLog: resume_step must be an int, got {resume_step!r}")
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / SAMPLES_FILE
        self.every, self.max_rows = every, max_rows
        self.trackers: list[Tracker] = list(trackers)
        if self.path.exists():
            data = self.path.read_bytes()
            records, good = _parse_lines(self.path, data)
            if resume_step is not None:
                kept = [r for r in records if isinstance(r.get("step"), int) and r["step"] <= resume_step]
                write_text_atomic(self.path, "".join(json.dumps(r, allow_nan=False) + "\n" for r in kept))
            elif good != len(data):
                write_text_atomic(self.path, data[:good].decode("utf-8"))
        self._file: IO[str] | None = open(self.path, "a", encoding="utf-8", newline="\n")

    def due(self, step: int) -> bool:
        """True at step 1 and at every multiple of ``every``."""
        return step == 1 or step % self.every == 0

    def maybe_log(
        self,
        step: int,
        prompts: Sequence[str],
        completions: Sequence[str],
        rewards_total: Sequence[float],
        per_function: Mapping[str, Sequence[float]],
    ) -> bool:
        """Write the first ``max_rows`` rows of ``step`` if :meth:`due`; returns whether it did.

        Args:
            step: the training step (the ``step`` of metrics.jsonl).
            prompts: the prompt text of each completion (a GRPO prompt repeated for each of
                its G completions), length B.
            completions: the decoded completions, length B.
            rewards_total: the total (weighted) reward of each completion, length B.
            per_function: reward function name -> its score for each completion, length B each.

        Raises:
            ValueError: lengths differ (the message names the argument or function), the log is
                closed, or a reward is not a number.
            TypeError: a prompt or completion is not a string.
        """
        if self._file is None:
            raise ValueError(f"SampleLog.maybe_log: {self.path} is closed")
        if isinstance(step, bool) or not isinstance(step, int):
            raise TypeError(f"SampleLog.maybe_log: step must be an int, got {step!r}")
        n = len(completions)
        lengths = {"prompts": len(prompts), "rewards_total": len(rewards_total)}
        lengths.update({f"per_function[{k!r}]": len(v) for k, v in per_function.items()})
        for what, length in lengths.items():
            if length != n:
                raise ValueError(f"SampleLog.maybe_log: {what} has {length} entries, completions has {n}")
        if not self.due(step):
            return False
        rows: list[dict[str, Any]] = []
        for i in range(min(n, self.max_rows)):
            if not isinstance(prompts[i], str) or not isinstance(completions[i], str):
                raise TypeError(f"SampleLog.maybe_log: row {i}: prompt and completion must be str, got "
                                f"{type(prompts[i]).__name__} and {type(completions[i]).__name__}")
            rows.append({
                "step": step, "prompt": prompts[i], "completion": completions[i],
                "reward": _as_float(rewards_total[i], f"rewards_total[{i}]"),
                "rewards": {str(k): _as_float(v[i], f"per_function[{k!r}][{i}]") for k, v in per_function.items()},
            })
        if not rows:
            return False
        self._file.write("".join(json.dumps(to_jsonable(r), allow_nan=False) + "\n" for r in rows))
        self._file.flush()
        os.fsync(self._file.fileno())
        if self.trackers:
            names = [str(k) for k in per_function]
            columns = ["step", "prompt", "completion", "reward", *(f"reward/{k}" for k in names)]
            table = [[r["step"], r["prompt"], r["completion"], r["reward"], *(r["rewards"][k] for k in names)]
                     for r in rows]
            for tracker in self.trackers:
                tracker.log_table(step, SAMPLES_KEY, columns, table)
        return True

    def close(self) -> None:
        """Close the file. Idempotent."""
        if self._file is not None:
            self._file.close()
            self._file = None


def _as_float(value: Any, where: str) -> float:
    item = getattr(value, "item", None)
    if callable(item) and not isinstance(value, (int, float)):
        value = item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"SampleLog.maybe_log: {where} is not a number: {value!r}")
    return float(value)


class NullMetricsLogger:
    """The metrics logger of data-parallel ranks other than 0: same methods as
    :class:`MetricsLogger`, writes nothing."""

    samples = None
    trackers: list[Tracker] = []

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        pass

    def samples_due(self, step: int) -> bool:
        return False

    def log_samples(self, step: int, prompts: Sequence[str], completions: Sequence[str],
                    rewards_total: Sequence[float], per_function: Mapping[str, Sequence[float]]) -> bool:
        return False

    def flush(self) -> None:
        pass

    def close(self, exit_code: int = 0) -> None:
        pass


# --------------------------------------------------------------------------------------------
# progress bars
# --------------------------------------------------------------------------------------------


#: Libraries whose deprecation warnings a run hides (transformers' are often attributed to
#: ``torch.nn.modules.module``, the frame that called the model's forward).
_NOISY_LIBRARIES = r"(transformers|torch|huggingface_hub|safetensors|peft|accelerate)(\.|$)"


def hide_library_warnings() -> None:
    """Process-wide (the CLI): ignore FutureWarning / DeprecationWarning raised from the model
    libraries. Our own warnings (skipped rows, truncated prompts, ...) are UserWarnings and stay."""
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=_NOISY_LIBRARIES)


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """While the block runs, transformers' own progress bars ("Loading weights", "Writing model
    shards"), its log lines below ERROR and the model libraries' deprecation warnings are
    hidden; the previous settings come back after. With ``TRUSTRL_DEBUG`` set, nothing is
    hidden. Every load and save of a model or tokenizer in trustrl runs inside it."""
    from trustrl.errors import debug_requested

    if debug_requested():
        yield
        return
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is a dependency
        yield
        return
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            hide_library_warnings()
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def progress(
    iterable: Iterable[Any] | None = None,
    total: int | None = None,
    desc: str = "",
    disable: bool | None = None,
    **kwargs: Any,
) -> tqdm:
    """A tqdm progress bar on stderr; returns the bar.

    Callers show live numbers with ``bar.set_postfix(format_postfix(metrics))`` (or
    ``bar.set_postfix_str``). With ``disable=None`` the bar is on unless the environment
    variable ``TRUSTRL_NO_PROGRESS`` is ``1``/``true``/``yes``; it is always off on a
    data-parallel rank other than 0 (environment ``RANK``). Extra keyword arguments go to
    ``tqdm``.
    """
    if disable is None:
        disable = os.environ.get(NO_PROGRESS_ENV, "").strip().lower() in {"1", "true", "yes"}
    if os.environ.get("RANK", "0").strip() not in ("", "0"):
        disable = True  # data parallel (torchrun sets RANK): only rank 0 draws a bar
    kwargs.setdefault("file", sys.stderr)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, total=total, desc=desc, disable=disable, **kwargs)


def format_postfix(
    metrics: Mapping[str, Any], keys: Iterable[str] | None = None
) -> dict[str, str]:
    """Compact strings for a progress-bar postfix: ``{"reward/mean": "0.412", ...}``.

    Args:
        metrics: name -> value.
        keys: which names to show, in order (missing ones skipped); default all.
    """
    names = list(metrics) if keys is None else [k for k in keys if k in metrics]
    out: dict[str, str] = {}
    for k in names:
        v = metrics[k]
        if isinstance(v, float):
            out[k] = f"{v:.4g}"
        else:
            item = getattr(v, "item", None)
            out[k] = f"{item():.4g}" if callable(item) else str(v)
    return out


def _summary_value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return json.dumps(value) if len(json.dumps(value)) <= 80 else f"[{len(value)} items]"
    return str(value)


def format_summary(summary: Mapping[str, Any], title: str = "summary", skip: Iterable[str] = ("eval_history",)) -> str:
    """A run summary as a two-column table (what ``trustrl train`` prints at the end): one row
    per key in order, nested mappings as ``key.sub`` rows (an empty one as ``-``), floats to 4
    significant digits, None as ``-``; ``skip`` keys (the per-evaluation history) left out."""
    skipped = set(skip)
    rows: list[tuple[str, str]] = []
    for key, value in summary.items():
        if key in skipped:
            continue
        if isinstance(value, Mapping) and value:
            rows.extend((f"{key}.{k}", _summary_value(v)) for k, v in value.items())
        else:
            rows.append((key, "-" if isinstance(value, Mapping) else _summary_value(value)))
    width = max((len(k) for k, _ in rows), default=0)
    return "\n".join([title] + [f"  {k.ljust(width)}  {v}" for k, v in rows])
