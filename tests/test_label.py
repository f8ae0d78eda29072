"""`trustrl label` below the browser: the judgement log (appended and fsynced per action,
replayed on restart), the JSON API (ranking, skip, undo, resume, bad input), the token and
host checks, the sampled candidates (deterministic, cached), `label stats`, and the judges
(reward function, generative judge) including the generative judge as a reward in GRPO.
The page in a real browser: tests/test_label_browser.py."""

from __future__ import annotations

import json
import math
import os

import pytest
from starlette import testclient as starlette_testclient  # the `label` and `test` extras (make setup)

from trustrl.data import write_jsonl
from trustrl.label.app import create_app
from trustrl.label.candidates import FileCandidates, SampledCandidates
from trustrl.label.cli import main as label_main
from trustrl.label.cli import needs_token
from trustrl.label.judges import judge_items, ranks_from_scores, resolve_judge
from trustrl.label.page import JS
from trustrl.label.store import JudgementStore


ITEMS = [
    {"id": "q1", "prompt": "1+1=", "responses": ["2", "3", "<b>11</b>"]},
    {"id": "q2", "prompt": "2+2=", "responses": ["4", "5"]},
    {"id": "q3", "prompt": "3+3=", "responses": ["6", "9", "33", "66"]},
]


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _client(store, candidates, **kw):
    return starlette_testclient.TestClient(create_app(store, candidates, **kw), base_url="http://127.0.0.1")


@pytest.fixture
def candidates_file(tmp_path):
    return write_jsonl(tmp_path / "candidates.jsonl", ITEMS)


