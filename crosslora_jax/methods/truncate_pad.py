"""Method ``truncate_pad``: cut or zero-pad A's columns and B's rows to the target's sizes.

What the paper authors' code effectively does; a baseline.
"""

from __future__ import annotations

import jax

from crosslora_jax.core import kernels
from crosslora_jax.methods.base import Method, ProjectionBatch


def project(batch: ProjectionBatch):
  a, b = batch.a_nlri, batch.b_nlor
  out_t, in_t = batch.target_shape
  flat = kernels.batched_truncate_pad(a.reshape(-1, *a.shape[2:]), b.reshape(-1, *b.shape[2:]),
                                      out_t=out_t, in_t=in_t)  # (N·L, ...): one vmap
  return jax.tree.map(lambda x: x.reshape(a.shape[:2] + x.shape[1:]), flat), None


def project_module(sub_s, sub_t, a_ri, b_or, *, out_t, in_t, solver):
  del sub_s, sub_t, solver
  return kernels.truncate_pad(a_ri, b_or, out_t=out_t, in_t=in_t)


METHOD = Method("truncate_pad", "cut or zero-pad the factors to the target's sizes; a baseline",
                needs_source_subspaces=False, needs_target_subspaces=False, same_shape=False,
                project=project, project_module=project_module)
