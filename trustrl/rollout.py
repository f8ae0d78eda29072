"""Batched sampling with a KV cache, and per-token log-probs of completions.

``generate`` left-pads the prompts, runs the prompt once (keeping logits only for the last
position), then samples one token per step for every sequence from the cache, and stops as
soon as every sequence has emitted EOS. It returns a ``Rollout``: prompt and completion ids,
the completion mask (bool, True = a real completion token, EOS included), truncation flags and
the behaviour log-probs: each sampled token's log-prob under the distribution it was drawn
from (temperature, top-p nucleus renormalized), from the very numbers the sampler drew with.

``completion_logprobs`` runs the trunk once over prompt + completion and turns only the
completion positions' hidden states into log-probs, chunk by chunk, so no [B, T, V] float32
logits tensor is ever built for the batch. Every log-prob here applies the model's own
final-logit transform (:func:`trustrl.models.logit_transform`: Gemma's soft-cap, Cohere's
logit scale, Granite's logits scaling), so it is the log-prob of the distribution ``generate``
samples from: ``log_softmax(model(input_ids, attention_mask, position_ids).logits / T)``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
from torch import nn

from trustrl.logprobs import apply_logit_transform, chunked_token_logprobs
from trustrl import parallel
from trustrl.models import is_peft, lm_backbone_and_head, lm_hidden_states, logit_transform, positions_from_mask


@dataclass
class Rollout:
    """One batch of sampled completions. Shapes: B sequences, P prompt tokens, C completion tokens."""

    prompt_ids: torch.Tensor  # [B, P] left-padded
    prompt_mask: torch.Tensor  # [B, P] bool, True = real prompt token
    completion_ids: torch.Tensor  # [B, C] right-padded with pad_token_id
    completion_mask: torch.Tensor  # [B, C] bool, True = sampled token (EOS included)
    truncated: torch.Tensor  # [B] bool, True = no EOS within the length limit
    extras: dict = field(default_factory=dict)
    # [B, C] float (None: not recorded): log-prob of each sampled token under the distribution it
    # was drawn from (temperature and top-p applied, the nucleus renormalized; 0 for greedy
    # decoding); the behaviour policy of importance correction (trustrl.losses.rollout_correction)
    behaviour_logprobs: torch.Tensor | None = None
    # [B, C] bool, True = a real token after the prompt (multi-turn episodes: the model's and the
    # environment's tokens; the completion mask then holds the model's alone). None: the
    # completion mask is both (one prompt, one completion).
    context_mask: torch.Tensor | None = None

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        context = self.completion_mask if self.context_mask is None else self.context_mask
        return torch.cat([self.prompt_mask, context], dim=1)

    @property
    def completion_lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(dim=1)

    def select(self, index: torch.Tensor) -> "Rollout":
        return Rollout(
            self.prompt_ids[index], self.prompt_mask[index], self.completion_ids[index],
            self.completion_mask[index], self.truncated[index],
            {k: v[index] for k, v in self.extras.items() if isinstance(v, torch.Tensor)},
            None if self.behaviour_logprobs is None else self.behaviour_logprobs[index],
            None if self.context_mask is None else self.context_mask[index],
        )

    def to(self, device) -> "Rollout":
        return Rollout(
            self.prompt_ids.to(device), self.prompt_mask.to(device), self.completion_ids.to(device),
            self.completion_mask.to(device), self.truncated.to(device),
            {k: v.to(device) for k, v in self.extras.items() if isinstance(v, torch.Tensor)},
            None if self.behaviour_logprobs is None else self.behaviour_logprobs.to(device),
            None if self.context_mask is None else self.context_mask.to(device),
        )

    def trim(self) -> "Rollout":
        """The same rows without padding columns that no row needs: prompt columns on the left
        that are padding in every row, completion columns on the right past the longest
        completion. Completion tensors ``[B, C]`` of the result are the first ``C'`` columns of
        the original ones (slice other ``[B, C]`` tensors with ``[:, :C']``). With left-padded
        prompts, position ids from the mask and causal attention, no log-prob changes (up to
        float summation order): the dropped columns are masked out or come after every token."""
        prompt_keep = int(self.prompt_mask.any(dim=0).long().argmax()) if bool(self.prompt_mask.any()) else 0
        real = self.completion_mask if self.context_mask is None else self.context_mask  # multi-turn: env tokens too
        # past the last real column of any row (for prefix masks: the longest completion)
        width = (max(int(real.any(dim=0).nonzero().max()) + 1, 1) if bool(real.any()) else 1) if real.numel() else 0
        cut = self.completion_ids.shape[1]
        return Rollout(
            self.prompt_ids[:, prompt_keep:], self.prompt_mask[:, prompt_keep:], self.completion_ids[:, :width],
            self.completion_mask[:, :width], self.truncated,
            {k: (v[:, :width] if v.dim() == 2 and v.shape[1] == cut else v)
             for k, v in self.extras.items() if isinstance(v, torch.Tensor)},
            None if self.behaviour_logprobs is None else self.behaviour_logprobs[:, :width],
            None if self.context_mask is None else self.context_mask[:, :width],
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


_MASK64 = (1 << 64) - 1


def _as_int64(value: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


_GAMMA = _as_int64(0x9E3779B97F4A7C15)  # splitmix64's increment (the golden ratio in 64 bits)
_MIX1 = _as_int64(0xBF58476D1CE4E5B9)
_MIX2 = _as_int64(0x94D049BB133111EB)


def _shift_right(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's ``>>`` on int64 is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """The splitmix64 output function (Steele, Lea & Flood 2014) applied elementwise to int64
    bits, with wrapping 64-bit arithmetic: a bijective mix where every input bit affects every
    output bit. ``x`` int64 [...] -> int64 [...]."""
    z = (x ^ _shift_right(x, 30)) * _MIX1
    z = (z ^ _shift_right(z, 27)) * _MIX2
    return z ^ _shift_right(z, 31)


def counter_uniforms(row_seeds: torch.Tensor, t: int, k: int = 2) -> torch.Tensor:
    """u[b, i] in [0, 1) (float64, 53 random bits) for token ``t``: outputs ``k t + i``,
    i < k, of the splitmix64 stream seeded with ``row_seeds[b]``; output n is
    ``splitmix64(row_seeds[b] + (n + 1) * gamma)``. ``[B]`` -> ``[B, k]`` (k = 2: the sampler
    draws a block, then a token in it). A pure function of (row seed, t): no state, no
    dependence on the other rows of the batch."""
    n = torch.arange(k * t + 1, k * t + k + 1, dtype=torch.int64, device=row_seeds.device) * _GAMMA
    z = splitmix64(row_seeds.reshape(-1, 1) + n)
    return _shift_right(z, 11).to(torch.float64) * (1.0 / (1 << 53))


_BLOCK = 256  # tokens per block of the two-level sampler


def _inverse_cdf_sample(weights: torch.Tensor, generator: torch.Generator | None,
                        uniforms: torch.Tensor | None = None) -> torch.Tensor:
    """One draw per row from unnormalized non-negative weights ``[B, V]`` -> ``[B]`` (int64).

    Two-level inverse-CDF sampling: the vocabulary is cut into blocks of 256 tokens; a block
    is drawn with probability (block mass) / (row mass), then a token inside it with
    probability w_i / (block mass), so P(i) = w_i / sum(w) exactly. Both cumulative sums are
    short and taken in float64 (a float32 cumsum over a whole 32k-152k vocabulary would
    distort the probabilities of rare tokens by rounding); the block masses are float32 sums
    of 256 terms. A zero-weight token or block is never drawn. Two uniforms per row replace
    the ``B x V`` exponentials of ``torch.multinomial``, which on a CPU cost more than the
    LM head for a 32k vocabulary. The uniforms come from ``generator`` on its own device
    (a CPU generator works for CUDA logits), or are given: ``uniforms`` [B, 2] float64."""
    batch, vocab = weights.shape
    n_blocks = -(-vocab // _BLOCK)
    if n_blocks * _BLOCK != vocab:
        weights = torch.nn.functional.pad(weights, (0, n_blocks * _BLOCK - vocab))
    blocks = weights.view(batch, n_blocks, _BLOCK)
    if uniforms is not None:
        u = uniforms.to(device=weights.device, dtype=torch.float64).reshape(batch, 2)
    else:
        gen_device = generator.device if generator is not None else weights.device
        u = torch.rand((batch, 2), generator=generator, dtype=torch.float64, device=gen_device).to(weights.device)
    block = _draw(blocks.sum(dim=-1).to(torch.float64), u[:, :1])  # [B, 1]
    inner = blocks.gather(1, block[:, :, None].expand(batch, 1, _BLOCK)).squeeze(1)
    token = _draw(inner.to(torch.float64), u[:, 1:])
    return (block * _BLOCK + token).squeeze(-1)


def _draw(mass: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Index ``[B, 1]`` of the first entry whose running sum exceeds ``u * total`` (float64),
    never past the last entry with positive mass (guards u * total rounding up to total)."""
    cdf = mass.cumsum(dim=-1)
    total = cdf[:, -1:]
    index = torch.searchsorted(cdf, u * total, right=True)
    last_positive = (cdf < total).sum(dim=-1, keepdim=True)
    return torch.minimum(index, last_positive)


def _sample_inplace(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None,
                    uniforms: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``sample_next`` that may overwrite ``logits`` (a float32 or float64 tensor the caller
    owns), returning ``(tokens [B], behaviour log-probs [B])``.

    Behaviour log-prob: the log of the probability with which the token was drawn, computed
    with the operations of the trainer's :func:`trustrl.logprobs.chunked_token_logprobs`
    (``z = logits / T``; ``lse = max + log sum exp(z - max)``; ``z_y - lse``), so equal logits
    give bit-equal log-probs; with ``top_p < 1`` minus ``log`` of the nucleus mass (the
    truncated distribution renormalized); 0 for greedy decoding (a point mass). float32
    logits (and bf16 / fp16, upcast) are processed in float32, float64 logits in float64."""
    if temperature == 0:
        token = logits.argmax(dim=-1)
        return token, torch.zeros(token.shape, dtype=logits.dtype if logits.dtype == torch.float64 else torch.float32,
                                  device=logits.device)
    z = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    if temperature != 1.0:
        z.mul_(1.0 / temperature)
    top = z.amax(dim=-1, keepdim=True)
    weights = torch.exp(z - top)  # unnormalized probabilities; the sampler normalizes by the total
    lse = top.squeeze(-1) + weights.sum(dim=-1).log()
    if top_p < 1.0:
        probs = weights.div_(weights.sum(dim=-1, keepdim=True))
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        token = order.gather(-1, _inverse_cdf_sample(sorted_probs, generator, uniforms)[:, None]).squeeze(-1)
        nucleus_log_mass = sorted_probs.sum(dim=-1).log()
    else:
        token = _inverse_cdf_sample(weights, generator, uniforms)
        nucleus_log_mass = None
    logp = z.gather(-1, token[:, None]).squeeze(-1) - lse
    return token, logp if nucleus_log_mass is None else logp - nucleus_log_mass


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None,
                uniforms: torch.Tensor | None = None, *, return_logprobs: bool = False):
    """Sample one token per row from softmax(logits / temperature) [B, V] (greedy when
    temperature == 0); with top_p < 1 only from the smallest prefix of tokens, by decreasing
    probability, whose mass reaches top_p (nucleus sampling, Holtzman et al. 2020).
    ``logits`` is not modified. ``uniforms`` [B, 2]: the sampler's numbers, instead of
    ``generator``'s (see :func:`counter_uniforms`). ``return_logprobs``: also the behaviour
    log-probs ``[B]`` of the drawn tokens (see :func:`_sample_inplace`)."""
    if temperature == 0:
        token = logits.argmax(dim=-1)
        return (token, torch.zeros(token.shape, device=logits.device)) if return_logprobs else token
    owned = logits.clone() if logits.dtype in (torch.float32, torch.float64) else logits.float()
    token, logp = _sample_inplace(owned, temperature, top_p, generator, uniforms)
    return (token, logp) if return_logprobs else token


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
    row_seeds: torch.Tensor | None = None,
) -> Rollout:
    """Sample completions for left-padded prompts with a KV cache; temperature 0 is greedy.

    ``row_seeds`` (int64 [B], optional): counter-based sampling. Row ``b``'s token ``t`` is drawn
    with ``counter_uniforms(row_seeds, t)[b]`` instead of numbers from ``generator``, so a
    row's completion depends only on its prompt, its seed and the model, never on the other rows
    of the batch: splitting a batch (across data-parallel ranks, or into smaller batches) samples
    the same tokens, up to float rounding of the logits that moves a choice only when ``u`` falls
    within that rounding of a boundary of the cumulative distribution.

    The prompt runs once (logits for its last position only); each later step feeds one token
    per sequence through the cache. The attention mask is preallocated at its final width and
    passed as a growing view (no per-step concatenation); when no prompt is padded it is not
    passed at all (a causal mask alone is then exact). Sampling draws two uniforms per row
    (two-level inverse CDF, no ``[B, V]`` random numbers). The thread count is the caller's
    (``cpu_threads``): nothing here depends on timing, so results never depend on machine load.
    Runs under ``torch.inference_mode``; the returned tensors are ordinary tensors, usable in
    autograd."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            tokens, valid, finished, logps = _sample_loop(
                model, prompt_ids, prompt_mask, max_new_tokens, eos_token_id, pad_token_id,
                temperature, top_p, generator, row_seeds)
    finally:
        model.train(was_training)
    # stacking outside inference mode turns the inference tensors into ordinary ones
    completion_ids = torch.stack(tokens, dim=1)
    completion_mask = torch.stack(valid, dim=1)
    behaviour = torch.stack(logps, dim=1).masked_fill(~completion_mask, 0.0)
    truncated = ~finished.clone()
    return Rollout(prompt_ids, prompt_mask, completion_ids, completion_mask, truncated=truncated,
                   behaviour_logprobs=behaviour)


def _sample_loop(model, prompt_ids, prompt_mask, max_new_tokens, eos_token_id, pad_token_id,
                 temperature, top_p, generator, row_seeds=None):
    device = prompt_ids.device
    batch, width = prompt_ids.shape
    if row_seeds is not None:
        row_seeds = torch.as_tensor(row_seeds, dtype=torch.int64).to(device).reshape(-1)
        if row_seeds.shape[0] != batch:
            raise ValueError(f"generate: row_seeds has {row_seeds.shape[0]} entries for {batch} prompts")
    padded = not bool(prompt_mask.all())
    attention = None
    if padded:
        attention = torch.ones((batch, width + max_new_tokens), dtype=torch.long, device=device)
        attention[:, :width] = prompt_mask
    positions = positions_from_mask(prompt_mask)
    out = model(input_ids=prompt_ids, attention_mask=attention[:, :width] if padded else None,
                position_ids=positions, use_cache=True, logits_to_keep=1)
    cache_name = _cache_argument(model)
    cache, logits = _returned_cache(out), out.logits[:, -1]
    del out
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    pad = torch.full((batch,), pad_token_id, dtype=torch.long, device=device)
    tokens: list[torch.Tensor] = []
    valid: list[torch.Tensor] = []
    logps: list[torch.Tensor] = []
    next_pos = positions[:, -1:] + 1
    for step in range(max_new_tokens):
        uniforms = counter_uniforms(row_seeds, step) if row_seeds is not None and temperature != 0 else None
        # the step's logits are ours: the sampler may overwrite them (no [B, V] copy per step)
        token, logp = _sample_inplace(_owned_logits(logits), temperature, top_p, generator, uniforms)
        logps.append(logp)
        token = torch.where(finished, pad, token)
        valid.append(~finished)
        tokens.append(token)
        finished = finished | (token == eos_token_id)
        if step == max_new_tokens - 1 or bool(finished.all()):
            break
        out = model(input_ids=token[:, None], attention_mask=attention[:, :width + step + 1] if padded else None,
                    position_ids=next_pos, use_cache=True, **{cache_name: cache})
        cache, logits = _returned_cache(out), out.logits[:, -1]
        del out
        next_pos = next_pos + 1
    return tokens, valid, finished, logps


def _owned_logits(logits: torch.Tensor) -> torch.Tensor:
    """A step's logits as a float32/float64 tensor the sampler may overwrite: the model's
    own when already so (no ``[B, V]`` copy per step), upcast from bf16/fp16 otherwise."""
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def _cache_argument(model: nn.Module) -> str:
    """The keyword under which this model's ``forward`` takes its KV cache: ``cache`` since
    transformers renamed it (``past_key_values`` still works there, with a FutureWarning that it
    will be removed), ``past_key_values`` in earlier 5.x releases. Read from the signature of the
    (peft-unwrapped) model's ``forward``, never guessed from a version number."""
    base = model.get_base_model() if is_peft(model) else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _returned_cache(out) -> object:
    """The cache object (a ``transformers.Cache``, e.g. ``DynamicCache``) a forward with
    ``use_cache=True`` returned, under its new name ``cache`` or its old ``past_key_values``
    (reading the old name where the new exists warns). It is the model's own choice of cache
    class (sliding-window layers, hybrid caches), so the sampler never builds one itself."""
    return out["cache"] if "cache" in out.keys() else out["past_key_values"]


def completion_hidden_states(model: nn.Module, rollout_or_ids, attention_mask=None, completion_start: int | None = None) -> torch.Tensor:
    """Hidden states that predict each completion token: [B, C, H].

    Position p's hidden state predicts token p + 1, so the completion tokens at
    [P, P + C) are predicted by positions [P - 1, P + C - 1)."""
    if isinstance(rollout_or_ids, Rollout):
        input_ids, attention_mask = rollout_or_ids.input_ids, rollout_or_ids.attention_mask
        completion_start = rollout_or_ids.prompt_ids.shape[1]
    else:
        input_ids = rollout_or_ids
    hidden = lm_hidden_states(model, input_ids, attention_mask)
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
    not guaranteed; use the completion mask), with ``return_entropy`` also the (detached)
    entropy of each position's tempered distribution. Formula:
    ``log_softmax(f(h W^T + b) / T)[y]``, ``f`` = :func:`trustrl.models.logit_transform`.
    Gradients flow when called outside no_grad."""
    transform = logit_transform(model)
    _, head = lm_backbone_and_head(model)
    hidden = completion_hidden_states(model, rollout)
    bias = getattr(head, "bias", None)
    return chunked_token_logprobs(
        hidden, head.weight, rollout.completion_ids, bias=bias, temperature=temperature,
        chunk_size=chunk_size, return_entropy=return_entropy, transform=transform,
    )


#: Causal LMs whose trunk (transformers 5.x) builds its attention mask from ``position_ids``
#: when no attention mask is given: a position that does not follow its predecessor starts a
#: new sequence (``masking_utils.find_packed_sequence_indices``), so packed rows attend only
#: within their own sequence. Checked against the padded forward by tests/test_micro_batches.py.
PACKABLE_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM")


def check_packable(model: nn.Module) -> None:
    """Refuse a model whose forward is not known to honour packed position ids."""
    from trustrl import parallel
    from trustrl.models import is_peft

    base = model.get_base_model() if is_peft(model) else model
    name = type(base).__name__
    if name not in PACKABLE_ARCHITECTURES:
        raise ValueError(f"pack_sequences: {name} is not known to attend within packed sequences; "
                         f"supported: {', '.join(PACKABLE_ARCHITECTURES)}. Set pack_sequences=false")
    if parallel.is_sharded(model):
        raise ValueError("pack_sequences: not supported with parallelism.strategy=fsdp yet; set pack_sequences=false")


def packed_completion_logprobs(
    model: nn.Module,
    rollout: Rollout,
    *,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """:func:`completion_logprobs` without padding: the real tokens of every row (prompt, then
    completion) are concatenated into ONE sequence, position ids restarting at 0 on each row,
    no attention mask, so the trunk attends causally within each row only (see
    :data:`PACKABLE_ARCHITECTURES`). Completion token ``t`` of a row with ``p`` prompt tokens
    is predicted by the packed position of its row's token ``p + t - 1``. Returns ``[B, C]``
    (0 at padding) as :func:`completion_logprobs` does, and the entropy with ``return_entropy``."""
    check_packable(model)
    transform = logit_transform(model)
    backbone, head = lm_backbone_and_head(model)
    device = rollout.prompt_ids.device
    pieces, positions, predictors, targets = [], [], [], []
    offset = 0
    for b in range(rollout.prompt_ids.shape[0]):
        prompt = rollout.prompt_ids[b][rollout.prompt_mask[b]]
        completion = rollout.completion_ids[b][rollout.completion_mask[b]]
        if prompt.numel() == 0:
            raise ValueError(f"packed_completion_logprobs: row {b} has an empty prompt (nothing predicts its first token)")
        seq = torch.cat([prompt, completion])
        pieces.append(seq)
        positions.append(torch.arange(seq.numel(), device=device))
        predictors.append(offset + prompt.numel() - 1 + torch.arange(completion.numel(), device=device))
        targets.append(completion)
        offset += seq.numel()
    hidden = backbone(input_ids=torch.cat(pieces)[None], position_ids=torch.cat(positions)[None],
                      use_cache=False).last_hidden_state[0]
    out = chunked_token_logprobs(hidden[torch.cat(predictors)], head.weight, torch.cat(targets),
                                 bias=getattr(head, "bias", None), temperature=temperature, chunk_size=chunk_size,
                                 return_entropy=return_entropy, transform=transform)
    logp, entropy = out if return_entropy else (out, None)
    mask = rollout.completion_mask  # a prefix of every row: row-major order is the packed order
    full = logp.new_zeros(mask.shape).masked_scatter(mask, logp)
    if not return_entropy:
        return full
    return full, entropy.new_zeros(mask.shape).masked_scatter(mask, entropy)


@torch.no_grad()
def batched_completion_logprobs(
    model: nn.Module, rollout: Rollout, *, batch_size: int, temperature: float = 1.0, chunk_size: int = 1024,
) -> torch.Tensor:
    """No-grad log-probs [B, C] in slices of ``batch_size`` sequences (old / reference policy)."""
    was_training = model.training
    model.eval()
    parts = []
    starts = range(0, rollout.prompt_ids.shape[0], batch_size)
    # FSDP: as many forwards on every rank (stand-in slices are dropped), root freed after
    for start, live in parallel.lockstep(starts, sharded=parallel.is_sharded(model)):
        index = torch.arange(start, min(start + batch_size, rollout.prompt_ids.shape[0]))
        logp = completion_logprobs(model, rollout.select(index), temperature=temperature, chunk_size=chunk_size)
        if live:
            parts.append(logp)
    parallel.reshard(model)
    model.train(was_training)
    return torch.cat(parts, dim=0)


@torch.no_grad()
def micro_batch_logprobs(
    model: nn.Module, rollout: Rollout, micro_rows: list[torch.Tensor], *, trim: bool, temperature: float = 1.0,
    chunk_size: int = 1024, packed: bool = False,
) -> torch.Tensor:
    """No-grad log-probs ``[B, C]`` computed micro-batch by micro-batch over the given row sets
    (each trimmed of padding columns with ``trim``: :meth:`Rollout.trim`), i.e. in the very
    batch layout of an update over the same micro-batches, so the update's first ratio is
    exactly 1 (``packed``: each micro-batch packed, :func:`packed_completion_logprobs`).
    Columns past a trimmed micro-batch's width are 0."""
    was_training = model.training
    model.eval()
    out = None
    # FSDP: as many forwards on every rank (stand-in passes are dropped), root freed after
    for rows, live in parallel.lockstep(micro_rows, sharded=parallel.is_sharded(model)):
        micro = rollout.select(rows.to(rollout.prompt_ids.device))
        if trim:
            micro = micro.trim()
        logprobs = packed_completion_logprobs if packed else completion_logprobs
        logp = logprobs(model, micro, temperature=temperature, chunk_size=chunk_size)
        if out is None:
            out = logp.new_zeros(rollout.completion_ids.shape)
        if live:
            out[rows.to(out.device), :logp.shape[1]] = logp
    parallel.reshard(model)
    model.train(was_training)
    return out


def completion_logprobs_for_targets(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, chunk_size: int = 1024,
    temperature: float = 1.0,
) -> torch.Tensor:
    """log pi(input_ids[:, t + 1] | input_ids[:, :t + 1]) for every t: [B, T - 1] (teacher forcing,
    used by pre-training and SFT), with the model's final-logit transform as in
    :func:`completion_logprobs`."""
    transform = logit_transform(model)
    _, head = lm_backbone_and_head(model)
    hidden = lm_hidden_states(model, input_ids, attention_mask)
    return chunked_token_logprobs(hidden[:, :-1], head.weight, input_ids[:, 1:], bias=getattr(head, "bias", None),
                                  temperature=temperature, chunk_size=chunk_size, transform=transform)


def lm_logits(model: nn.Module, hidden: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """Full tempered logits ``f(head(hidden)) / T`` in float32: ``hidden [..., H] -> [..., V]``,
    ``f`` the model's final-logit transform (:func:`trustrl.models.logit_transform`), so
    ``log_softmax`` of the result is what :func:`completion_logprobs` gathers from. Plain torch
    ops: differentiable any number of times (TRPO's KL needs second derivatives), at the cost
    of ``[..., V]`` float32 tensors; prefer :func:`completion_logprobs` when only the chosen
    tokens' log-probs (and a detached entropy) are needed."""
    if not temperature > 0:
        raise ValueError(f"lm_logits: temperature must be > 0, got {temperature}")
    transform = logit_transform(model)
    _, head = lm_backbone_and_head(model)
    return apply_logit_transform(head(hidden).float(), transform) / temperature


def completion_logits(model: nn.Module, rollout: Rollout, *, temperature: float = 1.0) -> torch.Tensor:
    """:func:`lm_logits` at the completion positions: ``[B, C, V]`` float32 (e.g. for an entropy
    bonus that carries gradients, or a full-vocabulary KL)."""
    return lm_logits(model, completion_hidden_states(model, rollout), temperature=temperature)
