"""Reward models: the Bradley-Terry loss by hand, a short training run that separates an easy
preference, save/load round trip, padding invariance of the score, and the trained scorer
used as a reward inside GRPO."""

from __future__ import annotations

import math
import random

import pytest
import torch

from trustrl.data import write_jsonl
from trustrl.models import load_tokenizer
from trustrl.rewards.reward_model import reward_model_reward
from trustrl.trainers.reward_model import RewardConfig, RewardTrainer, reward_model_loss
from trustrl.value_model import last_token_index, load_scalar_model, scalar_model_from_lm, score_texts


def test_bradley_terry_loss_by_hand():
    r_c, r_r = torch.tensor([2.0]), torch.tensor([0.0])
    # -log sigmoid(2 - 0) = log(1 + e^-2) = log(1.135335) = 0.126928
    loss, m = reward_model_loss(r_c, r_r, None, None)
    assert float(loss) == pytest.approx(0.126928, abs=1e-6)
    assert m["accuracy"] == 1.0 and m["margin"] == 2.0
    # with a margin of 1: log(1 + e^-1) = log(1.367879) = 0.313262
    loss, _ = reward_model_loss(r_c, r_r, torch.tensor([1.0]), None)
    assert float(loss) == pytest.approx(0.313262, abs=1e-6)
    # centering 0.01 * (2 + 0)^2 = 0.04 on top of 0.126928
    loss, m = reward_model_loss(r_c, r_r, None, 0.01)
    assert float(loss) == pytest.approx(0.166928, abs=1e-6)
    assert m["center"] == pytest.approx(0.04)


def test_last_token_index_left_and_right_padding():
    mask = torch.tensor([[False, True, True], [True, True, False], [True, False, False]])
    # row 0 left-padded: last real token at 2; row 1 right-padded: at 1; row 2: at 0
    assert last_token_index(mask).tolist() == [2, 1, 0]


def _pairs(rng: random.Random, n: int) -> list[dict]:
    """Easily separable preference: the chosen response contains an 'a', the rejected one a 'b'
    (the rest is the same random digits)."""
    rows = []
    for _ in range(n):
        digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 4)))
        pos = rng.randint(0, len(digits))
        rows.append({"prompt": f"{rng.randint(0, 9)}+{rng.randint(0, 9)}=",
                     "chosen": digits[:pos] + "a" + digits[pos:], "rejected": digits[:pos] + "b" + digits[pos:]})
    return rows


