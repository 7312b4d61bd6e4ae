"""Two nodes on one machine: two `torchrun` launches joined by a c10d rendezvous on 127.0.0.1.

Each launch is a "node" of one process (`--nnodes 2 --nproc-per-node 1`), as two machines would
run it, with a token cache of its own (machines that share no cache directory). The job stops
after STOP steps and its checkpoint is resumed by ONE launch of 2 processes (`--standalone`); the
result is compared with one launch of 2 processes that trained all STEPS steps uninterrupted on
the same global batch.

Exact comparison. Both jobs have 2 ranks with the same rows each, and gloo reduces 2 ranks' gradients
with the same arithmetic whether the peer is another process on the node or another node
over TCP; the checkpoint holds the full weights, the optimizer state and every rank's RNG state.
So the metrics and final weights must be bitwise equal, not just close: a rank that read the
wrong rows, a gradient averaged over the wrong number of ranks or an optimizer state not restored
shows up as a difference.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import have_tinystories, TINYSTORIES
from test_distributed import LAUNCH_TIMEOUT, PER_RANK, assert_same_runs, cli_args, launch_resume, options

STEPS, STOP = 6, 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **env})


def finish(proc: subprocess.Popen[str]) -> str:
    try:
        out, _ = proc.communicate(timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish within {LAUNCH_TIMEOUT} s:\n{out[-3000:]}")
    assert proc.returncode == 0, out[-4000:]
    return out


@pytest.mark.slow
def test_two_nodes_stopped_and_resumed_on_one_node_equal_one_launch(tmp_path: Path, small_tokenizer: Path) -> None:
    if not have_tinystories():
        pytest.skip(f"TinyStories sample not found at {TINYSTORIES}")
    opts = options(tmp_path / "cache", small_tokenizer, max_steps=STEPS, eval_every=STOP, eval_batches=2,
                   checkpoint_every=STOP, **PER_RANK)
    train = ["-m", "cairn", "train", "--preset", "tiny", "--no-progress"]
    one, two = tmp_path / "one", tmp_path / "two"
    # the reference and both nodes at once: 4 one-thread processes, and the nodes must be up together anyway
    reference = launch(["--standalone", "--nproc-per-node", "2", *train, "--out", str(one), *cli_args(opts)], {})
    port = free_port()
    node_opts = {k: v for k, v in opts.items() if k != "cache_dir"}
    nodes = [launch(["--nnodes", "2", "--node-rank", str(rank), "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                     "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "cairn-two-nodes",
                     "--rdzv-conf", "join_timeout=120", "--local-addr", "127.0.0.1",
                     *train, "--out", str(two), *cli_args(node_opts), "--stop-after", str(STOP)],
                    {"CAIRN_CACHE": str(tmp_path / f"cache-node{rank}")})
             for rank in (0, 1)]
    logs = [finish(node) for node in nodes]
    finish(reference)

    # one job of 2 processes, one per node; only its rank 0 (on either node: c10d ranks the nodes
    # as they join) logs and writes the checkpoint
    writers = [log for log in logs if f"stopped (stop-after {STOP}) at step {STOP}" in log]
    assert len(writers) == 1, logs[0][-2000:] + logs[1][-2000:]
    assert "distributed: 2 processes (DDP, gloo, 1 per node)" in writers[0]
    assert "2 processes x batch 2 x 2 accumulation = 8 rows" in writers[0]
    # each node tokenized into its own cache: no cache directory needs to be shared
    assert all(any((tmp_path / f"cache-node{rank}").rglob("*")) for rank in (0, 1))

    out = launch_resume(two)
    assert f"at step {STOP}" in out
    assert_same_runs(one, two)
