"""Experience for the RL loop: the prompt set, sampling a batch of completions for it,
scoring them with the configured rewards (a :class:`ScoredBatch`), stacking and selecting
scored batches, and greedy held-out evaluation. Shared by every algorithm plug-in."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from trustrl.config import RLConfig
from trustrl.data import encode_prompt, load_rows, source_name
from trustrl.rewards.registry import (BATCH_ARGUMENTS, NamedReward, RewardSpec, RewardSpecError, ScoreResult,
                                      check_unique_names, resolve_reward, score_completions, to_spec)
from trustrl.rollout import Rollout, generate, left_pad
from trustrl.trainers.common import warn_skipped, warn_truncated


class PromptSet:
    """Prompts of one dataset, formatted (chat template when configured) and tokenized once.
    Every column other than the prompt travels with it to the reward functions."""

    def __init__(self, path, config: RLConfig, tokenizer, limit: int | None = None):
        loaded = load_rows(path, required=(config.prompt_column,), types={config.prompt_column: (str, list)},
                           skip_bad=config.skip_bad_rows, limit=limit)
        warn_skipped(loaded.skipped, source_name(path))
        self.path = path
        self.loaded = loaded  # where each row was read, for error messages
        self.skipped = loaded.skipped  # malformed rows left out (skip_bad_rows=true)
        self.rows = loaded.rows
        self.texts: list[str] = []
        self.token_ids: list[list[int]] = []
        for number, row in enumerate(self.rows, start=1):
            raw = row[config.prompt_column]
            try:  # load_rows checks the text of a column named "prompt"; any other name is checked here
                if isinstance(raw, str) and not raw.strip():
                    raise ValueError("empty or whitespace-only text")
                # one BOS policy (trustrl.data): template output as is, plain text with BOS
                text, ids = encode_prompt(tokenizer, raw, use_chat_template=config.use_chat_template,
                                          system_prompt=config.system_prompt)
                if not ids:  # the model would get an empty input and fail deep in its forward
                    raise ValueError("the tokenizer encodes this prompt to no tokens at all (is it the "
                                     "model's tokenizer? set tokenizer= to the right one)")
            except (ValueError, TypeError, AttributeError) as err:
                raise loaded.error(number - 1, str(err), column=config.prompt_column) from None
            self.texts.append(text)
            self.token_ids.append(ids)
        self.prompt_column = config.prompt_column
        #: rows whose prompt is a conversation (a list of messages): their completions also reach
        #: the reward functions as messages (``completion_messages``)
        self.is_conversation = [isinstance(row[config.prompt_column], list) for row in self.rows]
        # the sampler keeps the last max_prompt_length tokens of a prompt (left_pad): count the cut ones
        self.truncated = sum(len(ids) > config.max_prompt_length for ids in self.token_ids)
        k = config.max_prompt_length
        warn_truncated(self.truncated, source_name(path),
                       f"of {len(self.token_ids)} prompts are longer than max_prompt_length={k} tokens; their "
                       f"beginnings are cut (the sampler keeps the last {k})",
                       "data/truncated_prompts" if limit is None else "data/truncated_eval_prompts")

    def __len__(self) -> int:
        return len(self.rows)

    def columns(self, indices: list[int]) -> dict[str, list[Any]]:
        """Extra columns (everything except the prompt) for the given rows, aligned with them."""
        names = {k for i in indices for k in self.rows[i] if k != self.prompt_column}
        return {name: [self.rows[i].get(name) for i in indices] for name in sorted(names)}

    def raw_prompts(self, indices: list[int]) -> list[Any]:
        """The prompt column as the dataset holds it (text or messages) for the given rows."""
        return [self.rows[i][self.prompt_column] for i in indices]


@dataclass
class ScoredBatch:
    """A rollout with everything the reward step produced, aligned row by row."""

    rollout: Rollout
    row_indices: list[int]  # dataset row of every completion
    prompts: list[str]
    completions: list[str]
    scores: ScoreResult


def with_reward_funcs(config: RLConfig, reward_funcs: list[Any] | None) -> RLConfig:
    """A copy of ``config`` whose ``rewards`` end with ``reward_funcs`` (any form
    :func:`trustrl.rewards.registry.to_spec` takes: ``fn``, ``(fn, 0.5)``, ``Reward(...)``), so
    they are resolved like the others and recorded in ``config.yaml`` by qualified name.
    The caller's config is left as it was."""
    if not reward_funcs:
        return config
    return config.model_copy(update={"rewards": [*config.rewards, *(to_spec(f) for f in reward_funcs)]})


