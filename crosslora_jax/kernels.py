"""The linear algebra, as jitted JAX kernels written for one matrix and batched with vmap.

Everything here takes arrays and static options and returns NamedTuples: no I/O,
no dicts, no strings under jit. Maths runs in float32 (JAX's SVD refuses bf16);
inputs are upcast here and outputs cast back by the caller.

Orientation is torch's: a base weight ``w_oi`` is (out, in), ``lora_A`` is
``a_ri`` (rank, in), ``lora_B`` is ``b_or`` (out, rank), and ΔW = B A.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

HIGHEST = lax.Precision.HIGHEST
SVD_METHODS = ("exact", "gram", "randomized")


class Subspace(NamedTuple):
  """Rank-r truncated SVD of one weight, W ≈ U diag(s) Vᵀ, signs canonicalised."""

  u: jax.Array  # (out, r), orthonormal columns
  s: jax.Array  # (r,), descending
  v: jax.Array  # (in, r), orthonormal columns
  energy: jax.Array  # () fraction of ‖W‖_F² captured: Σ_top-r σ² / Σ σ²


class Projected(NamedTuple):
  """Transferred LoRA factors and what the projection kept."""

  a_ri: jax.Array  # (rank, in_t)
  b_or: jax.Array  # (out_t, rank)
  norm_ratio: jax.Array  # () ‖ΔW_t‖_F / ‖ΔW_s‖_F


def _mm(x: jax.Array, y: jax.Array) -> jax.Array:
  return jnp.matmul(x, y, precision=HIGHEST)


def canonicalize_signs(u: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Flips each singular pair so that the largest-|x| entry of u's column is positive.

  An SVD fixes each (u_i, v_i) pair only up to a joint sign; Cross-LoRA pairs the
  i-th source direction with the i-th target one, so the sign must be a function
  of the weight, not of the solver.
  """
  idx = jnp.argmax(jnp.abs(u), axis=0)  # (r,)
  signs = jnp.sign(jnp.take_along_axis(u, idx[None, :], axis=0))[0]
  signs = jnp.where(signs == 0, 1.0, signs).astype(u.dtype)
  return u * signs, v * signs


