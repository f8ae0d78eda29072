"""A trained reward model (``trustrl train rm``) used as a reward function in GRPO / PPO / TRPO.

``reward_model_reward(path)`` loads the scalar model and its own tokenizer from ``path`` once
and returns ``fn(prompts, completions, **columns) -> list[float]``: the score of each
``prompt + completion`` text, computed in batches without gradients. The text is encoded
exactly as in reward-model training (:func:`trustrl.value_model.encode_scored_text`: the
concatenated text followed by EOS, left-truncated to the ``max_length`` the model was trained
with), so the policy's tokenizer does not need to be the reward model's.

In a config: ``reward_model: PATH`` (and ``reward_model_weight``) in any RL config.
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch

__all__ = ["reward_model_reward"]


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
    from trustrl.value_model import load_scalar_model, score_texts

    if batch_size < 1:
        raise ValueError(f"reward_model_reward: batch_size must be >= 1, got {batch_size}")
    path = Path(path)
    tokenizer = load_tokenizer(path)
    model = load_scalar_model(path, device=device or "cpu", tokenizer=tokenizer)
    model.eval()
    model.requires_grad_(False)
    if max_length is None:
        stored = model.extra.get("max_length")
        max_length = int(stored) if stored else None
    lock = threading.Lock()  # the registry may call us from a worker thread

    def reward_model(prompts: list[str], completions: list[str], **columns) -> list[float]:
        with lock:
            scores = score_texts(model, tokenizer, list(prompts), list(completions), batch_size=batch_size,
                                 max_length=max_length)
        return scores.tolist()

    reward_model.model = model  # type: ignore[attr-defined]
    reward_model.tokenizer = tokenizer  # type: ignore[attr-defined]
    return reward_model
