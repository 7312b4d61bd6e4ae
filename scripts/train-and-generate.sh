#!/usr/bin/env bash
# The main job: set up (once), train the cpu-small preset, then generate a story from it.
#   bash scripts/train-and-generate.sh [DATA] [RUN_DIR]
# DATA defaults to the hub's roneneldan/TinyStories where there is a network; offline, pass local
# files, e.g. ../shared/data/tinystories (a directory of .jsonl files).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-roneneldan/TinyStories}
RUN=${2:-runs/cpu-small-$(date +%Y%m%d-%H%M%S)}
bash scripts/setup.sh
. .venv/bin/activate
cairn train --preset cpu-small --data "$DATA" --out "$RUN"
cairn generate "$RUN" --prompt "Once upon a time" --max-new-tokens 300
