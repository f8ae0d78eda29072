"""What a report reads from a run directory, and how several runs are told apart.

A run directory holds (see :mod:`trustrl.logging` and the trainers):

* ``metrics.jsonl`` -- one object per logged step: ``{"step": 12, "reward/mean": 0.4, ...}``;
* ``config.yaml`` -- the resolved settings (``max_completion_length``, ``max_kl``, ...);
* ``train_summary.json`` -- written by trainers (``accuracy_first``, ``accuracy_last``, ...);
* ``summary.json`` -- written by ``trustrl classic`` and the demo;
* ``samples.jsonl`` -- a few sampled completions every N steps, one object per line:
  ``{"step": int, "prompt": str, "completion": str, "reward": float, "rewards": {fn: float}}``.

Every file is optional except the directory itself. A malformed file raises ``ValueError``
naming the file (and the line for JSONL files); a torn last JSONL line (a write cut short by a
crash) is ignored, as :func:`trustrl.logging.read_metrics` does.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trustrl.logging import read_metrics

__all__ = ["RunData", "Sample", "load_run", "metric_series", "read_samples", "run_labels", "differing_settings"]

Series = tuple[list[int], list[float]]
SAMPLES_FILE = "samples.jsonl"


@dataclass(frozen=True)
class Sample:
    """One sampled completion of a run at one step."""

    step: int
    prompt: str
    completion: str
    reward: float | None
    rewards: dict[str, float | None] = field(default_factory=dict)


@dataclass
class RunData:
    """Everything the report uses of one run directory."""

    path: Path
    records: list[dict[str, Any]]
    series: dict[str, Series]
    config: dict[str, Any]
    config_text: str | None
    summary: Any
    train_summary: dict[str, Any]
    samples: list[Sample]
    label: str = ""

    def setting(self, key: str) -> Any:
        """A top-level value of ``config.yaml`` (None when absent)."""
        return self.config.get(key)


def _finite(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    f = float(v)
    return f if math.isfinite(f) else None


def metric_series(records: Sequence[Mapping[str, Any]]) -> dict[str, Series]:
    """Per metric, ``(steps, values)`` sorted by step; non-numeric/null values become NaN.

    If a step appears more than once the last record wins. Metrics that never have a finite
    value are left out.
    """
    by_metric: dict[str, dict[int, float]] = {}
    for rec in records:
        step = rec.get("step")
        if isinstance(step, bool) or not isinstance(step, (int, float)):
            continue
        for k, v in rec.items():
            if k == "step":
                continue
            f = _finite(v)
            by_metric.setdefault(k, {})[int(step)] = math.nan if f is None else f
    out: dict[str, Series] = {}
    for k, pts in by_metric.items():
        if not any(math.isfinite(v) for v in pts.values()):
            continue
        steps = sorted(pts)
        out[k] = (steps, [pts[s] for s in steps])
    return out


def read_samples(path: str | os.PathLike[str]) -> list[Sample]:
    """Read a ``samples.jsonl`` file (missing file: ``[]``), in file order.

    Raises:
        ValueError: a line other than a torn last one is not JSON, or lacks ``step`` (int),
            ``prompt``/``completion`` (str) or a numeric-or-null ``reward``; the message names
            the file, the line and the key.
    """
    path = Path(path)
    if not path.is_file():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    complete = lines[:-1]  # lines[-1] is b"" for a clean file, else a torn write: ignored
    out: list[Sample] = []
    for lineno, raw in enumerate(complete, start=1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw.decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            if lineno == len(complete) and lines[-1] == b"":
                break  # garbage last line despite its newline: torn as well
            raise ValueError(f"{path}: line {lineno} is not valid JSON: {exc}") from exc
        where = f"{path}: line {lineno}"
        if not isinstance(rec, dict):
            raise ValueError(f"{where} is not a JSON object")
        step = rec.get("step")
        if isinstance(step, bool) or not isinstance(step, int):
            raise ValueError(f"{where}: 'step' must be an integer, got {step!r}")
        for key in ("prompt", "completion"):
            if not isinstance(rec.get(key), str):
                raise ValueError(f"{where}: {key!r} must be a string, got {rec.get(key)!r}")
        reward = rec.get("reward")
        if reward is not None and (isinstance(reward, bool) or not isinstance(reward, (int, float))):
            raise ValueError(f"{where}: 'reward' must be a number or null, got {reward!r}")
        rewards = rec.get("rewards", {}) or {}
        if not isinstance(rewards, dict):
            raise ValueError(f"{where}: 'rewards' must be an object of reward name -> number")
        fn_rewards: dict[str, float | None] = {}
        for name, v in rewards.items():
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise ValueError(f"{where}: rewards[{name!r}] must be a number or null, got {v!r}")
            fn_rewards[str(name)] = None if v is None else float(v)
        out.append(Sample(step, rec["prompt"], rec["completion"], None if reward is None else float(reward),
                          fn_rewards))
    return out


def _read_json(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc


#: Files every trustrl run directory has (one is enough: a run stopped early may lack the others).
RUN_DIR_MARKERS = ("metrics.jsonl", "config.yaml", "train_summary.json")


def load_run(run_dir: str | os.PathLike[str]) -> RunData:
    """Read one run directory.

    Raises:
        FileNotFoundError: ``run_dir`` is not a directory, or not a run directory (none of
            :data:`RUN_DIR_MARKERS` in it).
        ValueError: a file in it is malformed (the message names it).
    """
    path = Path(run_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"run directory {path} does not exist")
    if not any((path / name).is_file() for name in RUN_DIR_MARKERS):
        # (the report replaces RUN_DIR/plots/*.png: never in a directory trustrl did not write)
        raise FileNotFoundError(f"{path} is not a trustrl run directory (it has none of "
                                f"{', '.join(RUN_DIR_MARKERS)})")
    records = read_metrics(path)
    config_text = None
    config: dict[str, Any] = {}
    config_path = path / "config.yaml"
    if config_path.is_file():
        import yaml

        config_text = config_path.read_text(encoding="utf-8")
        try:
            loaded = yaml.safe_load(config_text)
        except yaml.YAMLError as exc:
            raise ValueError(f"{config_path} is not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ValueError(f"{config_path} is not a mapping of settings")
        config = loaded or {}
    train_summary = _read_json(path / "train_summary.json")
    if train_summary is not None and not isinstance(train_summary, dict):
        raise ValueError(f"{path / 'train_summary.json'} is not a JSON object")
    return RunData(
        path=path,
        records=records,
        series=metric_series(records),
        config=config,
        config_text=config_text,
        summary=_read_json(path / "summary.json"),
        train_summary=train_summary or {},
        samples=read_samples(path / SAMPLES_FILE),
        label=path.resolve().name or str(path),
    )


def run_labels(paths: Sequence[str | os.PathLike[str]]) -> list[str]:
    """Short, distinct names for run directories: the last path component, with parent
    components added until all names differ (``a/grpo``, ``b/grpo``).

    >>> run_labels(["runs/seed0", "runs/seed1"])
    ['seed0', 'seed1']
    >>> run_labels(["x/a/grpo", "x/b/grpo"])
    ['a/grpo', 'b/grpo']
    """
    parts = [Path(os.path.abspath(p)).parts for p in paths]
    depth = 1
    longest = max((len(p) for p in parts), default=1)
    while depth < longest:
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
        depth += 1
    return ["/".join(p[-depth:]) for p in parts]


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, Mapping) and obj:
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: obj} if prefix else {}


#: Settings that differ between any two runs and say nothing about how they were trained.
IGNORED_SETTINGS = frozenset({"output_dir", "progress", "tensorboard", "resume"})


def differing_settings(configs: Sequence[Mapping[str, Any]]) -> list[str]:
    """Flattened keys (``lora.r``) whose values are not the same in every config; a key absent
    from a config counts as a difference. Run-bookkeeping keys (``output_dir``, ...) excluded.

    >>> differing_settings([{"seed": 0, "lr": 1, "lora": {"r": 8}}, {"seed": 1, "lr": 1, "lora": {"r": 8}}])
    ['seed']
    """
    flat = [_flatten(c) for c in configs]
    keys: list[str] = []
    for f in flat:
        keys += [k for k in f if k not in keys]
    out = []
    for k in keys:
        if k.split(".")[0] in IGNORED_SETTINGS:
            continue
        values = [json.dumps(f[k], sort_keys=True, default=repr) if k in f else "\0absent" for f in flat]
        if len(set(values)) > 1:
            out.append(k)
    return out


def setting_text(config: Mapping[str, Any], key: str) -> str:
    """``key=value`` of a flattened key for legends (``seed=1``, ``lora.r=(absent)``)."""
    flat = _flatten(config)
    if key not in flat:
        return f"{key}=(absent)"
    v = flat[key]
    if isinstance(v, float):
        return f"{key}={v:g}"
    if isinstance(v, (list, dict)):
        return f"{key}={json.dumps(v)}"
    return f"{key}={v}"