@pytest.fixture(scope="module")
def trained_rm(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("rm")
    rng = random.Random(0)
    write_jsonl(root / "train.jsonl", _pairs(rng, 128))
    write_jsonl(root / "eval.jsonl", _pairs(rng, 48))
    cfg = RewardConfig(model=str(tiny_model_dir), dataset=str(root / "train.jsonl"),
                       eval_dataset=str(root / "eval.jsonl"), output_dir=str(root / "run"), max_steps=12,
                       batch_size=16, learning_rate=3e-3, max_length=24, eval_every=0, progress=False,
                       tensorboard=False, seed=2, center_rewards_coef=0.01)
    trainer = RewardTrainer(cfg)
    summary = trainer.train()
    return trainer, summary, cfg


def test_training_raises_heldout_accuracy(trained_rm):
    trainer, summary, cfg = trained_rm
    from trustrl.logging import read_metrics

    rows = read_metrics(cfg.output_dir)
    assert all(math.isfinite(r["loss/bt"]) for r in rows if "loss/bt" in r)
    # held-out metrics at step 0 and at the end
    evals = [r for r in rows if "rm/accuracy" in r]
    assert [r["step"] for r in evals] == [0, 12]
    # seed 2 draws a head that, untrained, prefers the 'b' responses: the rise is learned
    assert summary["accuracy_first"] < 0.5, summary["eval_history"]
    assert summary["accuracy_last"] > 0.8, summary["eval_history"]
    assert evals[-1]["rm/margin"] > 0


def test_save_load_round_trip_gives_identical_scores(trained_rm):
    trainer, summary, _ = trained_rm
    tok = load_tokenizer(summary["model_dir"])
    loaded = load_scalar_model(summary["model_dir"], tokenizer=tok)
    assert loaded.kind == "reward" and loaded.extra["max_length"] == 24
    prompts = ["1+2=", "3+4=", "5+5="]
    responses = ["a12", "b", "<answer>10</answer>"]
    before = score_texts(trainer.model, trainer.tokenizer, prompts, responses, max_length=24)
    after = score_texts(loaded, tok, prompts, responses, max_length=24)
    assert torch.equal(before, after)
    # the reward function loads the same model and scores the same texts identically
    fn = reward_model_reward(summary["model_dir"])  # same batching as `before`: bit for bit
    assert fn(prompts, responses, answer=["3", "7", "10"]) == before.tolist()
    # other batching pads differently: equal to float rounding (5e-7 seen here)
    fn2 = reward_model_reward(summary["model_dir"], batch_size=2)
    assert fn2(prompts, responses) == pytest.approx(before.tolist(), rel=0, abs=1e-5)
    assert fn(["1+1="], ["a"])[0] > fn(["1+1="], ["b"])[0]


def test_score_is_padding_invariant(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    model = scalar_model_from_lm(tiny_model_dir, kind="reward", zero_head=False, seed=3)
    # alone vs. left-padded next to a longer text: positions restart at the first real token
    alone = score_texts(model, tok, ["1+2="], ["3"])
    batched = score_texts(model, tok, ["1+2=", "12+34="], ["3", "<answer>46</answer>"])
    torch.testing.assert_close(batched[0], alone[0], rtol=0, atol=1e-5)


def test_value_head_zero_init_and_json_meta(tiny_model_dir, tmp_path):
    model = scalar_model_from_lm(tiny_model_dir, kind="value", zero_head=True)
    assert torch.count_nonzero(model.head.weight) == 0 and torch.count_nonzero(model.head.bias) == 0
    out = model.save_pretrained(tmp_path / "critic")
    import json

    meta = json.loads((out / "trustrl_head.json").read_text())
    assert meta["format"] == "trustrl-scalar-head" and meta["kind"] == "value" and meta["hidden_size"] == 32
    with pytest.raises(Exception, match="trustrl_head.json"):
        load_scalar_model(tiny_model_dir)  # a plain causal LM is not a scalar model


def test_reward_model_reward_inside_grpo(trained_rm, tiny_model_dir, addition_data, tmp_path):
    _, summary, _ = trained_rm
    from trustrl.config import GRPOConfig
    from trustrl.logging import read_metrics
    from trustrl.algorithms.grpo import GRPOTrainer

    cfg = GRPOConfig(model=str(tiny_model_dir), dataset=str(addition_data["rl"]), output_dir=str(tmp_path / "grpo"),
                     max_steps=2, prompts_per_step=2, group_size=4, max_completion_length=5, max_prompt_length=16,
                     learning_rate=1e-3, beta=0.0, progress=False, tensorboard=False, reward_model=summary["model_dir"],
                     reward_model_weight=0.5)
    GRPOTrainer(cfg).train()
    rows = [r for r in read_metrics(cfg.output_dir) if "reward/reward_model/mean" in r]
    assert len(rows) == 2
    for r in rows:
        assert math.isfinite(r["reward/reward_model/mean"])
        # the only reward, weighted 0.5: total = 0.5 * score
        assert r["reward/mean"] == pytest.approx(0.5 * r["reward/reward_model/mean"], rel=1e-5, abs=1e-6)


def test_preference_rows_for_the_arithmetic_task(tmp_path):
    from trustrl.rewards.rules import format_reward, numeric_answer_reward
    from trustrl.tasks.arithmetic import FORMAT_PATTERN, AdditionTask
    from trustrl.tasks.preferences import write_preference_data
    from trustrl.data import load_rows

    paths = write_preference_data(tmp_path, AdditionTask(digits=2), seed=1, n_train=200, n_eval=20)
    rows = load_rows(paths["train"], required=("prompt", "chosen", "rejected")).rows
    fmt, num = format_reward(pattern=FORMAT_PATTERN), numeric_answer_reward()
    prompts = [r["prompt"] for r in rows]
    operands = [tuple(int(x) for x in p[:-1].split("+")) for p in prompts]  # "07+38=" -> (7, 38)
    answers = [str(a + b) for a, b in operands]
    chosen = [r["chosen"] for r in rows]
    rejected = [r["rejected"] for r in rows]
    # chosen: right number, right format; rejected: fails at least one of the two
    assert fmt(prompts, chosen) == [1.0] * len(rows)
    assert num(prompts, chosen, answer=answers) == [1.0] * len(rows)
    both = [f * n for f, n in zip(fmt(prompts, rejected), num(prompts, rejected, answer=answers))]
    assert both == [0.0] * len(rows)
    kinds = {"wrong": sum(f == 1.0 for f in fmt(prompts, rejected)), "broken": sum(f == 0.0 for f in fmt(prompts, rejected))}
    assert kinds["wrong"] > 50 and kinds["broken"] > 50
    task = AdditionTask(digits=2)
    assert all(p == task.prompt(a, b) for p, (a, b) in zip(prompts, operands))  # the task's own prompt format
    held = {r["prompt"] for r in load_rows(paths["eval"]).rows}
    assert all(task.is_held_out(*map(int, p[:-1].split("+"))) for p in held)
    assert not any(task.is_held_out(a, b) for a, b in operands)


# ---------------------------------------------------------------- sums, counts, one normalizer


def test_loss_sums_by_hand_and_against_the_mean():
    from trustrl.losses import bradley_terry_loss, bradley_terry_sum, reward_centering_sum
    from trustrl.trainers.reward_model import reward_model_loss_sum

    r_c, r_r = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0])
    # -log sigmoid(2) = 0.126928, -log sigmoid(-1) = log(1 + e) = 1.313262; sum 1.440190
    bt = bradley_terry_sum(r_c, r_r)
    assert float(bt.total) == pytest.approx(1.440190, abs=1e-6) and float(bt.count) == 2 and bt.unit == "rows"
    # the mean-returning public function is the sum over the count (an independent formula)
    assert float(bradley_terry_loss(r_c, r_r)) == pytest.approx(1.440190 / 2, abs=1e-6)
    # centering numerator: (2 + 0)^2 + (0 + 1)^2 = 5
    assert float(reward_centering_sum(r_c, r_r).total) == 5.0
    part, sums = reward_model_loss_sum(r_c, r_r, None, 0.01)
    # 1.440190 + 0.01 * 5 = 1.490190; accuracy: 1 pair right; margin sum: 2 + (-1) = 1
    assert float(part.total) == pytest.approx(1.490190, abs=1e-6) and float(part.count) == 2
    assert sums["accuracy"] == 1.0 and sums["margin"] == 1.0 and sums["center"] == pytest.approx(0.05)


