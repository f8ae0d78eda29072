"""Static run report: PNG curves and a self-contained ``report.html``.

:func:`write_report` reads ``run_dir/metrics.jsonl`` (see :mod:`trustrl.logging`), plus
``summary.json`` and ``config.yaml`` when present, and writes:

* ``run_dir/plots/*.png`` -- one figure per standard curve present:

  ========================  =============================================
  ``reward.png``            ``reward/mean`` and every ``reward/<fn>/mean``
  ``eval_accuracy.png``     ``eval/accuracy``
  ``kl.png``                ``kl/ref``
  ``entropy.png``           ``policy/entropy``
  ``completion_length.png`` ``completion/mean_length``
  ========================  =============================================

  and one ``group_<prefix>.png`` for each remaining group of numeric metrics (grouped by the
  text before the first ``/``).
* ``run_dir/report.html`` -- images referenced relatively, tables of ``summary.json``, of the
  last logged value of every metric, and the config text.

Missing metrics are skipped, ``null`` values (NaN/inf at logging time) leave gaps, and a single
logged step is drawn as a marker. Figures use matplotlib's object API with the Agg canvas, so
no global backend is switched.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from trustrl.logging import read_metrics, write_text_atomic

__all__ = ["write_report", "STANDARD_PLOTS", "metric_series"]

#: (file stem, title, y label, exact metric names; ``reward/<fn>/mean`` added for "reward").
STANDARD_PLOTS: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("reward", "Reward", "reward", ("reward/mean",)),
    ("eval_accuracy", "Held-out accuracy", "accuracy", ("eval/accuracy",)),
    ("kl", "KL to reference", "KL", ("kl/ref",)),
    ("entropy", "Policy entropy", "nats / token", ("policy/entropy",)),
    ("completion_length", "Completion length", "tokens", ("completion/mean_length",)),
)
_REWARD_FN_RE = re.compile(r"^reward/[^/]+/mean$")
PLOTS_DIR = "plots"
REPORT_FILE = "report.html"


def _finite(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    f = float(v)
    return f if math.isfinite(f) else None


def metric_series(records: Sequence[Mapping[str, Any]]) -> dict[str, tuple[list[int], list[float]]]:
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
    out: dict[str, tuple[list[int], list[float]]] = {}
    for k, pts in by_metric.items():
        if not any(math.isfinite(v) for v in pts.values()):
            continue
        steps = sorted(pts)
        out[k] = (steps, [pts[s] for s in steps])
    return out


def _plot(
    path: Path, title: str, ylabel: str, series: Mapping[str, tuple[list[int], list[float]]]
) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.0, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for name, (steps, values) in series.items():
        n_finite = sum(math.isfinite(v) for v in values)
        # Markers when points are few or isolated by gaps, so a single step is visible.
        marker = "o" if n_finite <= 50 else None
        ax.plot(steps, values, label=name, marker=marker, markersize=3, linewidth=1.2)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, format="png")


def _fmt(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:.6g}" if math.isfinite(v) else str(v)
    if isinstance(v, (dict, list)):
        return json.dumps(v)
    return str(v)


def _flatten(obj: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(obj, Mapping):
        rows: list[tuple[str, Any]] = []
        for k, v in obj.items():
            rows += _flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return rows
    return [(prefix or "(value)", obj)]


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;
color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.9em;margin:.5em 0}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;font-variant-numeric:tabular-nums}
th{background:#f3f3f3}.plots{display:flex;flex-wrap:wrap;gap:12px}
.plots figure{margin:0}.plots img{max-width:520px;border:1px solid #eee}
pre{background:#f7f7f7;padding:.8em;overflow-x:auto;font-size:.85em}.muted{color:#777}
"""


def write_report(run_dir: str | os.PathLike[str]) -> Path:
    """Write ``run_dir/plots/*.png`` and ``run_dir/report.html``; return the HTML path.

    ``run_dir/plots`` belongs to the report: PNGs already there are replaced, so curves that
    disappeared from the metrics do not linger.

    Raises:
        FileNotFoundError: ``run_dir`` does not exist.
        ValueError: ``metrics.jsonl`` or ``summary.json`` is malformed (message names the file).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"write_report: run directory {run_dir} does not exist")
    records = read_metrics(run_dir)
    series = metric_series(records)

    summary: Any = None
    summary_path = run_dir / "summary.json"
    if summary_path.is_file():
        try:
            summary = json.loads(summary_path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise ValueError(f"write_report: {summary_path} is not valid JSON: {exc}") from exc
    config_path = run_dir / "config.yaml"
    config_text = config_path.read_text(encoding="utf-8") if config_path.is_file() else None

    plots_dir = run_dir / PLOTS_DIR
    plots_dir.mkdir(exist_ok=True)
    for stale in plots_dir.glob("*.png"):
        stale.unlink()
    figures: list[tuple[str, str]] = []  # (relative path, caption)
    used: set[str] = set()
    for stem, title, ylabel, names in STANDARD_PLOTS:
        wanted = list(names)
        if stem == "reward":
            wanted += sorted(k for k in series if _REWARD_FN_RE.match(k))
        chosen = {k: series[k] for k in wanted if k in series}
        if not chosen:
            continue
        _plot(plots_dir / f"{stem}.png", title, ylabel, chosen)
        used.update(chosen)
        figures.append((f"{PLOTS_DIR}/{stem}.png", title))

    groups: dict[str, dict[str, tuple[list[int], list[float]]]] = {}
    for k in sorted(series):
        if k not in used:
            groups.setdefault(k.split("/", 1)[0], {})[k] = series[k]
    for group, chosen in groups.items():
        stem = "group_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", group)
        _plot(plots_dir / f"{stem}.png", group, "value", chosen)
        figures.append((f"{PLOTS_DIR}/{stem}.png", group))

    # last logged (finite-or-null) value of each metric, with its step
    last: dict[str, tuple[Any, Any]] = {}
    for rec in records:
        for k, v in rec.items():
            if k != "step" and (v is not None or k not in last):
                last[k] = (rec.get("step"), v)
    steps = [r.get("step") for r in records if isinstance(r.get("step"), (int, float))]

    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>trustrl report: {html.escape(run_dir.name)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>trustrl run report: {html.escape(run_dir.name)}</h1>",
        "<p class='muted'>"
        + (
            f"{len(records)} logged steps, step {min(steps)} to {max(steps)}."
            if steps
            else "No metrics logged."
        )
        + "</p>",
    ]
    if summary is not None:
        parts += ["<h2>Summary</h2>", _table(["key", "value"], _flatten(summary))]
    parts.append("<h2>Curves</h2>")
    if figures:
        parts.append("<div class='plots'>")
        for rel, caption in figures:
            parts.append(
                f"<figure><img src='{html.escape(rel)}' alt='{html.escape(caption)}'>"
                f"<figcaption>{html.escape(caption)}</figcaption></figure>"
            )
        parts.append("</div>")
    else:
        parts.append("<p class='muted'>No numeric metrics to plot.</p>")
    if last:
        parts += [
            "<h2>Final metrics</h2>",
            "<p class='muted'>Last logged value of each metric and the step it was logged at.</p>",
            _table(["metric", "step", "value"], [(k, s, v) for k, (s, v) in sorted(last.items())]),
        ]
    if config_text is not None:
        parts += ["<h2>Config</h2>", f"<pre>{html.escape(config_text)}</pre>"]
    parts.append("</body></html>\n")
    return write_text_atomic(run_dir / REPORT_FILE, "\n".join(parts))
