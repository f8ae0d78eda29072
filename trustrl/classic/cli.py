"""``trustrl classic`` / ``python -m trustrl.classic``: train one classic-RL agent, write a run dir.

Examples::

    python -m trustrl.classic --algo ppo --env CartPole-v1 --seed 0
    python -m trustrl.classic --algo trpo --env CartPole-v1 --total-steps 100000
    python -m trustrl.classic --algo ppo --env Pendulum-v1 --total-steps 200000
    python -m trustrl.classic --algo q_learning --env trustrl/Maze-v0
    python -m trustrl.classic --algo q_learning --env trustrl/MazeRobot-v0
    python -m trustrl.classic --algo td --env trustrl/Maze-v0 --set gamma=0.9
    python -m trustrl.classic --algo ppo --env CartPole-v1 --set n_epochs=10 --set lr=3e-4

The output directory receives ``summary.json`` (``eval_mean_return`` / ``eval_std_return``
over deterministic evaluation episodes, ``env_steps``, ``wall_seconds``, ``algo``, ``env``,
``seed``, the full config), ``metrics.jsonl`` (one line per log point, ``step`` = env steps)
and ``learning_curve.png``. Hyper-parameters default to the per-env presets in
``PPO_PRESETS`` / ``TRPO_PRESETS`` / ``REINFORCE_PRESETS`` / ``TABULAR_PRESETS``; ``--set`` overrides
any config field (values parsed as JSON when possible: ``--set hidden=[32,32]``).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

ALGOS = ("td", "q_learning", "reinforce", "ppo", "trpo")

#: Budget used when ``--total-steps`` is not given, per (algo, env); else per algo.
DEFAULT_STEPS: dict[tuple[str, str], int] = {
    ("ppo", "Pendulum-v1"): 200_000,
    ("reinforce", "Pendulum-v1"): 200_000,
}
DEFAULT_STEPS_PER_ALGO = {"td": 300_000, "q_learning": 20_000, "reinforce": 100_000, "ppo": 100_000,
                          "trpo": 100_000}
DEFAULT_ENV = {"td": "trustrl/Maze-v0", "q_learning": "trustrl/Maze-v0", "reinforce": "CartPole-v1",
               "ppo": "CartPole-v1", "trpo": "CartPole-v1"}


@dataclass
class TabularConfig:
    """Knobs of the tabular algorithms (``td``: TD(0) evaluation of the uniform random policy;
    ``q_learning``: epsilon-greedy Q-learning)."""

    gamma: float = 0.99
    alpha: float = 0.5               # q_learning step size (constant)
    alpha_power: float = 0.8         # td step size n(s)^-alpha_power (Robbins-Monro for 0.5 < p <= 1)
    epsilon: float = 0.1
    q_init: float = 0.0
    eval_episodes: int = 10
    log_every: int = 0
    env_kwargs: dict[str, Any] | None = None


#: Keyed by (algo, env id).
TABULAR_PRESETS: dict[tuple[str, str], dict[str, Any]] = {
    ("q_learning", "trustrl/Maze-v0"): dict(gamma=0.99, alpha=0.5, epsilon=0.2),
    ("td", "trustrl/Maze-v0"): dict(gamma=0.9, alpha_power=0.6),
    ("q_learning", "trustrl/MazeRobot-v0"): dict(gamma=0.99, alpha=0.5, epsilon=0.2),
    ("td", "trustrl/MazeRobot-v0"): dict(gamma=0.9, alpha_power=0.6),
}


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        low = text.lower()
        if low in ("true", "false"):
            return low == "true"
        if low in ("none", "null"):
            return None
        return text


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"trustrl classic: --set expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        val = _parse_value(v)
        if k == "hidden" and isinstance(val, list):
            val = tuple(int(x) for x in val)
        out[k.strip().replace("-", "_")] = val
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="trustrl classic",
        description="Classic RL on Gymnasium envs: tabular TD(0) / Q-learning on the maze, "
                    "REINFORCE, PPO and TRPO on classic control.",
    )
    p.add_argument("--algo", choices=ALGOS, required=True)
    p.add_argument("--env", default=None, help="Gymnasium env id (default: trustrl/Maze-v0 for td/"
                   "q_learning, CartPole-v1 otherwise)")
    p.add_argument("--total-steps", type=int, default=None, help="environment steps (default per algo/env)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", default=None, help="run directory (default runs/classic/ALGO_ENV_sSEED)")
    p.add_argument("--eval-episodes", type=int, default=None, help="deterministic evaluation episodes (>= 10 recommended)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (repeatable)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--quiet", action="store_true")
    return p


def _tabular_config(algo: str, env_id: str, overrides: Mapping[str, Any]) -> TabularConfig:
    from trustrl.classic.common import apply_overrides

    cfg = apply_overrides(TabularConfig(), TABULAR_PRESETS.get((algo, env_id), {}))
    return apply_overrides(cfg, overrides)


def run_tabular(algo: str, env_id: str, total_steps: int, seed: int, output_dir: str | None,
                cfg: TabularConfig) -> dict[str, Any]:
    import gymnasium as gym

    from trustrl.classic.common import RunOutputs, config_dict, make_summary
    from trustrl.classic import tabular

    env = gym.make(env_id, **(cfg.env_kwargs or {}))
    raw = env.unwrapped
    if not (isinstance(raw.observation_space, gym.spaces.Discrete) and isinstance(raw.action_space, gym.spaces.Discrete)):
        raise SystemExit(f"trustrl classic: --algo {algo} needs Discrete observations and actions; "
                         f"{env_id} has {raw.observation_space} / {raw.action_space}")
    out = RunOutputs(output_dir)
    log_every = cfg.log_every or max(1, total_steps // 100)
    window: list[tuple[float, int]] = []
    last = [0]

    def on_episode(step: int, ret: float, length: int) -> None:
        window.append((ret, length))
        if step - last[0] >= log_every:
            out.log(step, {"episode/return_mean": float(np.mean([w[0] for w in window])),
                           "episode/length_mean": float(np.mean([w[1] for w in window])),
                           "episode/count": float(len(window))})
            window.clear()
            last[0] = step

    n_s, n_a = raw.observation_space.n, raw.action_space.n
    extra: dict[str, Any] = {}
    if algo == "td":
        policy = tabular.uniform_policy(n_s, n_a)
        res = tabular.td0_evaluation(env, policy, total_steps=total_steps, gamma=cfg.gamma,
                                     alpha=lambda n, p=cfg.alpha_power: n ** -p, seed=seed, on_episode=on_episode)
        rng = np.random.default_rng(seed + 10_000)

        def act(s: int) -> int:
            return int(rng.integers(n_a))  # the evaluated (uniform random) policy

        extra["eval_policy"] = "uniform_random (the policy TD(0) evaluates)"
        extra["values"] = [float(x) for x in res.table]
        if hasattr(raw, "transition_table"):
            exact = tabular.exact_policy_evaluation(*raw.transition_table(), policy, cfg.gamma)
            extra["value_max_abs_error"] = float(np.max(np.abs(exact - res.table)))
            extra["value_mean_abs_error"] = float(np.mean(np.abs(exact - res.table)))
    else:
        res = tabular.q_learning(env, total_steps=total_steps, gamma=cfg.gamma, alpha=cfg.alpha,
                                 epsilon=cfg.epsilon, q_init=cfg.q_init, seed=seed, on_episode=on_episode)
        q = res.table

        def act(s: int) -> int:
            return int(np.argmax(q[s]))

        extra["eval_policy"] = "greedy w.r.t. Q"
        path, _, reached = tabular.greedy_rollout(env, q)
        extra["greedy_path_length"] = len(path) - 1 if reached else None
        if hasattr(raw, "shortest_path_lengths"):
            extra["shortest_path_length"] = int(raw.shortest_path_lengths()[raw.start])
    # deterministic evaluation episodes (for td: the evaluated random policy)
    returns = []
    for i in range(cfg.eval_episodes):
        s, _ = env.reset(seed=seed + 10_000 + i)
        total, done = 0.0, False
        while not done:  # the env's TimeLimit ends a policy that never reaches an exit
            s, r, term, trunc, _ = env.step(act(s))
            total += r
            done = term or trunc
        returns.append(total)
    env.close()
    out.log(res.env_steps, {"eval/return_mean": float(np.mean(returns))})
    summary = make_summary(algo, env_id, seed, res.env_steps, res.wall_seconds, returns, config_dict(cfg),
                           episodes=len(res.episode_returns), **extra)
    return out.finish(summary)


def run(algo: str, env_id: str | None = None, total_steps: int | None = None, seed: int = 0,
        output_dir: str | None = None, overrides: Mapping[str, Any] | None = None,
        eval_episodes: int | None = None) -> dict[str, Any]:
    """Programmatic entry: the same as the command line; returns the summary dict."""
    import trustrl.classic  # noqa: F401  (registers trustrl/Maze-v0)

    if algo not in ALGOS:
        raise ValueError(f"trustrl.classic.cli.run: algo {algo!r} not in {ALGOS}")
    if total_steps is not None and (isinstance(total_steps, bool) or not isinstance(total_steps, int)
                                    or total_steps <= 0):
        raise ValueError(f"total_steps must be a positive number of environment steps, got {total_steps!r}")
    env_id = env_id or DEFAULT_ENV[algo]
    steps = total_steps or DEFAULT_STEPS.get((algo, env_id), DEFAULT_STEPS_PER_ALGO[algo])
    ov = dict(overrides or {})
    if eval_episodes is not None:
        ov["eval_episodes"] = eval_episodes
    if algo in ("td", "q_learning"):
        return run_tabular(algo, env_id, steps, seed, output_dir, _tabular_config(algo, env_id, ov))
    trainer = make_trainer(algo, env_id, seed, ov)
    return trainer.train(steps, output_dir)


def resolve_config(algo: str, env_id: str, overrides: Mapping[str, Any] | None = None) -> Any:
    """The config object ``algo`` would use on ``env_id``."""
    if algo == "ppo":
        from trustrl.classic.ppo import ppo_config_for
        return ppo_config_for(env_id, overrides)
    if algo == "trpo":
        from trustrl.classic.trpo import trpo_config_for
        return trpo_config_for(env_id, overrides)
    if algo == "reinforce":
        from trustrl.classic.reinforce import reinforce_config_for
        return reinforce_config_for(env_id, overrides)
    return _tabular_config(algo, env_id, overrides or {})


def make_trainer(algo: str, env_id: str, seed: int = 0, overrides: Mapping[str, Any] | None = None):
    cfg = resolve_config(algo, env_id, overrides)
    if algo == "ppo":
        from trustrl.classic.ppo import PPO
        return PPO(env_id, cfg, seed)
    if algo == "trpo":
        from trustrl.classic.trpo import TRPO
        return TRPO(env_id, cfg, seed)
    if algo == "reinforce":
        from trustrl.classic.reinforce import REINFORCE
        return REINFORCE(env_id, cfg, seed)
    raise ValueError(f"trustrl.classic.cli.make_trainer: {algo!r} is not a policy-gradient algo")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    from gymnasium import error as gym_error

    import trustrl.classic  # noqa: F401

    env_id = args.env or DEFAULT_ENV[args.algo]
    try:
        overrides = parse_overrides(args.set)
        if args.print_config:
            from trustrl.classic.common import config_dict
            ov = dict(overrides)
            if args.eval_episodes is not None:
                ov["eval_episodes"] = args.eval_episodes
            print(json.dumps(config_dict(resolve_config(args.algo, env_id, ov)), indent=2))
            return 0
        out_dir = args.output_dir or f"runs/classic/{args.algo}_{env_id.replace('/', '_')}_s{args.seed}"
        summary = run(args.algo, env_id, args.total_steps, args.seed, out_dir, overrides, args.eval_episodes)
    except (ValueError, gym_error.Error) as err:  # bad config key / value, unknown env: one line
        print(f"trustrl classic: error: {err}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(f"{summary['algo']} on {summary['env']} (seed {summary['seed']}): eval return "
              f"{summary['eval_mean_return']:.2f} +- {summary['eval_std_return']:.2f} over "
              f"{summary['eval_episodes']} episodes; {summary['env_steps']} env steps in "
              f"{summary['wall_seconds']:.1f} s -> {out_dir}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
