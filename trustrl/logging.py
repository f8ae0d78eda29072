"""Metrics logging: crash-safe JSONL + TensorBoard, progress bars, atomic JSON writes.

``run_dir/metrics.jsonl`` holds one JSON object per logged step, ``{"step": k, "<name>": v}``,
with metric names as in ``docs/CONVENTIONS.md`` (``reward/mean``, ``kl/ref``, ...). Each line is
flushed and fsync'd as it is written, so after a crash at most the final line is torn;
:func:`read_metrics` tolerates that, and :class:`MetricsLogger` with ``resume_step=k`` rewrites
the file (atomically) to hold exactly the steps ``<= k`` so a resumed run neither duplicates
nor loses steps. Non-finite values (NaN, inf) are written as JSON ``null``.

(This module is ``trustrl.logging``; it does not shadow the standard library's ``logging``
for absolute imports.)
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import IO, Any

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
# MetricsLogger
# --------------------------------------------------------------------------------------------


class MetricsLogger:
    """Append per-step metrics to ``run_dir/metrics.jsonl`` and TensorBoard (``run_dir/tb``).

    Args:
        run_dir: the run directory (created if needed).
        tensorboard: also write TensorBoard scalars. If ``torch.utils.tensorboard`` cannot be
            imported, a warning is issued once (per logger) and JSONL logging continues.
        resume_step: when resuming from a checkpoint taken at step ``k``, pass ``k``: the
            existing ``metrics.jsonl`` is rewritten atomically to keep only records with
            ``step <= k`` (a torn last line is dropped), and TensorBoard events with
            ``step > k`` are purged (``SummaryWriter(purge_step=k + 1)``). Without it, an
            existing file is appended to after dropping a torn last line, if any.

    Use as a context manager or call :meth:`close`.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        *,
        tensorboard: bool = True,
        resume_step: int | None = None,
    ) -> None:
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

    def close(self) -> None:
        """Close the JSONL file and the TensorBoard writer. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._file.close()
        if self._tb_writer is not None:
            self._tb_writer.close()
            self._tb_writer = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# --------------------------------------------------------------------------------------------
# progress bars
# --------------------------------------------------------------------------------------------


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
