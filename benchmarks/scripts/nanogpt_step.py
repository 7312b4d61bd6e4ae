"""cairn's training step against nanoGPT's own `model.py`, and against the CPU's matmul peaks,
timed in the same process in alternating rounds (a shared machine slows every variant alike).

    git clone https://github.com/karpathy/nanoGPT /tmp/nanoGPT      # not part of cairn; only timed
    PYTHONPATH=src python benchmarks/scripts/nanogpt_step.py --nanogpt /tmp/nanoGPT/model.py --rounds 5 \\
        --json benchmarks/records/nanogpt-step-cpu.json

Shape: d256 / 4 layers / 8 heads / GPT-2 vocabulary (50257) / 256 tokens / batch 8, tied heads on
both sides, no dropout. Variants (each a whole step: forward, backward, clipping at 1.0, AdamW):
`nanogpt` eager float32 (the baseline; its own configure_optimizers, which fuses AdamW only on
CUDA), `nanogpt-bf16` (the same under bf16 autocast), `cairn` in float32 and in bf16 autocast
(eager; with --compile also torch.compile'd), and two matmul rows, `peak-fp32` and `peak-bf16`:
one 2048 x 2048 x 2048 product in each dtype. Every row reports its model FLOP/s (6 per weight of
every matmul + attention, as nanoGPT counts), its speed against nanoGPT float32, and its share of
the peak of the precision it computes in, the peak timed in the same rounds. --json writes a
benchmark record (cairn.bench.record).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time

import torch

from cairn.bench import record
from cairn.bench.speed import make_step, mean_loss
from cairn.config.sections import ModelConfig, TrainConfig
from cairn.model.transformer import Transformer
from cairn.runtime.device import autocast, keep_freed_memory, set_threads
from cairn.training.optim import make_optimizer
from cairn.util.host import cpu_info

D, LAYERS, HEADS, VOCAB, SEQ, BATCH = 256, 4, 8, 50257, 256, 8
PEAK_N = 2048


def load_nanogpt(path: str):
    spec = importlib.util.spec_from_file_location("nanogpt_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nanogpt", required=True, help="path to nanoGPT's model.py")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = one per core)")
    p.add_argument("--compile", action="store_true", help="also time cairn's step torch.compile'd")
    p.add_argument("--json")
    a = p.parse_args()
    recording = record.start()
    threads = set_threads(a.threads)
    keep_freed_memory()
    cpu = torch.device("cpu")
    ng = load_nanogpt(a.nanogpt)
    torch.manual_seed(0)
    x = torch.randint(0, VOCAB, (BATCH, SEQ))
    y = torch.randint(0, VOCAB, (BATCH, SEQ))

    def nanogpt(precision):
        m = ng.GPT(ng.GPTConfig(block_size=SEQ, vocab_size=VOCAB, n_layer=LAYERS, n_head=HEADS, n_embd=D,
                                dropout=0.0, bias=True))
        opt = m.configure_optimizers(0.1, 1e-4, (0.9, 0.95), "cpu")
        return make_step(m, opt, lambda: m(x, y)[1], lambda: autocast(cpu, precision))

    mc = ModelConfig(vocab_size=VOCAB, d_model=D, n_layers=LAYERS, n_heads=HEADS, d_mlp=4 * D, context_len=SEQ,
                     tie_embeddings=True)
    flops = Transformer(mc).flops_per_token(SEQ) * BATCH * SEQ

    def cairn(precision, compiled=False):
        m = Transformer(mc)
        f = torch.compile(m) if compiled else m
        opt = make_optimizer(m, TrainConfig(lr=1e-4), cpu)
        return make_step(m, opt, lambda: mean_loss(f, x, y), lambda: autocast(cpu, precision))

    def matmul(dtype):
        ma, mb = torch.ones(PEAK_N, PEAK_N, dtype=dtype), torch.ones(PEAK_N, PEAK_N, dtype=dtype)
        return lambda: ma @ mb

    variants = {"nanogpt": ("fp32", nanogpt("fp32")), "nanogpt-bf16": ("bf16", nanogpt("bf16")),
                "cairn": ("fp32", cairn("fp32")), "cairn-bf16": ("bf16", cairn("bf16"))}
    if a.compile:
        variants["cairn-bf16+compile"] = ("bf16", cairn("bf16", compiled=True))
    variants["peak-fp32"] = ("fp32", matmul(torch.float32))
    variants["peak-bf16"] = ("bf16", matmul(torch.bfloat16))
    for _, step in variants.values():  # untimed: first calls allocate, compile, pick kernels
        step()
        step()
    times = {k: [] for k in variants}
    for _ in range(a.rounds):
        for name, (_, step) in variants.items():
            t = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    peaks = {p: 2 * PEAK_N ** 3 / med[f"peak-{p}"] for p in ("fp32", "bf16")}
    base = med["nanogpt"]
    model = cpu_info()[0]
    rows = []
    print(f"# d{D} L{LAYERS} H{HEADS} V{VOCAB} T{SEQ} B{BATCH}, tied; {model}; {threads} threads; torch "
          f"{torch.__version__}; matmul peaks: fp32 {peaks['fp32'] / 1e9:.0f}, bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s")
    print(f"{'variant':<20} {'prec':>5} {'s/step':>8} {'tok/s':>8} {'GFLOP/s':>8} {'vs nanogpt':>11} {'of peak':>8}"
          f"  per-round ratio to nanogpt")
    for name, (precision, _) in variants.items():
        if name.startswith("peak-"):
            continue
        fps = flops / med[name]
        per_round = [b / t for b, t in zip(times["nanogpt"], times[name])]
        row = {"variant": name, "precision": precision, "s_per_step": med[name],
               "tokens_per_s": BATCH * SEQ / med[name],
               "model_flops_per_s": fps, "vs_nanogpt_fp32": base / med[name],
               "per_round_vs_nanogpt_fp32": per_round, "of_peak": fps / peaks[precision], "steps": times[name]}
        rows.append(row)
        print(f"{name:<20} {precision:>5} {med[name]:8.3f} {row['tokens_per_s']:8.0f} {fps / 1e9:8.1f} "
              f"{row['vs_nanogpt_fp32']:10.2f}x {row['of_peak']:8.1%}  "
              f"{min(per_round):.2f}-{max(per_round):.2f}")
    if a.json:
        recording.write(a.json, {
            "shape": {"d_model": D, "n_layers": LAYERS, "n_heads": HEADS, "vocab_size": VOCAB, "seq_len": SEQ,
                      "batch_size": BATCH, "tied": True},
            "rounds": a.rounds,
            "matmul_peaks": {"size": PEAK_N, **peaks, "steps": {p: times[f"peak-{p}"] for p in ("fp32", "bf16")}},
            "model_flops_per_step": flops, "training": rows}, threads=threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
