"""How the engine walks a module: layers in near-equal chunks, the next chunk read ahead, a chunk's
subspaces and overlaps, the time split.

Helpers of :mod:`crosslora_jax.core.engine` that read a ``TransferRun`` but own none of it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from crosslora_jax.core import kernels, planning

Layout = tuple[tuple[int, int], ...]  # (source layer, target layer) per row


def even_chunks(layers: Sequence[int], chunk: int) -> list[list[int]]:
  """``layers`` cut into ceil(n / chunk) runs of near-equal length (28, 8 -> 4 x 7, not 8+8+8+4)."""
  if not layers:
    return []
  n_chunks = -(-len(layers) // chunk)
  size = -(-len(layers) // n_chunks)
  return [list(layers[i:i + size]) for i in range(0, len(layers), size)]


def module_chunks(run: Any, module: str) -> tuple[int, list[list[int]], list[list[planning.WorkItem]]]:
  """(rank, target-layer chunks, each adapter's items) of one module."""
  rank = max(p.rank[module] for p in run.plans if module in p.by_module)
  items_per_adapter = [p.by_module.get(module, []) for p in run.plans]
  chunks = even_chunks(sorted({w.target_layer for items in items_per_adapter for w in items}),
                       run.config.chunk_layers)
  return rank, chunks, items_per_adapter


def prefetch_chunk(run: Any, module: str, c: int) -> None:
  """Starts reading chunk ``c`` of ``module``'s base weights while the current chunk decomposes."""
  rank, chunks, items_per_adapter = module_chunks(run, module)
  if c >= len(chunks):
    return
  if run.method.needs_target_subspaces:
    run.subspaces_target.prefetch(module, chunks[c], rank)
  if run.method.needs_source_subspaces:
    def sources(k):
      layers = set(chunks[k]) if 0 <= k < len(chunks) else set()
      return {w.source_layer for items in items_per_adapter for w in items if w.target_layer in layers}
    # chunk c - 1 decomposes (and keeps) the layers the two share
    run.subspaces_source.prefetch(module, sorted(sources(c) - sources(c - 1)), rank)


def timing(run: Any, seconds: float) -> dict[str, float]:
  """Where the engine's time went: waiting for weight reads (what prefetch did not hide), SVD kernels,
  projections, and the rest (cache, planning, report)."""
  subs = (run.subspaces_source, run.subspaces_target)
  split = {"read": sum(s.seconds_read for s in subs), "decompose": sum(s.seconds_decompose for s in subs),
           "project": run.seconds_project}
  return {**split, "other": max(seconds - sum(split.values()), 0.0)}


@dataclasses.dataclass(frozen=True)
class ChunkSubspaces:
  """One chunk's subspaces, the row of each layer in them, and the report's overlaps."""

  source: kernels.Subspace | None  # (L_s, ...) over the chunk's source layers
  target: kernels.Subspace | None  # (L_t, ...) over the chunk's target layers
  source_row: dict[int, int]
  target_row: dict[int, int]
  overlap: dict[tuple[int, int], float]  # (source layer, target layer) -> mean subspace overlap of U and V

  def for_layout(self, layout: Sequence[tuple[int, int]]) -> tuple[kernels.Subspace | None, kernels.Subspace | None]:
    """Subspaces stacked in the order of ``layout``'s (source layer, target layer) pairs."""
    source = None if self.source is None else take_rows(self.source, [self.source_row[i] for i, _ in layout])
    target = None if self.target is None else take_rows(self.target, [self.target_row[j] for _, j in layout])
    return source, target


def cached_overlaps(run: Any, module: str, rank: int, subs: ChunkSubspaces, layout: Layout) -> bool:
  """Takes the report's overlaps of ``layout``'s pairs from the cache; whether any is still missing."""
  if subs.source is None:
    return False
  missing = [pair for pair in layout if pair not in subs.overlap]
  if run.cache is not None:
    for pair in missing:
      value = run.cache.load_overlap(*_overlap_keys(run, module, rank, pair))
      if value is not None:
        subs.overlap[pair] = value
  return any(pair not in subs.overlap for pair in layout)


def record_overlaps(run: Any, module: str, rank: int, subs: ChunkSubspaces, layout: Layout,
                    extras_of_one: list[dict[str, Any]]) -> None:
  """The report's overlap of each (source layer, target layer) pair of ``layout``, once per pair.

  From the method's projection when it gave them (cross_lora: the same program), else
  computed here; report only, shared by all adapters; new ones go to the cache.
  """
  if subs.source is None:
    return
  given = [e.get("overlap") for e in extras_of_one]
  new = sorted(set(layout) - set(subs.overlap))
  if all(x is not None for x in given):
    subs.overlap.update({pair: x for pair, x in zip(layout, given) if pair in new})
  elif new:
    ps, pt = subs.for_layout(new)
    subs.overlap.update(zip(new, kernels.pair_overlaps(ps, pt).tolist()))
  if run.cache is not None:
    for pair in new:
      run.cache.store_overlap(*_overlap_keys(run, module, rank, pair), subs.overlap[pair])


def _overlap_keys(run: Any, module: str, rank: int, pair: tuple[int, int]):
  return (run.subspaces_source.entry_key(module, pair[0], rank), run.subspaces_target.entry_key(module, pair[1], rank))


def without_overlap(extra: dict[str, Any]) -> dict[str, Any]:
  """A method's extra report fields less ``overlap``, which the entry takes from the pair's one value."""
  return {k: v for k, v in extra.items() if k != "overlap"}


def take_rows(sub: kernels.Subspace, rows: Sequence[int]) -> kernels.Subspace:
  """``sub``'s layer rows in the order ``rows``; ``sub`` itself when that is every row in order (no copy:
  a warm run's subspaces are most of its bytes)."""
  if list(rows) == list(range(len(sub.s))):
    return sub
  idx = np.asarray(rows)
  return kernels.Subspace(*(x[idx] for x in sub))
