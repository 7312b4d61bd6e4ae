"""The model card of an export: README.md with the hub's YAML metadata, which `huggingface_hub.ModelCard`
reads back (`model-index` with the run's held-out scores, data, license, library, tags), and a text
that says what the model is, what it was trained on and with which command, and how to use it.

Every figure comes from the run's own files: the test split's scores when the export is the run's
final checkpoint, and the whole validation split's at the exported weights' step. A run without
them gets a card that says so, and no model-index.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from cairn.checkpoint import exported, hub
from cairn.config.io import to_toml
from cairn.tokenizer.base import EOT, TiktokenTokenizer, Tokenizer

if TYPE_CHECKING:
    from cairn.checkpoint.load import Loaded

CARD = "README.md"
LICENSE = "mit"  # cairn's own license, the default for the weights it writes; `cairn push --license` names another
# model-index metric type -> (key in a score, what the card calls it)
METRICS = {"loss": ("loss", "held-out loss (nats per token)"), "perplexity": ("perplexity", "perplexity"),
           "bits_per_byte": ("bits_per_byte", "bits per byte")}


def run_dir(checkpoint: Path) -> Optional[Path]:
    """The run a checkpoint is in (RUN/checkpoints/NAME), or None for a checkpoint on its own."""
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else None


def run_scores(checkpoint: Path, meta: dict[str, Any]) -> list[dict[str, Any]]:
    """The held-out scores of exactly the weights of `checkpoint` (whose state.json is `meta`), from its
    run's metrics.jsonl (an export's, from its cairn.json): the test split's (when these are the run's
    final weights) and the whole validation split's at the weights' step."""
    if isinstance(meta.get("scores"), list):
        return [s for s in meta["scores"] if isinstance(s, dict)]
    run = run_dir(checkpoint)
    metrics = run / "metrics.jsonl" if run else None
    if metrics is None or not metrics.is_file():
        return []
    records = _records(metrics)
    step = (meta.get("state") or {}).get("step")
    weights_step = meta.get("weights_step", step)
    scores: list[dict[str, Any]] = []
    if meta.get("kind") == "final":
        tests = [r for r in records if r.get("kind") == "test" and r.get("step") == step]
        if tests:
            t = tests[-1]
            scores.append({"split": "test", "step": weights_step, "loss": t["test_loss"],
                           "perplexity": t["test_perplexity"], "bits_per_byte": t["test_bits_per_byte"],
                           "tokens": t.get("test_tokens")})
    if weights_step != step:  # the run ended on its best weights, scored on the whole split at its end
        best = [r for r in records if r.get("kind") == "end_on_best" and r.get("best_step") == weights_step
                and r.get("ends_on") == "best"]
        if best:
            b = best[-1]
            scores.append({"split": "validation", "step": weights_step, "loss": b["best_val_loss"],
                           "perplexity": math.exp(min(b["best_val_loss"], 700.0)),
                           "bits_per_byte": b["best_val_bits_per_byte"], "tokens": None})
    else:
        vals = [r for r in records if r.get("kind") == "val" and r.get("step") == step and r.get("full")]
        if vals:
            v = vals[-1]
            scores.append({"split": "validation", "step": step, "loss": v["val_loss"],
                           "perplexity": v["val_perplexity"], "bits_per_byte": v["val_bits_per_byte"],
                           "tokens": v.get("val_tokens")})
    return scores


def _records(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:  # a line torn by a crash is no score
            continue
        if isinstance(r, dict):
            out.append(r)
    return out


def _data(loaded: Loaded) -> tuple[str, Optional[str], dict[str, Any]]:
    """What the data is called, its hub id (None for local files) and the run's split counts."""
    source = loaded.config.data.source
    on_hub = not Path(source).exists() and hub.looks_like_repo_id(source)
    splits: dict[str, Any] = {}
    run = run_dir(loaded.path)
    info = run / "run.json" if run else None
    if info is not None and info.is_file():
        try:
            splits = json.loads(info.read_text(encoding="utf-8")).get("data", {}).get("splits", {})
        except (json.JSONDecodeError, AttributeError):
            splits = {}
    elif isinstance(loaded.meta.get("data_splits"), dict):
        splits = loaded.meta["data_splits"]
    name = source if on_hub else (Path(source).name or source)
    return name, source if on_hub else None, splits if isinstance(splits, dict) else {}


def card(loaded: Loaded, arch: str, scores: list[dict[str, Any]], repo_id: Optional[str] = None,
         license: str = LICENSE) -> str:
    from huggingface_hub import EvalResult, ModelCardData

    cfg, tok = loaded.config, loaded.tokenizer
    data_name, data_id, splits = _data(loaded)
    title = repo_id or cfg.name
    results = [EvalResult(task_type="text-generation", task_name="Language modelling",
                          dataset_type=data_id or data_name, dataset_name=data_name, dataset_split=s["split"],
                          metric_type=kind, metric_value=float(s[key]), metric_name=label)
               for s in scores for kind, (key, label) in METRICS.items()]
    tags = ["cairn", "text-generation", arch, "from-scratch"]
    if "tinystories" in data_name.lower():
        tags.append("tinystories")
    data = ModelCardData(library_name="transformers", license=license, pipeline_tag="text-generation", tags=tags,
                         datasets=[data_id] if data_id else None, model_name=title if results else None,
                         eval_results=results or None)
    step = (loaded.meta.get("state") or {}).get("step")
    where = loaded.meta.get("checkpoint") or loaded.path.name
    body = [f"# {title}\n",
            f"A {'GPT-2' if arch == 'gpt2' else 'Llama'}-format language model trained from scratch with "
            f"cairn, exported from its checkpoint `{where}`"
            + (f" (step {loaded.meta.get('weights_step', step)})" if step is not None else "") + ".\n",
            "## Model\n", _architecture(loaded, arch),
            "## Data and tokenizer\n", _data_text(cfg.data.format, data_name, data_id, splits, tok),
            "## Held-out scores\n", _scores_text(scores),
            "## Use\n", _use(repo_id, tok.eot_id),
            "## How it was trained\n", _training(loaded)]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body)


