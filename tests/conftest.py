"""Session setup: fixture builders on sys.path, and every cache in one temporary folder.

A suite run writes nothing under ``~/.cache``: the subspace cache and JAX's compilation
cache (both below ``$CROSSLORA_CACHE``), ``HF_HOME``, ``XDG_CACHE_HOME`` and matplotlib's
config folder point into a temporary folder, removed at the end; CLI subprocesses
inherit them. The real models are only read, from ``$CROSSLORA_MODELS`` (default: the
models folder of the user's cache, taken before the cache root is redirected), where
``python scripts/fetch_models.py`` puts them; scripts/test.sh runs it first.
"""

import os
import pathlib
import shutil
import sys
import tempfile

# Tests import the fixture builders as a module and run the CLI from the repo root.
ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from crosslora_bench import zoo  # noqa: E402  (reads no environment variable at import)

SESSION_CACHE = pathlib.Path(tempfile.mkdtemp(prefix="crosslora-tests-"))
os.environ[zoo.MODELS_ENV] = str(zoo.models_dir())  # before CROSSLORA_CACHE moves: the user's models
os.environ[zoo.CACHE_ENV] = str(SESSION_CACHE / "crosslora_jax")
os.environ["HF_HOME"] = str(SESSION_CACHE / "huggingface")
os.environ["XDG_CACHE_HOME"] = str(SESSION_CACHE / "xdg")
os.environ["MPLCONFIGDIR"] = str(SESSION_CACHE / "matplotlib")


def pytest_sessionfinish(session, exitstatus):
  del session, exitstatus
  shutil.rmtree(SESSION_CACHE, ignore_errors=True)
