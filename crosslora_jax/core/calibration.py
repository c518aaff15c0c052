"""Norm calibration and the relative-update report, for every method.

The relative update of one module is ‖ΔW‖_F / ‖W‖_F with the LoRA scaling applied, as
the model applies it. ``--calibrate_norm`` rescales each target B so that the target's
relative update equals the source's (a zero update stays zero); without it the two
ratios are only reported. ΔW is never formed: ‖B A‖_F comes from two (r, r) products.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from crosslora_jax.core import kernels
from typing import TYPE_CHECKING

if TYPE_CHECKING:
  from crosslora_jax.core.planning import WorkItem

# (module, layer) -> ‖W‖_F of one model's base weight
WeightNorm = Callable[[str, int], float]


def _relative(update_norm: float, weight_norm: float, scaling: float) -> float:
  return (update_norm / weight_norm if weight_norm else 0.0) * scaling


def relative_update_norms(w_s: np.ndarray, w_t: np.ndarray, a_s, b_s, a_t, b_t) -> tuple[float, float]:
  """(‖ΔW_s‖/‖W_s‖, ‖ΔW_t‖/‖W_t‖) without forming ΔW; factors exclude the LoRA scaling."""
  ns = float(kernels.lowrank_fro(jnp.asarray(a_s, jnp.float32), jnp.asarray(b_s, jnp.float32)))
  nt = float(kernels.lowrank_fro(jnp.asarray(a_t, jnp.float32), jnp.asarray(b_t, jnp.float32)))
  ws = float(np.linalg.norm(np.asarray(w_s, np.float32)))
  wt = float(np.linalg.norm(np.asarray(w_t, np.float32)))
  return (ns / ws if ws else 0.0), (nt / wt if wt else 0.0)


def calibrate(source, target, module: str, items: Sequence[WorkItem],
              proj: kernels.Projected) -> tuple[kernels.Projected, list[dict[str, Any]]]:
  """Rescales each item's B so its relative update is the source's; reads both base weights.

  ``proj`` holds the L items' target factors stacked (L, ...). Returns the rescaled
  factors and one report dict per item.
  """
  a_all, b_all = np.asarray(proj.a_ri), np.array(proj.b_or, np.float32)
  ratios = np.array(proj.norm_ratio, np.float32)
  infos = []
  for row, w in enumerate(items):
    rel_s, rel_t = relative_update_norms(source.weight(w.source_layer, module), target.weight(w.target_layer, module),
                                         w.factors.a_ri, w.factors.b_or, a_all[row], b_all[row])
    rel_s, rel_t = rel_s * w.factors.scaling, rel_t * w.factors.scaling  # as the model applies them
    scale = rel_s / rel_t if rel_t > 0 else 0.0
    b_all[row] *= scale
    ratios[row] *= scale
    infos.append({"relative_update_source": rel_s, "relative_update_target": rel_t * scale,
                  "calibration_scale": scale})
  return kernels.Projected(a_all, b_all, ratios), infos


def report_relative_updates(items: Sequence[WorkItem], proj: kernels.Projected, module: str,
                            norm_source: WeightNorm, norm_target: WeightNorm) -> list[dict[str, Any]]:
  """The report fields of :func:`calibrate` without rescaling, from already known ‖W‖_F.

  The engine passes norms memoised per run (from a held subspace, else one read), so no
  base weight is read once per adapter.
  """
  a_s = np.stack([np.asarray(w.factors.a_ri, np.float32) for w in items])
  b_s = np.stack([np.asarray(w.factors.b_or, np.float32) for w in items])
  d_s = np.asarray(kernels.batched_lowrank_fro(a_s, b_s))
  d_t = np.asarray(kernels.batched_lowrank_fro(np.asarray(proj.a_ri, np.float32), np.asarray(proj.b_or, np.float32)))
  return [{"relative_update_source": _relative(float(d_s[i]), norm_source(module, w.source_layer), w.factors.scaling),
           "relative_update_target": _relative(float(d_t[i]), norm_target(module, w.target_layer), w.factors.scaling),
           "calibration_scale": None} for i, w in enumerate(items)]
