"""Reward-model training on preference pairs with the Bradley-Terry loss.

Model: an LM trunk with a scalar head (:class:`trustrl.value_model.ScalarHeadModel`); the
score of a prompt + response is the head at its last token (an EOS appended to every text).
Data: rows ``(prompt, chosen, rejected)`` and an optional ``margin`` column.

Loss (Bradley & Terry 1952; Ouyang et al. 2022, arXiv 2203.02155; margin as in Llama 2,
Touvron et al. 2023; centering as in Eisenstein et al. 2023)::

    P(chosen > rejected) = sigmoid(r_c - r_r)
    L = mean_i -log sigmoid(r_c,i - r_r,i - margin_i)  +  coef * mean_i (r_c,i + r_r,i)^2

One optimizer step:
  1. take the next ``batch_size`` pairs (resumable, shuffled);
  2. per micro-batch (``gradient_accumulation_steps``), score chosen and rejected texts in one
     forward pass; the loss is a *sum* over the micro-batch's pairs
     (:func:`reward_model_loss_sum`), divided by the pairs of the whole batch (all micro-batches,
     all data-parallel ranks) by :class:`trustrl.loop.accumulate.BatchNormalizer` -- the one
     place it is normalized, so 1 x N == N x 1 -- backward;
  3. guarded optimizer step; log ``loss/bt``, ``rm/train_accuracy``;
  4. every ``eval_every`` steps (and at the start and the end) the held-out pairwise accuracy
     ``rm/accuracy`` (share of pairs with r_c > r_r) and mean margin ``rm/margin`` (mean r_c - r_r).

Rankings of K responses (rows ``(prompt, responses, ranks)``, or the judgement log written by
``trustrl label``; see :mod:`trustrl.rankings`): one ranking is one batch element, scored in one
forward pass with its K responses. ``rank_loss: pairwise`` (default) is Bradley-Terry over
all its K(K-1)/2 pairs, averaged within the ranking (Ouyang et al. 2022: one prompt's many
pairs neither dominate the batch nor overfit); ties left out or pulled together
(``rank_ties``); ``rank_loss: plackett_luce`` is the listwise likelihood of the whole order.
Both are sums over rankings (:func:`trustrl.losses.ranking_pairwise_sum`,
:func:`trustrl.losses.plackett_luce_sum`) normalized by the rankings of the whole batch, the
same one normalizer as pairs. Held-out ``rm/accuracy`` is then the share of the held-out
rankings' strictly ordered pairs that the model orders right.

Texts: each (prompt, response) is encoded by :func:`trustrl.value_model.encode_scored_pair`
(the prompt formatted as configured -- chat template, ``system_prompt`` -- then prompt + response
+ EOS under the BOS policy). That format is recorded in ``trustrl_head.json`` (``prompt_format``)
and the RL reward and the label judge encode their pairs with it through the same function.

The final model is saved to ``output_dir/final`` (trunk + tokenizer + ``value_head.safetensors``
+ ``trustrl_head.json``) and loads with :func:`trustrl.value_model.load_scalar_model`, or as a
reward with ``reward_model: output_dir/final`` in an RL config.
"""

from __future__ import annotations

import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trustrl import distributed as dist
from trustrl import parallel
from trustrl.config import ConfigError, RewardConfig  # noqa: F401 (RewardConfig: importable from here too)
from trustrl.data import DataError, load_rows, source_name
from trustrl.logging import format_postfix, progress
from trustrl.loop.accumulate import BatchNormalizer, token_budget_micro_batches
from trustrl.loop.stops import GracefulStop, announce_stop, resume_hint
from trustrl.losses import (LossSum, bradley_terry_loss, bradley_terry_sum, plackett_luce_sum, ranking_pairwise_sum,
                            reward_centering_sum)
from trustrl.models import check_vocab, load_tokenizer
from trustrl.rankings import check_ranks, current_judgements
from trustrl.rollout import left_pad
from trustrl.trainers.common import (Run, check_positions, check_resume_setting, guarded_step, make_optimizer,
                                     make_scheduler, restore_loop, warn_skipped, warn_truncated)
from trustrl.trainers.sft import steps_for_epochs
from trustrl.utils import seed_everything
from trustrl.value_model import (PROMPT_FORMAT_KEY, ScalarHeadModel, encode_scored_pair, prompt_format_record,
                                 save_final_scalar_model, scalar_model_from_lm)


