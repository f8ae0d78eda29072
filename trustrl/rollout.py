"""Batched sampling with a KV cache, and per-token log-probs of completions.

``generate`` left-pads the prompts, runs the prompt once (keeping logits only for the last
position), then samples one token per step for every sequence from the cache, and stops as
soon as every sequence has emitted EOS. It returns a ``Rollout``: prompt and completion ids,
the completion mask (bool, True = a real completion token, EOS included) and truncation flags.

``completion_logprobs`` runs the trunk once over prompt + completion and turns only the
completion positions' hidden states into log-probs, chunk by chunk, so no [B, T, V] float32
logits tensor is ever built for the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from trustrl.logprobs import chunked_token_logprobs
from trustrl.models import lm_backbone_and_head


@dataclass
class Rollout:
    """One batch of sampled completions. Shapes: B sequences, P prompt tokens, C completion tokens."""

    prompt_ids: torch.Tensor  # [B, P] left-padded
    prompt_mask: torch.Tensor  # [B, P] bool, True = real prompt token
    completion_ids: torch.Tensor  # [B, C] right-padded with pad_token_id
    completion_mask: torch.Tensor  # [B, C] bool, True = sampled token (EOS included)
    truncated: torch.Tensor  # [B] bool, True = no EOS within the length limit
    extras: dict = field(default_factory=dict)

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)

    @property
    def completion_lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(dim=1)

    def select(self, index: torch.Tensor) -> "Rollout":
        return Rollout(
            self.prompt_ids[index], self.prompt_mask[index], self.completion_ids[index],
            self.completion_mask[index], self.truncated[index],
            {k: v[index] for k, v in self.extras.items() if isinstance(v, torch.Tensor)},
        )


def left_pad(sequences: list[list[int]], pad_id: int, max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad (and left-truncate to max_length) lists of ids -> (ids [B, P], mask [B, P] bool)."""
    if max_length is not None:
        sequences = [s[-max_length:] for s in sequences]
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.bool)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq):] = True
    return ids, mask


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on each row's first real token (left padding)."""
    return (mask.long().cumsum(dim=1) - 1).clamp(min=0)


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Sample one token per row from logits [B, V] (greedy when temperature == 0)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return order.gather(-1, choice).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> Rollout:
    """Sample completions for left-padded prompts with a KV cache; temperature 0 is greedy."""
    was_training = model.training
    model.eval()
    device = prompt_ids.device
    batch = prompt_ids.shape[0]
    attention = prompt_mask.long()
    positions = positions_from_mask(prompt_mask)
    out = model(input_ids=prompt_ids, attention_mask=attention, position_ids=positions,
                use_cache=True, logits_to_keep=1)
    cache, logits = out.past_key_values, out.logits[:, -1]
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    tokens: list[torch.Tensor] = []
    valid: list[torch.Tensor] = []
    next_pos = positions[:, -1:] + 1
    for step in range(max_new_tokens):
        token = sample_next(logits, temperature, top_p, generator)
        token = torch.where(finished, torch.full_like(token, pad_token_id), token)
        valid.append(~finished)
        tokens.append(token)
        finished = finished | (token == eos_token_id)
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        attention = torch.cat([attention, torch.ones((batch, 1), dtype=attention.dtype, device=device)], dim=1)
        out = model(input_ids=token[:, None], attention_mask=attention, position_ids=next_pos,
                    past_key_values=cache, use_cache=True)
        cache, logits = out.past_key_values, out.logits[:, -1]
        next_pos = next_pos + 1
    model.train(was_training)
    completion_ids = torch.stack(tokens, dim=1)
    completion_mask = torch.stack(valid, dim=1)
    return Rollout(prompt_ids, prompt_mask, completion_ids, completion_mask, truncated=~finished)


def completion_hidden_states(model: nn.Module, rollout_or_ids, attention_mask=None, completion_start: int | None = None) -> torch.Tensor:
    """Hidden states that predict each completion token: [B, C, H].

    Position p's hidden state predicts token p + 1, so the completion tokens at
    [P, P + C) are predicted by positions [P - 1, P + C - 1)."""
    if isinstance(rollout_or_ids, Rollout):
        input_ids, attention_mask = rollout_or_ids.input_ids, rollout_or_ids.attention_mask
        completion_start = rollout_or_ids.prompt_ids.shape[1]
    else:
        input_ids = rollout_or_ids
    backbone, _ = lm_backbone_and_head(model)
    positions = positions_from_mask(attention_mask)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask.long(), position_ids=positions,
                      use_cache=False).last_hidden_state
    return hidden[:, completion_start - 1: -1]


def completion_logprobs(
    model: nn.Module,
    rollout: Rollout,
    *,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log pi(completion token | prefix) for every completion position: [B, C] (0 at padding is
    not guaranteed; use the completion mask). Gradients flow when called outside no_grad."""
    _, head = lm_backbone_and_head(model)
    hidden = completion_hidden_states(model, rollout)
    bias = getattr(head, "bias", None)
    return chunked_token_logprobs(
        hidden, head.weight, rollout.completion_ids, bias=bias, temperature=temperature,
        chunk_size=chunk_size, return_entropy=return_entropy,
    )


@torch.no_grad()
def batched_completion_logprobs(
    model: nn.Module, rollout: Rollout, *, batch_size: int, temperature: float = 1.0, chunk_size: int = 1024,
) -> torch.Tensor:
    """No-grad log-probs [B, C] in slices of ``batch_size`` sequences (old / reference policy)."""
    was_training = model.training
    model.eval()
    parts = []
    for start in range(0, rollout.prompt_ids.shape[0], batch_size):
        index = torch.arange(start, min(start + batch_size, rollout.prompt_ids.shape[0]))
        parts.append(completion_logprobs(model, rollout.select(index), temperature=temperature, chunk_size=chunk_size))
    model.train(was_training)
    return torch.cat(parts, dim=0)


def completion_logprobs_for_targets(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, chunk_size: int = 1024,
    temperature: float = 1.0,
) -> torch.Tensor:
    """log pi(input_ids[:, t + 1] | input_ids[:, :t + 1]) for every t: [B, T - 1] (teacher forcing,
    used by pre-training and SFT)."""
    backbone, head = lm_backbone_and_head(model)
    positions = positions_from_mask(attention_mask)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask.long(), position_ids=positions,
                      use_cache=False).last_hidden_state
    return chunked_token_logprobs(hidden[:, :-1], head.weight, input_ids[:, 1:], bias=getattr(head, "bias", None),
                                  temperature=temperature, chunk_size=chunk_size)
