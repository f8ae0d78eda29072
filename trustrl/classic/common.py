"""Shared machinery of the classic trainers: vectorised envs, normalisers, evaluation,
run outputs (``metrics.jsonl``, ``summary.json``, learning-curve PNG).

Vectorised stepping is our own small loop over ``gym.make`` envs (no subprocesses: these
envs step in microseconds, so process pipes would cost more than they save). It resets an
env in the *same* step that ends its episode and returns the true final observation
separately, which is what GAE needs to bootstrap through a time-limit truncation:

    obs_next[i]  -- the observation to act on next (the reset observation if env i finished)
    final_obs[i] -- s_{t+1} of the transition just taken (the last observation of the
                    finished episode, or obs_next[i] if it did not finish)
"""

from __future__ import annotations

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

from trustrl.logging import MetricsLogger, write_json_atomic


# ----------------------------------------------------------------------------- vector env
def encode_obs_batch(space: gym.Space, obs: Sequence[Any]) -> np.ndarray:
    """Stack observations into float32 ``[N, D]``: one-hot for ``Discrete``, flattened ``Box``."""
    if isinstance(space, gym.spaces.Discrete):
        out = np.zeros((len(obs), int(space.n)), dtype=np.float32)
        out[np.arange(len(obs)), np.asarray(obs, dtype=np.int64) - int(space.start)] = 1.0
        return out
    return np.asarray(obs, dtype=np.float32).reshape(len(obs), -1)


class VecEnv:
    """``n`` copies of a Gymnasium env stepped in lockstep, same-step autoreset.

    ``step(actions)`` returns ``(obs_next, rewards, terminated, truncated, final_obs)`` as
    numpy arrays (``[N, D]`` float32, ``[N]`` float64, ``[N]`` bool, ``[N]`` bool,
    ``[N, D]`` float32). Undiscounted raw episode returns/lengths of episodes that ended are
    appended to ``self.finished_returns`` / ``self.finished_lengths`` (drain them yourself).
    ``Box`` actions are clipped to the action bounds here; the caller keeps the unclipped
    sample for its log-probabilities.
    """

    def __init__(self, env_id: str, n: int, seed: int, env_kwargs: Mapping[str, Any] | None = None) -> None:
        if n < 1:
            raise ValueError("common.VecEnv: need n >= 1 envs")
        self.env_id = env_id
        # disable_env_checker: the passive checker re-validates every step; our envs are
        # checked once in the tests instead.
        self.envs = [gym.make(env_id, disable_env_checker=True, **dict(env_kwargs or {})) for _ in range(n)]
        self.n = n
        self.seed = seed
        self.observation_space = self.envs[0].observation_space
        self.action_space = self.envs[0].action_space
        box = isinstance(self.action_space, gym.spaces.Box)
        self._low = self.action_space.low if box else None
        self._high = self.action_space.high if box else None
        self._ret = np.zeros(n)
        self._len = np.zeros(n, dtype=np.int64)
        self.finished_returns: list[float] = []
        self.finished_lengths: list[int] = []
        for i, env in enumerate(self.envs):
            env.action_space.seed(seed + i)

    def reset(self) -> np.ndarray:
        obs = [env.reset(seed=self.seed + i)[0] for i, env in enumerate(self.envs)]
        self._ret[:] = 0.0
        self._len[:] = 0
        return encode_obs_batch(self.observation_space, obs)

    def step(self, actions: np.ndarray):
        if self._low is not None:
            actions = np.clip(actions, self._low, self._high)
        n = self.n
        rewards = np.empty(n)
        terminated = np.zeros(n, dtype=bool)
        truncated = np.zeros(n, dtype=bool)
        next_raw: list[Any] = [None] * n
        final_raw: list[Any] = [None] * n
        for i, env in enumerate(self.envs):
            o, r, term, trunc, _ = env.step(actions[i])
            rewards[i] = r
            final_raw[i] = o
            if term or trunc:
                terminated[i], truncated[i] = term, trunc
                self.finished_returns.append(float(self._ret[i] + r))
                self.finished_lengths.append(int(self._len[i] + 1))
                self._ret[i] = 0.0
                self._len[i] = 0
                o, _ = env.reset()
            else:
                self._ret[i] += r
                self._len[i] += 1
            next_raw[i] = o
        obs_next = encode_obs_batch(self.observation_space, next_raw)
        done = terminated | truncated
        final_obs = encode_obs_batch(self.observation_space, final_raw) if done.any() else obs_next
        return obs_next, rewards, terminated, truncated, final_obs

    def drain_episodes(self) -> tuple[list[float], list[int]]:
        r, l = self.finished_returns, self.finished_lengths
        self.finished_returns, self.finished_lengths = [], []
        return r, l

    def close(self) -> None:
        for env in self.envs:
            env.close()


