"""The run report (trustrl.report): smoothing, y limits, panel selection and order, samples
table, multi-run overlay, the CLI. The headless-browser checks are in test_report_browser.py."""

from __future__ import annotations

import base64
import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trustrl.cli import main
from trustrl.logging import MetricsLogger
from trustrl.report import build_report, ema, load_run, read_samples, run_labels, smoothing_span, write_report, y_limits
from trustrl.report.data import Sample, differing_settings
from trustrl.report.page import SAMPLE_CHARS, pick_samples
from trustrl.report.panels import build_sections
from trustrl.report.plot import RUN_COLORS

# ------------------------------------------------------------------------------- helpers


def _write_run(run: Path, steps: int = 60, *, config: dict | None = None, seed: int = 0,
               extra: dict | None = None) -> Path:
    """A TRPO-like run: the 0.01-range trpo/kl beside the 2-5 range trpo/grad_norm, as in the
    demo that made the old report draw the KL flat."""
    rng = np.random.default_rng(seed)
    run.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"step": 0, "eval/accuracy": 0.4})]
    for s in range(1, steps + 1):
        r = {
            "step": s,
            "reward/mean": 0.3 + 0.5 * s / steps + float(rng.normal(0, 0.05)),
            "reward/score": 0.0,  # replaced by reward/mean below
            "reward/std": 0.3,
            "reward/correct/mean": 0.2 + 0.6 * s / steps,
            "reward/correct/std": 0.4,
            "reward/correct/faults": 0,
            "reward/format/mean": 0.5 + 0.4 * s / steps,
            "reward/format/std": 0.1,
            "reward/format/faults": 2 if s == 30 else 0,
            "trpo/kl": 0.005 + 0.01 * (s - 1) / (steps - 1),  # 0.005 .. 0.015: range 0.01
            "trpo/grad_norm": 2.0 + 3.0 * float(rng.random()),
            "policy/entropy": 1.5 - s / steps,
            "policy/clip_fraction": 0.2,
            "completion/mean_length": 8.0 + 3.0 * s / steps,
            "kl/ref": 0.02 * s / steps,
            "kl/coef": 0.0,
            "loss/policy": float(rng.normal()),
            "optim/lr": 3e-4,
            **(extra or {}),
        }
        r["reward/score"] = r["reward/mean"]
        if s % 20 == 0:
            r["eval/accuracy"] = 0.4 + 0.5 * s / steps
        lines.append(json.dumps(r))
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    cfg = {"max_kl": 0.01, "max_completion_length": 12, "seed": seed, "output_dir": str(run), **(config or {})}
    import yaml

    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    (run / "train_summary.json").write_text(json.dumps({"accuracy_first": 0.4, "accuracy_last": 0.9,
                                                        "eval_history": [{"step": 0}]}))
    return run


def _figures(page: str) -> dict[str, dict[str, str]]:
    """metric -> attributes of its <figure> (data-ymin, ..., and the img src)."""
    out = {}
    for m in re.finditer(r"<figure class='panel' ([^>]*)><img src='([^']*)'", page):
        attrs = dict(re.findall(r"data-([a-z]+)='([^']*)'", m.group(1)))
        attrs["src"] = m.group(2)
        out[attrs["metric"]] = attrs
    return out


def _png(src: str) -> np.ndarray:
    import matplotlib.image as mpimg

    assert src.startswith("data:image/png;base64,")
    return mpimg.imread(io.BytesIO(base64.b64decode(src.split(",", 1)[1])), format="png")


def _line_rows(img: np.ndarray, hex_color: str, tol: float = 0.04) -> np.ndarray:
    """Row indices of the pixels drawn in exactly ``hex_color`` (the opaque EMA line; the faint
    raw line and the band are blended with white and so have other colours)."""
    rgb = np.array([int(hex_color[i:i + 2], 16) / 255 for i in (1, 3, 5)])
    hit = np.all(np.abs(img[:, :, :3] - rgb) < tol, axis=2)
    return np.nonzero(hit)[0]


# ------------------------------------------------------------------------------- smoothing


