"""What cairn's deliberate departures from the tutorial's model and optimizer do early in training.

    python benchmarks/scripts/tutorial_differences.py --data ../shared/data/tinystories \
        --json benchmarks/records/tutorial-differences.json

The tutorial's block (sinusoidal positions, LayerNorm, GELU, biases) at d128 / 2 layers, with a
2048-token BPE, trains for 80 steps of 8 rows of 64 tokens on the same stories, seed and batches in
every variant; only one thing differs from cairn:

- "pos amplitude 1": the sinusoidal table added at unit amplitude, as the tutorial adds it,
  instead of scaled to the token embeddings' initial size (cairn.model.transformer.POS_SCALE);
- "pytorch default init": each layer's own reset_parameters (nn.Embedding N(0, 1), nn.Linear
  Kaiming-uniform), as the tutorial's model starts, instead of GPT-2's N(0, 0.02);
- "decay on every parameter": AdamW's weight decay on biases, norms and embeddings too, as the
  tutorial's AdamW(model.parameters()) applies it, instead of on matrices only;
- "tutorial": the first two together, as the tutorial's model starts.

Each is scored by the validation split's loss after its 80 steps (nats per token, every held-out
story scored on its own) and its training loss over the last 10 steps. The losses do not depend on
the machine's speed: the same command gives the same figures on any CPU with the same torch.
--json writes a benchmark record (cairn.bench.record); each row also names the CPU and date it was
measured on. `--variants` runs some of them; their rows replace the same variants' rows in an
existing --json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

import cairn  # noqa: E402
import cairn.model.transformer  # noqa: E402
import cairn.training.optim as optim  # noqa: E402
from cairn.bench import record  # noqa: E402
from cairn.config.io import apply_overrides  # noqa: E402
from cairn.util.host import cpu_description  # noqa: E402

STEPS = 80
SETTINGS = {"tokenizer": "bpe:2048", "d_model": 128, "n_layers": 2, "n_heads": 4, "d_mlp": 512, "context_len": 256,
            "positions": "sinusoidal", "norm": "layernorm", "mlp": "gelu", "bias": True, "tie_embeddings": False,
            "seq_len": 64, "batch_size": 8, "n_samples": 1000, "lr": 1e-3, "schedule": "linear",
            "warmup_frac": 0.05, "weight_decay": 0.01, "beta2": 0.999, "max_steps": STEPS, "epochs": 100,
            "report_every": 10, "eval_every": 0, "checkpoint_every": 0, "test_at_end": False, "end_stories": 0,
            "seed": 42}


@contextlib.contextmanager
def unit_positions():
    saved = cairn.model.transformer.POS_SCALE
    cairn.model.transformer.POS_SCALE = 1.0
    try:
        yield
    finally:
        cairn.model.transformer.POS_SCALE = saved


@contextlib.contextmanager
def default_init():
    saved = cairn.model.transformer.Transformer.reset_parameters

    def reset(self):
        for module in self.modules():
            if module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()

    cairn.model.transformer.Transformer.reset_parameters = reset
    try:
        yield
    finally:
        cairn.model.transformer.Transformer.reset_parameters = saved


@contextlib.contextmanager
def decay_everything():
    saved = optim._adamw_groups

    def groups(named, t):
        return [{"params": [p for _, p in named], "weight_decay": t.weight_decay}]

    optim._adamw_groups = groups
    try:
        yield
    finally:
        optim._adamw_groups = saved


VARIANTS = {
    "cairn": [],
    "pos amplitude 1": [unit_positions],
    "pytorch default init": [default_init],
    "decay on every parameter": [decay_everything],
    "tutorial": [unit_positions, default_init],
}


def run_variant(name: str, data: str, work: Path) -> dict:
    cfg = apply_overrides(cairn.preset("tiny"), {**SETTINGS, "source": data})
    out = work / name.replace(" ", "-")
    with contextlib.ExitStack() as stack:
        for patch in VARIANTS[name]:
            stack.enter_context(patch())
        cairn.train(cfg, out)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if r["kind"] == "val"][-1]
    train = [r for r in records if r["kind"] == "train"]
    return {"variant": name, "steps": train[-1]["step"], "val_loss": val["val_loss"],
            "val_bits_per_byte": val["val_bits_per_byte"], "train_loss_last_report": train[-1]["train_loss"],
            "train_loss_by_step": {r["step"]: r["train_loss"] for r in train}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="the stories (as cairn train --data)")
    p.add_argument("--json", help="write the results here (keeping other variants' rows already there)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    a = p.parse_args()
    names = [v.strip() for v in a.variants.split(",") if v.strip()]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown or not names:
        raise SystemExit(f"--variants: choose from {', '.join(VARIANTS)}")
    recording = record.start()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for name in names:
            rows.append({**run_variant(name, a.data, Path(work)),
                         "machine": {"cpu": cpu_description(), "date": time.strftime("%Y-%m-%d")}})
            print(f"{name:<26} val loss {rows[-1]['val_loss']:.3f} nats/token after {rows[-1]['steps']} steps, "
                  f"train loss (last 10 steps) {rows[-1]['train_loss_last_report']:.3f}", flush=True)
    result = {"what": "the tutorial's block at d128/L2, 80 steps of 8 x 64 tokens, one departure from cairn "
                      "per variant",
              "settings": SETTINGS, "data": a.data, "results": rows}
    if a.json and Path(a.json).is_file():
        kept = [r for r in record.read_result(a.json)["results"] if r["variant"] not in names]
        result["results"] = sorted(kept + rows, key=lambda r: list(VARIANTS).index(r["variant"]))
    if a.json:
        recording.write(a.json, result, threads=torch.get_num_threads())
    return 0


if __name__ == "__main__":
    sys.exit(main())
