"""Language agents: the environment API, multi-turn episodes (token in, token out, one KV
cache across turns), credit across turns, the maze and the Gymnasium bridge, and the
multi-turn GRPO plug-in of the one loop."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from trustrl.envs.api import EnvError, EnvPolicy, resolve_env_factory
from trustrl.envs.chat import TurnRenderer
from trustrl.envs.episodes import EpisodeLimits, episodes_to_rollout, run_episodes

HERE = Path(__file__).parent


@pytest.fixture(scope="session")
def agent_model_dir(tmp_path_factory):
    """A 1-layer Llama over a 10-token vocabulary (4 specials, 4 role markers, 'a', 'b') with the
    compact chat template: a random model ends a turn with EOS often enough for many turns."""
    from trustrl.tiny import CHAT_ROLE_TOKENS, CHAT_TEMPLATE, create_tiny_model_dir

    path = tmp_path_factory.mktemp("agent_model")
    return create_tiny_model_dir(path, chars="ab", special_tokens=CHAT_ROLE_TOKENS, chat_template=CHAT_TEMPLATE,
                                 seed=0, hidden_size=32, num_layers=1, num_heads=2, max_position_embeddings=512)


@pytest.fixture(scope="session")
def agent_model(agent_model_dir):
    from trustrl.models import load_policy, load_tokenizer

    tok = load_tokenizer(str(agent_model_dir))
    return load_policy(str(agent_model_dir), dtype="float32", device="cpu", tokenizer=tok), tok


def _play(model, tok, rows, *, seeds=None, limits=None, policy=None, env_kwargs=None, greedy=False):
    from agent_envs import CountEnv

    envs = [CountEnv(**(env_kwargs or {})) for _ in rows]
    return run_episodes(model, tok, envs, rows, env_seeds=[0] * len(rows),
                        limits=limits or EpisodeLimits(max_turns=4, max_turn_tokens=24, max_episode_tokens=400),
                        renderer=TurnRenderer(tok), policy=policy or EnvPolicy(), env_name="CountEnv",
                        labels=[f"row {i}" for i in range(len(rows))], device=torch.device("cpu"),
                        row_seeds=torch.arange(len(rows)) * 7919 + 1 if seeds is None else seeds, greedy=greedy)


@pytest.fixture(autouse=True)
def _envs_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))


ROWS = [{"n": 1 + i % 3, "turns": 3} for i in range(8)]


def test_cached_log_probs_equal_recomputed_ones_over_turns(agent_model):
    """The sampler's log-prob of every model token (from the KV cache continued across turns
    and replies) equals the log-prob of one forward pass over the whole episode."""
    from trustrl.rollout import completion_logprobs

    model, tok = agent_model
    episodes = _play(model, tok, ROWS)
    assert max(e.turns for e in episodes) >= 2  # the cache crossed at least one reply
    assert any(not m for e in episodes for m in e.is_model)  # environment tokens are in the sequences
    rollout = episodes_to_rollout(episodes, tok.pad_token_id, "cpu")
    with torch.no_grad():
        recomputed = completion_logprobs(model, rollout)
    for b, e in enumerate(episodes):
        model_positions = torch.tensor(e.is_model).nonzero().flatten()
        assert torch.allclose(recomputed[b, model_positions], torch.tensor(e.sample_logprobs), atol=2e-5)


def test_model_tokens_are_the_sampled_ids_and_replies_the_templates_rendering(agent_model):
    """Token in, token out: the completion mask picks out exactly the ids the sampler drew;
    the whole sequence decodes to the chat template's rendering of the conversation."""
    model, tok = agent_model
    episodes = _play(model, tok, ROWS)
    rollout = episodes_to_rollout(episodes, tok.pad_token_id, "cpu")
    for b, e in enumerate(episodes):
        sampled = [t for t, m in zip(e.ids, e.is_model) if m]
        assert rollout.completion_ids[b][rollout.completion_mask[b]].tolist() == sampled
        assert rollout.context_mask[b].sum() == len(e.ids)
        # the environment's tokens, reply by reply, are the template's rendering of its messages
        # (the model's own tokens stay as sampled even where they decode to special tokens)
        replies, current = [], []
        for t, m in zip(e.ids, e.is_model):
            if not m:
                current.append(t)
            elif current:
                replies.append(current)
                current = []
        users = [m["content"] for m in e.messages if m["role"] == "user"]
        assert tok.decode(e.prompt_ids, skip_special_tokens=False) == f"<|user|>{users[0]}<|assistant|>"
        for k, reply in enumerate(replies, start=1):
            assert tok.decode(reply, skip_special_tokens=False) == f"<|user|>{users[k]}<|assistant|>"
        # every turn that got a reward ends with EOS (the rewards sit there), unless cut by a limit
        assert all(e.ids[end] == tok.eos_token_id for end in e.turn_ends[:-1])
    assert any(e.terminated for e in episodes)


