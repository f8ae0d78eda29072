"""Rewards: built-in rule rewards, the registry that resolves reward specs, and safe scoring.

Reward function signature: ``fn(prompts: list[str], completions: list[str], **columns) ->
list[float]`` with each column a list aligned with ``completions``; a function may also
declare ``completion_ids``, ``completion_messages``, ``step`` or a dataset column by name, be
``async def``, and be handed over with a weight and a name (``(fn, 0.5)``,
``Reward(fn, weight=0.5, name="len")``): the full signature is in
:mod:`trustrl.rewards.registry`. See
:mod:`trustrl.rewards.rules` for the built-ins and :mod:`trustrl.rewards.registry` for
:func:`resolve_reward` / :func:`score_completions`. ``trustrl.rewards.code`` (the sandboxed
``code_tests`` reward) is imported only when that reward is resolved.
"""

from __future__ import annotations

from trustrl.rewards.registry import (
    BUILTIN_REWARDS,
    NamedReward,
    Reward,
    RewardError,
    RewardSpec,
    RewardSpecError,
    ScoreResult,
    register_reward,
    resolve_reward,
    resolve_rewards,
    score_completions,
    to_spec,
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
    "Reward",
    "RewardError",
    "RewardFn",
    "RewardSpec",
    "RewardSpecError",
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
    "to_spec",
]
