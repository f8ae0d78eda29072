"""Small MLP actors and critics for classic control.

Two action distributions, with the same interface so the trainers need not care which:

* :class:`CategoricalActor` -- ``Discrete(n)`` actions, ``params = logits [B, n]``.
* :class:`GaussianActor` -- ``Box(d)`` actions, diagonal Gaussian with a *state-independent*
  learned log-std (initialised to 0, i.e. std 1), ``params = (mean [B, d], log_std [d])``.

Methods: ``actor(obs) -> params``; ``log_prob(params, act) -> [B]``; ``entropy(params) -> [B]``;
``kl(old_params, params) -> [B]`` = ``KL(pi_old || pi)``; ``sample(params) -> act``;
``mode(params) -> act`` (deterministic evaluation action).

Initialisation (Andrychowicz et al. 2021, "What Matters in On-Policy RL", and the
PPO implementation-details literature): orthogonal weights, gain sqrt(2) on hidden layers,
0.01 on the policy head (near-uniform / near-zero-mean initial policy), 1.0 on the value
head; biases 0.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
import torch.nn.functional as F

from trustrl.losses import entropy_from_logits

_LOG_2PI = math.log(2.0 * math.pi)

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU}


def mlp(in_dim: int, hidden: Sequence[int], out_dim: int, activation: str = "tanh",
        out_gain: float = 1.0) -> nn.Sequential:
    """``Linear -> act -> ... -> Linear(out_dim)`` with orthogonal init (see module doc)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"policies.mlp: activation {activation!r} not in {sorted(ACTIVATIONS)}")
    layers: list[nn.Module] = []
    d = in_dim
    for h in hidden:
        lin = nn.Linear(d, h)
        nn.init.orthogonal_(lin.weight, gain=math.sqrt(2.0))
        nn.init.zeros_(lin.bias)
        layers += [lin, ACTIVATIONS[activation]()]
        d = h
    head = nn.Linear(d, out_dim)
    nn.init.orthogonal_(head.weight, gain=out_gain)
    nn.init.zeros_(head.bias)
    layers.append(head)
    return nn.Sequential(*layers)


def gaussian_log_prob(mean: torch.Tensor, log_std: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
    """Diagonal Gaussian log-density summed over the last dim.

    ``log N(a; mu, sigma) = sum_i [ -0.5 ((a_i - mu_i) / sigma_i)^2 - log sigma_i - 0.5 log 2 pi ]``
    Shapes: ``mean [B, d]``, ``log_std [d]`` or ``[B, d]``, ``act [B, d]`` -> ``[B]``.
    """
    z = (act - mean) * torch.exp(-log_std)
    return (-0.5 * z.square() - log_std - 0.5 * _LOG_2PI).sum(-1)


class Critic(nn.Module):
    """``V(s)``: MLP with a scalar head; ``forward(obs [B, o]) -> [B]``."""

    def __init__(self, obs_dim: int, hidden: Sequence[int] = (64, 64), activation: str = "tanh") -> None:
        super().__init__()
        self.net = mlp(obs_dim, hidden, 1, activation, out_gain=1.0)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs).squeeze(-1)


