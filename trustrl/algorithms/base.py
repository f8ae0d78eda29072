"""What every RL algorithm plug-in shares: loading (rewards, data, policy, reference), the
CPU thread setting, counter-based sampling of a step's prompts, and the hooks the one loop
(:func:`trustrl.loop.rl_loop.run_rl_loop`) calls.

A plug-in implements, in the order of its paper:

* ``setup()``   -> :class:`TrainingState`: its optimizers, schedules and what to checkpoint;
* ``update(batch, step, faults)`` -> metrics: advantages and optimizer updates on one
  scored batch (the loop already sampled and scored it with :meth:`collect`);
* optionally ``collect`` (e.g. DAPO's dynamic sampling), ``checkpoint_extra`` /
  ``load_extra`` (state outside models/optimizers) and ``save_final``.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from trustrl import distributed as dist
from trustrl import parallel
from trustrl.config import ConfigError, RLConfig
from trustrl.loop.data_parallel import gather_scored_batches, sampling_row_seeds
from trustrl.loop.experience import ScoredBatch, concat_batches, load_rl_models, sample_and_score, with_reward_funcs
from trustrl.loop.rl_loop import TrainingState, run_rl_loop
from trustrl.models import save_final_model
from trustrl.rollout_engines import make_engine
from trustrl.trainers.common import FaultCounter, PromptSampler, check_resume_setting
from trustrl.utils import seed_everything


def apply_cpu_threads(threads: int | None) -> None:
    """``cpu_threads``: torch's intra-op thread count, set once (None keeps torch's default).
    A fixed setting, never a timing decision, so results do not depend on machine load."""
    if threads is not None:
        torch.set_num_threads(threads)


def warn_top_p(config: RLConfig) -> None:
    """Nucleus sampling draws from the truncated, renormalized distribution; the losses use
    log-probs of the full softmax (as TRL, veRL and OpenRLHF do), so the importance ratio is
    measured against a slightly different policy than the one that sampled. Said at start-up."""
    if config.top_p < 1.0:
        warnings.warn(
            f"top_p={config.top_p}: completions are sampled from the top-p truncated distribution, but "
            "log-probs, ratios and KL use the full softmax (the policy being trained); set top_p=1 for "
            "on-policy sampling", stacklevel=3)


class RLAlgorithm:
    """Base of the plug-ins: ``Algo(config, reward_funcs=None, model=None, tokenizer=None).train()``.

    ``reward_funcs`` adds Python rewards to the configured ones: ``fn``, ``(fn, weight)``,
    ``Reward(fn, weight=, name=)`` (signature: :mod:`trustrl.rewards.registry`); they are recorded
    in ``config.yaml`` by qualified name. ``model``/``tokenizer`` replace loading from ``config.model``."""

    name = "rl"
    #: progress-bar fields
    postfix_keys: list[str] = ["reward/mean", "kl/ref", "eval/accuracy"]
    #: completions per prompt in :meth:`collect`
    repeats_field = "group_size"
    #: True when :meth:`collect` returns only this rank's share of the step (data parallel)
    collects_local_share = False
    #: gradient checkpointing allowed (TRPO's double backward needs the activations)
    allow_gradient_checkpointing = True
    #: parallelism.strategy=fsdp supported (TRPO's Fisher-vector products are not sharded yet)
    allow_fsdp = True
    #: the update forms token-budget micro-batches (micro_batch_tokens) and applies the
    #: rollout correction (rollout_correction); a plug-in without them refuses the settings
    supports_micro_batch_tokens = False
    supports_rollout_correction = False

    def __init__(self, config: RLConfig, reward_funcs: list[Callable] | None = None, model=None, tokenizer=None):
        config = with_reward_funcs(config, reward_funcs)  # a copy: the caller's config is unchanged
        self.config = config
        check_resume_setting(config)
        for key, supported, off in (("micro_batch_tokens", self.supports_micro_batch_tokens, None),
                                    ("rollout_correction", self.supports_rollout_correction, "none")):
            if not supported and getattr(config, key, off) not in (off, 0):
                raise ConfigError(f"{key}: not implemented for {self.name}; remove it from the config")
        apply_cpu_threads(config.cpu_threads)
        seed_everything(config.seed, deterministic=config.deterministic)
        warn_top_p(config)
        self.device = dist.setup_device(config.device)  # joins the process group under torchrun
        if config.parallelism.strategy == "fsdp" and not self.allow_fsdp:
            raise ConfigError(f"parallelism.strategy=fsdp: {self.name} does not support sharded models yet; "
                              "use parallelism.strategy=ddp")
        loaded = load_rl_models(config, self.device, who=type(self).__name__, model=model,
                                tokenizer=tokenizer,
                                gradient_checkpointing=None if self.allow_gradient_checkpointing else False)
        self.rewards, self.tokenizer = loaded.rewards, loaded.tokenizer
        self.policy, self.reference = loaded.policy, loaded.reference
        # parallelism.strategy=fsdp: shard policy and reference (no-op otherwise)
        parallel.apply(self.policy, config.parallelism, self.device)
        parallel.apply(self.reference, config.parallelism, self.device)
        self.prompts, self.eval_prompts = loaded.prompts, loaded.eval_prompts
        self.generator = torch.Generator(device="cpu").manual_seed(config.seed)
        self.last_metrics: dict[str, float] = {}
        # what samples the rollouts (trustrl's sampler on the policy, or vLLM); stale: the
        # policy's weights changed since the engine last received them (at start: a resumed run)
        self.engine = make_engine(config, self.policy, self.device)
        self.engine_stale = True

    # -- hooks of the loop -----------------------------------------------------------------

    def setup(self) -> TrainingState:  # pragma: no cover - every plug-in defines it
        raise NotImplementedError

    def update(self, batch: ScoredBatch, step: int, faults: FaultCounter) -> dict[str, float]:  # pragma: no cover
        raise NotImplementedError

    def collect(self, sampler: PromptSampler) -> tuple[ScoredBatch | None, dict[str, float]]:
        """Steps 1-3: ``prompts_per_step`` prompts, ``repeats`` completions each, scored.

        Counter-based sampling seeded by (seed, sampler position, prompt index in the draw,
        completion index), so the completions do not depend on how the draw is split: data
        parallel, each rank generates and scores its contiguous share of the prompts; every
        rank gets the whole batch back (``collects_local_share`` False) or keeps its share."""
        cfg = self.config
        repeats = getattr(cfg, self.repeats_field)
        draw = (sampler.epoch, sampler.cursor)
        indices = sampler.take(cfg.prompts_per_step)
        seeds = sampling_row_seeds(cfg.seed, draw, len(indices), repeats)
        if self.collects_local_share:  # every rank needs prompts: a clear error naming the key otherwise
            mine = dist.shard_batch(list(range(len(indices))), "prompts_per_step")
            lo, hi = mine[0], mine[-1] + 1
        else:
            lo, hi = dist.shard_range(len(indices))
        if self.engine_stale:  # the updated policy samples this step
            self.engine.sync_weights(self.policy)
            self.engine_stale = False
        local = None
        with parallel.gathered(self.policy):  # FSDP: whole weights while decoding (every rank enters)
            if hi > lo:
                local = sample_and_score(self.policy, self.tokenizer, self.prompts, indices[lo:hi], repeats, cfg,
                                         self.rewards, self.generator, self.device,
                                         row_seeds=seeds[lo * repeats:hi * repeats], engine=self.engine)
        if self.collects_local_share:
            batch = local
            totals = dist.sum_across_ranks(local.scores.n_faults)
        else:
            batch = gather_scored_batches(local, concat_batches, self.tokenizer.pad_token_id, self.device)
            totals = batch.scores.n_faults
        if dist.is_distributed():  # each rank counted its own reward faults; keep the run's totals global
            mine = local.scores.n_faults if local is not None else {}
            for name, n in totals.items():
                self.rewards.fault_totals[name] = self.rewards.fault_totals.get(name, 0) + int(n) - mine.get(name, 0)
        return batch, {}

    def weights_changed(self) -> None:
        """Called by the loop after every update: the engine receives the new weights before it
        samples again (and may sleep meanwhile: ``vllm_sleep_mode``)."""
        self.engine_stale = True
        self.engine.sleep()

    def log_samples(self, step: int, batch: ScoredBatch) -> None:
        """Per-step sample table (prompt, completion, rewards) every ``sample_every`` steps."""
        log = getattr(self, "_sample_log", None)
        if log is not None:
            scores = batch.scores
            log.maybe_log(step, batch.prompts, batch.completions, scores.total.tolist(),
                          {k: v.tolist() for k, v in scores.per_function.items()})

    def checkpoint_extra(self) -> dict[str, Any]:
        """State outside models/optimizers/schedulers/generators to checkpoint."""
        return {}

    def load_extra(self, state: dict[str, Any]) -> None:
        """Put back :meth:`checkpoint_extra`'s state when resuming."""

    def save_final(self, output_dir: Path) -> dict[str, Any]:
        """Write the final model(s); returns summary fields."""
        final_dir = save_final_model(self.policy, self.tokenizer, output_dir / "final")
        return {"model_dir": str(final_dir)}

    def train(self) -> dict[str, Any]:
        return run_rl_loop(self)
