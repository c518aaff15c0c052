"""Few compiled programs: one decomposition per distinct weight shape, shared across modules
and models; a second adapter with a warm subspace cache compiles nothing."""

from __future__ import annotations

import numpy as np

from crosslora_jax import DictWeights, TransferConfig
from crosslora_bench.adapters import random_adapter
from crosslora_jax.core import compiles, engine, kernels
from crosslora_jax.formats.architectures import Architecture

# Odd sizes no other test uses, so that no program is already in this process's jit caches.
SOURCE = dict(model_type="llama", num_hidden_layers=3, hidden_size=22, num_attention_heads=2,
              num_key_value_heads=1, head_dim=11, intermediate_size=37)
TARGET = dict(model_type="llama", num_hidden_layers=4, hidden_size=26, num_attention_heads=2,
              num_key_value_heads=1, head_dim=13, intermediate_size=41)
RANK = 6


def _weights(config, seed, name):
  arch = Architecture.from_config(config)
  rng = np.random.default_rng(seed)
  return DictWeights(config, {arch.weight_key(l, s): rng.standard_normal(arch.stored_shape(s)).astype(np.float32)
                              for l in range(arch.num_layers) for s in arch.spec.stored}, name=name)


def _expected_programs(source: DictWeights, target: DictWeights, modules) -> int:
  """What a cold cross_lora run may build: per oriented shape pair (q/o, k/v, gate/up/down) one
  program decomposing a chunk of both models (PRNG keys made inside) and one projecting the
  adapters and the report's overlaps."""
  oriented = lambda shape: (max(shape), min(shape))
  ranks = {m: min(RANK, *source.arch.shape(m), *target.arch.shape(m)) for m in modules}
  pairs = {(oriented(source.arch.shape(m)), oriented(target.arch.shape(m)), ranks[m]) for m in modules}
  return 2 * len(pairs)


def test_cold_run_compiles_one_program_per_shape_and_a_second_adapter_none(tmp_path):
  source, target = _weights(SOURCE, 0, "source"), _weights(TARGET, 1, "target")
  modules = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
  adapters = [random_adapter(source.arch, seed=s, rank=2, alpha=4, modules=modules) for s in (2, 3)]
  config = TransferConfig(rank=RANK, chunk_layers=4, cache_dir=str(tmp_path / "cache"))
  with compiles.count_compiles() as cold:
    first = engine.transfer_adapters(source, target, adapters[:1], config)[0]
  assert len(first.adapter.modules) == 7 * TARGET["num_hidden_layers"]
  limit = _expected_programs(source, target, modules)
  # 7 modules x 2 models would be 14 decompositions alone; shapes repeat (q/o, k/v, gate/up/down)
  assert limit == 6 and 0 < cold.count <= limit, (cold.count, limit, sorted(cold.names))
  with compiles.count_compiles() as warm:
    engine.transfer_adapters(source, target, adapters[1:], config)
  assert warm.count == 0, warm.names


def _subspace(rng, m, n, r):
  import jax
  from crosslora_jax.core import kernels
  w = rng.standard_normal((m, n)).astype(np.float32)
  return w, kernels.truncated_svd(w, jax.random.key(0), rank=r, method="exact")


def test_wide_weights_share_the_transposed_programs_and_give_the_same_numbers():
  """Projection and overlap of a wide (out < in) pair, done as its transpose, equal the direct maths."""
  import jax
  from crosslora_jax.core import kernels
  rng = np.random.default_rng(4)
  (_, s_sub), (_, t_sub) = _subspace(rng, 9, 21, 5), _subspace(rng, 12, 30, 5)
  stack = lambda sub: jax.tree.map(lambda x: np.stack([np.asarray(x)] * 2), sub)  # L = 2
  a = rng.standard_normal((3, 2, 4, 21)).astype(np.float32)  # (N, L, rank, in_s)
  b = rng.standard_normal((3, 2, 9, 4)).astype(np.float32)  # (N, L, out_s, rank)
  got = kernels.project_cross_lora_adapters(stack(s_sub), stack(t_sub), a, b)
  for n in range(3):
    want = kernels.project_cross_lora(s_sub, t_sub, a[n, 1], b[n, 1])
    np.testing.assert_allclose(got.a_ri[n, 1], want.a_ri, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got.b_or[n, 1], want.b_or, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got.norm_ratio[n, 1], want.norm_ratio, rtol=1e-5)
  overlap = kernels.pair_overlaps(stack(s_sub), stack(t_sub))
  want = (float(kernels.subspace_overlap(s_sub.u, t_sub.u)) + float(kernels.subspace_overlap(s_sub.v, t_sub.v))) / 2
  np.testing.assert_allclose(overlap, [want, want], rtol=1e-5, atol=1e-6)