def _architecture(loaded: Loaded, arch: str) -> str:
    m = loaded.config.model
    head = "tied to the embedding" if m.tie_embeddings else "untied"
    if arch == "gpt2":
        block = ("GPT-2's block with exact (erf) GELU; the position embedding `wpe` holds cairn's fixed "
                 "sinusoidal table (it becomes trainable if you fine-tune)")
    else:
        block = (f"Llama's block: rotary positions (theta {m.rope_theta:g}), RMSNorm, SwiGLU, "
                 f"{'with' if m.bias else 'no'} biases")
    return (f"- {loaded.model.num_params():,} parameters: d_model {m.d_model}, {m.n_layers} blocks, "
            f"{m.n_heads} heads, MLP {m.d_mlp}, context {m.context_len} tokens, vocabulary {m.vocab_size}\n"
            f"- {block}; output head {head}\n- weights in float32 (`model.safetensors`)\n")


def _data_text(fmt: str, name: str, data_id: Optional[str], splits: dict[str, Any], tok: Tokenizer) -> str:
    what = "instruction records (the loss on the responses only)" if fmt == "sft" else "stories"
    src = f"the hub dataset [{data_id}](https://huggingface.co/datasets/{data_id})" if data_id else \
        f"local files (`{name}`)"
    lines = [f"- trained on {what} from {src}, split by story (seeded)"]
    counts = [f"{k} {v.get('stories', 0):,} stories / {v.get('tokens', 0):,} tokens"
              for k, v in splits.items() if isinstance(v, dict)]
    if counts:
        lines.append(f"- splits: {'; '.join(counts)}")
    if isinstance(tok, TiktokenTokenizer):
        lines.append(f"- tokenizer: GPT-2's BPE ({tok.vocab_size:,} tokens)")
    else:
        lines.append(f"- tokenizer: a byte-level BPE of {tok.vocab_size:,} tokens learned by cairn "
                     f"(`{tok.name}`, `tokenizer.json`)")
    lines.append(f"- every story starts after `{EOT}` (id {tok.eot_id}): put it before a prompt, as "
                 "`cairn generate` does")
    return "\n".join(lines) + "\n"


def _scores_text(scores: list[dict[str, Any]]) -> str:
    if not scores:
        return ("The run's files hold no held-out scores for these weights (no test at the run's end and no "
                "whole-split validation at this step): this card quotes none. `cairn eval` scores it.\n")
    rows = ["| split | step | loss (nats/token) | perplexity | bits per byte | tokens |",
            "| --- | --- | --- | --- | --- | --- |"]
    for s in scores:
        tokens = f"{s['tokens']:,}" if isinstance(s.get("tokens"), int) else "-"
        rows.append(f"| {s['split']} | {s.get('step', '-')} | {s['loss']:.4f} | {s['perplexity']:.2f} | "
                    f"{s['bits_per_byte']:.4f} | {tokens} |")
    return ("Scored by cairn during training, each held-out story from its own beginning (the same figures "
            "are in the metadata's `model-index`):\n\n" + "\n".join(rows) + "\n")


def _use(repo_id: Optional[str], eot_id: int) -> str:
    where = f'"{repo_id}"' if repo_id else "DIR"
    cli = repo_id or "DIR"
    return ("```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
            f"tok = AutoTokenizer.from_pretrained({where})\nmodel = AutoModelForCausalLM.from_pretrained({where})\n"
            "ids = tok(tok.eos_token + \"Once upon a time\", return_tensors=\"pt\").input_ids\n"
            "print(tok.decode(model.generate(ids, max_new_tokens=50, do_sample=False)[0]))\n```\n\n"
            f"or with cairn, which loads it by its id or directory: `cairn generate {cli} --prompt \"Once upon a "
            "time\"`\n")


def _training(loaded: Loaded) -> str:
    cfg = loaded.config
    base = f" (fine-tuned from `{cfg.init_from}`)" if cfg.init_from else ""
    return (f"`cairn train --config config.toml`{base}, with this `config.toml` (the run's resolved "
            f"config: every setting)"
            + (" (its LoRA adapters are folded into these weights)" if cfg.lora.lora_rank else "")
            + ":\n\n```toml\n" + to_toml(cfg).rstrip() + "\n```\n")


def write(out: Path, loaded: Loaded, arch: str, repo_id: Optional[str] = None, license: str = LICENSE) -> None:
    """README.md (the card) and cairn.json (what `cairn.load` reads the export back with) into `out`."""
    scores = run_scores(loaded.path, loaded.meta)
    (out / CARD).write_text(card(loaded, arch, scores, repo_id, license), encoding="utf-8")
    meta = exported.export_meta(loaded.config, loaded.meta, loaded.meta.get("checkpoint") or loaded.path.name,
                                loaded.tokenizer, arch, scores, _data(loaded)[2])
    (out / exported.META_FILE).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