@pytest.mark.parametrize("center", [None, 0.05])
def test_one_micro_batch_of_n_pairs_equals_n_micro_batches_of_one(tiny_model_dir, tmp_path, first_step_gradients, center):
    """Gradient accumulation is exact: 6 pairs (with margins, texts of unequal lengths) in one
    micro-batch give the gradient of 6 micro-batches of 1 pair and of 4 (2 + 2 + 1 + 1), with
    and without the centering term. float64 model, so only summation order differs."""
    rng = random.Random(5)
    rows = _pairs(rng, 6)
    for i, row in enumerate(rows):
        row["margin"] = 0.25 * i
    write_jsonl(tmp_path / "pairs.jsonl", rows)
    grads = {}
    # and token-budget micro-batches (60 padded tokens: pairs sorted by their longer text)
    splits = {1: {}, 4: dict(gradient_accumulation_steps=4), 6: dict(gradient_accumulation_steps=6),
              "budget": dict(micro_batch_tokens=60)}
    for accum, split in splits.items():
        tok = load_tokenizer(tiny_model_dir)
        model = scalar_model_from_lm(tiny_model_dir, kind="reward", zero_head=False, seed=4).double()
        cfg = RewardConfig(model=str(tiny_model_dir), dataset=str(tmp_path / "pairs.jsonl"),
                           output_dir=str(tmp_path / f"run{accum}"), max_steps=1, batch_size=6,
                           center_rewards_coef=center, max_length=24, **split,
                           progress=False, tensorboard=False, seed=0, device="cpu")
        grads[accum] = first_step_gradients(RewardTrainer(cfg, model=model, tokenizer=tok))
    for accum in (4, 6, "budget"):
        assert grads[accum].keys() == grads[1].keys()
        for name, g in grads[1].items():
            torch.testing.assert_close(grads[accum][name], g, rtol=0, atol=1e-12, msg=lambda m: f"{name}: {m}")
    assert max(float(g.abs().max()) for g in grads[1].values()) > 1e-4  # not a vacuous comparison


def test_epochs_sets_the_number_of_steps_and_refuses_a_conflicting_max_steps(tiny_model_dir, tmp_path):
    from trustrl.config import ConfigError

    write_jsonl(tmp_path / "pairs.jsonl", _pairs(random.Random(1), 10))
    base = dict(model=str(tiny_model_dir), dataset=str(tmp_path / "pairs.jsonl"), batch_size=4, max_length=24,
                progress=False, tensorboard=False)
    # 2.5 epochs of 10 pairs in batches of 4: ceil(25 / 4) = 7 steps
    trainer = RewardTrainer(RewardConfig(**base, output_dir=str(tmp_path / "a"), epochs=2.5))
    assert trainer.max_steps == 7 and trainer.config.max_steps == 7
    assert RewardTrainer(RewardConfig(**base, output_dir=str(tmp_path / "b"), epochs=2.5, max_steps=7)).max_steps == 7
    with pytest.raises(ConfigError, match=r"epochs=2.5 means 7 steps \(10 training pairs, batch_size=4\) but "
                                          r"max_steps=100 is also set"):
        RewardTrainer(RewardConfig(**base, output_dir=str(tmp_path / "c"), epochs=2.5, max_steps=100))


def test_scored_text_has_exactly_one_bos(tmp_path):
    """Reward-model inputs under the BOS policy: a template that writes the BOS is not given a
    second one; plain text gets the tokenizer's."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from trustrl.data import format_prompt
    from trustrl.value_model import encode_scored_text

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials)}  # then a=4 ... z=29, "<"=30, ">"=31, "\n"=32
    for ch in "abcdefghijklmnopqrstuvwxyz<>\n":
        vocab.setdefault(ch, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    core.add_special_tokens(specials)
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>")
    tok.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    # plain: BOS "hi" "ok" EOS = 1, 11 12, 18 14, 2 (h=11 i=12 o=18 k=14)
    assert encode_scored_text(tok, "hi", "ok") == [1, 11, 12, 18, 14, 2]
    templated = format_prompt(tok, "hi")
    assert templated == "<s>hi\n"
    # the template's BOS only (before: [1, 1, ...])
    assert encode_scored_text(tok, templated, "ok") == [1, 11, 12, 32, 18, 14, 2]
    # left truncation keeps the end: the last 3 ids
    assert encode_scored_text(tok, templated, "ok", max_length=3) == [18, 14, 2]