def _exact_svd(w: jax.Array, rank: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  u, s, vt = jnp.linalg.svd(w, full_matrices=False)
  return u[:, :rank], s[:rank], vt[:rank].T


def _gram_svd(w: jax.Array, rank: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """eigh of the smaller Gram matrix; the other side recovered as W v / σ."""
  m, n = w.shape
  tall = m >= n
  x = w if tall else w.T  # (big, small)
  gram = _mm(x.T, x)
  evals, evecs = jnp.linalg.eigh(gram)  # ascending
  evals, evecs = evals[::-1][:rank], evecs[:, ::-1][:, :rank]
  s = jnp.sqrt(jnp.maximum(evals, 0.0))
  safe = jnp.where(s > s[0] * 1e-6, s, jnp.inf)
  other = _mm(x, evecs) / safe
  if tall:
    return other, s, evecs
  return evecs, s, other


def _randomized_svd(w: jax.Array, rank: int, key: jax.Array, n_oversamples: int,
                    n_power_iter: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Halko et al. range finder with QR-stabilised power iterations."""
  m, n = w.shape
  k = min(rank + n_oversamples, m, n)
  omega = jax.random.normal(key, (n, k), dtype=w.dtype)
  q, _ = jnp.linalg.qr(_mm(w, omega))
  for _ in range(n_power_iter):
    z, _ = jnp.linalg.qr(_mm(w.T, q))
    q, _ = jnp.linalg.qr(_mm(w, z))
  small = _mm(q.T, w)  # (k, n)
  u_small, s, vt = jnp.linalg.svd(small, full_matrices=False)
  return _mm(q, u_small[:, :rank]), s[:rank], vt[:rank].T


def truncated_svd(w_oi: jax.Array, key: jax.Array | None = None, *, rank: int, method: str = "exact",
                  n_oversamples: int = 10, n_power_iter: int = 2) -> Subspace:
  """Rank-``rank`` truncated SVD of one (out, in) matrix in float32, signs canonicalised.

  ``rank`` must not exceed min(out, in) (the planner clips it). ``key`` is used by
  ``method="randomized"`` only.
  """
  w = w_oi.astype(jnp.float32)
  if rank > min(w.shape):
    raise ValueError(f"rank {rank} exceeds min{tuple(w.shape)}")
  if method == "exact":
    u, s, v = _exact_svd(w, rank)
  elif method == "gram":
    u, s, v = _gram_svd(w, rank)
  elif method == "randomized":
    if key is None:
      raise ValueError("method='randomized' needs a PRNG key")
    u, s, v = _randomized_svd(w, rank, key, n_oversamples, n_power_iter)
  else:
    raise ValueError(f"method expected one of {SVD_METHODS}, got {method!r}")
  u, v = canonicalize_signs(u, v)
  total = jnp.sum(jnp.square(w))
  energy = jnp.where(total > 0, jnp.sum(jnp.square(s)) / total, 1.0)
  return Subspace(u, s, v, energy)


@functools.partial(jax.jit, static_argnames=("rank", "method", "n_oversamples", "n_power_iter"))
def batched_truncated_svd(w_loi: jax.Array, keys: jax.Array, *, rank: int, method: str = "exact",
                          n_oversamples: int = 10, n_power_iter: int = 2) -> Subspace:
  """truncated_svd vmapped over a stacked layer axis: (L, out, in) -> Subspace of (L, ...)."""
  fn = functools.partial(truncated_svd, rank=rank, method=method, n_oversamples=n_oversamples,
                         n_power_iter=n_power_iter)
  return jax.vmap(fn)(w_loi, keys)


# --- alignment --------------------------------------------------------------------


def alignment_map(u_s: jax.Array, u_t: jax.Array) -> jax.Array:
  """P = argmin_P ‖P U_s − U_t‖_F by least squares; (m_t, m_s).

  Solves U_sᵀ Pᵀ = U_tᵀ with ``jnp.linalg.lstsq`` (minimum-norm solution); for
  orthonormal U_s this is U_t U_sᵀ. Materialises P, so use it on small shapes;
  the transfer applies P to the LoRA factors without forming it
  (:func:`align_coefficients`).
  """
  p_t, *_ = jnp.linalg.lstsq(u_s.T.astype(jnp.float32), u_t.T.astype(jnp.float32))
  return p_t.T


def align_coefficients(u_s: jax.Array, x: jax.Array, *, solver: str = "closed") -> jax.Array:
  """Coordinates of the columns of ``x`` in span(U_s): U_s⁺ x, (r, k).

  ``P_U x = U_t (U_s⁺ x)`` is the least-squares-aligned factor. ``solver="lstsq"``
  solves ``min ‖U_s C − x‖`` with jnp.linalg.lstsq; ``"closed"`` uses U_sᵀ x,
  which is the same for orthonormal U_s and costs one small matmul.
  """
  if solver == "lstsq":
    c, *_ = jnp.linalg.lstsq(u_s, x)
    return c
  if solver == "closed":
    return _mm(u_s.T, x)
  raise ValueError(f"solver expected 'closed' or 'lstsq', got {solver!r}")


def _lowrank_fro(a_ri: jax.Array, b_or: jax.Array) -> jax.Array:
  """‖B A‖_F without forming B A: sqrt(tr((BᵀB)(AAᵀ)))."""
  return jnp.sqrt(jnp.maximum(jnp.sum(_mm(b_or.T, b_or) * _mm(a_ri, a_ri.T)), 0.0))


def _ratio(a_t, b_t, a_s, b_s) -> jax.Array:
  src = _lowrank_fro(a_s, b_s)
  return jnp.where(src > 0, _lowrank_fro(a_t, b_t) / src, 0.0)


def project_cross_lora(sub_s: Subspace, sub_t: Subspace, a_ri: jax.Array, b_or: jax.Array, *,
                       solver: str = "closed") -> Projected:
  """Cross-LoRA, dimension-consistent: B_t = U_t U_s⁺ B_s, A_t = A_s V_s⁺ᵀ V_tᵀ.

  ΔW_t = U_t (U_sᵀ ΔW_s V_s) V_tᵀ. The adapter keeps its own rank.
  """
  a = a_ri.astype(jnp.float32)
  b = b_or.astype(jnp.float32)
  b_t = _mm(sub_t.u, align_coefficients(sub_s.u, b, solver=solver))  # (m_t, k)
  a_t = _mm(align_coefficients(sub_s.v, a.T, solver=solver).T, sub_t.v.T)  # (k, n_t)
  return Projected(a_t, b_t, _ratio(a_t, b_t, a, b))


def project_lora_x(sub_t: Subspace, a_ri: jax.Array, b_or: jax.Array) -> Projected:
  """LoRA-X (equal shapes): ΔW_t = U_t U_tᵀ ΔW_s V_t V_tᵀ."""
  a = a_ri.astype(jnp.float32)
  b = b_or.astype(jnp.float32)
  b_t = _mm(sub_t.u, _mm(sub_t.u.T, b))
  a_t = _mm(_mm(a, sub_t.v), sub_t.v.T)
  return Projected(a_t, b_t, _ratio(a_t, b_t, a, b))


def truncate_pad(a_ri: jax.Array, b_or: jax.Array, *, out_t: int, in_t: int) -> Projected:
  """The paper authors' effective transfer: cut or zero-pad A's columns and B's rows."""
  a = a_ri.astype(jnp.float32)
  b = b_or.astype(jnp.float32)
  a_t = jnp.zeros((a.shape[0], in_t), jnp.float32).at[:, : min(in_t, a.shape[1])].set(a[:, :in_t])
  b_t = jnp.zeros((out_t, b.shape[1]), jnp.float32).at[: min(out_t, b.shape[0])].set(b[:out_t])
  return Projected(a_t, b_t, _ratio(a_t, b_t, a, b))


def subspace_overlap(u_s: jax.Array, u_t: jax.Array) -> jax.Array:
  """Chance-normalised overlap of two rank-r subspaces: 0 for random, 1 for equal.

  ov = ‖Q_sᵀ Q_t‖_F² / r on the first d = min(m_s, m_t) coordinates (the identity
  embedding the paper's layer pairing implies), and (ov − r/d) / (1 − r/d).
  """
  d = min(u_s.shape[0], u_t.shape[0])
  r = u_s.shape[1]
  q_s, _ = jnp.linalg.qr(u_s[:d].astype(jnp.float32))
  q_t, _ = jnp.linalg.qr(u_t[:d].astype(jnp.float32))
  ov = jnp.sum(jnp.square(_mm(q_s.T, q_t))) / r
  chance = r / d
  return jnp.where(chance < 1, (ov - chance) / (1 - chance), 1.0)


@functools.partial(jax.jit, static_argnames=("solver",))
def batched_project_cross_lora(sub_s: Subspace, sub_t: Subspace, a_lri: jax.Array, b_lor: jax.Array,
                               *, solver: str = "closed") -> Projected:
  return jax.vmap(functools.partial(project_cross_lora, solver=solver))(sub_s, sub_t, a_lri, b_lor)


@jax.jit
def batched_project_lora_x(sub_t: Subspace, a_lri: jax.Array, b_lor: jax.Array) -> Projected:
  return jax.vmap(project_lora_x)(sub_t, a_lri, b_lor)


@functools.partial(jax.jit, static_argnames=("out_t", "in_t"))
def batched_truncate_pad(a_lri: jax.Array, b_lor: jax.Array, *, out_t: int, in_t: int) -> Projected:
  return jax.vmap(functools.partial(truncate_pad, out_t=out_t, in_t=in_t))(a_lri, b_lor)


@jax.jit
def batched_overlap(u_s: jax.Array, u_t: jax.Array) -> jax.Array:
  return jax.vmap(subspace_overlap)(u_s, u_t)
