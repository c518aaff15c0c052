"""The building blocks of the forward: norms, activations, LoRA-aware linears, attention.

Each takes arrays for one layer (the forward scans them over layers) and the
static :class:`LMConfig`. Sensitive maths is upcast to float32 where
transformers upcasts (norms, softmax) and cast back to the activation dtype.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from crosslora_jax.lm.config import LMConfig


def norm(x: jnp.ndarray, p: dict[str, jnp.ndarray], cfg: LMConfig) -> jnp.ndarray:
  """RMSNorm (Gemma: times 1 + gamma, in float32) or LayerNorm over the last axis."""
  x32 = x.astype(jnp.float32)
  if cfg.norm == "layer":
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    out = (x32 - mean) * jax.lax.rsqrt(var + cfg.norm_eps)
    return (out * p["scale"].astype(jnp.float32) + p["bias"].astype(jnp.float32)).astype(x.dtype)
  out = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + cfg.norm_eps)
  if cfg.norm_offset:
    return (out * (cfg.norm_offset + p["scale"].astype(jnp.float32))).astype(x.dtype)
  return p["scale"] * out.astype(x.dtype)  # Llama: gain applied in the input dtype


def activation(x: jnp.ndarray, cfg: LMConfig) -> jnp.ndarray:
  if cfg.activation == "silu":
    return jax.nn.silu(x)
  if cfg.activation == "gelu":
    return jax.nn.gelu(x, approximate=False)
  if cfg.activation == "gelu_tanh":
    return jax.nn.gelu(x, approximate=True)
  return jax.nn.relu(x)


def linear(x: jnp.ndarray, p: dict[str, jnp.ndarray], lora: dict[str, jnp.ndarray] | None) -> jnp.ndarray:
  """x (B, T, in) -> (B, T, out): x Wᵀ + b, plus PEFT's scale · (x Aᵀ) Bᵀ in float32."""
  y = jnp.einsum("bti,oi->bto", x, p["w"])
  if "b" in p:
    y = y + p["b"]
  if lora is not None:
    down = jnp.einsum("bti,ri->btr", x.astype(jnp.float32), lora["a"])
    y = y + (jnp.einsum("btr,or->bto", down, lora["b"]) * lora["scale"]).astype(y.dtype)
  return y


def project(x: jnp.ndarray, layer: dict[str, Any], lora: dict[str, Any], parts: tuple[str, ...],
            cfg: LMConfig) -> list[jnp.ndarray]:
  """Outputs of canonical modules ``parts`` (e.g. q, k, v), splitting fused stored weights by rows."""
  outputs: dict[str, jnp.ndarray] = {}
  out = []
  for part in parts:
    stored, rows = cfg.arch.stored_for(part)
    if stored.path not in outputs:
      outputs[stored.path] = linear(x, layer[stored.path], lora.get(stored.path))
    full = outputs[stored.path]
    out.append(full if rows.stop - rows.start == full.shape[-1] else full[..., rows])
  return out


def attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, allowed: jnp.ndarray, scale: jnp.ndarray,
              cfg: LMConfig) -> jnp.ndarray:
  """Grouped-query attention.

  q (B, T, heads, D), k/v (B, S, kv_heads, D), allowed (B, T, S) bool -> (B, T, heads·D).
  Scores in float32 (Gemma-2's tanh soft-cap on them), masked with the dtype's
  lowest value rather than -inf so that a row with nothing to attend stays finite.
  """
  B, T, H, D = q.shape
  groups = H // cfg.kv_heads
  q = q.reshape(B, T, cfg.kv_heads, groups, D)
  scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
  if cfg.attn_softcap is not None:
    scores = jnp.tanh(scores / cfg.attn_softcap) * cfg.attn_softcap
  scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", weights, v)
  return out.reshape(B, T, H * D)
