"""A big corpus for scale records: the shared TinyStories sample N times, sentence-shuffled, seeded.

    python benchmarks/scripts/scale_corpus.py --times 100 --out /tmp/big.jsonl [--sample DIR] [--seed 0]

Copy 0 is the sample as it is (its files in sorted order, as `cairn train --data DIR` reads them);
each later copy holds every story again with its sentences (cut after . ! or ? and a space) in an
order shuffled with a seed of its own, joined by single spaces. The vocabulary and the story
lengths stay those of the sample, while no two copies of a story are the same text, so a tokenizer,
a split or a cache sees N times the stories. The same --seed and --times always write the same
bytes. The 100x corpus of the 4,709-story sample is about 410 MB (471k stories); write it where
the disk has room (`df -h`) and delete it after.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SAMPLE = Path(os.environ.get("CAIRN_TINYSTORIES", REPO.parent / "shared" / "data" / "tinystories"))
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def shuffled(story: str, rng: random.Random) -> str:
    sentences = SENTENCE_END.split(story)
    rng.shuffle(sentences)
    return " ".join(sentences)


def write_corpus(stories: list[str], times: int, seed: int, out: Path) -> int:
    """Write the corpus as JSON Lines; return its bytes. Memory holds the sample, not the corpus."""
    n_bytes = 0
    with open(out, "w", encoding="utf-8") as f:
        for copy in range(times):
            rng = random.Random(f"{seed}:{copy}")
            for story in stories:
                line = json.dumps({"text": story if copy == 0 else shuffled(story, rng)}) + "\n"
                f.write(line)
                n_bytes += len(line.encode("utf-8"))
    return n_bytes


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sample", type=Path, default=SAMPLE, help="the shared sample (a folder of .jsonl files)")
    p.add_argument("--times", type=int, default=100, help="copies of the sample (the first as it is)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sentence shuffles")
    p.add_argument("--out", type=Path, required=True, help="the .jsonl file to write")
    args = p.parse_args()
    if args.times < 1:
        p.error("--times must be 1 or more")
    from cairn.data import clean_texts, load_texts

    stories = clean_texts(load_texts(str(args.sample)))
    n_bytes = write_corpus(stories, args.times, args.seed, args.out)
    print(f"{args.out}: {args.times} x {len(stories):,} stories = {args.times * len(stories):,} stories, "
          f"{n_bytes / 1e6:,.1f} MB", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
