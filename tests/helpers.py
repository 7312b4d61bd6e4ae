"""What several test modules share that is not a fixture: small configs, reading a run, comparing runs.

Fixtures (the small tokenizer, the shared trained run, story files) live in conftest.py.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from cairn.config.sections import RunConfig

from cairn.config.io import apply_overrides
from cairn.config.presets import preset


def config(source: Path, **overrides) -> RunConfig:
    """The tiny preset shrunk to a 2-layer d32 model on 32-token rows: a step takes milliseconds.
    Pass tokenizer=DIR to train with a small tokenizer instead of GPT-2's."""
    cfg = preset("tiny")
    base = {"source": str(source), "d_model": 32, "n_heads": 4, "n_layers": 2, "d_mlp": 64, "context_len": 64,
            "seq_len": 32, "batch_size": 4, "epochs": 3, "lr": 3e-3, "report_every": 3, "eval_every": 4,
            "eval_batches": 2, "checkpoint_every": 5, "patience": 0}
    overrides = {k: str(v) if isinstance(v, Path) else v for k, v in overrides.items()}
    return apply_overrides(cfg, {**base, **overrides})


def steps_per_epoch(cfg: RunConfig, world: int = 1) -> int:
    """The optimizer steps of one epoch of `cfg`, computed from its prepared data as the trainer plans
    them (the batches of the training split's windows or rows, the last and shorter one included,
    divided by the accumulation and rounded up)."""
    from cairn.data import PackedDataset, PaddedDataset, num_batches, prepare_data
    from cairn.tokenizer.base import get_tokenizer

    data = prepare_data(cfg.data, cfg.seed, get_tokenizer(cfg.tokenizer))
    d, t = cfg.data, cfg.train
    ds = (PackedDataset(data.train, d.seq_len, shiftable=d.pack_shift) if d.batching == "pack"
          else PaddedDataset(data.train, d.seq_len))
    return -(-num_batches(len(ds), t.batch_size * world, drop_last=False) // t.grad_accum)


def records(run: Path) -> list[dict]:
    """metrics.jsonl, every record."""
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def losses(run: Path) -> list[dict]:
    """metrics.jsonl without the timing fields (which differ between identical runs)."""
    return [{k: v for k, v in r.items() if k not in ("time", "tokens_per_s", "mfu")} for r in records(run)]


def final_weights(run: Path) -> dict:
    return load_file(str(next((run / "checkpoints").glob("*_final")) / "model.safetensors"))


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    diffs = {k: (a[k] - b[k]).abs().max().item() for k in a if not torch.equal(a[k], b[k])}
    assert not diffs, f"weights differ: {diffs}"


@contextlib.contextmanager
def serving(app):
    """An ASGI app (`cairn.serve.app.create_app`) served by uvicorn in a thread on a free loopback
    port; yields its base URL."""
    import uvicorn

    from cairn.serve import bind

    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()