def _not_loaded(prompts, completions, **columns):
    raise RuntimeError("a reward model of this RewardSuite is not loaded yet: call RewardSuite.load_models()")


class RewardSuite:
    """The configured reward functions (and optional reward model), weighted and checked.

    Built in two phases so that every reward requirement is checked before any model loads:
    the constructor resolves the rule and Python rewards and checks reward-model directories
    (cheap); :meth:`check_columns` checks the dataset; :meth:`load_models` then loads the
    reward models (``load_models=True``: at once).

    ``step``: the training step reward functions are told (keyword ``step``); the loop sets it
    before each step's sampling, so held-out evaluation after step s sees s."""

    def __init__(self, config: RLConfig, extra: list[Any] | None = None, device=None, *, load_models: bool = True):
        from trustrl.rewards.reward_model import check_reward_model_dir, reward_model_reward

        self.config = config
        self.step = 0
        self.rewards: list[NamedReward] = []
        self._loaders: dict[int, Callable[[], NamedReward]] = {}  # position -> loads that reward model
        for entry in [*config.rewards, *(extra or [])]:
            spec = entry if isinstance(entry, NamedReward) else to_spec(entry)
            if isinstance(spec, RewardSpec) and spec.name == "reward_model":  # the built-in: a model
                if "path" not in spec.kwargs:
                    raise RewardSpecError("built-in reward 'reward_model' needs kwargs.path: the directory of a "
                                          "trained reward model")
                check_reward_model_dir(spec.kwargs["path"])
                self._loaders[len(self.rewards)] = functools.partial(resolve_reward, spec)
                self.rewards.append(NamedReward(spec.alias or "reward_model", _not_loaded, float(spec.weight)))
            else:
                self.rewards.append(resolve_reward(spec))
        if config.reward_model:
            check_reward_model_dir(config.reward_model)
            path, weight = config.reward_model, config.reward_model_weight
            self._loaders[len(self.rewards)] = lambda: NamedReward(
                "reward_model", reward_model_reward(path, device=device), weight)
            self.rewards.append(NamedReward("reward_model", _not_loaded, weight))
        if not self.rewards:
            raise RewardSpecError("no reward: set `rewards:` (e.g. [{name: numeric_answer}]) or `reward_model:`")
        check_unique_names(self.rewards)
        names = [r.name for r in self.rewards]
        self.by_name(config.eval_reward)  # a typo in eval_reward fails now, not at the first evaluation
        self.fault_totals: dict[str, int] = {name: 0 for name in names}
        if load_models:
            self.load_models()

    def load_models(self) -> None:
        """Load the reward models (their directories were checked by the constructor)."""
        for position, load in sorted(self._loaders.items()):
            self.rewards[position] = load()
        self._loaders.clear()

    def check_columns(self, prompts: PromptSet) -> None:
        """Before any model loads: every argument a reward requires (a declared parameter
        without default, a built-in's ``required_columns``) is a column of every row, and no
        column is named like an argument the trainers pass.

        Raises:
            RewardSpecError: naming the reward, the column and the file (and the first row
                lacking it).
        """
        present = {k for row in prompts.rows for k in row if k != prompts.prompt_column}
        source = source_name(prompts.path)
        clash = sorted(present & set(BATCH_ARGUMENTS))
        if clash:
            raise RewardSpecError(f"{source}: column {clash[0]!r} has the name of an argument trustrl passes to "
                                  f"reward functions ({', '.join(BATCH_ARGUMENTS)}); rename it")
        available = set(BATCH_ARGUMENTS) - {"completion_messages"}
        if any(prompts.is_conversation):
            available.add("completion_messages")
        for reward in self.rewards:
            for name in reward.missing(available | present):
                if name == "completion_messages":
                    raise RewardSpecError(f"reward '{reward.name}' requires completion_messages, given only when the "
                                          f"prompts are conversations; those in {source} are text")
                columns = ", ".join(sorted(present)) or "none besides the prompt"
                raise RewardSpecError(f"reward '{reward.name}' needs column {name!r}, which {source} does not have "
                                      f"(its columns: {columns})")
            for name in reward.required_columns():
                for index, row in enumerate(prompts.rows):
                    if row.get(name) is None:
                        file, label = prompts.loaded.where(index)
                        raise RewardSpecError(f"reward '{reward.name}' needs column {name!r}, which {file} {label} "
                                              "lacks (or holds null)")

    def score(self, prompts: list[str], completions: list[str], columns: dict[str, list], lengths: list[int],
              completion_ids: list[list[int]] | None = None,
              completion_messages: list[list[dict] | None] | None = None,
              raw_prompts: list[Any] | None = None) -> ScoreResult:
        cfg = self.config
        columns = {**columns, "completion_lengths": lengths}
        if raw_prompts is not None:  # the dataset's prompts before formatting (a reward model formats its own)
            columns["raw_prompts"] = raw_prompts
        if completion_ids is not None:
            columns["completion_ids"] = completion_ids
        if completion_messages is not None:
            columns["completion_messages"] = completion_messages
        result = score_completions(
            self.rewards, prompts, completions, columns, context={"step": self.step},
            timeout_s=cfg.reward_timeout_s, on_error=cfg.reward_on_error, default_score=cfg.reward_default,
        )
        for name, n in result.n_faults.items():
            if n:  # only with reward_on_error=default: "raise" stops at the first fault
                self.fault_totals[name] = self.fault_totals.get(name, 0) + n
                warnings.warn(f"reward function '{name}' failed on {n} of {len(completions)} samples; they got "
                              f"reward_default={cfg.reward_default} ({self.fault_totals[name]} so far)", stacklevel=2)
        return result

    def by_name(self, name: str | None) -> NamedReward:
        if name is None:
            return self.rewards[0]
        for r in self.rewards:
            if r.name == name:
                return r
        raise RewardSpecError(f"eval_reward {name!r} is not one of the rewards: {[r.name for r in self.rewards]}")


