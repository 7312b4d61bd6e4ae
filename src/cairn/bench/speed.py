"""`cairn bench`: training-step and generation throughput, cairn against plain PyTorch references.

Every variant is timed in the same process, alternating rounds (A B C A B C ...), so that a noisy
machine slows all of them alike; the table reports the median step of each and ratios to the
first reference. The two references are plain-PyTorch models (reference_models.py):

- `nanogpt`: an eager float32 nanoGPT-style step (fused q/k/v, SDPA, tied embeddings, full
  float32 logits and F.cross_entropy), the usual baseline for a small GPT on one machine. It stays
  float32 whatever --precision cairn runs in; --reference-precision bf16 adds a second row of it
  under bf16 autocast (`nanogpt-bf16`);
- `tutorial`: the reference tutorial's model as it writes it (per-head q/k/v linears, attention by
  bmm + softmax without a mask, separate heads concatenated), fed as it feeds it: one story per
  row, every row padded to 1000 tokens, in float32. Only the real story tokens are "useful".

Each step is followed by a scoring pass of the same batch, forward only, as `cairn eval` scores
(cairn's through eval/metrics.py's evaluate; the references' forward under no_grad): the second
table gives its tokens/s beside training's (--no-score skips it). The process's allocator is set as
cairn's own processes set it (runtime/device.py: keep_freed_memory; CAIRN_KEEP_FREED_MEMORY=0
leaves glibc's default), for every row alike.

MFU is each row's against the matmul peak of the precision that row computes in (on CPUs the
measured float32 or bf16 matmul peak, see precision.py). --json writes a benchmark record
(record.py): the command, commit, machine and load, and this table under "result".
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shlex
import statistics
import sys
import time
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, NoReturn, Optional

import numpy as np
import torch
import torch.nn as nn

from cairn.bench import record
from cairn.bench.reference_models import NanoGPT, Tutorial, linear_weights, story_lengths
from cairn.config.presets import preset
from cairn.config.sections import ModelConfig, OptimConfig
from cairn.model.transformer import Transformer
from cairn.runtime.device import autocast, keep_freed_memory, pick_device, set_threads
from cairn.runtime.precision import peak_flops
from cairn.runtime.precision import resolve as precision_choice
from cairn.util.errors import CairnError, option

if TYPE_CHECKING:
    from cairn.training.optim import Optimizer

# what caps the instruction set each CPU library uses (ATen's kernels, MKL's and oneDNN's matmuls)
ISA_ENVIRONMENT = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")
Step = Callable[[], None]
# what building a variant gives: its training step, its scoring pass (forward only, as `cairn eval`
# scores), tokens per step, useful tokens per step, model FLOPs per step
Built = tuple[Step, Step, int, int, float]
Peak = tuple[float, str] | tuple[None, str]  # a precision's matmul peak (FLOP/s, or None) and its source


@dataclass
class Variant:
    name: str
    step: Step
    tokens: int  # tokens processed per step
    useful: int  # real (non-padding) target tokens per step
    flops: float  # model FLOPs per step (6N + attention), for MFU
    times: list[float] = field(default_factory=list)
    peak_bytes: int = 0  # the variant's own peak memory: weights, gradients, optimizer state, activations
    first_step_s: float = 0.0  # the untimed first step (includes compiling, with --compile)
    precision: str = "fp32"  # what the step computes in: fp32, or bf16 autocast
    score: Optional[Step] = None  # the forward-only scoring pass of the same batch (None: not timed)
    score_times: list[float] = field(default_factory=list)


class PeakMemory:
    """Peak memory of what is built and run inside the block, net of what existed before it: the
    CUDA allocator's peak on GPUs; on CPUs the process's peak resident set (VmHWM), which Linux
    lets a process reset by writing 5 to /proc/self/clear_refs (after glibc's malloc_trim). 0 where
    neither is available."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.bytes = device, 0
        self.base: Optional[int] = None

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        return 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            try:
                # hand memory that freed tensors left in malloc's arenas back to the OS first, or
                # this variant would reuse it without its resident set growing
                ctypes.CDLL("libc.so.6").malloc_trim(0)
            except (OSError, AttributeError):
                pass
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                self.base = self._status("VmRSS")
            except OSError:
                self.base = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self.base is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            self.bytes = max(0, self._status("VmHWM") - self.base)


def make_step(model: nn.Module, opt: Optimizer, loss_fn: Callable[[], torch.Tensor],
              ctx: Callable[[], AbstractContextManager[Any]], clip: float = 1.0) -> Step:
    """One training step as a training loop takes it: forward under the autocast context,
    backward, global-norm clipping, optimizer step."""
    def step() -> None:
        with ctx():
            loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def make_score(model: nn.Module, loss_fn: Callable[[], torch.Tensor],
               ctx: Callable[[], AbstractContextManager[Any]]) -> Step:
    """A reference model's scoring pass as an evaluation takes it: eval mode, no gradients, the
    loss read back (which waits for the device)."""
    def score() -> None:
        was = model.training
        model.eval()
        with torch.no_grad(), ctx():
            float(loss_fn())
        model.train(was)
    return score


def cairn_score(model: Transformer, x: torch.Tensor, y: torch.Tensor, device: torch.device, precision: str) -> Step:
    """cairn's scoring pass through `cairn eval`'s own kernel (eval/metrics.py: evaluate), on one
    batch; every token counts as one byte (bits per byte do not change the speed)."""
    from cairn.eval.metrics import evaluate

    batch = [{"input_ids": x, "labels": y}]
    table = np.ones(model.cfg.vocab_size, dtype=np.int64)

    def score() -> None:
        evaluate(model, batch, device, precision, table)
    return score


def mean_loss(model: Callable[..., Any], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """cairn's model with labels returns (summed loss, target count): their mean."""
    total, count = model(x, labels=y)
    loss: torch.Tensor = total / count
    return loss


@dataclass
class Shape:
    model: ModelConfig  # cairn's model (any block); the references take its d, layers, heads, vocab
    seq: int
    batch: int


def _adamw(model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")


def bench_training(shape: Shape, rounds: int, variants: list[str], tutorial_batch: int, device: torch.device,
                   precision: str, compile_: bool = False, reference_precisions: tuple[str, ...] = ("fp32",),
                   scoring: bool = True) -> list[Variant]:
    """Build each variant (and, with compile_, a torch.compile'd copy of nanogpt and cairn), take
    one untimed step each, then time `rounds` steps of each, alternating, each step followed by a
    forward-only scoring pass of the same batch when `scoring`. cairn computes in `precision`; the
    nanogpt reference in each of `reference_precisions`, the tutorial in float32."""
    from cairn.training.optim import make_optimizer

    mc, seq, batch = shape.model, shape.seq, shape.batch
    d, layers, heads, vocab = mc.d_model, mc.n_layers, mc.n_heads, mc.vocab_size

    def ctx_of(p: str) -> Callable[[], AbstractContextManager[Any]]:
        return lambda: autocast(device, p)

    torch.manual_seed(0)
    x = torch.randint(0, vocab, (batch, seq), device=device)
    y = torch.randint(0, vocab, (batch, seq), device=device)

    def nanogpt(compiled: bool, p: str) -> Built:
        m = NanoGPT(vocab, d, layers, heads, seq).to(device)
        f: Callable[..., torch.Tensor] = torch.compile(m) if compiled else m
        return make_step(m, _adamw(m, device), lambda: f(x, y), ctx_of(p)), make_score(m, lambda: m(x, y), ctx_of(p)), \
            batch * seq, batch * seq, (6 * linear_weights(m) + 12 * layers * d * seq) * batch * seq

    def cairn(compiled: bool, p: str) -> Built:
        m = Transformer(mc).to(device)
        # cairn's own optimizer set-up: decay on matrices only, fused AdamW
        opt = make_optimizer(m, OptimConfig(), 1e-4, device)
        f: Callable[..., Any] = torch.compile(m) if compiled else m
        return make_step(m, opt, lambda: mean_loss(f, x, y), ctx_of(p)), cairn_score(m, x, y, device, p), \
            batch * seq, batch * seq, m.flops_per_token(seq) * batch * seq

    def tutorial(compiled: bool, p: str) -> Built:
        width = 1000
        m = Tutorial(vocab, d, layers, heads, 4 * d, width).to(device)
        lengths = story_lengths(tutorial_batch)
        xt = torch.randint(0, vocab, (tutorial_batch, width))
        for i, n_real in enumerate(lengths):
            xt[i, n_real:] = 0
        xt = xt.to(device)
        return make_step(m, _adamw(m, device), lambda: m(xt, xt), ctx_of(p)), \
            make_score(m, lambda: m(xt, xt), ctx_of(p)), \
            tutorial_batch * width, int((lengths - 1).sum()), \
            (6 * linear_weights(m) + 12 * layers * d * width) * tutorial_batch * width

    builders: list[tuple[str, Callable[[bool, str], Built], str]] = []
    if "nanogpt" in variants:
        for p in dict.fromkeys(reference_precisions):
            builders.append(("nanogpt" if p == "fp32" else f"nanogpt-{p}", nanogpt, p))
    if "cairn" in variants:
        builders.append(("cairn", cairn, precision))
    if "cairn-fp32" in variants:  # cairn's own float32 step beside it: the gain of the precision alone
        builders.append(("cairn-fp32", cairn, "fp32"))
    if "tutorial" in variants:
        builders.append(("tutorial", tutorial, "fp32"))

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    out = []
    for name, build, p in builders:
        for compiled in ((False, True) if compile_ and name != "tutorial" else (False,)):
            with PeakMemory(device) as mem:  # built and stepped once inside: its whole footprint
                step, score, tokens, useful, flops = build(compiled, p)
                t = time.perf_counter()
                step()
                sync()
            # scoring runs eager, as `cairn eval` does: a compiled row's scoring is its eager row's
            v = Variant(name + ("+compile" if compiled else ""), step, tokens, useful, flops,
                        peak_bytes=mem.bytes, first_step_s=time.perf_counter() - t, precision=p,
                        score=score if scoring and not compiled else None)
            if v.score is not None:
                v.score()  # untimed: the first pass allocates what the next ones reuse
            if compiled:
                for _ in range(2):  # compiled code may still recompile on its second call
                    step()
            out.append(v)
    sync()
    for _ in range(rounds):
        for v in out:
            t = time.perf_counter()
            v.step()
            sync()
            v.times.append(time.perf_counter() - t)
            if v.score is not None:
                t = time.perf_counter()
                v.score()
                v.score_times.append(time.perf_counter() - t)
    return out


@torch.no_grad()
def bench_generation(mc: ModelConfig, new_tokens: int, device: torch.device, precision: str,
                     prompt_len: int = 16) -> dict[str, float]:
    """Tokens/s of greedy decoding with the KV cache and with full recomputation (the best of two
    alternating runs each); in float32 both must give the same tokens."""
    from cairn.inference.generate import SamplingConfig, generate_ids

    cfg = replace(mc, context_len=max(mc.context_len, prompt_len + new_tokens, 32))
    torch.manual_seed(0)
    m = Transformer(cfg).to(device).eval()
    s = SamplingConfig(max_new_tokens=new_tokens, temperature=0, stop_at_eot=False)
    prompt = list(range(1, prompt_len + 1))
    res: dict[str, list[float]] = {}
    outs: dict[str, list[int]] = {}
    for name, cache in (("kv_cache", True), ("recompute", False), ("kv_cache", True), ("recompute", False)):
        t = time.perf_counter()
        with autocast(device, precision):
            outs[name] = list(generate_ids(m, prompt, s, use_cache=cache))
        res.setdefault(name, []).append(time.perf_counter() - t)
    if precision == "fp32":  # in bf16 a near-tie between two tokens may legitimately flip
        assert outs["kv_cache"] == outs["recompute"], "cached and recomputed decoding disagree"
    return {k: new_tokens / min(v) for k, v in res.items()}


def round_ratio(base: list[float], times: list[float], base_tokens: int, tokens: int) -> float:
    """The median over rounds of a row's tokens/s over the first row's in the same round."""
    return statistics.median((tokens / t) / (base_tokens / b) for b, t in zip(base, times))


def resolve_shape(a: argparse.Namespace) -> Shape:
    """The preset's model, sequence length and batch, with any shape flag given on top; without a
    preset, a GPT-2 block (d_mlp = 4 d) of the given shape."""
    if a.preset:
        cfg = preset(a.preset)
        mc, seq, batch = cfg.model, min(cfg.data.seq_len, cfg.model.context_len), cfg.train.batch_size
    else:
        mc, seq, batch = ModelConfig(d_model=256, n_layers=4, n_heads=8, d_mlp=1024, context_len=256), 256, 8
    flags = {"d_model": a.d_model, "n_layers": a.n_layers, "n_heads": a.n_heads, "vocab_size": a.vocab_size}
    mc = replace(mc, **{k: v for k, v in flags.items() if v is not None})
    if a.d_model is not None and not a.preset:
        mc = replace(mc, d_mlp=4 * a.d_model)
    seq = a.seq_len or seq
    mc = replace(mc, context_len=max(mc.context_len, seq))
    mc.check()  # the model's own checks: sizes positive, heads dividing the width
    for name, value, least in (("seq_len", seq, 1), ("batch_size", a.batch_size or batch, 1),
                               ("tutorial_batch", a.tutorial_batch, 1), ("rounds", a.rounds, 0),
                               ("generate", a.generate, 0)):
        if value < least:
            raise CairnError(f"{option(name)} must be {least} or more, got {value}: set {option(name)} to "
                             f"{'a positive value' if least else '0 or more'}")
    return Shape(mc, seq, a.batch_size or batch)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line and exit code 2, as every cairn command says it
        raise CairnError(f"{message} (see `cairn bench --help`)")

    def _get_values(self, action: argparse.Action, arg_strings: list[str]) -> Any:
        # as cairn.cli.options.Parser: `--json=--` would give the option an empty list
        if action.nargs is None and action.option_strings and arg_strings == ["--"]:
            self.error(f"argument {'/'.join(action.option_strings)}: expected one argument")
        return super()._get_values(action, arg_strings)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="cairn bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", help="take the model, sequence length and batch from this preset "
                                     "(e.g. reference-105m, cpu-10min); shape flags override it")
    p.add_argument("--d-model", type=int)
    p.add_argument("--n-layers", type=int)
    p.add_argument("--n-heads", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--vocab-size", type=int, help="default 50257 (GPT-2), or the preset's")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="cairn's step: auto = as training chooses (bf16 autocast on GPUs that have it; on "
                        "CPUs bf16 where measured faster for this shape's matmuls), fp32 or bf16")
    p.add_argument("--reference-precision", default="fp32", choices=["fp32", "bf16"],
                   help="the nanogpt reference's step: fp32 (eager float32, the baseline), or bf16: also a "
                        "second row of it under bf16 autocast")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd nanogpt and cairn")
    p.add_argument("--rounds", type=int, default=0, help="timed steps per variant, alternating "
                                                           "(default 3 on CPU, 20 on GPU)")
    p.add_argument("--variants", default="nanogpt,cairn",
                   help="comma list of nanogpt, cairn, cairn-fp32 (cairn in float32 whatever --precision), tutorial")
    p.add_argument("--tutorial-batch", type=int, default=2, help="rows of 1000 tokens for the tutorial step")
    p.add_argument("--no-score", action="store_true",
                   help="skip the scoring row (a forward-only pass of each step's batch, as `cairn eval` scores)")
    p.add_argument("--generate", type=int, default=256, help="tokens to generate in the decoding benchmark (0 = skip)")
    p.add_argument("--json", help="also write the results to this JSON file")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = build_parser().parse_args(argv)
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - {"nanogpt", "cairn", "cairn-fp32", "tutorial"})
    if unknown or not variants:
        raise CairnError(f"{option('variants')} {a.variants!r}: choose from nanogpt, cairn, cairn-fp32, tutorial")
    shape = resolve_shape(a)
    # the command, commit and the machine's load at the start: other work on it slows every variant
    recording = record.start(shlex.join(["cairn", "bench", *argv]))
    device = pick_device(a.device)
    rounds = a.rounds or (20 if device.type == "cuda" else 3)
    if device.type == "cpu":
        set_threads(0)
    # the allocator as cairn's own training and scoring processes set it; every variant shares it
    kept = keep_freed_memory(device)
    choice = precision_choice(a.precision, device, shape.model, shape.batch * shape.seq)
    precision = choice.precision
    references = ("fp32",) if a.reference_precision == "fp32" else ("fp32", "bf16")
    peaks: dict[str, Peak] = {p: peak_flops(device, p) for p in dict.fromkeys((precision, *references))}
    mc = shape.model
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    peak_text = "; ".join(f"{p} peak {pk / 1e12:.3g} TFLOP/s ({src})" if pk else f"{p}: no peak: {src}"
                          for p, (pk, src) in peaks.items())
    print(f"# shape d{mc.d_model} L{mc.n_layers} H{mc.n_heads} T{shape.seq} B{shape.batch} V{mc.vocab_size}"
          f"{' (' + a.preset + ')' if a.preset else ''}; {where}; torch {torch.__version__}; "
          f"cairn {choice.describe()}; MFU against {peak_text}")
    runs = bench_training(shape, rounds, variants, a.tutorial_batch, device, precision, a.compile, references,
                          scoring=not a.no_score)
    rows: list[dict[str, Any]] = []
    base: Optional[dict[str, Any]] = None
    print(f"{'variant':<16} {'prec':>5} {'s/step':>8} {'tok/s':>9} {'useful tok/s':>13} {'MFU':>6} {'peak MB':>8} "
          f"{'vs first':>9} {'rounds vs first':>16} {'useful vs first':>16} {'first step s':>13}")
    for v in runs:
        t = statistics.median(v.times)
        peak = peaks[v.precision][0]
        r: dict[str, Any] = {
            "variant": v.name, "precision": v.precision, "s_per_step": t, "tokens_per_s": v.tokens / t,
            "useful_tokens_per_s": v.useful / t, "model_flops_per_s": v.flops / t,
            "mfu": v.flops / t / peak if peak else None, "peak_flops": peak, "peak_memory_mb": v.peak_bytes / 2**20,
            "first_step_s": v.first_step_s, "steps": v.times, "tokens": v.tokens}
        base = base or r
        r["speedup"] = r["tokens_per_s"] / base["tokens_per_s"]
        r["useful_speedup"] = r["useful_tokens_per_s"] / base["useful_tokens_per_s"]
        # the ratio of each round's steps, then their median: load that comes and goes between
        # rounds slows both steps of a round alike
        r["round_speedup"] = round_ratio(base["steps"], v.times, base["tokens"], v.tokens)
        if v.score is not None:
            ts = statistics.median(v.score_times)
            r.update({"score_s": ts, "score_tokens_per_s": v.tokens / ts, "score_useful_tokens_per_s": v.useful / ts,
                      "score_over_train": t / ts, "score_steps": v.score_times})
        rows.append(r)
        mfu = f"{r['mfu']:6.1%}" if peak else f"{'-':>6}"
        print(f"{v.name:<16} {v.precision:>5} {t:8.3f} {r['tokens_per_s']:9.0f} {r['useful_tokens_per_s']:13.0f} {mfu} "
              f"{r['peak_memory_mb']:8.0f} {r['speedup']:8.2f}x {r['round_speedup']:15.2f}x "
              f"{r['useful_speedup']:15.2f}x {v.first_step_s:13.1f}")
    scored = [r for r in rows if "score_s" in r]
    if scored:
        first = scored[0]
        print("scoring, forward only as `cairn eval` scores, the same batch:")
        print(f"{'variant':<16} {'prec':>5} {'s/pass':>8} {'tok/s':>9} {'useful tok/s':>13} {'vs first':>9} "
              f"{'rounds vs first':>16} {'score/train tok/s':>18}")
        for r in scored:
            r["score_speedup"] = r["score_tokens_per_s"] / first["score_tokens_per_s"]
            r["score_round_speedup"] = round_ratio(first["score_steps"], r["score_steps"], first["tokens"], r["tokens"])
            print(f"{r['variant']:<16} {r['precision']:>5} {r['score_s']:8.3f} {r['score_tokens_per_s']:9.0f} "
                  f"{r['score_useful_tokens_per_s']:13.0f} {r['score_speedup']:8.2f}x "
                  f"{r['score_round_speedup']:15.2f}x {r['score_over_train']:17.2f}x")
    result: dict[str, Any] = {
        "shape": {**vars(a), "model": asdict(mc), "seq_len": shape.seq, "batch_size": shape.batch},
        "device": where, "precision": precision, "precision_choice": choice.reason,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""), "keep_freed_memory": kept,
        # the vector kernels ATen dispatched to: ATEN_CPU_CAPABILITY=avx2 holds an AVX-512 CPU to AVX2's
        # for ATen's own kernels; the matmul libraries have their own switches, recorded beside it
        "cpu_capability": torch.backends.cpu.get_cpu_capability() if device.type == "cpu" else None,
        "isa_environment": {k: os.environ[k] for k in ISA_ENVIRONMENT if k in os.environ},
        "peak_flops": peaks[precision][0], "peak_source": peaks[precision][1],
        "peaks": {p: {"flops": pk, "source": src} for p, (pk, src) in peaks.items()}, "training": rows}
    if a.generate:
        g = bench_generation(mc, a.generate, device, precision)
        result["generation_tokens_per_s"] = g
        print(f"generation of {a.generate} tokens: KV cache {g['kv_cache']:.1f} tok/s, full recomputation "
              f"{g['recompute']:.1f} tok/s: {g['kv_cache'] / g['recompute']:.2f}x")
    if a.json:
        recording.write(a.json, result, threads=torch.get_num_threads())
    return 0
