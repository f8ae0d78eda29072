"""A bridge that lets an LLM play any Gymnasium environment: a text renderer turns its
observations into messages, an action parser turns the model's text into its actions.

    GymTextEnv(make=lambda row: gym.make("FrozenLake-v1", is_slippery=False),
               render=lambda env, obs, info: f"you are on cell {obs}",
               parse=lambda text: {"left": 0, "down": 1, "right": 2, "up": 3}.get(text.strip()))

``make(row)`` builds the Gymnasium environment for an episode from its dataset row (the maze
layout, the map, ...); it is called at every reset. ``render(env, obs, info)`` gives the text
the model sees (``env`` is the unwrapped environment, for renderers that look at its state).
``parse(text)`` returns an action of the environment's action space, or None when the text
is no action: the environment then does not move, the model is told so, and the turn costs
``invalid_reward``. ``success(reward, terminated, info)`` says whether an episode that ended
succeeded (counted as ``env/success``); by default: it terminated with a positive reward.
"""

from __future__ import annotations

from typing import Any, Callable


def _default_success(reward: float, terminated: bool, info: dict) -> bool:
    return bool(terminated and reward > 0)


class GymTextEnv:
    """A Gymnasium environment seen as a language environment (see the module docstring)."""

    invalid_message = "not an action: {text!r}"

    def __init__(self, make: Callable[[dict], Any], render: Callable[[Any, Any, dict], str],
                 parse: Callable[[str], Any], *, invalid_reward: float = -0.1,
                 success: Callable[[float, bool, dict], bool] | None = None):
        self.make, self.render_text, self.parse = make, render, parse
        self.invalid_reward = float(invalid_reward)
        self.success = success or _default_success
        self.env = None

    def reset(self, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[str, dict]:
        if self.env is not None:
            self.env.close()
        self.env = self.make(dict(options or {}))
        obs, info = self.env.reset(seed=seed)
        self._last = (obs, info)
        return self.render_text(self.env.unwrapped, obs, info), dict(info)

    def step(self, action: str) -> tuple[str, float, bool, bool, dict]:
        if self.env is None:
            raise RuntimeError("GymTextEnv.step before reset")
        parsed = self.parse(action)
        if parsed is None:
            obs, info = self._last
            text = self.invalid_message.format(text=action[:40]) + "\n" + self.render_text(self.env.unwrapped, obs, info)
            return text, self.invalid_reward, False, False, {"invalid_action": True}
        obs, reward, terminated, truncated, info = self.env.step(parsed)
        self._last = (obs, info)
        info = dict(info)
        if terminated or truncated:
            info["success"] = self.success(float(reward), bool(terminated), info)
        return self.render_text(self.env.unwrapped, obs, info), float(reward), bool(terminated), bool(truncated), info
