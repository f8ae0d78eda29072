"""Scalar-head models: an LM trunk with a ``Linear(H, 1)`` head, for reward models and critics.

- A **reward model** (Ouyang et al. 2022, arXiv 2203.02155; Stiennon et al. 2020) reads a
  whole prompt + response and returns one score: the head applied to the hidden state of the
  last real (non-pad) token, see :meth:`ScalarHeadModel.score`.
- A **critic** (value model, PPO-RLHF: Ziegler et al. 2019, arXiv 1909.08593; Huang et al.
  2024 "The N+ Implementation Details of RLHF with PPO") returns one value per completion
  token: ``V_t`` is the head applied to the hidden state that *predicts* completion token
  ``t`` (the state before the token is chosen), the same positions whose LM-head outputs give
  the policy's log-probs, see :meth:`ScalarHeadModel.completion_values`. Its head starts at
  zero so every value is exactly 0 before training (or it starts from a reward model).

The trunk is ``transformers.AutoModel`` loaded from a causal-LM directory (the LM head is
dropped). A saved scalar model is a directory holding::

    config.json, model.safetensors   the trunk (``save_pretrained``; ``AutoModel`` loads it)
    tokenizer files                  when a tokenizer is given to ``save_pretrained``
    value_head.safetensors           {"weight": [1, H], "bias": [1]} in float32
    trustrl_head.json                {"format": "trustrl-scalar-head", "version": 1, ...}; a reward
                                     model's also "max_length" and "prompt_format" (how its
                                     training formatted prompts, :func:`encode_scored_pair`)

:func:`load_scalar_model` reads it back; :func:`scalar_model_from_lm` builds a fresh one from
a causal-LM directory (the policy's, for a critic).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trustrl.errors import cause_summary
from trustrl.logging import quiet_transformers
from trustrl.models import DTYPES, ModelLoadError, check_vocab, disable_dropout, trunk_hidden_states
from trustrl.rollout import Rollout, left_pad

__all__ = [
    "HEAD_FILE",
    "META_FILE",
    "ScalarHeadModel",
    "last_token_index",
    "load_scalar_model",
    "scalar_model_from_lm",
    "PROMPT_FORMAT_KEY",
    "check_prompt_format",
    "encode_scored_pair",
    "encode_scored_text",
    "prompt_format_record",
    "score_ids",
    "score_pairs",
    "score_texts",
]

HEAD_FILE = "value_head.safetensors"
META_FILE = "trustrl_head.json"
FORMAT_NAME = "trustrl-scalar-head"
FORMAT_VERSION = 1


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last True position of each row: ``[B, T]`` bool -> ``[B]`` long.

    Works for left and right padding. A row with no True position gets index 0."""
    if attention_mask.dtype != torch.bool:
        raise ValueError(f"last_token_index: attention_mask must be torch.bool, got {attention_mask.dtype}")
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return torch.where(attention_mask, positions, torch.zeros_like(positions)).max(dim=1).values


