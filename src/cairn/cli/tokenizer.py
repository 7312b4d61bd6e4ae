"""`cairn tokenizer train`: learn an own byte-level BPE on a data source, for `cairn train --tokenizer DIR`."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from cairn.cli.options import Parser, Subcommands
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
    t.add_argument("--text-field", default="text", help="field holding the text in .jsonl/.parquet/hub data")
    t.add_argument("--txt-separator", default="<|endoftext|>", help="story separator line in .txt files")
    t.add_argument("--hub-split", default="train", help="split of a hub dataset (default train)")
    t.add_argument("--seed", type=int, default=42, help="shuffle seed of the split (default 42, as cairn train)")
    t.add_argument("--train-frac", type=float, default=0.8,
                   help="learn from the first fraction of the shuffled stories (default 0.8); use the "
                        "train_frac of your runs or less")
    t.add_argument("--n-samples", type=int, default=0, help="keep the first N shuffled stories (0 = all)")
    t.add_argument("--all", action="store_true", help="learn from every story (no held-out stories)")


def run(args: argparse.Namespace) -> int:
    from cairn.data.run_tokenizer import training_texts
    from cairn.tokenizer.base import gpt2
    from cairn.tokenizer.learn import bytes_per_token, train_bpe

    _check(args)
    learn, held_out = training_texts(args.data, text_field=args.text_field, txt_separator=args.txt_separator,
                                     hub_split=args.hub_split, seed=args.seed, n_samples=args.n_samples,
                                     train_frac=args.train_frac, all_stories=args.all)
    start = time.perf_counter()
    tok = train_bpe(learn, args.vocab_size, args.out, min_frequency=args.min_frequency)
    print(f"trained {tok.name}: {tok.vocab_size} tokens, <|endoftext|> = id {tok.eot_id}, on {len(learn)} stories "
          f"in {time.perf_counter() - start:.1f}s; wrote {Path(args.out) / 'tokenizer.json'}")
    if held_out:
        own, ref = bytes_per_token(tok, held_out), bytes_per_token(gpt2(), held_out)
        print(f"held-out {len(held_out)} stories: {own:.3f} bytes/token ({tok.name}) vs {ref:.3f} (gpt2)")
    print(f"use it with: cairn train --tokenizer {args.out} ...")
    return 0


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
