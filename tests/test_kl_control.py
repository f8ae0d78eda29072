"""Tests for trustrl.kl_control: adaptive update worked by hand, state round trips, errors."""

from __future__ import annotations

import pytest
import torch

from trustrl.kl_control import AdaptiveKLController, FixedKLController, make_kl_controller


def test_fixed_controller_never_moves() -> None:
    c = FixedKLController(0.04)
    assert c.update(123.0, 1000) == 0.04
    assert c.value == 0.04


def test_adaptive_update_by_hand() -> None:
    # beta 0.1, target 6, horizon 10000, n_steps 256 -> n/h = 0.0256
    c = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    # KL 9: e = 9/6 - 1 = 0.5 -> clipped 0.2 -> beta = 0.1 * (1 + 0.2*0.0256) = 0.100512
    assert c.update(9.0, 256) == pytest.approx(0.100512, abs=1e-12)
    # KL 3: e = -0.5 -> -0.2 -> beta = 0.100512 * (1 - 0.00512) = 0.0999973624...
    assert c.update(3.0, 256) == pytest.approx(0.100512 * 0.99488, abs=1e-12)
    # KL 6.6: e = 0.1 (inside the clip) -> factor 1 + 0.1*0.0256 = 1.00256
    before = c.value
    assert c.update(torch.tensor(6.6), 256) == pytest.approx(before * 1.00256, rel=1e-6)


def test_adaptive_at_target_is_stationary() -> None:
    c = AdaptiveKLController(0.2, target=0.05, horizon=100)
    assert c.update(0.05, 50) == pytest.approx(0.2)


def test_state_dict_round_trip() -> None:
    a = AdaptiveKLController(0.1, 6.0, 10_000)
    a.update(9.0, 256)
    b = AdaptiveKLController(1.0, 1.0, 1.0)
    b.load_state_dict(a.state_dict())
    assert (b.value, b.target, b.horizon) == (a.value, 6.0, 10_000.0)
    f = FixedKLController(0.3)
    g = FixedKLController(0.0)
    g.load_state_dict(f.state_dict())
    assert g.value == 0.3
    with pytest.raises(ValueError, match="kind"):
        g.load_state_dict(a.state_dict())


def test_make_kl_controller() -> None:
    assert isinstance(make_kl_controller("fixed", 0.04), FixedKLController)
    c = make_kl_controller("adaptive", 0.1, target=6.0, horizon=10_000)
    assert isinstance(c, AdaptiveKLController) and c.value == 0.1
    with pytest.raises(ValueError, match="target"):
        make_kl_controller("adaptive", 0.1)
    with pytest.raises(ValueError, match="fixed.*adaptive"):
        make_kl_controller("pid", 0.1)
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, target=0.0, horizon=1.0)