def test_store_fsyncs_every_action_and_replays_on_restart(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    log = tmp_path / "log.jsonl"
    store = JudgementStore(log, per_item=2)
    ids = ["a", "b", "c"]
    assert store.next_item("ann", ids) == 0
    store.rank("a", "ann", "p", ["x", "y"], [2, 1], note="y is right")
    store.skip("b", "ann")
    assert len(synced) == 2 and len(_rows(log)) == 2  # on disk before the call returned
    assert store.next_item("ann", ids) == 2
    assert store.next_item("bob", ids) == 0  # per_item=2: bob ranks item a too
    undone = store.undo("ann")
    assert undone["action"] == "skip" and len(synced) == 3
    assert store.next_item("ann", ids) == 1
    store.rank("b", "bob", "p", ["x", "y"], [1, 1])
    # a restart replays the log into the same state
    again = JudgementStore(log, per_item=2)
    assert again.next_item("ann", ids) == 1 and again.next_item("bob", ids) == 0
    assert again.progress("ann", ids) == {"ranked": 1, "skipped": 0, "rankings": 2, "items": 3, "needed": 6,
                                          "complete": 0}
    assert [r["action"] for r in _rows(log)] == ["rank", "skip", "undo", "rank"]
    with pytest.raises(ValueError, match=r"ranking of item 'c': 'ranks' must be a list of 2 integers"):
        again.rank("c", "ann", "p", ["x", "y"], [1, 2, 3])
    log.write_text(log.read_text() + "{not json\n")
    with pytest.raises(ValueError, match=r"log.jsonl line 5: not JSON"):
        JudgementStore(log)


def test_api_rank_skip_undo_and_resume(tmp_path, candidates_file):
    log = tmp_path / "log.jsonl"
    client = _client(JudgementStore(log), FileCandidates(candidates_file))
    first = client.get("/api/item", params={"annotator": "ann"}).json()
    assert first["item"] == {"id": "q1", "prompt": "1+1=", "responses": ["2", "3", "<b>11</b>"]}
    assert first["progress"]["items"] == 3 and first["progress"]["ranked"] == 0
    r = client.post("/api/rank", json={"annotator": "ann", "item": "q1", "ranks": [1, 2, 3], "note": "easy"})
    assert r.status_code == 200
    # bad input is refused with a message, and writes nothing
    bad = client.post("/api/rank", json={"annotator": "ann", "item": "q2", "ranks": [1, 2, 3]})
    assert bad.status_code == 400 and "'ranks' must be a list of 2 integers" in bad.json()["error"]
    assert client.post("/api/rank", json={"annotator": "", "item": "q2", "ranks": [1, 2]}).status_code == 400
    assert client.post("/api/rank", json={"annotator": "ann", "item": "nope", "ranks": [1, 2]}).status_code == 404
    assert client.post("/api/rank", content=b"{", headers={"content-type": "application/json"}).status_code == 400
    assert client.post("/api/skip", json={"annotator": "ann", "item": "q2"}).status_code == 200
    assert client.get("/api/item", params={"annotator": "ann"}).json()["item"]["id"] == "q3"
    undone = client.post("/api/undo", json={"annotator": "ann"}).json()["undone"]
    assert undone["item"] == "q2" and undone["action"] == "skip"
    assert client.get("/api/item", params={"annotator": "ann"}).json()["item"]["id"] == "q2"
    client.post("/api/rank", json={"annotator": "ann", "item": "q2", "ranks": [1, 2]})
    rows = _rows(log)
    assert [r["action"] for r in rows] == ["rank", "skip", "undo", "rank"]
    assert rows[0]["responses"] == ["2", "3", "<b>11</b>"] and rows[0]["ranks"] == [1, 2, 3]
    assert rows[0]["note"] == "easy" and rows[0]["annotator"] == "ann" and rows[2]["undoes"] == rows[1]["id"]
    # restart: a new store and app on the same log continue at q3; another annotator at q1? no:
    # per_item=1 and q1, q2 are ranked, so bob starts at q3 as well
    client = _client(JudgementStore(log), FileCandidates(candidates_file))
    assert client.get("/api/item", params={"annotator": "ann"}).json()["item"]["id"] == "q3"
    assert client.get("/api/item", params={"annotator": "bob"}).json()["item"]["id"] == "q3"
    client.post("/api/rank", json={"annotator": "bob", "item": "q3", "ranks": [1, 2, 2, 3]})
    assert client.get("/api/item", params={"annotator": "ann"}).json()["done"] is True


def test_token_off_loopback_and_host_check_on_loopback(tmp_path, candidates_file):
    assert not needs_token("127.0.0.1") and not needs_token("localhost") and not needs_token("::1")
    assert needs_token("0.0.0.0") and needs_token("192.168.1.5") and needs_token("example.org")
    store, cands = JudgementStore(tmp_path / "log.jsonl"), FileCandidates(candidates_file)
    client = starlette_testclient.TestClient(create_app(store, cands, token="s3cret", loopback=False),
                                             base_url="http://10.0.0.2")
    assert client.get("/api/item", params={"annotator": "ann"}).status_code == 401
    assert client.get("/").status_code == 401
    assert client.post("/api/rank", json={"annotator": "ann", "item": "q1", "ranks": [1, 2, 3]}).status_code == 401
    assert not (tmp_path / "log.jsonl").exists()
    ok = client.get("/api/item", params={"annotator": "ann"}, headers={"X-Trustrl-Token": "s3cret"})
    assert ok.status_code == 200 and ok.json()["item"]["id"] == "q1"
    assert client.get("/", params={"token": "s3cret"}).status_code == 200
    assert client.get("/app.js").status_code == 200  # the script holds no data
    # on loopback only the loopback Host names are served (no DNS rebinding)
    local = _client(store, cands)
    assert local.get("/api/health").json()["ok"] is True
    assert local.get("/api/health", headers={"host": "evil.example:8765"}).status_code == 400


def test_cli_requires_a_token_off_loopback(tmp_path, candidates_file, monkeypatch, capsys):
    """`trustrl label --host 0.0.0.0` without --token makes one and puts it in the printed URL;
    on 127.0.0.1 (the default) there is none and the Host check is on."""
    import uvicorn

    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, log_level: served.update(app=app, host=host))
    args = ["--candidates", str(candidates_file), "--out", str(tmp_path / "j.jsonl")]
    assert label_main(args + ["--host", "0.0.0.0"]) == 0
    url = next(line for line in capsys.readouterr().out.splitlines() if "open http" in line).split("open ")[1]
    token = url.split("?token=")[1]
    assert served["host"] == "0.0.0.0" and len(token) >= 24
    client = starlette_testclient.TestClient(served["app"], base_url="http://10.1.2.3")
    assert client.get("/api/health").status_code == 401
    assert client.get("/api/health", headers={"X-Trustrl-Token": token}).status_code == 200
    assert label_main(args) == 0
    assert served["host"] == "127.0.0.1" and "?token=" not in capsys.readouterr().out
    local = starlette_testclient.TestClient(served["app"], base_url="http://127.0.0.1")
    assert local.get("/api/health").status_code == 200
    assert local.get("/api/health", headers={"host": "10.1.2.3"}).status_code == 400


