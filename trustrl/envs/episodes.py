"""Multi-turn episodes: many environments played side by side by one policy, with a KV cache
that continues across turns, as one token sequence per episode.

Per episode the sequence is ``prompt | turn 1 | reply 1 | turn 2 | reply 2 | ...``: the
prompt and replies are the chat template's rendering of the environment's observations
(:class:`~trustrl.envs.chat.TurnRenderer`); a turn is the tokens the model sampled, up to and
including its EOS, kept as ids (token in, token out). :func:`episodes_to_rollout` turns the
episodes into a :class:`~trustrl.rollout.Rollout` whose ``completion_mask`` holds the model's
tokens alone (what the losses count) and whose ``context_mask`` holds every real token (what
attention sees), so the update trains exactly what was sampled.

Generation (:func:`run_episodes`) is batched and lockstep: in each turn every live episode
samples until its EOS (or the per-turn limit); episodes already done feed padding (attention
0, no position) so the batch keeps one cache. The environments' replies are then fed in one
forward pass (left-padded inside the chunk so every live row's last position is real), and
the next turn samples from the cache: the prefix is never re-encoded.

Sampling is counter-based as in :func:`trustrl.rollout.generate`: the token ``t`` of turn
``k`` of an episode uses ``counter_uniforms(turn_seed(row_seed, k), t)``, a pure function of
the episode's seed, so an episode's tokens do not depend on the other episodes of the batch.

Limits: ``max_turns`` model turns, ``max_turn_tokens`` per turn (``max_completion_length``),
``max_episode_tokens`` for the whole sequence (prompt, model and environment tokens). An
episode that hits any of them is *truncated*: a turn without EOS ends the episode there (the
incomplete action is not sent to the environment), a reply that would overrun the budget is
not appended. An environment's own ``truncated`` also truncates the episode.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from trustrl.envs.api import EnvError, EnvPolicy, as_messages, call_env, check_step_result
from trustrl.envs.chat import TurnRenderer
from trustrl.rollout import Rollout, counter_uniforms, left_pad, sample_next, splitmix64
from trustrl.rollout import _cache_argument, _returned_cache  # the sampler's: the cache keyword of this transformers

_TURN_STRIDE = 0x2545F4914F6CDD1D  # an odd 64-bit constant below 2**63: turn k's seed offset


@dataclass
class EpisodeLimits:
    max_turns: int
    max_turn_tokens: int
    max_episode_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    unfinished_turn_reward: float = 0.0  # a turn cut before its EOS (the episode ends there)


@dataclass
class Episode:
    """One played episode. ``ids``/``is_model`` run after the prompt; ``turn_ends[k]`` is the
    index in ``ids`` of turn ``k``'s last model token, where ``turn_rewards[k]`` belongs."""

    prompt_ids: list[int]
    ids: list[int] = field(default_factory=list)
    is_model: list[bool] = field(default_factory=list)
    sample_logprobs: list[float] = field(default_factory=list)  # the sampler's log-prob of each model token
    turn_ends: list[int] = field(default_factory=list)
    turn_rewards: list[float] = field(default_factory=list)
    messages: list[dict] = field(default_factory=list)
    terminated: bool = False
    truncated: bool = False
    success: bool | None = None
    fault: str | None = None

    @property
    def env_return(self) -> float:
        return float(sum(self.turn_rewards))

    @property
    def turns(self) -> int:
        return len(self.turn_ends)

    def transcript(self) -> str:
        """The conversation as text, one ``role: content`` line per message."""
        return "\n".join(f"{m['role']}: {m.get('content', '')}" for m in self.messages)


def turn_seeds(row_seeds: torch.Tensor, turn: int) -> torch.Tensor:
    """The seed of turn ``turn`` of each episode: ``splitmix64(row_seed + turn * stride)``."""
    stride = torch.tensor(_TURN_STRIDE, dtype=torch.int64, device=row_seeds.device)
    return splitmix64(row_seeds + stride * turn)  # int64 arithmetic wraps, as splitmix64 wants


def _opening(renderer: TurnRenderer, messages: list[dict], tools: list | None, what: str) -> tuple[list[dict], list[int]]:
    """The renderer's opening; a tool that transformers cannot turn into a JSON schema (no
    docstring, an argument without a type hint or not in ``Args:``) is the environment's
    fault, named with it."""
    try:
        from transformers.utils.chat_template_utils import DocstringParsingException, TypeHintParsingException
    except ImportError:  # pragma: no cover - older transformers
        DocstringParsingException = TypeHintParsingException = ()  # noqa: N806
    try:
        return renderer.opening(messages, tools)
    except (DocstringParsingException, TypeHintParsingException) as err:
        raise EnvError(f"{what}: its tools cannot be shown to the model: {err}") from None


