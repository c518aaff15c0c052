"""Execution: read base weights bucket by bucket, decompose once, project every adapter.

:func:`transfer` is the library entry point the CLI calls. Base subspaces are
computed once per (model, module, layer) and shared by every adapter of the run,
and with ``cache_dir`` by every later run (:mod:`crosslora_jax.core.cache`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from crosslora_jax.methods import anchored
from crosslora_jax.core import kernels, planning, sharding
from crosslora_jax.formats import peft_format
from crosslora_jax.core.cache import EntryKey, SubspaceCache, model_id
from crosslora_jax.formats.checkpoint import BaseWeights, open_base
from crosslora_jax.errors import CrossLoraError
from crosslora_jax.core.report import Report

Progress = Callable[[str, int, int], None]  # (label, done, total)


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
  shard_layers: bool = True  # with several devices, shard each bucket's layer axis over them
  blas_threads: int | None = 1  # LAPACK/BLAS threads during the run (threadpoolctl); None leaves them as they are
  base_model_name: str | None = None  # base_model_name_or_path; default: the target's name
  calibrate_norm: bool = False  # rescale each module so |dW_t|/|W_t| = |dW_s|/|W_s| (any method)
  anchor: anchored.AnchorConfig = dataclasses.field(default_factory=anchored.AnchorConfig)  # method anchored

  def __post_init__(self):
    problems = []
    if self.method not in planning.METHODS:
      problems.append(f"--method: one of {', '.join(planning.METHODS)} expected, got {self.method!r}")
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
  adapter: peft_format.PeftAdapter  # float32 factors, config for the target
  report: Report

  def save(self, folder: str | os.PathLike[str], dtype: Any | None = None) -> None:
    from crosslora_jax.formats import adapter_io
    adapter_io.save_result(self, folder, dtype=dtype)  # the CLI's save path and dtype rule


class Subspaces:
  """Rank-r subspaces of one base model's weights: from the cache, else decomposed bucket by bucket.

  A subspace is a function of (weights, module, layer, rank, SVD options, seed)
  only, never of the adapter or of which model plays source or target, so it can
  be cached on disk (:mod:`crosslora_jax.core.cache`) and shared. Results are kept in
  memory only until :meth:`release`: the engine streams, so at most a few buckets
  of subspaces are held at a time.
  """

  def __init__(self, base: BaseWeights, config: TransferConfig, *, cache: SubspaceCache | None = None,
               mesh: jax.sharding.Mesh | None = None):
    self.base = base
    self.config = config
    self.cache = cache
    self.mesh = mesh
    self._memo: dict[tuple[str, int, int], kernels.Subspace] = {}
    self._model_id = model_id(base.fingerprint()) if cache is not None else None
    self.seconds = 0.0  # reading weights + decomposing + cache reads/writes
    self.computed = 0  # weights decomposed in this run
    self.loaded = 0  # weights taken from the cache

  def get(self, module: str, layers: Sequence[int], rank: int, *, bucket: int | None = None,
          progress: Callable[[int], None] | None = None) -> kernels.Subspace:
    """Stacked subspaces (L, ...) of ``module`` for ``layers`` (repeats allowed), as numpy.

    Missing layers are decomposed ``bucket`` at a time (default chunk_layers; a short
    bucket is padded by repeating a weight, so each module compiles once).
    """
    t0 = time.perf_counter()
    todo = sorted({l for l in layers if (module, l, rank) not in self._memo})
    if self.cache is not None and todo:
      missing = []
      for l in todo:
        sub = self.cache.load(self._entry_key(module, l, rank))
        if sub is None:
          missing.append(l)
        else:
          self._memo[(module, l, rank)] = sub
          self.loaded += 1
      if progress is not None and len(todo) > len(missing):
        progress(len(todo) - len(missing))
      todo = missing
    size = sharding.round_up(bucket or self.config.chunk_layers, self.mesh)
    for start in range(0, len(todo), size):
      part = todo[start:start + size]
      weights = [np.asarray(self.base.weight(l, module)) for l in part]
      pad = size - len(part)  # repeat the last weight (not zeros: keeps the numerics of a real layer)
      stack = np.stack(weights + weights[-1:] * pad)
      del weights
      keys = layer_keys(self.config.seed, module, part + part[-1:] * pad)
      sub = sharding.truncated_svd_layers(stack, keys, mesh=self.mesh, rank=rank, method=self.config.svd,
                                          n_oversamples=self.config.n_oversamples,
                                          n_power_iter=self.config.n_power_iter)
      del stack
      sub = jax.tree.map(np.asarray, sub)
      for n, l in enumerate(part):
        one = kernels.Subspace(*(np.array(x[n]) for x in sub))  # a copy: the bucket array is freed
        self._memo[(module, l, rank)] = one
        if self.cache is not None:
          self.cache.store(self._entry_key(module, l, rank), one, describe={"name": self.base.name})
      self.computed += len(part)
      if progress is not None:
        progress(len(part))
    self.seconds += time.perf_counter() - t0
    return jax.tree.map(lambda *xs: np.stack(xs), *[self._memo[(module, l, rank)] for l in layers])

  def weight_norm(self, module: str, layer: int, rank: int) -> float:
    """‖W‖_F of a weight held in memory, from its subspace: Σσ_r² / energy."""
    sub = self._memo[(module, layer, rank)]
    top = float(np.sum(np.square(sub.s, dtype=np.float64)))
    return float(np.sqrt(top / float(sub.energy))) if float(sub.energy) > 0 else 0.0

  def release(self, module: str, keep: Collection[int] = ()) -> None:
    """Forgets ``module``'s subspaces except those of the layers in ``keep``."""
    for key in [k for k in self._memo if k[0] == module and k[1] not in keep]:
      del self._memo[key]

  def _entry_key(self, module: str, layer: int, rank: int) -> EntryKey:
    return EntryKey.make(self._model_id, module, layer, self.base.arch.shape(module), rank=rank,
                         method=self.config.svd, seed=self.config.seed, n_oversamples=self.config.n_oversamples,
                         n_power_iter=self.config.n_power_iter)


