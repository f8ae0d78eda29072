"""The documents' robot as a language environment: a text maze.

The robot stands in a grid maze facing north, east, south or west. Each turn the model sees
what is around it and where the exit is, relative to the robot, and answers ``forward``,
``turn left`` or ``turn right``::

    ahead wall left open right open exit +2 -1

reads: a wall ahead, open cells to the left and the right, the exit 2 cells ahead and 1 to
the left (``exit <ahead> <right>``: + ahead / right, - behind / left). The dynamics and
rewards are the classic maze's (:class:`trustrl.classic.maze.MazeEnv`, robot controls, played
through :class:`~trustrl.envs.gym_bridge.GymTextEnv`): ``step_reward`` every turn, plus
``wall_reward`` when it walks into a wall (and stays), plus ``exit_reward`` on reaching the
exit, which ends the episode with success. Any other answer is no move and costs
``invalid_reward``.

The episode's maze is its dataset row: ``layout`` (rows of ``#``/``.``/``S``/``E`` joined by
``/``) and ``heading``. :func:`random_layouts` draws layouts; :func:`write_maze_data` writes a
training set and a held-out set of layouts never seen in training.
"""

from __future__ import annotations

import random
from typing import Any

from trustrl.classic.maze import ACTION_DELTAS, HEADINGS, MazeEnv
from trustrl.envs.gym_bridge import GymTextEnv

ACTIONS = {"forward": 0, "turn left": 1, "turn right": 2}
ACTION_TEXT = {v: k for k, v in ACTIONS.items()}


def parse_action(text: str) -> int | None:
    return ACTIONS.get(text.strip().lower())


def _open(env: MazeEnv, r: int, c: int, heading: int) -> bool:
    dr, dc = ACTION_DELTAS[heading]
    rr, cc = r + dr, c + dc
    return 0 <= rr < env.height and 0 <= cc < env.width and env.layout[rr][cc] != "#"


def robot_view(env: MazeEnv, state: int) -> dict[str, Any]:
    """What the robot sees in ``state``: walls ahead/left/right and the exit's offset."""
    r, c = env.position(state)
    h = state % 4
    er, ec = next((rr, cc) for rr, row in enumerate(env.layout) for cc, ch in enumerate(row) if ch == "E")
    fr, fc = ACTION_DELTAS[h]
    rr_, rc_ = ACTION_DELTAS[(h + 1) % 4]
    dr, dc = er - r, ec - c
    return {"ahead": _open(env, r, c, h), "left": _open(env, r, c, (h - 1) % 4), "right": _open(env, r, c, (h + 1) % 4),
            "exit_ahead": dr * fr + dc * fc, "exit_right": dr * rr_ + dc * rc_}


def render_view(view: dict[str, Any]) -> str:
    word = {True: "open", False: "wall"}
    return (f"ahead {word[view['ahead']]} left {word[view['left']]} right {word[view['right']]} "
            f"exit {view['exit_ahead']:+d} {view['exit_right']:+d}")


def make_maze(row: dict[str, Any], **rewards: float) -> MazeEnv:
    layout = row["layout"].split("/") if isinstance(row["layout"], str) else row["layout"]
    return MazeEnv(layout, controls="robot", start_heading=row.get("heading", "east"), **rewards)


class TextMaze(GymTextEnv):
    """``env: trustrl.envs.maze:TextMaze``; rows need ``layout`` and ``heading``."""

    def __init__(self, exit_reward: float = 1.0, wall_reward: float = -0.1, step_reward: float = -0.01,
                 invalid_reward: float = -0.1):
        rewards = dict(exit_reward=exit_reward, wall_reward=wall_reward, step_reward=step_reward)
        super().__init__(make=lambda row: make_maze(row, **rewards),
                         render=lambda env, obs, info: render_view(robot_view(env, int(obs))),
                         parse=parse_action, invalid_reward=invalid_reward,
                         success=lambda reward, terminated, info: bool(terminated))


# -- layouts, the teacher, data ---------------------------------------------------------------

def expert_action(view: dict[str, Any]) -> int:
    """A reactive expert: forward while the exit is ahead and the way is open, else turn toward
    the exit's side (or any open side)."""
    a, s = view["exit_ahead"], view["exit_right"]
    if a > 0 and view["ahead"]:
        return 0
    if s < 0 and view["left"]:
        return 1
    if s > 0 and view["right"]:
        return 2
    if a <= 0 and s == 0:  # exit behind: turn toward an open side
        return 1 if view["left"] or not view["right"] else 2
    if view["ahead"]:
        return 0
    return 1 if view["left"] or not view["right"] else 2


def expert_turns(row: dict[str, Any], max_turns: int) -> int | None:
    """Turns the expert needs to reach the exit (None: not within ``max_turns``)."""
    env = make_maze(row)
    state, _ = env.reset()
    for turn in range(1, max_turns + 1):
        state, _, terminated, _, _ = env.step(expert_action(robot_view(env, state)))
        if terminated:
            return turn
    return None


def random_layouts(n: int, seed: int, *, height: int = 4, width: int = 4, walls: int = 3,
                   max_turns: int = 8, exclude: set[str] | None = None) -> list[dict[str, Any]]:
    """``n`` distinct rows ``{layout, heading}``: ``height x width`` open cells inside a border,
    ``walls`` inner walls, start and exit at random, kept when the expert reaches the exit in
    ``max_turns`` turns or fewer (and the start is not the exit's neighbour in a straight line
    ahead: every kept maze needs some steering). Rows whose layout and heading are in
    ``exclude`` are skipped (held-out sets never contain a training maze)."""
    rng = random.Random(seed)
    seen = set(exclude or ())
    rows: list[dict[str, Any]] = []
    while len(rows) < n:
        grid = [["."] * width for _ in range(height)]
        cells = [(r, c) for r in range(height) for c in range(width)]
        picks = rng.sample(cells, walls + 2)
        for r, c in picks[2:]:
            grid[r][c] = "#"
        (sr, sc), (er, ec) = picks[0], picks[1]
        grid[sr][sc], grid[er][ec] = "S", "E"
        layout = "/".join(["#" * (width + 2)] + ["#" + "".join(g) + "#" for g in grid] + ["#" * (width + 2)])
        row = {"layout": layout, "heading": rng.choice(HEADINGS)}
        key = f"{layout}|{row['heading']}"
        if key in seen:
            continue
        turns = expert_turns(row, max_turns)
        if turns is None or turns < 3:
            continue
        seen.add(key)
        rows.append(row)
    return rows


def maze_key(row: dict[str, Any]) -> str:
    return f"{row['layout']}|{row['heading']}"
