"""Data parallelism (trustrl.distributed): world-size invariant sampling, sharding, and a real
2-process run on CPU with the gloo backend that ends where a 1-process run with the same
global batch and seed ends.

Expected values come from independent implementations: a pure-Python splitmix64 (integers
masked to 64 bits) for the torch one, the single-process run for the 2-process one, sums
written out by hand for the collectives.

The 2-process vs 1-process comparison (GRPO, its interrupted-and-resumed twin, SFT, reward
model, PPO; 2-3 steps each, same global batch and seed) checks three things, with these
tolerances:

1. The gradient of the first update, summed over the ranks, vs the single-process one:
   ``max |g_2 - g_1| <= 1e-5 * max |g_1|``. Splitting the batch changes only the order of float32
   additions (matmul shapes, padding widths, the sum over ranks): relative rounding 6e-8 per
   operation, a few hundred terms per entry -> ~1e-6 at most (measured: 1e-7 to 5e-7). A
   normalization error (a local instead of the global normalizer, a lost shard, a mean
   instead of a sum over ranks) is off by a factor of order 1.
2. The final parameters, relative to how far the single-process run moved them:
   ``||dtheta||_2 <= 1e-4 * ||theta_T - theta_0||_2`` and ``max |dtheta| <= 1e-2 * max |theta_T - theta_0|``
   (measured: L2 below 3e-5, max below 1e-3). Why not a tighter max: AdamW's first steps are
   ~lr * g / (|g| + eps), so an entry whose exact gradient is ~0 (cancellations such as
   group-centred advantages summing to 0) turns float noise of ~eps = 1e-8 into a step of
   O(lr) that differs between the two runs; those entries are few, which the L2 bound sees.
3. Rollout metrics (sampling must not depend on the split) and the global loss / gradient norm
   logged by rank 0, relative 1e-4; each step logged exactly once."""

from __future__ import annotations

import json
import os
import random
import re
import socket
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from trustrl import distributed as dist
from trustrl.rollout import counter_uniforms, generate, left_pad, sample_next, splitmix64
from trustrl.loop.data_parallel import global_whiten, sampling_row_seeds

MASK = (1 << 64) - 1


def splitmix64_reference(x: int) -> int:
    """Vigna's splitmix64 output function on Python integers (unsigned 64-bit)."""
    z = x & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def to_signed(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


# -- counter-based sampling --------------------------------------------------------------------


def test_splitmix64_matches_the_python_reference():
    # the first output of the splitmix64 generator seeded with 0 is mix(0 + gamma) = 0xE220A8397B1DCDAF
    # (the value Vigna's C reference prints)
    assert splitmix64_reference(0x9E3779B97F4A7C15) == 0xE220A8397B1DCDAF
    rng = random.Random(0)
    values = [0, 1, -1, 2**63 - 1, -(2**63), 0x9E3779B97F4A7C15 - 2**64] + [
        rng.randrange(-(2**63), 2**63) for _ in range(200)]
    ours = splitmix64(torch.tensor(values, dtype=torch.int64)).tolist()
    assert ours == [to_signed(splitmix64_reference(v)) for v in values]
    # token t uses outputs n = 2t and 2t + 1 of the stream seeded with s, each mix(s + (n + 1) * gamma),
    # top 53 bits / 2^53
    seeds = torch.tensor([0, 12345, -7], dtype=torch.int64)
    for t in (0, 1, 17):
        expected = [[(splitmix64_reference(s + (n + 1) * 0x9E3779B97F4A7C15) >> 11) / 2**53 for n in (2 * t, 2 * t + 1)]
                    for s in (0, 12345, -7)]
        assert counter_uniforms(seeds, t).tolist() == expected
    # seed 0, token 0, first number: 0xE220A8397B1DCDAF >> 11 over 2^53
    assert counter_uniforms(torch.tensor([0]), 0)[0, 0].item() == (0xE220A8397B1DCDAF >> 11) / 2**53


def test_counter_uniforms_are_uniform_on_the_unit_interval():
    u = counter_uniforms(torch.arange(100_000, dtype=torch.int64) * 7919, 3).flatten()
    assert u.dtype == torch.float64 and float(u.min()) >= 0.0 and float(u.max()) < 1.0
    # 10 bins of 20,000 expected each; a binomial sd is ~134, allow 5 sd
    counts = torch.histc(u, bins=10, min=0.0, max=1.0)
    assert (counts - 20_000).abs().max() < 700, counts


def test_counter_sampling_draws_from_the_softmax():
    # logits log([0.5, 0.3, 0.2]): 60,000 rows with distinct seeds -> frequencies within 4 sd
    # (sd = sqrt(p (1 - p) / n) <= 0.002)
    n = 60_000
    logits = torch.log(torch.tensor([0.5, 0.3, 0.2])).expand(n, 3)
    tokens = sample_next(logits, 1.0, 1.0, None, counter_uniforms(torch.arange(n, dtype=torch.int64), 0))
    freq = torch.bincount(tokens, minlength=3).double() / n
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64), atol=0.008), freq
    # nucleus top_p = 0.7 keeps {0.5, 0.3} renormalized: 0.625, 0.375, 0
    tokens = sample_next(logits, 1.0, 0.7, None, counter_uniforms(torch.arange(n, dtype=torch.int64), 1))
    freq = torch.bincount(tokens, minlength=3).double() / n
    assert freq[2] == 0 and abs(float(freq[0]) - 0.625) < 0.008, freq


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_row_seeded_generation_does_not_depend_on_the_batch_split(tiny_model_dir, top_p):
    from trustrl.models import load_policy, load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    model = load_policy(tiny_model_dir)
    texts = ["1+2=", "13+4=", "7+", "9+9=", "2+", "5+13="]
    seeds = sampling_row_seeds(0, (0, 0), len(texts), 1)

    def run(rows):
        ids, mask = left_pad([tok(texts[i])["input_ids"] for i in rows], tok.pad_token_id)
        r = generate(model, ids, mask, max_new_tokens=8, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                     temperature=1.0, top_p=top_p, row_seeds=seeds[rows])
        return {i: r.completion_ids[k][r.completion_mask[k]].tolist() for k, i in enumerate(rows)}

    whole = run(list(range(6)))
    # split in two (different padding widths, different stopping steps) and reversed
    assert {**run([0, 1, 2]), **run([3, 4, 5])} == whole
    assert run([5, 4, 3, 2, 1, 0]) == whole
    assert len({tuple(v) for v in whole.values()}) > 1  # not a constant sampler


