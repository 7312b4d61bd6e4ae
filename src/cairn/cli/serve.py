"""`cairn serve`: a trained model over HTTP (OpenAI-compatible API and a playground page)."""

from __future__ import annotations

import argparse
import sys

from cairn.cli.options import Subcommands, add_device, not_empty
from cairn.util.log import setup as setup_logging


def add_parser(sub: Subcommands) -> None:
    p = sub.add_parser("serve", help="serve a trained model: OpenAI-compatible API and a playground page",
                       description="Serve a run's final checkpoint (or the given checkpoint) over HTTP: "
                                   "POST /v1/completions (OpenAI's shapes, streaming included), GET /v1/models, "
                                   "GET /health, and a playground page at /. Needs the serve extra: "
                                   "pip install 'cairn-lm[serve]'. See docs/serving.md.")
    p.set_defaults(func=run)
    p.add_argument("path", metavar="RUN_DIR_OR_CHECKPOINT")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this computer only)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 routes (default: $CAIRN_API_KEY)")
    p.add_argument("--max-concurrency", type=int, default=16, metavar="N",
                   help="sequences generated at once, batched together; requests beyond get 429 (default 16)")
    p.add_argument("--max-batch", type=int, metavar="N",
                   help="sequences decoded in one forward pass; the others in flight wait their turn "
                        "(default: --max-concurrency)")
    p.add_argument("--max-body", type=int, default=1_000_000, metavar="BYTES",
                   help="largest request body; larger get 413 (default 1000000)")
    p.add_argument("--max-tokens", type=int, default=2048, metavar="N",
                   help="most tokens one completion may ask for (default 2048)")
    p.add_argument("--model-name", help="the model's id in the API (default: the directory's name)")
    add_device(p)


def run(args: argparse.Namespace) -> int:
    from cairn.runtime.device import set_threads
    from cairn.serve import serve

    not_empty(args, "serve", "host", "model_name")
    setup_logging(stream=sys.stderr)
    set_threads(0)
    serve(args.path, host=args.host, port=args.port, api_key=args.api_key, max_concurrency=args.max_concurrency,
          max_batch=args.max_batch, max_body=args.max_body, max_tokens=args.max_tokens, device=args.device,
          model_name=args.model_name)
    return 0
