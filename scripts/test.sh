#!/usr/bin/env bash
# The test command (README): the whole suite, real-model tests included (models are
# fetched into the cache on first use). Fails on "no tests ran" (pytest exit 5).
set -uo pipefail
cd "$(dirname "$0")/.."
python -m pytest -q -p no:cacheprovider "$@"
rc=$?
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi
exit "$rc"
