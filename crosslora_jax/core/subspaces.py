"""Base-weight subspaces of one model, shared by every adapter of a run (and, cached, by later runs).

:class:`Subspaces` hands out rank-r truncated SVDs per (module, layer), from the
on-disk cache (:mod:`crosslora_jax.core.cache`) when it holds them, else decomposed a
batch of layers at a time; :class:`WeightNorms` gives ‖W‖_F for the report.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Sequence
from typing import Any

import jax
import jax.numpy as jnp
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
        self.loaded += 1
    if progress is not None and len(layers) > len(missing):
      progress(len(layers) - len(missing))
    return missing

  def _decompose(self, module: str, layers: list[int], rank: int, size: int) -> None:
    """One batched SVD of ``layers`` (padded to ``size`` by repeating the last weight)."""
    weights = [np.asarray(self.base.weight(l, module)) for l in layers]
    pad = size - len(layers)  # repeat the last weight (not zeros: keeps the numerics of a real layer)
    stack = np.stack(weights + weights[-1:] * pad)  # (size, out, in)
    del weights
    keys = layer_keys(self.config.seed, module, layers + layers[-1:] * pad)
    batch = sharding.truncated_svd_layers(stack, keys, mesh=self.mesh, rank=rank, method=self.config.svd,
                                          n_oversamples=self.config.n_oversamples,
                                          n_power_iter=self.config.n_power_iter)
    del stack
    batch = jax.tree.map(np.asarray, batch)
    for row, l in enumerate(layers):
      layer_sub = kernels.Subspace(*(np.array(x[row]) for x in batch))  # a copy: the batch array is freed
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
  base = jax.random.fold_in(jax.random.key(seed), module_index(module))
  return jax.vmap(lambda l: jax.random.fold_in(base, l))(jnp.asarray(layers, jnp.uint32))


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
