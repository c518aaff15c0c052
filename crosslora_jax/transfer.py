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
                --anchor_threshold and shrinks the rest (crosslora_jax/methods/anchored.py).

--calibrate_norm (any method) rescales each module so that |dW_t|/|W_t| equals the
source's |dW_s|/|W_s|; the report lists both ratios either way.

With several --adapter flags, --output gets one subfolder per adapter (named after the
adapter folder). Before any work every output and cache path is resolved and checked
against the inputs and each other (crosslora_jax/outputs.py: inputs are never written);
at the end the adapter folder, the report and the Orbax checkpoint are written beside
their paths, verified, and swapped in together, so a failure leaves none of them new.
Bad input exits with status 2 and one line naming the file, the key and the fix; an
unexpected failure exits 1 with one line; SIGINT/SIGTERM exit 130/143 (docs/refusals.md).

--source_model, --target_model and --adapter also take Hugging Face Hub ids,
owner/name[@revision], read from the local Hugging Face cache (HF_HUB_CACHE, HF_HOME)
and downloaded into it only when missing and HF_HUB_OFFLINE is not set. Every output
folder gets a README.md model card (base_model = the target, library_name: peft).
--plot FILE.png draws the per-layer diagnostics of the report (needs matplotlib).

--refine distill then trains each moved adapter on text the source base + its adapter
writes (crosslora_jax/refine/); held-back text picks the step that ships, or the
projection when no step beats it. The report gains a "refine" section, --plot its loss.

