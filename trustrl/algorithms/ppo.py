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
  4. optimization: ``ppo_epochs`` passes over shuffled minibatches (the last one may be
     smaller: every completion is used in every epoch); each minibatch is one update of the
     actor on ``policy_loss(clip) - ent_coef * entropy`` and one of the critic on the value
     loss (token means over the minibatch, normalized once over its micro-batches and ranks).
     Actor and critic are separate models with separate AdamW optimizers, learning rates and
     grad-norm clipping, so there is no ``vf_coef``: Adam's update does not depend on a
     constant loss weight, and the critic's step size is ``critic_learning_rate``. A
     minibatch whose actor or critic gradient is non-finite updates neither (one fault).
     ``target_kl``: the epochs end as soon as a minibatch's approx KL to the old policy exceeds
     it, and that minibatch's update is not applied. Then the KL controller (fixed or
     adaptive) updates beta from the step's per-sequence KL.

Where this departs from the papers: the KL controller receives the mean *per-sequence* sum of
the k1 estimate measured on the rollout (Ziegler et al.'s KL per sample), and ``kl/ref`` is
logged as the per-token mean (the scale GRPO logs) with ``kl/ref_sequence`` beside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from trustrl import distributed as dist
from trustrl import parallel
from trustrl.advantages import apply_missing_eos_penalty, gae, token_rewards  # noqa: F401 (re-exported)
from trustrl.algorithms.base import RLAlgorithm
from trustrl.config import PPOConfig
from trustrl.config.actor_critic import ActorCriticConfig
from trustrl.kl_control import make_kl_controller
from trustrl.logprobs import selective_log_softmax
from trustrl.loop.accumulate import BatchNormalizer, LogprobGap, MetricMeans, token_budget_micro_batches
from trustrl.loop.data_parallel import (global_explained_variance, global_masked_mean, global_masked_std, global_scores,
                                        global_whiten)
from trustrl.loop.experience import ScoredBatch, reward_metrics
from trustrl.loop.rl_loop import TrainingState
from trustrl.losses import (
    LossSum,
    entropy_from_logits,
    huber_value_loss_sum,
    logprob_gap,
    masked_sum,
    policy_loss_sum,
    rollout_correction_weights,
    value_loss_sum,
)
from trustrl.models import check_vocab, load_tokenizer, reference_context
from trustrl.rollout import Rollout, batched_completion_logprobs, completion_logprobs
from trustrl.trainers.common import FaultCounter, guarded_steps, make_optimizer, make_scheduler
from trustrl.value_model import ScalarHeadModel, load_scalar_model, save_final_scalar_model, scalar_model_from_lm




# -- building the critic ---------------------------------------------------------------------------


def make_critic(config: ActorCriticConfig, tokenizer, device) -> ScalarHeadModel:
    """The critic: ``critic_init`` (a reward model, head included) or a fresh zero head on the
    trunk of ``critic_model`` (default: the policy's directory)."""
    from trustrl.models import ModelLoadError

    key = "critic_init" if config.critic_init else "critic_model" if config.critic_model else "model"
    try:
        own_dir = config.critic_init or config.critic_model
        if own_dir:
            try:
                critic_tok = load_tokenizer(own_dir)
            except ModelLoadError:
                critic_tok = None
            if critic_tok is not None and critic_tok.get_vocab() != tokenizer.get_vocab():
                raise ModelLoadError(
                    f"{own_dir}: its tokenizer differs from the policy's; the critic reads "
                    "the policy's token ids, so it must share the policy's vocabulary"
                )
        if config.critic_init:
            critic = load_scalar_model(config.critic_init, dtype=config.dtype, device=device, tokenizer=tokenizer,
                                       gradient_checkpointing=config.gradient_checkpointing)
            critic.kind = "value"
            return critic
        return scalar_model_from_lm(config.critic_model or config.model, kind="value", zero_head=True,
                                    dtype=config.dtype, device=device, tokenizer=tokenizer,
                                    gradient_checkpointing=config.gradient_checkpointing)
    except ModelLoadError as err:  # say which setting names the directory at fault
        if key == "model":
            raise
        raise type(err)(f"{key}: {err}") from None


@torch.no_grad()
def batched_values(critic: ScalarHeadModel, rollout: Rollout, batch_size: int) -> torch.Tensor:
    """No-grad critic values ``[B, C]`` in slices of ``batch_size`` sequences."""
    was_training = critic.training
    critic.eval()
    n = rollout.prompt_ids.shape[0]
    parts = []
    for s, live in parallel.lockstep(range(0, n, batch_size), sharded=parallel.is_sharded(critic)):  # (FSDP)
        values = critic.completion_values(rollout.select(torch.arange(s, min(n, s + batch_size),
                                                                      device=rollout.prompt_ids.device)))
        if live:
            parts.append(values)
    parallel.reshard(critic)
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
    is_weights: torch.Tensor | None = None  # [B, C] rollout correction (None: off)
    rollout_metrics: dict | None = None  # behaviour-vs-trainer log-prob gap, IS statistics


class PPOTrainer(RLAlgorithm):
    """``PPOTrainer(config).train()``; ``critic`` replaces building the critic from the config.
    See :class:`trustrl.algorithms.base.RLAlgorithm`."""

    name = "ppo"
    config: PPOConfig
    supports_micro_batch_tokens = True
    supports_rollout_correction = True
    postfix_keys = ["reward/score", "kl/ref", "eval/accuracy"]
    repeats_field = "samples_per_prompt"
    collects_local_share = True

    def __init__(self, config: PPOConfig, reward_funcs: list[Callable] | None = None, model=None, tokenizer=None,
                 critic: ScalarHeadModel | None = None):
        # 1. preparation: rewards, tokenizer, prompts, actor, reference (base class), critic, KL controller
        super().__init__(config, reward_funcs=reward_funcs, model=model, tokenizer=tokenizer)
        self.critic = critic if critic is not None else make_critic(config, self.tokenizer, self.device)
        if critic is not None:
            check_vocab(critic.trunk, self.tokenizer, "the critic passed to PPOTrainer")
        parallel.apply(self.critic, config.parallelism, self.device, root=self.critic.trunk)  # fsdp: shard it
        self.kl_ctl = make_kl_controller(config.kl_control, config.beta, config.kl_target, config.kl_horizon)
        self.shuffle_generator = torch.Generator(device="cpu").manual_seed(config.seed + 1)

    def setup(self) -> TrainingState:
        cfg = self.config
        n_minibatches = -(-cfg.rollout_batch_size // cfg.minibatch_size)
        total_updates = cfg.max_steps * cfg.ppo_epochs * n_minibatches
        self.actor_opt = make_optimizer(self.policy.parameters(), cfg)
        self.critic_opt = make_optimizer(self.critic.parameters(), cfg, lr=cfg.critic_learning_rate or cfg.learning_rate)
        self.actor_sched = make_scheduler(self.actor_opt, cfg, total_updates)
        self.critic_sched = make_scheduler(self.critic_opt, cfg, total_updates)
        return TrainingState({"policy": self.policy, "critic": self.critic},
                             {"policy": self.actor_opt, "critic": self.critic_opt},
                             {"policy": self.actor_sched, "critic": self.critic_sched, "kl_controller": self.kl_ctl},
                             {"sampling": self.generator, "shuffle": self.shuffle_generator})

    # 2. trajectories: the loop samples and scores (this rank's share of the prompts)

    def update(self, batch: ScoredBatch, step: int, faults: FaultCounter) -> dict[str, float]:
        # 3. old log-probs, reference log-probs, old values -> rewards -> GAE -> whitening
        beta = self.kl_ctl.value
        pb = self.prepare(batch)
        # 4. K epochs of minibatch updates of actor and critic (early stop on target_kl)
        update = self.optimize(pb, faults, step)
        # KL controller from the rollout's per-sequence KL; old <- new is the next rollout
        kl_seq = dist.gather_rows(pb.kl.sum(dim=1))  # (data parallel: every rank's sequences)
        self.kl_ctl.update(float(kl_seq.mean()), n_steps=kl_seq.shape[0])
        # (data parallel: step_metrics' token statistics are global, its row means are made
        # global here; the log-prob gap is global already; the IS statistics are this rank's)
        gap = {k: v for k, v in (pb.rollout_metrics or {}).items() if k.startswith("rollout/logprob_diff")}
        local = {k: v for k, v in (pb.rollout_metrics or {}).items() if k not in gap}
        metrics = dist.reduce_metrics({**self.step_metrics(batch, pb, beta), **local}, weight=pb.mask.shape[0])
        metrics.update(gap)
        metrics.update(update)
        metrics.update({"optim/lr": self.actor_sched.get_last_lr()[0], "optim/critic_lr": self.critic_sched.get_last_lr()[0],
                        "kl/coef_next": self.kl_ctl.value})
        return metrics

    def checkpoint_extra(self) -> dict[str, Any]:
        return {"kl_coef": self.kl_ctl.value}

    def save_final(self, output_dir: Path) -> dict[str, Any]:
        out = super().save_final(output_dir)
        critic_dir = save_final_scalar_model(self.critic, output_dir / "final_critic", tokenizer=self.tokenizer)
        return {**out, "critic_dir": str(critic_dir), "kl_coef": self.kl_ctl.value}

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
        rewards, kl = self.per_token_rewards(rollout, scores, old_logp, ref_logp, mask)
        # (data parallel: whitening statistics over every rank's tokens)
        if cfg.whiten_rewards:
            rewards = global_whiten(rewards, mask, shift_mean=False)
        raw_adv, returns = self.advantage_estimates(rewards, old_values, mask)
        advantages = global_whiten(raw_adv, mask) if cfg.whiten_advantages else raw_adv
        is_weights, extra = self.rollout_correction(rollout, old_logp, mask)
        return PPOBatch(rollout, mask, old_logp, ref_logp, old_values, scores, rewards, kl, advantages, returns, raw_adv,
                        is_weights, extra)

    def rollout_correction(self, rollout: Rollout, old_logp: torch.Tensor,
                           mask: torch.Tensor) -> tuple[torch.Tensor | None, dict[str, float]]:
        """The gap between the old policy's log-probs (recomputed here) and the sampler's
        behaviour log-probs, and the rollout-correction weights when configured."""
        cfg = self.config
        behaviour = rollout.behaviour_logprobs
        gap = LogprobGap()
        if behaviour is not None:
            gap.add(logprob_gap(old_logp, behaviour, rollout.completion_mask))
        metrics = gap.reduce()
        if cfg.rollout_correction == "none":
            return None, metrics
        if behaviour is None:
            raise ValueError("rollout_correction: this rollout carries no behaviour log-probs "
                             "(Rollout.behaviour_logprobs is None); set rollout_correction=none")
        weights, wm = rollout_correction_weights(old_logp, behaviour, mask, mode=cfg.rollout_correction,
                                                 level=cfg.rollout_correction_level, cap=cfg.rollout_correction_cap,
                                                 lower=cfg.rollout_correction_lower)
        metrics.update({f"rollout/is_{k}": v for k, v in wm.items() if not k.startswith("ratio_m")})
        return weights, metrics

    def per_token_rewards(self, rollout: Rollout, scores, old_logp, ref_logp, mask):
        """``(rewards [B, C], kl [B, C])``: the score on the last token, -beta * KL on every token."""
        return token_rewards(scores, old_logp, ref_logp, mask, self.kl_ctl.value)

    def advantage_estimates(self, rewards, values, mask):
        """``(advantages, returns)``: GAE over the completion tokens."""
        return gae(rewards, values, mask, gamma=self.config.gamma, lam=self.config.lam)

    # -- phase 4: one minibatch loss ---------------------------------------------------------

    def policy_logprobs(self, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probs [b, C], entropy [b, C]); the entropy carries gradients only when ent_coef > 0
        (then full logits are built for the minibatch)."""
        cfg = self.config
        if cfg.ent_coef > 0:
            from trustrl.rollout import completion_logits  # the model's own logits (final-logit transform applied)

            logits = completion_logits(self.policy, rollout, temperature=cfg.temperature)
            return selective_log_softmax(logits, rollout.completion_ids), entropy_from_logits(logits)
        return completion_logprobs(self.policy, rollout, temperature=cfg.temperature,
                                   chunk_size=cfg.logprob_chunk_size, return_entropy=True)

    def critic_loss(self, values, old_values, returns, mask) -> tuple[LossSum, dict[str, float]]:
        cfg = self.config
        if cfg.value_loss_type == "clipped":
            return value_loss_sum(values, old_values, returns, mask, clip=cfg.value_clip)
        if cfg.value_loss_type == "huber":
            return huber_value_loss_sum(values, returns, mask, delta=cfg.huber_delta)
        return value_loss_sum(values, old_values, returns, mask, clip=None)

    def minibatch_terms(self, pb: PPOBatch, rows: torch.Tensor) -> tuple[list, list, dict[str, float]]:
        """One micro-batch: actor terms (clipped surrogate, weighted by the rollout correction
        when configured, -ent_coef * entropy) and critic term (value loss), each a token-level
        :class:`LossSum`; plus metrics (token means). Token-budget micro-batches are trimmed of
        the padding columns they do not need."""
        cfg = self.config
        rollout = pb.rollout.select(rows)
        if cfg.micro_batch_tokens:
            rollout = rollout.trim()
        width = rollout.completion_ids.shape[1]
        mask = pb.mask[rows, :width]
        logp, entropy = self.policy_logprobs(rollout)
        p_loss, pm = policy_loss_sum(logp, pb.old_logp[rows, :width], pb.advantages[rows, :width], mask,
                                     clip_low=cfg.clip_range, aggregation="token_mean",
                                     weights=None if pb.is_weights is None else pb.is_weights[rows, :width])
        values = self.critic.completion_values(rollout).float()
        v_loss, vm = self.critic_loss(values, pb.old_values[rows, :width], pb.returns[rows, :width], mask)
        ent = LossSum(masked_sum(entropy, mask), p_loss.count, "tokens")
        actor_terms = [(1.0, p_loss)] + ([(-cfg.ent_coef, ent)] if cfg.ent_coef > 0 else [])
        metrics = {
            "loss/policy": float(p_loss.mean().detach()), "loss/value": float(v_loss.mean().detach()),
            "policy/entropy": float(ent.mean().detach()),
            **{f"policy/{k}": v for k, v in pm.items()}, **{f"value/{k.removeprefix('value_')}": v for k, v in vm.items()},
        }
        return actor_terms, [(1.0, v_loss)], metrics

    def micro_batches(self, pb: PPOBatch, mine: torch.Tensor) -> list[torch.Tensor]:
        """This rank's rows of a minibatch in micro-batches: ``gradient_accumulation_steps``
        equal row counts, or by a token budget over the length-sorted rows (``micro_batch_tokens``)."""
        if not len(mine):
            return []
        budget = self.config.micro_batch_tokens
        if budget:
            lengths = pb.rollout.completion_lengths[mine].tolist()
            prompts = pb.rollout.prompt_mask[mine].sum(dim=1).tolist()
            return [mine[part] for part in token_budget_micro_batches(lengths, budget, prompts)]
        return list(mine.tensor_split(min(self.config.gradient_accumulation_steps, len(mine))))

    def optimize(self, pb: PPOBatch, faults: FaultCounter, step: int) -> dict[str, float]:
        """K epochs of shuffled minibatches; early stop on approx KL > target_kl.

        Data parallel: the permutation is drawn over the global rollout (the shuffle generator
        is equal on every rank); each rank computes the members of a minibatch it holds; the
        minibatch's token counts are global (:class:`BatchNormalizer`), so the summed
        gradients are the minibatch's mean-loss gradients; every rank takes the same decisions."""
        cfg = self.config
        n_local = pb.mask.shape[0]
        counts = dist.all_gather_objects(n_local)
        offset, n = sum(counts[:dist.rank()]), sum(counts)
        row_tokens = dist.gather_rows(pb.mask.sum(dim=1).cpu())  # valid tokens of every global row, once
        self.policy.train()
        self.critic.train()
        sums: dict[str, float] = {}
        evaluated = updates = epochs_run = skipped = 0
        stopped = False
        actor_norm = critic_norm = 0.0
        for epoch in range(cfg.ppo_epochs):
            epochs_run += 1
            order = torch.randperm(n, generator=self.shuffle_generator)
            for mb in order.split(cfg.minibatch_size):  # the last minibatch may be smaller: none is dropped
                mine = mb[(mb >= offset) & (mb < offset + n_local)] - offset
                micros = self.micro_batches(pb, mine)
                # token means over the whole minibatch (all its micro-batches, all ranks)
                normalizer = BatchNormalizer.from_counts({"tokens": float(row_tokens[mb].sum())})
                means = MetricMeans()
                actor_loss = critic_loss = 0.0
                # (FSDP: as many passes on every rank, a rank without members of this minibatch
                # included; a stand-in pass has weight 0)
                for micro, live in parallel.lockstep(micros, standin=torch.zeros(1, dtype=torch.long),
                                                     sharded=parallel.is_sharded(self.policy)):
                    micro = micro.to(self.device)
                    actor_terms, critic_terms, m = self.minibatch_terms(pb, micro)
                    a_loss, c_loss = normalizer.loss(actor_terms) * live, normalizer.loss(critic_terms) * live
                    (a_loss + c_loss).backward()  # disjoint parameters: one backward fills both
                    actor_loss += float(a_loss.detach())
                    critic_loss += float(c_loss.detach())
                    means.add(m, normalizer.weight(actor_terms[0][1]) * live)
                actor_loss, critic_loss = dist.all_reduce_sum(actor_loss), dist.all_reduce_sum(critic_loss)
                mb_metrics = {**means.reduce(), "loss/total": actor_loss + critic_loss}
                evaluated += 1
                for k, v in mb_metrics.items():
                    sums[k] = sums.get(k, 0.0) + v
                if cfg.target_kl is not None and mb_metrics["policy/approx_kl"] > cfg.target_kl:
                    self.actor_opt.zero_grad(set_to_none=True)  # too far from the old policy: do not apply
                    self.critic_opt.zero_grad(set_to_none=True)
                    stopped = True
                    break
                (actor_norm, critic_norm), ok = guarded_steps(
                    [(self.policy, self.actor_opt, self.actor_sched, actor_loss),
                     (self.critic, self.critic_opt, self.critic_sched, critic_loss)],
                    cfg.max_grad_norm, faults, f"ppo step {step} epoch {epoch + 1}")
                updates += 1
                skipped += not ok
            if stopped:
                break
        out = {k: v / max(evaluated, 1) for k, v in sums.items()}
        out.update({"ppo/epochs_run": float(epochs_run), "ppo/updates": float(updates),
                    "ppo/early_stopped": float(stopped), "optim/skipped": float(skipped), "optim/grad_norm": actor_norm,
                    "optim/critic_grad_norm": critic_norm})
        return out

    def step_metrics(self, batch: ScoredBatch, pb: PPOBatch, beta: float) -> dict[str, float]:
        """Rollout-side metrics of one step (the update adds its own)."""
        mask = pb.mask
        lengths = mask.sum(dim=1).float()
        # (data parallel: row means are this rank's, made global by reduce_metrics weighted by
        # rows; token means, stds and the explained variance are global here already)
        metrics = {
            **reward_metrics(global_scores(batch.scores)),
            "reward/score": float(pb.scores.mean()),
            "reward/total_mean": float((pb.rewards * mask).sum(dim=1).mean()),
            "kl/ref": global_masked_mean(pb.kl, mask),
            "kl/ref_sequence": float(pb.kl.sum(dim=1).mean()),
            "kl/coef": beta,
            "returns/mean": global_masked_mean(pb.returns, mask),
            "value/mean": global_masked_mean(pb.old_values, mask),
            "value/explained_variance": global_explained_variance(pb.old_values, pb.returns, mask),
            "adv/mean": global_masked_mean(pb.raw_advantages, mask),
            "adv/std": global_masked_std(pb.raw_advantages, mask),
            "completion/mean_length": float(lengths.mean()),
            "completion/max_length": float(lengths.max()),
            "completion/truncated_fraction": float(pb.rollout.truncated.float().mean()),
        }
        return metrics
