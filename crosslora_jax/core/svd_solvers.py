"""Truncated-SVD solvers for one float32 matrix: (w, rank, ...) -> (u, s, v), signs not yet fixed.

:func:`crosslora_jax.core.kernels.truncated_svd` picks one by name, checks its inputs
and canonicalises the signs. gram and randomized work on ``x``, the (big, small)
orientation of ``w``, so a weight and its transpose cost the same.

Arithmetic per (m, n) weight, m >= n, k = rank + oversamples (flops, leading terms;
:func:`flops`): exact ~ 6mn² + 20n³ (LAPACK gesdd with thin vectors); gram
2mn² + 9n³ (Gram matrix, full eigh) + 2mnk + 4mk² (Rayleigh–Ritz); randomized
(2q + 1)·2mnk + CholeskyQR (q power iterations); krylov 4mnbq + 2mnK + CholeskyQR of the
(m, K) basis (K = rank + its oversamples, b = K / (q + 1)). :func:`auto_method` picks the one
with the fewest per (shape, rank) from these counts (``--svd auto``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

HIGHEST = lax.Precision.HIGHEST
GRAM_OVERSAMPLES = 32  # eigh directions beyond the rank kept for gram's Rayleigh–Ritz step
# randomized's defaults: the setting measured to keep the tail energy within 1.01x the rank-r
# optimum on real and paper-shaped spectra (p 10, q 2 misses it by 10-13%).
RANDOMIZED_OVERSAMPLES = 64
RANDOMIZED_POWER_ITER = 6
# krylov's setting, fixed (the --svd_oversamples / --svd_power_iter flags are randomized's): a basis
# of rank + 704 columns from 5 block steps, measured to keep the tail energy within 1.01x the rank-r
# optimum on paper-shaped weights at r 320 with each module's own spectrum measured on SmolLM2,
# Qwen2.5-Coder-0.5B and Gemma-3: worst 1.0069 (up_proj, 8192 x 3072); rank + 576 reached 1.0111
# there, though it stayed within 1.0067 on a profile of the first two models alone (results/speed.md).
KRYLOV_OVERSAMPLES = 704
KRYLOV_STEPS = 5
AUTO = "auto"  # per weight: gram, randomized or krylov, whichever is expected to take least time (auto_method)
# Each solver's flop rate relative to gram's, measured on the paper shapes with one BLAS thread on a
# 2-core CPU (results/paper_svd.json, 2026-12-07): gram 116-166 GFLOP/s, randomized 71-115, krylov
# 51-88 (its block QRs and eigh are LAPACK calls on one thread). auto weighs flops by these.
RELATIVE_RATE = {"gram": 1.0, "randomized": 0.7, "krylov": 0.55}
SEEDED = ("randomized", "krylov")  # the solvers that draw from a PRNG key


def seeded_options(method: str, n_oversamples: int, n_power_iter: int) -> tuple[int, int] | None:
  """The (oversamples, steps) ``method`` runs with: randomized's are the options given, krylov's
  are fixed; None for the deterministic solvers. What a cache key must hold."""
  if method == "randomized":
    return int(n_oversamples), int(n_power_iter)
  if method == "krylov":
    return KRYLOV_OVERSAMPLES, KRYLOV_STEPS
  return None


def mm(x: jax.Array, y: jax.Array) -> jax.Array:
  """x @ y at full float32 precision (TPU/GPU matmuls default to bf16 passes)."""
  return jnp.matmul(x, y, precision=HIGHEST)


def exact_svd(w: jax.Array, rank: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  u, s, vt = jnp.linalg.svd(w, full_matrices=False)
  return u[:, :rank], s[:rank], vt[:rank].T


def rayleigh_ritz(x: jax.Array, z: jax.Array, rank: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """SVD of ``x`` restricted to span(z): x z = Q R, R = U_r S V_rᵀ, so x (z V_r) = (Q U_r) S.

  x: (big, small); z: (small, k) with orthonormal columns, k >= rank. One
  Householder QR of (big, k) and one SVD of (k, k): U comes out orthonormal to
  working precision and S accurate to eps·‖x‖ in absolute terms, also for tiny
  singular values (where σ = sqrt(eigenvalue) and U = x v / σ are not).
  """
  q, r = jnp.linalg.qr(mm(x, z))
  u_r, s, v_rt = jnp.linalg.svd(r, full_matrices=False)
  return mm(q, u_r[:, :rank]), s[:rank], mm(z, v_rt[:rank].T)


def gram_svd(w: jax.Array, rank: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """eigh of the smaller Gram matrix for a subspace, then an oversampled Rayleigh–Ritz step.

  The Gram matrix squares the condition number: eigh alone resolves singular
  vector i only to eps·σ₀²/(σ_i² − σ_{i±1}²), which for weights whose spectrum
  falls steeply (q_proj: σ_320 ≈ 0.01·σ₀) rotates the directions near the cut by
  percent. So eigh only supplies a subspace of rank + ``GRAM_OVERSAMPLES``
  (containing the top ``rank`` up to the much larger gap σ_r² − σ_{r+p}²), and the
  Rayleigh–Ritz step (Householder QR of w times it, SVD of R) resolves the
  directions inside it from w itself, with σ-gaps as an exact SVD does.
  """
  m, n = w.shape
  x = w if m >= n else w.T  # (big, small)
  k = min(rank + GRAM_OVERSAMPLES, x.shape[1])
  _, evecs = jnp.linalg.eigh(mm(x.T, x))  # ascending
  u_big, s, v_small = rayleigh_ritz(x, evecs[:, ::-1][:, :k], rank)
  return (u_big, s, v_small) if m >= n else (v_small, s, u_big)


def cholesky_qr(y: jax.Array, passes: int) -> tuple[jax.Array, jax.Array]:
  """y = Q R from matmuls and a (k, k) Cholesky: shifted CholeskyQR, ``passes`` times.

  y: (m, k). Each pass factors G = QᵀQ + s·I (s = k·eps·tr G on the first pass,
  eps·tr G after, plus a tiny floor), so it exists for any y, rank-deficient or
  zero included; later passes restore orthonormality (≈ eps·k after 3 passes for
  cond(y) up to ~1/sqrt(eps)). The span is y's whatever the shift. On CPU this is
  several times faster than Householder QR (LAPACK geqrf + orgqr) for k ≈ 330.
  """
  k = y.shape[1]
  eye = jnp.eye(k, dtype=y.dtype)
  eps = jnp.finfo(y.dtype).eps
  q, r_acc = y, eye
  for i in range(passes):
    g = mm(q.T, q)
    shift = eps * (k if i == 0 else 1) * jnp.trace(g) + jnp.finfo(y.dtype).tiny
    r = jnp.linalg.cholesky(g + shift * eye).T  # upper triangular
    q = mm(q, jax.scipy.linalg.solve_triangular(r, eye, lower=False))
    r_acc = mm(r, r_acc)
  return q, r_acc


def randomized_svd(w: jax.Array, rank: int, key: jax.Array, n_oversamples: int,
                    n_power_iter: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Randomized subspace iteration (Halko, Martinsson & Tropp 2011) built from matmuls.

  Works on x = the (big, small) orientation of ``w``: a Gaussian start
  Ω (small, k), k = rank + n_oversamples, then ``n_power_iter`` steps
  Y ← orth(x Z), Z ← orth(xᵀ Y), then the SVD of x restricted to span(Z)
  (x Z = Q R, R = U_r S V_rᵀ). Orthonormalisation is shifted CholeskyQR (one pass
  inside the iteration, where only the span matters; three at the end). Costs
  2·n_power_iter + 1 passes of (big·small·k) flops; the error of direction i
  shrinks like (σ_{k+1}/σ_i)^(2·n_power_iter). Directions with σ below
  ≈ sqrt(k·eps)·σ₀ (5e-3·σ₀ for k = 330; bf16 storage noise is 4e-3) are not
  resolved: use ``exact`` or ``gram`` for nearly rank-deficient weights.
  """
  m, n = w.shape
  x = w if m >= n else w.T  # (big, small)
  small = x.shape[1]
  k = min(rank + n_oversamples, small)
  z = jax.random.normal(key, (small, k), dtype=x.dtype)
  for i in range(n_power_iter):
    y, _ = cholesky_qr(mm(x, z), passes=1)
    z, _ = cholesky_qr(mm(x.T, y), passes=3 if i == n_power_iter - 1 else 1)
  if n_power_iter == 0:
    z, _ = cholesky_qr(z, passes=3)
  q, r = cholesky_qr(mm(x, z), passes=3)
  u_r, s, v_rt = jnp.linalg.svd(r, full_matrices=False)
  u_big, v_small = mm(q, u_r[:, :rank]), mm(z, v_rt[:rank].T)
  return (u_big, s[:rank], v_small) if m >= n else (v_small, s[:rank], u_big)


