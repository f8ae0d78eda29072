"""PPO with a clipped surrogate for classic control (Schulman et al. 2017, arXiv 1707.06347).

Recipe of one update (numbered as in :meth:`PPO.train`):

1. Roll out ``n_envs x n_steps`` transitions with the current stochastic policy
   (:func:`~trustrl.classic.common.collect_rollout`; observation / reward normalisation for
   continuous control).
2. GAE(gamma, lambda) with :func:`trustrl.advantages.gae_time_major`: no bootstrap through
   termination, bootstrap through time-limit truncation from the final observation's value.
3. Whiten the advantages over the batch (:func:`trustrl.advantages.whiten`); then
   ``n_epochs`` passes over shuffled minibatches, each minimising
   ``L = policy_loss + vf_coef * value_loss - ent_coef * entropy`` with
   :func:`trustrl.losses.policy_loss` (clipped ratio) and :func:`trustrl.losses.value_loss`
   (optionally clipped around the rollout values), global grad-norm clipping, Adam.
4. Anneal the learning rate (and optionally the clip range) linearly to 0.

Per-sample classic losses use the library's ``[B, T]`` signatures with ``T = 1`` and an
all-True mask. Departures from the paper: none beyond the common implementation details
(Huang et al. 2022, "The 37 Implementation Details of PPO"): orthogonal init, Adam eps 1e-5,
advantages whitened per batch (SB3 and CleanRL whiten per minibatch; identical when
the batch is one minibatch, as in the CartPole preset), optional early stop on ``approx_kl > target_kl``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from trustrl.advantages import gae_time_major, whiten
from trustrl.losses import explained_variance, policy_loss, value_loss
from trustrl.classic.common import FlatParams, OnPolicyTrainer, PolicyRunSettings, linear_schedule, preset_config


@dataclass
class PPOConfig(PolicyRunSettings):
    """Every knob of :class:`PPO`; presets per env live in :data:`PPO_PRESETS`."""

    n_envs: int = 8                  # parallel envs in the rollout
    n_steps: int = 128               # steps per env per rollout (batch = n_envs * n_steps)
    n_epochs: int = 10               # passes over the batch per update
    minibatch_size: int = 256        # samples per gradient step
    gamma: float = 0.99
    gae_lambda: float = 0.95
    lr: float = 3e-4
    anneal_lr: bool = True           # linear to 0 over the run
    clip_range: float = 0.2
    anneal_clip: bool = False        # linear to 0 over the run (zoo's lin_0.2)
    clip_range_vf: float | None = None   # value clipping around the rollout values (None = off)
    vf_coef: float = 0.5
    ent_coef: float = 0.0
    max_grad_norm: float = 0.5
    target_kl: float | None = None   # stop the epochs early when approx KL exceeds this


#: Defaults per env id: ``--algo ppo --env ID`` with nothing else reproduces the numbers in
#: bench/CLASSIC_RESULTS.md. CartPole follows rl-baselines3-zoo (8 x 32, 20 epochs, lambda 0.8,
#: gamma 0.98, lr and clip linear from 1e-3 / 0.2). Pendulum keeps the zoo's gamma 0.9,
#: lambda 0.95, 10 epochs, lr 1e-3 but has no gSDE: a plain Gaussian with state-independent
#: log-std, observation + reward normalisation, lr annealed linearly, and 8 envs x 256 steps
#: with minibatches of 256. Without gSDE the zoo's 4 x 1024 layout was not robust here: seed 0
#: ended at -1150 with its minibatches of 64 (and 4x the gradient steps) and at -439 with
#: minibatches of 256; 8 x 256 gave -146 ... -172 on seeds 0-5.
PPO_PRESETS: dict[str, dict[str, Any]] = {
    "CartPole-v1": dict(
        n_envs=8, n_steps=32, n_epochs=20, minibatch_size=256, gamma=0.98, gae_lambda=0.8,
        lr=1e-3, anneal_lr=True, clip_range=0.2, anneal_clip=True, ent_coef=0.0,
        max_grad_norm=0.5,
    ),
    "Pendulum-v1": dict(
        n_envs=8, n_steps=256, n_epochs=10, minibatch_size=256, gamma=0.9, gae_lambda=0.95,
        lr=1e-3, anneal_lr=True, clip_range=0.2, ent_coef=0.0, max_grad_norm=0.5,
        normalize_obs=True, normalize_reward=True,
    ),
    "trustrl/Maze-v0": dict(
        n_envs=8, n_steps=64, n_epochs=4, minibatch_size=128, gamma=0.99, gae_lambda=0.95,
        lr=3e-3, ent_coef=0.01,
    ),
}


def ppo_config_for(env_id: str, overrides: Mapping[str, Any] | None = None) -> PPOConfig:
    """The preset for ``env_id`` (or the defaults) with ``overrides`` applied."""
    return preset_config(PPOConfig(), PPO_PRESETS, env_id, overrides)


class PPO(OnPolicyTrainer):
    """``PPO(env_id, cfg, seed).train(total_steps, output_dir) -> summary``."""

    algo = "ppo"

    def __init__(self, env_id: str, cfg: PPOConfig | None = None, seed: int = 0) -> None:
        super().__init__(env_id, cfg or ppo_config_for(env_id), seed)
        c = self.cfg
        # one Adam over actor + critic (a shared optimizer, separate networks)
        self.flat = FlatParams([self.actor, self.critic])
        self.opt = self.flat.adam(c.lr, c.adam_eps)

    # -------------------------------------------------------------- update
    def update(self, ro, progress_remaining: float) -> dict[str, float]:
        c = self.cfg
        # 2. GAE with termination vs truncation handled by the rollout's next_values.
        adv, returns = gae_time_major(ro.rewards, ro.values, ro.next_values, ro.terminated, ro.done,
                                      c.gamma, c.gae_lambda)
        obs, act = ro.flat(ro.obs), ro.flat(ro.actions)
        old_logp, old_v = ro.flat(ro.logp), ro.flat(ro.values)
        adv, returns = ro.flat(adv), ro.flat(returns)
        batch = obs.shape[0]
        mb = min(c.minibatch_size, batch)
        lr = linear_schedule(c.lr, progress_remaining) if c.anneal_lr else c.lr
        for g in self.opt.param_groups:
            g["lr"] = lr
        clip = linear_schedule(c.clip_range, progress_remaining) if c.anneal_clip else c.clip_range
        ones = torch.ones((mb, 1), dtype=torch.bool)

        # 3. epochs of minibatch SGD on the clipped surrogate + value loss - entropy bonus
        adv = whiten(adv)  # once per batch (identical to per-minibatch when one minibatch)
        # Per-minibatch bookkeeping stays cheap: the two loss values are kept as detached
        # tensors and converted once per update (policy_loss returns its metrics with one
        # conversion of its own).
        loss_vals: list[torch.Tensor] = []
        clip_frac = approx_kl = grad_norm = v_clip_frac = 0.0
        n_mb = 0
        stop = False
        opt, flat, actor, critic = self.opt, self.flat, self.actor, self.critic
        for _epoch in range(c.n_epochs):
            perm = torch.randperm(batch) if mb < batch else None
            for start in range(0, batch - mb + 1, mb):
                if perm is None:  # one minibatch = the whole batch: order is irrelevant
                    o_mb, a_mb, lp_mb, v_mb, adv_mb, r_mb = obs, act, old_logp, old_v, adv, returns
                else:
                    idx = perm[start:start + mb]
                    o_mb, a_mb, lp_mb, v_mb = obs[idx], act[idx], old_logp[idx], old_v[idx]
                    adv_mb, r_mb = adv[idx], returns[idx]
                params = actor(o_mb)
                logp = actor.log_prob(params, a_mb)
                pl, pm = policy_loss(logp[:, None], lp_mb[:, None], adv_mb, ones, clip_low=clip)
                v = critic(o_mb)
                vl, vm = value_loss(v[:, None], v_mb[:, None], r_mb[:, None], ones, clip=c.clip_range_vf)
                loss = pl + c.vf_coef * vl
                if c.ent_coef:
                    entropy = actor.entropy(params).mean()
                    loss = loss - c.ent_coef * entropy
                flat.zero_grad()
                loss.backward()
                grad_norm += flat.clip_grad_norm_(c.max_grad_norm)
                opt.step()
                n_mb += 1
                loss_vals.append(pl.detach())
                loss_vals.append(vl.detach())
                clip_frac += pm["clip_fraction"]
                approx_kl += pm["approx_kl"]
                v_clip_frac += vm["value_clip_fraction"]
                if c.target_kl is not None and pm["approx_kl"] > 1.5 * c.target_kl:
                    stop = True
                    break
            if stop:
                break
        out: dict[str, float] = {}
        if n_mb:
            pl_sum, vl_sum = torch.stack(loss_vals).double().view(-1, 2).sum(0).tolist()
            out.update({"loss/policy": pl_sum / n_mb, "loss/value": vl_sum / n_mb,
                        "policy/clip_fraction": clip_frac / n_mb, "policy/approx_kl": approx_kl / n_mb,
                        "optim/grad_norm": grad_norm / n_mb, "value/clip_fraction": v_clip_frac / n_mb})
        out["value/explained_variance"] = explained_variance(old_v, returns)
        with torch.no_grad():
            out["policy/entropy"] = float(self.actor.entropy(self.actor(obs)).mean())
        out["optim/lr"] = lr
        out["policy/clip_range"] = clip
        out["optim/minibatch_steps"] = float(n_mb)
        if not self.actor.discrete:
            out["policy/std_mean"] = float(self.actor.log_std.detach().exp().mean())
        return out
