"""What the classic policy-gradient trainers (REINFORCE, PPO, TRPO) share: Gymnasium vector
envs with Gymnasium's own wrappers, the rollout, minibatches, evaluation, the outer loop and
the run directory (``metrics.jsonl``, ``summary.json``, learning-curve PNG).

The math (GAE, losses, the trust-region step) is not here: it lives in
:mod:`trustrl.advantages`, :mod:`trustrl.losses` and :mod:`trustrl.trpo`, shared with the
language-model trainers.

Environments (:func:`make_vec_env`) are ``gymnasium.vector.SyncVectorEnv`` in its
``NEXT_STEP`` autoreset mode, the default of gymnasium >= 1.0 and the only mode that
Gymnasium's ``NormalizeObservation`` vector wrapper accepts (see
https://farama.org/Vector-Autoreset-Mode). When env ``i``'s episode ends at step ``t``:

* step ``t`` returns the episode's *final* observation with ``terminated`` or ``truncated``;
* step ``t + 1`` ignores env ``i``'s action, resets it and returns the new episode's first
  observation with reward 0 and both flags False. This *autoreset step* is no transition of
  the MDP: :func:`collect_rollout` marks it ``valid = False`` and every trainer leaves it out
  of its losses.

So ``obs[t + 1]`` is always the true next state of transition ``t``, and ``V(obs[t + 1])`` is
what GAE needs: after a time-limit truncation it is the value of the final observation (we
bootstrap through truncation); after a termination GAE multiplies it by 0 (we do not
bootstrap through termination). See ``tests/test_classic_pg.py`` for a hand-worked example.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

import gymnasium as gym
from gymnasium.vector import AutoresetMode, SyncVectorEnv, VectorEnv
from gymnasium.wrappers import vector as vector_wrappers

from trustrl.logging import MetricsLogger, write_json_atomic


# ----------------------------------------------------------------------------- vector env
def make_vec_env(
    env_id: str,
    n_envs: int,
    *,
    gamma: float = 0.99,
    normalize_obs: bool = False,
    normalize_reward: bool = False,
    clip_obs: float = 10.0,
    clip_reward: float = 10.0,
    env_kwargs: Mapping[str, Any] | None = None,
) -> VectorEnv:
    """``n_envs`` copies of ``gym.make(env_id, **env_kwargs)`` in a ``SyncVectorEnv``, wrapped,
    from the inside out, in Gymnasium's vector wrappers:

    1. ``RecordEpisodeStatistics`` -- undiscounted returns and lengths of finished episodes in
       ``info["episode"]`` (on the raw rewards: it sits below the reward normalisation);
    2. ``Discrete`` observations only: ``FlattenObservation`` + ``DtypeObservation`` -- a
       float32 one-hot vector of the state index (the maze);
    3. ``Box`` actions only: ``ClipAction`` -- the env receives the action clipped to its
       bounds; the trainer keeps the unclipped sample for its log-probabilities;
    4. ``normalize_obs``: ``NormalizeObservation`` (running mean / variance over all envs),
       then ``TransformObservation`` clipping to ``[-clip_obs, clip_obs]``;
    5. ``normalize_reward``: ``NormalizeReward(gamma)`` (reward / running std of the
       discounted return; Engstrom et al. 2020), then ``ClipReward`` to ``+-clip_reward``.

    Observations and rewards of 4-5 are what the agent trains on; evaluation reads raw
    returns. Raises ``ValueError`` if the vector env does not use ``NEXT_STEP`` autoreset
    (see the module docstring for why that matters).
    """
    if n_envs < 1:
        raise ValueError(f"common.make_vec_env: need n_envs >= 1, got {n_envs}")
    kwargs = dict(env_kwargs or {})
    envs: VectorEnv = SyncVectorEnv([lambda: gym.make(env_id, **kwargs) for _ in range(n_envs)],
                                    autoreset_mode=AutoresetMode.NEXT_STEP)
    if envs.metadata.get("autoreset_mode") != AutoresetMode.NEXT_STEP:
        raise ValueError(f"common.make_vec_env: {env_id} vector env autoreset mode is "
                         f"{envs.metadata.get('autoreset_mode')}, expected NEXT_STEP")
    envs = vector_wrappers.RecordEpisodeStatistics(envs)
    if isinstance(envs.single_observation_space, gym.spaces.Discrete):
        envs = vector_wrappers.DtypeObservation(vector_wrappers.FlattenObservation(envs), np.float32)
    if isinstance(envs.single_action_space, gym.spaces.Box):
        envs = vector_wrappers.ClipAction(envs)
    if normalize_obs:
        envs = vector_wrappers.NormalizeObservation(envs)
        box = gym.spaces.Box(-clip_obs, clip_obs, envs.single_observation_space.shape, np.float32)
        envs = vector_wrappers.TransformObservation(envs, lambda o: np.clip(o, -clip_obs, clip_obs),
                                                    single_observation_space=box)
    if normalize_reward:
        envs = vector_wrappers.NormalizeReward(envs, gamma=gamma)
        envs = vector_wrappers.ClipReward(envs, -clip_reward, clip_reward)
    return envs


def find_wrapper(envs: VectorEnv, cls: type) -> Any | None:
    """The outermost wrapper of type ``cls`` around ``envs`` (None if there is none)."""
    e: Any = envs
    while e is not None:
        if isinstance(e, cls):
            return e
        e = getattr(e, "env", None)
    return None


@torch.no_grad()
def evaluate_policy(
    env_id: str,
    act_fn: Callable[[np.ndarray], np.ndarray],
    n_episodes: int = 10,
    seed: int = 10_000,
    env_kwargs: Mapping[str, Any] | None = None,
    obs_rms: Any | None = None,
    clip_obs: float = 10.0,
) -> list[float]:
    """Undiscounted returns of ``n_episodes`` episodes, one per env of a fresh vector env.

    ``act_fn(obs [k, D]) -> actions [k, ...]`` sees observations as the trainer's envs give
    them (one-hot for ``Discrete``; normalised with the frozen training statistics
    ``obs_rms`` -- a ``NormalizeObservation.obs_rms`` -- when given, then clipped). It should
    be deterministic for a deterministic evaluation (argmax / Gaussian mean). Env ``i`` is
    seeded ``seed + i``; each env's first episode is counted, whatever it does afterwards.
    """
    envs = make_vec_env(env_id, n_episodes, normalize_obs=obs_rms is not None, clip_obs=clip_obs,
                        env_kwargs=env_kwargs)
    if obs_rms is not None:
        norm = find_wrapper(envs, vector_wrappers.NormalizeObservation)
        norm.obs_rms = copy.deepcopy(obs_rms)
        norm.update_running_mean = False
    obs, _ = envs.reset(seed=seed)
    returns = np.zeros(n_episodes)
    running = np.ones(n_episodes, dtype=bool)
    while running.any():
        obs, reward, terminated, truncated, _ = envs.step(act_fn(obs))
        returns += np.where(running, reward, 0.0)
        running &= ~(terminated | truncated)
    envs.close()
    return returns.tolist()


# --------------------------------------------------------------------------------- outputs
def config_dict(cfg: Any) -> dict[str, Any]:
    """A dataclass config as a JSON-friendly dict (tuples -> lists)."""
    d = asdict(cfg) if is_dataclass(cfg) else dict(cfg)
    return json.loads(json.dumps(d, default=str))


@dataclass
class PolicyRunSettings:
    """The settings every policy-gradient trainer here shares (REINFORCE, PPO, TRPO):
    normalisation, network, optimizer epsilon, evaluation and logging. Each algorithm's
    config adds its own knobs to these."""

    normalize_obs: bool = False
    normalize_reward: bool = False
    clip_obs: float = 10.0
    clip_reward: float = 10.0
    hidden: tuple[int, ...] = (64, 64)
    activation: str = "tanh"
    log_std_init: float = 0.0
    adam_eps: float = 1e-5
    eval_episodes: int = 10
    eval_every: int = 0              # env steps between deterministic evals (0 = only at the end)
    log_every: int = 0               # env steps between metric lines (0 = total/100)
    threads: int = 1                 # torch.set_num_threads
    env_kwargs: dict[str, Any] = field(default_factory=dict)


def preset_config(cfg: Any, presets: Mapping[Any, Mapping[str, Any]], key: Any,
                  overrides: Mapping[str, Any] | None = None) -> Any:
    """``cfg`` with the preset for ``key`` (none: unchanged), then ``overrides``, applied."""
    return apply_overrides(apply_overrides(cfg, presets.get(key, {})), overrides or {})


def apply_overrides(cfg: Any, overrides: Mapping[str, Any]) -> Any:
    """Return a copy of dataclass ``cfg`` with ``overrides`` applied; unknown keys fail loudly."""
    names = {f.name: f for f in fields(cfg)}
    kwargs = {}
    for k, v in overrides.items():
        if k not in names:
            raise ValueError(f"{type(cfg).__name__}: unknown config key {k!r}; known: {sorted(names)}")
        kwargs[k] = v
    return type(cfg)(**{**asdict(cfg), **kwargs})


class RunOutputs:
    """Writes a run directory: ``metrics.jsonl`` (step = env steps), ``summary.json``,
    ``learning_curve.png``. ``output_dir=None`` keeps everything in memory only."""

    def __init__(self, output_dir: str | os.PathLike[str] | None) -> None:
        self.dir = Path(output_dir) if output_dir is not None else None
        self.records: list[dict[str, Any]] = []
        self._logger: MetricsLogger | None = None
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
            metrics = self.dir / "metrics.jsonl"
            if metrics.exists():
                metrics.unlink()  # a fresh run, not a resume
            self._logger = MetricsLogger(self.dir, tensorboard=False)

    def log(self, env_steps: int, metrics: Mapping[str, Any]) -> None:
        rec = {k: (float(v) if v is not None else None) for k, v in metrics.items()}
        self.records.append({"step": int(env_steps), **rec})
        if self._logger is not None:
            self._logger.log(int(env_steps), rec)

    def finish(self, summary: Mapping[str, Any], title: str = "") -> dict[str, Any]:
        summary = dict(summary)
        if self._logger is not None:
            self._logger.close()
        if self.dir is not None:
            png = self.dir / "learning_curve.png"
            plot_learning_curve(self.records, png, title=title or f"{summary.get('algo')} on {summary.get('env')}")
            summary["learning_curve"] = str(png)
            write_json_atomic(self.dir / "summary.json", summary)
        return summary


def make_summary(algo: str, env_id: str, seed: int, env_steps: int, wall_seconds: float,
                 eval_returns: Sequence[float], config: Mapping[str, Any] | None = None,
                 **extra: Any) -> dict[str, Any]:
    r = np.asarray(eval_returns, dtype=np.float64)
    return {
        "algo": algo,
        "env": env_id,
        "seed": int(seed),
        "env_steps": int(env_steps),
        "wall_seconds": float(wall_seconds),
        "eval_episodes": int(r.size),
        "eval_mean_return": float(r.mean()) if r.size else float("nan"),
        "eval_std_return": float(r.std()) if r.size else float("nan"),
        "eval_returns": [float(x) for x in r],
        **extra,
        "config": dict(config or {}),
    }


def plot_learning_curve(records: Sequence[Mapping[str, Any]], path: str | os.PathLike[str],
                        title: str = "", key: str = "episode/return_mean",
                        eval_key: str = "eval/return_mean") -> Path:
    """Training return (and evaluation points, if logged) against env steps, as a PNG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    def series(k: str) -> tuple[list[float], list[float]]:
        xs, ys = [], []
        for rec in records:
            v = rec.get(k)
            if v is not None and math.isfinite(v):
                xs.append(rec["step"])
                ys.append(v)
        return xs, ys

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    x, y = series(key)
    ax.plot(x, y, lw=1.5, label="train episodes (mean return)")
    ex, ey = series(eval_key)
    if ex:
        ax.plot(ex, ey, "o-", ms=3, lw=1, label="deterministic eval")
    ax.set_xlabel("environment steps")
    ax.set_ylabel("episode return")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if x or ex:
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


