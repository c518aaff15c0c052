"""Few compiled programs: one decomposition per distinct weight shape, shared across modules
and models; a second adapter with a warm subspace cache compiles nothing."""

from __future__ import annotations

import numpy as np

from crosslora_jax import DictWeights, TransferConfig
from crosslora_bench.adapters import random_adapter
from crosslora_jax.core import compiles, engine
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
  """What a cold cross_lora run may build: one SVD per (oriented shape, rank) per model, one projection and
  one overlap per oriented shape pair, and the PRNG keys of the (single) batch size."""
  oriented = lambda shape: (max(shape), min(shape))
  ranks = {m: min(RANK, *source.arch.shape(m), *target.arch.shape(m)) for m in modules}
  svds = {(oriented(w.arch.shape(m)), ranks[m]) for w in (source, target) for m in modules}
  pairs = {(oriented(source.arch.shape(m)), oriented(target.arch.shape(m)), ranks[m]) for m in modules}
  return len(svds) + 2 * len(pairs) + 1


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
  assert 0 < cold.count <= limit < 14, (cold.count, limit, sorted(cold.names))
  with compiles.count_compiles() as warm:
    engine.transfer_adapters(source, target, adapters[1:], config)
  assert warm.count == 0, warm.names
