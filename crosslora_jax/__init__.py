"""crosslora_jax: data-free transfer of LoRA adapters between LLM bases, in JAX."""

from crosslora_jax.formats.checkpoint import Checkpoint as Checkpoint
from crosslora_jax.formats.checkpoint import DictWeights as DictWeights
from crosslora_jax.core.engine import TransferConfig as TransferConfig
from crosslora_jax.core.engine import TransferResult as TransferResult
from crosslora_jax.core.engine import transfer_adapters as transfer_adapters
from crosslora_jax.core.engine import transfer_adapter as transfer_adapter
from crosslora_jax.errors import CrossLoraError as CrossLoraError
from crosslora_jax.formats.adapter_io import save_adapter as save_adapter
from crosslora_jax.formats.peft_format import PeftAdapter as PeftAdapter
from crosslora_jax.formats.peft_format import read_adapter as read_adapter

__version__ = "0.1.0"
