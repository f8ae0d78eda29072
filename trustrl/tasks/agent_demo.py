"""`trustrl demo --pipeline agent`: the documents' robot in a text maze, trained as a language
agent on a CPU in minutes.

1. a tiny Llama-style model with a character tokenizer and a compact chat template, from
   scratch;
2. warm-up SFT on imperfect demonstrations: transcripts of a teacher that steers toward the
   exit but, in 60% of the turns where a wall is right ahead, walks into it anyway
   ("forward": a bump, the robot stays). The SFT model learns the format and the steering,
   and the teacher's habit: its greedy answer facing a wall is "forward", so it gets stuck;
3. multi-turn GRPO (:class:`trustrl.algorithms.agent.AgentGRPOTrainer`) in
   :class:`trustrl.envs.maze.TextMaze`: exit +1, wall -0.1, step -0.01; the group advantage
   of each episode's return on every model token. Held-out success (greedy episodes on 200
   layouts never seen in training) is measured before (the SFT model) and after.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from trustrl.envs.maze import ACTION_TEXT, expert_action, make_maze, maze_key, random_layouts, render_view, robot_view
from trustrl.tasks.demo import DemoSettings, check_demo_settings, finished_stage, set_aside_earlier_demo
from trustrl.tiny import CHAT_ROLE_TOKENS, CHAT_TEMPLATE, create_tiny_model_dir

CHARS = "abcdefghijklmnopqrstuvwxyz +-0123456789"


@dataclass
class AgentDemoSettings:
    """Budgets of the agent demo (the defaults are what `trustrl demo --pipeline agent` runs)."""

    output_dir: str = "runs/demo"
    """Run directory: data/, init/, sft/, agent/, summary.json."""
    seed: int = 0
    """Seeds the layouts drawn for training, initialization, data order and sampling (the held-out layouts are fixed)."""
    pipeline: str = "agent"
    """Always agent (the field keeps the CLI's settings uniform)."""
    overwrite: bool = False
    """output_dir holds an earlier demo: move it aside whole to OUT.previous-<n> (without it,
    such a start is refused before anything is written)."""
    hidden_size: int = 64
    """Width of the tiny model."""
    num_layers: int = 2
    """Decoder blocks."""
    num_heads: int = 4
    """Attention heads."""
    max_turns: int = 12
    """Model turns per episode (>= layout_turns: the slack is room to recover from a mistake)."""
    layout_turns: int = 8
    """Every layout (training and held-out) is one the expert solves in this many turns or fewer."""
    train_layouts: int = 2000
    """Training mazes (RL draws from them; the demonstrations play the first sft_episodes)."""
    eval_prompts: int = 200
    """Held-out mazes, played greedily before and after RL."""
    slip_rate: float = 0.6
    """Share of the teacher's turns facing a wall where it walks into it anyway."""
    sft_episodes: int = 1000
    """Demonstration episodes (one SFT row per turn)."""
    sft_steps: int = 200
    """SFT optimizer steps."""
    sft_batch: int = 32
    """SFT rows per step."""
    sft_lr: float = 3e-3
    """SFT learning rate (cosine)."""
    rl_steps: int = 30
    """Multi-turn GRPO steps."""
    prompts_per_step: int = 8
    """Mazes per GRPO step."""
    group_size: int = 8
    """Episodes per maze."""
    rl_lr: float = 4e-4
    """GRPO learning rate."""
    beta: float = 0.02
    """KL coefficient to the SFT model (0: no reference model)."""
    eval_every: int = 10
    """Evaluate every this many RL steps (and after the last)."""
    progress: bool = True
    """Progress bars."""
    torch_threads: int | None = 1
    """Intra-op threads (tiny matrices: one thread, as in the other demos)."""

    with_overrides = DemoSettings.with_overrides

    @property
    def pipeline_dir(self) -> str:
        return "agent"

    @classmethod
    def quick(cls, **overrides: Any) -> "AgentDemoSettings":
        base = dict(hidden_size=32, num_layers=1, num_heads=2, train_layouts=40, eval_prompts=8, sft_episodes=20,
                    sft_steps=4, sft_batch=8, rl_steps=2, prompts_per_step=2, group_size=2, eval_every=1,
                    max_turns=3, layout_turns=3, progress=False)
        base.update(overrides)
        return cls(**base)


EVAL_SEED = 10_007  # the held-out layouts do not depend on the run's seed


def teacher_episode(row: dict[str, Any], rng: random.Random, slip_rate: float, max_turns: int) -> list[dict]:
    """One demonstration: the sloppy teacher's transcript (user observations, assistant answers)."""
    env = make_maze(row)
    state, _ = env.reset()
    messages: list[dict] = []
    for _ in range(max_turns):
        view = robot_view(env, state)
        messages.append({"role": "user", "content": render_view(view)})
        action = expert_action(view)
        if not view["ahead"] and rng.random() < slip_rate:
            action = 0  # the habit: walk on into the wall
        messages.append({"role": "assistant", "content": ACTION_TEXT[action]})
        state, _, terminated, _, _ = env.step(action)
        if terminated:
            break
    return messages


def write_agent_data(out: Path, s: AgentDemoSettings) -> dict[str, Path]:
    from trustrl.data import write_jsonl

    out.mkdir(parents=True, exist_ok=True)
    held_out = random_layouts(s.eval_prompts, EVAL_SEED, max_turns=s.layout_turns)
    train = random_layouts(s.train_layouts, s.seed, max_turns=s.layout_turns, exclude={maze_key(r) for r in held_out})
    rng = random.Random(s.seed)
    sft_rows = []
    for row in train[: s.sft_episodes]:
        messages = teacher_episode(row, rng, s.slip_rate, s.max_turns)
        for k in range(1, len(messages), 2):  # one row per assistant turn: the loss on that turn
            sft_rows.append({"messages": messages[: k + 1]})
    return {"train": write_jsonl(out / "maze_train.jsonl", train), "eval": write_jsonl(out / "maze_eval.jsonl", held_out),
            "sft": write_jsonl(out / "maze_sft.jsonl", sft_rows)}


def run_agent_demo(s: AgentDemoSettings) -> dict[str, Any]:
    """Tiny model -> SFT on the sloppy teacher -> multi-turn GRPO; writes and returns summary.json."""
    import torch

    from trustrl.algorithms.agent import AgentGRPOTrainer
    from trustrl.config import ConfigError, SFTConfig
    from trustrl.config.agent import AgentGRPOConfig
    from trustrl.logging import write_json_atomic
    from trustrl.report import write_report
    from trustrl.trainers.sft import SFTTrainer

    check_demo_settings(s)
    if s.max_turns < s.layout_turns:
        raise ConfigError(f"demo setting max_turns={s.max_turns} is below layout_turns={s.layout_turns}: "
                          "some mazes could not be solved even by the expert")
    if s.torch_threads:
        torch.set_num_threads(s.torch_threads)
    started = time.time()
    out = Path(s.output_dir)
    set_aside_earlier_demo(out, s.overwrite)
    data = write_agent_data(out / "data", s)
    timings: dict[str, float] = {}
    common = dict(seed=s.seed, progress=s.progress, tensorboard=True, device="cpu")
    max_tokens = 40 + s.max_turns * 60
    init_dir = create_tiny_model_dir(out / "init", chars=CHARS, special_tokens=CHAT_ROLE_TOKENS, seed=s.seed,
                                     chat_template=CHAT_TEMPLATE, hidden_size=s.hidden_size, num_layers=s.num_layers,
                                     num_heads=s.num_heads, max_position_embeddings=max_tokens)
    t = time.time()
    sft = SFTTrainer(SFTConfig(model=str(init_dir), dataset=str(data["sft"]), output_dir=str(out / "sft"),
                               max_steps=s.sft_steps, batch_size=s.sft_batch, learning_rate=s.sft_lr,
                               lr_scheduler="cosine", warmup_steps=min(20, s.sft_steps // 5), max_length=max_tokens,
                               **common)).train()
    finished_stage("sft", sft)
    timings["sft"] = time.time() - t
    cfg = AgentGRPOConfig(model=sft["model_dir"], dataset=str(data["train"]), eval_dataset=str(data["eval"]),
                          output_dir=str(out / "agent"), env="trustrl.envs.maze:TextMaze", max_turns=s.max_turns,
                          unfinished_turn_reward=-1.0,  # below a stuck episode's -0.88: never ending a turn is no escape
                          max_completion_length=12, max_episode_tokens=max_tokens, max_steps=s.rl_steps,
                          prompts_per_step=s.prompts_per_step, group_size=s.group_size, learning_rate=s.rl_lr,
                          beta=s.beta, temperature=1.0, eval_prompts=s.eval_prompts, eval_every=s.eval_every,
                          save_every=0, sample_every=5, **common)
    t = time.time()
    rl = finished_stage("agent_grpo", AgentGRPOTrainer(cfg).train())
    timings["agent_grpo"] = time.time() - t
    summary = {
        "pipeline": "agent",
        "success_before_rl": rl["accuracy_first"],
        "success_after_rl": rl["accuracy_last"],
        "success_gain_points": 100 * (rl["accuracy_last"] - rl["accuracy_first"]),
        "eval_episodes": s.eval_prompts,
        "sft_final_loss": sft["final_loss"],
        "eval_history": rl["eval_history"],
        "stage_seconds": timings,
        "wall_seconds": time.time() - started,
        "final_model": rl["model_dir"],
        "settings": asdict(s),
    }
    import json

    row = json.loads(Path(data["eval"]).read_text().splitlines()[0])
    summary["transcript_before_rl"] = held_out_transcript(sft["model_dir"], row, s.max_turns, max_tokens)
    summary["transcript_after_rl"] = held_out_transcript(rl["model_dir"], row, s.max_turns, max_tokens)
    write_json_atomic(out / "summary.json", summary)
    write_report(out / "agent")
    return summary


def held_out_transcript(model_dir: str, row: dict[str, Any], max_turns: int, max_tokens: int) -> str:
    """One greedy held-out episode of the model in ``model_dir``, as ``role: content`` lines."""
    import torch

    from trustrl.envs.api import EnvPolicy
    from trustrl.envs.chat import TurnRenderer
    from trustrl.envs.episodes import EpisodeLimits, run_episodes
    from trustrl.envs.maze import TextMaze
    from trustrl.models import load_policy, load_tokenizer

    tok = load_tokenizer(model_dir)
    model = load_policy(model_dir, dtype="float32", device="cpu", tokenizer=tok)
    episode = run_episodes(model, tok, [TextMaze()], [row], env_seeds=[0], limits=EpisodeLimits(max_turns, 12, max_tokens),
                           renderer=TurnRenderer(tok), policy=EnvPolicy(), env_name="TextMaze", labels=["held-out 0"],
                           device=torch.device("cpu"), greedy=True)[0]
    end = "reached the exit" if episode.success else "truncated" if episode.truncated else "ended"
    return f"{episode.transcript()}\n({end}; return {episode.env_return:+.2f} in {episode.turns} turns)"


def format_agent_table(summary: dict[str, Any]) -> str:
    st = summary["stage_seconds"]
    rows = [("stage", "result", "seconds"),
            ("SFT", f"loss {summary['sft_final_loss']:.3f} (sloppy teacher)", f"{st['sft']:.0f}"),
            ("agent GRPO", f"held-out success {100 * summary['success_before_rl']:.1f}% -> "
                           f"{100 * summary['success_after_rl']:.1f}%", f"{st['agent_grpo']:.0f}"),
            ("total", f"{summary['success_gain_points']:+.1f} points from RL", f"{summary['wall_seconds']:.0f}")]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)
