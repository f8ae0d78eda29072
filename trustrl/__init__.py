"""trustrl: reinforcement-learning post-training of language models.

Math at the bottom (``advantages``, ``losses``, ``kl_control``, ``trpo``, ``logprobs``),
explicit training loops in the middle (``trustrl.trainers``), faces on top (``cli``).
Trainers are imported lazily so that ``import trustrl`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "GRPOTrainer": "trustrl.algorithms.grpo",
    "GRPOConfig": "trustrl.config",
    "SFTTrainer": "trustrl.trainers.sft",
    "SFTConfig": "trustrl.config",
    "PretrainTrainer": "trustrl.trainers.sft",
    "PretrainConfig": "trustrl.config",
    "RewardTrainer": "trustrl.trainers.reward_model",
    "RewardConfig": "trustrl.config",
    "PPOTrainer": "trustrl.algorithms.ppo",
    "PPOConfig": "trustrl.config",
    "TRPOTrainer": "trustrl.algorithms.trpo",
    "TRPOConfig": "trustrl.config",
    "Reward": "trustrl.config.rewards",
    "UserError": "trustrl.errors",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'trustrl' has no attribute {name!r}")


__all__ = sorted(_LAZY) + ["__version__"]
