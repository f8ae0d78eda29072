"""A reward model is scored on the token ids it was trained on, whoever scores it.

The reward-model trainer encodes a (dataset prompt, response) pair as ``format_prompt(prompt)
+ response + EOS`` with the RM's own tokenizer, chat template and ``system_prompt``. Its two
users -- the RL reward (``sample_and_score`` -> ``RewardSuite`` -> ``reward_model_reward``) and
the label app's judge (``judge_items`` -> ``resolve_judge``) -- must feed the model the same ids
for the same pair. Each test trains a tiny RM one step, records the ids the trainer's forward
pass received (a pre-hook on the trunk), then records the ids each scorer's forward received
for the same pairs and compares. Before the fix the judge scored ``prompt_as_text(prompt) +
response`` (no template, no system prompt) and the RL reward scored the *policy's* formatted
prompt text, so both differed from training whenever the RM had a template or a system prompt
the policy did not.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from trustrl.data import write_jsonl
from trustrl.models import ModelLoadError, load_tokenizer
from trustrl.tiny import CHAT_ROLE_TOKENS, CHAT_TEMPLATE, create_tiny_model_dir

CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 +=?.,:\n"
SYSTEM = "be brief"

# (prompt, chosen, rejected); a messages prompt is added for the chat-template model only
STRING_ROWS = [("what is 2+3?", "5", "it is 6"), ("hi", "ok", "no"), ("name a colour", "red", "2+2=4")]
MESSAGES_ROW = ([{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hey"},
                 {"role": "user", "content": "add 1+1"}], "2", "3")


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    """Two tiny Llamas with the same vocabulary (so either can be the policy of the other's RM):
    one whose tokenizer has a chat template, one without."""
    root = tmp_path_factory.mktemp("rm_text")
    kw = dict(chars=CHARS, special_tokens=CHAT_ROLE_TOKENS, seed=0, hidden_size=16, num_layers=1, num_heads=2,
              max_position_embeddings=128)
    return {"chat": create_tiny_model_dir(root / "chat", chat_template=CHAT_TEMPLATE, **kw),
            "plain": create_tiny_model_dir(root / "plain", **kw)}


def _capture(module: torch.nn.Module) -> tuple[list[tuple[int, ...]], object]:
    """Record the real (unpadded) ids of every row the trunk's forward receives."""
    seen: list[tuple[int, ...]] = []

    def hook(_module, args, kwargs):
        ids, mask = kwargs["input_ids"], kwargs["attention_mask"].bool()
        seen.extend(tuple(row[keep].tolist()) for row, keep in zip(ids.cpu(), mask.cpu()))

    return seen, module.register_forward_pre_hook(hook, with_kwargs=True)


def _train_one_step(model_dir: Path, rows: list[tuple], out: Path, system_prompt: str | None
                    ) -> tuple[dict[tuple[int, ...], None], Path]:
    """A 1-step RM run over all ``rows`` in one batch: the ids its forward saw, and its final dir."""
    from trustrl.trainers.reward_model import RewardConfig, RewardTrainer

    out.mkdir(parents=True)
    write_jsonl(out / "pairs.jsonl", [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in rows])
    cfg = RewardConfig(model=str(model_dir), dataset=str(out / "pairs.jsonl"), output_dir=str(out / "run"),
                       max_steps=1, batch_size=len(rows), learning_rate=1e-2, max_length=96, eval_every=0,
                       progress=False, tensorboard=False, seed=0, system_prompt=system_prompt)
    trainer = RewardTrainer(cfg)
    seen, handle = _capture(trainer.model.trunk)
    summary = trainer.train()
    handle.remove()
    assert len(seen) == 2 * len(rows)  # one forward: every chosen and rejected text once
    return seen, Path(summary["model_dir"])


class _FixedEngine:
    """A rollout engine that "samples" the given responses, in row order (encoded with the
    policy's tokenizer, EOS after each), so the RL path scores known pairs."""

    def __init__(self, tokenizer, responses: list[str]):
        self.tokenizer, self.responses = tokenizer, responses

    def generate(self, prompt_rows, settings, row_seeds=None, generator=None):
        from trustrl.rollout import Rollout, left_pad

        assert len(prompt_rows) == len(self.responses)
        prompt_ids, prompt_mask = left_pad(prompt_rows, settings.pad_token_id)
        done = [self.tokenizer(r, add_special_tokens=False)["input_ids"] + [settings.eos_token_id]
                for r in self.responses]
        width = max(len(d) for d in done)
        ids = torch.tensor([d + [settings.pad_token_id] * (width - len(d)) for d in done])
        mask = torch.tensor([[True] * len(d) + [False] * (width - len(d)) for d in done])
        return Rollout(prompt_ids, prompt_mask, ids, mask, torch.zeros(len(done), dtype=torch.bool))


def _rl_scores(policy_dir: Path, rm_dir: Path, pairs: list[tuple[str, str]], out: Path):
    """Score (prompt, response) pairs through the RL loop's reward step: ids the RM saw, scores."""
    from trustrl.config import GRPOConfig
    from trustrl.loop.experience import PromptSet, RewardSuite, sample_and_score

    write_jsonl(out / "rl.jsonl", [{"prompt": p} for p, _ in pairs])
    # the policy formats its prompts its own way: no template, no system prompt
    cfg = GRPOConfig(model=str(policy_dir), dataset=str(out / "rl.jsonl"), output_dir=str(out / "grpo"),
                     reward_model=str(rm_dir), max_prompt_length=96, progress=False, tensorboard=False)
    tok = load_tokenizer(policy_dir)
    suite = RewardSuite(cfg, device="cpu")
    prompts = PromptSet(cfg.dataset, cfg, tok)
    seen, handle = _capture(suite.rewards[0].fn.model.trunk)
    batch = sample_and_score(None, tok, prompts, list(range(len(pairs))), 1, cfg, suite, None, torch.device("cpu"),
                             engine=_FixedEngine(tok, [r for _, r in pairs]))
    handle.remove()
    assert batch.completions == [r for _, r in pairs]  # the engine's responses came back as the texts scored
    return seen, batch.scores.per_function["reward_model"].tolist()


def _judge_scores(rm_dir: Path, rows: list[tuple], out: Path):
    """Rank every row's (chosen, rejected) with ``trustrl label``'s judge: ids the RM saw, scores."""
    from trustrl.label.candidates import FileCandidates
    from trustrl.label.judges import judge_items, resolve_judge
    from trustrl.label.store import JudgementStore

    write_jsonl(out / "candidates.jsonl", [{"id": str(i), "prompt": p, "responses": [c, r]}
                                          for i, (p, c, r) in enumerate(rows)])
    judge = resolve_judge(str(rm_dir))
    store = JudgementStore(out / "judgements.jsonl")
    seen, handle = _capture(judge.fn.model.trunk)
    counts = judge_items(FileCandidates(out / "candidates.jsonl"), store, judge, timeout_s=None)
    handle.remove()
    assert counts["ranked"] == len(rows)
    scores = {int(r["item"]): r["scores"] for r in store.judgements()}
    return seen, [s for i in range(len(rows)) for s in scores[i]]


@pytest.mark.parametrize("kind,system_prompt", [("chat", SYSTEM), ("chat", None), ("plain", SYSTEM), ("plain", None)])
def test_rl_reward_and_judge_score_the_ids_training_saw(model_dirs, tmp_path, kind, system_prompt):
    from trustrl.value_model import load_scalar_model

    rows = STRING_ROWS + ([MESSAGES_ROW] if kind == "chat" else [])  # messages need a template
    trained, rm_dir = _train_one_step(model_dirs[kind], rows, tmp_path / "rm", system_prompt)

    # the trainer saw every (prompt, response) once: chosen texts of the rows, then rejected
    # (in sampler order); compare as sorted lists
    judged, judge_scores = _judge_scores(rm_dir, rows, tmp_path)
    assert sorted(judged) == sorted(trained)

    # RL: the policy is the template-less model, prompts as plain strings (string rows only)
    pairs = [(p, resp) for p, c, r in STRING_ROWS for resp in (c, r)]
    (tmp_path / "rl").mkdir()
    scored, rl_scores = _rl_scores(model_dirs["plain"], rm_dir, pairs, tmp_path / "rl")
    # the 6 pairs are different texts: 6 different id rows, each one the trainer fed
    assert len(set(scored)) == len(pairs) and set(scored) <= set(trained)
    assert scored == judged[:len(pairs)]  # the judge scores rows in order too: the same pairs, the same ids

    # scores: the saved model on the trainer's ids, one text at a time, against both scorers.
    # Same ids and weights; only the batch padding differs (positions restart at each row's
    # first real token), so float rounding alone separates them (1e-6 seen here).
    model = load_scalar_model(rm_dir).eval()
    with torch.no_grad():
        alone = {ids: float(model.score(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.bool))[0])
                 for ids in trained}
    assert judge_scores == pytest.approx([alone[ids] for ids in judged], abs=1e-5)
    assert rl_scores == pytest.approx([alone[ids] for ids in scored], abs=1e-5)
    assert rl_scores == pytest.approx(judge_scores[:len(rl_scores)], abs=1e-5)  # same pairs, same order
    # what the scorers formatted with: the trainer's record
    meta = json.loads((rm_dir / "trustrl_head.json").read_text())
    assert meta["prompt_format"] == {"use_chat_template": kind == "chat", "system_prompt": system_prompt}


