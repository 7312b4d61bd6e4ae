"""lm-evaluation-harness on a trained run: the story tasks (`cairn eval RUN --harness cairn_stories`)
scored by CairnLM in the run's precision and in float32, by the same model with its weights
re-initialised (what chance looks like), and by lm-eval's own HFLM on the run's Hugging Face export
(`cairn export --format hf`, float32, loaded as lm-eval's `--model hf` loads it); beside them
`cairn eval RUN`'s bits per byte on the same test split, and the seconds each took.

    python benchmarks/scripts/harness.py --run /work/scale/runs/1x \
        --json benchmarks/records/harness-cpu-10min.json

HFLM reads a context as given (the export's tokenizer adds no <|endoftext|> before it, where
cairn's runs saw one before every story), and reads a long text in disjoint windows: the first
tokens of each window are predicted from almost nothing, where cairn eval and CairnLM slide the
window by half its length.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the export is local: transformers must not ask the hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from cairn.bench import record  # noqa: E402
from cairn.checkpoint.load import load  # noqa: E402
from cairn.eval.harness import SEED, run_harness  # noqa: E402
from cairn.eval.run import evaluate_run  # noqa: E402
from cairn.eval.story_tasks import LOCAL_TASKS  # noqa: E402
from cairn.model.transformer import build_model  # noqa: E402
from cairn.runtime.device import set_threads  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a trained run directory (or checkpoint)")
    p.add_argument("--json", default="", help="write the benchmark record here")
    p.add_argument("--seed", type=int, default=SEED, help=f"the story endings' and lm-eval's seed (default {SEED}, "
                   "cairn eval's)")
    p.add_argument("--limit", type=int, default=0, help="documents per task (default all)")
    args = p.parse_args()
    recording = record.start()
    threads = set_threads(0)
    names = list(LOCAL_TASKS)

    start = time.perf_counter()
    own = evaluate_run(args.run, device="cpu")
    own_s = time.perf_counter() - start
    loaded = load(args.run, "cpu")
    cfg = loaded.config
    runs: dict[str, Any] = {}

    def harness(label: str, **kw: Any) -> None:
        r = run_harness(kw.pop("loaded", loaded), names, limit=args.limit, seed=args.seed, **kw)
        runs[label] = {"results": r["results"], "samples": r["samples"], "what": r["what"], "seconds": r["seconds"]}
        print(label, r["seconds"], r["results"], file=sys.stderr)

    harness("cairn", precision=None)
    harness("cairn_fp32", precision="fp32")
    torch.manual_seed(args.seed)
    fresh = build_model(cfg.model, torch.device("cpu")).eval()
    harness("cairn_untrained", loaded=dataclasses.replace(loaded, model=fresh), precision="fp32")

    from lm_eval.models.huggingface import HFLM

    from cairn.export.hf import export_hf

    with tempfile.TemporaryDirectory(prefix="cairn-harness-hf-") as tmp:
        out = export_hf(args.run, Path(tmp) / "hf")
        hflm = HFLM(pretrained=str(out), device="cpu", batch_size=16, max_length=cfg.data.seq_len)
        harness("hflm_export_fp32", lm=hflm)

    from cairn.eval.harness_lm import CairnLM

    result = {
        "run": str(args.run), "checkpoint": str(loaded.path), "test_split": runs["cairn"]["samples"],
        "precision": CairnLM(loaded).precision, "seq_len": cfg.data.seq_len, "threads": threads,
        "cairn_eval": {"loss": own["loss"], "bits_per_byte": own["bits_per_byte"], "tokens": own["tokens"],
                       "what": own["what"], "seconds": round(own_s, 3)},
        "harness": runs,
        "machine": "2-core AMD EPYC shared with other jobs (several training runs and test suites at the same "
                   "time): seconds are wall-clock under that load",
    }
    if args.json:
        recording.write(args.json, result, threads=threads)
    print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
