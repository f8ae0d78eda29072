"""Clean stops: SIGINT (Ctrl-C) and SIGTERM end a run between steps, never inside one.

While a training loop runs, the first signal only raises a flag; the loop finishes the step
in progress, writes a checkpoint of it, prints how to resume and returns. A second signal
while the step is still running stops at once (``KeyboardInterrupt``, reported by the CLI in
one line): the last checkpoint on disk is intact, since checkpoints are written atomically.
Data parallel: every rank receives the signal from torchrun; the decision to stop is taken
jointly (``all_true`` of "no stop"), so every rank leaves after the same step.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from types import FrameType
from typing import Any

from trustrl import distributed as dist

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class GracefulStop:
    """Context manager: ``with GracefulStop() as stop: ... if stop.requested(): break``."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.signal_name is not None:  # the second one: stop now
            raise KeyboardInterrupt(f"{name} received twice")
        self.signal_name = name
        if dist.is_main():  # torchrun forwards the signal to every rank: said once
            print(f"\ntrustrl: {name} received; stopping after the current step (send it again to stop now)",
                  file=sys.stderr, flush=True)

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():  # handlers only install there
            for sig in _SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def requested(self) -> bool:
        """True on every rank once any rank received a signal."""
        return not dist.all_true(self.signal_name is None)


def launcher_prefix() -> str:
    """What goes before ``trustrl train ...`` in a resume hint: nothing in one process; under
    torchrun the launcher (any world size resumes the checkpoint), its one-node line when every
    rank is on this node, else a placeholder for the job's own options."""
    world = dist.world_size()
    if world <= 1:
        return ""
    if int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0) == world:
        return f"torchrun --standalone --nproc_per_node {world} -m "
    return "torchrun <the same launcher options> -m "


def resume_hint(command: str, output_dir: Any) -> str:
    """The command that continues a run of trainer ``command`` (e.g. "grpo", "sft") from its
    run directory's config.yaml, with the launcher it ran under."""
    return f"{launcher_prefix()}trustrl train {command} --config {os.path.join(output_dir, 'config.yaml')} --resume"


def announce_stop(step: int, max_steps: int, stopped_by: str, checkpoint: Any, resume: str) -> None:
    """Rank 0 says where a clean stop left the run and how to continue it (``resume``)."""
    if dist.is_main():
        print(f"\ntrustrl: stopped after step {step} of {max_steps} ({stopped_by}); checkpoint {checkpoint}\n"
              f"resume with: {resume}", file=sys.stderr, flush=True)
