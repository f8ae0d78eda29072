"""Loading, validating and writing row datasets, and turning prompts into model input text.

Every trainer reads its data through :func:`load_rows`, so a bad file fails here, once, with a
message that names the file, the row and the column -- not as a ``KeyError`` deep inside a
training step.

Supported sources (chosen by extension, case-insensitive, or by being a directory):

===========================  ===================================================================
``.jsonl`` / ``.json``       JSON lines (one object per line, blank lines ignored); a ``.json``
                             file whose first non-blank character is ``[`` is read as one JSON
                             array of objects instead.
``.csv``                     comma-separated with a header line; every cell is a string and an
                             empty cell is null (see ``types`` for conversion).
``.parquet``                 any parquet file pyarrow can read.
directory                    written by ``datasets.Dataset.save_to_disk`` or
                             ``datasets.DatasetDict.save_to_disk`` (split ``"train"`` unless
                             ``split=`` is given).
===========================  ===================================================================

A dataset may also be a list of sources (:func:`load_rows` takes either): each entry a path,
a glob (``data/*.parquet``: every match in sorted order; a glob matching nothing is an error
naming it) or a ``{"path": ..., "weight": W}`` mapping. The rows are read file by file (errors
name the file and its row) and mixed by repetition, see :func:`mix_indices`: a source of ``n``
valid rows contributes ``round(W n)`` rows; the mix lists the sources in the order given.

Row-number convention used in every :class:`DataError`:

* JSON lines and CSV: ``line N``, the 1-based physical line of the file where the row starts
  (for CSV the header is line 1, so the first data row is line 2). This is the number an
  editor shows.
* JSON array: ``item N``, the 1-based position of the object inside the array (a syntax error
  is reported by ``line N`` instead, since there is no item yet).
* parquet and ``datasets`` directories: ``row index N``, 0-based, as ``table[N]`` /
  ``dataset[N]`` would index it.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import math
import os
from fractions import Fraction
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trustrl.errors import UserError
from trustrl.logging import atomic_writer

__all__ = [
    "TEXT_FIELDS",
    "DataError",
    "LoadedRows",
    "encode_prompt",
    "encode_rendered_text",
    "format_prompt",
    "load_rows",
    "mix_indices",
    "source_files",
    "source_name",
    "write_jsonl",
]

#: Columns that hold text: when present and non-null they must be a non-blank string or a
#: non-empty list of chat messages (``{"role": str, "content": ...}`` dicts).
TEXT_FIELDS: tuple[str, ...] = ("prompt", "completion", "chosen", "rejected", "text")

_TypeSpec = type | tuple[type, ...]


class DataError(UserError, ValueError):
    """A data file, or one row of it, is unusable.

    Attributes:
        path: the file or directory at fault.
        row: the row number, or ``None`` for a whole-file problem; its meaning is given by
            ``row_label`` (see the module docstring for the convention per format).
        row_label: ``"line 3"``, ``"item 2"``, ``"row index 0"`` or ``None``.
        column: the column at fault, or ``None`` when the problem is not in one column.
        problem: the bare description of what is wrong.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        problem: str,
        *,
        row_label: str | None = None,
        row: int | None = None,
        column: str | None = None,
    ) -> None:
        self.path = Path(path)
        self.problem = problem
        self.row_label = row_label
        self.row = row
        self.column = column
        parts = [str(self.path)]
        if row_label is not None:
            parts.append(row_label)
        if column is not None:
            parts.append(f"column {column!r}")
        super().__init__(": ".join(parts) + ": " + problem)


class DataNotFoundError(DataError, FileNotFoundError):
    """The data file or directory does not exist (also a ``FileNotFoundError``)."""


