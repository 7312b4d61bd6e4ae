"""Which precision a run computes in, and the matmul peak its MFU is measured against.

On GPUs `precision = "auto"` is bf16 autocast wherever the GPU supports it. On CPUs it is decided
by measurement on the machine that runs: bf16 autocast only pays where the CPU has native bf16
dot products (x86 `avx512_bf16` or `amx_bf16`, Arm `bf16`); elsewhere bf16 is emulated and
slower than float32. Even with them, autocast adds a cast around every matmul, so the choice
times the run's own matmuls (its linears at its tokens per micro-batch) in both precisions and
takes bf16 only when it is faster by `BF16_MARGIN`. The timings are cached per machine (CPU model,
threads) and torch version in $CAIRN_CACHE (or ~/.cache/cairn)/machine/matmul.json, so every run
of a shape on a machine makes the same choice; the same file keeps the best float32 and bf16
matmul peaks seen on the machine, which MFU is reported against.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, Sequence

import torch

from cairn.util import files
from cairn.util.errors import CairnError, option
from cairn.util.host import cpu_info

log = logging.getLogger(__name__)

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86 (/proc/cpuinfo "flags"), Arm ("Features")

# bf16 autocast is chosen on a CPU when the run's matmuls are at least this much faster in bf16.
# The rest of a step does not speed up (norms, softmax, the optimizer over float32 master weights)
# and autocast adds a cast of every matmul operand, so a step gains less than its matmuls: on a
# 2-core AMD EPYC with avx512_bf16 (torch 2.13.0, 2026-12) cpu-10min's matmuls measured 1.9-2.9x
# faster in bf16 and its step 1.6x eager, 2.0x compiled (docs/precision.md). A margin keeps
# float32 where bf16's gain would be within the casts and the noise of one measurement.
BF16_MARGIN = 1.3

# Below this many FLOPs in a micro-batch's forward matmuls a step is mostly per-operator overhead,
# which bf16 does not shrink, plus oneDNN building its bf16 kernels for every new shape (each new
# story length at evaluation): such runs stay float32 without measuring. cpu-10min is 1.5 GFLOP;
# a d32 toy model with a 384-token vocabulary at 4 x 32 tokens, 0.02.
MIN_BF16_FLOPS = 0.5e9

PEAK_SIZE = 1024  # the square matmul whose FLOP/s is the CPU's peak for MFU
TIMED_ROWS = 2048  # the run's matmuls are timed on at most this many rows: past it their FLOP/s no longer grows


@dataclass(frozen=True)
class Choice:
    """A run's precision and why: `reason` is what the log says after "precision: <precision>"."""
    precision: str
    reason: str
    measured: Optional[dict[str, float]] = None  # {"fp32": FLOP/s, "bf16": FLOP/s} of the run's matmuls, when timed

    def describe(self) -> str:
        return f"precision: {self.precision} ({self.reason})"


# ---------------------------------------------------------------- what the CPU is

def native_bf16(flags: Optional[set[str]] = None) -> bool:
    """Does this CPU compute bf16 dot products in hardware? From its flags where the OS lists
    them; else torch's own query (which on x86 also says yes to AVX-512 CPUs that only emulate
    bf16, so it is the fallback, not the test)."""
    if flags is None:
        flags = cpu_info()[1]
    if flags:
        return any(f in flags for f in NATIVE_BF16_FLAGS)
    query = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(query()) if query is not None else False
    except RuntimeError:
        return False


# ---------------------------------------------------------------- timing matmuls

Shape = tuple[int, int, int]  # (m, k, n): an [m, k] @ [k, n] product


class LinearSizes(Protocol):
    """The model config's sizes that decide its linears' shapes (config.sections.ModelConfig is one;
    the runtime layer sits below config and cannot name it)."""

    @property
    def d_model(self) -> int: ...
    @property
    def d_mlp(self) -> int: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def mlp(self) -> str: ...


def run_matmuls(model_cfg: LinearSizes, tokens: int) -> list[Shape]:
    """The forward matmuls of one micro-batch of `tokens` tokens through `model_cfg`'s linears
    (one of each shape; the backward's are the same sizes transposed)."""
    d, mlp, vocab = model_cfg.d_model, model_cfg.d_mlp, model_cfg.vocab_size
    shapes = [(tokens, d, 3 * d), (tokens, d, d), (tokens, d, mlp), (tokens, mlp, d), (tokens, d, vocab)]
    if model_cfg.mlp == "swiglu":
        shapes.append((tokens, d, mlp))
    return shapes


