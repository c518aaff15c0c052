"""What a transfer method is: a value the engine, the planner and the pytree API ask.

A method declares which base-weight subspaces it needs, whether source and target
shapes must match, and a pure batched projection; the engine streams the work and
hands it one :class:`ProjectionBatch` at a time. See docs/design.md, "Methods".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from crosslora_jax.core import kernels

if TYPE_CHECKING:
  from crosslora_jax.core.planning import WorkItem
  from crosslora_jax.formats.checkpoint import BaseWeights


@dataclasses.dataclass(frozen=True)
class ProjectionBatch:
  """N adapters x L layers of one module whose LoRAs share one rank r and one layer layout.

  Factors are float32 numpy in torch orientation; subspaces are stacked over the L
  layers (rows in the layout's order) and None when the method does not need them.
  """

  module: str
  a_nlri: np.ndarray  # (N, L, r, in_s)
  b_nlor: np.ndarray  # (N, L, out_s, r)
  sub_source: kernels.Subspace | None  # (L, ...) source subspaces, one per layout row
  sub_target: kernels.Subspace | None  # (L, ...) target subspaces
  target_shape: tuple[int, int]  # (out_t, in_t)
  items: Sequence[Sequence[WorkItem]]  # per adapter, its L work items
  solver: str  # "closed" or "lstsq"
  context: Any = None  # what Method.prepare returned for this run
  overlaps_wanted: bool = True  # False: the report's overlaps of this layout are known (cached) already


# (batch) -> (Projected of (N, L, ...) arrays, per adapter per item extra report fields or None).
# An "overlap" extra is the report's subspace overlap of the item's layer pair: a method that
# computes it in its own projection program saves the engine a program per shape pair.
BatchProjection = Callable[[ProjectionBatch], "tuple[kernels.Projected, list[list[dict[str, Any]]] | None]"]
# (sub_s, sub_t, a_ri, b_or, *, out_t, in_t, solver) -> Projected of one module; pure, jittable.
ModuleProjection = Callable[..., kernels.Projected]


@dataclasses.dataclass(frozen=True)
class Method:
  """One transfer method, as data plus pure functions."""

  name: str
  summary: str  # one line: what it does
  needs_source_subspaces: bool
  needs_target_subspaces: bool
  same_shape: bool  # source and target (out, in) must be equal
  project: BatchProjection
  # One module from its two weights' subspaces alone (pytree_api.transfer_factors); None when the
  # method needs more than the two weights (anchored reads tokenizers and embeddings).
  project_module: ModuleProjection | None = None
  # Run-wide state built once from the two bases and the TransferConfig, handed to every batch.
  prepare: Callable[[BaseWeights, BaseWeights, Any], Any] | None = None
  experimental: bool = False

  @property
  def uses_subspaces(self) -> bool:
    """Whether the SVD rank (``--rank``) matters: the report's rank_used is set only then."""
    return self.needs_source_subspaces or self.needs_target_subspaces
