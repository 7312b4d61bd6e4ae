"""A run's GGUF exports measured through a real llama.cpp (node-llama-cpp's prebuilt CPU build, installed by
`bash scripts/setup.sh test`), against cairn's own float32 model, on stories of the run's test split:

    python benchmarks/scripts/gguf_check.py RUN [--stories 20] [--json benchmarks/records/gguf-cpu-10min.json]

Exports RUN at f32, f16 and q8_0 and reports, for each file: its size; whether llama.cpp's token ids equal
cairn's tokenizer's on every story; the largest |difference| between llama.cpp's next-token
log-probabilities (the log-softmax of its logits; KV cache in f32, flash attention off) and cairn's, over
every position and every vocabulary token whose log-probability is above -80 (float32 probabilities
lose their digits below that); greedy text of 50 tokens from 5 story openings, equal to
cairn's or not (and the first token where it differs); and held-out bits per byte through llama.cpp next to
cairn's on the same token sequences (each story as cairn scores it: <|endoftext|>, the story, <|endoftext|>,
cut to the context).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cairn.bench import record
from cairn.checkpoint.load import load
from cairn.data.sources import clean_texts, load_texts
from cairn.data.splits import split_stories
from cairn.export.gguf import export_gguf
from cairn.inference.generate import generate_ids
from cairn.inference.sampling import SamplingConfig

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
import run_llama_cpp as llama_cpp  # noqa: E402  (tests/run_llama_cpp.py: the driver the tests use)

TYPES = ("f32", "f16", "q8_0")
# node-llama-cpp hands over probabilities in float32: below e^-80 they are near or under float32's smallest
# normal number (e^-87.3) and their logarithm loses its digits, so log-probabilities are compared above it
FLOOR = -80.0


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run")
    p.add_argument("--stories", type=int, default=20, help="test-split stories scored (default 20)")
    p.add_argument("--json", default="", help="write a benchmark record here")
    a = p.parse_args()
    why = llama_cpp.missing()
    if why:
        print(f"error: {why}", file=sys.stderr)
        return 2
    recording = record.start()
    torch.set_num_threads(1)
    loaded = load(a.run, device="cpu")
    cfg, tok, model = loaded.config, loaded.tokenizer, loaded.model
    d = cfg.data
    texts = clean_texts(load_texts(d.source, d.text_field, d.txt_separator, d.hub_split))
    stories = split_stories(texts, cfg.seed, d.n_samples, d.train_frac, d.val_frac)["test"][:a.stories]
    ctx = cfg.model.context_len
    seqs = [([tok.eot_id] + tok.encode(s) + [tok.eot_id])[:ctx] for s in stories]
    table = tok.token_bytes

    def bits_per_byte(logprobs: list[np.ndarray]) -> float:
        nats = sum(-float(lp[np.arange(len(ids) - 1), ids[1:]].sum()) for lp, ids in zip(logprobs, seqs))
        n_bytes = sum(int(table[ids[1:]].sum()) for ids in seqs)
        return nats / math.log(2) / n_bytes

    with torch.no_grad():
        ours = [torch.log_softmax(model(torch.tensor([ids]))[0].double(), -1).numpy() for ids in seqs]
    prompts = [ids[:8] for ids in seqs[:5]]
    s = SamplingConfig(max_new_tokens=50, temperature=0.0, stop_at_eot=False)
    our_greedy = [list(generate_ids(model, pr, s)) for pr in prompts]

    result: dict[str, Any] = {
        "run": str(Path(a.run).resolve()), "checkpoint": loaded.path.name, "preset": cfg.name,
        "model": {"d_model": cfg.model.d_model, "n_layers": cfg.model.n_layers, "n_heads": cfg.model.n_heads,
                  "vocab_size": cfg.model.vocab_size, "context_len": ctx, "params": model.num_params()},
        "stories": len(seqs), "tokens_scored": sum(len(x) - 1 for x in seqs),
        "bytes_scored": sum(int(table[ids[1:]].sum()) for ids in seqs),
        "llama_cpp": ("node-llama-cpp 3.21.1 prebuilt CPU build (linux-x64), 1 thread, KV cache f32, "
                      "flash attention off"),
        "cairn_bits_per_byte": bits_per_byte(ours), "files": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        jobs, sizes, export_s = [], {}, {}
        for kind in TYPES:
            t = time.perf_counter()
            path = export_gguf(a.run, Path(tmp) / f"{cfg.name}-{kind}.gguf", kind)
            export_s[kind] = time.perf_counter() - t
            sizes[kind] = path.stat().st_size
            jobs.append({"model": str(path), "kv": "F32", "tokenize": stories, "score": seqs,
                         "greedy": [{"prompt": pr, "n": 50} for pr in prompts]})
        t = time.perf_counter()
        answers = llama_cpp.run(jobs, timeout=1800)
        node_s = time.perf_counter() - t
    for kind, answer in zip(TYPES, answers):
        theirs = answer["logprobs"]
        diffs = [first_difference(g, o) for g, o in zip(answer["greedy"], our_greedy)]
        result["files"][kind] = {
            "bytes": sizes[kind], "export_s": round(export_s[kind], 2),
            "token_ids_equal": answer["tokens"] == [tok.encode(x) for x in stories],
            "max_abs_logprob_diff": float(max(np.abs(t_ - o)[o >= FLOOR].max() for t_, o in zip(theirs, ours))),
            "mean_abs_logprob_diff": float(np.mean(np.concatenate([np.abs(t_ - o)[o >= FLOOR]
                                                                   for t_, o in zip(theirs, ours)]))),
            "logprobs_compared": int(sum((o >= FLOOR).sum() for o in ours)),
            "logprobs_below_floor": int(sum((o < FLOOR).sum() for o in ours)),
            "logprob_floor": FLOOR,
            "max_abs_logprob_diff_target_tokens": float(max(
                np.abs((t_ - o)[np.arange(len(ids) - 1), ids[1:]]).max() for t_, o, ids in zip(theirs, ours, seqs))),
            "same_argmax_frac": float(np.mean(np.concatenate([t_.argmax(-1) == o.argmax(-1)
                                                              for t_, o in zip(theirs, ours)]))),
            "greedy50_equal": sum(x is None for x in diffs), "greedy50_prompts": len(diffs),
            "greedy50_first_difference": diffs,
            "bits_per_byte": bits_per_byte(theirs),
        }
    result["llama_cpp_seconds"] = round(node_s, 1)
    result["note"] = ("shared 2-core machine: other jobs ran beside this one (the load average is in the "
                      "record); times are wall clock under that load, the other figures do not depend on it")
    print(f"{cfg.name}: {result['stories']} test stories, {result['tokens_scored']} tokens; cairn "
          f"{result['cairn_bits_per_byte']:.6f} bits/byte")
    print("type  bytes       ids  max|dlogp|  same argmax  greedy50  bits/byte")
    for kind, r in result["files"].items():
        print(f"{kind:5} {r['bytes']:<11,} {str(r['token_ids_equal']):5} {r['max_abs_logprob_diff']:.2e}    "
              f"{r['same_argmax_frac']:.4f}       {r['greedy50_equal']}/{r['greedy50_prompts']}       "
              f"{r['bits_per_byte']:.6f}")
    if a.json:
        recording.write(a.json, result, threads=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
