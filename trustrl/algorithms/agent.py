"""Language agents: the LLM plays multi-turn episodes in an environment, and the one loop
trains it with GRPO (:class:`AgentGRPOTrainer`) or PPO with a critic (:class:`AgentPPOTrainer`).

The plug-ins keep their algorithm's update code; what changes is step 1-3, :meth:`collect`:

  1. draw ``prompts_per_step`` dataset rows (the tasks) and make one environment per episode,
     G episodes per row (``group_size`` / ``samples_per_prompt``), the G sharing the row's
     environment seed;
  2. play them side by side (:func:`trustrl.envs.episodes.run_episodes`): one token sequence
     per episode, the model's sampled ids and the chat template's rendering of the
     environment's replies, one KV cache across turns;
  3. score: the episode's return = the sum of its environment rewards plus the outcome rewards
     (``rewards:``, optional) on its transcript. The batch is a :class:`ScoredBatch` whose
     rollout's completion mask holds the model's tokens alone, so the update trains exactly
     what was sampled and nothing the environment said.

Credit across turns. GRPO: the return gives the group advantage of every model token of the
episode (the update code of :mod:`trustrl.algorithms.grpo`, unchanged). PPO: each turn's
reward sits on that turn's last model token, and GAE runs over the model tokens only
(:mod:`trustrl.algorithms.ppo` with :func:`trustrl.advantages.gae_over_positions`).

Held-out evaluation plays one greedy episode per held-out row: ``eval/accuracy`` is the
success rate (``info["success"]`` at the end of an episode), beside ``eval/return`` and
``eval/turns``. Metrics of a step: ``env/return``, ``env/turns``, ``env/success``,
``env/truncated``, ``env/faults``, ``env/model_tokens``, ``env/episode_tokens``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from trustrl import distributed as dist
from trustrl import parallel
from trustrl.algorithms.base import RLAlgorithm, apply_cpu_threads, warn_top_p
from trustrl.advantages import gae_over_positions, token_rewards
from trustrl.algorithms.grpo import GRPOTrainer
from trustrl.algorithms.ppo import PPOTrainer, make_critic
from trustrl.kl_control import make_kl_controller
from trustrl.config.agent import AgentGRPOConfig, AgentPPOConfig  # noqa: F401 - registers the configs
from trustrl.data import load_rows
from trustrl.envs.api import EnvPolicy, EnvSpecError, resolve_env_factory
from trustrl.envs.chat import ChatTemplateError, TurnRenderer
from trustrl.envs.episodes import Episode, EpisodeLimits, episodes_to_rollout, run_episodes
from trustrl.loop.data_parallel import gather_scored_batches, sampling_row_seeds
from trustrl.loop.experience import RewardSuite, ScoredBatch, concat_batches, with_reward_funcs
from trustrl.rewards.registry import ScoreResult
from trustrl.rollout import splitmix64
from trustrl.trainers.common import PromptSampler, check_resume_setting, warn_skipped
from trustrl.utils import seed_everything


class EpisodeRows:
    """A dataset whose rows are episodes' tasks (every column reaches ``env.reset``)."""

    def __init__(self, path: str, config, limit: int | None = None):
        loaded = load_rows(path, required=(), skip_bad=config.skip_bad_rows, limit=limit)
        warn_skipped(loaded.skipped, path)
        if not loaded.rows:
            raise ValueError(f"{path}: no rows (each row is the task of an episode)")
        self.path, self.rows, self.skipped = path, loaded.rows, loaded.skipped
        self.truncated = 0  # openings are never cut: one longer than max_episode_tokens is refused

    def __len__(self) -> int:
        return len(self.rows)


class EnvRewards:
    """The outcome rewards (optional) and the fault totals the loop checkpoints: the
    environment's faults are counted under ``env``."""

    def __init__(self, config, device=None):
        self.suite = RewardSuite(config, device=device) if (config.rewards or config.reward_model) else None
        self.fault_totals: dict[str, int] = {"env": 0, **(self.suite.fault_totals if self.suite else {})}

    @property
    def step(self) -> int:
        return self.suite.step if self.suite else 0

    @step.setter
    def step(self, value: int) -> None:  # the loop tells the reward functions the step
        if self.suite:
            self.suite.step = value


