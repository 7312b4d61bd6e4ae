"""Export a trained cairn model to GGUF, the file llama.cpp and Ollama run (`cairn export --format gguf`).

Only the Llama block exports (rotary positions, RMSNorm, SwiGLU; biases and a tied head either way),
as llama.cpp's `llama` architecture. The weights are those of the Hugging Face Llama export
(`hf.llama_state_dict`, LoRA adapters merged by `load(merge=True)`), renamed to llama.cpp's tensor
names, with two changes llama.cpp's own converter makes:
  - q and k rows are permuted within each head: cairn (like Hugging Face Llama) rotates dims i and
    i + head_dim/2 together ("rotate_half"), llama.cpp's `llama` rotates dims 2i and 2i + 1. Without
    the permutation the file loads and its logits are wrong;
  - a tied head is left out (`output.weight` absent): llama.cpp then uses `token_embd.weight`.

The GPT-2 block is refused: llama.cpp's `gpt2` graph computes the tanh approximation of GELU where
cairn's block computes the exact erf GELU, so the file would run a different function from the one
that was trained (the Hugging Face export computes the same one).

The tokenizer goes in the file (`tokenizer.ggml.model = gpt2`, pre-tokenizer `gpt-2`): cairn's
tokenizers, GPT-2's own and the BPEs `cairn tokenizer train` learns, are all byte-level BPEs cut by
GPT-2's regex without a prefix space. `<|endoftext|>` is a control token and both bos and eos, and
`add_bos_token` is set: cairn starts every story after `<|endoftext|>`, so llama.cpp and Ollama put
it before a prompt as `cairn generate` does, and stop where the model writes it.

Beside the file goes an Ollama Modelfile: the file, the context length, the stop and cairn's default
sampling settings (`SamplingConfig()`).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import fields
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Literal, cast, get_args

import numpy as np
import torch
from numpy.typing import NDArray

from cairn.util import files
from cairn.util.errors import CairnError, option
from cairn.tokenizer.base import EOT, TOKENIZER_FILE, BPETokenizer, TiktokenTokenizer, Tokenizer
from cairn.inference.sampling import SamplingConfig

if TYPE_CHECKING:
    from gguf import GGMLQuantizationType, GGUFWriter

    from cairn.config.sections import RunConfig

GgufType = Literal["f32", "f16", "bf16", "q8_0"]
GGUF_TYPES: tuple[str, ...] = get_args(GgufType)
# f32 by default: the file computes what cairn computes (next-token log-probabilities within 6e-5 of
# cairn's through llama.cpp, greedy text the same), and the models cairn trains on CPUs are small enough
# that halving the file buys little (cpu-10min: 6.7 MB at f32, 3.4 MB at f16, 1.9 MB at q8_0, whose
# held-out bits per byte are f32's within 1e-5; benchmarks/records/gguf-cpu-10min.json)
DEFAULT_GGUF_TYPE: GgufType = "f32"
INSTALL_HINT = "GGUF export needs the `gguf` package: pip install 'cairn-lm[gguf]' (or pip install gguf)"

# Hugging Face Llama name (inside model.layers.N.) -> llama.cpp's (inside blk.N.)
_LAYER_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def _gguf() -> ModuleType:
    """The `gguf` package, imported only when a GGUF is written."""
    try:
        import gguf
    except ImportError:
        raise CairnError(INSTALL_HINT) from None
    return gguf


def check_exportable(cfg: RunConfig) -> None:
    """Refuse, in one line, a model llama.cpp's `llama` graph does not compute."""
    from cairn.export.hf import hf_architecture

    arch = hf_architecture(cfg)  # refuses mixes of the two blocks, naming the fields
    if arch == "gpt2":
        raise CairnError("this model has the GPT-2 block, whose exact (erf) GELU llama.cpp's gpt2 architecture "
                         "replaces by its tanh approximation, so a GGUF would not compute the trained model: "
                         f"export it with {option('format')} hf, or train the Llama block ({option('model.positions')} "
                         f"rope {option('model.norm')} rmsnorm {option('model.mlp')} swiglu) for GGUF")
    m = cfg.model
    if m.d_model % m.n_heads or (m.d_model // m.n_heads) % 2:
        raise CairnError(f"head width {m.d_model}/{m.n_heads} is not an even whole number: rotary positions "
                         "cannot be written for llama.cpp")


def rope_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder q or k rows (weight [out, in] or bias [out]) of each head from rotate_half pairs (i, i + hd/2)
    to llama.cpp's adjacent pairs (2i, 2i + 1): as `permute` in llama.cpp's convert_hf_to_gguf.py."""
    rest = w.shape[1:]
    return (w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *rest).swapaxes(1, 2).reshape(w.shape))


def gguf_tensors(hf_llama: dict[str, torch.Tensor], n_heads: int, n_layers: int) -> dict[str, torch.Tensor]:
    """Hugging Face Llama weights (`hf.llama_state_dict`) -> llama.cpp's names, q and k permuted."""
    sd = dict(hf_llama)
    out = {"token_embd.weight": sd.pop("model.embed_tokens.weight"),
           "output_norm.weight": sd.pop("model.norm.weight")}
    if "lm_head.weight" in sd:  # untied; a tied head is token_embd, as llama.cpp reads a missing output
        out["output.weight"] = sd.pop("lm_head.weight")
    for i in range(n_layers):
        for hf_name, name in _LAYER_NAMES.items():
            for kind in ("weight", "bias"):
                key = f"model.layers.{i}.{hf_name}.{kind}"
                if key not in sd:
                    continue
                t = sd.pop(key)
                if name in ("attn_q", "attn_k"):
                    t = rope_permute(t, n_heads)
                out[f"blk.{i}.{name}.{kind}"] = t.contiguous()
    if sd:
        raise CairnError(f"the model has weights llama.cpp's format has no place for ({', '.join(sorted(sd)[:3])}): "
                         "it cannot be exported to GGUF")
    return out


# ------------------------------------------------------------------ tokenizer

def tokenizer_vocab(tok: Tokenizer) -> tuple[list[str], list[str]]:
    """(tokens in id order as byte-level BPE strings, merges as "a b"): what llama.cpp's gpt2 tokenizer reads."""
    if isinstance(tok, TiktokenTokenizer):
        from cairn.tokenizer.base import _gpt2_files

        vocab_bpe, encoder_json = _gpt2_files()
        encoder: dict[str, int] = json.loads(encoder_json.read_text(encoding="utf-8"))
        lines = vocab_bpe.read_text(encoding="utf-8").splitlines()
        merges = [ln for ln in lines[1:] if ln.strip()]  # the first line is "#version: 0.2"
    elif isinstance(tok, BPETokenizer):
        spec = json.loads((tok.directory / TOKENIZER_FILE).read_text(encoding="utf-8"))
        pre = spec.get("pre_tokenizer") or {}
        if pre.get("type") != "ByteLevel" or pre.get("add_prefix_space") or not pre.get("use_regex", True):
            raise CairnError(f"tokenizer {str(tok.directory)!r} does not cut text with GPT-2's regex and no prefix "
                             "space (as `cairn tokenizer train` makes them): llama.cpp would split text differently")
        encoder = tok.tok.get_vocab(with_added_tokens=True)
        merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    else:
        raise CairnError(f"cannot export tokenizer {getattr(tok, 'name', tok)!r} to GGUF")
    tokens = [""] * tok.vocab_size
    for token, i in encoder.items():
        if 0 <= i < tok.vocab_size:
            tokens[i] = token
    if "" in tokens or tokens[tok.eot_id] != EOT:
        raise CairnError(f"tokenizer {tok.name!r} does not give every id 0..{tok.vocab_size - 1} a token: "
                         "cannot export it to GGUF")
    return tokens, merges


def add_tokenizer(w: GGUFWriter, tok: Tokenizer) -> None:
    gguf = _gguf()
    tokens, merges = tokenizer_vocab(tok)
    types = [gguf.TokenType.NORMAL] * len(tokens)
    types[tok.eot_id] = gguf.TokenType.CONTROL
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tok.eot_id)
    w.add_eos_token_id(tok.eot_id)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)


