"""Validated configuration for every trainer, loadable from YAML with ``key=value`` overrides.

Each field carries a docstring (it becomes the field's description, shown by
``trustrl config-help``). Unknown keys and out-of-range values fail at load time with a
message naming the key and the allowed values, before any model is loaded.
Derived values (e.g. the rollout batch size) are properties computed in one place.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from trustrl.config.datasets import DataSource, DatasetSpec, check_dataset_spec  # noqa: F401 (re-exported)
from trustrl.config.rewards import RewardSpec
from trustrl.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration problem, naming the key at fault."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


class LoRAConfig(_Strict):
    """Low-rank adapters through peft. With LoRA the reference model is the base model with
    the adapters disabled, so no second copy of the weights is held in memory."""

    r: int = Field(16, ge=1)
    """Rank of the adapter matrices."""
    alpha: float = Field(32.0, gt=0)
    """Scaling numerator: the adapter output is multiplied by alpha / r."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the adapter input (0 keeps RL log-probs deterministic)."""
    target_modules: list[str] | str = "all-linear"
    """Module names to adapt, or "all-linear"."""


class ParallelismConfig(_Strict):
    """How a run launched on several processes (``torchrun --nproc_per_node N``) splits the
    work (docs/distributed.md). One process: nothing is split, whatever is set here."""

    strategy: Literal["ddp", "fsdp"] = "ddp"
    """"ddp": every rank holds the whole model, gradients summed across ranks. "fsdp": FSDP2
    (torch.distributed.fsdp.fully_shard) per decoder layer: each rank holds 1/N of the
    parameters, gradients and optimizer states of the policy, reference, critic and reward
    model being trained; checkpoints are sharded (torch.distributed.checkpoint) and resume at
    another world size. Not with TRPO."""
    param_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """FSDP mixed precision: "auto" = bfloat16 parameters and compute with float32 gradient
    reduction on GPUs, float32 on CPUs; "bfloat16" needs GPUs."""
    cpu_offload: bool = False
    """FSDP on GPUs: keep the sharded parameters, gradients and optimizer states in host
    memory (torch CPUOffloadPolicy); the optimizer step runs on the CPU."""


