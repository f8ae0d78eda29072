"""FSDP2 (``parallelism.strategy=fsdp``, trustrl.parallel) and sharded checkpoints (DCP), for
real: 2 processes on CPU with gloo, launched with torchrun like tests/test_distributed.py.

Checked, with the tolerances of tests/test_distributed.py (its helpers are reused; the
derivation of each tolerance is in its docstring):

1. 2 sharded processes end where 1 unsharded process ends, for GRPO (and its LoRA variant),
   PPO (policy, reference and critic sharded), SFT (with gradient checkpointing) and the
   reward model: the first update's
   gradients (gathered from the shards) within 1e-5 of max |g|; the final parameters within
   L2 1e-4 / max 1e-2 of how far the single process moved them; the logged metrics within
   relative 1e-4 (rollouts identical: sampling on gathered weights does not depend on the split).
2. Exactness of the pieces, on one sharded model: the log-probs through the root forward and
   the gathered LM head equal the unsharded model's BITWISE, and their gradients (summed over
   the ranks by the reduce-scatter) within 1e-6; generation on gathered weights with a
   different number of rows (and decoding steps) per rank equals the unsharded sampler's.
3. Memory: the parameters, gradients and AdamW states a rank holds (DTensor.to_local() sizes,
   optimizer state tensors) are at most 0.55 of the whole at 2 ranks, for a causal LM and for
   a scalar-head model (critic / reward model, whose H + 1 head numbers stay replicated). FSDP
   pads dim 0 to a multiple of 2 (a shard is ceil(rows / 2) rows), so a little over 0.5 is
   possible.
4. Sharded checkpoints: every rank wrote its shard (``dcp/__0_0.distcp``, ``__1_0.distcp``);
   interrupted after step 2 and resumed at the same world size the run ends BITWISE where the
   uninterrupted one ends; resumed at another world size (2 -> 1 and 1 -> 2) it ends within
   the tolerances of point 1 of the single-process run; ``final/`` loads with
   ``AutoModelForCausalLM.from_pretrained``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_distributed import (REWARD_MODULE, _assert_metrics, _compare_first_gradients, _compare_weights,
                              _free_port, _write_pairs)
from trustrl import distributed as dist

pytestmark = pytest.mark.slow

# Runs under `python -m torch.distributed.run --nproc_per_node 2`: the exactness and memory
# checks on one sharded model, then every training command through trustrl's CLI entry point.
WORKER = textwrap.dedent('''
    import json, shutil, sys
    from pathlib import Path
    import torch
    from trustrl import distributed as dist, parallel
    from trustrl.cli import main
    from trustrl.models import load_policy, load_tokenizer
    from trustrl.rollout import completion_logprobs, generate, left_pad
    from trustrl.value_model import scalar_model_from_lm

    torch.set_num_threads(1)
    model_dir, out = sys.argv[1], Path(sys.argv[3])


    def check_sharding():
        """Point 2 and 3 of the module docstring; the measured numbers go to sharding.json."""
        tok = load_tokenizer(model_dir)
        model = load_policy(model_dir, tokenizer=tok)
        prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
        ids, mask = left_pad(prompts, tok.pad_token_id)
        seeds = torch.arange(3) + 11
        ro = generate(model, ids, mask, max_new_tokens=6, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, row_seeds=seeds)
        whole = completion_logprobs(model, ro)
        (whole * ro.completion_mask).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        parallel.shard_model(model, torch.device("cpu"))
        r = dist.rank()
        rows = [0] if r == 0 else [1, 2]  # uneven on purpose: 1 row on rank 0, 2 on rank 1
        with parallel.gathered(model):
            mine = generate(model, ids[rows], mask[rows], max_new_tokens=6, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id, row_seeds=seeds[rows])
        width = mine.completion_ids.shape[1]
        assert torch.equal(mine.completion_ids, ro.completion_ids[rows, :width]), "generation differs"
        assert not ro.completion_mask[rows, width:].any(), "generation stopped early"
        local = ro.select(torch.tensor(rows))
        logp = completion_logprobs(model, local)
        assert torch.equal(logp, whole[rows]), float((logp - whole[rows]).abs().max())
        (logp * local.completion_mask).sum().backward()
        grad_gap = 0.0
        for n, p in model.named_parameters():
            g = p.grad.full_tensor()
            grad_gap = max(grad_gap, float((g - grads[n]).abs().max() / grads[n].abs().max().clamp_min(1e-12)))
        assert grad_gap <= 1e-6, grad_gap
        shares_before_step = parallel.memory_shares(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        parallel.clip_grad_norm(model.parameters(), 1.0)
        parallel.reshard(model)
        opt.step()
        shares = {**shares_before_step, **parallel.memory_shares(model, opt)}
        # a scalar-head model (critic, reward model): the trunk sharded, the Linear(H, 1) head replicated
        critic = scalar_model_from_lm(model_dir, kind="value", zero_head=False, tokenizer=tok, seed=0)
        parallel.shard_model(critic, torch.device("cpu"), root=critic.trunk)
        critic.completion_values(local).sum().backward()
        critic_opt = torch.optim.AdamW(critic.parameters(), lr=1e-2)
        dist.all_reduce_gradients(critic)
        critic_shares = parallel.memory_shares(critic)
        parallel.reshard(critic)
        critic_opt.step()
        critic_shares.update(parallel.memory_shares(critic, critic_opt))
        if r == 0:
            (out / "sharding.json").write_text(json.dumps({"shares": shares, "critic_shares": critic_shares,
                                                          "grad_rel_gap": grad_gap}))


    current = {}
    reduce = dist.all_reduce_gradients


    def capturing(module, *args, **kwargs):
        # the first update's gradients as reduced over the ranks, gathered whole (every rank
        # gathers: full_tensor is a collective), saved by rank 0
        reduce(module, *args, **kwargs)
        if not current.get("saved"):
            grads = {n: (p.grad.full_tensor() if parallel.is_dtensor(p.grad) else p.grad).clone()
                     for n, p in module.named_parameters() if p.grad is not None}
            if dist.rank() == 0:
                torch.save(grads, current["path"])
        current["saved"] = True


    dist.init_from_env("cpu")
    check_sharding()
    dist.all_reduce_gradients = capturing
    for tag, argv in json.loads(open(sys.argv[2]).read()):
        if tag == "copy":  # a run directory copied before resuming it (rank 0 copies, all wait)
            dist.on_main(shutil.copytree, argv[0], argv[1])
            continue
        current.update(saved=False, path=str(out / f"grads_{tag}.pt"))
        assert main(argv) == 0, tag
    dist.shutdown()
''')


def _commands(model_dir, data, root: Path, tag: str, fsdp: bool) -> dict[str, list[str]]:
    common = [f"model={model_dir}", "progress=false", "tensorboard=false", "seed=0", "learning_rate=1e-2"]
    if fsdp:
        common.append("parallelism.strategy=fsdp")
    rl = [f"dataset={data['rl']}", "max_completion_length=6", "max_prompt_length=16",
          'rewards=[{name: "dp_rewards:count_a"}]']
    grpo = ["train", "grpo", *common, *rl, "prompts_per_step=6", "group_size=4", "beta=0.04", "save_every=1"]
    out = root / tag
    return {
        "grpo": [*grpo, f"output_dir={out / 'grpo'}", "max_steps=3"],
        # interrupted after step 2 (its directory copied, then resumed at 2 ranks; the original
        # is resumed at 1 rank by the test)
        "grpo_part": [*grpo, f"output_dir={out / 'grpo_part'}", "max_steps=2"],
        "grpo_resumed": [*grpo, f"output_dir={out / 'grpo_resumed'}", "max_steps=3", "resume=auto"],
        # a 1-process run with strategy fsdp (sharded checkpoints) resumed at 2 ranks
        "grpo_from_one": [*grpo, f"output_dir={root / 'from_one'}", "max_steps=3", "resume=auto"],
        # LoRA adapters sharded with their layers; reference = adapters off (4 prompts: 2 groups per rank)
        "grpo_lora": ["train", "grpo", *common, *rl, f"output_dir={out / 'grpo_lora'}", "max_steps=2",
                      "prompts_per_step=4", "group_size=4", "beta=0.04", "lora={r: 4, alpha: 8}"],
        # 7 sequences: 4 + 3 per rank, 2 micro-batches each; activations recomputed in the backward
        # (the layers' checkpointed forward runs inside FSDP's gathered unit)
        "sft": ["train", "sft", *common, f"dataset={data['sft']}", f"output_dir={out / 'sft'}", "max_steps=3",
                "batch_size=7", "gradient_accumulation_steps=2", "gradient_checkpointing=true"],
        "rm": ["train", "rm", *common, f"dataset={root / 'pairs.jsonl'}", f"output_dir={out / 'rm'}", "max_steps=3",
               "batch_size=6", "center_rewards_coef=0.01"],
        # minibatches of 3 completions over both ranks' rows: a rank may hold none of one (stand-in pass)
        "ppo": ["train", "ppo", *common, *rl, f"output_dir={out / 'ppo'}", "max_steps=2", "prompts_per_step=4",
                "samples_per_prompt=2", "minibatch_size=3", "ppo_epochs=2", "beta=0.05", "learning_rate=2e-3"],
    }


def _final_equal(a: Path, b: Path, name: str = "model.safetensors") -> None:
    sa, sb = load_file(str(a / "final" / name)), load_file(str(b / "final" / name))
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f"{a} vs {b}: {k} differs (resume at the same world size is bitwise)"


def test_fsdp_two_processes_end_where_one_process_ends(tiny_model_dir, addition_data, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from trustrl.cli import main

    (tmp_path / "dp_rewards.py").write_text(REWARD_MODULE)
    (tmp_path / "worker.py").write_text(WORKER)
    _write_pairs(tmp_path / "pairs.jsonl")
    monkeypatch.syspath_prepend(str(tmp_path))
    two = _commands(tiny_model_dir, addition_data, tmp_path, "two", fsdp=True)
    one = _commands(tiny_model_dir, addition_data, tmp_path, "one", fsdp=False)
    # 1 -> 2: two steps in one process with strategy fsdp (sharded checkpoints), resumed by the worker
    from_one_start = _commands(tiny_model_dir, addition_data, tmp_path, "x", fsdp=True)["grpo_from_one"]
    # (started afresh: resume=auto with nothing to resume from is an error)
    start = {"max_steps=3": "max_steps=2", "resume=auto": "resume=never"}
    assert main([start.get(a, a) for a in from_one_start]) == 0
    order = ["grpo", "grpo_part", ("copy", [str(tmp_path / "two" / "grpo_part"), str(tmp_path / "two" / "grpo_resumed")]),
             "grpo_resumed", "grpo_from_one", "grpo_lora", "sft", "rm", "ppo"]
    plan = [list(k) if isinstance(k, tuple) else [k, two[k]] for k in order]
    (tmp_path / "commands.json").write_text(json.dumps(plan))
    (tmp_path / "out").mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "TRUSTRL_NO_PROGRESS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
              "--master_port", str(_free_port()), str(tmp_path / "worker.py"), str(tiny_model_dir),
              str(tmp_path / "commands.json"), str(tmp_path / "out")]
    proc = subprocess.Popen(launch, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        # meanwhile the single-process references, unsharded, with the same gradient capture
        (tmp_path / "grads_one").mkdir()
        current: dict = {}

        def capturing(module, *args, **kwargs):
            if not current["saved"]:
                torch.save({n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None},
                           current["path"])
            current["saved"] = True

        monkeypatch.setattr(dist, "all_reduce_gradients", capturing)
        for k in ("grpo", "grpo_lora", "sft", "rm", "ppo"):
            current.update(saved=False, path=tmp_path / "grads_one" / f"grads_{k}.pt")
            assert main(one[k]) == 0
        monkeypatch.undo()
        monkeypatch.syspath_prepend(str(tmp_path))
        output, _ = proc.communicate(timeout=500)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, output[-6000:]

    # 2 and 3: exactness of the pieces, memory per rank
    sharding = json.loads((tmp_path / "out" / "sharding.json").read_text())
    print("per-rank shares at 2 ranks:", sharding)
    for kind in ("shares", "critic_shares"):
        assert set(sharding[kind]) == {"params", "grads", "optimizer"}, sharding
        assert all(0 < v <= 0.55 for v in sharding[kind].values()), sharding

    # 1. 2 sharded processes == 1 process
    init = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    measured: dict[str, dict[str, float]] = {}
    for k in ("grpo", "grpo_lora", "sft", "rm", "ppo"):
        measured[k] = {"grad_rel": _compare_first_gradients(tmp_path / "out" / f"grads_{k}.pt",
                                                            tmp_path / "grads_one" / f"grads_{k}.pt", k)}
    for k in ("grpo", "grpo_lora", "sft", "ppo", "rm"):
        measured[k].update(_compare_weights(tmp_path / "two" / k, tmp_path / "one" / k, init, k))
    measured["rm_head"] = _compare_weights(tmp_path / "two" / "rm", tmp_path / "one" / "rm", None, "rm head",
                                           name="value_head.safetensors")
    rollout_keys = ("reward/mean", "reward/std", "completion/mean_length", "completion/max_length", "adv/std")
    _assert_metrics(tmp_path / "two" / "grpo", tmp_path / "one" / "grpo",
                    rollout_keys + ("loss/total", "optim/grad_norm", "kl/ref"), "grpo")
    _assert_metrics(tmp_path / "two" / "sft", tmp_path / "one" / "sft", ("loss/nll", "optim/grad_norm"), "sft")
    _assert_metrics(tmp_path / "two" / "rm", tmp_path / "one" / "rm", ("loss/total", "optim/grad_norm"), "rm")
    _assert_metrics(tmp_path / "two" / "ppo", tmp_path / "one" / "ppo",
                    ("reward/score", "completion/mean_length", "kl/ref_sequence"), "ppo")
    # final/ is an ordinary directory: from_pretrained loads it (the LoRA run merged)
    for k in ("grpo", "grpo_lora", "sft"):
        AutoModelForCausalLM.from_pretrained(str(tmp_path / "two" / k / "final"))

    # 4. sharded checkpoints: every rank's shard, atomic (no partial folder left), verifiable
    from trustrl.checkpoint import list_checkpoints, verify_checkpoint

    ckpts = list_checkpoints(tmp_path / "two" / "grpo")
    assert [s for s, _ in ckpts] == [2, 3]
    for _, path in ckpts:
        manifest = verify_checkpoint(path)
        assert manifest["sharded"] and manifest["world_size"] == 2
        assert {"dcp/__0_0.distcp", "dcp/__1_0.distcp", "dcp/.metadata"} <= set(manifest["files"])
    assert not [p for p in (tmp_path / "two" / "grpo" / "checkpoints").iterdir() if ".tmp-" in p.name]
    # same world size: bitwise
    _final_equal(tmp_path / "two" / "grpo_resumed", tmp_path / "two" / "grpo")
    # 2 -> 1: the 2-rank checkpoint of step 2 resumed in this process (strategy fsdp, unsharded)
    resume_two = [a if not a.startswith("max_steps") else "max_steps=3" for a in two["grpo_part"]] + ["resume=auto"]
    assert main(resume_two) == 0
    measured["resume_2_to_1"] = _compare_weights(tmp_path / "two" / "grpo_part", tmp_path / "one" / "grpo", init,
                                                 "resumed 2 -> 1")
    # 1 -> 2
    measured["resume_1_to_2"] = _compare_weights(tmp_path / "from_one", tmp_path / "one" / "grpo", init,
                                                 "resumed 1 -> 2")
    summary = json.loads((tmp_path / "from_one" / "train_summary.json").read_text())
    assert summary["resumed_from"].endswith("step_000002") and summary["steps"] == 3
    print("fsdp 2 processes vs 1:", json.dumps(measured, indent=1))


# -- single-process pieces (fast) ----------------------------------------------------------------


def _train(model, opt, steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = torch.randint(0, 64, (2, 8), generator=g)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_sharded_checkpoint_layout_in_one_process_is_atomic_verified_and_resumes_bitwise(tmp_path):
    """The DCP layout without a process group (what a 1-process fsdp run writes, and what
    resumes at 2 ranks): every guarantee of the plain checkpoint holds -- a bitwise resume into
    fresh objects, a manifest with checksums that catches a corrupted shard, no partial folder
    after a failed save, keep-last pruning."""
    from test_checkpoint import tiny_llama

    from trustrl.checkpoint import (CheckpointError, find_latest_checkpoint, list_checkpoints, load_checkpoint,
                                    save_sharded_checkpoint, verify_checkpoint)

    torch.manual_seed(0)
    model = tiny_llama().eval()  # (eval: the tiny model's attention dropout off)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    _train(model, opt, 2, seed=1)
    sched.step()
    for step in (1, 2, 3):  # keep_last=2 prunes step 1
        path = save_sharded_checkpoint(tmp_path, step, models={"policy": model}, optimizers={"policy": opt},
                                       schedulers={"policy": sched}, trainer_state={"x": 1.5}, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 3]
    manifest = verify_checkpoint(path)
    assert manifest["sharded"] and manifest["world_size"] == 1 and "dcp/__0_0.distcp" in manifest["files"]
    assert not (path / "models").exists() and not (path / "optimizers.pt").exists()
    _train(model, opt, 2, seed=2)
    expected = {n: p.detach().clone() for n, p in model.named_parameters()}

    torch.manual_seed(5)
    fresh = tiny_llama().eval()
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    fresh_sched = torch.optim.lr_scheduler.LambdaLR(fresh_opt, lambda s: 1.0 / (1 + s))
    state = load_checkpoint(path, models={"policy": fresh}, optimizers={"policy": fresh_opt},
                            schedulers={"policy": fresh_sched})
    assert state["step"] == 3 and state["x"] == 1.5 and fresh_sched.last_epoch == sched.last_epoch
    _train(fresh, fresh_opt, 2, seed=2)
    for n, p in fresh.named_parameters():
        assert torch.equal(p, expected[n]), n

    # a failure while the rank-0 part is written leaves no step folder and no partial one
    class Broken:
        def save_pretrained(self, _):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_sharded_checkpoint(tmp_path, 4, models={"policy": model}, tokenizer=Broken())
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 3]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if ".tmp-" in p.name]
    # a corrupted shard is caught and skipped by resume=auto
    shard = path / "dcp" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        verify_checkpoint(path)
    with pytest.warns(UserWarning, match="skipping invalid checkpoint"):
        assert find_latest_checkpoint(tmp_path) == list_checkpoints(tmp_path)[0][1]


def test_lockstep_and_clip_in_one_process():
    from trustrl import parallel

    # one process: the items themselves, each with weight 1, and no stand-in
    assert list(parallel.lockstep(["a", "b"])) == [("a", 1.0), ("b", 1.0)]
    assert list(parallel.lockstep([])) == []
    # no DTensor: exactly torch's clip_grad_norm_ (norm of (3, 4) = 5, scaled to max 1)
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([3.0, 4.0])
    assert parallel.clip_grad_norm([p], 1.0) == pytest.approx(5.0)
    assert torch.allclose(p.grad, torch.tensor([0.6, 0.8]), atol=1e-6)
    # a model that is not sharded is left alone
    m = torch.nn.Linear(2, 2)
    assert parallel.apply(m, type("P", (), {"strategy": "fsdp"})(), torch.device("cpu")) is m
    assert not parallel.is_sharded(m)


def test_fsdp_config_and_refusals(tiny_model_dir, addition_data, tmp_path):
    from trustrl.algorithms.trpo import TRPOConfig, TRPOTrainer
    from trustrl.config import ConfigError, GRPOConfig, load_config

    cfg = load_config(GRPOConfig, None, ["model=m", "dataset=d", "parallelism.strategy=fsdp"])
    assert cfg.parallelism.strategy == "fsdp" and cfg.parallelism.param_dtype == "auto"
    with pytest.raises(ConfigError, match="strategy"):
        load_config(GRPOConfig, None, ["model=m", "dataset=d", "parallelism.strategy=zero3"])
    trpo = TRPOConfig(model=str(tiny_model_dir), dataset=str(addition_data["rl"]), output_dir=str(tmp_path),
                      parallelism={"strategy": "fsdp"})
    with pytest.raises(ValueError, match="parallelism.strategy=fsdp: trpo"):
        TRPOTrainer(trpo, reward_funcs=[lambda prompts, completions, **kw: [0.0] * len(completions)])
    from trustrl.parallel import mixed_precision_policy

    # CPU: float32 throughout (no cast); bfloat16 asked for on a CPU is refused
    assert mixed_precision_policy(torch.device("cpu")).param_dtype is None
    with pytest.raises(ValueError, match="needs CUDA"):
        mixed_precision_policy(torch.device("cpu"), "bfloat16")