def test_a_wide_weight_decomposed_transposed_equals_its_own_svd(tmp_path):
  """Subspaces decomposes down_proj (out < in) as its transpose: same subspace and signs as truncated_svd."""
  import jax
  from crosslora_jax.core import kernels
  from crosslora_jax.core.subspaces import Subspaces, canonical_signs
  source = _weights(SOURCE, 5, "source")
  for method in ("exact", "gram"):
    config = TransferConfig(rank=RANK, svd=method, cache_dir=None)
    subs = Subspaces(source, config).get("down_proj", [0, 2], RANK)
    for row, layer in enumerate((0, 2)):
      w = np.asarray(source.weight(layer, "down_proj"))
      assert w.shape[0] < w.shape[1]
      want = kernels.truncated_svd(w, jax.random.key(0), rank=RANK, method=method)
      np.testing.assert_allclose(subs.s[row], want.s, rtol=1e-4)
      np.testing.assert_allclose(np.abs(subs.u[row].T @ np.asarray(want.u)), np.eye(RANK), atol=2e-3)
      np.testing.assert_allclose(subs.u[row], want.u, atol=2e-3)  # same sign rule: u's largest entry positive
  u = np.random.default_rng(1).standard_normal((2, 7, 3)).astype(np.float32)
  v = np.random.default_rng(2).standard_normal((2, 5, 3)).astype(np.float32)
  got_u, got_v = canonical_signs(u, v)
  for l in range(2):
    want_u, want_v = kernels.canonicalize_signs(u[l], v[l])
    np.testing.assert_array_equal(got_u[l], want_u)
    np.testing.assert_array_equal(got_v[l], want_v)


def test_prefetch_reads_each_weight_once_and_the_report_splits_the_time(tmp_path):
  source, target = _weights(SOURCE, 0, "source"), _weights(TARGET, 1, "target")
  reads: dict[tuple[int, str], int] = {}
  for base in (source, target):
    real = base.weight

    def counted(layer, module, _real=real, _name=base.name):
      reads[(_name, layer, module)] = reads.get((_name, layer, module), 0) + 1
      return _real(layer, module)

    base.weight = counted
  adapter = random_adapter(source.arch, seed=2, rank=2, alpha=4, modules=("q_proj", "down_proj"))
  config = TransferConfig(rank=RANK, chunk_layers=1, cache_dir=str(tmp_path / "cache"))  # 4 chunks: prefetch at work
  result = engine.transfer_adapters(source, target, [adapter], config)[0]
  assert reads and max(reads.values()) == 1, reads
  assert {name for name, _, _ in reads} == {"source", "target"}
  timing = result.report.to_dict()["timing"]
  assert set(timing) == {"read", "decompose", "project", "other"} and min(timing.values()) >= 0
  assert timing["decompose"] > 0 and timing["project"] > 0


