"""Rotary position embeddings: inverse frequencies per rope type, and their application.

The inverse frequencies are static (they follow from the config), computed once
in numpy float32 the way transformers computes them; only LongRoPE picks between
two sets at run time (the long set once a position passes the pretraining length).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from crosslora_jax.errors import CrossLoraError

ROPE_TYPES = ("default", "linear", "llama3", "longrope", "yarn")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
  """One rotary embedding: its type, base and the static parameters of its scaling."""

  kind: str  # one of ROPE_TYPES
  theta: float
  rotary_dim: int  # leading dims of each head that rotate (partial_rotary_factor * head_dim)
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_positions: int = 0
  short_factor: tuple[float, ...] = ()
  long_factor: tuple[float, ...] = ()
  attention_factor: float = 1.0  # multiplies cos and sin (LongRoPE, YaRN)
  beta_fast: float = 32.0  # YaRN correction range (rotations)
  beta_slow: float = 1.0
  truncate: bool = True

  def inv_freq(self, *, long: bool = False) -> np.ndarray:
    """(rotary_dim // 2,) float32 inverse frequencies."""
    dim = self.rotary_dim
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    base = np.float32(self.theta) ** exponent
    if self.kind == "longrope":
      ext = np.asarray(self.long_factor if long else self.short_factor, dtype=np.float32)
      return (np.float32(1.0) / (ext * base)).astype(np.float32)
    inv = (np.float32(1.0) / base).astype(np.float32)
    if self.kind == "linear":
      return (inv / np.float32(self.factor)).astype(np.float32)
    if self.kind == "llama3":
      return _llama3(inv, self)
    if self.kind == "yarn":
      return _yarn(base, self)
    return inv


def _llama3(inv: np.ndarray, rope: RopeConfig) -> np.ndarray:
  """Llama-3.1 frequency smoothing, as transformers' _compute_llama3_parameters."""
  old = rope.original_max_positions
  low_wavelen = old / rope.low_freq_factor
  high_wavelen = old / rope.high_freq_factor
  wavelen = 2 * math.pi / inv
  scaled = np.where(wavelen > low_wavelen, inv / rope.factor, inv)
  smooth = (old / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
  smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
  medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def _yarn(pos_freqs: np.ndarray, rope: RopeConfig) -> np.ndarray:
  """YaRN: interpolated low frequencies, extrapolated high ones, a linear ramp between."""
  dim, base, original = rope.rotary_dim, rope.theta, rope.original_max_positions

  def correction_dim(rotations: float) -> float:
    return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

  low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
  if rope.truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, dim - 1)
  if low == high:
    high += 0.001
  ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
  extrapolation = 1 - ramp
  interp, extrap = 1.0 / (rope.factor * pos_freqs), 1.0 / pos_freqs
  return (interp * (1 - extrapolation) + extrap * extrapolation).astype(np.float32)


def _yarn_attention_factor(params: Mapping[str, Any], factor: float) -> float:
  def mscale(scale: float, m: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

  if params.get("attention_factor") is not None:
    return float(params["attention_factor"])
  if params.get("mscale") and params.get("mscale_all_dim"):
    return mscale(factor, params["mscale"]) / mscale(factor, params["mscale_all_dim"])
  return mscale(factor)


def rope_from_params(params: Mapping[str, Any], *, head_dim: int, max_positions: int,
                     original: int | None, source: str) -> RopeConfig:
  """A RopeConfig from an HF ``rope_parameters`` / ``rope_scaling`` dict (theta already merged in)."""
  kind = params.get("rope_type", params.get("type", "default"))
  if kind not in ROPE_TYPES:
    raise CrossLoraError(f"{source}: rope_type expected one of {', '.join(ROPE_TYPES)} (su as longrope), "
                         f"got {kind!r}. This rope scaling is not implemented in the JAX runtime.")
  theta = float(params.get("rope_theta", 10_000.0))
  rotary_dim = int(head_dim * float(params.get("partial_rotary_factor", 1.0) or 1.0))
  original = int(original or params.get("original_max_position_embeddings") or max_positions)
  fields: dict[str, Any] = dict(kind=kind, theta=theta, rotary_dim=rotary_dim, original_max_positions=original)
  try:
    if kind == "linear":
      fields["factor"] = float(params["factor"])
    elif kind == "llama3":
      fields.update(factor=float(params["factor"]), low_freq_factor=float(params["low_freq_factor"]),
                    high_freq_factor=float(params["high_freq_factor"]))
    elif kind == "yarn":
      factor = float(params.get("factor") or max_positions / original)
      fields.update(factor=factor, attention_factor=_yarn_attention_factor(params, factor),
                    beta_fast=float(params.get("beta_fast") or 32), beta_slow=float(params.get("beta_slow") or 1),
                    truncate=bool(params.get("truncate", True)))
    elif kind == "longrope":
      short, long = tuple(map(float, params["short_factor"])), tuple(map(float, params["long_factor"]))
      if len(short) != rotary_dim // 2 or len(long) != rotary_dim // 2:
        raise CrossLoraError(f"{source}: rope short_factor/long_factor expected {rotary_dim // 2} values each, "
                             f"got {len(short)} and {len(long)}. Fix config.json.")
      factor = params.get("factor") or max_positions / original
      attention = params.get("attention_factor")
      if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
      fields.update(short_factor=short, long_factor=long, factor=float(factor), attention_factor=float(attention))
  except KeyError as e:
    raise CrossLoraError(f"{source}: rope parameter {e.args[0]!r} expected for rope_type {kind!r}, got none. "
                         "Fix rope_scaling / rope_parameters in config.json.") from None
  return RopeConfig(**fields)


def cos_sin(rope: RopeConfig, positions: jnp.ndarray, dtype: Any) -> tuple[jnp.ndarray, jnp.ndarray]:
  """cos, sin of shape (B, T, rotary_dim) for int positions (B, T), cast to ``dtype``."""
  inv = jnp.asarray(rope.inv_freq())
  if rope.kind == "longrope":
    # transformers picks the set for the whole call from the largest position in it.
    use_long = jnp.max(positions) + 1 > rope.original_max_positions
    inv = jnp.where(use_long, jnp.asarray(rope.inv_freq(long=True)), inv)
  freqs = positions[..., None].astype(jnp.float32) * inv  # (B, T, rotary_dim / 2)
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  scale = jnp.float32(rope.attention_factor)
  return (jnp.cos(emb) * scale).astype(dtype), (jnp.sin(emb) * scale).astype(dtype)


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
  """Rotates the leading rotary_dim features of x (B, T, heads, head_dim); cos/sin (B, T, rotary_dim)."""
  rotary = cos.shape[-1]
  x_rot, x_pass = x[..., :rotary], x[..., rotary:]
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]
  half = rotary // 2
  rotated = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
  out = x_rot * cos + rotated * sin
  return jnp.concatenate([out, x_pass], axis=-1) if x_pass.shape[-1] else out