def sample_and_score(
    policy: nn.Module,
    tokenizer,
    prompts: PromptSet,
    indices: list[int],
    repeats: int,
    config: RLConfig,
    rewards: RewardSuite,
    generator: torch.Generator | None,
    device: torch.device,
    *,
    greedy: bool = False,
    row_seeds: torch.Tensor | None = None,
    engine=None,
) -> ScoredBatch:
    """Generate ``repeats`` completions for each prompt row (consecutive per prompt) and score them.
    ``row_seeds`` (int64, one per completion): counter-based sampling, see :func:`generate`.
    ``engine``: a :mod:`trustrl.rollout_engines` engine (None: trustrl's sampler on ``policy``)."""
    rows = [i for i in indices for _ in range(repeats)]
    temperature = 0.0 if greedy else config.temperature
    if engine is not None:
        from trustrl.rollout_engines import SamplingSettings

        settings = SamplingSettings(config.max_completion_length, temperature, config.top_p, tokenizer.eos_token_id,
                                    tokenizer.pad_token_id)
        prompt_rows = [prompts.token_ids[i][-config.max_prompt_length:] for i in rows]  # left-truncated
        rollout = engine.generate(prompt_rows, settings, row_seeds=row_seeds, generator=generator)
    else:
        ids, mask = left_pad([prompts.token_ids[i] for i in rows], tokenizer.pad_token_id, config.max_prompt_length)
        rollout = generate(
            policy, ids.to(device), mask.to(device), max_new_tokens=config.max_completion_length,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
            temperature=temperature, top_p=config.top_p, generator=generator, row_seeds=row_seeds,
        )
    sampled = sampled_ids(rollout)
    completions = [tokenizer.decode(ids, skip_special_tokens=True) for ids in sampled]
    texts = [prompts.texts[i] for i in rows]
    messages = None
    if any(prompts.is_conversation):  # completions as chat messages too, for conversation prompts
        messages = [[{"role": "assistant", "content": c}] if prompts.is_conversation[i] else None
                    for i, c in zip(rows, completions)]
    scores = rewards.score(texts, completions, prompts.columns(rows), rollout.completion_lengths.tolist(),
                           completion_ids=sampled, completion_messages=messages,
                           raw_prompts=prompts.raw_prompts(rows))
    return ScoredBatch(rollout, rows, texts, completions, scores)


