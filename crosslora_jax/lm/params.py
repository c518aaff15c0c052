"""Base weights -> the parameter pytree the forward reads, one tensor at a time.

The pytree (every per-layer leaf stacked over layers, so the forward can scan)::

  {"embed": (V, H), "positions": (P, H) GPT-2 only, "lm_head": (V, H) untied only,
   "final_norm": {"scale": (H,), "bias": (H,) LayerNorm only},
   "layers": {"attn_norm" | "ffn_norm" | "post_attn_norm" | "post_ffn_norm": {"scale": (L, H), ...},
              "q_norm" | "k_norm": {"scale": (L, head_dim)},
              "<stored module path>": {"w": (L, out, in) torch orientation, "b": (L, out) if biased}}}

Linear weights are keyed by their stored path relative to the layer prefix
(``self_attn.q_proj``, Phi-3's fused ``self_attn.qkv_proj``, GPT-2's ``attn.c_attn``),
so a PEFT module path maps onto one leaf. Conv1D weights are turned to (out, in) here.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from crosslora_jax.errors import CrossLoraError
from crosslora_jax.formats.architectures import to_out_in
from crosslora_jax.lm.config import LMConfig

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


def param_dtype(dtype: str) -> Any:
  if dtype not in DTYPES:
    raise CrossLoraError(f"dtype: one of {', '.join(DTYPES)} expected, got {dtype!r}.")
  return DTYPES[dtype]


def norm_keys(cfg: LMConfig) -> dict[str, str]:
  """Per-layer norm name -> HF weight name relative to the layer prefix."""
  if cfg.family == "gpt2":
    return {"attn_norm": "ln_1", "ffn_norm": "ln_2"}
  keys = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
  if cfg.post_norms:
    keys.update(ffn_norm="pre_feedforward_layernorm", post_attn_norm="post_attention_layernorm",
                post_ffn_norm="post_feedforward_layernorm")
  if cfg.qk_norm:
    keys.update(q_norm="self_attn.q_norm", k_norm="self_attn.k_norm")
  return keys


def model_root(cfg: LMConfig) -> str:
  """Prefix of the non-layer weights: ``model.`` / ``transformer.`` / ``""``."""
  prefix = cfg.arch.layer_prefix.split("{layer}")[0]
  return prefix[: -len("layers.")] if prefix.endswith("layers.") else prefix[: -len("h.")]


def top_keys(cfg: LMConfig, keys: Any) -> dict[str, str]:
  """Top-level param name -> HF key (embedding, positions, final norm, untied head)."""
  root = model_root(cfg)
  out = {"embed": cfg.arch.embed_key(keys)}
  if cfg.family == "gpt2":
    out.update(positions=root + "wpe.weight", final_norm=root + "ln_f")
  else:
    out["final_norm"] = root + "norm"
  if not cfg.tie_embeddings:
    out["lm_head"] = "lm_head.weight"
  return out


def load_params(weights: Any, cfg: LMConfig, dtype: str = "float32") -> dict[str, Any]:
  """Reads ``weights`` (a ``formats.checkpoint.Checkpoint`` or ``DictWeights``) into the pytree."""
  np_dtype = param_dtype(dtype)
  keys = weights.keys()
  top = top_keys(cfg, keys)

  def read(key: str, shape: tuple[int, ...]) -> np.ndarray:
    if not weights.has(key):
      raise CrossLoraError(f"{getattr(weights, 'path', weights.name)}: tensor {key!r} expected "
                           f"({cfg.family} with tie_word_embeddings={cfg.tie_embeddings}), got no such key. "
                           "Check that the folder holds the whole model.")
    array = np.asarray(weights.tensor(key))
    if tuple(array.shape) != shape:
      raise CrossLoraError(f"{key}: shape expected {shape} from config.json, got {tuple(array.shape)}. "
                           "The weights do not match their config.")
    return array.astype(np_dtype)

  H, V = cfg.hidden, cfg.vocab_size
  params: dict[str, Any] = {"embed": read(top["embed"], (V, H))}
  if "positions" in top:
    params["positions"] = read(top["positions"], (cfg.max_positions, H))
  if "lm_head" in top:
    params["lm_head"] = read(top["lm_head"], (V, H))
  params["final_norm"] = _norm(read, top["final_norm"], (H,), cfg)
  params["layers"] = _layers(read, cfg)
  return jax.tree.map(jnp.asarray, params)


def _norm(read: Any, name: str, shape: tuple[int, ...], cfg: LMConfig) -> dict[str, np.ndarray]:
  out = {"scale": read(name + ".weight", shape)}
  if cfg.norm == "layer":
    out["bias"] = read(name + ".bias", shape)
  return out


def _layers(read: Any, cfg: LMConfig) -> dict[str, Any]:
  """Every per-layer leaf stacked over layers (filled in place: one layer's tensor at a time)."""
  arch = cfg.arch
  per_layer: dict[str, Any] = {}
  for layer in range(cfg.layers):
    prefix = arch.layer_prefix.format(layer=layer)
    for name, hf in norm_keys(cfg).items():
      dim = cfg.head_dim if name in ("q_norm", "k_norm") else cfg.hidden
      _put(per_layer, (name,), layer, cfg.layers, _norm(read, prefix + hf, (dim,), cfg))
    for stored in arch.spec.stored:
      out_dim, in_dim = arch.stored_shape(stored)
      stored_shape = (in_dim, out_dim) if arch.spec.conv1d else (out_dim, in_dim)
      leaf = {"w": to_out_in(read(arch.weight_key(layer, stored), stored_shape), conv1d=arch.spec.conv1d)}
      if stored.path in cfg.biased:
        leaf["b"] = read(arch.module_path(layer, stored) + ".bias", (out_dim,))
      _put(per_layer, (stored.path,), layer, cfg.layers, leaf)
  return per_layer


def _put(tree: dict[str, Any], path: tuple[str, ...], layer: int, layers: int, leaves: dict[str, np.ndarray]) -> None:
  node = tree.setdefault(path[0], {})
  for name, array in leaves.items():
    if name not in node:
      node[name] = np.empty((layers,) + array.shape, array.dtype)
    node[name][layer] = array


def param_count(params: Any) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