def test_sampling_row_seeds_are_distinct_and_depend_on_every_key():
    a = sampling_row_seeds(0, (0, 0), 16, 8)
    assert a.shape == (128,) and a.dtype == torch.int64 and len(set(a.tolist())) == 128
    others = [sampling_row_seeds(1, (0, 0), 16, 8), sampling_row_seeds(0, (1, 0), 16, 8),
              sampling_row_seeds(0, (0, 16), 16, 8)]
    for b in others:
        assert not set(a.tolist()) & set(b.tolist())
    assert torch.equal(a, sampling_row_seeds(0, (0, 0), 16, 8))


# -- sharding ------------------------------------------------------------------------------------


def test_shard_range_by_hand():
    # 10 items over 3 ranks: 4, 3, 3
    assert [dist.shard_range(10, r, 3) for r in range(3)] == [(0, 4), (4, 7), (7, 10)]
    # fewer items than ranks: the last rank holds none
    assert [dist.shard_range(1, r, 2) for r in range(2)] == [(0, 1), (1, 1)]
    # groups of 4 over 2 ranks: 3 groups -> 2 + 1, never a split group
    idx = list(range(100, 112))
    assert dist.shard_indices(idx, 0, 2, group_size=4) == idx[:8]
    assert dist.shard_indices(idx, 1, 2, group_size=4) == idx[8:]
    with pytest.raises(ValueError, match="whole groups"):
        dist.shard_indices(idx, 0, 2, group_size=5)


