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

from crosslora_jax.core import kernels, sharding
from crosslora_jax.core.cache import EntryKey, SubspaceCache, model_id
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
    t0 = time.perf_counter()
    todo = sorted({l for l in layers if (module, l, rank) not in self._memo})
    for l in set(layers) - set(todo):
      self._reads.pop((module, l), None)  # held already: a prefetched copy is not needed
    if self.cache is not None and todo:
      todo = self._load_cached(module, todo, rank, progress)
    size = sharding.round_up(batch_layers or self.config.chunk_layers, self.mesh)
    for start in range(0, len(todo), size):
      self._decompose(module, todo[start:start + size], rank, size)
      if progress is not None:
        progress(len(todo[start:start + size]))
    self.seconds += time.perf_counter() - t0
    return jax.tree.map(lambda *xs: np.stack(xs), *[self._memo[(module, l, rank)] for l in layers])

  def _load_cached(self, module: str, layers: list[int], rank: int,
                   progress: Callable[[int], None] | None) -> list[int]:
    """Takes what the cache holds of ``layers``; returns the layers still missing."""
    missing = []
    for l in layers:
      sub = self.cache.load(self._entry_key(module, l, rank))
      if sub is None:
        missing.append(l)
      else:
        self._memo[(module, l, rank)] = sub
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
      if self.cache is not None and self.cache.path(self._entry_key(module, l, rank)).exists():
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

  def _decompose(self, module: str, layers: list[int], rank: int, size: int) -> None:
    """One batched SVD of ``layers`` (padded to ``size`` by repeating the last weight).

    A wide weight (out < in) goes in transposed and its u and v are swapped back, so a
    weight and its transpose (gate_proj and down_proj) share one compiled program.
    """
    weights = self._weights(module, layers)
    t0 = time.perf_counter()
    pad = size - len(layers)  # repeat the last weight (not zeros: keeps the numerics of a real layer)
    stack = np.stack(weights + weights[-1:] * pad)  # (size, out, in)
    del weights
    wide = stack.shape[1] < stack.shape[2]
    if wide:
      stack = np.ascontiguousarray(np.swapaxes(stack, 1, 2))  # (size, in, out)
    keys = layer_keys(self.config.seed, module, layers + layers[-1:] * pad)
    batch = sharding.truncated_svd_layers(stack, keys, mesh=self.mesh, rank=rank, method=self.config.svd,
                                          n_oversamples=self.config.n_oversamples,
                                          n_power_iter=self.config.n_power_iter)
    del stack
    batch = jax.tree.map(np.asarray, batch)
    u, v = (batch.v, batch.u) if wide else (batch.u, batch.v)
    u, v = canonical_signs(u, v)
    self.seconds_decompose += time.perf_counter() - t0
    for row, l in enumerate(layers):
      layer_sub = kernels.Subspace(u[row].copy(), batch.s[row].copy(), v[row].copy(), batch.energy[row].copy())
      self._memo[(module, l, rank)] = layer_sub
      if self.cache is not None:
        self.cache.store(self._entry_key(module, l, rank), layer_sub, describe={"name": self.base.name})
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

  def _entry_key(self, module: str, layer: int, rank: int) -> EntryKey:
    return EntryKey.make(self._model_id, module, layer, self.base.arch.shape(module), rank=rank,
                         method=self.config.svd, seed=self.config.seed, n_oversamples=self.config.n_oversamples,
                         n_power_iter=self.config.n_power_iter)


def layer_keys(seed: int, module: str, layers: Sequence[int]) -> jax.Array:
  """One PRNG key per (seed, module, layer): independent of batching, sharding and model role."""
  return _layer_keys(np.uint32(seed), np.uint32(module_index(module)), np.asarray(layers, np.uint32))


@jax.jit
def _layer_keys(seed: jax.Array, module: jax.Array, layers: jax.Array) -> jax.Array:
  """(L,) keys in one compiled program per batch size (eagerly, each step would build its own)."""
  base = jax.random.fold_in(jax.random.key(seed), module)
  return jax.vmap(lambda l: jax.random.fold_in(base, l))(layers)


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
