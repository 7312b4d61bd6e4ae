#!/usr/bin/env bash
# Set up for the tests (once), lint, type-check, and run the whole test suite, offline, listing the 15
# slowest tests. `bash scripts/test.sh -m "not slow"` runs the fast layer only (about a minute).
# Test files run side by side on up to 4 cores (CAIRN_TEST_WORKERS sets how many processes):
# much of the suite waits on process start-up, torchrun and timeouts. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
. .venv/bin/activate
ruff check src tests benchmarks
mypy  # src/cairn, with pyproject.toml's [tool.mypy]: every definition typed
workers=${CAIRN_TEST_WORKERS:-$(python -c "from cairn.util.host import usable_cores; print(min(4, usable_cores()))")}
python -m pytest -q --durations=15 -n "$workers" --dist loadfile "$@"
