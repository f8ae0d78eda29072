"""Stages 1 and 2: pre-training (next-token loss on raw text) and supervised fine-tuning
(loss on completion tokens only). One loop serves both; they differ only in how rows
become (input ids, target mask).

The loop, per optimizer step:
  1. take the next batch of rows (resumable, shuffled),
  2. split it into gradient_accumulation_steps micro-batches,
  3. per micro-batch: hidden states -> chunked log-probs of the targets -> NLL summed over the
     target tokens, divided by the target tokens of the *whole* batch (so 1 x N == N x 1),
  4. guarded optimizer step (skip on NaN/inf), schedule, log, checkpoint.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch

from trustrl import distributed as dist
from trustrl.config import PretrainConfig, SFTConfig
from trustrl.data import format_prompt, load_rows
from trustrl.logging import format_postfix, progress, write_json_atomic
from trustrl.models import check_vocab, load_policy, load_tokenizer, save_model
from trustrl.rollout import completion_logprobs_for_targets
from trustrl.trainers.common import (Run, check_resume_setting, guarded_step, make_optimizer, make_scheduler,
                                     restore_loop, warn_skipped)
from trustrl.utils import seed_everything


def pack_text(token_lists: list[list[int]], eos_id: int, block_size: int) -> list[list[int]]:
    """Concatenate documents separated by EOS and cut into blocks of ``block_size`` tokens
    (the tail shorter than a block is dropped)."""
    stream: list[int] = []
    for ids in token_lists:
        stream.extend(ids)
        stream.append(eos_id)
    return [stream[i:i + block_size] for i in range(0, len(stream) - block_size + 1, block_size)]


def right_pad(rows: list[list[int]], masks: list[list[bool]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (ids [B, T], attention [B, T] bool, target mask [B, T] bool: True where the token is
    a prediction target)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.bool)
    target = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (r, m) in enumerate(zip(rows, masks)):
        ids[i, :len(r)] = torch.tensor(r)
        attention[i, :len(r)] = True
        target[i, :len(m)] = torch.tensor(m, dtype=torch.bool)
    return ids, attention, target


class _LMTrainer:
    """The shared loop; subclasses only build ``self.examples`` (ids, target mask)."""

    config: PretrainConfig | SFTConfig
    stage: str

    def __init__(self, config, model=None, tokenizer=None):
        self.config = config
        check_resume_setting(config)
        seed_everything(config.seed, deterministic=config.deterministic)
        self.device = dist.setup_device(config.device)  # joins the process group under torchrun
        self.tokenizer = tokenizer or load_tokenizer(config.tokenizer or config.model)
        self.model = model if model is not None else load_policy(
            config.model, dtype=config.dtype, device=self.device, tokenizer=self.tokenizer,
            lora=config.lora, gradient_checkpointing=config.gradient_checkpointing,
        )
        if model is not None:
            check_vocab(model, self.tokenizer, f"the model passed to {type(self).__name__}")
        self.skipped_rows = 0  # malformed dataset rows left out (skip_bad_rows=true), set by build_examples
        self.examples: list[tuple[list[int], list[bool]]] = self.build_examples()
        if not self.examples:
            raise ValueError(f"{config.dataset}: no training examples after tokenization")

    def build_examples(self) -> list[tuple[list[int], list[bool]]]:
        raise NotImplementedError

    def train(self) -> dict[str, Any]:
        cfg = self.config
        run = Run.open(cfg)
        model = self.model
        model.train()
        optimizer = make_optimizer(model.parameters(), cfg)
        scheduler = make_scheduler(optimizer, cfg, cfg.max_steps)
        sampler, faults, _ = restore_loop(run, cfg, len(self.examples), {"policy": model}, {"policy": optimizer},
                                          {"policy": scheduler}, {})
        run.set_skipped_rows(self.skipped_rows)
        pad = self.tokenizer.pad_token_id
        started = time.time()
        bar = progress(total=cfg.max_steps, initial=run.start_step, desc=self.stage, disable=not cfg.progress or None)
        step = run.start_step
        last_loss = float("nan")
        while step < cfg.max_steps:
            step_started = time.time()
            # 1. the next batch of examples
            # (data parallel: every rank draws the same batch and keeps its contiguous share)
            batch = [self.examples[i] for i in dist.shard_batch(sampler.take(cfg.batch_size), "batch_size")]
            ids, attention, target = right_pad([b[0] for b in batch], [b[1] for b in batch], pad)
            n_targets = dist.all_reduce_sum(int(target[:, 1:].sum()))  # over the global batch
            # 2-3. micro-batches, loss normalized by the whole batch's target tokens
            total_nll = 0.0
            for rows in torch.arange(len(batch)).chunk(cfg.gradient_accumulation_steps):
                m_ids, m_att, m_tgt = ids[rows].to(self.device), attention[rows].to(self.device), target[rows].to(self.device)
                logp = completion_logprobs_for_targets(model, m_ids, m_att, chunk_size=1024)
                mask = m_tgt[:, 1:]
                nll = -(logp * mask).sum() / max(n_targets, 1)
                nll.backward()
                total_nll += float(nll.detach())
            total_nll = dist.all_reduce_sum(total_nll)
            # 4. guarded update (data parallel: it sums the gradients over ranks)
            grad_norm, applied = guarded_step(model, optimizer, scheduler, cfg.max_grad_norm, faults, f"{self.stage} step {step + 1}",
                                              loss=total_nll)
            step += 1
            last_loss = total_nll
            metrics = {
                "loss/nll": total_nll, "loss/perplexity": math.exp(min(total_nll, 50.0)),
                "optim/grad_norm": grad_norm, "optim/lr": scheduler.get_last_lr()[0],
                "optim/skipped": float(not applied), "perf/step_seconds": time.time() - step_started,
                "perf/tokens_per_second": n_targets / max(time.time() - step_started, 1e-9),
            }
            run.log(step, metrics)
            bar.update(1)
            bar.set_postfix(format_postfix(metrics, ["loss/nll"]))
            if run.should_save(step, cfg.max_steps, faults) and cfg.save_every > 0:
                run.save(step, {"policy": model}, {"policy": optimizer}, {"policy": scheduler},
                         {"sampler": sampler.state_dict(), "faults": faults.state_dict()}, {}, tokenizer=self.tokenizer)
        bar.close()
        final_dir = dist.on_main(save_model, model, self.tokenizer, Path(cfg.output_dir) / "final")
        summary = {"final_loss": last_loss, "steps": step, "wall_seconds": time.time() - started, "model_dir": str(final_dir),
                   "nonfinite_skips": faults.total, "data/skipped_rows": run.skipped_rows,
                   "resumed_from": str(run.resumed_from) if run.resumed_from else None}
        dist.on_main(write_json_atomic, Path(cfg.output_dir) / "train_summary.json", summary)
        run.close()
        return summary


class PretrainTrainer(_LMTrainer):
    """Next-token prediction on raw text: every token of every block is a target."""

    stage = "pretrain"

    def build_examples(self):
        cfg: PretrainConfig = self.config
        loaded = load_rows(cfg.dataset, required=(cfg.text_column,), types={cfg.text_column: str}, skip_bad=cfg.skip_bad_rows)
        warn_skipped(loaded.skipped, cfg.dataset)
        self.skipped_rows = loaded.skipped
        tokens = [self.tokenizer(r[cfg.text_column], add_special_tokens=False)["input_ids"] for r in loaded.rows]
        blocks = pack_text(tokens, self.tokenizer.eos_token_id, cfg.block_size)
        if not blocks:
            raise ValueError(f"{cfg.dataset}: fewer tokens than one block of block_size={cfg.block_size}")
        return [(b, [True] * len(b)) for b in blocks]


class SFTTrainer(_LMTrainer):
    """Prompt/completion (or chat) rows; the loss counts completion tokens (and EOS) only."""

    stage = "sft"

    def build_examples(self):
        cfg: SFTConfig = self.config
        # chat rows or prompt/completion rows, decided by the first readable row; then every row
        # is checked for those columns by load_rows, so an error names the file, row and column
        first = load_rows(cfg.dataset, required=(), skip_bad=True, limit=1).rows[0]
        if first.get(cfg.messages_column):
            required: tuple[str, ...] = (cfg.messages_column,)
            types = {cfg.messages_column: list}
        else:
            required = (cfg.prompt_column, cfg.completion_column)
            types = {cfg.prompt_column: (str, list), cfg.completion_column: str}
        loaded = load_rows(cfg.dataset, required=required, types=types, skip_bad=cfg.skip_bad_rows)
        tok = self.tokenizer
        out = []
        skipped = loaded.skipped
        for row_no, row in enumerate(loaded.rows, start=1):
            if cfg.messages_column in row and row[cfg.messages_column]:
                messages = list(row[cfg.messages_column])
                if not messages or not isinstance(messages[-1], dict) or messages[-1].get("role") != "assistant":
                    if cfg.skip_bad_rows:
                        skipped += 1
                        continue
                    raise ValueError(f"{cfg.dataset} row {row_no} (counting valid rows): column "
                                     f"{cfg.messages_column!r}: the last message must be the assistant's")
                prompt, completion = messages[:-1], messages[-1]["content"]
            else:
                for key in (cfg.prompt_column, cfg.completion_column):
                    if key not in row or not isinstance(row[key], (str, list)) or not row[key]:
                        raise ValueError(f"{cfg.dataset} row {row_no}: missing or empty {key!r}")
                prompt, completion = row[cfg.prompt_column], row[cfg.completion_column]
            text = format_prompt(tok, prompt, use_chat_template=cfg.use_chat_template, system_prompt=cfg.system_prompt)
            templated = text != prompt
            prompt_ids = tok(text, add_special_tokens=not templated)["input_ids"]
            completion_ids = tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            ids = (prompt_ids + completion_ids)[: cfg.max_length]
            mask = ([False] * len(prompt_ids) + [True] * len(completion_ids))[: cfg.max_length]
            if any(mask):
                out.append((ids, mask))
        warn_skipped(skipped, cfg.dataset)
        self.skipped_rows = skipped
        return out
