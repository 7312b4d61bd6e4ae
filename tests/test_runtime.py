"""The process-level settings a CPU run makes (runtime.py)."""

import platform
import subprocess
import sys

import pytest

# A few training steps of a small model with the cpu-10min preset's vocabulary and batch: the
# same large blocks (logits, activations, gradients) freed and asked for again every step.
PROBE = """
import resource, sys, torch
from cairn.config.sections import ModelConfig
from cairn.model.transformer import Transformer
from cairn.runtime.device import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
torch.manual_seed(0)
model = Transformer(ModelConfig(vocab_size=4096, d_model=64, n_layers=1, n_heads=2, d_mlp=128, context_len=256))
x = torch.randint(0, 4096, (4, 257))
def step():
    loss, n = model(x[:, :-1], labels=x[:, 1:])
    loss.backward()
    model.zero_grad(set_to_none=True)
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

    logits_pages = 4 * 256 * 4096 * 4 // 4096  # one step's float32 logits, in 4 KB pages
    default, kept = faults_per_step("default"), faults_per_step("keep")
    # glibc hands the blocks back and faults them in again: about one logits buffer a step (4,013 to
    # over 4,096 pages measured; how much of it glibc's moving mmap threshold keeps varies by run)
    assert default > logits_pages / 2
    assert kept < 0.4 * default  # measured: 5-40x fewer (threads' own arenas still fault some in)


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
