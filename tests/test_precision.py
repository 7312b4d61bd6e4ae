"""precision = "auto": bf16 on a CPU only where it has native bf16 and bf16 matmuls measure faster;
the timings cached per machine; a resumed run keeps the precision it was started in."""

import json

import pytest
import torch
from conftest import make_stories, write_stories

from cairn.runtime import precision
from cairn.config.sections import ModelConfig
from cairn.training import train
from helpers import config

CPU = torch.device("cpu")


def fixed(fp32: float, bf16: float):
    calls = []

    def measure():
        calls.append(1)
        return {"fp32": fp32, "bf16": bf16}
    return measure, calls


def test_native_bf16_is_read_from_the_cpus_flags():
    assert precision.native_bf16({"avx512f", "avx512_bf16"})
    assert precision.native_bf16({"amx_bf16", "amx_tile"})
    assert precision.native_bf16({"fp", "asimd", "bf16"})  # Arm's Features line
    assert not precision.native_bf16({"avx512f", "avx512bw", "avx2"})  # AVX-512 that only emulates bf16


def test_a_cpu_without_native_bf16_stays_float32_without_measuring():
    measure, calls = fixed(100e9, 400e9)
    choice = precision.choose_cpu(False, measure)
    assert choice.precision == "fp32" and not calls
    assert "no native bf16" in choice.describe()


def test_native_bf16_is_chosen_when_its_matmuls_are_faster_by_the_margin():
    measure, calls = fixed(160e9, 400e9)
    choice = precision.choose_cpu(True, measure)
    assert choice.precision == "bf16" and calls == [1]
    assert choice.describe() == ("precision: bf16 (measured the run's matmuls: bf16 400 GFLOP/s, "
                                 "float32 160 GFLOP/s, 2.50x)")
    assert choice.measured == {"fp32": 160e9, "bf16": 400e9}


def test_native_bf16_that_gains_less_than_the_margin_stays_float32():
    below = precision.BF16_MARGIN * 0.95
    choice = precision.choose_cpu(True, fixed(100e9, below * 100e9)[0])
    assert choice.precision == "fp32"
    assert f"below the {precision.BF16_MARGIN:g}x bf16 must gain" in choice.reason
    assert precision.choose_cpu(True, fixed(100e9, precision.BF16_MARGIN * 100e9)[0]).precision == "bf16"


def test_resolve_measures_the_runs_own_matmuls_only_for_auto_on_a_cpu(monkeypatch):
    seen = []
    monkeypatch.setattr(precision, "native_bf16", lambda flags=None: True)
    monkeypatch.setattr(precision, "measured_pair", lambda shapes: seen.append(shapes) or {"fp32": 1.0, "bf16": 3.0})
    mc = ModelConfig(vocab_size=4096, d_model=128, n_layers=3, n_heads=2, d_mlp=352, mlp="swiglu")
    assert precision.resolve("fp32", CPU, mc, 1024) == precision.Choice("fp32", "as asked")
    assert precision.resolve("bf16", CPU, mc, 1024).precision == "bf16"
    assert not seen
    assert precision.resolve("auto", CPU, mc, 1024).precision == "bf16"
    (shapes,) = seen
    assert sorted(set(shapes)) == [(1024, 128, 128), (1024, 128, 352), (1024, 128, 384), (1024, 128, 4096),
                                   (1024, 352, 128)]
    assert precision.resolve("auto", CPU).precision == "fp32"  # no model to measure: as before
    # a toy model's matmuls are too small for bf16 to pay: float32, nothing measured
    toy = precision.resolve("auto", CPU, ModelConfig(vocab_size=384, d_model=32, n_layers=2, n_heads=4, d_mlp=64), 128)
    assert toy.precision == "fp32" and "too small for bf16" in toy.reason and len(seen) == 1
    # a huge micro-batch is timed on TIMED_ROWS rows, not allocated whole
    precision.resolve("auto", CPU, mc, 10**7)
    assert {m for m, _, _ in seen[-1]} == {precision.TIMED_ROWS}


def test_the_real_measurement_times_both_precisions(tmp_path, monkeypatch):
    monkeypatch.setenv("CAIRN_CACHE", str(tmp_path))
    pair = precision.measured_pair([(64, 32, 48)])
    assert set(pair) == {"fp32", "bf16"} and all(v > 0 for v in pair.values())


