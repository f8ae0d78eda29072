"""The maze env (trustrl/Maze-v0): API conformance, rewards by hand, truncation, rendering;
tabular TD(0) against the exact linear solve, Q-learning against BFS."""

from __future__ import annotations

import numpy as np
import pytest

import gymnasium as gym
from gymnasium.utils.env_checker import check_env

import trustrl.classic  # noqa: F401  (registers trustrl/Maze-v0)
from trustrl.classic.maze import DEFAULT_LAYOUT, MazeEnv
from trustrl.classic import tabular

CORRIDOR = ["#####", "#S.E#", "#####"]          # cells: 0 = S (1,1), 1 = (1,2), 2 = E (1,3)
ROOM = ["#####", "#S..#", "#.#.#", "#..E#", "#####"]


@pytest.mark.filterwarnings("ignore:.*alternative render modes")
def test_check_env_passes_for_default_and_custom_layouts():
    check_env(gym.make("trustrl/Maze-v0").unwrapped)  # with a spec: also checks render modes
    check_env(MazeEnv(ROOM, max_episode_steps=7, render_mode="ansi"))
    check_env(MazeEnv(DEFAULT_LAYOUT, wall_reward=-1.0, step_reward=0.0, render_mode="rgb_array"))


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


def test_rewards_walls_exit_by_hand():
    env = MazeEnv(CORRIDOR, exit_reward=1.0, wall_reward=-0.5, step_reward=-0.01, max_episode_steps=50)
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
    env = MazeEnv(CORRIDOR, max_episode_steps=3)
    env.reset()
    flags = [env.step(0)[2:4] for _ in range(3)]  # bump into the wall three times
    assert flags == [(False, False), (False, False), (False, True)]
    # reaching the exit exactly on the last allowed step is a termination, not a truncation
    env = MazeEnv(CORRIDOR, max_episode_steps=2)
    env.reset()
    env.step(1)
    _, _, term, trunc, _ = env.step(1)
    assert (term, trunc) == (True, False)


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
    env = MazeEnv(ROOM, max_episode_steps=6)
    ns, r, term = env.transition_table()
    pi = tabular.uniform_policy(env.n_cells, 4)
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
    short = MazeEnv(CORRIDOR, max_episode_steps=1)
    res = tabular.q_learning(short, total_steps=5, seed=0)
    assert res.episode_lengths == [1] * 5 and res.env_steps == 5
