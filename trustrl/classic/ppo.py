"""PPO with a clipped surrogate for classic control (Schulman et al. 2017, arXiv 1707.06347).

One iteration, as :meth:`PPO.update` reads after the rollout:

1. Roll out ``n_envs x n_steps`` steps with the current stochastic policy
   (:func:`~trustrl.classic.common.collect_rollout`, Gymnasium vector envs; observation /
   reward normalisation by Gymnasium's wrappers for continuous control).
2. GAE(gamma, lambda) with :func:`trustrl.advantages.gae_time_major`: no bootstrap through
   termination, bootstrap through time-limit truncation from the final observation's value.
   Then keep the real transitions only (autoreset steps are not transitions).
3. Whiten the advantages over the batch (:func:`trustrl.advantages.whiten`).
4. Anneal the learning rate (and optionally the clip range) linearly to 0 over the run.
5. ``n_epochs`` passes over the batch in shuffled minibatches of ``minibatch_size``
   (:func:`~trustrl.classic.common.minibatches`): every sample is used in every epoch; when
   the size does not divide the batch the last minibatch is smaller (10 samples, size 4 ->
   4, 4, 2) and is, like every minibatch, one Adam step on the *mean* loss over its own
   samples, so each of its samples weighs ``1 / len(minibatch)`` in that step. Each
   minibatch minimises ``L = policy_loss + vf_coef * value_loss - ent_coef * entropy`` with
   :func:`trustrl.losses.policy_loss` (clipped ratio) and :func:`trustrl.losses.value_loss`
   (optionally clipped around the rollout values), one Adam over actor and critic, global
   grad-norm clipping. (Actor and critic share no parameter and Adam ignores a constant
   scale of a parameter's gradient, so ``vf_coef`` acts only through the shared grad-norm
   clip -- as in SB3, whose hyper-parameters the presets follow.)
   ``target_kl``: the epochs end as soon as a minibatch's approx KL to the old policy exceeds
   it, and that minibatch's update is not applied -- the rule and the words of the
   language-model PPO (:mod:`trustrl.algorithms.ppo`). The approx KL is ``policy_loss``'s k3
   estimate ``mean((r - 1) - log r)`` on the minibatch, measured before its update.

Per-sample classic losses use the library's ``[B, T]`` signatures with ``T = 1`` and an
all-True mask. Departures from the paper: none beyond the common implementation details
(Huang et al. 2022, "The 37 Implementation Details of PPO"): orthogonal init, Adam eps 1e-5,
advantages whitened per batch (SB3 and CleanRL whiten per minibatch; identical when the
batch is one minibatch, as in the CartPole preset).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from trustrl.advantages import gae_time_major, whiten
from trustrl.losses import explained_variance, policy_loss, value_loss
from trustrl.classic.common import (OnPolicyTrainer, PolicyRunSettings, Rollout, adam, linear_schedule,
                                    minibatches, preset_config)


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
    target_kl: float | None = None   # early stop: the epochs end as soon as a minibatch's approx
                                     # KL(pi_old || pi) exceeds this, and that minibatch's update
                                     # is not applied (None: never)


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
        # one Adam over actor + critic (one combined loss, two separate networks)
        self.params = [*self.actor.parameters(), *self.critic.parameters()]
        self.opt = adam(self.params, self.cfg.lr, self.cfg.adam_eps)

    def update(self, ro: Rollout, progress_remaining: float) -> dict[str, float]:
        c, actor, critic = self.cfg, self.actor, self.critic
        # 2. GAE over the time-major rollout, then the real transitions only, flattened
        adv, returns = gae_time_major(ro.rewards, ro.values, ro.next_values, ro.terminated, ro.done,
                                      c.gamma, c.gae_lambda)
        obs, act, old_logp, old_v = (ro.flat_valid(x) for x in (ro.obs, ro.actions, ro.logp, ro.values))
        adv, returns = ro.flat_valid(adv), ro.flat_valid(returns)
        # 3. whitened advantages (once per batch)
        adv = whiten(adv)
        # 4. schedules
        lr = linear_schedule(c.lr, progress_remaining) if c.anneal_lr else c.lr
        for group in self.opt.param_groups:
            group["lr"] = lr
        clip = linear_schedule(c.clip_range, progress_remaining) if c.anneal_clip else c.clip_range

        # 5. epochs of minibatch updates; early stop on target_kl
        losses: list[torch.Tensor] = []       # (policy loss, value loss) per evaluated minibatch
        grad_norms: list[torch.Tensor] = []   # per applied minibatch
        clip_frac = approx_kl = v_clip_frac = 0.0
        evaluated = applied = 0
        stopped = False
        for _epoch in range(c.n_epochs):
            for idx in minibatches(len(adv), c.minibatch_size):
                o_mb, adv_mb = obs[idx], adv[idx]
                mask = torch.ones((len(adv_mb), 1), dtype=torch.bool)
                params = actor(o_mb)
                logp = actor.log_prob(params, act[idx])
                pl, pm = policy_loss(logp[:, None], old_logp[idx, None], adv_mb, mask, clip_low=clip)
                vl, vm = value_loss(critic(o_mb)[:, None], old_v[idx, None], returns[idx, None], mask,
                                    clip=c.clip_range_vf)
                loss = pl + c.vf_coef * vl
                if c.ent_coef:
                    loss = loss - c.ent_coef * actor.entropy(params).mean()
                evaluated += 1
                losses.append(torch.stack([pl.detach(), vl.detach()]))
                clip_frac += pm["clip_fraction"]
                approx_kl += pm["approx_kl"]
                v_clip_frac += vm["value_clip_fraction"]
                if c.target_kl is not None and pm["approx_kl"] > c.target_kl:
                    stopped = True  # too far from the old policy: this minibatch is not applied
                    break
                for p in self.params:  # = self.opt.zero_grad(), without its per-call bookkeeping
                    p.grad = None
                loss.backward()
                grad_norms.append(torch.nn.utils.clip_grad_norm_(self.params, c.max_grad_norm))
                self.opt.step()
                applied += 1
            if stopped:
                break

        pl_mean, vl_mean = torch.stack(losses).double().mean(0).tolist()
        out = {"loss/policy": pl_mean, "loss/value": vl_mean,
               "policy/clip_fraction": clip_frac / evaluated, "policy/approx_kl": approx_kl / evaluated,
               "value/clip_fraction": v_clip_frac / evaluated,
               "optim/grad_norm": float(torch.stack(grad_norms).mean()) if grad_norms else 0.0,
               "optim/lr": lr, "policy/clip_range": clip,
               "optim/minibatch_steps": float(applied), "policy/early_stop": float(stopped),
               "value/explained_variance": explained_variance(old_v, returns)}
        with torch.no_grad():
            out["policy/entropy"] = float(actor.entropy(actor(obs)).mean())
        if not actor.discrete:
            out["policy/std_mean"] = float(actor.log_std.detach().exp().mean())
        return out
