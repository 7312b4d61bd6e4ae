import re
import shlex
import statistics

import platform

import pytest
import torch

from cairn.bench import record
from cairn.bench.speed import main


@pytest.mark.slow
def test_bench_times_every_variant_and_checks_cached_decoding(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["--d-model", "32", "--n-heads", "4", "--n-layers", "1", "--seq-len", "32", "--batch-size", "2",
                 "--vocab-size", "300", "--rounds", "2", "--generate", "12", "--variants", "nanogpt,cairn,tutorial",
                 "--json", str(out)]) == 0
    rec = record.read(out)  # the one record shape: what ran, on which code and machine, then the result
    assert rec["command"].startswith("cairn bench --d-model 32 ")
    assert rec["command"].endswith(f"--json {shlex.quote(str(out))}")
    assert rec["threads"] == torch.get_num_threads() and rec["torch"] == torch.__version__
    assert rec["cpu"]["cores"] >= 1 and set(rec["load"]) == {"start", "end"}
    result = rec["result"]
    rows = {r["variant"]: r for r in result["training"]}
    assert set(rows) == {"nanogpt", "cairn", "tutorial"}
    assert all(len(r["steps"]) == 2 and r["tokens_per_s"] > 0 for r in rows.values())
    # the tutorial pads every row to 1000 tokens: only its real story tokens are useful
    assert rows["tutorial"]["useful_tokens_per_s"] < rows["tutorial"]["tokens_per_s"]
    assert rows["cairn"]["useful_tokens_per_s"] == rows["cairn"]["tokens_per_s"]
    assert set(result["generation_tokens_per_s"]) == {"kv_cache", "recompute"}
    # beside each training step, a forward-only scoring pass of the same batch, alternating as well
    assert all(len(r["score_steps"]) == 2 and r["score_tokens_per_s"] > 0 for r in rows.values())
    assert rows["tutorial"]["score_useful_tokens_per_s"] < rows["tutorial"]["score_tokens_per_s"]
    assert rows["nanogpt"]["score_speedup"] == 1.0 and rows["nanogpt"]["score_round_speedup"] == 1.0
    assert rows["cairn"]["score_round_speedup"] == pytest.approx(statistics.median(
        nano / own for nano, own in zip(rows["nanogpt"]["score_steps"], rows["cairn"]["score_steps"])))
    out = capsys.readouterr().out
    assert "generation of 12 tokens" in out and "scoring, forward only" in out


