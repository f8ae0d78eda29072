"""Policy-gradient side of trustrl.classic: distributions, the rollout's handling of
termination vs truncation on Gymnasium's NEXT_STEP autoreset (a hand-worked GAE example),
the wrapper stack, minibatches (none dropped), PPO's target_kl rule, a short PPO run, the CLI."""

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
from gymnasium.wrappers.vector import NormalizeObservation

from trustrl.classic.common import collect_rollout, find_wrapper, make_vec_env, minibatches
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


gym.register(id="trustrl_test/Scripted-v0", entry_point=ScriptedEnv)


def test_vector_env_uses_next_step_autoreset():
    envs = make_vec_env("CartPole-v1", 2)
    assert envs.metadata["autoreset_mode"] == gym.vector.AutoresetMode.NEXT_STEP
    envs.close()


def test_rollout_gae_bootstraps_truncation_not_termination_by_hand():
    envs = make_vec_env("trustrl_test/Scripted-v0", 1)
    obs, _ = envs.reset(seed=0)
    ro, obs_next, valid_next = collect_rollout(envs, CategoricalActor(1, 2), ObsAsValue(),
                                               torch.as_tensor(obs), torch.ones(1, dtype=torch.bool), 5)
    # NEXT_STEP autoreset: the step after an episode's end (t = 2 and t = 4) only resets the
    # env (action ignored, reward 0): not a transition, so valid = False there.
    assert ro.obs[:, 0, 0].tolist() == [0.0, 1.0, 2.0, 10.0, 11.0]
    assert ro.rewards[:, 0].tolist() == [1.0, 3.0, 0.0, 1.0, 0.0]
    assert ro.terminated[:, 0].tolist() == [False, True, False, False, False]
    assert ro.done[:, 0].tolist() == [False, True, False, True, False]
    assert ro.valid[:, 0].tolist() == [True, True, False, True, False]
    assert ro.values[:, 0].tolist() == [0.0, 1.0, 2.0, 10.0, 11.0]
    # next values: after the truncation (t = 3) the value of the *final* observation 11, not
    # of the reset observation 20. (After the termination, t = 1, the entry is whatever comes
    # next: GAE multiplies it by 1 - terminated = 0, checked below by perturbing it.)
    assert ro.next_values[:, 0].tolist() == [1.0, 2.0, 10.0, 11.0, 20.0]
    assert obs_next.tolist() == [[20.0]] and valid_next.tolist() == [True]
    # raw undiscounted returns and lengths of the two episodes, from RecordEpisodeStatistics
    assert (ro.episode_returns, ro.episode_lengths) == ([4.0, 1.0], [2, 1])

    adv, ret = gae_time_major(ro.rewards, ro.values, ro.next_values, ro.terminated, ro.done, 0.9, 0.8)
    # delta_0 = 1 + 0.9 * 1 - 0 = 1.9
    # delta_1 = 3 + 0 (terminated: no bootstrap) - 1 = 2
    # delta_3 = 1 + 0.9 * 11 (bootstrap through truncation) - 10 = 0.9
    # A_3 = 0.9 ; A_1 = 2 (episode ends, no carry) ; A_0 = 1.9 + 0.9 * 0.8 * 2 = 3.34
    # (t = 2 and t = 4 are autoreset steps: computed, then dropped by flat_valid)
    torch.testing.assert_close(ro.flat_valid(adv), torch.tensor([3.34, 2.0, 0.9]))
    torch.testing.assert_close(ro.flat_valid(ret), torch.tensor([3.34, 3.0, 10.9]))
    poked = ro.next_values.clone()
    poked[1, 0] = 1e6
    adv2, _ = gae_time_major(ro.rewards, ro.values, poked, ro.terminated, ro.done, 0.9, 0.8)
    torch.testing.assert_close(ro.flat_valid(adv2), ro.flat_valid(adv))
    envs.close()


# ------------------------------------------------------------------------ wrapper stack
def test_wrappers_normalise_and_clip_for_the_agent_but_record_raw_returns():
    envs = make_vec_env("trustrl_test/Scripted-v0", 1, normalize_obs=True, normalize_reward=True,
                        clip_obs=1.5, clip_reward=0.5)
    norm = find_wrapper(envs, NormalizeObservation)
    norm.obs_rms.mean[:] = 0.0
    norm.obs_rms.var[:] = 1.0
    norm.update_running_mean = False
    obs, _ = envs.reset(seed=0)
    obs1, r1, *_ = envs.step(np.array([0]))
    obs2, r2, term, _, info = envs.step(np.array([0]))
    # (o - 0) / sqrt(1 + 1e-8), clipped to +-1.5: 0 -> 0, 1 -> 1, 2 -> 1.5
    np.testing.assert_allclose([obs[0, 0], obs1[0, 0], obs2[0, 0]], [0.0, 1.0, 1.5], rtol=1e-6)
    # the first discounted return has a tiny running variance (about 2e-4), so the scaled
    # rewards 1 and 3 are far above the clip: the agent sees 0.5 twice ...
    assert r1.tolist() == [0.5] and r2.tolist() == [0.5] and term.tolist() == [True]
    # ... while the episode statistics see the raw rewards: 1 + 3
    assert info["episode"]["r"].tolist() == [4.0] and info["episode"]["l"].tolist() == [2]
    envs.close()


