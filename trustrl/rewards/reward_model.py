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
        read_head_meta(path)  # "not a trustrl scalar model: no trustrl_head.json" otherwise
    except ModelLoadError as err:
        raise ModelLoadError(f"reward model: {err}") from None
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
    from trustrl.value_model import load_scalar_model, score_texts

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
    lock = threading.Lock()  # the registry may call us from a worker thread

    def reward_model(prompts: list[str], completions: list[str], **columns) -> list[float]:
        with lock:
            scores = score_texts(model, tokenizer, list(prompts), list(completions), batch_size=batch_size,
                                 max_length=max_length)
        return scores.tolist()

    reward_model.model = model  # type: ignore[attr-defined]
    reward_model.tokenizer = tokenizer  # type: ignore[attr-defined]
    return reward_model