class TrainConfig(_Strict):
    """Fields shared by every trainer."""

    model: str
    """Path to a Hugging Face causal-LM directory (config.json + weights + tokenizer)."""
    tokenizer: str | None = None
    """Tokenizer directory when it differs from ``model``."""
    dataset: DatasetSpec
    """Training data: a .jsonl/.json/.csv/.parquet file, a saved `datasets` directory or a glob
    (data/*.parquet), or a list of them, each optionally {path: ..., weight: W}: a source of n
    rows contributes round(W * n) rows (every row floor(W) times, the rest evenly spaced)."""
    eval_dataset: DatasetSpec | None = None
    """Held-out data, evaluated every ``eval_every`` steps (greedy decoding for RL trainers);
    written like ``dataset``."""
    output_dir: str = "runs/latest"
    """Run directory: metrics.jsonl, TensorBoard, checkpoints, report, summary.json."""
    seed: int = 0
    """Seed of python, numpy and torch RNGs and of the data order."""
    device: str = "auto"
    """"auto" (cuda if available, else cpu), "cpu", "cuda", "cuda:1", ..."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Parameter dtype. bfloat16 on GPUs; float32 on CPUs."""
    deterministic: bool = False
    """Ask torch for deterministic algorithms (bitwise-reproducible resume on CPU)."""
    cpu_threads: int | None = Field(None, ge=1)
    """torch's intra-op CPU threads, set once at start (None: torch's default, one per core).
    A setting, never a timing decision: the same config and seed give the same numbers."""
    learning_rate: float = Field(1e-5, gt=0)
    """Peak learning rate of AdamW."""
    weight_decay: float = Field(0.0, ge=0)
    """Decoupled weight decay of AdamW."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """AdamW (beta1, beta2)."""
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"
    """Learning-rate shape after warmup."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warmup from 0 to the peak learning rate over this many optimizer steps."""
    max_grad_norm: float | None = Field(1.0, gt=0)
    """Clip the global gradient norm to this value (None: no clipping)."""
    gradient_accumulation_steps: int = Field(1, ge=1)
    """Micro-batches per optimizer step; the loss is normalized over the whole batch so
    1 x N equals N x 1."""
    micro_batch_tokens: int | None = Field(None, ge=0)
    """Form micro-batches by a token budget instead of a row count: rows sorted by length,
    each micro-batch as many as fit in this many padded tokens (rows x longest row; a longer
    row alone), padding columns no row needs dropped. Same loss and gradients as one batch
    (normalized once). None or 0: gradient_accumulation_steps equal row counts (set one of
    the two). GRPO, PPO, SFT/pretrain and the reward model."""
    max_steps: int = Field(100, ge=1)
    """Number of training steps (optimizer steps for SFT/pretrain; rollout steps for RL)."""
    log_every: int = Field(1, ge=1)
    """Write metrics every N steps."""
    eval_every: int = Field(0, ge=0)
    """Evaluate on ``eval_dataset`` every N steps (0: only at the start and the end)."""
    save_every: int = Field(0, ge=0)
    """Write a checkpoint every N steps (0: only at the end)."""
    save_every_minutes: float = Field(10.0, ge=0)
    """Also write a checkpoint once this many minutes of wall time have passed since the last
    one (0: off), so an interrupted run can always resume. It decides only WHEN a checkpoint is
    written, never a number: a run trains identically with or without it."""
    keep_last_checkpoints: int = Field(2, ge=1)
    """How many complete checkpoints to keep."""
    resume: str = "never"
    """"never" (a new run: output_dir must not hold one, see ``overwrite``), "auto" (the newest
    complete checkpoint in output_dir; an error when there is none), or a checkpoint path."""
    overwrite: bool = False
    """A new run where output_dir already holds one: move the old run aside whole, to
    OUT.previous-<n> (nothing is deleted). Without it such a start is refused."""
    allow_changed: list[str] = Field(default_factory=list)
    """On resume: settings allowed to differ from the run's saved config.yaml besides the safe
    ones (max_steps, eval_every, save_every, logging...), e.g. [learning_rate]; recorded in
    output_dir/config_history.jsonl."""
    report: bool = True
    """Write report.html and plots/ into output_dir at the end of the run (the environment
    variable TRUSTRL_NO_REPORT=1 turns it off too)."""
    tensorboard: bool = True
    """Also write TensorBoard scalars to output_dir/tb (false: none, whatever report_to says)."""
    report_to: list[Literal["tensorboard", "wandb", "trackio"]] = Field(default_factory=lambda: ["tensorboard"])
    """Where metrics go besides output_dir/metrics.jsonl (always written): "tensorboard",
    "wandb" (pip install 'trustrl[wandb]'), "trackio" (pip install 'trustrl[trackio]'); TensorBoard
    is written when listed here and ``tensorboard`` is true. The run config goes with them; a
    resumed run continues the same W&B / trackio run (id kept in output_dir/trackers.json)."""
    progress: bool = True
    """Show progress bars."""
    skip_bad_rows: bool = False
    """Skip (and count) malformed dataset rows instead of stopping with an error."""
    max_consecutive_nonfinite: int = Field(3, ge=1)
    """Stop the run after this many consecutive non-finite losses or gradients (each one
    skips its update)."""
    lora: LoRAConfig | None = None
    """Train LoRA adapters instead of all weights (needs peft)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    parallelism: ParallelismConfig = Field(default_factory=ParallelismConfig)
    """Multi-process runs: data parallel ("ddp") or sharded ("fsdp"); see docs/distributed.md."""

    @field_validator("dataset", "eval_dataset", mode="before")
    @classmethod
    def _dataset_spec(cls, v: Any) -> Any:
        return check_dataset_spec(v)

    @model_validator(mode="after")
    def _one_micro_batching(self) -> "TrainConfig":
        if self.micro_batch_tokens and self.gradient_accumulation_steps != 1:
            raise ValueError(f"set one of micro_batch_tokens ({self.micro_batch_tokens}) and "
                             f"gradient_accumulation_steps ({self.gradient_accumulation_steps}), not both")
        return self

    @field_validator("report_to", mode="before")
    @classmethod
    def _report_to_list(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("allow_changed", mode="before")
    @classmethod
    def _allow_changed_list(cls, v: Any) -> Any:
        return [k.strip() for k in v.split(",") if k.strip()] if isinstance(v, str) else v

    @field_validator("report_to")
    @classmethod
    def _report_to_installed(cls, v: list[str]) -> list[str]:
        from trustrl.logging import check_report_to  # a leaf module: no import circle

        return check_report_to(v)


class PretrainConfig(TrainConfig):
    """Next-token prediction on raw text (stage 1)."""

    text_column: str = "text"
    """Column holding raw text."""
    block_size: int = Field(128, ge=2)
    """Tokens per training sequence; documents are concatenated with EOS and cut into blocks."""
    batch_size: int = Field(32, ge=1)
    """Sequences per optimizer step (split across gradient_accumulation_steps)."""
    learning_rate: float = Field(1e-3, gt=0)
    """Peak learning rate of AdamW."""


class SFTConfig(TrainConfig):
    """Supervised fine-tuning on prompt/completion or chat rows, loss on completion tokens only."""

    prompt_column: str = "prompt"
    """Column with the prompt (a string, or a list of chat messages)."""
    completion_column: str = "completion"
    """Column with the target completion."""
    messages_column: str = "messages"
    """Column with full chat conversations (used when present instead of prompt/completion):
    the last assistant message is the target."""
    use_chat_template: bool | None = None
    """Format prompts with the tokenizer's chat template (None: when it has one)."""
    system_prompt: str | None = None
    """Optional system message prepended in chat formatting."""
    max_length: int = Field(512, ge=2)
    """Truncate prompt + completion to this many tokens."""
    batch_size: int = Field(16, ge=1)
    """Rows per optimizer step (split across gradient_accumulation_steps)."""
    epochs: float | None = Field(None, gt=0)
    """Passes over the training examples: the run takes ceil(epochs * examples / batch_size)
    steps. Leave max_steps unset with it (or set it to that same number): other values are refused."""


