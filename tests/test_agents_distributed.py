"""Multi-turn GRPO data parallel: 2 processes (torchrun, gloo) end where 1 process ends."""

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


def test_two_processes_play_and_train_like_one(tmp_path):
    from safetensors.torch import load_file

    from trustrl.tiny import CHAT_ROLE_TOKENS, CHAT_TEMPLATE, create_tiny_model_dir

    model_dir = create_tiny_model_dir(tmp_path / "model", chars="ab", special_tokens=CHAT_ROLE_TOKENS,
                                      chat_template=CHAT_TEMPLATE, seed=0, hidden_size=32, num_layers=1, num_heads=2,
                                      max_position_embeddings=512)
    rows = [{"n": 1 + i % 3, "turns": 2 + i % 2} for i in range(8)]
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "worker.py").write_text(WORKER)

    def argv(out):  # 4 rows x 4 episodes per step: 2 groups per rank; 6 held-out rows: 3 per rank
        return ["train", "agent-grpo", f"model={model_dir}", f"dataset={tmp_path / 'rows.jsonl'}",
                f"eval_dataset={tmp_path / 'rows.jsonl'}", "eval_prompts=6", "env=agent_envs:CountEnv",
                f"output_dir={out}", "max_steps=2", "prompts_per_step=4", "group_size=4", "max_turns=3",
                "max_completion_length=16", "max_episode_tokens=200", "learning_rate=1e-2", "beta=0.04",
                "progress=false", "tensorboard=false", "seed=0"]

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "TRUSTRL_NO_PROGRESS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
              "--master_port", str(_free_port()), str(tmp_path / "worker.py"), *argv(tmp_path / "two")]
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
    # the same episodes (counter-based sampling) and metrics; weights equal up to the order of
    # the gradient sums
    metrics = {}
    for tag in ("one", "two"):
        metrics[tag] = [json.loads(line) for line in (tmp_path / tag / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(metrics["one"], metrics["two"]):
        for key in ("env/return", "env/turns", "env/model_tokens", "eval/success", "eval/return"):
            if key in a:
                assert abs(a[key] - b[key]) <= 1e-6 * max(1.0, abs(a[key])), (a["step"], key, a[key], b[key])
    w1 = load_file(str(tmp_path / "one" / "final" / "model.safetensors"))
    w2 = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=1e-5, rtol=1e-4), k
