"""The HTML page: one self-contained file (PNG panels embedded as base64, no script, no
external asset), laid out as a grid that becomes one column on a phone."""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from trustrl.report.data import RunData, Sample, differing_settings, setting_text
from trustrl.report.panels import Section
from trustrl.report.plot import RUN_COLORS, PanelImage, before_after

__all__ = ["render_page", "pick_samples", "SAMPLE_CHARS"]

#: Longer prompts/completions are cut in the samples table, saying how much was cut.
SAMPLE_CHARS = 600

_CSS = """
*{box-sizing:border-box}
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1280px;
color:#222;padding:12px;line-height:1.4}
h1{font-size:1.35em;margin:.3em 0}h2{font-size:1.15em;margin:1.4em 0 .4em;border-bottom:1px solid #ddd}
.muted{color:#666;font-size:.9em}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(300px,1fr));gap:10px}
figure.panel{margin:0;border:1px solid #e6e6e6;border-radius:6px;padding:4px;background:#fff}
figure.panel img{width:100%;height:auto;display:block}
figcaption{font-size:.78em;color:#555;padding:2px 4px;overflow-wrap:anywhere}
.scroll{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;font-size:.88em;margin:.4em 0}
td,th{border:1px solid #ddd;padding:3px 7px;text-align:left;vertical-align:top;font-variant-numeric:tabular-nums}
th{background:#f4f4f4}
td.text{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;white-space:pre-wrap;overflow-wrap:anywhere;
min-width:12em;max-width:40em}
.swatch{display:inline-block;width:.9em;height:.9em;border-radius:2px;vertical-align:-.1em;margin-right:.3em}
pre{background:#f7f7f7;padding:.8em;overflow-x:auto;font-size:.82em}
details{margin:.6em 0}summary{cursor:pointer;color:#333}
.legendbar{position:sticky;top:0;z-index:1;background:#fffe;border-bottom:1px solid #ddd;padding:4px 0;
font-size:.85em;display:flex;flex-wrap:wrap;gap:4px 14px}
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


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


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], raw_html: bool = False) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    cell = (lambda c: str(c)) if raw_html else (lambda c: _e(_fmt(c)))
    body = "".join("<tr>" + "".join(f"<td>{cell(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<div class='scroll'><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"


def pick_samples(samples: Sequence[Sample], n_steps: int = 4, per_step: int = 3) -> list[tuple[int, list[tuple[str, Sample]]]]:
    """A few recorded steps from the first to the last (``n_steps`` spread evenly over the
    steps present) and at each the best, the median and the worst completion by total reward
    (fewer when the step has fewer samples; file order breaks ties; a null reward counts as
    the lowest; when every reward of the step is the same, all picks are labelled "tied").
    Returns ``[(step, [(which, sample), ...]), ...]``."""
    by_step: dict[int, list[Sample]] = {}
    for s in samples:
        by_step.setdefault(s.step, []).append(s)
    steps = sorted(by_step)
    if not steps:
        return []
    if len(steps) <= n_steps:
        chosen = steps
    else:  # evenly spaced indices, always the first and the last
        chosen = sorted({steps[round(i * (len(steps) - 1) / (n_steps - 1))] for i in range(n_steps)})
    out = []
    for st in chosen:
        group = by_step[st]
        order = sorted(range(len(group)), key=lambda i: (-(group[i].reward if group[i].reward is not None
                                                             else -math.inf), i))
        picks: list[tuple[str, int]] = []
        if per_step >= 1:
            picks.append(("best", order[0]))
        if per_step >= 3 and len(order) >= 3:
            picks.append(("median", order[len(order) // 2]))
        if per_step >= 2 and len(order) >= 2:
            picks.append(("worst", order[-1]))
        if len({g.reward for g in group}) == 1:  # all tied: "best" would mean nothing
            picks = [("tied", i) for _, i in picks]
        out.append((st, [(name, group[i]) for name, i in picks]))
    return out


def _cut(text: str) -> str:
    if not text:
        return "<span class='muted'>(empty)</span>"
    if len(text) <= SAMPLE_CHARS:
        return _e(text)
    return _e(text[:SAMPLE_CHARS]) + f"<span class='muted'> [... {len(text) - SAMPLE_CHARS} more characters]</span>"


def _samples_html(run: RunData) -> str:
    picked = pick_samples(run.samples)
    if not picked:
        return ""
    fns = sorted({k for _, group in picked for _, s in group for k in s.rewards})
    rows = []
    for step, group in picked:
        n = sum(1 for s in run.samples if s.step == step)
        for which, s in group:
            rows.append([
                f"{_e(step)}<br><span class='muted'>"
                + (f"one of {n}, all rewards equal" if which == "tied" else f"{_e(which)} of {n}") + "</span>",
                f"<span class='text'>{_cut(s.prompt)}</span>",
                f"<span class='text'>{_cut(s.completion)}</span>",
                _e(_fmt(s.reward)),
                *[_e(_fmt(s.rewards.get(f))) if f in s.rewards else "" for f in fns],
            ])
    head = "".join(f"<th>{_e(h)}</th>" for h in ["step", "prompt", "completion", "reward", *fns])
    body = "".join(
        "<tr>" + "".join(f"<td class='text'>{c}</td>" if k in (1, 2) else f"<td>{c}</td>" for k, c in enumerate(r))
        + "</tr>" for r in rows)
    return f"<div class='scroll'><table class='samples'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"


def _png_uri(img: PanelImage) -> str:
    return "data:image/png;base64," + base64.b64encode(img.png).decode("ascii")


def _ends(values: Sequence[float]) -> tuple[float, float, int] | None:
    """Mean of the first and of the last tenth of the finite values (at least one point)."""
    v = [x for x in values if math.isfinite(x)]
    if not v:
        return None
    k = max(1, len(v) // 10)
    return sum(v[:k]) / k, sum(v[-k:]) / k, k


def _glance(runs: Sequence[RunData], sections: Sequence[Section]) -> str:
    if not sections or sections[0].title != "Is it working?":
        return ""
    rows = []
    for p in sections[0].panels:
        if not p.smooth:  # counts (faults): their panel says more than two averages
            continue
        cells = []
        for r in runs:
            if p.key == "eval/accuracy":
                ba = before_after(r)
                cells.append("" if ba is None else f"{_pct(ba[0])} &rarr; <b>{_pct(ba[1])}</b>")
                continue
            ends = _ends(r.series[p.key][1]) if p.key in r.series else None
            if ends is None:
                cells.append("")
                continue
            a, b, _ = ends
            f = _pct if p.percent else (lambda x: _e(f"{x:.4g}"))
            cells.append(f"{f(a)} &rarr; <b>{f(b)}</b>")
        rows.append([_e(p.title)] + cells)
    headers = ["metric"] + ([r.label for r in runs] if len(runs) > 1 else ["start \u2192 end"])
    return ("<h2>At a glance</h2><p class='muted'>Start and end: mean of the first and of the last tenth of the "
            "logged steps; held-out accuracy: before and after training.</p>" + _table(headers, rows, raw_html=True))


def _pct(v: float) -> str:
    return _e(f"{100 * v:.1f}%")


def _legend(runs: Sequence[RunData]) -> str:
    diff = differing_settings([r.config for r in runs])
    rows = []
    for i, r in enumerate(runs):
        sw = f"<span class='swatch' style='background:{RUN_COLORS[i % len(RUN_COLORS)]}'></span>"
        steps = sorted({s for st, _ in r.series.values() for s in st})
        rows.append([sw + _e(r.label), _e(", ".join(setting_text(r.config, k) for k in diff) or "-"),
                     _e(f"{steps[0]}-{steps[-1]}" if steps else "none"), _e(str(r.path))])
    note = ("Settings that differ between the runs' config.yaml: " + ", ".join(diff)) if diff else \
        "The runs' config.yaml files have the same settings (apart from output_dir)."
    return ("<h2>Runs</h2>" + f"<p class='muted'>{_e(note)}</p>"
            + _table(["run", "settings that differ", "steps", "directory"], rows, raw_html=True))


def render_page(
    runs: Sequence[RunData],
    sections: Sequence[Section],
    images: Mapping[str, PanelImage],
    constants: Mapping[str, float],
) -> str:
    """The report's HTML text for one run or several (overlaid, one colour each)."""
    multi = len(runs) > 1
    title = f"trustrl report: {runs[0].label}" if not multi else f"trustrl report: {len(runs)} runs"
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
    ]
    if not multi:
        r = runs[0]
        steps = [x.get("step") for x in r.records if isinstance(x.get("step"), (int, float))]
        parts.append("<p class='muted'>" + (f"{len(r.records)} logged steps, step {min(steps)} to {max(steps)}. "
                                             if steps else "No metrics logged. ") + _e(str(r.path)) + "</p>")
    else:
        parts.append(_legend(runs))
        parts.append("<div class='legendbar'>" + "".join(
            f"<span><span class='swatch' style='background:{RUN_COLORS[i % len(RUN_COLORS)]}'></span>{_e(r.label)}"
            "</span>" for i, r in enumerate(runs)) + "</div>")
    parts.append(_glance(runs, sections))
    if images:
        how = ("Each panel is one metric on its own scale; all share the step axis. "
               "Faint: the logged values; solid: their exponential moving average (EMA span stated under each "
               "panel, span N: weight 2/(N+1) on the newest point). Shaded around a mean: +-1 std across the "
               "step's samples (smoothed like the line). Dashed: a target or limit from config.yaml.")
        if multi:
            how += " Bands are left out when runs are overlaid."
        parts.append(f"<p class='muted'>{_e(how)}</p>")
    for sec in sections:
        parts.append(f"<section><h2>{_e(sec.title)}</h2><div class='grid'>")
        for p in sec.panels:
            img = images[p.key]
            cap = [f"<code>{_e(p.key)}</code>"]
            if p.band and not img.note:
                cap.append(f"band: <code>{_e(p.band)}</code>")
            if img.note:
                cap.append(_e(img.note))
            if p.same_as:
                cap.append("same values: " + ", ".join(f"<code>{_e(k)}</code>" for k in p.same_as))
            cap.append(f"EMA span {img.span}" if img.span > 1 else
                       "not smoothed (a count)" if not p.smooth else "not smoothed (under 20 points)")
            if img.off_scale:
                cap.append("off scale: " + _e(", ".join(img.off_scale)))
            parts.append(
                f"<figure class='panel' data-metric='{_e(p.key)}' data-ymin='{img.ylim[0]!r}' "
                f"data-ymax='{img.ylim[1]!r}' data-vmin='{img.data_range[0]!r}' data-vmax='{img.data_range[1]!r}'>"
                f"<img src='{_png_uri(img)}' alt='{_e(p.title)}'>"
                f"<figcaption>{' &middot; '.join(cap)}</figcaption></figure>")
        parts.append("</div></section>")
    if not images:
        parts.append("<p class='muted'>No numeric metrics to plot.</p>")
    if constants:
        parts.append("<p class='muted'>The same at every logged step: "
                     + ", ".join(f"<code>{_e(k)}</code> = {_e(_fmt(v))}" for k, v in sorted(constants.items()))
                     + ".</p>")

    sample_parts = []
    for i, r in enumerate(runs):
        body = _samples_html(r)
        if body:
            head = (f"<h3><span class='swatch' style='background:{RUN_COLORS[i % len(RUN_COLORS)]}'></span>"
                    f"{_e(r.label)}</h3>") if multi else ""
            sample_parts.append(head + body)
    if sample_parts:
        parts.append("<h2>What the model wrote</h2><p class='muted'>From samples.jsonl: at a few recorded steps from "
                     "the first to the last, the best, median and worst completion by total reward. Long texts are "
                     f"cut at {SAMPLE_CHARS} characters.</p>")
        parts += sample_parts

    for i, r in enumerate(runs):
        name = f" ({_e(r.label)})" if multi else ""
        if r.summary is not None:
            parts += [f"<h2>Summary{name}</h2>", _table(["key", "value"], _flatten(r.summary))]
        ts = {k: v for k, v in r.train_summary.items() if k != "eval_history"}
        if ts:
            parts += [f"<details><summary>train_summary.json{name}</summary>",
                      _table(["key", "value"], _flatten(ts)), "</details>"]
        last: dict[str, tuple[Any, Any]] = {}
        for rec in r.records:
            for k, v in rec.items():
                if k != "step" and (v is not None or k not in last):
                    last[k] = (rec.get("step"), v)
        if last:
            parts += [f"<details><summary>Final metrics{name}: the last logged value of each metric</summary>",
                      _table(["metric", "step", "value"], [(k, s, v) for k, (s, v) in sorted(last.items())]),
                      "</details>"]
        if r.config_text is not None:
            parts += [f"<details><summary>config.yaml{name}</summary>", f"<pre>{_e(r.config_text)}</pre>", "</details>"]
    parts.append("</body></html>\n")
    return "\n".join(p for p in parts if p)
