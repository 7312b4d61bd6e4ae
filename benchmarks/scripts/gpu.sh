#!/usr/bin/env bash
# The GPU check, in one command of under 5 minutes on one H200 (or any CUDA GPU):
# reference-105m's shape (d768, 4 layers, 12 heads, GPT-2 vocabulary, 32 rows of 1000 tokens) in
# bf16 autocast, cairn against the nanoGPT-style reference, eager and torch.compile'd, alternating;
# then KV-cache decoding against recomputation. Prints the table; writes its record to $1 (and the
# bf16-against-float32 training record beside it, where the TinyStories sample is found).
#   bash benchmarks/scripts/gpu.sh [OUT.json]
# MFU is against the GPU's dense bf16 peak from its data sheet (runtime.GPU_BF16_PEAKS).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-benchmarks/records/gpu-reference-105m.json}
PY=${PYTHON:-python}
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA GPU found: this benchmark needs one")'
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || true
PYTHONPATH=src "$PY" -m cairn bench --preset reference-105m --device cuda --precision bf16 --compile \
    --variants nanogpt,cairn --rounds 20 --generate 256 --json "$OUT"
# bf16 against float32 on the same run, where the shared TinyStories sample is reachable
DATA=${DATA:-../shared/data/tinystories}
if [ -d "$DATA" ]; then
  PYTHONPATH=src "$PY" benchmarks/scripts/precision.py --data "$DATA" --json "${OUT%.json}-precision.json" -- \
      --preset cpu-10min --time-budget "" --max-steps 600 --eval-every 100 --end-stories 0 --device cuda
fi