# ---------------------------------------------------------------------------- normalisers
class RunningMeanStd:
    """Running mean / population variance merged batch by batch (Chan, Golub & LeVeque 1979)."""

    def __init__(self, shape: tuple[int, ...] = (), eps: float = 1e-4) -> None:
        self.mean = np.zeros(shape)
        self.var = np.ones(shape)
        self.count = eps

    def update(self, x: np.ndarray) -> None:
        b_mean, b_var, b_n = x.mean(axis=0), x.var(axis=0), x.shape[0]
        delta = b_mean - self.mean
        tot = self.count + b_n
        self.mean = self.mean + delta * b_n / tot
        m2 = self.var * self.count + b_var * b_n + delta**2 * self.count * b_n / tot
        self.var = m2 / tot
        self.count = tot


class ObsNormalizer:
    """``clip((o - mean) / sqrt(var + eps), -clip, clip)`` with running statistics.

    ``update=True`` during training rollouts; evaluation uses the frozen statistics.
    Disabled (identity) when ``enabled`` is False.
    """

    def __init__(self, dim: int, enabled: bool, clip: float = 10.0, eps: float = 1e-8) -> None:
        self.enabled = enabled
        self.rms = RunningMeanStd((dim,))
        self.clip = clip
        self.eps = eps

    def __call__(self, obs: np.ndarray, update: bool = False) -> np.ndarray:
        if not self.enabled:
            return obs
        if update:
            self.rms.update(obs)
        z = (obs - self.rms.mean) / np.sqrt(self.rms.var + self.eps)
        return np.clip(z, -self.clip, self.clip).astype(np.float32)


class RewardScaler:
    """Divide rewards by the running std of the discounted return, then clip.

    Keeps ``G_i <- gamma G_i + r_i`` per env (reset to 0 when env i's episode ends) and
    returns ``clip(r / sqrt(Var[G] + eps), -clip, clip)`` -- the scaling of Engstrom et al.
    2020 ("Implementation Matters in Deep Policy Gradients"). Identity when disabled.
    """

    def __init__(self, n_envs: int, gamma: float, enabled: bool, clip: float = 10.0, eps: float = 1e-8) -> None:
        self.enabled = enabled
        self.gamma = gamma
        self.ret = np.zeros(n_envs)
        self.rms = RunningMeanStd(())
        self.clip = clip
        self.eps = eps

    def __call__(self, rewards: np.ndarray, done: np.ndarray) -> np.ndarray:
        if not self.enabled:
            return rewards
        self.ret = self.ret * self.gamma + rewards
        self.rms.update(self.ret)
        self.ret[done] = 0.0
        return np.clip(rewards / math.sqrt(float(self.rms.var) + self.eps), -self.clip, self.clip)


# ------------------------------------------------------------------------------ evaluation
@torch.inference_mode()
def evaluate_policy(
    env_id: str,
    act_fn: Callable[[np.ndarray], np.ndarray],
    n_episodes: int = 10,
    seed: int = 10_000,
    env_kwargs: Mapping[str, Any] | None = None,
) -> list[float]:
    """Run ``n_episodes`` episodes in parallel (one env each), return their undiscounted returns.

    ``act_fn(obs [k, D] float32) -> actions [k, ...]`` should be deterministic for a
    deterministic evaluation (argmax / Gaussian mean). Env ``i`` is seeded ``seed + i``.
    """
    envs = [gym.make(env_id, disable_env_checker=True, **dict(env_kwargs or {})) for _ in range(n_episodes)]
    space = envs[0].observation_space
    box = isinstance(envs[0].action_space, gym.spaces.Box)
    low, high = (envs[0].action_space.low, envs[0].action_space.high) if box else (None, None)
    raw = [env.reset(seed=seed + i)[0] for i, env in enumerate(envs)]
    returns = np.zeros(n_episodes)
    alive = list(range(n_episodes))
    while alive:
        acts = act_fn(encode_obs_batch(space, [raw[i] for i in alive]))
        if box:
            acts = np.clip(acts, low, high)
        still = []
        for k, i in enumerate(alive):
            o, r, term, trunc, _ = envs[i].step(acts[k])
            returns[i] += r
            raw[i] = o
            if not (term or trunc):
                still.append(i)
        alive = still
    for env in envs:
        env.close()
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


