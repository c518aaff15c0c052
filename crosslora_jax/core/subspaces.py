"""Base-weight subspaces of one model, shared by every adapter of a run (and, cached, by later runs).

:class:`Subspaces` hands out rank-r truncated SVDs per (module, layer), from the
on-disk cache (:mod:`crosslora_jax.core.cache`) when it holds them, else decomposed a
batch of layers at a time; :class:`WeightNorms` gives ‖W‖_F for the report.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any

import jax
import numpy as np

from crosslora_jax.core import kernels, sharding, svd_solvers
from crosslora_jax.core.cache import EntryKey, SubspaceCache, empty_rows, model_id
from crosslora_jax.formats.architectures import CANONICAL_MODULES
from crosslora_jax.formats.checkpoint import BaseWeights


class Subspaces:
  """Rank-r subspaces of one base model's weights: from the cache, else decomposed batch by batch.

  A subspace is a function of (weights, module, layer, rank, SVD options, seed)
  only, never of the adapter or of which model plays source or target, so it can
  be cached on disk and shared. Results are kept in memory only until
  :meth:`release`: the engine streams, so at most a few chunks of subspaces are
  held at a time.
  """

  def __init__(self, base: BaseWeights, config: Any, *, cache: SubspaceCache | None = None,
               mesh: jax.sharding.Mesh | None = None):
    self.base = base
    self.config = config  # a TransferConfig: svd, seed, n_oversamples, n_power_iter, chunk_layers
    self.cache = cache
    self.mesh = mesh
    self._memo: dict[tuple[str, int, int], kernels.Subspace] = {}
    self._stacks: dict[tuple[str, int], tuple[tuple[int, ...], kernels.Subspace]] = {}  # the last whole cache read
    self._model_id = model_id(base.fingerprint()) if cache is not None else None
    self.seconds = 0.0  # reading weights + decomposing + cache reads/writes
    self.seconds_read = 0.0  # waiting for weights to be read and converted (not hidden by prefetch)
    self.seconds_decompose = 0.0  # the SVD kernels, host side of their results included
    self._reads: dict[tuple[str, int], concurrent.futures.Future] = {}  # (module, layer) -> weight being read
    self._reader: concurrent.futures.ThreadPoolExecutor | None = None  # one thread, made on the first prefetch
    self.computed = 0  # weights decomposed in this run
    self.loaded = 0  # weights taken from the cache

  def get(self, module: str, layers: Sequence[int], rank: int, *, batch_layers: int | None = None,
          progress: Callable[[int], None] | None = None) -> kernels.Subspace:
    """Stacked subspaces (L, ...) of ``module`` for ``layers`` (repeats allowed), as numpy.

    Missing layers are decomposed ``batch_layers`` at a time (default chunk_layers; a
    short batch is padded by repeating a weight, so each module compiles once).
    """
    return get_together([(self, layers)], module, rank, batch_layers=batch_layers, progress=progress)[0]

  def missing(self, module: str, layers: Sequence[int], rank: int,
              progress: Callable[[int], None] | None = None) -> list[int]:
    """The distinct ``layers`` neither held nor in the cache (cached ones are loaded now)."""
    todo = sorted({l for l in layers if (module, l, rank) not in self._memo})
    for l in set(layers) - set(todo):
      self._reads.pop((module, l), None)  # held already: a prefetched copy is not needed
    if self.cache is not None and todo:
      todo = self._load_cached(module, todo, rank, progress)
    return todo

  def stacked(self, module: str, layers: Sequence[int], rank: int) -> kernels.Subspace:
    """(L, ...) stacks of the held subspaces of ``layers``: the cache's stacks themselves where these
    layers are exactly what one read from the cache filled (a warm run), else a copy."""
    loaded = self._stacks.get((module, rank))
    if loaded is not None and loaded[0] == tuple(layers):
      return loaded[1]
    return jax.tree.map(lambda *xs: np.stack(xs), *[self._memo[(module, l, rank)] for l in layers])

  def _load_cached(self, module: str, layers: list[int], rank: int,
                   progress: Callable[[int], None] | None) -> list[int]:
    """Takes what the cache holds of ``layers``; returns the layers still missing."""
    rows = empty_rows(self.entry_key(module, layers[0], rank), len(layers))  # read in place: no stacking later
    hit = [self.cache.load_into(self.entry_key(module, l, rank), rows, i) for i, l in enumerate(layers)]
    missing = [l for l, ok in zip(layers, hit) if not ok]
    if not missing:
      for a in rows:
        a.flags.writeable = False  # handed out as the stack itself; set before the row views are taken
      self._stacks[(module, rank)] = (tuple(layers), rows)
    for i, l in enumerate(layers):
      if hit[i]:
        self._memo[(module, l, rank)] = kernels.Subspace(rows.u[i], rows.s[i], rows.v[i], rows.energy[i])
        self._reads.pop((module, l), None)
        self.loaded += 1
    if progress is not None and len(layers) > len(missing):
      progress(len(layers) - len(missing))
    return missing

  def prefetch(self, module: str, layers: Sequence[int], rank: int) -> None:
    """Starts reading ``module``'s weights of ``layers`` on a background thread.

    The next chunk's bf16 weights are read and converted while the current one
    decomposes (XLA and the file reads both release the GIL); :meth:`get` takes them
    from here. Layers already held or in the cache are skipped: a warm run reads nothing.
    """
    for l in layers:
      key = (module, l)
      if key in self._reads or (module, l, rank) in self._memo:
        continue
      if self.cache is not None and self.cache.path(self.entry_key(module, l, rank)).exists():
        continue
      if self._reader is None:
        self._reader = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="weights")
      self._reads[key] = self._reader.submit(self._read_weight, module, l)

  def _read_weight(self, module: str, layer: int) -> np.ndarray:
    return np.asarray(self.base.weight(layer, module))

  def _weights(self, module: str, layers: list[int]) -> list[np.ndarray]:
    """The weights of ``layers``: prefetched ones from their futures, the rest read now."""
    t0 = time.perf_counter()
    out = []
    for l in layers:
      future = self._reads.pop((module, l), None)
      out.append(future.result() if future is not None else self._read_weight(module, l))
    self.seconds_read += time.perf_counter() - t0
    return out

  def batch_stack(self, module: str, layers: list[int], size: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """(weights (size, big, small), layer ids (size,) uint32, wide) of one SVD batch, on the host.

    Padded to ``size`` by repeating the last weight (not zeros: keeps the numerics of a
    real layer). A wide weight (out < in) goes in transposed (``wide``), so a weight and
    its transpose (gate_proj and down_proj) share one compiled program.
    """
    weights = self._weights(module, layers)
    pad = size - len(layers)
    stack = np.stack(weights + weights[-1:] * pad)  # (size, out, in)
    del weights
    wide = stack.shape[1] < stack.shape[2]
    if wide:
      stack = np.ascontiguousarray(np.swapaxes(stack, 1, 2))  # (size, in, out)
    return stack, np.asarray(layers + layers[-1:] * pad, np.uint32), wide

  def keep(self, module: str, layers: list[int], rank: int, batch: kernels.Subspace, wide: bool) -> None:
    """Holds (and caches) the first len(layers) rows of a batch's result; u and v swapped back when wide."""
    batch = jax.tree.map(np.asarray, batch)
    u, v = (batch.v, batch.u) if wide else (batch.u, batch.v)
    u, v = canonical_signs(u, v)
    for row, l in enumerate(layers):
      layer_sub = kernels.Subspace(u[row].copy(), batch.s[row].copy(), v[row].copy(), batch.energy[row].copy())
      self._memo[(module, l, rank)] = layer_sub
      if self.cache is not None:
        self.cache.store(self.entry_key(module, l, rank), layer_sub, describe={"name": self.base.name})
    self.computed += len(layers)

  def holds(self, module: str, layer: int, rank: int) -> bool:
    return (module, layer, rank) in self._memo

  def weight_norm(self, module: str, layer: int, rank: int) -> float:
    """‖W‖_F of a weight held in memory, from its subspace: Σσ_r² / energy."""
    sub = self._memo[(module, layer, rank)]
    top = float(np.sum(np.square(sub.s, dtype=np.float64)))
    return float(np.sqrt(top / float(sub.energy))) if float(sub.energy) > 0 else 0.0

  def release(self, module: str, keep: Collection[int] = ()) -> None:
    """Forgets ``module``'s subspaces except those of the layers in ``keep``."""
    for key in [k for k in self._memo if k[0] == module and k[1] not in keep]:
      del self._memo[key]
    for key in [k for k in self._stacks if k[0] == module]:
      del self._stacks[key]

  def svd_method(self, module: str, rank: int) -> str:
    """The solver this model's ``module`` weights go through: ``--svd``, with auto resolved for their shape."""
    cfg = self.config
    return svd_solvers.resolve_method(cfg.svd, self.base.arch.shape(module), rank, n_oversamples=cfg.n_oversamples,
                               n_power_iter=cfg.n_power_iter)

  def entry_key(self, module: str, layer: int, rank: int) -> EntryKey:
    """The cache key under the method actually used: auto's gram entries are gram's entries."""
    return EntryKey.make(self._model_id, module, layer, self.base.arch.shape(module), rank=rank,
                         method=self.svd_method(module, rank), seed=self.config.seed,
                         n_oversamples=self.config.n_oversamples, n_power_iter=self.config.n_power_iter)