@settings(max_examples=60, deadline=None)
@given(n_groups=st.integers(0, 40), group=st.integers(1, 5), world=st.integers(1, 9))
def test_shards_are_contiguous_whole_groups_covering_everything(n_groups, group, world):
    idx = list(range(n_groups * group))
    shards = [dist.shard_indices(idx, r, world, group_size=group) for r in range(world)]
    assert sum(shards, []) == idx  # in order, each index exactly once
    sizes = [len(s) // group for s in shards]
    assert all(len(s) % group == 0 for s in shards) and max(sizes) - min(sizes) <= 1


def test_helpers_are_the_identity_in_one_process():
    assert not dist.is_distributed() and dist.world_size() == 1 and dist.rank() == 0 and dist.is_main()
    assert dist.all_reduce_sum(3) == 3 and dist.all_reduce_sum(2.5) == 2.5
    assert dist.reduce_metrics({"a": 1.0}) == {"a": 1.0} and dist.sum_across_ranks({"a": 2.0}) == {"a": 2.0}
    assert dist.all_true(True) and not dist.all_true(False)
    assert dist.on_main(lambda x: x + 1, 1) == 2
    assert dist.shard_groups(3) == ([0, 1, 2], 1.0)
    x, m = torch.randn(3, 4), torch.rand(3, 4) > 0.3
    from trustrl.advantages import whiten

    assert torch.equal(global_whiten(x, m), whiten(x, m))


# -- a real 2-process run --------------------------------------------------------------------------

REWARD_MODULE = textwrap.dedent('''
    def count_a(prompts, completions, **columns):
        return [c.count("a") / max(len(c), 1) for c in completions]
''')

# Runs under `python -m torch.distributed.run --nproc_per_node 2`: joins the process group from
# torchrun's environment (trustrl.distributed.init_from_env, what `-m trustrl train` does),
# checks the collectives on hand-made inputs, then runs every training command through trustrl's
# CLI entry point in the same group (one launch: starting Python and torch costs more than the
# tiny runs).
WORKER = textwrap.dedent('''
    import json, sys
    import torch
    torch.set_num_threads(1)
    from trustrl import distributed as dist
    from trustrl.advantages import whiten
    from trustrl.loop.data_parallel import global_whiten
    from trustrl.cli import main


    def check_collectives():
        r, w = dist.rank(), dist.world_size()
        assert w == 2 and dist.is_distributed()
        # gradients: rank r holds (r + 1) * g; the sum is 3 * g. `partial` has a gradient on
        # rank 0 only (rank 1 held no rows): rank 0's value everywhere. `unused`: None everywhere.
        torch.manual_seed(0)
        model = torch.nn.ModuleDict({"a": torch.nn.Linear(3, 2), "partial": torch.nn.Linear(2, 2),
                                     "unused": torch.nn.Linear(2, 1)})
        g = {n: torch.arange(p.numel(), dtype=torch.float32).view_as(p) + 0.5 for n, p in model.named_parameters()}
        for n, p in model.named_parameters():
            if n.startswith("a.") or (n.startswith("partial.") and r == 0):
                p.grad = (r + 1) * g[n]
        dist.all_reduce_gradients(model, bucket_mb=1e-5)  # tiny buckets: one per tensor
        for n, p in model.named_parameters():
            if n.startswith("a."):
                assert torch.equal(p.grad, 3 * g[n]), n
            elif n.startswith("partial."):
                assert torch.equal(p.grad, g[n]), n
            else:
                assert p.grad is None, n
        # whitening over both ranks == whitening of the concatenation
        x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
        m = torch.rand(5, 4, generator=torch.Generator().manual_seed(2)) > 0.3
        mine = slice(0, 2) if r == 0 else slice(2, 5)
        assert torch.allclose(global_whiten(x[mine], m[mine]), whiten(x, m)[mine], atol=1e-6)
        assert torch.allclose(global_whiten(x[mine], m[mine], shift_mean=False), whiten(x, m, shift_mean=False)[mine],
                              atol=1e-6)
        # metrics: weighted mean (1 * 1 + 4 * 3) / 4 = 3.25, max 5, sum 30, a key on one rank only
        local = ({"a": 1.0, "completion/max_length": 3.0, "perf/tokens_per_second": 10.0} if r == 0 else
                 {"a": 4.0, "completion/max_length": 5.0, "perf/tokens_per_second": 20.0, "only1": 7.0})
        assert dist.reduce_metrics(local, weight=1.0 if r == 0 else 3.0) == {
            "a": 3.25, "completion/max_length": 5.0, "perf/tokens_per_second": 30.0, "only1": 7.0}
        # equal values: a mean stays (2.0), a max stays (4.0), this rank's counts add (1 + 1 faults)
        assert dist.reduce_metrics({"b": 2.0, "x/max": 4.0, "env/faults": 1.0}, weight=1.0 + r) == {
            "b": 2.0, "x/max": 4.0, "env/faults": 2.0}
        assert dist.sum_across_ranks({"x": 1.5, f"k{r}": 1.0}) == {"x": 3.0, "k0": 1.0, "k1": 1.0}
        assert dist.all_reduce_sum(r + 1) == 3 and dist.all_reduce_max(float(r)) == 1.0
        assert dist.all_true(True) and not dist.all_true(r == 0)
        assert dist.gather_rows(torch.full((r + 1,), r)).tolist() == [0, 1, 1]
        assert dist.on_main(lambda: dist.rank() + 41) == 41  # rank 0's result on every rank
        try:
            dist.on_main(lambda: 1 / 0)
            raise AssertionError("on_main swallowed rank 0's error")
        except ZeroDivisionError:
            assert r == 0
        except RuntimeError as err:
            assert r == 1 and "ZeroDivisionError" in str(err)
        try:
            dist.shard_batch([7], "batch_size")
            raise AssertionError("one row for two ranks must fail")
        except ValueError as err:
            assert "batch_size" in str(err)
        assert dist.shard_groups(1) == (([0], 1.0) if r == 0 else ([0], 0.0))
        assert dist.all_reduce_mean(float(r)) == 0.5
        dist.check_parameters_equal(model)  # same seed on both ranks: equal
        with torch.no_grad():
            model["a"].bias.add_(float(r))
        try:
            dist.check_parameters_equal(model)
            raise AssertionError("diverged parameters went unnoticed")
        except RuntimeError as err:
            assert "differ across ranks" in str(err)


    # the gradients of each run's first update, as summed over the ranks (rank 0 saves them)
    current = {}
    reduce = dist.all_reduce_gradients


    def capturing(module, *args, **kwargs):
        reduce(module, *args, **kwargs)
        if not current.get("saved") and dist.rank() == 0:
            torch.save({n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}, current["path"])
        current["saved"] = True


    assert str(dist.init_from_env("auto")) == "cpu"
    check_collectives()
    dist.all_reduce_gradients = capturing  # guarded_step calls it through the module
    for tag, argv in json.loads(open(sys.argv[1]).read()):
        current.update(saved=False, path=f"{sys.argv[2]}/grads_{tag}.pt")
        assert main(argv) == 0
    dist.shutdown()
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _commands(tiny_model_dir, addition_data, root: Path, tag: str) -> dict[str, list[str]]:
    common = [f"model={tiny_model_dir}", "progress=false", "tensorboard=false", "seed=0", "learning_rate=1e-2"]
    rl = [f"dataset={addition_data['rl']}", "max_completion_length=6", "max_prompt_length=16",
          'rewards=[{name: "dp_rewards:count_a"}]']
    out = root / tag
    return {
        # 6 prompts x 4: 3 groups per rank; eval on 5 prompts: 3 + 2 per rank
        "grpo": ["train", "grpo", *common, *rl, f"output_dir={out / 'grpo'}", "max_steps=3", "prompts_per_step=6",
                 "group_size=4", "beta=0.04", "save_every=1", f"eval_dataset={addition_data['eval']}",
                 "eval_prompts=5"],
        # the same run interrupted after step 2 and resumed (every rank loads the checkpoint)
        "grpo_part": ["train", "grpo", *common, *rl, f"output_dir={out / 'grpo_resumed'}", "max_steps=2",
                      "prompts_per_step=6", "group_size=4", "beta=0.04", "save_every=1",
                      f"eval_dataset={addition_data['eval']}", "eval_prompts=5"],
        "grpo_resumed": ["train", "grpo", *common, *rl, f"output_dir={out / 'grpo_resumed'}", "max_steps=3",
                         "prompts_per_step=6", "group_size=4", "beta=0.04", "save_every=1", "resume=auto",
                         f"eval_dataset={addition_data['eval']}", "eval_prompts=5"],
        # one prompt for two ranks: rank 1 trains on a zero-weighted stand-in group
        "grpo_one_prompt": ["train", "grpo", *common, *rl, f"output_dir={out / 'grpo_one_prompt'}", "max_steps=2",
                            "prompts_per_step=1", "group_size=4", "beta=0.0"],
        # 7 sequences: 4 + 3 per rank
        "sft": ["train", "sft", *common, f"dataset={addition_data['sft']}", f"output_dir={out / 'sft'}",
                "max_steps=3", "batch_size=7"],
        # (centering gives the head's bias a gradient: Bradley-Terry alone is blind to it, and
        # AdamW would turn the float noise of an exactly-zero gradient into O(lr) steps)
        "rm": ["train", "rm", *common, f"dataset={root / 'pairs.jsonl'}", f"output_dir={out / 'rm'}", "max_steps=3",
               "batch_size=6", "center_rewards_coef=0.01"],
        # minibatches of 3 completions drawn over both ranks' rows
        "ppo": ["train", "ppo", *common, *rl, f"output_dir={out / 'ppo'}", "max_steps=2", "prompts_per_step=4",
                "samples_per_prompt=2", "minibatch_size=3", "ppo_epochs=2", "beta=0.05", "learning_rate=2e-3"],
    }


def _write_pairs(path: Path) -> None:
    from trustrl.data import write_jsonl

    rng = random.Random(0)
    rows = []
    for _ in range(24):
        digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 3)))
        rows.append({"prompt": f"{rng.randint(0, 9)}+{rng.randint(0, 9)}=", "chosen": digits + "a",
                     "rejected": digits + "b"})
    write_jsonl(path, rows)


def _flat(state: dict[str, torch.Tensor], keys) -> torch.Tensor:
    return torch.cat([state[k].double().flatten() for k in keys])


def _compare_weights(two: Path, one: Path, init: dict[str, torch.Tensor], what: str,
                     name: str = "model.safetensors") -> dict[str, float]:
    """Final parameters of the 2-process run vs the 1-process run, relative to how far the
    1-process run moved them: max abs and L2 (the tolerances are in the module docstring)."""
    a, b = load_file(str(two / "final" / name)), load_file(str(one / "final" / name))
    assert a.keys() == b.keys(), what
    keys = sorted(b)
    start = init if init is not None and all(k in init for k in keys) else {k: torch.zeros_like(v) for k, v in b.items()}
    diff, moved = _flat(a, keys) - _flat(b, keys), _flat(b, keys) - _flat(start, keys)
    assert float(moved.abs().max()) > 1e-3, f"{what}: the parameters hardly moved; the comparison would be vacuous"
    out = {"max_abs": float(diff.abs().max()), "max_rel": float(diff.abs().max() / moved.abs().max()),
           "l2_rel": float(diff.norm() / moved.norm())}
    assert out["l2_rel"] <= 1e-4, f"{what}: 2 processes vs 1: {out}"
    assert out["max_rel"] <= 1e-2, f"{what}: 2 processes vs 1: {out}"
    return out


def _compare_first_gradients(two: Path, one: Path, what: str) -> float:
    """The first update's gradients (summed over ranks) vs one process: the data-parallel
    normalization itself, before AdamW can amplify float noise."""
    a, b = torch.load(two, weights_only=True), torch.load(one, weights_only=True)
    assert a.keys() == b.keys() and a, what
    scale = max(float(g.abs().max()) for g in b.values())
    worst = max(float((a[k] - b[k]).abs().max()) for k in b) / scale
    assert scale > 0 and worst <= 1e-5, f"{what}: first-update gradients differ by {worst:.3g} of max |g|"
    return worst


def _assert_metrics(two: Path, one: Path, keys: tuple[str, ...], what: str) -> None:
    from trustrl.logging import read_metrics

    a, b = read_metrics(two), read_metrics(one)
    assert [r["step"] for r in a] == [r["step"] for r in b], f"{what}: logged steps differ"
    assert len({r["step"] for r in a}) == len(a), f"{what}: a step logged twice: {[r['step'] for r in a]}"
    for ra, rb in zip(a, b):
        for k in keys:
            if k in rb:
                assert ra[k] == pytest.approx(rb[k], rel=1e-4, abs=1e-7), (what, ra["step"], k, ra[k], rb[k])


def test_two_processes_end_where_one_process_ends(tiny_model_dir, addition_data, tmp_path, monkeypatch):
    from trustrl.cli import main

    (tmp_path / "dp_rewards.py").write_text(REWARD_MODULE)
    (tmp_path / "worker.py").write_text(WORKER)
    _write_pairs(tmp_path / "pairs.jsonl")
    two = _commands(tiny_model_dir, addition_data, tmp_path, "two")
    one = _commands(tiny_model_dir, addition_data, tmp_path, "one")
    order = ["grpo", "grpo_part", "grpo_resumed", "grpo_one_prompt", "sft", "rm", "ppo"]
    (tmp_path / "grads_two").mkdir()
    (tmp_path / "commands.json").write_text(json.dumps([[k, two[k]] for k in order]))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "TRUSTRL_NO_PROGRESS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
              "--master_port", str(_free_port()), str(tmp_path / "worker.py"), str(tmp_path / "commands.json"),
              str(tmp_path / "grads_two")]
    # a session of its own, so that on failure the launcher *and* its workers can be killed
    # (killing torchrun alone left orphaned workers holding the cores)
    proc = subprocess.Popen(launch, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        # meanwhile, the single-process references, in this process, through the same CLI,
        # with the same capture of the first update's gradients
        monkeypatch.syspath_prepend(str(tmp_path))
        (tmp_path / "grads_one").mkdir()
        current: dict = {}

        def capturing(module, *args, **kwargs):
            if not current["saved"]:
                torch.save({n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None},
                           current["path"])
            current["saved"] = True

        monkeypatch.setattr(dist, "all_reduce_gradients", capturing)
        for k in ("grpo", "grpo_one_prompt", "sft", "rm", "ppo"):
            current.update(saved=False, path=tmp_path / "grads_one" / f"grads_{k}.pt")
            assert main(one[k]) == 0
        output, _ = proc.communicate(timeout=280)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, output[-6000:]
    # the CLI prints its summary on rank 0 only: once per command
    assert len(re.findall(r"^  model_dir +\S", output, flags=re.M)) == len(order), output[-3000:]

    # 1. the data-parallel gradient of the first update equals the single-process one
    measured: dict[str, dict[str, float]] = {}
    for k in ("grpo", "grpo_one_prompt", "sft", "rm", "ppo"):
        measured[k] = {"grad_rel": _compare_first_gradients(tmp_path / "grads_two" / f"grads_{k}.pt",
                                                            tmp_path / "grads_one" / f"grads_{k}.pt", k)}
    # 2. the final parameters agree (the interrupted + resumed run too)
    init = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    for k in ("grpo", "grpo_one_prompt", "sft", "ppo"):
        measured[k].update(_compare_weights(tmp_path / "two" / k, tmp_path / "one" / k, init, k))
    measured["grpo_resumed"] = _compare_weights(tmp_path / "two" / "grpo_resumed", tmp_path / "one" / "grpo", init,
                                                "grpo resumed")
    measured["rm"].update(_compare_weights(tmp_path / "two" / "rm", tmp_path / "one" / "rm", init, "rm"))
    measured["rm_head"] = _compare_weights(tmp_path / "two" / "rm", tmp_path / "one" / "rm", None, "rm head",
                                           name="value_head.safetensors")
    print("2 processes vs 1:", json.dumps(measured, indent=1))

    # 3. rollouts are identical (sampling does not depend on the split) and the global metrics
    # match; each step is logged once, by rank 0
    rollout_keys = ("reward/mean", "reward/std", "completion/mean_length", "completion/max_length",
                    "completion/truncated_fraction", "groups/zero_std_fraction", "adv/std", "eval/accuracy",
                    "eval/mean_length")
    _assert_metrics(tmp_path / "two" / "grpo", tmp_path / "one" / "grpo",
                    rollout_keys + ("loss/total", "optim/grad_norm", "kl/ref"), "grpo")
    _assert_metrics(tmp_path / "two" / "grpo_resumed", tmp_path / "one" / "grpo", rollout_keys + ("optim/grad_norm",),
                    "grpo resumed")
    _assert_metrics(tmp_path / "two" / "sft", tmp_path / "one" / "sft", ("loss/nll", "optim/grad_norm"), "sft")
    _assert_metrics(tmp_path / "two" / "rm", tmp_path / "one" / "rm",
                    ("loss/total", "rm/train_accuracy", "optim/grad_norm"), "rm")
    _assert_metrics(tmp_path / "two" / "ppo", tmp_path / "one" / "ppo",
                    ("reward/score", "completion/mean_length", "kl/ref_sequence", "kl/coef_next"), "ppo")
    # 4. rank 0 alone wrote the run directory: complete checkpoints (keep_last 2), no leftovers
    from trustrl.checkpoint import list_checkpoints, verify_checkpoint

    assert [s for s, _ in list_checkpoints(tmp_path / "two" / "grpo")] == [2, 3]
    for _, path in list_checkpoints(tmp_path / "two" / "grpo"):
        verify_checkpoint(path)
    assert [p.name for p in (tmp_path / "two" / "grpo" / "checkpoints").iterdir() if ".tmp-" in p.name] == []
    summary = json.loads((tmp_path / "two" / "grpo_resumed" / "train_summary.json").read_text())
    assert summary["resumed_from"].endswith("step_000002") and summary["steps"] == 3


# -- what a user sees when a 2-process run fails or is interrupted -------------------------------------

# fails on rank 1's completions only; rank 0 meanwhile waits in the rollout gather
RANK1_REWARD = textwrap.dedent('''
    import torch.distributed


    def fails_on_rank1(prompts, completions, **columns):
        if torch.distributed.is_initialized() and torch.distributed.get_rank() == 1:
            raise ValueError("only rank 1 fails")
        return [0.0 for _ in completions]
''')


def _torchrun(args: list[str], cwd: Path, timeout: float, interrupt_when=None) -> tuple[int, str, float]:
    """``python -m torch.distributed.run --nproc_per_node 2 -m trustrl ARGS`` in its own session;
    returns (exit status, output, seconds). ``interrupt_when()`` true: SIGINT to the whole
    session, as Ctrl-C in a terminal sends it to torchrun and its workers."""
    import time

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(cwd), os.getcwd(), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "TRUSTRL_NO_PROGRESS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TRUSTRL_DEBUG"):
        env.pop(var, None)
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
              "--master_port", str(_free_port()), "-m", "trustrl", *args]
    started = time.monotonic()
    proc = subprocess.Popen(launch, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        if interrupt_when is not None:
            while proc.poll() is None and not interrupt_when():
                if time.monotonic() - started > timeout:
                    break
                time.sleep(0.2)
            os.killpg(proc.pid, signal.SIGINT)
        output, _ = proc.communicate(timeout=max(timeout - (time.monotonic() - started), 10))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, output, time.monotonic() - started


def _trustrl_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("trustrl:")]


def _assert_no_trustrl_traceback(output: str) -> None:
    # (torchrun prints its own ChildFailedError report whenever a worker exits non-zero;
    # what must not appear is a traceback through trustrl's code)
    assert not re.search(r'File ".*trustrl/', output), output[-4000:]


def test_two_process_user_errors_are_printed_once_and_one_rank_errors_name_the_rank(tiny_model_dir, addition_data,
                                                                                     tmp_path):
    (tmp_path / "rank1_reward.py").write_text(RANK1_REWARD)
    common = [f"model={tiny_model_dir}", f"dataset={addition_data['rl']}", "device=cpu", "max_steps=2",
              "prompts_per_step=2", "group_size=2", "max_completion_length=4", "progress=false", "tensorboard=false"]
    exact = "rewards=[{name: exact_answer}]"
    # 1. an unknown key, met by every rank before the process group exists: one line, once
    status, output, _ = _torchrun(["train", "grpo", *common, f"output_dir={tmp_path / 'a'}", exact, "bogus_key=1"],
                                  tmp_path, 120)
    assert status != 0
    assert len([line for line in _trustrl_lines(output) if "GRPOConfig" in line]) == 1, output[-4000:]
    assert "bogus_key: unknown key" in output
    _assert_no_trustrl_traceback(output)
    # 2. a missing dataset, met by every rank inside the trainer (process group joined)
    status, output, _ = _torchrun(["train", "grpo", *common, f"output_dir={tmp_path / 'b'}", exact,
                                   f"dataset={tmp_path / 'missing.jsonl'}"], tmp_path, 120)
    assert status != 0
    assert _trustrl_lines(output) == [f"trustrl: {tmp_path / 'missing.jsonl'}: no such file or directory"], \
        output[-4000:]
    _assert_no_trustrl_traceback(output)
    # 3. TRPO refuses data parallelism: one line, once (was a RuntimeError traceback per rank)
    status, output, _ = _torchrun(["train", "trpo", *common[:3], f"output_dir={tmp_path / 'c'}", "max_steps=1", exact], tmp_path, 120)
    lines = _trustrl_lines(output)
    assert status != 0 and len(lines) == 1 and "trpo does not support data-parallel runs" in lines[0], output[-4000:]
    _assert_no_trustrl_traceback(output)
    # 4. a reward that fails on rank 1 only: rank 0 is stuck in a collective; the job still ends
    # within seconds (not the 10-minute collective timeout), naming the reward and the rank
    status, output, seconds = _torchrun(["train", "grpo", *common, f"output_dir={tmp_path / 'd'}",
                                         'rewards=[{name: "rank1_reward:fails_on_rank1", alias: flaky}]'], tmp_path, 240)
    lines = _trustrl_lines(output)
    assert status != 0 and len(lines) == 1, output[-4000:]
    assert lines[0].startswith("trustrl: rank 1 of 2: reward function 'flaky' raised ValueError: only rank 1 fails")
    assert seconds < 200
    _assert_no_trustrl_traceback(output)


def test_ctrl_c_under_torchrun_stops_once_and_the_printed_command_resumes(tiny_model_dir, addition_data, tmp_path):
    out = tmp_path / "run"
    args = ["train", "grpo", f"model={tiny_model_dir}", f"dataset={addition_data['rl']}", "device=cpu",
            "max_steps=100000", "prompts_per_step=2", "group_size=2", "max_completion_length=4", "progress=false",
            "tensorboard=false", f"output_dir={out}", "save_every=100000", "rewards=[{name: exact_answer}]", "parallelism.strategy=fsdp"]

    def two_steps_logged() -> bool:
        metrics = out / "metrics.jsonl"
        return metrics.exists() and len(metrics.read_text().splitlines()) >= 2

    status, output, _ = _torchrun(args, tmp_path, 240, interrupt_when=two_steps_logged)
    assert status != 0  # torchrun reports its interrupted workers as failed
    lines = _trustrl_lines(output)
    assert len([line for line in lines if "SIGINT received" in line]) == 1, output[-4000:]
    # FSDP's float32-on-CPU notice: once per run (was once per rank and sharded model)
    assert output.count("mixed-precision policy applies on GPUs") == 1, output[-4000:]
    stopped = [line for line in lines if line.startswith("trustrl: stopped after step")]
    assert len(stopped) == 1, output[-4000:]
    step = int(re.search(r"stopped after step (\d+)", stopped[0]).group(1))
    hint = re.search(r"^resume with: (.*)$", output, flags=re.M).group(1)
    # the launcher is kept in the hint: the run was started under torchrun with 2 processes
    assert hint == (f"torchrun --standalone --nproc_per_node 2 -m trustrl train grpo --config {out / 'config.yaml'} "
                    "--resume"), hint
    from trustrl.checkpoint import list_checkpoints

    assert [s for s, _ in list_checkpoints(out)] == [step]
    # the printed command (its trustrl part, 2 processes) continues the run for 1 more step
    resume_args = hint.split(" -m trustrl ", 1)[1].split() + [f"max_steps={step + 1}"]
    status, output, _ = _torchrun(resume_args, tmp_path, 240)
    assert status == 0, output[-4000:]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["resumed_from"].endswith(f"step_{step:06d}") and summary["steps"] == step + 1


@pytest.mark.parametrize("trainer", ["sft", "rm"])
def test_ctrl_c_stops_supervised_trainers_with_a_checkpoint_that_resumes_in_one_process(trainer, tiny_model_dir,
                                                                                         addition_data, tmp_path):
    # SFT and the reward model stopped at once on Ctrl-C, losing every step since the last
    # checkpoint ("interrupted before the run's first checkpoint", twice under torchrun)
    from trustrl.checkpoint import list_checkpoints
    from trustrl.cli import main

    out = tmp_path / "run"
    if trainer == "rm":
        _write_pairs(tmp_path / "pairs.jsonl")
    data = addition_data["sft"] if trainer == "sft" else tmp_path / "pairs.jsonl"
    args = ["train", trainer, f"model={tiny_model_dir}", f"dataset={data}", "device=cpu", "max_steps=100000",
            "batch_size=4", "progress=false", "tensorboard=false", f"output_dir={out}", "save_every=100000"]

    def two_steps_logged() -> bool:
        metrics = out / "metrics.jsonl"
        return metrics.exists() and len(metrics.read_text().splitlines()) >= 2

    status, output, _ = _torchrun(args, tmp_path, 240, interrupt_when=two_steps_logged)
    lines = _trustrl_lines(output)
    assert status != 0 and len([line for line in lines if "SIGINT received" in line]) == 1, output[-4000:]
    stopped = [line for line in lines if line.startswith("trustrl: stopped after step")]
    assert len(stopped) == 1, output[-4000:]
    step = int(re.search(r"stopped after step (\d+)", stopped[0]).group(1))
    assert [s for s, _ in list_checkpoints(out)] == [step]
    assert f"torchrun --standalone --nproc_per_node 2 -m trustrl train {trainer} --config {out / 'config.yaml'} " \
           "--resume" in output
    assert not (out / "final").exists()  # no final model from a stopped run
    # 2 -> 1 process: the printed command without the launcher, one more step
    assert main(["train", trainer, "--config", str(out / "config.yaml"), "--resume", f"max_steps={step + 1}"]) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["resumed_from"].endswith(f"step_{step:06d}") and summary["steps"] == step + 1
    assert (out / "final").is_dir()
