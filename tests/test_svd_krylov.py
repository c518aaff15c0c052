"""``--svd krylov``: randomized block Krylov + Rayleigh–Ritz (svd_solvers.krylov_svd), its
fixed setting, its cache key, and where ``--svd auto`` takes it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crosslora_jax.core import cache, kernels, svd_solvers


def _decaying(rng, m, n, s):
  u, _ = np.linalg.qr(rng.standard_normal((m, len(s))))
  v, _ = np.linalg.qr(rng.standard_normal((n, len(s))))
  return ((u * s) @ v.T).astype(np.float32)


def _tail(w, u):
  """‖W − U Uᵀ W‖²_F."""
  w = np.asarray(w, np.float64)
  u = np.asarray(u, np.float64)
  return float(np.sum(w ** 2) - np.sum((u.T @ w) ** 2))


@pytest.mark.parametrize("shape", [(40, 30), (30, 40)])
def test_block_krylov_finds_the_leading_subspace_in_either_orientation(shape):
  rng = np.random.default_rng(0)
  w = _decaying(rng, *shape, 0.7 ** np.arange(30))
  # rank 6 + 12 columns from 3 steps: blocks of 5, a basis of 18 of the 30 directions
  u, s, v = svd_solvers.krylov_svd(jnp.asarray(w), 6, jax.random.key(1), n_oversamples=12, n_steps=3)
  eu, es, evt = np.linalg.svd(w)
  np.testing.assert_allclose(np.asarray(s), es[:6], rtol=1e-3)
  np.testing.assert_allclose(np.abs(np.asarray(u).T @ eu[:, :6]), np.eye(6), atol=1e-3)
  np.testing.assert_allclose(np.abs(np.asarray(v).T @ evt[:6].T), np.eye(6), atol=1e-3)


def test_the_default_setting_keeps_the_tail_within_one_percent_of_the_optimum():
  # A slowly decaying spectrum like real weights' (power-law head over a flat bulk), where the
  # basis does not fill the small side: rank 20 + 704 columns in blocks of 121, 726 < 800.
  rng = np.random.default_rng(2)
  n = 800
  f = np.arange(n) / (n - 1)
  s = np.maximum(1.0 / (1.0 + 40 * f) ** 0.45, 0.05)
  w = _decaying(rng, 900, n, s)
  rank = 20
  assert -(-(rank + svd_solvers.KRYLOV_OVERSAMPLES) // (svd_solvers.KRYLOV_STEPS + 1)) * (svd_solvers.KRYLOV_STEPS + 1) < n
  sub = kernels.truncated_svd(jnp.asarray(w), jax.random.key(0), rank=rank, method="krylov")
  u, v = np.asarray(sub.u), np.asarray(sub.v)
  np.testing.assert_allclose(u.T @ u, np.eye(rank), atol=1e-4)
  np.testing.assert_allclose(v.T @ v, np.eye(rank), atol=1e-4)
  optimum = float(np.sum(s[rank:].astype(np.float64) ** 2))
  assert _tail(w, u) / optimum <= 1.01
  np.testing.assert_allclose(np.asarray(sub.s), s[:rank], rtol=2e-3)
  # the key is used: another draw, another (as accurate) basis
  other = kernels.truncated_svd(jnp.asarray(w), jax.random.key(1), rank=rank, method="krylov")
  assert not np.array_equal(np.asarray(other.u), u)
  assert _tail(w, np.asarray(other.u)) / optimum <= 1.01
  with pytest.raises(ValueError, match="needs a PRNG key"):
    kernels.truncated_svd(jnp.asarray(w), rank=rank, method="krylov")


def test_where_the_basis_would_fill_the_small_side_it_is_gram():
  rng = np.random.default_rng(3)
  w = rng.standard_normal((50, 24)).astype(np.float32)
  got = kernels.truncated_svd(jnp.asarray(w), jax.random.key(0), rank=5, method="krylov")
  gram = kernels.truncated_svd(jnp.asarray(w), rank=5, method="gram")
  assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(got, gram))
  want = kernels.truncated_svd(jnp.asarray(w), rank=5, method="exact")
  np.testing.assert_allclose(np.asarray(got.s), np.asarray(want.s), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(got.u), np.asarray(want.u), atol=1e-4)  # signs canonicalised alike


def test_a_zero_or_rank_deficient_weight_gives_finite_factors():
  for w in (np.zeros((60, 40), np.float32), np.outer(np.arange(60.0), np.ones(40)).astype(np.float32)):
    u, s, v = svd_solvers.krylov_svd(jnp.asarray(w), 4, jax.random.key(0), n_oversamples=4, n_steps=2)
    assert all(np.isfinite(np.asarray(x)).all() for x in (u, s, v))


def test_the_cache_key_holds_krylovs_own_setting_not_randomizeds_options():
  make = lambda p, q: cache.EntryKey.make("m", "q_proj", 3, (3072, 3072), rank=320, method="krylov", seed=1,  # noqa: E731
                                          n_oversamples=p, n_power_iter=q)
  key = make(64, 6)
  assert (key.seed, key.n_oversamples, key.n_power_iter) == (1, svd_solvers.KRYLOV_OVERSAMPLES, svd_solvers.KRYLOV_STEPS)
  assert make(10, 2) == key
  assert f"-krylov-s1-p{svd_solvers.KRYLOV_OVERSAMPLES}-q{svd_solvers.KRYLOV_STEPS}-" in key.filename()
  gram = cache.EntryKey.make("m", "q_proj", 3, (3072, 3072), rank=320, method="gram", seed=1, n_oversamples=64,
                             n_power_iter=6)
  assert gram.seed is None and gram.n_oversamples is None


def test_its_flop_count_is_what_auto_weighs():
  # results/paper_svd.json: at r 320 the target's q/o 3072 x 3072 ~76 GFLOP against randomized
  # 64/6's 126 and gram's 328; the real pair's shapes stay with gram.
  cost = {m: svd_solvers.flops(m, (3072, 3072), 320, n_oversamples=64, n_power_iter=6)
          for m in ("gram", "randomized", "krylov")}
  assert cost["krylov"] < cost["randomized"] < cost["gram"]
  assert svd_solvers.auto_costs((3072, 3072), 320)["krylov"] < svd_solvers.auto_costs((3072, 3072), 320)["randomized"]
  assert svd_solvers.auto_method((3072, 3072), 320) == "krylov"
  assert svd_solvers.auto_method((896, 896), 320) == "gram"
  # where the basis would be as wide as the small side, krylov is gram
  assert svd_solvers.flops("krylov", (900, 300), 20) == svd_solvers.flops("gram", (900, 300), 20)
