"""Facts about the machine that need no torch (data worker processes import this too)."""

from __future__ import annotations

import os


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity or cgroup limit where Python can see them."""
    count = getattr(os, "process_cpu_count", None)  # Python 3.13+
    if count is not None:
        return max(1, count() or 1)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def cpu_info() -> tuple[str, set[str]]:
    """(model name, feature flags) from /proc/cpuinfo; the platform's name and no flags where it
    cannot be read."""
    model = ""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key == "model name" and not model:
                    model = value.strip()
                elif key in ("flags", "features") and not flags:
                    flags = set(value.split())
    except OSError:  # not Linux
        pass
    if not model:
        import platform
        model = platform.processor() or platform.machine()
    return model, flags


# The CPU features that decide float32 and bfloat16 matmul speed: x86 (/proc/cpuinfo "flags") and
# Arm ("Features"), in the order a record lists them.
SPEED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "asimd", "sve", "bf16")


def speed_flags(flags: set[str]) -> list[str]:
    """The SPEED_FLAGS among a CPU's feature flags."""
    return [f for f in SPEED_FLAGS if f in flags]


def cpu_description() -> str:
    """The CPU in words: model, usable cores and the vector instructions that decide float32 and
    bfloat16 speed, e.g. "AMD EPYC, 2 cores, avx2 avx512f avx512_bf16"."""
    model, flags = cpu_info()
    wanted = speed_flags(flags)
    text = f"{model or 'unknown CPU'}, {usable_cores()} cores"
    return f"{text}, {' '.join(wanted)}" if wanted else text
