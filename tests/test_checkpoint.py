"""Tests for trustrl.checkpoint and trustrl.utils (seeding, RNG state, devices).

The central property: a run interrupted at step N, checkpointed, and resumed into freshly
constructed objects ends bitwise identical (torch.equal) to an uninterrupted run, including
dropout (global torch RNG), a data torch.Generator, and NumPy / Python RNG draws.
"""

from __future__ import annotations

import json
import os
import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from trustrl.checkpoint import (
    CheckpointError,
    find_latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from trustrl.utils import get_device, rng_state, seed_everything, set_rng_state

VOCAB = 64


def tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,  # exercises shared tensors
        attention_dropout=0.1,  # exercises the global torch RNG
    )
    cfg._attn_implementation = "eager"
    return LlamaForCausalLM(cfg)


class ValueHead(nn.Module):
    """Plain module (no save_pretrained) with dropout, a buffer and a tied weight."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 8)
        self.proj = nn.Linear(8, VOCAB, bias=False)
        self.proj.weight = self.emb.weight  # shared tensor
        self.out = nn.Linear(VOCAB, 1)
        self.drop = nn.Dropout(0.2)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.out(self.drop(self.proj(self.emb(ids)))).squeeze(-1)


def build(seed: int) -> dict[str, Any]:
    seed_everything(seed)
    models = {"policy": tiny_llama(), "value": ValueHead()}
    params = [p for m in models.values() for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    data_gen = torch.Generator().manual_seed(seed + 1)
    for m in models.values():
        m.train()
    return {"models": models, "opt": opt, "sched": sched, "gen": data_gen, "state": {"data_pos": 0, "kl_coef": 0.1}}


def train_steps(s: dict[str, Any], n: int) -> None:
    policy, value = s["models"]["policy"], s["models"]["value"]
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (2, 6), generator=s["gen"])  # data generator
        noise = float(np.random.rand())  # numpy global RNG
        coin = random.random()  # python RNG
        out = policy(input_ids=ids, labels=ids)  # dropout: torch global RNG
        loss = out.loss + (1 + noise) * value(ids).pow(2).mean() * (1 if coin < 0.5 else 2)
        s["opt"].zero_grad(set_to_none=True)
        loss.backward()
        s["opt"].step()
        s["sched"].step()
        s["state"]["data_pos"] += ids.shape[0]
        s["state"]["kl_coef"] *= 1.0 + 0.1 * noise  # an inexact float that must round-trip


def assert_same_training_state(a: dict[str, Any], b: dict[str, Any]) -> None:
    for name in a["models"]:
        sa, sb = a["models"][name].state_dict(), b["models"][name].state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"{name}.{k} differs"
    oa, ob = a["opt"].state_dict(), b["opt"].state_dict()
    assert oa["param_groups"] == ob["param_groups"]
    for pid in oa["state"]:
        for k, v in oa["state"][pid].items():
            assert torch.equal(v, ob["state"][pid][k]), f"optimizer state {pid}.{k} differs"
    assert a["sched"].state_dict() == b["sched"].state_dict()
    assert a["state"] == b["state"]
    assert torch.equal(a["gen"].get_state(), b["gen"].get_state())


def test_resume_is_bitwise_exact(tmp_path: Path) -> None:
    n = 3
    ref = build(seed=0)
    train_steps(ref, 2 * n)

    run = build(seed=0)
    train_steps(run, n)
    ckpt = save_checkpoint(
        tmp_path,
        n,
        models=run["models"],
        optimizers={"main": run["opt"]},
        schedulers={"main": run["sched"]},
        trainer_state=run["state"],
        rng=rng_state(generators={"data": run["gen"]}),
    )
    assert ckpt == tmp_path / "checkpoints" / "step_000003"
    del run

    fresh = build(seed=1234)  # different init, different RNG streams
    train_steps(fresh, 1)  # and some stale optimizer state, to be overwritten
    restored = load_checkpoint(
        find_latest_checkpoint(tmp_path),
        models=fresh["models"],
        optimizers={"main": fresh["opt"]},
        schedulers={"main": fresh["sched"]},
    )
    assert restored["step"] == n
    fresh["state"] = {k: restored[k] for k in ("data_pos", "kl_coef")}
    set_rng_state(restored["rng"], generators={"data": fresh["gen"]})
    train_steps(fresh, n)
    assert_same_training_state(ref, fresh)
    # a weight in the tied pair is still tied after load_model
    assert fresh["models"]["value"].proj.weight is fresh["models"]["value"].emb.weight


def test_checkpoint_layout_and_from_pretrained(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    class FakeTokenizer:
        def save_pretrained(self, d: str) -> None:
            Path(d).mkdir(parents=True, exist_ok=True)
            (Path(d) / "tokenizer.json").write_text("{}")

    seed_everything(3)
    policy = tiny_llama().eval()
    ckpt = save_checkpoint(
        tmp_path, 7, models={"policy": policy, "value": ValueHead()}, tokenizer=FakeTokenizer()
    )
    names = {p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file()}
    assert {
        "COMPLETE",
        "trainer_state.json",
        "optimizers.pt",
        "schedulers.pt",
        "rng.pt",
        "tokenizer/tokenizer.json",
        "models/policy/config.json",
        "models/policy/model.safetensors",
        "models/policy/state.safetensors",
        "models/value/model.safetensors",
    } <= names
    manifest = json.loads((ckpt / "COMPLETE").read_text())
    assert set(manifest["files"]) == names - {"COMPLETE"}
    assert json.loads((ckpt / "trainer_state.json").read_text()) == {"step": 7}

    loaded = AutoModelForCausalLM.from_pretrained(
        ckpt / "models" / "policy", attn_implementation="eager"
    ).eval()
    sa, sb = policy.state_dict(), loaded.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    ids = torch.tensor([[1, 5, 9, 33]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, policy(ids).logits)


def test_keep_last_k(tmp_path: Path) -> None:
    m = nn.Linear(2, 2)
    for step in range(1, 6):
        save_checkpoint(tmp_path, step, models={"m": m}, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 5]
    # keep_last counts the new one even when an older-numbered step is saved last
    save_checkpoint(tmp_path, 3, models={"m": m}, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 5]
    save_checkpoint(tmp_path, 6, models={"m": m}, keep_last=None)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 5, 6]
    with pytest.raises(ValueError, match="keep_last"):
        save_checkpoint(tmp_path, 7, models={"m": m}, keep_last=0)


def test_resave_same_step_replaces(tmp_path: Path) -> None:
    m = nn.Linear(2, 2)
    save_checkpoint(tmp_path, 1, models={"m": m}, trainer_state={"v": 1})
    save_checkpoint(tmp_path, 1, models={"m": m}, trainer_state={"v": 2})
    assert load_checkpoint(find_latest_checkpoint(tmp_path), models={"m": m})["v"] == 2
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_000001"]


def _warn_messages(fn: Any) -> tuple[Any, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    return result, [str(w.message) for w in caught]


def test_corrupt_and_partial_checkpoints_are_skipped(tmp_path: Path) -> None:
    m = nn.Linear(4, 4)
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, models={"m": m}, keep_last=None)
    root = tmp_path / "checkpoints"
    # step 4: truncated weights file (size mismatch)
    f = root / "step_000004" / "models" / "m" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    # step 3: same size, one flipped byte (checksum mismatch)
    f3 = root / "step_000003" / "optimizers.pt"
    data = bytearray(f3.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f3.write_bytes(bytes(data))
    # an interrupted save of step 5 by a dead process (pid beyond any pid_max)
    dead = root / "step_000005.tmp-999999999"
    (dead / "models").mkdir(parents=True)
    (dead / "optimizers.pt").write_bytes(b"partial")
    # a step folder without the COMPLETE marker
    (root / "step_000006").mkdir()

    latest, msgs = _warn_messages(lambda: find_latest_checkpoint(tmp_path))
    assert latest == root / "step_000002"
    joined = "\n".join(msgs)
    assert "step_000005.tmp-999999999" in joined
    assert "step_000006" in joined and "COMPLETE" in joined
    assert "step_000004" in joined and "bytes" in joined
    assert "step_000003" in joined and "sha256" in joined

    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(root / "step_000003", models={"m": m})
    # size-only check does not read contents
    assert verify_checkpoint(root / "step_000003", checksums=False)["step"] == 3

    # the next save removes the dead partial (and only it)
    save_checkpoint(tmp_path, 7, models={"m": m}, keep_last=None)
    assert not dead.exists()
    assert find_latest_checkpoint(tmp_path) == root / "step_000007"
    assert find_latest_checkpoint(tmp_path / "no_run") is None


def test_failed_save_leaves_no_checkpoint(tmp_path: Path) -> None:
    class Boom:
        def state_dict(self) -> dict[str, Any]:
            raise RuntimeError("disk on fire")

    m = nn.Linear(2, 2)
    save_checkpoint(tmp_path, 1, models={"m": m})
    with pytest.raises(RuntimeError, match="disk on fire"):
        save_checkpoint(tmp_path, 2, models={"m": m}, schedulers={"s": Boom()})
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_000001"]
    assert find_latest_checkpoint(tmp_path).name == "step_000001"


def test_load_errors(tmp_path: Path) -> None:
    ckpt = save_checkpoint(tmp_path, 1, models={"m": nn.Linear(2, 2)})
    with pytest.raises(CheckpointError, match=r"models\['m'\]"):
        load_checkpoint(ckpt, models={"m": nn.Linear(2, 3)})  # strict shape mismatch
    with pytest.raises(CheckpointError, match="no model named"):
        load_checkpoint(ckpt, models={"other": nn.Linear(2, 2)})
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(tmp_path, 2, models={"m": nn.Linear(2, 2)}, trainer_state={"rng": 1})
    with pytest.raises(ValueError, match="model name"):
        save_checkpoint(tmp_path, 2, models={"../x": nn.Linear(2, 2)})
    with pytest.raises(TypeError, match="trainer_state|JSON|\\$"):
        save_checkpoint(tmp_path, 2, models={"m": nn.Linear(2, 2)}, trainer_state={"o": object()})
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1]


@pytest.mark.filterwarnings("ignore::FutureWarning")  # peft/transformers deprecation noise
def test_peft_adapter_model_round_trip(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    seed_everything(0)
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    model = peft.get_peft_model(tiny_llama(), cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()  # make adapters non-trivial
    ckpt = save_checkpoint(tmp_path, 1, models={"policy": model})
    assert (ckpt / "models" / "policy" / "adapter_model.safetensors").is_file()

    seed_everything(1)
    other = peft.get_peft_model(tiny_llama(), cfg)
    load_checkpoint(ckpt, models={"policy": other})
    sa, sb = model.state_dict(), other.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------------------- utils


def _draws(gens: dict[str, Any]) -> list[Any]:
    return [
        random.random(),
        float(np.random.rand()),
        float(np.random.randn()),  # uses numpy's cached gaussian state
        torch.rand(3).tolist(),
        torch.rand(2, generator=gens["t"]).tolist(),
        float(gens["np"].random()),
        gens["py"].random(),
    ]


def test_rng_state_round_trip_through_torch_save(tmp_path: Path) -> None:
    seed_everything(5)
    gens = {"t": torch.Generator().manual_seed(9), "np": np.random.default_rng(9), "py": random.Random(9)}
    np.random.randn()  # leave a cached gaussian in numpy's legacy state
    state = rng_state(generators=gens)
    torch.save(state, tmp_path / "rng.pt")
    first = _draws(gens)

    seed_everything(77)
    for g in gens.values():
        _ = g.random() if not isinstance(g, torch.Generator) else torch.rand(1, generator=g)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True), generators=gens)
    assert _draws(gens) == first

    with pytest.raises(KeyError, match="nope"):
        set_rng_state(state, generators={"nope": torch.Generator()})
    with pytest.raises(TypeError, match="kind"):
        set_rng_state(state, generators={"t": random.Random()})


def test_seed_everything_and_device() -> None:
    seed_everything(11)
    a = (random.random(), float(np.random.rand()), torch.rand(2).tolist())
    seed_everything(11)
    assert (random.random(), float(np.random.rand()), torch.rand(2).tolist()) == a
    with pytest.raises(ValueError):
        seed_everything(-1)

    assert get_device("cpu") == torch.device("cpu")
    auto = get_device()
    assert auto.type in {"cpu", "cuda", "mps"}
    if not torch.cuda.is_available():
        assert auto.type in {"cpu", "mps"}
        with pytest.raises(ValueError, match="CUDA"):
            get_device("cuda")
    with pytest.raises(ValueError, match="parse"):
        get_device("warp-drive")


def test_seed_everything_deterministic_flag() -> None:
    before = torch.are_deterministic_algorithms_enabled()
    env_before = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    try:
        seed_everything(0, deterministic=True)
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(before)
        if env_before is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
