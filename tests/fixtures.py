"""Tiny randomly initialised HF models and PEFT adapters, built with the real packages.

No downloads: every model is made from a config here. Used by the tests (and by
benchmarks that need small stand-ins).
"""

from __future__ import annotations

import pathlib
from typing import Any

import torch

from crosslora_jax.formats.architectures import CANONICAL_MODULES

TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": dict(model_type="llama", hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=128, max_position_embeddings=128,
                  tie_word_embeddings=True),
    "mistral": dict(model_type="mistral", hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=1, vocab_size=128, max_position_embeddings=128,
                    head_dim=12),
    "qwen2": dict(model_type="qwen2", hidden_size=80, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=5, num_key_value_heads=1, vocab_size=128, max_position_embeddings=128,
                  tie_word_embeddings=False),
    "gemma": dict(model_type="gemma", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=40, vocab_size=128,
                  max_position_embeddings=128),
    "gemma2": dict(model_type="gemma2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=2, num_key_value_heads=1, head_dim=40, vocab_size=128,
                   max_position_embeddings=128),
    "gemma3_text": dict(model_type="gemma3_text", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, head_dim=48, vocab_size=128,
                        max_position_embeddings=128),
    "phi3": dict(model_type="phi3", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=128, max_position_embeddings=128,
                 pad_token_id=0),
    "gpt2": dict(model_type="gpt2", n_embd=48, n_layer=2, n_head=4, n_positions=128, vocab_size=128),
}

LORA_MODULES = {
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}
DEFAULT_MODULES = list(CANONICAL_MODULES)


def make_model(kind: str, folder: pathlib.Path | None = None, *, seed: int = 0, dtype=torch.float32,
               max_shard_size: str | None = None, **overrides):
  """A random tiny model of ``kind``; saved to ``folder`` (safetensors) when given."""
  from transformers import AutoConfig, AutoModelForCausalLM

  cfg = dict(TINY_CONFIGS[kind], **overrides)
  model_type = cfg.pop("model_type")
  config = AutoConfig.for_model(model_type, **cfg)
  torch.manual_seed(seed)
  model = AutoModelForCausalLM.from_config(config).to(dtype).eval()
  if folder is not None:
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, safe_serialization=True, **kwargs)
  return model


def make_adapter(model, folder: pathlib.Path, *, kind: str, seed: int = 1, r: int = 4, alpha: float = 8,
                 target_modules=None, scale: float = 0.5, **lora_kwargs):
  """A PEFT LoRA on ``model`` with random non-zero A and B (so it changes the logits)."""
  from peft import LoraConfig, get_peft_model

  config = LoraConfig(r=r, lora_alpha=alpha, target_modules=target_modules or LORA_MODULES.get(kind, DEFAULT_MODULES),
                      lora_dropout=0.0, fan_in_fan_out=(kind == "gpt2"), **lora_kwargs)
  peft_model = get_peft_model(model, config)
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in peft_model.named_parameters():
      if "lora_" in name:
        p.copy_(torch.randn(p.shape, generator=gen) * scale / p.shape[-1] ** 0.5)
  peft_model.save_pretrained(folder)
  return peft_model
