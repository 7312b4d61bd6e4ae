"""The `tiny` preset as a new user runs it: `cairn train --preset tiny --data DATA --max-steps 20`,
then `cairn eval RUN --json` on the run, each a fresh process timed whole; the run's training
tokens/s (its report lines in metrics.jsonl) beside the scoring's tokens/s (`cairn eval`'s own
figure: the scoring, loading left out). The bits per byte `cairn eval` prints are checked against
a plain computation in this process: the same windows through the model's full logits and
torch's float32 cross-entropy, every position's logits computed, as scoring did before the
fused head scored only the positions with a target.

With --before SRC (the `src` folder of an older cairn checkout, e.g. one made by
`git worktree add /tmp/before 04bf875`), the same two commands run on that code too, alternating
with this checkout's, so that both see the same machine.

    python benchmarks/scripts/tiny_eval.py --data ../shared/data/tinystories --rounds 3 \\
        --before /tmp/before/src --json benchmarks/records/tiny-eval.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F

from cairn.bench import record

SRC = Path(__file__).resolve().parents[2] / "src"


def cairn(src: Path, args: list[str], cache: Path) -> tuple[float, str]:
    """Run `cairn ARGS` on the code in `src`, in a fresh process: (wall seconds, stdout)."""
    env = {**os.environ, "PYTHONPATH": str(src), "CAIRN_CACHE": str(cache)}
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "cairn", *args], env=env, capture_output=True, text=True, check=True)
    return time.perf_counter() - start, out.stdout


def training_tokens_per_s(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["tokens_per_s"] for r in rows if r.get("kind") == "train"]


def plain_bits_per_byte(run: Path) -> float:
    """`cairn eval`'s windows and batches, scored through the full logits of every position."""
    from cairn.checkpoint.load import load
    from cairn.data.batching import SCORE_TOKENS, ScoreBatches
    from cairn.data.formats import get_format
    from cairn.model.ops import IGNORE_INDEX
    from cairn.runtime.device import autocast
    from cairn.runtime.precision import for_checkpoint

    loaded = load(run, "cpu")
    cfg, tok = loaded.config, loaded.tokenizer
    rows, _ = get_format(cfg.data.format).held_out(cfg, tok, None, "test")
    precision = for_checkpoint(cfg.system.precision, loaded.device, loaded.path)
    table = torch.as_tensor(tok.token_bytes)
    nats, n_bytes = 0.0, 0
    with torch.no_grad():
        for b in ScoreBatches(rows, tokens=max(SCORE_TOKENS, cfg.train.batch_size * cfg.data.seq_len),
                              pad_id=tok.eot_id):
            with autocast(loaded.device, precision):
                logits = loaded.model(b["input_ids"])
            y = b["labels"]
            nats += float(F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX,
                                          reduction="sum"))
            n_bytes += int(table[y[y != IGNORE_INDEX]].sum())
    return nats / math.log(2) / n_bytes


def one_round(src: Path, data: str, work: Path, steps: int, name: str) -> dict[str, Any]:
    cache, run = work / f"cache-{name}", work / f"run-{name}"
    shutil.rmtree(run, ignore_errors=True)
    train_s, _ = cairn(src, ["train", "--preset", "tiny", "--data", data, "--max-steps", str(steps), "--out", str(run),
                             "--no-progress"], cache)
    eval_s, out = cairn(src, ["eval", str(run), "--json"], cache)
    scored = json.loads(out.strip().splitlines()[-1])
    train = training_tokens_per_s(run)
    r: dict[str, Any] = {"train_command_s": train_s, "eval_command_s": eval_s, "train_tokens_per_s_reports": train,
                         "train_tokens_per_s_last": train[-1], "eval": scored}
    if "tokens_per_s" in scored:
        r["eval_over_train"] = scored["tokens_per_s"] / train[-1]
    return r


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--before", type=Path, help="an older checkout's src folder, run alternately with this one")
    p.add_argument("--json", default="")
    a = p.parse_args()
    recording = record.start()
    work = Path(tempfile.mkdtemp(prefix="cairn-tiny-eval-"))
    codes: dict[str, Optional[Path]] = {"after": SRC, "before": a.before}
    rounds: dict[str, list[dict[str, Any]]] = {k: [] for k, v in codes.items() if v is not None}
    try:
        for i in range(a.rounds):
            for name in rounds:
                r = one_round(codes[name] or SRC, a.data, work, a.steps, name)
                rounds[name].append(r)
                print(f"round {i + 1} {name}: train {r['train_command_s']:.1f} s ({r['train_tokens_per_s_last']:,.0f} "
                      f"tok/s at the last report), eval {r['eval_command_s']:.1f} s"
                      + (f", scoring {r['eval']['tokens_per_s']:,.0f} tok/s = {r['eval_over_train']:.2f}x training"
                         if "eval_over_train" in r else ""), flush=True)
        plain = plain_bits_per_byte(work / "run-after")
        # the other end of the stride choice: windows that do not overlap (stride = seq_len)
        seq_len = tomllib.loads((work / "run-after" / "config.toml").read_text())["data"]["seq_len"]
        _, out = cairn(SRC, ["eval", str(work / "run-after"), "--json", "--stride", str(seq_len)],
                       work / "cache-after")
        apart = json.loads(out.strip().splitlines()[-1])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    after = rounds["after"]
    got = after[-1]["eval"]["bits_per_byte"]
    result: dict[str, Any] = {
        "command_train": f"cairn train --preset tiny --data DATA --max-steps {a.steps}",
        "command_eval": "cairn eval RUN --json", "rounds": rounds,
        "median_eval_over_train": statistics.median(r["eval_over_train"] for r in after),
        "median_train_command_s": statistics.median(r["train_command_s"] for r in after),
        "median_eval_command_s": statistics.median(r["eval_command_s"] for r in after),
        "bits_per_byte": got, "bits_per_byte_plain_logits": plain,
        "bits_per_byte_relative_difference": abs(got - plain) / plain,
        "positions_per_token": after[-1]["eval"]["positions"] / after[-1]["eval"]["tokens"],
        "stride_seq_len": {"stride": seq_len, **apart, "positions_per_token": apart["positions"] / apart["tokens"]}}
    if "before" in rounds:
        for key in ("train_command_s", "eval_command_s"):
            result[f"before_median_{key}"] = statistics.median(r[key] for r in rounds["before"])
    print(json.dumps({k: v for k, v in result.items() if k != "rounds"}, indent=1))
    if a.json:
        recording.write(a.json, result, threads=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
