"""Drawing one panel: raw series faint, an EMA on top, +-std band, reference lines.

Figures use matplotlib's object API with the Agg canvas, so no global backend is switched.
The y limits are chosen here (:func:`y_limits`), not left to matplotlib, so that what a panel
shows is decided by rules a test can check: each panel is scaled to its own metric, a
reference (a target, a limit) is brought into view only when that keeps the data readable.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from trustrl.report.data import RunData
from trustrl.report.panels import Panel

__all__ = ["ema", "smoothing_span", "y_limits", "render_panel", "PanelImage", "RUN_COLORS"]

#: One colour per run (matplotlib's tab10); a single run is drawn in the first.
RUN_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
              "#bcbd22", "#17becf")
REF_COLOR = "#555555"
#: How much of the plotted span a reference may add: a reference further away than that from
#: the data is named in the panel ("off scale") instead of squashing the data into a line.
REF_MAX_ZOOM_OUT = 4.0
PAD = 0.06
#: A +-std band whose median half-width exceeds this many times the range of the mean is not drawn.
BAND_MAX_WIDTH = 5.0


def ema(values: Sequence[float], span: int) -> list[float]:
    """Bias-corrected exponential moving average, skipping NaNs.

    With ``a = 2 / (span + 1)`` and the finite values ``x_1..x_t`` seen so far,
    ``y_t = sum_i (1-a)^(t-i) x_i / sum_i (1-a)^(t-i)`` (the weights renormalized, so the
    first value is not pulled towards 0; as pandas' ``ewm(span, adjust=True, ignore_na=True)``).
    A NaN input gives NaN at its position and leaves the average unchanged. ``span <= 1``
    returns the values unchanged.
    """
    if span <= 1:
        return [float(v) for v in values]
    a = 2.0 / (span + 1.0)
    num = den = 0.0
    out = []
    for v in values:
        if not math.isfinite(v):
            out.append(math.nan)
            continue
        num = (1.0 - a) * num + v
        den = (1.0 - a) * den + 1.0
        out.append(num / den)
    return out


def smoothing_span(n_points: int) -> int:
    """EMA span for a series of ``n_points``: a tenth of the points (at most 50); 1 (no
    smoothing) below 20 points, where each point is worth seeing as it is."""
    return min(50, n_points // 10) if n_points >= 20 else 1


def _finite(xs: Sequence[float]) -> list[float]:
    return [x for x in xs if math.isfinite(x)]


def y_limits(
    data: Sequence[float],
    band: Sequence[float] = (),
    refs: Sequence[float] = (),
) -> tuple[tuple[float, float], list[bool]]:
    """The y range of a panel, and for each reference whether it is inside it.

    1. Start from the finite ``data`` (the raw values of every run): ``[min, max]``.
    2. Widen towards the band's extremes (mean +- std), by at most one data span each side.
    3. Take in each reference value whose inclusion keeps the span within
       :data:`REF_MAX_ZOOM_OUT` times the span so far (any reference if that span is 0).
    4. Pad by 6% each side; a span of 0 gets +-10% of the value (+-0.05 around 0).
    """
    d = _finite(data)
    if not d:
        return (0.0, 1.0), [False] * len(refs)
    lo, hi = min(d), max(d)
    span = hi - lo
    b = _finite(band)
    if b:
        reach = span if span > 0 else math.inf
        lo = min(lo, max(min(b), lo - reach))
        hi = max(hi, min(max(b), hi + reach))
    inside = []
    for r in refs:
        nlo, nhi = min(lo, r), max(hi, r)
        cur = hi - lo
        if cur == 0 or (nhi - nlo) <= REF_MAX_ZOOM_OUT * cur:
            lo, hi = nlo, nhi
            inside.append(True)
        else:
            inside.append(False)
    span = hi - lo
    if span == 0:
        half = abs(lo) * 0.1 or 0.05
        return (lo - half, hi + half), inside
    return (lo - PAD * span, hi + PAD * span), inside


@dataclass
class PanelImage:
    """A rendered panel: PNG bytes and what was decided while drawing it."""

    png: bytes
    ylim: tuple[float, float]
    xlim: tuple[float, float]
    data_range: tuple[float, float]
    span: int
    """EMA span used (1: not smoothed)."""
    off_scale: list[str] = field(default_factory=list)
    """References left out of the y range (named in the panel instead)."""
    note: str = ""
    """Why something was left out (a band too wide to draw)."""


def _fmt_value(v: float, percent: bool) -> str:
    return f"{100 * v:.1f}%" if percent else f"{v:.4g}"


def render_panel(
    panel: Panel,
    runs: Sequence[RunData],
    xlim: tuple[float, float],
    *,
    size: tuple[float, float] = (4.4, 2.75),
    dpi: int = 100,
) -> PanelImage:
    """Draw ``panel`` for every run that logged its metric (run ``i`` in ``RUN_COLORS[i]``)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, MaxNLocator, PercentFormatter

    present = [(i, r) for i, r in enumerate(runs) if panel.key in r.series]
    n_max = max((len(_finite(r.series[panel.key][1])) for _, r in present), default=0)
    span = smoothing_span(n_max) if panel.smooth else 1

    all_values: list[float] = []
    band_values: list[float] = []
    bands: dict[int, tuple[list[float], list[float]]] = {}  # run -> (lower, upper)
    band_note = ""
    for i, r in present:
        steps, values = r.series[panel.key]
        all_values += values
        if panel.band and panel.band in r.series and len(present) == 1:
            std = dict(zip(*r.series[panel.band]))
            sd = [std.get(s, math.nan) for s in steps]
            # smoothed like the line: EMA(mean) +- EMA(std), over the steps that have both
            both = [math.isfinite(v) and math.isfinite(e) for v, e in zip(values, sd)]
            centre = ema([v if ok else math.nan for v, ok in zip(values, both)], span)
            half = ema([e if ok else math.nan for e, ok in zip(sd, both)], span)
            halves = sorted(h for h in half if math.isfinite(h))
            fin = _finite(values)
            data_span = max(fin) - min(fin) if fin else 0.0
            if halves and data_span > 0 and halves[len(halves) // 2] > BAND_MAX_WIDTH * data_span:
                # a band many times wider than the curve's range would shade the whole panel
                # and hide the trend (whitened advantages: mean ~0, std ~1)
                band_note = f"std band left out: std ~{halves[len(halves) // 2]:.3g} >> range {data_span:.3g}"
                continue
            bands[i] = ([c - h for c, h in zip(centre, half)], [c + h for c, h in zip(centre, half)])
            band_values += bands[i][0] + bands[i][1]
    ref_points: list[float] = []
    ref_index: list[int] = []
    for k, ref in enumerate(panel.refs):
        for v in ref.values:
            if v is not None:
                ref_points += [v[0]] + ([v[1]] if v[1] is not None else [])
                ref_index += [k] * (1 if v[1] is None else 2)
    ylim, inside = y_limits(all_values, band_values, ref_points)
    ref_in = {k: True for k in range(len(panel.refs))}
    for k, ok in zip(ref_index, inside):
        ref_in[k] = ref_in[k] and ok

    fig = Figure(figsize=size, dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.set_title(panel.title, fontsize=10, loc="left")
    ax.grid(True, alpha=0.25, linewidth=0.6)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.tick_params(labelsize=8)

    off_scale: list[str] = []
    for k, ref in enumerate(panel.refs):
        vals = [v for v in ref.values if v is not None]
        same = len({v for v in vals}) == 1
        if not ref_in[k]:
            off_scale.append(ref.label + (f" {vals[0][0]:g}" if same and ref.kind == "line" else ""))
            continue
        for i, v in enumerate(ref.values):
            if v is None or (same and i != next(j for j, w in enumerate(ref.values) if w is not None)):
                continue
            color = REF_COLOR if same else RUN_COLORS[i % len(RUN_COLORS)]
            if ref.kind == "band":
                ax.axhspan(v[0], v[1] if v[1] is not None else v[0], color="#2ca02c", alpha=0.10, linewidth=0,
                           zorder=0)
            else:
                ax.axhline(v[0], color=color, linestyle="--", linewidth=1.0, zorder=1)
        label = ref.label + (f" {vals[0][0]:g}" if same and ref.kind == "line" else "")
        ypos = vals[0][1] if ref.kind == "band" and vals[0][1] is not None else vals[0][0]
        ax.annotate(label, xy=(1.0, ypos), xycoords=("axes fraction", "data"), xytext=(-2, 2),
                    textcoords="offset points", ha="right", va="bottom", fontsize=7, color=REF_COLOR)
    if off_scale:
        ax.text(0.99, 0.02, "off scale: " + ", ".join(off_scale), transform=ax.transAxes, ha="right",
                va="bottom", fontsize=7, color=REF_COLOR)

    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    for i, r in present:
        color = RUN_COLORS[i % len(RUN_COLORS)]
        steps, values = r.series[panel.key]
        n_finite = len(_finite(values))
        if i in bands:
            ax.fill_between(steps, bands[i][0], bands[i][1], color=color, alpha=0.12, linewidth=0, zorder=1)
        marker = "o" if n_finite <= 30 else None
        if span > 1:
            ax.plot(steps, values, color=color, alpha=0.3, linewidth=0.8, marker=marker, markersize=2, zorder=2)
            ax.plot(steps, ema(values, span), color=color, linewidth=1.8, zorder=3)
        else:
            ax.plot(steps, values, color=color, linewidth=1.5, marker=marker, markersize=3, zorder=3)
        if panel.before_after and len(present) == 1:
            _mark_before_after(ax, r, steps, values, panel.percent, color)

    ax.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(nbins=5))
    if panel.percent:
        ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=None))
    else:
        # plain numbers on every tick ("0.0075"), never an offset or a "1e-3" above the axis
        tiny = 1e-9 * (ylim[1] - ylim[0])  # a tick at 0 computed as 1e-18 prints as 0
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:.4g}" if abs(v) > tiny else "0"))
    ax.set_xlabel("step", fontsize=8, labelpad=1)
    # fixed margins: tight_layout would cost half the drawing time of a panel
    fig.subplots_adjust(left=0.15, right=0.98, top=0.9, bottom=0.17)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    finite = _finite(all_values)
    return PanelImage(buf.getvalue(), (float(ylim[0]), float(ylim[1])), (float(xlim[0]), float(xlim[1])),
                      (min(finite), max(finite)) if finite else (math.nan, math.nan), span, off_scale, band_note)


