"""A run directory never loses work: the rules every trainer applies before it starts.

* **A new run** (``resume=never``) in an ``output_dir`` that already holds a run stops with
  an error naming it, unless ``overwrite=true`` (``--overwrite``): the old run is then moved
  aside WHOLE, to the sibling ``OUT.previous-<n>`` (n = one more than any such folder there,
  so the newest is always the highest), and nothing is deleted. TensorBoard events, reports,
  checkpoints and metrics therefore always belong to one run.
* **A resume** (``resume=auto`` / ``--resume``, or a checkpoint path) compares the new
  settings with the run's saved ``config.yaml``. Keys that only say how long, how often or
  where to log (:data:`SAFE_ON_RESUME`) may change; any other change alters what the run
  means and is refused with the list of changes, unless the user confirms each changed key
  with ``allow_changed`` (``--allow-changed KEY,...``). Accepted changes are appended to
  ``config_history.jsonl`` before ``config.yaml`` takes the new values, so the settings of
  every stretch of the run stay on record.
* ``resume=auto`` with no complete checkpoint to resume from is an error (there is nothing to
  continue); it never starts from scratch without a word.

The checks (:func:`check_run_dir`) write nothing and run before any model loads, on every
rank; :func:`set_aside` (rank 0) moves an old run away when the run opens.
"""

from __future__ import annotations

import json
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import yaml

from trustrl.checkpoint import list_checkpoints
from trustrl.config import ConfigError, TrainConfig

CONFIG_FILE = "config.yaml"
HISTORY_FILE = "config_history.jsonl"

#: What marks a directory as holding a run (any one of them is enough).
RUN_FILES = ("config.yaml", "metrics.jsonl", "train_summary.json", "checkpoints", "final", "tb", "report.html",
             "plots", "samples.jsonl", "trackers.json", HISTORY_FILE)

#: Settings a resume may change without confirmation: they say how long the run goes, how often
#: it evaluates, saves and logs, where metrics go, and how (not what) a step is computed: the
#: device, the parallel layout, CPU threads, no-grad forward batch sizes, activation
#: recomputation -- never what a step computes.
SAFE_ON_RESUME = frozenset({
    "max_steps", "epochs", "eval_every", "save_every", "save_every_minutes", "keep_last_checkpoints", "log_every",
    "progress", "tensorboard", "report_to", "sample_every", "report", "max_consecutive_nonfinite", "output_dir",
    "device", "parallelism", "cpu_threads", "forward_batch_size", "logprob_chunk_size", "eval_batch_size",
    "gradient_checkpointing",
})

#: What to do this time, not a setting of the run: never compared, never saved as set.
ACTIONS = frozenset({"resume", "overwrite", "allow_changed"})

#: Keys holding paths: compared as absolute paths (a relative and an absolute spelling of the
#: same file are no change).
PATH_KEYS = frozenset({"model", "tokenizer", "dataset", "eval_dataset", "reward_model", "output_dir"})

_PREVIOUS_RE = re.compile(r"\.previous-(\d+)$")


class RunDirError(ConfigError):
    """The run directory does not allow what was asked (a run exists, nothing to resume, a
    resume that changes what the run means)."""


def run_files(out: Path) -> list[str]:
    """The run files present in ``out`` (empty: no run there)."""
    if not out.is_dir():
        return []
    return [name for name in RUN_FILES if (out / name).exists()]


def aside_path(out: Path) -> Path:
    """Where ``--overwrite`` moves the run in ``out``: ``OUT.previous-<n>``, n one more than
    the highest such sibling (1 for the first)."""
    out = Path(os.path.abspath(out))
    taken = [int(m.group(1)) for p in out.parent.glob(f"{glob_escape(out.name)}.previous-*")
             if (m := _PREVIOUS_RE.search(p.name)) and p.name == f"{out.name}.previous-{m.group(1)}"]
    return out.parent / f"{out.name}.previous-{max(taken, default=0) + 1}"


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def _flag(key: str) -> str:
    return {"resume": "--resume", "overwrite": "--overwrite", "allow_changed": "--allow-changed"}[key]


# --------------------------------------------------------------------------- comparing settings


def _normalized(key: str, value: Any) -> Any:
    if key.split(".")[0] not in PATH_KEYS:
        return value
    if isinstance(value, str) and value:
        return os.path.abspath(value)
    if isinstance(value, list):
        return [_normalized(key, v) for v in value]
    if isinstance(value, dict):
        return {k: _normalized(key, v) for k, v in value.items()}
    return value


