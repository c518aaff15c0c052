"""Transfer methods as values: one module per method, one line each in :data:`REGISTRY`.

>>> get("lora_x").same_shape, get("cross_lora").needs_source_subspaces
(True, True)
"""

from __future__ import annotations

from crosslora_jax.errors import CrossLoraError
from crosslora_jax.methods import anchored, copy, cross_lora, lora_x, truncate_pad
from crosslora_jax.methods.base import Method, ProjectionBatch

REGISTRY: dict[str, Method] = {m.name: m for m in (
    cross_lora.METHOD,
    lora_x.METHOD,
    copy.METHOD,
    truncate_pad.METHOD,
    anchored.METHOD,
)}
NAMES = tuple(REGISTRY)  # the --method choices


def get(name: str) -> Method:
  """The method called ``name``; a CrossLoraError naming the choices otherwise."""
  method = REGISTRY.get(name) if isinstance(name, str) else None
  if method is None:
    raise CrossLoraError(f"--method: one of {', '.join(REGISTRY)} expected, got {name!r}.")
  return method


__all__ = ("Method", "ProjectionBatch", "REGISTRY", "NAMES", "get")
