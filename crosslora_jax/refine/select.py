"""Which of the student's tokens to learn: per-token weights from carried scores.

A score is log p(token | source + adapter) − log p(token | source base), carried to
the student's tokens. Three ways to turn scores into loss weights (N, T):

- ``"all"``: every real token weighs 1 (plain sequence distillation).
- ``"topk"``: the ``fraction`` of real tokens with the largest scores, counted over
  the whole corpus (one threshold, not one per sequence), weigh 1; the rest 0.
- ``"weighted"``: weight ∝ max(score, 0), scaled so real tokens average 1.
"""

from __future__ import annotations

import numpy as np

from crosslora_jax.errors import CrossLoraError

SELECTIONS = ("all", "topk", "weighted")


def token_weights(scores: np.ndarray, mask: np.ndarray, *, selection: str, fraction: float = 0.5) -> np.ndarray:
  """Loss weights (N, T) float32 for ``scores`` (N, T) on the real tokens ``mask`` (N, T) bool."""
  scores = np.asarray(scores, dtype=np.float64)
  mask = np.asarray(mask, dtype=bool)
  if scores.shape != mask.shape:
    raise CrossLoraError(f"token_weights: scores and mask of one shape expected, got {scores.shape} and {mask.shape}.")
  if selection not in SELECTIONS:
    raise CrossLoraError(f"selection: one of {', '.join(SELECTIONS)} expected, got {selection!r}.")
  if not 0.0 < fraction <= 1.0:
    raise CrossLoraError(f"fraction: a number in (0, 1] expected, got {fraction!r}.")
  weights = np.zeros(scores.shape, np.float32)
  n_real = int(mask.sum())
  if n_real == 0:
    return weights
  if selection == "all":
    weights[mask] = 1.0
  elif selection == "topk":
    keep = max(1, int(round(fraction * n_real)))
    real = scores[mask]
    # A sort, not a threshold: ties at the threshold would otherwise keep more than `keep`;
    # ties are broken by a fixed random order, not by position (all-zero scores: a random subset).
    tie_break = np.random.default_rng(0).random(n_real)
    order = np.lexsort((tie_break, -real))[:keep]
    chosen = np.zeros(n_real, np.float32)
    chosen[order] = 1.0
    weights[mask] = chosen
  else:
    positive = np.maximum(scores, 0.0) * mask
    total = positive.sum()
    if total > 0:
      weights = (positive * (n_real / total)).astype(np.float32)
  return weights
