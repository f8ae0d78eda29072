"""Policy-gradient side of trustrl.classic: distributions, the rollout buffer's handling of
termination vs truncation (a hand-worked GAE example), normalisers, a short PPO run, the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import gymnasium as gym

import trustrl.classic  # noqa: F401
from trustrl.advantages import gae_time_major
from trustrl.classic.common import (
    FlatAdam,
    FlatParams,
    ObsNormalizer,
    RewardScaler,
    RunningMeanStd,
    VecEnv,
    collect_rollout,
)
from trustrl.classic.policies import CategoricalActor, Critic, GaussianActor, gaussian_log_prob


# --------------------------------------------------------------------------- distributions
def test_gaussian_log_prob_entropy_kl_match_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(5, 3, generator=g, dtype=torch.float64)
    log_std = torch.randn(3, generator=g, dtype=torch.float64) * 0.5
    act = torch.randn(5, 3, generator=g, dtype=torch.float64)
    ref = torch.distributions.Normal(mean, log_std.exp())
    torch.testing.assert_close(gaussian_log_prob(mean, log_std, act), ref.log_prob(act).sum(-1))
    torch.testing.assert_close(GaussianActor.entropy((mean, log_std)), ref.entropy().sum(-1))
    mean2, log_std2 = mean + 0.3, log_std - 0.2
    ref2 = torch.distributions.Normal(mean2, log_std2.exp())
    torch.testing.assert_close(GaussianActor.kl((mean, log_std), (mean2, log_std2)),
                               torch.distributions.kl_divergence(ref, ref2).sum(-1))


def test_gaussian_actor_init_and_act_logp_consistent():
    torch.manual_seed(0)
    actor = GaussianActor(3, 2)
    assert torch.equal(actor.log_std.detach(), torch.zeros(2))  # log-std initialised to 0
    obs = torch.randn(7, 3)
    a, logp = actor.act(obs)
    torch.testing.assert_close(logp, actor.log_prob(actor(obs), a))


def test_categorical_matches_torch_distributions():
    torch.manual_seed(0)
    actor = CategoricalActor(4, 3)
    obs = torch.randn(6, 4)
    logits = actor(obs) * 50  # make it far from uniform
    ref = torch.distributions.Categorical(logits=logits)
    a = torch.tensor([0, 1, 2, 0, 1, 2])
    torch.testing.assert_close(actor.log_prob(logits, a), ref.log_prob(a))
    torch.testing.assert_close(actor.entropy(logits), ref.entropy())
    ref2 = torch.distributions.Categorical(logits=logits.flip(-1))
    torch.testing.assert_close(actor.kl(logits, logits.flip(-1)), torch.distributions.kl_divergence(ref, ref2))
    act, logp = actor.act(obs)
    torch.testing.assert_close(logp, actor.log_prob(actor(obs), act))


@pytest.mark.parametrize("discrete", [True, False])
def test_numpy_rollout_policy_matches_torch(discrete):
    torch.manual_seed(0)
    actor = CategoricalActor(4, 3) if discrete else GaussianActor(4, 2)
    with torch.no_grad():
        for p in actor.parameters():
            p.add_(0.3 * torch.randn_like(p))  # move away from the near-uniform init
    critic = Critic(4)
    obs = np.random.default_rng(1).normal(size=(5, 4)).astype(np.float32)
    a, logp = actor.numpy_policy()(obs, np.random.default_rng(2))
    with torch.no_grad():
        ref = actor.log_prob(actor(torch.from_numpy(obs)), torch.from_numpy(a))
        v_ref = critic(torch.from_numpy(obs))
    np.testing.assert_allclose(logp, ref.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(critic.numpy_value()(obs), v_ref.numpy(), rtol=1e-5, atol=1e-6)


def test_gumbel_sampling_frequencies():
    torch.manual_seed(0)
    logits = torch.log(torch.tensor([[0.2, 0.5, 0.3]])).expand(40_000, 3)
    freq = torch.bincount(CategoricalActor.sample(logits), minlength=3).double() / 40_000
    # binomial std at n = 40k is <= 0.0025; 4 sigma
    torch.testing.assert_close(freq, torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64), atol=0.01, rtol=0)


# ---------------------------------------------------------- rollout: termination/truncation
class ScriptedEnv(gym.Env):
    """1-D observations that spell out the script; actions are ignored.

    reset -> 0 ; step -> 1 (r=1) ; step -> 2 (r=3, TERMINATED) ; reset -> 10 ;
    step -> 11 (r=1, TRUNCATED) ; reset -> 20 ; ...
    """

    observation_space = gym.spaces.Box(-100.0, 100.0, (1,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def __init__(self):
        self.episode = -1
        self.t = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.episode += 1
        self.t = 0
        return np.array([10.0 * self.episode], np.float32), {}

    def step(self, action):
        self.t += 1
        obs = np.array([10.0 * self.episode + self.t], np.float32)
        if self.episode == 0 and self.t == 2:
            return obs, 3.0, True, False, {}
        if self.episode == 1 and self.t == 1:
            return obs, 1.0, False, True, {}
        return obs, 1.0, False, False, {}


class ObsAsValue(nn.Module):
    """V(s) = s[0], so every value below can be read off the script."""

    def forward(self, obs):
        return obs[:, 0]

    def numpy_value(self):
        return lambda obs: obs[:, 0]


gym.register(id="trustrl_test/Scripted-v0", entry_point=ScriptedEnv)


def test_rollout_gae_bootstraps_truncation_not_termination_by_hand():
    vec = VecEnv("trustrl_test/Scripted-v0", 1, seed=0)
    actor = CategoricalActor(1, 2)
    ro, obs_next = collect_rollout(vec, actor, ObsAsValue(), vec.reset(), 3,
                                   ObsNormalizer(1, enabled=False), RewardScaler(1, 0.9, enabled=False),
                                   np.random.default_rng(0))
    assert ro.obs[:, 0, 0].tolist() == [0.0, 1.0, 10.0]
    assert ro.rewards[:, 0].tolist() == [1.0, 3.0, 1.0]
    assert ro.terminated[:, 0].tolist() == [False, True, False]
    assert ro.done[:, 0].tolist() == [False, True, True]
    assert ro.values[:, 0].tolist() == [0.0, 1.0, 10.0]
    # next values: V(1) = 1; after the truncation the value of the *final* observation 11 --
    # not of the reset observation 20. (After the termination, t = 1, the entry is whatever
    # comes next: GAE multiplies it by 1 - terminated = 0, checked below by perturbing it.)
    assert ro.next_values[0, 0].item() == 1.0 and ro.next_values[2, 0].item() == 11.0
    assert obs_next.tolist() == [[20.0]]
    assert vec.drain_episodes() == ([4.0, 1.0], [2, 1])

    adv, ret = gae_time_major(ro.rewards, ro.values, ro.next_values, ro.terminated, ro.done, 0.9, 0.8)
    # delta_0 = 1 + 0.9 * 1 - 0 = 1.9
    # delta_1 = 3 + 0 (terminated: no bootstrap) - 1 = 2
    # delta_2 = 1 + 0.9 * 11 (bootstrap through truncation) - 10 = 0.9
    # A_2 = 0.9 ; A_1 = 2 (episode ends, no carry from A_2) ; A_0 = 1.9 + 0.9 * 0.8 * 2 = 3.34
    torch.testing.assert_close(adv[:, 0], torch.tensor([3.34, 2.0, 0.9]))
    torch.testing.assert_close(ret[:, 0], torch.tensor([3.34, 3.0, 10.9]))
    poked = ro.next_values.clone()
    poked[1, 0] = 1e6
    adv2, _ = gae_time_major(ro.rewards, ro.values, poked, ro.terminated, ro.done, 0.9, 0.8)
    torch.testing.assert_close(adv2, adv)


# ------------------------------------------------------------------------------ normalisers
def test_running_mean_std_matches_numpy_over_batches():
    rng = np.random.default_rng(0)
    data = rng.normal(3.0, 2.0, size=(1000, 2))
    rms = RunningMeanStd((2,), eps=0.0)
    for chunk in np.array_split(data, 7):
        rms.update(chunk)
    np.testing.assert_allclose(rms.mean, data.mean(0), rtol=1e-10)
    np.testing.assert_allclose(rms.var, data.var(0), rtol=1e-10)


def test_obs_normalizer_clips_and_reward_scaler_resets_return():
    norm = ObsNormalizer(1, enabled=True, clip=10.0)
    norm.rms.mean[:] = 0.0
    norm.rms.var[:] = 1.0
    assert norm(np.array([[1e6], [-0.5]]), update=False).tolist() == [[10.0], [-0.5]]
    sc = RewardScaler(2, gamma=0.5, enabled=True)
    sc(np.array([1.0, 2.0]), np.array([True, False]))
    # env 0's episode ended: its running return restarts at 0; env 1's is 2 (not yet discounted)
    assert sc.ret.tolist() == [0.0, 2.0]


def test_flat_params_share_storage_and_gradients():
    torch.manual_seed(0)
    a, c = GaussianActor(3, 2), nn.Linear(3, 1)
    before = [p.detach().clone() for p in list(a.parameters()) + list(c.parameters())]
    fp = FlatParams([a, c])
    assert all(torch.equal(p, b) for p, b in zip(fp.params, before))
    x = torch.randn(4, 3)
    (a(x)[0].sum() + c(x).sum()).backward()
    # gradient of sum(mean) wrt the last layer's bias is the batch size, 4, per output
    torch.testing.assert_close(a.net[-1].bias.grad, torch.full((2,), 4.0))
    assert fp.flat.grad.abs().sum() > 0
    with torch.no_grad():
        fp.flat.add_(1.0)
    torch.testing.assert_close(c.bias.detach(), before[-1] + 1.0)


def test_flat_adam_is_bit_identical_to_torch_fused_adam():
    torch.manual_seed(0)
    p0 = torch.randn(300)
    pa, pb = nn.Parameter(p0.clone()), nn.Parameter(p0.clone())
    pa.grad, pb.grad = torch.zeros(300), torch.zeros(300)
    ref = torch.optim.Adam([pa], lr=1e-3, eps=1e-5, fused=True)
    ours = FlatAdam(pb, lr=1e-3, eps=1e-5)
    for i in range(60):
        g = torch.randn(300) * (10.0 ** (i % 5 - 2))
        pa.grad.copy_(g)
        pb.grad.copy_(g)
        lr = 1e-3 * (1.0 - i / 60)  # annealed through param_groups, as the trainers do
        ref.param_groups[0]["lr"] = lr
        ours.param_groups[0]["lr"] = lr
        ref.step()
        ours.step()
    assert torch.equal(pa.detach(), pb.detach())
    assert torch.equal(ref.state[pa]["exp_avg"], ours.exp_avg)
    assert torch.equal(ref.state[pa]["exp_avg_sq"], ours.exp_avg_sq)


def test_mlp_forward_matches_sequential():
    from trustrl.classic.policies import mlp

    torch.manual_seed(0)
    net = mlp(4, (64, 64), 2)
    seq = nn.Sequential(*net)  # same layer objects, stock forward
    x = torch.randn(16, 4)
    assert torch.equal(net(x), seq(x))
    assert list(net.state_dict()) == list(seq.state_dict())


# ------------------------------------------------------------------------------- training
@pytest.mark.slow
def test_ppo_cartpole_short_run_beats_random():
    from trustrl.classic.ppo import PPO, ppo_config_for

    # random policy scores ~22 on CartPole-v1; 20k steps of the zoo preset are far above it
    summary = PPO("CartPole-v1", ppo_config_for("CartPole-v1"), seed=1).train(20_000)
    assert summary["env_steps"] == 19_968  # 78 updates of 8 envs x 32 steps
    assert summary["eval_episodes"] == 10
    assert summary["eval_mean_return"] > 150


def test_cli_writes_summary_metrics_and_png(tmp_path):
    from trustrl.classic.cli import main

    out = tmp_path / "run"
    rc = main(["--algo", "ppo", "--env", "CartPole-v1", "--total-steps", "512", "--seed", "3",
               "--output-dir", str(out), "--quiet"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    for key in ("eval_mean_return", "eval_std_return", "env_steps", "wall_seconds", "algo", "env", "seed"):
        assert key in summary
    assert summary["algo"] == "ppo" and summary["env"] == "CartPole-v1" and summary["seed"] == 3
    assert summary["env_steps"] == 512 and summary["eval_episodes"] >= 10
    assert math.isfinite(summary["eval_mean_return"])
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines and all("step" in l for l in lines)
    assert (out / "learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("algo, env", [("trpo", "Pendulum-v1"), ("reinforce", "trustrl/Maze-v0"),
                                       ("q_learning", "trustrl/Maze-v0"), ("td", "trustrl/Maze-v0")])
def test_cli_other_algos_tiny_budget(tmp_path, algo, env):
    from trustrl.classic.cli import main

    rc = main(["--algo", algo, "--env", env, "--total-steps", "2048", "--output-dir", str(tmp_path),
               "--quiet", "--set", "eval_episodes=10"])
    assert rc == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["algo"] == algo and len(summary["eval_returns"]) == 10
    assert (tmp_path / "learning_curve.png").exists()


def test_cli_rejects_unknown_config_key(capsys):
    from trustrl.classic.cli import main

    assert main(["--algo", "ppo", "--set", "n_epoch=3", "--print-config"]) == 2
    assert "unknown config key 'n_epoch'" in capsys.readouterr().err
