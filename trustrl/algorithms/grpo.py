"""GRPO: Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath, arXiv 2402.03300),
with the variants practitioners expect: Dr. GRPO (Liu et al. 2025), DAPO (arXiv 2503.14476:
clip-higher, token-mean loss, dynamic sampling, soft overlong penalty) and GSPO (Zheng et al.
2025, arXiv 2507.18071: sequence-level importance ratio).

One training step, in the order of the method (steps 1-3 and 7 are the loop's):
  1. sample prompts;
  2. generate G completions per prompt with the policy as it stands (the "old" policy: its
     weights do not change until step 6);
  3. score every completion with the reward functions (each logged on its own); DAPO dynamic
     sampling drops groups with equal rewards and samples more prompts (:meth:`collect`);
  4. advantages, one scalar per completion broadcast over its tokens (``advantage_estimator``:
     group z-score, Dr. GRPO, batch scale, RLOO, REINFORCE++-baseline);
  5. old log-probs (only when mu > 1) and reference log-probs (none at all when beta = 0);
  6. mu optimizer updates on the clipped surrogate plus beta * KL(pi || pi_ref), each over the
     whole batch in gradient-accumulation micro-batches, normalized once over the batch;
  7. refresh: the updated policy is the next step's old policy; log, evaluate, checkpoint.

Where this departs from the paper: with token ratios the KL term is aggregated exactly like the
surrogate (per ``loss_aggregation``) so the two stay on one scale; with the sequence ratio
(GSPO) the surrogate is a mean over sequences and the KL a mean over tokens, each normalized by
its own count over the whole batch.
"""

from __future__ import annotations

import torch

from trustrl import distributed as dist
from trustrl import parallel
from trustrl.advantages import outcome_advantages, soft_overlong_penalty
from trustrl.algorithms.base import RLAlgorithm
from trustrl.config import GRPOConfig
from trustrl.loop.accumulate import BatchNormalizer, LogprobGap, MetricMeans, token_budget_micro_batches
from trustrl.loop.experience import ScoredBatch, concat_batches, reward_metrics, select_groups
from trustrl.loop.rl_loop import TrainingState
from trustrl.losses import (LossSum, aggregate_sum, kl_penalty, logprob_gap, masked_sum, policy_loss_sum,
                            rollout_correction_weights, sequence_policy_loss_sum)
from trustrl.models import reference_context
from trustrl.rollout import (Rollout, batched_completion_logprobs, check_packable, completion_logprobs,
                             micro_batch_logprobs, packed_completion_logprobs)
from trustrl.trainers.common import FaultCounter, PromptSampler, guarded_step, make_optimizer, make_scheduler


