"""Where and how tensors run: device choice, autocast precision, CPU threads, seeding."""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import shutil
import sys
from typing import ContextManager, Optional

import numpy as np
import torch

from cairn.util.errors import CairnError, option
from cairn.util.host import usable_cores


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CairnError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CairnError(f"device {name!r} asked for but CUDA is not available: use {option('system.device')} cpu or "
                         "auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise CairnError(f"device {name!r} asked for but MPS is not available: use {option('system.device')} cpu or "
                         "auto")
    return device


def autocast(device: torch.device, precision: str) -> ContextManager[None]:
    """Autocast context for the forward pass; master weights stay float32."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def set_threads(n: int = 0) -> int:
    """One torch thread per usable core unless told otherwise (oversubscription slows CPU runs)."""
    if n <= 0:
        n = usable_cores()
    torch.set_num_threads(n)
    return n


# the off switch of keep_freed_memory, for every cairn process at once (docs/speed.md)
KEEP_FREED_MEMORY_ENV = "CAIRN_KEEP_FREED_MEMORY"


def keep_freed_memory(device: Optional[torch.device] = None) -> bool:
    """Stop glibc from handing a CPU process's large tensors back to the kernel when they are freed.

    The one decision for every process that computes on CPUs: training (training/build.py),
    everything that loads a trained run (checkpoint/load.py: eval, generate, chat, serve, export)
    and `cairn bench`. By default glibc serves blocks above a (moving) threshold with their own
    mmap, and trims the heap's free top back to the kernel; the next step then allocates the same
    sizes again and page-faults every page in, zero-filled by the kernel. On the cpu-10min preset
    that was 18M page faults and 77 s of system time in a 10-minute run. Serving blocks up to 32 MB
    (glibc's largest threshold) from the heap and never trimming it keeps those pages mapped between
    steps: the process keeps its peak heap, as jemalloc or tcmalloc (the allocators PyTorch's CPU
    tuning guide recommends) would. Blocks above 32 MB are still mapped afresh: the fused head keeps
    its own (model/ops.py). Changes nothing and returns False for a device other than the CPU,
    where the C library is not glibc, or when CAIRN_KEEP_FREED_MEMORY=0 turns it off."""
    if device is not None and device.type != "cpu":
        return False
    if os.environ.get(KEEP_FREED_MEMORY_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and others: their own allocator, not tuned here
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def cpu_compiler() -> Optional[str]:
    """The C++ compiler torch.compile needs on CPUs (inductor writes C++ and builds it), or None."""
    for name in (os.environ.get("CXX"), "g++", "clang++", "c++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def available_memory(device: torch.device) -> Optional[int]:
    """Bytes a new allocation can still get on `device`, where that is known."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            with open("/proc/meminfo", encoding="ascii") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            return None
    return None
