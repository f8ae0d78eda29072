"""The run report: one self-contained ``report.html`` a user opens after a run.

:func:`write_report` reads run directories (``metrics.jsonl``, and when present
``config.yaml``, ``train_summary.json``, ``summary.json``, ``samples.jsonl``; see
:mod:`trustrl.report.data`) and writes one HTML file holding:

* "At a glance": each headline metric at the start and the end of the run;
* small multiples, one panel per metric on its own y scale, all sharing the step axis, grouped
  by meaning with the panels that answer "is it working?" first (reward, held-out accuracy
  before/after, KL against its target or ``max_kl``, entropy, clip fraction against its
  healthy band, completion length against its limit, explained variance; see
  :mod:`trustrl.report.panels`). Each panel draws the logged values faint and an EMA on top
  (its span stated), a +-std band where the std is logged, fault counts only when non-zero;
* "What the model wrote": sampled prompts, completions and rewards at a few steps from the
  first to the last (from ``samples.jsonl``; escaped, cut when long);
* the summaries, the last value of every metric, and the config.

Several run directories are overlaid in one report (one colour per run, a legend with the
directory names and the settings in which their configs differ). The PNG panels are embedded as
base64: the file needs no network and no other file; the layout becomes one column on a phone.
For a single run, the panels are also written as ``run_dir/plots/<metric>.png``.

Missing metrics are skipped, ``null`` values (NaN/inf at logging time) leave gaps, points are
drawn as markers while there are at most 30, and a metric with one value at every logged step
(a single step included) is listed in a line instead of drawn flat.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from trustrl.logging import write_text_atomic
from trustrl.report.data import RunData, differing_settings, load_run, metric_series, read_samples, run_labels
from trustrl.report.page import render_page
from trustrl.report.panels import build_sections
from trustrl.report.plot import PanelImage, ema, render_panel, smoothing_span, y_limits

__all__ = ["write_report", "build_report", "metric_series", "load_run", "read_samples", "ema", "smoothing_span",
           "y_limits", "differing_settings", "run_labels", "PLOTS_DIR", "REPORT_FILE"]

PLOTS_DIR = "plots"
REPORT_FILE = "report.html"
COMPARE_FILE = "report-compare.html"

PathLike = str | os.PathLike[str]


def build_report(runs: Sequence[RunData]) -> tuple[str, dict[str, PanelImage]]:
    """The HTML text and the rendered panels (metric -> image) for loaded runs."""
    sections, constants = build_sections(runs)
    steps = [s for r in runs for st, _ in r.series.values() for s in st]
    lo, hi = (min(steps), max(steps)) if steps else (0, 1)
    pad = max(0.5, 0.02 * (hi - lo))
    xlim = (lo - pad, hi + pad)
    images = {p.key: render_panel(p, runs, xlim) for sec in sections for p in sec.panels}
    return render_page(runs, sections, images, constants), images


def write_report(run_dirs: PathLike | Sequence[PathLike], output: PathLike | None = None) -> Path:
    """Write the report of one run directory or several (overlaid); return the HTML path.

    Args:
        run_dirs: a run directory, or a list of them (one colour each, in this order).
        output: the HTML file to write. Default: ``RUN_DIR/report.html`` for one run (and the
            panels as ``RUN_DIR/plots/*.png``, replacing PNGs already there so curves that
            disappeared do not linger); ``report-compare.html`` in the current directory for
            several.

    Raises:
        FileNotFoundError: a run directory does not exist.
        ValueError: no run directory given, the same one twice, or a file in one is malformed
            (the message names the file).
    """
    dirs = [run_dirs] if isinstance(run_dirs, (str, os.PathLike)) else list(run_dirs)
    if not dirs:
        raise ValueError("write_report: no run directory given")
    resolved = [Path(d).resolve() for d in dirs]
    dupes = sorted({str(d) for d in dirs if resolved.count(Path(d).resolve()) > 1})
    if dupes:
        raise ValueError(f"write_report: run directory given twice: {dupes[0]}")
    runs = [load_run(d) for d in dirs]
    if len(runs) > 1:
        for r, label in zip(runs, run_labels(dirs)):
            r.label = label
    text, images = build_report(runs)
    if output is None and len(runs) == 1:
        plots = Path(dirs[0]) / PLOTS_DIR
        plots.mkdir(exist_ok=True)
        for stale in plots.glob("*.png"):
            stale.unlink()
        from trustrl.report.panels import Panel

        stems: set[str] = set()
        for key, img in images.items():
            stem = base = Panel(key, key).file_stem
            k = 2
            while stem in stems:  # "a/b" and "a_b" would share a name
                stem, k = f"{base}_{k}", k + 1
            stems.add(stem)
            (plots / f"{stem}.png").write_bytes(img.png)
        return write_text_atomic(Path(dirs[0]) / REPORT_FILE, text)
    out = Path(output) if output is not None else Path(COMPARE_FILE)
    out.parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(out, text)