def env_seed(seed: int, row_index: int) -> int:
    """The environment seed of a row: the same for the G episodes of a group (they face the
    same task) and for every step that draws the row again (31 bits, for any env's RNG)."""
    h = splitmix64(torch.tensor([int(seed) * 1_000_003 + int(row_index)], dtype=torch.int64))
    return int(h.item()) & 0x7FFFFFFF


class AgentMixin:
    """Multi-turn collection and evaluation for an algorithm plug-in (put it first in the bases)."""

    def __init__(self, config, env: str | Callable | None = None, reward_funcs: list[Callable] | None = None,
                 model=None, tokenizer=None):
        from trustrl.models import check_vocab, load_policy, load_tokenizer, logit_transform, make_reference

        config = with_reward_funcs(config, reward_funcs)  # a copy: the caller's config is unchanged
        self.config = config
        check_resume_setting(config)
        apply_cpu_threads(config.cpu_threads)
        seed_everything(config.seed, deterministic=config.deterministic)
        warn_top_p(config)
        spec = env if env is not None else config.env
        if spec is None:
            raise EnvSpecError(f"{type(self).__name__}: no environment: set `env: module:Class` in the config or pass env=")
        self.env_name, self.make_env = resolve_env_factory(spec, config.env_kwargs)
        self.device = dist.setup_device(config.device)
        self.rewards = EnvRewards(config, self.device)
        self.tokenizer = tokenizer or load_tokenizer(config.tokenizer or config.model)
        try:
            self.renderer = TurnRenderer(self.tokenizer, config.system_prompt)
        except ChatTemplateError as err:  # name the tokenizer's directory
            raise ChatTemplateError(f"{config.tokenizer or config.model}: {err}") from None
        self.prompts = EpisodeRows(config.dataset, config)
        self.eval_prompts = EpisodeRows(config.eval_dataset, config, limit=config.eval_prompts) if config.eval_dataset else None
        if model is None:
            model = load_policy(config.model, dtype=config.dtype, device=self.device, tokenizer=self.tokenizer,
                                lora=config.lora, gradient_checkpointing=config.gradient_checkpointing
                                if self.allow_gradient_checkpointing else False)
        else:
            check_vocab(model, self.tokenizer, f"the model passed to {type(self).__name__}")
            logit_transform(model)
        self.policy = model
        self.reference = make_reference(model) if config.beta > 0 else None
        parallel.apply(self.policy, config.parallelism, self.device)  # parallelism.strategy=fsdp (no-op otherwise)
        parallel.apply(self.reference, config.parallelism, self.device)
        self.generator = torch.Generator(device="cpu").manual_seed(config.seed)
        self.env_policy = EnvPolicy(config.env_timeout_s, config.env_on_error, config.env_default_reward)
        self.last_metrics: dict[str, float] = {}

    def weights_changed(self) -> None:
        """Episodes are played by trustrl's own sampler on the policy itself: nothing to send."""

    # -- 1-3. play episodes and score them ---------------------------------------------------

    def limits(self) -> EpisodeLimits:
        cfg = self.config
        return EpisodeLimits(cfg.max_turns, cfg.max_completion_length, cfg.max_episode_tokens, cfg.temperature, cfg.top_p,
                             cfg.unfinished_turn_reward)

    def play(self, rows: EpisodeRows, indices: list[int], repeats: int, *, row_seeds=None, greedy=False,
             seed: int | None = None, label: str = "train") -> tuple[ScoredBatch, list[Episode]]:
        """``repeats`` episodes of each row in ``indices`` (consecutive per row), scored."""
        cfg = self.config
        order = [i for i in indices for _ in range(repeats)]
        seed = cfg.seed if seed is None else seed
        envs = [self.make_env() for _ in order]
        episodes = run_episodes(
            self.policy, self.tokenizer, envs, [rows.rows[i] for i in order],
            env_seeds=[env_seed(seed, i) for i in order], limits=self.limits(), renderer=self.renderer,
            policy=self.env_policy, env_name=self.env_name, device=self.device, row_seeds=row_seeds,
            generator=self.generator, greedy=greedy,
            labels=[f"{label} row {i} #{k % repeats}" for k, i in enumerate(order)])
        rollout = episodes_to_rollout(episodes, self.tokenizer.pad_token_id, self.device)
        prompts = [self.tokenizer.decode(e.prompt_ids, skip_special_tokens=False) for e in episodes]
        transcripts = [self.tokenizer.decode(e.ids, skip_special_tokens=False) for e in episodes]
        env_return = torch.tensor([e.env_return for e in episodes], dtype=torch.float32)
        per_function = {"env": env_return}
        total = env_return.clone()
        faults = {"env": sum(e.fault is not None for e in episodes)}
        suite = self.rewards.suite
        if suite is not None:  # outcome rewards on the whole transcript (text after the prompt)
            columns = {k: [rows.rows[i].get(k) for i in order] for k in sorted({k for i in order for k in rows.rows[i]})}
            outcome = suite.score(prompts, transcripts, columns, rollout.completion_lengths.tolist(),
                                  completion_messages=[e.messages for e in episodes])
            per_function.update(outcome.per_function)
            total = total + outcome.total
            faults.update(outcome.n_faults)
        scores = ScoreResult(total=total, per_function=per_function, n_faults=faults)
        return ScoredBatch(rollout, order, prompts, transcripts, scores), episodes

    def collect(self, sampler: PromptSampler) -> tuple[ScoredBatch | None, dict[str, float]]:
        cfg = self.config
        repeats = getattr(cfg, self.repeats_field)
        draw = (sampler.epoch, sampler.cursor)
        indices = sampler.take(cfg.prompts_per_step)
        seeds = sampling_row_seeds(cfg.seed, draw, len(indices), repeats)
        if self.collects_local_share:
            mine = dist.shard_batch(list(range(len(indices))), "prompts_per_step")
            lo, hi = mine[0], mine[-1] + 1
        else:
            lo, hi = dist.shard_range(len(indices))
        local, episodes = None, []
        with parallel.gathered(self.policy):  # FSDP: whole weights while decoding (every rank enters)
            if hi > lo:
                local, episodes = self.play(self.prompts, indices[lo:hi], repeats,
                                            row_seeds=seeds[lo * repeats:hi * repeats])
        metrics = dist.reduce_metrics(episode_metrics(episodes, "env"), weight=len(episodes))
        mine = dict(local.scores.n_faults) if local is not None else {}
        for name, n in dist.sum_across_ranks(mine).items():
            self.rewards.fault_totals[name] = self.rewards.fault_totals.get(name, 0) + int(n)
        metrics["env/faults_total"] = float(self.rewards.fault_totals.get("env", 0))
        batch = local if self.collects_local_share else gather_scored_batches(
            local, concat_batches, self.tokenizer.pad_token_id, self.device)
        return batch, metrics

    # -- held-out episodes ---------------------------------------------------------------------

    @torch.no_grad()
    def evaluate_heldout(self) -> dict[str, float]:
        """One greedy episode per held-out row (rows split across ranks), the same episodes for
        every run (environment seeds from ``eval_seed``)."""
        cfg = self.config
        n = min(cfg.eval_prompts, len(self.eval_prompts))
        lo, hi = dist.shard_range(n)
        episodes: list[Episode] = []
        for start in range(lo, hi, cfg.forward_batch_size):
            idx = list(range(start, min(hi, start + cfg.forward_batch_size)))
            episodes += self.play(self.eval_prompts, idx, 1, greedy=True, seed=cfg.eval_seed, label="eval")[1]
        metrics = dist.reduce_metrics(episode_metrics(episodes, "eval"), weight=len(episodes))
        metrics["eval/accuracy"] = metrics.get("eval/success", 0.0)
        return metrics

    def log_samples(self, step: int, batch: ScoredBatch) -> None:
        """samples.jsonl: the opening prompt and the rest of the episode's transcript."""
        RLAlgorithm.log_samples(self, step, batch)