class ScalarHeadModel(nn.Module):
    """``trunk`` (a transformers base model returning ``last_hidden_state``) + ``head``
    (``Linear(H, 1)``, kept in float32; hidden states are cast to float32 before it).

    ``kind`` ("reward" or "value") and ``extra`` (e.g. the reward model's ``max_length``) are
    written to ``trustrl_head.json`` by :meth:`save_pretrained`.
    """

    def __init__(self, trunk: nn.Module, head: nn.Linear | None = None, *, kind: str = "reward",
                 extra: dict[str, Any] | None = None):
        super().__init__()
        hidden = getattr(getattr(trunk, "config", None), "hidden_size", None)
        if hidden is None:
            raise ModelLoadError(f"{type(trunk).__name__}: the trunk's config has no hidden_size")
        self.trunk = trunk
        self.head = head if head is not None else nn.Linear(hidden, 1, dtype=torch.float32)
        if tuple(self.head.weight.shape) != (1, hidden):
            raise ModelLoadError(f"scalar head has shape {tuple(self.head.weight.shape)}, expected (1, {hidden})")
        self.kind = kind
        self.extra: dict[str, Any] = dict(extra or {})

    @property
    def config(self):
        return self.trunk.config

    # -- forward passes --------------------------------------------------------------------

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Trunk output ``[B, T, H]``; position ids restart at 0 on each row's first real token
        (:func:`trustrl.models.trunk_hidden_states`: the call the policy's log-probs make, so a
        critic on the policy's trunk sees the policy's hidden states)."""
        return trunk_hidden_states(self.trunk, input_ids, attention_mask)

    def _apply_head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden.to(self.head.weight.dtype)).squeeze(-1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Per-position scalars ``[B, T]`` (float32). Positions where the mask is False carry
        whatever the head gives there; mask them yourself."""
        return self._apply_head(self.hidden_states(input_ids, attention_mask))

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Reward-model score ``[B]``: the head at the last real token of each row."""
        hidden = self.hidden_states(input_ids, attention_mask)
        last = last_token_index(attention_mask)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return self._apply_head(hidden[rows, last])

    def completion_values(self, rollout: Rollout) -> torch.Tensor:
        """Critic values ``[B, C]`` for a rollout: ``V_t`` comes from the hidden state at the
        position that predicts completion token ``t`` (prompt positions ``P - 1 + t``)."""
        hidden = self.hidden_states(rollout.input_ids, rollout.attention_mask)
        start = rollout.prompt_ids.shape[1]
        return self._apply_head(hidden[:, start - 1: -1])

    # -- persistence -----------------------------------------------------------------------

    def save_pretrained(self, directory: str | Path, tokenizer=None, **kwargs: Any) -> Path:
        """Write the trunk (``save_pretrained``), the head and ``trustrl_head.json`` (and the
        tokenizer when given) into ``directory``. Extra keyword arguments (e.g.
        ``safe_serialization``) go to the trunk's ``save_pretrained``."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        kwargs.setdefault("safe_serialization", True)
        with quiet_transformers():
            self.trunk.save_pretrained(str(directory), **kwargs)
        head = {"weight": self.head.weight.detach().float().cpu().contiguous(),
                "bias": (self.head.bias.detach().float().cpu().contiguous() if self.head.bias is not None
                         else torch.zeros(1))}
        save_file(head, str(directory / HEAD_FILE))
        meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "kind": self.kind,
                "hidden_size": int(self.head.weight.shape[1]), "trunk_class": type(self.trunk).__name__,
                **self.extra}
        (directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        if tokenizer is not None:
            with quiet_transformers():
                tokenizer.save_pretrained(str(directory))
        return directory


def save_final_scalar_model(model: ScalarHeadModel, directory: str | Path, tokenizer=None) -> Path:
    """:meth:`ScalarHeadModel.save_pretrained` by rank 0 (data parallel), every rank returning
    the path; an FSDP-sharded trunk is gathered first (a collective: every rank calls this)
    into a plain copy on rank 0 (the head is never sharded)."""
    import copy

    from transformers import AutoModel

    from trustrl import distributed as dist
    from trustrl import parallel

    if not parallel.is_sharded(model):
        return dist.on_main(model.save_pretrained, directory, tokenizer=tokenizer)
    state = parallel.full_state_dict(model.trunk)

    def save() -> Path:
        trunk = AutoModel.from_config(model.trunk.config, dtype=next(iter(state.values())).dtype)
        parallel.load_full_state_dict(trunk, state, f"final {model.kind} model trunk")
        plain = ScalarHeadModel(trunk, copy.deepcopy(model.head), kind=model.kind, extra=model.extra)
        return plain.save_pretrained(directory, tokenizer=tokenizer)

    return dist.on_main(save)


def _load_trunk(path: Path, dtype: str, gradient_checkpointing: bool) -> nn.Module:
    from transformers import AutoModel

    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} is not a model directory (no config.json)")
    try:
        with quiet_transformers():
            trunk = AutoModel.from_pretrained(str(path), dtype=DTYPES[dtype])
    except Exception as err:  # transformers raises many types here
        raise ModelLoadError(f"could not load a trunk (AutoModel) from {path}: {cause_summary(err)}") from err
    if not hasattr(trunk, "get_input_embeddings"):
        raise ModelLoadError(f"{path}: AutoModel gave {type(trunk).__name__}, which has no input embeddings")
    disable_dropout(trunk)
    if gradient_checkpointing:
        trunk.gradient_checkpointing_enable()
    return trunk