def get_together(requests: Sequence[tuple[Subspaces, Sequence[int]]], module: str, rank: int, *,
                 batch_layers: int | None = None,
                 progress: Callable[[int], None] | None = None) -> list[kernels.Subspace]:
  """Stacked subspaces of ``module`` for each (model's Subspaces, layers) request, as numpy.

  What no request holds or caches is decomposed ``batch_layers`` layers at a time, the
  i-th batch of every model in one compiled program (:func:`kernels.batched_truncated_svds`):
  a chunk of a source and a target model costs one program per module shape pair.
  All requests share one config and mesh (one run's).
  """
  first = requests[0][0]
  t0 = time.perf_counter()
  todo = [subs.missing(module, layers, rank, progress) for subs, layers in requests]
  size = sharding.round_up(batch_layers or first.config.chunk_layers, first.mesh)
  cfg = first.config
  for start in range(0, max(map(len, todo)), size):
    parts = [(subs, t[start:start + size]) for (subs, _), t in zip(requests, todo) if t[start:start + size]]
    stacks, layer_ids, wides = zip(*[subs.batch_stack(module, layers, size) for subs, layers in parts])
    t_svd = time.perf_counter()
    stack_methods = tuple(subs.svd_method(module, rank) for subs, _ in parts)  # one program, a method per model
    batches = sharding.truncated_svd_stacks(stacks, layer_ids, seed=cfg.seed, module_id=module_index(module),
                                            mesh=first.mesh, rank=rank, method=stack_methods,
                                            n_oversamples=cfg.n_oversamples, n_power_iter=cfg.n_power_iter)
    del stacks  # the weights (size, big, small) are not needed past the kernel
    batches = jax.tree.map(np.asarray, batches)
    share = (time.perf_counter() - t_svd) / len(parts)  # one program for all: an even split
    for (subs, layers), batch, wide in zip(parts, batches, wides):
      subs.keep(module, layers, rank, batch, wide)
      subs.seconds_decompose += share
      if progress is not None:
        progress(len(layers))
  share = (time.perf_counter() - t0) / len(requests)
  for subs, _ in requests:
    subs.seconds += share
  return [subs.stacked(module, layers, rank) for subs, layers in requests]


