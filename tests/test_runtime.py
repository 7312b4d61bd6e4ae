"""The process-level settings a CPU run makes (runtime.py)."""

import platform
import subprocess
import sys

import pytest

from cairn.runtime.device import keep_freed_memory

# A step's large blocks (activations, gradients: here three of 20 MB) made, filled and freed
# together, again and again: glibc's default serves them from the heap once its moving mmap threshold
# has grown, but trims the heap's free top back to the kernel whenever it is over twice that.
PROBE = """
import resource, sys, torch
from cairn.runtime.device import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory(torch.device("cpu"))
def step():
    blocks = [torch.ones(5 << 20) for _ in range(5)]
    del blocks
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
"""


@pytest.mark.slow
@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="tunes glibc's allocator only")
def test_keep_freed_memory_stops_page_faulting_the_same_blocks_in_again():
    def faults_per_step(mode: str) -> float:
        out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
        return float(out.stdout)

    block_pages = (5 << 20) * 4 // 4096  # one 20 MB block in 4 KB pages
    # glibc's default trims and faults in again about all five blocks a step (20,448 pages
    # measured), except in a process whose heap cannot grow in place (about 1 in 5 measured, by
    # where the address space put it): its top is then never trimmed. One of three processes shows it
    defaults: list[float] = []
    while len(defaults) < 3 and not any(d > 2 * block_pages for d in defaults):
        defaults.append(faults_per_step("default"))
    assert max(defaults) > 2 * block_pages, defaults
    # kept: 0 measured. The model's own largest blocks, the head's [chunk, V] logits, are above
    # glibc's largest mmap threshold; the head keeps those itself (model/ops.py, test_ops.py)
    kept = faults_per_step("keep")
    assert kept < 0.05 * block_pages, kept


def test_keep_freed_memory_is_for_cpu_processes_and_has_an_off_switch(monkeypatch):
    import torch

    from cairn.runtime.device import KEEP_FREED_MEMORY_ENV

    monkeypatch.setenv(KEEP_FREED_MEMORY_ENV, "0")
    assert keep_freed_memory(torch.device("cpu")) is False
    monkeypatch.delenv(KEEP_FREED_MEMORY_ENV)
    assert keep_freed_memory(torch.device("meta")) is False  # another device's tensors are not malloc's
    assert keep_freed_memory(torch.device("cpu")) is (platform.libc_ver()[0] == "glibc")


def test_loading_a_run_tunes_the_allocator_for_its_device(trained_run, monkeypatch):
    """eval, generate, chat, serve and export all load a run through checkpoint/load.py."""
    import cairn.checkpoint.load as load

    seen = []
    monkeypatch.setattr(load, "keep_freed_memory", lambda device: seen.append(device.type) or True)
    load.load(trained_run.run, device="cpu")
    assert seen == ["cpu"]


def test_cpu_compiler_is_found_on_the_path_or_in_cxx(monkeypatch):
    from cairn.runtime.device import cpu_compiler

    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setenv("PATH", "")
    assert cpu_compiler() is None
    monkeypatch.setenv("CXX", sys.executable)  # any executable file named by $CXX counts
    assert cpu_compiler() == sys.executable


def test_compile_without_a_cpu_compiler_trains_eagerly_and_says_so(logs, tmp_path, stories_file, small_tokenizer,
                                                                   monkeypatch):
    import cairn.training.build as build
    from cairn.training import train
    from helpers import config

    monkeypatch.setattr(build, "cpu_compiler", lambda: None)
    cfg = config(stories_file, tokenizer=small_tokenizer, compile=True, max_steps=2, end_stories=0)
    done = train(cfg, tmp_path / "run")
    assert done["step"] == 2
    assert any("none was found" in m and "training without it" in m for m in logs)