@dataclass
class PairSet:
    """Tokenized preference pairs: ids of prompt+chosen+EOS and prompt+rejected+EOS, margins."""

    chosen: list[list[int]]
    rejected: list[list[int]]
    margins: list[float]
    skipped: int = 0  # malformed rows left out (skip_bad_rows=true)
    truncated: int = 0  # pairs whose chosen or rejected text was cut to max_length (0 in a subset)

    def __len__(self) -> int:
        return len(self.chosen)

    def subset(self, indices: list[int]) -> "PairSet":
        return PairSet([self.chosen[i] for i in indices], [self.rejected[i] for i in indices],
                       [self.margins[i] for i in indices])


def load_pairs(path, config: RewardConfig, tokenizer, limit: int | None = None) -> PairSet:
    """Read, validate and tokenize the pairs of one file (errors name the file and the row)."""
    cols = (config.prompt_column, config.chosen_column, config.rejected_column)
    loaded = load_rows(path, required=cols, skip_bad=config.skip_bad_rows, limit=limit,
                       types={config.margin_column: (int, float)} if config.margin_column else None)
    warn_skipped(loaded.skipped, source_name(path))
    chosen, rejected, margins = [], [], []
    truncated = identical = 0
    prompt_format = prompt_format_record(tokenizer, config.use_chat_template, config.system_prompt)
    for row_no, row in enumerate(loaded.rows, start=1):
        for key in (config.chosen_column, config.rejected_column):
            if not isinstance(row[key], str):
                raise loaded.error(row_no - 1, f"must be a string response, got {type(row[key]).__name__}",
                                   column=key)
        # the one encoding of a (prompt, response) pair that the RL reward and the label judge use too
        pair = [encode_scored_pair(tokenizer, row[config.prompt_column], row[key], prompt_format)
                for key in (config.chosen_column, config.rejected_column)]
        # encode_scored_pair's own cut, made here so the cut pairs can be counted: keep the last max_length
        kept = [ids[-config.max_length:] for ids in pair]
        if kept[0] == kept[1]:  # r_c - r_r is 0 whatever the weights: no gradient, and never "accurate"
            identical += 1
            continue
        truncated += any(len(ids) > config.max_length for ids in pair)
        chosen.append(kept[0])
        rejected.append(kept[1])
        margin = row.get(config.margin_column) if config.margin_column else None
        margins.append(0.0 if margin is None else float(margin))
    if identical:  # as load_rankings leaves out rankings that tie every response
        warnings.warn(f"{source_name(path)}: left out {identical} pairs whose chosen and rejected texts are the same "
                      f"tokens after the max_length cut (nothing to learn)", stacklevel=2)
    if not chosen:
        raise DataError(source_name(path), "no pair whose chosen and rejected texts differ")
    warn_truncated(truncated, source_name(path), f"of {len(chosen)} pairs have a text (prompt + response + EOS) longer "
                   f"than max_length={config.max_length} tokens; its beginning is cut",
                   "data/truncated_pairs" if limit is None else "data/truncated_eval_pairs")
    return PairSet(chosen, rejected, margins, loaded.skipped, truncated)