def _step_env(env, action: str, what: str):
    return check_step_result(env.step(action), what)


@torch.no_grad()
def run_episodes(
    model: nn.Module,
    tokenizer,
    envs: list[Any],
    rows: list[dict],
    *,
    env_seeds: list[int | None],
    limits: EpisodeLimits,
    renderer: TurnRenderer,
    policy: EnvPolicy,
    env_name: str,
    labels: list[str],
    device: torch.device,
    row_seeds: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    greedy: bool = False,
) -> list[Episode]:
    """Play one episode per environment (``envs[b].reset(seed=env_seeds[b], options=rows[b])``)
    with ``model``; ``labels[b]`` names the episode in errors. ``row_seeds`` (int64 [B]):
    counter-based sampling (else ``generator``); ``greedy``: temperature 0."""
    B = len(envs)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    temperature = 0.0 if greedy else limits.temperature
    episodes: list[Episode] = []
    tools: list[list | None] = []
    for b, env in enumerate(envs):
        what = f"env {env_name} episode {labels[b]} reset"
        out, fault = call_env(EnvPolicy(policy.timeout_s, "raise"), lambda e=env, b=b: e.reset(seed=env_seeds[b], options=dict(rows[b])),
                              (), what)  # a failed reset leaves no episode to give a default to: always raises
        if not (isinstance(out, tuple) and len(out) == 2):
            raise EnvError(f"{what}: reset() must return (observation, info), got {type(out).__name__}")
        env_tools = getattr(env, "tools", None) or None
        history, ids = _opening(renderer, as_messages(out[0], what), env_tools, what)
        if len(ids) >= limits.max_episode_tokens:
            raise EnvError(f"{what}: the first observation is {len(ids)} tokens, max_episode_tokens="
                             f"{limits.max_episode_tokens} leaves no room for a turn")
        episodes.append(Episode(prompt_ids=ids, messages=history))
        tools.append(env_tools)
    if row_seeds is not None:
        row_seeds = torch.as_tensor(row_seeds, dtype=torch.int64).reshape(-1).to(device)
    was_training = model.training
    model.eval()
    try:
        _play(model, tokenizer, envs, episodes, tools, limits, renderer, policy, env_name, labels, device, row_seeds,
              generator, temperature, eos, pad)
    finally:
        model.train(was_training)
    return episodes