def test_two_models_in_one_program_give_each_model_its_own_numbers():
  """batched_truncated_svds of a source and a target stack (keys made inside) equals each stack
  alone through batched_truncated_svd with subspaces.layer_keys, bit for bit."""
  from crosslora_jax.core import kernels
  from crosslora_jax.core.subspaces import layer_keys, module_index
  rng = np.random.default_rng(8)
  w_s = rng.standard_normal((3, 29, 17)).astype(np.float32)
  w_t = rng.standard_normal((3, 33, 19)).astype(np.float32)
  layers_s, layers_t = [0, 2, 2], [1, 2, 3]
  for method in ("gram", "randomized"):
    kw = dict(rank=5, method=method, n_oversamples=3, n_power_iter=1)
    both = kernels.batched_truncated_svds((w_s, w_t), (np.uint32(layers_s), np.uint32(layers_t)), np.uint32(4),
                                          np.uint32(module_index("k_proj")), **kw)
    for got, w, layers in zip(both, (w_s, w_t), (layers_s, layers_t)):
      alone = kernels.batched_truncated_svd(w, layer_keys(4, "k_proj", layers), **kw)
      for a, b in zip(got, alone):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_bf16_stack_is_upcast_one_layer_at_a_time():
  """Through sharding.truncated_svd_stacks a bf16 stack gives the numbers of its float32 upcast, bit
  for bit, and its program holds no float32 copy of the whole stack (XLA's CPU backend upcasts a
  bf16 loop operand whole: 1.25x the stack's float32 size in temporaries before the fix)."""
  import jax
  import jax.numpy as jnp
  import ml_dtypes
  from crosslora_jax.core import kernels, sharding
  rng = np.random.default_rng(10)
  w = rng.standard_normal((4, 64, 24)).astype(ml_dtypes.bfloat16)
  ids = np.uint32([0, 1, 2, 3])
  got = sharding.truncated_svd_stacks((w,), (ids,), seed=1, module_id=2, mesh=None, rank=6, method="gram")[0]
  want = kernels.batched_truncated_svds((w.astype(np.float32),), (ids,), np.uint32(1), np.uint32(2), rank=6,
                                        method="gram")[0]
  for a, b in zip(got, want):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  spec = jax.ShapeDtypeStruct
  shape, scalar = (8, 1024, 512), spec((), jnp.uint32)
  program = kernels.batched_truncated_svds.lower((spec(shape, jnp.uint16),), (spec((8,), jnp.uint32),), scalar,
                                                 scalar, rank=32, method="gram", bits_of=("bfloat16",)).compile()
  stack_f32 = np.prod(shape) * 4
  assert program.memory_analysis().temp_size_in_bytes < 0.5 * stack_f32


def test_projection_program_gives_the_report_overlaps():
  """The overlaps made beside the projections equal pair_overlaps' own, bit for bit (both orientations)."""
  import jax
  from crosslora_jax.core import kernels
  rng = np.random.default_rng(9)
  for (ms, ns), (mt, nt) in (((21, 9), (30, 12)), ((9, 21), (12, 30))):
    subs = []
    for m, n in ((ms, ns), (mt, nt)):
      s = [_subspace(rng, m, n, 5)[1] for _ in range(2)]
      subs.append(jax.tree.map(lambda *x: np.stack([np.asarray(v) for v in x]), *s))
    a = rng.standard_normal((1, 2, 3, ns)).astype(np.float32)
    b = rng.standard_normal((1, 2, ms, 3)).astype(np.float32)
    proj, overlap = kernels.project_cross_lora_adapters_and_overlaps(subs[0], subs[1], a, b)
    assert overlap.shape == (2,) and np.all(np.abs(overlap) <= 1 + 1e-5)
    np.testing.assert_array_equal(overlap, kernels.pair_overlaps(subs[0], subs[1]))
    np.testing.assert_array_equal(proj.a_ri, kernels.project_cross_lora_adapters(subs[0], subs[1], a, b).a_ri)


def test_take_rows_copies_only_when_the_order_changes():
  from crosslora_jax.core import chunking
  rng = np.random.default_rng(0)
  sub = kernels.Subspace(rng.standard_normal((3, 4, 2)), rng.standard_normal((3, 2)), rng.standard_normal((3, 5, 2)),
                         rng.standard_normal(3))
  assert chunking.take_rows(sub, [0, 1, 2]) is sub
  picked = chunking.take_rows(sub, [2, 0, 0])
  for got, full in zip(picked, sub):
    np.testing.assert_array_equal(got, full[[2, 0, 0]])
