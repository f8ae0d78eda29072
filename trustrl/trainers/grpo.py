"""GRPO: Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath, arXiv 2402.03300),
with the variants practitioners expect: Dr. GRPO (Liu et al. 2025), DAPO (arXiv 2503.14476:
clip-higher, token-mean loss, dynamic sampling, soft overlong penalty) and GSPO (sequence-level
importance ratio).

One training step, in the order of the method:
  1. sample prompts;
  2. generate G completions per prompt with the policy as it stands (the "old" policy: its
     weights do not change until step 6), recording old log-probs when mu > 1;
  3. score every completion with the reward functions (each logged on its own);
     DAPO dynamic sampling drops groups with equal rewards and samples more prompts;
  4. group-normalized advantages (one scalar per completion, broadcast over its tokens);
  5. reference log-probs (once per rollout; none at all when beta = 0);
  6. mu optimizer updates on the clipped surrogate plus beta * KL(pi || pi_ref), each over the
     whole batch in gradient-accumulation micro-batches normalized as one batch;
  7. refresh: the updated policy is the next step's old policy; log, evaluate, checkpoint.

Where this departs from the paper: the KL term is aggregated exactly like the surrogate
(per ``loss_aggregation``) instead of always per sequence, so the two stay on one scale.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import torch

from trustrl import distributed as dist
from trustrl.advantages import group_advantages, soft_overlong_penalty
from trustrl.config import GRPOConfig
from trustrl.logging import format_postfix, progress, write_json_atomic
from trustrl.losses import aggregate, kl_penalty, policy_loss, sequence_policy_loss
from trustrl.models import reference_context, save_model
from trustrl.rollout import Rollout, StepThreads, batched_completion_logprobs, completion_logprobs
from trustrl.trainers.common import (PromptSampler, Run, check_resume_setting, guarded_step, make_optimizer,
                                     make_scheduler)
from trustrl.trainers.rl_common import (
    LoopState, ScoredBatch, load_rl_models, reward_metrics, sample_and_score,
)
from trustrl.utils import seed_everything


def concat_batches(batches: list[ScoredBatch], pad: int) -> ScoredBatch:
    """Stack scored batches (different prompt/completion widths) into one."""
    from trustrl.rewards.registry import ScoreResult
    from trustrl.rollout import left_pad

    prompt_rows, completion_rows, completion_masks = [], [], []
    for b in batches:
        for i in range(b.rollout.prompt_ids.shape[0]):
            prompt_rows.append(b.rollout.prompt_ids[i][b.rollout.prompt_mask[i]].tolist())
            completion_rows.append(b.rollout.completion_ids[i])
            completion_masks.append(b.rollout.completion_mask[i])
    device = batches[0].rollout.prompt_ids.device
    p_ids, p_mask = left_pad(prompt_rows, pad_id=pad)
    width = max(c.shape[0] for c in completion_rows)
    c_ids = torch.full((len(completion_rows), width), pad, dtype=torch.long)
    c_mask = torch.zeros((len(completion_rows), width), dtype=torch.bool)
    for i, (c, m) in enumerate(zip(completion_rows, completion_masks)):
        c_ids[i, :c.shape[0]], c_mask[i, :m.shape[0]] = c, m
    rollout = Rollout(p_ids.to(device), p_mask.to(device), c_ids.to(device), c_mask.to(device),
                      torch.cat([b.rollout.truncated for b in batches]))
    per_fn = {k: torch.cat([b.scores.per_function[k] for b in batches]) for k in batches[0].scores.per_function}
    faults = {k: sum(b.scores.n_faults.get(k, 0) for b in batches) for k in batches[0].scores.n_faults}
    scores = ScoreResult(total=torch.cat([b.scores.total for b in batches]), per_function=per_fn, n_faults=faults)
    return ScoredBatch(rollout, [i for b in batches for i in b.row_indices], [p for b in batches for p in b.prompts],
                       [c for b in batches for c in b.completions], scores)


def select_groups(batch: ScoredBatch, groups: list[int], group_size: int) -> ScoredBatch:
    """Keep whole groups (by group index) of a scored batch."""
    from trustrl.rewards.registry import ScoreResult

    rows = [g * group_size + j for g in groups for j in range(group_size)]
    index = torch.tensor(rows, dtype=torch.long)
    s = batch.scores
    scores = ScoreResult(total=s.total[index], per_function={k: v[index] for k, v in s.per_function.items()},
                         n_faults=dict(s.n_faults))
    return ScoredBatch(batch.rollout.select(index.to(batch.rollout.prompt_ids.device)),
                       [batch.row_indices[r] for r in rows], [batch.prompts[r] for r in rows],
                       [batch.completions[r] for r in rows], scores)


class GRPOTrainer:
    """``GRPOTrainer(config).train()``; ``reward_funcs`` adds Python callables
    ``fn(prompts, completions, **columns) -> list[float]`` to the configured rewards."""

    def __init__(self, config: GRPOConfig, reward_funcs: list[Callable] | None = None, model=None, tokenizer=None):
        self.config = config
        check_resume_setting(config)
        seed_everything(config.seed, deterministic=config.deterministic)
        self.device = dist.setup_device(config.device)  # joins the process group under torchrun
        loaded = load_rl_models(config, self.device, who="GRPOTrainer", reward_funcs=reward_funcs, model=model,
                                tokenizer=tokenizer)
        self.rewards, self.tokenizer, self.policy, self.reference = loaded.rewards, loaded.tokenizer, loaded.policy, loaded.reference
        self.prompts, self.eval_prompts = loaded.prompts, loaded.eval_prompts
        self.generator = torch.Generator(device="cpu").manual_seed(config.seed)
        self.last_metrics: dict[str, float] = {}

    # -- the pieces of one step ------------------------------------------------------------

    def collect(self, sampler: PromptSampler) -> tuple[ScoredBatch | None, dict[str, float]]:
        """Steps 1-3: sample prompts, generate G completions each, score; dynamic sampling."""
        cfg, G = self.config, self.config.group_size
        batches: list[ScoredBatch] = []
        kept_groups = 0
        rounds = 0
        info: dict[str, float] = {}
        while True:
            batch = self.sample_round(sampler)
            if cfg.overlong_cache_length is not None:
                penalty = soft_overlong_penalty(batch.rollout.completion_lengths.cpu(), cfg.max_completion_length,
                                                cfg.overlong_cache_length)
                batch.scores.per_function["overlong"] = penalty
                batch.scores.total = batch.scores.total + penalty
            if rounds == 0:
                info = self._rollout_metrics(batch)
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

    def sample_round(self, sampler: PromptSampler) -> ScoredBatch:
        """``prompts_per_step`` prompts x G completions, scored. Counter-based sampling seeded by
        (seed, sampler position, prompt index in the draw, completion index), so the completions
        do not depend on how the draw is split: data parallel, each rank generates and scores its
        contiguous share of the prompts and every rank gets the whole batch back, in draw order."""
        cfg, G = self.config, self.config.group_size
        draw = (sampler.epoch, sampler.cursor)
        indices = sampler.take(cfg.prompts_per_step)
        seeds = dist.sampling_row_seeds(cfg.seed, draw, len(indices), G)
        lo, hi = dist.shard_range(len(indices))
        local = None
        if hi > lo:
            local = sample_and_score(self.policy, self.tokenizer, self.prompts, indices[lo:hi], G, cfg, self.rewards,
                                     self.generator, self.device, row_seeds=seeds[lo * G:hi * G])
        batch = dist.gather_scored_batches(local, concat_batches, self.tokenizer.pad_token_id, self.device)
        if dist.is_distributed():  # each rank counted its own reward faults; keep the run's totals global
            mine = local.scores.n_faults if local is not None else {}
            for name, n in batch.scores.n_faults.items():
                self.rewards.fault_totals[name] = self.rewards.fault_totals.get(name, 0) + n - mine.get(name, 0)
        return batch

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

    def _rollout_metrics(self, batch: ScoredBatch) -> dict[str, float]:
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

    def loss_mask(self, rollout: Rollout) -> torch.Tensor:
        mask = rollout.completion_mask
        if self.config.mask_truncated_completions:
            mask = mask & ~rollout.truncated[:, None]
        return mask

    def micro_loss(self, rollout: Rollout, advantages, old_logp, ref_logp, mask) -> tuple[torch.Tensor, dict[str, float]]:
        """Step 6 for one micro-batch: surrogate (token or sequence ratio) + beta * KL."""
        cfg = self.config
        logp, entropy = completion_logprobs(self.policy, rollout, temperature=cfg.temperature,
                                            chunk_size=cfg.logprob_chunk_size, return_entropy=True)
        old = logp.detach() if old_logp is None else old_logp
        if cfg.importance_level == "sequence":
            clip_high = cfg.clip_high if cfg.clip_high is not None else cfg.clip_low
            loss, m = sequence_policy_loss(logp, old, advantages, mask, clip_low=cfg.clip_low, clip_high=clip_high)
        else:
            loss, m = policy_loss(logp, old, advantages, mask, clip_low=cfg.clip_low, clip_high=cfg.clip_high,
                                  aggregation=cfg.loss_aggregation, max_len=cfg.max_completion_length)
        metrics = {f"policy/{k}": float(v) for k, v in m.items()}
        valid = mask.sum().clamp(min=1)
        metrics["policy/entropy"] = float((entropy * mask).sum() / valid)
        if ref_logp is not None:
            kl = kl_penalty(logp, ref_logp, cfg.kl_estimator)
            kl_term = aggregate(kl, mask, "token_mean" if cfg.importance_level == "sequence" else cfg.loss_aggregation,
                                max_len=cfg.max_completion_length)
            loss = loss + cfg.beta * kl_term
            metrics["kl/ref"] = float((kl.detach() * mask).sum() / valid)
        return loss, metrics

    def normalizer(self, mask: torch.Tensor) -> int:
        """What the loss aggregation divides by: valid tokens (token_mean), non-empty sequences
        (seq_mean), sequences (seq_sum_constant and the sequence-level ratio)."""
        cfg = self.config
        if cfg.importance_level == "token" and cfg.loss_aggregation == "token_mean":
            return int(mask.sum())
        if cfg.importance_level == "token" and cfg.loss_aggregation == "seq_mean":
            return int(mask.any(dim=1).sum())
        return int(mask.shape[0])

    def micro_weight(self, mask: torch.Tensor, rows: torch.Tensor, total: int | None = None) -> float:
        """Share of a micro-batch in the whole batch's normalizer (``total``: the global one,
        summed over data-parallel ranks; default this batch's), so accumulation is exact."""
        whole = self.normalizer(mask) if total is None else total
        return self.normalizer(mask[rows]) / max(float(whole), 1.0)

    # -- the loop --------------------------------------------------------------------------

    def train(self) -> dict[str, Any]:
        cfg = self.config
        run = Run.open(cfg)
        policy = self.policy
        optimizer = make_optimizer(policy.parameters(), cfg)
        scheduler = make_scheduler(optimizer, cfg, cfg.max_steps * cfg.num_iterations)
        started = time.time()
        loop, _ = LoopState.start(self, run, {"policy": policy}, {"policy": optimizer}, {"policy": scheduler},
                                  {"sampling": self.generator})
        sampler, faults = loop.sampler, loop.faults

        def checkpoint(step: int) -> None:
            if run.should_save(step, cfg.max_steps, faults):
                run.save(step, {"policy": policy}, {"policy": optimizer}, {"policy": scheduler}, loop.checkpoint_state(),
                         {"sampling": self.generator}, tokenizer=self.tokenizer)
        bar = progress(total=cfg.max_steps, initial=run.start_step, desc="grpo", disable=not cfg.progress or None)
        step = run.start_step
        threads = StepThreads(self.device)  # CPU: torch's thread count, or 1 where decoding found 1 faster
        while step < cfg.max_steps:
            t0 = time.time()
            threads.start_step()
            # 1-3. prompts -> G completions each (old policy) -> rewards
            batch, metrics = self.collect(sampler)
            threads.follow_decode()
            gen_seconds = time.time() - t0
            if batch is None:  # every group had equal rewards: nothing to learn from this step
                step += 1
                metrics.update({"optim/skipped": 1.0, "perf/step_seconds": time.time() - t0})
                run.log(step, metrics)
                bar.update(1)
                checkpoint(step)
                continue
            n_generated = int(batch.rollout.completion_mask.sum())
            # 4. group-normalized advantages, one per completion
            advantages = group_advantages(batch.scores.total.to(self.device), cfg.group_size, cfg.advantage_scale)
            all_advantages = advantages
            # data parallel: all above is global (equal on every rank); the update runs on this
            # rank's groups with the global normalizer; guarded_step sums the gradients
            batch, advantages, share = self.local_share(batch, advantages)
            rollout = batch.rollout
            mask = self.loss_mask(rollout)
            normalizer = dist.all_reduce_sum(self.normalizer(mask) if share else 0)
            # 5. old log-probs (needed only when mu > 1: at mu = 1 old == current, ratio exactly 1)
            # (computed over the same micro-batches as the update, so iteration 1's ratio is exactly 1)
            n_rows = rollout.prompt_ids.shape[0]
            micro = -(-n_rows // cfg.gradient_accumulation_steps)
            old_logp = None
            if cfg.num_iterations > 1:
                old_logp = batched_completion_logprobs(policy, rollout, batch_size=micro,
                                                       temperature=cfg.temperature, chunk_size=cfg.logprob_chunk_size)
            ref_logp = None
            if cfg.beta > 0:
                with reference_context(policy, self.reference) as ref_model:
                    ref_logp = batched_completion_logprobs(ref_model, rollout, batch_size=cfg.forward_batch_size,
                                                           temperature=cfg.temperature, chunk_size=cfg.logprob_chunk_size)
            # 6. mu updates over the same rollouts
            policy.train()
            update_metrics: dict[str, float] = {}
            skipped = 0
            for iteration in range(cfg.num_iterations):
                sums: dict[str, float] = {}
                total_loss = 0.0
                for rows in torch.arange(n_rows).split(micro):
                    weight = self.micro_weight(mask, rows, normalizer) * share
                    loss, m = self.micro_loss(
                        rollout.select(rows.to(self.device)), advantages[rows],
                        None if old_logp is None else old_logp[rows], None if ref_logp is None else ref_logp[rows],
                        mask[rows],
                    )
                    (loss * weight).backward()
                    total_loss += float(loss.detach()) * weight
                    for k, v in m.items():
                        sums[k] = sums.get(k, 0.0) + v * weight
                total_loss, sums = dist.all_reduce_sum(total_loss), dist.sum_across_ranks(sums)
                grad_norm, applied = guarded_step(policy, optimizer, scheduler, cfg.max_grad_norm, faults,
                                                  f"grpo step {step + 1} iteration {iteration + 1}", loss=total_loss)
                skipped += not applied
                update_metrics = {**sums, "loss/total": total_loss, "optim/grad_norm": grad_norm,
                                  "optim/skipped": float(skipped)}
            # 7. refresh, log, evaluate, checkpoint
            step += 1
            step_seconds = time.time() - t0
            metrics.update(update_metrics)
            metrics.update({
                "adv/mean": float(all_advantages.mean()), "adv/std": float(all_advantages.std(unbiased=False)),
                "adv/abs_mean": float(all_advantages.abs().mean()), "optim/lr": scheduler.get_last_lr()[0],
                "perf/step_seconds": step_seconds, "perf/generation_seconds": gen_seconds,
                "perf/tokens_per_second": n_generated / max(gen_seconds, 1e-9),
            })
            metrics.update(loop.evaluate_if_due(step))
            run.log(step, metrics)
            self.last_metrics = metrics
            bar.update(1)
            bar.set_postfix(format_postfix(metrics, ["reward/mean", "kl/ref", "eval/accuracy"]))
            checkpoint(step)
        threads.restore()
        bar.close()
        final_dir = dist.on_main(save_model, policy, self.tokenizer, Path(cfg.output_dir) / "final")
        summary = loop.summary(run, step, started, final_dir)
        dist.on_main(write_json_atomic, Path(cfg.output_dir) / "train_summary.json", summary)
        run.close()
        return summary
