"""Token-budget micro-batches: the split by hand, its invariants, and the property that any
budget gives the loss and gradients of one whole batch (float64, 1e-12) -- the split, the
trimming of padding columns and the one normalizer together."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trustrl.loop.accumulate import BatchNormalizer, row_micro_batches, token_budget_micro_batches
from trustrl.losses import aggregate_sum, kl_penalty, policy_loss_sum, sequence_policy_loss_sum
from trustrl.rollout import Rollout


def test_token_budget_split_by_hand():
    # lengths 3, 10, 5, 1, budget 12; sorted longest first: rows 1 (10), 2 (5), 0 (3), 3 (1)
    # row 1 alone (2 x 10 = 20 > 12); rows 2, 0: 2 x 5 = 10 <= 12, with row 3: 3 x 5 = 15 > 12
    parts = token_budget_micro_batches([3, 10, 5, 1], 12)
    assert [p.tolist() for p in parts] == [[1], [2, 0], [3]]
    # a prompt (left padded) and a completion (right padded) pad separately: rows
    # (prompt, completion) = (6, 1), (1, 6), (2, 2): sorted by total 7, 7, 4 -> rows 0, 1, 2;
    # rows 0 + 1 would be 2 x (6 + 6) = 24 > 14, so row 0 alone; rows 1 + 2: 2 x (2 + 6) = 16 > 14
    parts = token_budget_micro_batches([1, 6, 2], 14, prefix_lengths=[6, 1, 2])
    assert [p.tolist() for p in parts] == [[0], [1], [2]]
    parts = token_budget_micro_batches([1, 6, 2], 16, prefix_lengths=[6, 1, 2])
    assert [p.tolist() for p in parts] == [[0], [1, 2]]
    assert [p.tolist() for p in row_micro_batches(5, 3)] == [[0, 1], [2, 3], [4]]
    with pytest.raises(ValueError, match="budget must be >= 1"):
        token_budget_micro_batches([1], 0)


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.tuples(st.integers(0, 12), st.integers(1, 12)), min_size=1, max_size=12),
       budget=st.integers(1, 80))
def test_split_covers_every_row_once_and_fits_the_budget(lengths, budget):
    prompts, completions = zip(*lengths)
    parts = token_budget_micro_batches(completions, budget, prompts)
    rows = sorted(i for p in parts for i in p.tolist())
    assert rows == list(range(len(lengths)))
    for p in parts:
        idx = p.tolist()
        padded = len(idx) * (max(prompts[i] for i in idx) + max(completions[i] for i in idx))
        assert padded <= budget or len(idx) == 1


def _batch(lengths, prompt_lengths, seed):
    """A rollout with left-padded prompts and right-padded completions of the given lengths,
    float64 per-token tensors, and the leaf the loss differentiates (the new log-probs)."""
    g = torch.Generator().manual_seed(seed)
    B, P, C = len(lengths), max(prompt_lengths), max(lengths)
    prompt_mask = torch.arange(P)[None, :] >= (P - torch.tensor(prompt_lengths))[:, None]
    completion_mask = torch.arange(C)[None, :] < torch.tensor(lengths)[:, None]
    ids = torch.randint(3, 50, (B, P + C), generator=g)
    rollout = Rollout(ids[:, :P], prompt_mask, ids[:, P:], completion_mask, torch.zeros(B, dtype=torch.bool))
    logp = (-torch.rand(B, C, generator=g, dtype=torch.float64) * 3).requires_grad_()
    old = logp.detach() + torch.randn(B, C, generator=g, dtype=torch.float64) * 0.3
    ref = logp.detach() + torch.randn(B, C, generator=g, dtype=torch.float64) * 0.3
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    return rollout, logp, old, ref, adv


def _terms(logp, old, ref, adv, mask, aggregation):
    if aggregation == "gspo":
        surrogate, _ = sequence_policy_loss_sum(logp, old, adv, mask, clip_low=0.1, clip_high=0.2)
        kl_agg = "token_mean"
    else:
        surrogate, _ = policy_loss_sum(logp, old, adv, mask, clip_low=0.2, aggregation=aggregation, max_len=12)
        kl_agg = aggregation
    return [(1.0, surrogate), (0.1, aggregate_sum(kl_penalty(logp, ref), mask, kl_agg, max_len=12))]


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.tuples(st.integers(1, 8), st.integers(1, 12)), min_size=1, max_size=10),
       budget=st.integers(1, 100), seed=st.integers(0, 2**16),
       aggregation=st.sampled_from(["token_mean", "seq_mean", "seq_sum_constant", "gspo"]))
def test_any_budget_gives_the_whole_batch_loss_and_gradients(lengths, budget, seed, aggregation):
    """Whole batch (one normalizer, no split) vs token-budget micro-batches, each trimmed of the
    padding columns it does not need (:meth:`Rollout.trim`), its per-token tensors sliced to
    the trimmed width: the summed loss and the gradient agree to 1e-12 in float64."""
    prompt_lengths, completion_lengths = zip(*lengths)
    rollout, logp, old, ref, adv = _batch(list(completion_lengths), list(prompt_lengths), seed)
    mask = rollout.completion_mask
    whole = BatchNormalizer([mask]).loss(_terms(logp, old, ref, adv, mask, aggregation))
    (whole_grad,) = torch.autograd.grad(whole, logp)

    parts = token_budget_micro_batches(list(completion_lengths), budget, list(prompt_lengths))
    normalizer = BatchNormalizer([mask[rows] for rows in parts])
    total = torch.zeros((), dtype=torch.float64)
    for rows in parts:
        micro = rollout.select(rows).trim()
        width = micro.completion_ids.shape[1]
        assert width == max(completion_lengths[i] for i in rows.tolist())
        assert micro.prompt_ids.shape[1] == max(prompt_lengths[i] for i in rows.tolist())
        assert torch.equal(micro.completion_mask, mask[rows, :width])  # nothing valid was cut
        total = total + normalizer.loss(_terms(logp[rows, :width], old[rows, :width], ref[rows, :width], adv[rows],
                                               mask[rows, :width], aggregation))
    (split_grad,) = torch.autograd.grad(total, logp)
    assert float(total) == pytest.approx(float(whole), rel=0, abs=1e-12)
    torch.testing.assert_close(split_grad, whole_grad, rtol=0, atol=1e-12)


def test_trim_keeps_rows_and_drops_only_shared_padding():
    # prompts of 1 and 2 tokens in width 4 (two all-pad columns), completions of 1 and 2 in width 5
    prompt_mask = torch.tensor([[False, False, False, True], [False, False, True, True]])
    completion_mask = torch.tensor([[True, False, False, False, False], [True, True, False, False, False]])
    ids = torch.arange(18).view(2, 9)
    behaviour = torch.arange(10, dtype=torch.float32).view(2, 5)
    r = Rollout(ids[:, :4], prompt_mask, ids[:, 4:], completion_mask, torch.tensor([False, True]),
                behaviour_logprobs=behaviour)
    t = r.trim()
    assert t.prompt_ids.tolist() == [[2, 3], [11, 12]] and t.prompt_mask.tolist() == [[False, True], [True, True]]
    assert t.completion_ids.tolist() == [[4, 5], [13, 14]] and t.behaviour_logprobs.tolist() == [[0, 1], [5, 6]]
    assert t.truncated.tolist() == [False, True]


# ------------------------------------------------------------------ padding-free packed micro-batches


def _tiny(arch: str, dtype):
    import transformers

    kw = dict(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    config = getattr(transformers, f"{arch}Config")(**kw)
    torch.manual_seed(0)
    return getattr(transformers, f"{arch}ForCausalLM")(config).to(dtype).eval()


@pytest.mark.parametrize("arch", ["Llama", "Qwen2", "Qwen3", "Mistral"])
@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_packed_log_probs_equal_the_padded_forward(arch, dtype, tolerance):
    """Rows of different prompt (left-padded) and completion (right-padded) lengths: packed into
    one sequence with restarting position ids, the log-probs, entropies and their gradients
    equal the padded forward's (float64 to 1e-12: the block-diagonal mask is exact)."""
    from trustrl.rollout import completion_logprobs, packed_completion_logprobs

    model = _tiny(arch, dtype)
    rollout, *_ = _batch([3, 7, 1, 5], [2, 6, 4, 1], seed=1)
    rollout = Rollout(rollout.prompt_ids % 40, rollout.prompt_mask, rollout.completion_ids % 40,
                      rollout.completion_mask, rollout.truncated)
    mask = rollout.completion_mask
    grads = []
    for fn in (completion_logprobs, packed_completion_logprobs):
        model.zero_grad()
        logp, entropy = fn(model, rollout, temperature=0.7, return_entropy=True)
        (logp * mask).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
        if fn is completion_logprobs:
            expected = (logp.detach(), entropy)
        else:
            torch.testing.assert_close(logp.detach()[mask], expected[0][mask], rtol=0, atol=tolerance)
            torch.testing.assert_close(entropy[mask], expected[1][mask], rtol=0, atol=tolerance)
            assert logp.detach()[~mask].eq(0).all()
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=tolerance * max(1.0, float(grads[0].abs().max())))