def time_matmuls(shapes: Sequence[Shape], dtype: torch.dtype, repeats: int = 3, min_s: float = 0.02) -> float:
    """FLOP/s of the products of `shapes` in `dtype`: the best of `repeats` timings, each of as
    many passes over all of them as take `min_s` (a small model's matmuls take microseconds, too
    short to time alone). The first, untimed, pass warms the kernels (oneDNN builds its bf16
    kernels per shape). Values do not matter: ones leave the RNG alone."""
    pairs = [(torch.ones(m, k, dtype=dtype), torch.ones(k, n, dtype=dtype)) for m, k, n in shapes]
    flops = sum(2 * m * k * n for m, k, n in shapes)

    def passes(count: int) -> float:
        t = time.perf_counter()
        for _ in range(count):
            for a, b in pairs:
                a @ b
        return time.perf_counter() - t

    one = max(passes(1), 1e-7)
    count = max(1, min(10_000, int(min_s / one) + 1))
    best = min(passes(count) for _ in range(repeats)) / count
    return flops / max(best, 1e-9)


def cache_file() -> Path:
    """Under the same root as the token cache (data/cache.py)."""
    base = os.environ.get("CAIRN_CACHE") or "~/.cache/cairn"
    return Path(os.path.expanduser(base)) / "machine" / "matmul.json"


def machine_key() -> str:
    """What the timings hold for: the CPU, the threads torch uses, torch's version."""
    model, _ = cpu_info()
    return f"{model} | {torch.get_num_threads()} threads | torch {torch.__version__}"


def cached_flops(what: str, measure: Callable[[], float], path: Optional[Path] = None, best: bool = False) -> float:
    """FLOP/s of `what` on the machine that runs: from the cache, else measured (and cached). With `best`,
    measured every time and the fastest figure ever seen kept: a peak measured while other work
    shared the CPU would otherwise stay too low for good. A cache that cannot be read or written
    only costs a new measurement."""
    path = path or cache_file()
    key = machine_key()
    try:
        loaded: Any = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        loaded = {}
    cache: dict[str, Any] = loaded if isinstance(loaded, dict) else {}
    stored = cache.get(key)
    entry: dict[str, Any] = stored if isinstance(stored, dict) else {}
    value = entry.get(what)
    seen = float(value) if isinstance(value, (int, float)) and value > 0 else None
    if seen is not None and not best:
        return seen
    value = measure()
    if seen is not None and seen >= value:
        return seen
    entry[what] = value
    cache[key] = entry
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        files.write_text(path, json.dumps(cache, indent=1, sort_keys=True))
    except OSError as e:
        log.debug(f"matmul timings not cached in {path}: {e}")
    return value


def shapes_key(shapes: Sequence[Shape]) -> str:
    return " ".join(f"{m}x{k}x{n}" for m, k, n in sorted(set(shapes)))


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def time_alternating(shapes: Sequence[Shape], rounds: int = 5) -> dict[str, float]:
    """{"fp32": FLOP/s, "bf16": FLOP/s} of `shapes`, the best of `rounds` timings of each taken in
    turn, so that other work on a shared CPU slows both alike instead of whichever ran second."""
    best = dict.fromkeys(DTYPES, 0.0)
    for _ in range(rounds):
        for name, dtype in DTYPES.items():
            best[name] = max(best[name], time_matmuls(shapes, dtype, repeats=1))
    return best


def measured_pair(shapes: Sequence[Shape]) -> dict[str, float]:
    """{"fp32": FLOP/s, "bf16": FLOP/s} of `shapes`, cached."""
    key = shapes_key(shapes)
    timed: dict[str, float] = {}

    def measure(name: str) -> float:
        if not timed:
            timed.update(time_alternating(shapes))
        return timed[name]
    return {name: cached_flops(f"{name} {key}", functools.partial(measure, name)) for name in DTYPES}


# ---------------------------------------------------------------- the choice

def choose_cpu(native: bool, measure: Callable[[], dict[str, float]], margin: float = BF16_MARGIN) -> Choice:
    """bf16 where the CPU has it natively and its matmuls are `margin` times float32's; `measure`
    (only called on such a CPU) gives {"fp32": FLOP/s, "bf16": FLOP/s}."""
    if not native:
        return Choice("fp32", "auto: this CPU has no native bf16 (no avx512_bf16, amx_bf16 or bf16 flag)")
    m = measure()
    fp32, bf16 = m["fp32"], m["bf16"]
    figures = f"the run's matmuls: bf16 {bf16 / 1e9:,.0f} GFLOP/s, float32 {fp32 / 1e9:,.0f} GFLOP/s, " \
              f"{bf16 / fp32:.2f}x"
    if bf16 >= margin * fp32:
        return Choice("bf16", f"measured {figures}", m)
    return Choice("fp32", f"measured {figures}, below the {margin:g}x bf16 must gain", m)


