"""The maze envs (trustrl/Maze-v0 with compass moves, trustrl/MazeRobot-v0 with forward / turn
left / turn right): API conformance, rewards by hand, truncation by Gymnasium's TimeLimit,
rendering; tabular TD(0) against the exact linear solve, Q-learning against BFS."""

from __future__ import annotations

import numpy as np
import pytest

import gymnasium as gym
from gymnasium.utils.env_checker import check_env
from gymnasium.wrappers import TimeLimit

import trustrl.classic  # noqa: F401  (registers trustrl/Maze-v0)
from trustrl.classic.maze import DEFAULT_LAYOUT, MazeEnv
from trustrl.classic import tabular

CORRIDOR = ["#####", "#S.E#", "#####"]          # cells: 0 = S (1,1), 1 = (1,2), 2 = E (1,3)
ROOM = ["#####", "#S..#", "#.#.#", "#..E#", "#####"]


@pytest.mark.filterwarnings("ignore:.*alternative render modes")
def test_check_env_passes_for_default_and_custom_layouts():
    check_env(gym.make("trustrl/Maze-v0").unwrapped)  # with a spec: also checks render modes
    check_env(gym.make("trustrl/MazeRobot-v0").unwrapped)
    check_env(MazeEnv(ROOM, render_mode="ansi"))
    check_env(MazeEnv(ROOM, controls="robot", start_heading="south", render_mode="ansi"))
    check_env(MazeEnv(DEFAULT_LAYOUT, wall_reward=-1.0, step_reward=0.0, render_mode="rgb_array"))
    check_env(MazeEnv(DEFAULT_LAYOUT, controls="robot", render_mode="rgb_array"))


def test_registered_id_and_spaces():
    env = gym.make("trustrl/Maze-v0")
    raw = env.unwrapped
    assert isinstance(raw, MazeEnv)
    # default layout: 63 grid squares, 24 non-wall cells (counted row by row: 1+... see layout)
    n_free = sum(ch != "#" for row in DEFAULT_LAYOUT for ch in row)
    assert raw.observation_space == gym.spaces.Discrete(n_free) == gym.spaces.Discrete(24)
    assert raw.action_space == gym.spaces.Discrete(4)
    obs, info = env.reset(seed=0)
    assert obs == raw.start == 0 and info["position"] == (1, 1)
    # the robot: 24 cells x 4 headings, 3 actions; starts at cell 0 facing east (4 * 0 + 1)
    robot = gym.make("trustrl/MazeRobot-v0")
    assert robot.observation_space == gym.spaces.Discrete(96) and robot.action_space == gym.spaces.Discrete(3)
    obs, info = robot.reset(seed=0)
    assert obs == 1 and info == {"position": (1, 1), "heading": "east"}
    # both registered with Gymnasium's TimeLimit of 200 steps
    assert env.spec.max_episode_steps == robot.spec.max_episode_steps == 200


def test_rewards_walls_exit_by_hand():
    env = MazeEnv(CORRIDOR, exit_reward=1.0, wall_reward=-0.5, step_reward=-0.01)
    s, _ = env.reset(seed=0)
    assert s == 0
    # up from S is a wall: stay, reward = step -0.01 + wall -0.5 = -0.51
    s, r, term, trunc, info = env.step(0)
    assert (s, term, trunc, info["bumped"]) == (0, False, False, True)
    assert r == pytest.approx(-0.51)
    # left from S is a wall too
    s, r, *_ = env.step(3)
    assert s == 0 and r == pytest.approx(-0.51)
    # right: free cell, only the step cost
    s, r, term, trunc, info = env.step(1)
    assert (s, term, trunc, info["bumped"]) == (1, False, False, False)
    assert r == pytest.approx(-0.01)
    # right again: enter the exit, -0.01 + 1.0 = 0.99, terminated (not truncated)
    s, r, term, trunc, _ = env.step(1)
    assert (s, term, trunc) == (2, True, False)
    assert r == pytest.approx(0.99)


def test_configurable_rewards():
    env = MazeEnv(CORRIDOR, exit_reward=10.0, wall_reward=-2.0, step_reward=0.0)
    env.reset()
    assert env.step(0)[1] == pytest.approx(-2.0)
    env.step(1)
    assert env.step(1)[1] == pytest.approx(10.0)


def test_time_limit_truncates_not_terminates():
    env = gym.make("trustrl/Maze-v0", layout=CORRIDOR, max_episode_steps=3)  # Gymnasium's TimeLimit
    env.reset()
    flags = [env.step(0)[2:4] for _ in range(3)]  # bump into the wall three times
    assert flags == [(False, False), (False, False), (False, True)]
    # reaching the exit exactly on the last allowed step is a termination; Gymnasium's TimeLimit
    # flags it truncated as well, and every learner here checks `terminated` first (no
    # bootstrap from an exit: TD targets and GAE multiply V(s') by 1 - terminated)
    env = gym.make("trustrl/Maze-v0", layout=CORRIDOR, max_episode_steps=2)
    env.reset()
    env.step(1)
    _, _, term, trunc, _ = env.step(1)
    assert (term, trunc) == (True, True)
    # MazeEnv itself has no time limit: 500 bumps, never truncated
    raw = MazeEnv(CORRIDOR)
    raw.reset()
    assert not any(raw.step(0)[3] for _ in range(500))