def _diff(prefix: str, old: Any, new: Any, out: list[tuple[str, Any, Any]]) -> None:
    if isinstance(old, dict) and isinstance(new, dict):
        for k in list(old) + [k for k in new if k not in old]:
            _diff(f"{prefix}.{k}", old.get(k), new.get(k), out)
    elif _normalized(prefix, old) != _normalized(prefix, new):
        out.append((prefix, old, new))


def config_changes(saved: dict[str, Any], config: TrainConfig) -> list[tuple[str, Any, Any]]:
    """``[(dotted key, saved value, new value)]`` for every setting of ``config`` that differs
    from the ``saved`` config.yaml mapping (actions excluded). A key the saved file lacks
    (written by an older trustrl) counts as its default; a saved key this version does not
    know is ignored with a warning."""
    new = config.model_dump(mode="json")
    defaults = {name: f.get_default(call_default_factory=True) for name, f in type(config).model_fields.items()
                if not f.is_required()}
    unknown = sorted(set(saved) - set(new))
    if unknown:
        warnings.warn(f"resume: the saved config has keys this version does not know: {', '.join(unknown)}; "
                      "not compared", stacklevel=3)
    changes: list[tuple[str, Any, Any]] = []
    for key, value in new.items():
        if key in ACTIONS:
            continue
        old = saved[key] if key in saved else _jsonable(defaults.get(key))
        _diff(key, old, value, changes)
    return changes


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda o: o.model_dump(mode="json") if hasattr(o, "model_dump")
                                 else str(o)))


#: Settings that fix the run's total length: safe to change only while the learning-rate
#: schedule does not depend on the total (``constant``); a linear or cosine schedule is laid
#: over the total, so a new total would reshape the rest of it.
LENGTH_KEYS = frozenset({"max_steps", "epochs"})


def _allowed(key: str, confirmed: set[str], total_shapes_schedule: bool = False) -> bool:
    parts = key.split(".")
    prefixes = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
    safe = parts[0] in SAFE_ON_RESUME and not (total_shapes_schedule and parts[0] in LENGTH_KEYS)
    return safe or bool(prefixes & confirmed)


