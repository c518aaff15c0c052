#!/usr/bin/env bash
# The test command (README): the whole suite, real-model tests and doctests included.
# The real models are fetched first (downloaded and converted into the models folder,
# $CROSSLORA_MODELS or ~/.cache/crosslora_jax/models, only when absent); the tests then
# only read them, and write every cache into a temporary folder (tests/conftest.py).
# CROSSLORA_REALMODELS=0 skips fetching and the real-model tests (offline work).
# Fails on "no tests ran" (pytest exit 5).
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${CROSSLORA_REALMODELS:-1}" = "0" ]; then
  python -m pytest -q -p no:cacheprovider -m "not realmodels" --doctest-modules "$@"
else
  python scripts/fetch_models.py > /dev/null || { echo "scripts/fetch_models.py failed" >&2; exit 1; }
  python -m pytest -q -p no:cacheprovider --doctest-modules "$@"
fi
rc=$?
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi
exit "$rc"
