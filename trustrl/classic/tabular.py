"""Tabular methods for discrete Gymnasium envs (Sutton & Barto, 2nd ed.).

* :func:`td0_evaluation` -- TD(0) prediction of ``V^pi`` for a given stochastic policy
  (S&B section 6.1): ``V(s) <- V(s) + alpha [r + gamma (1 - terminated) V(s') - V(s)]``.
  A time-limit truncation is *not* terminal: the target still bootstraps from ``V(s')``.
* :func:`exact_policy_evaluation` -- the same ``V^pi`` from the linear Bellman system
  ``(I - gamma P_pi) v = r_pi`` (S&B eq. 4.4), given the env's model.
* :func:`q_learning` -- off-policy TD control with an epsilon-greedy behaviour policy
  (S&B section 6.5): ``Q(s,a) <- Q(s,a) + alpha [r + gamma (1 - term) max_b Q(s',b) - Q(s,a)]``.
* :func:`greedy_rollout` -- follow ``argmax_a Q`` from the start state.

Everything here is plain numpy over a Gymnasium env with ``Discrete`` observations and
actions, stepped as given -- through its wrappers, so a ``TimeLimit`` truncates episodes
(``gym.make`` adds it for registered envs such as ``trustrl/Maze-v0``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

import gymnasium as gym


def _discrete_sizes(fn: str, env: gym.Env) -> tuple[int, int]:
    obs, act = env.observation_space, env.action_space
    if not (isinstance(obs, gym.spaces.Discrete) and isinstance(act, gym.spaces.Discrete)):
        raise ValueError(f"tabular.{fn}: needs Discrete observations and actions, got {obs} / {act}")
    return int(obs.n), int(act.n)


def uniform_policy(n_states: int, n_actions: int) -> np.ndarray:
    """``pi[s, a] = 1 / n_actions`` for every state."""
    return np.full((n_states, n_actions), 1.0 / n_actions)


def exact_policy_evaluation(
    next_state: np.ndarray,
    reward: np.ndarray,
    terminal: np.ndarray,
    policy: np.ndarray,
    gamma: float,
) -> np.ndarray:
    """Solve ``v = r_pi + gamma P_pi v`` for a deterministic-transition model.

    Args:
        next_state: ``[S, A]`` int, the successor of ``(s, a)``.
        reward: ``[S, A]`` expected reward of ``(s, a)``.
        terminal: ``[S]`` bool; terminal states have ``v = 0`` (episode over on entry).
        policy: ``[S, A]`` action probabilities.
        gamma: discount, ``< 1`` (the system is singular at 1 unless every policy ends).

    Returns:
        ``[S]`` state values (0 on terminal states).
    """
    n_states, n_actions = reward.shape
    if policy.shape != (n_states, n_actions):
        raise ValueError(f"exact_policy_evaluation: policy shape {policy.shape} != {(n_states, n_actions)}")
    p_pi = np.zeros((n_states, n_states))
    for a in range(n_actions):
        # P_pi[s, s'] += pi(a|s) for s' = next_state[s, a]
        np.add.at(p_pi, (np.arange(n_states), next_state[:, a]), policy[:, a])
    # Entering a terminal state ends the episode: its value is 0, so drop those columns,
    # and pin terminal rows to v = 0.
    p_pi[:, terminal] = 0.0
    r_pi = (policy * reward).sum(axis=1)
    a_mat = np.eye(n_states) - gamma * p_pi
    a_mat[terminal] = 0.0
    a_mat[terminal, terminal] = 1.0
    r_pi = np.where(terminal, 0.0, r_pi)
    return np.linalg.solve(a_mat, r_pi)


@dataclass
class TabularResult:
    """Output of a tabular run: the table plus per-episode logs."""

    table: np.ndarray
    episode_returns: list[float] = field(default_factory=list)
    episode_lengths: list[int] = field(default_factory=list)
    env_steps: int = 0
    wall_seconds: float = 0.0


class _EpisodeLog:
    """The bookkeeping of a tabular loop: resets, the running episode's return and length,
    finished episodes into ``out`` and ``on_episode``, and the run's steps and wall time."""

    def __init__(self, env: gym.Env, out: TabularResult,
                 on_episode: Callable[[int, float, int], None] | None) -> None:
        self.env, self.out, self.on_episode = env, out, on_episode
        self.ret, self.length = 0.0, 0
        self.t0 = time.perf_counter()

    def advance(self, env_steps: int, reward: float, done: bool, next_state: int) -> int:
        """Add one step's reward; the state to act from next (after a reset when ``done``)."""
        self.ret += reward
        self.length += 1
        if not done:
            return next_state
        self.out.episode_returns.append(self.ret)
        self.out.episode_lengths.append(self.length)
        if self.on_episode is not None:
            self.on_episode(env_steps, self.ret, self.length)
        self.ret, self.length = 0.0, 0
        state, _ = self.env.reset()
        return state

    def finish(self, total_steps: int) -> TabularResult:
        self.out.env_steps = total_steps
        self.out.wall_seconds = time.perf_counter() - self.t0
        return self.out


