"""Tiny models and tokenizers built in code and saved to a directory.

There is no model hub on a laptop test bench, so the demo and the tests create a
character-level tokenizer and a small Llama-style model here, save both with
``save_pretrained``, and then load them back through the same ``from_pretrained`` path a
user's real model takes.
"""

from __future__ import annotations

from pathlib import Path

import torch

from trustrl.logging import quiet_transformers

PAD, BOS, EOS = "<pad>", "<s>", "</s>"

#: Role markers of :data:`CHAT_TEMPLATE` (special tokens of the character tokenizer).
CHAT_ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|tool|>")
#: A compact chat template for character tokenizers (multi-turn agents): every message is
#: ``<|role|>content``, an assistant message ends with EOS; tools (when given) are listed by
#: name and description in a first system message. (No newlines: the character tokenizer's
#: pre-tokenizer does not split them.)
CHAT_TEMPLATE = (
    "{% if tools %}<|system|>tools:{% for t in tools %} {{ t['function']['name'] }}: "
    "{{ t['function']['description'] }}{% endfor %}{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_char_tokenizer(chars: str, special_tokens: list[str] | tuple[str, ...] = (), chat_template: str | None = None):
    """A character-level fast tokenizer: one id per character in ``chars`` plus special tokens
    (each matched as a whole, e.g. "<answer>"). Unknown characters map to <unk>."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = [PAD, BOS, EOS, "<unk>", *special_tokens]
    vocab: dict[str, int] = {tok: i for i, tok in enumerate(specials)}
    for ch in dict.fromkeys(chars):
        if ch not in vocab:
            vocab[ch] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([PAD, BOS, EOS, "<unk>"])
    if special_tokens:
        backend.add_tokens(list(special_tokens))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token="<unk>"
    )
    tok.padding_side = "left"
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok


def build_tiny_llama(
    vocab_size: int,
    *,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 256,
    tie_word_embeddings: bool = True,
    pad_token_id: int = 0,
    bos_token_id: int = 1,
    eos_token_id: int = 2,
    seed: int = 0,
):
    """A randomly initialized Llama-architecture causal LM (the pre-training starting point)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        attention_dropout=0.0,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model


def create_tiny_model_dir(
    directory: str | Path,
    chars: str = "0123456789+-*=() <>/abcdefghijklmnopqrstuvwxyz.,?:",
    special_tokens: tuple[str, ...] = (),
    seed: int = 0,
    chat_template: str | None = None,
    **model_kwargs,
) -> Path:
    """Build a tokenizer and a tiny model and save both to ``directory``."""
    directory = Path(directory)
    tok = build_char_tokenizer(chars, special_tokens, chat_template=chat_template)
    model = build_tiny_llama(
        len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, seed=seed, **model_kwargs,
    )
    directory.mkdir(parents=True, exist_ok=True)
    with quiet_transformers():
        model.save_pretrained(str(directory), safe_serialization=True)
        tok.save_pretrained(str(directory))
    return directory
