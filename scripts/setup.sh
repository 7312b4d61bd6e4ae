#!/usr/bin/env bash
# Creates .venv (if missing) and installs into it what one purpose needs:
#   bash scripts/setup.sh        the main job (scripts/train-and-generate.sh): torch, then cairn
#   bash scripts/setup.sh test   the tests (scripts/test.sh): torch, then cairn with its test extra
#                                (pytest, ruff, mypy, the serving clients), and Chromium with its
#                                driver for the playground page's browser test
# torch goes first and pinned: an unpinned torch with none installed pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
purpose=${1:-main}
case "$purpose" in
    main | test) ;;
    *) echo "usage: bash scripts/setup.sh [test]   (no argument: what the main job needs)" >&2; exit 2 ;;
esac
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
if [ "$purpose" = main ]; then
    python -m pip install -q -e .
    exit 0
fi
python -m pip install -q -e ".[test]"
# The playground page's test drives a headless Chromium (tests/test_serve_browser.py skips without one):
# install Debian's chromium and its driver where apt-get can, quietly; setup never fails over it.
if ! command -v chromedriver >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo -n"
    { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver; } \
        >/dev/null 2>&1 || echo "note: could not install chromium (the browser test will be skipped)" >&2
fi
# The GGUF export's tests run the file through a real llama.cpp: node-llama-cpp's prebuilt CPU build, once,
# into .llama-cpp/ (ignored). On x86-64 Linux only the CPU binary is fetched (83 MB; the CUDA and Vulkan
# builds are optional packages left out). Setup never fails over it; the tests fail in CI without it.
LLAMA_CPP_NPM=3.21.1
if [ ! -f .llama-cpp/node_modules/node-llama-cpp/package.json ] && command -v npm >/dev/null 2>&1; then
    mkdir -p .llama-cpp
    [ -f .llama-cpp/package.json ] || echo '{"private": true}' >.llama-cpp/package.json
    only_cpu=()
    [ "$(uname -s)-$(uname -m)" = Linux-x86_64 ] && only_cpu=(--omit=optional "@node-llama-cpp/linux-x64@$LLAMA_CPP_NPM")
    NODE_LLAMA_CPP_SKIP_DOWNLOAD=true npm install --prefix .llama-cpp --no-audit --no-fund --loglevel=error \
        "node-llama-cpp@$LLAMA_CPP_NPM" "${only_cpu[@]}" >/dev/null \
        || echo "note: could not install node-llama-cpp (the GGUF tests will be skipped, or fail in CI)" >&2
fi
