"""A generative judge: a language model that reads a prompt and a response through a prompt
template and writes a score, parsed from its output. Usable as a reward in GRPO / PPO / TRPO
(``rewards: [{name: judge, kwargs: {path: DIR, template: ...}}]``) and by ``trustrl label
--judge DIR`` to rank responses (RLAIF; Bai et al. 2022, "Constitutional AI", arXiv 2212.08073;
Zheng et al. 2023, "Judging LLM-as-a-Judge", arXiv 2306.05685).

Each call scores its batch in batches of ``batch_size`` with greedy decoding (deterministic:
the same text gets the same score). The template is filled with ``str.format`` fields
``{prompt}``, ``{response}`` and any dataset column (write literal braces as ``{{ }}``); the
text it makes is the judge's prompt, formatted with the judge tokenizer's chat template when
it has one (``use_chat_template``). The score is the first match of ``score_pattern`` in the
output (its first group, if it has one). An output without a score raises a ValueError that
names the sample and quotes the output: through the reward registry this is the same fault
and time-limit policy as every reward (``reward_timeout_s``; ``reward_on_error: raise`` stops,
``default`` gives that sample the default score and counts it in ``reward/judge/faults``).
"""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_TEMPLATE", "DEFAULT_SCORE_PATTERN", "generative_judge_reward", "parse_score"]

DEFAULT_TEMPLATE = ("Rate how well the response answers the prompt, from 0 (useless) to 10 (perfect). "
                    "Reply with the number only.\n\nPrompt:\n{prompt}\n\nResponse:\n{response}\n\nScore:")
DEFAULT_SCORE_PATTERN = r"-?\d+(?:\.\d+)?"


def parse_score(output: str, pattern: str | re.Pattern[str] = DEFAULT_SCORE_PATTERN) -> float | None:
    """The first match of ``pattern`` in ``output`` as a float (group 1 when the pattern has a
    group), or None when there is none."""
    match = re.search(pattern, output)
    if match is None:
        return None
    text = match.group(1) if match.re.groups else match.group(0)
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def generative_judge_reward(path: str | Path, template: str = DEFAULT_TEMPLATE,
                            score_pattern: str = DEFAULT_SCORE_PATTERN, max_new_tokens: int = 8, batch_size: int = 16,
                            device: str = "cpu", use_chat_template: bool | None = None, max_prompt_length: int = 1024,
                            system_prompt: str | None = None):
    """Load the judge model in ``path`` once; return ``fn(prompts, completions, **columns) ->
    list[float]`` (``fn.last_outputs`` holds the raw outputs of the latest call)."""
    from trustrl.data import encode_prompt
    from trustrl.models import load_policy, load_tokenizer
    from trustrl.rollout import generate, left_pad

    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"judge: batch_size and max_new_tokens must be >= 1, got {batch_size}, {max_new_tokens}")
    if "{response}" not in template:
        raise ValueError("judge: the template must contain {response} (and usually {prompt})")
    try:
        pattern = re.compile(score_pattern)
    except re.error as err:  # (re.error is not a ValueError)
        raise ValueError(f"judge: score_pattern {score_pattern!r} is not a valid regular expression: {err}") from err
    tokenizer = load_tokenizer(path)
    model = load_policy(path, device=device, tokenizer=tokenizer)
    model.requires_grad_(False)
    lock = threading.Lock()  # the registry may call from a worker thread (and abandon one that overruns)

    def judge(prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
        texts = []
        n = len(completions)
        per_sample = {k: v for k, v in columns.items() if isinstance(v, (list, tuple)) and len(v) == n}
        for i, (p, c) in enumerate(zip(prompts, completions)):
            fields = {k: v[i] for k, v in per_sample.items()}  # columns; not batch-wide values like step
            try:
                texts.append(template.format(**{**fields, "prompt": p, "response": c}))
            except (KeyError, IndexError) as err:
                raise ValueError(f"judge: the template names {err}, which is neither prompt, response nor a "
                                 f"column ({sorted(per_sample)})") from err
        outputs: list[str] = []
        with lock:
            for start in range(0, len(texts), batch_size):
                ids = [encode_prompt(tokenizer, t, use_chat_template=use_chat_template,
                                     system_prompt=system_prompt)[1][-max_prompt_length:]
                       for t in texts[start:start + batch_size]]
                prompt_ids, prompt_mask = left_pad(ids, tokenizer.pad_token_id)
                rollout = generate(model, prompt_ids.to(device), prompt_mask.to(device), max_new_tokens=max_new_tokens,
                                   eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                   temperature=0.0)
                for out_ids, valid in zip(rollout.completion_ids.tolist(), rollout.completion_mask.tolist()):
                    outputs.append(tokenizer.decode([t for t, v in zip(out_ids, valid) if v], skip_special_tokens=True))
        judge.last_outputs = outputs  # type: ignore[attr-defined]
        scores = []
        for i, out in enumerate(outputs):
            score = parse_score(out, pattern)
            if score is None:
                raise ValueError(f"judge: no score matching {score_pattern!r} in the judge's output for sample {i}: "
                                 f"{out[:120]!r}")
            scores.append(score)
        return scores

    judge.model = model  # type: ignore[attr-defined]
    judge.tokenizer = tokenizer  # type: ignore[attr-defined]
    judge.last_outputs = []  # type: ignore[attr-defined]
    return judge
