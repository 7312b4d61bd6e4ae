"""`cairn export`: a trained model as a Hugging Face model directory (GPT-2 or Llama, as its blocks are)."""

from __future__ import annotations

import argparse
import json

from cairn.cli.options import Subcommands
from cairn.util.errors import CairnError


def add_parser(sub: Subcommands) -> None:
    p = sub.add_parser("export",
                       help="export a trained model to Hugging Face format (GPT-2 or Llama, as its architecture)",
                       description="Write a run's final checkpoint (or the given checkpoint) as a Hugging Face "
                                   "model, GPT-2 or Llama as its block is (a mix of the two is refused): config.json, "
                                   "generation_config.json, model.safetensors and "
                                   "tokenizer files, loadable offline with transformers' AutoModelForCausalLM "
                                   "and AutoTokenizer.")
    p.set_defaults(func=run)
    p.add_argument("path", metavar="RUN_DIR_OR_CHECKPOINT")
    p.add_argument("--format", choices=("hf",), default="hf", help="export format (default hf)")
    p.add_argument("--out", required=True, metavar="DIR", help="new (or empty) directory to write")


def run(args: argparse.Namespace) -> int:
    from cairn.export.hf import export_hf

    target: str = args.out
    if not target.strip():
        raise CairnError("--out is empty: give a new directory to write the export into")
    out = export_hf(args.path, target)
    # the architecture the export wrote, as transformers will load it
    kind = json.loads((out / "config.json").read_text(encoding="utf-8"))["architectures"][0]
    print(f"wrote {out} (Hugging Face format, {kind})")
    return 0