def sampled_ids(rollout: Rollout) -> list[list[int]]:
    """The sampled token ids of each completion (EOS included when sampled, no padding)."""
    return [[t for t, v in zip(ids, valid) if v]
            for ids, valid in zip(rollout.completion_ids.tolist(), rollout.completion_mask.tolist())]



def reward_metrics(scores: ScoreResult) -> dict[str, float]:
    """``scores.metrics()`` plus ``reward/<name>/faults``: samples of this batch that got the
    default score because the function failed (reward_on_error=default)."""
    out = scores.metrics()
    for name, n in scores.n_faults.items():
        out[f"reward/{name}/faults"] = float(n)
    return out


@torch.no_grad()
def evaluate_greedy(
    policy: nn.Module, tokenizer, prompts: PromptSet, config: RLConfig, rewards: RewardSuite, device: torch.device,
) -> dict[str, float]:
    """Greedy completions for the first ``eval_prompts`` held-out prompts; eval/accuracy is the
    mean of ``eval_reward`` (the first reward by default), plus every reward's mean."""
    n = min(config.eval_prompts, len(prompts))
    target = rewards.by_name(config.eval_reward).name
    totals: dict[str, float] = {}
    lengths = 0.0
    for start in range(0, n, config.forward_batch_size):
        idx = list(range(start, min(n, start + config.forward_batch_size)))
        batch = sample_and_score(policy, tokenizer, prompts, idx, 1, config, rewards, None, device, greedy=True)
        for name, values in batch.scores.per_function.items():
            totals[name] = totals.get(name, 0.0) + float(values.sum())
        lengths += float(batch.rollout.completion_lengths.float().sum())
    metrics = {f"eval/{name}": value / n for name, value in totals.items()}
    metrics["eval/accuracy"] = totals[target] / n
    metrics["eval/mean_length"] = lengths / n
    return metrics


@dataclass
class RLModels:
    """What every RL trainer loads first: rewards, tokenizer, prompt sets, policy, reference."""

    rewards: RewardSuite
    tokenizer: Any
    prompts: PromptSet
    eval_prompts: PromptSet | None
    policy: nn.Module
    reference: nn.Module | None


def load_rl_models(config: RLConfig, device: torch.device, *, who: str, reward_funcs=None, model=None,
                   tokenizer=None, gradient_checkpointing: bool | None = None) -> RLModels:
    """Rewards first (cheap, fail fast on a bad spec), then data and the columns the rewards need,
    then models (reward models, the policy). ``beta = 0`` loads no reference model at all; with LoRA the reference is the
    base model (``reference_context``)."""
    from trustrl.models import check_vocab, load_policy, load_tokenizer, logit_transform, make_reference

    rewards = RewardSuite(config, extra=reward_funcs, device=device, load_models=False)
    tokenizer = tokenizer or load_tokenizer(config.tokenizer or config.model)
    prompts = PromptSet(config.dataset, config, tokenizer)
    eval_prompts = (PromptSet(config.eval_dataset, config, tokenizer, limit=config.eval_prompts)
                    if config.eval_dataset else None)
    for prompt_set in (prompts, eval_prompts):
        if prompt_set is not None:
            rewards.check_columns(prompt_set)
    rewards.load_models()  # every requirement checked: the reward models, then the policy
    if gradient_checkpointing is None:
        gradient_checkpointing = config.gradient_checkpointing
    if model is None:
        model = load_policy(config.model, dtype=config.dtype, device=device, tokenizer=tokenizer,
                            lora=config.lora, gradient_checkpointing=gradient_checkpointing)
    else:
        check_vocab(model, tokenizer, f"the model passed to {who}")
        logit_transform(model)  # refuse a forward we do not reproduce now, not after sampling
    reference = make_reference(model) if config.beta > 0 else None
    return RLModels(rewards, tokenizer, prompts, eval_prompts, model, reference)