class RewardConfig(TrainConfig):
    """Bradley-Terry reward model on (prompt, chosen, rejected) pairs or rankings of K responses."""

    prompt_column: str = "prompt"
    """Column with the prompt (a string, or a list of chat messages)."""
    chosen_column: str = "chosen"
    """Column with the preferred response."""
    rejected_column: str = "rejected"
    """Column with the dispreferred response."""
    margin_column: str | None = "margin"
    """Optional column with a per-pair margin m (loss -log sigmoid(r_c - r_r - m)); rows without it use 0."""
    use_chat_template: bool | None = None
    """Format prompts with the tokenizer's chat template (None: when it has one)."""
    system_prompt: str | None = None
    """Optional system message prepended in chat formatting."""
    max_length: int = Field(512, ge=2)
    """Tokens per prompt + response (+ EOS); longer texts keep their last max_length tokens."""
    batch_size: int = Field(16, ge=1)
    """Pairs (or rankings) per optimizer step (split across gradient_accumulation_steps)."""
    epochs: float | None = Field(None, gt=0)
    """Passes over the training pairs: the run takes ceil(epochs * pairs / batch_size) steps.
    Leave max_steps unset with it (or set it to that same number): other values are refused."""
    center_rewards_coef: float | None = Field(None, ge=0)
    """Coefficient of the centering term coef * mean((r_c + r_r)^2) (e.g. 0.01; None: off)."""
    eval_fraction: float = Field(0.0, ge=0, lt=1)
    """Without eval_dataset: hold out this share of the training pairs for rm/accuracy."""
    eval_batch_size: int = Field(64, ge=1)
    """Pairs per forward pass in evaluation."""
    max_eval_pairs: int = Field(1000, ge=1)
    """Evaluate on at most this many held-out pairs."""
    data_format: Literal["auto", "pairs", "rankings"] = "auto"
    """Rows of (chosen, rejected) pairs, or rankings of K responses (responses_column +
    ranks_column, or a `trustrl label` judgement log); auto: rankings when the first row has
    responses_column or an `action`."""
    responses_column: str = "responses"
    """Rankings: column with the list of K responses to one prompt."""
    ranks_column: str = "ranks"
    """Rankings: column with each response's rank (1 = best; equal ranks = a tie)."""
    rank_loss: Literal["pairwise", "plackett_luce"] = "pairwise"
    """Rankings: pairwise = Bradley-Terry over all K(K-1)/2 pairs of a ranking, the ranking one
    batch element (InstructGPT); plackett_luce = the listwise likelihood of the whole order."""
    rank_ties: Literal["skip", "half"] = "skip"
    """Rankings, pairwise loss: tied pairs left out (skip), or each a cross-entropy with target
    1/2, i.e. pulled to equal scores (half). Plackett-Luce treats ties by Breslow's rule."""