def layer_keys(seed: int, module: str, layers: Sequence[int]) -> jax.Array:
  """One PRNG key per (seed, module, layer): independent of bucketing, sharding and model role."""
  base = jax.random.fold_in(jax.random.key(seed), _module_index(module))
  return jax.vmap(lambda l: jax.random.fold_in(base, l))(jnp.asarray(layers, jnp.uint32))


def _module_index(module: str) -> int:
  from crosslora_jax.formats.architectures import CANONICAL_MODULES
  return CANONICAL_MODULES.index(module)


def _even_chunks(layers: Sequence[int], chunk: int) -> list[list[int]]:
  """``layers`` cut into ceil(n / chunk) runs of near-equal length (28, 8 -> 4 x 7, not 8+8+8+4)."""
  if not layers:
    return []
  n_chunks = -(-len(layers) // chunk)
  size = -(-len(layers) // n_chunks)
  return [list(layers[i:i + size]) for i in range(0, len(layers), size)]


class _NormMemo:
  """‖W‖_F per (module, layer) of one model, for the report: from a subspace when one is held,
  else read once per run (never once per adapter)."""

  def __init__(self, base: BaseWeights, subs: Subspaces | None):
    self.base, self.subs = base, subs
    self._memo: dict[tuple[str, int], float] = {}

  def __call__(self, module: str, layer: int, rank: int | None) -> float:
    key = (module, layer)
    if key not in self._memo:
      if self.subs is not None and rank is not None and (module, layer, rank) in self.subs._memo:
        self._memo[key] = self.subs.weight_norm(module, layer, rank)
      else:
        self._memo[key] = float(np.linalg.norm(np.asarray(self.base.weight(layer, module), np.float32)))
    return self._memo[key]


@contextlib.contextmanager
def blas_threads(n: int | None):
  """Limits BLAS/LAPACK threads (OpenBLAS, MKL, ...) inside the block; restores them after.

  jaxlib's CPU linear algebra (QR, Cholesky, eigh, SVD) calls LAPACK from the
  OpenBLAS that scipy ships, which spins its own threads beside XLA's: on a busy
  2-core machine a 330x330 Cholesky took 0.6 s instead of 3 ms, and a 3072x3072 SVD
  124 s instead of 26 s (BUILD_NOTES.md, "Speed"). Needs threadpoolctl; a no-op without it.
  """
  if n is None:
    yield
    return
  try:
    from threadpoolctl import threadpool_limits
  except ImportError:
    logging.info("threadpoolctl is not installed: BLAS threads left as they are")
    yield
    return
  with threadpool_limits(limits=n, user_api="blas"):
    yield


def transfer(source: str | os.PathLike[str] | BaseWeights, target: str | os.PathLike[str] | BaseWeights,
             adapters: Sequence[str | os.PathLike[str] | peft_format.PeftAdapter],
             config: TransferConfig = TransferConfig(), *, progress: Progress | None = None) -> list[TransferResult]:
  """Moves each adapter from ``source`` to ``target``; bases are decomposed once for all.

  See :func:`_transfer`; runs with BLAS threads limited to ``config.blas_threads``.
  """
  with blas_threads(config.blas_threads):
    return _transfer(source, target, adapters, config, progress=progress)


def _transfer(source: str | os.PathLike[str] | BaseWeights, target: str | os.PathLike[str] | BaseWeights,
              adapters: Sequence[str | os.PathLike[str] | peft_format.PeftAdapter],
              config: TransferConfig, *, progress: Progress | None = None) -> list[TransferResult]:
  """Moves each adapter from ``source`` to ``target``; bases are decomposed once for all.

  Streams module by module and, within a module, ``chunk_layers`` target layers at a
  time: read and decompose (or load from the cache) the weights of the chunk, project
  every adapter through them (adapters of one LoRA rank and layout in one vmapped
  call), drop them. Peak memory is one chunk of weights plus the outputs.

  Paths are read lazily; already-loaded ``BaseWeights``/``PeftAdapter`` objects are used as
  they are. Returns float32 adapters (cast on save) and one report per adapter.
  """
  t_start = time.perf_counter()
  source_w, target_w = open_base(source), open_base(target)
  loaded = [a if isinstance(a, peft_format.PeftAdapter)
            else peft_format.read_adapter(a, skip_unsupported=config.skip_unsupported) for a in adapters]
  plans = []
  for adapter in loaded:
    factors = planning.canonical_factors(adapter, source_w.arch, where=str(adapter.path or adapter.name))
    plans.append(planning.make_plan(factors, source_w.arch, target_w.arch, method=config.method,
                                    rank=config.rank, layer_map_kind=config.layer_map))
  cache = SubspaceCache(config.cache_dir) if config.cache_dir is not None else None
  mesh = sharding.layer_mesh() if config.shard_layers else None
  subs_s = Subspaces(source_w, config, cache=cache, mesh=mesh)
  subs_t = Subspaces(target_w, config, cache=cache, mesh=mesh)
  modules = sorted({m for p in plans for m in p.buckets}, key=_module_index)
  needs_source = config.method == "cross_lora"
  needs_target = config.method in ("cross_lora", "lora_x")
  anchors = anchored.anchors_for(source_w, target_w, config.anchor) if config.method == "anchored" else None
  norm_s = _NormMemo(source_w, subs_s if needs_source else None)
  norm_t = _NormMemo(target_w, subs_t if needs_target else None)
  total = 0
  for module in modules:
    src_layers = sorted({w.source_layer for p in plans for w in p.buckets.get(module, [])})
    tgt_layers = sorted({w.target_layer for p in plans for w in p.buckets.get(module, [])})
    total += (len(src_layers) if needs_source else 0) + (len(tgt_layers) if needs_target else 0)
  done = 0

  def tick(n: int) -> None:
    nonlocal done
    done += n
    if progress is not None:
      progress("decomposing base weights", done, total)

  per_adapter = [dict() for _ in loaded]
  entries = [[] for _ in loaded]
  seconds_project = 0.0
  for module in modules:
    rank = max(p.rank[module] for p in plans if module in p.buckets)
    out_t, in_t = target_w.arch.shape(module)
    items_n = [p.buckets.get(module, []) for p in plans]
    chunks = _even_chunks(sorted({w.target_layer for items in items_n for w in items}), config.chunk_layers)
    bucket = max(len(c) for c in chunks)
    last_use: dict[int, int] = {}  # source layer -> last chunk that needs it
    for c, chunk in enumerate(chunks):
      for items in items_n:
        for w in items:
          if w.target_layer in chunk:
            last_use[w.source_layer] = c
    for c, chunk in enumerate(chunks):
      in_chunk = set(chunk)
      chunk_items = [[w for w in items if w.target_layer in in_chunk] for items in items_n]
      src_layers = sorted({w.source_layer for items in chunk_items for w in items})
      sub_t = subs_t.get(module, chunk, rank, bucket=bucket, progress=tick) if needs_target else None
      sub_s = subs_s.get(module, src_layers, rank, bucket=bucket, progress=tick) if needs_source else None
      t0 = time.perf_counter()
      t_row = {l: i for i, l in enumerate(chunk)}
      s_row = {l: i for i, l in enumerate(src_layers)}
      overlap = {}
      if needs_source:  # once per (source layer, target layer) pair, shared by all adapters
        pairs = sorted({(w.source_layer, w.target_layer) for items in chunk_items for w in items})
        ps, pt = _take(sub_s, [s_row[i] for i, _ in pairs]), _take(sub_t, [t_row[j] for _, j in pairs])
        # Report only. The hang once blamed on these two being in flight together was jaxlib's
        # batched CPU LAPACK deadlock, fixed in kernels.map_layers (BUILD_NOTES, "Solved: ...").
        ov_u = np.asarray(kernels.batched_overlap(ps.u, pt.u))
        ov_v = np.asarray(kernels.batched_overlap(ps.v, pt.v))
        overlap = dict(zip(pairs, ((ov_u + ov_v) / 2).tolist()))
      # Adapters whose items here have one LoRA rank and one (source, target) layout go in one call.
      groups: dict[tuple[int, tuple[tuple[int, int], ...]], list[tuple[int, list[planning.WorkItem]]]] = {}
      for n, items in enumerate(chunk_items):
        by_rank: dict[int, list[planning.WorkItem]] = {}
        for w in items:
          by_rank.setdefault(w.factors.a_ri.shape[0], []).append(w)
        for k, its in by_rank.items():
          groups.setdefault((k, tuple((w.source_layer, w.target_layer) for w in its)), []).append((n, its))
      for (k, layout), members in groups.items():
        tg = time.perf_counter()
        a = np.stack([np.stack([np.asarray(w.factors.a_ri, np.float32) for w in its]) for _, its in members])
        b = np.stack([np.stack([np.asarray(w.factors.b_or, np.float32) for w in its]) for _, its in members])
        extras = [[{} for _ in layout] for _ in members]
        if config.method == "cross_lora":
          proj = kernels.project_cross_lora_adapters(
              _take(sub_s, [s_row[i] for i, _ in layout]), _take(sub_t, [t_row[j] for _, j in layout]),
              a, b, solver=config.solver)
        elif config.method == "lora_x":
          proj = kernels.project_lora_x_adapters(_take(sub_t, [t_row[j] for _, j in layout]), a, b)
        elif config.method == "truncate_pad":
          flat = kernels.batched_truncate_pad(a.reshape(-1, *a.shape[2:]), b.reshape(-1, *b.shape[2:]),
                                              out_t=out_t, in_t=in_t)
          proj = jax.tree.map(lambda x: x.reshape(a.shape[:2] + x.shape[1:]), flat)
        elif config.method == "anchored":
          outs = [anchored.project_bucket(anchors, module, its) for _, its in members]
          proj = jax.tree.map(lambda *xs: np.stack(xs), *[o[0] for o in outs])
          extras = [o[1] for o in outs]
        else:  # copy
          proj = kernels.Projected(a, b, np.ones(a.shape[:2], np.float32))
        proj = jax.tree.map(np.asarray, proj)
        seconds = (time.perf_counter() - tg) / len(members)
        for row, (n, its) in enumerate(members):
          one = kernels.Projected(proj.a_ri[row], proj.b_or[row], proj.norm_ratio[row])
          if config.calibrate_norm:  # rescales B; reads the base weights again (opt-in)
            one, calib = anchored.calibrate_bucket(source_w, target_w, module, its, one, apply=True)
          else:
            calib = _relative_updates(its, one, module, rank, norm_s, norm_t)
          for i, w in enumerate(its):
            per_adapter[n][(w.target_layer, module)] = (one.a_ri[i], one.b_or[i], w.factors.scaling)
            entries[n].append({
                "target_key": target_w.arch.module_path(w.target_layer, target_w.arch.stored_for(module)[0]),
                "module": module,
                "target_layer": w.target_layer,
                "source_key": w.factors.module_path,
                "source_layer": w.source_layer,
                "source_shape": list(source_w.arch.shape(module)),
                "target_shape": [out_t, in_t],
                "lora_rank": k,
                "rank_used": plans[n].rank[module] if config.method in ("cross_lora", "lora_x") else None,
                "energy_source": float(sub_s.energy[s_row[w.source_layer]]) if needs_source else None,
                "energy_target": float(sub_t.energy[t_row[w.target_layer]]) if needs_target else None,
                "norm_ratio": float(one.norm_ratio[i]),
                "overlap": overlap.get((w.source_layer, w.target_layer)) if needs_source else None,
                "seconds": seconds / len(its),
                **extras[row][i], **calib[i],
            })
      seconds_project += time.perf_counter() - t0
      subs_t.release(module)
      subs_s.release(module, keep={l for l, last in last_use.items() if last > c})
  wall = time.perf_counter() - t_start
  if cache is not None:
    logging.info("subspace cache %s", cache.stats())
  base_name = config.base_model_name or target_w.name
  results = []
  for n, adapter in enumerate(loaded):
    new = planning.assemble(target_w.arch, per_adapter[n], adapter.config, base_model=base_name)
    new.path = None
    report = Report.build(
        adapter=adapter.name, source=source_w.name, target=target_w.name, config=dataclasses.asdict(config),
        entries=sorted(entries[n], key=lambda e: (e["target_layer"], _module_index(e["module"]))),
        skipped=plans[n].skipped + [{"source_key": s["key"], "reason": s["reason"]} for s in adapter.skipped],
        layer_map=plans[n].layer_map, seconds=wall,
        seconds_decompose=subs_s.seconds + subs_t.seconds,
        output_dtype=config.dtype or str(np.dtype(adapter.dtype)))
    results.append(TransferResult(new, report))
  return results


def _take(sub: kernels.Subspace, rows: Sequence[int]) -> kernels.Subspace:
  idx = np.asarray(rows)
  return kernels.Subspace(*(x[idx] for x in sub))


def _relative_updates(items: Sequence[planning.WorkItem], proj: kernels.Projected, module: str, rank: int,
                      norm_s: _NormMemo, norm_t: _NormMemo) -> list[dict[str, Any]]:
  """The report fields of ``anchored.calibrate_bucket(apply=False)``, from memoised ‖W‖_F:
  ‖ΔW‖_F/‖W‖_F of source and target with the LoRA scaling applied; no base weight re-read."""
  a_s = np.stack([np.asarray(w.factors.a_ri, np.float32) for w in items])
  b_s = np.stack([np.asarray(w.factors.b_or, np.float32) for w in items])
  d_s = np.asarray(kernels.batched_lowrank_fro(a_s, b_s))
  d_t = np.asarray(kernels.batched_lowrank_fro(np.asarray(proj.a_ri, np.float32), np.asarray(proj.b_or, np.float32)))
  out = []
  for i, w in enumerate(items):
    ws, wt = norm_s(module, w.source_layer, rank), norm_t(module, w.target_layer, rank)
    out.append({"relative_update_source": (float(d_s[i]) / ws if ws else 0.0) * w.factors.scaling,
                "relative_update_target": (float(d_t[i]) / wt if wt else 0.0) * w.factors.scaling,
                "calibration_scale": None})
  return out


def transfer_adapter(source, target, adapter, config: TransferConfig = TransferConfig(), **kwargs) -> TransferResult:
  """One adapter: see :func:`transfer`."""
  return transfer(source, target, [adapter], config, **kwargs)[0]
