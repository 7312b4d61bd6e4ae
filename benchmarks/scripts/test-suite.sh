#!/usr/bin/env bash
# Times the test suite of the commit before its rebuild (1a9b77c) and of the working tree, one
# after the other on the machine that runs it, as pytest reports them (install and lint excluded). Needs the
# project's .venv with the test extra (bash scripts/setup.sh test). Prints pytest's summary lines.
set -euo pipefail
cd "$(dirname "$0")/../.."
. .venv/bin/activate
old=$(mktemp -d)
git worktree add -q --detach "$old" 1a9b77c
trap 'git worktree remove --force "$old"' EXIT
echo "== 1a9b77c, one process"
(cd "$old" && PYTHONPATH="$old/src" python -m pytest -q -p no:cacheprovider | tail -1)
echo "== working tree, one process"
python -m pytest -q -p no:cacheprovider | tail -1
echo "== working tree, as scripts/test.sh runs it on 2 cores"
python -m pytest -q -p no:cacheprovider -n 2 --dist loadfile | tail -1