class RLConfig(TrainConfig):
    """Fields shared by the RL trainers (GRPO, PPO, TRPO): sampling, rewards, evaluation."""

    prompt_column: str = "prompt"
    """Column with the prompt; every other column reaches the reward functions."""
    use_chat_template: bool | None = None
    """Format prompts with the tokenizer's chat template (None: when it has one)."""
    system_prompt: str | None = None
    """Optional system message prepended in chat formatting."""
    prompts_per_step: int = Field(8, ge=1)
    """Prompts sampled per rollout step."""
    max_prompt_length: int = Field(256, ge=1)
    """Prompts are left-truncated to this many tokens."""
    max_completion_length: int = Field(128, ge=1)
    """Completions stop at EOS or after this many tokens (then they count as truncated)."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature; log-probs are computed from logits / temperature."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling threshold (1.0: off)."""
    rewards: list[RewardSpec] = Field(default_factory=list)
    """Reward functions with weights: built-in names ("format", "numeric_answer", "exact_answer",
    "math_equivalence", "length_penalty", "soft_overlong", "code_tests") or "module:function"."""
    reward_model: str | None = None
    """Directory of a trained reward model (trustrl train rm) used as an extra reward."""
    reward_model_weight: float = 1.0
    """Weight of the reward model's score."""
    reward_timeout_s: float | None = Field(60.0, gt=0)
    """Time limit for one call of one reward function."""
    reward_on_error: Literal["raise", "default"] = "raise"
    """On a failing reward function: stop with an error naming it, or use reward_default."""
    reward_default: float = 0.0
    """Score given to samples whose reward failed, when reward_on_error = "default"."""
    eval_prompts: int = Field(200, ge=1)
    """How many held-out prompts to evaluate (greedy decoding)."""
    eval_reward: str | None = None
    """Name of the reward whose mean over held-out prompts is reported as eval/accuracy
    (default: the first reward)."""
    logprob_chunk_size: int = Field(1024, ge=1)
    """Tokens per chunk when computing log-probs from hidden states and the LM head."""
    forward_batch_size: int = Field(64, ge=1)
    """Sequences per no-grad forward pass (old and reference log-probs)."""
    sample_every: int = Field(10, ge=0)
    """Write a sample table (prompt, completion, rewards; the first 8 completions) to
    output_dir/samples.jsonl and the report_to trackers at step 1 and every N steps (0: never)."""
    rollout_engine: Literal["trustrl", "vllm"] = "trustrl"
    """What generates the rollouts: trustrl's own KV-cache sampler, or vLLM (GPU only,
    pip install 'trustrl[vllm]'; weights synced into it after every update)."""
    vllm_gpu_memory_utilization: float = Field(0.3, gt=0, le=1)
    """rollout_engine=vllm: share of the GPU memory vLLM may take (weights, KV cache)."""
    vllm_sleep_mode: bool = False
    """rollout_engine=vllm: put the engine to sleep during the update (frees its KV cache and
    weights on the GPU) and wake it before the next generation."""
    rollout_correction: Literal["none", "tis", "mis"] = "none"
    """Importance correction against the engine's behaviour log-probs: tis = truncated IS,
    weight min(pi_old / mu, cap); mis = masked IS, weight pi_old / mu inside
    [rollout_correction_lower, cap], else 0 (see trustrl.losses.rollout_correction_weights)."""
    rollout_correction_level: Literal["token", "sequence"] = "token"
    """Ratio per token, or per sequence (the product of its token ratios) for every token."""
    rollout_correction_cap: float = Field(2.0, gt=1)
    """C: the truncation cap (tis) or the upper edge of the kept band (mis)."""
    rollout_correction_lower: float | None = Field(None, ge=0)
    """mis: lower edge of the kept band (None: 1 / cap; 0: mask only above the cap)."""

    @model_validator(mode="after")
    def _check_correction_band(self) -> "RLConfig":
        lower = self.rollout_correction_lower
        if lower is not None and lower >= self.rollout_correction_cap:
            raise ValueError(f"rollout_correction_lower ({lower}) must be below rollout_correction_cap "
                             f"({self.rollout_correction_cap})")
        return self