def krylov_svd(w: jax.Array, rank: int, key: jax.Array, n_oversamples: int = KRYLOV_OVERSAMPLES,
               n_steps: int = KRYLOV_STEPS) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Randomized block Krylov (Musco & Musco 2015) built from matmuls, then Rayleigh–Ritz.

  Works on x = the (big, small) orientation of ``w``. Keeps every block of the iteration:
  z = orth[Ω, (xᵀx)Ω, …, (xᵀx)^q Ω] with Ω (small, b) Gaussian, q = ``n_steps`` and
  b = ceil(K / (q + 1)) for K = rank + ``n_oversamples`` columns; each new block is
  orthogonalised against the basis so far (two block Gram–Schmidt passes, then a Householder
  QR of the block). An eigh of (x z)ᵀ(x z) then keeps the leading rank + ``GRAM_OVERSAMPLES``
  directions of span(z), for the reason :func:`gram_svd` gives (it only has to separate the
  top ``rank`` from directions 32 further down), and the SVD of x restricted to them ends as
  :func:`randomized_svd` does: the SVD of a (K, K) R at K = rank + 704 would be most of the
  cost, single-threaded in LAPACK.
  Where the basis would fill the small side it is :func:`gram_svd` (no random draw): a
  CholeskyQR of the whole weight loses the leading subspace's accuracy on ill-conditioned real
  weights (tail 1.03x the optimum on Qwen2.5-Coder-0.5B's 896 x 896 q_proj at r 320). The products with x cost 4·m·n·b·q + 2·m·n·K against
  randomized's (2q + 1)·2·m·n·(rank + p): at equal accuracy on these spectra K must be
  larger (its final CholeskyQR then costs more), so it wins on big square and wide weights.
  """
  m, n = w.shape
  x = w if m >= n else w.T  # (big, small)
  small = x.shape[1]
  k = min(rank + n_oversamples, small)
  b = -(-k // (n_steps + 1))
  if b * (n_steps + 1) >= small:  # the basis would fill the small side: decompose the whole weight
    return gram_svd(w, rank)
  blocks = [jnp.linalg.qr(jax.random.normal(key, (small, b), dtype=x.dtype))[0]]
  for _ in range(n_steps):
    y = mm(x.T, mm(x, blocks[-1]))
    basis = jnp.concatenate(blocks, axis=1)
    for _ in range(2):
      y = y - mm(basis, mm(basis.T, y))
    blocks.append(jnp.linalg.qr(y)[0])
  z = jnp.concatenate(blocks, axis=1)[:, :k]
  xz = mm(x, z)
  keep = min(rank + GRAM_OVERSAMPLES, k)
  if keep < k:  # as gram does: eigh of (x z)ᵀ(x z) picks the leading rank + 32 of the k directions
    _, evecs = jnp.linalg.eigh(mm(xz.T, xz))  # ascending
    lead = evecs[:, ::-1][:, :keep]
    z, xz = mm(z, lead), mm(xz, lead)
  q, r = cholesky_qr(xz, passes=3)
  u_r, s, v_rt = jnp.linalg.svd(r, full_matrices=False)
  u_big, v_small = mm(q, u_r[:, :rank]), mm(z, v_rt[:rank].T)
  return (u_big, s[:rank], v_small) if m >= n else (v_small, s[:rank], u_big)


def krylov_fills(shape: tuple[int, int], rank: int) -> bool:
  """Whether krylov's basis at its setting would fill the small side of ``shape`` (it then is
  :func:`gram_svd`, no random draw)."""
  k = min(rank + KRYLOV_OVERSAMPLES, min(shape))
  return -(-k // (KRYLOV_STEPS + 1)) * (KRYLOV_STEPS + 1) >= min(shape)


def flops(method: str, shape: tuple[int, int], rank: int, *, n_oversamples: int = 0, n_power_iter: int = 0) -> float:
  """Leading-term flop count of one decomposition (see the module docstring); for benchmarks."""
  m, n = max(shape), min(shape)
  if method == "exact":
    return 6.0 * m * n * n + 20.0 * n ** 3
  if method == "gram":
    k = min(rank + GRAM_OVERSAMPLES, n)
    return 2.0 * m * n * n + 9.0 * n ** 3 + 2.0 * m * n * k + 4.0 * m * k * k + 20.0 * k ** 3
  if method == "randomized":
    k = min(rank + n_oversamples, n)
    # CholeskyQR: one pass per iteration on each side, three at the end; a pass on (d, k) is ~4dk²
    qr = (n_power_iter + 3) * 4.0 * m * k * k + (n_power_iter + 2) * 4.0 * n * k * k
    return (2 * n_power_iter + 1) * 2.0 * m * n * k + qr + 20.0 * k ** 3
  if method == "krylov":
    k = min(rank + KRYLOV_OVERSAMPLES, n)
    b = -(-k // (KRYLOV_STEPS + 1))
    if krylov_fills(shape, rank):  # gram's decomposition of the whole weight
      return flops("gram", shape, rank)
    products = 4.0 * m * n * b * KRYLOV_STEPS + 2.0 * m * n * k
    reorth = sum(2 * 4.0 * n * b * (j + 1) * b + 4.0 * n * b * b for j in range(KRYLOV_STEPS))
    keep = min(rank + GRAM_OVERSAMPLES, k)  # the eigh that picks rank + 32 of the k directions
    pick = 2.0 * m * k * k + 9.0 * k ** 3 + 2.0 * (m + n) * k * keep if keep < k else 0.0
    return products + reorth + pick + 3 * 4.0 * m * keep * keep + 20.0 * keep ** 3
  raise ValueError(f"method: one of exact, gram, randomized, krylov expected, got {method!r}")


def auto_method(shape: tuple[int, int], rank: int, *, n_oversamples: int = RANDOMIZED_OVERSAMPLES,
                n_power_iter: int = RANDOMIZED_POWER_ITER) -> str:
  """``--svd auto``'s choice for one (out, in) weight: of ``"gram"``, ``"randomized"`` (at
  ``n_oversamples``, ``n_power_iter``) and ``"krylov"``, the one with the least :func:`flops`
  over its :data:`RELATIVE_RATE` (on a tie the earlier in that order); krylov only where its
  basis leaves part of the small side out (:func:`krylov_fills`): otherwise it decomposes the
  whole weight, which gram does for less.

  A function of the weight's shape (either orientation) and rank only, so it is known before
  any weight is read: the cache key, the report and the compiled program use the method it
  names. Krylov wins where its basis is a small part of the small side (the paper target's q/o
  3072 x 3072 and FFN 8192 x 3072 at r 320); gram on thin weights (k/v), on 1536 x 1536 and at
  the real small pair's sizes.

  >>> auto_method((3072, 3072), 320), auto_method((896, 896), 320)
  ('krylov', 'gram')
  """
  return min(auto_costs(shape, rank, n_oversamples=n_oversamples, n_power_iter=n_power_iter).items(),
             key=lambda item: item[1])[0]


def auto_costs(shape: tuple[int, int], rank: int, *, n_oversamples: int = RANDOMIZED_OVERSAMPLES,
               n_power_iter: int = RANDOMIZED_POWER_ITER) -> dict[str, float]:
  """The solvers :func:`auto_method` weighs for one weight, each with its flops / relative rate."""
  cost = {"gram": flops("gram", shape, rank),
          "randomized": flops("randomized", shape, rank, n_oversamples=n_oversamples, n_power_iter=n_power_iter)}
  if not krylov_fills(shape, rank):
    cost["krylov"] = flops("krylov", shape, rank)
  return {name: value / RELATIVE_RATE[name] for name, value in cost.items()}


def resolve_method(method: str, shape: tuple[int, int], rank: int, *, n_oversamples: int = RANDOMIZED_OVERSAMPLES,
                   n_power_iter: int = RANDOMIZED_POWER_ITER) -> str:
  """The solver ``method`` names for one (out, in) weight: ``"auto"`` becomes :func:`auto_method`'s
  choice at these options, any other name stays as it is."""
  if method != AUTO:
    return method
  return auto_method(tuple(shape), rank, n_oversamples=n_oversamples, n_power_iter=n_power_iter)