def td0_evaluation(
    env: gym.Env,
    policy: np.ndarray,
    *,
    total_steps: int,
    gamma: float = 0.9,
    alpha: float | Callable[[int], float] = 0.1,
    seed: int = 0,
    on_episode: Callable[[int, float, int], None] | None = None,
) -> TabularResult:
    """TD(0) prediction of ``V^pi`` from ``total_steps`` environment steps.

    ``alpha`` is a constant step size or a function of the state's visit count ``n >= 1``
    (e.g. ``lambda n: n ** -0.7`` satisfies the Robbins-Monro conditions).
    ``on_episode(env_steps, return, length)`` is called after each episode.
    """
    n_states, n_actions = _discrete_sizes("td0_evaluation", env)
    if policy.shape != (n_states, n_actions):
        raise ValueError(f"td0_evaluation: policy shape {policy.shape} != {(n_states, n_actions)}")
    rng = np.random.default_rng(seed)
    cdf = np.cumsum(policy, axis=1)
    step_size = alpha if callable(alpha) else (lambda n, a=float(alpha): a)
    v = np.zeros(n_states)
    visits = np.zeros(n_states, dtype=np.int64)
    out = TabularResult(table=v)
    episodes = _EpisodeLog(env, out, on_episode)
    s, _ = env.reset(seed=seed)
    uniforms = rng.random(total_steps)
    for t in range(total_steps):
        a = int(np.searchsorted(cdf[s], uniforms[t] * cdf[s, -1], side="right"))
        a = min(a, n_actions - 1)
        s2, r, terminated, truncated, _ = env.step(a)
        visits[s] += 1
        target = r + (0.0 if terminated else gamma * v[s2])
        v[s] += step_size(int(visits[s])) * (target - v[s])
        s = episodes.advance(t + 1, r, terminated or truncated, s2)
    return episodes.finish(total_steps)


def q_learning(
    env: gym.Env,
    *,
    total_steps: int,
    gamma: float = 0.99,
    alpha: float = 0.5,
    epsilon: float | Callable[[int], float] = 0.1,
    q_init: float = 0.0,
    seed: int = 0,
    on_episode: Callable[[int, float, int], None] | None = None,
) -> TabularResult:
    """Q-learning with an epsilon-greedy behaviour policy for ``total_steps`` env steps.

    ``epsilon`` is a constant or a function of the global step. Ties in ``argmax`` are
    broken at random so an all-zero table does not always pick action 0.
    """
    n_states, n_actions = _discrete_sizes("q_learning", env)
    rng = np.random.default_rng(seed)
    eps_fn = epsilon if callable(epsilon) else (lambda t, e=float(epsilon): e)
    q = np.full((n_states, n_actions), float(q_init))
    out = TabularResult(table=q)
    episodes = _EpisodeLog(env, out, on_episode)
    s, _ = env.reset(seed=seed)
    for t in range(total_steps):
        if rng.random() < eps_fn(t):
            a = int(rng.integers(n_actions))
        else:
            row = q[s]
            best = np.flatnonzero(row == row.max())
            a = int(best[0] if best.size == 1 else rng.choice(best))
        s2, r, terminated, truncated, _ = env.step(a)
        target = r + (0.0 if terminated else gamma * q[s2].max())
        q[s, a] += alpha * (target - q[s, a])
        s = episodes.advance(t + 1, r, terminated or truncated, s2)
    return episodes.finish(total_steps)


def greedy_rollout(env: gym.Env, q: np.ndarray, max_steps: int | None = None) -> tuple[list[int], float, bool]:
    """Follow ``argmax_a Q(s, a)`` (first maximum) from ``reset()``.

    Returns ``(visited states including the start, return, reached a terminal state)``.
    """
    s, _ = env.reset()
    states, total = [int(s)], 0.0
    limit = max_steps if max_steps is not None else 10_000
    for _ in range(limit):
        s, r, terminated, truncated, _ = env.step(int(np.argmax(q[s])))
        states.append(int(s))
        total += r
        if terminated:
            return states, total, True
        if truncated:
            break
    return states, total, False