def pair_scores(model: ScalarHeadModel, pairs: PairSet, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen [N], r_rejected [N]) in one forward pass over the 2N texts."""
    ids, mask = left_pad(pairs.chosen + pairs.rejected, pad_id)
    scores = model.score(ids.to(device), mask.to(device))
    n = len(pairs)
    return scores[:n], scores[n:]


def reward_model_loss_sum(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margins: torch.Tensor | None,
                          center_coef: float | None) -> tuple[LossSum, dict[str, float]]:
    """The reward-model loss of a batch of pairs as a sum over its ``N`` pairs, before
    normalization: ``total = sum_i -log sigmoid(r_c,i - r_r,i - m_i) + coef * sum_i (r_c,i +
    r_r,i)^2``, ``count = N``. Metrics are sums over the pairs too (``bt``, ``center``,
    ``accuracy``: pairs with r_c > r_r, ``margin``: sum of r_c - r_r); divide by the pairs."""
    bt = bradley_terry_sum(r_chosen, r_rejected, margins)
    total = bt.total
    metrics = {"bt": float(bt.total.detach())}
    if center_coef:
        center = center_coef * reward_centering_sum(r_chosen, r_rejected).total
        total = total + center
        metrics["center"] = float(center.detach())
    with torch.no_grad():
        metrics["accuracy"] = float((r_chosen > r_rejected).sum())
        metrics["margin"] = float((r_chosen - r_rejected).sum())
    return LossSum(total, bt.count, bt.unit), metrics


def reward_model_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margins: torch.Tensor | None,
                      center_coef: float | None) -> tuple[torch.Tensor, dict[str, float]]:
    """Bradley-Terry loss plus the optional centering term, averaged over the pairs of this one
    batch (:func:`reward_model_loss_sum` divided by ``N``); metrics are un-namespaced floats."""
    part, sums = reward_model_loss_sum(r_chosen, r_rejected, margins, center_coef)
    n = max(float(part.count), 1.0)
    return part.total / n, {k: v / n for k, v in sums.items()}


@torch.no_grad()
def evaluate_pairs(model: ScalarHeadModel, pairs: PairSet, pad_id: int, device, batch_size: int) -> dict[str, float]:
    """Held-out ``rm/accuracy`` (share of pairs with r_c > r_r; ties count as wrong), ``rm/margin``
    (mean r_c - r_r), ``rm/loss`` (Bradley-Terry with the margins), score mean and std."""
    was_training = model.training
    model.eval()
    rc, rr = [], []
    for start in range(0, len(pairs), batch_size):
        c, r = pair_scores(model, pairs.subset(list(range(start, min(len(pairs), start + batch_size)))), pad_id, device)
        rc.append(c.float().cpu())
        rr.append(r.float().cpu())
    parallel.reshard(model)  # (FSDP: free the gathered root unit after no-grad passes)
    model.train(was_training)
    r_c, r_r = torch.cat(rc), torch.cat(rr)
    margins = torch.tensor(pairs.margins, dtype=torch.float32)
    both = torch.cat([r_c, r_r])
    return {
        "rm/accuracy": float((r_c > r_r).float().mean()),
        "rm/margin": float((r_c - r_r).mean()),
        "rm/loss": float(bradley_terry_loss(r_c, r_r, margins)),
        "rm/score_mean": float(both.mean()),
        "rm/score_std": float(both.std(unbiased=False)),
    }


# ------------------------------------------------------------------ rankings of K responses


@dataclass
class RankingSet:
    """Tokenized rankings: per ranking the ids of prompt+response+EOS for each of its K
    responses, and their ranks (1 = best, equal = tie)."""

    texts: list[list[list[int]]]
    ranks: list[list[int]]
    skipped: int = 0  # malformed rows left out (skip_bad_rows=true)
    truncated: int = 0  # rankings with a response text cut to max_length (0 in a subset)

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: list[int]) -> "RankingSet":
        return RankingSet([self.texts[i] for i in indices], [self.ranks[i] for i in indices])


def is_rankings_file(path, config: RewardConfig) -> bool:
    """``data_format``, or for ``auto``: does the first row hold ``responses_column`` or an
    ``action`` (a judgement log)?"""
    if config.data_format != "auto":
        return config.data_format == "rankings"
    first = load_rows(path, required=(), limit=1, skip_bad=True).rows[0]
    return config.responses_column in first or "action" in first


def _has_comparison(ranks: list[int], config: RewardConfig) -> bool:
    if config.rank_loss == "pairwise" and config.rank_ties == "half":
        return len(ranks) >= 2
    return len(set(ranks)) >= 2  # skip / Plackett-Luce: an all-tied ranking says nothing


def _ranks_same_tokens_apart(texts: list[list[int]], ranks: list[int]) -> bool:
    """True when two responses with the same token ids have different ranks: r_i - r_j is 0
    for any weights, so that comparison has no gradient and is never ranked right."""
    return any(texts[i] == texts[j] and ranks[i] != ranks[j]
               for i in range(len(texts)) for j in range(i + 1, len(texts)))


def load_rankings(path, config: RewardConfig, tokenizer, limit: int | None = None) -> RankingSet:
    """Read, validate and tokenize the rankings of one file: a rankings file, or a judgement
    log replayed to the rankings in force (skips and undone rows left out). Rankings without
    any comparison (all tied, unless ``rank_ties: half``) are left out with a warning; errors
    name the file and the ranking."""
    loaded = load_rows(path, required=(), skip_bad=config.skip_bad_rows)
    name = source_name(path)
    warn_skipped(loaded.skipped, name)
    rows = [r for r in current_judgements(loaded.rows, where=name) if r.get("action", "rank") == "rank"]
    texts, ranks, no_comparison, truncated, contradictory = [], [], 0, 0, 0
    prompt_format = prompt_format_record(tokenizer, config.use_chat_template, config.system_prompt)
    for row_no, row in enumerate(rows, start=1):
        where = f"{name} ranking {row_no}"
        for key in (config.prompt_column, config.responses_column, config.ranks_column):
            if row.get(key) is None:
                raise DataError(name, f"column {key!r} is missing (a ranking needs {config.prompt_column!r}, "
                                f"{config.responses_column!r} and {config.ranks_column!r})", row_label=f"ranking {row_no}")
        responses = row[config.responses_column]
        if not isinstance(responses, list) or len(responses) < 2 or not all(isinstance(r, str) for r in responses):
            raise DataError(name, "must be a list of 2 or more strings", row_label=f"ranking {row_no}",
                            column=config.responses_column)
        order = check_ranks(row[config.ranks_column], len(responses), where)
        if not _has_comparison(order, config):
            no_comparison += 1
            continue
        full = [encode_scored_pair(tokenizer, row[config.prompt_column], r, prompt_format) for r in responses]
        truncated += any(len(ids) > config.max_length for ids in full)
        texts.append([ids[-config.max_length:] for ids in full])  # encode_scored_pair's cut: the last max_length
        ranks.append(order)
        contradictory += _ranks_same_tokens_apart(texts[-1], order)
        if limit is not None and len(texts) >= limit:
            break
    if no_comparison:
        warnings.warn(f"{name}: left out {no_comparison} rankings that tie every response (nothing to learn)",
                      stacklevel=2)
    if contradictory:  # kept: the ranking's other comparisons are sound; said, as identical pairs are
        warnings.warn(f"{name}: {contradictory} rankings rank the same response (same tokens) at two different "
                      "ranks; such a comparison teaches nothing and counts as a miss in rm/accuracy", stacklevel=2)
    if not texts:
        raise DataError(name, "no ranking with two differently ranked responses")
    warn_truncated(truncated, name, f"of {len(texts)} rankings have a text (prompt + response + EOS) longer than "
                   f"max_length={config.max_length} tokens; its beginning is cut",
                   "data/truncated_pairs" if limit is None else "data/truncated_eval_pairs")
    return RankingSet(texts, ranks, loaded.skipped, truncated)


def ranking_scores(model: ScalarHeadModel, rankings: RankingSet, pad_id: int, device
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(scores [N, K], ranks [N, K], valid [N, K])`` with all responses of the N rankings
    in one forward pass; rankings of fewer than K = max responses are padded (score 0,
    rank 0, valid False)."""
    flat = [ids for texts in rankings.texts for ids in texts]
    ids, mask = left_pad(flat, pad_id)
    flat_scores = model.score(ids.to(device), mask.to(device))
    n, width = len(rankings), max(len(t) for t in rankings.texts)
    valid = torch.zeros(n, width, dtype=torch.bool)
    ranks = torch.zeros(n, width, dtype=torch.long)
    for row, order in enumerate(rankings.ranks):
        valid[row, :len(order)] = True
        ranks[row, :len(order)] = torch.tensor(order)
    valid, ranks = valid.to(flat_scores.device), ranks.to(flat_scores.device)
    scores = torch.zeros(n, width, dtype=flat_scores.dtype, device=flat_scores.device)
    scores = scores.masked_scatter(valid, flat_scores)  # row-major: ranking by ranking
    return scores, ranks, valid


