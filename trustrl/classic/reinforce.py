"""REINFORCE with a learned baseline (Williams 1992; Sutton & Barto 2nd ed., section 13.4).

Recipe of one update (:meth:`REINFORCE.update`):

1. Roll out ``n_envs x n_steps`` transitions with the current policy.
2. Monte-Carlo advantages ``A_t = G_t - V(s_t)`` where ``G_t`` is the discounted return to
   go. They are :func:`trustrl.advantages.gae_time_major` with ``lambda = 1`` (GAE(gamma, 1)
   telescopes to exactly ``G_t - V(s_t)``); an episode cut by the time limit or by the end
   of the batch is completed with the critic's value of the state where it was cut (the
   only place the critic enters the return), a terminated one with 0.
   Optionally whitened (:func:`trustrl.advantages.whiten`).
3. One gradient step on ``-mean(A_t log pi(a_t|s_t))``. We obtain it from
   :func:`trustrl.losses.policy_loss` with ``old_logp = logp.detach()``: at ratio 1 the
   clipped surrogate's gradient is exactly ``-mean(A_t grad log pi)``, the REINFORCE
   gradient (the clip never binds at ratio 1).
4. ``critic_steps`` Adam steps on the baseline's squared error
   (:func:`trustrl.losses.value_loss`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from trustrl.advantages import gae_time_major, whiten
from trustrl.losses import explained_variance, policy_loss, value_loss
from trustrl.classic.common import OnPolicyTrainer, PolicyRunSettings, Rollout, adam, linear_schedule, preset_config


@dataclass
class REINFORCEConfig(PolicyRunSettings):
    """Every knob of :class:`REINFORCE`; presets per env in :data:`REINFORCE_PRESETS`."""

    n_envs: int = 8
    n_steps: int = 256
    gamma: float = 0.99
    lr: float = 3e-3
    critic_lr: float = 3e-3
    critic_steps: int = 5            # Adam steps on the baseline per batch
    anneal_lr: bool = False
    normalize_advantages: bool = True
    ent_coef: float = 0.0
    max_grad_norm: float = 1.0


REINFORCE_PRESETS: dict[str, dict[str, Any]] = {
    "CartPole-v1": dict(n_envs=8, n_steps=256, gamma=0.99, lr=3e-3, critic_lr=3e-3, critic_steps=10,
                        anneal_lr=True),
    "Pendulum-v1": dict(n_envs=8, n_steps=200, gamma=0.9, lr=1e-3, critic_steps=10,
                        normalize_obs=True, normalize_reward=True),
    "trustrl/Maze-v0": dict(n_envs=8, n_steps=128, gamma=0.99, lr=1e-2, ent_coef=0.01),
}


def reinforce_config_for(env_id: str, overrides: Mapping[str, Any] | None = None) -> REINFORCEConfig:
    """The preset for ``env_id`` (or the defaults) with ``overrides`` applied."""
    return preset_config(REINFORCEConfig(), REINFORCE_PRESETS, env_id, overrides)


class REINFORCE(OnPolicyTrainer):
    """``REINFORCE(env_id, cfg, seed).train(total_steps, output_dir) -> summary``."""

    algo = "reinforce"

    def __init__(self, env_id: str, cfg: REINFORCEConfig | None = None, seed: int = 0) -> None:
        super().__init__(env_id, cfg or reinforce_config_for(env_id), seed)
        c = self.cfg
        self.actor_opt = adam(list(self.actor.parameters()), c.lr, c.adam_eps)
        self.critic_opt = adam(list(self.critic.parameters()), c.critic_lr, c.adam_eps)

    def update(self, ro: Rollout, progress_remaining: float) -> dict[str, float]:
        c = self.cfg
        # 2. Monte-Carlo advantages: GAE with lambda = 1; then the real transitions only
        adv, returns = gae_time_major(ro.rewards, ro.values, ro.next_values, ro.terminated, ro.done,
                                      c.gamma, 1.0)
        obs, act, old_v = ro.flat_valid(ro.obs), ro.flat_valid(ro.actions), ro.flat_valid(ro.values)
        adv, returns = ro.flat_valid(adv), ro.flat_valid(returns)
        if c.normalize_advantages:
            adv = whiten(adv)
        batch = obs.shape[0]
        ones = torch.ones((batch, 1), dtype=torch.bool)
        lr_scale = linear_schedule(1.0, progress_remaining) if c.anneal_lr else 1.0
        self.actor_opt.param_groups[0]["lr"] = c.lr * lr_scale
        self.critic_opt.param_groups[0]["lr"] = c.critic_lr * lr_scale

        # 3. one policy-gradient step: grad of policy_loss at ratio 1 = -mean(A grad log pi)
        params = self.actor(obs)
        logp = self.actor.log_prob(params, act)
        pl, _ = policy_loss(logp[:, None], logp.detach()[:, None], adv, ones)
        loss = pl
        entropy = self.actor.entropy(params).mean()
        if c.ent_coef:
            loss = loss - c.ent_coef * entropy
        self.actor_opt.zero_grad()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.actor.parameters(), c.max_grad_norm)
        self.actor_opt.step()

        # 4. baseline regression
        vl_sum = 0.0
        for _ in range(c.critic_steps):
            vl, _ = value_loss(self.critic(obs)[:, None], returns[:, None], returns[:, None], ones)
            self.critic_opt.zero_grad()
            vl.backward()
            self.critic_opt.step()
            vl_sum += vl.item()
        return {
            "loss/policy": pl.item(),
            "loss/value": vl_sum / max(c.critic_steps, 1),
            "policy/entropy": entropy.item(),
            "optim/grad_norm": float(grad_norm),
            "optim/lr": c.lr * lr_scale,
            "value/explained_variance": explained_variance(old_v, returns),
        }