def episode_metrics(episodes: list[Episode], prefix: str) -> dict[str, float]:
    """Means over episodes: return, turns, success (an episode that never said: 0),
    truncated, faults, model tokens, all tokens after the prompt."""
    if not episodes:
        return {}
    n = len(episodes)
    return {
        f"{prefix}/return": sum(e.env_return for e in episodes) / n,
        f"{prefix}/turns": sum(e.turns for e in episodes) / n,
        f"{prefix}/success": sum(bool(e.success) for e in episodes) / n,
        f"{prefix}/truncated": sum(e.truncated for e in episodes) / n,
        f"{prefix}/faults": float(sum(e.fault is not None for e in episodes)),
        f"{prefix}/model_tokens": sum(sum(e.is_model) for e in episodes) / n,
        f"{prefix}/episode_tokens": sum(len(e.prompt_ids) + len(e.ids) for e in episodes) / n,
    }


class AgentGRPOTrainer(AgentMixin, GRPOTrainer):
    """``AgentGRPOTrainer(config, env=None).train()``: multi-turn GRPO (see the module docstring)."""

    name = "agent-grpo"
    postfix_keys = ["env/return", "env/success", "eval/accuracy"]

    def collect(self, sampler: PromptSampler) -> tuple[ScoredBatch | None, dict[str, float]]:
        batch, metrics = AgentMixin.collect(self, sampler)
        metrics.update(self.rollout_metrics(batch))
        return batch, metrics


