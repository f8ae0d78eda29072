"""Config schemas of language agents: multi-turn episodes in an environment, trained with
GRPO (``agent-grpo``) or PPO with a critic (``agent-ppo``). No torch here.

The dataset's rows are the episodes' tasks (each row reaches ``env.reset(options=row)``); no
prompt column is needed: the first observation is the prompt. ``max_completion_length`` is
the limit of one model turn.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from trustrl.config import GRPOConfig, _Strict, register_config
from trustrl.config.actor_critic import PPOConfig


class EnvFields(_Strict):
    """The environment and the limits of an episode (shared by agent-grpo and agent-ppo)."""

    env: str | None = None
    """The environment class or factory, ``"module:Class"`` (e.g. ``trustrl.envs.maze:TextMaze``);
    None only when a class is passed in Python (``AgentGRPOTrainer(config, env=MyEnv)``)."""
    env_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments of the environment class."""
    max_turns: int = Field(8, ge=1)
    """Model turns per episode; an episode still running after them is truncated."""
    max_episode_tokens: int = Field(1024, ge=2)
    """Token budget of a whole episode (prompt, model and environment tokens); an episode that
    reaches it is truncated."""
    unfinished_turn_reward: float = 0.0
    """Reward of a turn cut by max_completion_length or max_episode_tokens before its EOS (the
    incomplete action is not sent; the episode ends there, truncated). Keep it below the worst
    return of a played-out episode, or never ending a turn becomes a way to escape the
    environment's penalties (the maze demo uses -1)."""
    env_timeout_s: float | None = Field(60.0, gt=0)
    """Time limit of one reset() or step() call."""
    env_on_error: Literal["raise", "default"] = "raise"
    """A step that fails or overruns: stop with an error naming the environment, the episode and
    the turn, or end that episode with env_default_reward as the turn's reward (counted in
    env/faults). A failing reset() always stops the run."""
    env_default_reward: float = 0.0
    """The turn's reward when its step failed (env_on_error = default)."""
    eval_seed: int = 0
    """Environment seed base of the held-out episodes (the same episodes for every run)."""


def _check_agent(cfg: Any) -> None:
    if getattr(cfg, "rollout_engine", "trustrl") != "trustrl" or getattr(cfg, "rollout_correction", None) not in (None, "none"):
        raise ValueError("agent-grpo/agent-ppo: episodes are played by trustrl's own multi-turn sampler on the policy "
                         "itself; rollout_engine=vllm and rollout_correction are not available for agents yet")
    if getattr(cfg, "pack_sequences", False):
        raise ValueError("agent-grpo: pack_sequences packs single-turn completions; episodes are not packed yet")
    if getattr(cfg, "dynamic_sampling", False) or getattr(cfg, "overlong_cache_length", None) is not None:
        raise ValueError("agent-grpo: dynamic_sampling and overlong_cache_length are single-turn options; "
                         "they are not defined for episodes")
    if getattr(cfg, "loss_aggregation", None) == "seq_sum_constant":
        raise ValueError("agent-grpo: loss_aggregation=seq_sum_constant divides by max_completion_length, one turn's "
                         "limit, not an episode's; use token_mean or seq_mean")
    if cfg.max_completion_length >= cfg.max_episode_tokens:
        raise ValueError(f"max_completion_length ({cfg.max_completion_length}) is one turn's limit and must be "
                         f"smaller than max_episode_tokens ({cfg.max_episode_tokens})")


class AgentGRPOConfig(GRPOConfig, EnvFields):
    """Multi-turn GRPO: the episode's return (environment rewards plus outcome rewards on the
    transcript) gives the group advantage of every model token of the episode."""

    learning_rate: float = Field(1e-6, gt=0)

    @model_validator(mode="after")
    def _check_episodes(self) -> "AgentGRPOConfig":
        _check_agent(self)
        return self


class AgentPPOConfig(PPOConfig, EnvFields):
    """Multi-turn PPO: each turn's reward on its last model token, the per-token KL on every
    model token, GAE over the model tokens with the critic."""

    @model_validator(mode="after")
    def _check_episodes(self) -> "AgentPPOConfig":
        _check_agent(self)
        if self.missing_eos_penalty is not None:
            raise ValueError("agent-ppo: missing_eos_penalty is a single-turn option; episodes that hit a limit are "
                             "marked truncated (mask_truncated_completions)")
        return self


register_config("agent-grpo", AgentGRPOConfig)
register_config("agent-ppo", AgentPPOConfig)
