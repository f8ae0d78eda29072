"""Test environments for the agent tests (importable as ``agent_envs:...`` from a config)."""

from __future__ import annotations

import time


class CountEnv:
    """Observations of 'a's and 'b's; the reward of a turn is the number of 'a' in the answer;
    the episode ends (success) after ``row["turns"]`` answers."""

    def __init__(self, fail_on_turn: int | None = None, sleep_on_turn: int | None = None):
        self.fail_on_turn, self.sleep_on_turn = fail_on_turn, sleep_on_turn

    def reset(self, seed=None, options=None):
        self.row, self.turn = dict(options or {}), 0
        return "ab" * int(self.row.get("n", 1)), {}

    def step(self, action: str):
        self.turn += 1
        if self.turn == self.fail_on_turn:
            raise RuntimeError("the environment broke")
        if self.turn == self.sleep_on_turn:
            time.sleep(2.0)
        done = self.turn >= int(self.row.get("turns", 3))
        return "b" * self.turn, float(action.count("a")), done, False, {"success": done and "a" in action}


class SignallingCountEnv(CountEnv):
    """CountEnv that sends ``signal_at`` (SIGTERM) to this process on the n-th step of the run."""

    calls = 0
    signal_at: int | None = None

    def step(self, action: str):
        import os
        import signal

        type(self).calls += 1
        if type(self).calls == type(self).signal_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().step(action)