def test_robot_moves_forward_and_turns_by_hand():
    env = MazeEnv(CORRIDOR, controls="robot", exit_reward=1.0, wall_reward=-0.5, step_reward=-0.01)
    s, info = env.reset(seed=0)
    assert (s, info["heading"]) == (4 * 0 + 1, "east")
    # turn left: facing north, same cell, only the step cost
    s, r, term, trunc, info = env.step(1)
    assert (s, info["heading"], info["position"], info["bumped"]) == (4 * 0 + 0, "north", (1, 1), False)
    assert r == pytest.approx(-0.01)
    # forward while facing north: a wall, stay, -0.01 - 0.5
    s, r, *_ = env.step(0)
    assert s == 0 and r == pytest.approx(-0.51)
    # turn right twice: north -> east -> south; then once left: east again
    assert [env.step(2)[4]["heading"], env.step(2)[4]["heading"], env.step(1)[4]["heading"]] == \
        ["east", "south", "east"]
    # forward, forward: (1,2) then the exit (1,3): -0.01, then -0.01 + 1.0, terminated
    s, r, term, _, info = env.step(0)
    assert (s, info["position"], term) == (4 * 1 + 1, (1, 2), False) and r == pytest.approx(-0.01)
    s, r, term, trunc, _ = env.step(0)
    assert (s, term, trunc) == (4 * 2 + 1, True, False) and r == pytest.approx(0.99)
    with pytest.raises(ValueError, match="Discrete\\(3\\)"):
        env.step(3)
    with pytest.raises(ValueError, match="controls"):
        MazeEnv(CORRIDOR, controls="joystick")


def test_robot_exact_policy_evaluation_by_hand():
    env = MazeEnv(CORRIDOR, controls="robot")
    ns, r, term = env.transition_table()
    pi = np.zeros((12, 3))
    pi[:, 0] = 1.0  # always forward
    v = tabular.exact_policy_evaluation(ns, r, term, pi, gamma=0.9)
    # facing east: V(1, E) = -0.01 + 1 = 0.99; V(0, E) = -0.01 + 0.9 * 0.99 = 0.881
    # facing north or south: a wall forever, V = -0.51 / (1 - 0.9) = -5.1
    # facing west from cell 1: into cell 0 facing west (-0.01), then the wall forever:
    #   V(1, W) = -0.01 + 0.9 * V(0, W) = -0.01 + 0.9 * (-5.1) = -4.6
    # exit states: 0
    np.testing.assert_allclose(v[[1, 5, 0, 2, 4, 6, 3, 7]], [0.881, 0.99, -5.1, -5.1, -5.1, -5.1, -5.1, -4.6],
                               atol=1e-12)
    assert v[8:].tolist() == [0.0] * 4


def test_rendering_ansi_and_rgb():
    env = MazeEnv(CORRIDOR, render_mode="ansi")
    env.reset()
    assert env.render() == "#####\n#A.E#\n#####\n"
    env.step(1)
    assert env.render() == "#####\n#SAE#\n#####\n"
    env = MazeEnv(DEFAULT_LAYOUT, render_mode="rgb_array", cell_pixels=8)
    env.reset()
    img = env.render()
    assert img.shape == (7 * 8, 9 * 8, 3) and img.dtype == np.uint8
    # the agent's square (row 1, col 1) is drawn in red at its centre
    assert tuple(img[1 * 8 + 4, 1 * 8 + 4]) == (220, 60, 50)
    # the robot is drawn as an arrow in ANSI: > facing east, ^ after a left turn
    env = MazeEnv(CORRIDOR, controls="robot", render_mode="ansi")
    env.reset()
    assert env.render() == "#####\n#>.E#\n#####\n"
    env.step(1)
    assert env.render() == "#####\n#^.E#\n#####\n"


@pytest.mark.parametrize(
    "layout, match",
    [(["#S#", "#E"], "length"), (["#S.", "#.."], "'E'"), (["SS", "E."], "exactly one 'S'"), (["S?E"], "unknown")],
)
def test_bad_layouts_name_the_problem(layout, match):
    with pytest.raises(ValueError, match=match):
        MazeEnv(layout)


