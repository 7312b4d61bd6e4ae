"""Export a trained cairn model to Hugging Face format (`cairn export --format hf`).

The format follows the architecture: the tutorial's block (sinusoidal positions, LayerNorm, GELU
MLP, biases) becomes GPT-2; the Llama block (rotary positions, RMSNorm, SwiGLU) becomes Llama,
with or without biases and with the head tied or not. A mix of the two (say, rotary positions with
a GELU MLP) has no Hugging Face class that computes it, and is refused with the fields to change.

For GPT-2, cairn's model has three choices GPT-2 can express:
  - fixed sinusoidal positions: the (scaled) table becomes GPT-2's learned position embedding `wpe`,
    with exactly its values, so the exported model computes the same function;
  - exact erf GELU: `activation_function = "gelu"` (not GPT-2's tanh "gelu_new");
  - the output head: untied (the tutorial's) as `tie_word_embeddings = false` with its own
    `lm_head.weight`; tied (`model.tie_embeddings`) as GPT-2's own `tie_word_embeddings = true`.
GPT-2 keeps its linears as Conv1D, whose weight is the transpose of nn.Linear's; cairn's fused
q/k/v projection outputs [q; k; v], the same order as GPT-2's `c_attn`.

The directory written holds config.json, generation_config.json, model.safetensors and the
tokenizer files, so `transformers.AutoModelForCausalLM.from_pretrained(DIR)` and
`AutoTokenizer.from_pretrained(DIR)` load it offline. Writing needs no `transformers`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch

from cairn.export import card
from cairn.util import files
from cairn.util.errors import CairnError, option
from cairn.tokenizer.base import EOT, TOKENIZER_FILE, BPETokenizer, TiktokenTokenizer, Tokenizer

if TYPE_CHECKING:
    from cairn.config.sections import RunConfig
    from cairn.model.transformer import Transformer


GPT2_BLOCK = {"positions": "sinusoidal", "norm": "layernorm", "mlp": "gelu", "bias": True}
LLAMA_BLOCK = {"positions": "rope", "norm": "rmsnorm", "mlp": "swiglu"}


def hf_architecture(cfg: RunConfig) -> str:
    """'gpt2' or 'llama': the Hugging Face class that computes exactly this model; else refuse."""
    m = cfg.model
    if all(getattr(m, k) == v for k, v in GPT2_BLOCK.items()):
        return "gpt2"
    if all(getattr(m, k) == v for k, v in LLAMA_BLOCK.items()):
        return "llama"
    if m.positions == "sinusoidal" and m.norm == "layernorm" and m.mlp == "gelu":  # only the biases are off
        raise CairnError("this model has no biases (model.bias = false), which GPT-2's format cannot express: "
                         f"only models trained with biases export to {option('data.format')} hf in GPT-2 form "
                         f"(or train the Llama block: {option('model.positions')} rope {option('model.norm')} rmsnorm "
                         f"{option('model.mlp')} swiglu)")
    gpt2_off = [f"{k}={getattr(m, k)}" for k, v in GPT2_BLOCK.items() if getattr(m, k) != v]
    llama_off = [f"{k}={getattr(m, k)}" for k, v in LLAMA_BLOCK.items() if getattr(m, k) != v]
    raise CairnError(f"this model mixes GPT-2's and Llama's blocks, which no Hugging Face format computes "
                     f"(not GPT-2 because of {', '.join(gpt2_off)}; not Llama because of {', '.join(llama_off)}): "
                     "it cannot be exported; use it with cairn, or train one of the two blocks")


def _source_weights(model: Transformer) -> dict[str, torch.Tensor]:
    """The model's weights as float32 on the CPU, each once (a tied head is the embedding: both
    formats tie lm_head to the embedding themselves)."""
    sd = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


def _all_used(sd: dict[str, torch.Tensor], fmt: str) -> None:
    if sd:
        raise CairnError(f"the model has weights {fmt}'s format has no place for ({', '.join(sorted(sd)[:3])}): "
                         f"it cannot be exported to {option('data.format')} hf")


def llama_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """cairn weights -> LlamaForCausalLM weights. cairn's rotary form is Llama's (rotate_half), so
    q and k need no permutation; the fused q/k/v projection is cut into q_proj, k_proj, v_proj."""
    sd = _source_weights(model)
    out: dict[str, torch.Tensor] = {}
    names = ("weight", "bias") if model.cfg.bias else ("weight",)

    def take(src: str, dst: str) -> None:
        out[dst] = sd.pop(src).contiguous().clone()

    take("wte.weight", "model.embed_tokens.weight")
    for i in range(model.cfg.n_layers):
        b, h = f"blocks.{i}.", f"model.layers.{i}."
        take(b + "ln_1.weight", h + "input_layernorm.weight")
        take(b + "ln_2.weight", h + "post_attention_layernorm.weight")
        for n in names:
            for part, t in zip(("q", "k", "v"), sd.pop(b + f"attn.qkv.{n}").chunk(3, dim=0)):
                out[h + f"self_attn.{part}_proj.{n}"] = t.contiguous().clone()
            take(b + f"attn.proj.{n}", h + f"self_attn.o_proj.{n}")
            for src, dst in (("gate", "gate_proj"), ("up", "up_proj"), ("proj", "down_proj")):
                take(b + f"mlp.{src}.{n}", h + f"mlp.{dst}.{n}")
    take("ln_f.weight", "model.norm.weight")
    if not model.cfg.tie_embeddings:
        take("lm_head.weight", "lm_head.weight")
    _all_used(sd, "Llama")
    return out


def llama_config(cfg: RunConfig, eot_id: int) -> dict[str, Any]:
    m = cfg.model
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": m.vocab_size,
        "hidden_size": m.d_model,
        "intermediate_size": m.d_mlp,
        "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.n_heads,
        "head_dim": m.d_model // m.n_heads,
        "hidden_act": "silu",
        "max_position_embeddings": m.context_len,
        "rms_norm_eps": m.norm_eps,
        "rope_theta": m.rope_theta,  # transformers < 5
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},  # transformers >= 5
        "attention_bias": m.bias,
        "mlp_bias": m.bias,
        "attention_dropout": m.dropout,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "tie_word_embeddings": m.tie_embeddings,
        "torch_dtype": "float32",
    }


def gpt2_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """cairn weights -> GPT2LMHeadModel weights (Conv1D ones transposed), every weight used once."""
    sd = _source_weights(model)
    tied = model.cfg.tie_embeddings
    out: dict[str, torch.Tensor] = {}

    def take(src: str, dst: str, transpose: bool = False) -> None:
        if src not in sd:
            raise CairnError(f"the model has no weight {src!r}: it is not a model GPT-2's format can express")
        t = sd.pop(src)
        out[dst] = (t.t() if transpose else t).contiguous().clone()

    take("wte.weight", "transformer.wte.weight")
    if model.pos_table is None:
        raise CairnError("the model has no position table (rotary positions): GPT-2's format cannot express it")
    out["transformer.wpe.weight"] = model.pos_table.detach().to("cpu", torch.float32).contiguous().clone()
    for i in range(model.cfg.n_layers):
        b, h = f"blocks.{i}.", f"transformer.h.{i}."
        for ln in ("ln_1", "ln_2"):
            take(b + ln + ".weight", h + ln + ".weight")
            take(b + ln + ".bias", h + ln + ".bias")
        for src, dst in (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"),
                         ("mlp.fc", "mlp.c_fc"), ("mlp.proj", "mlp.c_proj")):
            take(b + src + ".weight", h + dst + ".weight", transpose=True)
            take(b + src + ".bias", h + dst + ".bias")
    take("ln_f.weight", "transformer.ln_f.weight")
    take("ln_f.bias", "transformer.ln_f.bias")
    if not tied:
        take("lm_head.weight", "lm_head.weight")
    _all_used(sd, "GPT-2")
    return out


def gpt2_config(cfg: RunConfig, eot_id: int) -> dict[str, Any]:
    m = cfg.model
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": m.vocab_size,
        "n_positions": m.context_len,
        "n_ctx": m.context_len,
        "n_embd": m.d_model,
        "n_layer": m.n_layers,
        "n_head": m.n_heads,
        "n_inner": m.d_mlp,
        "activation_function": "gelu",  # exact erf GELU, as cairn
        "resid_pdrop": m.dropout,
        "embd_pdrop": m.dropout,
        "attn_pdrop": m.dropout,
        "layer_norm_epsilon": m.norm_eps,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "use_cache": True,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "tie_word_embeddings": bool(getattr(m, "tie_embeddings", False)),
        "torch_dtype": "float32",
    }


def _tokenizer_config(tokenizer_class: str, context_len: int) -> dict[str, Any]:
    return {
        "tokenizer_class": tokenizer_class,
        "bos_token": EOT, "eos_token": EOT, "unk_token": EOT,
        "add_bos_token": False, "add_prefix_space": False,
        "model_max_length": context_len,
        "clean_up_tokenization_spaces": False,
    }


def write_tokenizer(tokenizer: Tokenizer, out: Path, context_len: int) -> None:
    """Tokenizer files `AutoTokenizer.from_pretrained(out)` loads offline."""
    if isinstance(tokenizer, TiktokenTokenizer):
        from cairn.tokenizer.base import _gpt2_files

        vocab_bpe, encoder_json = _gpt2_files()
        shutil.copyfile(encoder_json, out / "vocab.json")
        shutil.copyfile(vocab_bpe, out / "merges.txt")
        try:
            _write_gpt2_tokenizer_json(out)
        except ImportError:  # without `tokenizers`, transformers builds it from vocab.json + merges.txt
            pass
        cls = "GPT2Tokenizer"  # transformers' AutoTokenizer gives its fast (tokenizers) version
    elif isinstance(tokenizer, BPETokenizer):
        shutil.copyfile(tokenizer.directory / TOKENIZER_FILE, out / TOKENIZER_FILE)
        cls = "PreTrainedTokenizerFast"
    else:
        raise CairnError(f"cannot export tokenizer {getattr(tokenizer, 'name', tokenizer)!r} to "
                         f"{option('data.format')} hf")
    (out / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(cls, context_len), indent=2) + "\n",
                                               encoding="utf-8")
    (out / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": EOT, "eos_token": EOT, "unk_token": EOT}, indent=2) + "\n", encoding="utf-8")


def _write_gpt2_tokenizer_json(out: Path) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    bpe = models.BPE.from_file(str(out / "vocab.json"), str(out / "merges.txt"))
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(EOT, special=True)])
    tok.save(str(out / TOKENIZER_FILE))


def export_hf(path: str | Path, out: str | Path, repo_id: Optional[str] = None, license: str = card.LICENSE) -> Path:
    """Write the model at `path` (a run directory or checkpoint) to `out` in Hugging Face format (GPT-2 or
    Llama, as its block is), with its model card (naming `repo_id` where it will be found)."""
    from safetensors.torch import save_file

    from cairn.checkpoint.load import load

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CairnError(f"{option('out')} {str(out)!r} already exists and is not an empty directory: choose a new one")
    loaded = load(path, device="cpu", merge=True)  # LoRA adapters folded in: the export needs no peft
    arch = hf_architecture(loaded.config)
    cfg, tok = loaded.config, loaded.tokenizer
    if cfg.model.vocab_size != tok.vocab_size:
        raise CairnError(f"the model's vocabulary ({cfg.model.vocab_size}) does not match its tokenizer's "
                         f"({tok.vocab_size}): cannot export")
    tensors = gpt2_state_dict(loaded.model) if arch == "gpt2" else llama_state_dict(loaded.model)
    config = gpt2_config(cfg, tok.eot_id) if arch == "gpt2" else llama_config(cfg, tok.eot_id)

    with files.atomic_dir(out) as tmp:  # an empty `out` is replaced; a full one was refused above
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        gen = {"bos_token_id": tok.eot_id, "eos_token_id": tok.eot_id, "pad_token_id": tok.eot_id}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n", encoding="utf-8")
        write_tokenizer(tok, tmp, cfg.model.context_len)
        card.write(tmp, loaded, arch, repo_id, license)
    return out

