"""The K responses of each item: read from a file of ready candidates, or sampled from a
model in a background thread that stays ``ahead`` items in front of the furthest item asked
for, so the annotator rarely waits.

Sampled candidates are appended to a cache file (one fsynced JSON line per item) and reused
on restart, so an item shows the same responses before and after a restart. Sampling is
deterministic: response j of item i is drawn with the counter-based row seed
``seed * 2**32 + i * K + j`` (:func:`trustrl.rollout.generate`), independent of timing and of
which items were sampled in the same batch.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trustrl.data import load_rows

__all__ = ["Item", "FileCandidates", "SampledCandidates", "prompt_as_text"]


@dataclass
class Item:
    id: str
    prompt: Any  # as in the dataset: a string, or a list of chat messages
    responses: list[str] | None  # None while not sampled yet


def prompt_as_text(prompt: Any) -> str:
    """A dataset prompt as the annotator reads it (chat messages as ``role: content``)."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        return "\n\n".join(f"{m.get('role', '?')}: {m.get('content', '')}" if isinstance(m, dict) else str(m)
                           for m in prompt)
    return json.dumps(prompt, ensure_ascii=False)


def _item_ids(rows: list[dict[str, Any]], id_column: str, path: str) -> list[str]:
    ids = [str(r[id_column]) if r.get(id_column) is not None else str(i) for i, r in enumerate(rows)]
    seen: set[str] = set()
    for i, item in enumerate(ids):
        if item in seen:
            raise ValueError(f"{path} row {i + 1}: item id {item!r} appears twice")
        seen.add(item)
    return ids


class FileCandidates:
    """Rows ``{"prompt", "responses": [K strings], "id" (optional)}``; K may vary by row."""

    def __init__(self, path: str | Path, *, prompt_column: str = "prompt", responses_column: str = "responses",
                 id_column: str = "id"):
        rows = load_rows(path, required=(prompt_column, responses_column)).rows
        self.item_ids = _item_ids(rows, id_column, str(path))
        self.items = []
        for i, (row, item) in enumerate(zip(rows, self.item_ids)):
            responses = row[responses_column]
            if not isinstance(responses, list) or len(responses) < 2 or not all(isinstance(r, str) for r in responses):
                raise ValueError(f"{path} row {i + 1}: {responses_column!r} must be a list of 2 or more strings")
            self.items.append(Item(item, row[prompt_column], list(responses)))

    def get(self, index: int) -> Item:
        return self.items[index]

    def wait(self, index: int) -> Item:
        return self.items[index]

    def close(self) -> None:
        pass


