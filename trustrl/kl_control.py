"""KL-coefficient controllers for the KL-to-reference penalty in PPO-RLHF.

Reference: Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences",
arXiv 1909.08593, sec. 2.2 (adaptive beta, a proportional controller on log-space KL error).
"""

from __future__ import annotations

from typing import Any, Union

import torch

__all__ = ["FixedKLController", "AdaptiveKLController", "KLController", "make_kl_controller"]


def _to_float(x: float | torch.Tensor) -> float:
    return float(x.detach().item()) if isinstance(x, torch.Tensor) else float(x)


class FixedKLController:
    """Constant KL coefficient ``beta``; :meth:`update` is a no-op.

    Attributes: ``value`` (the current ``beta``, python float).
    """

    kind = "fixed"

    def __init__(self, coef: float) -> None:
        if coef < 0:
            raise ValueError(f"FixedKLController: coef must be >= 0, got {coef}")
        self.value: float = float(coef)

    def update(self, current_kl: float | torch.Tensor, n_steps: int) -> float:
        """No-op; returns the (unchanged) coefficient."""
        return self.value

    def state_dict(self) -> dict[str, Any]:
        """Serializable state: ``{"kind": "fixed", "value": beta}``."""
        return {"kind": self.kind, "value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` output."""
        if state.get("kind", self.kind) != self.kind:
            raise ValueError(f"FixedKLController.load_state_dict: state is for kind {state.get('kind')!r}")
        self.value = float(state["value"])

    def __repr__(self) -> str:
        return f"FixedKLController(coef={self.value})"


class AdaptiveKLController:
    """Adaptive KL coefficient targeting a per-sample KL of ``target`` (Ziegler et al. 2019).

    Update after a batch that took ``n_steps`` samples (environment steps) with measured
    ``current_kl``::

        e    = clip(current_kl / target - 1, -0.2, 0.2)
        beta = beta * (1 + e * n_steps / horizon)

    Example: beta 0.1, target 6, horizon 10000, KL 9, n_steps 256 -> e = 0.2,
    beta = 0.1 * (1 + 0.2 * 0.0256) = 0.1005120.
    """

    kind = "adaptive"

    def __init__(self, init_coef: float, target: float, horizon: float) -> None:
        if init_coef < 0:
            raise ValueError(f"AdaptiveKLController: init_coef must be >= 0, got {init_coef}")
        if not target > 0:
            raise ValueError(f"AdaptiveKLController: target must be > 0, got {target}")
        if not horizon > 0:
            raise ValueError(f"AdaptiveKLController: horizon must be > 0, got {horizon}")
        self.value: float = float(init_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float | torch.Tensor, n_steps: int) -> float:
        """Apply one proportional update; returns the new coefficient."""
        err = min(max(_to_float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + err * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, Any]:
        """Serializable state (kind, value, target, horizon)."""
        return {"kind": self.kind, "value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` output."""
        if state.get("kind", self.kind) != self.kind:
            raise ValueError(f"AdaptiveKLController.load_state_dict: state is for kind {state.get('kind')!r}")
        self.value = float(state["value"])
        self.target = float(state.get("target", self.target))
        self.horizon = float(state.get("horizon", self.horizon))

    def __repr__(self) -> str:
        return f"AdaptiveKLController(coef={self.value}, target={self.target}, horizon={self.horizon})"


KLController = Union[FixedKLController, AdaptiveKLController]


def make_kl_controller(
    kind: str, coef: float, target: float | None = None, horizon: float | None = None
) -> KLController:
    """Build a controller: ``kind`` in ``("fixed", "adaptive")``.

    ``"adaptive"`` requires ``target`` and ``horizon``; a bad ``kind`` raises ``ValueError``
    naming the allowed values.
    """
    if kind == "fixed":
        return FixedKLController(coef)
    if kind == "adaptive":
        if target is None or horizon is None:
            raise ValueError("make_kl_controller: kind 'adaptive' needs both target and horizon")
        return AdaptiveKLController(coef, target, horizon)
    raise ValueError(f"make_kl_controller: unknown kind {kind!r}; allowed: ('fixed', 'adaptive')")