def test_timings_are_cached_per_machine_and_torch_version(tmp_path, monkeypatch):
    path = tmp_path / "machine" / "matmul.json"
    calls = []

    def measure():
        calls.append(1)
        return 123e9
    assert precision.cached_flops("bf16 8x8x8", measure, path) == 123e9
    assert precision.cached_flops("bf16 8x8x8", lambda: pytest.fail("measured again"), path) == 123e9
    assert calls == [1]
    saved = json.loads(path.read_text())
    assert saved == {precision.machine_key(): {"bf16 8x8x8": 123e9}}
    assert "torch " + torch.__version__ in precision.machine_key()
    # another torch (or CPU, or thread count) is another machine: measured anew, both kept
    monkeypatch.setattr(precision, "machine_key", lambda: "other CPU | 2 threads | torch 9.9")
    assert precision.cached_flops("bf16 8x8x8", lambda: 7e9, path) == 7e9
    assert len(json.loads(path.read_text())) == 2
    # a damaged cache costs a measurement, not the run
    path.write_text("{not json")
    assert precision.cached_flops("bf16 8x8x8", lambda: 5e9, path) == 5e9


def test_cpu_peak_is_the_precision_in_uses_and_the_best_seen(tmp_path, monkeypatch):
    monkeypatch.setenv("CAIRN_CACHE", str(tmp_path))
    timed = []
    monkeypatch.setattr(precision, "time_matmuls", lambda shapes, dtype: timed.append(dtype) or
                        (400e9 if dtype == torch.bfloat16 else 160e9))
    from cairn.runtime.precision import peak_flops
    assert peak_flops(CPU, "bf16") == (400e9, "measured bf16 matmul")
    assert peak_flops(CPU, "fp32") == (160e9, "measured float32 matmul")
    # a peak is measured again each time and the best kept: one taken on a busy CPU does not stay
    monkeypatch.setattr(precision, "time_matmuls", lambda shapes, dtype: timed.append(dtype) or 100e9)
    assert peak_flops(CPU, "bf16")[0] == 400e9
    monkeypatch.setattr(precision, "time_matmuls", lambda shapes, dtype: timed.append(dtype) or 450e9)
    assert peak_flops(CPU, "bf16")[0] == 450e9
    assert peak_flops(CPU, "bf16")[0] == 450e9
    assert timed == [torch.bfloat16, torch.float32, torch.bfloat16, torch.bfloat16, torch.bfloat16]


@pytest.mark.slow
def test_a_resumed_run_keeps_the_precision_it_started_in(tmp_path, small_tokenizer, monkeypatch, logs):
    stories = write_stories(tmp_path / "stories.jsonl", make_stories(36))
    cfg = config(stories, tokenizer=small_tokenizer, max_steps=8, epochs=1)
    monkeypatch.setattr(precision, "MIN_BF16_FLOPS", 0)  # a toy model, measured as if it were large
    monkeypatch.setattr(precision, "native_bf16", lambda flags=None: True)
    monkeypatch.setattr(precision, "measured_pair", lambda shapes: {"fp32": 100e9, "bf16": 300e9})
    run = tmp_path / "run"
    train(cfg, run, stop_after=5)
    info = json.loads((run / "run.json").read_text())
    assert info["precision"] == "bf16" and info["precision_choice"].startswith("measured the run's matmuls")
    assert any(m.startswith("precision: bf16 (measured the run's matmuls: bf16 300 GFLOP/s") for m in logs)
    # the machine now measures otherwise: the resumed run still computes in bf16, and says why
    monkeypatch.setattr(precision, "measured_pair", lambda shapes: {"fp32": 100e9, "bf16": 90e9})
    logs.clear()
    out = train(cfg, run, resume=True)
    assert out["step"] == 8
    assert json.loads((run / "run.json").read_text())["precision"] == "bf16"
    assert "precision: bf16 (auto: kept from the run being resumed (run.json))" in logs
    # a new run on that machine measures and stays float32
    logs.clear()
    train(cfg, tmp_path / "new")
    assert json.loads((tmp_path / "new" / "run.json").read_text())["precision"] == "fp32"
    # and --precision forces either, on a resume too
    train(config(stories, tokenizer=small_tokenizer, max_steps=10, epochs=1, precision="fp32"), run, resume=True)
    assert json.loads((run / "run.json").read_text())["precision"] == "fp32"


def test_the_peak_is_at_least_the_fastest_matmul_measured_so_mfu_stays_below_one(tmp_path, monkeypatch):
    """A run's own bf16 matmuls measured faster than the square one: MFU uses the faster figure."""
    monkeypatch.setenv("CAIRN_CACHE", str(tmp_path))
    monkeypatch.setattr(precision, "time_matmuls", lambda shapes, dtype, repeats=3: 290e9)
    assert precision.cpu_peak_flops("bf16") == 290e9
    assert precision.cached_flops("bf16 1024x128x128", lambda: 570e9) == 570e9  # a run's shapes, as for_run times them
    assert precision.cached_flops("fp32 1024x128x128", lambda: 140e9) == 140e9
    assert precision.cpu_peak_flops("bf16") == 570e9
    assert precision.cpu_peak_flops("fp32") == 290e9  # the other precision's figures do not count
