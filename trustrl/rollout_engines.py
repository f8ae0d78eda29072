"""Rollout engines: what generates a step's completions, behind one interface.

    engine.generate(prompt_ids, settings, row_seeds=...) -> Rollout   (token ids + behaviour log-probs)
    engine.sync_weights(policy)                                       (after every update)
    engine.sleep() / engine.wake()                                    (around the update)

* :class:`TrustrlEngine` -- trustrl's own KV-cache sampler (:func:`trustrl.rollout.generate`) on
  the policy module itself: nothing to sync, the sampler and the trainer are one code path
  (their log-probs agree bit for bit on equal logits, see tests/test_rollout_correction.py).
* :class:`VLLMEngine` -- vLLM (``pip install 'trustrl[vllm]'``, CUDA GPU), colocated in the
  training process. Written against vLLM's V1 API and checked against the source of vLLM
  0.33.0 (the wheel's ``entrypoints/llm.py``, ``sampling_params.py``, ``inputs/llm.py``,
  ``logprobs.py``, ``v1/worker/gpu_worker.py``, ``v1/serial_utils.run_method``), never run::

      LLM(model=..., dtype=..., seed=..., gpu_memory_utilization=..., enable_sleep_mode=...,
          logprobs_mode="processed_logprobs")
      llm.generate([TokensPrompt(prompt_token_ids=ids), ...],
                   [SamplingParams(n=1, temperature=T, top_p=p, max_tokens=N, logprobs=0,
                                   seed=row_seed, stop_token_ids=[eos]), ...])
        -> RequestOutput.outputs[0].token_ids, .logprobs[t][token_id].logprob, .finish_reason
      llm.collective_rpc(fn, args=(weights,))   # fn(worker, weights) on every worker:
        worker.get_model().load_weights(weights)          # HF parameter names, then
      llm.reset_prefix_cache()                  # cached prefixes hold the old weights' KV
      llm.sleep(level=1) / llm.wake_up()

  ``logprobs_mode="processed_logprobs"`` makes vLLM return the log-probs *after* temperature
  and top-p (the distribution the token was drawn from: the behaviour policy of
  :func:`trustrl.losses.rollout_correction_weights`); its default, ``raw_logprobs``, would
  return the untempered model's. ``logprobs=0`` returns the sampled token's log-prob only. The
  engine runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so ``collective_rpc`` hands the
  weights over by reference, without serializing them. (vLLM 0.33's weight-transfer engine,
  ``init_weight_transfer_engine`` / ``update_weights`` over NCCL, is the route for a separate
  engine process; not used here.) Refused here: LoRA (adapters would
  need ``LoRARequest``s, not written yet), more than one process, and a vLLM that cannot be
  imported (each with a message naming the setting).

Nothing on this CPU machine runs vLLM: :class:`VLLMEngine` is tested against a stand-in object
with the same methods and attributes (tests/test_rollout_engines.py); ``bench/gpu_check.sh`` is
the check to run on a GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import torch
from torch import nn

from trustrl.rollout import Rollout, generate, left_pad


@dataclass(frozen=True)
class SamplingSettings:
    """What every engine samples with (temperature 0 is greedy)."""

    max_new_tokens: int
    temperature: float
    top_p: float
    eos_token_id: int
    pad_token_id: int


class RolloutEngine(Protocol):
    name: str

    def generate(self, prompt_ids: Sequence[Sequence[int]], settings: SamplingSettings, *,
                 row_seeds: torch.Tensor | None = None, generator: torch.Generator | None = None) -> Rollout: ...
    def sync_weights(self, policy: nn.Module) -> None: ...
    def sleep(self) -> None: ...
    def wake(self) -> None: ...


class TrustrlEngine:
    """trustrl's sampler on the policy module itself (nothing to sync, nothing to put to sleep)."""

    name = "trustrl"

    def __init__(self, policy: nn.Module, device: torch.device):
        self.policy, self.device = policy, device

    def generate(self, prompt_ids, settings: SamplingSettings, *, row_seeds=None, generator=None) -> Rollout:
        ids, mask = left_pad([list(p) for p in prompt_ids], settings.pad_token_id)
        return generate(self.policy, ids.to(self.device), mask.to(self.device), max_new_tokens=settings.max_new_tokens,
                        eos_token_id=settings.eos_token_id, pad_token_id=settings.pad_token_id,
                        temperature=settings.temperature, top_p=settings.top_p, generator=generator,
                        row_seeds=row_seeds)

    def sync_weights(self, policy: nn.Module) -> None:
        self.policy = policy

    def sleep(self) -> None:
        pass

    def wake(self) -> None:
        pass


def _load_weights_on_worker(worker: Any, weights: list[tuple[str, torch.Tensor]]) -> None:
    """Runs on every vLLM worker (``collective_rpc``): the worker's model loads the weights by
    their Hugging Face names (vLLM maps them onto its fused layers)."""
    worker.get_model().load_weights(weights=weights)


