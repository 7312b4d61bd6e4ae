"""Ablation for the words task: fine-tune with the loss on the asked words' tokens (and a sample of the rest).

`cairn train --format sft` takes the loss on every answer token. In a story of about 200 tokens the
three asked words are 3-6 of them, so nearly all of the gradient teaches the model to tell stories
and very little teaches it to take the words from the prompt. This script runs the same `cairn
train` command with one change to the training targets: an answer token stays a target when it
spells one of the record's words (cairn.tasks.words.word_token_positions), or with probability
--keep otherwise (the <|endoftext|> that ends the answer always stays). --keep 1 is plain SFT;
--keep 0 trains only the copying of the words. It measures how much of the words task a model of
this size can learn in the budget when the gradient goes to the words; it is an experiment, not a
training mode of cairn.

    python benchmarks/scripts/words_focus.py --keep 0.1 -- train --preset cpu-instruct \
        --init-from runs/base --data runs/words-train.jsonl --out runs/inst-focus10
"""

from __future__ import annotations

import argparse
import random
import re
import sys

import numpy as np

import cairn.data.formats.sft as sft
from cairn.cli import main as cairn_main
from cairn.tasks.words import word_token_positions
from words_data import PROMPT

ASKED = re.compile(re.escape(PROMPT).replace(re.escape("{}"), "(.*)"))  # the words of a words_data prompt


def focus(keep: float, seed: int):
    """sft.tokenize with the targets cut down to the asked words and a --keep sample of the rest."""
    rng = random.Random(seed)
    tokenize = sft.tokenize

    def tokenize_focused(conversation, template, tokenizer, seq_len, where):
        e = tokenize(conversation, template, tokenizer, seq_len, where)
        asked = ASKED.search(conversation[0]["content"])
        if asked is None:
            raise SystemExit(f"{where}: the prompt is not {PROMPT!r} with the words: make the data with words_data.py")
        words = [w.strip() for w in asked.group(1).split(",")]
        ids = e.ids.tolist()
        first = int(np.argmax(e.target))
        spelled = set(word_token_positions(tokenizer, ids, first, words))
        last = len(ids) - 1 if not e.cut else -1  # the <|endoftext|> that ends a whole answer
        for j in range(first, len(ids)):
            if e.target[j] and j not in spelled and j != last and rng.random() >= keep:
                e.target[j] = False
        return e

    return tokenize_focused


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--keep", type=float, required=True,
                   help="the fraction of other answer tokens that stay targets (0: only the asked words)")
    p.add_argument("--seed", type=int, default=0, help="which other tokens are kept")
    p.add_argument("cairn_args", nargs=argparse.REMAINDER, help="-- then a `cairn train` command line")
    a = p.parse_args(argv)
    args = a.cairn_args[1:] if a.cairn_args[:1] == ["--"] else a.cairn_args
    if not args or args[0] != "train":
        p.error("give a `cairn train ...` command line after --")
    sft.tokenize = focus(a.keep, a.seed)
    return cairn_main(args)


if __name__ == "__main__":
    sys.exit(main())
