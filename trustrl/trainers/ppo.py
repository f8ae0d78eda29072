"""PPO for RLHF (Ziegler et al. 2019, arXiv 1909.08593; Stiennon et al. 2020; Ouyang et al.
2022; implementation details after Huang et al. 2024, "The N+ Implementation Details of RLHF
with PPO"), on top of the clipped surrogate of Schulman et al. 2017 (arXiv 1707.06347) and
GAE (Schulman et al. 2016, arXiv 1506.02438).

One training step, in four phases:

  1. preparation (once, in ``__init__``): the policy (actor); the reference model (a frozen
     copy, or the LoRA base with adapters off); the critic (a scalar head on an LM trunk,
     head zero-initialized, or initialized from a reward model with ``critic_init``); the
     reward (reward model and/or rule rewards through ``RewardSuite``); dropout off everywhere.
     The *old policy* is the actor's weights as they stand at the start of the step: nothing
     updates them during phases 2-3, so its log-probs and the critic's values are recorded
     once and kept frozen for phase 4 ("old <- new" is the next step starting from the
     updated weights, without holding a second copy of the model).
  2. trajectory collection: ``prompts_per_step`` prompts x ``samples_per_prompt`` sampled
     completions (truncated at ``max_completion_length``), scored; old log-probs, reference
     log-probs and old values recorded.
  3. advantages: per-token reward ``r_t = -beta * (log pi_old - log pi_ref)_t`` (k1) plus the
     score at the last valid token (completions without EOS get ``missing_eos_penalty``
     instead of their score); GAE(gamma, lambda) over the masked tokens (V after the last
     token = 0); returns = A + V_old; advantages whitened over the valid tokens.
  4. optimization: ``ppo_epochs`` passes over shuffled minibatches of
     ``loss = policy_loss(clip) + vf_coef * value_loss - ent_coef * entropy`` (token means),
     i.e. L = L_clip - c_V L_V + c_H H written as a loss to minimize; each minibatch is one
     update of the actor and one of the critic (two AdamW optimizers, separate learning rates,
     separate grad-norm clipping). The epochs stop early once a minibatch's approx KL to the
     old policy exceeds ``target_kl`` (that minibatch is not applied). Then the KL
     controller (fixed or adaptive) updates beta from the step's per-sequence KL.

Where this departs from the papers: the KL controller receives the mean *per-sequence* sum of
the k1 estimate measured on the rollout (Ziegler et al.'s KL per sample), and ``kl/ref`` is
logged as the per-token mean (the scale GRPO logs) with ``kl/ref_sequence`` beside it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from pydantic import Field, model_validator

from trustrl import distributed as dist
from trustrl.advantages import gae
from trustrl.config import RLConfig, register_config
from trustrl.kl_control import make_kl_controller
from trustrl.logging import format_postfix, progress, write_json_atomic
from trustrl.logprobs import selective_log_softmax
from trustrl.losses import (
    entropy_from_logits,
    explained_variance,
    huber_value_loss,
    kl_penalty,
    masked_mean,
    policy_loss,
    value_loss,
)
from trustrl.models import check_vocab, lm_backbone_and_head, load_tokenizer, reference_context, save_model
from trustrl.rollout import Rollout, batched_completion_logprobs, completion_hidden_states, completion_logprobs
from trustrl.trainers.common import (FaultCounter, PromptSampler, Run, check_resume_setting, guarded_step, make_optimizer,
                                     make_scheduler)
from trustrl.trainers.rl_common import (
    LoopState, ScoredBatch, load_rl_models, reward_metrics, sample_and_score,
)
from trustrl.utils import seed_everything
from trustrl.value_model import ScalarHeadModel, last_token_index, load_scalar_model, scalar_model_from_lm


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
    vf_coef: float = Field(0.1, ge=0)
    """c_V: weight of the value loss."""
    ent_coef: float = Field(0.0, ge=0)
    """c_H: weight of the entropy bonus (> 0 computes full [mb, T, V] logits for its gradient)."""
    target_kl: float | None = Field(None, gt=0)
    """Stop this step's epochs once a minibatch's approx KL(pi_old || pi) exceeds this (None: never)."""
    kl_control: Literal["fixed", "adaptive"] = "fixed"
    """fixed beta, or the adaptive controller of Ziegler et al. 2019."""
    kl_target: float = Field(6.0, gt=0)
    """Adaptive control: target KL per completion (the sum over its tokens), in nats."""
    kl_horizon: float = Field(10000.0, gt=0)
    """Adaptive control: horizon in samples (beta *= 1 + clip(KL/target - 1, +-0.2) * B / horizon)."""

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


# -- the per-token reward (pure functions, tested by hand) ---------------------------------------


def apply_missing_eos_penalty(scores: torch.Tensor, truncated: torch.Tensor, penalty: float | None) -> torch.Tensor:
    """Replace the score of completions without EOS: ``[B]``, ``[B]`` bool -> ``[B]``."""
    if penalty is None:
        return scores
    return torch.where(truncated.to(scores.device), torch.full_like(scores, float(penalty)), scores)


def token_rewards(
    scores: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor | None, mask: torch.Tensor, beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token RLHF reward (Ziegler et al. 2019, eq. 2; Stiennon et al. 2020)::

        kl_t = log pi(y_t) - log pi_ref(y_t)                   (k1, on valid tokens)
        r_t  = -beta * kl_t + [t is the last valid token] * score

    Shapes: ``scores [B]``, ``logp, ref_logp [B, T]``, ``mask [B, T]`` bool -> ``(rewards [B, T],
    kl [B, T])``, both 0 where the mask is False. ``ref_logp=None`` means no KL term.
    Summed over a completion: ``R = score - beta * KL(sequence)``."""
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    if ref_logp is None:
        kl = torch.zeros_like(logp)
    else:
        kl = torch.where(mask, kl_penalty(logp, ref_logp, "k1"), zero)
    rewards = -beta * kl
    has_tokens = mask.any(dim=1)
    last = last_token_index(mask)
    rows = torch.arange(mask.shape[0], device=mask.device)
    bonus = torch.zeros_like(rewards)
    bonus[rows, last] = torch.where(has_tokens, scores.to(rewards.dtype), zero)
    return rewards + bonus, kl


