"""Method ``copy``: the factors unchanged (equal shapes only); the no-transfer baseline."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from crosslora_jax.core import kernels
from crosslora_jax.methods.base import Method, ProjectionBatch


def project(batch: ProjectionBatch):
  a, b = batch.a_nlri, batch.b_nlor
  return kernels.Projected(a, b, np.ones(a.shape[:2], np.float32)), None


def project_module(sub_s, sub_t, a_ri, b_or, *, out_t, in_t, solver):
  del sub_s, sub_t, out_t, in_t, solver
  return kernels.Projected(a_ri.astype(jnp.float32), b_or.astype(jnp.float32), jnp.ones((), jnp.float32))


METHOD = Method("copy", "the factors unchanged; equal shapes", needs_source_subspaces=False,
                needs_target_subspaces=False, same_shape=True, project=project, project_module=project_module)
