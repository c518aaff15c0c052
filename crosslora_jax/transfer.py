r"""Move PEFT LoRA adapters from one Hugging Face base model to another, data-free.

  python -m crosslora_jax.transfer \
      --source_model path/to/source_hf_folder --target_model path/to/target_hf_folder \
      --adapter path/to/peft_adapter --output path/to/new_adapter [--method cross_lora]

Methods:
  cross_lora    Cross-LoRA (arXiv 2508.05232), dimension-consistent: project the LoRA
                factors through the rank-r SVD subspaces of the source and target base
                weights: dW_t = U_t (U_s^T dW_s V_s) V_t^T. Works across shapes.
  lora_x        LoRA-X projection onto the target's subspaces (equal shapes only).
  copy          Copy the factors unchanged (equal shapes only).
  truncate_pad  Cut or zero-pad the factors to the target's sizes (what the paper's
                authors' code effectively does; a baseline).
  anchored      Map every space through ridge maps fitted on the two models' shared
                vocabulary (needs tokenizer.json in both folders); a data-free guard
                skips modules whose predicted transferability is below
                --anchor_threshold and shrinks the rest (crosslora_jax/anchored.py).

--calibrate_norm (any method) rescales each module so that |dW_t|/|W_t| equals the
source's |dW_s|/|W_s|; the report lists both ratios either way.

With several --adapter flags, --output gets one subfolder per adapter (named after the
adapter folder). Outputs are written to a temporary folder, checked, then renamed, so a
failure leaves nothing half-written. Bad input exits with status 2 and one line naming
the file, the key and the fix.

--orbax_output also writes each transferred adapter as an Orbax checkpoint of a flax.nnx
LoRA tree (crosslora_jax.formats.orbax_io; see docs/flax.md), under the same guarantees.
"""

from __future__ import annotations

import gc
import os
import pathlib
import signal
import threading
import sys
from typing import Any

from absl import app, flags, logging

from crosslora_jax.methods import anchored
from crosslora_jax.core import cache, engine, kernels, planning
from crosslora_jax.formats import adapter_io
from crosslora_jax.errors import CrossLoraError
from crosslora_jax.progress import ProgressBar

_SOURCE = flags.DEFINE_string("source_model", None, "HF folder of the base model the adapter was trained on.")
_TARGET = flags.DEFINE_string("target_model", None, "HF folder of the base model to move the adapter to.")
_ADAPTER = flags.DEFINE_multi_string("adapter", [], "PEFT adapter folder (repeat for several).")
_ADAPTER_DIR = flags.DEFINE_string("adapter_dir", None, "A folder of adapters: every subfolder holding "
                                   "adapter_config.json is transferred (with any --adapter).")
_OUTPUT = flags.DEFINE_string("output", None, "Output folder (one subfolder per adapter when several).")
_METHOD = flags.DEFINE_enum("method", "cross_lora", planning.METHODS, "Transfer method (see above).")
_RANK = flags.DEFINE_integer("rank", 320, "Truncation rank r of the base-weight SVDs; clipped per weight "
                             "to min(r, m_s, n_s, m_t, n_t).")
_LAYER_MAP = flags.DEFINE_enum("layer_map", "auto", planning.LAYER_MAPS,
                               "identity: layer i -> i (paper); depth: by relative depth; "
                               "auto: identity when layer counts match, else depth.")
_SVD = flags.DEFINE_enum("svd", kernels.DEFAULT_SVD, kernels.SVD_METHODS,
                         "Truncated SVD algorithm: exact (full SVD), gram (eigh of the smaller Gram matrix) or "
                         "randomized (subspace iteration, seeded by --seed); accuracy and speed in BUILD_NOTES.md.")
_CACHE_DIR = flags.DEFINE_string("cache_dir", None, "Subspace cache folder: base-weight SVDs are saved here and "
                                 "reused by later runs (default: $CROSSLORA_CACHE/subspaces or "
                                 "~/.cache/crosslora_jax/subspaces).")
_NO_CACHE = flags.DEFINE_bool("no_cache", False, "Neither read nor write the subspace cache (nor the XLA cache).")
_XLA_CACHE_DIR = flags.DEFINE_string("xla_cache_dir", None, "JAX's persistent compilation cache: compiled kernels "
                                     "are reused by later runs (default: $CROSSLORA_CACHE/xla or "
                                     "~/.cache/crosslora_jax/xla; empty disables it).")