class GRPOConfig(RLConfig):
    """Group Relative Policy Optimization (DeepSeekMath, arXiv 2402.03300) and its variants."""

    group_size: int = Field(8, ge=2)
    """G: completions sampled per prompt."""
    advantage_estimator: Literal["group_zscore", "dr_grpo", "batch_scale", "rloo", "reinforce_pp_baseline"] = (
        "group_zscore")
    """One advantage per completion from its group's rewards: group_zscore (GRPO: (r - mean) / std
    of the group), dr_grpo (r - group mean), batch_scale (group mean, batch std), rloo (leave-one-out
    baseline), reinforce_pp_baseline (group mean, then whitened over the batch). The older key
    ``advantage_scale: group | none | batch`` maps to the first three."""
    loss_aggregation: Literal["seq_mean", "token_mean", "seq_sum_constant"] = "token_mean"
    """seq_mean: GRPO paper; token_mean: DAPO; seq_sum_constant: Dr. GRPO (sum / (B * max_len))."""
    importance_level: Literal["token", "sequence"] = "token"
    """Token-level ratios (GRPO) or the GSPO sequence ratio exp(mean_t log r_t)."""
    clip_low: float = Field(0.2, ge=0, lt=1)
    """epsilon_low: the ratio is clipped below at 1 - clip_low. Default 0.2 for token ratios;
    with importance_level=sequence and no value given, GSPO's paper value 3e-4."""
    clip_high: float | None = Field(None, ge=0)
    """epsilon_high (DAPO clip-higher, e.g. 0.28); None means clip_low. With
    importance_level=sequence and neither clip given, GSPO's paper value 4e-4."""
    beta: float = Field(0.04, ge=0)
    """KL coefficient to the reference model; 0 loads no reference model at all."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    """Per-token KL estimator in the loss (k3 as in DeepSeekMath)."""
    num_iterations: int = Field(1, ge=1)
    """mu: optimizer updates per rollout batch, with importance ratios against the old policy."""
    mask_truncated_completions: bool = False
    """Exclude completions that hit max_completion_length without EOS from the loss (DAPO)."""
    dynamic_sampling: bool = False
    """DAPO: drop groups whose rewards are all equal and sample more prompts to refill."""
    max_resample_rounds: int = Field(3, ge=0)
    """Extra generation rounds allowed per step to refill the batch under dynamic_sampling."""
    overlong_cache_length: int | None = Field(None, ge=1)
    """DAPO soft overlong penalty buffer L_cache (None: off); added to the reward."""
    learning_rate: float = Field(1e-6, gt=0)
    """Peak learning rate of AdamW (DeepSeekMath uses 1e-6 on 7B models)."""
    pack_sequences: bool = False
    """With micro_batch_tokens: each micro-batch's rows packed into one sequence without padding
    (position ids restart per row; the budget counts real tokens). Llama, Qwen2/3, Mistral."""

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        """The older ``advantage_scale`` key, mapped. GSPO's sequence ratios sit far closer to 1 than token ratios: a token-level 0.2 would
        leave them unclipped, so the paper's 3e-4 / 4e-4 (Zheng et al. 2025, arXiv 2507.18071)
        apply when the user gives no clip range."""
        if isinstance(data, dict) and "advantage_scale" in data:
            data = dict(data)
            old = data.pop("advantage_scale")
            mapped = {"group": "group_zscore", "none": "dr_grpo", "batch": "batch_scale"}.get(old, old)
            if data.get("advantage_estimator", mapped) != mapped:
                raise ValueError("set advantage_estimator or the older advantage_scale, not both")
            data["advantage_estimator"] = mapped  # an unknown value is reported with the allowed ones
        if isinstance(data, dict) and data.get("importance_level") == "sequence" and data.get("clip_low") is None:
            data = dict(data)
            data["clip_low"] = 3e-4
            if data.get("clip_high") is None:
                data["clip_high"] = 4e-4
        return data

    @model_validator(mode="after")
    def _check(self) -> "GRPOConfig":
        if self.pack_sequences and not self.micro_batch_tokens:
            raise ValueError("pack_sequences packs token-budget micro-batches: set micro_batch_tokens too")
        if self.importance_level == "sequence" and self.rollout_correction != "none" \
                and self.rollout_correction_level == "token":
            raise ValueError("importance_level=sequence (GSPO) takes one weight per sequence: set "
                             "rollout_correction_level=sequence")
        if self.overlong_cache_length is not None and self.overlong_cache_length >= self.max_completion_length:
            raise ValueError(
                f"overlong_cache_length ({self.overlong_cache_length}) must be smaller than "
                f"max_completion_length ({self.max_completion_length})"
            )
        return self

    @property
    def rollout_batch_size(self) -> int:
        """Completions per step: prompts_per_step * group_size."""
        return self.prompts_per_step * self.group_size


CONFIG_CLASSES: dict[str, type[TrainConfig]] = {
    "pretrain": PretrainConfig,
    "sft": SFTConfig,
    "rm": RewardConfig,
    "grpo": GRPOConfig,
}


def register_config(name: str, cls: type[TrainConfig]) -> None:
    """Let later trainers (ppo, trpo, rm) add their config class."""
    CONFIG_CLASSES[name] = cls


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def yaml_problem(err: yaml.YAMLError) -> str:
    """One line for a YAML syntax error: ``"line L, column C: problem (context)"`` (1-based),
    instead of PyYAML's several lines quoting ``"<unicode string>"``."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    context = getattr(err, "context", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{problem}" + (f" ({context})" if context else "")


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ["a=1", "lora.r=8"] into a nested dict; values are parsed as YAML scalars."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: the value is not valid YAML: {yaml_problem(err)}") from None
        _set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _section(cls: type[BaseModel], loc: tuple) -> type[BaseModel]:
    """The config model that holds the key at ``loc`` (``lora.r`` -> LoRAConfig, ``rewards.0.x``
    -> RewardSpec); ``cls`` itself for a top-level key."""
    model = cls
    for part in loc[:-1]:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            continue  # a list index
        inner = _models_in(field.annotation)
        if not inner:
            return model
        model = inner[0]
    return model


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    import typing

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _trainer_name(cls: type) -> str | None:
    return next((name for name, c in CONFIG_CLASSES.items() if c is cls), None)