class SampledCandidates:
    """K completions per prompt of ``prompts_path``, sampled from the model in ``model_dir``."""

    def __init__(self, model_dir: str | Path, prompts_path: str | Path, k: int, cache_path: str | Path, *,
                 max_new_tokens: int = 64, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
                 ahead: int = 4, prompt_column: str = "prompt", id_column: str = "id",
                 use_chat_template: bool | None = None, system_prompt: str | None = None,
                 max_prompt_length: int = 256, device: str = "cpu"):
        if k < 2:
            raise ValueError(f"label: k must be >= 2 responses per prompt, got {k}")
        rows = load_rows(prompts_path, required=(prompt_column,)).rows
        self.item_ids = _item_ids(rows, id_column, str(prompts_path))
        self.prompts = [r[prompt_column] for r in rows]
        self.k, self.ahead, self.seed = k, ahead, seed
        self.settings = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                             use_chat_template=use_chat_template, system_prompt=system_prompt,
                             max_prompt_length=max_prompt_length)
        self.model_dir, self.device = str(model_dir), device
        # a wrong model directory is named now, not after the page is served (the model itself
        # loads in the sampler thread, so the page opens at once)
        from trustrl.models import ModelLoadError, load_tokenizer

        self._tokenizer = load_tokenizer(self.model_dir)
        if not (Path(self.model_dir) / "config.json").is_file():
            raise ModelLoadError(f"{self.model_dir} is not a model directory (no config.json)")
        self.cache_path = Path(cache_path)
        self.responses: dict[int, list[str]] = {}
        self._read_cache()
        self._cond = threading.Condition()
        self._wanted = 0
        self._error: BaseException | None = None
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="trustrl-label-sampler", daemon=True)
        self._thread.start()

    def _read_cache(self) -> None:
        if not self.cache_path.exists():
            return
        for line_no, line in enumerate(self.cache_path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            row = json.loads(line)
            index = row["index"]
            if (index >= len(self.prompts) or row["item"] != self.item_ids[index] or row["prompt"] != self.prompts[index]
                    or len(row["responses"]) != self.k or row.get("seed") != self.seed):
                raise ValueError(f"{self.cache_path} line {line_no}: sampled for other prompts or settings "
                                 f"(k={self.k}, seed={self.seed}); move it away to sample afresh")
            self.responses[index] = row["responses"]

    # ------------------------------------------------------------ the annotator's side

    def get(self, index: int) -> Item:
        """The item, with ``responses=None`` while it is not sampled yet (sampling is asked for)."""
        with self._cond:
            if self._error is not None:
                raise RuntimeError(f"label: sampling failed: {self._error}") from self._error
            self._wanted = max(self._wanted, index)
            self._cond.notify_all()
            responses = self.responses.get(index)
        return Item(self.item_ids[index], self.prompts[index], responses)

    def wait(self, index: int) -> Item:
        """The item once sampled (blocks)."""
        with self._cond:
            self._wanted = max(self._wanted, index)
            self._cond.notify_all()
            while index not in self.responses and self._error is None:
                self._cond.wait()
            if self._error is not None:
                raise RuntimeError(f"label: sampling failed: {self._error}") from self._error
        return Item(self.item_ids[index], self.prompts[index], self.responses[index])

    def close(self) -> None:
        """Stop the sampler thread and wait for it: a daemon thread still inside torch when the
        interpreter exits aborts the process ("terminate called without an active exception")."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join()

    # ------------------------------------------------------------ the sampler thread

    def _run(self) -> None:
        try:
            import torch

            from trustrl.data import encode_prompt
            from trustrl.models import load_policy
            from trustrl.rollout import generate, left_pad

            tokenizer = self._tokenizer
            model = load_policy(self.model_dir, device=self.device, tokenizer=tokenizer)
            s = self.settings
            for index in range(len(self.prompts)):
                with self._cond:
                    while not self._stop and index > self._wanted + self.ahead:
                        self._cond.wait()
                    if self._stop:
                        return
                    if index in self.responses:
                        continue
                _, ids = encode_prompt(tokenizer, self.prompts[index], use_chat_template=s["use_chat_template"],
                                       system_prompt=s["system_prompt"])
                ids = ids[-s["max_prompt_length"]:]
                prompt_ids, prompt_mask = left_pad([ids] * self.k, tokenizer.pad_token_id)
                seeds = torch.tensor([self.seed * 2**32 + index * self.k + j for j in range(self.k)], dtype=torch.int64)
                rollout = generate(model, prompt_ids.to(self.device), prompt_mask.to(self.device),
                                   max_new_tokens=s["max_new_tokens"], eos_token_id=tokenizer.eos_token_id,
                                   pad_token_id=tokenizer.pad_token_id, temperature=s["temperature"],
                                   top_p=s["top_p"], row_seeds=seeds)
                responses = [tokenizer.decode([t for t, v in zip(ids_, valid) if v], skip_special_tokens=True)
                             for ids_, valid in zip(rollout.completion_ids.tolist(), rollout.completion_mask.tolist())]
                row = {"index": index, "item": self.item_ids[index], "prompt": self.prompts[index],
                       "responses": responses, "seed": self.seed}
                with self.cache_path.open("a", encoding="utf-8") as f:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
                with self._cond:
                    self.responses[index] = responses
                    self._cond.notify_all()
        except BaseException as err:  # shown to the annotator and raised by get()/wait()
            with self._cond:
                self._error = err
                self._cond.notify_all()
