"""The documents tell the truth in few words: every record they name exists, the presets table quotes
its records' figures (read from the records here, never typed twice), the README stays short, links
lead somewhere, and nothing in the repository speaks of how it was made instead of what it does."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cairn.bench.record import read_result
from cairn.config.presets import PRESETS
from conftest import REPO

README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
README_MAX_BYTES = 8 * 1024
SCRIPTS = REPO / "benchmarks" / "scripts"
RECORDS = REPO / "benchmarks" / "records"

# Words about the making of the project rather than the product. Each pattern is written so that
# this file's own text does not match it.
MAKING = re.compile(r"session [0-9]|this sess(?:ion)|this mach(?:ine)|run her(?:e)|measured her(?:e)|"
                    r"round [0-9]+|not been run her(?:e)", re.IGNORECASE)
MAKING_PLACES = ["README.md", "docs", "src", "tests", "benchmarks", "scripts"]


def _documents() -> list[Path]:
    return [README, *DOCS]


def test_the_readme_is_at_most_8_kb():
    assert README.stat().st_size <= README_MAX_BYTES, f"README.md is {README.stat().st_size} bytes"


@pytest.mark.parametrize("doc", _documents(), ids=lambda p: p.name)
def test_every_benchmarks_path_a_document_names_exists(doc):
    text = doc.read_text(encoding="utf-8")
    named = {m.rstrip(".,;:)`'\"") for m in re.findall(r"benchmarks/[\w./-]*", text)}
    missing = sorted(p for p in named if not (REPO / p).exists())
    assert not missing, f"{doc.name} names records that do not exist: {missing}"


@pytest.mark.parametrize("doc", _documents(), ids=lambda p: p.name)
def test_every_relative_link_leads_to_a_file(doc):
    text = doc.read_text(encoding="utf-8")
    links = [t.split("#")[0] for t in re.findall(r"\]\(([^)\s]+)\)", text) if "://" not in t and not t.startswith("#")]
    missing = sorted(t for t in links if t and not (doc.parent / t).exists())
    assert not missing, f"{doc.name} links to files that do not exist: {missing}"


def _presets_table() -> list[dict]:
    """The README's presets table: one dict per row, by column name."""
    section = README.read_text(encoding="utf-8").split("## Presets", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]