# ------------------------------------------------------------------------- flat parameters
class FlatParams:
    """Re-home the parameters of ``modules`` (and their gradients) into one contiguous buffer.

    After construction every ``p`` is a view into ``self.flat`` and ``p.grad`` a view into
    ``self.flat.grad``; backward accumulates into those views in place. An optimizer over
    ``[self.flat]`` then updates all parameters with a handful of tensor ops instead of a
    handful *per parameter tensor* -- for 64x64 MLPs that per-tensor overhead is most of
    the optimizer's time. Zero gradients with :meth:`zero_grad` (never ``set_to_none``).
    """

    def __init__(self, modules: Sequence[torch.nn.Module]) -> None:
        self.params = [p for m in modules for p in m.parameters()]
        total = sum(p.numel() for p in self.params)
        self.flat = torch.nn.Parameter(torch.empty(total))
        self.flat.grad = torch.zeros(total)
        off = 0
        with torch.no_grad():
            for p in self.params:
                n = p.numel()
                self.flat[off:off + n].copy_(p.reshape(-1))
                p.data = self.flat.data[off:off + n].view_as(p)
                p.grad = self.flat.grad[off:off + n].view_as(p)
                off += n

    def zero_grad(self) -> None:
        self.flat.grad.zero_()

    def adam(self, lr: float, eps: float) -> "FlatAdam | torch.optim.Optimizer":
        """Adam over the flat buffer: :class:`FlatAdam` (the fused kernel, called directly)
        where this torch build has it, else ``torch.optim.Adam``. Both expose
        ``param_groups[0]["lr"]`` and ``step()``, which is all the trainers use."""
        if FlatAdam.available():
            return FlatAdam(self.flat, lr=lr, eps=eps)
        try:
            return torch.optim.Adam([self.flat], lr=lr, eps=eps, fused=True)
        except (RuntimeError, TypeError, ValueError):  # fused unsupported on this build/device
            return torch.optim.Adam([self.flat], lr=lr, eps=eps)

    def clip_grad_norm_(self, max_norm: float) -> float:
        """Scale the gradient to norm ``<= max_norm`` (as ``torch.nn.utils.clip_grad_norm_``);
        returns the norm before clipping."""
        g = self.flat.grad
        norm = float(torch.linalg.vector_norm(g))
        if norm > max_norm:
            g.mul_(max_norm / (norm + 1e-6))
        return norm


class FlatAdam:
    """Adam (Kingma & Ba 2015; no weight decay, no amsgrad) on one flat parameter tensor,
    bit-identical to ``torch.optim.Adam([flat], lr, eps=eps, fused=True)``.

    It calls the same fused kernel (``torch._fused_adam_``) with the same arguments, minus
    ``Optimizer.step``'s generic machinery (hooks, profiler regions, grouping tensors by
    device and dtype), which costs ~100-150 us per step: as much as the whole backward pass
    of a small MLP, on the ~8k tiny steps of a CartPole PPO run. ``param_groups[0]["lr"]``
    is read at every step, so learning-rate schedules work as with a torch optimizer.
    """

    def __init__(self, param: torch.Tensor, lr: float, eps: float = 1e-8,
                 betas: tuple[float, float] = (0.9, 0.999)) -> None:
        if param.grad is None:
            raise ValueError("common.FlatAdam: the parameter needs a .grad buffer")
        self.param = param
        self.param_groups: list[dict[str, Any]] = [dict(lr=lr, betas=betas, eps=eps)]
        self.exp_avg = torch.zeros_like(param, memory_format=torch.preserve_format)
        self.exp_avg_sq = torch.zeros_like(param, memory_format=torch.preserve_format)
        self.step_count = torch.zeros((), dtype=torch.float32, device=param.device)

    @staticmethod
    def available() -> bool:
        return hasattr(torch, "_fused_adam_")

    @torch.no_grad()
    def step(self) -> None:
        g = self.param_groups[0]
        beta1, beta2 = g["betas"]
        self.step_count.add_(1)
        torch._fused_adam_([self.param], [self.param.grad], [self.exp_avg], [self.exp_avg_sq], [],
                           [self.step_count], amsgrad=False, lr=float(g["lr"]), beta1=beta1, beta2=beta2,
                           weight_decay=0.0, eps=g["eps"], maximize=False, grad_scale=None, found_inf=None)


