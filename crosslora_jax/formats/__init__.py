"""The formats at the edges: Hugging Face checkpoints, PEFT adapters, Flax LoRA trees, Orbax.

``architectures`` (family specs, as data), ``checkpoint`` (lazy safetensors reader),
``peft_format`` (PEFT adapter keys and configs), ``adapter_io`` (atomic, verified writing),
``flax_bridge`` and ``flax_keys`` (flax.nnx / qwix LoRA trees and their key maps),
``orbax_io`` (Orbax checkpoints).
"""
