"""Random LoRA adapters for tests and benchmarks, with the shapes of any architecture.

No torch: the factors are drawn with numpy and wrapped as a PEFT adapter in memory.

>>> from crosslora_jax.formats.architectures import Architecture
>>> arch = Architecture.from_config({"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 8,
...     "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 16})
>>> adapter = random_adapter(arch, rank=2, modules=("q_proj", "down_proj"))
>>> sorted(adapter.modules)[0], adapter.modules["model.layers.0.mlp.down_proj"].a_ri.shape
('model.layers.0.mlp.down_proj', (2, 16))
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from crosslora_jax.formats import peft_format
from crosslora_jax.formats.architectures import CANONICAL_MODULES, Architecture


def random_adapter(arch: Architecture, *, seed: int = 0, rank: int = 4, alpha: float | None = None,
                   modules: Sequence[str] = CANONICAL_MODULES, layers: Sequence[int] | None = None,
                   a_scale: float | None = 1.0, b_scale: float = 1.0,
                   config: Mapping[str, Any] | None = None) -> peft_format.PeftAdapter:
  """A LoRA of ``rank`` on every stored module of ``arch`` that holds one of ``modules``.

  Per layer (all, or ``layers``, then written as ``layers_to_transform``) and stored
  module in the architecture's order, A (rank, in) ~ N(0, 1)·a_scale (``a_scale=None``:
  N(0, 1)/sqrt(in), a trained LoRA's scale) and B (out, rank) ~ N(0, 1)·b_scale, float32.
  ``alpha`` defaults to 2·rank; ``config`` adds or replaces adapter_config.json fields.
  """
  rng = np.random.default_rng(seed)
  chosen = [s for s in arch.spec.stored if set(s.parts) & set(modules)]
  pairs = {}
  for layer in (range(arch.num_layers) if layers is None else layers):
    for stored in chosen:
      out_dim, in_dim = arch.stored_shape(stored)
      a = rng.standard_normal((rank, in_dim))
      a = a / np.sqrt(in_dim) if a_scale is None else a * a_scale
      b = b_scale * rng.standard_normal((out_dim, rank))
      pairs[arch.module_path(layer, stored)] = peft_format.LoraPair(a.astype(np.float32), b.astype(np.float32))
  peft_config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank if alpha is None else alpha,
                 "target_modules": [s.name for s in chosen]}
  if layers is not None:
    peft_config["layers_to_transform"] = list(layers)
  peft_config.update(config or {})
  return peft_format.PeftAdapter(peft_config, pairs)