class CategoricalActor(nn.Module):
    """``pi(a|s) = softmax(logits(s))`` over ``n_actions``."""

    discrete = True

    def __init__(self, obs_dim: int, n_actions: int, hidden: Sequence[int] = (64, 64),
                 activation: str = "tanh") -> None:
        super().__init__()
        self.net = mlp(obs_dim, hidden, n_actions, activation, out_gain=0.01)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs)

    @staticmethod
    def log_prob(logits: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(logits, dim=-1).gather(-1, act.long().unsqueeze(-1)).squeeze(-1)

    @staticmethod
    def entropy(logits: torch.Tensor) -> torch.Tensor:
        return entropy_from_logits(logits)

    @staticmethod
    def kl(old_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """``KL(p_old || p) = sum_a p_old(a) (log p_old(a) - log p(a))`` per row."""
        old_logp = F.log_softmax(old_logits, dim=-1)
        logp = F.log_softmax(logits, dim=-1)
        return (old_logp.exp() * (old_logp - logp)).sum(-1)

    @staticmethod
    def sample(logits: torch.Tensor) -> torch.Tensor:
        # Gumbel-max: argmax(logits + G), G ~ Gumbel(0, 1); one fused op, no Distribution object.
        u = torch.rand_like(logits).clamp_(1e-12, 1.0)
        return torch.argmax(logits - torch.log(-torch.log(u)), dim=-1)

    @staticmethod
    def mode(logits: torch.Tensor) -> torch.Tensor:
        return torch.argmax(logits, dim=-1)

    def act(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample ``a ~ pi(.|obs)`` and return ``(a, log pi(a|obs))`` in one pass (rollouts)."""
        logp_all = F.log_softmax(self(obs), dim=-1)
        u = torch.rand_like(logp_all).clamp_(1e-12, 1.0)
        a = torch.argmax(logp_all - torch.log(-torch.log(u)), dim=-1)
        return a, logp_all.gather(-1, a.unsqueeze(-1)).squeeze(-1)

    @staticmethod
    def detach(logits: torch.Tensor) -> torch.Tensor:
        return logits.detach()


class GaussianActor(nn.Module):
    """``pi(a|s) = N(mu(s), diag(exp(log_std)^2))`` with a state-independent ``log_std``."""

    discrete = False

    def __init__(self, obs_dim: int, act_dim: int, hidden: Sequence[int] = (64, 64),
                 activation: str = "tanh", log_std_init: float = 0.0) -> None:
        super().__init__()
        self.net = mlp(obs_dim, hidden, act_dim, activation, out_gain=0.01)
        self.log_std = nn.Parameter(torch.full((act_dim,), float(log_std_init)))

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net(obs), self.log_std

    @staticmethod
    def log_prob(params: tuple[torch.Tensor, torch.Tensor], act: torch.Tensor) -> torch.Tensor:
        mean, log_std = params
        return gaussian_log_prob(mean, log_std, act)

    @staticmethod
    def entropy(params: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """``H = sum_i (log sigma_i + 0.5 log(2 pi e))``, broadcast to ``[B]``."""
        mean, log_std = params
        h = (log_std + 0.5 * (_LOG_2PI + 1.0)).sum(-1)
        return h.expand(mean.shape[:-1])

    @staticmethod
    def kl(old: tuple[torch.Tensor, torch.Tensor], new: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """``KL(N_old || N_new) = sum_i [log s_new/s_old + (s_old^2 + (m_old - m_new)^2) / (2 s_new^2) - 1/2]``."""
        m0, ls0 = old
        m1, ls1 = new
        var0, var1 = torch.exp(2 * ls0), torch.exp(2 * ls1)
        return (ls1 - ls0 + (var0 + (m0 - m1).square()) / (2 * var1) - 0.5).sum(-1)

    @staticmethod
    def sample(params: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        mean, log_std = params
        return mean + torch.exp(log_std) * torch.randn_like(mean)

    @staticmethod
    def mode(params: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return params[0]

    def act(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample ``a = mu + sigma * eps`` and return ``(a, log pi(a|obs))``; with ``eps`` at
        hand the log-density is ``sum(-eps^2 / 2 - log sigma) - d/2 log 2 pi``."""
        mean, log_std = self(obs)
        eps = torch.randn_like(mean)
        a = mean + torch.exp(log_std) * eps
        logp = (-0.5 * eps.square() - log_std).sum(-1) - 0.5 * _LOG_2PI * mean.shape[-1]
        return a, logp

    @staticmethod
    def detach(params: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return params[0].detach(), params[1].detach()


def make_actor(observation_space, action_space, hidden: Sequence[int] = (64, 64),
               activation: str = "tanh", log_std_init: float = 0.0) -> nn.Module:
    """Pick the actor for a Gymnasium action space (``Discrete`` or 1-D ``Box``)."""
    import gymnasium as gym

    obs_dim = flat_obs_dim(observation_space)
    if isinstance(action_space, gym.spaces.Discrete):
        return CategoricalActor(obs_dim, int(action_space.n), hidden, activation)
    if isinstance(action_space, gym.spaces.Box) and len(action_space.shape) == 1:
        return GaussianActor(obs_dim, int(action_space.shape[0]), hidden, activation, log_std_init)
    raise ValueError(f"policies.make_actor: unsupported action space {action_space}")


def flat_obs_dim(observation_space) -> int:
    """Input width for an observation space: ``n`` for ``Discrete(n)`` (one-hot), else ``prod(shape)``."""
    import gymnasium as gym

    if isinstance(observation_space, gym.spaces.Discrete):
        return int(observation_space.n)
    if isinstance(observation_space, gym.spaces.Box):
        return int(math.prod(observation_space.shape))
    raise ValueError(f"policies.flat_obs_dim: unsupported observation space {observation_space}")
