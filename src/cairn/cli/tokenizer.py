"""`cairn tokenizer train`: learn an own byte-level BPE on a data source, for `cairn train --tokenizer DIR`."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from cairn.cli.options import Parser, Subcommands, add_config_options
from cairn.util.errors import CairnError


def add_parser(sub: Subcommands) -> None:
    p = sub.add_parser("tokenizer", help="train an own byte-level BPE tokenizer (`tokenizer train`)",
                       description="Own tokenizers: `cairn tokenizer train` writes a directory that "
                                   "`cairn train --tokenizer DIR` uses.")
    p.set_defaults(func=run)
    tsub = p.add_subparsers(dest="tokenizer_command", metavar="SUBCOMMAND", parser_class=Parser)
    t = tsub.add_parser("train", help="train a byte-level BPE on a data source",
                        description="Learn a byte-level BPE (GPT-2's kind, with <|endoftext|> as a special token) "
                                    "on the cleaned stories of --data, by default only on the training split "
                                    "(`cairn train`'s seeded shuffle and cut), and report its compression on the "
                                    "held-out stories against GPT-2's.")
    t.add_argument("--data", required=True, help="data source, as for `cairn train --data`")
    t.add_argument("--vocab-size", type=int, required=True, help="tokens in the vocabulary (at most; >= 257)")
    t.add_argument("--out", required=True, metavar="DIR", help="directory to write tokenizer.json into")
    t.add_argument("--min-frequency", type=int, default=2, help="merge only pairs seen this often (default 2)")
    # the data options `cairn train` has, declared once (config/sections.py): learn from the training
    # split of the same seeded shuffle and cut; use the train_frac of the runs it is for, or less
    add_config_options(t, ("text_field", "txt_separator", "hub_split", "seed", "train_frac", "n_samples",
                           "tokenizer_sample_bytes"), keep_config=False)
    t.add_argument("--all", action="store_true", help="learn from every story (no held-out stories)")


def run(args: argparse.Namespace) -> int:
    from cairn.tokenizer.base import gpt2
    from cairn.tokenizer.learn import bytes_per_token, train_bpe

    _check(args)
    learn, held_out, what = _stories(args)
    start = time.perf_counter()
    tok = train_bpe(learn, args.vocab_size, args.out, min_frequency=args.min_frequency)
    print(f"trained {tok.name}: {tok.vocab_size} tokens, <|endoftext|> = id {tok.eot_id}, on {what} "
          f"in {time.perf_counter() - start:.1f}s; wrote {Path(args.out) / 'tokenizer.json'}")
    if held_out:
        own, ref = bytes_per_token(tok, held_out), bytes_per_token(gpt2(), held_out)
        print(f"held-out {len(held_out)} stories: {own:.3f} bytes/token ({tok.name}) vs {ref:.3f} (gpt2)")
    print(f"use it with: cairn train --tokenizer {args.out} ...")
    return 0


# the compression report scores a seeded sample of the held-out stories of about this many bytes
REPORT_BYTES = 4 << 20


def _stories(args: argparse.Namespace) -> tuple[list[str], list[str], str]:
    """(stories to learn from, held-out stories to report on, what was learned from). With a sample
    size, both are seeded samples streamed from the source, so memory holds the samples and not the
    corpus; with 0, every training story and every held-out story, as `cairn train` splits them."""
    from cairn.data.run_tokenizer import split_samples, training_texts

    common = dict(text_field=args.text_field, txt_separator=args.txt_separator, hub_split=args.hub_split,
                  seed=args.seed)
    if not args.tokenizer_sample_bytes:
        learn, held_out = training_texts(args.data, n_samples=args.n_samples, train_frac=args.train_frac,
                                         all_stories=args.all, **common)
        return learn, held_out, f"{len(learn):,} stories"
    sample, report = split_samples(args.data, args.tokenizer_sample_bytes, 0 if args.all else REPORT_BYTES,
                                   n_samples=0 if args.all else args.n_samples,
                                   train_frac=1.0 if args.all else args.train_frac, **common)
    what = f"{len(sample.texts):,} stories"
    if len(sample.texts) < sample.train_stories:
        what += (f" of {sample.train_stories:,} ({sample.n_bytes / 1e6:,.1f} of {sample.train_bytes / 1e6:,.1f} MB, "
                 "a seeded sample)")
    return sample.texts, report.texts, what


def _check(args: argparse.Namespace) -> None:
    """The subcommand and its options, refused before any data is read."""
    if args.tokenizer_command != "train":
        raise CairnError("give a subcommand: cairn tokenizer train --data SOURCE --vocab-size N --out DIR")
    for name in ("data", "out"):
        value: str = getattr(args, name)
        if not value.strip():
            raise CairnError(f"--{name} is empty: give a value (see `cairn tokenizer train --help`)")
    if args.seed < 0 or args.n_samples < 0:
        raise CairnError("--seed and --n-samples must be zero or more")