def ranking_loss_sum(scores: torch.Tensor, ranks: torch.Tensor, valid: torch.Tensor, config: RewardConfig
                     ) -> tuple[LossSum, dict[str, float]]:
    """The configured ranking loss summed over the N rankings (count N, unit ``rows``), and
    metric sums over the rankings: ``rank`` (the loss), ``accuracy`` (per ranking, the share
    of its strictly ordered pairs scored in that order), ``margin`` (per ranking, the mean of
    s_winner - s_loser over those pairs)."""
    if config.rank_loss == "plackett_luce":
        part = plackett_luce_sum(scores, ranks, valid)
    else:
        part = ranking_pairwise_sum(scores, ranks, valid, ties=config.rank_ties)
    with torch.no_grad():
        better = valid[:, :, None] & valid[:, None, :] & (ranks[:, :, None] < ranks[:, None, :])
        diff = scores[:, :, None] - scores[:, None, :]
        pairs = better.sum(dim=(1, 2)).clamp_min(1)
        right = (better & (diff > 0)).sum(dim=(1, 2)) / pairs
        margin = torch.where(better, diff, torch.zeros_like(diff)).sum(dim=(1, 2)) / pairs
    return part, {"rank": float(part.total.detach()), "accuracy": float(right.sum()), "margin": float(margin.sum())}


