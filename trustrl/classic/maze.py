"""A small gridworld maze in the Gymnasium API, registered as ``trustrl/Maze-v0``.

The layout is a list of equal-length strings::

    '#' wall   'S' start (exactly one)   'E' exit (one or more)   '.' free

Observation: ``Discrete(n_cells)`` -- the index of the agent's cell among the non-wall
cells, numbered in row-major order (``env.cells[i]`` is the ``(row, col)`` of index ``i``).
Actions: ``Discrete(4)`` -- 0 up, 1 right, 2 down, 3 left.

Reward of one step (Sutton & Barto, ch. 3 style, all three configurable)::

    step_reward                      every step            (default -0.01)
  + wall_reward   if the move hits a wall or the border and the agent stays (default -0.5)
  + exit_reward   if the agent enters an exit cell                            (default +1.0)

Entering an exit *terminates* the episode. After ``max_episode_steps`` steps without
reaching it the episode is *truncated* (a time limit, not a terminal state: the value of
the state the agent is in is not zero, and learners should bootstrap from it).

The dynamics are deterministic, so the full model is available through
:meth:`MazeEnv.transition_table` for exact dynamic programming (used to check TD(0)).
"""

from __future__ import annotations

from collections import deque
from typing import Any, Sequence

import numpy as np

import gymnasium as gym
from gymnasium import spaces

ACTION_NAMES = ("up", "right", "down", "left")
# (d_row, d_col) of each action, indexed like ACTION_NAMES.
ACTION_DELTAS = ((-1, 0), (0, 1), (1, 0), (0, -1))

DEFAULT_LAYOUT: tuple[str, ...] = (
    "#########",
    "#S..#...#",
    "#.#.#.#.#",
    "#.#...#.#",
    "#.###.#.#",
    "#...#..E#",
    "#########",
)

_CELL_COLORS = {
    "#": (40, 40, 48),
    ".": (235, 235, 235),
    "S": (170, 200, 255),
    "E": (120, 210, 120),
}
_AGENT_COLOR = (220, 60, 50)


def _validate_layout(layout: Sequence[str]) -> tuple[str, ...]:
    if isinstance(layout, str):
        layout = layout.strip("\n").splitlines()
    rows = tuple(str(r) for r in layout)
    if not rows or not rows[0]:
        raise ValueError("maze.py: layout must be a non-empty list of strings")
    width = len(rows[0])
    for i, row in enumerate(rows):
        if len(row) != width:
            raise ValueError(
                f"maze.py: layout row {i} has length {len(row)}, expected {width} (all rows equal)"
            )
        bad = set(row) - set("#.SE")
        if bad:
            raise ValueError(
                f"maze.py: layout row {i} has unknown characters {sorted(bad)}; use '#', '.', 'S', 'E'"
            )
    n_start = sum(r.count("S") for r in rows)
    n_exit = sum(r.count("E") for r in rows)
    if n_start != 1:
        raise ValueError(f"maze.py: layout needs exactly one 'S', found {n_start}")
    if n_exit < 1:
        raise ValueError("maze.py: layout needs at least one 'E'")
    return rows


