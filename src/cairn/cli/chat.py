"""`cairn chat`: talk to an instruction-tuned run in the terminal (or through a pipe)."""

from __future__ import annotations

import argparse
import sys

from cairn.cli.options import Subcommands, add_device, add_sampling, sampling
from cairn.inference.sampling import STORY

# the sampling settings `cairn chat` offers as options, in the order its --help lists them
SAMPLING = ("max_new_tokens", "temperature", "top_k", "seed")


def add_parser(sub: Subcommands) -> None:
    p = sub.add_parser("chat", help="talk to an instruction-tuned run in the terminal",
                       description="Type an instruction, the answer streams. The conversation is kept while it fits "
                                   "the context (then its oldest turns are dropped). Commands: /reset, "
                                   "/temperature T, /quit. Reads lines from stdin, so it can be piped. The first "
                                   "answer is sampled with --seed, the next with --seed + 1, and so on.")
    p.set_defaults(func=run)
    p.add_argument("path", metavar="RUN_DIR_OR_CHECKPOINT")
    add_sampling(p, STORY, SAMPLING)
    add_device(p)


def run(args: argparse.Namespace) -> int:
    from cairn.checkpoint.load import load
    from cairn.data.formats import get_format
    from cairn.inference.chat import ChatSession, run_chat
    from cairn.runtime.device import set_threads
    from cairn.tokenizer.chat_template import ChatTemplate

    s = sampling(args, STORY, SAMPLING)
    set_threads(0)
    loaded = load(args.path, args.device, merge=True)
    if not get_format(loaded.config.data.format).chat:
        print(f"({loaded.path} was not instruction-tuned (data.format {loaded.config.data.format!r}): its answers "
              "continue the template's text)", file=sys.stderr)
    session = ChatSession(loaded.model, loaded.tokenizer, ChatTemplate.from_config(loaded.config.chat), s)
    run_chat(session, sys.stdin, sys.stdout, sys.stderr, interactive=sys.stdin.isatty())
    return 0