class AgentPPOTrainer(AgentMixin, PPOTrainer):
    """``AgentPPOTrainer(config, env=None, critic=None).train()``: multi-turn PPO with a critic.

    Per-token reward on the model's tokens (environment tokens carry nothing and are skipped)::

        r_t = -beta * (log pi_old - log pi_ref)_t                    every model token
            + reward of turn k          if t is turn k's last model token
            + outcome score             if t is the episode's last model token

    then GAE(gamma, lambda) over the model tokens in order (:func:`gae_over_positions`), the
    critic's values read at the same positions."""

    name = "agent-ppo"
    postfix_keys = ["env/return", "env/success", "eval/accuracy"]

    def __init__(self, config, env=None, reward_funcs=None, model=None, tokenizer=None, critic=None):
        AgentMixin.__init__(self, config, env=env, reward_funcs=reward_funcs, model=model, tokenizer=tokenizer)
        cfg = self.config
        self.critic = critic if critic is not None else make_critic(cfg, self.tokenizer, self.device)
        parallel.apply(self.critic, cfg.parallelism, self.device, root=self.critic.trunk)
        self.kl_ctl = make_kl_controller(cfg.kl_control, cfg.beta, cfg.kl_target, cfg.kl_horizon)
        self.shuffle_generator = torch.Generator(device="cpu").manual_seed(cfg.seed + 1)

    def per_token_rewards(self, rollout, scores, old_logp, ref_logp, mask):
        # -beta * KL on every model token (a zero score: the episode's rewards are placed below)
        rewards, kl = token_rewards(torch.zeros_like(scores), old_logp, ref_logp, mask, self.kl_ctl.value)
        turn_reward = rollout.extras["turn_reward"].to(rewards.dtype)
        outcome = scores - turn_reward.sum(dim=1)  # the outcome rewards (0 without `rewards:`)
        positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
        last = torch.where(mask, positions, -1).amax(dim=1)  # the episode's last model token
        has_tokens = last >= 0
        rows = torch.arange(mask.shape[0], device=mask.device)[has_tokens]
        rewards = rewards + turn_reward
        rewards[rows, last[has_tokens]] += outcome[has_tokens]
        return rewards, kl

    def advantage_estimates(self, rewards, values, mask):
        return gae_over_positions(rewards, values, mask, gamma=self.config.gamma, lam=self.config.lam)

    def collect(self, sampler: PromptSampler) -> tuple[ScoredBatch | None, dict[str, float]]:
        return AgentMixin.collect(self, sampler)
