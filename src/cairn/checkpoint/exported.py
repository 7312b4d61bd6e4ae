"""A Hugging Face export written by cairn (`cairn export --format hf`, the repo `cairn push` fills), read
back as a checkpoint, so that `cairn.load` and every command take an export or a hub repo as they take a run.

The export's weights carry transformers' names (GPT-2 or Llama); `cairn.json` beside them holds what a
checkpoint's state.json holds for loading: the run's config (LoRA adapters already folded into the
weights), the tokenizer's name, the step, and the run's held-out scores the model card quotes. The
mapping back is the exact inverse of `cairn.export.hf`'s: the same tensors, cut and transposed back.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cairn.checkpoint.store import Checkpoint
from cairn.config.sections import RunConfig
from cairn.data.run_tokenizer import check_same
from cairn.model.transformer import POS_SCALE, sinusoidal_table
from cairn.tokenizer.base import Tokenizer, get_tokenizer
from cairn.util.errors import CairnError

META_FILE = "cairn.json"
FORMAT = "cairn-hf-export"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"


def is_export(path: Path) -> bool:
    return path.is_dir() and (path / META_FILE).is_file()


def export_meta(cfg: RunConfig, source: dict[str, Any], checkpoint: str, tokenizer: Tokenizer, architecture: str,
                scores: list[dict[str, Any]], data_splits: dict[str, Any]) -> dict[str, Any]:
    """`cairn.json` of an export of the checkpoint named `checkpoint`, whose state.json is `source`
    (loaded with its adapters merged)."""
    config = copy.deepcopy(cfg.to_dict())
    config["lora"]["lora_rank"] = 0  # the export's weights are plain: the adapters are folded in
    meta: dict[str, Any] = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "architecture": architecture,
        "cairn_version": source.get("cairn_version"), "checkpoint": checkpoint, "kind": source.get("kind"),
        "config": config, "tokenizer": {"name": tokenizer.name, "vocab_size": tokenizer.vocab_size},
        "state": {"step": (source.get("state") or {}).get("step")}, "scores": scores, "data_splits": data_splits}
    if "weights_step" in source:
        meta["weights_step"] = source["weights_step"]
    return meta


@dataclass
class ExportCheckpoint(Checkpoint):
    """An export directory in a checkpoint's shape: `meta` as state.json's, weights under cairn's names."""

    architecture: str = "gpt2"

    def model_state(self) -> dict[str, torch.Tensor]:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        f = self.path / WEIGHTS
        if not f.is_file():
            raise CairnError(f"{f} is missing: the export is incomplete")
        try:
            hf = load_file(str(f))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CairnError(f"{f} is corrupt or truncated ({str(e).splitlines()[0][:120]}): export it again") from None
        sd = gpt2_to_cairn(hf) if self.architecture == "gpt2" else llama_to_cairn(hf)
        if hf:
            raise CairnError(f"{f} holds weights cairn's model has no place for ({', '.join(sorted(hf)[:3])}): "
                             "it is not the export cairn wrote")
        return sd


def read(path: Path) -> ExportCheckpoint:
    f = path / META_FILE
    try:
        meta = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CairnError(f"{f} is corrupt (not JSON): export the model again") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CairnError(f"{f} is not the file cairn writes beside an export (no format={FORMAT!r})")
    if not isinstance(meta.get("format_version"), int) or meta["format_version"] > FORMAT_VERSION:
        raise CairnError(f"{str(path)!r} was exported by a newer cairn (format {meta.get('format_version')}): "
                         "upgrade cairn")
    arch = meta.get("architecture")
    if arch not in ("gpt2", "llama"):
        raise CairnError(f"{f} names architecture {arch!r}, not gpt2 or llama: export the model again")
    return ExportCheckpoint(path, meta, arch)


def tokenizer(c: ExportCheckpoint, spec: str) -> Tokenizer:
    """GPT-2's own, or the byte-level BPE whose tokenizer.json the export holds (the run's, copied)."""
    tok = get_tokenizer("gpt2") if spec == "gpt2" else get_tokenizer(str(c.path))
    check_same(tok, c.meta.get("tokenizer"), c.path)
    return tok


