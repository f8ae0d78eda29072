"""How a dataset is written in a config: one path, or a list of files / globs with optional
mixing weights (no torch: the schemas load without it). What a weight means is defined once,
in :func:`trustrl.data.mix_indices`."""

from __future__ import annotations

import difflib
import math
import os
from typing import Any, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class DataSource(BaseModel):
    """One entry of a dataset list: ``{path: FILE_OR_GLOB, weight: W}``."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    path: str
    """A .jsonl/.json/.csv/.parquet file, a saved `datasets` directory, or a glob such as
    ``data/*.parquet`` (every match, in sorted order, with this weight)."""
    weight: float = Field(1.0, gt=0)
    """Repetition factor: a source of n valid rows contributes round(weight * n) rows to the
    mix (weight 2: every row twice; 0.5: half the rows, evenly spaced through the file)."""

    @field_validator("path")
    @classmethod
    def _path_not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("dataset path must not be empty")
        return v

    @field_validator("weight")
    @classmethod
    def _weight_finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError(f"dataset weight must be finite, got {v}")
        return v


#: ``dataset:`` / ``eval_dataset:`` in a config: a path (or glob), or a list of paths, globs
#: and ``{path, weight}`` entries.
DatasetSpec = Union[str, list[Union[str, DataSource]]]


def check_dataset_spec(value: Any) -> DatasetSpec | None:
    """Parse ``dataset:`` / ``eval_dataset:`` (run before pydantic's own check, so a bad entry
    gets one message naming it instead of one per branch of the union): a path (``os.PathLike``
    accepted), or a non-empty list of paths and ``{path, weight}`` entries. The files themselves
    are checked when read (:func:`trustrl.data.load_rows`)."""
    if value is None:
        return None
    if isinstance(value, (str, os.PathLike)):
        return _path(os.fspath(value), "")
    if isinstance(value, (dict, DataSource)):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"expected a path, or a list of paths and {{path: FILE, weight: W}} entries; "
                         f"got {type(value).__name__}")
    if not value:
        raise ValueError("a dataset list must name at least one file")
    out: list[str | DataSource] = []
    for number, entry in enumerate(value, start=1):
        where = f"entry {number}: "
        if isinstance(entry, (str, os.PathLike)):
            out.append(_path(os.fspath(entry), where))
        elif isinstance(entry, DataSource):
            out.append(entry)
        elif isinstance(entry, dict):
            try:
                out.append(DataSource.model_validate(entry))
            except ValidationError as err:
                first = err.errors()[0]
                key = ".".join(str(p) for p in first["loc"])
                if first["type"] == "extra_forbidden":
                    close = difflib.get_close_matches(key, ["path", "weight"], n=1)
                    hint = f"did you mean {close[0]}? " if close else ""
                    raise ValueError(f"{where}unknown key {key!r}; {hint}an entry is {{path: FILE, weight: W}}") from None
                raise ValueError(f"{where}{key}: {first['msg']} (got {first.get('input')!r})") from None
        else:
            raise ValueError(f"{where}expected a path or {{path: FILE, weight: W}}, got {type(entry).__name__}")
    return out


def _path(path: str, where: str) -> str:
    if not path.strip():
        raise ValueError(f"{where}dataset path must not be empty")
    return path