class Timer:
    """Wall-clock seconds since construction."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t0


def linear_schedule(start: float, progress_remaining: float, end: float = 0.0) -> float:
    """``end + (start - end) * progress_remaining`` with ``progress_remaining`` in [0, 1]."""
    return end + (start - end) * max(0.0, min(1.0, progress_remaining))


def set_seed(seed: int, threads: int = 1) -> None:
    """Seed numpy/torch/python RNGs and pin torch to ``threads`` CPU threads."""
    import random

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if threads > 0:
        torch.set_num_threads(threads)




# --------------------------------------------------------------------------------- rollouts
@dataclass
class Rollout:
    """Time-major on-policy batch from :func:`collect_rollout`; tensors ``[T, N, ...]``.

    ``next_values[t] = V(obs[t + 1])``: the value of the true next state of transition ``t``
    (for a time-limit truncation, the final observation of the episode). ``valid[t]`` is
    False on autoreset steps (the step after an episode ended: not a transition, see the
    module docstring); trainers select the valid samples with :meth:`flat_valid`.
    """

    obs: torch.Tensor          # [T, N, D] float32
    actions: torch.Tensor      # [T, N] int64 or [T, N, d] float32 (unclipped sample)
    logp: torch.Tensor         # [T, N] log pi_old(a_t | s_t)
    values: torch.Tensor       # [T, N] V(s_t)
    next_values: torch.Tensor  # [T, N] V(s_{t+1})
    rewards: torch.Tensor      # [T, N] float32 (normalised when the env wraps it)
    terminated: torch.Tensor   # [T, N] bool
    done: torch.Tensor         # [T, N] bool, terminated | truncated
    valid: torch.Tensor        # [T, N] bool, False on autoreset steps
    episode_returns: list[float] = field(default_factory=list)   # raw, of episodes that ended
    episode_lengths: list[int] = field(default_factory=list)

    def flat_valid(self, x: torch.Tensor) -> torch.Tensor:
        """``[T, N, ...] -> [n_valid, ...]``: the valid samples, time-major order."""
        return x.reshape(-1, *x.shape[2:])[self.valid.reshape(-1)]


@torch.no_grad()
def collect_rollout(
    envs: VectorEnv,
    actor: torch.nn.Module,
    critic: torch.nn.Module,
    obs: torch.Tensor,
    valid: torch.Tensor,
    n_steps: int,
) -> tuple[Rollout, torch.Tensor, torch.Tensor]:
    """Step ``envs`` ``n_steps`` times with ``actor``'s stochastic policy.

    ``obs [N, D]`` is the observation to act on and ``valid [N]`` whether the coming step is
    a real transition (False right after an episode ended). Returns ``(rollout, obs, valid)``
    with the last two to pass to the next call. Values are computed after the loop, in one
    batched forward of the critic over the ``T + 1`` observations.
    """
    n = obs.shape[0]
    obs_buf = torch.empty((n_steps + 1, n, obs.shape[1]))
    actions, logps, valids = [], [], []
    rewards, terminated, truncated = [], [], []   # numpy [N] each, stacked once at the end
    ep_returns: list[float] = []
    ep_lengths: list[int] = []
    for t in range(n_steps):
        obs_buf[t] = obs
        valids.append(valid)
        action, logp = actor.act(obs)
        next_obs, reward, term, trunc, info = envs.step(action.numpy())
        actions.append(action)
        logps.append(logp)
        rewards.append(reward)
        terminated.append(term)
        truncated.append(trunc)
        if "_episode" in info:  # RecordEpisodeStatistics: raw return / length of ended episodes
            ended = info["_episode"]
            ep_returns += info["episode"]["r"][ended].tolist()
            ep_lengths += info["episode"]["l"][ended].tolist()
        obs = torch.as_tensor(next_obs, dtype=torch.float32)
        valid = torch.as_tensor(~(term | trunc))  # the next step of an ended env only resets it
    obs_buf[n_steps] = obs
    v = critic(obs_buf.reshape((n_steps + 1) * n, -1)).reshape(n_steps + 1, n)
    term_t = torch.as_tensor(np.stack(terminated))
    done_t = term_t | torch.as_tensor(np.stack(truncated))
    ro = Rollout(obs=obs_buf[:n_steps], actions=torch.stack(actions), logp=torch.stack(logps),
                 values=v[:n_steps], next_values=v[1:],
                 rewards=torch.as_tensor(np.stack(rewards), dtype=torch.float32),
                 terminated=term_t, done=done_t, valid=torch.stack(valids),
                 episode_returns=ep_returns, episode_lengths=ep_lengths)
    return ro, obs, valid


def minibatches(n: int, minibatch_size: int, generator: torch.Generator | None = None) -> list[torch.Tensor | slice]:
    """A random permutation of ``range(n)`` cut into minibatches of ``minibatch_size``.

    Every sample is in exactly one minibatch; when ``minibatch_size`` does not divide ``n``
    the last minibatch is smaller (``n = 10``, size 4 -> sizes 4, 4, 2), never dropped.
    When one minibatch holds the whole batch the order cannot matter: the result is
    ``[slice(None)]`` (index with it to get the batch itself, no shuffled copy).
    """
    if minibatch_size < 1:
        raise ValueError(f"common.minibatches: minibatch_size must be >= 1, got {minibatch_size}")
    if minibatch_size >= n:
        return [slice(None)]
    return list(torch.randperm(n, generator=generator).split(minibatch_size))


def adam(params: Sequence[torch.nn.Parameter], lr: float, eps: float) -> torch.optim.Adam:
    """``torch.optim.Adam`` with the fused CPU/GPU kernel (one kernel for all parameters)."""
    return torch.optim.Adam(params, lr=lr, eps=eps, fused=True)


# ------------------------------------------------------------------------ the shared loop
class OnPolicyTrainer:
    """What REINFORCE, PPO and TRPO share: envs, actor, critic and the outer loop
    (roll out -> ``update`` -> log, then a deterministic evaluation).

    Subclasses set ``algo`` and implement ``update(rollout, progress_remaining) -> metrics``.
    ``cfg`` must have the fields ``n_envs, n_steps, gamma`` and those of
    :class:`PolicyRunSettings`.
    """

    algo = "on-policy"

    def __init__(self, env_id: str, cfg: Any, seed: int = 0) -> None:
        from trustrl.classic.policies import Critic, flat_obs_dim, make_actor

        self.env_id = env_id
        self.cfg = cfg
        self.seed = seed
        c = cfg
        set_seed(seed, c.threads)
        self.envs = make_vec_env(env_id, c.n_envs, gamma=c.gamma, normalize_obs=c.normalize_obs,
                                 normalize_reward=c.normalize_reward, clip_obs=c.clip_obs,
                                 clip_reward=c.clip_reward, env_kwargs=c.env_kwargs)
        obs_space, act_space = self.envs.single_observation_space, self.envs.single_action_space
        self.actor = make_actor(obs_space, act_space, c.hidden, c.activation, c.log_std_init)
        self.critic = Critic(flat_obs_dim(obs_space), c.hidden, c.activation)

    def act_deterministic(self, obs: np.ndarray) -> np.ndarray:
        """Greedy action (argmax / Gaussian mean) for observations ``[k, D]`` as the envs give them."""
        with torch.no_grad():
            return self.actor.mode(self.actor(torch.as_tensor(obs, dtype=torch.float32))).numpy()

    def evaluate(self, n_episodes: int | None = None, seed: int | None = None) -> list[float]:
        """Deterministic returns of ``n_episodes`` fresh episodes (seeds ``10000 + seed + i``),
        observations normalised with the training statistics, frozen."""
        norm = find_wrapper(self.envs, vector_wrappers.NormalizeObservation)
        return evaluate_policy(self.env_id, self.act_deterministic, n_episodes or self.cfg.eval_episodes,
                               seed=(10_000 + self.seed) if seed is None else seed,
                               env_kwargs=self.cfg.env_kwargs, clip_obs=self.cfg.clip_obs,
                               obs_rms=norm.obs_rms if norm is not None else None)

    def update(self, ro: Rollout, progress_remaining: float) -> dict[str, float]:
        raise NotImplementedError

    def train(self, total_steps: int, output_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
        """Run ``total_steps // (n_envs * n_steps)`` updates (at least one), evaluate, write
        the run directory, return the summary dict. ``env_steps`` counts vector-env steps
        times ``n_envs``, autoreset steps included."""
        c = self.cfg
        out = RunOutputs(output_dir)
        per_update = c.n_envs * c.n_steps
        n_updates = max(1, total_steps // per_update)
        log_every = c.log_every or max(per_update, (n_updates * per_update) // 100)
        timer, cpu0 = Timer(), time.process_time()
        obs_np, _ = self.envs.reset(seed=self.seed)
        obs = torch.as_tensor(obs_np, dtype=torch.float32)
        valid = torch.ones(c.n_envs, dtype=torch.bool)
        env_steps, last_log, last_eval = 0, 0, 0
        recent_r: list[float] = []
        recent_l: list[int] = []
        for update in range(n_updates):
            ro, obs, valid = collect_rollout(self.envs, self.actor, self.critic, obs, valid, c.n_steps)
            env_steps += per_update
            metrics = self.update(ro, 1.0 - update / n_updates)
            recent_r += ro.episode_returns
            recent_l += ro.episode_lengths
            if c.eval_every and env_steps - last_eval >= c.eval_every and update < n_updates - 1:
                metrics["eval/return_mean"] = float(np.mean(self.evaluate()))
                last_eval = env_steps
            if env_steps - last_log >= log_every or update == n_updates - 1 or "eval/return_mean" in metrics:
                metrics["episode/return_mean"] = float(np.mean(recent_r)) if recent_r else None
                metrics["episode/length_mean"] = float(np.mean(recent_l)) if recent_l else None
                metrics["episode/count"] = float(len(recent_r))
                metrics["perf/steps_per_second"] = env_steps / max(timer(), 1e-9)
                out.log(env_steps, metrics)
                recent_r, recent_l = [], []
                last_log = env_steps
        train_seconds, train_cpu_seconds = timer(), time.process_time() - cpu0
        ev = self.evaluate()
        wall = timer()
        out.log(env_steps, {"eval/return_mean": float(np.mean(ev)), "eval/return_std": float(np.std(ev))})
        self.envs.close()
        summary = make_summary(self.algo, self.env_id, self.seed, env_steps, wall, ev, config_dict(c),
                               train_seconds=train_seconds, train_cpu_seconds=train_cpu_seconds)
        return out.finish(summary)