class _Weights:
    """The export's tensors, each taken once; a missing one is a one-line error."""

    def __init__(self, hf: dict[str, torch.Tensor]):
        self.hf = hf

    def take(self, name: str) -> torch.Tensor:
        if name not in self.hf:
            raise CairnError(f"the export has no weight {name!r}: it is not the export cairn wrote")
        return self.hf.pop(name)

    def has(self, name: str) -> bool:
        return name in self.hf

    def layers(self, prefix: str) -> int:
        ids = {int(k[len(prefix):].split(".", 1)[0]) for k in self.hf if k.startswith(prefix)}
        if ids != set(range(len(ids))):
            raise CairnError(f"the export's blocks are not numbered 0..n-1 ({sorted(ids)[:5]}...): "
                             "it is not the export cairn wrote")
        return len(ids)


def gpt2_to_cairn(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel weights -> cairn's (Conv1D weights transposed back); `hf` is emptied of what is used.
    `wpe` is cairn's fixed table: it is checked, not loaded (cairn computes it)."""
    w, out = _Weights(hf), {}
    out["wte.weight"] = w.take("transformer.wte.weight")
    wpe = w.take("transformer.wpe.weight")
    table = POS_SCALE * sinusoidal_table(wpe.shape[0], wpe.shape[1])
    if not torch.allclose(wpe.float(), table, rtol=0, atol=1e-6):
        raise CairnError("the export's position embedding (wpe) is not cairn's fixed sinusoidal table (was it "
                         "fine-tuned?): cairn's model cannot compute it; load it with transformers")
    for i in range(w.layers("transformer.h.")):
        h, b = f"transformer.h.{i}.", f"blocks.{i}."
        for ln in ("ln_1", "ln_2"):
            for n in ("weight", "bias"):
                out[b + f"{ln}.{n}"] = w.take(h + f"{ln}.{n}")
        for dst, src in (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"),
                         ("mlp.fc", "mlp.c_fc"), ("mlp.proj", "mlp.c_proj")):
            out[b + dst + ".weight"] = w.take(h + src + ".weight").t().contiguous()
            out[b + dst + ".bias"] = w.take(h + src + ".bias")
    out["ln_f.weight"] = w.take("transformer.ln_f.weight")
    out["ln_f.bias"] = w.take("transformer.ln_f.bias")
    if w.has("lm_head.weight"):  # untied; a tied head is the embedding
        out["lm_head.weight"] = w.take("lm_head.weight")
    return out


def llama_to_cairn(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LlamaForCausalLM weights -> cairn's (q, k and v joined into the fused projection); `hf` is emptied
    of what is used."""
    w, out = _Weights(hf), {}
    out["wte.weight"] = w.take("model.embed_tokens.weight")
    for i in range(w.layers("model.layers.")):
        h, b = f"model.layers.{i}.", f"blocks.{i}."
        out[b + "ln_1.weight"] = w.take(h + "input_layernorm.weight")
        out[b + "ln_2.weight"] = w.take(h + "post_attention_layernorm.weight")
        names = ("weight", "bias") if w.has(h + "self_attn.q_proj.bias") else ("weight",)
        for n in names:
            out[b + f"attn.qkv.{n}"] = torch.cat([w.take(h + f"self_attn.{p}_proj.{n}") for p in "qkv"], dim=0)
            out[b + f"attn.proj.{n}"] = w.take(h + f"self_attn.o_proj.{n}")
            for dst, src in (("gate", "gate_proj"), ("up", "up_proj"), ("proj", "down_proj")):
                out[b + f"mlp.{dst}.{n}"] = w.take(h + f"mlp.{src}.{n}")
    out["ln_f.weight"] = w.take("model.norm.weight")
    if w.has("lm_head.weight"):
        out["lm_head.weight"] = w.take("lm_head.weight")
    return out
