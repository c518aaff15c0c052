"""Method ``anchored``, steps 2-3: probes of each model's spaces and the ridge maps between them.

Kernels (jitted, one matrix each) and :class:`ModelProbes`, what one model's layers make
of the chosen tokens' embeddings. :mod:`crosslora_jax.methods.anchored` ties them together.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from crosslora_jax.core.kernels import mm, norm_ratio
from crosslora_jax.errors import CrossLoraError
from crosslora_jax.formats.architectures import FFN, INPUT_NORM, RESIDUAL, SPACES

# Relative ridge strengths tried (times the mean squared singular value); 0 is plain least squares.
LAMBDAS = (0.0, 1e-7, 1e-5, 1e-4, 1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0)


class RidgeMap(NamedTuple):
  """y ≈ x @ m, fitted by ridge regression on the fit rows."""

  m: jax.Array  # (d_x, d_y)
  r2: jax.Array  # () held-out R² on the test rows (centred)
  lam: jax.Array  # () the chosen relative ridge strength


def _r2(y: jax.Array, pred: jax.Array) -> jax.Array:
  total = jnp.sum(jnp.square(y - jnp.mean(y, axis=0)))
  return jnp.where(total > 0, 1.0 - jnp.sum(jnp.square(y - pred)) / total, 0.0)


@functools.partial(jax.jit, static_argnames=("n_fit", "n_val"))
def fit_ridge_map(x_nd: jax.Array, y_ne: jax.Array, *, n_fit: int, n_val: int) -> RidgeMap:
  """Ridge map y ≈ x m with its strength chosen on validation rows, R² on the rest.

  Rows [0, n_fit) fit, [n_fit, n_fit + n_val) choose λ from ``LAMBDAS`` (relative to the
  mean squared singular value), the remaining rows test. One thin SVD of the fit rows
  (not their Gram matrix, whose condition number is squared in float32) serves every λ:
  m = V diag(σ / (σ² + λ)) Uᵀ y.
  """
  x = x_nd.astype(jnp.float32)
  y = y_ne.astype(jnp.float32)
  xf, yf = x[:n_fit], y[:n_fit]
  xv, yv = x[n_fit:n_fit + n_val], y[n_fit:n_fit + n_val]
  xt, yt = x[n_fit + n_val:], y[n_fit + n_val:]
  u, s, vt = jnp.linalg.svd(xf, full_matrices=False)  # (n, k), (k,), (k, d)
  scale = jnp.maximum(jnp.sum(jnp.square(s)) / x.shape[1], 1e-30)
  rhs = mm(u.T, yf)  # (k, e)
  left_v = mm(xv, vt.T)  # (n_val, k)
  lams = jnp.asarray(LAMBDAS, jnp.float32)

  def coef(lam):
    keep = s > s[0] * 1e-6  # λ = 0: the minimum-norm least-squares solution, tiny σ cut
    return rhs * jnp.where(keep, s / (jnp.square(s) + lam * scale + ~keep), 0.0)[:, None]

  val_r2 = lax.map(lambda lam: _r2(yv, mm(left_v, coef(lam))), lams)
  best = lams[jnp.argmax(val_r2)]
  m = mm(vt.T, coef(best))
  return RidgeMap(m, _r2(yt, mm(xt, m)), best)


@functools.partial(jax.jit, static_argnames=("heads", "kv_heads"))
def attention_heads_map(s_v: jax.Array, s_q: jax.Array, r2: jax.Array, lam: jax.Array, *,
                        heads: tuple[int, int], kv_heads: tuple[int, int]) -> RidgeMap:
  """S_attn (H_t·d_t, H_s·d_s): block (h_t, h_s) = w(h_t, h_s) · S_v[kv(h_t), kv(h_s)].

  s_v (K_t·d_t, K_s·d_s) maps kv heads, s_q (H_t·dq_t, H_s·dq_s) gives the head affinity w.
  """
  (h_t, h_s), (k_t, k_s) = heads, kv_heads
  d_t, d_s = s_v.shape[0] // k_t, s_v.shape[1] // k_s
  blocks_q = s_q.reshape(h_t, s_q.shape[0] // h_t, h_s, s_q.shape[1] // h_s)
  w = jnp.sum(jnp.square(blocks_q), axis=(1, 3))  # (H_t, H_s)
  w = w / jnp.maximum(jnp.sum(w, axis=1, keepdims=True), 1e-30)
  blocks_v = s_v.reshape(k_t, d_t, k_s, d_s)
  group_t = jnp.arange(h_t) // (h_t // k_t)
  group_s = jnp.arange(h_s) // (h_s // k_s)
  per_head = blocks_v[group_t][:, :, group_s]  # (H_t, d_t, H_s, d_s)
  m = (per_head * w[:, None, :, None]).reshape(h_t * d_t, h_s * d_s)
  return RidgeMap(m, r2, lam)


class AnchoredFactors(NamedTuple):
  a_ri: jax.Array  # (rank, in_t)
  b_or: jax.Array  # (out_t, rank)
  base_scale: jax.Array  # () ‖W_t‖ / ‖S_out W_s S_inᵀ‖ (1 when not used)
  norm_ratio: jax.Array  # () ‖ΔW_t‖ / ‖ΔW_s‖ after scaling


@functools.partial(jax.jit, static_argnames=("use_base_scale",))
def project_anchored(s_in: jax.Array, s_out: jax.Array, w_s: jax.Array, w_t: jax.Array, a_ri: jax.Array,
                     b_or: jax.Array, factor: jax.Array, *, use_base_scale: bool) -> AnchoredFactors:
  """A_t = A_s S_inᵀ, B_t = factor · c · S_out B_s with c = ‖W_t‖/‖S_out W_s S_inᵀ‖ (or 1).

  s_in (n_t, n_s), s_out (m_t, m_s), w_s (m_s, n_s), w_t (m_t, n_t), a_ri (r, n_s), b_or (m_s, r).
  """
  a = a_ri.astype(jnp.float32)
  b = b_or.astype(jnp.float32)
  a_t = mm(a, s_in.T)
  b_t = mm(s_out, b)
  if use_base_scale:
    mapped = mm(mm(s_out, w_s.astype(jnp.float32)), s_in.T)
    mapped_norm = jnp.linalg.norm(mapped)
    c = jnp.where(mapped_norm > 0, jnp.linalg.norm(w_t.astype(jnp.float32)) / mapped_norm, 0.0)
  else:
    c = jnp.ones((), jnp.float32)
  b_t = b_t * (c * factor)
  return AnchoredFactors(a_t, b_t, c, norm_ratio(a_t, b_t, a, b))


def _rms_rows(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.sqrt(np.mean(np.square(x), axis=1, keepdims=True)), 1e-12)


def _activation(config: dict[str, Any]):
  cfg = config.get("text_config") or config
  name = cfg.get("hidden_activation") or cfg.get("hidden_act") or cfg.get("activation_function") or "silu"
  if name in ("silu", "swish"):
    return jax.nn.silu
  if name.startswith("gelu"):
    return functools.partial(jax.nn.gelu, approximate=name != "gelu")
  if name == "relu":
    return jax.nn.relu
  raise CrossLoraError(f"config.json: hidden_act one of silu, gelu*, relu expected by --method anchored, got {name!r}.")


class ModelProbes:
  """One model's probes: what its layers make of the chosen tokens' embeddings."""

  def __init__(self, base, ids: np.ndarray, residual_out: str):
    self.base = base
    self.arch = base.arch
    keys = base.keys() if hasattr(base, "keys") else None
    embed = np.asarray(base.tensor(self.arch.embed_key(keys)))
    # RMSNorm (LayerNorm for GPT-2) is scale free: Gemma's √hidden factor drops out here.
    rows = embed[ids].astype(np.float32)
    if self.arch.spec.conv1d:  # GPT-2 LayerNorm also centres
      rows = rows - rows.mean(axis=1, keepdims=True)
    self.x = _rms_rows(rows)
    self.out_probe = self.x
    if residual_out == "lm_head":
      head = "lm_head.weight"
      table = np.asarray(base.tensor(head))[ids] if base.has(head) else rows
      final = self._final_norm_gain()
      self.out_probe = _rms_rows(np.asarray(table, np.float32) * final[None, :])
    self.act = _activation(getattr(base, "config", {}) or {})
    self._memo: dict[tuple[int, str], np.ndarray] = {}

  def _final_norm_gain(self) -> np.ndarray:
    for key in ("model.norm.weight", "model.language_model.norm.weight", "transformer.ln_f.weight"):
      if self.base.has(key):
        return np.asarray(self.base.tensor(key), np.float32) + self.arch.spec.norm_offset
    return np.ones(self.arch.hidden, np.float32)

  def _gain(self, layer: int, which: str) -> np.ndarray:
    key = self.arch.norm_key(layer, which)
    if not self.base.has(key):
      return np.ones(self.arch.hidden, np.float32)
    return np.asarray(self.base.tensor(key), np.float32) + self.arch.spec.norm_offset

  def weight_oi(self, layer: int, module: str) -> np.ndarray:
    """The (out, in) base weight of ``module`` at ``layer``, float32."""
    return np.asarray(self.base.weight(layer, module), np.float32)

  def probe(self, layer: int, name: str) -> np.ndarray:
    """(N, dim) probe of one space: 'in:<module>' (what it reads) or 'out:<module>' (what it writes)."""
    key = (layer, name)
    if key in self._memo:
      return self._memo[key]
    side, module = name.split(":")
    in_space, out_space = SPACES[module]
    if side == "in" and in_space == RESIDUAL:
      value = self.x * self._gain(layer, INPUT_NORM[module])[None, :]
    elif side == "out" and out_space == RESIDUAL:
      value = self.out_probe
    elif module in ("q_proj", "k_proj", "v_proj"):  # out: heads
      value = self.probe(layer, f"in:{module}") @ self.weight_oi(layer, module).T
    elif module == "o_proj":  # in: v expanded to query heads by GQA group
      v = self.probe(layer, "out:v_proj").reshape(len(self.x), self.arch.num_kv_heads, self.arch.head_dim)
      value = np.repeat(v, self.arch.num_heads // self.arch.num_kv_heads, axis=1).reshape(len(self.x), -1)
    else:  # the FFN activation: one space for gate/up outputs and down's input
      value = self.ffn(layer)
    self._memo[key] = value
    return value

  def ffn(self, layer: int) -> np.ndarray:
    key = (layer, "ffn")
    if key not in self._memo:
      r = self.probe(layer, "in:up_proj")
      up = r @ self.weight_oi(layer, "up_proj").T
      if "gate_proj" in self.arch.modules:
        value = np.asarray(self.act(jnp.asarray(r @ self.weight_oi(layer, "gate_proj").T))) * up
      else:
        value = np.asarray(self.act(jnp.asarray(up)))
      self._memo[key] = value
    return self._memo[key]


def space_name(module: str, side: str) -> str:
  """Probe name: gate/up outputs and down's input share the FFN activation space; modules behind one norm share it."""
  in_space, out_space = SPACES[module]
  space = in_space if side == "in" else out_space
  if space == FFN:
    return "ffn:up_proj"
  if side == "in" and space == RESIDUAL:  # one map per norm: q/k/v read one input, gate/up another
    return "in:q_proj" if INPUT_NORM[module] == "attn" else "in:up_proj"
  return f"{side}:{module}"