_CHUNK_LAYERS = flags.DEFINE_integer("chunk_layers", 8, "Layers decomposed per batched call: bounds memory.")
_BLAS_THREADS = flags.DEFINE_integer("blas_threads", 1, "LAPACK/BLAS threads during the transfer (XLA's own "
                                     "threads are not affected); 0 leaves them as they are.")
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed (randomized SVD).")
_SOLVER = flags.DEFINE_enum("solver", "closed", ["closed", "lstsq"],
                            "Least-squares alignment: closed form U_s^T x, or jnp.linalg.lstsq.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float16", "bfloat16", "float32"],
                           "Output dtype (default: the adapter's own).")
_REPORT = flags.DEFINE_string("report", None, "Write the JSON report here (per target weight details).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing --output.")
_ORBAX_OUTPUT = flags.DEFINE_string(
    "orbax_output", None, "Also write each adapter as an Orbax checkpoint of a flax.nnx LoRA tree here "
    "(docs/flax.md); one subfolder per adapter when several. --overwrite applies to it too.")
_SKIP_UNSUPPORTED = flags.DEFINE_bool(
    "skip_unsupported", False, "Drop DoRA / embedding-LoRA / modules_to_save / lora_bias tensors "
    "(listed in the report) instead of refusing the adapter.")
_BASE_NAME = flags.DEFINE_string("base_model_name_or_path", None,
                                 "base_model_name_or_path to write (default: the target's name).")
_CALIBRATE = flags.DEFINE_bool("calibrate_norm", False, "Rescale each module so |dW_t|/|W_t| = |dW_s|/|W_s|.")
_ANCHOR_THRESHOLD = flags.DEFINE_float("anchor_threshold", 0.25, "--method anchored: skip modules whose "
                                       "predicted transferability (R2_in * R2_out) is below this.")
_ANCHOR_TOKENS = flags.DEFINE_integer("anchor_tokens", 2048, "--method anchored: shared tokens used as probes.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar on stderr.")
# Quiet by default (JAX logs backend probing at INFO); --verbosity=1 shows logs and tracebacks.
flags.FLAGS.set_default("verbosity", logging.WARNING)


def config_from_flags() -> engine.TransferConfig:
  return engine.TransferConfig(
      method=_METHOD.value, rank=_RANK.value, layer_map=_LAYER_MAP.value, svd=_SVD.value, seed=_SEED.value,
      solver=_SOLVER.value, dtype=_DTYPE.value, skip_unsupported=_SKIP_UNSUPPORTED.value,
      base_model_name=_BASE_NAME.value, calibrate_norm=_CALIBRATE.value, chunk_layers=_CHUNK_LAYERS.value,
      cache_dir=None if _NO_CACHE.value else str(_CACHE_DIR.value or cache.default_cache_dir()),
      blas_threads=_BLAS_THREADS.value or None,
      anchor=anchored.AnchorConfig(tokens=_ANCHOR_TOKENS.value, threshold=_ANCHOR_THRESHOLD.value))


