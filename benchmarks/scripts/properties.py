"""The property tests' long run: many generated cases per input boundary, drawn from a given seed.

    python benchmarks/scripts/properties.py [--examples 2000] [--seed 20261207] \
        [--json benchmarks/records/properties.json]

Runs tests/properties with CAIRN_PROPERTY_EXAMPLES cases per boundary (the suite's own run uses 25,
derandomized) drawn from --seed instead, in one pytest process, and counts the cases each boundary
really ran (hypothesis also counts those it rejects or replays while shrinking; the counts here are
the cases that reached the command). The record holds, per boundary, the cases tried; the seed; the
failures pytest reported (each a defect still open); the wall time; and the defects the properties
found and the fixes that closed them, each with its regression test. The machine is shared: its load
is in the record.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "src"))

from cairn.bench import record  # noqa: E402

# what the properties found, each closed by the fix named and held by its regression test
FOUND = [
    {"boundary": "data files (cairn tokenizer train, cairn prepare)",
     "defect": "a .jsonl story with an escaped unpaired surrogate (\"\\ud800\") raised UnicodeEncodeError "
               "from tokenizer training and from prepare's byte count: a traceback",
     "fix": "src/cairn/data/sources.py: the line is refused by number, in one line, before anything is written",
     "test": "tests/properties/test_props_data.py::"
             "test_an_escaped_lone_surrogate_is_refused_by_its_line_before_anything_is_written"},
    {"boundary": "config files (cairn train --config)",
     "defect": "TOML nesting arrays or inline tables deeply (100,000 levels) raised RecursionError from tomllib: "
               "a traceback",
     "fix": "src/cairn/config/io.py: refused in one line naming the file",
     "test": "tests/properties/test_props_config.py::test_a_config_nested_too_deeply_is_refused_in_one_line"},
    {"boundary": "command-line values (cairn bench)",
     "defect": "a bad value for a cairn bench option printed argparse's usage block before the error: "
               "eleven lines, not one",
     "fix": "src/cairn/bench/speed.py: its parser's errors are CairnError, one line and exit code 2",
     "test": "tests/properties/test_props_options.py::test_bench_refuses_a_bad_value_in_one_line"},
    {"boundary": "command-line values (every command)",
     "defect": "`--out=--` (any option given `--` after `=`) reached the command as an empty list: cairn export "
               "raised AttributeError, int options TypeError",
     "fix": "src/cairn/cli/options.py (and cairn bench's parser): refused as an option without its value",
     "test": "tests/properties/test_props_options.py::"
             "test_a_double_dash_given_as_an_options_value_is_refused_in_one_line"},
    {"boundary": "command-line values (cairn bench)",
     "defect": "--n-heads 0 raised ZeroDivisionError while the shape was checked; negative sizes, batches and "
               "rounds were not checked",
     "fix": "src/cairn/bench/speed.py: the model's own checks and a range for each count, in one line",
     "test": "tests/properties/test_props_options.py::test_bench_refuses_a_shape_it_cannot_build_in_one_line"},
    {"boundary": "command-line values (cairn tokenizer train)",
     "defect": "--vocab-size 10^8 made the BPE trainer reserve memory until the kernel killed the process "
               "(over 20 GB resident); --vocab-size or --min-frequency of 2^70 raised OverflowError",
     "fix": "src/cairn/tokenizer/learn.py: at most 65,536 tokens (as bpe:N), --min-frequency from 1 to 2^32",
     "test": "tests/properties/test_props_options.py::"
             "test_tokenizer_train_refuses_sizes_it_cannot_learn_in_one_line"},
    {"boundary": "command-line values (cairn generate)",
     "defect": "--num-samples 10^11 built every sample's settings in a list before the model loaded: the "
               "memory filled and nothing was written",
     "fix": "src/cairn/cli/generate.py: the largest seed is checked (the seeds are all that differ) and each "
            "sample's settings are made when it is drawn",
     "test": "tests/properties/test_props_options.py::test_generate_checks_many_samples_without_building_them_all"},
    {"boundary": "command-line values (cairn serve)",
     "defect": "--max-concurrency 2^40 made the engine allocate its KV cache for that many rows (a 36 PB "
               "tensor): torch's RuntimeError as a traceback, or the kernel killing the process",
     "fix": "src/cairn/serve/__init__.py: the cache's size is checked against the free memory after the "
            "model loads, in one line",
     "test": "tests/properties/test_props_options.py::test_serve_refuses_a_kv_cache_that_cannot_fit_in_one_line"},
    {"boundary": "command-line values (cairn serve)",
     "defect": "a --host the IDNA codec cannot encode (a \\x80 byte, an empty label) raised UnicodeError from "
               "getaddrinfo: a traceback",
     "fix": "src/cairn/serve/__init__.py: refused in one line as no host name",
     "test": "tests/properties/test_props_options.py::test_serve_refuses_a_host_that_is_no_host_name_in_one_line"},
]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", type=int, default=2000, help="cases per boundary (the suite runs 25)")
    p.add_argument("--seed", type=int, default=20261207)
    p.add_argument("--json", help="write the benchmark record here")
    p.add_argument("--memory-gb", type=float, default=16,
                   help="address-space limit of the test process: a case that asks for more fails with "
                        "MemoryError (a reported failure) instead of the kernel killing the whole run")
    a = p.parse_args()
    recording = record.start()
    with tempfile.TemporaryDirectory() as d:
        counts = Path(d) / "counts.json"
        report = Path(d) / "report.xml"
        env = {**os.environ, "CAIRN_PROPERTY_EXAMPLES": str(a.examples), "CAIRN_PROPERTY_SEED": str(a.seed),
               "CAIRN_PROPERTY_COUNTS": str(counts), "PYTHONPATH": str(REPO / "src")}
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/properties",
                               f"--hypothesis-seed={a.seed}", f"--junitxml={report}"],
                              cwd=REPO, env=env, capture_output=True, text=True, preexec_fn=_memory_limit(a.memory_gb))
        seconds = time.perf_counter() - start
        tried = json.loads(counts.read_text()) if counts.exists() else {}
        failures = _failures(report)
    print(done.stdout[-3000:])
    result = {"examples_asked": a.examples, "seed": a.seed, "memory_limit_gb": a.memory_gb, "cases_tried": tried,
              "cases_total": sum(tried.values()), "seconds": round(seconds, 1), "pytest_exit": done.returncode,
              "open_failures": failures, "defects_found_and_fixed": FOUND}
    print(json.dumps({k: v for k, v in result.items() if k != "defects_found_and_fixed"}, indent=1))
    if a.json:
        recording.write(a.json, result, threads=None)
    return 0 if done.returncode == 0 else 1


def _memory_limit(gb: float) -> Callable[[], None]:
    def limit() -> None:
        size = int(gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (size, size))
    return limit


def _failures(report: Path) -> list[dict[str, str]]:
    """The failed tests in pytest's JUnit XML, each with the first line of its message."""
    import xml.etree.ElementTree as ET

    if not report.exists():
        return []
    out = []
    for case in ET.parse(report).iter("testcase"):
        for bad in list(case.iter("failure")) + list(case.iter("error")):
            out.append({"test": f"{case.get('classname')}::{case.get('name')}",
                        "message": (bad.get("message") or "").splitlines()[0][:300] if bad.get("message") else ""})
    return out


if __name__ == "__main__":
    sys.exit(main())
