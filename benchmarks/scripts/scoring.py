"""Scoring against training speed, in one process: for the tiny preset's model and cpu-10min's
shape (random weights, bf16 autocast as those runs choose on an avx512_bf16 CPU), training
tokens/s (forward, backward, AdamW on packed windows of the run's batch) and held-out scoring
tokens/s of the old path (the run's batch of rows in the seeded order, logits for every position)
and the new one (rows sorted by length in batches of up to SCORE_TOKENS positions, logits for the
scored positions only), alternating, on the same fixed sample of validation windows; and the
bits per byte of both paths on those rows.

    python benchmarks/scripts/scoring.py --data ../shared/data/tinystories \
        --json benchmarks/records/scoring-epyc-avx512-bf16.json

The tokens are GPT-2's; for cpu-10min's 4096-token vocabulary they are taken modulo 4096 (the
speed depends on the shapes, not on which tokens), and its figure is then bits per token (a table
of one byte per token), which the two paths must equal as well.
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from typing import Any, Callable

import numpy as np
import torch

import cairn.model.transformer as transformer
from cairn.bench import record
from cairn.config.presets import preset
from cairn.data.batching import PackedDataset, ScoreBatches, StoryWindows, make_loader, score_sample
from cairn.data.cache import SplitTokens, prepare_data
from cairn.eval.metrics import evaluate
from cairn.model import ops
from cairn.model.transformer import Transformer
from cairn.runtime.device import autocast
from cairn.tokenizer.base import gpt2

CPU = torch.device("cpu")


def old_head(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """The head before scoring skipped unscored rows: logits for every row."""
    compute = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else h.dtype
    with torch.autocast("cpu", enabled=False):
        return ops._chunked(h, weight, labels, chunk, compute, need_grad=False)[0]


def score_old(model: Transformer, rows: StoryWindows, which: np.ndarray, batch: int, table: np.ndarray) -> dict:
    subset = _Subset(rows, which)
    new = transformer.linear_cross_entropy
    transformer.linear_cross_entropy = old_head
    try:
        return evaluate(model, make_loader(subset, batch, shuffle=False, seed=0, epoch=0, drop_last=False),
                        CPU, "bf16", table)
    finally:
        transformer.linear_cross_entropy = new


def score_new(model: Transformer, rows: StoryWindows, which: np.ndarray, table: np.ndarray) -> dict:
    return evaluate(model, ScoreBatches(rows, which), CPU, "bf16", table)


class _Subset:
    ragged = True

    def __init__(self, rows: StoryWindows, which: np.ndarray):
        self.rows, self.which = rows, which

    def __len__(self) -> int:
        return len(self.which)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.rows[int(self.which[i])]


def train_tokens_per_s(model: Transformer, train: PackedDataset, batch: int, steps: int) -> float:
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loader = iter(make_loader(train, batch, shuffle=True, seed=0, epoch=0, drop_last=True))
    times = []
    for _ in range(steps + 1):
        b = next(loader)
        t = time.perf_counter()
        with autocast(CPU, "bf16"):
            loss, n = model(b["input_ids"], labels=b["labels"])
        (loss / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return batch * train.seq_len / float(np.median(times[1:]))


def timed(f: Callable[[], dict]) -> tuple[dict, float]:
    t = time.perf_counter()
    r = f()
    return r, time.perf_counter() - t


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--json", default="")
    p.add_argument("--rows", type=int, default=300, help="validation windows scored (a fixed sample)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=10, help="timed training steps per shape")
    a = p.parse_args()
    recording = record.start()
    torch.manual_seed(0)
    tiny = preset("tiny")
    tiny.data.source = a.data
    tok = gpt2()
    data = prepare_data(tiny.data, tiny.seed, tok)
    results: dict[str, Any] = {"rows": a.rows, "rounds": a.rounds, "precision": "bf16", "shapes": {}}
    for name in ("tiny", "cpu-10min"):
        cfg = preset(name)
        v, T = cfg.model.vocab_size, cfg.data.seq_len
        if v == tok.vocab_size:
            val, train, table = data.val, data.train, tok.token_bytes
        else:
            val, train = (SplitTokens(s.tokens % v, s.offsets, n_bytes=s.n_bytes, eot_id=s.eot_id % v)
                          for s in (data.val, data.train))
            table = np.ones(v, dtype=np.int64)
        model = Transformer(cfg.model)
        rows = StoryWindows(val, T)
        which = score_sample(len(rows), cfg.seed, a.rows)
        train_tps = train_tokens_per_s(model, PackedDataset(train, T), cfg.train.batch_size, a.steps)
        old_s, new_s, r_old, r_new = [], [], {}, {}
        for _ in range(a.rounds):
            r_old, t = timed(partial(score_old, model, rows, which, cfg.train.batch_size, table))
            old_s.append(t)
            r_new, t = timed(partial(score_new, model, rows, which, table))
            new_s.append(t)
        n = r_new["tokens"]
        old_tps, new_tps = n / min(old_s), n / min(new_s)
        rel = abs(r_new["bits_per_byte"] - r_old["bits_per_byte"]) / r_old["bits_per_byte"]
        shape = {"model": {"d_model": cfg.model.d_model, "n_layers": cfg.model.n_layers, "vocab": v, "seq_len": T},
                 "train_batch": cfg.train.batch_size, "scored_tokens": n, "train_tokens_per_s": train_tps,
                 "score_old_tokens_per_s": old_tps, "score_new_tokens_per_s": new_tps,
                 "new_over_old": new_tps / old_tps, "new_over_train": new_tps / train_tps,
                 "old_over_train": old_tps / train_tps, "bits_per_byte_old": r_old["bits_per_byte"],
                 "bits_per_byte_new": r_new["bits_per_byte"], "bits_per_byte_relative_difference": rel,
                 "old_s": old_s, "new_s": new_s}
        results["shapes"][name] = shape
        print(f"{name}: train {train_tps:.0f} tok/s; scoring old {old_tps:.0f}, new {new_tps:.0f} tok/s "
              f"({new_tps / old_tps:.2f}x old, {new_tps / train_tps:.2f}x training); bits/byte old "
              f"{r_old['bits_per_byte']:.9f} new {r_new['bits_per_byte']:.9f} (relative {rel:.1e})", flush=True)
    if a.json:
        recording.write(a.json, results, threads=torch.get_num_threads())
    return 0


if __name__ == "__main__":
    sys.exit(main())