class MazeEnv(gym.Env):
    """Deterministic gridworld maze; see the module docstring for the exact MDP."""

    metadata = {"render_modes": ["ansi", "rgb_array"], "render_fps": 8}

    def __init__(
        self,
        layout: Sequence[str] | str | None = None,
        exit_reward: float = 1.0,
        wall_reward: float = -0.5,
        step_reward: float = -0.01,
        max_episode_steps: int = 200,
        render_mode: str | None = None,
        cell_pixels: int = 16,
    ) -> None:
        self.layout = _validate_layout(DEFAULT_LAYOUT if layout is None else layout)
        if max_episode_steps < 1:
            raise ValueError("maze.py: max_episode_steps must be >= 1")
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"maze.py: render_mode {render_mode!r} not in {self.metadata['render_modes']}")
        self.exit_reward = float(exit_reward)
        self.wall_reward = float(wall_reward)
        self.step_reward = float(step_reward)
        self.max_episode_steps = int(max_episode_steps)
        self.render_mode = render_mode
        self.cell_pixels = int(cell_pixels)

        self.height = len(self.layout)
        self.width = len(self.layout[0])
        self.cells: list[tuple[int, int]] = [
            (r, c) for r in range(self.height) for c in range(self.width) if self.layout[r][c] != "#"
        ]
        self.cell_index = {rc: i for i, rc in enumerate(self.cells)}
        self.n_cells = len(self.cells)
        self.start = next(i for i, (r, c) in enumerate(self.cells) if self.layout[r][c] == "S")
        self.exits = frozenset(i for i, (r, c) in enumerate(self.cells) if self.layout[r][c] == "E")

        self.observation_space = spaces.Discrete(self.n_cells)
        self.action_space = spaces.Discrete(4)

        # next_cell[s, a], bumped[s, a]: the deterministic model, precomputed once.
        self._next = np.empty((self.n_cells, 4), dtype=np.int64)
        self._bump = np.zeros((self.n_cells, 4), dtype=bool)
        for s, (r, c) in enumerate(self.cells):
            for a, (dr, dc) in enumerate(ACTION_DELTAS):
                rr, cc = r + dr, c + dc
                if 0 <= rr < self.height and 0 <= cc < self.width and self.layout[rr][cc] != "#":
                    self._next[s, a] = self.cell_index[(rr, cc)]
                else:
                    self._next[s, a] = s
                    self._bump[s, a] = True

        self._pos = self.start
        self._t = 0

    # ------------------------------------------------------------------ model
    def transition_table(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The exact model: ``(next_state[S, A], reward[S, A], terminal[S])``.

        ``terminal[s]`` is True for exit cells: the episode ends on entering them, so their
        value is 0 by definition. Rows for exit cells are never used by the env.
        """
        reward = np.full((self.n_cells, 4), self.step_reward)
        reward = reward + self.wall_reward * self._bump
        entering_exit = np.isin(self._next, list(self.exits))
        reward = reward + self.exit_reward * entering_exit
        terminal = np.zeros(self.n_cells, dtype=bool)
        terminal[list(self.exits)] = True
        return self._next.copy(), reward, terminal

    def shortest_path_lengths(self) -> np.ndarray:
        """Breadth-first search: fewest moves from every cell to the nearest exit (-1 if none)."""
        dist = np.full(self.n_cells, -1, dtype=np.int64)
        queue: deque[int] = deque()
        for e in self.exits:
            dist[e] = 0
            queue.append(e)
        # Moves are reversible (grid adjacency), so BFS from the exits over neighbours works.
        while queue:
            s = queue.popleft()
            for a in range(4):
                n = int(self._next[s, a])
                if dist[n] < 0:
                    dist[n] = dist[s] + 1
                    queue.append(n)
        return dist

    # -------------------------------------------------------------- gym API
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        self._pos = self.start
        self._t = 0
        return int(self._pos), {"position": self.cells[self._pos]}

    def step(self, action):
        a = int(action)
        if not 0 <= a < 4:
            raise ValueError(f"maze.py: action {action!r} outside Discrete(4)")
        s = self._pos
        nxt = int(self._next[s, a])
        bumped = bool(self._bump[s, a])
        reward = self.step_reward + (self.wall_reward if bumped else 0.0)
        terminated = nxt in self.exits
        if terminated:
            reward += self.exit_reward
        self._pos = nxt
        self._t += 1
        truncated = (not terminated) and self._t >= self.max_episode_steps
        info = {"position": self.cells[nxt], "bumped": bumped}
        return nxt, float(reward), terminated, truncated, info

    # ------------------------------------------------------------ rendering
    def _ansi(self) -> str:
        ar, ac = self.cells[self._pos]
        lines = []
        for r, row in enumerate(self.layout):
            chars = list(row)
            if r == ar:
                chars[ac] = "A"
            lines.append("".join(chars))
        return "\n".join(lines) + "\n"

    def _rgb(self) -> np.ndarray:
        p = self.cell_pixels
        img = np.zeros((self.height * p, self.width * p, 3), dtype=np.uint8)
        for r, row in enumerate(self.layout):
            for c, ch in enumerate(row):
                img[r * p : (r + 1) * p, c * p : (c + 1) * p] = _CELL_COLORS[ch]
        ar, ac = self.cells[self._pos]
        m = max(1, p // 4)
        img[ar * p + m : (ar + 1) * p - m, ac * p + m : (ac + 1) * p - m] = _AGENT_COLOR
        return img

    def render(self):
        if self.render_mode == "ansi":
            return self._ansi()
        if self.render_mode == "rgb_array":
            return self._rgb()
        return None


ENV_ID = "trustrl/Maze-v0"


def register_maze() -> None:
    """Register ``trustrl/Maze-v0`` with Gymnasium (idempotent)."""
    if ENV_ID not in gym.registry:
        gym.register(id=ENV_ID, entry_point="trustrl.classic.maze:MazeEnv")
