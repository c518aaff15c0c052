"""The transfer pipeline, top-down: open → plan → project → refine → results.

:func:`transfer_adapters` is the library entry point the CLI calls:

1. **open** (:func:`open_inputs`): the two bases (lazy safetensors readers) and the adapters;
2. **plan** (:func:`plan_transfers`): which source weight feeds which target weight, per
   adapter (:mod:`crosslora_jax.core.planning`), before any weight is read;
3. **project** (:func:`project_all`): module by module and, within a module,
   ``chunk_layers`` target layers at a time: decompose (or load from the cache) the
   chunk's base weights, project every adapter through them with the method's batched
   projection (:mod:`crosslora_jax.methods`), drop them. Peak memory is one chunk of
   weights plus the outputs;
4. **refine** (:data:`RefineStage`): a whole-model stage over the projected factors; none
   by default (:func:`keep_projected`);
5. **results** (:func:`build_results`): one PEFT adapter (float32) and one report per
   adapter. Writing and verifying them is :mod:`crosslora_jax.formats.adapter_io`
   (``TransferResult.save``; the CLI writes the same way).

Base subspaces are computed once per (model, module, layer) and shared by every
adapter of the run, and with ``cache_dir`` by every later run.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging

from crosslora_jax import methods
from crosslora_jax.core import calibration, chunking, distributed, kernels, planning, sharding
from crosslora_jax.core.sharding import blas_threads
from crosslora_jax.core.cache import SubspaceCache
from crosslora_jax.core.chunking import (ChunkSubspaces, even_chunks, module_chunks, prefetch_chunk,
                                         cached_overlaps, record_overlaps, timing, without_overlap)
from crosslora_jax.core.report import Report
from crosslora_jax.core.subspaces import Subspaces, WeightNorms, get_together, module_index
from crosslora_jax.errors import CrossLoraError
from crosslora_jax.formats import peft_format
from crosslora_jax.formats.checkpoint import BaseWeights, open_base
from crosslora_jax.methods import anchored

Progress = Callable[[str, int, int], None]  # (label, done, total)
PathLike = str | os.PathLike[str]


@dataclasses.dataclass(frozen=True)
class TransferConfig:
  """Options of one transfer run (the CLI's flags, validated)."""

  method: str = "cross_lora"
  rank: int = 320
  layer_map: str = "auto"
  svd: str = kernels.DEFAULT_SVD
  seed: int = 0
  n_oversamples: int = kernels.DEFAULT_OVERSAMPLES  # randomized SVD: columns beyond the rank
  n_power_iter: int = kernels.DEFAULT_POWER_ITER  # randomized SVD: multiplications by WᵀW
  solver: str = "closed"
  dtype: str | None = None  # output dtype; None keeps the adapter's
  skip_unsupported: bool = False
  chunk_layers: int = 8  # layers stacked per jitted call: bounds memory
  cache_dir: str | None = None  # subspace cache folder (cache.default_cache_dir() in the CLI); None: no cache
  shard_layers: bool = True  # with several devices, shard each SVD batch's layer axis over them
  blas_threads: int | None = 1  # LAPACK/BLAS threads during the run (threadpoolctl); None leaves them as they are
  base_model_name: str | None = None  # base_model_name_or_path; default: the target's name
  calibrate_norm: bool = False  # rescale each module so |dW_t|/|W_t| = |dW_s|/|W_s| (any method)
  anchor: anchored.AnchorConfig = dataclasses.field(default_factory=anchored.AnchorConfig)  # method anchored

  def __post_init__(self):
    problems = []
    if self.method not in methods.REGISTRY:
      problems.append(f"--method: one of {', '.join(methods.REGISTRY)} expected, got {self.method!r}")
    if not isinstance(self.rank, int) or self.rank <= 0:
      problems.append(f"--rank: a positive integer expected, got {self.rank!r}")
    if self.layer_map not in planning.LAYER_MAPS:
      problems.append(f"--layer_map: one of {', '.join(planning.LAYER_MAPS)} expected, got {self.layer_map!r}")
    if self.svd not in kernels.SVD_METHODS:
      problems.append(f"--svd: one of {', '.join(kernels.SVD_METHODS)} expected, got {self.svd!r}")
    if self.solver not in ("closed", "lstsq"):
      problems.append(f"--solver: closed or lstsq expected, got {self.solver!r}")
    if self.dtype is not None and self.dtype not in peft_format.DTYPES:
      problems.append(f"--dtype: one of {', '.join(peft_format.DTYPES)} expected, got {self.dtype!r}")
    if not isinstance(self.anchor, anchored.AnchorConfig):
      problems.append(f"anchor: an anchored.AnchorConfig expected, got {type(self.anchor).__name__}")
    if not isinstance(self.n_oversamples, int) or self.n_oversamples < 0:
      problems.append(f"n_oversamples: an integer >= 0 expected, got {self.n_oversamples!r}")
    if not isinstance(self.n_power_iter, int) or self.n_power_iter < 0:
      problems.append(f"n_power_iter: an integer >= 0 expected, got {self.n_power_iter!r}")
    if self.blas_threads is not None and (not isinstance(self.blas_threads, int) or self.blas_threads <= 0):
      problems.append(f"blas_threads: a positive integer or None expected, got {self.blas_threads!r}")
    if self.chunk_layers <= 0:
      problems.append(f"chunk_layers: a positive integer expected, got {self.chunk_layers!r}")
    if problems:
      raise CrossLoraError("; ".join(problems) + ".")


@dataclasses.dataclass
class TransferResult:
  """One transferred adapter and its report."""

  adapter: peft_format.PeftAdapter  # float32 factors, config for the target
  report: Report

  def save(self, folder: PathLike, dtype: Any | None = None) -> None:
    from crosslora_jax.formats import adapter_io
    adapter_io.save_result(self, folder, dtype=dtype)  # the CLI's save path and dtype rule


@dataclasses.dataclass
class AdapterOutput:
  """One adapter's projected factors and report entries, filled module by module."""

  factors: dict[tuple[int, str], tuple[np.ndarray, np.ndarray, float]] = dataclasses.field(default_factory=dict)
  entries: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # one per target weight


@dataclasses.dataclass
class TransferRun:
  """What one run holds while it projects: inputs, plans, subspaces and the outputs so far."""

  config: TransferConfig
  method: methods.Method
  source: BaseWeights
  target: BaseWeights
  adapters: list[peft_format.PeftAdapter]
  plans: list[planning.Plan]
  subspaces_source: Subspaces
  subspaces_target: Subspaces
  norms_source: WeightNorms
  norms_target: WeightNorms
  context: Any  # what the method's prepare() built (anchored: the Anchors), else None
  outputs: list[AdapterOutput]
  cache: SubspaceCache | None = None
  seconds_project: float = 0.0  # the method's batched projections


# The refine stage: called once after projection with the whole run; it may replace
# run.outputs[n].factors (same keys and shapes). The distillation refine plugs in here.
RefineStage = Callable[[TransferRun], None]


def keep_projected(run: TransferRun) -> None:
  """The default refine stage: the projected factors are the result."""
  del run


def transfer_adapters(source: PathLike | BaseWeights, target: PathLike | BaseWeights,
                      adapters: Sequence[PathLike | peft_format.PeftAdapter], config: TransferConfig = TransferConfig(),
                      *, progress: Progress | None = None, refine: RefineStage | None = None) -> list[TransferResult]:
  """Moves each adapter from ``source`` to ``target``; bases are decomposed once for all.

  Paths are read lazily; already-loaded ``BaseWeights``/``PeftAdapter`` objects are used as
  they are. Returns float32 adapters (cast on save) and one report per adapter. Runs with
  BLAS threads limited to ``config.blas_threads``.
  """
  with blas_threads(config.blas_threads):
    t_start = time.perf_counter()
    source_w, target_w, loaded = open_inputs(source, target, adapters, config)
    plans = plan_transfers(loaded, source_w, target_w, config)
    run = start_run(source_w, target_w, loaded, plans, config)
    project_all(run, progress)
    (refine or keep_projected)(run)
    seconds = time.perf_counter() - t_start
    if run.cache is not None:
      logging.info("subspace cache %s", run.cache.stats())
    return build_results(run, seconds=seconds)


def transfer_adapter(source, target, adapter, config: TransferConfig = TransferConfig(), **kwargs) -> TransferResult:
  """One adapter: see :func:`transfer_adapters`."""
  return transfer_adapters(source, target, [adapter], config, **kwargs)[0]


def open_inputs(source: PathLike | BaseWeights, target: PathLike | BaseWeights,
                adapters: Sequence[PathLike | peft_format.PeftAdapter], config: TransferConfig):
  """(source BaseWeights, target BaseWeights, PeftAdapters): folders opened lazily, objects kept."""
  source_w, target_w = open_base(source), open_base(target)
  loaded = [a if isinstance(a, peft_format.PeftAdapter)
            else peft_format.read_adapter(a, skip_unsupported=config.skip_unsupported) for a in adapters]
  return source_w, target_w, loaded


def plan_transfers(loaded: Sequence[peft_format.PeftAdapter], source_w: BaseWeights, target_w: BaseWeights,
                   config: TransferConfig) -> list[planning.Plan]:
  """One plan per adapter: canonical factors, layer map, work items by module, skips."""
  plans = []
  for adapter in loaded:
    factors = planning.canonical_factors(adapter, source_w.arch, where=str(adapter.path or adapter.name))
    plans.append(planning.make_plan(factors, source_w.arch, target_w.arch, method=config.method,
                                    rank=config.rank, layer_map_kind=config.layer_map))
  return plans


def start_run(source_w: BaseWeights, target_w: BaseWeights, loaded: list[peft_format.PeftAdapter],
              plans: list[planning.Plan], config: TransferConfig) -> TransferRun:
  """The run's shared state: the subspace cache, the device mesh, the method's context."""
  method = methods.get(config.method)
  cache = SubspaceCache(config.cache_dir) if config.cache_dir is not None else None
  if cache is not None and distributed.active():  # every process must take the same hits (SPMD in step)
    cache = distributed.AgreedCache(cache)
  mesh = sharding.layer_mesh() if config.shard_layers else None
  subs_s = Subspaces(source_w, config, cache=cache, mesh=mesh)
  subs_t = Subspaces(target_w, config, cache=cache, mesh=mesh)
  context = method.prepare(source_w, target_w, config) if method.prepare is not None else None
  return TransferRun(
      config=config, method=method, source=source_w, target=target_w, adapters=loaded, plans=plans,
      subspaces_source=subs_s, subspaces_target=subs_t,
      norms_source=WeightNorms(source_w, subs_s if method.needs_source_subspaces else None),
      norms_target=WeightNorms(target_w, subs_t if method.needs_target_subspaces else None),
      context=context, outputs=[AdapterOutput() for _ in loaded], cache=cache)


def project_all(run: TransferRun, progress: Progress | None) -> None:
  """Projects every module of every plan, streaming chunks of layers."""
  modules = sorted({m for p in run.plans for m in p.by_module}, key=module_index)
  total = sum(_layers_to_decompose(run, module) for module in modules)
  done = 0

  def tick(n: int) -> None:
    nonlocal done
    done += n
    if progress is not None:
      progress("decomposing base weights", done, total)

  for i, module in enumerate(modules):
    following = modules[i + 1] if i + 1 < len(modules) else None
    project_module(run, module, tick, read_next=(lambda m=following: prefetch_chunk(run, m, 0)) if following else None)


def _layers_to_decompose(run: TransferRun, module: str) -> int:
  """Base weights of ``module`` the run decomposes (or loads): the progress bar's share."""
  items = [w for p in run.plans for w in p.by_module.get(module, [])]
  n_source = len({w.source_layer for w in items}) if run.method.needs_source_subspaces else 0
  n_target = len({w.target_layer for w in items}) if run.method.needs_target_subspaces else 0
  return n_source + n_target


def project_module(run: TransferRun, module: str, tick: Callable[[int], None],
                   read_next: Callable[[], None] | None = None) -> None:
  """One module: target layers in near-equal chunks; a source subspace is kept until its last chunk.

  While a chunk decomposes, the next chunk's weights (at the last chunk: ``read_next``,
  the next module's first) are read on a background thread.
  """
  rank, chunks, items_per_adapter = module_chunks(run, module)
  chunk_size = max(len(c) for c in chunks)  # every SVD batch of the module has this many layers
  last_use: dict[int, int] = {}  # source layer -> last chunk that needs it
  for c, chunk in enumerate(chunks):
    for items in items_per_adapter:
      for w in items:
        if w.target_layer in chunk:
          last_use[w.source_layer] = c
  for c, chunk in enumerate(chunks):
    if c + 1 < len(chunks):
      prefetch_chunk(run, module, c + 1)
    elif read_next is not None:
      read_next()
    in_chunk = set(chunk)
    chunk_items = [[w for w in items if w.target_layer in in_chunk] for items in items_per_adapter]
    project_chunk(run, module, rank, chunk, chunk_items, chunk_size, tick)
    run.subspaces_target.release(module)
    run.subspaces_source.release(module, keep={l for l, last in last_use.items() if last > c})


def project_chunk(run: TransferRun, module: str, rank: int, chunk: list[int],
                  chunk_items: list[list[planning.WorkItem]], chunk_size: int, tick: Callable[[int], None]) -> None:
  """Decomposes one chunk's weights, then projects each group of adapters in one call."""
  src_layers = sorted({w.source_layer for items in chunk_items for w in items})
  requests = {}  # both models' missing layers go through one SVD program per batch
  if run.method.needs_target_subspaces:
    requests["target"] = (run.subspaces_target, chunk)
  if run.method.needs_source_subspaces:
    requests["source"] = (run.subspaces_source, src_layers)
  got = dict(zip(requests, get_together(list(requests.values()), module, rank, batch_layers=chunk_size,
                                        progress=tick))) if requests else {}
  sub_s, sub_t = got.get("source"), got.get("target")
  subs = ChunkSubspaces(sub_s, sub_t, {l: i for i, l in enumerate(src_layers)},
                        {l: i for i, l in enumerate(chunk)}, {})
  for (lora_rank, layout), members in group_by_layout(chunk_items).items():
    project_group(run, module, rank, subs, lora_rank, layout, members)


Layout = chunking.Layout


def group_by_layout(chunk_items: list[list[planning.WorkItem]]
                    ) -> dict[tuple[int, Layout], list[tuple[int, list[planning.WorkItem]]]]:
  """Adapters whose items have one LoRA rank and one layer layout go in one call.

  Returns (LoRA rank, layout) -> [(adapter index, its items in layout order), ...].
  """
  groups: dict[tuple[int, Layout], list[tuple[int, list[planning.WorkItem]]]] = {}
  for n, items in enumerate(chunk_items):
    by_rank: dict[int, list[planning.WorkItem]] = {}
    for w in items:
      by_rank.setdefault(w.factors.a_ri.shape[0], []).append(w)
    for lora_rank, same_rank in by_rank.items():
      layout = tuple((w.source_layer, w.target_layer) for w in same_rank)
      groups.setdefault((lora_rank, layout), []).append((n, same_rank))
  return groups


def project_group(run: TransferRun, module: str, rank: int, subs: ChunkSubspaces, lora_rank: int, layout: Layout,
                  members: list[tuple[int, list[planning.WorkItem]]]) -> None:
  """One batched projection of N adapters x L layers; then calibration and report entries per adapter."""
  t0 = time.perf_counter()
  sub_s, sub_t = subs.for_layout(layout)
  batch = methods.ProjectionBatch(
      module=module,
      a_nlri=np.stack([np.stack([np.asarray(w.factors.a_ri, np.float32) for w in items]) for _, items in members]),
      b_nlor=np.stack([np.stack([np.asarray(w.factors.b_or, np.float32) for w in items]) for _, items in members]),
      sub_source=sub_s, sub_target=sub_t, target_shape=run.target.arch.shape(module),
      items=[items for _, items in members], solver=run.config.solver, context=run.context,
      overlaps_wanted=cached_overlaps(run, module, rank, subs, layout))
  proj, extras = run.method.project(batch)
  proj = jax.tree.map(np.asarray, proj)
  extras = extras or [[{} for _ in layout] for _ in members]
  record_overlaps(run, module, rank, subs, layout, extras[0])
  run.seconds_project += time.perf_counter() - t0
  seconds = (time.perf_counter() - t0) / len(members)
  for row, (n, items) in enumerate(members):
    adapter_proj = kernels.Projected(proj.a_ri[row], proj.b_or[row], proj.norm_ratio[row])
    if run.config.calibrate_norm:  # rescales B; reads the base weights again (opt-in)
      adapter_proj, calib = calibration.calibrate(run.source, run.target, module, items, adapter_proj)
    else:
      calib = calibration.report_relative_updates(
          items, adapter_proj, module, lambda m, l: run.norms_source(m, l, rank),
          lambda m, l: run.norms_target(m, l, rank))
    for i, w in enumerate(items):
      run.outputs[n].factors[(w.target_layer, module)] = (adapter_proj.a_ri[i], adapter_proj.b_or[i],
                                                          w.factors.scaling)
      run.outputs[n].entries.append({
          **_report_entry(run, n, w, subs, lora_rank, float(adapter_proj.norm_ratio[i])),
          **_svd_used(run, module, rank), "seconds": seconds / len(items), **without_overlap(extras[row][i]),
          **calib[i]})


def _report_entry(run: TransferRun, n: int, w: planning.WorkItem, subs: ChunkSubspaces, lora_rank: int,
                  norm_ratio: float) -> dict[str, Any]:
  """The report fields of one target weight, in the report's order, up to its timing."""
  arch_s, arch_t = run.source.arch, run.target.arch
  return {
      "target_key": arch_t.module_path(w.target_layer, arch_t.stored_for(w.module)[0]),
      "module": w.module,
      "target_layer": w.target_layer,
      "source_key": w.factors.module_path,
      "source_layer": w.source_layer,
      "source_shape": list(arch_s.shape(w.module)),
      "target_shape": list(arch_t.shape(w.module)),
      "lora_rank": lora_rank,
      "rank_used": run.plans[n].rank[w.module] if run.method.uses_subspaces else None,
      "energy_source": None if subs.source is None else float(subs.source.energy[subs.source_row[w.source_layer]]),
      "energy_target": None if subs.target is None else float(subs.target.energy[subs.target_row[w.target_layer]]),
      "norm_ratio": norm_ratio,
      "overlap": subs.overlap.get((w.source_layer, w.target_layer)) if subs.source is not None else None,
  }


def _svd_used(run: TransferRun, module: str, rank: int) -> dict[str, str | None]:
  """The SVD method each model's ``module`` weights went through (``--svd auto`` resolved), None if unused."""
  return {"svd_source": run.subspaces_source.svd_method(module, rank) if run.method.needs_source_subspaces else None,
          "svd_target": run.subspaces_target.svd_method(module, rank) if run.method.needs_target_subspaces else None}


def build_results(run: TransferRun, *, seconds: float) -> list[TransferResult]:
  """One PEFT adapter for the target (float32) and one report per input adapter."""
  config = run.config
  base_name = config.base_model_name or run.target.name
  results = []
  for adapter, plan, output in zip(run.adapters, run.plans, run.outputs):
    new = planning.assemble(run.target.arch, output.factors, adapter.config, base_model=base_name)
    new.path = None
    report = Report.build(
        adapter=adapter.name, source=run.source.name, target=run.target.name, config=dataclasses.asdict(config),
        entries=sorted(output.entries, key=lambda e: (e["target_layer"], module_index(e["module"]))),
        skipped=plan.skipped + [{"source_key": s["key"], "reason": s["reason"]} for s in adapter.skipped],
        layer_map=plan.layer_map, seconds=seconds,
        seconds_decompose=run.subspaces_source.seconds + run.subspaces_target.seconds,
        timing=timing(run, seconds),
        output_dtype=config.dtype or str(np.dtype(adapter.dtype)))
    results.append(TransferResult(new, report))
  return results