# --------------------------------------------------------------------------------- rollouts
class Rollout:
    """Time-major on-policy batch from :func:`collect_rollout`; all tensors ``[T, N, ...]``.

    ``next_values[t]`` is ``V(s_{t+1})`` of the *true* next state: for a step that ended in a
    time-limit truncation it is the value of the final observation of that episode (we
    bootstrap through truncation); for a termination it is irrelevant (GAE multiplies it by
    ``1 - terminated``); otherwise it is the value of the next observation.
    """

    def __init__(self, obs, actions, logp, values, next_values, rewards, terminated, done) -> None:
        self.obs = obs
        self.actions = actions
        self.logp = logp
        self.values = values
        self.next_values = next_values
        self.rewards = rewards
        self.terminated = terminated
        self.done = done

    @staticmethod
    def flat(x: torch.Tensor) -> torch.Tensor:
        """``[T, N, ...] -> [T*N, ...]``."""
        return x.reshape(-1, *x.shape[2:])


def collect_rollout(
    vec: VecEnv,
    actor: torch.nn.Module,
    critic: torch.nn.Module,
    obs_raw: np.ndarray,
    n_steps: int,
    obs_norm: ObsNormalizer,
    reward_scaler: RewardScaler,
    rng: np.random.Generator,
) -> tuple[Rollout, np.ndarray]:
    """Step ``vec`` for ``n_steps`` with ``actor``'s stochastic policy, recording everything
    GAE needs. Returns ``(rollout, obs_raw_next)``; ``obs_raw`` is the current raw obs.

    Acting happens in numpy (:meth:`numpy_policy` / :meth:`numpy_value` share the torch
    weights): per step one ``[N, D]`` forward of each network, no autograd, no torch
    dispatch; the buffers become tensors once, at the end.
    """
    n = vec.n
    policy = actor.numpy_policy()
    value_fn = critic.numpy_value()
    obs_buf = np.zeros((n_steps, n, obs_raw.shape[1]), dtype=np.float32)
    act_buf = (np.zeros((n_steps, n), dtype=np.int64) if actor.discrete
               else np.zeros((n_steps, n, int(vec.action_space.shape[0])), dtype=np.float32))
    logp_buf = np.zeros((n_steps, n), dtype=np.float32)
    val_buf = np.zeros((n_steps + 1, n), dtype=np.float32)
    rew_buf = np.zeros((n_steps, n), dtype=np.float32)
    term_buf = np.zeros((n_steps, n), dtype=bool)
    done_buf = np.zeros((n_steps, n), dtype=bool)
    trunc_fix: list[tuple[int, np.ndarray, np.ndarray]] = []
    obs_n = obs_norm(obs_raw, update=True)
    for t in range(n_steps):
        obs_buf[t] = obs_n
        action, logp = policy(obs_n, rng)
        val_buf[t] = value_fn(obs_n)
        act_buf[t] = action
        logp_buf[t] = logp
        obs_raw, rew, term, trunc, final_raw = vec.step(action)
        done = term | trunc
        rew_buf[t] = reward_scaler(rew, done)
        term_buf[t] = term
        done_buf[t] = done
        obs_n = obs_norm(obs_raw, update=True)
        if trunc.any():
            # bootstrap through the time limit from the final observation's value
            idx = np.flatnonzero(trunc)
            trunc_fix.append((t, idx, value_fn(obs_norm(final_raw[idx], update=False))))
    val_buf[n_steps] = value_fn(obs_n)
    next_val = val_buf[1:].copy()
    for t, idx, v in trunc_fix:
        next_val[t, idx] = v
    ro = Rollout(
        torch.from_numpy(obs_buf), torch.from_numpy(act_buf), torch.from_numpy(logp_buf),
        torch.from_numpy(val_buf[:n_steps].copy()), torch.from_numpy(next_val), torch.from_numpy(rew_buf),
        torch.from_numpy(term_buf), torch.from_numpy(done_buf),
    )
    return ro, obs_raw