def test_bench_takes_a_presets_shape_and_reports_peak_memory(tmp_path, capsys):
    out = tmp_path / "bench.json"
    # the tiny preset's block; --vocab-size overrides the preset's 50257
    assert main(["--preset", "tiny", "--vocab-size", "50000", "--seq-len", "32", "--batch-size", "2", "--rounds", "1",
                 "--generate", "0", "--variants", "cairn", "--device", "cpu", "--precision", "fp32",
                 "--json", str(out)]) == 0
    result = record.read_result(out)
    assert result["shape"]["model"]["d_model"] == 64 and result["shape"]["model"]["vocab_size"] == 50000
    assert result["shape"]["seq_len"] == 32 and result["precision"] == "fp32"
    (row,) = result["training"]
    # the model, its gradients and AdamW's two moments alone are 4 x its float32 weights (6.6M)
    n_params = 64 * 50000 * 2 + 2 * (4 * 64 * 64 + 2 * 64 * 256)
    assert 4 * 4 * n_params * 0.9 <= row["peak_memory_mb"] * 2**20 <= 4 * 4 * n_params * 3
    assert 0 < row["mfu"] < 1
    # the scoring pass goes through `cairn eval`'s kernel: it does no backward, so it is the faster
    assert row["score_over_train"] > 1 and row["score_tokens_per_s"] == pytest.approx(64 / row["score_s"])
    assert result["keep_freed_memory"] is (platform.libc_ver()[0] == "glibc")
    assert result["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert "(tiny)" in capsys.readouterr().out


def test_bench_reference_stays_float32_and_mfu_is_against_each_rows_precision(tmp_path, monkeypatch):
    from cairn.runtime import precision

    monkeypatch.setenv("CAIRN_CACHE", str(tmp_path))
    monkeypatch.setattr(precision, "time_matmuls", lambda shapes, dtype: 400e9 if dtype == torch.bfloat16 else 160e9)
    out = tmp_path / "bench.json"
    assert main(["--d-model", "32", "--n-heads", "4", "--n-layers", "1", "--seq-len", "32", "--batch-size", "2",
                 "--vocab-size", "300", "--rounds", "1", "--generate", "0", "--device", "cpu", "--precision", "bf16",
                 "--reference-precision", "bf16", "--variants", "nanogpt,cairn,cairn-fp32", "--no-score",
                 "--json", str(out)]) == 0
    result = record.read_result(out)
    rows = {r["variant"]: r for r in result["training"]}
    assert {k: r["precision"] for k, r in rows.items()} == {"nanogpt": "fp32", "nanogpt-bf16": "bf16", "cairn": "bf16",
                                                            "cairn-fp32": "fp32"}
    for r in rows.values():
        assert r["peak_flops"] == (400e9 if r["precision"] == "bf16" else 160e9)
        assert r["mfu"] == pytest.approx(r["model_flops_per_s"] / r["peak_flops"])
    assert result["peaks"]["bf16"]["source"] == "measured bf16 matmul"
    assert not any("score_s" in r for r in rows.values())  # --no-score


def test_bench_rejects_unknown_variants_in_one_line(capsys):
    from cairn.cli import main as cli

    assert cli(["bench", "--variants", "nanogpt,fast"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --variants") and err.count("\n") == 1


def test_a_record_names_the_command_commit_machine_and_load(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["benchmarks/scripts/example.py", "--json", "out.json"])
    rec = record.start().write(tmp_path / "r.json", {"tokens_per_s": 1.5}, threads=3)
    assert tuple(rec) == record.KEYS and record.read(tmp_path / "r.json") == rec
    assert rec["command"] == "python benchmarks/scripts/example.py --json out.json"
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", rec["commit"])  # the tests run in a git checkout
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", rec["date"])
    assert set(rec["cpu"]) == {"model", "flags", "cores"} and rec["threads"] == 3
    assert rec["result"] == {"tokens_per_s": 1.5} and rec["python"].count(".") == 2
    assert record.git_commit(tmp_path) is None  # outside a git checkout: unknown


def test_every_record_under_benchmarks_is_in_the_one_shape():
    from conftest import REPO

    files = sorted((REPO / "benchmarks" / "records").iterdir())
    records = [p for p in files if p.suffix == ".json"]
    # beside the records only the stories the words-task record was scored on
    assert [p.name for p in files if p not in records] == ["instruct-words-samples.jsonl"]
    assert len(records) >= 19
    for path in records:
        rec = record.read(path)
        assert isinstance(rec["result"], dict) and rec["result"], path.name
        assert rec["commit"] is None or re.fullmatch(r"[0-9a-f]{40}(-dirty)?", rec["commit"]), path.name
        assert set(rec["cpu"]) == {"model", "flags", "cores"} and set(rec["load"]) == {"start", "end"}, path.name


def _shape(result: dict, d: int, vocab: int, precision: str, mode: str) -> dict:
    (row,) = [s for s in result["shapes"] if (s["d_model"], s["vocab"], s["precision"], s["mode"]) ==
              (d, vocab, precision, mode)]
    return row


def test_the_speed_page_quotes_the_head_allocator_and_scoring_records():
    from conftest import REPO

    text = (REPO / "docs" / "speed.md").read_text(encoding="utf-8")
    head = record.read_result(REPO / "benchmarks" / "records" / "head-alloc.json")
    assert head["keep_freed_memory"] and head["rounds"] == 5
    for s in head["shapes"]:
        assert s["after_equals_before"], s  # the kept buffers change no bit of the loss or gradients
        v = s["variants"]
        cells = (f"| d{s['d_model']} V{s['vocab']} {s['precision']} {s['mode']} | "
                 f"{v['before']['median_s'] * 1e3:,.0f} | "
                 f"{v['after']['median_s'] * 1e3:,.0f} ({v['after']['speedup_vs_before']:.2f}x) | "
                 f"{v['before-c128']['median_s'] * 1e3:,.0f} ({v['before-c128']['speedup_vs_before']:.2f}x) |")
        assert cells in text, cells
    bench = {r["variant"]: r for r in record.read_result(
        REPO / "benchmarks" / "records" / "bench-d256-v50257-fp32.json")["training"]}
    cairn, nanogpt = bench["cairn"], bench["nanogpt"]
    assert (f"{cairn['tokens_per_s']:.0f} against {nanogpt['tokens_per_s']:.0f} tokens/s, "
            f"{cairn['round_speedup']:.2f}x") in text
    assert (f"{cairn['score_tokens_per_s']:.0f} against {nanogpt['score_tokens_per_s']:.0f} tokens/s, "
            f"{cairn['score_round_speedup']:.2f}x") in text
    keep = record.read_result(REPO / "benchmarks" / "records" / "keep-memory-d256.json")["summary"]
    assert f"{keep['score_tokens_per_s']['on_over_off']:.2f}x" in text
    assert f"{keep['score_faults_per_batch']['off']:,.0f}" in text
    for name, caps in (("bench-d256-v50257-fp32-aten-avx2.json", {"ATEN_CPU_CAPABILITY": "avx2"}),
                       ("bench-d256-v50257-fp32-avx2-caps.json", {"ATEN_CPU_CAPABILITY": "avx2",
                                                                  "MKL_ENABLE_INSTRUCTIONS": "AVX2",
                                                                  "ONEDNN_MAX_CPU_ISA": "AVX2"})):
        result = record.read_result(REPO / "benchmarks" / "records" / name)
        assert result["isa_environment"] == caps and result["cpu_capability"] == "AVX2", name
        rows = {r["variant"]: r for r in result["training"]}
        assert (f"training {rows['cairn']['tokens_per_s']:.0f} against {rows['nanogpt']['tokens_per_s']:.0f} "
                f"tokens/s, {rows['cairn']['round_speedup']:.2f}x by rounds") in text, name


def test_speed_page_quotes_the_head_blocks_and_the_tiny_preset_records():
    """docs/speed.md's cache-blocking table and tiny-preset figures are the records' own, and the
    records hold what the page claims: blocking changed no bit at any shape; the tiny run's
    scoring ran at 2.5x its training tokens/s or more, with bits per byte equal to a plain
    computation's to 1e-6."""
    from conftest import REPO

    text = (REPO / "docs" / "speed.md").read_text(encoding="utf-8")
    blocks = record.read_result(REPO / "benchmarks" / "records" / "head-logit-blocks.json")
    assert blocks["rounds"] == 5 and len(blocks["shapes"]) == 16
    for s in blocks["shapes"]:
        assert s["bitwise_equal"], s
        prec = "fp32" if s["dtype"] == "float32" else "bf16"
        mode = "forward+backward" if s["mode"] == "train" else "forward"
        cells = (f"| d{s['d_model']} V{s['vocab']} {prec} {mode} | {s['whole_ms']:,.0f} | "
                 f"{s['blocked_ms']:,.0f} ({s['ratio']:.2f}x) |")
        assert cells in text, cells
    tiny = record.read_result(REPO / "benchmarks" / "records" / "tiny-eval.json")
    assert tiny["median_eval_over_train"] >= 2.5 and tiny["bits_per_byte_relative_difference"] < 1e-6
    assert f"(median {tiny['median_eval_over_train']:.2f}x)" in text
    assert f"{tiny['median_train_command_s']:.1f} s |" in text and tiny["median_train_command_s"] < 30
    assert f"to {tiny['bits_per_byte_relative_difference']:.1e} relative" in text