def test_ema_hand_worked() -> None:
    # span 3 -> a = 2/(3+1) = 0.5; weights (1-a)^k = 0.5^k, renormalized.
    # y1 = 1
    # y2 = (0.5*1 + 3) / (0.5 + 1)              = 3.5/1.5  = 2.333...
    # NaN: gap, state unchanged
    # y4 = (0.5*3.5 + 5) / (0.5*1.5 + 1)        = 6.75/1.75 = 3.857142...
    out = ema([1.0, 3.0, math.nan, 5.0], 3)
    assert out[0] == pytest.approx(1.0)
    assert out[1] == pytest.approx(3.5 / 1.5)
    assert math.isnan(out[2])
    assert out[3] == pytest.approx(6.75 / 1.75)
    assert ema([1.0, 2.0], 1) == [1.0, 2.0]  # span 1: no smoothing


@settings(max_examples=40, deadline=None)
@given(
    values=st.lists(st.one_of(st.floats(-1e3, 1e3), st.just(math.nan)), min_size=1, max_size=40),
    span=st.integers(2, 30),
)
def test_ema_matches_pandas(values: list[float], span: int) -> None:
    """Two implementations: ours and pandas' ewm(span, adjust=True, ignore_na=True)."""
    ref = pd.Series(values).ewm(span=span, adjust=True, ignore_na=True).mean().to_numpy()
    ours = np.array(ema(values, span))
    finite = np.isfinite(np.array(values))
    np.testing.assert_allclose(ours[finite], ref[finite], rtol=1e-9, atol=1e-9)
    assert np.isnan(ours[~finite]).all()


def test_smoothing_span() -> None:
    # a tenth of the points, none below 20 points, at most 50
    assert [smoothing_span(n) for n in (0, 5, 19, 20, 59, 100, 499, 500, 5000)] == [1, 1, 1, 2, 5, 10, 49, 50, 50]


# ------------------------------------------------------------------------------- y limits


def test_y_limits_rules() -> None:
    # 0.005..0.015: span 0.01, padded 6% = 0.0006 each side
    (lo, hi), inside = y_limits([0.005, 0.010, 0.015])
    assert (lo, hi) == pytest.approx((0.0044, 0.0156)) and inside == []
    # max_kl 0.01 lies inside: taken in, limits unchanged
    assert y_limits([0.005, 0.015], refs=[0.01]) == (pytest.approx((0.0044, 0.0156)), [True])
    # a reference at 1.0 would make the span 0.995 > 4 x 0.01: left out, the data stays readable
    (lo, hi), inside = y_limits([0.005, 0.015], refs=[1.0])
    assert inside == [False] and hi == pytest.approx(0.0156)
    # 0.04: span becomes 0.035 <= 0.04: taken in; pad 0.0021
    (lo, hi), inside = y_limits([0.005, 0.015], refs=[0.04])
    assert inside == [True] and (lo, hi) == pytest.approx((0.0029, 0.0421))
    # band: data 0..1, band -5..1.5 -> widened by at most one data span: -1..1.5, pad 0.15
    (lo, hi), _ = y_limits([0.0, 1.0], band=[-5.0, 1.5])
    assert (lo, hi) == pytest.approx((-1.15, 1.65))
    # constants: +-10% of the value, +-0.05 around 0; NaN ignored; nothing finite -> (0, 1)
    assert y_limits([2.0, math.nan, 2.0])[0] == pytest.approx((1.8, 2.2))
    assert y_limits([0.0])[0] == pytest.approx((-0.05, 0.05))
    assert y_limits([math.nan])[0] == (0.0, 1.0)


# ------------------------------------------------------------------------------- panels