class VLLMEngine:
    """vLLM's ``LLM``, colocated; ``llm`` and the two classes are injectable (tests use stand-ins)."""

    name = "vllm"

    def __init__(self, llm: Any, sampling_params_cls: Any, tokens_prompt_cls: Any, device: torch.device,
                 sleep_mode: bool = False):
        self.llm, self.sampling_params_cls, self.tokens_prompt_cls = llm, sampling_params_cls, tokens_prompt_cls
        self.device, self.sleep_mode = device, sleep_mode
        self.asleep = False
        self.syncs = 0

    @classmethod
    def from_config(cls, config, device: torch.device) -> "VLLMEngine":
        """Build the colocated engine of an RL config (``rollout_engine: vllm``)."""
        from trustrl import distributed as dist

        if config.lora is not None:
            raise ValueError("rollout_engine=vllm: LoRA is not supported with vLLM yet (adapters would go through "
                             "LoRARequest); remove `lora:` or set rollout_engine=trustrl")
        strategy = getattr(getattr(config, "parallelism", None), "strategy", "ddp")
        if strategy != "ddp":
            raise ValueError(f"rollout_engine=vllm: parallelism.strategy={strategy} is not supported with vLLM yet "
                             "(the engine needs whole weights); use strategy ddp or rollout_engine=trustrl")
        if dist.is_distributed():
            raise ValueError("rollout_engine=vllm: one training process only for now; launch without torchrun "
                             "or set rollout_engine=trustrl")
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process: weights by reference
        try:
            from vllm import LLM, SamplingParams
            from vllm.inputs import TokensPrompt
        except ImportError as err:
            raise ValueError(f"rollout_engine=vllm: vLLM is not importable here ({err}); install it with "
                             "pip install 'trustrl[vllm]' on a CUDA machine, or set rollout_engine=trustrl") from None
        llm = LLM(model=config.model, tokenizer=config.tokenizer or config.model, dtype=config.dtype,
                  seed=config.seed, gpu_memory_utilization=config.vllm_gpu_memory_utilization,
                  max_model_len=config.max_prompt_length + config.max_completion_length,
                  enable_sleep_mode=config.vllm_sleep_mode, logprobs_mode="processed_logprobs")
        return cls(llm, SamplingParams, TokensPrompt, device, sleep_mode=config.vllm_sleep_mode)

    def generate(self, prompt_ids, settings: SamplingSettings, *, row_seeds=None, generator=None) -> Rollout:
        """One request per prompt row, each with its own seed (``row_seeds``: a row's tokens do
        not depend on the other rows, as with trustrl's counter-based sampler), then the
        outputs laid out as trustrl's sampler lays them out: left-padded prompts, right-padded
        completions (EOS included in the mask), truncation flags, behaviour log-probs."""
        self.wake()
        n = len(prompt_ids)
        if row_seeds is None:  # the generator decides the seeds (reproducible from the run's seed)
            row_seeds = torch.randint(0, 2**62, (n,), generator=generator, dtype=torch.int64)
        seeds = [int(s) & (2**63 - 1) for s in torch.as_tensor(row_seeds).reshape(-1).tolist()]
        if len(seeds) != n:
            raise ValueError(f"VLLMEngine.generate: {len(seeds)} row seeds for {n} prompts")
        params = [self.sampling_params_cls(n=1, temperature=settings.temperature, top_p=settings.top_p,
                                           max_tokens=settings.max_new_tokens, logprobs=0, seed=seed,
                                           stop_token_ids=[settings.eos_token_id]) for seed in seeds]
        prompts = [self.tokens_prompt_cls(prompt_token_ids=list(p)) for p in prompt_ids]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return self._to_rollout(prompt_ids, outputs, settings)

    def _to_rollout(self, prompt_ids, outputs, settings: SamplingSettings) -> Rollout:
        if len(outputs) != len(prompt_ids):
            raise ValueError(f"VLLMEngine: {len(outputs)} outputs for {len(prompt_ids)} prompts")
        rows, logps, finished = [], [], []
        for request in outputs:
            out = request.outputs[0]
            tokens = list(out.token_ids)[: settings.max_new_tokens]
            if out.logprobs is None or len(out.logprobs) < len(tokens):
                raise ValueError("VLLMEngine: vLLM returned no log-prob for some sampled token; the engine must "
                                 "be asked with SamplingParams(logprobs=0)")
            if settings.temperature == 0:  # greedy: a point mass, as trustrl's sampler records it
                logps.append([0.0] * len(tokens))
            else:
                logps.append([float(out.logprobs[t][tok].logprob) for t, tok in enumerate(tokens)])
            ended = bool(tokens) and tokens[-1] == settings.eos_token_id
            rows.append(tokens)
            finished.append(ended)
        width = max(1, max(len(r) for r in rows))
        ids = torch.full((len(rows), width), settings.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.bool)
        behaviour = torch.zeros((len(rows), width), dtype=torch.float32)
        for i, (r, lp) in enumerate(zip(rows, logps)):
            ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, :len(r)] = True
            behaviour[i, :len(r)] = torch.tensor(lp, dtype=torch.float32)
        p_ids, p_mask = left_pad([list(p) for p in prompt_ids], settings.pad_token_id)
        dev = self.device
        return Rollout(p_ids.to(dev), p_mask.to(dev), ids.to(dev), mask.to(dev),
                       ~torch.tensor(finished, dtype=torch.bool).to(dev), behaviour_logprobs=behaviour.to(dev))

    def sync_weights(self, policy: nn.Module) -> None:
        """The trainer's weights into the engine (by Hugging Face parameter name), then the
        prefix cache dropped: its KV blocks were computed with the old weights."""
        self.wake()
        weights = [(name, p.detach()) for name, p in policy.state_dict().items()]
        self.llm.collective_rpc(_load_weights_on_worker, args=(weights,))
        self.llm.reset_prefix_cache()
        self.syncs += 1

    def sleep(self) -> None:
        """Free the engine's GPU memory during the update (``vllm_sleep_mode``; level 1 keeps
        the weights in CPU memory, the KV cache is dropped)."""
        if self.sleep_mode and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False


def make_engine(config, policy: nn.Module, device: torch.device) -> TrustrlEngine | VLLMEngine:
    """The engine of ``config.rollout_engine`` (``trustrl`` when the config has none)."""
    kind = getattr(config, "rollout_engine", "trustrl")
    if kind == "vllm":
        return VLLMEngine.from_config(config, device)
    return TrustrlEngine(policy, device)
