"""`cairn export`: a trained model as a Hugging Face model directory (GPT-2 or Llama, as its blocks are),
or as a GGUF file for llama.cpp and Ollama (the Llama block)."""

from __future__ import annotations

import argparse
import json

from cairn.cli.options import Subcommands
from cairn.util.errors import CairnError

# the GGUF types and default, repeated from cairn.export.gguf so that `cairn --help` imports no torch
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
DEFAULT_GGUF_TYPE = "f32"


def add_parser(sub: Subcommands) -> None:
    p = sub.add_parser("export",
                       help="export a trained model to Hugging Face format (GPT-2 or Llama) or to GGUF "
                            "(llama.cpp, Ollama)",
                       description="Write a run's final checkpoint (or the given checkpoint) as a Hugging Face "
                                   "model, GPT-2 or Llama as its block is (a mix of the two is refused): config.json, "
                                   "generation_config.json, model.safetensors and "
                                   "tokenizer files, loadable offline with transformers' AutoModelForCausalLM "
                                   "and AutoTokenizer. With --format gguf: one GGUF file (the Llama block only) "
                                   "with its tokenizer, that llama.cpp and Ollama run, and an Ollama Modelfile "
                                   "beside it (NAME.Modelfile).")
    p.set_defaults(func=run)
    p.add_argument("path", metavar="RUN_DIR_OR_CHECKPOINT")
    p.add_argument("--format", choices=("hf", "gguf"), default="hf", help="export format (default hf)")
    p.add_argument("--out", required=True, metavar="PATH",
                   help="hf: a new (or empty) directory to write; gguf: a new file NAME.gguf")
    p.add_argument("--gguf-type", choices=GGUF_TYPES, default=None,
                   help=f"gguf: how weights are stored (default {DEFAULT_GGUF_TYPE}: the logits of cairn; "
                        "q8_0 is 3.6x smaller; norms stay f32)")


def run(args: argparse.Namespace) -> int:
    target: str = args.out
    if not target.strip():
        raise CairnError("--out is empty: give a new " + ("file NAME.gguf" if args.format == "gguf" else "directory")
                         + " to write the export into")
    if args.format == "gguf":
        from cairn.export.gguf import export_gguf, modelfile_path

        path = export_gguf(args.path, target, args.gguf_type or DEFAULT_GGUF_TYPE)
        print(f"wrote {path} (GGUF, llama, {args.gguf_type or DEFAULT_GGUF_TYPE}) and {modelfile_path(path)} "
              f"(ollama create NAME -f {modelfile_path(path)})")
        return 0
    if args.gguf_type is not None:
        raise CairnError("--gguf-type is for --format gguf: leave it out of a Hugging Face export")
    from cairn.export.hf import export_hf

    out = export_hf(args.path, target)
    # the architecture the export wrote, as transformers will load it
    kind = json.loads((out / "config.json").read_text(encoding="utf-8"))["architectures"][0]
    print(f"wrote {out} (Hugging Face format, {kind})")
    return 0