def test_sections_headline_first_in_reading_order(tmp_path: Path) -> None:
    run = load_run(_write_run(tmp_path / "r"))
    sections, constants = build_sections([run])
    head = sections[0]
    assert head.title == "Is it working?"
    assert [p.key for p in head.panels] == [
        "reward/mean", "reward/correct/mean", "reward/format/mean",
        "reward/format/faults",  # non-zero once; reward/correct/faults is all zeros: not drawn
        "eval/accuracy", "kl/ref", "trpo/kl",  # kl/coef is constant 0: listed instead
        "policy/entropy",  # clip fraction is constant 0.2 here: listed
        "completion/mean_length",
    ]
    bands = {p.key: p.band for p in head.panels}
    assert bands["reward/mean"] == "reward/std" and bands["reward/correct/mean"] == "reward/correct/std"
    assert [r.values for r in head.panels[6].refs] == [[(0.01, None)]]  # trpo/kl against max_kl
    assert [r.values for r in head.panels[8].refs] == [[(12.0, None)]]  # length against the limit
    assert head.panels[0].same_as == ["reward/score"]  # TRPO logs the same total twice
    assert [s.title for s in sections[1:]] == ["TRPO step", "Losses"]
    every = {p.key for s in sections for p in s.panels}
    assert not any(k.endswith("/std") for k in every)  # stds are bands, not panels
    assert "reward/correct/faults" not in every and "reward/correct/faults" not in constants
    assert constants == {"kl/coef": 0.0, "optim/lr": 3e-4, "policy/clip_fraction": 0.2}