def layer_keys(seed: int, module: str, layers: Sequence[int]) -> jax.Array:
  """One PRNG key per (seed, module, layer): independent of batching, sharding and model role."""
  return _layer_keys(np.uint32(seed), np.uint32(module_index(module)), np.asarray(layers, np.uint32))


_layer_keys = jax.jit(kernels.layer_keys)  # the keys the SVD programs make inside themselves


def canonical_signs(u_lmr: np.ndarray, v_lnr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """kernels.canonicalize_signs on the host for a stack (L, m, r), (L, n, r): u's largest-|x| entry positive.

  Done here, after the kernel, so that a transposed weight (whose kernel fixed the
  signs on its v) follows the same rule as any other and shares its program.
  """
  idx = np.argmax(np.abs(u_lmr), axis=1)  # (L, r)
  signs = np.sign(np.take_along_axis(u_lmr, idx[:, None, :], axis=1))  # (L, 1, r)
  signs = np.where(signs == 0, 1, signs).astype(u_lmr.dtype)
  return u_lmr * signs, v_lnr * signs


def module_index(module: str) -> int:
  """Position of a canonical module in CANONICAL_MODULES (the order of reports and keys)."""
  return CANONICAL_MODULES.index(module)


class WeightNorms:
  """‖W‖_F per (module, layer) of one model, for the report: from a subspace when one is held,
  else read once per run (never once per adapter)."""

  def __init__(self, base: BaseWeights, subspaces: Subspaces | None):
    self.base, self.subspaces = base, subspaces
    self._memo: dict[tuple[str, int], float] = {}

  def __call__(self, module: str, layer: int, rank: int | None) -> float:
    key = (module, layer)
    if key not in self._memo:
      if self.subspaces is not None and rank is not None and self.subspaces.holds(module, layer, rank):
        self._memo[key] = self.subspaces.weight_norm(module, layer, rank)
      else:
        self._memo[key] = float(np.linalg.norm(np.asarray(self.base.weight(layer, module), np.float32)))
    return self._memo[key]
