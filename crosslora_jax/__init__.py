"""crosslora_jax: data-free transfer of LoRA adapters between LLM bases, in JAX.

Names are imported on first use (PEP 562), so ``import crosslora_jax`` is cheap and the
command line (``python -m crosslora_jax.transfer``) can take over SIGINT/SIGTERM before
JAX loads.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Checkpoint": "crosslora_jax.formats.checkpoint",
    "DictWeights": "crosslora_jax.formats.checkpoint",
    "TransferConfig": "crosslora_jax.core.engine",
    "TransferResult": "crosslora_jax.core.engine",
    "transfer_adapters": "crosslora_jax.core.engine",
    "transfer_adapter": "crosslora_jax.core.engine",
    "CrossLoraError": "crosslora_jax.errors",
    "save_adapter": "crosslora_jax.formats.adapter_io",
    "PeftAdapter": "crosslora_jax.formats.peft_format",
    "read_adapter": "crosslora_jax.formats.peft_format",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
  if name not in _EXPORTS:
    raise AttributeError(f"module 'crosslora_jax' has no attribute {name!r}")
  value = getattr(importlib.import_module(_EXPORTS[name]), name)
  globals()[name] = value
  return value


def __dir__() -> list[str]:
  return sorted([*globals(), *_EXPORTS])