def concat_batches(batches: list[ScoredBatch], pad: int) -> ScoredBatch:
    """Stack scored batches (different prompt/completion widths) into one."""
    prompt_rows, completion_rows, completion_masks, behaviour_rows = [], [], [], []
    for b in batches:
        for i in range(b.rollout.prompt_ids.shape[0]):
            prompt_rows.append(b.rollout.prompt_ids[i][b.rollout.prompt_mask[i]].tolist())
            completion_rows.append(b.rollout.completion_ids[i])
            completion_masks.append(b.rollout.completion_mask[i])
            if b.rollout.behaviour_logprobs is not None:
                behaviour_rows.append(b.rollout.behaviour_logprobs[i])
    device = batches[0].rollout.prompt_ids.device
    p_ids, p_mask = left_pad(prompt_rows, pad_id=pad)
    width = max(c.shape[0] for c in completion_rows)
    c_ids = torch.full((len(completion_rows), width), pad, dtype=torch.long)
    c_mask = torch.zeros((len(completion_rows), width), dtype=torch.bool)
    for i, (c, m) in enumerate(zip(completion_rows, completion_masks)):
        c_ids[i, :c.shape[0]], c_mask[i, :m.shape[0]] = c, m
    behaviour = None
    if len(behaviour_rows) == len(completion_rows):  # every batch carries behaviour log-probs
        behaviour = torch.zeros((len(completion_rows), width), dtype=behaviour_rows[0].dtype)
        for i, row in enumerate(behaviour_rows):
            behaviour[i, :row.shape[0]] = row
        behaviour = behaviour.to(device)
    rollout = Rollout(p_ids.to(device), p_mask.to(device), c_ids.to(device), c_mask.to(device),
                      torch.cat([b.rollout.truncated for b in batches]),
                      _concat_per_token_extras([b.rollout for b in batches], width, device),
                      behaviour_logprobs=behaviour,
                      context_mask=_concat_context([b.rollout for b in batches], width, device))
    per_fn = {k: torch.cat([b.scores.per_function[k] for b in batches]) for k in batches[0].scores.per_function}
    faults = {k: sum(b.scores.n_faults.get(k, 0) for b in batches) for k in batches[0].scores.n_faults}
    scores = ScoreResult(total=torch.cat([b.scores.total for b in batches]), per_function=per_fn, n_faults=faults)
    return ScoredBatch(rollout, [i for b in batches for i in b.row_indices], [p for b in batches for p in b.prompts],
                       [c for b in batches for c in b.completions], scores)


def _pad_cat(parts: list[torch.Tensor], width: int, device) -> torch.Tensor:
    """Stack [b_i, c_i] tensors into [sum b_i, width], zero (False) past each row's width."""
    out = torch.zeros((sum(p.shape[0] for p in parts), width), dtype=parts[0].dtype)
    row = 0
    for p in parts:
        out[row:row + p.shape[0], :p.shape[1]] = p.cpu()
        row += p.shape[0]
    return out.to(device)


def _concat_context(rollouts: list[Rollout], width: int, device) -> torch.Tensor | None:
    """Multi-turn rollouts' context masks stacked (None for single-turn ones); a mix is refused."""
    has = [r.context_mask is not None for r in rollouts]
    if not any(has):
        return None
    if not all(has):
        raise ValueError("concat_batches: cannot stack multi-turn rollouts (context_mask) with single-turn ones")
    return _pad_cat([r.context_mask for r in rollouts], width, device)


def _concat_per_token_extras(rollouts: list[Rollout], width: int, device) -> dict[str, torch.Tensor]:
    """Per-token extras ([B, C] tensors present in every rollout, e.g. multi-turn turn ends) stacked."""
    keys = set.intersection(*(set(r.extras) for r in rollouts))
    return {k: _pad_cat([r.extras[k] for r in rollouts], width, device) for k in sorted(keys)
            if all(isinstance(r.extras[k], torch.Tensor) and r.extras[k].dim() == 2
                   and r.extras[k].shape[1] == r.completion_ids.shape[1] for r in rollouts)}


def select_groups(batch: ScoredBatch, groups: list[int], group_size: int) -> ScoredBatch:
    """Keep whole groups (by group index) of a scored batch."""
    rows = [g * group_size + j for g in groups for j in range(group_size)]
    index = torch.tensor(rows, dtype=torch.long)
    s = batch.scores
    scores = ScoreResult(total=s.total[index], per_function={k: v[index] for k, v in s.per_function.items()},
                         n_faults=dict(s.n_faults))
    return ScoredBatch(batch.rollout.select(index.to(batch.rollout.prompt_ids.device)),
                       [batch.row_indices[r] for r in rows], [batch.prompts[r] for r in rows],
                       [batch.completions[r] for r in rows], scores)