def run() -> list[engine.TransferResult]:
  """Flags -> config -> engine.transfer -> atomic write. Raises CrossLoraError on bad input."""
  missing = [f"--{f.name}" for f in (_SOURCE, _TARGET, _OUTPUT) if not f.value]
  adapters = list(_ADAPTER.value) + (adapters_in(_ADAPTER_DIR.value) if _ADAPTER_DIR.value else [])
  if not adapters:
    missing.append("--adapter (or --adapter_dir)")
  if missing:
    raise CrossLoraError(f"command line: {', '.join(missing)} expected, got none. See --help.")
  config = config_from_flags()
  if not _NO_CACHE.value and _XLA_CACHE_DIR.value != "":
    cache.enable_compilation_cache(_XLA_CACHE_DIR.value or cache.default_xla_cache_dir())
  output = adapter_io.check_output_path(_OUTPUT.value, overwrite=_OVERWRITE.value)
  if _REPORT.value:
    adapter_io.check_output_path(_REPORT.value, overwrite=True, flag="--report")
  if _ORBAX_OUTPUT.value:
    adapter_io.check_output_path(_ORBAX_OUTPUT.value, overwrite=_OVERWRITE.value, flag="--orbax_output")
  names = [pathlib.Path(a).name for a in adapters]
  if len(set(names)) != len(names):
    raise CrossLoraError(f"--adapter/--adapter_dir: folders with distinct names expected (they name the output subfolders), "
                         f"got {names}. Rename or copy one of them.")
  progress = ProgressBar() if _PROGRESS.value else None
  results = engine.transfer_adapters(_SOURCE.value, _TARGET.value, adapters, config, progress=progress)
  target_arch = engine.open_base(_TARGET.value).arch
  with adapter_io.atomic_folder(output, overwrite=_OVERWRITE.value) as tmp:
    for name, result in zip(names, results):
      folder = tmp / name if len(results) > 1 else tmp
      folder.mkdir(exist_ok=True)
      dtype = config.dtype or result.report.output_dtype
      from crosslora_jax.formats import peft_format
      peft_format.write_adapter_files(result.adapter, folder, peft_format.DTYPES[dtype])
      adapter_io.verify_adapter_folder(folder, result.adapter, dtype, target_arch,
                               shown_as=output / name if len(results) > 1 else output)
    if _ORBAX_OUTPUT.value:  # inside the PEFT write, so a failure here leaves no --output either
      from crosslora_jax.formats import orbax_io
      from crosslora_jax.core import pytree_api
      orbax_io.save_adapters_as_nnx(_ORBAX_OUTPUT.value, {n: pytree_api.output_adapter(r, config)
                                                          for n, r in zip(names, results)}, overwrite=_OVERWRITE.value)
  if _REPORT.value:
    report_json = (results[0].report.to_json() if len(results) == 1 else
                   "[\n" + ",\n".join(r.report.to_json() for r in results) + "\n]")
    adapter_io.write_text_atomic(_REPORT.value, report_json + "\n")
  for result in results:
    print(result.report.text())
  print(f"wrote {output}")
  if _ORBAX_OUTPUT.value:
    print(f"wrote {_ORBAX_OUTPUT.value}")
  return results


def adapters_in(folder: str) -> list[str]:
  """Subfolders of ``folder`` holding adapter_config.json, sorted by name."""
  root = pathlib.Path(folder)
  if not root.is_dir():
    raise CrossLoraError(f"--adapter_dir: {root}: a folder of adapter folders expected, got "
                         f"{'a file' if root.exists() else 'nothing'}.")
  found = sorted(str(p) for p in root.iterdir() if (p / "adapter_config.json").is_file())
  if not found:
    raise CrossLoraError(f"--adapter_dir: {root}: subfolders with adapter_config.json expected, got none.")
  return found


def main(argv: list[str]) -> int:
  if len(argv) > 1:
    print(f"command line: flags only expected, got extra arguments {argv[1:]}. See --help.", file=sys.stderr)
    return 2
  # A plain `kill` (SIGTERM) unwinds like Ctrl-C, so temporary folders are removed.
  signal.signal(signal.SIGTERM, _terminate)
  try:
    run()
  except CrossLoraError as e:
    if logging.get_verbosity() >= logging.DEBUG:
      raise
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, but a bad flag is bad input: one line and exit status 2."""
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    print(f"error: command line: {e}. See --help.", file=sys.stderr)
    sys.exit(2)
  except SystemExit as e:  # absl exits 1 after printing --help; asking for help is no error
    help_flags = ("--help", "-h", "-?", "--helpshort", "--helpfull", "--helpxml")
    sys.exit(0 if any(a in help_flags for a in argv[1:]) else e.code)
  if not flags.FLAGS["verbosity"].present:  # set_default alone does not reach absl's handler
    logging.set_verbosity(logging.WARNING)
  return rest


def _terminate(signum: int, frame: Any) -> None:
  if _in_finalizer(frame):
    # An exception raised in a gc callback or __del__ is printed as "Exception ignored ...
    # Traceback" and dropped, so the run would go on (seen: SIGTERM inside JAX's
    # _xla_gc_callback). Deliver the signal again once out of it.
    threading.Timer(0.05, os.kill, (os.getpid(), signum)).start()
    return
  raise SystemExit(128 + signum)


def _in_finalizer(frame: Any) -> bool:
  """Whether ``frame`` runs inside a garbage-collector callback or a ``__del__``."""
  codes = {getattr(cb, "__code__", None) for cb in gc.callbacks}
  while frame is not None:
    if frame.f_code in codes or frame.f_code.co_name == "__del__":
      return True
    frame = frame.f_back
  return False


def entry_point() -> None:
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
