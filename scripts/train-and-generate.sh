#!/usr/bin/env bash
# The main job: set up (once), train the cpu-10min preset (10 minutes on 2 CPU cores, whole command
# included), then generate a story from it.
#   bash scripts/train-and-generate.sh [DATA] [RUN_DIR]
# DATA defaults to the hub's roneneldan/TinyStories (offline: its copy in the Hugging Face hub
# cache), or pass local files, e.g. ../shared/data/tinystories (a directory of .jsonl files).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-roneneldan/TinyStories}
RUN=${2:-runs/cpu-10min-$(date +%Y%m%d-%H%M%S)}
bash scripts/setup.sh
. .venv/bin/activate
# 20,000 stories keep the set-up (tokenizer learning, tokenizing) short on the 2.1M-story hub
# dataset. The shared sample has fewer, so there it is all of them.
cairn train --preset cpu-10min --data "$DATA" --out "$RUN" --n-samples 20000
cairn generate "$RUN" --prompt "Once upon a time" --max-new-tokens 300