# ------------------------------------------------------------------ weights

def _tensor_type(t: NDArray[np.float32], want: GgufType) -> GGMLQuantizationType:
    """The GGML type a tensor is stored in: norms and biases (1-D) stay float32, as llama.cpp's converter
    keeps them; a matrix whose rows do not split into q8_0's blocks of 32 falls back to f16, as there."""
    q = _gguf().GGMLQuantizationType
    if t.ndim == 1 or want == "f32":
        return q.F32
    if want == "q8_0" and t.shape[-1] % 32 == 0:
        return q.Q8_0
    return {"f16": q.F16, "bf16": q.BF16}.get(want, q.F16)


def add_weights(w: GGUFWriter, tensors: dict[str, torch.Tensor], want: GgufType) -> None:
    gguf = _gguf()
    for name, t in tensors.items():
        data = t.detach().to("cpu", torch.float32).numpy()
        qtype = _tensor_type(data, want)
        if qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, data)
        elif qtype == gguf.GGMLQuantizationType.F16:
            w.add_tensor(name, data.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)


def _file_type(want: GgufType) -> int:
    ft = _gguf().LlamaFileType
    return int({"f32": ft.ALL_F32, "f16": ft.MOSTLY_F16, "bf16": ft.MOSTLY_BF16, "q8_0": ft.MOSTLY_Q8_0}[want])