--orbax_output also writes each transferred adapter as an Orbax checkpoint of a flax.nnx
LoRA tree (crosslora_jax.formats.orbax_io; see docs/flax.md), under the same guarantees.
--coordinator_address/--num_processes/--process_id: one run on several hosts (core/distributed.py).
"""

from __future__ import annotations

import os
import signal
import sys


def _exit_at_once(signum: int, frame: object) -> None:
  os._exit(128 + signum)  # nothing is written yet: leave with the signal's status, no traceback


if __name__ == "__main__" or os.path.basename(sys.argv[0]) == "crosslora-transfer":
  # Until main() installs the unwinding handler, a signal while JAX loads just ends the process.
  for _signum in (signal.SIGINT, signal.SIGTERM):
    signal.signal(_signum, _exit_at_once)

import dataclasses  # noqa: E402  (after the early signal handlers: importing JAX takes seconds)
import gc  # noqa: E402
import math  # noqa: E402
import pathlib  # noqa: E402
import threading  # noqa: E402
from typing import Any  # noqa: E402

from absl import app, flags, logging  # noqa: E402

from crosslora_jax.core import cache, distributed, engine, kernels, planning  # noqa: E402
from crosslora_jax.errors import CrossLoraError, one_line  # noqa: E402
from crosslora_jax.formats import adapter_io, model_card  # noqa: E402
from crosslora_jax.progress import Progress, ProgressBar, enabled  # noqa: E402
from crosslora_jax import distributed_flags, hub, outputs, plot  # noqa: E402
from crosslora_jax.refine import batch as refine_batch, cli_flags as refine_flags  # noqa: E402

_DEFAULTS = engine.TransferConfig()  # every option's default is defined once, by the config dataclasses
_INT64 = dict(lower_bound=-(2**63), upper_bound=2**63 - 1)

_SOURCE = flags.DEFINE_string("source_model", None, "HF folder or Hub id (owner/name[@revision]) of the base model "
                               "the adapter was trained on.")
_TARGET = flags.DEFINE_string("target_model", None, "HF folder or Hub id (owner/name[@revision]) of the base model "
                               "to move the adapter to.")
_ADAPTER = flags.DEFINE_multi_string("adapter", [], "PEFT adapter folder or Hub id (owner/name[@revision]); "
                                     "repeat for several. Hub ids come from the Hugging Face cache (HF_HUB_CACHE / "
                                     "HF_HOME), downloaded into it only if missing and HF_HUB_OFFLINE is not set.")
_ADAPTER_DIR = flags.DEFINE_string("adapter_dir", None, "A folder of adapters: every subfolder holding "
                                   "adapter_config.json is transferred (with any --adapter).")
_OUTPUT = flags.DEFINE_string("output", None, "Output folder (one subfolder per adapter when several).")
_METHOD = flags.DEFINE_enum("method", _DEFAULTS.method, planning.METHODS, "Transfer method (see above).")
_RANK = flags.DEFINE_integer("rank", _DEFAULTS.rank, "Truncation rank r of the base-weight SVDs; clipped per weight "
                             "to min(r, m_s, n_s, m_t, n_t).", upper_bound=2**31 - 1)
_LAYER_MAP = flags.DEFINE_enum("layer_map", _DEFAULTS.layer_map, planning.LAYER_MAPS,
                               "identity: layer i -> i (paper); depth: by relative depth; "
                               "auto: identity when layer counts match, else depth.")
_SVD = flags.DEFINE_enum("svd", _DEFAULTS.svd, kernels.SVD_METHODS,
                         "Truncated SVD algorithm: exact (full SVD), gram (eigh of the smaller Gram matrix), "
                         "randomized (subspace iteration seeded by --seed, 64 oversamples and 6 power iterations: "
                         "the setting measured to keep the tail energy within 1.01x the optimum), krylov "
                         "(randomized block Krylov seeded by --seed: rank + 704 columns from 5 block steps, the "
                         "setting measured to keep the same bound) or auto (per weight shape: whichever of gram, "
                         "randomized and krylov does the least arithmetic; the report says which). Accuracy and "
                         "speed in results/speed.md.")
_CACHE_DIR = flags.DEFINE_string("cache_dir", None, "Subspace cache folder: base-weight SVDs are saved here and "
                                 "reused by later runs (default: $CROSSLORA_CACHE/subspaces or "
                                 "~/.cache/crosslora_jax/subspaces).")
_NO_CACHE = flags.DEFINE_bool("no_cache", False, "Neither read nor write the subspace, XLA or --refine corpus caches.")
_XLA_CACHE_DIR = flags.DEFINE_string("xla_cache_dir", None, "JAX's persistent compilation cache: compiled kernels "
                                     "are reused by later runs (default: $CROSSLORA_CACHE/xla or "
                                     "~/.cache/crosslora_jax/xla; empty disables it).")
_CHUNK_LAYERS = flags.DEFINE_integer("chunk_layers", _DEFAULTS.chunk_layers,
                                     "Layers decomposed per batched call: bounds memory.", upper_bound=2**31 - 1)
_BLAS_THREADS = flags.DEFINE_integer("blas_threads", _DEFAULTS.blas_threads or 0, "LAPACK/BLAS threads during the "
                                     "transfer (XLA's own threads are not affected); 0 leaves them as they are.",
                                     lower_bound=0, upper_bound=4096)
_SEED = flags.DEFINE_integer("seed", _DEFAULTS.seed, "PRNG seed (randomized SVD).", **_INT64)
_SOLVER = flags.DEFINE_enum("solver", _DEFAULTS.solver, ["closed", "lstsq"],
                            "Least-squares alignment: closed form U_s^T x, or jnp.linalg.lstsq.")
_DTYPE = flags.DEFINE_enum("dtype", _DEFAULTS.dtype, ["float16", "bfloat16", "float32"],
                           "Output dtype (default: the adapter's own).")
_REPORT = flags.DEFINE_string("report", None, "Write the JSON report here (per target weight details).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace existing outputs (--output, --report, --orbax_output).")
_ORBAX_OUTPUT = flags.DEFINE_string(
    "orbax_output", None, "Also write each adapter as an Orbax checkpoint of a flax.nnx LoRA tree here "
    "(docs/flax.md); one subfolder per adapter when several. --overwrite applies to it too.")
_SKIP_UNSUPPORTED = flags.DEFINE_bool(
    "skip_unsupported", _DEFAULTS.skip_unsupported, "Drop DoRA / embedding-LoRA / modules_to_save / lora_bias tensors "
    "(listed in the report) instead of refusing the adapter.")
_BASE_NAME = flags.DEFINE_string("base_model_name_or_path", _DEFAULTS.base_model_name,
                                 "base_model_name_or_path to write (default: the target's name).")
_CALIBRATE = flags.DEFINE_bool("calibrate_norm", _DEFAULTS.calibrate_norm,
                               "Rescale each module so |dW_t|/|W_t| = |dW_s|/|W_s|.")
_ANCHOR_THRESHOLD = flags.DEFINE_float("anchor_threshold", _DEFAULTS.anchor.threshold, "--method anchored: skip "
                                       "modules whose predicted transferability (R2_in * R2_out) is below this.")
_ANCHOR_TOKENS = flags.DEFINE_integer("anchor_tokens", _DEFAULTS.anchor.tokens,
                                      "--method anchored: shared tokens used as probes.", upper_bound=2**31 - 1)
_PROGRESS = flags.DEFINE_bool("progress", True, "Progress bars on stderr (tqdm): shown on a terminal by default; "
                              "--progress shows them anyway (logs), --noprogress never.")
_PLOT = flags.DEFINE_string("plot", None, "Draw the per-layer diagnostics (energy captured, overlap, relative update, "
                            "skipped layers) into this .png file (needs matplotlib: pip install 'crosslora_jax[plot]').")
for _module in (refine_flags, distributed_flags):  # their flags (--refine*, --num_processes, ...) show in --help
  flags.adopt_module_key_flags(_module)
# Quiet by default (JAX logs backend probing at INFO); --verbosity=1 shows logs and tracebacks.
flags.FLAGS.set_default("verbosity", logging.WARNING)


def config_from_flags(cache_dir: pathlib.Path | None = None) -> engine.TransferConfig:
  if not math.isfinite(_ANCHOR_THRESHOLD.value):
    raise CrossLoraError(f"--anchor_threshold: a finite number expected, got {_ANCHOR_THRESHOLD.value}.")
  return engine.TransferConfig(
      method=_METHOD.value, rank=_RANK.value, layer_map=_LAYER_MAP.value, svd=_SVD.value, seed=_SEED.value,
      solver=_SOLVER.value, dtype=_DTYPE.value, skip_unsupported=_SKIP_UNSUPPORTED.value,
      base_model_name=_BASE_NAME.value, calibrate_norm=_CALIBRATE.value, chunk_layers=_CHUNK_LAYERS.value,
      cache_dir=None if cache_dir is None else str(cache_dir), blas_threads=_BLAS_THREADS.value or None,
      anchor=dataclasses.replace(_DEFAULTS.anchor, tokens=_ANCHOR_TOKENS.value, threshold=_ANCHOR_THRESHOLD.value))


def run() -> list[engine.TransferResult]:
  """Flags -> checked paths and config -> engine.transfer_adapters -> all outputs committed together.

  Raises CrossLoraError on bad input, before any work where it can be known then.
  """
  distributed_flags.initialize()
  adapters, names = _adapters_from_flags()
  refine_config = refine_flags.config_from_flags() if refine_flags.enabled() else None
  plan = _plan_paths(adapters)
  config = config_from_flags(plan.cache_dir)
  if refine_config is not None:
    refine_config = refine_flags.with_cache(refine_config, plan.refine_cache_dir)
    refine_flags.check_inputs(refine_config, hub.resolve_folder(_SOURCE.value), hub.resolve_folder(_TARGET.value))
  if plan.xla_cache_dir is not None:
    cache.enable_compilation_cache(plan.xla_cache_dir)
  if _PLOT.value:
    plot.check_plot_path(_PLOT.value)
  shown: Progress = ("always" if flags.FLAGS["progress"].present else True) if _PROGRESS.value else False
  progress = ProgressBar(enabled=enabled(shown)) if shown else None
  if not _PROGRESS.value:
    hub.hide_download_bars()
  results = engine.transfer_adapters(_SOURCE.value, _TARGET.value, adapters, config, progress=progress)
  if refine_config is not None:
    results = refine_batch.refine_results(_SOURCE.value, _TARGET.value, adapters, results, refine_config,
                                          from_projection=refine_flags.INIT.value == "projection",
                                          skip_unsupported=config.skip_unsupported, progress=shown)
  extra = refine_batch.plot_panels([r.report for r in results]) if refine_config is not None else ()
  picture = plot.render_png([r.report for r in results], extra=extra) if _PLOT.value else None  # before any writes
  if distributed.is_writer():
    _commit(plan, names, results, config, cards=[_model_card(r, a) for r, a in zip(results, adapters)], picture=picture)
    print("\n".join(r.report.text() for r in results))
    for written in filter(None, (_OUTPUT.value, _ORBAX_OUTPUT.value, _PLOT.value)):
      print(f"wrote {one_line(written)}")  # a path may hold a newline: one line each, here too
  distributed.finish()
  return results


def _model_card(result: engine.TransferResult, adapter: str) -> str:
  """README.md of one output: Hub ids as the user gave them (with @revision), folders as the report names them."""
  given = lambda text, fallback: text if hub.is_hub_id(text) else fallback
  report = result.report
  return model_card.render(report, base_model=result.adapter.config["base_model_name_or_path"],
                           source_adapter=given(adapter, report.adapter), source_model=given(_SOURCE.value, report.source),
                           target_model=given(_TARGET.value, report.target))


def _adapters_from_flags() -> tuple[list[str], list[str]]:
  """The adapter folders to move and the output subfolder name of each; missing flags refused."""
  missing = [f"--{f.name}" for f in (_SOURCE, _TARGET, _OUTPUT) if not f.value]
  adapters = list(_ADAPTER.value) + (adapters_in(_ADAPTER_DIR.value) if _ADAPTER_DIR.value else [])
  if not adapters:
    missing.append("--adapter (or --adapter_dir)")
  if missing:
    raise CrossLoraError(f"command line: {', '.join(missing)} expected, got none. See --help.")
  names = [hub.short_name(a) if hub.is_hub_id(a) else pathlib.Path(os.path.realpath(a)).name for a in adapters]
  if len(set(names)) != len(names):
    raise CrossLoraError(f"--adapter/--adapter_dir: folders with distinct names expected (they name the output subfolders), "
                         f"got {names}. Rename or copy one of them.")
  return adapters, names


class _Plan:
  """Checked output paths (resolved entries) and usable cache folders of one run."""

  def __init__(self, planned: dict[str, outputs.Planned], cache_dir: pathlib.Path | None,
               xla_cache_dir: pathlib.Path | None, refine_cache_dir: pathlib.Path | None = None):
    self.output = planned["--output"].entry
    self.report = planned["--report"].entry if "--report" in planned else None
    self.orbax = planned["--orbax_output"].entry if "--orbax_output" in planned else None
    self.cache_dir, self.xla_cache_dir, self.refine_cache_dir = cache_dir, xla_cache_dir, refine_cache_dir


def _plan_paths(adapters: list[str]) -> _Plan:
  """Every output and cache checked against the inputs and each other before any work (outputs.py)."""
  inputs = [outputs.Planned.of("--source_model", _SOURCE.value), outputs.Planned.of("--target_model", _TARGET.value)]
  inputs += [outputs.Planned.of("--adapter", a) for a in adapters]
  if _ADAPTER_DIR.value:
    inputs.append(outputs.Planned.of("--adapter_dir", _ADAPTER_DIR.value))
  inputs += refine_flags.planned_inputs()
  kinds = {"--output": "folder", "--report": "file", "--orbax_output": "folder"}
  planned = {flag: outputs.Planned.of(flag, value) for flag, value in
             (("--output", _OUTPUT.value), ("--report", _REPORT.value), ("--orbax_output", _ORBAX_OUTPUT.value))
             if value}
  caches = {}
  if not _NO_CACHE.value:
    caches["--cache_dir"] = (outputs.Planned.of("--cache_dir", _CACHE_DIR.value or cache.default_cache_dir()),
                             bool(_CACHE_DIR.value))
    if _XLA_CACHE_DIR.value != "":
      caches["--xla_cache_dir"] = (outputs.Planned.of("--xla_cache_dir",
                                                      _XLA_CACHE_DIR.value or cache.default_xla_cache_dir()),
                                   bool(_XLA_CACHE_DIR.value))
    caches.update(refine_flags.planned_caches())
  outputs.check_disjoint(list(planned.values()), inputs, [c for c, _ in caches.values()])
  outputs.check_outputs({flag: (p, kinds[flag]) for flag, p in planned.items()}, overwrite=_OVERWRITE.value)
  usable = {flag: outputs.check_cache_folder(c, explicit=explicit) for flag, (c, explicit) in caches.items()}
  return _Plan(planned, usable.get("--cache_dir"), usable.get("--xla_cache_dir"), usable.get("--refine_cache_dir"))


def _commit(plan: _Plan, names: list[str], results: list[engine.TransferResult],
            config: engine.TransferConfig, *, cards: list[str], picture: bytes | None) -> None:
  """Stages and verifies the adapter folder(s), the Orbax checkpoint, the report and the plot, then swaps all in."""
  target_arch = engine.open_base(_TARGET.value).arch
  by_name = dict(zip(names, results))
  with adapter_io.transaction():
    adapter_io.save_results({n: r.adapter for n, r in by_name.items()}, plan.output, overwrite=_OVERWRITE.value,
                            dtype={n: adapter_io.output_dtype(r, config.dtype) for n, r in by_name.items()},
                            target=target_arch, readmes=dict(zip(names, cards)))
    if plan.orbax is not None:
      from crosslora_jax.core import pytree_api
      from crosslora_jax.formats import orbax_io
      orbax_io.save_adapters_as_nnx(plan.orbax, {n: pytree_api.output_adapter(r, config) for n, r in by_name.items()},
                                    overwrite=_OVERWRITE.value)
    if plan.report is not None:
      report_json = (results[0].report.to_json() if len(results) == 1 else
                     "[\n" + ",\n".join(r.report.to_json() for r in results) + "\n]")
      adapter_io.write_text_atomic(plan.report, report_json + "\n", overwrite=_OVERWRITE.value)
    if picture is not None:
      plot.write_png(_PLOT.value, picture)


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
  """Runs the transfer; whatever goes wrong, stderr gets exactly one ``error:`` line.

  Status 0: done; 2: bad input (CrossLoraError) or an operating-system error on a path
  (disk, permissions); 1: an unexpected failure (a bug: please report it);
  128 + signal number: SIGINT (130) or SIGTERM (143), with nothing half-written.
  ``--verbosity=1`` re-raises, so the traceback shows.
  """
  if len(argv) > 1:
    print(f"error: command line: flags only expected, got extra arguments {one_line(str(argv[1:]))}. See --help.",
          file=sys.stderr)
    return 2
  # A plain `kill` (SIGTERM) and Ctrl-C unwind the same way, so temporary outputs are removed.
  previous = {signum: signal.signal(signum, _terminate) for signum in (signal.SIGINT, signal.SIGTERM)}
  try:
    return _run_reporting_one_line()
  finally:
    for signum, handler in previous.items():
      signal.signal(signum, handler)
    _stopping.clear()


def _run_reporting_one_line() -> int:
  try:
    run()
  except Interrupted as e:
    return _fail(e, f"interrupted by {signal.Signals(e.signum).name}", e.code)
  except KeyboardInterrupt as e:  # raised by code that installs its own SIGINT handling
    return _fail(e, "interrupted by SIGINT", 128 + signal.SIGINT)
  except CrossLoraError as e:
    return _fail(e, str(e), 2)
  except OSError as e:
    where = f"{e.filename}: " if e.filename else ""
    return _fail(e, f"{where}the operation expected to succeed, got {type(e).__name__} ({e.strerror or e}). "
                    "Check the path, its permissions and free space.", 2)
  except Exception as e:  # noqa: BLE001  (the promise is one line whatever the failure)
    return _fail(e, f"unexpected {type(e).__name__}: {e}. This is a bug: please report it with --verbosity=1 "
                    "output.", 1)
  return 0


def _fail(e: BaseException, message: str, status: int) -> int:
  distributed.fail_everywhere(message, status)  # several processes: every one exits with this line and status
  if logging.get_verbosity() >= logging.DEBUG and not isinstance(e, Interrupted):
    raise e
  print(f"error: {one_line(message)}", file=sys.stderr)
  return status


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, but a bad flag is bad input: one line and exit status 2."""
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    print(f"error: command line: {one_line(str(e))}. See --help.", file=sys.stderr)
    sys.exit(2)
  except SystemExit as e:  # absl exits 1 after printing --help; asking for help is no error
    help_flags = ("--help", "-h", "-?", "--helpshort", "--helpfull", "--helpxml")
    sys.exit(0 if any(a in help_flags for a in argv[1:]) else e.code)
  if not flags.FLAGS["verbosity"].present:  # set_default alone does not reach absl's handler
    logging.set_verbosity(logging.WARNING)
  return rest


