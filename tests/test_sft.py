"""SFT: the length of a run in epochs, the checkpoint of the last step, exact gradient
accumulation with rows of unequal lengths, and one BOS per example under the BOS policy.

Expected values are worked by hand in the comments; gradients are compared between two
accumulation splits of the same batch (two computations that share no normalization)."""

from __future__ import annotations

import pytest
import torch

from trustrl.checkpoint import find_latest_checkpoint, list_checkpoints
from trustrl.config import ConfigError, SFTConfig
from trustrl.data import write_jsonl
from trustrl.logging import read_metrics
from trustrl.models import load_tokenizer
from trustrl.trainers.sft import SFTTrainer


def _config(tiny_model_dir, dataset, out, **overrides) -> SFTConfig:
    base = dict(model=str(tiny_model_dir), dataset=str(dataset), output_dir=str(out), batch_size=16, max_length=32,
                progress=False, tensorboard=False, seed=0, device="cpu", learning_rate=1e-3)
    base.update(overrides)
    return SFTConfig(**base)


# ------------------------------------------------------------------------------- epochs


def test_epochs_decide_the_number_of_steps(tiny_model_dir, addition_data, tmp_path):
    # 64 SFT rows, batch 16: 1.5 epochs = ceil(1.5 * 64 / 16) = 6 optimizer steps
    cfg = _config(tiny_model_dir, addition_data["sft"], tmp_path / "run", epochs=1.5)
    trainer = SFTTrainer(cfg)
    assert len(trainer.examples) == 64 and trainer.max_steps == 6
    summary = trainer.train()
    assert summary["steps"] == 6
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3, 4, 5, 6]
    # the sampler drew 6 * 16 = 96 = 64 (epoch 0) + 32 examples: epoch 1, cursor 32
    import json

    state = json.loads((find_latest_checkpoint(tmp_path / "run") / "trainer_state.json").read_text())
    assert state["sampler"]["epoch"] == 1 and state["sampler"]["cursor"] == 32
    # the run directory's config.yaml holds the steps run, and loads back without conflict
    from trustrl.config import load_config

    saved = load_config(SFTConfig, tmp_path / "run" / "config.yaml")
    assert (saved.epochs, saved.max_steps) == (1.5, 6)
    assert SFTTrainer(saved.model_copy(update={"output_dir": str(tmp_path / "again")})).max_steps == 6


def test_epochs_with_a_different_max_steps_is_refused(tiny_model_dir, addition_data, tmp_path):
    with pytest.raises(ConfigError, match=r"epochs=2 means 8 steps \(64 examples, batch_size=16\) but max_steps=5 "
                                          r"is also set; set one of epochs / max_steps"):
        SFTTrainer(_config(tiny_model_dir, addition_data["sft"], tmp_path / "run", epochs=2, max_steps=5))
    # the same number is no conflict; max_steps alone is unchanged behaviour
    assert SFTTrainer(_config(tiny_model_dir, addition_data["sft"], tmp_path / "r2", epochs=2, max_steps=8)).max_steps == 8
    assert SFTTrainer(_config(tiny_model_dir, addition_data["sft"], tmp_path / "r3", max_steps=5)).max_steps == 5


# ---------------------------------------------------------------------- final checkpoint


def test_save_every_zero_still_saves_the_last_step(tiny_model_dir, addition_data, tmp_path):
    cfg = _config(tiny_model_dir, addition_data["sft"], tmp_path / "run", max_steps=3, save_every=0)
    SFTTrainer(cfg).train()
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [3]
    # and resume=auto on the finished run has nothing left to do
    summary = SFTTrainer(cfg.model_copy(update={"resume": "auto"})).train()
    assert summary["steps"] == 3 and summary["resumed_from"].endswith("step_000003")


# ----------------------------------------------------------------- gradient accumulation