def test_discrete_observations_are_one_hot_float32():
    envs = make_vec_env("trustrl/Maze-v0", 2)
    obs, _ = envs.reset(seed=0)
    assert obs.dtype == np.float32 and obs.shape == (2, 24)
    assert obs[:, 0].tolist() == [1.0, 1.0] and obs.sum(axis=1).tolist() == [1.0, 1.0]  # start = cell 0
    envs.close()


def test_mlp_layers_run_through_module_call():
    from trustrl.classic.policies import mlp

    torch.manual_seed(0)
    net = mlp(4, (64, 64), 2)
    seen = []
    for layer in net:
        layer.register_forward_hook(lambda m, i, o: seen.append(type(m).__name__))
    net(torch.randn(3, 4))
    # every layer's hooks run: nothing bypasses Module.__call__
    assert seen == ["Linear", "Tanh", "Linear", "Tanh", "Linear"]


# --------------------------------------------------------------------------- minibatches
def test_minibatches_use_every_sample_once_partial_last():
    g = torch.Generator().manual_seed(0)
    mbs = minibatches(10, 4, g)
    assert [len(m) for m in mbs] == [4, 4, 2]  # 10 = 4 + 4 + 2: the partial one is kept
    assert sorted(torch.cat(mbs).tolist()) == list(range(10))
    assert [len(m) for m in minibatches(8, 4, g)] == [4, 4]
    # one minibatch holding the whole batch: the batch itself, unshuffled (order is irrelevant)
    assert minibatches(3, 8, g) == minibatches(3, 3, g) == [slice(None)]
    with pytest.raises(ValueError, match="minibatch_size"):
        minibatches(3, 0)


def _tiny_ppo(**overrides):
    from trustrl.classic.ppo import PPO, ppo_config_for

    # 2 envs x 5 steps of CartPole from reset: no episode can end in 5 steps (the pole needs
    # more than 5 steps to pass 12 degrees), so the batch is 10 valid samples.
    cfg = ppo_config_for("CartPole-v1", dict(n_envs=2, n_steps=5, hidden=(8,), **overrides))
    return PPO("CartPole-v1", cfg, seed=0)


def test_ppo_partial_minibatch_is_used_every_epoch():
    ppo = _tiny_ppo(minibatch_size=4, n_epochs=2)
    sizes = []
    ppo.actor.register_forward_hook(lambda m, inp, out: sizes.append(inp[0].shape[0]))
    obs, _ = ppo.envs.reset(seed=0)
    ro, *_ = collect_rollout(ppo.envs, ppo.actor, ppo.critic, torch.as_tensor(obs),
                             torch.ones(2, dtype=torch.bool), 5)
    assert bool(ro.valid.all())
    sizes.clear()
    out = ppo.update(ro, 1.0)
    # two epochs of 4, 4, 2 (then one forward of all 10 for the entropy metric)
    assert sizes == [4, 4, 2, 4, 4, 2, 10]
    assert out["optim/minibatch_steps"] == 6.0


def test_ppo_target_kl_stops_before_applying_the_minibatch_that_exceeds_it():
    # One minibatch (= the batch of 10) per epoch. Epoch 1 starts at the old policy (approx KL
    # exactly 0, not > target) and is applied; epoch 2 measures KL > 0 > 1e-12 and must stop
    # WITHOUT applying its update. So the result equals one epoch without target_kl. (A rule
    # "apply, then stop when KL > 1.5 target" would apply two epochs.)
    params = []
    for overrides in (dict(n_epochs=5, target_kl=1e-12), dict(n_epochs=1, target_kl=None)):
        ppo = _tiny_ppo(minibatch_size=10, **overrides)
        obs, _ = ppo.envs.reset(seed=0)
        ro, *_ = collect_rollout(ppo.envs, ppo.actor, ppo.critic, torch.as_tensor(obs),
                                 torch.ones(2, dtype=torch.bool), 5)
        out = ppo.update(ro, 1.0)
        assert out["optim/minibatch_steps"] == 1.0
        params.append(torch.cat([p.detach().reshape(-1) for p in ppo.params]))
    assert out["policy/early_stop"] == 0.0
    torch.testing.assert_close(params[0], params[1], rtol=0, atol=0)


def test_ppo_target_kl_large_never_stops():
    ppo = _tiny_ppo(minibatch_size=4, n_epochs=3, target_kl=10.0)
    obs, _ = ppo.envs.reset(seed=0)
    ro, *_ = collect_rollout(ppo.envs, ppo.actor, ppo.critic, torch.as_tensor(obs),
                             torch.ones(2, dtype=torch.bool), 5)
    out = ppo.update(ro, 1.0)
    assert out["optim/minibatch_steps"] == 9.0 and out["policy/early_stop"] == 0.0


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


@pytest.mark.parametrize("argv, says", [
    # -5 ran 256 steps (one rollout) and 0 the preset budget, both without a word
    (["--algo", "ppo", "--total-steps", "-5"], "total_steps must be a positive number of environment steps, got -5"),
    (["--algo", "reinforce", "--total-steps", "0"], "got 0"),
    # an unknown Gymnasium id was a traceback from gymnasium's registry
    (["--algo", "td", "--env", "NoSuchEnv-v0"], "NoSuchEnv"),
])
def test_cli_refuses_bad_budget_and_unknown_env(tmp_path, capsys, argv, says):
    from trustrl.classic.cli import main

    assert main([*argv, "--output-dir", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("trustrl classic: error:") and says in err[0], err
    assert not (tmp_path / "run").exists()