class GRPOTrainer(RLAlgorithm):
    """``GRPOTrainer(config).train()``; see :class:`trustrl.algorithms.base.RLAlgorithm`."""

    name = "grpo"
    config: GRPOConfig
    supports_micro_batch_tokens = True
    supports_rollout_correction = True

    def setup(self) -> TrainingState:
        cfg = self.config
        if cfg.pack_sequences:  # refuse a model that would attend across packed rows, before any step
            check_packable(self.policy)
        self.optimizer = make_optimizer(self.policy.parameters(), cfg)
        self.scheduler = make_scheduler(self.optimizer, cfg, cfg.max_steps * cfg.num_iterations)
        return TrainingState({"policy": self.policy}, {"policy": self.optimizer}, {"policy": self.scheduler},
                             {"sampling": self.generator})

    # -- 1-3. sample and score; DAPO dynamic sampling ----------------------------------------

    def collect(self, sampler: PromptSampler) -> tuple[ScoredBatch | None, dict[str, float]]:
        cfg, G = self.config, self.config.group_size
        batches: list[ScoredBatch] = []
        kept_groups = rounds = 0
        info: dict[str, float] = {}
        while True:
            batch, _ = super().collect(sampler)
            if cfg.overlong_cache_length is not None:  # DAPO soft overlong penalty, part of the reward
                penalty = soft_overlong_penalty(batch.rollout.completion_lengths.cpu(), cfg.max_completion_length,
                                                cfg.overlong_cache_length)
                batch.scores.per_function["overlong"] = penalty
                batch.scores.total = batch.scores.total + penalty
            if rounds == 0:
                info = self.rollout_metrics(batch)
            if not cfg.dynamic_sampling:
                return batch, info
            spread = batch.scores.total.view(-1, G).std(dim=1, unbiased=False) > 0
            keep = spread.nonzero().flatten().tolist()[: cfg.prompts_per_step - kept_groups]
            if keep:
                batches.append(select_groups(batch, keep, G))
                kept_groups += len(keep)
            rounds += 1
            if kept_groups >= cfg.prompts_per_step or rounds > cfg.max_resample_rounds:
                break
        info["groups/dynamic_sampling_rounds"] = float(rounds)
        info["groups/kept"] = float(kept_groups)
        return (concat_batches(batches, self.tokenizer.pad_token_id) if batches else None), info

    def rollout_metrics(self, batch: ScoredBatch) -> dict[str, float]:
        G = self.config.group_size
        lengths = batch.rollout.completion_lengths.float()
        zero_spread = batch.scores.total.view(-1, G).std(dim=1, unbiased=False) == 0
        return {
            **reward_metrics(batch.scores),
            "completion/mean_length": float(lengths.mean()),
            "completion/max_length": float(lengths.max()),
            "completion/truncated_fraction": float(batch.rollout.truncated.float().mean()),
            "groups/zero_std_fraction": float(zero_spread.float().mean()),
        }

    # -- 4-6. advantages, old/reference log-probs, mu updates --------------------------------

    def update(self, batch: ScoredBatch, step: int, faults: FaultCounter) -> dict[str, float]:
        cfg = self.config
        # 4. one advantage per completion (global: equal on every rank)
        advantages = outcome_advantages(cfg.advantage_estimator, batch.scores.total.to(self.device), cfg.group_size)
        metrics = {"adv/mean": float(advantages.mean()), "adv/std": float(advantages.std(unbiased=False)),
                   "adv/abs_mean": float(advantages.abs().mean())}
        # data parallel: this rank's whole groups; the update normalizes over every rank's share
        batch, advantages, share = self.local_share(batch, advantages)
        rollout = batch.rollout
        mask = self.loss_mask(rollout)
        micro_rows = self.micro_batches(rollout)
        normalizer = BatchNormalizer([mask[rows] for rows in micro_rows], share)
        # 5. old log-probs over the same micro-batches as the update (so the first iteration's
        # ratio is exactly 1); at mu = 1 old == current and they are not computed at all
        old_logp = ref_logp = None
        if cfg.num_iterations > 1:
            old_logp = micro_batch_logprobs(self.policy, rollout, micro_rows, trim=bool(cfg.micro_batch_tokens),
                                            temperature=cfg.temperature, chunk_size=cfg.logprob_chunk_size,
                                            packed=cfg.pack_sequences)
        if cfg.beta > 0:
            with reference_context(self.policy, self.reference) as ref_model:
                ref_logp = batched_completion_logprobs(ref_model, rollout, batch_size=cfg.forward_batch_size,
                                                       temperature=cfg.temperature, chunk_size=cfg.logprob_chunk_size)
        # 6. mu updates over the same rollouts
        self.policy.train()
        skipped = 0
        for iteration in range(cfg.num_iterations):
            means = MetricMeans()
            gap = LogprobGap()
            total_loss = 0.0
            # (FSDP: as many passes on every rank; a stand-in pass has weight 0)
            for rows, live in parallel.lockstep(micro_rows, sharded=parallel.is_sharded(self.policy)):
                micro = rollout.select(rows.to(self.device))
                if cfg.micro_batch_tokens:  # a token-budget micro-batch: no column of padding it does not need
                    micro = micro.trim()
                width = micro.completion_ids.shape[1]
                terms, m = self.loss_terms(micro, advantages[rows],
                                           None if old_logp is None else old_logp[rows, :width],
                                           None if ref_logp is None else ref_logp[rows, :width], mask[rows, :width],
                                           gap if iteration == 0 and share and live else None)
                loss = normalizer.loss(terms) * (share * live)
                loss.backward()
                total_loss += float(loss.detach())
                means.add(m, normalizer.weight(terms[0][1]) * share * live)
            total_loss = dist.all_reduce_sum(total_loss)
            grad_norm, applied = guarded_step(self.policy, self.optimizer, self.scheduler, cfg.max_grad_norm, faults,
                                              f"grpo step {step} iteration {iteration + 1}", loss=total_loss)
            skipped += not applied
            metrics.update({**means.reduce(), "loss/total": total_loss, "optim/grad_norm": grad_norm})
            if iteration == 0:
                metrics.update(gap.reduce())
        metrics.update({"optim/skipped": float(skipped), "optim/lr": self.scheduler.get_last_lr()[0]})
        return metrics

    def local_share(self, batch: ScoredBatch, advantages: torch.Tensor) -> tuple[ScoredBatch, torch.Tensor, float]:
        """Data parallel: this rank's contiguous whole groups of the global batch, their
        advantages, and its share of the loss (0.0 for the stand-in group of a rank left without
        one, see :func:`trustrl.distributed.shard_groups`). One process: all of it, share 1."""
        if not dist.is_distributed():
            return batch, advantages, 1.0
        G = self.config.group_size
        groups, share = dist.shard_groups(advantages.shape[0] // G)
        rows = torch.tensor([g * G + j for g in groups for j in range(G)], dtype=torch.long, device=advantages.device)
        return select_groups(batch, groups, G), advantages[rows], share

    def micro_batches(self, rollout: Rollout) -> list[torch.Tensor]:
        """Row indices of the update's micro-batches: ``gradient_accumulation_steps`` equal
        row counts, or token-budget micro-batches over length-sorted rows (``micro_batch_tokens``)."""
        cfg = self.config
        if cfg.micro_batch_tokens:
            return token_budget_micro_batches(rollout.completion_lengths.tolist(), cfg.micro_batch_tokens,
                                              rollout.prompt_mask.sum(dim=1).tolist(), packed=cfg.pack_sequences)
        n_rows = rollout.prompt_ids.shape[0]
        return list(torch.arange(n_rows).split(-(-n_rows // cfg.gradient_accumulation_steps)))

    def loss_mask(self, rollout: Rollout) -> torch.Tensor:
        """Valid completion tokens; DAPO's overlong filtering drops truncated completions."""
        mask = rollout.completion_mask
        if self.config.mask_truncated_completions:
            mask = mask & ~rollout.truncated[:, None]
        return mask

    def loss_terms(self, rollout: Rollout, advantages, old_logp, ref_logp, mask,
                   gap: LogprobGap | None = None) -> tuple[list[tuple[float, LossSum]], dict[str, float]]:
        """Step 6 on one micro-batch: the clipped surrogate (token or sequence ratio), weighted
        by the rollout correction when configured, and beta * KL as (coefficient, sum) terms;
        the first term's unit weighs the metrics. ``gap``: where the trainer's log-probs of the
        sampling policy are compared with the sampler's behaviour log-probs."""
        cfg = self.config
        logprobs = packed_completion_logprobs if cfg.pack_sequences else completion_logprobs
        logp, entropy = logprobs(self.policy, rollout, temperature=cfg.temperature,
                                 chunk_size=cfg.logprob_chunk_size, return_entropy=True)
        old = logp.detach() if old_logp is None else old_logp
        behaviour = rollout.behaviour_logprobs
        if gap is not None and behaviour is not None:
            gap.add(logprob_gap(old, behaviour, rollout.completion_mask))
        weights, metrics = None, {}
        if cfg.rollout_correction != "none":
            if behaviour is None:
                raise ValueError("rollout_correction: this rollout carries no behaviour log-probs "
                                 "(Rollout.behaviour_logprobs is None); set rollout_correction=none")
            weights, wm = rollout_correction_weights(
                old, behaviour, mask, mode=cfg.rollout_correction, level=cfg.rollout_correction_level,
                cap=cfg.rollout_correction_cap, lower=cfg.rollout_correction_lower)
            metrics = {f"rollout/is_{k}": v for k, v in wm.items() if not k.startswith("ratio_m")}
        if cfg.importance_level == "sequence":
            surrogate, m = sequence_policy_loss_sum(logp, old, advantages, mask, clip_low=cfg.clip_low,
                                                    clip_high=cfg.clip_high,
                                                    weights=None if weights is None else weights.amax(dim=1))
            kl_aggregation = "token_mean"
        else:
            surrogate, m = policy_loss_sum(logp, old, advantages, mask, clip_low=cfg.clip_low, clip_high=cfg.clip_high,
                                           aggregation=cfg.loss_aggregation, max_len=cfg.max_completion_length,
                                           weights=weights)
            kl_aggregation = cfg.loss_aggregation
        terms = [(1.0, surrogate)]
        metrics.update({f"policy/{k}": float(v) for k, v in m.items()})
        n_tokens = max(int(mask.sum()), 1)
        metrics["policy/entropy"] = float(masked_sum(entropy, mask)) / n_tokens
        if ref_logp is not None:
            kl = kl_penalty(logp, ref_logp, cfg.kl_estimator)
            terms.append((cfg.beta, aggregate_sum(kl, mask, kl_aggregation, max_len=cfg.max_completion_length)))
            metrics["kl/ref"] = float(masked_sum(kl.detach(), mask)) / n_tokens
        return terms, metrics