def scalar_model_from_lm(
    path: str | Path,
    *,
    kind: str = "value",
    zero_head: bool = True,
    dtype: str = "float32",
    device: torch.device | str = "cpu",
    tokenizer=None,
    gradient_checkpointing: bool = False,
    seed: int = 0,
) -> ScalarHeadModel:
    """A new scalar model on the trunk of the causal LM in ``path`` (its LM head is dropped).

    ``zero_head=True`` (critics): weight and bias 0, so every value is exactly 0 at the start.
    Otherwise (reward models): weight ~ N(0, 1/(H + 1)), bias 0, drawn from a generator seeded
    with ``seed`` so the global RNG is untouched."""
    path = Path(path)
    trunk = _load_trunk(path, dtype, gradient_checkpointing)
    if tokenizer is not None:
        check_vocab(trunk, tokenizer, str(path))
    hidden = trunk.config.hidden_size
    head = nn.Linear(hidden, 1, dtype=torch.float32)
    with torch.no_grad():
        if zero_head:
            head.weight.zero_()
        else:
            g = torch.Generator().manual_seed(seed)
            head.weight.copy_(torch.randn(head.weight.shape, generator=g) / math.sqrt(hidden + 1))
        head.bias.zero_()
    return ScalarHeadModel(trunk, head, kind=kind).to(device)


def read_head_meta(path: str | Path) -> dict[str, Any]:
    """The ``trustrl_head.json`` of a saved scalar model (raises ModelLoadError if absent)."""
    path = Path(path)
    meta_file = path / META_FILE
    if not meta_file.is_file():
        raise ModelLoadError(
            f"{path} is not a trustrl scalar model: no {META_FILE} (train one with `trustrl train rm`, "
            "or build a critic from a causal LM with scalar_model_from_lm)"
        )
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ModelLoadError(f"{meta_file}: not valid JSON: {err}") from err
    if meta.get("format") != FORMAT_NAME or int(meta.get("version", -1)) != FORMAT_VERSION:
        raise ModelLoadError(f"{meta_file}: unknown format {meta.get('format')!r} version {meta.get('version')!r}")
    return meta


def load_scalar_model(
    path: str | Path,
    *,
    dtype: str = "float32",
    device: torch.device | str = "cpu",
    tokenizer=None,
    gradient_checkpointing: bool = False,
) -> ScalarHeadModel:
    """Load a directory written by :meth:`ScalarHeadModel.save_pretrained`."""
    from safetensors.torch import load_file

    path = Path(path)
    meta = read_head_meta(path)
    trunk = _load_trunk(path, dtype, gradient_checkpointing)
    if tokenizer is not None:
        check_vocab(trunk, tokenizer, str(path))
    head_file = path / HEAD_FILE
    if not head_file.is_file():
        raise ModelLoadError(f"{path}: {HEAD_FILE} is missing")
    try:
        state = load_file(str(head_file))
    except Exception as err:  # safetensors raises its own error types on a corrupt file
        raise ModelLoadError(f"{head_file}: cannot read the scalar head: {cause_summary(err)}") from err
    hidden = trunk.config.hidden_size
    if tuple(state.get("weight", torch.empty(0)).shape) != (1, hidden) or tuple(state.get("bias", torch.empty(0)).shape) != (1,):
        raise ModelLoadError(f"{head_file}: expected weight [1, {hidden}] and bias [1], "
                             f"got {[(k, tuple(v.shape)) for k, v in state.items()]}")
    head = nn.Linear(hidden, 1, dtype=torch.float32)
    with torch.no_grad():
        head.weight.copy_(state["weight"])
        head.bias.copy_(state["bias"])
    reserved = {"format", "version", "kind", "hidden_size", "trunk_class"}
    extra = {k: v for k, v in meta.items() if k not in reserved}
    return ScalarHeadModel(trunk, head, kind=meta.get("kind", "reward"), extra=extra).to(device)


# -- text scoring (shared by the reward-model trainer and the reward-model reward) -------------
#
# A reward model is trained on ids of ``format_prompt(prompt) + response + EOS`` (see
# :func:`encode_scored_pair`). Every scorer of a (dataset prompt, response) pair -- the RL
# reward, the label app's judge -- goes through that same function with the prompt format the
# trainer recorded in ``trustrl_head.json`` under ``prompt_format``, so it feeds the model the
# ids it was trained on, whatever tokenizer or template the policy uses.

#: Key of ``trustrl_head.json`` holding how a reward model's prompts were formatted in training.
PROMPT_FORMAT_KEY = "prompt_format"


def prompt_format_record(tokenizer, use_chat_template: bool | None, system_prompt: str | None) -> dict[str, Any]:
    """``{"use_chat_template": bool, "system_prompt": str | None}``: the reward-model config's
    prompt formatting with ``use_chat_template=None`` resolved against ``tokenizer`` (True when
    it has a chat template), so the record does not depend on the tokenizer it is read with."""
    use = bool(getattr(tokenizer, "chat_template", None)) if use_chat_template is None else bool(use_chat_template)
    return {"use_chat_template": use, "system_prompt": system_prompt}