@dataclass
class LoadedRows:
    """Result of :func:`load_rows`.

    Attributes:
        rows: the valid rows, in file order (for a list of sources: the mix, source by
            source), as plain ``dict`` objects; a row repeated by a weight is the same object.
        skipped: how many bad rows were skipped (always 0 unless ``skip_bad=True``).
        path: the source that was read (for a list of sources: the first file).
        origins: for each row, ``(file, row label)`` where it was read, e.g.
            ``(Path("a.jsonl"), "line 3")``; see :meth:`where`.
    """

    rows: list[dict[str, Any]]
    skipped: int
    path: Path
    origins: list[tuple[Path, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rows)

    def where(self, index: int) -> tuple[Path, str | None]:
        """``(file, row label)`` of row ``index`` (0-based in :attr:`rows`), for error messages."""
        if index < len(self.origins):
            return self.origins[index]
        return self.path, f"valid row {index + 1}"

    def error(self, index: int, problem: str, column: str | None = None) -> "DataError":
        """A :class:`DataError` about row ``index`` naming its file and row."""
        path, label = self.where(index)
        return DataError(path, problem, row_label=label, column=column)


# --------------------------------------------------------------------------------------------
# Raw row readers. Each yields (row_label, row_number, row_or_error). A row-level problem is
# yielded as a DataError (so skip_bad can count it); a file-level problem is raised.
# --------------------------------------------------------------------------------------------

_RawItem = tuple[str, int, "dict[str, Any] | DataError"]
_BOM = b"\xef\xbb\xbf"


def _decode_line(path: Path, raw: bytes, label: str, lineno: int) -> str | DataError:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return DataError(
            path,
            f"invalid UTF-8 bytes {raw[e.start:e.end]!r} at byte {e.start} of the line",
            row_label=label,
            row=lineno,
        )


def _read_jsonl(path: Path) -> Iterator[_RawItem]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM) :]
            label = f"line {lineno}"
            if not raw.strip():
                continue
            text = _decode_line(path, raw, label, lineno)
            if isinstance(text, DataError):
                yield label, lineno, text
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                yield label, lineno, DataError(
                    path, f"invalid JSON: {e.msg} (column {e.colno})", row_label=label, row=lineno
                )
                continue
            if not isinstance(obj, dict):
                yield label, lineno, DataError(
                    path,
                    f"expected a JSON object, got {type(obj).__name__}",
                    row_label=label,
                    row=lineno,
                )
                continue
            yield label, lineno, obj


def _read_json_array(path: Path, data: bytes) -> Iterator[_RawItem]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        lineno = data.count(b"\n", 0, e.start) + 1
        raise DataError(
            path,
            f"invalid UTF-8 bytes {data[e.start:e.end]!r}",
            row_label=f"line {lineno}",
            row=lineno,
        ) from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(
            path,
            f"invalid JSON: {e.msg} (column {e.colno})",
            row_label=f"line {e.lineno}",
            row=e.lineno,
        ) from None
    if not isinstance(obj, list):
        raise DataError(path, f"expected a JSON array of objects, got {type(obj).__name__}")
    for i, item in enumerate(obj, start=1):
        label = f"item {i}"
        if not isinstance(item, dict):
            yield label, i, DataError(
                path, f"expected a JSON object, got {type(item).__name__}", row_label=label, row=i
            )
        else:
            yield label, i, item


def _read_json(path: Path) -> Iterator[_RawItem]:
    with open(path, "rb") as f:
        head = f.read(4096)
    stripped = head[len(_BOM) :] if head.startswith(_BOM) else head
    if stripped.lstrip()[:1] == b"[":
        data = path.read_bytes()
        if data.startswith(_BOM):
            data = data[len(_BOM) :]
        yield from _read_json_array(path, data)
    else:
        yield from _read_jsonl(path)


def _read_csv(path: Path) -> Iterator[_RawItem]:
    bad_lines: dict[int, DataError] = {}
    physical = 0

    def lines(f: io.BufferedReader) -> Iterator[str]:
        nonlocal physical
        for raw in f:
            physical += 1
            if physical == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM) :]
            text = _decode_line(path, raw, f"line {physical}", physical)
            if isinstance(text, DataError):
                bad_lines[physical] = text
                text = raw.decode("utf-8", errors="replace")
            yield text

    with open(path, "rb") as f:
        reader = csv.reader(lines(f))
        try:
            header = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise DataError(path, f"malformed CSV header: {e}", row_label="line 1", row=1) from None
        if 1 in bad_lines:
            raise bad_lines[1]
        if len(set(header)) != len(header):
            raise DataError(path, f"duplicate column names in header {header}", row_label="line 1", row=1)
        end = 1  # last physical line consumed by the previous record
        while True:
            start = end + 1
            try:
                record = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                raise DataError(path, f"malformed CSV: {e}", row_label=f"line {start}", row=start) from None
            end = physical
            # Skip blank physical lines between records so the label points at the record.
            label = f"line {start}"
            if not record:
                continue
            bad = [bad_lines[n] for n in range(start, end + 1) if n in bad_lines]
            if bad:
                yield bad[0].row_label or label, bad[0].row or start, bad[0]
                continue
            if len(record) != len(header):
                yield label, start, DataError(
                    path,
                    f"expected {len(header)} fields (header {header}), got {len(record)}",
                    row_label=label,
                    row=start,
                )
                continue
            yield label, start, {k: (v if v != "" else None) for k, v in zip(header, record)}


