"""trustrl.classic vs Stable-Baselines3 on classic control: same budgets, same evaluation.

    python bench/classic_vs_sb3.py                # 3 seeds, full budgets (~30-40 min on 2 cores)
    python bench/classic_vs_sb3.py --seeds 1 --quick         # smoke test
    python bench/classic_vs_sb3.py --seed-list 3,4 --tasks cartpole-trpo

Tasks (budgets from the issue; SB3 with the rl-baselines3-zoo tuned hyper-parameters):

    CartPole-v1  PPO   100k steps   SB3 PPO: 8 envs x 32, batch 256, 20 epochs, gamma 0.98,
                                    lambda 0.8, lr and clip linear from 1e-3 / 0.2
    CartPole-v1  TRPO  100k steps   sb3_contrib TRPO: 2 envs x 512, batch 512, cg_damping 1e-3,
                                    gamma 0.99, lambda 0.98, critic lr 1e-3, 20 critic updates
    Pendulum-v1  PPO   200k steps   SB3 PPO: 4 envs x 1024, batch 64, 10 epochs, gamma 0.9,
                                    lambda 0.95, lr 1e-3, gSDE (sde_sample_freq 4)

trustrl runs its built-in presets (``trustrl classic --algo A --env E`` with no other flag).
Every (framework, task, seed) trial runs in a fresh subprocess with ``OMP_NUM_THREADS=1`` and
``torch.set_num_threads(1)``; both frameworks are measured in the same run, trials
alternating between them, so drifts in machine load hit both (the load average at the start
and the end is printed and saved). Reported
wall time is the training time only (``model.learn`` / ``trainer.train`` minus the final
evaluation), excluding imports; the training's process CPU time (``time.process_time``) is
reported beside it: on a shared, busy machine the wall time of a single-threaded process is
mostly the scheduler's doing, its CPU time much less so. Both frameworks are scored by the same function:
10 deterministic episodes (greedy / mean action) on fresh envs seeded 10000 + seed + i.

Bench-only dependencies: ``pip install stable-baselines3 sb3-contrib psutil``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

TASKS = [
    # (task id, env, algo, budget, quick budget)
    ("cartpole-ppo", "CartPole-v1", "ppo", 100_000, 30_000),
    ("cartpole-trpo", "CartPole-v1", "trpo", 100_000, 30_000),
    ("pendulum-ppo", "Pendulum-v1", "ppo", 200_000, 50_000),
]


# ----------------------------------------------------------------------------- workers
def _worker_trustrl(env_id: str, algo: str, steps: int, seed: int) -> dict:
    import torch

    torch.set_num_threads(1)
    from trustrl.classic.cli import make_trainer

    trainer = make_trainer(algo, env_id, seed)
    summary = trainer.train(steps, None)
    return {"returns": summary["eval_returns"], "train_seconds": summary["train_seconds"],
            "train_cpu_seconds": summary["train_cpu_seconds"], "env_steps": summary["env_steps"]}


def _sb3_model(env_id: str, algo: str, seed: int):
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env

    if env_id == "CartPole-v1" and algo == "ppo":
        env = make_vec_env(env_id, n_envs=8, seed=seed)
        return PPO("MlpPolicy", env, n_steps=32, batch_size=256, gae_lambda=0.8, gamma=0.98, n_epochs=20,
                   ent_coef=0.0, learning_rate=lambda p: 1e-3 * p, clip_range=lambda p: 0.2 * p,
                   seed=seed, device="cpu", verbose=0)
    if env_id == "CartPole-v1" and algo == "trpo":
        from sb3_contrib import TRPO

        env = make_vec_env(env_id, n_envs=2, seed=seed)
        return TRPO("MlpPolicy", env, n_steps=512, batch_size=512, cg_damping=1e-3, gae_lambda=0.98,
                    gamma=0.99, learning_rate=1e-3, n_critic_updates=20, seed=seed, device="cpu", verbose=0)
    if env_id == "Pendulum-v1" and algo == "ppo":
        env = make_vec_env(env_id, n_envs=4, seed=seed)
        return PPO("MlpPolicy", env, n_steps=1024, gae_lambda=0.95, gamma=0.9, n_epochs=10, ent_coef=0.0,
                   learning_rate=1e-3, clip_range=0.2, use_sde=True, sde_sample_freq=4, seed=seed,
                   device="cpu", verbose=0)
    raise ValueError(f"classic_vs_sb3: no SB3 setup for {algo} on {env_id}")


def _worker_sb3(env_id: str, algo: str, steps: int, seed: int) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(1)
    from trustrl.classic.common import evaluate_policy

    model = _sb3_model(env_id, algo, seed)
    t0, cpu0 = time.perf_counter(), time.process_time()
    model.learn(total_timesteps=steps)
    train_seconds, train_cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0

    def act(obs: np.ndarray) -> np.ndarray:
        return model.predict(obs, deterministic=True)[0]

    returns = evaluate_policy(env_id, act, 10, seed=10_000 + seed)
    return {"returns": returns, "train_seconds": train_seconds, "train_cpu_seconds": train_cpu_seconds,
            "env_steps": int(model.num_timesteps)}


def _run_trial(framework: str, env_id: str, algo: str, steps: int, seed: int) -> dict:
    cmd = [sys.executable, __file__, "--_worker", framework, env_id, algo, str(steps), str(seed)]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"{framework} {algo} {env_id} seed {seed} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------ driver
def _fmt_ret(vals: list[float]) -> str:
    if len(vals) == 1:
        return f"{vals[0]:.1f}"
    return f"{statistics.mean(vals):.1f} ± {statistics.pstdev(vals):.1f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3, help="number of seeds: 3 -> seeds 0, 1, 2")
    p.add_argument("--seed-list", default=None, help="explicit comma list of seeds (overrides --seeds)")
    p.add_argument("--quick", action="store_true", help="smaller budgets (a smoke test, not the numbers)")
    p.add_argument("--tasks", default="all", help="comma list of " + ",".join(t[0] for t in TASKS))
    p.add_argument("--json", default=str(REPO / "bench" / "out" / "classic_vs_sb3.json"))
    p.add_argument("--_worker", nargs=5, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args._worker:
        framework, env_id, algo, steps, seed = args._worker
        fn = _worker_trustrl if framework == "trustrl" else _worker_sb3
        print(json.dumps(fn(env_id, algo, int(steps), int(seed))))
        return 0

    seeds = [int(x) for x in args.seed_list.split(",")] if args.seed_list else list(range(args.seeds))
    if not seeds:
        p.error("no seeds to run")
    tasks = [t for t in TASKS if args.tasks == "all" or t[0] in args.tasks.split(",")]
    results: dict[str, dict] = {}
    load_start = os.getloadavg()
    print(f"load average at start: {load_start[0]:.1f} {load_start[1]:.1f} {load_start[2]:.1f}", flush=True)
    flip = False
    for task, env_id, algo, steps, quick_steps in tasks:
        budget = quick_steps if args.quick else steps
        res = results.setdefault(task, {"env": env_id, "algo": algo, "budget": budget,
                                        "trustrl": [], "sb3": []})
        for seed in seeds:
            order = ("sb3", "trustrl") if flip else ("trustrl", "sb3")
            flip = not flip
            for fw in order:
                r = _run_trial(fw, env_id, algo, budget, seed)
                r["seed"] = seed
                r["eval_mean_return"] = statistics.mean(r["returns"])
                res[fw].append(r)
                print(f"  {task:14s} seed {seed} {fw:8s} return {r['eval_mean_return']:8.1f}  "
                      f"train {r['train_seconds']:7.1f} s wall, {r['train_cpu_seconds']:7.1f} s CPU", flush=True)

    header = ("| task | algo | budget | seeds | trustrl return | SB3 return | trustrl wall s | SB3 wall s "
              "| wall ratio trustrl/SB3 | trustrl CPU s | SB3 CPU s | CPU ratio |")
    lines = [header, "|" + "---|" * 12]
    for task, res in results.items():
        tr = [r["eval_mean_return"] for r in res["trustrl"]]
        sb = [r["eval_mean_return"] for r in res["sb3"]]
        tw = [r["train_seconds"] for r in res["trustrl"]]
        sw = [r["train_seconds"] for r in res["sb3"]]
        tc = [r["train_cpu_seconds"] for r in res["trustrl"]]
        sc = [r["train_cpu_seconds"] for r in res["sb3"]]
        ratio = statistics.mean(tw) / statistics.mean(sw)
        cpu_ratio = statistics.mean(tc) / statistics.mean(sc)
        lines.append(f"| {res['env']} | {res['algo'].upper()} | {res['budget']:,} | {len(tr)} | {_fmt_ret(tr)} "
                     f"| {_fmt_ret(sb)} | {statistics.mean(tw):.1f} | {statistics.mean(sw):.1f} | {ratio:.2f} "
                     f"| {statistics.mean(tc):.1f} | {statistics.mean(sc):.1f} | {cpu_ratio:.2f} |")
        res["ratio"] = ratio
        res["cpu_ratio"] = cpu_ratio
    table = "\n".join(lines)
    load_end = os.getloadavg()
    print(f"\nload average at end: {load_end[0]:.1f} {load_end[1]:.1f} {load_end[2]:.1f}")
    print()
    print(table)
    print("\nper seed (eval mean return over 10 deterministic episodes):")
    for task, res in results.items():
        for fw in ("trustrl", "sb3"):
            per = ", ".join(f"s{r['seed']}: {r['eval_mean_return']:.1f} ({r['train_seconds']:.1f} s wall, "
                            f"{r['train_cpu_seconds']:.1f} s CPU)" for r in res[fw])
            print(f"  {task:14s} {fw:8s} {per}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"argv": sys.argv, "results": results, "table": table,
                               "load_start": load_start, "load_end": load_end}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