@pytest.mark.parametrize("which", ["missing", "not_a_model"])
def test_cli_names_a_wrong_model_directory_before_serving(tmp_path, monkeypatch, capsys, which):
    """`trustrl label --model DIR` loaded the model in the sampler thread only: with a wrong DIR
    the page was served all the same (and sampling failed behind it). Now it stops first."""
    import uvicorn

    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, log_level: served.update(app=app))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "1+1="}\n')
    model = tmp_path / "nomodel"
    if which == "not_a_model":
        model.mkdir()
        (model / "tokenizer.json").write_text("{}")
    rc = label_main(["--model", str(model), "--prompts", str(prompts), "--out", str(tmp_path / "j.jsonl")])
    assert rc == 2 and not served
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(model) in err[0], err


def test_untrusted_text_never_becomes_markup(tmp_path, candidates_file):
    """The script builds the page from text nodes only, and the CSP forbids inline script
    (the browser test checks the effect in Chromium)."""
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in JS
    client = _client(JudgementStore(tmp_path / "log.jsonl"), FileCandidates(candidates_file))
    for path in ("/", "/app.js", "/api/health"):
        csp = client.get(path).headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "default-src 'none'" in csp


def test_sampled_candidates_are_deterministic_and_cached(tiny_model_dir, tmp_path):
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"{i}+{i}="} for i in range(3)])
    first = SampledCandidates(tiny_model_dir, tmp_path / "prompts.jsonl", 3, tmp_path / "a.jsonl", max_new_tokens=6,
                              ahead=0)
    items = [first.wait(i) for i in range(3)]
    first.close()
    assert all(len(it.responses) == 3 for it in items)
    assert len(set(tuple(it.responses) for it in items)) == 3  # different prompts, different samples
    # a fresh sampler (new cache) draws exactly the same responses: seeds, not timing
    fresh = SampledCandidates(tiny_model_dir, tmp_path / "prompts.jsonl", 3, tmp_path / "b.jsonl", max_new_tokens=6,
                              ahead=0)
    assert [fresh.wait(i).responses for i in range(3)] == [it.responses for it in items]
    fresh.close()
    # the cache is reused on restart (same rows), and refused for other settings
    assert len(_rows(tmp_path / "a.jsonl")) == 3
    again = SampledCandidates(tiny_model_dir, tmp_path / "prompts.jsonl", 3, tmp_path / "a.jsonl", max_new_tokens=6)
    assert again.get(2).responses == items[2].responses
    again.close()
    with pytest.raises(ValueError, match=r"a.jsonl line 1: sampled for other prompts or settings \(k=4, seed=0\)"):
        SampledCandidates(tiny_model_dir, tmp_path / "prompts.jsonl", 4, tmp_path / "a.jsonl")


