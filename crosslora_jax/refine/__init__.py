"""Refine a moved adapter by distillation from the source model, on text the source writes.

The source base + its adapter writes a synthetic corpus; every teacher token is scored
by how much the adapter changed it (log p(token | source + adapter) − log p(token |
source base)); the scores are carried to the target's tokens through character spans;
a LoRA on the target is trained on the tokens that matter, with a held-back slice of
teacher text for the stopping rule and for the guard that never ships a refine that hurts.
"""

from crosslora_jax.refine.align import carry_scores
from crosslora_jax.refine.config import RefineConfig
from crosslora_jax.refine.prompts import read_prompts
from crosslora_jax.refine.select import token_weights

__all__ = ["RefineConfig", "RefineResult", "carry_scores", "read_prompts", "refine_adapter", "token_weights"]


def __getattr__(name):
  # The pipeline pulls in the JAX LM runtime; the pieces above need only numpy.
  if name in ("refine_adapter", "RefineResult"):
    from crosslora_jax.refine import pipeline
    return getattr(pipeline, name)
  raise AttributeError(name)
