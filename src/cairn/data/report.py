"""`cairn prepare`: tokenize a source into the cache and report what it took."""

from __future__ import annotations

import resource
import sys
import time

from cairn.config.sections import RunConfig
from cairn.tokenizer.base import Tokenizer
from cairn.data.cache import prepare_data
from cairn.data.splits import SPLITS


def peak_rss_mb() -> tuple[float, float]:
    """(this process, its largest finished child) peak resident memory in MB."""
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * scale
    return own / 1e6, children / 1e6


def prepare(cfg: RunConfig, tokenizer: Tokenizer, workers: int = 0, progress: bool = False) -> dict:
    """Prepare `cfg`'s data (or find it cached); the splits, tokens, throughput and peak memory."""
    start = time.perf_counter()
    data = prepare_data(cfg.data, cfg.seed, tokenizer, workers=workers, progress=progress)
    elapsed = time.perf_counter() - start
    own, child = peak_rss_mb()
    splits = {s: data.meta["splits"][s] for s in SPLITS}
    tokens = sum(v["tokens"] for v in splits.values())
    made = data.meta.get("prepared", {}) if data.built else {}
    in_bytes = made.get("source_bytes", 0)
    return {
        "source": cfg.data.source, "cache_dir": str(data.cache_dir), "tokenizer": tokenizer.name,
        "cached": not data.built, "splits": splits, "tokens": tokens, "source_bytes": in_bytes,
        "workers": made.get("workers", 0), "seconds": round(elapsed, 3),
        "mb_per_s": round(in_bytes / 1e6 / elapsed, 2) if made else None,
        "tokens_per_s": round(tokens / elapsed) if made else None,
        "peak_rss_mb": round(own, 1), "peak_rss_worker_mb": round(child, 1),
    }


def report_lines(r: dict) -> list[str]:
    """The report as `cairn prepare` prints it."""
    lines = [f"{'cached' if r['cached'] else 'prepared'} {r['source']} in {r['cache_dir']}"]
    lines += [f"  {name:<5} {v['stories']:>12,} stories {v['tokens']:>15,} tokens" for name, v in r["splits"].items()]
    if not r["cached"]:
        workers = f"{r['workers']} worker{'s' if r['workers'] != 1 else ''}"
        lines.append(f"  read {r['source_bytes'] / 1e6:,.1f} MB in {r['seconds']:.1f}s with {workers}: "
                     f"{r['mb_per_s']:.1f} MB/s, {r['tokens_per_s']:,} tokens/s")
    else:
        lines.append(f"  already prepared: mapped in {r['seconds']:.2f}s (delete the folder to prepare again)")
    child = r["peak_rss_worker_mb"]
    lines.append(f"  peak memory: {r['peak_rss_mb']:,.0f} MB this process"
                 + (f", {child:,.0f} MB the largest worker process" if child else ""))
    return lines