# -- building the critic ---------------------------------------------------------------------------


def make_critic(config: ActorCriticConfig, tokenizer, device) -> ScalarHeadModel:
    """The critic: ``critic_init`` (a reward model, head included) or a fresh zero head on the
    trunk of ``critic_model`` (default: the policy's directory)."""
    from trustrl.models import ModelLoadError

    if config.critic_init:
        try:
            critic_tok = load_tokenizer(config.critic_init)
        except ModelLoadError:
            critic_tok = None
        if critic_tok is not None and critic_tok.get_vocab() != tokenizer.get_vocab():
            raise ValueError(
                f"critic_init {config.critic_init}: its tokenizer differs from the policy's; the critic reads "
                "the policy's token ids, so it must share the policy's vocabulary"
            )
        critic = load_scalar_model(config.critic_init, dtype=config.dtype, device=device, tokenizer=tokenizer,
                                   gradient_checkpointing=config.gradient_checkpointing)
        critic.kind = "value"
        return critic
    return scalar_model_from_lm(config.critic_model or config.model, kind="value", zero_head=True,
                                dtype=config.dtype, device=device, tokenizer=tokenizer,
                                gradient_checkpointing=config.gradient_checkpointing)


@torch.no_grad()
def batched_values(critic: ScalarHeadModel, rollout: Rollout, batch_size: int) -> torch.Tensor:
    """No-grad critic values ``[B, C]`` in slices of ``batch_size`` sequences."""
    was_training = critic.training
    critic.eval()
    n = rollout.prompt_ids.shape[0]
    parts = [critic.completion_values(rollout.select(torch.arange(s, min(n, s + batch_size), device=rollout.prompt_ids.device)))
             for s in range(0, n, batch_size)]
    critic.train(was_training)
    return torch.cat(parts, dim=0).float()


