"""Rewards: built-in rule rewards, the registry that resolves reward specs, and safe scoring.

Reward function signature: ``fn(prompts: list[str], completions: list[str], **columns) ->
list[float]`` with each column a list aligned with ``completions``. See
:mod:`trustrl.rewards.rules` for the built-ins and :mod:`trustrl.rewards.registry` for
:func:`resolve_reward` / :func:`score_completions`. ``trustrl.rewards.code`` (the sandboxed
``code_tests`` reward) is imported only when that reward is resolved.
"""

from __future__ import annotations

from trustrl.rewards.registry import (
    BUILTIN_REWARDS,
    NamedReward,
    RewardError,
    RewardSpec,
    ScoreResult,
    register_reward,
    resolve_reward,
    resolve_rewards,
    score_completions,
)
from trustrl.rewards.rules import (
    RewardFn,
    exact_answer_reward,
    extract_answer,
    format_reward,
    length_penalty,
    math_equivalence_reward,
    numeric_answer_reward,
    parse_number,
    soft_overlong_reward,
)

__all__ = [
    "BUILTIN_REWARDS",
    "NamedReward",
    "RewardError",
    "RewardFn",
    "RewardSpec",
    "ScoreResult",
    "exact_answer_reward",
    "extract_answer",
    "format_reward",
    "length_penalty",
    "math_equivalence_reward",
    "numeric_answer_reward",
    "parse_number",
    "register_reward",
    "resolve_reward",
    "resolve_rewards",
    "score_completions",
    "soft_overlong_reward",
]
