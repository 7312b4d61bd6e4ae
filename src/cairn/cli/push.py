"""`cairn push`: upload a trained model, as a Hugging Face export with its model card, to a hub model repo."""

from __future__ import annotations

import argparse

from cairn.cli.options import Subcommands


def add_parser(sub: Subcommands) -> None:
    p = sub.add_parser("push", help="upload a trained model to the Hugging Face hub (export + model card)",
                       description="Export a run's final checkpoint (or the given checkpoint) as `cairn export "
                                   "--format hf` does, model card included, into a temporary directory, and upload "
                                   "it to the hub model repo REPO_ID in one commit (the repo is created if "
                                   "missing). The token is huggingface_hub's: HF_TOKEN, or `hf auth login`'s. "
                                   "Loads back with `cairn generate REPO_ID` and transformers' "
                                   "from_pretrained(REPO_ID).")
    p.set_defaults(func=run)
    p.add_argument("path", metavar="RUN_DIR_OR_CHECKPOINT")
    p.add_argument("repo_id", metavar="REPO_ID", help="the hub model repo, as OWNER/NAME")
    p.add_argument("--private", action="store_true", help="create the repo private (a repo that exists keeps its "
                                                          "visibility)")
    p.add_argument("--revision", metavar="BRANCH", help="branch to commit to, created from main if missing "
                                                        "(default main)")
    p.add_argument("--message", metavar="TEXT", help="commit message (default: cairn push: RUN_NAME)")
    p.add_argument("--license", default=None, metavar="ID",
                   help="license in the model card, a hub license id (default mit, cairn's own)")


def run(args: argparse.Namespace) -> int:
    from cairn.export.card import LICENSE
    from cairn.export.push import push

    pushed = push(args.path, args.repo_id, private=args.private, revision=args.revision, message=args.message,
                  license=args.license or LICENSE)
    print(f"pushed {len(pushed.files)} files to {pushed.url} (revision {pushed.revision}, commit "
          f"{pushed.commit[:12] or 'unknown'})")
    return 0
