"""Method ``cross_lora``: Cross-LoRA (arXiv 2508.05232), dimension-consistent.

ΔW_t = U_t (U_sᵀ ΔW_s V_s) V_tᵀ through the rank-r subspaces of both base weights;
works across shapes. The maths is :func:`crosslora_jax.core.kernels.project_cross_lora`.
"""

from __future__ import annotations

from crosslora_jax.core import kernels
from crosslora_jax.methods.base import Method, ProjectionBatch


def project(batch: ProjectionBatch):
  """The batch's projections and, per layer row, the report's overlap (computed in the same program)."""
  proj, overlap = kernels.project_cross_lora_adapters_and_overlaps(
      batch.sub_source, batch.sub_target, batch.a_nlri, batch.b_nlor, solver=batch.solver,
      with_overlaps=batch.overlaps_wanted)
  if overlap is None:
    return proj, None
  per_row = [{"overlap": x} for x in overlap.tolist()]
  return proj, [per_row for _ in batch.items]


def project_module(sub_s, sub_t, a_ri, b_or, *, out_t, in_t, solver):
  del out_t, in_t  # the subspaces fix the target shape
  return kernels.project_cross_lora(sub_s, sub_t, a_ri, b_or, solver=solver)


METHOD = Method("cross_lora", "project through the SVD subspaces of both bases; any shapes",
                needs_source_subspaces=True, needs_target_subspaces=True, same_shape=False,
                project=project, project_module=project_module)