@dataclass
class PPOBatch:
    """Everything phase 4 needs, recorded once per step. Shapes: B completions, C tokens."""

    rollout: Rollout
    mask: torch.Tensor  # [B, C] bool
    old_logp: torch.Tensor  # [B, C]
    ref_logp: torch.Tensor | None  # [B, C]
    old_values: torch.Tensor  # [B, C]
    scores: torch.Tensor  # [B] reward (after the missing-EOS penalty)
    rewards: torch.Tensor  # [B, C] per-token reward
    kl: torch.Tensor  # [B, C] k1 KL to the reference
    advantages: torch.Tensor  # [B, C] (whitened when configured)
    returns: torch.Tensor  # [B, C] value targets A + V_old
    raw_advantages: torch.Tensor  # [B, C] before whitening


class PPOTrainer:
    """``PPOTrainer(config).train()``; ``reward_funcs`` adds Python callables
    ``fn(prompts, completions, **columns) -> list[float]`` to the configured rewards."""

    def __init__(self, config: PPOConfig, reward_funcs: list[Callable] | None = None, model=None, tokenizer=None,
                 critic: ScalarHeadModel | None = None):
        self.config = config
        check_resume_setting(config)
        seed_everything(config.seed, deterministic=config.deterministic)
        self.device = dist.setup_device(config.device)  # joins the process group under torchrun
        # 1. preparation: rewards, tokenizer, prompts, actor, reference, critic, KL controller
        loaded = load_rl_models(config, self.device, who="PPOTrainer", reward_funcs=reward_funcs, model=model,
                                tokenizer=tokenizer)
        self.rewards, self.tokenizer, self.policy, self.reference = loaded.rewards, loaded.tokenizer, loaded.policy, loaded.reference
        self.prompts, self.eval_prompts = loaded.prompts, loaded.eval_prompts
        self.critic = critic if critic is not None else make_critic(config, self.tokenizer, self.device)
        if critic is not None:
            check_vocab(critic.trunk, self.tokenizer, "the critic passed to PPOTrainer")
        self.kl_ctl = make_kl_controller(config.kl_control, config.beta, config.kl_target, config.kl_horizon)
        self.generator = torch.Generator(device="cpu").manual_seed(config.seed)
        self.shuffle_generator = torch.Generator(device="cpu").manual_seed(config.seed + 1)
        self.last_metrics: dict[str, float] = {}

    # -- phase 2: trajectories ---------------------------------------------------------------

    def collect(self, sampler: PromptSampler) -> ScoredBatch:
        """This rank's share of the step's prompts, each sampled ``samples_per_prompt`` times with
        counter-based sampling (seeded by the sampler position and the prompt's index in the
        draw), so the completions do not depend on the number of data-parallel ranks."""
        cfg, S = self.config, self.config.samples_per_prompt
        draw = (sampler.epoch, sampler.cursor)
        indices = sampler.take(cfg.prompts_per_step)
        seeds = dist.sampling_row_seeds(cfg.seed, draw, len(indices), S)
        mine = dist.shard_batch(list(range(len(indices))), "prompts_per_step")
        lo, hi = mine[0], mine[-1] + 1
        batch = sample_and_score(self.policy, self.tokenizer, self.prompts, indices[lo:hi], S, cfg, self.rewards,
                                 self.generator, self.device, row_seeds=seeds[lo * S:hi * S])
        if dist.is_distributed():  # each rank counted its own reward faults; keep the run's totals global
            mine = batch.scores.n_faults
            for name, n in dist.sum_across_ranks(mine).items():
                self.rewards.fault_totals[name] = self.rewards.fault_totals.get(name, 0) + int(n) - mine.get(name, 0)
        return batch

    # -- phase 3: old log-probs, values, rewards, advantages ---------------------------------

    @torch.no_grad()
    def prepare(self, batch: ScoredBatch) -> PPOBatch:
        cfg = self.config
        rollout = batch.rollout
        mask = rollout.completion_mask
        old_logp = batched_completion_logprobs(self.policy, rollout, batch_size=cfg.forward_batch_size,
                                               temperature=cfg.temperature, chunk_size=cfg.logprob_chunk_size)
        ref_logp = None
        if cfg.beta > 0:
            with reference_context(self.policy, self.reference) as ref_model:
                ref_logp = batched_completion_logprobs(ref_model, rollout, batch_size=cfg.forward_batch_size,
                                                       temperature=cfg.temperature, chunk_size=cfg.logprob_chunk_size)
        old_values = batched_values(self.critic, rollout, cfg.forward_batch_size)
        scores = apply_missing_eos_penalty(batch.scores.total.to(self.device), rollout.truncated, cfg.missing_eos_penalty)
        rewards, kl = token_rewards(scores, old_logp, ref_logp, mask, self.kl_ctl.value)
        # (data parallel: whitening statistics over every rank's tokens)
        if cfg.whiten_rewards:
            rewards = dist.whiten(rewards, mask, shift_mean=False)
        raw_adv, returns = gae(rewards, old_values, mask, gamma=cfg.gamma, lam=cfg.lam)
        advantages = dist.whiten(raw_adv, mask) if cfg.whiten_advantages else raw_adv
        return PPOBatch(rollout, mask, old_logp, ref_logp, old_values, scores, rewards, kl, advantages, returns, raw_adv)

    # -- phase 4: one minibatch loss ---------------------------------------------------------

    def policy_logprobs(self, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probs [b, C], entropy [b, C]); the entropy carries gradients only when ent_coef > 0
        (then full logits are built for the minibatch)."""
        cfg = self.config
        if cfg.ent_coef > 0:
            _, head = lm_backbone_and_head(self.policy)
            logits = head(completion_hidden_states(self.policy, rollout)).float() / cfg.temperature
            return selective_log_softmax(logits, rollout.completion_ids), entropy_from_logits(logits)
        return completion_logprobs(self.policy, rollout, temperature=cfg.temperature,
                                   chunk_size=cfg.logprob_chunk_size, return_entropy=True)

    def critic_loss(self, values, old_values, returns, mask) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.config
        if cfg.value_loss_type == "clipped":
            return value_loss(values, old_values, returns, mask, clip=cfg.value_clip)
        if cfg.value_loss_type == "huber":
            return huber_value_loss(values, returns, mask, delta=cfg.huber_delta)
        return value_loss(values, old_values, returns, mask, clip=None)

    def minibatch_loss(self, pb: PPOBatch, rows: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """policy_loss + vf_coef * value_loss - ent_coef * entropy on the rows (token means)."""
        cfg = self.config
        rollout = pb.rollout.select(rows)
        mask = pb.mask[rows]
        logp, entropy = self.policy_logprobs(rollout)
        p_loss, pm = policy_loss(logp, pb.old_logp[rows], pb.advantages[rows], mask, clip_low=cfg.clip_range,
                                 aggregation="token_mean")
        values = self.critic.completion_values(rollout).float()
        v_loss, vm = self.critic_loss(values, pb.old_values[rows], pb.returns[rows], mask)
        ent = masked_mean(entropy, mask)
        loss = p_loss + cfg.vf_coef * v_loss - cfg.ent_coef * ent
        metrics = {
            "loss/policy": float(p_loss.detach()), "loss/value": float(v_loss.detach()),
            "loss/total": float(loss.detach()), "policy/entropy": float(ent.detach()),
            **{f"policy/{k}": v for k, v in pm.items()}, **{f"value/{k.removeprefix('value_')}": v for k, v in vm.items()},
        }
        return loss, metrics

    def optimize(self, pb: PPOBatch, actor_opt, critic_opt, actor_sched, critic_sched,
                 faults: FaultCounter, step: int) -> dict[str, float]:
        """K epochs of shuffled minibatches; early stop on approx KL > target_kl.

        Data parallel: the permutation is drawn over the global rollout (the shuffle generator
        is equal on every rank); each rank computes the members of a minibatch it holds,
        weighted by their share of the minibatch's global tokens; losses and metrics are summed
        over ranks, gradients by ``guarded_step``, so every rank takes the same decisions."""
        cfg = self.config
        n_local = pb.mask.shape[0]
        counts = dist.all_gather_objects(n_local)
        offset, n = sum(counts[:dist.rank()]), sum(counts)
        row_tokens = dist.gather_rows(pb.mask.sum(dim=1).cpu())  # valid tokens of every global row
        self.policy.train()
        self.critic.train()
        sums: dict[str, float] = {}
        evaluated = updates = epochs_run = skipped = 0
        stopped = False
        actor_norm = critic_norm = 0.0
        for epoch in range(cfg.ppo_epochs):
            epochs_run += 1
            order = torch.randperm(n, generator=self.shuffle_generator)
            for mb in order.split(cfg.minibatch_size):
                n_tokens = max(int(row_tokens[mb].sum()), 1)
                mine = mb[(mb >= offset) & (mb < offset + n_local)] - offset  # all of mb in one process
                mb_metrics: dict[str, float] = {}
                mb_loss = 0.0
                for micro in mine.tensor_split(min(cfg.gradient_accumulation_steps, len(mine))) if len(mine) else ():
                    micro = micro.to(self.device)
                    weight = int(pb.mask[micro].sum()) / n_tokens  # token means -> exact accumulation
                    loss, m = self.minibatch_loss(pb, micro)
                    (loss * weight).backward()
                    mb_loss += float(loss.detach()) * weight
                    for k, v in m.items():
                        mb_metrics[k] = mb_metrics.get(k, 0.0) + v * weight
                mb_loss, mb_metrics = dist.all_reduce_sum(mb_loss), dist.sum_across_ranks(mb_metrics)
                evaluated += 1
                for k, v in mb_metrics.items():
                    sums[k] = sums.get(k, 0.0) + v
                if cfg.target_kl is not None and mb_metrics["policy/approx_kl"] > cfg.target_kl:
                    actor_opt.zero_grad(set_to_none=True)  # too far from the old policy: do not apply
                    critic_opt.zero_grad(set_to_none=True)
                    stopped = True
                    break
                where = f"ppo step {step} epoch {epoch + 1}"
                actor_norm, ok_actor = guarded_step(self.policy, actor_opt, actor_sched, cfg.max_grad_norm, faults,
                                                    where + " (actor)", loss=mb_loss)
                critic_norm, ok_critic = guarded_step(self.critic, critic_opt, critic_sched, cfg.max_grad_norm, faults,
                                                      where + " (critic)", loss=mb_loss)
                updates += 1
                skipped += (not ok_actor) + (not ok_critic)
            if stopped:
                break
        out = {k: v / max(evaluated, 1) for k, v in sums.items()}
        out.update({"ppo/epochs_run": float(epochs_run), "ppo/updates": float(updates),
                    "ppo/early_stopped": float(stopped), "optim/skipped": float(skipped), "optim/grad_norm": actor_norm,
                    "optim/critic_grad_norm": critic_norm})
        return out

    # -- the loop ----------------------------------------------------------------------------

    def train(self) -> dict[str, Any]:
        cfg = self.config
        run = Run.open(cfg)
        policy, critic = self.policy, self.critic
        n_minibatches = -(-cfg.rollout_batch_size // cfg.minibatch_size)
        total_updates = cfg.max_steps * cfg.ppo_epochs * n_minibatches
        actor_opt = make_optimizer(policy.parameters(), cfg)
        critic_opt = make_optimizer(critic.parameters(), cfg, lr=cfg.critic_learning_rate or cfg.learning_rate)
        actor_sched = make_scheduler(actor_opt, cfg, total_updates)
        critic_sched = make_scheduler(critic_opt, cfg, total_updates)
        models = {"policy": policy, "critic": critic}
        optimizers = {"policy": actor_opt, "critic": critic_opt}
        schedulers = {"policy": actor_sched, "critic": critic_sched, "kl_controller": self.kl_ctl}
        generators = {"sampling": self.generator, "shuffle": self.shuffle_generator}
        started = time.time()
        loop, _ = LoopState.start(self, run, models, optimizers, schedulers, generators)
        sampler, faults = loop.sampler, loop.faults
        bar = progress(total=cfg.max_steps, initial=run.start_step, desc="ppo", disable=not cfg.progress or None)
        step = run.start_step
        while step < cfg.max_steps:
            t0 = time.time()
            # 2. trajectories from the old policy (the weights as they stand), scored
            batch = self.collect(sampler)
            gen_seconds = time.time() - t0
            # 3. old log-probs, reference log-probs, old values -> rewards -> GAE -> whitening
            beta = self.kl_ctl.value
            pb = self.prepare(batch)
            # 4. K epochs of minibatch updates of actor and critic (early stop on target_kl)
            update = self.optimize(pb, actor_opt, critic_opt, actor_sched, critic_sched, faults, step + 1)
            # KL controller from the rollout's per-sequence KL; old <- new is the next rollout
            kl_seq = dist.gather_rows(pb.kl.sum(dim=1))  # (data parallel: every rank's sequences)
            self.kl_ctl.update(float(kl_seq.mean()), n_steps=kl_seq.shape[0])
            step += 1
            # (data parallel: row means are exact, token means and spreads are rank-weighted)
            metrics = dist.reduce_metrics(self.step_metrics(batch, pb, beta), weight=pb.mask.shape[0])
            metrics.update(update)
            metrics.update({
                "optim/lr": actor_sched.get_last_lr()[0], "optim/critic_lr": critic_sched.get_last_lr()[0],
                "kl/coef_next": self.kl_ctl.value, "perf/step_seconds": time.time() - t0,
                "perf/generation_seconds": gen_seconds,
                "perf/tokens_per_second": dist.all_reduce_sum(int(pb.mask.sum())) / max(gen_seconds, 1e-9),
            })
            metrics.update(loop.evaluate_if_due(step))
            run.log(step, metrics)
            self.last_metrics = metrics
            bar.update(1)
            bar.set_postfix(format_postfix(metrics, ["reward/score", "kl/ref", "eval/accuracy"]))
            if run.should_save(step, cfg.max_steps, faults):
                run.save(step, models, optimizers, schedulers, loop.checkpoint_state(kl_coef=self.kl_ctl.value),
                         generators, tokenizer=self.tokenizer)
        bar.close()
        final_dir = dist.on_main(save_model, policy, self.tokenizer, Path(cfg.output_dir) / "final")
        critic_dir = dist.on_main(critic.save_pretrained, Path(cfg.output_dir) / "final_critic", tokenizer=self.tokenizer)
        summary = loop.summary(run, step, started, final_dir, critic_dir=str(critic_dir), kl_coef=self.kl_ctl.value)
        dist.on_main(write_json_atomic, Path(cfg.output_dir) / "train_summary.json", summary)
        run.close()
        return summary

    def step_metrics(self, batch: ScoredBatch, pb: PPOBatch, beta: float) -> dict[str, float]:
        """Rollout-side metrics of one step (the update adds its own)."""
        mask = pb.mask
        lengths = mask.sum(dim=1).float()
        metrics = {
            **reward_metrics(batch.scores),
            "reward/score": float(pb.scores.mean()),
            "reward/total_mean": float((pb.rewards * mask).sum(dim=1).mean()),
            "kl/ref": float(masked_mean(pb.kl, mask)),
            "kl/ref_sequence": float(pb.kl.sum(dim=1).mean()),
            "kl/coef": beta,
            "returns/mean": float(masked_mean(pb.returns, mask)),
            "value/mean": float(masked_mean(pb.old_values, mask)),
            "value/explained_variance": explained_variance(pb.old_values, pb.returns, mask),
            "adv/mean": float(masked_mean(pb.raw_advantages, mask)),
            "adv/std": float(masked_mean((pb.raw_advantages - masked_mean(pb.raw_advantages, mask)).square(), mask).sqrt()),
            "completion/mean_length": float(lengths.mean()),
            "completion/max_length": float(lengths.max()),
            "completion/truncated_fraction": float(pb.rollout.truncated.float().mean()),
        }
        return metrics
