"""Stages 1 and 2: pre-training (next-token loss on raw text) and supervised fine-tuning
(loss on completion tokens only). One loop serves both; they differ only in how rows
become (input ids, target mask).

The loop, per optimizer step:
  1. take the next batch of rows (resumable, shuffled),
  2. count its target tokens over the whole batch (all micro-batches, all data-parallel ranks),
  3. split it into gradient_accumulation_steps micro-batches; per micro-batch: hidden states ->
     chunked log-probs of the targets -> :func:`trustrl.losses.token_nll_sum` (the NLL *summed*
     over the micro-batch's target tokens), divided by the whole batch's count from 2 -- the one
     place the loss is normalized (:class:`trustrl.loop.accumulate.BatchNormalizer`), so
     1 x N == N x 1 and 2 processes == 1 by construction,
  4. guarded optimizer step (skip on NaN/inf), schedule, log, checkpoint (every ``save_every``
     steps, every ``save_every_minutes`` and always after the last step);
  5. with ``eval_dataset``: the held-out loss per target token ``eval/nll`` (and
     ``eval/perplexity``) at the start, every ``eval_every`` steps and after the last step,
     as the reward model's ``rm/accuracy`` (:func:`held_out_nll`).

Length of a run: ``max_steps`` optimizer steps, or, with ``epochs`` set (SFT),
``ceil(epochs * examples / batch_size)`` steps (:func:`steps_for_epochs`).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch

from trustrl import distributed as dist
from trustrl import parallel
from trustrl.config import ConfigError, PretrainConfig, SFTConfig
from trustrl.data import DataError, encode_prompt, load_rows, source_files, source_name
from trustrl.logging import format_postfix, progress
from trustrl.loop.accumulate import BatchNormalizer, token_budget_micro_batches
from trustrl.loop.stops import GracefulStop, announce_stop, resume_hint
from trustrl.losses import token_nll_sum
from trustrl.models import check_vocab, load_policy, load_tokenizer, save_final_model
from trustrl.rollout import completion_logprobs_for_targets
from trustrl.trainers.common import (Run, check_positions, check_resume_setting, guarded_step, make_optimizer,
                                     make_scheduler, restore_loop, warn_skipped, warn_truncated)
from trustrl.utils import seed_everything


def steps_for_epochs(config, n_examples: int, what: str = "examples") -> int:
    """Optimizer steps of a run whose config may set ``epochs`` (SFT, reward model).

    * ``epochs`` unset: ``max_steps``.
    * ``epochs`` set: ``ceil(epochs * n_examples / batch_size)`` -- passes over the examples,
      ``batch_size`` examples per step; the sampler runs on into the next shuffled pass, so the
      last step may hold examples of the next pass. ``max_steps`` must then be left unset, or
      set to this same number (a run directory's config.yaml holds both): any other value is
      ambiguous and refused with a ConfigError naming both keys.
    """
    epochs = getattr(config, "epochs", None)
    if epochs is None:
        return config.max_steps
    steps = max(1, math.ceil(epochs * n_examples / config.batch_size))
    if "max_steps" in config.model_fields_set and config.max_steps != steps:
        raise ConfigError(
            f"epochs={epochs:g} means {steps} steps ({n_examples} {what}, batch_size={config.batch_size}) "
            f"but max_steps={config.max_steps} is also set; set one of epochs / max_steps")
    return steps


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


@torch.no_grad()
def held_out_nll(model, examples: list[tuple[list[int], list[bool]]], pad_id: int, device,
                 batches: list[torch.Tensor], chunk_size: int = 1024) -> dict[str, float]:
    """The held-out loss: the NLL summed over every target token of ``examples`` divided by
    their number (``eval/nll``, the training loss's unit: per token over the whole set, not a
    mean of batch means), ``eval/perplexity`` = exp(``eval/nll``), ``eval/tokens``; one forward
    pass per entry of ``batches`` (row indices covering every example once). Eval mode (no
    dropout), no gradient, no randomness drawn: evaluating changes no number of the run."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0.0
    for rows in batches:
        part = [examples[i] for i in rows.tolist()]
        ids, attention, target = right_pad([e[0] for e in part], [e[1] for e in part], pad_id)
        logp = completion_logprobs_for_targets(model, ids.to(device), attention.to(device), chunk_size=chunk_size)
        nll = token_nll_sum(logp, target[:, 1:].to(device))
        total += float(nll.total)
        count += float(nll.count)
    model.train(was_training)
    mean = total / max(count, 1.0)
    return {"eval/nll": mean, "eval/perplexity": math.exp(min(mean, 50.0)), "eval/tokens": count}


class _LMTrainer:
    """The shared loop; subclasses only build examples (ids, target mask) from a data file."""

    config: PretrainConfig | SFTConfig
    stage: str

    def __init__(self, config, model=None, tokenizer=None):
        self.config = config
        check_resume_setting(config)
        seed_everything(config.seed, deterministic=config.deterministic)
        self.device = dist.setup_device(config.device)  # joins the process group under torchrun
        if config.eval_dataset is not None:  # a missing held-out file is named before anything loads
            try:
                source_files(config.eval_dataset)
            except DataError as err:
                raise type(err)(err.path, f"{err.problem} (eval_dataset)") from None
        self.tokenizer = tokenizer or load_tokenizer(config.tokenizer or config.model)
        # the data before the model: a bad row stops the run before the weights load
        self.skipped_rows = 0  # malformed dataset rows left out (skip_bad_rows=true), counted by build_examples
        self.data_counts: dict[str, int] = {}  # data/truncated_examples, ... set by build_examples
        self.examples: list[tuple[list[int], list[bool]]] = self.build_examples(config.dataset)
        if not self.examples:
            raise DataError(source_name(config.dataset), "no training examples after tokenization")
        self.eval_examples: list[tuple[list[int], list[bool]]] | None = None
        if config.eval_dataset is not None:
            self.eval_examples = self.build_examples(config.eval_dataset, held_out=True)
            if not self.eval_examples:
                raise DataError(source_name(config.eval_dataset), "no examples after tokenization (eval_dataset)")
        self.model = model if model is not None else load_policy(
            config.model, dtype=config.dtype, device=self.device, tokenizer=self.tokenizer,
            lora=config.lora, gradient_checkpointing=config.gradient_checkpointing,
        )
        if model is not None:
            check_vocab(model, self.tokenizer, f"the model passed to {type(self).__name__}")
        longest = max(len(ids) for ids, _ in self.examples + (self.eval_examples or []))
        check_positions(self.model, longest, "block_size" if self.stage == "pretrain" else "max_length", config.model)
        parallel.apply(self.model, config.parallelism, self.device)  # parallelism.strategy=fsdp: shard it
        self.max_steps = steps_for_epochs(config, len(self.examples))
        if getattr(config, "epochs", None) is not None:  # the run directory's config.yaml says how many steps were run
            self.config = config.model_copy(update={"max_steps": self.max_steps})

    def build_examples(self, path, held_out: bool = False) -> list[tuple[list[int], list[bool]]]:
        """Read and tokenize the rows of ``path`` (the training data, or with ``held_out`` the
        eval_dataset); add malformed rows left out to ``skipped_rows`` and what was cut to
        ``data_counts`` (``data/...``, held out: ``data/eval_...``)."""
        raise NotImplementedError

    def micro_batches(self, batch: list[tuple[list[int], list[bool]]]) -> list[torch.Tensor]:
        """Row indices of a step's micro-batches: ``gradient_accumulation_steps`` equal row
        counts, or by a token budget over length-sorted rows (``micro_batch_tokens``; longest
        row first in each, so its length is the micro-batch's width)."""
        if self.config.micro_batch_tokens:
            return token_budget_micro_batches([len(ids) for ids, _ in batch], self.config.micro_batch_tokens)
        return list(torch.arange(len(batch)).chunk(self.config.gradient_accumulation_steps))

    def evaluate(self) -> dict[str, float]:
        assert self.eval_examples is not None
        cfg = self.config
        if cfg.micro_batch_tokens:  # the training's memory bound: the same token budget
            batches = token_budget_micro_batches([len(ids) for ids, _ in self.eval_examples], cfg.micro_batch_tokens)
        else:  # rows of a training micro-batch
            rows = max(1, math.ceil(cfg.batch_size / cfg.gradient_accumulation_steps))
            batches = list(torch.arange(len(self.eval_examples)).split(rows))
        return held_out_nll(self.model, self.eval_examples, self.tokenizer.pad_token_id, self.device, batches)

    def _due_for_eval(self, step: int) -> bool:
        every = self.config.eval_every
        return self.eval_examples is not None and (step == self.max_steps or (every > 0 and step % every == 0))

    def train(self) -> dict[str, Any]:
        cfg = self.config
        max_steps = self.max_steps
        run = Run.open(cfg)
        model = self.model
        model.train()
        optimizer = make_optimizer(model.parameters(), cfg)
        scheduler = make_scheduler(optimizer, cfg, max_steps)
        sampler, faults, state = restore_loop(run, cfg, len(self.examples), {"policy": model}, {"policy": optimizer},
                                              {"policy": scheduler}, {})
        run.set_skipped_rows(self.skipped_rows)
        run.record_data_counts(self.data_counts)
        history: list[dict[str, float]] = list(state.get("eval_history", []))
        pad = self.tokenizer.pad_token_id
        started = time.time()
        if run.start_step == 0 and self.eval_examples is not None:
            first = self.evaluate()
            history.append({"step": 0, **first})
            run.logger.log(0, first)
        bar = progress(total=max_steps, initial=run.start_step, desc=self.stage, disable=not cfg.progress or None)
        step = run.start_step
        last_loss = float("nan")
        stopped_by = None
        with GracefulStop() as stop:  # a clean stop between steps (Ctrl-C)
            while step < max_steps:
                step_started = time.time()
                # 1. the next batch of examples
                # (data parallel: every rank draws the same batch and keeps its contiguous share)
                batch = [self.examples[i] for i in dist.shard_batch(sampler.take(cfg.batch_size), "batch_size")]
                ids, attention, target = right_pad([b[0] for b in batch], [b[1] for b in batch], pad)
                # 2. the normalizer: target tokens of the global batch (all micro-batches and ranks)
                normalizer = BatchNormalizer([target[:, 1:]])
                n_targets = normalizer.counts["tokens"]
                # 3. micro-batches: summed NLL, divided once by the global count
                nll_sum = 0.0
                # (FSDP: as many passes on every rank; a stand-in pass has weight 0)
                for rows, live in parallel.lockstep(self.micro_batches(batch), sharded=parallel.is_sharded(model)):
                    width = len(batch[int(rows[0])][0]) if cfg.micro_batch_tokens else ids.shape[1]  # longest row first
                    m_ids, m_att, m_tgt = (t[rows, :width].to(self.device) for t in (ids, attention, target))
                    logp = completion_logprobs_for_targets(model, m_ids, m_att, chunk_size=1024)
                    part = token_nll_sum(logp, m_tgt[:, 1:])
                    (normalizer.loss([(1.0, part)]) * live).backward()
                    nll_sum += float(part.total.detach()) * live
                total_nll = dist.all_reduce_sum(nll_sum) / max(n_targets, 1.0)
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
                # 5. held-out loss
                if self._due_for_eval(step):
                    ev = self.evaluate()
                    history.append({"step": step, **ev})
                    metrics.update(ev)
                run.log(step, metrics)
                bar.update(1)
                bar.set_postfix(format_postfix(metrics, ["loss/nll", "eval/nll"]))
                # every save_every steps / save_every_minutes and always at the last one
                stopping = stop.requested() and step < max_steps  # SIGINT/SIGTERM: joint decision
                if stopping or run.should_save(step, max_steps, faults):
                    path = run.save(step, {"policy": model}, {"policy": optimizer}, {"policy": scheduler},
                                    {"sampler": sampler.state_dict(), "faults": faults.state_dict(), "eval_history": history},
                                    {}, tokenizer=self.tokenizer)
                if stopping:
                    stopped_by = stop.signal_name or "a signal on another rank"
                    announce_stop(step, max_steps, stopped_by, path, resume_hint(self.stage, cfg.output_dir))
                    break
        bar.close()
        # (stopped early: no final model; the checkpoint continues the run)
        final_dir = None if stopped_by else save_final_model(model, self.tokenizer, Path(cfg.output_dir) / "final")
        summary = {"final_loss": last_loss, "steps": step, "wall_seconds": time.time() - started,
                   "model_dir": str(final_dir) if final_dir else None,
                   "eval_nll_first": history[0]["eval/nll"] if history else None,
                   "eval_nll_last": history[-1]["eval/nll"] if history else None, "eval_history": history,
                   "nonfinite_skips": faults.total, "data/skipped_rows": run.skipped_rows,
                   "resumed_from": str(run.resumed_from) if run.resumed_from else None,
                   **({"stopped_early": stopped_by} if stopped_by else {})}
        return run.finish(summary)  # train_summary.json, report.html and plots/


class PretrainTrainer(_LMTrainer):
    """Next-token prediction on raw text: every token of every block is a target."""

    stage = "pretrain"

    def build_examples(self, path, held_out: bool = False):
        cfg: PretrainConfig = self.config
        loaded = load_rows(path, required=(cfg.text_column,), types={cfg.text_column: str}, skip_bad=cfg.skip_bad_rows)
        warn_skipped(loaded.skipped, source_name(path))
        self.skipped_rows += loaded.skipped
        tokens = [self.tokenizer(r[cfg.text_column], add_special_tokens=False)["input_ids"] for r in loaded.rows]
        blocks = pack_text(tokens, self.tokenizer.eos_token_id, cfg.block_size)
        if not blocks:
            raise DataError(source_name(path), f"fewer tokens than one block of block_size={cfg.block_size}")
        return [(b, [True] * len(b)) for b in blocks]


class SFTTrainer(_LMTrainer):
    """Prompt/completion (or chat) rows; the loss counts completion tokens (and EOS) only."""

    stage = "sft"

    def build_examples(self, path, held_out: bool = False):
        cfg: SFTConfig = self.config
        counts = "data/eval_" if held_out else "data/"
        # chat rows or prompt/completion rows, decided by the first readable row; then every row
        # is checked for those columns by load_rows, so an error names the file, row and column
        first = load_rows(path, required=(), skip_bad=True, limit=1).rows[0]
        if first.get(cfg.messages_column):
            required: tuple[str, ...] = (cfg.messages_column,)
            types = {cfg.messages_column: list}
        else:
            required = (cfg.prompt_column, cfg.completion_column)
            types = {cfg.prompt_column: (str, list), cfg.completion_column: str}
        loaded = load_rows(path, required=required, types=types, skip_bad=cfg.skip_bad_rows)
        tok = self.tokenizer
        out = []
        skipped = loaded.skipped
        truncated = dropped = 0
        for row_no, row in enumerate(loaded.rows, start=1):
            if cfg.messages_column in row and row[cfg.messages_column]:
                messages = list(row[cfg.messages_column])
                if not messages or not isinstance(messages[-1], dict) or messages[-1].get("role") != "assistant":
                    if cfg.skip_bad_rows:
                        skipped += 1
                        continue
                    raise loaded.error(row_no - 1, "the last message must be the assistant's",
                                       column=cfg.messages_column)
                completion = messages[-1].get("content")
                if not isinstance(completion, str) or not completion.strip():  # as an empty completion column
                    if cfg.skip_bad_rows:
                        skipped += 1
                        continue
                    raise loaded.error(row_no - 1, "the last (assistant) message needs a non-empty string "
                                       f"'content', got {completion!r}", column=cfg.messages_column)
                prompt = messages[:-1]
            else:
                for key in (cfg.prompt_column, cfg.completion_column):
                    if key not in row or not isinstance(row[key], (str, list)) or not row[key]:
                        raise loaded.error(row_no - 1, "missing or empty", column=key)
                prompt, completion = row[cfg.prompt_column], row[cfg.completion_column]
            # the BOS policy of trustrl.data: template text as written, plain text (with or
            # without system_prompt) with the tokenizer's special tokens
            try:
                _, prompt_ids = encode_prompt(tok, prompt, use_chat_template=cfg.use_chat_template,
                                              system_prompt=cfg.system_prompt)
            except DataError:
                raise
            except ValueError as err:  # a message that is not {role, content}, or no chat template to render it
                problem = str(err).removeprefix("format_prompt: ")
                column = cfg.messages_column if cfg.messages_column in row else cfg.prompt_column
                tok_dir = cfg.tokenizer or cfg.model
                if "has no chat_template" in problem and isinstance(prompt, list):
                    problem = (f"chat messages need a chat template and the tokenizer in {tok_dir} has none; write "
                               "prompt/completion rows with string prompts, or use a tokenizer with a chat_template")
                elif "chat_template" in problem:
                    problem += f" (tokenizer in {tok_dir})"
                raise loaded.error(row_no - 1, problem, column=column) from err
            completion_ids = tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            ids = (prompt_ids + completion_ids)[: cfg.max_length]
            mask = ([False] * len(prompt_ids) + [True] * len(completion_ids))[: cfg.max_length]
            if len(prompt_ids) + len(completion_ids) > cfg.max_length:
                truncated += 1
            if any(mask):
                out.append((ids, mask))
            else:  # the prompt alone fills max_length: no completion token left to learn from
                dropped += 1
        warn_skipped(skipped, source_name(path))
        source, n = source_name(path), len(loaded.rows)
        warn_truncated(truncated - dropped, source, f"of {n} examples are longer than max_length={cfg.max_length} "
                       "tokens (prompt + completion + EOS); their completions are cut at the end",
                       f"{counts}truncated_examples")
        warn_truncated(dropped, source, f"of {n} examples have a prompt of max_length={cfg.max_length} tokens or "
                       "more; they are left out (no completion token remains)", f"{counts}dropped_examples")
        self.skipped_rows += skipped
        self.data_counts.update({f"{counts}truncated_examples": truncated - dropped, f"{counts}dropped_examples": dropped})
        return out
