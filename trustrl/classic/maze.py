"""A small gridworld maze in the Gymnasium API, registered as ``trustrl/Maze-v0``.

The layout is a list of equal-length strings::

    '#' wall   'S' start (exactly one)   'E' exit (one or more)   '.' free

Two ways to steer (``controls``):

* ``"compass"`` (``trustrl/Maze-v0``): ``Discrete(4)`` actions -- 0 up, 1 right, 2 down,
  3 left; observation ``Discrete(n_cells)``, the index of the agent's cell among the
  non-wall cells, numbered in row-major order (``env.cells[i]`` is its ``(row, col)``).
* ``"robot"`` (``trustrl/MazeRobot-v0``): a robot with a heading (north, east, south, west;
  it starts facing ``start_heading``, east by default) and ``Discrete(3)`` actions -- 0 move
  forward one cell, 1 turn left, 2 turn right (a turn keeps the cell and costs a step);
  observation ``Discrete(4 * n_cells)``, ``4 * cell + heading``.

Reward of one step (Sutton & Barto, ch. 3 style, all three configurable)::

    step_reward                      every step            (default -0.01)
  + wall_reward   if the move hits a wall or the border and the agent stays (default -0.5)
  + exit_reward   if the agent enters an exit cell                            (default +1.0)

Entering an exit *terminates* the episode. The time limit is Gymnasium's ``TimeLimit``
wrapper, which ``gym.make`` adds (200 steps by default; ``gym.make(id,
max_episode_steps=N)`` to change it): after that many steps without reaching an exit the
episode is *truncated* (a time limit, not a terminal state: the value of the state the
agent is in is not zero, and learners should bootstrap from it). ``MazeEnv`` itself has no
time limit.

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
# (d_row, d_col) of each action, indexed like ACTION_NAMES; also the robot's heading directions.
ACTION_DELTAS = ((-1, 0), (0, 1), (1, 0), (0, -1))
ROBOT_ACTION_NAMES = ("forward", "turn_left", "turn_right")
HEADINGS = ("north", "east", "south", "west")  # heading h moves by ACTION_DELTAS[h]
CONTROLS = ("compass", "robot")

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
        controls: str = "compass",
        start_heading: str = "east",
        render_mode: str | None = None,
        cell_pixels: int = 16,
    ) -> None:
        self.layout = _validate_layout(DEFAULT_LAYOUT if layout is None else layout)
        if controls not in CONTROLS:
            raise ValueError(f"maze.py: controls {controls!r} not in {CONTROLS}")
        if start_heading not in HEADINGS:
            raise ValueError(f"maze.py: start_heading {start_heading!r} not in {HEADINGS}")
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"maze.py: render_mode {render_mode!r} not in {self.metadata['render_modes']}")
        self.exit_reward = float(exit_reward)
        self.wall_reward = float(wall_reward)
        self.step_reward = float(step_reward)
        self.controls = controls
        self.render_mode = render_mode
        self.cell_pixels = int(cell_pixels)

        self.height = len(self.layout)
        self.width = len(self.layout[0])
        self.cells: list[tuple[int, int]] = [
            (r, c) for r in range(self.height) for c in range(self.width) if self.layout[r][c] != "#"
        ]
        self.cell_index = {rc: i for i, rc in enumerate(self.cells)}
        self.n_cells = len(self.cells)
        start_cell = next(i for i, (r, c) in enumerate(self.cells) if self.layout[r][c] == "S")
        exit_cells = [i for i, (r, c) in enumerate(self.cells) if self.layout[r][c] == "E"]

        # The model, precomputed once: next_state[s, a], bumped[s, a] over states s (cells, or
        # 4 * cell + heading for the robot).
        robot = controls == "robot"
        self.n_headings = 4 if robot else 1
        self.n_states = self.n_cells * self.n_headings
        self.n_actions = 3 if robot else 4
        self._next = np.empty((self.n_states, self.n_actions), dtype=np.int64)
        self._bump = np.zeros((self.n_states, self.n_actions), dtype=bool)
        for s in range(self.n_states):
            cell, heading = divmod(s, self.n_headings)
            for a in range(self.n_actions):
                if robot and a == 1:  # turn left: north -> west -> south -> east -> north
                    self._next[s, a] = 4 * cell + (heading - 1) % 4
                    continue
                if robot and a == 2:  # turn right
                    self._next[s, a] = 4 * cell + (heading + 1) % 4
                    continue
                dr, dc = ACTION_DELTAS[heading if robot else a]
                r, c = self.cells[cell]
                rr, cc = r + dr, c + dc
                if 0 <= rr < self.height and 0 <= cc < self.width and self.layout[rr][cc] != "#":
                    self._next[s, a] = self.cell_index[(rr, cc)] * self.n_headings + heading
                else:
                    self._next[s, a] = s
                    self._bump[s, a] = True
        self.start = start_cell * self.n_headings + (HEADINGS.index(start_heading) if robot else 0)
        self.exits = frozenset(e * self.n_headings + h for e in exit_cells for h in range(self.n_headings))

        self.observation_space = spaces.Discrete(self.n_states)
        self.action_space = spaces.Discrete(self.n_actions)
        self._pos = self.start

    # ------------------------------------------------------------------ model
    def transition_table(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The exact model: ``(next_state[S, A], reward[S, A], terminal[S])``.

        ``terminal[s]`` is True for exit states: the episode ends on entering them, so their
        value is 0 by definition. Rows for exit states are never used by the env.
        """
        reward = np.full((self.n_states, self.n_actions), self.step_reward)
        reward = reward + self.wall_reward * self._bump
        entering_exit = np.isin(self._next, list(self.exits))
        reward = reward + self.exit_reward * entering_exit
        terminal = np.zeros(self.n_states, dtype=bool)
        terminal[list(self.exits)] = True
        return self._next.copy(), reward, terminal

    def shortest_path_lengths(self) -> np.ndarray:
        """Breadth-first search: fewest actions from every state to an exit (-1 if none).

        Runs backwards from the exit states over the reversed model (a robot's forward move
        is not undone by one action, so the graph is directed)."""
        predecessors: list[list[int]] = [[] for _ in range(self.n_states)]
        for s in range(self.n_states):
            if s not in self.exits:  # the episode ends on entering an exit: nothing leaves it
                for a in range(self.n_actions):
                    predecessors[int(self._next[s, a])].append(s)
        dist = np.full(self.n_states, -1, dtype=np.int64)
        queue: deque[int] = deque()
        for e in self.exits:
            dist[e] = 0
            queue.append(e)
        while queue:
            s = queue.popleft()
            for p in predecessors[s]:
                if dist[p] < 0:
                    dist[p] = dist[s] + 1
                    queue.append(p)
        return dist

    def position(self, state: int) -> tuple[int, int]:
        """The ``(row, col)`` of a state."""
        return self.cells[state // self.n_headings]

    def _info(self, state: int) -> dict[str, Any]:
        info: dict[str, Any] = {"position": self.position(state)}
        if self.controls == "robot":
            info["heading"] = HEADINGS[state % 4]
        return info

    # -------------------------------------------------------------- gym API
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        self._pos = self.start
        return int(self._pos), self._info(self._pos)

    def step(self, action):
        a = int(action)
        if not 0 <= a < self.n_actions:
            raise ValueError(f"maze.py: action {action!r} outside Discrete({self.n_actions})")
        s = self._pos
        nxt = int(self._next[s, a])
        bumped = bool(self._bump[s, a])
        reward = self.step_reward + (self.wall_reward if bumped else 0.0)
        terminated = nxt in self.exits
        if terminated:
            reward += self.exit_reward
        self._pos = nxt
        info = {**self._info(nxt), "bumped": bumped}
        return nxt, float(reward), terminated, False, info

    # ------------------------------------------------------------ rendering
    def _ansi(self) -> str:
        ar, ac = self.position(self._pos)
        agent = "^>v<"[self._pos % 4] if self.controls == "robot" else "A"
        lines = []
        for r, row in enumerate(self.layout):
            chars = list(row)
            if r == ar:
                chars[ac] = agent
            lines.append("".join(chars))
        return "\n".join(lines) + "\n"

    def _rgb(self) -> np.ndarray:
        p = self.cell_pixels
        img = np.zeros((self.height * p, self.width * p, 3), dtype=np.uint8)
        for r, row in enumerate(self.layout):
            for c, ch in enumerate(row):
                img[r * p : (r + 1) * p, c * p : (c + 1) * p] = _CELL_COLORS[ch]
        ar, ac = self.position(self._pos)
        m = max(1, p // 4)
        img[ar * p + m : (ar + 1) * p - m, ac * p + m : (ac + 1) * p - m] = _AGENT_COLOR
        if self.controls == "robot":  # the robot's nose: a dark mark on the side it faces
            dr, dc = ACTION_DELTAS[self._pos % 4]
            cr, cc = ar * p + p // 2 + dr * (p // 2 - m), ac * p + p // 2 + dc * (p // 2 - m)
            img[max(cr - 1, 0) : cr + 1, max(cc - 1, 0) : cc + 1] = (0, 0, 0)
        return img

    def render(self):
        if self.render_mode == "ansi":
            return self._ansi()
        if self.render_mode == "rgb_array":
            return self._rgb()
        return None


ENV_ID = "trustrl/Maze-v0"
ROBOT_ENV_ID = "trustrl/MazeRobot-v0"
MAX_EPISODE_STEPS = 200


def register_maze() -> None:
    """Register ``trustrl/Maze-v0`` (compass moves) and ``trustrl/MazeRobot-v0`` (forward /
    turn left / turn right) with Gymnasium, both with a 200-step ``TimeLimit`` (idempotent)."""
    if ENV_ID not in gym.registry:
        gym.register(id=ENV_ID, entry_point="trustrl.classic.maze:MazeEnv",
                     max_episode_steps=MAX_EPISODE_STEPS)
    if ROBOT_ENV_ID not in gym.registry:
        gym.register(id=ROBOT_ENV_ID, entry_point="trustrl.classic.maze:MazeEnv",
                     max_episode_steps=MAX_EPISODE_STEPS, kwargs={"controls": "robot"})
