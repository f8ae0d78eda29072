"""Our KV-cache sampler and completion log-probs against transformers' own implementations."""

from __future__ import annotations

import torch

from trustrl.models import load_policy, load_tokenizer
from trustrl.rollout import (
    completion_logprobs,
    counter_uniforms,
    generate,
    left_pad,
    positions_from_mask,
    sample_next,
)


def _prompts(tok):
    texts = ["1+2=", "13+4=", "7+"]
    return left_pad([tok(t)["input_ids"] for t in texts], tok.pad_token_id)


def test_left_pad_and_positions_by_hand():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    # row 1 is padded on the left with two pads
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[True, True, True], [False, False, True]]
    # positions restart at 0 on the first real token
    assert positions_from_mask(mask).tolist() == [[0, 1, 2], [0, 0, 0]]
    ids, _ = left_pad([[1, 2, 3, 4]], pad_id=0, max_length=2)
    assert ids.tolist() == [[3, 4]]  # left-truncated: the end of the prompt is kept


def test_greedy_generation_matches_transformers_generate(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    model = load_policy(tiny_model_dir)
    ids, mask = _prompts(tok)
    ours = generate(model, ids, mask, max_new_tokens=6, eos_token_id=tok.eos_token_id,
                    pad_token_id=tok.pad_token_id, temperature=0.0)
    # the independent implementation: transformers' generate with its own cache handling
    theirs = model.generate(input_ids=ids, attention_mask=mask.long(), max_new_tokens=6, do_sample=False,
                            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    theirs = theirs[:, ids.shape[1]:]
    width = ours.completion_ids.shape[1]
    assert theirs.shape[1] == width
    # compare only positions we consider valid; HF pads after EOS with pad_token_id as we do
    assert torch.equal(ours.completion_ids, theirs)


def test_generation_stops_when_every_sequence_has_ended(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    model = load_policy(tiny_model_dir)
    calls = []

    def force_eos_from_third_token(module, args, output):
        # call 1 scores the prompt (token 1), call 2 token 2, call 3 token 3: EOS from then on
        calls.append(1)
        if len(calls) >= 3:
            output = output.clone()
            output[..., tok.eos_token_id] += 1e4
        return output

    model.lm_head.register_forward_hook(force_eos_from_third_token)
    ids, mask = _prompts(tok)
    out = generate(model, ids, mask, max_new_tokens=20, eos_token_id=tok.eos_token_id,
                   pad_token_id=tok.pad_token_id, temperature=0.0)
    assert out.completion_ids.shape[1] == 3  # stopped right after every row emitted EOS
    assert len(calls) == 3  # and ran no further forward passes
    assert not out.truncated.any()
    assert (out.completion_ids[:, 2] == tok.eos_token_id).all()
    # the EOS token itself counts as a completion token
    assert out.completion_mask.all()


def test_truncation_flag_and_mask(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    model = load_policy(tiny_model_dir)
    ids, mask = _prompts(tok)
    out = generate(model, ids, mask, max_new_tokens=3, eos_token_id=tok.eos_token_id,
                   pad_token_id=tok.pad_token_id, temperature=1.0, generator=torch.Generator().manual_seed(0))
    for row in range(out.completion_ids.shape[0]):
        ids_row = out.completion_ids[row].tolist()
        if out.truncated[row]:
            assert tok.eos_token_id not in ids_row and out.completion_mask[row].all()
        else:
            end = ids_row.index(tok.eos_token_id)
            assert out.completion_mask[row].tolist() == [i <= end for i in range(len(ids_row))]


def test_completion_logprobs_equal_full_logits_log_softmax(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    model = load_policy(tiny_model_dir)
    ids, mask = _prompts(tok)
    out = generate(model, ids, mask, max_new_tokens=5, eos_token_id=tok.eos_token_id,
                   pad_token_id=tok.pad_token_id, temperature=1.0, generator=torch.Generator().manual_seed(1))
    temperature = 0.7
    ours = completion_logprobs(model, out, temperature=temperature, chunk_size=3)
    # reference: the model's own full logits, divided by the temperature, log_softmax, gather
    full = model(input_ids=out.input_ids, attention_mask=out.attention_mask.long(),
                 position_ids=positions_from_mask(out.attention_mask)).logits
    P = ids.shape[1]
    logits = full[:, P - 1:-1] / temperature
    expected = torch.log_softmax(logits, dim=-1).gather(-1, out.completion_ids[..., None]).squeeze(-1)
    valid = out.completion_mask
    torch.testing.assert_close(ours[valid], expected[valid], rtol=1e-5, atol=1e-5)


def test_top_p_keeps_only_the_nucleus():
    # probabilities 0.5, 0.3, 0.15, 0.05: top_p=0.7 keeps {0, 1} (0.5 < 0.7 <= 0.8)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, 1.0, 0.7, g)) for _ in range(300)}
    assert draws == {0, 1}
    assert int(sample_next(logits, 0.0, 1.0, None)) == 0  # temperature 0 is greedy


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_sampler_frequencies_match_softmax_chi_square():
    """The two-level inverse-CDF sampler draws token i with probability softmax(z / T)_i.

    300 tokens: a full block of 256 and a padded one of 44, so a block-index or padding bug
    shows. 30000 draws; the chi-square statistic with 299 degrees of freedom has mean 299
    and standard deviation sqrt(2 * 299) = 24.5; its 99.9% quantile is about 385 (normal
    approximation 299 + 3.09 * 24.5 = 375, a little more for the skew). A sampler off by one
    token or one block, or that ignores the temperature, lands in the thousands."""
    vocab, draws, temperature = 300, 30000, 0.8
    gen = torch.Generator().manual_seed(0)
    logits = torch.rand(vocab, generator=gen) * 2 - 1  # expected counts >= 30000 * e^-2.5 / 300 * ... > 20
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    batch = logits.expand(draws, vocab)
    # the generator path and the counter-based path (the one the trainers use)
    from_generator = sample_next(batch, temperature, 1.0, torch.Generator().manual_seed(1))
    seeds = torch.arange(draws, dtype=torch.int64) * 7919 + 12345
    from_counters = sample_next(batch, temperature, 1.0, None, uniforms=counter_uniforms(seeds, t=3))
    for tokens in (from_generator, from_counters):
        counts = torch.bincount(tokens, minlength=vocab).double()
        assert counts.shape == (vocab,)  # nothing drawn past the vocabulary
        assert _chi_square(counts, probs) < 385
    # the test has teeth: a sampler at temperature 1 instead of 0.8 fails it
    wrong = torch.softmax(logits.double(), dim=-1)
    assert _chi_square(torch.bincount(from_generator, minlength=vocab).double(), wrong) > 385


def test_top_p_frequencies_are_the_renormalized_nucleus():
    # probabilities 0.4, 0.3, 0.2, 0.1; top_p = 0.8 keeps {0, 1, 2} (0.7 < 0.8 <= 0.9), each with
    # p / 0.9: 4/9, 3/9, 2/9. 18000 draws; chi-square with 2 degrees of freedom: 99.9% at 13.8.
    logits = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.1])).expand(18000, 4)
    tokens = sample_next(logits, 1.0, 0.8, torch.Generator().manual_seed(2))
    counts = torch.bincount(tokens, minlength=4).double()
    assert counts[3] == 0
    kept = torch.tensor([4 / 9, 3 / 9, 2 / 9], dtype=torch.float64)
    assert _chi_square(counts[:3], kept) < 13.8


def test_sampling_emits_no_transformers_deprecation_warning(tiny_model_dir):
    """The sampler hands the KV cache back under the keyword the installed transformers
    expects (``cache`` in recent 5.x, ``past_key_values`` before), so a run prints none of
    transformers' FutureWarnings about the cache API (every run printed one per step before).
    Padded prompts: the attention-mask path, and enough steps to go through the cache."""
    import warnings

    tok = load_tokenizer(tiny_model_dir)
    model = load_policy(tiny_model_dir)
    ids, mask = _prompts(tok)
    assert not bool(mask.all())
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        out = generate(model, ids, mask, max_new_tokens=5, eos_token_id=-1, pad_token_id=tok.pad_token_id,
                       temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert out.completion_ids.shape == (3, 5)  # eos -1 never sampled: all five steps ran