def test_chat_pair_ids_by_hand(model_dirs):
    """The template's text, then the response, then EOS; the character tokenizer adds no BOS
    (no post-processor), so none is there."""
    from trustrl.value_model import encode_scored_pair

    tok = load_tokenizer(model_dirs["chat"])
    v = tok.get_vocab()
    fmt = {"use_chat_template": True, "system_prompt": SYSTEM}
    # CHAT_TEMPLATE: <|system|>be brief<|user|>hi<|assistant|> + "ok" + </s>
    expected = [v["<|system|>"], *(v[c] for c in SYSTEM), v["<|user|>"], v["h"], v["i"], v["<|assistant|>"],
                v["o"], v["k"], v["</s>"]]
    assert encode_scored_pair(tok, "hi", "ok", fmt) == expected
    # the row's own system message wins over the default
    assert encode_scored_pair(tok, [{"role": "system", "content": "x"}, {"role": "user", "content": "hi"}], "ok",
                              fmt) == [v["<|system|>"], v["x"], *expected[1 + len(SYSTEM):]]
    # no template: "be brief\n\nhi" + "ok" + </s>; the character tokenizer's pre-tokenizer (regex
    # ".") does not split newlines, so "\n\n" is one piece, unknown to it: one <unk>
    plain = load_tokenizer(model_dirs["plain"])
    pv = plain.get_vocab()
    assert encode_scored_pair(plain, "hi", "ok", {"use_chat_template": False, "system_prompt": SYSTEM}) == [
        *(pv[c] for c in SYSTEM), pv["<unk>"], *(pv[c] for c in "hiok"), pv["</s>"]]