@torch.no_grad()
def evaluate_rankings(model: ScalarHeadModel, rankings: RankingSet, pad_id: int, device, batch_size: int,
                      config: RewardConfig) -> dict[str, float]:
    """Held-out ``rm/accuracy`` (share of all strictly ordered pairs of the rankings with
    s_winner > s_loser; equal scores count as wrong), ``rm/margin`` (mean s_winner - s_loser
    over those pairs), ``rm/loss`` (the ranking loss, mean over rankings), score mean and std.
    ``batch_size`` counts rankings."""
    was_training = model.training
    model.eval()
    right = pairs = 0
    margin_sum = loss_sum = 0.0
    all_scores = []
    for start in range(0, len(rankings), batch_size):
        part = rankings.subset(list(range(start, min(len(rankings), start + batch_size))))
        scores, ranks, valid = ranking_scores(model, part, pad_id, device)
        scores = scores.float()
        loss, _ = ranking_loss_sum(scores, ranks, valid, config)
        loss_sum += float(loss.total)
        better = valid[:, :, None] & valid[:, None, :] & (ranks[:, :, None] < ranks[:, None, :])
        diff = scores[:, :, None] - scores[:, None, :]
        right += int((better & (diff > 0)).sum())
        pairs += int(better.sum())
        margin_sum += float(diff[better].sum())
        all_scores.append(scores[valid].cpu())
    parallel.reshard(model)  # (FSDP: free the gathered root unit after no-grad passes)
    model.train(was_training)
    both = torch.cat(all_scores)
    return {
        "rm/accuracy": right / max(pairs, 1), "rm/margin": margin_sum / max(pairs, 1),
        "rm/loss": loss_sum / max(len(rankings), 1),
        "rm/score_mean": float(both.mean()), "rm/score_std": float(both.std(unbiased=False)),
    }