def _format_validation_error(cls: type[BaseModel], err: ValidationError, source: str) -> str:
    from trustrl.config.suggest import unknown_key_message

    lines = [f"invalid {cls.__name__} in {source}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(root)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            section = _section(cls, tuple(e["loc"]))
            msg = unknown_key_message(str(e["loc"][-1]), section.model_fields,
                                      _trainer_name(cls) if section is cls else None)
        elif e["type"] == "literal_error":
            msg = f"{msg} (got {e.get('input')!r})"
        elif "input" in e and e["type"] != "missing" and e["loc"]:  # (a whole-config check: no echo of it)
            msg = f"{msg} (got {e['input']!r})"
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def build_config(cls: type[TrainConfig], data: dict[str, Any], source: str = "config") -> TrainConfig:
    """Validate a dict into ``cls``; raise ConfigError naming each bad key."""
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(cls, err, source)) from None


def load_config(
    cls: type[TrainConfig], path: str | Path | None = None, overrides: list[str] | None = None
) -> TrainConfig:
    """Load ``cls`` from a YAML file (optional) with ``key=value`` overrides applied on top."""
    data: dict[str, Any] = {}
    source = "overrides"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {yaml_problem(err)}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys, got {type(loaded).__name__}")
        data = loaded
        source = str(path)
    data = _merge(data, parse_overrides(overrides or []))
    return build_config(cls, data, source)


#: Keys whose values are paths of this machine (files, directories, globs): ``config.yaml``
#: records them absolute, so a run resumes from any working directory.
PATH_KEYS: tuple[str, ...] = ("model", "tokenizer", "dataset", "eval_dataset", "output_dir", "reward_model",
                              "critic_model", "critic_init")