def _run_record(run: Path) -> dict:
    """What a recorded run's own files say: the last whole-split validation, the test, the steps
    trained and the month it was prepared."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if r["kind"] == "val" and r.get("full", True)][-1]["val_bits_per_byte"]
    ended = [r for r in records if r["kind"] == "end_on_best"]
    if ended and ended[-1]["ends_on"] == "best":  # the run ended on its best weights: their whole-split score
        val = ended[-1]["best_val_bits_per_byte"]
    test = [r for r in records if r["kind"] == "test"][-1]
    steps = [r for r in records if r["kind"] == "train"][-1]["step"]
    created = json.loads((run / "run.json").read_text())["data"]["created"]
    return {"val": val, "test": test["test_bits_per_byte"], "steps": steps,
            "month": created[:7]}


def test_the_presets_table_has_one_row_per_preset():
    names = [row["preset"].strip("`") for row in _presets_table()]
    assert sorted(names) == sorted(PRESETS), names


@pytest.mark.parametrize("row", _presets_table(), ids=lambda r: r["preset"].strip("`"))
def test_a_presets_result_is_the_one_its_record_holds(row):
    link = re.search(r"\((benchmarks/runs/[^)/]+)/?\)", row["record"])
    if link is None:  # no record: then the row quotes no result either
        assert row["measured result"] in ("no run recorded", "-"), row
        assert not re.search(r"\d", row["measured result"]), row
        return
    run = REPO / link.group(1)
    assert (run / "metrics.jsonl").is_file() and (run / "run.json").is_file(), run
    got = _run_record(run)
    result = row["measured result"]
    assert f"held-out {got['val']:.3f} bits/byte" in result, (result, got)
    assert f"test {got['test']:.3f}" in result, (result, got)
    assert f"{got['steps']:,} steps" in result, (result, got)
    assert got["month"] in result, (result, got)  # the date names the record's month
    assert (run / "stories.md").is_file()  # the stories the run ended with are part of the record


def test_the_experiments_tables_are_the_ones_the_ablation_record_gives():
    text = (REPO / "docs" / "experiments.md").read_text(encoding="utf-8")
    out = subprocess.run([sys.executable, str(SCRIPTS / "ablation_tables.py")], capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() and out in text, "docs/experiments.md: rerun python benchmarks/scripts/ablation_tables.py"


@pytest.mark.slow
def test_the_words_task_rows_are_the_ones_its_record_gives():
    record = _record("instruct-words.json")
    out = subprocess.run([sys.executable, str(SCRIPTS / "instruct_words.py"), "--json",
                          str(RECORDS / "instruct-words.json"), "--table", ",".join(record["runs"])],
                         capture_output=True, text=True, check=True).stdout
    want = {line for line in out.splitlines() if line.startswith("| `")}
    text = (REPO / "docs" / "fine-tuning.md").read_text(encoding="utf-8")
    shown = {line for line in text.splitlines() if line.startswith("| `runs/")}
    assert len(want) == len(record["runs"]) and shown == want, \
        "docs/fine-tuning.md: paste the rows python benchmarks/scripts/instruct_words.py --table prints"
    for entry in record["runs"].values():  # each figure from a run evaluated on 100 prompts, with its gain
        assert entry["prompts"] == 100 and entry["words_asked"] == 300 and entry["prompt_gain_tokens"] > 0


def test_nothing_speaks_of_how_the_project_was_made():
    hits = []
    for place in MAKING_PLACES:
        root = REPO / place
        files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        for path in files:
            # build output (an editable install's egg-info copies the README) is not the project's text
            if any(part == "__pycache__" or part.endswith(".egg-info") for part in path.parts) or \
                    path.suffix in (".pyc", ".png"):
                continue
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                continue
            for number, line in enumerate(text.splitlines(), 1):
                if MAKING.search(line):
                    hits.append(f"{path.relative_to(REPO)}:{number}: {line.strip()[:120]}")
    assert not hits, "\n".join(hits)


def _record(name: str) -> dict:
    """What a record under benchmarks/records/ measured: its "result" (cairn.bench.record's shape)."""
    return read_result(RECORDS / name)


def test_the_tutorial_page_quotes_the_tutorial_differences_record():
    text = (REPO / "docs" / "tutorial.md").read_text(encoding="utf-8")
    rows = _record("tutorial-differences.json")["results"]
    assert {r["variant"] for r in rows} >= {"cairn", "pos amplitude 1", "pytorch default init", "tutorial"}
    for r in rows:
        assert f"| {r['val_loss']:.3f} |" in text, r["variant"]


def test_the_speed_page_quotes_its_records():
    text = (REPO / "docs" / "speed.md").read_text(encoding="utf-8")
    gen = _record("kv-cache-d256.json")["generation_tokens_per_s"]
    kv, full = gen["kv_cache"], gen["recompute"]
    assert f"{kv:.1f} against {full:.1f} tokens/s ({kv / full:.1f}x)" in text
    steps = {r["variant"]: r for r in _record("train-d256.json")["training"]}
    cairn, nanogpt = steps["cairn"], steps["nanogpt"]
    assert (f"{cairn['tokens_per_s']:.0f} against {nanogpt['tokens_per_s']:.0f} tokens/s "
            f"({cairn['tokens_per_s'] / nanogpt['tokens_per_s']:.2f}x)") in text


def test_the_speed_page_quotes_its_compile_tutorial_and_prepare_records():
    text = (REPO / "docs" / "speed.md").read_text(encoding="utf-8")
    rows = {r["variant"]: r for r in _record("compile-cpu-10min.json")["training"]}
    eager, compiled = rows["cairn"], rows["cairn+compile"]
    assert (f"{compiled['s_per_step']:.3f} against {eager['s_per_step']:.3f} s per step "
            f"({eager['s_per_step'] / compiled['s_per_step']:.2f}x), after a {compiled['first_step_s']:.0f} s first"
            ) in text
    rows = {r["variant"]: r for r in _record("train-d768-vs-tutorial.json")["training"]}
    cairn, tutorial = rows["cairn"]["useful_tokens_per_s"], rows["tutorial"]["useful_tokens_per_s"]
    assert f"{cairn:.0f} against {tutorial:.0f} ({cairn / tutorial:.1f}x)" in text
    prepare = _record("prepare.json")
    one, every = prepare["runs"]
    assert f"| `--workers 1` | {one['seconds']:.1f} s | {one['mb_per_s']:.1f} | {one['peak_rss_mb']:.0f} MB |" in text
    assert f"| `--workers 2` | {every['seconds']:.1f} s | {every['mb_per_s']:.1f} ({prepare['speedup']:.2f}x) |" in text
    assert f"tiktoken alone encodes {prepare['tiktoken_one_core_mb_per_s']:.1f} MB/s" in text


def test_the_precision_page_quotes_the_loss_at_equal_steps():
    text = (REPO / "docs" / "precision.md").read_text(encoding="utf-8")
    result = _record("precision-cpu.json")
    for row in result["validation"]:
        assert f"| {row['fp32']:.4f} | {row['bf16']:.4f} | {row['relative']:+.2%} |" in text, row
    assert f"largest difference {result['largest_relative']:.2%}" in text


def test_the_serving_page_quotes_the_load_record():
    text = (REPO / "docs" / "serving.md").read_text(encoding="utf-8")
    result = _record("serve.json")
    for batched, alone in zip(result["batched"], result["unbatched"]):
        assert (f"| {batched['clients']} | {batched['tokens_per_s']:.0f} | {alone['tokens_per_s']:.0f} | "
                f"{batched['requests_per_s']:.1f} | {alone['requests_per_s']:.1f} |") in text, batched["clients"]
    growth = result["tokens_per_s_growth_1_to_16_clients"]
    assert f"{result['batched_over_unbatched_at_16_clients']:.2f}x the tokens/s of one sequence at a time" in text
    assert f"grows {growth['batched']:.2f}x batched, {growth['unbatched']:.2f}x one at a time" in text


def test_the_training_and_presets_pages_quote_the_compile_once_records():
    """The 10-minute steps before and after compiling only the model that trains, and the compile
    costs behind them, as their records hold them."""
    training = (REPO / "docs" / "training.md").read_text(encoding="utf-8")
    presets = (REPO / "docs" / "presets.md").read_text(encoding="utf-8")
    runs = _record("cpu-10min-steps-compile-once.json")["runs"]
    for code, label in (("before", "before (04bf875)"), ("after", "after (659b554)")):
        a, b = runs[code]
        assert (f"| {label} | {a['steps']:,} and {b['steps']:,} | {a['setup_and_measuring_s']:.1f} and "
                f"{b['setup_and_measuring_s']:.1f} s | {a['test_bits_per_byte']:.4f} and "
                f"{b['test_bits_per_byte']:.4f} |") in training
    ratio = sum(r["steps"] for r in runs["after"]) / sum(r["steps"] for r in runs["before"])
    assert f"{ratio:.3f}x the steps in all" in training
    widths = {w["d_model"]: w for w in _record("compile-shapes-cpu-10min.json")["widths"]}
    d128, d192 = widths[128], widths[192]
    assert (f"compiling d128 from an empty cache took\n{d128['first_compiled_s']:.1f} s, and its compiled step was "
            f"{d128['eager_over_compiled']:.2f}x faster") in training
    assert f"compiling that shape took {d192['short_compiled_s']:.1f} s" in training
    assert (f"took {d192['short_compiled_s']:.1f} s with an empty cache against {d192['short_eager_s']:.3f} s"
            ) in presets
