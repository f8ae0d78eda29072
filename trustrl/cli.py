"""The command line: `trustrl demo | train {pretrain,sft,grpo,...} | label | classic | report | config-help`.

This is the only place that turns strings into objects; everything below takes typed configs.
A failure the user can fix (:class:`trustrl.errors.UserError`: config, data, model directory,
reward, sandbox) prints its message without a traceback and exits with status 2; ``--debug``
(any subcommand) or ``TRUSTRL_DEBUG=1`` prints the traceback too.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

from trustrl.errors import DEBUG_ENV, UserError, debug_requested

#: exit status of a failure the user can fix (as for a usage error)
USER_ERROR_STATUS = 2

TRAINERS = {
    "pretrain": ("trustrl.trainers.sft", "PretrainTrainer"),
    "sft": ("trustrl.trainers.sft", "SFTTrainer"),
    "grpo": ("trustrl.algorithms.grpo", "GRPOTrainer"),
    "rm": ("trustrl.trainers.reward_model", "RewardTrainer"),
    "ppo": ("trustrl.algorithms.ppo", "PPOTrainer"),
    "trpo": ("trustrl.algorithms.trpo", "TRPOTrainer"),
    "agent-grpo": ("trustrl.algorithms.agent", "AgentGRPOTrainer"),
    "agent-ppo": ("trustrl.algorithms.agent", "AgentPPOTrainer"),
}


def _quiet_transformers() -> None:
    """For the whole command: no transformers progress bars or log lines below ERROR, and no
    deprecation warnings from the model libraries; all shown with TRUSTRL_DEBUG (--debug)."""
    from trustrl.logging import hide_library_warnings

    if debug_requested():
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    hide_library_warnings()
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover
        pass


def _config_class(algo: str):
    import importlib

    from trustrl.config import CONFIG_CLASSES

    importlib.import_module(TRAINERS[algo][0])  # later trainers register their config class
    if algo not in CONFIG_CLASSES:
        raise SystemExit(f"trustrl: no config class for {algo!r}")
    return CONFIG_CLASSES[algo]


def _interrupted_message(config) -> str:
    """What a Ctrl-C outside the loop's own handling leaves, and the way on: ``--resume`` only
    when ``output_dir`` holds a checkpoint (it refuses otherwise)."""
    from trustrl.checkpoint import list_checkpoints
    from trustrl.trainers.run_dir import run_files

    out = Path(config.output_dir)
    if list_checkpoints(out) or config.resume not in ("never", "auto"):
        return f"interrupted; checkpoints already written in {out} are intact (resume with --resume)"
    if run_files(out):
        return (f"interrupted before the run's first checkpoint: nothing to resume; start it again with "
                f"--overwrite (moves {out} aside) or in a new output_dir")
    return f"interrupted before the run started; nothing was written to {out}: run the same command again"


def cmd_train(args: argparse.Namespace) -> int:
    import importlib

    from trustrl.config import ConfigError, load_config

    _quiet_transformers()
    cls = _config_class(args.algo)
    overrides = list(args.overrides)
    if args.resume:
        overrides.append("resume=auto")
    if args.overwrite:
        overrides.append("overwrite=true")
    if args.allow_changed:
        overrides.append(f"allow_changed=[{args.allow_changed}]")
    try:
        config = load_config(cls, args.config, overrides)
    except ConfigError as err:  # (under torchrun: printed once, not by every rank)
        return report_user_error(err, debug_requested())
    from trustrl import distributed

    module, name = TRAINERS[args.algo]
    joined_here = not distributed.is_distributed()
    try:  # under torchrun the trainer joins the process group (see docs/distributed.md)
        # (the trainer is gone before shutdown: its models are freed with the process group alive)
        result = getattr(importlib.import_module(module), name)(config).train()
        if distributed.is_main():
            from trustrl.logging import format_summary

            print(format_summary(result, title=f"trustrl train {args.algo}: {config.output_dir}"))
    except KeyboardInterrupt:  # a second Ctrl-C inside a step, or one before the loop started
        if os.environ.get("RANK", "0") in ("0", ""):  # torchrun interrupts every rank: said once
            print(f"\ntrustrl: {_interrupted_message(config)}", file=sys.stderr)
        return 130
    finally:
        if joined_here:  # leave the process group as it was found
            distributed.shutdown()
    if result.get("stopped_early"):  # a clean stop between steps (SIGINT/SIGTERM): not a finished run
        return 130
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from trustrl.config import ConfigError
    from trustrl.tasks.demo import DemoSettings, format_table, run_demo, summary_json

    _quiet_transformers()
    if args.pipeline == "agent":  # the robot in a text maze: SFT, then multi-turn GRPO
        from trustrl.tasks import agent_demo

        DemoSettings, run_demo = agent_demo.AgentDemoSettings, agent_demo.run_agent_demo  # noqa: N806
        format_table = agent_demo.format_agent_table
    settings = DemoSettings.quick() if args.quick else DemoSettings()
    settings.output_dir = args.output_dir
    settings.seed = args.seed
    settings.pipeline = args.pipeline
    settings.overwrite = args.overwrite
    try:
        settings = settings.with_overrides(args.overrides)
    except ConfigError as err:
        print(f"trustrl demo: {err}", file=sys.stderr)
        return 2
    from trustrl.tasks.demo import DemoStopped

    try:
        summary = run_demo(settings)  # an earlier demo there: a RunDirError (UserError), reported by main()
    except DemoStopped as stop:  # Ctrl-C / SIGTERM between two steps of a stage (its checkpoint is written)
        print(f"trustrl demo: {stop}; run the demo again with --overwrite to start afresh", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # a second Ctrl-C inside a step, or one between stages
        print("\ntrustrl demo: interrupted; run the demo again with --overwrite to start afresh", file=sys.stderr)
        return 130
    print()
    print(format_table(summary))
    print()
    print(f"summary: {Path(args.output_dir) / 'summary.json'}")
    print(f"report:  {Path(args.output_dir) / settings.pipeline_dir / 'report.html'}")
    if args.verbose:
        print(summary_json(summary))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from trustrl.report import write_report

    try:
        path = write_report(args.run_dirs, output=args.output)
    except (FileNotFoundError, ValueError) as err:
        print(f"trustrl report: {err}", file=sys.stderr)
        return 2
    print(path)
    return 0


def cmd_classic(argv: list[str]) -> int:
    from trustrl.classic.cli import main as classic_main

    return int(classic_main(argv) or 0)


def cmd_config_help(args: argparse.Namespace) -> int:
    from trustrl.config import describe

    cls = _config_class(args.algo)
    print(describe(cls))
    if "rewards" in cls.model_fields:  # the RL trainers: what each built-in reward takes
        from trustrl.rewards.catalog import describe_builtin_rewards

        print()
        print(describe_builtin_rewards())
    return 0


DEBUG_HELP = f"on an error, also print the traceback (or set {DEBUG_ENV}=1)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trustrl", description="RL post-training of language models.")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    # every subcommand takes --debug too (SUPPRESS: not given there keeps the top-level value)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser = sub.add_parser
    sub.add_parser = lambda *a, **k: add_parser(*a, parents=[common, *k.pop("parents", [])], **k)  # type: ignore

    demo = sub.add_parser("demo", help="pre-train, SFT and GRPO (or RM + PPO, or TRPO) on a built-in arithmetic task")
    demo.add_argument("--pipeline", choices=("grpo", "rlhf", "trpo", "agent"), default="grpo",
                      help="the RL stage: grpo (default), rlhf (reward model, then PPO against it), trpo, or agent "
                           "(a robot in a text maze: SFT on a sloppy teacher, then multi-turn GRPO)")
    demo.add_argument("--output-dir", default="runs/demo")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quick", action="store_true", help="tiny budgets (a smoke test)")
    demo.add_argument("--overwrite", action="store_true",
                      help="the output directory holds an earlier demo: move it aside whole to OUT.previous-<n>")
    demo.add_argument("--verbose", action="store_true")
    demo.add_argument("overrides", nargs="*", metavar="key=value",
                      help="change a setting of trustrl/tasks/demo.py:DemoSettings, e.g. grpo_steps=200 sft_carry_slip_rate=0")
    demo.set_defaults(func=cmd_demo)

    train = sub.add_parser("train", help="train with a YAML config and key=value overrides")
    train.add_argument("algo", choices=sorted(TRAINERS))
    train.add_argument("--config", help="YAML config file")
    train.add_argument("--resume", action="store_true",
                       help="continue the run in output_dir from its newest complete checkpoint (an error if it has none)")
    train.add_argument("--overwrite", action="store_true",
                       help="output_dir holds a run: move it aside whole to OUT.previous-<n> and start a new one")
    train.add_argument("--allow-changed", metavar="KEY,...", default=None,
                       help="with --resume: settings that may differ from the run's saved config.yaml")
    train.add_argument("overrides", nargs="*", help="key=value overrides, e.g. beta=0 lora.r=8")
    train.set_defaults(func=cmd_train)

    report = sub.add_parser("report", help="(re)generate report.html for a run directory, or compare several runs")
    report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="one run directory (writes RUN_DIR/report.html and RUN_DIR/plots/), or several to overlay")
    report.add_argument("--output", default=None, metavar="FILE",
                        help="HTML file to write (default: RUN_DIR/report.html; report-compare.html for several runs)")
    report.set_defaults(func=cmd_report)

    helpc = sub.add_parser("config-help", help="list a trainer's config keys with defaults and docs")
    helpc.add_argument("algo", choices=sorted(TRAINERS))
    helpc.set_defaults(func=cmd_config_help)

    sub.add_parser("label", help="rank K responses per prompt in the browser, or with a judge; `label stats` "
                   "(see trustrl label -h)", add_help=False)
    sub.add_parser("classic", help="classic RL: maze, TD, Q-learning, REINFORCE, PPO, TRPO (see trustrl classic -h)",
                   add_help=False)
    return parser


def report_user_error(err: UserError, debug: bool) -> int:
    """One message (a few lines) naming what to fix; the traceback only with ``debug``. Under
    torchrun the ranks agree on who prints it: once when every rank met it, prefixed with the
    rank(s) otherwise (:func:`trustrl.distributed.user_error_text`)."""
    if os.environ.get("WORLD_SIZE", "1") not in ("", "1"):
        from trustrl.distributed import user_error_text

        text = user_error_text(str(err))
    else:
        text = str(err)
    if text is None:  # a lower rank prints the same message
        return USER_ERROR_STATUS
    if debug:
        traceback.print_exception(err)
    print(f"trustrl: {text}", file=sys.stderr, flush=True)
    return USER_ERROR_STATUS


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested()
    if argv and argv[0] == "classic":
        rest = [a for a in argv[1:] if a != "--debug"]
        debug = debug or len(rest) < len(argv) - 1
        try:
            return cmd_classic(rest)
        except UserError as err:
            return report_user_error(err, debug)
    if argv and argv[0] == "label":
        from trustrl.label.cli import main as label_main

        try:
            return int(label_main(argv[1:]) or 0)
        except UserError as err:
            return report_user_error(err, debug)
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    debug = debug or bool(getattr(args, "debug", False))
    if args.command == "train":
        # key=value overrides may come before or after --config
        stray = [u for u in unknown if u.startswith("-") or "=" not in u]
        if stray:
            parser.error(f"unrecognized arguments: {' '.join(stray)}")
        args.overrides = list(args.overrides) + unknown
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    previous = os.environ.get(DEBUG_ENV)
    if debug:  # for this command, libraries' own output (transformers' bars, warnings) is shown too
        os.environ[DEBUG_ENV] = "1"
    try:
        return int(args.func(args) or 0)
    except UserError as err:
        return report_user_error(err, debug)
    finally:
        if previous is None:
            os.environ.pop(DEBUG_ENV, None)
        else:
            os.environ[DEBUG_ENV] = previous


if __name__ == "__main__":
    raise SystemExit(main())