class Interrupted(SystemExit):
  """SIGINT/SIGTERM, raised where the main thread is: a SystemExit, so ``except Exception`` lets it pass."""

  def __init__(self, signum: int):
    super().__init__(128 + signum)
    self.signum = signum


_stopping: list[int] = []  # the signal being handled: a second one must not interrupt the clean-up


def _terminate(signum: int, frame: Any) -> None:
  if _stopping:
    return
  if _in_finalizer(frame):
    # An exception raised in a gc callback or __del__ is printed as "Exception ignored ...
    # Traceback" and dropped, so the run would go on (seen: SIGTERM inside JAX's
    # _xla_gc_callback). Deliver the signal again once out of it.
    threading.Timer(0.05, os.kill, (os.getpid(), signum)).start()
    return
  _stopping.append(signum)
  raise Interrupted(signum)


def _in_finalizer(frame: Any) -> bool:
  """Whether ``frame`` runs inside a garbage-collector callback or a ``__del__``."""
  codes = {getattr(cb, "__code__", None) for cb in gc.callbacks}
  while frame is not None:
    if frame.f_code in codes or frame.f_code.co_name == "__del__":
      return True
    frame = frame.f_back
  return False


def entry_point() -> None:
  """The ``crosslora-transfer`` script and ``python -m crosslora_jax.transfer``."""
  try:
    app.run(main, flags_parser=_parse_flags)
  except SystemExit as e:
    status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
  else:
    status = 0
  # Every output is settled (all new or none, fsynced): leave without the interpreter's
  # shutdown, which restores the default signal actions (a SIGTERM then kills the process
  # after its work is done) and tears down under XLA's still-running threads.
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(status)


if __name__ == "__main__":
  entry_point()
