"""Which panels a report draws, in which order, with which reference lines (no drawing here).

A *panel* is one metric on its own y scale (small multiples: every panel of a report shares
the step axis). Panels are grouped into sections by meaning; the first section answers "is RL
working?" in the order a reader asks it:

1. reward: the total (``reward/mean``, or the reward model's ``reward/score`` for PPO/TRPO)
   and each reward function (``reward/<fn>/mean``), each with its ``+-std`` band when the std
   is logged; fault counts (``reward/<fn>/faults``) only when some are non-zero;
2. held-out accuracy (``eval/accuracy``) with its before/after values marked; for agents,
   success rate and turns per episode (``env/success*``, ``env/turns*``); for classic RL the
   episode and evaluation returns;
3. KL: ``kl/ref`` to the reference; PPO's per-completion ``kl/ref_sequence`` against the
   adaptive controller's ``kl_target``; TRPO's step KL ``trpo/kl`` against ``max_kl``;
4. ``policy/entropy``; ``policy/clip_fraction`` with the healthy 0.1-0.3 band shaded;
5. ``completion/mean_length`` against ``max_completion_length``, truncated fraction;
6. PPO's critic: ``value/explained_variance``.

Every other metric gets a panel in the section of its prefix (``loss/``, ``optim/``, ...).
A ``.../std`` or ``..._std`` metric is drawn as the band of its mean, not alone; a metric that
has the same value at every logged step of every run is listed as a constant instead of drawn.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from trustrl.report.data import RunData

__all__ = ["Ref", "Panel", "Section", "build_sections", "std_partner", "HEALTHY_CLIP_FRACTION"]

#: Clip fractions in this range are the usual sign of a PPO-style step size that is neither
#: too timid (nothing clipped) nor too greedy (most tokens clipped).
HEALTHY_CLIP_FRACTION = (0.1, 0.3)


@dataclass
class Ref:
    """A reference drawn in a panel: a horizontal line (``hi is None``) or a shaded band.

    ``values`` holds one ``(lo, hi)`` per run (None where that run has no such setting)."""

    label: str
    values: list[tuple[float, float | None] | None]
    kind: str = "line"  # "line" or "band"


@dataclass
class Panel:
    key: str
    """The metric drawn (also the panel's id)."""
    title: str
    band: str | None = None
    """The std metric drawn as a +-std band around the mean, if logged."""
    refs: list[Ref] = field(default_factory=list)
    percent: bool = False
    before_after: bool = False
    """Mark the first and last values (held-out accuracy before/after RL)."""
    smooth: bool = True
    """Draw an EMA over the logged values (not for counts such as faults)."""
    same_as: list[str] = field(default_factory=list)
    """Other metrics with exactly these values in every run (``eval/correct`` when the eval
    reward is ``correct``), named under this panel instead of drawn twice."""

    @property
    def file_stem(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", self.key)


@dataclass
class Section:
    title: str
    note: str
    panels: list[Panel]


def std_partner(metric: str) -> str | None:
    """The std metric logged beside a mean: ``a/mean -> a/std``, ``a/x_mean -> a/x_std``,
    ``reward/mean -> reward/std``; None for a metric that is not a mean."""
    if metric.endswith("/mean"):
        return metric[: -len("mean")] + "std"
    if metric.endswith("_mean"):
        return metric[: -len("mean")] + "std"
    return None


def _setting_ref(runs: Sequence[RunData], label: str, value: Callable[[RunData], Any], kind: str = "line") -> Ref | None:
    vals: list[tuple[float, float | None] | None] = []
    for r in runs:
        v = value(r)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
            vals.append(None)
        else:
            vals.append((float(v), None))
    return Ref(label, vals, kind) if any(v is not None for v in vals) else None


def _adaptive_kl_target(r: RunData) -> Any:
    return r.setting("kl_target") if r.setting("kl_control") == "adaptive" else None


def _headline(names: set[str], runs: Sequence[RunData]) -> list[Panel]:
    """The "is it working?" panels present in ``names``, in reading order."""
    panels: list[Panel] = []

    def add(key: str, title: str, **kw: Any) -> None:
        if key in names:
            band = std_partner(key)
            panels.append(Panel(key, title, band=band if band in names else None, **kw))

    add("reward/mean", "Reward (total)")
    add("reward/score", "Reward-model score")
    add("reward/total_mean", "Reward incl. KL penalty (sum per completion)")
    fns = sorted({m.split("/")[1] for m in names if re.fullmatch(r"reward/[^/]+/(mean|faults)", m)})
    for fn in fns:
        add(f"reward/{fn}/mean", f"Reward: {fn}")
    for fn in fns:
        key = f"reward/{fn}/faults"
        if key in names and any(
            any(v != 0 for v in r.series[key][1] if math.isfinite(v)) for r in runs if key in r.series
        ):
            panels.append(Panel(key, f"Reward faults: {fn} (count per step)", smooth=False))
    add("eval/accuracy", "Held-out accuracy", percent=True, before_after=True)
    for m in sorted(n for n in names if n.startswith("env/") and "success" in n):
        add(m, "Success rate" + ("" if m.count("/") == 1 else f" ({m})"), percent=True)
    for m in sorted(n for n in names if n.startswith("env/") and "turns" in n):
        add(m, "Turns per episode" + ("" if m.count("/") == 1 else f" ({m})"))
    add("eval/turns", "Turns per held-out episode")
    add("episode/return_mean", "Episode return (training)")
    add("eval/return_mean", "Evaluation return")

    kl = [p for p in (_setting_ref(runs, "kl_target", _adaptive_kl_target),) if p]
    add("kl/ref", "KL to reference (per token)")
    add("kl/ref_sequence", "KL to reference (per completion)", refs=kl)
    trpo = [p for p in (_setting_ref(runs, "max_kl", lambda r: r.setting("max_kl")),) if p]
    add("trpo/kl", "TRPO step KL (old -> new)", refs=trpo)
    add("kl/coef", "KL coefficient")
    add("policy/entropy", "Policy entropy (nats / token)")
    lo, hi = HEALTHY_CLIP_FRACTION
    add("policy/clip_fraction", "Clip fraction",
        refs=[Ref(f"healthy {lo:g}-{hi:g}", [(lo, hi)] * len(runs), "band")])
    limit = [p for p in (_setting_ref(runs, "max_completion_length", lambda r: r.setting("max_completion_length")),) if p]
    add("completion/mean_length", "Completion length (tokens)", refs=limit)
    add("completion/truncated_fraction", "Truncated completions", percent=True)
    add("value/explained_variance", "Critic explained variance",
        refs=[Ref("1 = perfect", [(1.0, None)] * len(runs))])
    return panels


#: Section titles of metric prefixes, in the order they follow the headline section.
SECTION_TITLES: dict[str, str] = {
    "reward": "Rewards, more",
    "eval": "Held-out evaluation",
    "env": "Environment",
    "episode": "Episodes",
    "policy": "Policy",
    "kl": "KL",
    "trpo": "TRPO step",
    "ppo": "PPO epochs",
    "adv": "Advantages",
    "returns": "Returns",
    "value": "Critic",
    "completion": "Completions",
    "groups": "Groups",
    "loss": "Losses",
    "rm": "Reward model",
    "optim": "Optimizer",
    "data": "Data",
    "perf": "Speed",
}


def _constant(runs: Sequence[RunData], key: str) -> float | None:
    """The one value ``key`` has at every finite logged step of every run, else None."""
    seen: set[float] = set()
    for r in runs:
        if key in r.series:
            seen.update(v for v in r.series[key][1] if math.isfinite(v))
            if len(seen) > 1:
                return None
    return next(iter(seen)) if len(seen) == 1 else None


def _same_series(runs: Sequence[RunData], a: str, b: str) -> bool:
    """``a`` and ``b`` were logged at the same steps with the same values (NaN = NaN) in every run."""
    for r in runs:
        sa, sb = r.series.get(a), r.series.get(b)
        if sa is None and sb is None:
            continue
        if sa is None or sb is None or sa[0] != sb[0]:
            return False
        if any(x != y and not (math.isnan(x) and math.isnan(y)) for x, y in zip(sa[1], sb[1])):
            return False
    return True


def build_sections(runs: Sequence[RunData]) -> tuple[list[Section], dict[str, float]]:
    """Sections of panels for ``runs`` (one or several), and the metrics that are constant
    (name -> value) and therefore listed rather than drawn."""
    names: set[str] = set()
    for r in runs:
        names.update(r.series)
    # a headline metric with one value throughout (kl/coef without a controller) is listed
    head: list[Panel] = []
    for p in _headline(names, runs):
        if not p.before_after and _constant(runs, p.key) is not None:
            continue
        twin = next((q for q in head if _same_series(runs, q.key, p.key)), None)
        if twin is not None:  # TRPO's reward/score is its reward/mean
            twin.same_as.append(p.key)
            continue
        head.append(p)
    used = {p.key for p in head} | {p.band for p in head if p.band} | {k for p in head for k in p.same_as}
    # faults that are all zero are not drawn, and not listed as constants either
    used |= {m for m in names if m.endswith("/faults")}
    sections = []
    if head:
        sections.append(Section("Is it working?", "", head))

    constants: dict[str, float] = {}
    for m in sorted(names - used):
        c = _constant(runs, m)
        if c is not None:
            constants[m] = c
    drawn = names - used - set(constants)
    by_key = {p.key: p for p in head}
    rest: dict[str, list[Panel]] = {}
    for m in sorted(drawn):
        if any(std_partner(k) == m for k in drawn):  # a std drawn as the band of its mean
            continue
        twin = next((p for k, p in by_key.items() if _same_series(runs, k, m)), None)
        if twin is not None:
            twin.same_as.append(m)
            continue
        band = std_partner(m)
        prefix = m.split("/", 1)[0] if "/" in m else ""
        by_key[m] = Panel(m, m, band=band if band in drawn else None)
        rest.setdefault(prefix, []).append(by_key[m])
    order = list(SECTION_TITLES) + sorted(p for p in rest if p and p not in SECTION_TITLES) + [""]
    for prefix in order:
        if prefix in rest:
            title = SECTION_TITLES.get(prefix, prefix or "Other")
            sections.append(Section(title, "", rest[prefix]))
    return sections, constants