def _play(model, tokenizer, envs, episodes, tools, limits, renderer, policy, env_name, labels, device, row_seeds,
          generator, temperature, eos, pad):
    B = len(envs)
    prompt_ids, prompt_mask = left_pad([e.prompt_ids for e in episodes], pad)
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    attention = prompt_mask.long()
    positions = (prompt_mask.long().cumsum(1) - 1).clamp(min=0)
    out = model(input_ids=prompt_ids, attention_mask=attention, position_ids=positions, use_cache=True,
                logits_to_keep=1)
    keyword = _cache_argument(model)
    cache, logits = _returned_cache(out), out.logits[:, -1]
    length = prompt_mask.sum(1)  # real tokens so far = the next position id
    live = torch.ones(B, dtype=torch.bool, device=device)
    pad_col = torch.full((B,), pad, dtype=torch.long, device=device)
    for turn in range(limits.max_turns):
        seeds = turn_seeds(row_seeds, turn) if row_seeds is not None and temperature != 0 else None
        sampling = live.clone()
        sampled: list[list[int]] = [[] for _ in range(B)]
        sampled_logp: list[list[float]] = [[] for _ in range(B)]
        for t in range(limits.max_turn_tokens):
            sampling &= length < limits.max_episode_tokens  # the episode's token budget
            if not bool(sampling.any()):
                break
            uniforms = counter_uniforms(seeds, t) if seeds is not None else None
            token = torch.where(sampling, sample_next(logits, temperature, limits.top_p, generator, uniforms), pad_col)
            # the behaviour log-prob of the full tempered softmax (greedy: temperature 1)
            logp = torch.log_softmax(logits.float() / (temperature or 1.0), dim=-1).gather(1, token[:, None])[:, 0]
            for b in sampling.nonzero().flatten().tolist():
                sampled[b].append(int(token[b]))
                sampled_logp[b].append(float(logp[b]))
            # every sampled token (EOS included) goes into the cache: the next turn attends to it
            attention = torch.cat([attention, sampling.long()[:, None]], dim=1)
            out = model(input_ids=token[:, None], attention_mask=attention, position_ids=length[:, None],
                        use_cache=True, **{keyword: cache})
            cache, logits = _returned_cache(out), out.logits[:, -1]
            length = length + sampling.long()
            sampling &= token != eos
        replies: dict[int, list[int]] = {}
        for b in live.nonzero().flatten().tolist():
            ep, turn_ids = episodes[b], sampled[b]
            ep.ids.extend(turn_ids)
            ep.is_model.extend([True] * len(turn_ids))
            ep.sample_logprobs.extend(sampled_logp[b])
            if not turn_ids or turn_ids[-1] != eos:  # per-turn or episode token limit: no complete action
                ep.truncated, live[b] = True, False
                if turn_ids:  # the tokens were sampled and are trained; the turn gets unfinished_turn_reward
                    ep.turn_ends.append(len(ep.ids) - 1)
                    ep.turn_rewards.append(limits.unfinished_turn_reward)
                    ep.messages.append({"role": "assistant",
                                        "content": tokenizer.decode(turn_ids, skip_special_tokens=True)})
                continue
            action = tokenizer.decode(turn_ids[:-1], skip_special_tokens=True)
            what = f"env {env_name} episode {labels[b]} turn {turn + 1}"
            result, fault = call_env(policy, _step_env, (envs[b], action, what), what)
            ep.turn_ends.append(len(ep.ids) - 1)
            if fault is not None:
                ep.fault, ep.truncated, live[b] = fault, True, False
                ep.turn_rewards.append(policy.default_reward)
                ep.messages.append({"role": "assistant", "content": action})
                continue
            obs, reward, terminated, truncated, info = result
            ep.turn_rewards.append(reward)
            if "success" in info:
                ep.success = bool(info["success"])
            if terminated or truncated or turn == limits.max_turns - 1:
                ep.terminated, ep.truncated = terminated, not terminated
                ep.messages.append({"role": "assistant", "content": action})
                if obs is not None and not terminated:
                    ep.messages.extend(as_messages(obs, what))
                live[b] = False
                continue
            history, reply = renderer.reply(ep.messages, action, as_messages(obs, what), tools[b])
            ep.messages = history
            if int(length[b]) + len(reply) >= limits.max_episode_tokens:  # no room for the reply and a turn
                ep.truncated, live[b] = True, False
                continue
            replies[b] = reply
            ep.ids.extend(reply)
            ep.is_model.extend([False] * len(reply))
        if not replies:
            break
        # the replies in one forward pass, left-padded in the chunk: each live row ends on a real token
        ids, mask = left_pad([replies.get(b, []) for b in range(B)], pad)
        ids, mask = ids.to(device), mask.to(device)
        attention = torch.cat([attention, mask.long()], dim=1)
        chunk_positions = length[:, None] + (mask.long().cumsum(1) - 1).clamp(min=0)
        out = model(input_ids=ids, attention_mask=attention, position_ids=chunk_positions, use_cache=True,
                    logits_to_keep=1, **{keyword: cache})
        cache, logits = _returned_cache(out), out.logits[:, -1]
        length = length + mask.sum(1)
    del cache


def episodes_to_rollout(episodes: list[Episode], pad_id: int, device) -> Rollout:
    """One row per episode: the prompt left-padded, then every later token (model and
    environment) right-padded. ``completion_mask`` = the model's tokens (the loss counts them
    alone), ``context_mask`` = every real token (attention), ``truncated`` = the episode hit a
    limit. ``extras["turn_end"]`` [B, C] bool marks each turn's last model token."""
    prompt_ids, prompt_mask = left_pad([e.prompt_ids for e in episodes], pad_id)
    width = max(1, max(len(e.ids) for e in episodes))
    B = len(episodes)
    ids = torch.full((B, width), pad_id, dtype=torch.long)
    model_mask = torch.zeros((B, width), dtype=torch.bool)
    context = torch.zeros((B, width), dtype=torch.bool)
    turn_end = torch.zeros((B, width), dtype=torch.bool)
    turn_reward = torch.zeros((B, width), dtype=torch.float32)
    for b, e in enumerate(episodes):
        n = len(e.ids)
        ids[b, :n] = torch.tensor(e.ids, dtype=torch.long)
        model_mask[b, :n] = torch.tensor(e.is_model, dtype=torch.bool)
        context[b, :n] = True
        for end, r in zip(e.turn_ends, e.turn_rewards):
            turn_end[b, end] = True
            turn_reward[b, end] += r
    truncated = torch.tensor([e.truncated for e in episodes], dtype=torch.bool)
    return Rollout(prompt_ids.to(device), prompt_mask.to(device), ids.to(device), model_mask.to(device),
                   truncated.to(device), {"turn_end": turn_end.to(device), "turn_reward": turn_reward.to(device)},
                   context_mask=context.to(device))