def read_saved_config(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise RunDirError(f"resume: cannot read the saved settings {path}: {err}") from None
    if not isinstance(data, dict):
        raise RunDirError(f"resume: the saved settings {path} are not a mapping of keys")
    return data


def _show(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."


def format_changes(changes: list[tuple[str, Any, Any]]) -> str:
    return ", ".join(f"{k} {_show(a)} -> {_show(b)}" for k, a, b in changes)


def source_run(config: TrainConfig) -> Path:
    """The run directory a resume continues: ``output_dir`` for ``resume=auto``, the run holding
    the checkpoint for a checkpoint path (``RUN/checkpoints/step_N``), else ``output_dir``."""
    if config.resume in ("never", "auto"):
        return Path(config.output_dir)
    ckpt = Path(config.resume)
    if ckpt.parent.name == "checkpoints" and (ckpt.parent.parent / CONFIG_FILE).is_file():
        return ckpt.parent.parent
    return Path(config.output_dir)


def refused_changes(config: TrainConfig) -> tuple[Path, list[tuple[str, Any, Any]], list[tuple[str, Any, Any]]]:
    """(saved config path, all changes, the changes neither safe nor confirmed)."""
    saved_path = source_run(config) / CONFIG_FILE
    saved = read_saved_config(saved_path)
    if saved is None:
        return saved_path, [], []
    changes = config_changes(saved, config)
    confirmed = set(config.allow_changed)
    shaped = _schedule_uses_total(saved, config)
    return saved_path, changes, [c for c in changes if not _allowed(c[0], confirmed, shaped)]


def _schedule_uses_total(saved: dict[str, Any], config: TrainConfig) -> bool:
    """Whether the learning-rate schedule (saved or new) is laid over the run's total steps."""
    schedules = {saved.get("lr_scheduler", "constant"), getattr(config, "lr_scheduler", "constant")}
    return bool(schedules - {"constant"})


# --------------------------------------------------------------------------- the checks


def _check_inputs_outside(config: TrainConfig, out: Path) -> None:
    """--overwrite moves ``out`` away: refuse when the model or data to read lie inside it."""
    root = Path(os.path.abspath(out))
    for key in sorted(PATH_KEYS - {"output_dir"}):
        value = getattr(config, key, None)
        for v in value if isinstance(value, list) else [value]:
            v = v.get("path") if isinstance(v, dict) else getattr(v, "path", v)  # a {path, weight} entry
            if isinstance(v, str) and v and Path(os.path.abspath(v)).is_relative_to(root):
                raise RunDirError(f"overwrite: {key} {v} lies inside output_dir {out}, which --overwrite would move "
                                  "aside; copy it out first or choose a new output_dir")


def _check_can_be_dir(out: Path) -> None:
    """``out`` is, or can be created as, a directory: neither it nor a parent that exists is
    a file (the run would otherwise fail with an OSError at its first write)."""
    for p in (out, *out.parents):
        if p.exists() or p.is_symlink():
            if not p.is_dir():
                what = "is" if p == out else f"lies under {p}, which is"
                raise RunDirError(f"output_dir {out} {what} a file, not a directory; choose another output_dir")
            return


def check_run_dir(config: TrainConfig) -> None:
    """Everything the run directory rules refuse, checked before any model loads (writes
    nothing): see the module docstring. Raises :class:`RunDirError` (a ConfigError) with a
    message that names the directory and the way forward."""
    out = Path(config.output_dir)
    _check_can_be_dir(out)
    unknown = sorted(set(config.allow_changed) - {k.split(".")[0] for k in type(config).model_fields})
    if unknown:
        raise RunDirError(f"allow_changed: {', '.join(unknown)} is not a setting of {type(config).__name__}")
    if config.resume == "never":
        found = run_files(out)
        if found and not config.overwrite:
            raise RunDirError(
                f"output_dir {out} already holds a run ({', '.join(found[:4])}); continue it with --resume, "
                f"start a new one in another output_dir, or pass --overwrite to move it aside to {aside_path(out)}")
        if found:
            _check_inputs_outside(config, out)
        return
    if config.overwrite:
        if config.resume == "auto":
            raise RunDirError("overwrite and resume=auto contradict each other: --resume continues the run in "
                              f"{out}, --overwrite moves it aside to start a new one; pass one of them")
        if Path(os.path.abspath(config.resume)).is_relative_to(Path(os.path.abspath(out))):
            raise RunDirError(f"overwrite: the checkpoint {config.resume} to resume from lies inside output_dir {out}")
        if run_files(out):
            _check_inputs_outside(config, out)
    elif config.resume != "auto" and run_files(out) and source_run(config).resolve() != out.resolve():
        raise RunDirError(f"output_dir {out} already holds another run; resume from {config.resume} into a new "
                          "output_dir, or pass --overwrite to move that run aside")
    if config.resume == "auto" and not list_checkpoints(out):
        if not run_files(out):
            raise RunDirError(f"resume: {out} holds no run to resume; drop --resume (resume=never) to start one")
        raise RunDirError(
            f"resume: {out} holds a run but no checkpoint to resume from (it stopped before its first one); "
            f"start it again with --overwrite (moves it aside to {aside_path(out)}) or in a new output_dir")
    saved_path, _, refused = refused_changes(config)
    if refused:
        keys = ",".join(dict.fromkeys(k.split(".")[0] for k, _, _ in refused))
        why = ""
        if any(k.split(".")[0] in LENGTH_KEYS for k, _, _ in refused):
            why = (f" (lr_scheduler {getattr(config, 'lr_scheduler', '?')} is laid over the total steps: a new total "
                   "reshapes the rest of the learning-rate schedule)")
        raise RunDirError(
            f"resume: these settings differ from {saved_path} and change what the run computes: "
            f"{format_changes(refused)}{why}\n  continue with them anyway: --allow-changed {keys} "
            f"(allow_changed=[{keys}]); or start a new run in a new output_dir")


def set_aside(config: TrainConfig) -> Path | None:
    """With ``overwrite=true`` and a run in ``output_dir`` (a new run, or a resume from a
    checkpoint elsewhere): move it whole to :func:`aside_path` and return where (else None).
    Call on rank 0 once :func:`check_run_dir` passed."""
    out = Path(config.output_dir)
    if not (config.overwrite and run_files(out)):
        return None
    aside = aside_path(out)
    os.replace(out, aside)
    print(f"trustrl: overwrite: moved the earlier run in {out} to {aside} (nothing was deleted)", file=sys.stderr)
    return aside


def record_resume(config: TrainConfig, step: int, checkpoint: Path) -> None:
    """A resume with changed settings: append ``{"step", "checkpoint", "changed": {key: [old,
    new]}, "confirmed": [...]}`` to ``config_history.jsonl`` (rank 0, before config.yaml takes
    the new values)."""
    _, changes, _ = refused_changes(config)
    if not changes:
        return
    record = {"step": step, "checkpoint": str(checkpoint), "changed": {k: [a, b] for k, a, b in changes},
              "confirmed": sorted(config.allow_changed)}
    with open(Path(config.output_dir) / HISTORY_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def settings_to_save(config: TrainConfig) -> TrainConfig:
    """The config as ``config.yaml`` records it: the actions (resume, overwrite, allow_changed)
    reset, so the saved file describes the run, and rerunning it never moves or resumes by itself."""
    return config.model_copy(update={"resume": "never", "overwrite": False, "allow_changed": []})