# ------------------------------------------------------------------------ the shared loop
class OnPolicyTrainer:
    """What REINFORCE, PPO and TRPO share: envs, actor, critic, normalisers, the outer loop.

    Subclasses set ``algo`` and implement ``update(rollout, progress_remaining) -> metrics``.
    ``cfg`` must have the fields ``n_envs, n_steps, gamma, hidden, activation, log_std_init,
    normalize_obs, normalize_reward, clip_obs, clip_reward, eval_episodes, eval_every,
    log_every, threads, env_kwargs``.
    """

    algo = "on-policy"

    def __init__(self, env_id: str, cfg: Any, seed: int = 0) -> None:
        from trustrl.classic.policies import Critic, flat_obs_dim, make_actor

        self.env_id = env_id
        self.cfg = cfg
        self.seed = seed
        c = cfg
        set_seed(seed, c.threads)
        self.vec = VecEnv(env_id, c.n_envs, seed, c.env_kwargs)
        obs_dim = flat_obs_dim(self.vec.observation_space)
        self.actor = make_actor(self.vec.observation_space, self.vec.action_space, c.hidden,
                                c.activation, c.log_std_init)
        self.critic = Critic(obs_dim, c.hidden, c.activation)
        self.obs_norm = ObsNormalizer(obs_dim, c.normalize_obs, c.clip_obs)
        self.rew_scaler = RewardScaler(c.n_envs, c.gamma, c.normalize_reward, c.clip_reward)
        self.rng = np.random.default_rng(seed)  # action sampling during rollouts

    def act_deterministic(self, obs: np.ndarray) -> np.ndarray:
        """Greedy action (argmax / Gaussian mean) for raw observations ``[k, D]``."""
        with torch.inference_mode():
            o = torch.from_numpy(self.obs_norm(obs, update=False))
            return self.actor.mode(self.actor(o)).numpy()

    def evaluate(self, n_episodes: int | None = None, seed: int | None = None) -> list[float]:
        """Deterministic returns of ``n_episodes`` fresh episodes (seeds ``10000 + seed + i``)."""
        return evaluate_policy(self.env_id, self.act_deterministic, n_episodes or self.cfg.eval_episodes,
                               seed=(10_000 + self.seed) if seed is None else seed,
                               env_kwargs=self.cfg.env_kwargs)

    def update(self, ro: Rollout, progress_remaining: float) -> dict[str, float]:
        raise NotImplementedError

    def train(self, total_steps: int, output_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
        """Run ``total_steps // (n_envs * n_steps)`` updates (at least one), evaluate, write
        the run directory, return the summary dict."""
        c = self.cfg
        out = RunOutputs(output_dir)
        per_update = c.n_envs * c.n_steps
        n_updates = max(1, total_steps // per_update)
        log_every = c.log_every or max(per_update, (n_updates * per_update) // 100)
        timer = Timer()
        obs_raw = self.vec.reset()
        env_steps, last_log, last_eval = 0, 0, 0
        recent_r: list[float] = []
        recent_l: list[int] = []
        for update in range(n_updates):
            ro, obs_raw = collect_rollout(self.vec, self.actor, self.critic, obs_raw, c.n_steps,
                                          self.obs_norm, self.rew_scaler, self.rng)
            env_steps += per_update
            metrics = self.update(ro, 1.0 - update / n_updates)
            r, l = self.vec.drain_episodes()
            recent_r += r
            recent_l += l
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
        train_seconds = timer()
        ev = self.evaluate()
        wall = timer()
        out.log(env_steps, {"eval/return_mean": float(np.mean(ev)), "eval/return_std": float(np.std(ev))})
        self.vec.close()
        summary = make_summary(self.algo, self.env_id, self.seed, env_steps, wall, ev, config_dict(c),
                               train_seconds=train_seconds)
        return out.finish(summary)
