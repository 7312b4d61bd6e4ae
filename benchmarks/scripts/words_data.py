"""Instruction data in TinyStoriesInstruct's spirit: "write a story that uses these three words".

For every story of the sample, three of its content words are chosen (seeded): words of three
letters or more that are not among the --common most frequent words of the whole sample, so the
task is not trivial (no "the", "was", "Lily"). The record is

    {"prompt": "Write a story that uses the words: w1, w2, w3.", "response": STORY, "words": [w1, w2, w3]}

Whole stories are held out, as `cairn train` splits them: the stories a `cpu-10min` run on the same
sample trains on (its train split: the same seed and fractions) become training records
(--train-out); the others, never seen by the base model or the fine-tuning, give the evaluation
prompts (--eval-out, --eval-n of them, a seeded sample).

    python benchmarks/scripts/words_data.py --data /work/shared/data/tinystories \
        --train-out runs/words-train.jsonl --eval-out runs/words-eval.jsonl
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import re
import sys
from pathlib import Path

import numpy as np

from cairn.data import clean_texts, load_texts, split_assignment
from cairn.config.presets import preset

WORD = re.compile(r"[A-Za-z]+")
PROMPT = "Write a story that uses the words: {}."


def words_of(text: str) -> list[str]:
    return [w.lower() for w in WORD.findall(text)]


def common_words(texts: list[str], n: int) -> set[str]:
    counts = collections.Counter(w for t in texts for w in words_of(t))
    return {w for w, _ in counts.most_common(n)}


def pick_words(text: str, common: set[str], rng: random.Random, k: int = 3) -> list[str] | None:
    """k distinct content words of the story (in the order they first appear), or None if it has fewer."""
    seen: dict[str, None] = {}
    for w in words_of(text):
        if len(w) >= 3 and w not in common:
            seen.setdefault(w, None)
    pool = list(seen)
    if len(pool) < k:
        return None
    chosen = set(rng.sample(pool, k))
    return [w for w in pool if w in chosen]


def build(data: str, common_n: int, seed: int, eval_n: int, base_samples: int = 0,
          per_story: int = 1) -> tuple[list[dict], list[dict], dict]:
    texts = clean_texts(load_texts(data))
    base = preset("cpu-10min").data  # the split the base run made of the same sample
    assign = split_assignment(len(texts), 42, base_samples or base.n_samples, base.train_frac, base.val_frac)
    # instruction stories: those the base never read when it was trained on part of the sample
    # (--n-samples), else its training stories; evaluation: its held-out ones, never trained on
    tune_split = -1 if base_samples else 0
    common = common_words(texts, common_n)
    # each story's first word set comes from one stream in file order, the extra ones (--per-story)
    # from another, so the evaluation prompts do not depend on --per-story
    rng, extra_rng = random.Random(seed), random.Random(seed + 1)
    train, held = [], []
    for i, text in enumerate(texts):
        if assign[i] not in (tune_split, 1, 2):
            continue
        for k in range(per_story if assign[i] == tune_split else 1):
            words = pick_words(text, common, extra_rng if k else rng)
            if words is None:
                break
            record = {"prompt": PROMPT.format(", ".join(words)), "response": text, "words": words}
            (train if assign[i] == tune_split else held).append(record)
    picked = sorted(np.random.default_rng(seed).choice(len(held), size=min(eval_n, len(held)), replace=False))
    evaluation = [held[i] for i in picked]
    info = {"stories": len(texts), "common_words_excluded": common_n, "base_samples": base_samples,
            "instruction_stories": int((assign == tune_split).sum()), "records_per_story": per_story,
            "train_records": len(train), "held_out_stories": len(held), "eval_prompts": len(evaluation),
            "seed": seed}
    return train, evaluation, info


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="the TinyStories sample (file or directory of .jsonl)")
    p.add_argument("--train-out", required=True, help="JSONL of training records")
    p.add_argument("--eval-out", required=True, help="JSONL of held-out evaluation prompts")
    p.add_argument("--common", type=int, default=300, help="most frequent words never chosen (default 300)")
    p.add_argument("--eval-n", type=int, default=100, help="evaluation prompts (default 100)")
    p.add_argument("--base-samples", type=int, default=0,
                   help="the --n-samples the base run was trained with: its unused stories become the "
                        "training records (default 0: the base read the whole sample; its training stories)")
    p.add_argument("--per-story", type=int, default=1,
                   help="training records per story, each with its own three words (default 1)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    train, evaluation, info = build(a.data, a.common, a.seed, a.eval_n, a.base_samples, a.per_story)
    for path, records in ((a.train_out, train), (a.eval_out, evaluation)):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    print(json.dumps(info), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
