"""A trained reward model (``trustrl train rm``) used as a reward function in GRPO / PPO / TRPO.

``reward_model_reward(path)`` loads the scalar model and its own tokenizer from ``path`` once
and returns ``fn(prompts, completions, raw_prompts=None, **columns) -> list[float]``: the score
of each (prompt, completion) pair, computed in batches without gradients.

The pair is encoded exactly as reward-model training encoded it: ``raw_prompts`` (the
dataset's prompts before formatting, strings or chat messages; the RL loop and the label
judge pass them) are formatted with the reward model's *own* tokenizer and the
``prompt_format`` (chat template on/off, system prompt) its trainer recorded in
``trustrl_head.json``, by the trainer's function :func:`trustrl.value_model.encode_scored_pair`
(then + completion + EOS, left-truncated to the trained ``max_length``). So the policy's
tokenizer, chat template and system prompt need not be the reward model's.

Without ``raw_prompts`` (a caller that has only texts, e.g. multi-turn agent transcripts),
``prompts`` are taken as already formatted text (:func:`trustrl.value_model.encode_scored_text`).
A reward-model directory written before ``prompt_format`` was recorded scores ``prompts`` as
given text always (its old behaviour), with a warning at load.

In a config: ``reward_model: PATH`` (and ``reward_model_weight``) in any RL config.
"""

from __future__ import annotations

import threading
import warnings
from pathlib import Path
from typing import Any

import torch

__all__ = ["check_reward_model_dir", "reward_model_reward"]


def check_reward_model_dir(path: str | Path) -> Path:
    """Cheap checks, before anything loads: ``path`` is a directory holding a trained scalar
    model (``trustrl_head.json``, ``value_head.safetensors``, ``config.json``).

    Raises:
        ModelLoadError: naming the directory and what is missing.
    """
    from trustrl.models import ModelLoadError
    from trustrl.value_model import HEAD_FILE, read_head_meta

    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"reward model directory not found: {path}")
    try:
        meta = read_head_meta(path)  # "not a trustrl scalar model: no trustrl_head.json" otherwise
    except ModelLoadError as err:
        raise ModelLoadError(f"reward model: {err}") from None
    if meta.get("kind") == "value":  # a critic predicts returns under one policy; it was never trained on preferences
        raise ModelLoadError(f"reward model {path}: a value model (a PPO/TRPO critic, kind 'value' in "
                             "trustrl_head.json), not a reward model; train one with `trustrl train rm`")
    for name in (HEAD_FILE, "config.json"):
        if not (path / name).is_file():
            raise ModelLoadError(f"reward model {path}: {name} is missing")
    return path


def reward_model_reward(path: str | Path, device: torch.device | str | None = None, batch_size: int = 32,
                        max_length: int | None = None):
    """Load the reward model in ``path`` and return a batched scoring function.

    Args:
        path: a directory written by the reward-model trainer (trunk, ``value_head.safetensors``,
            ``trustrl_head.json`` and a tokenizer).
        device: where the model runs (default: CPU).
        batch_size: texts per forward pass.
        max_length: token limit per text (default: the ``max_length`` stored by training, else none).
    """
    from trustrl.models import load_tokenizer
    from trustrl.value_model import (META_FILE, PROMPT_FORMAT_KEY, check_prompt_format, load_scalar_model, score_pairs,
                                     score_texts)

    if batch_size < 1:
        raise ValueError(f"reward_model_reward: batch_size must be >= 1, got {batch_size}")
    path = check_reward_model_dir(path)
    tokenizer = load_tokenizer(path)
    model = load_scalar_model(path, device=device or "cpu", tokenizer=tokenizer)
    model.eval()
    model.requires_grad_(False)
    if max_length is None:
        stored = model.extra.get("max_length")
        max_length = int(stored) if stored else None
    prompt_format = model.extra.get(PROMPT_FORMAT_KEY)
    if prompt_format is not None:
        check_prompt_format(prompt_format, str(path / META_FILE))
    else:
        warnings.warn(f"reward model {path}: {META_FILE} has no {PROMPT_FORMAT_KEY!r} (trained before trustrl "
                      "recorded how prompts were formatted): prompts are scored as the text the caller gives (in RL "
                      "the policy's formatted prompt), which may not be how it was trained; retrain it, or add "
                      f'"{PROMPT_FORMAT_KEY}": {{"use_chat_template": true|false, "system_prompt": null}} as in its '
                      "training config", stacklevel=2)
    lock = threading.Lock()  # the registry may call us from a worker thread

    def reward_model(prompts: list[str], completions: list[str], raw_prompts: list[Any] | None = None,
                     **columns) -> list[float]:
        with lock:
            if prompt_format is not None and raw_prompts is not None:  # formatted as in training
                scores = score_pairs(model, tokenizer, list(raw_prompts), list(completions), prompt_format,
                                     batch_size=batch_size, max_length=max_length)
            else:  # only texts to go on (or an old directory): the prompts as formatted text
                scores = score_texts(model, tokenizer, list(prompts), list(completions), batch_size=batch_size,
                                     max_length=max_length)
        return scores.tolist()

    reward_model.model = model  # type: ignore[attr-defined]
    reward_model.tokenizer = tokenizer  # type: ignore[attr-defined]
    reward_model.prompt_format = prompt_format  # type: ignore[attr-defined]
    return reward_model