def _read_parquet(path: Path) -> Iterator[_RawItem]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several unrelated types for a corrupt file
        raise DataError(path, f"cannot read parquet file: {e}") from None
    index = 0
    for batch in pf.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            yield f"row index {index}", index, row
            index += 1


def _read_datasets_dir(path: Path, split: str | None) -> Iterator[_RawItem]:
    import datasets

    try:
        obj = datasets.load_from_disk(str(path))
    except Exception as e:
        raise DataError(
            path, f"not a directory written by datasets save_to_disk ({type(e).__name__}: {e})"
        ) from None
    if isinstance(obj, datasets.DatasetDict):
        name = "train" if split is None else split
        if name not in obj:
            raise DataError(path, f"split {name!r} not found; the DatasetDict has {sorted(obj)}")
        ds = obj[name]
    else:
        if split is not None:
            raise DataError(
                path, f"split={split!r} was given but the directory holds a single Dataset, not a DatasetDict"
            )
        ds = obj
    index = 0
    for batch in ds.iter(batch_size=1024):
        keys = list(batch)
        n = len(batch[keys[0]]) if keys else 0
        for j in range(n):
            yield f"row index {index}", index, {k: batch[k][j] for k in keys}
            index += 1


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _is_null(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _check_text(value: Any) -> str | None:
    """Return a problem description if ``value`` is not usable text, else None."""
    if isinstance(value, str):
        return None if value.strip() else "empty or whitespace-only text"
    if isinstance(value, list):
        if not value:
            return "empty list of chat messages"
        for k, msg in enumerate(value):
            if not isinstance(msg, Mapping) or not isinstance(msg.get("role"), str) or "content" not in msg:
                return f"chat message {k} is not a {{'role': str, 'content': ...}} mapping"
        return None
    return f"expected a string or a list of chat messages, got {type(value).__name__}"


def _coerce_csv(value: str, expected: tuple[type, ...]) -> Any:
    """Convert a CSV cell (always a string) to the first expected type it parses as."""
    if str in expected:
        return value
    for t in expected:
        try:
            if t is bool:
                low = value.strip().lower()
                if low in ("true", "1"):
                    return True
                if low in ("false", "0"):
                    return False
                continue
            if t in (int, float):
                return t(value)
        except ValueError:
            continue
    return value  # left as str; the isinstance check below reports it


def _type_ok(value: Any, expected: tuple[type, ...]) -> bool:
    if isinstance(value, bool) and bool not in expected:
        return False  # bool is a subclass of int, but True is not a valid "int" answer
    if isinstance(value, int) and not isinstance(value, bool) and float in expected:
        return True  # JSON writes 2.0 as 2
    return isinstance(value, expected)


def _type_names(expected: tuple[type, ...]) -> str:
    return " or ".join(t.__name__ for t in expected)


def _validate(
    path: Path,
    label: str,
    rownum: int,
    row: dict[str, Any],
    required: Sequence[str],
    types: Mapping[str, tuple[type, ...]],
    from_csv: bool,
) -> DataError | None:
    def err(column: str, problem: str) -> DataError:
        return DataError(path, problem, row_label=label, row=rownum, column=column)

    for col in required:
        if col not in row:
            return err(col, f"required field missing (row has {sorted(row)})")
        if _is_null(row[col]):
            return err(col, "required field is null")
    for col in TEXT_FIELDS:
        if col in row and not _is_null(row[col]):
            problem = _check_text(row[col])
            if problem is not None:
                return err(col, problem)
    for col, expected in types.items():
        if col not in row or _is_null(row[col]):
            continue
        if from_csv and isinstance(row[col], str):
            row[col] = _coerce_csv(row[col], expected)
        if not _type_ok(row[col], expected):
            return err(
                col,
                f"expected {_type_names(expected)}, got {type(row[col]).__name__} {_short(row[col])}",
            )
    return None


def _short(value: Any, n: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= n else text[: n - 3] + "..."


def _normalize_types(types: Mapping[str, _TypeSpec] | None) -> dict[str, tuple[type, ...]]:
    out: dict[str, tuple[type, ...]] = {}
    for col, t in (types or {}).items():
        tt = t if isinstance(t, tuple) else (t,)
        if not tt or not all(isinstance(x, type) for x in tt):
            raise TypeError(f"load_rows: types[{col!r}] must be a type or a tuple of types, got {t!r}")
        out[col] = tt
    return out


def load_rows(
    path: str | os.PathLike[str] | Sequence[Any],
    *,
    required: Sequence[str] = ("prompt",),
    types: Mapping[str, _TypeSpec] | None = None,
    skip_bad: bool = False,
    limit: int | None = None,
    split: str | None = None,
) -> LoadedRows:
    """Read and validate rows from a JSON lines / JSON / CSV / parquet file or a datasets dir.

    Per-row checks, in this order (the first failing one is reported):

    1. every column in ``required`` is present and not null (``None``; a float NaN also
       counts as null);
    2. every text column (:data:`TEXT_FIELDS`) that is present and non-null is a non-blank
       string or a non-empty list of chat messages;
    3. every column in ``types`` that is present and non-null is an instance of the given
       type(s). ``bool`` never passes for ``int``; an ``int`` passes for ``float``. CSV cells
       are strings, so for CSV a cell is first converted to the requested type (``int``,
       ``float``, or ``bool`` from ``true/false/1/0``) and the converted value is returned.

    Undecodable bytes (invalid UTF-8) and invalid JSON are row errors for JSON lines and CSV.

    Args:
        path: file or directory (see the module docstring for formats), a glob, or a list of
            them and of ``{"path": ..., "weight": W}`` mappings (or objects with ``path`` and
            ``weight``): each is read as below, then mixed by :func:`mix_indices`; ``limit``
            then keeps the first rows of the mix.
        required: columns every row must have, non-null.
        types: optional ``{column: type or tuple of types}``.
        skip_bad: skip bad rows and count them in ``LoadedRows.skipped`` instead of raising.
            If every row is bad, a :class:`DataError` is raised anyway.
        limit: stop after this many valid rows.
        split: split of a saved ``DatasetDict`` (default ``"train"``); an error for any other
            source.

    Raises:
        FileNotFoundError: ``path`` does not exist (the message names it).
        DataError: empty source, unknown format, or a bad row (unless ``skip_bad``); the
            message names the file, the row (see the convention above) and the column.
    """
    if limit is not None and limit <= 0:
        raise ValueError(f"load_rows: limit must be a positive integer or None, got {limit!r}")
    sources = source_files(path)
    if len(sources) == 1 and sources[0][1] == 1.0:
        return _load_file(sources[0][0], required, _normalize_types(types), skip_bad, limit, split)
    rows: list[dict[str, Any]] = []
    origins: list[tuple[Path, str]] = []
    skipped = 0
    for file, weight in sources:
        part = _load_file(file, required, _normalize_types(types), skip_bad, None,
                          split if file.is_dir() else None)
        skipped += part.skipped
        taken = mix_indices(len(part.rows), weight)
        if not taken:
            raise DataError(file, f"weight {weight:g} x {len(part.rows)} rows rounds to no row; raise the weight")
        rows.extend(part.rows[i] for i in taken)
        origins.extend(part.origins[i] for i in taken)
    if limit is not None:
        rows, origins = rows[:limit], origins[:limit]
    return LoadedRows(rows=rows, skipped=skipped, path=sources[0][0], origins=origins)


def mix_indices(n: int, weight: float) -> list[int]:
    """Which rows (0-based, with repeats) of a source of ``n`` valid rows enter the mix.

    ``weight`` W > 0 is a repetition factor, applied deterministically (no random draw): with
    ``W = k + f`` (``k`` whole, ``0 <= f < 1``) every row is taken ``k`` times (the file ``k``
    times in order), then ``m = floor(f n + 1/2)`` more rows, evenly spaced through the file:
    indices ``floor(j n / m)``, ``j = 0 .. m - 1``. The source contributes ``round(W n)`` rows
    (halves rounded up; ``W`` taken as the decimal it is written as, so 0.15 x 10 = 1.5 -> 2).
    A trainer's sampler then draws from the mix uniformly (shuffled each epoch), so a row of
    source ``i`` is drawn with probability ``W_i n_i / sum_j W_j n_j`` per draw and each
    source's share of the training rows is proportional to ``W_i n_i``.

    Example: 10 rows, W = 2.5 -> rows 0..9, 0..9, then 5 more: 0, 2, 4, 6, 8 (25 rows)."""
    if n < 0 or not weight > 0 or not math.isfinite(weight):
        raise ValueError(f"mix_indices: need n >= 0 and a finite weight > 0, got n={n}, weight={weight}")
    exact = Fraction(repr(float(weight)))
    whole = math.floor(exact)
    extra = math.floor((exact - whole) * n + Fraction(1, 2))
    return list(range(n)) * whole + [j * n // extra for j in range(extra)]


def _entry(entry: Any) -> tuple[str, float]:
    """``(path or glob, weight)`` of one dataset entry: a path, a mapping or a DataSource."""
    if isinstance(entry, (str, os.PathLike)):
        return os.fspath(entry), 1.0
    if isinstance(entry, Mapping):
        unknown = set(entry) - {"path", "weight"}
        if "path" not in entry or unknown:
            raise ValueError(f"dataset entry {dict(entry)!r}: expected {{path: FILE, weight: W}}")
        return os.fspath(entry["path"]), float(entry.get("weight", 1.0))
    if hasattr(entry, "path"):
        return os.fspath(entry.path), float(getattr(entry, "weight", 1.0))
    raise ValueError(f"dataset entry {entry!r}: expected a path or {{path: FILE, weight: W}}")


def source_files(source: Any) -> list[tuple[Path, float]]:
    """A dataset spec as ``[(file or directory, weight)]``: globs expanded (sorted matches), in
    the order given. Raises :class:`DataError` for a glob matching nothing and
    ``FileNotFoundError`` for a path that does not exist, each naming it."""
    entries = [source] if isinstance(source, (str, os.PathLike, Mapping)) or hasattr(source, "path") else list(source)
    if not entries:
        raise ValueError("load_rows: an empty list of dataset sources")
    out: list[tuple[Path, float]] = []
    for entry in entries:
        pattern, weight = _entry(entry)
        if not weight > 0 or not math.isfinite(weight):
            raise ValueError(f"dataset {pattern}: weight must be a finite number > 0, got {weight}")
        if glob.has_magic(pattern) and not os.path.exists(pattern):
            matches = sorted(glob.glob(pattern, recursive=True))
            if not matches:
                raise DataError(pattern, "the glob matches no file")
            out.extend((Path(m), weight) for m in matches)
            continue
        if not os.path.exists(pattern):
            raise DataNotFoundError(pattern, "no such file or directory")
        out.append((Path(pattern), weight))
    _refuse_repeats(out)
    return out


def _refuse_repeats(files: list[tuple[Path, float]]) -> None:
    """A file reached twice (listed twice, or by a path and a glob) would silently count its
    rows twice: refused, pointing at ``weight`` (the one way to repeat a source)."""
    seen: dict[str, Path] = {}
    for path, _ in files:
        key = os.path.realpath(path)
        if key in seen:
            raise DataError(path, f"this file is in the dataset list twice (also as {seen[key]}); list it once, "
                                  "with weight: 2 to count its rows twice")
        seen[key] = path


def source_name(source: Any) -> str:
    """A dataset spec for messages: ``a.jsonl``, or ``a.jsonl + data/*.parquet x2``."""
    if source is None:
        return "none"
    entries = [source] if isinstance(source, (str, os.PathLike, Mapping)) or hasattr(source, "path") else list(source)
    names = []
    for entry in entries:
        try:
            pattern, weight = _entry(entry)
        except ValueError:
            pattern, weight = repr(entry), 1.0
        names.append(pattern if weight == 1.0 else f"{pattern} x{weight:g}")
    return " + ".join(names)


def _load_file(
    p: Path,
    required: Sequence[str],
    type_map: dict[str, tuple[type, ...]],
    skip_bad: bool,
    limit: int | None,
    split: str | None,
) -> LoadedRows:
    """:func:`load_rows` for one file or directory."""
    if not p.exists():
        raise DataNotFoundError(p, "no such file or directory")
    if not p.is_dir() and not os.access(p, os.R_OK):
        raise DataError(p, "cannot read the file (permission denied)")

    suffix = p.suffix.lower()
    if split is not None and not p.is_dir():
        raise ValueError(f"load_rows: split={split!r} only applies to a saved DatasetDict directory, not {p}")
    items: Iterable[_RawItem]
    if p.is_dir():
        items = _read_datasets_dir(p, split)
    elif suffix == ".jsonl":
        items = _read_jsonl(p)
    elif suffix == ".json":
        items = _read_json(p)
    elif suffix == ".csv":
        items = _read_csv(p)
    elif suffix == ".parquet":
        items = _read_parquet(p)
    else:
        raise DataError(
            p,
            f"unsupported file type {suffix!r}; expected .jsonl, .json, .csv, .parquet "
            "or a directory written by datasets save_to_disk",
        )

    rows: list[dict[str, Any]] = []
    origins: list[tuple[Path, str]] = []
    skipped = 0
    first_error: DataError | None = None
    seen = 0
    for label, rownum, item in items:
        seen += 1
        if isinstance(item, DataError):
            error: DataError | None = item
        else:
            error = _validate(p, label, rownum, item, required, type_map, suffix == ".csv")
        if error is not None:
            if not skip_bad:
                raise error
            skipped += 1
            first_error = first_error or error
            continue
        assert not isinstance(item, DataError)
        rows.append(item)
        origins.append((p, label))
        if limit is not None and len(rows) >= limit:
            break

    if seen == 0:
        raise DataError(p, "no rows: the file or dataset is empty")
    if not rows:
        assert first_error is not None
        raise DataError(
            p,
            f"all {skipped} rows are invalid (skip_bad=True); the first bad one: {first_error.problem}",
            row_label=first_error.row_label,
            row=first_error.row,
            column=first_error.column,
        )
    return LoadedRows(rows=rows, skipped=skipped, path=p, origins=origins)


def write_jsonl(path: str | os.PathLike[str], rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write ``rows`` as UTF-8 JSON lines, atomically.

    The rows go to a temporary file in the destination directory, which is flushed, fsynced
    and then moved over ``path`` with :func:`os.replace`, so a reader never sees a half-written
    file and a crash leaves any previous file intact. Parent directories are created.

    Raises:
        TypeError: a row is not a mapping or holds a value JSON cannot encode (names the row
            index, 0-based).
    """
    p = Path(path)
    with atomic_writer(p) as f:
        for i, row in enumerate(rows):
            if not isinstance(row, Mapping):
                raise TypeError(f"write_jsonl({p}): row {i} is {type(row).__name__}, expected a mapping")
            try:
                line = json.dumps(dict(row), ensure_ascii=False, allow_nan=False)
            except (TypeError, ValueError) as e:
                raise TypeError(f"write_jsonl({p}): row {i} cannot be encoded as JSON: {e}") from e
            f.write(line + "\n")
    return p


def format_prompt(
    tokenizer: Any,
    prompt: str | list[dict[str, Any]],
    *,
    use_chat_template: bool | None = None,
    system_prompt: str | None = None,
) -> str:
    """Turn a dataset prompt into the exact text the policy is conditioned on.

    The chat template is applied (``tokenizer.apply_chat_template(messages, tokenize=False,
    add_generation_prompt=True)``) when ``prompt`` is a list of chat messages, or when
    ``use_chat_template`` is True, or when it is None and the tokenizer has a non-empty
    ``chat_template``. A string prompt becomes ``[{"role": "user", "content": prompt}]``.

    ``system_prompt`` is a default: with the template it is prepended as a ``system`` message
    unless the messages already start with one (the row's own system message wins). Without
    the template the result is ``system_prompt + "\\n\\n" + prompt``.

    To get token ids, use :func:`encode_prompt` (it knows whether the template was applied,
    which decides the special tokens; the text alone does not tell).

    Raises:
        ValueError: the template is needed but the tokenizer has none; a list of messages
            with ``use_chat_template=False``; a prompt that is neither a string nor a list.
    """
    return _render_prompt(tokenizer, prompt, use_chat_template=use_chat_template, system_prompt=system_prompt)[0]


def _render_prompt(
    tokenizer: Any,
    prompt: str | list[dict[str, Any]],
    *,
    use_chat_template: bool | None,
    system_prompt: str | None,
) -> tuple[str, bool]:
    """:func:`format_prompt`'s text and whether the chat template produced it."""
    if not isinstance(prompt, (str, list)):
        raise ValueError(f"format_prompt: prompt must be a string or a list of chat messages, got {type(prompt).__name__}")
    is_messages = isinstance(prompt, list)
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if is_messages and use_chat_template is False:
        raise ValueError(
            "format_prompt: prompt is a list of chat messages but use_chat_template=False; "
            "messages can only be rendered through a chat template"
        )
    use = is_messages or use_chat_template is True or (use_chat_template is None and has_template)
    if not use:
        assert isinstance(prompt, str)
        return (prompt if not system_prompt else f"{system_prompt}\n\n{prompt}"), False
    if not has_template:
        why = "prompt is a list of chat messages" if is_messages else "use_chat_template=True"
        raise ValueError(
            f"format_prompt: {why} but tokenizer {type(tokenizer).__name__} has no chat_template; "
            "set tokenizer.chat_template or pass a plain string prompt with use_chat_template=False"
        )
    if is_messages:
        assert isinstance(prompt, list)
        problem = _check_text(prompt)
        if problem is not None:
            raise ValueError(f"format_prompt: {problem}")
        messages = [dict(m) for m in prompt]
    else:
        messages = [{"role": "user", "content": prompt}]
    if system_prompt and not (messages and messages[0].get("role") == "system"):
        messages.insert(0, {"role": "system", "content": system_prompt})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if not isinstance(text, str):
        raise ValueError(
            f"format_prompt: apply_chat_template(tokenize=False) returned {type(text).__name__}, expected str"
        )
    return text, True


# ------------------------------------------------------------------------- the BOS policy
#
# One rule for every text trustrl turns into ids, so that no input gets two BOS and none
# loses its BOS:
#
# * text rendered by a chat template is encoded with ``add_special_tokens=False``: the
#   template writes every special token it wants (``{{ bos_token }}`` ...), exactly as
#   ``apply_chat_template(tokenize=True)`` encodes it in transformers;
# * plain text -- a string prompt without template, with or without ``system_prompt`` -- is
#   encoded with ``add_special_tokens=True``: the tokenizer adds its BOS (if it has one);
# * text that reaches us already rendered, with no word on how (a reward model scores the
#   policy's prompt text, rendered by the *policy's* template): special tokens are added
#   unless the text already starts with the tokenizer's BOS token, the mark of a template
#   that wrote one (:func:`encode_rendered_text`).


def encode_prompt(
    tokenizer: Any,
    prompt: str | list[dict[str, Any]],
    *,
    use_chat_template: bool | None = None,
    system_prompt: str | None = None,
) -> tuple[str, list[int]]:
    """``(text, ids)`` of a dataset prompt: the text of :func:`format_prompt` and its token
    ids under the BOS policy above (template output without added special tokens; plain
    text, system-prompted or not, with them).

    Raises: as :func:`format_prompt`.
    """
    text, templated = _render_prompt(tokenizer, prompt, use_chat_template=use_chat_template,
                                     system_prompt=system_prompt)
    return text, list(tokenizer(text, add_special_tokens=not templated)["input_ids"])


def encode_rendered_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a text whose rendering is unknown (see the BOS policy above): with the
    tokenizer's special tokens, unless ``text`` already starts with its BOS token."""
    bos = getattr(tokenizer, "bos_token", None)
    written = bool(bos) and isinstance(bos, str) and text.startswith(bos)
    return list(tokenizer(text, add_special_tokens=not written)["input_ids"])