def write_gguf(path: Path, cfg: RunConfig, tensors: dict[str, torch.Tensor], tok: Tokenizer, want: GgufType) -> None:
    gguf = _gguf()
    m = cfg.model
    w = gguf.GGUFWriter(str(path), "llama")
    try:
        w.add_name(cfg.name)
        w.add_context_length(m.context_len)
        w.add_embedding_length(m.d_model)
        w.add_block_count(m.n_layers)
        w.add_feed_forward_length(m.d_mlp)
        w.add_head_count(m.n_heads)
        w.add_head_count_kv(m.n_heads)
        w.add_rope_dimension_count(m.d_model // m.n_heads)
        w.add_rope_freq_base(m.rope_theta)
        w.add_layer_norm_rms_eps(m.norm_eps)
        w.add_vocab_size(m.vocab_size)
        w.add_file_type(_file_type(want))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_tokenizer(w, tok)
        add_weights(w, tensors, want)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()


# ------------------------------------------------------------------ Ollama

def modelfile(gguf_name: str, context_len: int, sampling: SamplingConfig | None = None) -> str:
    """An Ollama Modelfile for the GGUF beside it: the prompt as it is (the file itself puts <|endoftext|>
    before it), a stop at <|endoftext|>, and cairn's sampling defaults where Ollama has the setting."""
    s = sampling or SamplingConfig()
    ollama = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p",
              "repetition_penalty": "repeat_penalty", "max_new_tokens": "num_predict", "seed": "seed"}
    lines = [f"FROM ./{gguf_name}", 'TEMPLATE """{{ .Prompt }}"""', f'PARAMETER stop "{EOT}"',
             f"PARAMETER num_ctx {context_len}",
             "PARAMETER min_p 0"]  # cairn samples without a min-p cut: none, whatever Ollama's default
    for f in fields(SamplingConfig):
        if f.name in ollama:
            v = getattr(s, f.name)
            lines.append(f"PARAMETER {ollama[f.name]} {v:g}" if isinstance(v, float) else
                         f"PARAMETER {ollama[f.name]} {v}")
    return "\n".join(lines) + "\n"


def modelfile_path(out: Path) -> Path:
    return out.with_name(out.stem + ".Modelfile")


# ------------------------------------------------------------------ the export

def export_gguf(path: str | Path, out: str | Path, gguf_type: str = DEFAULT_GGUF_TYPE) -> Path:
    """Write the model at `path` (a run directory or checkpoint) to the GGUF file `out` (…/NAME.gguf), with
    an Ollama Modelfile beside it (NAME.Modelfile). Neither exists afterwards unless both were written."""
    from cairn.checkpoint.load import load
    from cairn.export.hf import llama_state_dict

    if gguf_type not in GGUF_TYPES:
        raise CairnError(f"{option('gguf_type')} must be one of {', '.join(GGUF_TYPES)}, got {gguf_type!r}")
    want = cast(GgufType, gguf_type)
    out = Path(out)
    if out.suffix != ".gguf":
        raise CairnError(f"{option('out')} {str(out)!r} must be a file name ending in .gguf")
    mf = modelfile_path(out)
    for p in (out, mf):
        if p.exists():
            raise CairnError(f"{str(p)!r} already exists: choose another {option('out')} (nothing was written)")
    if not out.parent.is_dir():
        raise CairnError(f"{option('out')}'s directory {str(out.parent)!r} does not exist: create it first")
    _gguf()  # the install hint before the model is loaded
    loaded = load(path, device="cpu", merge=True)  # LoRA adapters folded in, as the Hugging Face export
    cfg, tok = loaded.config, loaded.tokenizer
    check_exportable(cfg)
    if cfg.model.vocab_size != tok.vocab_size:
        raise CairnError(f"the model's vocabulary ({cfg.model.vocab_size}) does not match its tokenizer's "
                         f"({tok.vocab_size}): cannot export")
    tensors = gguf_tensors(llama_state_dict(loaded.model), cfg.model.n_heads, cfg.model.n_layers)
    tmp, tmp_mf = files.temp_name(out), files.temp_name(mf)
    try:
        write_gguf(tmp, cfg, tensors, tok, want)
        files.write_text(tmp_mf, modelfile(out.name, cfg.model.context_len))
        os.replace(tmp_mf, mf)
        os.replace(tmp, out)
    except BaseException:
        for p in (tmp, tmp_mf, mf):
            with contextlib.suppress(OSError):
                p.unlink()
        raise
    files.fsync_dir(out.parent)
    return out