def test_agent_and_classic_panels(tmp_path: Path) -> None:
    run = tmp_path / "agent"
    run.mkdir()
    rows = [{"step": s, "env/success": s / 10, "env/turns": 5 - s / 5, "env/return": 2 * s, "eval/return_mean": s,
             "eval/return_std": 1.0, "a/b": 3 * s, "a_b": -s, "eval/same": s} for s in range(1, 11)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    sections, _ = build_sections([load_run(run)])
    head = sections[0].panels
    assert [(p.key, p.percent) for p in head] == [("env/success", True), ("env/turns", False),
                                                  ("eval/return_mean", False)]
    assert head[2].band == "eval/return_std"
    assert head[2].same_as == ["eval/same"]  # identical values: named under the panel, not drawn twice
    assert [s.title for s in sections[1:]] == ["Environment", "a", "Other"]  # a_b has no prefix
    write_report(run)
    assert sorted(p.name for p in (run / "plots").glob("a_b*.png")) == ["a_b.png", "a_b_2.png"]


def test_kl_targets_of_ppo_and_clip_band(tmp_path: Path) -> None:
    runs = []
    for name, control in (("adaptive", "adaptive"), ("fixed", "fixed")):
        d = _write_run(tmp_path / name, 30, config={"kl_control": control, "kl_target": 1.0})
        recs = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
        for r in recs[1:]:
            r.update({"kl/ref_sequence": 0.5 + r["step"] / 30, "policy/clip_fraction": 0.01 * r["step"],
                      "value/explained_variance": r["step"] / 30})
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
        runs.append(load_run(d))
    head = {p.key: p for p in build_sections([runs[0]])[0][0].panels}
    assert [r.values for r in head["kl/ref_sequence"].refs] == [[(1.0, None)]]  # adaptive: its target
    assert [(r.kind, r.values) for r in head["policy/clip_fraction"].refs] == [("band", [(0.1, 0.3)])]
    head = {p.key: p for p in build_sections([runs[1]])[0][0].panels}
    assert head["kl/ref_sequence"].refs == []  # fixed coefficient: no target to show
    # overlay: one value per run (the fixed run has none)
    both = {p.key: p for p in build_sections(runs)[0][0].panels}
    assert [r.values for r in both["kl/ref_sequence"].refs] == [[(1.0, None), None]]


# ------------------------------------------------------------------------------- the page


def test_tiny_range_metric_fills_its_panel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    page = write_report(_write_run(tmp_path / "r")).read_text()
    figs = _figures(page)
    kl = figs["trpo/kl"]
    ymin, ymax = float(kl["ymin"]), float(kl["ymax"])
    # data 0.005..0.015 and max_kl 0.01 inside it: limits = data +- 6% of 0.01
    assert (ymin, ymax) == pytest.approx((0.0044, 0.0156))
    assert (float(kl["vmin"]), float(kl["vmax"])) == pytest.approx((0.005, 0.015))
    # The drawn EMA line spans most of the image height (data fill ~80% of the axes).
    img = _png(kl["src"])
    rows = _line_rows(img, RUN_COLORS[0])
    assert rows.size and (rows.max() - rows.min()) / img.shape[0] > 0.4

    # The same measure on the old failure (KL drawn on grad_norm's 0..5 scale) reads flat:
    # the measure can tell the two apart.
    import trustrl.report.plot as plot

    real = plot.y_limits
    monkeypatch.setattr(plot, "y_limits", lambda d, b=(), r=(): ((0.0, 5.0), real(d, b, r)[1]))
    flat = _figures(write_report(tmp_path / "r").read_text())["trpo/kl"]
    rows = _line_rows(_png(flat["src"]), RUN_COLORS[0])
    assert rows.size and (rows.max() - rows.min()) / img.shape[0] < 0.05


def test_page_self_contained_and_plots_written(tmp_path: Path) -> None:
    run = _write_run(tmp_path / "r")
    (run / "summary.json").write_text(json.dumps({"final": {"eval/accuracy": 0.9}, "seed": 1}))
    with open(run / "config.yaml", "a") as f:
        f.write("note: '<tuned>'\n")
    (run / "plots").mkdir()
    (run / "plots" / "stale.png").write_bytes(b"old")
    page = write_report(run).read_text()
    figs = _figures(page)
    srcs = re.findall(r"<img[^>]*src='([^']*)'", page)
    # 9 headline panels (see the test above), trpo/grad_norm, loss/policy; the stds are bands
    assert len(srcs) == len(figs) == 11
    for s in srcs:
        assert _png(s).shape[0] > 100  # decodes as a PNG image
    assert "http" not in page and "<script" not in page and "src='plots/" not in page
    assert "<meta name='viewport'" in page
    assert "&lt;tuned&gt;" in page and "<tuned>" not in page
    assert "final.eval/accuracy" in page  # summary.json flattened
    assert "40.0% &rarr; <b>90.0%</b>" in page  # before/after from train_summary.json
    # at a glance: trpo/kl = 0.005 + 0.01 (s-1)/59; first tenth (s = 1..6) has mean s-1 = 2.5,
    # the last (s = 55..60) mean s-1 = 56.5
    assert f"{0.005 + 0.01 * 2.5 / 59:.4g} &rarr; <b>{0.005 + 0.01 * 56.5 / 59:.4g}</b>" in page
    pngs = sorted(p.name for p in (run / "plots").glob("*.png"))
    assert "stale.png" not in pngs and "trpo_kl.png" in pngs and len(pngs) == len(figs)
    assert "optim/lr</code> = 0.0003" in page  # constants listed


def test_band_drawn_or_left_out(tmp_path: Path) -> None:
    run = tmp_path / "bands"
    run.mkdir()
    # adv/mean: 0 .. 0.001 with std 1 (whitened advantages); reward/mean: 0.2 .. 0.8 with std 0.1
    rows = [{"step": s, "adv/mean": s / 20_000, "adv/std": 1.0 + 0.01 * (s % 2), "reward/mean": 0.2 + 0.6 * s / 20,
             "reward/std": 0.1} for s in range(1, 21)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    page = write_report(run).read_text()
    figs = _figures(page)
    # ~1.0 > 5 x 0.00095: no band, limits from the data alone: 0.00005 .. 0.001 +- 6% of 0.00095
    assert "std band left out" in page
    assert (float(figs["adv/mean"]["ymin"]), float(figs["adv/mean"]["ymax"])) == pytest.approx(
        (0.00005 - 0.06 * 0.00095, 0.001 + 0.06 * 0.00095))
    # reward: band kept (EMA span 2 of 20 points), limits widened by it: the EMA of a constant std is
    # 0.1, the EMA of the mean starts at 0.23 (first value) and ends a little below 0.8
    assert "band: <code>reward/std</code>" in page
    ymin, ymax = float(figs["reward/mean"]["ymin"]), float(figs["reward/mean"]["ymax"])
    assert ymin < 0.23 - 0.1 and ymax > 0.8


def test_report_edge_cases(tmp_path: Path) -> None:
    single = tmp_path / "single"
    single.mkdir()
    (single / "metrics.jsonl").write_text(json.dumps({"step": 0, "reward/mean": 0.25, "kl/ref": None, "note": "x"}) + "\n")
    page = write_report(single).read_text()
    # one step of one metric: its value is the same at every step -> listed, not drawn
    assert "reward/mean</code> = 0.25" in page and not _figures(page)

    empty = tmp_path / "empty"  # a run stopped before its first step: its config, no metrics
    empty.mkdir()
    (empty / "config.yaml").write_text("seed: 0\n")
    page = write_report(empty).read_text()
    assert "No metrics logged" in page and "No numeric metrics to plot" in page
    assert list((empty / "plots").glob("*.png")) == []

    nulls = tmp_path / "nulls"
    nulls.mkdir()
    (nulls / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "kl/ref": None}) + "\n" for s in range(3)))
    write_report(nulls)

    with MetricsLogger(tmp_path / "nan", tensorboard=False) as log:
        for s in range(1, 4):
            log.log(s, {"reward/mean": math.nan if s == 2 else float(s), "policy/entropy": 1.0 + s})
    assert set(_figures(write_report(tmp_path / "nan").read_text())) == {"reward/mean", "policy/entropy"}

    with pytest.raises(FileNotFoundError, match="nope"):
        write_report(tmp_path / "nope")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train_summary.json").write_text("{")
    with pytest.raises(ValueError, match="train_summary.json"):
        write_report(bad)


# ------------------------------------------------------------------------------- samples


def _write_samples(run: Path) -> None:
    rows = []
    for step in range(0, 101, 10):  # 11 recorded steps
        for i, rew in enumerate((0.5, 1.1, 0.0, 0.7)):
            rows.append({"step": step, "prompt": f"{step}+{i}=", "completion": f"<b>{step}-{i}</b><script>x</script>",
                         "reward": rew, "rewards": {"correct": float(rew >= 1), "format": 0.1}})
    (run / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_pick_samples_spread_and_rank() -> None:
    samples = [Sample(step, f"p{step}.{i}", "c", r) for step in range(0, 101, 10) for i, r in
               enumerate((0.5, 1.1, 0.0, 0.7))]
    picked = pick_samples(samples, n_steps=4, per_step=3)
    # 11 steps, 4 wanted: indices round(i * 10 / 3) = 0, 3, 7, 10 -> steps 0, 30, 70, 100
    assert [s for s, _ in picked] == [0, 30, 70, 100]
    # rewards 0.5, 1.1, 0.0, 0.7 -> sorted 1.1 (i=1), 0.7 (i=3), 0.5 (i=0), 0.0 (i=2);
    # best i=1, median = sorted[4 // 2] = 0.5 (i=0), worst i=2
    assert [(w, s.prompt) for w, s in picked[0][1]] == [("best", "p0.1"), ("median", "p0.0"), ("worst", "p0.2")]
    # a null reward ranks lowest; two samples: best and worst only
    two = pick_samples([Sample(5, "a", "x", None), Sample(5, "b", "y", -3.0)])
    assert [(w, s.prompt) for w, s in two[0][1]] == [("best", "b"), ("worst", "a")]
    assert pick_samples([]) == []
    tied = pick_samples([Sample(1, p, "", 0.0) for p in "abcd"])
    assert [(w, s.prompt) for w, s in tied[0][1]] == [("tied", "a"), ("tied", "c"), ("tied", "d")]


def test_samples_table_escaped(tmp_path: Path) -> None:
    run = _write_run(tmp_path / "r", 20)
    page = write_report(run).read_text()
    assert "What the model wrote" not in page  # no samples.jsonl: no table
    _write_samples(run)
    long = {"step": 100, "prompt": "L", "completion": "y" * (SAMPLE_CHARS + 25), "reward": 2.0, "rewards": {}}
    with open(run / "samples.jsonl", "a") as f:
        f.write(json.dumps(long) + "\n")
    page = write_report(run).read_text()
    assert "What the model wrote" in page
    assert "&lt;b&gt;30-1&lt;/b&gt;&lt;script&gt;x&lt;/script&gt;" in page  # step 30's best, escaped
    assert "<script" not in page and "<b>30-1" not in page
    assert "[... 25 more characters]" in page and "y" * (SAMPLE_CHARS + 1) not in page
    assert "best of 5" in page  # step 100 now has 5 samples; the long one (reward 2.0) is its best


def test_read_samples_errors(tmp_path: Path) -> None:
    p = tmp_path / "samples.jsonl"
    good = json.dumps({"step": 1, "prompt": "a", "completion": "b", "reward": 1.0})
    p.write_text(good + "\n" + '{"step": 2, "prom')  # torn last line: ignored
    assert [s.step for s in read_samples(p)] == [1]
    p.write_text(good + "\nnot json\n" + good + "\n")
    with pytest.raises(ValueError, match=r"samples\.jsonl: line 2"):
        read_samples(p)
    p.write_text(json.dumps({"step": 1, "prompt": "a", "reward": 1.0}) + "\n" + good + "\n")
    with pytest.raises(ValueError, match=r"line 1: 'completion' must be a string"):
        read_samples(p)
    p.write_text(json.dumps({"step": 1, "prompt": "a", "completion": "b", "reward": "high"}) + "\n")
    with pytest.raises(ValueError, match=r"line 1: 'reward' must be a number"):
        read_samples(p)
    assert read_samples(tmp_path / "absent.jsonl") == []


# ------------------------------------------------------------------------------- several runs


def test_run_labels_and_differing_settings() -> None:
    assert run_labels(["/x/runs/seed0", "/x/runs/seed1"]) == ["seed0", "seed1"]
    assert run_labels(["/x/a/grpo", "/x/b/grpo"]) == ["a/grpo", "b/grpo"]
    cfgs = [{"seed": 0, "beta": 0.01, "output_dir": "a", "lora": {"r": 8}},
            {"seed": 1, "beta": 0.01, "output_dir": "b", "lora": {"r": 16}},
            {"seed": 0, "beta": 0.01, "output_dir": "c", "lora": {"r": 8}, "extra": 1}]
    assert differing_settings(cfgs) == ["seed", "lora.r", "extra"]  # output_dir is bookkeeping
    assert differing_settings(cfgs[:1]) == []


def test_overlay_via_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = _write_run(tmp_path / "runs" / "s0" / "trpo", 30, seed=0)
    b = _write_run(tmp_path / "runs" / "s1" / "trpo", 30, seed=1, config={"max_kl": 0.02})
    out = tmp_path / "cmp" / "compare.html"
    assert main(["report", str(a), str(b), "--output", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    page = out.read_text()
    assert "s0/trpo" in page and "s1/trpo" in page  # legend from directory names
    assert "max_kl=0.01, seed=0" in page and "max_kl=0.02, seed=1" in page  # and differing settings
    assert RUN_COLORS[0] in page and RUN_COLORS[1] in page
    assert not (a / "report.html").exists()  # writing a comparison leaves run dirs alone
    # the overlay draws each run's EMA line in its colour in the same panel
    img = _png(_figures(page)["reward/mean"]["src"])  # noisy, seeded apart
    assert _line_rows(img, RUN_COLORS[0]).size > 50 and _line_rows(img, RUN_COLORS[1]).size > 50

    assert main(["report", str(a)]) == 0  # one run: RUN_DIR/report.html
    assert (a / "report.html").is_file() and (a / "plots" / "trpo_kl.png").is_file()
    assert main(["report", str(a), str(tmp_path / "missing")]) == 2
    assert "missing does not exist" in capsys.readouterr().err
    assert main(["report", str(a), str(a), "--output", str(out)]) == 2
    assert "given twice" in capsys.readouterr().err


def test_build_report_multi_run_keeps_run_order(tmp_path: Path) -> None:
    runs = [load_run(_write_run(tmp_path / n, 25, seed=i)) for i, n in enumerate(("b", "a"))]
    page, images = build_report(runs)
    assert page.index(">b</td>") < page.index(">a</td>")  # the order given, colours C0, C1
    assert set(images) == set(_figures(page))


def test_report_refuses_a_directory_no_run_wrote(tmp_path: Path, capsys) -> None:
    """`trustrl report DIR` replaces DIR/plots/*.png: on a directory that is not a run directory
    (a typo, a project folder) it must refuse, not write report.html there and delete the user's
    own figures."""
    from trustrl.cli import main

    project = tmp_path / "project"
    (project / "plots").mkdir(parents=True)
    (project / "plots" / "mine.png").write_bytes(b"my figure")
    with pytest.raises(FileNotFoundError, match="not a trustrl run directory"):
        write_report(project)
    assert main(["report", str(project)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a trustrl run directory" in err[0] and str(project) in err[0]
    assert (project / "plots" / "mine.png").read_bytes() == b"my figure"
    assert not (project / "report.html").exists()