class RewardTrainer:
    """``RewardTrainer(config).train()`` -> summary dict (``model_dir``, accuracies, history)."""

    def __init__(self, config: RewardConfig, model: ScalarHeadModel | None = None, tokenizer=None):
        self.config = config
        check_resume_setting(config)
        seed_everything(config.seed, deterministic=config.deterministic)
        self.device = dist.setup_device(config.device)  # joins the process group under torchrun
        self.tokenizer = tokenizer or load_tokenizer(config.tokenizer or config.model)
        if model is not None:
            check_vocab(model.trunk, self.tokenizer, "the model passed to RewardTrainer")
        if config.lora is not None:
            raise ConfigError("rm: lora is not supported for reward models yet; remove the `lora:` section")
        self.model = model if model is not None else scalar_model_from_lm(
            config.model, kind="reward", zero_head=False, dtype=config.dtype, device=self.device,
            tokenizer=self.tokenizer, gradient_checkpointing=config.gradient_checkpointing, seed=config.seed,
        )
        self.model.kind = "reward"
        parallel.apply(self.model, config.parallelism, self.device, root=self.model.trunk)  # fsdp: shard it
        self.model.extra["max_length"] = config.max_length
        # how prompts are formatted (trustrl_head.json): scorers of the saved model format theirs alike
        self.model.extra[PROMPT_FORMAT_KEY] = prompt_format_record(self.tokenizer, config.use_chat_template,
                                                                   config.system_prompt)
        self.rankings = is_rankings_file(config.dataset, config)
        if self.rankings and config.center_rewards_coef:
            raise ConfigError("rm: center_rewards_coef is defined on pairs; with rankings leave it unset "
                             f"({source_name(config.dataset)} holds rankings)")
        load = load_rankings if self.rankings else load_pairs
        pairs = load(config.dataset, config, self.tokenizer)
        self.skipped_rows = pairs.skipped
        # counted before any eval_fraction split (rankings: rankings with a cut response)
        self.data_counts = {"data/truncated_pairs": pairs.truncated}
        if config.eval_dataset:
            if is_rankings_file(config.eval_dataset, config) != self.rankings:
                raise ConfigError(f"rm: dataset {source_name(config.dataset)} and eval_dataset "
                                 f"{source_name(config.eval_dataset)} must both "
                                 "hold pairs or both hold rankings")
            self.eval_pairs: PairSet | RankingSet | None = load(config.eval_dataset, config, self.tokenizer,
                                                                limit=config.max_eval_pairs)
            self.skipped_rows += self.eval_pairs.skipped
        elif config.eval_fraction > 0:
            order = list(range(len(pairs)))
            random.Random(config.seed).shuffle(order)
            n_eval = max(1, int(round(config.eval_fraction * len(pairs))))
            if n_eval >= len(pairs):
                raise ConfigError(f"rm: eval_fraction={config.eval_fraction} leaves no training pairs in {source_name(config.dataset)}")
            self.eval_pairs = pairs.subset(order[:n_eval][: config.max_eval_pairs])
            pairs = pairs.subset(order[n_eval:])
        else:
            self.eval_pairs = None
        self.pairs = pairs
        texts = [t for p in (pairs, self.eval_pairs) if p is not None
                 for t in ([x for ts in p.texts for x in ts] if self.rankings else p.chosen + p.rejected)]
        check_positions(self.model.trunk, max(len(t) for t in texts), "max_length", config.model)
        self.max_steps = steps_for_epochs(config, len(pairs), "training rankings" if self.rankings else "training pairs")
        if config.epochs is not None:  # the run directory's config.yaml says how many steps were run
            self.config = config.model_copy(update={"max_steps": self.max_steps})

    def micro_batches(self, batch) -> list[torch.Tensor]:
        """Row indices of a step's micro-batches: ``gradient_accumulation_steps`` equal row
        counts, or by a token budget (``micro_batch_tokens``) over rows sorted by the padded
        size of their one forward pass: 2 x the longer text of a pair; for a ranking, K_max (the
        batch's most responses: every ranking is padded to it) x its longest response."""
        cfg = self.config
        if not cfg.micro_batch_tokens:
            return list(torch.arange(len(batch)).chunk(cfg.gradient_accumulation_steps))
        if self.rankings:
            k_max = max(len(texts) for texts in batch.texts)
            sizes = [k_max * max(len(t) for t in texts) for texts in batch.texts]
        else:
            sizes = [2 * max(len(c), len(r)) for c, r in zip(batch.chosen, batch.rejected)]
        return token_budget_micro_batches(sizes, cfg.micro_batch_tokens)

    def evaluate(self) -> dict[str, float]:
        assert self.eval_pairs is not None
        if self.rankings:
            return evaluate_rankings(self.model, self.eval_pairs, self.tokenizer.pad_token_id, self.device,
                                     self.config.eval_batch_size, self.config)
        return evaluate_pairs(self.model, self.eval_pairs, self.tokenizer.pad_token_id, self.device,
                              self.config.eval_batch_size)

    def train(self) -> dict[str, Any]:
        cfg = self.config
        run = Run.open(cfg)
        model = self.model
        model.train()
        optimizer = make_optimizer(model.parameters(), cfg)
        scheduler = make_scheduler(optimizer, cfg, self.max_steps)
        sampler, faults, state = restore_loop(run, cfg, len(self.pairs), {"reward_model": model},
                                              {"reward_model": optimizer}, {"reward_model": scheduler}, {})
        run.set_skipped_rows(self.skipped_rows)
        run.record_data_counts(self.data_counts)
        history: list[dict[str, float]] = list(state.get("eval_history", []))
        pad = self.tokenizer.pad_token_id
        started = time.time()
        if run.start_step == 0 and self.eval_pairs is not None:
            first = self.evaluate()
            history.append({"step": 0, **first})
            run.logger.log(0, first)
        bar = progress(total=self.max_steps, initial=run.start_step, desc="rm", disable=not cfg.progress or None)
        step = run.start_step
        last_loss = float("nan")
        stopped_by = None
        with GracefulStop() as stop:  # a clean stop between steps (Ctrl-C)
            while step < self.max_steps:
                t0 = time.time()
                # 1. the next pairs
                # (data parallel: every rank draws the same pairs and keeps its contiguous share)
                indices = sampler.take(cfg.batch_size)
                batch = self.pairs.subset(dist.shard_batch(indices, "batch_size"))
                # 2. the normalizer: pairs of the global batch (all micro-batches and ranks); each
                # micro-batch's summed loss is divided by it, once
                # (one row per pair: a [pairs, 1] mask counts them in the unit "rows")
                normalizer = BatchNormalizer([torch.ones(len(batch), 1, dtype=torch.bool)])
                n = normalizer.counts["rows"]
                sums: dict[str, float] = {}
                total = 0.0
                # (FSDP: as many passes on every rank; a stand-in pass has weight 0)
                for rows, live in parallel.lockstep(self.micro_batches(batch), sharded=parallel.is_sharded(model)):
                    micro = batch.subset(rows.tolist())
                    if self.rankings:  # one ranking = one row, its K responses in one forward pass
                        part, m = ranking_loss_sum(*ranking_scores(model, micro, pad, self.device), cfg)
                    else:
                        r_c, r_r = pair_scores(model, micro, pad, self.device)
                        margins = torch.tensor(micro.margins, dtype=r_c.dtype, device=r_c.device)
                        part, m = reward_model_loss_sum(r_c, r_r, margins, cfg.center_rewards_coef)
                    (normalizer.loss([(1.0, part)]) * live).backward()
                    total += float(part.total.detach()) * live
                    for k, v in m.items():
                        sums[k] = sums.get(k, 0.0) + v * live
                total, sums = dist.all_reduce_sum(total), dist.sum_across_ranks(sums)
                total, sums = total / max(n, 1.0), {k: v / max(n, 1.0) for k, v in sums.items()}
                # 3. guarded update (data parallel: it sums the gradients over ranks)
                grad_norm, applied = guarded_step(model, optimizer, scheduler, cfg.max_grad_norm, faults, f"rm step {step + 1}",
                                                  loss=total)
                step += 1
                last_loss = total
                metrics = {
                    "loss/total": total, ("loss/rank" if self.rankings else "loss/bt"): sums["rank" if self.rankings else "bt"],
                    "rm/train_accuracy": sums["accuracy"],
                    "rm/train_margin": sums["margin"], "optim/grad_norm": grad_norm,
                    "optim/lr": scheduler.get_last_lr()[0], "optim/skipped": float(not applied),
                    "perf/step_seconds": time.time() - t0,
                }
                if "center" in sums:
                    metrics["loss/center"] = sums["center"]
                # 4. held-out evaluation
                if self.eval_pairs is not None and (
                        step == self.max_steps or (cfg.eval_every > 0 and step % cfg.eval_every == 0)):
                    ev = self.evaluate()
                    history.append({"step": step, **ev})
                    metrics.update(ev)
                run.log(step, metrics)
                bar.update(1)
                bar.set_postfix(format_postfix(metrics, ["loss/rank" if self.rankings else "loss/bt", "rm/accuracy"]))
                stopping = stop.requested() and step < self.max_steps  # SIGINT/SIGTERM: joint decision
                if stopping or run.should_save(step, self.max_steps, faults):
                    path = run.save(step, {"reward_model": model}, {"reward_model": optimizer},
                                    {"reward_model": scheduler},
                                    {"sampler": sampler.state_dict(), "eval_history": history, "faults": faults.state_dict()},
                                    {}, tokenizer=self.tokenizer)
                if stopping:
                    stopped_by = stop.signal_name or "a signal on another rank"
                    announce_stop(step, self.max_steps, stopped_by, path, resume_hint("rm", cfg.output_dir))
                    break
        bar.close()
        # (stopped early: no final model; the checkpoint continues the run)
        final_dir = None if stopped_by else save_final_scalar_model(model, Path(cfg.output_dir) / "final",
                                                                    tokenizer=self.tokenizer)
        summary = {
            "steps": step, "final_loss": last_loss, "wall_seconds": time.time() - started,
            "model_dir": str(final_dir) if final_dir else None,
            "accuracy_first": history[0]["rm/accuracy"] if history else None,
            "accuracy_last": history[-1]["rm/accuracy"] if history else None,
            "eval_history": history, "nonfinite_skips": faults.total, "data/skipped_rows": run.skipped_rows,
            "resumed_from": str(run.resumed_from) if run.resumed_from else None,
            **({"stopped_early": stopped_by} if stopped_by else {}),
        }
        return run.finish(summary)  # train_summary.json, report.html and plots/