def test_an_episode_does_not_depend_on_the_other_episodes_of_the_batch(agent_model):
    model, tok = agent_model
    seeds = torch.arange(len(ROWS)) * 7919 + 1
    together = _play(model, tok, ROWS, seeds=seeds)
    alone = _play(model, tok, ROWS[3:4], seeds=seeds[3:4])[0]
    assert alone.ids == together[3].ids and alone.turn_rewards == together[3].turn_rewards


def test_gradient_at_environment_positions_is_exactly_zero(agent_model, monkeypatch):
    """The GRPO loss on a multi-turn rollout: d loss / d log-prob is exactly 0 at every
    environment token (context only) and non-zero at model tokens."""
    import trustrl.algorithms.grpo as grpo
    from trustrl.algorithms.agent import AgentGRPOTrainer

    model, tok = agent_model
    episodes = _play(model, tok, ROWS)
    rollout = episodes_to_rollout(episodes, tok.pad_token_id, "cpu")
    captured = {}
    original = grpo.completion_logprobs

    def keep(*args, **kwargs):
        out = original(*args, **kwargs)
        out[0].retain_grad()
        captured["logp"] = out[0]
        return out

    monkeypatch.setattr(grpo, "completion_logprobs", keep)
    trainer = AgentGRPOTrainer.__new__(AgentGRPOTrainer)
    from trustrl.config.agent import AgentGRPOConfig

    trainer.config = AgentGRPOConfig(model="x", dataset="x", env="agent_envs:CountEnv", beta=0.1, max_completion_length=24)
    trainer.policy = model
    advantages = torch.linspace(-1, 1, len(ROWS))
    with torch.no_grad():
        ref = original(model, rollout) - 0.05  # a reference that differs: the KL term has a gradient
    terms, _ = trainer.loss_terms(rollout, advantages, None, ref, rollout.completion_mask)
    sum(c * t.total for c, t in terms).backward()
    grad = captured["logp"].grad
    env_positions = rollout.context_mask & ~rollout.completion_mask
    assert env_positions.any()
    assert torch.equal(grad[env_positions], torch.zeros_like(grad[env_positions]))
    assert (grad[rollout.completion_mask] != 0).float().mean() > 0.9
    model.zero_grad(set_to_none=True)


def test_limits_truncate_episodes(agent_model):
    model, tok = agent_model
    rows = [{"n": 1, "turns": 50}] * 4
    # max_turns: the environment would go on, the episode is truncated after 2 turns
    for e in _play(model, tok, rows, limits=EpisodeLimits(2, 24, 400)):
        assert e.truncated and not e.terminated and e.turns <= 2
    # a one-token turn limit: no EOS, no action sent; the episode ends truncated
    for e in _play(model, tok, rows, limits=EpisodeLimits(4, 1, 400, unfinished_turn_reward=-1.5)):
        if e.ids[-1] != tok.eos_token_id:
            assert e.truncated and e.turns == 1 and e.turn_rewards == [-1.5]
    # the episode budget: no sequence passes it
    for e in _play(model, tok, rows, limits=EpisodeLimits(8, 24, 40)):
        assert len(e.prompt_ids) + len(e.ids) <= 40
        assert e.truncated


def test_failing_and_slow_environments_raise_naming_them_or_get_the_default(agent_model):
    model, tok = agent_model
    rows = [{"n": 1, "turns": 5}] * 3
    with pytest.raises(EnvError, match=r"env CountEnv episode row \d turn 2: RuntimeError: the environment broke"):
        _play(model, tok, rows, env_kwargs={"fail_on_turn": 2}, limits=EpisodeLimits(4, 40, 400))
    episodes = _play(model, tok, rows, env_kwargs={"fail_on_turn": 2}, limits=EpisodeLimits(4, 40, 400),
                     policy=EnvPolicy(on_error="default", default_reward=-3.0))
    broken = [e for e in episodes if e.fault is not None]
    assert broken and all(e.turns == 2 and e.turn_rewards[-1] == -3.0 and e.truncated for e in broken)
    assert all("turn 2" in e.fault for e in broken)
    with pytest.raises(EnvError, match="no answer within env_timeout_s=0.2"):
        _play(model, tok, rows, env_kwargs={"sleep_on_turn": 1}, policy=EnvPolicy(timeout_s=0.2),
              limits=EpisodeLimits(4, 40, 400))


def test_env_specs_resolve_or_are_refused_by_name():
    name, make = resolve_env_factory("trustrl.envs.maze:TextMaze", {"wall_reward": -1.0})
    assert name == "trustrl.envs.maze:TextMaze" and make().reset(options={"layout": "####/#SE#/####"})[0]
    with pytest.raises(ValueError, match="cannot import module 'no_such_module'"):
        resolve_env_factory("no_such_module:Env")
    with pytest.raises(ValueError, match="has no attribute 'Nope'"):
        resolve_env_factory("trustrl.envs.maze:Nope")
    with pytest.raises(ValueError, match=r"has no reset\(\) method"):
        resolve_env_factory(lambda: object())[1]()
    # env_kwargs the class cannot take: refused when the spec is resolved (before any run)
    with pytest.raises(ValueError, match=r"env_kwargs \['bogus'\] do not fit it .* it takes exit_reward, wall_reward, "
                                         r"step_reward, invalid_reward"):
        resolve_env_factory("trustrl.envs.maze:TextMaze", {"bogus": 1})


