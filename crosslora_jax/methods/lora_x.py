"""Method ``lora_x``: LoRA-X, ΔW_t = U_t U_tᵀ ΔW_s V_t V_tᵀ (equal shapes only)."""

from __future__ import annotations

from crosslora_jax.core import kernels
from crosslora_jax.methods.base import Method, ProjectionBatch


def project(batch: ProjectionBatch):
  return kernels.project_lora_x_adapters(batch.sub_target, batch.a_nlri, batch.b_nlor), None


def project_module(sub_s, sub_t, a_ri, b_or, *, out_t, in_t, solver):
  del sub_s, out_t, in_t, solver
  return kernels.project_lora_x(sub_t, a_ri, b_or)


METHOD = Method("lora_x", "project onto the target's SVD subspaces; equal shapes",
                needs_source_subspaces=False, needs_target_subspaces=True, same_shape=True,
                project=project, project_module=project_module)