def test_label_stats_command(tmp_path, capsys):
    log = [
        {"id": "1", "item": "0", "annotator": "ann", "action": "rank", "responses": ["x", "y", "z"], "ranks": [1, 2, 3]},
        {"id": "2", "item": "0", "annotator": "bob", "action": "rank", "responses": ["x", "y", "z"], "ranks": [1, 3, 2]},
        {"id": "3", "item": "1", "annotator": "bob", "action": "rank", "responses": ["p", "q"], "ranks": [2, 1]},
        {"id": "4", "item": "1", "annotator": "ann", "action": "rank", "responses": ["p", "q"], "ranks": [1, 2]},
        {"id": "5", "action": "undo", "undoes": "4", "annotator": "ann"},
        {"id": "6", "item": "1", "annotator": "ann", "action": "rank", "responses": ["p", "q"], "ranks": [2, 1]},
    ]
    write_jsonl(tmp_path / "log.jsonl", log)
    assert label_main(["stats", str(tmp_path / "log.jsonl"), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    # item 0: 2 of 3 pairs agree, tau 1/3; item 1 (after the undo): 1 of 1, tau 1 ->
    # agreement 3/4, mean tau 2/3; the undone ranking is not counted
    assert stats["rankings"] == 4 and stats["items_ranked_twice"] == 2
    assert stats["pairwise_agreement"] == 0.75 and stats["kendall_tau_mean"] == pytest.approx(2 / 3)
    assert label_main(["stats", str(tmp_path / "log.jsonl")]) == 0
    assert "pairwise agreement: 0.750 over 4 response pairs" in capsys.readouterr().out
    assert label_main(["stats", str(tmp_path / "missing.jsonl")]) == 2


# ---------------------------------------------------------------------------------- judges

JUDGE_MODULE = '''
def count_a(prompts, completions, **columns):
    return [float(c.count("a")) for c in completions]

def picky(prompts, completions, **columns):
    if any("boom" in c for c in completions):
        raise RuntimeError("cannot judge this")
    return [float(len(c)) for c in completions]
'''


def test_ranks_from_scores_by_hand():
    assert ranks_from_scores([0.5, 2.0, 0.5]) == [2, 1, 2]
    assert ranks_from_scores([3.0, 1.0, 2.0, 0.0]) == [1, 3, 2, 4]


def test_judge_with_a_reward_function(tmp_path, monkeypatch):
    from trustrl.rewards.registry import RewardError

    (tmp_path / "my_judges.py").write_text(JUDGE_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    write_jsonl(tmp_path / "c.jsonl", [{"prompt": "p", "responses": ["a", "aaa", "b"]},
                                       {"prompt": "q", "responses": ["boom", "bb"]},
                                       {"prompt": "r", "responses": ["xa", "ya", "zz"]}])
    out = tmp_path / "j.jsonl"
    assert label_main(["--candidates", str(tmp_path / "c.jsonl"), "--out", str(out), "--judge",
                       "my_judges:count_a"]) == 0
    rows = _rows(out)
    # counts of 'a': [1, 3, 0] -> ranks [2, 1, 3]; [0, 0] -> a tie; [1, 1, 0] -> [1, 1, 3]
    assert [r["ranks"] for r in rows] == [[2, 1, 3], [1, 1], [1, 1, 3]]
    assert {r["annotator"] for r in rows} == {"judge:count_a"} and rows[0]["scores"] == [1.0, 3.0, 0.0]
    assert label_main(["--candidates", str(tmp_path / "c.jsonl"), "--out", str(out), "--judge",
                       "my_judges:count_a"]) == 0
    assert len(_rows(out)) == 3  # resumed: nothing judged twice
    # faults: the fault policy of rewards (raise names the item and the sample; default skips)
    store, cands = JudgementStore(tmp_path / "k.jsonl"), FileCandidates(tmp_path / "c.jsonl")
    with pytest.raises(RewardError, match=r"item '1': reward function 'picky' raised RuntimeError: cannot judge "
                                          r"this at sample 0"):
        judge_items(cands, store, resolve_judge("my_judges:picky"))
    counts = judge_items(cands, store, resolve_judge("my_judges:picky"), on_error="default")
    assert counts == {"ranked": 1, "skipped": 1, "already": 1}
    assert [r["action"] for r in _rows(tmp_path / "k.jsonl")] == ["rank", "skip", "rank"]


@pytest.fixture(scope="module")
def digit_judge_dir(tmp_path_factory):
    """A tiny judge that always answers in digits, which digit depending on its input: the
    output layer (untied) is zero but for digit k in 1..9, row = c * e_k, and digit 0, row =
    -c * (e_1 + ... + e_9); some digit's logit is > 0 unless h_1..9 are all 0, and every
    other token's logit is 0, so greedy decoding writes digits only."""
    import torch
    from transformers import AutoModelForCausalLM

    from trustrl.models import load_tokenizer
    from trustrl.tasks.arithmetic import CHARS, SPECIAL_TOKENS
    from trustrl.tiny import create_tiny_model_dir

    path = create_tiny_model_dir(tmp_path_factory.mktemp("judge"), chars=CHARS + "abc\n", special_tokens=SPECIAL_TOKENS,
                                 seed=1, hidden_size=32, num_layers=1, num_heads=2, max_position_embeddings=96,
                                 tie_word_embeddings=False)
    tok = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(str(path))
    with torch.no_grad():
        w = model.lm_head.weight
        w.zero_()
        for k in range(1, 10):
            w[tok.convert_tokens_to_ids(str(k)), k] = 50.0
        w[tok.convert_tokens_to_ids("0"), 1:10] = -50.0
    model.save_pretrained(str(path))
    return path


def _greedy_outputs(model_dir, texts, max_new_tokens):
    """The judge's outputs by an independent path: transformers' own generate, one text at a
    time (no padding), greedy."""
    import torch
    from transformers import AutoModelForCausalLM

    from trustrl.data import encode_prompt
    from trustrl.models import load_tokenizer

    tok = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    outs = []
    for t in texts:
        ids = torch.tensor([encode_prompt(tok, t)[1]])
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        outs.append(tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
    return outs


def test_generative_judge_scores_parsed_from_its_greedy_output(digit_judge_dir, tiny_model_dir):
    from trustrl.rewards.judge import generative_judge_reward, parse_score

    assert parse_score("score: 7/10") == 7.0 and parse_score("-2.5 ok") == -2.5 and parse_score("none") is None
    assert parse_score("a=3 b=4", r"b=(\d)") == 4.0
    template = "{prompt}{response}="
    judge = generative_judge_reward(digit_judge_dir, template=template, score_pattern=r"\d+", max_new_tokens=3,
                                    batch_size=2)
    prompts, completions = ["1+1", "2+3", "4+4", "9+9", "0+7", "3+3"], ["2", "5", "8", "18", "7", "66"]
    expected = _greedy_outputs(digit_judge_dir, [template.format(prompt=p, response=c)
                                                 for p, c in zip(prompts, completions)], 3)
    scores = judge(prompts, completions)
    assert judge.last_outputs == expected  # batched (2 at a time, left-padded) == one by one
    assert scores == [float(o) for o in expected]  # outputs are digits only: the number is all of it
    assert len(set(scores)) > 1, expected  # the score depends on the text judged
    # an output without a score names the sample and quotes it: the random tiny model
    # writes "======" (no digit)
    plain = generative_judge_reward(tiny_model_dir, template=template, score_pattern=r"\d", max_new_tokens=6)
    with pytest.raises(ValueError, match=r"no score matching '\\\\d' in the judge's output for sample 0: '======'"):
        plain(prompts[:2], completions[:2])


def test_generative_judge_through_the_reward_registry_and_label(tiny_model_dir, tmp_path):
    from trustrl.rewards.registry import RewardError, resolve_reward, score_completions

    never = resolve_reward({"name": "judge", "kwargs": {"path": str(tiny_model_dir), "template": "{response}",
                                                       "score_pattern": "NEVER", "max_new_tokens": 2}})
    with pytest.raises(RewardError, match=r"'judge' raised ValueError: judge: no score matching 'NEVER'.*sample 0"):
        score_completions([never], ["p", "q"], ["1", "2"], timeout_s=60.0)
    result = score_completions([never], ["p", "q"], ["1", "2"], timeout_s=60.0, on_error="default", default_score=-1.0)
    assert result.total.tolist() == [-1.0, -1.0] and result.n_faults == {"judge": 2}
    with pytest.raises(ValueError, match=r"needs kwargs.path"):
        resolve_reward({"name": "judge"})
    # `trustrl label --judge LM_DIR --judge-template FILE`: rows by judge:<dir name>
    (tmp_path / "tpl.txt").write_text("{prompt}{response}=")
    write_jsonl(tmp_path / "c.jsonl", [{"prompt": "1+1", "responses": ["2", "3", "11"]}])
    out = tmp_path / "j.jsonl"
    assert label_main(["--candidates", str(tmp_path / "c.jsonl"), "--out", str(out), "--judge", str(tiny_model_dir),
                       "--judge-template", str(tmp_path / "tpl.txt"), "--judge-score-pattern", r"\d|$",
                       "--judge-on-error", "default"]) == 0
    (row,) = _rows(out)
    assert row["annotator"] == f"judge:{tiny_model_dir.name}" and row["action"] in ("rank", "skip")


def test_generative_judge_as_a_grpo_reward(tiny_model_dir, digit_judge_dir, addition_data, tmp_path):
    from trustrl.algorithms.grpo import GRPOTrainer
    from trustrl.config import GRPOConfig
    from trustrl.logging import read_metrics

    cfg = GRPOConfig(model=str(tiny_model_dir), dataset=str(addition_data["rl"]), output_dir=str(tmp_path / "grpo"),
                     max_steps=2, prompts_per_step=2, group_size=3, max_completion_length=4, max_prompt_length=16,
                     learning_rate=1e-3, beta=0.0, progress=False, tensorboard=False, reward_on_error="default",
                     rewards=[{"name": "judge", "kwargs": {"path": str(digit_judge_dir), "template": "{prompt}{response}=",
                                                           "score_pattern": r"\d+", "max_new_tokens": 3}}])
    GRPOTrainer(cfg).train()
    rows = [r for r in read_metrics(cfg.output_dir) if "reward/judge/mean" in r]
    assert len(rows) == 2
    for r in rows:
        assert 0 <= r["reward/judge/mean"] <= 999 and r["reward/judge/std"] > 0  # numbers, not one constant
        assert r["reward/judge/faults"] == 0