def absolute_paths(config: BaseModel) -> BaseModel:
    """A copy of ``config`` with every relative path of :data:`PATH_KEYS` (dataset lists and
    globs included, weights kept), a checkpoint path in ``resume`` and the ``path`` argument of
    a ``reward_model`` reward made absolute against the current working directory
    (``os.path.abspath``: normalized, symlinks left as written). Other values are unchanged."""
    import os

    def absolute(value: Any) -> Any:
        if isinstance(value, str) and value:
            return os.path.abspath(value)
        if isinstance(value, DataSource):
            return value.model_copy(update={"path": absolute(value.path)})
        if isinstance(value, list):
            return [absolute(v) for v in value]
        return value

    fields = type(config).model_fields
    update = {key: absolute(getattr(config, key)) for key in PATH_KEYS if key in fields}
    if "resume" in fields and config.resume not in ("never", "auto"):
        update["resume"] = absolute(config.resume)
    if "rewards" in fields:
        update["rewards"] = [spec.model_copy(update={"kwargs": {**spec.kwargs, "path": absolute(spec.kwargs["path"])}})
                             if spec.name == "reward_model" and isinstance(spec.kwargs.get("path"), str) else spec
                             for spec in config.rewards]
    return config.model_copy(update=update)


def save_config(config: BaseModel, path: str | Path) -> None:
    """Write the resolved config as YAML (part of every run directory), its paths absolute
    (:func:`absolute_paths`), so ``--config RUN/config.yaml --resume`` works from anywhere."""
    config = absolute_paths(config)
    Path(path).write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), encoding="utf-8")


def describe(cls: type[BaseModel]) -> str:
    """Per field: name, default, allowed values (a ``Literal``) or bounds (``ge/gt/le/lt``),
    and its description; nested sections (``lora``, ``rewards`` entries) follow with theirs."""
    lines = [f"{cls.__name__}: {(cls.__doc__ or '').strip().splitlines()[0]}"]
    nested: list[type[BaseModel]] = []
    for name, field in cls.model_fields.items():
        lines.append(_describe_field(name, field))
        nested += [m for m in _models_in(field.annotation) if m not in nested]
    for model in nested:
        lines.append(f"\n{model.__name__} ({', '.join(n for n, f in cls.model_fields.items() if model in _models_in(f.annotation))}):")
        lines += [_describe_field(name, field) for name, field in model.model_fields.items()]
    return "\n".join(lines)


def _describe_field(name: str, field: Any) -> str:
    default = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
    allowed = field_constraints(field)
    head = f"  {name} = {default}" + (f"   [{allowed}]" if allowed else "")
    import textwrap

    doc = textwrap.fill(" ".join((field.description or "").split()), width=100, initial_indent=" " * 6,
                        subsequent_indent=" " * 6)
    return f"{head}\n{doc}" if doc else head


def field_constraints(field: Any) -> str:
    """What a field accepts beyond its type, for config-help: ``one of: a, b`` for a
    ``Literal`` (``each one of`` for a list of them), bounds as ``>= 1``, ``0 < x <= 1``."""
    import typing

    def literals(annotation: Any) -> list[Any]:
        if typing.get_origin(annotation) is Literal:
            return list(typing.get_args(annotation))
        return [v for arg in typing.get_args(annotation) for v in literals(arg)]

    values = literals(field.annotation)
    if values:
        each = "each " if typing.get_origin(field.annotation) is list else ""
        return f"{each}one of: {', '.join(str(v) for v in values)}"
    lower = upper = ""
    for meta in field.metadata:
        for attr, sign in (("ge", ">="), ("gt", ">")):
            if getattr(meta, attr, None) is not None:
                lower = f"{getattr(meta, attr)} {'<=' if sign == '>=' else '<'} "
        for attr, sign in (("le", "<="), ("lt", "<")):
            if getattr(meta, attr, None) is not None:
                upper = f" {sign} {getattr(meta, attr)}"
    if lower and upper:
        return f"{lower}x{upper}"
    if lower:
        bound, sign = lower.split()[0], ">=" if "<=" in lower else ">"
        return f"{sign} {bound}"
    if upper:
        return upper.strip()
    return ""


# Config classes of the trainers that register themselves (rm, ppo, trpo) live beside their
# loops; ``from trustrl.config import PPOConfig`` (and ``trustrl.PPOConfig``) import them lazily.
_TRAINER_CONFIGS = {
    "PPOConfig": "trustrl.config.actor_critic",
    "TRPOConfig": "trustrl.config.actor_critic",
    "ActorCriticConfig": "trustrl.config.actor_critic",
}


def __getattr__(name: str) -> Any:
    if name in _TRAINER_CONFIGS:
        import importlib

        return getattr(importlib.import_module(_TRAINER_CONFIGS[name]), name)
    raise AttributeError(f"module 'trustrl.config' has no attribute {name!r}")
