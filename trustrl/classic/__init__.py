"""Classic RL on Gymnasium: the maze, tabular TD(0) / Q-learning, REINFORCE, PPO, TRPO.

Importing this package registers ``trustrl/Maze-v0`` (compass moves) and
``trustrl/MazeRobot-v0`` (a robot that moves forward or turns left / right). The policy-gradient trainers share
the math in :mod:`trustrl.advantages`, :mod:`trustrl.losses` and :mod:`trustrl.trpo`
with the language-model trainers; only the rollout side (vectorized Gymnasium envs,
small MLPs) lives here. Command line: ``python -m trustrl.classic --algo ppo --env CartPole-v1``.
"""

from __future__ import annotations

from trustrl.classic.maze import (DEFAULT_LAYOUT, ENV_ID as MAZE_ENV_ID, ROBOT_ENV_ID as MAZE_ROBOT_ENV_ID,
                                  MazeEnv, register_maze)

register_maze()

__all__ = ["DEFAULT_LAYOUT", "MAZE_ENV_ID", "MAZE_ROBOT_ENV_ID", "MazeEnv", "register_maze"]