def test_packed_budget_counts_real_tokens_and_unknown_models_are_refused():
    # packed: rows (prompt, completion) (6, 1), (1, 6), (2, 2) cost 7, 7, 4 real tokens; budget 14
    # takes rows 0 + 1 (14), then row 2 alone
    parts = token_budget_micro_batches([1, 6, 2], 14, prefix_lengths=[6, 1, 2], packed=True)
    assert [p.tolist() for p in parts] == [[0, 1], [2]]
    from trustrl.rollout import check_packable

    class GPT2LMHeadModel(torch.nn.Module):
        pass

    with pytest.raises(ValueError, match="pack_sequences: GPT2LMHeadModel is not known"):
        check_packable(GPT2LMHeadModel())


def test_grpo_with_packed_micro_batches_gives_the_whole_batch_gradient(tiny_model_dir, addition_data, tmp_path,
                                                                       monkeypatch):
    """GRPO (token_mean, beta > 0, mu = 2 so the old log-probs are packed the same way and the
    first ratio is exactly 1): packed token-budget micro-batches vs one padded micro-batch."""
    import trustrl.algorithms.grpo as grpo_module
    from trustrl.algorithms.grpo import GRPOTrainer
    from trustrl.config import GRPOConfig

    grads, ratios = {}, []
    original_loss = grpo_module.policy_loss_sum

    def recording(logp, old_logp, advantages, mask, **kwargs):
        ratios.append((logp.detach() - old_logp)[mask])
        return original_loss(logp, old_logp, advantages, mask, **kwargs)

    for name, split in {"one": {}, "packed": dict(micro_batch_tokens=40, pack_sequences=True)}.items():
        captured = []
        ratios.clear()
        original = grpo_module.guarded_step

        def capturing(model, *args, **kwargs):
            captured.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})
            return original(model, *args, **kwargs)

        monkeypatch.setattr(grpo_module, "guarded_step", capturing)
        monkeypatch.setattr(grpo_module, "policy_loss_sum", recording)
        cfg = GRPOConfig(model=str(tiny_model_dir), dataset=str(addition_data["rl"]), output_dir=str(tmp_path / name),
                         max_steps=1, prompts_per_step=4, group_size=4, max_completion_length=6, max_prompt_length=16,
                         learning_rate=1e-3, beta=0.04, num_iterations=2, progress=False, tensorboard=False, seed=0,
                         rewards=[], **split)
        GRPOTrainer(cfg, reward_funcs=[lambda prompts, completions, **kw: [c.count("a") / 6 for c in completions]]).train()
        grads[name] = captured[0]
        monkeypatch.undo()
    # the packed run: 2 iterations x its micro-batches (40 real tokens: several); the first
    # iteration's ratio is exactly 1, bitwise (old log-probs packed the same way)
    n_micro = len(ratios) // 2
    assert n_micro >= 2 and all(bool(r.eq(0).all()) for r in ratios[:n_micro])
    assert any(bool(r.ne(0).any()) for r in ratios[n_micro:])
    scale = max(float(g.abs().max()) for g in grads["one"].values())
    for n, g in grads["one"].items():
        torch.testing.assert_close(grads["packed"][n], g, rtol=0, atol=1e-5 * scale)


def test_metric_means_take_maxima_for_max_metrics():
    """Means weighted by each micro-batch's share; ``..._max`` metrics are the largest over the
    micro-batches that count (a stand-in pass, weight 0, does not): by hand,
    a = 0.25 * 2 + 0.75 * 4 = 3.5, ratio_max = max(1.5, 1.2) = 1.5 (not the stand-in's 9)."""
    from trustrl.loop.accumulate import MetricMeans

    means = MetricMeans()
    means.add({"a": 2.0, "policy/ratio_max": 1.5}, 0.25)
    means.add({"a": 4.0, "policy/ratio_max": 1.2}, 0.75)
    means.add({"a": 100.0, "policy/ratio_max": 9.0}, 0.0)
    assert means.reduce() == {"a": 3.5, "policy/ratio_max": 1.5}