def before_after(run: RunData, key: str = "eval/accuracy") -> tuple[float, float] | None:
    """Held-out accuracy before and after training: ``train_summary.json``'s
    ``accuracy_first``/``accuracy_last`` when present, else the first and last finite values."""
    ts = run.train_summary
    first, last = ts.get("accuracy_first"), ts.get("accuracy_last")
    if isinstance(first, (int, float)) and isinstance(last, (int, float)) and key == "eval/accuracy":
        return float(first), float(last)
    if key not in run.series:
        return None
    vals = _finite(run.series[key][1])
    return (vals[0], vals[-1]) if vals else None


def _mark_before_after(ax, run: RunData, steps, values, percent: bool, color: str) -> None:  # type: ignore[no-untyped-def]
    pts = [(s, v) for s, v in zip(steps, values) if math.isfinite(v)]
    ba = before_after(run)
    if not pts or ba is None:
        return
    (s0, _), (s1, _) = pts[0], pts[-1]
    lo, hi = ax.get_ylim()
    for (s, v), name, ha in (((s0, ba[0]), "before", "left"), ((s1, ba[1]), "after", "right")):
        ax.plot([s], [v], marker="o", markersize=6, color=color, markeredgecolor="black", zorder=4)
        above = v < (lo + hi) / 2  # write the label on the side with room
        ax.annotate(f"{name} {_fmt_value(v, percent)}", xy=(s, v), xytext=(0, 7 if above else -7),
                    textcoords="offset points", ha=ha, va="bottom" if above else "top", fontsize=8,
                    fontweight="bold", color="black", zorder=5)
