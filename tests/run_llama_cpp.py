"""Driving a real llama.cpp from Python: node-llama-cpp (installed by `bash scripts/setup.sh test` into
.llama-cpp/) run by tests/run_llama_cpp.mjs, for tests/test_export_gguf.py and benchmarks/scripts/gguf_check.py.

node-llama-cpp over llama-cpp-python: its npm package ships llama.cpp prebuilt (83 MB, installed in about
10 s), where llama-cpp-python builds llama.cpp from source (about 10 minutes on 2 cores) at every fresh CI
setup; and its API gives what the checks need: token ids, the full next-token distribution at every
position (the log-softmax of llama.cpp's logits), greedy decoding and the KV cache's type.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
INSTALL = Path(os.environ.get("CAIRN_LLAMA_CPP", REPO / ".llama-cpp"))
SCRIPT = Path(__file__).resolve().with_name("run_llama_cpp.mjs")


def missing() -> str | None:
    """Why llama.cpp cannot run (None: it can)."""
    if shutil.which("node") is None:
        return "node is not installed"
    if not (INSTALL / "node_modules" / "node-llama-cpp" / "package.json").is_file():
        return f"node-llama-cpp is not installed in {INSTALL} (bash scripts/setup.sh test installs it)"
    return None


def run(files: list[dict[str, Any]], threads: int = 1, timeout: float = 300) -> list[dict[str, Any]]:
    """Run each GGUF job (see run_llama_cpp.mjs) in one node process; a job's "score" comes back as
    "logprobs": one float32 array [positions, vocab] per scored sequence. One thread by default: on a
    busy 2-core machine (load 10) llama.cpp's two threads took 480 ms per decoded token of a d64 model
    waiting on each other, one thread 1.5 ms."""
    with tempfile.TemporaryDirectory() as tmp:
        jobs = []
        for i, job in enumerate(files):
            job = dict(job)
            if "score" in job:
                job["scores"] = str(Path(tmp) / f"scores-{i}.bin")
            jobs.append(job)
        req = {"install": str(INSTALL), "threads": threads, "files": jobs}
        p = subprocess.run(["node", str(SCRIPT)], input=json.dumps(req), capture_output=True, text=True,
                           timeout=timeout)
        if p.returncode != 0:
            raise RuntimeError(f"llama.cpp (node) failed with {p.returncode}: {p.stderr[-3000:]}")
        answers: list[dict[str, Any]] = json.loads(p.stdout)["files"]
        for job, answer in zip(jobs, answers):
            if "score" in job:
                flat = np.fromfile(job["scores"], dtype=np.float32).reshape(-1, answer["vocab"])
                bounds = np.cumsum([0] + [len(ids) for ids in job["score"]])
                answer["logprobs"] = [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    return answers
