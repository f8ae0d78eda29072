"""TRPO for language models (Schulman et al. 2015, "Trust Region Policy Optimization",
arXiv 1502.05477), with group advantages (GRPO-style, Shao et al. 2024) or GAE with a critic.

One training step:
  1. sample ``group_size`` completions for each of ``prompts_per_step`` prompts with the policy
     as it stands (pi_old), score them;
  2. advantages: ``advantage: group`` -> one per completion, (r - mean_group) / std_group
     (the reward minus beta * its KL to the reference when beta > 0); ``advantage: gae`` -> per
     token, GAE on the PPO-RLHF per-token reward (score at the last token, -beta * k1 KL) with
     the critic's values, as in :mod:`trustrl.algorithms.ppo`;
  3. the natural-gradient step on the chosen parameter subset (:mod:`trustrl.trpo`):
     surrogate ``L(theta) = token_mean(r_t(theta) A_t)`` with ``r_t = pi_theta / pi_old`` of the
     sampled token; ``g = grad L``; conjugate gradient on ``(F + damping I) s = g`` where ``F v``
     is the Hessian-vector product of the mean token KL(pi_old || pi_theta) (computed over the
     whole vocabulary at every valid position, so its Hessian at theta_old is the Fisher);
     ``step = s sqrt(2 max_kl / s^T F s)``; backtracking line search (``max_backtracks``
     fractions ``backtrack_shrink^k``) accepting only a step that improves the surrogate (by at
     least ``accept_ratio`` of the linear prediction) with KL <= max_kl; if none is accepted
     the parameters are restored bit for bit;
  4. ``advantage: gae`` only: ``value_epochs`` passes of minibatch regression of the critic on
     the returns (0.5 (V - R)^2, AdamW);
  5. log, evaluate, checkpoint (the loop's, as steps 1's sampling and scoring).

Parameter subset (``trpo_params``). Every Fisher-vector product is a double backward pass
through everything between the chosen parameters and the logits, and the conjugate gradient
needs ``cg_iters`` of them per step, so TRPO through a whole LM is expensive. Choose:

- ``all``: every parameter (the default; fine for tiny models; with LoRA: the adapters);
- ``lm_head``: only the output projection. When it is not tied to the input embeddings the
  trunk is run once per step without gradients and its hidden states reused by every
  surrogate, KL and Fisher-vector evaluation, so a step costs little more than a forward pass;
- ``last_layers:N``: the last N decoder blocks, the final norm and the LM head.

Parameters outside the subset are frozen for the whole run. The full-vocabulary KL keeps
``[B, C, V]`` float32 log-probabilities of pi_old in memory: on a large vocabulary keep
``prompts_per_step * group_size * max_completion_length`` modest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from trustrl.advantages import apply_missing_eos_penalty, gae, group_advantages, token_rewards, whiten
from trustrl.algorithms.base import RLAlgorithm
from trustrl.algorithms.ppo import batched_values, make_critic
from trustrl.config import ConfigError, TRPOConfig
from trustrl.config.actor_critic import _PARAMS_RE
from trustrl.distributed import require_single_process
from trustrl.loop.experience import ScoredBatch, reward_metrics
from trustrl.loop.rl_loop import TrainingState
from trustrl.losses import explained_variance, masked_mean, value_loss
from trustrl.models import is_peft, lm_backbone_and_head, reference_context
from trustrl.rollout import Rollout, batched_completion_logprobs, completion_hidden_states
from trustrl.trainers.common import FaultCounter, guarded_step, make_optimizer, make_scheduler
from trustrl.trpo import TRPOResult, trpo_update



# -- the parameter subset --------------------------------------------------------------------------


def _decoder_layers(backbone: nn.Module) -> nn.ModuleList:
    """The trunk's list of decoder blocks (the longest ModuleList among its children)."""
    lists = [m for _, m in backbone.named_children() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ConfigError(f"trpo_params: cannot find the decoder layers of {type(backbone).__name__}")
    return max(lists, key=len)


def _final_norm(backbone: nn.Module) -> nn.Module | None:
    for name in ("norm", "final_layernorm", "ln_f", "final_layer_norm"):
        module = getattr(backbone, name, None)
        if isinstance(module, nn.Module):
            return module
    return None


def select_trpo_parameters(model: nn.Module, spec: str) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) pairs moved by the TRPO step for ``trpo_params = spec``."""
    if not _PARAMS_RE.match(spec):
        raise ConfigError(f"trpo_params must be all, lm_head or last_layers:N, got {spec!r}")
    if is_peft(model):
        if spec != "all":
            raise ConfigError(f"trpo_params={spec!r} with lora: only 'all' (the adapter weights) is supported")
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if spec == "all":
        return list(model.named_parameters())
    backbone, head = lm_backbone_and_head(model)
    chosen = {id(p) for p in head.parameters()}
    if spec.startswith("last_layers:"):
        n = int(spec.split(":", 1)[1])
        layers = _decoder_layers(backbone)
        if n > len(layers):
            raise ConfigError(f"trpo_params={spec!r}: the model has only {len(layers)} decoder layers")
        for layer in list(layers)[-n:]:
            chosen |= {id(p) for p in layer.parameters()}
        norm = _final_norm(backbone)
        if norm is not None:
            chosen |= {id(p) for p in norm.parameters()}
    return [(name, p) for name, p in model.named_parameters() if id(p) in chosen]


def head_is_tied(model: nn.Module) -> bool:
    _, head = lm_backbone_and_head(model)
    embed = model.get_input_embeddings()
    return head.weight.data_ptr() == embed.weight.data_ptr()


# -- surrogate and KL on one rollout ---------------------------------------------------------------


@dataclass
class TRPOProblem:
    """Closures over one rollout for :func:`trustrl.trpo.trpo_update`."""

    surrogate: Callable[[], torch.Tensor]
    kl: Callable[[], torch.Tensor]
    old_token_logp: torch.Tensor  # [B, C]


def build_problem(model: nn.Module, rollout: Rollout, advantages: torch.Tensor, mask: torch.Tensor,
                  temperature: float, reuse_trunk: bool) -> TRPOProblem:
    """Surrogate ``token_mean(exp(logp - old_logp) A)`` and mean token KL(pi_old || pi_theta) over
    the full vocabulary, both twice differentiable (plain log_softmax on [B, C, V] logits).

    ``reuse_trunk``: the trunk is frozen and not tied to the head, so its hidden states are
    computed once here and only the LM head runs in each evaluation. The logits are the model's
    own (its final-logit transform applied, :func:`trustrl.rollout.lm_logits`)."""
    from trustrl.rollout import lm_logits

    if reuse_trunk:
        with torch.no_grad():
            hidden = completion_hidden_states(model, rollout)

        def log_probs() -> torch.Tensor:
            return torch.log_softmax(lm_logits(model, hidden, temperature=temperature), dim=-1)
    else:
        def log_probs() -> torch.Tensor:
            return torch.log_softmax(lm_logits(model, completion_hidden_states(model, rollout), temperature=temperature),
                                     dim=-1)

    ids = rollout.completion_ids.unsqueeze(-1)
    with torch.no_grad():
        old_all = log_probs()  # [B, C, V]
        old_tok = old_all.gather(-1, ids).squeeze(-1)
        old_probs = old_all.exp()
    adv = advantages[:, None] if advantages.dim() == 1 else advantages
    zero = torch.zeros((), dtype=old_tok.dtype, device=old_tok.device)

    def surrogate() -> torch.Tensor:
        logp = log_probs().gather(-1, ids).squeeze(-1)
        ratio = torch.exp(torch.where(mask, logp - old_tok, zero))
        return masked_mean(ratio * adv, torch.broadcast_to(mask, ratio.shape))

    def kl() -> torch.Tensor:
        per_token = (old_probs * (old_all - log_probs())).sum(dim=-1)
        return masked_mean(per_token, mask)

    return TRPOProblem(surrogate, kl, old_tok)


class TRPOTrainer(RLAlgorithm):
    """``TRPOTrainer(config).train()``; ``critic`` replaces building the critic (advantage = gae).
    See :class:`trustrl.algorithms.base.RLAlgorithm`. Single process only."""

    name = "trpo"
    config: TRPOConfig
    postfix_keys = ["reward/mean", "trpo/kl", "eval/accuracy"]
    allow_gradient_checkpointing = False  # the double backward of Fisher-vector products needs activations
    allow_fsdp = False  # Fisher-vector products and the line search on sharded parameters: not yet

    def __init__(self, config: TRPOConfig, reward_funcs: list[Callable] | None = None, model=None, tokenizer=None,
                 critic=None):
        require_single_process("trpo")  # no data parallelism yet: fail clearly under torchrun
        super().__init__(config, reward_funcs=reward_funcs, model=model, tokenizer=tokenizer)
        # the subset the natural-gradient step moves; everything else is frozen
        self.trpo_named_params = select_trpo_parameters(self.policy, config.trpo_params)
        keep = {id(p) for _, p in self.trpo_named_params}
        for p in self.policy.parameters():
            p.requires_grad_(id(p) in keep)
        self.trpo_params = [p for _, p in self.trpo_named_params]
        self.reuse_trunk = (config.trpo_params == "lm_head" and not is_peft(self.policy)
                            and not head_is_tied(self.policy))
        self.critic = None
        if config.advantage == "gae":
            self.critic = critic if critic is not None else make_critic(config, self.tokenizer, self.device)
        self.shuffle_generator = torch.Generator(device="cpu").manual_seed(config.seed + 1)

    def setup(self) -> TrainingState:
        cfg = self.config
        state = TrainingState({"policy": self.policy}, generators={"sampling": self.generator,
                                                                    "shuffle": self.shuffle_generator})
        self.critic_opt = self.critic_sched = None
        if self.critic is not None:
            n_updates = cfg.max_steps * cfg.value_epochs * -(-cfg.rollout_batch_size // cfg.value_minibatch_size)
            self.critic_opt = make_optimizer(self.critic.parameters(), cfg, lr=cfg.critic_learning_rate or cfg.learning_rate)
            self.critic_sched = make_scheduler(self.critic_opt, cfg, n_updates)
            state.models["critic"], state.optimizers["critic"] = self.critic, self.critic_opt
            state.schedulers["critic"] = self.critic_sched
        return state

    # 1. the loop samples and scores with pi_old

    def update(self, batch: ScoredBatch, step: int, faults: FaultCounter) -> dict[str, float]:
        rollout = batch.rollout
        # 2. advantages
        adv = self.advantages(batch)
        # 3. natural-gradient step in the trust region, line search, restore on failure
        result = self.trpo_step(rollout, adv["advantages"])
        # a NaN/inf surrogate gradient leaves the policy untouched (nothing is accepted); it
        # counts as a fault like a non-finite gradient in the other trainers
        faults.record(math.isfinite(result.grad_norm), f"trpo step {step} (policy)")
        metrics = self.step_metrics(batch, adv, result)
        # 4. critic regression (gae)
        if self.critic is not None:
            metrics.update(self.fit_critic(rollout, adv["values"], adv["returns"], self.critic_opt, self.critic_sched,
                                           faults, step))
            metrics["optim/critic_lr"] = self.critic_sched.get_last_lr()[0]
        return metrics

    def save_final(self, output_dir: Path) -> dict[str, Any]:
        out = super().save_final(output_dir)
        if self.critic is not None:
            out["critic_dir"] = str(self.critic.save_pretrained(output_dir / "final_critic", tokenizer=self.tokenizer))
        return out

    @torch.no_grad()
    def advantages(self, batch: ScoredBatch) -> dict[str, torch.Tensor]:
        """Step 2: scores (missing-EOS penalty applied), KL to the reference, values, advantages."""
        cfg = self.config
        rollout = batch.rollout
        mask = rollout.completion_mask
        scores = apply_missing_eos_penalty(batch.scores.total.to(self.device), rollout.truncated, cfg.missing_eos_penalty)
        out: dict[str, torch.Tensor] = {"scores": scores}
        logp = ref_logp = None
        if cfg.beta > 0:
            logp = batched_completion_logprobs(self.policy, rollout, batch_size=cfg.forward_batch_size,
                                               temperature=cfg.temperature, chunk_size=cfg.logprob_chunk_size)
            with reference_context(self.policy, self.reference) as ref_model:
                ref_logp = batched_completion_logprobs(ref_model, rollout, batch_size=cfg.forward_batch_size,
                                                       temperature=cfg.temperature, chunk_size=cfg.logprob_chunk_size)
        if cfg.advantage == "group":
            kl = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
            if logp is not None:
                _, kl = token_rewards(scores, logp, ref_logp, mask, cfg.beta)
            rewards = scores - cfg.beta * kl.sum(dim=1)
            out.update(advantages=group_advantages(rewards, cfg.group_size, cfg.group_scale), kl=kl)
            return out
        values = batched_values(self.critic, rollout, cfg.forward_batch_size)
        dummy = torch.zeros(mask.shape, dtype=values.dtype, device=values.device)
        rewards, kl = token_rewards(scores, logp if logp is not None else dummy, ref_logp, mask, cfg.beta)
        if cfg.whiten_rewards:
            rewards = whiten(rewards, mask, shift_mean=False)
        raw, returns = gae(rewards, values, mask, gamma=cfg.gamma, lam=cfg.lam)
        adv = whiten(raw, mask) if cfg.whiten_advantages else raw
        out.update(advantages=adv, raw_advantages=raw, returns=returns, values=values, kl=kl)
        return out

    def trpo_step(self, rollout: Rollout, advantages: torch.Tensor) -> TRPOResult:
        """Step 3: one natural-gradient step with line search, in place on the parameter subset."""
        cfg = self.config
        was_training = self.policy.training
        self.policy.eval()
        # Fisher-vector products differentiate twice through attention: only the "math" SDPA
        # backend (plain differentiable ops) supports that; flash / mem-efficient kernels do not.
        with sdpa_kernel([SDPBackend.MATH]):
            problem = build_problem(self.policy, rollout, advantages, rollout.completion_mask, cfg.temperature,
                                    self.reuse_trunk)
            result = trpo_update(self.trpo_params, problem.surrogate, problem.kl, max_kl=cfg.max_kl,
                                 damping=cfg.damping, cg_iters=cfg.cg_iters, max_backtracks=cfg.max_backtracks,
                                 shrink=cfg.backtrack_shrink, accept_ratio=cfg.accept_ratio)
        for p in self.trpo_params:
            p.grad = None
        self.policy.train(was_training)
        return result

    def fit_critic(self, rollout: Rollout, values: torch.Tensor, returns: torch.Tensor, optimizer, scheduler,
                   faults: FaultCounter, step: int) -> dict[str, float]:
        """Step 4 (gae): regress the critic on the returns, 0.5 (V - R)^2 token mean."""
        cfg = self.config
        critic = self.critic
        critic.train()
        mask = rollout.completion_mask
        n = mask.shape[0]
        losses: list[float] = []
        norm = 0.0
        for _ in range(cfg.value_epochs):
            for rows in torch.randperm(n, generator=self.shuffle_generator).split(cfg.value_minibatch_size):
                rows = rows.to(self.device)
                pred = critic.completion_values(rollout.select(rows)).float()
                loss, _ = value_loss(pred, values[rows], returns[rows], mask[rows], clip=None)
                loss.backward()
                norm, _ = guarded_step(critic, optimizer, scheduler, cfg.max_grad_norm, faults, f"trpo step {step} (critic)",
                                       loss=loss.detach())
                losses.append(float(loss.detach()))
        return {"loss/value": sum(losses) / max(len(losses), 1), "optim/critic_grad_norm": norm}

    def step_metrics(self, batch: ScoredBatch, adv: dict[str, torch.Tensor], result: TRPOResult) -> dict[str, float]:
        mask = batch.rollout.completion_mask
        lengths = mask.sum(dim=1).float()
        raw = adv.get("raw_advantages", adv["advantages"])
        metrics = {
            **reward_metrics(batch.scores),
            "reward/score": float(adv["scores"].mean()),
            "trpo/kl": result.kl,
            "trpo/surrogate_improvement": result.improvement,
            "trpo/line_search_steps": float(result.steps),
            "trpo/accepted": float(result.accepted),
            "trpo/grad_norm": result.grad_norm,
            "trpo/step_norm": result.step_norm,
            "trpo/expected_improvement": result.expected_improve,
            "adv/mean": float(raw.mean()) if raw.dim() == 1 else float(masked_mean(raw, mask)),
            "adv/abs_mean": float(raw.abs().mean()) if raw.dim() == 1 else float(masked_mean(raw.abs(), mask)),
            "completion/mean_length": float(lengths.mean()),
            "completion/max_length": float(lengths.max()),
            "completion/truncated_fraction": float(batch.rollout.truncated.float().mean()),
        }
        if self.config.beta > 0:
            metrics["kl/ref"] = float(masked_mean(adv["kl"], mask))
            metrics["kl/ref_sequence"] = float(adv["kl"].sum(dim=1).mean())
            metrics["kl/coef"] = self.config.beta
        if "returns" in adv:
            metrics["returns/mean"] = float(masked_mean(adv["returns"], mask))
            metrics["value/mean"] = float(masked_mean(adv["values"], mask))
            metrics["value/explained_variance"] = explained_variance(adv["values"], adv["returns"], mask)
        return metrics