def test_one_micro_batch_of_n_rows_equals_n_micro_batches_of_one(tiny_model_dir, tmp_path, first_step_gradients):
    """5 rows whose prompts and completions have unequal lengths (2 to 12 target tokens): the
    first update's gradient is the same with 1 micro-batch of 5, 5 of 1 and 3 (2 + 2 + 1).
    A per-micro-batch mean (the defect this guards) would weight the 1-row micro-batches'
    tokens differently. float64 model: only summation order differs."""
    from transformers import AutoModelForCausalLM

    rows = [{"prompt": "1+2=", "completion": "3"},
            {"prompt": "12+34=", "completion": "<answer>46</answer>"},
            {"prompt": "5=", "completion": "abcabcabcab"},
            {"prompt": "9+9+9+9+9=", "completion": "45"},
            {"prompt": "0=", "completion": "<answer>0</answer>"}]
    write_jsonl(tmp_path / "sft.jsonl", rows)
    grads = {}
    # also token-budget micro-batches: 24 padded tokens over the length-sorted rows of 14, 13,
    # 11, 6 and 6 tokens: {14}, {13}, {11, 6} (2 x 11 = 22; a third row would make 33), {6},
    # each cut to its longest row
    splits = {1: {}, 3: dict(gradient_accumulation_steps=3), 5: dict(gradient_accumulation_steps=5),
              "budget": dict(micro_batch_tokens=24)}
    for accum, split in splits.items():
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).double()
        cfg = _config(tiny_model_dir, tmp_path / "sft.jsonl", tmp_path / f"run{accum}", batch_size=5, max_steps=1,
                      **split)
        trainer = SFTTrainer(cfg, model=model, tokenizer=load_tokenizer(tiny_model_dir))
        n_targets = [sum(m[1:]) for _, m in trainer.examples]
        assert len(set(n_targets)) >= 4, n_targets  # the rows really are of unequal lengths
        grads[accum] = first_step_gradients(trainer)
    for accum in (3, 5, "budget"):
        assert grads[accum].keys() == grads[1].keys()
        for name, g in grads[1].items():
            torch.testing.assert_close(grads[accum][name], g, rtol=0, atol=1e-12, msg=lambda m: f"{name}: {m}")
    assert max(float(g.abs().max()) for g in grads[1].values()) > 1e-3  # not a vacuous comparison
    # the logged loss is the token mean over the whole batch in every split
    losses = [read_metrics(tmp_path / f"run{a}")[0]["loss/nll"] for a in (1, 3, 5, "budget")]
    assert all(loss == pytest.approx(losses[0], rel=1e-12) for loss in losses[1:])


def test_token_nll_sum_by_hand():
    from trustrl.losses import token_nll_sum

    logp = torch.tensor([[-1.0, -2.0, float("-inf")], [-0.5, -4.0, -3.0]])
    mask = torch.tensor([[True, True, False], [False, True, True]])
    part = token_nll_sum(logp, mask)
    # 1 + 2 + 4 + 3 = 10 over 4 tokens; the masked -inf counts exactly 0
    assert float(part.total) == 10.0 and float(part.count) == 4.0 and part.unit == "tokens"


# --------------------------------------------------------------------------- BOS policy