@pytest.fixture(scope="module")
def chat_rm_dir(model_dirs, tmp_path_factory) -> Path:
    _, rm_dir = _train_one_step(model_dirs["chat"], STRING_ROWS, tmp_path_factory.mktemp("chat_rm") / "rm", SYSTEM)
    return rm_dir


def _copy_with_meta(rm_dir: Path, dest: Path, edit) -> Path:
    import shutil

    shutil.copytree(rm_dir, dest)
    meta = json.loads((dest / "trustrl_head.json").read_text())
    edit(meta)
    (dest / "trustrl_head.json").write_text(json.dumps(meta))
    return dest


def test_old_rm_dir_without_record_scores_given_text_with_a_warning(chat_rm_dir, tmp_path):
    """A directory from before ``prompt_format`` was recorded keeps its old behaviour (the
    prompt text as given), and says so."""
    from trustrl.rewards.reward_model import reward_model_reward
    from trustrl.value_model import load_scalar_model, score_texts

    old = _copy_with_meta(chat_rm_dir, tmp_path / "old", lambda m: m.pop("prompt_format"))
    with pytest.warns(UserWarning, match=r"trustrl_head.json has no 'prompt_format'.*retrain it, or add"):
        fn = reward_model_reward(old)
    texts = ["<|user|>hi<|assistant|>", "plain"]
    got = fn(texts, ["ok", "no"], raw_prompts=["hi", "plain"])  # raw prompts cannot be used: no record
    expected = score_texts(load_scalar_model(old), load_tokenizer(old), texts, ["ok", "no"], max_length=96)
    assert got == expected.tolist()


def test_malformed_record_is_refused(chat_rm_dir, tmp_path):
    from trustrl.rewards.reward_model import reward_model_reward

    bad = _copy_with_meta(chat_rm_dir, tmp_path / "bad",
                          lambda m: m.update(prompt_format={"use_chat_template": "yes", "system_prompt": None}))
    with pytest.raises(ModelLoadError, match=r"bad/trustrl_head.json: 'prompt_format' must be"):
        reward_model_reward(bad)


def test_raw_prompts_column_clashes(model_dirs, tmp_path):
    """``raw_prompts`` is an argument trustrl passes: a dataset column of that name is refused."""
    from trustrl.config import GRPOConfig
    from trustrl.loop.experience import PromptSet, RewardSuite
    from trustrl.rewards.registry import RewardSpecError

    write_jsonl(tmp_path / "rl.jsonl", [{"prompt": "hi", "raw_prompts": "x"}])
    cfg = GRPOConfig(model=str(model_dirs["plain"]), dataset=str(tmp_path / "rl.jsonl"),
                     output_dir=str(tmp_path / "g"), rewards=[{"name": "format"}])
    suite = RewardSuite(cfg)
    with pytest.raises(RewardSpecError, match=r"column 'raw_prompts' has the name of an argument"):
        suite.check_columns(PromptSet(cfg.dataset, cfg, load_tokenizer(model_dirs["plain"])))
