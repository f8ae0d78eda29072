"""How a reward is written in a config (no torch: the schemas load without it)."""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator


class RewardSpec(BaseModel):
    """A reward as written in a config.

    Attributes:
        name: a built-in name (see :data:`BUILTIN_REWARDS`) or ``"package.module:function"``.
        weight: multiplier of this reward in the total.
        kwargs: arguments for the built-in factory; for ``"module:function"``, when non-empty
            the attribute is treated as a factory and called with them, otherwise the
            attribute itself is the reward function.
        alias: the name used in logs and metrics (default: the built-in name, or the
            attribute's name after the colon for ``"module:function"``).
    """

    model_config = ConfigDict(extra="forbid")

    name: str
    weight: float = 1.0
    kwargs: dict[str, Any] = Field(default_factory=dict)
    alias: str | None = None

    @field_validator("name")
    @classmethod
    def _name_not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("reward name must not be empty")
        return v.strip()

    @field_validator("weight")
    @classmethod
    def _weight_finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError(f"reward weight must be finite, got {v}")
        return v

    @field_validator("alias")
    @classmethod
    def _alias_not_blank(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("reward alias must not be empty")
        return v