def check_prompt_format(record: Any, where: str) -> dict[str, Any]:
    """``record`` if it is a valid :func:`prompt_format_record`, else ModelLoadError naming ``where``."""
    if (not isinstance(record, dict) or set(record) != {"use_chat_template", "system_prompt"}
            or not isinstance(record["use_chat_template"], bool)
            or not (record["system_prompt"] is None or isinstance(record["system_prompt"], str))):
        raise ModelLoadError(f"{where}: {PROMPT_FORMAT_KEY!r} must be {{\"use_chat_template\": true|false, "
                             f"\"system_prompt\": null|\"text\"}}, got {record!r}")
    return record


def encode_scored_pair(tokenizer, prompt: str | list[dict[str, Any]], response: str, prompt_format: dict[str, Any],
                       max_length: int | None = None) -> list[int]:
    """Token ids a reward model scores for a dataset ``prompt`` (a string or chat messages) and
    a ``response``: ``format_prompt(prompt)`` under ``prompt_format`` (:func:`prompt_format_record`)
    then :func:`encode_scored_text`. The reward-model trainer, the RL reward and the label judge
    all encode pairs here, so they feed the model identical ids for the same pair."""
    from trustrl.data import format_prompt

    use = prompt_format["use_chat_template"]
    # False on a tokenizer without a template is what None meant when it was recorded: pass
    # None so that a messages prompt gets format_prompt's "no chat_template" error, as in training
    use_arg = use if (use or getattr(tokenizer, "chat_template", None)) else None
    text = format_prompt(tokenizer, prompt, use_chat_template=use_arg, system_prompt=prompt_format["system_prompt"])
    return encode_scored_text(tokenizer, text, response, max_length)


def encode_scored_text(tokenizer, prompt_text: str, response: str, max_length: int | None = None) -> list[int]:
    """Token ids a reward model scores for an already formatted ``prompt_text``:
    ``prompt_text + response`` encoded under trustrl's BOS policy
    (:func:`trustrl.data.encode_rendered_text`: the tokenizer's special tokens are added unless
    the text already starts with its BOS token, as a chat template that writes one leaves it;
    so exactly one BOS either way), followed by EOS (so the score is always read at an EOS
    position), left-truncated to ``max_length`` so the end of the response is kept."""
    from trustrl.data import encode_rendered_text

    ids = encode_rendered_text(tokenizer, prompt_text + response) + [tokenizer.eos_token_id]
    if max_length is not None and len(ids) > max_length:
        ids = ids[-max_length:]
    return ids


@torch.no_grad()
def score_ids(model: ScalarHeadModel, pad_token_id: int, seqs: list[list[int]], *, batch_size: int = 32) -> torch.Tensor:
    """Reward-model scores ``[N]`` (float32, on the CPU) of ``N`` token-id sequences, left-padded
    in batches of ``batch_size``."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(seqs), batch_size):
        ids, mask = left_pad(seqs[start:start + batch_size], pad_token_id)
        out.append(model.score(ids.to(device), mask.to(device)).float().cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


def score_texts(model: ScalarHeadModel, tokenizer, prompts: list[str], responses: list[str], *,
                batch_size: int = 32, max_length: int | None = None) -> torch.Tensor:
    """Reward-model scores ``[N]`` of already formatted prompt texts + responses
    (:func:`encode_scored_text`), in batches of ``batch_size``."""
    if len(prompts) != len(responses):
        raise ValueError(f"score_texts: {len(prompts)} prompts for {len(responses)} responses")
    seqs = [encode_scored_text(tokenizer, p, r, max_length) for p, r in zip(prompts, responses)]
    return score_ids(model, tokenizer.pad_token_id, seqs, batch_size=batch_size)


def score_pairs(model: ScalarHeadModel, tokenizer, prompts: list[Any], responses: list[str],
                prompt_format: dict[str, Any], *, batch_size: int = 32, max_length: int | None = None) -> torch.Tensor:
    """Reward-model scores ``[N]`` of dataset prompts (strings or chat messages) + responses,
    encoded as in training (:func:`encode_scored_pair`), in batches of ``batch_size``."""
    if len(prompts) != len(responses):
        raise ValueError(f"score_pairs: {len(prompts)} prompts for {len(responses)} responses")
    seqs = [encode_scored_pair(tokenizer, p, r, prompt_format, max_length) for p, r in zip(prompts, responses)]
    return score_ids(model, tokenizer.pad_token_id, seqs, batch_size=batch_size)
