"""``trustrl label``: rank responses in the browser, rank them with a judge, or report.

    trustrl label --prompts P.jsonl --model DIR --k 4 --out judgements.jsonl   # sample, then rank
    trustrl label --candidates C.jsonl --out judgements.jsonl                  # ready responses
    trustrl label --candidates C.jsonl --out j.jsonl --judge RM_DIR|LM_DIR|module:function
    trustrl label stats judgements.jsonl
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import secrets
import sys
from pathlib import Path

__all__ = ["main", "build_parser", "needs_token"]


def needs_token(host: str) -> bool:
    """True unless ``host`` is a loopback name or address (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True  # a host name other than localhost: reachable from elsewhere


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trustrl label", description="Rank K responses per prompt in the browser "
                                "(or with a judge); `trustrl label stats LOG` reports counts and agreement.")
    src = p.add_argument_group("candidates (one of)")
    src.add_argument("--candidates", help="JSONL/JSON/CSV/parquet of rows {prompt, responses: [...], id?}")
    src.add_argument("--model", help="model directory to sample --k responses per prompt of --prompts from")
    src.add_argument("--prompts", help="prompts dataset (column --prompt-column) for --model")
    p.add_argument("--out", required=True, help="the judgement log (JSONL, appended; reopened to continue)")
    p.add_argument("--k", type=int, default=4, help="responses sampled per prompt (--model)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ahead", type=int, default=4, help="items sampled ahead of the furthest one shown")
    p.add_argument("--prompt-column", default="prompt")
    p.add_argument("--device", default="cpu")
    p.add_argument("--per-item", type=int, default=1, help="annotators that should rank each item (2+: agreement)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--token", default=None, help="access token (required, and generated if not given, when --host "
                   "is not a loopback address)")
    p.add_argument("--judge", default=None, help="rank with a judge instead of serving: a reward-model dir, a "
                   "generative judge model dir, or module:function")
    p.add_argument("--judge-template", default=None, help="generative judge: a file with the prompt template "
                   "({prompt}, {response})")
    p.add_argument("--judge-score-pattern", default=None, help="generative judge: regex of the score in its output")
    p.add_argument("--judge-timeout", type=float, default=60.0, help="seconds per judge call (as reward_timeout_s)")
    p.add_argument("--judge-on-error", choices=("raise", "default"), default="raise",
                   help="a judge fault stops (raise) or skips the item (default)")
    p.add_argument("--limit", type=int, default=None, help="judge only the first N items")
    return p


def _candidates(args: argparse.Namespace):
    from trustrl.label.candidates import FileCandidates, SampledCandidates

    if bool(args.candidates) == bool(args.model):
        raise ValueError("give --candidates FILE, or --model DIR with --prompts FILE (one of the two)")
    if args.candidates:
        return FileCandidates(args.candidates, prompt_column=args.prompt_column)
    if not args.prompts:
        raise ValueError("--model needs --prompts FILE")
    cache = Path(args.out).with_name(Path(args.out).stem + ".candidates.jsonl")
    return SampledCandidates(args.model, args.prompts, args.k, cache, max_new_tokens=args.max_new_tokens,
                             temperature=args.temperature, top_p=args.top_p, seed=args.seed, ahead=args.ahead,
                             prompt_column=args.prompt_column, device=args.device)


def cmd_stats(argv: list[str]) -> int:
    from trustrl.data import load_rows
    from trustrl.rankings import agreement_stats, current_judgements

    p = argparse.ArgumentParser(prog="trustrl label stats", description="counts and inter-annotator agreement")
    p.add_argument("log", help="judgement log written by trustrl label")
    p.add_argument("--json", action="store_true", help="print JSON")
    args = p.parse_args(argv)
    try:
        stats = agreement_stats(current_judgements(load_rows(args.log, required=()).rows, where=args.log))
    except (FileNotFoundError, ValueError) as err:
        print(f"trustrl label stats: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(stats, indent=2))
        return 0

    def fmt(x):
        return "n/a (no item ranked by two annotators)" if x is None else f"{x:.3f}"

    print(f"rankings: {stats['rankings']}  skips: {stats['skips']}  items ranked: {stats['items_ranked']}  "
          f"ranked by 2+: {stats['items_ranked_twice']}")
    for name, c in sorted(stats["per_annotator"].items()):
        print(f"  {name}: {c['rankings']} rankings, {c['skips']} skips")
    print(f"pairwise agreement: {fmt(stats['pairwise_agreement'])} over {stats['compared_pairs']} response pairs")
    print(f"Kendall tau-b (mean): {fmt(stats['kendall_tau_mean'])} over {stats['kendall_tau_n']} annotator pairs")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "stats":
        return cmd_stats(argv[1:])
    args = build_parser().parse_args(argv)
    from trustrl.label.store import JudgementStore

    try:
        store = JudgementStore(args.out, per_item=args.per_item)
        candidates = _candidates(args)
        if args.judge:
            from trustrl.label.judges import judge_items, resolve_judge

            template = Path(args.judge_template).read_text(encoding="utf-8") if args.judge_template else None
            judge = resolve_judge(args.judge, template=template, score_pattern=args.judge_score_pattern,
                                  device=args.device)
            counts = judge_items(candidates, store, judge, timeout_s=args.judge_timeout,
                                 on_error=args.judge_on_error, limit=args.limit)
            candidates.close()
            print(f"judge:{judge.name}: {counts['ranked']} ranked, {counts['skipped']} skipped (faults), "
                  f"{counts['already']} already in {args.out}")
            return 0
    except (FileNotFoundError, ValueError) as err:
        print(f"trustrl label: {err}", file=sys.stderr)
        return 2

    import uvicorn

    from trustrl.label.app import create_app

    token = args.token
    if needs_token(args.host) and not token:
        token = secrets.token_urlsafe(24)
    app = create_app(store, candidates, token=token, loopback=not needs_token(args.host))
    shown = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    url = f"http://{shown}:{args.port}/" + (f"?token={token}" if token else "")
    print(f"trustrl label: {len(candidates.item_ids)} items; judgements -> {args.out}", flush=True)
    print(f"trustrl label: open {url}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    candidates.close()
    return 0
