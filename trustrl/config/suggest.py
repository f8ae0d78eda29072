"""What to tell a user who wrote a key we do not know: the closest known key (difflib), and
for the names of TRL's trainers (``GRPOConfig``, ``PPOConfig``, ``SFTConfig``, ``RewardConfig``,
``TrainingArguments``, TRL's script ``ModelConfig``) our name for the same setting.

Only settings that mean the same thing are mapped (same quantity, same units, same formula);
a TRL name whose nearest setting here means something else gets a note saying how they differ,
never a mapping."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

#: TRL name -> (our keys, first one the trainer has wins; a note, or "" for an exact rename).
TRL_NAMES: dict[str, tuple[tuple[str, ...], str]] = {
    # GRPOConfig
    "num_generations": (("group_size", "samples_per_prompt"), ""),
    "epsilon": (("clip_low", "clip_range"), ""),
    "epsilon_high": (("clip_high",), ""),
    "importance_sampling_level": (("importance_level",), ""),
    "loss_type": (("loss_aggregation",), "values: grpo -> seq_mean, dapo -> token_mean, dr_grpo -> seq_sum_constant"),
    "scale_rewards": (("advantage_estimator",),
                      "values: group (or true) -> group_zscore, batch -> batch_scale, none (or false) -> dr_grpo"),
    "reward_funcs": (("rewards",), "a list of {name: ..., weight: ..., kwargs: {...}}"),
    "reward_weights": (("rewards",), "each entry of rewards takes its own weight"),
    "max_new_tokens": (("max_completion_length",), ""),
    # PPOConfig (and the older TRL PPO names)
    "cliprange": (("clip_range", "clip_low"), ""),
    "cliprange_value": (("value_clip",), ""),
    "num_ppo_epochs": (("ppo_epochs",), ""),
    "kl_coef": (("beta",), "the KL coefficient of the per-token reward"),
    "init_kl_coef": (("beta",), "the initial value with kl_control: adaptive"),
    "adap_kl_ctrl": (("kl_control",), "adap_kl_ctrl: true is kl_control: adaptive"),
    "target": (("kl_target",), ""),
    "horizon": (("kl_horizon",), ""),
    "mini_batch_size": (("minibatch_size",), ""),
    "response_length": (("max_completion_length",), ""),
    # RewardConfig / SFTConfig
    "center_rewards_coefficient": (("center_rewards_coef",), ""),
    "max_seq_length": (("max_length",), ""),
    "dataset_text_field": (("text_column",), ""),
    # TrainingArguments
    "num_train_epochs": (("epochs",), ""),
    "lr_scheduler_type": (("lr_scheduler",), "constant, linear and cosine"),
    "logging_steps": (("log_every",), ""),
    "save_steps": (("save_every",), ""),
    "eval_steps": (("eval_every",), ""),
    "save_total_limit": (("keep_last_checkpoints",), ""),
    "resume_from_checkpoint": (("resume",), "a checkpoint path, or auto for the newest in output_dir"),
    "adam_beta1": (("adam_betas",), "adam_betas: [beta1, beta2]"),
    "adam_beta2": (("adam_betas",), "adam_betas: [beta1, beta2]"),
    "model_name_or_path": (("model",), "a local directory"),
    "dataset_name": (("dataset",), "a local file, glob or list of them"),
    "lora_r": (("lora",), "lora: {r: ...}"),
    "lora_alpha": (("lora",), "lora: {alpha: ...}"),
    "lora_dropout": (("lora",), "lora: {dropout: ...}"),
    "lora_target_modules": (("lora",), "lora: {target_modules: ...}"),
}

#: TRL names whose KL term sits in the reward (PPO, RLOO): our ``beta`` means that only in the
#: actor-critic trainers (GRPO's beta weighs a KL term of the loss).
_REWARD_KL = {"kl_coef", "init_kl_coef"}

#: TRL names with no setting of the same meaning here, and what to use instead.
TRL_DIFFERENT: dict[str, str] = {
    "per_device_train_batch_size": (
        "trustrl sets the batch of a whole optimizer step, over all processes and accumulation "
        "micro-batches: batch_size (sft, rm, pretrain), prompts_per_step x group_size (grpo, trpo), "
        "prompts_per_step x samples_per_prompt (ppo)"),
    "per_device_eval_batch_size": "eval_batch_size (rm, pairs per forward pass); RL evaluation: eval_prompts",
    "generation_batch_size": "the rollout batch is prompts_per_step x group_size completions per step",
    "steps_per_generation": "num_iterations (grpo) or ppo_epochs (ppo) updates reuse one rollout batch",
    "num_mini_batches": "minibatch_size (completions per update) = rollout batch / num_mini_batches",
    "warmup_ratio": "warmup_steps (a number of optimizer steps)",
    "bf16": "dtype: bfloat16 (the parameter dtype; trustrl has no mixed-precision autocast)",
    "fp16": "dtype: float16 (the parameter dtype; trustrl has no mixed-precision autocast)",
    "use_peft": "a lora: {r: ..., alpha: ...} section turns LoRA on",
    "vf_coef": "actor and critic have separate optimizers: set critic_learning_rate",
    "completion_only_loss": "the SFT loss always counts completion tokens only",
    "top_k": "not supported: temperature and top_p only",
}


def unknown_key_message(key: str, known: Iterable[str], trainer: str | None = None) -> str:
    """The message for an unknown ``key`` among ``known`` keys (of one config section):
    TRL's equivalent when ``key`` is a TRL name, else the closest known keys, else the list."""
    known = sorted(known)
    help_hint = f" (all keys: trustrl config-help {trainer})" if trainer else ""
    if key in TRL_NAMES and not (key in _REWARD_KL and "lam" not in known):
        ours, note = TRL_NAMES[key]
        present = [k for k in ours if k in known]
        if present:
            return (f"unknown key; TRL's {key} is {present[0]} here" + (f" ({note})" if note else "")
                    + help_hint)
    if key in TRL_DIFFERENT:
        return f"unknown key; TRL's {key} has no exact equivalent here: {TRL_DIFFERENT[key]}" + help_hint
    if key in _REWARD_KL:
        return (f"unknown key; TRL's {key} weighs a KL term in the reward, which only ppo and trpo have "
                "(beta there); beta here weighs a KL term of the loss" + help_hint)
    if key in TRL_NAMES:
        return (f"unknown key; TRL's {key} is {TRL_NAMES[key][0][0]} in trustrl, a setting this trainer "
                "does not have" + help_hint)
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    if close:
        return f"unknown key; did you mean {' or '.join(close)}?" + help_hint
    return f"unknown key; allowed keys: {', '.join(known)}"