def test_bfs_shortest_path_default_layout_by_hand():
    env = MazeEnv()
    # By hand on DEFAULT_LAYOUT: S(1,1) -> (1,2) (1,3) (2,3) (3,3) (3,4) (3,5) (4,5) (5,5) (5,6)
    # -> E(5,7): 10 moves. The other routes (over the top right, 14 moves; the bottom-left
    # corridor is a dead end) are longer.
    assert env.shortest_path_lengths()[env.start] == 10
    # The robot (starts facing east) along the same route: 10 forward moves and a turn at
    # each of the 4 corners, (1,3) right, (3,3) left, (3,5) right, (5,5) left: 14 actions.
    robot = MazeEnv(controls="robot")
    assert robot.shortest_path_lengths()[robot.start] == 14


def test_exact_policy_evaluation_by_hand():
    env = MazeEnv(CORRIDOR)
    ns, r, term = env.transition_table()
    pi = np.zeros((3, 4))
    pi[:, 1] = 1.0  # always "right"
    v = tabular.exact_policy_evaluation(ns, r, term, pi, gamma=0.9)
    # V(1) = -0.01 + 1 = 0.99 (enter exit); V(0) = -0.01 + 0.9 * 0.99 = 0.881; V(E) = 0
    np.testing.assert_allclose(v, [0.881, 0.99, 0.0], atol=1e-12)


def test_td0_matches_exact_linear_solve_with_truncation():
    # Short time limit (6 steps) on purpose: TD(0) must bootstrap through truncation to
    # estimate the infinite-horizon V^pi that the linear system defines.
    env = TimeLimit(MazeEnv(ROOM), max_episode_steps=6)
    ns, r, term = env.unwrapped.transition_table()
    pi = tabular.uniform_policy(env.unwrapped.n_cells, 4)
    exact = tabular.exact_policy_evaluation(ns, r, term, pi, gamma=0.8)
    assert exact.min() < -1.0  # values of order 1, so the tolerance below is meaningful
    res = tabular.td0_evaluation(env, pi, total_steps=200_000, gamma=0.8, alpha=lambda n: n ** -0.8, seed=0)
    np.testing.assert_allclose(res.table, exact, atol=0.12)
    assert np.mean(np.abs(res.table - exact)) < 0.05


def test_q_learning_greedy_path_is_shortest():
    env = gym.make("trustrl/Maze-v0")
    raw = env.unwrapped
    res = tabular.q_learning(env, total_steps=20_000, gamma=0.99, alpha=0.5, epsilon=0.2, seed=0)
    path, ret, reached = tabular.greedy_rollout(env, res.table)
    bfs = raw.shortest_path_lengths()
    assert reached
    assert len(path) - 1 == bfs[raw.start] == 10
    # every move along the greedy path gets one step closer to the exit
    assert [int(bfs[s]) for s in path] == list(range(10, -1, -1))
    # 10 moves: 10 x (-0.01) + 1.0
    assert ret == pytest.approx(0.9)


def test_q_learning_robot_greedy_path_is_shortest():
    env = gym.make("trustrl/MazeRobot-v0")
    raw = env.unwrapped
    res = tabular.q_learning(env, total_steps=20_000, gamma=0.99, alpha=0.5, epsilon=0.2, seed=0)
    path, ret, reached = tabular.greedy_rollout(env, res.table)
    bfs = raw.shortest_path_lengths()
    assert reached and len(path) - 1 == bfs[raw.start] == 14
    assert [int(bfs[s]) for s in path] == list(range(14, -1, -1))
    # 14 actions: 14 x (-0.01) + 1.0
    assert ret == pytest.approx(0.86)


def test_tabular_episode_logs_by_hand():
    # CORRIDOR with "always right" (action 1): S -> . -> E, every episode 2 steps, return
    # -0.01 + 0.99 = 0.98; 7 steps = 3 whole episodes (ending at steps 2, 4, 6) + 1 step.
    env = MazeEnv(CORRIDOR, exit_reward=1.0, wall_reward=-0.5, step_reward=-0.01)
    right = np.zeros((env.n_cells, 4))
    right[:, 1] = 1.0
    seen: list[tuple[int, float, int]] = []
    res = tabular.td0_evaluation(env, right, total_steps=7, gamma=0.9, alpha=0.5, seed=0,
                                 on_episode=lambda t, ret, n: seen.append((t, ret, n)))
    assert [t for t, _, _ in seen] == [2, 4, 6]
    assert res.episode_lengths == [2, 2, 2] and [n for _, _, n in seen] == [2, 2, 2]
    assert res.episode_returns == pytest.approx([0.98] * 3) and [r for _, r, _ in seen] == res.episode_returns
    # a time limit of 1 step truncates every Q-learning episode after one step
    short = TimeLimit(MazeEnv(CORRIDOR), max_episode_steps=1)
    res = tabular.q_learning(short, total_steps=5, seed=0)
    assert res.episode_lengths == [1] * 5 and res.env_steps == 5
