"""How the engine walks a module: layers in near-equal chunks, the next chunk read ahead, the time split.

Helpers of :mod:`crosslora_jax.core.engine` that read a ``TransferRun`` but own none of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from crosslora_jax.core import planning


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
