"""`cairn eval`: a trained model's held-out loss, perplexity and bits per byte, the words task's score, or
lm-evaluation-harness tasks."""

from __future__ import annotations

import argparse
import json
import sys

from cairn.cli.options import Subcommands, add_device, not_empty, sampling
from cairn.inference.sampling import WORDS
from cairn.util.errors import CairnError
from cairn.util.log import setup as setup_logging

# what --json prints of the loss task: the scores, then the scoring's own time (loading left out)
LOSS_FIELDS = ("loss", "perplexity", "bits_per_byte", "tokens", "positions", "seconds", "tokens_per_s")


def add_parser(sub: Subcommands) -> None:
    p = sub.add_parser("eval", help="held-out loss, perplexity and bits per byte of a trained model",
                       description="Evaluate a run's final checkpoint (or the given checkpoint directory).")
    p.set_defaults(func=run)
    p.add_argument("path", metavar="RUN_DIR_OR_CHECKPOINT")
    p.add_argument("--data", help="evaluate every story of this source (no split) instead of the run's split")
    p.add_argument("--split", choices=("train", "val", "test"), default="test",
                   help="split of the run's data (default test; train shows how far it overfits)")
    p.add_argument("--batch-size", type=int, default=0,
                   help="rows of up to seq_len tokens per batch (default: 8192 tokens, or the run's batch if larger)")
    p.add_argument("--stride", type=int, default=None,
                   help="a story longer than the run's seq_len is read in windows of seq_len inputs, each scoring the "
                        "next STRIDE targets after the ones before it, the rest of the window their context (default: "
                        "the run's eval.stride, 0 = half of seq_len, each input run about twice; seq_len = no overlap, "
                        "each input run once with less context)")
    add_device(p)
    p.add_argument("--json", action="store_true",
                   help="print one JSON object: loss, perplexity, bits_per_byte, tokens (the targets scored), "
                        "positions (the inputs run), seconds and tokens_per_s (of the scoring, loading left out)")
    p.add_argument("--task", choices=("loss", "words"), default="loss",
                   help="loss: held-out loss (default); words: one story per prompt of --data (JSONL with "
                        "\"prompt\" and \"words\"), the fraction that use all their words")
    p.add_argument("--harness", metavar="TASKS",
                   help="run lm-evaluation-harness tasks (comma-separated): cairn_story_ppl (perplexity and bits "
                        "per byte of the held-out stories), cairn_story_ending (pick each story's last sentence "
                        "among 4), cairn_stories (both; built from --split or --data), or lm-eval's own task names")
    p.add_argument("--seed", type=int, default=WORDS.seed,
                   help=f"words: the first prompt's sampling seed, + 1 for each next; harness: the seed of the "
                        f"story endings' choices and of lm-eval (default {WORDS.seed})")
    p.add_argument("--limit", type=int, default=0,
                   help="words: only the first N prompts; harness: the first N documents of each task (default all)")


def run(args: argparse.Namespace) -> int:
    from cairn.runtime.device import set_threads

    not_empty(args, "eval", "data", "harness")
    setup_logging(stream=sys.stderr)
    set_threads(0)
    if args.stride is not None and (args.harness is not None or args.task != "loss"):
        raise CairnError("--stride sets the windows of the loss task: leave it out with --harness or --task words")
    if args.harness is not None:
        if args.task != "loss":
            raise CairnError("--harness runs lm-eval's tasks: leave out --task")
        return _harness(args)
    if args.task == "words":
        return _words(args)
    return _loss(args)


def _harness(args: argparse.Namespace) -> int:
    from cairn.eval.harness import evaluate_harness, table

    r = evaluate_harness(args.path, args.harness, data=args.data, split=args.split, device=args.device,
                         limit=args.limit, seed=args.seed)
    if args.json:
        print(json.dumps(r))
    else:
        print(f"{r['checkpoint']}" + (f", story tasks on {r['what']}" if r["what"] else "")
              + f" (lm-eval {r['lm_eval']})")
        print(table(r))
    return 0


def _loss(args: argparse.Namespace) -> int:
    from cairn.eval.run import evaluate_run

    r = evaluate_run(args.path, data=args.data, split=args.split, batch_size=args.batch_size, device=args.device,
                     stride=args.stride)
    if args.json:
        print(json.dumps({k: r[k] for k in LOSS_FIELDS}))
    else:
        print(f"{r['checkpoint']} on {r['what']}: loss {r['loss']:.4f} nats/token, perplexity {r['perplexity']:.2f}, "
              f"{r['bits_per_byte']:.4f} bits/byte, {r['tokens']:,} tokens")
        print(f"scored in {r['seconds']:.2f} s, {r['tokens_per_s']:,.0f} tokens/s; {r['positions']:,} inputs run, "
              f"{r['positions'] / max(r['tokens'], 1):.2f} per token scored")
    return 0


def _words(args: argparse.Namespace) -> int:
    from cairn.tasks.words import evaluate_words

    if args.data is None:
        raise CairnError("--task words needs --data FILE.jsonl of prompts with their \"words\"")
    if args.limit < 0:
        raise CairnError(f"--limit must be zero (all) or more, got {args.limit}")
    r = evaluate_words(args.path, args.data, device=args.device, sampling=sampling(args, WORDS, ("seed",)),
                       limit=args.limit)
    if args.json:
        print(json.dumps(r))
    else:
        print(f"{r['checkpoint']}: {r['honoured']} of {r['prompts']} stories use all their words "
              f"({100 * r['rate']:.1f}%); {100 * r['word_rate']:.1f}% of the single words"
              + ("" if r["prompt_gain"] is None else
                 f"; prompt gain {r['prompt_gain']:.2f} nats per word token (teacher-forced on the stories)"))
    return 0