def test_a_bad_env_spec_is_one_line_on_the_cli(tmp_path, capsys):
    """`trustrl train agent-grpo env=no_such_module:Env`: exit 2, one line naming the spec, no
    traceback, and nothing loaded or written (the spec is resolved before the model loads)."""
    from trustrl.cli import main

    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"layout": "####/#SE#/####", "heading": "east"}) + "\n")
    out = tmp_path / "run"
    code = main(["train", "agent-grpo", f"model={tmp_path / 'no_model_here'}", f"dataset={rows}",
                 "env=no_such_module:Env", f"output_dir={out}", "progress=false"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert err.strip().splitlines() == ["trustrl: env 'no_such_module:Env': cannot import module 'no_such_module' "
                                        "(No module named 'no_such_module')"]
    assert not out.exists()


def test_text_maze_rewards_and_views_by_hand():
    from trustrl.envs.maze import TextMaze

    env = TextMaze()
    # facing east in a corridor: S . E ; a wall north and south
    obs, _ = env.reset(options={"layout": "#####/#S.E#/#####", "heading": "east"})
    assert obs == "ahead open left wall right wall exit +2 +0"
    assert env.step("turn left") == ("ahead wall left wall right open exit +0 +2", -0.01, False, False, {"heading": "north", "position": (1, 1), "bumped": False})
    obs, r, term, trunc, info = env.step("forward")  # into the wall: step cost + wall penalty, no move
    assert r == pytest.approx(-0.11) and info["bumped"] and not term
    obs, r, *_ = env.step("jump")
    assert r == -0.1 and obs.startswith("not an action: 'jump'")
    env.step("turn right")
    env.step("forward")
    obs, r, term, trunc, info = env.step("forward")
    assert term and info["success"] and r == pytest.approx(1.0 - 0.01)


def test_held_out_layouts_are_never_training_layouts_and_the_expert_solves_them():
    from trustrl.envs.maze import expert_turns, maze_key, random_layouts

    held = random_layouts(30, 1, max_turns=8)
    train = random_layouts(60, 2, max_turns=8, exclude={maze_key(r) for r in held})
    assert not {maze_key(r) for r in held} & {maze_key(r) for r in train}
    assert len({maze_key(r) for r in train}) == 60
    assert all(3 <= expert_turns(r, 8) <= 8 for r in held + train)


def test_gym_bridge_plays_frozen_lake_from_text():
    import gymnasium as gym

    from trustrl.envs.gym_bridge import GymTextEnv

    moves = {"left": 0, "down": 1, "right": 2, "up": 3}
    env = GymTextEnv(make=lambda row: gym.make("FrozenLake-v1", is_slippery=False, map_name="4x4"),
                     render=lambda e, obs, info: f"cell {obs}", parse=lambda text: moves.get(text.strip()))
    obs, _ = env.reset(seed=0, options={})
    assert obs == "cell 0"
    for move in ["down", "down", "right", "right", "down"]:
        obs, r, term, trunc, info = env.step(move)
        assert not term
    assert env.step("oops")[1] == -0.1
    obs, r, term, trunc, info = env.step("right")
    assert obs == "cell 15" and r == 1.0 and term and info["success"]


def _agent_config(tmp_path, **overrides):
    from trustrl.config.agent import AgentGRPOConfig

    rows = [{"n": 1 + i % 3, "turns": 2 + i % 2} for i in range(8)]
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    base = dict(model=str(overrides.pop("model")), dataset=str(tmp_path / "rows.jsonl"),
                eval_dataset=str(tmp_path / "rows.jsonl"), output_dir=str(tmp_path / "run"), env="agent_envs:CountEnv",
                max_turns=3, max_completion_length=16, max_episode_tokens=200, max_steps=2, prompts_per_step=2,
                group_size=4, learning_rate=1e-3, beta=0.04, eval_prompts=4, progress=False, tensorboard=False,
                sample_every=1, save_every=0, seed=0)
    base.update(overrides)
    return AgentGRPOConfig(**base)


def test_agent_grpo_trains_in_the_one_loop(agent_model_dir, tmp_path):
    """Two steps of multi-turn GRPO: per-episode metrics, held-out episodes, transcripts in
    samples.jsonl, and every parameter moves."""
    from safetensors.torch import load_file

    from trustrl.algorithms.agent import AgentGRPOTrainer

    summary = AgentGRPOTrainer(_agent_config(tmp_path, model=agent_model_dir)).train()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    step1 = next(r for r in rows if r["step"] == 1 and "env/return" in r)
    for key in ("env/return", "env/turns", "env/success", "env/truncated", "env/model_tokens", "reward/env/mean"):
        assert key in step1
    assert 1 <= step1["env/turns"] <= 3
    assert summary["eval_history"][0]["step"] == 0 and "eval/turns" in summary["eval_history"][-1]
    samples = (tmp_path / "run" / "samples.jsonl").read_text()
    assert "<|user|>" in samples
    before = load_file(str(Path(agent_model_dir) / "model.safetensors"))
    after = load_file(str(Path(summary["model_dir"]) / "model.safetensors"))
    assert all(not torch.equal(before[k], after[k]) for k in before)


def test_agent_grpo_config_refuses_single_turn_options(agent_model_dir, tmp_path):
    with pytest.raises(ValueError, match="dynamic_sampling"):
        _agent_config(tmp_path, model=agent_model_dir, dynamic_sampling=True)
    with pytest.raises(ValueError, match="smaller than max_episode_tokens"):
        _agent_config(tmp_path, model=agent_model_dir, max_completion_length=300)


def test_gae_over_positions_skips_environment_tokens_by_hand():
    """Model tokens at positions 0, 1 | env 2, 3 | model 4; reward 1 on the last token,
    values V = (0.5, 0.25, -, -, 0.5), gamma = 0.9, lambda = 0.5:
        delta_4 = 1 - 0.5 = 0.5                          A_4 = 0.5
        delta_1 = 0 + 0.9 * 0.5 - 0.25 = 0.2             A_1 = 0.2 + 0.45 * 0.5 = 0.425
        delta_0 = 0 + 0.9 * 0.25 - 0.5 = -0.275          A_0 = -0.275 + 0.45 * 0.425 = -0.08375
    (the two environment tokens add no discounting)."""
    from trustrl.advantages import gae, gae_over_positions

    mask = torch.tensor([[True, True, False, False, True]])
    rewards = torch.tensor([[0.0, 0.0, 7.0, 7.0, 1.0]])  # rewards at env positions are ignored
    values = torch.tensor([[0.5, 0.25, 9.0, 9.0, 0.5]])
    adv, ret = gae_over_positions(rewards, values, mask, gamma=0.9, lam=0.5)
    assert torch.allclose(adv, torch.tensor([[-0.08375, 0.425, 0.0, 0.0, 0.5]]))
    assert torch.allclose(ret, torch.tensor([[0.41625, 0.675, 0.0, 0.0, 1.0]]))
    # prefix masks: the same numbers as gae
    g = torch.Generator().manual_seed(0)
    r, v = torch.randn(4, 7, generator=g), torch.randn(4, 7, generator=g)
    prefix = torch.arange(7)[None, :] < torch.tensor([[7], [3], [1], [5]])
    for a, b in zip(gae_over_positions(r, v, prefix, 0.99, 0.95), gae(r, v, prefix, 0.99, 0.95)):
        assert torch.equal(a, b)


def test_agent_ppo_places_turn_rewards_and_trains_with_a_critic(agent_model_dir, tmp_path):
    """PPO with a critic on the same environment: each turn's reward on its last model token
    (the EOS), the outcome on the episode's last model token, nothing at environment tokens."""
    from trustrl.algorithms.agent import AgentPPOTrainer
    from trustrl.config.agent import AgentPPOConfig
    from trustrl.rewards.registry import Reward

    def short(prompts, completions, **columns):  # an outcome reward on the whole transcript
        return [0.5 if len(c) < 40 else 0.0 for c in completions]

    cfg = _agent_config(tmp_path, model=agent_model_dir).model_dump()
    cfg = {k: v for k, v in cfg.items() if k in AgentPPOConfig.model_fields and k != "learning_rate"}
    cfg.update(samples_per_prompt=2, minibatch_size=4, ppo_epochs=2, beta=0.05, gamma=0.9, lam=0.8)
    trainer = AgentPPOTrainer(AgentPPOConfig(**cfg), reward_funcs=[Reward(short, name="short")])
    captured = {}
    prepare = trainer.prepare

    def keep(batch):
        captured["batch"], captured["pb"] = batch, prepare(batch)
        return captured["pb"]

    trainer.prepare = keep
    summary = trainer.train()
    batch, pb = captured["batch"], captured["pb"]
    rollout = batch.rollout
    env_positions = rollout.context_mask & ~rollout.completion_mask
    assert torch.equal(pb.rewards[env_positions], torch.zeros_like(pb.rewards[env_positions]))
    assert torch.equal(pb.advantages[env_positions], torch.zeros_like(pb.advantages[env_positions]))
    # rewards minus the KL part = turn rewards + the outcome on the last model token
    placed = pb.rewards + 0.05 * pb.kl  # beta = 0.05, fixed
    for b in range(rollout.completion_ids.shape[0]):
        last = int(rollout.completion_mask[b].nonzero().max())
        expected = rollout.extras["turn_reward"][b].clone()
        expected[last] += batch.scores.per_function["short"][b]
        assert torch.allclose(placed[b][rollout.completion_mask[b]], expected[rollout.completion_mask[b]], atol=1e-6)
    assert Path(summary["critic_dir"]).exists()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("value/explained_variance" in r and "env/return" in r for r in rows)


def test_agent_grpo_stopped_mid_run_resumes_bitwise(agent_model_dir, tmp_path):
    """SIGTERM in the middle of step 2's episodes: the run stops after that step with a
    checkpoint; resumed, it ends with exactly the weights of the uninterrupted run."""
    from safetensors.torch import load_file

    import agent_envs
    from trustrl.algorithms.agent import AgentGRPOTrainer

    env = agent_envs.SignallingCountEnv
    configs = {}
    for name in ("full", "stopped"):
        (tmp_path / name).mkdir()
        configs[name] = _agent_config(tmp_path / name, model=agent_model_dir, max_steps=3, eval_dataset=None,
                                      env="agent_envs:SignallingCountEnv")
    env.calls, env.signal_at = 0, None
    reference = AgentGRPOTrainer(configs["full"]).train()
    first_step_calls = json.loads((tmp_path / "full" / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert first_step_calls["step"] == 1
    env.calls, env.signal_at = 0, env.calls // 3 + 2  # early in step 2 (steps make about as many calls)
    stopped = AgentGRPOTrainer(configs["stopped"]).train()
    assert stopped["stopped_early"] == "SIGTERM" and stopped["steps"] == 2
    env.signal_at = None
    resumed = AgentGRPOTrainer(configs["stopped"].model_copy(update={"resume": "auto"})).train()
    assert resumed["resumed_from"] is not None
    a = load_file(str(Path(reference["model_dir"]) / "model.safetensors"))
    b = load_file(str(Path(resumed["model_dir"]) / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_agent_ppo_stopped_after_step_1_resumes_bitwise(agent_model_dir, tmp_path):
    """agent-PPO, SIGTERM during step 1's episodes: the run stops after step 1 with a
    checkpoint; resumed, step 2 is the uninterrupted run's step 2 bit for bit: the same
    episodes, metrics, actor, critic (trunk and head) and adaptive KL coefficient. This needs
    every piece of state restored: both optimizers, both linear schedules, the KL controller,
    the sampling and minibatch-shuffle generators, the prompt sampler."""
    from safetensors.torch import load_file

    import agent_envs
    from trustrl.algorithms.agent import AgentPPOTrainer
    from trustrl.config.agent import AgentPPOConfig

    env = agent_envs.SignallingCountEnv
    configs = {}
    for name in ("full", "stopped"):
        (tmp_path / name).mkdir()
        cfg = _agent_config(tmp_path / name, model=agent_model_dir, eval_dataset=None,
                            env="agent_envs:SignallingCountEnv").model_dump()
        cfg = {k: v for k, v in cfg.items() if k in AgentPPOConfig.model_fields}
        cfg.update(samples_per_prompt=2, minibatch_size=3, ppo_epochs=2, learning_rate=1e-2, lr_scheduler="linear",
                   kl_control="adaptive", kl_target=0.1, kl_horizon=10.0, gamma=0.9, lam=0.8)
        configs[name] = AgentPPOConfig(**cfg)
    env.calls, env.signal_at = 0, None
    reference = AgentPPOTrainer(configs["full"]).train()
    env.calls, env.signal_at = 0, 2  # the second environment step of the run: inside step 1
    stopped = AgentPPOTrainer(configs["stopped"]).train()
    assert stopped["stopped_early"] == "SIGTERM" and stopped["steps"] == 1
    env.signal_at = None
    resumed = AgentPPOTrainer(configs["stopped"].model_copy(update={"resume": "auto"})).train()
    assert resumed["resumed_from"] is not None and resumed["resumed_from"].endswith("step_000001")
    assert resumed["kl_coef"] == reference["kl_coef"] != 0.04  # the adaptive controller moved and was restored

    def rows(name):
        return [json.loads(line) for line in (tmp_path / name / "run" / "metrics.jsonl").read_text().splitlines()]

    full_step2 = [r for r in rows("full") if r["step"] == 2]
    resumed_step2 = [r for r in rows("stopped") if r["step"] == 2]
    assert len(full_step2) == len(resumed_step2) == 1
    for key in ("env/return", "env/model_tokens", "loss/value", "loss/policy", "kl/ref", "optim/lr", "optim/grad_norm",
                "optim/critic_grad_norm"):
        assert resumed_step2[0][key] == full_step2[0][key], key
    for final in ("final/model.safetensors", "final_critic/model.safetensors", "final_critic/value_head.safetensors"):
        a = load_file(str(tmp_path / "full" / "run" / final))
        b = load_file(str(tmp_path / "stopped" / "run" / final))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), final


def test_tool_calls_are_parsed_run_and_errors_returned_as_tool_messages():
    from trustrl.envs.tools import CalculatorTask, parse_tool_calls, run_tool_call

    text = ('<tool_call>{"name": "calc", "arguments": {"expression": "347*29"}}</tool_call>'
            '<tool_call>{"name": "calc", "arguments": "{\\"expression\\": \\"1+\\"}"}</tool_call>'
            '<tool_call>{nope}</tool_call><tool_call>{"arguments": {}}</tool_call>')
    calls = parse_tool_calls(text)
    assert calls[0] == {"name": "calc", "arguments": {"expression": "347*29"}}
    assert calls[1] == {"name": "calc", "arguments": {"expression": "1+"}}
    assert calls[2].startswith("error: the tool call is not JSON") and calls[3].startswith("error: a tool call must")
    env = CalculatorTask()
    assert env.reset(options={"question": "347*29", "answer": 10063})[0] == "347*29="
    obs, reward, term, trunc, info = env.step(text)
    assert [m["role"] for m in obs] == ["tool"] * 4 and obs[0]["content"] == "10063" and reward == 0.0 and not term
    assert obs[1]["content"].startswith("error: SyntaxError")
    assert run_tool_call({}, {"name": "x", "arguments": {}})["content"].startswith("error: no tool named 'x'")
    assert env.step(" 10063 ")[1:] == (1.0, True, False, {"success": True})
    env.reset(options={"question": "2*3", "answer": 6})
    assert env.step("5")[1:] == (0.0, True, False, {"success": False})


def test_tools_reach_the_model_through_the_chat_template(agent_model):
    """The opening prompt renders the tools (from the callables' docstrings) with the template,
    and tool results come back as tool messages in the episode."""
    from trustrl.envs.chat import TurnRenderer
    from trustrl.envs.tools import calc

    _, tok = agent_model
    renderer = TurnRenderer(tok)
    history, ids = renderer.opening([{"role": "user", "content": "ab"}], [calc])
    # (this tokenizer knows only 'a' and 'b': the description's letters are <unk> ids here)
    assert tok.decode(ids[:1], skip_special_tokens=False) == "<|system|>"
    text = tok.apply_chat_template(history, tools=[calc], tokenize=False, add_generation_prompt=True)
    assert "tools: calc: Evaluate an integer arithmetic expression." in text
    _, reply = renderer.reply(history, "a", [{"role": "tool", "name": "calc", "content": "ab"}], [calc])
    assert tok.decode(reply, skip_special_tokens=False) == "<|tool|>ab<|assistant|>"


def test_the_python_tool_runs_code_in_the_sandbox():
    from trustrl.envs.tools import python_tool

    assert python_tool("print(6 * 7)").strip() == "42"
    assert python_tool("raise SystemExit(3)").startswith("error: exit code 3")


def test_the_readme_example_environment_and_tool(agent_model):
    """examples/agent_guess.py (the README's example): a bound-method tool, its schema from the
    docstring through the chat template, calls and the final answer."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("agent_guess", HERE.parent / "examples" / "agent_guess.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    env = module.GuessEnv()
    assert env.reset(options={"secret": 37})[0] == "Guess my number between 0 and 99."
    obs, reward, done, _, _ = env.step('<tool_call>{"name": "hint", "arguments": {"guess": 50}}</tool_call>')
    assert obs == [{"role": "tool", "name": "hint", "content": "not higher"}] and reward == 0.0 and not done
    assert env.step("37")[1:] == (1.0, True, False, {"success": True})
    _, tok = agent_model
    text = tok.apply_chat_template([{"role": "user", "content": "a"}], tools=env.tools, tokenize=False)
    assert "tools: hint: Compare a guess with the secret number." in text


def test_agent_demo_pipeline_shortened(tmp_path, capsys):
    """`trustrl demo --pipeline agent --quick`: the same code path as the full demo (SFT on the
    sloppy teacher's transcripts, multi-turn GRPO in the text maze, held-out success before and
    after, transcripts, the report with the episode panels)."""
    from trustrl.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--pipeline", "agent", "--quick", "--output-dir", str(out), "--seed", "1"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert 0.0 <= summary["success_before_rl"] <= 1.0 and 0.0 <= summary["success_after_rl"] <= 1.0
    assert summary["transcript_before_rl"].startswith("user: ahead ")
    assert "assistant: " in summary["transcript_after_rl"]
    held_out = {json.dumps(json.loads(line)) for line in (out / "data" / "maze_eval.jsonl").read_text().splitlines()}
    trained = {json.dumps(json.loads(line)) for line in (out / "data" / "maze_train.jsonl").read_text().splitlines()}
    assert not held_out & trained
    assert (out / "agent" / "report.html").exists() and (out / "agent" / "samples.jsonl").exists()
    assert "held-out success" in capsys.readouterr().out


def test_agent_demo_layouts_fit_the_turn_budget(tmp_path):
    """The demo's layouts are ones the expert solves in ``layout_turns``; episodes get
    ``max_turns`` (the slack is room to recover from a bump). Fewer turns than the expert
    needs is refused before anything is written."""
    from trustrl.config import ConfigError
    from trustrl.envs.maze import expert_turns
    from trustrl.tasks.agent_demo import AgentDemoSettings, run_agent_demo, write_agent_data

    with pytest.raises(ConfigError, match="max_turns=2 is below layout_turns=3"):
        run_agent_demo(AgentDemoSettings.quick(output_dir=str(tmp_path / "refused"), max_turns=2))
    assert not (tmp_path / "refused").exists()
    s = AgentDemoSettings.quick(output_dir=str(tmp_path / "ok"), max_turns=6, layout_turns=4)
    data = write_agent_data(tmp_path / "ok" / "data", s)
    for name in ("train", "eval"):
        rows = [json.loads(line) for line in data[name].read_text().splitlines()]
        turns = [expert_turns(row, max_turns=s.max_turns) for row in rows]
        assert all(t is not None and 3 <= t <= 4 for t in turns), turns  # random_layouts keeps >= 3 turns

def test_agent_ppo_with_a_critic_plays_the_maze(tmp_path):
    """PPO with a critic on the demo's environment (the text maze): it runs, the critic learns
    something (its value loss is finite and logged) and the held-out episodes are played."""
    from trustrl.algorithms.agent import AgentPPOTrainer
    from trustrl.config.agent import AgentPPOConfig
    from trustrl.data import write_jsonl
    from trustrl.envs.maze import random_layouts
    from trustrl.tasks.agent_demo import CHARS
    from trustrl.tiny import CHAT_ROLE_TOKENS, CHAT_TEMPLATE, create_tiny_model_dir

    model_dir = create_tiny_model_dir(tmp_path / "model", chars=CHARS, special_tokens=CHAT_ROLE_TOKENS,
                                      chat_template=CHAT_TEMPLATE, seed=0, hidden_size=32, num_layers=1, num_heads=2,
                                      max_position_embeddings=256)
    rows = write_jsonl(tmp_path / "mazes.jsonl", random_layouts(6, 0, max_turns=4))
    cfg = AgentPPOConfig(model=str(model_dir), dataset=str(rows), eval_dataset=str(rows), eval_prompts=2,
                         output_dir=str(tmp_path / "run"), env="trustrl.envs.maze:TextMaze", max_turns=3,
                         max_completion_length=6, max_episode_tokens=200, unfinished_turn_reward=-1.0, max_steps=2,
                         prompts_per_step=2, samples_per_prompt=2, minibatch_size=2, ppo_epochs=1, beta=0.05,
                         learning_rate=1e-3, progress=False, tensorboard=False, seed=0)
    summary = AgentPPOTrainer(cfg).train()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if "loss/value" in r]
    assert len(trained) == 2 and all(np.isfinite(r["loss/value"]) and "env/return" in r for r in trained)
    assert summary["eval_history"][-1]["step"] == 2 and "eval/turns" in summary["eval_history"][-1]


class _ScriptedEnv:
    """An environment whose reset / step return what the test gives (the wrong types on purpose)."""

    def __init__(self, reset_out=("ab", {}), step_out=("b", 1.0, False, False, {}), tools=None):
        self.reset_out, self.step_out = reset_out, step_out
        if tools is not None:
            self.tools = tools

    def reset(self, seed=None, options=None):
        return self.reset_out

    def step(self, action):
        return self.step_out


def _play_envs(model, tok, envs, policy=None):
    return run_episodes(model, tok, envs, [{}] * len(envs), env_seeds=[0] * len(envs),
                        limits=EpisodeLimits(max_turns=2, max_turn_tokens=40, max_episode_tokens=400),
                        renderer=TurnRenderer(tok), policy=policy or EnvPolicy(), env_name="Scripted",
                        labels=[f"row {i}" for i in range(len(envs))], device=torch.device("cpu"),
                        row_seeds=torch.arange(len(envs)) * 7919 + 1)


@pytest.mark.parametrize("kwargs, message", [
    (dict(reset_out="ab"), r"reset: reset\(\) must return \(observation, info\), got str$"),
    (dict(reset_out=(5, {})), r"reset: an observation must be text or chat messages .*got int$"),
    (dict(step_out=["b", 1.0, False, False, {}]), r"turn 1: step\(\) must return \(observation, reward, terminated, "
                                                  r"truncated, info\), got list$"),
    (dict(step_out=("b", "high", False, False, {})), r"turn 1: reward must be a number, got 'high'$"),
    (dict(step_out=(7, 0.0, False, False, {})), r"turn 1: an observation must be text or chat messages .*got int$"),
    (dict(step_out=(None, 0.0, False, False, {})), r"turn 1: the observation is None but the episode goes on"),
    (dict(step_out=("b", 0.0, False, False, [1, 2])), r"turn 1: info must be a dict, got list$"),
    # bool("no") is True: read by truthiness, this would count a success the env never meant
    (dict(step_out=("b", 0.0, True, False, {"success": "no"})), r"turn 1: info\['success'\] must be a bool, got 'no'$"),
    (dict(step_out=("b", 0.0, "False", False, {})), r"turn 1: terminated must be a bool, got 'False'$"),
])
def test_an_environment_returning_the_wrong_types_is_one_user_error_naming_it(agent_model, kwargs, message):
    """Wrong types from reset / step: an EnvError (a UserError: one line on the CLI, no
    traceback) that names the environment, the episode and the call once, never a ValueError
    from deep inside, and never a value read some other way."""
    from trustrl.errors import UserError

    model, tok = agent_model
    with pytest.raises(EnvError) as err:
        _play_envs(model, tok, [_ScriptedEnv(**kwargs) for _ in range(4)])
    text = str(err.value)
    assert isinstance(err.value, UserError) and "\n" not in text
    assert re.match(r"env Scripted episode row \d (reset|turn 1): ", text) and re.search(message, text), text
    assert text.count("env Scripted") == 1, text  # named once, not "...: EnvError: env Scripted ..." again


def test_a_bad_step_result_follows_the_error_policy(agent_model):
    """env_on_error=default: a step whose observation is not text or messages ends that
    episode with env_default_reward and a counted fault, like a step that raises."""
    model, tok = agent_model
    episodes = _play_envs(model, tok, [_ScriptedEnv(step_out=(7, 0.0, False, False, {})) for _ in range(4)],
                          policy=EnvPolicy(on_error="default", default_reward=-2.0))
    stepped = [e for e in episodes if e.turns and e.ids[e.turn_ends[0]] == tok.eos_token_id]
    assert stepped  # at least one episode ended its first turn and got to step()
    for e in stepped:
        assert e.turns == 1 and e.turn_rewards == [-2.0] and e.truncated
        assert e.fault.startswith("env Scripted episode row") and "got int" in e.fault


def test_flags_from_numpy_and_torch_are_accepted():
    """Gymnasium environments return NumPy booleans; 0-d tensors and 0/1 are flags too."""
    from trustrl.envs.api import check_step_result

    out = check_step_result(("o", np.float32(0.5), np.bool_(True), torch.tensor(False), {"success": 1}), "w")
    assert out == ("o", 0.5, True, False, {"success": True})
    assert check_step_result((None, 0, 0, True, None), "w") == (None, 0.0, False, True, {})


def test_a_tool_without_a_docstring_is_refused_naming_the_environment(agent_model):
    """transformers cannot render a tool without a docstring: an EnvError naming the environment
    and the tool, not transformers' DocstringParsingException with a traceback."""
    def nodoc(x: int) -> str:
        return "x"

    model, tok = agent_model
    with pytest.raises(EnvError, match=r"^env Scripted episode row 0 reset: its tools cannot be shown to the model: "
                                       r"Cannot generate JSON schema for nodoc because it has no docstring"):
        _play_envs(model, tok, [_ScriptedEnv(tools=[nodoc])])


def test_a_tokenizer_without_a_chat_template_is_a_user_error(agent_model):
    from trustrl.envs.chat import ChatTemplateError
    from trustrl.errors import UserError

    _, tok = agent_model
    bare = copy.deepcopy(tok)
    bare.chat_template = None
    with pytest.raises(ChatTemplateError, match="multi-turn episodes need a chat template") as err:
        TurnRenderer(bare)
    assert isinstance(err.value, UserError) and isinstance(err.value, ValueError)


def test_the_resume_hint_of_an_environment_passed_in_python(tmp_path):
    """An environment passed in Python (README: ``AgentGRPOTrainer(config, env=GuessEnv)``)
    leaves ``env: null`` in config.yaml: `trustrl train agent-grpo --config ... --resume` would
    stop with "no environment", so the hint after Ctrl-C says to run the script again."""
    from types import SimpleNamespace

    from trustrl.config.agent import AgentGRPOConfig
    from trustrl.loop.rl_loop import resume_command

    cfg = AgentGRPOConfig(model="m", dataset="d", output_dir=str(tmp_path / "run"), max_completion_length=16)
    hint = resume_command(SimpleNamespace(config=cfg, name="agent-grpo"))
    assert hint.startswith('run the same script again with resume="auto"') and "trustrl train" not in hint
    named = cfg.model_copy(update={"env": "agent_envs:CountEnv"})
    assert resume_command(SimpleNamespace(config=named, name="agent-grpo")) == \
        f"trustrl train agent-grpo --config {tmp_path / 'run' / 'config.yaml'} --resume"
