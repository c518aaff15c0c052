"""The fast truncated SVDs and the many-adapter kernels, against numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from crosslora_bench.adapters import random_adapter
from crosslora_jax.core import kernels


def _rand(rng, *shape):
  return rng.standard_normal(shape).astype(np.float32)


def _with_spectrum(rng, m, n, s):
  """An (m, n) float32 matrix with singular values ``s`` (len min(m, n)) and random vectors."""
  u, _ = np.linalg.qr(rng.standard_normal((m, len(s))))
  v, _ = np.linalg.qr(rng.standard_normal((n, len(s))))
  return ((u * s) @ v.T).astype(np.float32)


def _sub(w, rank, method, seed=0, **kw):
  return kernels.truncated_svd(jnp.asarray(w), jax.random.key(seed), rank=rank, method=method, **kw)


@pytest.mark.parametrize("shape", [(48, 20), (20, 48)])
def test_gram_keeps_tiny_singular_values_and_orthonormal_vectors(shape):
  # σ from 1 down to 1e-6: eigh of the Gram matrix cannot resolve σ² below eps,
  # so U = W v / σ used to be noise (or zero columns) there.
  rng = np.random.default_rng(0)
  s_true = np.concatenate([np.geomspace(1.0, 1e-2, 14), [1e-4, 1e-5, 3e-6, 1e-6, 5e-7, 1e-7]])
  w = _with_spectrum(rng, *shape, s_true)
  s_ref = np.linalg.svd(w.astype(np.float64), compute_uv=False)
  sub = _sub(w, 20, "gram")
  u, v = np.asarray(sub.u, np.float64), np.asarray(sub.v, np.float64)
  np.testing.assert_allclose(u.T @ u, np.eye(20), atol=1e-5)
  np.testing.assert_allclose(v.T @ v, np.eye(20), atol=1e-5)
  np.testing.assert_allclose(sub.s, s_ref[:20], atol=2e-6)  # absolute, relative to σ₀ = 1
  np.testing.assert_allclose((u * np.asarray(sub.s)) @ v.T, w, atol=2e-6)


def test_randomized_power_iterations_converge_to_the_exact_subspace():
  # A slowly decaying spectrum, like an FFN weight: one pass is far off, more passes close in.
  rng = np.random.default_rng(1)
  w = _with_spectrum(rng, 300, 120, 1.0 / (1.0 + np.arange(120)) ** 0.5)
  exact = _sub(w, 10, "exact")
  angles = [float(kernels.largest_principal_angle(exact.u, _sub(w, 10, "randomized", n_power_iter=q,
                                                                n_oversamples=10).u)) for q in (0, 2, 8)]
  assert angles[0] > 0.3  # radians: plain range finder is poor here
  assert angles[0] > angles[1] > angles[2]
  assert angles[2] < 0.1
  exact_s = np.asarray(exact.s)
  np.testing.assert_allclose(_sub(w, 10, "randomized", n_power_iter=8).s, exact_s, rtol=2e-3)


@pytest.mark.parametrize("method", ["gram", "randomized"])
def test_full_rank_request_equals_exact(method):
  rng = np.random.default_rng(2)
  w = _rand(rng, 30, 12)
  exact, fast = _sub(w, 12, "exact"), _sub(w, 12, method)
  np.testing.assert_allclose(fast.s, exact.s, rtol=1e-4)
  np.testing.assert_allclose(fast.u, exact.u, atol=1e-4)  # same signs too (canonicalised)
  np.testing.assert_allclose(fast.v, exact.v, atol=1e-4)
  np.testing.assert_allclose(fast.energy, 1.0, rtol=1e-5)


def test_randomized_depends_on_the_key_only_through_accuracy():
  rng = np.random.default_rng(3)
  w = _with_spectrum(rng, 60, 40, 0.6 ** np.arange(40))
  a, b = _sub(w, 5, "randomized", seed=0), _sub(w, 5, "randomized", seed=1)
  np.testing.assert_allclose(a.u, b.u, atol=1e-4)
  with pytest.raises(ValueError, match="PRNG key"):
    kernels.truncated_svd(jnp.asarray(w), rank=5, method="randomized")
  with pytest.raises(ValueError, match="rank"):
    _sub(w, 41, "exact")


def test_largest_principal_angle_matches_scipy():
  rng = np.random.default_rng(4)
  u1, _ = np.linalg.qr(_rand(rng, 50, 6))
  u2, _ = np.linalg.qr(u1 + 0.05 * _rand(rng, 50, 6))
  want = scipy.linalg.subspace_angles(u1.astype(np.float64), u2.astype(np.float64)).max()
  got = float(kernels.largest_principal_angle(jnp.asarray(u1), jnp.asarray(u2)))
  assert got == pytest.approx(want, rel=1e-3)
  assert float(kernels.largest_principal_angle(jnp.asarray(u1), jnp.asarray(u1))) < 1e-3


def test_lowrank_relative_difference_matches_dense():
  rng = np.random.default_rng(5)
  a1, b1, a2, b2 = _rand(rng, 3, 20), _rand(rng, 15, 3), _rand(rng, 4, 20), _rand(rng, 15, 4)
  want = np.linalg.norm(b1 @ a1 - b2 @ a2) / np.linalg.norm(b1 @ a1)
  got = float(kernels.lowrank_relative_difference(*map(jnp.asarray, (a1, b1, a2, b2))))
  assert got == pytest.approx(want, rel=1e-4)


def test_batched_svd_is_per_layer_and_compiles_once():
  rng = np.random.default_rng(6)
  w = _rand(rng, 3, 24, 16)
  keys = jax.random.split(jax.random.key(7), 3)
  kw = dict(rank=4, method="randomized", n_oversamples=3, n_power_iter=1)
  before = kernels.batched_truncated_svd._cache_size()
  batched = kernels.batched_truncated_svd(jnp.asarray(w), keys, **kw)
  kernels.batched_truncated_svd(jnp.asarray(w + 1), keys, **kw)
  assert kernels.batched_truncated_svd._cache_size() == before + 1  # no retrace for new values
  for l in range(3):
    one = kernels.truncated_svd(jnp.asarray(w[l]), keys[l], **kw)
    np.testing.assert_allclose(batched.u[l], one.u, atol=1e-5)
  # A layer's result does not depend on its bucket-mates.
  pair = kernels.batched_truncated_svd(jnp.asarray(w[1:]), keys[1:], **kw)
  np.testing.assert_allclose(pair.u[0], batched.u[1], atol=1e-5)


def test_overlap_of_truncated_rows_matches_qr_reference():
  rng = np.random.default_rng(8)
  u_s, _ = np.linalg.qr(_rand(rng, 30, 5))
  u_t, _ = np.linalg.qr(_rand(rng, 40, 5))
  u_t[:30] += 0.8 * u_s  # related, then cut to the first 30 rows
  q_s, _ = np.linalg.qr(u_s)
  q_t, _ = np.linalg.qr(u_t[:30])
  ov = np.sum((q_s.T @ q_t) ** 2) / 5
  want = (ov - 5 / 30) / (1 - 5 / 30)
  assert float(kernels.subspace_overlap(jnp.asarray(u_s), jnp.asarray(u_t))) == pytest.approx(want, abs=1e-4)


# --- many adapters ------------------------------------------------------------------


def _tiny_models():
  from crosslora_jax import DictWeights
  from crosslora_jax.formats.architectures import Architecture
  config = dict(model_type="llama", num_hidden_layers=3, hidden_size=16, num_attention_heads=2,
                num_key_value_heads=1, head_dim=8, intermediate_size=24)
  arch = Architecture.from_config(config)

  def weights(seed):
    rng = np.random.default_rng(seed)
    return DictWeights(config, {arch.weight_key(l, s): _with_spectrum(rng, *arch.stored_shape(s),
                                                                        1.0 + 0.5 * np.arange(min(arch.stored_shape(s)))[::-1])
                                for l in range(arch.num_layers) for s in arch.spec.stored})
  return weights(0), weights(1)


def _adapter(arch, seed, r, layers=None, modules=("q_proj", "up_proj")):
  return random_adapter(arch, seed=seed, rank=r, modules=modules, layers=layers)


@pytest.mark.parametrize("method", ["cross_lora", "truncate_pad"])
def test_batch_of_adapters_equals_one_by_one(monkeypatch, method):
  from crosslora_jax import TransferConfig
  from crosslora_jax.core import engine
  source, target = _tiny_models()
  adapters = [_adapter(source.arch, 1, 2), _adapter(source.arch, 2, 2), _adapter(source.arch, 3, 3),
              _adapter(source.arch, 4, 2, layers=[0, 2])]
  calls = []
  real = kernels.project_cross_lora_adapters_and_overlaps

  def spy(sub_s, sub_t, a, b, **kw):
    calls.append(a.shape[:2])  # (adapters, layers)
    return real(sub_s, sub_t, a, b, **kw)

  monkeypatch.setattr(kernels, "project_cross_lora_adapters_and_overlaps", spy)
  config = TransferConfig(rank=4, method=method, svd="randomized", chunk_layers=8)
  together = engine.transfer_adapters(source, target, adapters, config)
  if method == "cross_lora":
    # Per module: the two rank-2 adapters on all layers in one call; rank 3 and the
    # layer subset each on their own.
    assert sorted(calls) == sorted([(2, 3), (1, 3), (1, 2)] * 2)
  for adapter, batched in zip(adapters, together):
    alone = engine.transfer_adapters(source, target, [adapter], config)[0]
    assert alone.adapter.config == batched.adapter.config
    assert alone.adapter.modules.keys() == batched.adapter.modules.keys()
    for path, pair in alone.adapter.modules.items():
      np.testing.assert_allclose(batched.adapter.modules[path].a_ri, pair.a_ri, rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(batched.adapter.modules[path].b_or, pair.b_or, rtol=1e-5, atol=1e-6)
    for e1, e2 in zip(alone.report.entries, batched.report.entries, strict=True):
      assert e1.keys() == e2.keys()
      for k, v in e1.items():
        if k != "seconds":
          assert e2[k] == (pytest.approx(v, rel=1e-5, abs=1e-6) if isinstance(v, float) else v), k
