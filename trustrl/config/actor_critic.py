"""Config schemas of the actor-critic RL algorithms: PPO-RLHF and TRPO (no torch here)."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from trustrl.config import RLConfig, register_config


class ActorCriticConfig(RLConfig):
    """Fields shared by PPO and TRPO (GAE with a critic, KL-in-reward)."""

    beta: float = Field(0.05, ge=0)
    """KL coefficient (initial value with kl_control=adaptive): the per-token reward carries
    -beta * (log pi - log pi_ref); 0 loads no reference model."""
    gamma: float = Field(1.0, ge=0, le=1)
    """Discount of GAE (1.0 is usual for LMs)."""
    lam: float = Field(0.95, ge=0, le=1)
    """lambda of GAE."""
    whiten_advantages: bool = True
    """Whiten advantages over the valid tokens of the batch: (A - mean) / sqrt(var + 1e-8)."""
    whiten_rewards: bool = False
    """Whiten the per-token rewards (keeping their mean) before GAE."""
    missing_eos_penalty: float | None = None
    """Score given instead of the reward to completions that hit max_completion_length
    without EOS (e.g. -1.0; None: off)."""
    critic_model: str | None = None
    """Causal-LM directory whose trunk becomes the critic (default: ``model``); head zero-initialized."""
    critic_init: str | None = None
    """Reward-model directory (trustrl train rm) to initialize the critic from, head included."""
    critic_learning_rate: float | None = Field(None, gt=0)
    """AdamW learning rate of the critic (default: learning_rate)."""

    @model_validator(mode="after")
    def _check_critic(self) -> "ActorCriticConfig":
        if self.critic_model is not None and self.critic_init is not None:
            raise ValueError("set at most one of critic_model (a causal LM) and critic_init (a reward model)")
        return self


class PPOConfig(ActorCriticConfig):
    """PPO-RLHF: clipped surrogate, critic with GAE, KL-to-reference in the reward."""

    samples_per_prompt: int = Field(1, ge=1)
    """Completions sampled per prompt (rollout batch = prompts_per_step * samples_per_prompt)."""
    ppo_epochs: int = Field(4, ge=1)
    """K: passes over the rollout batch per step."""
    minibatch_size: int = Field(8, ge=1)
    """Completions per update (one actor step and one critic step); split further into
    gradient_accumulation_steps micro-batches."""
    clip_range: float = Field(0.2, ge=0, lt=1)
    """epsilon of the clipped surrogate."""
    value_loss_type: Literal["clipped", "huber", "mse"] = "clipped"
    """clipped: 0.5 max((V - R)^2, (V_old + clip(V - V_old, +-value_clip) - R)^2); huber: Huber(delta);
    mse: 0.5 (V - R)^2."""
    value_clip: float = Field(0.2, gt=0)
    """Clip range of the value around V_old (value_loss_type = clipped)."""
    huber_delta: float = Field(1.0, gt=0)
    """delta of the Huber value loss."""
    ent_coef: float = Field(0.0, ge=0)
    """c_H: weight of the entropy bonus (> 0 computes full [mb, T, V] logits for its gradient)."""
    target_kl: float | None = Field(None, gt=0)
    """Early stop: the step's epochs end as soon as a minibatch's approx KL(pi_old || pi) exceeds
    this, and that minibatch's update is not applied (None: never). Not the KL controller's
    target (kl_target)."""
    kl_control: Literal["fixed", "adaptive"] = "fixed"
    """fixed beta, or the adaptive controller of Ziegler et al. 2019."""
    kl_target: float = Field(6.0, gt=0)
    """Adaptive control: target KL per completion (the sum over its tokens), in nats."""
    kl_horizon: float = Field(10000.0, gt=0)
    """Adaptive control: horizon in samples (beta *= 1 + clip(KL/target - 1, +-0.2) * B / horizon)."""

    @model_validator(mode="before")
    @classmethod
    def _no_vf_coef(cls, data: Any) -> Any:
        if isinstance(data, dict) and "vf_coef" in data:
            raise ValueError(
                "vf_coef: not a setting here. Actor and critic are separate models with separate AdamW "
                "optimizers, and Adam's step does not depend on a constant loss weight; set the critic's step "
                "size with critic_learning_rate")
        return data

    @model_validator(mode="after")
    def _check_batch(self) -> "PPOConfig":
        if self.minibatch_size > self.rollout_batch_size:
            raise ValueError(
                f"minibatch_size ({self.minibatch_size}) is larger than the rollout batch "
                f"prompts_per_step * samples_per_prompt = {self.rollout_batch_size}"
            )
        return self

    @property
    def rollout_batch_size(self) -> int:
        """Completions per step: prompts_per_step * samples_per_prompt."""
        return self.prompts_per_step * self.samples_per_prompt


register_config("ppo", PPOConfig)


_PARAMS_RE = re.compile(r"^(all|lm_head|last_layers:[1-9]\d*)$")


class TRPOConfig(ActorCriticConfig):
    """TRPO: natural-gradient steps in a KL trust region, on group or GAE advantages."""

    advantage: Literal["group", "gae"] = "group"
    """group: (r - group mean) / group std per completion (needs group_size >= 2); gae: GAE with a critic."""
    group_size: int = Field(4, ge=1)
    """Completions sampled per prompt (rollout batch = prompts_per_step * group_size)."""
    group_scale: Literal["group", "batch", "none"] = "group"
    """advantage = group: divide centred rewards by the group std, the batch std, or nothing."""
    beta: float = Field(0.0, ge=0)
    """KL-to-reference coefficient in the reward (per token with gae, summed per completion with
    group); 0 loads no reference model."""
    max_kl: float = Field(0.01, gt=0)
    """delta: the trust region, mean token KL(pi_old || pi_new) after the step."""
    damping: float = Field(0.1, ge=0)
    """Added to the Fisher: (F + damping I) s = g."""
    cg_iters: int = Field(10, ge=1)
    """Conjugate-gradient iterations."""
    max_backtracks: int = Field(10, ge=1)
    """Step fractions tried by the line search: backtrack_shrink^k, k = 0 .. max_backtracks - 1."""
    backtrack_shrink: float = Field(0.5, gt=0, lt=1)
    """Shrink factor of the line search."""
    accept_ratio: float = Field(0.1, ge=0)
    """A step is accepted only if the surrogate gain is >= accept_ratio x the linear prediction g . step."""
    trpo_params: str = "all"
    """Parameters the natural-gradient step moves: all | lm_head | last_layers:N (see the module docs)."""
    value_epochs: int = Field(4, ge=1)
    """advantage = gae: passes of critic regression per step."""
    value_minibatch_size: int = Field(8, ge=1)
    """advantage = gae: completions per critic update."""
    learning_rate: float = Field(1e-5, gt=0)
    """AdamW learning rate of the critic (advantage = gae; critic_learning_rate overrides it). The
    policy has no optimizer: it moves only by natural-gradient steps. (max_grad_norm and
    gradient_checkpointing also apply to the critic only.)"""

    @field_validator("trpo_params")
    @classmethod
    def _check_params(cls, v: str) -> str:
        v = v.strip()
        if not _PARAMS_RE.match(v):
            raise ValueError(f"trpo_params must be all, lm_head or last_layers:N (N >= 1), got {v!r}")
        return v

    @model_validator(mode="after")
    def _check_group(self) -> "TRPOConfig":
        if self.advantage == "group" and self.group_size < 2:
            raise ValueError("advantage: group needs group_size >= 2 (a group of one has no baseline)")
        if self.advantage == "group" and (self.critic_init or self.critic_model):
            # group advantages use no critic: the directory would be ignored
            raise ValueError(f"{'critic_init' if self.critic_init else 'critic_model'}: only used with "
                             "advantage: gae (advantage: group has no critic)")
        if self.advantage == "gae" and self.value_minibatch_size > self.rollout_batch_size:
            raise ValueError(
                f"value_minibatch_size ({self.value_minibatch_size}) is larger than the rollout batch "
                f"prompts_per_step * group_size = {self.rollout_batch_size}"
            )
        return self

    @property
    def rollout_batch_size(self) -> int:
        """Completions per step: prompts_per_step * group_size."""
        return self.prompts_per_step * self.group_size


register_config("trpo", TRPOConfig)
