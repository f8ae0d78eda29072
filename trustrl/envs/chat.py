"""Rendering an episode through the tokenizer's chat template, turn by turn.

The episode is one token sequence. Its first piece is the template's rendering of the
environment's first observation with the generation prompt; then the model's sampled tokens
(kept as sampled: token in, token out, never re-tokenized); then, after each model turn, the
environment's reply: the text the template puts between the end of the model's turn (its
EOS) and the generation prompt of the next assistant turn. That text is found by rendering
the conversation with and without the new messages and taking the difference::

    A = template(history + [assistant: action])                          # no generation prompt
    B = template(history + [assistant: action] + new_messages, add_generation_prompt=True)
    reply = close_after_eos + B[len(A):]

where ``close_after_eos`` is what the template writes after an assistant message's content
beyond the EOS token the model already sampled (e.g. the newline after ``<|im_end|>``). A
template whose rendering of earlier turns changes when later ones are added (``B`` does not
start with ``A``), or whose assistant turn does not end with the tokenizer's EOS, cannot be
continued turn by turn: it is refused with a message naming the template's text.
"""

from __future__ import annotations

from typing import Any

from trustrl.errors import UserError

_SENTINEL = "\x00trustrl-assistant-content\x00"


class ChatTemplateError(UserError, ValueError):
    """The tokenizer's chat template cannot render an episode turn by turn (none, no EOS, or a
    template that rewrites earlier turns)."""


class TurnRenderer:
    """Token ids of an episode's pieces for one tokenizer (with a chat template)."""

    def __init__(self, tokenizer, system_prompt: str | None = None):
        if not getattr(tokenizer, "chat_template", None):
            raise ChatTemplateError(f"multi-turn episodes need a chat template; tokenizer {type(tokenizer).__name__} has "
                             "none (set tokenizer.chat_template)")
        if tokenizer.eos_token_id is None:
            raise ChatTemplateError("multi-turn episodes need the tokenizer's eos_token: the model ends its turn with it")
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self._close: dict[str, str] = {}

    def render(self, messages: list[dict], tools: list | None, generation_prompt: bool) -> str:
        kwargs = {"tools": tools} if tools else {}
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                                  **kwargs)
        if not isinstance(text, str):
            raise ChatTemplateError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, expected str")
        return text

    def encode(self, text: str) -> list[int]:
        # template text: the template wrote every special token it wants (trustrl.data's BOS policy)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def opening(self, messages: list[dict], tools: list | None) -> tuple[list[dict], list[int]]:
        """``(history, ids)`` of the first observation with the generation prompt (and the
        system prompt first, unless the environment gave one)."""
        history = [dict(m) for m in messages]
        if self.system_prompt and not (history and history[0].get("role") == "system"):
            history.insert(0, {"role": "system", "content": self.system_prompt})
        return history, self.encode(self.render(history, tools, True))

    def close_after_eos(self, history: list[dict], tools: list | None) -> str:
        """What the template writes after an assistant message's content, minus the EOS token."""
        key = repr(tools)
        if key not in self._close:
            text = self.render(history + [{"role": "assistant", "content": _SENTINEL}], tools, False)
            close = text[text.rindex(_SENTINEL) + len(_SENTINEL):]
            eos = self.tokenizer.eos_token
            if not close.startswith(eos):
                raise ChatTemplateError(f"the chat template ends an assistant turn with {close[:40]!r}, not with the EOS "
                                 f"token {eos!r} the model stops on: its turns cannot be continued token by token")
            self._close[key] = close[len(eos):]
        return self._close[key]

    def reply(self, history: list[dict], action: str, new_messages: list[dict],
              tools: list | None) -> tuple[list[dict], list[int]]:
        """``(history, ids)`` after the model's turn ``action`` and the environment's
        ``new_messages``: the ids go right after the model's EOS and end with the generation
        prompt of the next turn."""
        with_action = history + [{"role": "assistant", "content": action}]
        before = self.render(with_action, tools, False)
        after_history = with_action + new_messages
        after = self.render(after_history, tools, True)
        if not after.startswith(before):
            raise ChatTemplateError("the chat template renders earlier turns differently once later ones are added "
                             f"(e.g. it drops reasoning of past turns): {before[-60:]!r} vs {after[:len(before)][-60:]!r};"
                             " such a template cannot be continued turn by turn")
        return after_history, self.encode(self.close_after_eos(history, tools) + after[len(before):])