def resolve(precision: str, device: torch.device, model_cfg: Optional[LinearSizes] = None, tokens: int = 0) -> Choice:
    """The precision a run uses. "fp32" and "bf16" are taken as given (bf16 refused on GPUs
    without it). "auto": bf16 on GPUs that support it; on CPUs, measured for the run's matmuls
    (`model_cfg`, `tokens` per micro-batch) where given, else float32."""
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise CairnError(f"this GPU does not support bf16: use {option('system.precision')} fp32")
    if precision != "auto":
        return Choice(precision, "as asked")
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return Choice("bf16", "auto: the GPU supports bf16")
        return Choice("fp32", "auto: the GPU does not support bf16")
    if device.type != "cpu":
        return Choice("fp32", f"auto: float32 on {device.type}")
    if model_cfg is None or tokens <= 0:
        return Choice("fp32", "auto: float32 (nothing to measure)")
    work = sum(2 * m * k * n for m, k, n in run_matmuls(model_cfg, tokens))
    if work < MIN_BF16_FLOPS:
        return Choice("fp32", f"auto: the run's matmuls are {work / 1e6:,.0f} MFLOP a micro-batch, too small for "
                              f"bf16 to pay (below {MIN_BF16_FLOPS / 1e6:,.0f})")
    try:
        return choose_cpu(native_bf16(), lambda: measured_pair(run_matmuls(model_cfg, min(tokens, TIMED_ROWS))))
    except (RuntimeError, MemoryError) as e:  # the operands did not fit beside what is already allocated
        return Choice("fp32", f"auto: the run's matmuls could not be timed ({str(e).splitlines()[0][:80]})")


def saved_choice(run_json: Path, device: Optional[torch.device] = None) -> Optional[str]:
    """The precision a run directory's run.json says it trained in, if any (and, given `device`,
    only if it trained on that kind of device): a resume keeps it, an evaluation uses it."""
    try:
        info = json.loads(run_json.read_text(encoding="utf-8"))
        value = info.get("precision")
        if device is not None and torch.device(info.get("device", "")).type != device.type:
            return None
    except (OSError, ValueError, AttributeError, RuntimeError):
        return None
    return value if value in ("fp32", "bf16") else None


def for_checkpoint(precision: str, device: torch.device, checkpoint: Path) -> str:
    """The precision to evaluate a trained run's checkpoint in: "auto" is the precision the run
    trained in on the same kind of device (its run.json, beside checkpoints/), so `cairn eval`
    reproduces the run's own validation figures; otherwise as `resolve` says without a model."""
    if precision == "auto":
        for directory in (checkpoint, checkpoint.parent, checkpoint.parent.parent):
            saved = saved_choice(directory / "run.json", device)
            if saved is not None:
                return saved
    return resolve(precision, device).precision


# ---------------------------------------------------------------- peaks for MFU

def cpu_peak_flops(precision: str) -> float:
    """The CPU's square-matmul FLOP/s in the precision a run computes in: the best measured on
    CPU (a fraction of a second to measure again each time)."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    n = PEAK_SIZE
    square = cached_flops(f"peak {precision} {n}", lambda: time_matmuls([(n, n, n)], dtype), best=True)
    # a run's own matmuls can go faster than the square one (bf16 kernels with a short inner
    # dimension stay in cache): the peak is the fastest figure measured, so MFU stays below 100%
    return max([square, *_measured(precision)])


def _measured(precision: str, path: Optional[Path] = None) -> list[float]:
    """Every cached FLOP/s figure of `precision` on the machine that runs."""
    try:
        cache = json.loads((path or cache_file()).read_text(encoding="utf-8"))
        entry = cache.get(machine_key(), {})
    except (OSError, ValueError, AttributeError):
        return []
    if not isinstance(entry, dict):
        return []
    return [float(v) for k, v in entry.items() if isinstance(v, (int, float)) and v > 0
            and (k.startswith(f"{precision} ") or k.startswith(f"peak {precision} "))]


def for_run(precision: str, device: torch.device, model_cfg: LinearSizes, tokens: int,
            resumed_run_json: Optional[Path] = None) -> Choice:
    """A training run's precision: a resumed run keeps the one its run.json holds when the config
    leaves it to "auto" (a resume continues the same computation, whatever a new measurement says)."""
    if precision == "auto" and resumed_run_json is not None:
        saved = saved_choice(resumed_run_json)
        if saved is not None:
            return Choice(saved, f"auto: kept from the run being resumed ({resumed_run_json.name})")
    return resolve(precision, device, model_cfg, tokens)




# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, for MFU on GPUs.
GPU_BF16_PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12,
                  "RTX 4090": 165e12, "RTX 3090": 71e12}


def peak_flops(device: torch.device, precision: str) -> tuple[float, str] | tuple[None, str]:
    """(peak FLOP/s, where it comes from) for MFU in the precision the run computes in, or
    (None, reason) when unknown."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_BF16_PEAKS.items():
            if key in name:
                # float32 runs on tensor cores as TF32 at about half the bf16 rate
                return (peak if precision == "bf16" else peak / 2), f"{name} data sheet"
        return None, f"no peak known for {name}"
    if device.type == "cpu":
        return cpu_peak_flops(precision), f"measured {'bf16' if precision == 'bf16' else 'float32'} matmul"
    return None, f"no peak known for {device.type}"
