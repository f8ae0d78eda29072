"""Cost of grading one completion with the ``code_tests`` reward: before and after the
grader that decides verdicts outside the sandbox (issue 16), side by side in one run.

    python bench/code_grader.py                     # 12 rounds, batches of 16
    python bench/code_grader.py --rounds 6 --batch 8 --json out.json

"Before" is ``trustrl/rewards/code.py`` and ``_sandbox_child.py`` as they were at commit
``--before`` (default 4d00020, the last version with the in-sandbox harness), read with
``git show`` and loaded from a temporary directory as a stand-alone module (it imports only
the standard library). "After" is the current tree. Both get the same completions (a correct
``add`` with four asserts, the README's shape of test) and the same limits; the rounds
alternate which one goes first, because the machine may be shared.

Reported per completion, median over the rounds:

* ``latency``: wall time of one completion graded alone (``max_workers=1``, batch of 1);
* ``batch``: wall time of a batch of ``--batch`` completions on ``max_workers=2`` (the
  default: completions are graded in parallel, each in its own sandbox), divided by the batch;
* ``cpu``: CPU time (this process and every sandbox process, reaped) per completion in the
  batch runs;
* ``grader-side``: the part that runs in the trainer's process (after only), timed on its
  own: parsing the tests (once per distinct tests in a batch), and decoding the frames and
  judging them (per completion).

The stdin/stdout format (after only: before had none) is measured the same way with four
cases, each a fresh interpreter in the same sandbox.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ADD = ("assert add(1, 2) == 3\n"
       "assert add(10, 20) == 30\n"
       "assert add(-7, 2) == -5\n"
       "assert add(100, 1) == 101\n")
GOOD = "```python\ndef add(a, b):\n    return a + b\n```"
STDIO = {"inputs": ["1 2\n", "10 20\n", "-7 2\n", "100 1\n"],
         "outputs": ["3\n", "30\n", "-5\n", "101\n"]}
PROG = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"


def load_before(commit: str, into: Path):
    """The old reward module, from git, as a stand-alone module (with its helper beside it)."""
    for name in ("code.py", "_sandbox_child.py"):
        try:
            text = subprocess.run(["git", "-C", str(REPO), "show",
                                   f"{commit}:trustrl/rewards/{name}"],
                                  check=True, capture_output=True, text=True).stdout
        except (OSError, subprocess.CalledProcessError) as e:
            sys.exit(f"bench/code_grader.py: cannot read trustrl/rewards/{name} at commit "
                     f"{commit!r} with git: {e}")
        (into / ("trustrl_code_before.py" if name == "code.py" else name)).write_text(text)
    spec = importlib.util.spec_from_file_location("trustrl_code_before",
                                                  into / "trustrl_code_before.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["trustrl_code_before"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def _cpu() -> float:
    a = resource.getrusage(resource.RUSAGE_SELF)
    b = resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def one_round(factory, completion: str, tests, batch: int) -> tuple[float, float, float]:
    """(latency s, batch wall s per completion, batch CPU s per completion)."""
    alone = factory(timeout_s=10.0, max_workers=1)
    t0 = time.perf_counter()
    scores = alone(["p"], [completion], tests=[tests])
    latency = time.perf_counter() - t0
    par = factory(timeout_s=10.0, max_workers=2)
    c0, t0 = _cpu(), time.perf_counter()
    scores += par(["p"] * batch, [completion] * batch, tests=[tests] * batch)
    wall, cpu = time.perf_counter() - t0, _cpu() - c0
    if scores != [1.0] * (batch + 1):
        sys.exit(f"bench/code_grader.py: a correct completion did not score 1: {scores}")
    return latency, wall / batch, cpu / batch


def grader_side_seconds(repeats: int = 2000) -> tuple[float, float]:
    """Trainer-side work for the ADD tests: (parse, once per distinct tests; decode + judge,
    per completion)."""
    from trustrl.rewards.code_grader import case_passes, parse_tests, read_frames

    def frame(obj) -> bytes:
        data = json.dumps(obj).encode()
        return len(data).to_bytes(4, "big") + data

    channel = b"".join(frame({"i": i, "v": v}) for i, v in enumerate([3, 30, -5, 101]))
    t0 = time.perf_counter()
    for _ in range(repeats):
        plan = parse_tests(ADD, "row 0")
    t1 = time.perf_counter()
    for _ in range(repeats):
        assert all(case_passes(plan, read_frames(channel, plan.steps)))
    t2 = time.perf_counter()
    return (t1 - t0) / repeats, (t2 - t1) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", default="4d00020d83a9bf1cd3d9ecd4b3a5966b426304e8",
                    help="commit holding the old trustrl/rewards/code.py")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()

    from trustrl.rewards import code as after

    with tempfile.TemporaryDirectory(prefix="trustrl-bench-before-") as tmp:
        before = load_before(args.before, Path(tmp))
        caps = after.sandbox_capabilities()
        if before.sandbox_capabilities()["mode"] != caps["mode"]:
            sys.exit("bench/code_grader.py: before and after chose different sandbox modes")
        runs = {"before / asserts": (before.code_tests_reward, GOOD, ADD),
                "after / asserts": (after.code_tests_reward, GOOD, ADD),
                "after / stdin-stdout": (after.code_tests_reward, PROG, STDIO)}
        for factory, comp, tests in runs.values():  # warm-up (page cache, first probe)
            one_round(factory, comp, tests, 2)
        figures: dict[str, list[tuple[float, float, float]]] = {k: [] for k in runs}
        order = list(runs)
        for r in range(args.rounds):
            for name in (order if r % 2 == 0 else order[::-1]):
                figures[name].append(one_round(*runs[name], args.batch))
    side = grader_side_seconds()

    def med(name: str, k: int) -> float:
        return statistics.median(x[k] for x in figures[name]) * 1000

    print(f"sandbox mode {caps['mode']} (network {caps['network']}), {os.cpu_count()} CPUs, "
          f"{args.rounds} rounds, batch {args.batch} on 2 workers; ms per completion, medians")
    print("| workload | latency alone | batch wall | batch CPU |")
    print("|---|---|---|---|")
    out = {"mode": caps["mode"], "rounds": args.rounds, "batch": args.batch,
           "parse_ms": side[0] * 1000, "decode_judge_ms": side[1] * 1000}
    for name in runs:
        row = [med(name, 0), med(name, 1), med(name, 2)]
        out[name] = dict(zip(["latency_ms", "batch_wall_ms", "batch_cpu_ms"], row))
        print(f"| {name} | {row[0]:.0f} | {row[1]:.0f} | {row[2]:.0f} |")
    print(f"grader-side work in the trainer process: parse the tests {side[0] * 1e6:.0f} us "
          f"(once per distinct tests in a batch), decode + judge {side[1] * 1e6:.0f} us per "
          "completion")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
