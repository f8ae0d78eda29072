"""Multi-turn agents data parallel: 2 processes (torchrun, gloo) end where 1 process ends, for
agent-GRPO and for agent-PPO (actor + critic, GAE over the model tokens)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

HERE = Path(__file__).parent

WORKER = textwrap.dedent('''
    import sys
    import torch
    torch.set_num_threads(1)
    from trustrl.cli import main
    assert main(sys.argv[1:]) == 0
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_agent_setup(tmp_path: Path) -> Path:
    """The 1-layer chat model over 'a'/'b', 8 CountEnv rows and the CLI worker; the model's dir."""
    from trustrl.tiny import CHAT_ROLE_TOKENS, CHAT_TEMPLATE, create_tiny_model_dir

    model_dir = create_tiny_model_dir(tmp_path / "model", chars="ab", special_tokens=CHAT_ROLE_TOKENS,
                                      chat_template=CHAT_TEMPLATE, seed=0, hidden_size=32, num_layers=1, num_heads=2,
                                      max_position_embeddings=512)
    rows = [{"n": 1 + i % 3, "turns": 2 + i % 2} for i in range(8)]
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "worker.py").write_text(WORKER)
    return model_dir


def _run_one_and_two(tmp_path: Path, argv) -> dict[str, list[dict]]:
    """``argv(out)`` through the CLI in 1 process (``out = tmp_path/one``) and, at the same time,
    in 2 (torchrun, gloo; ``tmp_path/two``); both must succeed. The metrics rows of each run."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "TRUSTRL_NO_PROGRESS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
              "--master_port", str(_free_port()), str(tmp_path / "worker.py"), *argv(tmp_path / "two")]
    # a session of its own, so that on failure the launcher and its workers can be killed
    proc = subprocess.Popen(launch, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        one = subprocess.run([sys.executable, str(tmp_path / "worker.py"), *argv(tmp_path / "one")], env=env,
                             cwd=tmp_path, capture_output=True, text=True, timeout=600)
        output, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    assert proc.returncode == 0, output[-5000:]
    return {tag: [json.loads(line) for line in (tmp_path / tag / "metrics.jsonl").read_text().splitlines()]
            for tag in ("one", "two")}


def _assert_same_metrics(metrics: dict[str, list[dict]], keys: tuple[str, ...], rel: float) -> None:
    """Every key of every step (train and eval rows), equal within ``rel`` (relative, floor 1)."""
    assert [r["step"] for r in metrics["one"]] == [r["step"] for r in metrics["two"]]  # each step logged once
    seen = set()
    for a, b in zip(metrics["one"], metrics["two"]):
        for key in keys:
            if key in a:
                seen.add(key)
                if a[key] is None or b[key] is None:  # nan (e.g. an undefined explained variance)
                    assert a[key] is None and b[key] is None, (a["step"], key, a[key], b[key])
                    continue
                assert abs(a[key] - b[key]) <= rel * max(1.0, abs(a[key])), (a["step"], key, a[key], b[key])
    assert seen == set(keys), set(keys) - seen  # a renamed metric must not pass by being absent


def test_two_processes_play_and_train_like_one(tmp_path):
    from safetensors.torch import load_file

    model_dir = _tiny_agent_setup(tmp_path)

    def argv(out):  # 4 rows x 4 episodes per step: 2 groups per rank; 6 held-out rows: 3 per rank
        return ["train", "agent-grpo", f"model={model_dir}", f"dataset={tmp_path / 'rows.jsonl'}",
                f"eval_dataset={tmp_path / 'rows.jsonl'}", "eval_prompts=6", "env=agent_envs:CountEnv",
                f"output_dir={out}", "max_steps=2", "prompts_per_step=4", "group_size=4", "max_turns=3",
                "max_completion_length=16", "max_episode_tokens=200", "learning_rate=1e-2", "beta=0.04",
                "progress=false", "tensorboard=false", "seed=0"]

    metrics = _run_one_and_two(tmp_path, argv)
    # the same episodes (counter-based sampling) and metrics; weights equal up to the order of
    # the gradient sums
    _assert_same_metrics(metrics, ("env/return", "env/turns", "env/model_tokens", "eval/success", "eval/return"), 1e-6)
    w1 = load_file(str(tmp_path / "one" / "final" / "model.safetensors"))
    w2 = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=1e-5, rtol=1e-4), k


def test_agent_ppo_two_processes_play_and_train_like_one(tmp_path):
    """agent-PPO: 4 rows x 2 episodes per step (2 rows per rank), minibatches of 3 episodes
    drawn over the global batch (so a minibatch's members straddle the ranks), 2 PPO epochs,
    KL to the reference, whitened advantages. The 2-process run must play the same episodes,
    log the same global statistics, and end with the same actor and critic.

    Tolerances. Episodes come from counter-based uniforms (the same on any split): 1e-6.
    Losses, KL, policy and value statistics are sums over tokens split across ranks (float32
    summation order only, ~1e-7 relative): 1e-4; a rank-weighted mean of the ranks' own token
    means or stds (the old step metrics) was off by 10-40% here (adv/std 0.56 vs 0.98).
    value/clip_fraction is left out: its strict ``err_clip > err`` flips on 1-ulp ties where
    V - V_old is inside the clip (2 of 504 token evaluations in the 1-process run).
    Final weights, as in test_distributed.py: ``||w2 - w1|| <= 1e-4 ||w1 - w0||`` and
    ``max|w2 - w1| <= 1e-2 max|w1 - w0|`` (AdamW at lr 1e-2 turns float noise in a ~0 gradient
    entry into an O(lr) step; measured: actor L2 ratio 6e-6, max diff 1e-5)."""
    from safetensors.torch import load_file

    model_dir = _tiny_agent_setup(tmp_path)

    def argv(out):
        return ["train", "agent-ppo", f"model={model_dir}", f"dataset={tmp_path / 'rows.jsonl'}",
                f"eval_dataset={tmp_path / 'rows.jsonl'}", "eval_prompts=4", "env=agent_envs:CountEnv",
                f"output_dir={out}", "max_steps=2", "prompts_per_step=4", "samples_per_prompt=2",
                "minibatch_size=3", "ppo_epochs=2", "gamma=0.9", "lam=0.8", "max_turns=3",
                "max_completion_length=16", "max_episode_tokens=200", "learning_rate=1e-2", "beta=0.05",
                "progress=false", "tensorboard=false", "seed=0"]

    metrics = _run_one_and_two(tmp_path, argv)
    _assert_same_metrics(metrics, ("env/return", "env/turns", "env/model_tokens", "env/success", "reward/score",
                                   "eval/success", "eval/return"), 1e-6)
    _assert_same_metrics(metrics, ("loss/value", "loss/policy", "loss/total", "policy/approx_kl", "policy/entropy",
                                   "policy/clip_fraction", "policy/ratio_mean", "policy/ratio_max", "kl/ref",
                                   "kl/ref_sequence", "kl/coef_next", "reward/std", "reward/env/std", "returns/mean",
                                   "value/mean", "value/explained_variance", "adv/mean", "adv/std", "optim/grad_norm",
                                   "optim/critic_grad_norm"), 1e-4)
    # the actor, the critic's trunk and its value head (zero-initialized)
    init = load_file(str(model_dir / "model.safetensors"))
    trunk = {k.removeprefix("model."): v for k, v in init.items()}
    head = {"weight": torch.zeros(1, 32), "bias": torch.zeros(1)}
    for name, start in (("final/model.safetensors", init), ("final_critic/model.safetensors", trunk),
                        ("final_critic/value_head.safetensors", head)):
        w1, w2 = (load_file(str(tmp_path / tag / name)) for tag in ("one", "two"))
        assert w1.keys() == w2.keys() and set(w1) <= set(start), name
        moved = torch.cat([(w1[k] - start[k]).flatten() for k in w1])
        delta = torch.cat([(w1[k] - w2[k]).flatten() for k in w1])
        assert moved.abs().max() > 1e-3, name  # trained: the comparison below is not vacuous
        assert delta.norm() <= 1e-4 * moved.norm(), (name, float(delta.norm() / moved.norm()))
        assert delta.abs().max() <= 1e-2 * moved.abs().max(), (name, float(delta.abs().max() / moved.abs().max()))
