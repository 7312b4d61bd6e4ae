#!/usr/bin/env bash
# Set up (once), lint, and run the whole test suite, offline, listing the 15 slowest tests.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check src tests benchmarks
python -m pytest -q --durations=15 "$@"
