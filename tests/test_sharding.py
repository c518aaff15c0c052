"""Many devices: sharding a bucket's layer axis changes where it runs, not the results.

Four CPU devices need ``XLA_FLAGS`` before JAX starts, so the comparison runs in a
subprocess: the same decomposition and the same whole transfer on a 4-device mesh
and on one device, compared there.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import numpy as np

from crosslora_jax.core import sharding

ROOT = pathlib.Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import jax, numpy as np, pytest
    from crosslora_jax import DictWeights, TransferConfig
    from crosslora_jax.core import engine, kernels, sharding
    from crosslora_bench.adapters import random_adapter
    from crosslora_jax.formats.architectures import Architecture

    assert jax.device_count() == 4, jax.devices()
    mesh = sharding.layer_mesh()
    assert mesh is not None and mesh.devices.size == 4

    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 40, 24)).astype(np.float32)
    keys = jax.random.split(jax.random.key(3), 8)
    for method in ("exact", "gram", "randomized"):
      sharded = sharding.truncated_svd_layers(w, keys, mesh=mesh, rank=5, method=method)
      assert sharded.u.sharding.spec == jax.sharding.PartitionSpec("layers"), sharded.u.sharding
      assert len(sharded.u.sharding.device_set) == 4
      single = kernels.batched_truncated_svd(jax.device_put(w, jax.devices()[0]), keys, rank=5, method=method)
      for a, b in zip(sharded, single):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=2e-5)
    w2 = rng.standard_normal((8, 36, 20)).astype(np.float32)  # two models' stacks in one program
    ids = (np.arange(8, dtype=np.uint32), np.arange(8, dtype=np.uint32)[::-1].copy())
    for method in ("gram", "randomized", ("gram", "randomized")):  # the last: a method per stack (--svd auto)
      sharded = sharding.truncated_svd_stacks((w, w2), ids, seed=3, module_id=1, mesh=mesh, rank=5, method=method)
      single = sharding.truncated_svd_stacks((w, w2), ids, seed=3, module_id=1, mesh=None, rank=5, method=method)
      assert len(sharded[1].u.sharding.device_set) == 4
      for got, want in zip(sharded, single):
        for a, b in zip(got, want):
          np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=2e-5)
    try:
      sharding.truncated_svd_layers(w[:6], keys[:6], mesh=mesh, rank=5, method="exact")
      raise AssertionError("6 layers over 4 devices should be refused")
    except ValueError as e:
      assert "divisible by 4" in str(e)

    config = dict(model_type="llama", num_hidden_layers=5, hidden_size=16, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=8, intermediate_size=24)
    def separated(r, m, n):  # singular values 1, 1.5, 2, ...: a well-defined rank-4 subspace
      k = min(m, n)
      u, _ = np.linalg.qr(r.standard_normal((m, k)))
      v, _ = np.linalg.qr(r.standard_normal((n, k)))
      return ((u * (1.0 + 0.5 * np.arange(k)[::-1])) @ v.T).astype(np.float32)
    def weights(seed):
      arch = Architecture.from_config(config)
      r = np.random.default_rng(seed)
      return DictWeights(config, {arch.weight_key(l, s): separated(r, *arch.stored_shape(s))
                                  for l in range(arch.num_layers) for s in arch.spec.stored})
    source, target = weights(1), weights(2)
    adapter = random_adapter(source.arch, seed=3, rank=2, alpha=4, modules=("q_proj", "down_proj"))
    # 5 layers in chunks of 3 -> SVD batches of 3 padded to 4 (a multiple of the mesh) when sharded.
    runs = [engine.transfer_adapters(source, target, [adapter], TransferConfig(rank=4, svd=svd, chunk_layers=3,
                                                                      shard_layers=shard))[0]
            for svd in ("exact", "randomized") for shard in (True, False)]
    # Exact: the same LAPACK call per matrix, so equal to float32 noise. Randomized: a batch
    # of 1 per device and a batch of 3 on one device round matmuls differently (subspaces
    # agree to ~3e-6, checked above), and the projection of a full-rank random ΔW_s
    # through a rank-4 subspace amplifies that about 30x.
    for (sharded, single), tol in zip((runs[:2], runs[2:]), (1e-5, 1e-3)):
      assert sharded.adapter.modules.keys() == single.adapter.modules.keys()
      for path, pair in single.adapter.modules.items():  # ‖ΔW_sharded − ΔW_single‖_F / ‖ΔW_single‖_F
        other = sharded.adapter.modules[path]
        diff = float(kernels.lowrank_relative_difference(pair.a_ri, pair.b_or, other.a_ri, other.b_or))
        assert diff < tol, (path, diff)
      assert [e["overlap"] for e in sharded.report.entries] == pytest.approx(
          [e["overlap"] for e in single.report.entries], abs=1e-5)
    print("SHARDING-OK")
""")


def test_sharded_equals_single_device():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
             PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "SHARDING-OK" in proc.stdout


def test_one_device_means_no_mesh():
  assert sharding.layer_mesh(jax.devices()[:1]) is None
  assert sharding.round_up(5, None) == 5
  assert sharding.num_shards(None) == 1


def test_buckets_are_even_and_padded_to_the_mesh():
  from crosslora_jax.core import engine
  assert [len(c) for c in engine.even_chunks(list(range(28)), 8)] == [7, 7, 7, 7]
  assert [len(c) for c in engine.even_chunks(list(range(5)), 3)] == [3, 2]
  assert engine.even_chunks([], 8) == []
  assert sum(engine.even_chunks(list(range(30)), 8), []) == list(range(30))
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), (sharding.AXIS,))
  assert sharding.round_up(7, mesh) == 7