def _bos_tokenizer(template: str | None):
    """Characters after <pad>=0 <s>=1 </s>=2 <unk>=3: 0..9 = 4..13, "+" = 14, "=" = 15,
    "\\n" = 16, "a" = 17, "s" = 18; ``add_special_tokens=True`` prepends <s>."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials)}
    for ch in "0123456789+=\nas":
        vocab.setdefault(ch, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    core.add_special_tokens(specials)
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>")
    if template is not None:
        tok.chat_template = template
    return tok


@pytest.mark.parametrize("templated", [False, True])
def test_sft_examples_start_with_exactly_one_bos(tmp_path, templated):
    from trustrl.tiny import build_tiny_llama

    template = ("{{ bos_token }}{% for m in messages %}{{ m['content'] }}\n{% endfor %}" if templated else None)
    tok = _bos_tokenizer(template)
    model = build_tiny_llama(len(tok), hidden_size=16, num_layers=1, num_heads=2, pad_token_id=0, bos_token_id=1,
                             eos_token_id=2)
    write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "1+2=", "completion": "3"}])
    cfg = SFTConfig(model="unused", dataset=str(tmp_path / "sft.jsonl"), output_dir=str(tmp_path / "run"),
                    system_prompt="as", progress=False, tensorboard=False, device="cpu")
    (ids, mask), = SFTTrainer(cfg, model=model, tokenizer=tok).examples
    if templated:
        # "<s>as\n1+2=\n" from the template (its own BOS only), then "3" EOS
        assert ids == [1, 17, 18, 16, 5, 14, 6, 15, 16, 7, 2]
    else:
        # the defect: "as\n\n1+2=" differs from the row, was taken for template text, and lost
        # its BOS; now: BOS "as" "\n\n" "1+2=" then "3" EOS
        assert ids == [1, 17, 18, 16, 16, 5, 14, 6, 15, 7, 2]
    assert mask == [False] * (len(ids) - 2) + [True, True]


# ------------------------------------------------------------------------- held-out loss


def _nll_by_hand(model, examples) -> float:
    """Per-token held-out NLL from the model's own logits, one unpadded example at a time:
    sum over target positions t of -log softmax(logits[t-1])[ids[t]], over the count of targets."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, mask in examples:
            logits = model(torch.tensor([ids])).logits[0].double()
            logp = torch.log_softmax(logits[:-1], dim=-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
            m = torch.tensor(mask[1:])
            total -= float(logp[m].sum())
            count += int(m.sum())
    return total / count


def test_sft_evaluates_the_held_out_loss_and_reports(tiny_model_dir, addition_data, tmp_path, monkeypatch):
    import json

    monkeypatch.delenv("TRUSTRL_NO_REPORT", raising=False)

    rows = [json.loads(line) for line in addition_data["sft"].read_text().splitlines()]
    write_jsonl(tmp_path / "heldout.jsonl", rows[:6])
    cfg = _config(tiny_model_dir, addition_data["sft"], tmp_path / "run", batch_size=4, max_steps=4, eval_every=3,
                  eval_dataset=str(tmp_path / "heldout.jsonl"))
    trainer = SFTTrainer(cfg)
    start = _nll_by_hand(trainer.model, trainer.eval_examples)
    summary = trainer.train()
    end = _nll_by_hand(trainer.model, trainer.eval_examples)
    # at the start, every eval_every=3 steps and after the last (4)
    assert [h["step"] for h in summary["eval_history"]] == [0, 3, 4]
    assert summary["eval_history"][0]["eval/nll"] == pytest.approx(start, rel=1e-5)
    assert summary["eval_nll_last"] == pytest.approx(end, rel=1e-5) and end < start
    tokens = sum(sum(m[1:]) for _, m in trainer.eval_examples)
    assert summary["eval_history"][0]["eval/tokens"] == tokens
    logged = {r["step"]: r.get("eval/nll") for r in read_metrics(tmp_path / "run")}
    assert [s for s, v in logged.items() if v is not None] == [0, 3, 4]
    # evaluating changes no number of the training run
    monkeypatch.setenv("TRUSTRL_NO_REPORT", "1")
    plain = SFTTrainer(_config(tiny_model_dir, addition_data["sft"], tmp_path / "plain", batch_size=4,
                               max_steps=4)).train()
    assert plain["final_loss"] == summary["final_loss"]
    train_nll = [r["loss/nll"] for r in read_metrics(tmp_path / "run") if "loss/nll" in r]
    assert train_nll == [r["loss/nll"] for r in read_metrics(tmp_path / "plain")]
    # report.html and its plots, the held-out loss among them
    assert "eval/nll" in (tmp_path / "run" / "report.html").read_text()
    assert (tmp_path / "run" / "plots" / "eval_nll.png").is_file()


def test_a_missing_eval_dataset_is_an_error_naming_it(tmp_path):
    cfg = SFTConfig(model=str(tmp_path / "no-such-model"), dataset="x.jsonl", output_dir=str(tmp_path / "run"),
                    eval_dataset=str(tmp_path / "heldout.jsonl"))
    with pytest.raises(FileNotFoundError, match=r"heldout.jsonl: no such file or directory \(eval_dataset\)"):
        SFTTrainer(cfg)  # before the (missing) model is looked at


def test_held_out_nll_does_not_depend_on_the_batching(tiny_model_dir, addition_data, tmp_path):
    # the same held-out set in one forward pass, in passes of 3 rows and by a token budget
    # (length-sorted, padded differently): one sum over the same tokens, so the same value
    from trustrl.loop.accumulate import token_budget_micro_batches
    from trustrl.trainers.sft import held_out_nll

    trainer = SFTTrainer(_config(tiny_model_dir, addition_data["sft"], tmp_path / "run", eval_dataset=str(
        addition_data["sft"])))
    ex, pad = trainer.eval_examples[:10], trainer.tokenizer.pad_token_id
    one = held_out_nll(trainer.model, ex, pad, "cpu", [torch.arange(10)])
    threes = held_out_nll(trainer.model, ex, pad, "cpu", list(torch.arange(10).split(3)))
    budget = held_out_nll(trainer.model, ex, pad, "cpu", token_budget_micro_batches([len(i) for i, _ in ex], 40))
    assert one["eval/tokens"] == threes["eval/tokens"] == budget["eval/tokens"] == sum(sum(m[1:]) for _, m in ex)
    assert threes["eval/nll"] == pytest.approx(one["eval/nll"], rel=1e-6)
    assert budget["eval/nll"] == pytest.approx(one["eval/nll"], rel=1e-6)
