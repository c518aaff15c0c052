"""The linear algebra, as jitted JAX kernels written for one matrix and batched over layers.

Kernels that call LAPACK (SVD, eigh, QR, Cholesky, triangular solves) are batched
with :func:`map_layers`: ``jax.vmap`` on accelerators, ``lax.map`` on CPU (see
there why); matmul-only kernels are always vmapped.

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
import numpy as np
from jax import lax

from crosslora_jax.core import svd_solvers
from crosslora_jax.core.svd_solvers import HIGHEST, mm  # noqa: F401  (HIGHEST: part of this module's surface)
SVD_METHODS = ("exact", "gram", "randomized", "krylov", svd_solvers.AUTO)  # auto: the cheapest per weight shape
SEEDED_SVD_METHODS = svd_solvers.SEEDED  # the SVD methods that draw from a PRNG key
DEFAULT_SVD = svd_solvers.AUTO  # gram or randomized per shape; chosen from measured accuracy and speed (results/speed.md)
DEFAULT_OVERSAMPLES = svd_solvers.RANDOMIZED_OVERSAMPLES
DEFAULT_POWER_ITER = svd_solvers.RANDOMIZED_POWER_ITER


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


def truncated_svd(w_oi: jax.Array, key: jax.Array | None = None, *, rank: int, method: str = "exact",
                  n_oversamples: int = DEFAULT_OVERSAMPLES, n_power_iter: int = DEFAULT_POWER_ITER) -> Subspace:
  """Rank-``rank`` truncated SVD of one (out, in) matrix in float32, signs canonicalised.

  Args:
    w_oi: (out, in) weight, any float dtype (upcast to float32 here).
    key: PRNG key, used by ``method="randomized"`` and ``"krylov"`` only.
    rank: static; at most min(out, in) (the planner clips it).
    method: ``"exact"`` (jnp.linalg.svd), ``"gram"`` (eigh of the smaller Gram
      matrix + Rayleigh–Ritz), ``"randomized"`` (subspace iteration from a
      Gaussian start + Rayleigh–Ritz), ``"krylov"`` (randomized block Krylov +
      Rayleigh–Ritz, its own fixed setting) or ``"auto"`` (the cheapest of gram,
      randomized and krylov, by :func:`svd_solvers.resolve_method` on this shape and
      rank); see ``BUILD_NOTES.md`` for their accuracy.
    n_oversamples: randomized only: extra columns beyond ``rank``.
    n_power_iter: randomized only: multiplications by WᵀW.

  Returns:
    Subspace with u (out, rank), s (rank,), v (in, rank), energy ().
  """
  w = w_oi.astype(jnp.float32)
  if w.ndim != 2:
    raise ValueError(f"w_oi: a 2-D (out, in) matrix expected, got shape {tuple(w.shape)}")
  if not 0 < rank <= min(w.shape):
    raise ValueError(f"rank: 1..min{tuple(w.shape)} expected, got {rank}")
  method = svd_solvers.resolve_method(method, w.shape, rank, n_oversamples=n_oversamples, n_power_iter=n_power_iter)
  if method not in _SVD_SOLVERS:
    raise ValueError(f"method expected one of {SVD_METHODS}, got {method!r}")
  if method in SEEDED_SVD_METHODS:
    if key is None:
      raise ValueError(f"method={method!r} needs a PRNG key")
    if n_oversamples < 0 or n_power_iter < 0:
      raise ValueError(f"n_oversamples and n_power_iter: >= 0 expected, got {n_oversamples}, {n_power_iter}")
  u, s, v = _SVD_SOLVERS[method](w, rank, key, n_oversamples, n_power_iter)
  u, v = canonicalize_signs(u, v)
  total = jnp.sum(jnp.square(w))
  energy = jnp.where(total > 0, jnp.sum(jnp.square(s)) / total, 1.0)
  return Subspace(u, s, v, energy)


# method -> (w, rank, key, n_oversamples, n_power_iter) -> (u, s, v); options a method ignores are unused.
_SVD_SOLVERS = {
    "exact": lambda w, rank, key, n_oversamples, n_power_iter: svd_solvers.exact_svd(w, rank),
    "gram": lambda w, rank, key, n_oversamples, n_power_iter: svd_solvers.gram_svd(w, rank),
    "randomized": svd_solvers.randomized_svd,
    "krylov": lambda w, rank, key, n_oversamples, n_power_iter: svd_solvers.krylov_svd(w, rank, key),
}


@functools.partial(jax.jit, static_argnames=("rank", "method", "n_oversamples", "n_power_iter"))
def batched_truncated_svd(w_loi: jax.Array, keys: jax.Array, *, rank: int, method: str = "exact",
                          n_oversamples: int = DEFAULT_OVERSAMPLES,
                          n_power_iter: int = DEFAULT_POWER_ITER) -> Subspace:
  """truncated_svd vmapped over a stacked layer axis: (L, out, in) -> Subspace of (L, ...).

  ``keys`` holds one PRNG key per layer (L,), so a layer's result does not depend
  on which other layers share its batch.
  """
  fn = functools.partial(truncated_svd, rank=rank, method=method, n_oversamples=n_oversamples,
                         n_power_iter=n_power_iter)
  return map_layers(fn, w_loi, keys)


@functools.partial(jax.jit, static_argnames=("rank", "method", "n_oversamples", "n_power_iter", "bits_of"))
def batched_truncated_svds(stacks: tuple[jax.Array, ...], layer_ids: tuple[jax.Array, ...], seed: jax.Array,
                           module_id: jax.Array, *, rank: int, method: str | tuple[str, ...] = "exact",
                           n_oversamples: int = DEFAULT_OVERSAMPLES, n_power_iter: int = DEFAULT_POWER_ITER,
                           bits_of: tuple[str | None, ...] | None = None) -> tuple[Subspace, ...]:
  """Several (L, out, in) stacks (one per model: a chunk's source and target weights) in one program.

  Each stack gets :func:`batched_truncated_svd`'s maths, its PRNG keys made in the
  same program from (seed, module id, layer ids (L,) uint32) as :func:`layer_keys`
  makes them, so one compiled program serves a chunk of both models. ``method`` is
  one name for every stack or one per stack (``--svd auto`` may pick gram for one
  model's shape and randomized for the other's: still one program). The stacks run
  one after the other (an optimization barrier orders them): two LAPACK loops at
  once can deadlock jaxlib 0.10's CPU pool (see :func:`map_layers`). ``bits_of``: per stack,
  None or the 16-bit float dtype whose bits a uint16 stack holds (``sharding.as_bits``): each
  layer is bit-cast back and upcast inside the layer loop.
  """
  per_stack = (method,) * len(stacks) if isinstance(method, str) else tuple(method)
  bits = (None,) * len(stacks) if bits_of is None else tuple(bits_of)
  if len(per_stack) != len(stacks) or len(bits) != len(stacks):
    raise ValueError(f"method (or one name), bits_of: one per stack ({len(stacks)}) expected, "
                     f"got {method!r}, {bits_of!r}")
  out: list[Subspace] = []
  for w_loi, layers, stack_method, dtype in zip(stacks, layer_ids, per_stack, bits):
    fn = functools.partial(truncated_svd, rank=rank, method=stack_method, n_oversamples=n_oversamples,
                           n_power_iter=n_power_iter)
    if dtype is not None:  # bits in, upcast per layer
      fn = lambda w, key, fn=fn, dtype=jnp.dtype(dtype): fn(lax.bitcast_convert_type(w, dtype), key)  # noqa: E731
    if out:
      _, w_loi = lax.optimization_barrier((out[-1], w_loi))
    out.append(map_layers(fn, w_loi, layer_keys(seed, module_id, layers)))
  return tuple(out)


def layer_keys(seed: jax.Array, module_id: jax.Array, layers: jax.Array) -> jax.Array:
  """One PRNG key per (seed, module, layer), (L,): independent of batching, sharding and model role."""
  base = jax.random.fold_in(jax.random.key(seed), module_id)
  return jax.vmap(lambda l: jax.random.fold_in(base, l))(layers)


def map_layers(fn, *args):
  """``jax.vmap(fn)(*args)`` on accelerators; on CPU, ``lax.map`` (one matrix per LAPACK call).

  jaxlib 0.10's CPU LAPACK kernels fan a batch out over XLA's intra-op thread
  pool and block that pool thread until the pieces finish. Two batched LAPACK
  calls that XLA runs concurrently (e.g. the SVD of R and the triangular solve
  with R in one Rayleigh–Ritz step) then hold every thread of a two-thread pool
  waiting for work nobody runs: the process hangs with all threads in futex wait
  (measured here: a vmapped randomized SVD of 8 stacked 576×576 weights never
  returned on a 2-core machine; one matrix per call returned in 0.1 s). A batch
  of one runs inline, so ``lax.map`` never waits on the pool; the matmuls inside
  are still multi-threaded by XLA. The choice is made at trace time.
  """
  if jax.default_backend() == "cpu":
    return lax.map(lambda xs: fn(*xs), args)
  return jax.vmap(fn)(*args)


def largest_principal_angle(u1: jax.Array, u2: jax.Array) -> jax.Array:
  """Largest principal angle (radians) between span(u1) and span(u2), both orthonormal (d, r).

  Uses sin θ_max = ‖(I − u1 u1ᵀ) u2‖₂, accurate for small angles (arccos is not).
  """
  u1 = u1.astype(jnp.float32)
  u2 = u2.astype(jnp.float32)
  resid = u2 - mm(u1, mm(u1.T, u2))
  top = jnp.linalg.eigvalsh(mm(resid.T, resid))[-1]
  return jnp.arcsin(jnp.clip(jnp.sqrt(jnp.maximum(top, 0.0)), 0.0, 1.0))


def lowrank_relative_difference(a1_ri: jax.Array, b1_or: jax.Array, a2_ri: jax.Array,
                                b2_or: jax.Array) -> jax.Array:
  """‖B₁A₁ − B₂A₂‖_F / ‖B₁A₁‖_F without forming either product."""
  a = jnp.concatenate([a1_ri, a2_ri]).astype(jnp.float32)
  b = jnp.concatenate([b1_or, -b2_or], axis=1).astype(jnp.float32)
  ref = lowrank_fro(a1_ri.astype(jnp.float32), b1_or.astype(jnp.float32))
  return jnp.where(ref > 0, lowrank_fro(a, b) / ref, jnp.inf)


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
    return mm(u_s.T, x)
  raise ValueError(f"solver expected 'closed' or 'lstsq', got {solver!r}")


def lowrank_fro(a_ri: jax.Array, b_or: jax.Array) -> jax.Array:
  """‖B A‖_F without forming B A: sqrt(tr((BᵀB)(AAᵀ)))."""
  return jnp.sqrt(jnp.maximum(jnp.sum(mm(b_or.T, b_or) * mm(a_ri, a_ri.T)), 0.0))


def norm_ratio(a_t, b_t, a_s, b_s) -> jax.Array:
  """‖B_t A_t‖_F / ‖B_s A_s‖_F, 0 for a zero source update."""
  src = lowrank_fro(a_s, b_s)
  return jnp.where(src > 0, lowrank_fro(a_t, b_t) / src, 0.0)


def project_cross_lora(sub_s: Subspace, sub_t: Subspace, a_ri: jax.Array, b_or: jax.Array, *,
                       solver: str = "closed") -> Projected:
  """Cross-LoRA, dimension-consistent: B_t = U_t U_s⁺ B_s, A_t = A_s V_s⁺ᵀ V_tᵀ.

  ΔW_t = U_t (U_sᵀ ΔW_s V_s) V_tᵀ. The adapter keeps its own rank.
  """
  a = a_ri.astype(jnp.float32)
  b = b_or.astype(jnp.float32)
  b_t = mm(sub_t.u, align_coefficients(sub_s.u, b, solver=solver))  # (m_t, k)
  a_t = mm(align_coefficients(sub_s.v, a.T, solver=solver).T, sub_t.v.T)  # (k, n_t)
  return Projected(a_t, b_t, norm_ratio(a_t, b_t, a, b))


def project_lora_x(sub_t: Subspace, a_ri: jax.Array, b_or: jax.Array) -> Projected:
  """LoRA-X (equal shapes): ΔW_t = U_t U_tᵀ ΔW_s V_t V_tᵀ."""
  a = a_ri.astype(jnp.float32)
  b = b_or.astype(jnp.float32)
  b_t = mm(sub_t.u, mm(sub_t.u.T, b))
  a_t = mm(mm(a, sub_t.v), sub_t.v.T)
  return Projected(a_t, b_t, norm_ratio(a_t, b_t, a, b))


def truncate_pad(a_ri: jax.Array, b_or: jax.Array, *, out_t: int, in_t: int) -> Projected:
  """The paper authors' effective transfer: cut or zero-pad A's columns and B's rows."""
  a = a_ri.astype(jnp.float32)
  b = b_or.astype(jnp.float32)
  a_t = jnp.zeros((a.shape[0], in_t), jnp.float32).at[:, : min(in_t, a.shape[1])].set(a[:, :in_t])
  b_t = jnp.zeros((out_t, b.shape[1]), jnp.float32).at[: min(out_t, b.shape[0])].set(b[:out_t])
  return Projected(a_t, b_t, norm_ratio(a_t, b_t, a, b))


def _inv_sqrt_psd(g: jax.Array) -> jax.Array:
  """G^{-1/2} of a symmetric PSD (r, r) matrix, pseudo-inverse on its null space."""
  evals, evecs = jnp.linalg.eigh(g)
  keep = evals > jnp.max(evals) * 1e-6
  inv = jnp.where(keep, 1.0 / jnp.sqrt(jnp.where(keep, evals, 1.0)), 0.0)
  return mm(evecs * inv, evecs.T)


def subspace_overlap(u_s: jax.Array, u_t: jax.Array) -> jax.Array:
  """Chance-normalised overlap of two rank-r subspaces: 0 for random, 1 for equal.

  ov = ‖Q_sᵀ Q_t‖_F² / r on the first d = min(m_s, m_t) coordinates (the identity
  embedding the paper's layer pairing implies), and (ov − r/d) / (1 − r/d). Q is
  an orthonormal basis of the cut columns, here through (r, r) Gram matrices:
  ‖Q_sᵀ Q_t‖_F = ‖G_s^{-1/2} M_sᵀ M_t G_t^{-1/2}‖_F with M = u[:d], G = MᵀM,
  which costs d·r² flops instead of a (d, r) QR per side.
  """
  d = min(u_s.shape[0], u_t.shape[0])
  r = u_s.shape[1]
  m_s = u_s[:d].astype(jnp.float32)
  m_t = u_t[:d].astype(jnp.float32)
  core = mm(mm(_inv_sqrt_psd(mm(m_s.T, m_s)), mm(m_s.T, m_t)), _inv_sqrt_psd(mm(m_t.T, m_t)))
  ov = jnp.sum(jnp.square(core)) / r
  chance = r / d
  return jnp.where(chance < 1, (ov - chance) / (1 - chance), 1.0)


def project_cross_lora_adapters(sub_s: Subspace, sub_t: Subspace, a_nlri, b_nlor, *,
                                solver: str = "closed") -> Projected:
  """Many adapters of one LoRA rank through one chunk's subspaces, in one call.

  Subspaces are stacked over layers (L, ...) and shared by the N adapters, whose
  factors are (N, L, rank, in_s) and (N, L, out_s, rank); returns (N, L, ...).
  Per adapter this is small matmuls only: U_sᵀ B_s, A_s V_s and the products with
  U_t, V_tᵀ. A wide source weight (out < in) is projected as its transpose
  (ΔWᵀ = Aᵀ Bᵀ through V and U), so down_proj shares gate_proj's compiled program.
  """
  return project_cross_lora_adapters_and_overlaps(sub_s, sub_t, a_nlri, b_nlor, solver=solver)[0]


def project_cross_lora_adapters_and_overlaps(sub_s: Subspace, sub_t: Subspace, a_nlri, b_nlor, *,
                                             solver: str = "closed",
                                             with_overlaps: bool = True) -> tuple[Projected, np.ndarray | None]:
  """:func:`project_cross_lora_adapters` and, from the same compiled program, the report's
  overlap per layer row, (L,) numpy: the mean of the U and V subspace overlaps (:func:`pair_overlaps`).

  One program per oriented shape pair does both, so a cold run builds no program
  for the overlaps. They cost far more than the projections (two (r, r) eigh per side
  and layer against small matmuls), so ``with_overlaps=False`` (all of them cached)
  skips them inside the same program and returns None for them.
  """
  want = np.bool_(with_overlaps)
  if sub_s.u.shape[-2] >= sub_s.v.shape[-2]:
    proj, overlap = _project_cross_lora_adapters(sub_s, sub_t, a_nlri, b_nlor, want, solver=solver)
  else:
    flip = lambda sub: Subspace(sub.v, sub.s, sub.u, sub.energy)
    swap = lambda x: np.swapaxes(np.asarray(x), -1, -2)
    out, overlap = _project_cross_lora_adapters(flip(sub_s), flip(sub_t), swap(b_nlor), swap(a_nlri), want,
                                                solver=solver)
    proj = Projected(swap(out.b_or), swap(out.a_ri), out.norm_ratio)
  return proj, np.asarray(overlap) if with_overlaps else None


@functools.partial(jax.jit, static_argnames=("solver",))
def _project_cross_lora_adapters(sub_s: Subspace, sub_t: Subspace, a_nlri: jax.Array, b_nlor: jax.Array,
                                 with_overlaps: jax.Array, *, solver: str) -> tuple[Projected, jax.Array]:
  fn = functools.partial(project_cross_lora, solver=solver)
  if solver == "lstsq":  # LAPACK inside: one matrix per call on CPU (map_layers)
    proj = map_layers(lambda a, b: map_layers(fn, sub_s, sub_t, a, b), a_nlri, b_nlor)
  else:
    proj = jax.vmap(jax.vmap(fn), in_axes=(None, None, 0, 0))(sub_s, sub_t, a_nlri, b_nlor)
  # after the projections (an optimization barrier orders them): the overlaps' eigh loops
  # must not run beside the lstsq solver's LAPACK loops (see map_layers)
  proj, sub_s, sub_t = lax.optimization_barrier((proj, sub_s, sub_t))
  overlap = lax.cond(with_overlaps, lambda: _mean_overlap(sub_s.u, sub_t.u, sub_s.v, sub_t.v),
                     lambda: jnp.zeros(sub_s.u.shape[:1], jnp.float32))
  return proj, overlap


@jax.jit
def project_lora_x_adapters(sub_t: Subspace, a_nlri: jax.Array, b_nlor: jax.Array) -> Projected:
  """LoRA-X for N adapters of one rank: (L, ...) subspaces, (N, L, ...) factors."""
  return jax.vmap(jax.vmap(project_lora_x), in_axes=(None, 0, 0))(sub_t, a_nlri, b_nlor)


@functools.partial(jax.jit, static_argnames=("out_t", "in_t"))
def batched_truncate_pad(a_lri: jax.Array, b_lor: jax.Array, *, out_t: int, in_t: int) -> Projected:
  return jax.vmap(functools.partial(truncate_pad, out_t=out_t, in_t=in_t))(a_lri, b_lor)


def batched_lowrank_fro(a_lri, b_lor) -> np.ndarray:
  """‖B A‖_F per layer of a stack, without forming B A: (L,), on the host.

  A report figure from (r, r) products of LoRA factors: numpy here, so that it
  compiles no program per factor shape.
  """
  a = np.asarray(a_lri, np.float32)
  b = np.asarray(b_lor, np.float32)
  bb = np.matmul(np.swapaxes(b, -1, -2), b)  # (L, r, r)
  aa = np.matmul(a, np.swapaxes(a, -1, -2))  # (L, r, r)
  return np.sqrt(np.maximum(np.sum(bb * aa, axis=(-1, -2)), 0.0))


@jax.jit
def batched_overlap(u_s: jax.Array, u_t: jax.Array) -> jax.Array:
  return map_layers(subspace_overlap, u_s, u_t)


def pair_overlaps(sub_s: Subspace, sub_t: Subspace) -> np.ndarray:
  """Mean of the U and V subspace overlaps per layer pair, (L,) as numpy: the report's ``overlap``.

  One compiled program per shape pair: the longer side goes first, so a weight and
  its transpose (gate_proj, down_proj) share it.
  """
  if sub_s.u.shape[-2] >= sub_s.v.shape[-2]:
    return np.asarray(_pair_overlaps(sub_s.u, sub_t.u, sub_s.v, sub_t.v))
  return np.asarray(_pair_overlaps(sub_s.v, sub_t.v, sub_s.u, sub_t.u))


@jax.jit
def _pair_overlaps(u_s, u_t, v_s, v_t) -> jax.Array:
  return _mean_overlap(u_s, u_t, v_s, v_t)


def _mean_overlap(u_s, u_t, v_s, v_t) -> jax.Array:
  """(overlap of U + overlap of V) / 2 per layer of (L, ...) stacks."""
  return (map_layers(subspace_overlap, u_s, u_t) + map_layers(subspace_overlap, v_s, v_t)) / 2
