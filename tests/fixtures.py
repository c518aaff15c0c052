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


# --- JAX runtime (crosslora_jax.lm) parity variants -----------------------------------------
# name -> (kind, overrides): each exercises a rule of its family on sequences longer than any window.
LM_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    **{kind: (kind, {}) for kind in TINY_CONFIGS},
    "llama_bias_untied": ("llama", dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=False)),
    "llama3_rope": ("llama", dict(rope_parameters=dict(
        rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=32))),
    "mistral_window": ("mistral", dict(sliding_window=8)),
    "qwen2_yarn": ("qwen2", dict(rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                                      original_max_position_embeddings=32))),
    "qwen2_window": ("qwen2", dict(use_sliding_window=True, sliding_window=8, max_window_layers=2)),
    "gemma2_window_softcap": ("gemma2", dict(sliding_window=8, attn_logit_softcapping=2.0,
                                             final_logit_softcapping=1.5, query_pre_attn_scalar=24)),
    "gemma3_local_global": ("gemma3_text", dict(
        sliding_window=8, layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"sliding_attention": dict(rope_type="default", rope_theta=10000.0),
                         "full_attention": dict(rope_type="linear", factor=4.0, rope_theta=1e6)})),
    "phi3_longrope": ("phi3", dict(original_max_position_embeddings=32, rope_parameters=dict(
        rope_type="longrope", rope_theta=10000.0,
        short_factor=[1.0 + 0.1 * i for i in range(8)], long_factor=[1.0 + 0.7 * i for i in range(8)]))),
    "phi3_partial_rotary": ("phi3", dict(partial_rotary_factor=0.5)),
    "gpt2_inverse_layer": ("gpt2", dict(scale_attn_by_inverse_layer_idx=True, activation_function="gelu")),
}


def make_lm_model(variant: str, folder: pathlib.Path, *, seed: int = 0):
  """``make_model`` for an LM_VARIANTS entry, with every 1-D weight (norms, biases) perturbed too.

  Freshly initialised norms are all ones (Gemma: zeros, i.e. 1 + 0), which would hide a
  wrong norm convention; the perturbation makes each norm gain and bias matter. Query and
  key weights (x8) and the attention output (x4) are scaled up so that attention is far from
  uniform and matters: masks, rope and score scaling then change the logits.
  """
  kind, overrides = LM_VARIANTS[variant]
  model = make_model(kind, seed=seed, **overrides)
  gen = torch.Generator().manual_seed(seed + 100)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1:
        p.add_(torch.randn(p.shape, generator=gen) * 0.3)
      elif any(n in name for n in ("q_proj", "k_proj", "qkv_proj", "c_attn")):
        p.mul_(8.0)
      elif any(n in name for n in ("o_proj", "attn.c_proj")):
        p.mul_(4.0)
  model.save_pretrained(folder, safe_serialization=True)
  return model
