"""``--svd auto``: gram, randomized or krylov per weight shape, by the flop model; its cache entries,
report and compiled programs follow the method each weight actually went through."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import fixtures
from conftest import ROOT
from crosslora_bench.adapters import random_adapter
from crosslora_jax import DictWeights, TransferConfig
from crosslora_jax.core import compiles, engine, kernels, pytree_api, subspaces, svd_solvers
from crosslora_jax.formats.architectures import Architecture

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# (hidden, kv width, FFN width) of the real models' configs
QWEN25_1_5B = dict(model_type="qwen2", num_hidden_layers=28, hidden_size=1536, num_attention_heads=12,
                   num_key_value_heads=2, intermediate_size=8960)
LLAMA32_3B = dict(model_type="llama", num_hidden_layers=28, hidden_size=3072, num_attention_heads=24,
                  num_key_value_heads=8, head_dim=128, intermediate_size=8192)
SMOLLM2_135M = dict(model_type="llama", num_hidden_layers=30, hidden_size=576, num_attention_heads=9,
                    num_key_value_heads=3, intermediate_size=1536)
QWEN25_0_5B = dict(model_type="qwen2", num_hidden_layers=24, hidden_size=896, num_attention_heads=14,
                   num_key_value_heads=2, intermediate_size=4864)


def _choices(source_config, target_config, rank=320):
  """module -> (source method, target method) under auto, at the planner's clipped rank."""
  src, tgt = Architecture.from_config(source_config), Architecture.from_config(target_config)
  out = {}
  for m in MODULES:
    r = min(rank, *src.shape(m), *tgt.shape(m))
    out[m] = (svd_solvers.auto_method(src.shape(m), r), svd_solvers.auto_method(tgt.shape(m), r))
  return out


def test_auto_on_the_paper_pair_takes_the_method_with_the_least_arithmetic():
  got = _choices(QWEN25_1_5B, LLAMA32_3B)
  # results/paper_svd.json: the target's q/o 3072² and gate 8192 x 3072 favour krylov; the source
  # q/o 1536² (gram 0.37 s against randomized 0.56 and krylov 0.59), the thin k/v (full rank 256 on
  # the source) and the source gate 8960 x 1536 favour gram.
  assert got["q_proj"] == got["o_proj"] == ("gram", "krylov")
  assert got["k_proj"] == got["v_proj"] == ("gram", "gram")
  assert got["gate_proj"] == got["up_proj"] == got["down_proj"] == ("gram", "krylov")


def test_auto_on_the_real_small_pair_is_gram_everywhere():
  assert set(_choices(SMOLLM2_135M, QWEN25_0_5B).values()) == {("gram", "gram")}


@pytest.mark.parametrize("shape", [(40, 40), (512, 512), (514, 130), (8960, 1536), (1536, 8960), (3072, 1024)])
@pytest.mark.parametrize("rank", [1, 8, 64, 128])
def test_auto_picks_the_method_with_the_least_weighted_flops_in_either_orientation(shape, rank):
  rank = min(rank, *shape)
  cost = {m: svd_solvers.flops(m, shape, rank, n_oversamples=64, n_power_iter=6) / svd_solvers.RELATIVE_RATE[m]
          for m in ("gram", "randomized", "krylov")}
  choice = svd_solvers.auto_method(shape, rank)
  if svd_solvers.krylov_fills(shape, rank):  # then krylov decomposes the whole weight
    del cost["krylov"]
  assert cost[choice] == min(cost.values()) and cost == svd_solvers.auto_costs(shape, rank)
  assert svd_solvers.auto_method(shape[::-1], rank) == choice
  for named in ("exact", "gram", "randomized", "krylov"):
    assert svd_solvers.resolve_method(named, shape, rank) == named
  assert svd_solvers.resolve_method("auto", shape, rank) == choice


def test_auto_weighs_randomized_at_the_options_it_is_given():
  # Qwen-0.5B q 896 x 896 at r 320 costs gram 9.8 GFLOP, randomized 10/1 5.0 (7.2 weighted), 64/6 18
  assert svd_solvers.auto_method((896, 896), 320) == "gram"
  assert svd_solvers.auto_method((896, 896), 320, n_oversamples=10, n_power_iter=1) == "randomized"


def test_randomized_defaults_are_the_setting_that_meets_the_tail_target():
  cfg = TransferConfig()
  assert (cfg.n_oversamples, cfg.n_power_iter) == (64, 6) == (kernels.DEFAULT_OVERSAMPLES, kernels.DEFAULT_POWER_ITER)


def test_truncated_svd_auto_equals_the_method_it_names_bit_for_bit():
  rng = np.random.default_rng(3)
  key = jax.random.key(5)
  for shape, rank in (((30, 20), 5), ((512, 512), 8)):
    w = rng.standard_normal(shape).astype(np.float32)
    named = svd_solvers.auto_method(shape, rank)
    got = kernels.truncated_svd(w, key, rank=rank, method="auto")
    want = kernels.truncated_svd(w, key, rank=rank, method=named)
    for a, b in zip(got, want):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  w = rng.standard_normal((12, 9)).astype(np.float32)
  a, b = rng.standard_normal((2, 9)).astype(np.float32), rng.standard_normal((12, 2)).astype(np.float32)
  auto = pytree_api.transfer_factors(w, w[:10], a, b, rank=4, svd="auto")
  gram = pytree_api.transfer_factors(w, w[:10], a, b, rank=4, svd="gram")
  np.testing.assert_array_equal(np.asarray(auto.a_ri), np.asarray(gram.a_ri))
  np.testing.assert_array_equal(np.asarray(auto.b_or), np.asarray(gram.b_or))


# --- the engine, on synthetic weights where auto splits: source q 42 x 42 gram, target q 514 x 514 randomized


def _llama(hidden, head_dim, layers=2):
  return dict(model_type="llama", num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=2,
              num_key_value_heads=1, head_dim=head_dim, intermediate_size=24)


def _weights(config, seed, name):
  arch = Architecture.from_config(config)
  rng = np.random.default_rng(seed)
  return DictWeights(config, {arch.weight_key(l, s): rng.standard_normal(arch.stored_shape(s)).astype(np.float32)
                              for l in range(arch.num_layers) for s in arch.spec.stored}, name=name)


RANK = 8


def _run(source, target, adapter, **config):
  """The engine's steps up to projection, so the run's Subspaces and cache counts can be read."""
  cfg = TransferConfig(rank=RANK, chunk_layers=2, **config)
  src, tgt, loaded = engine.open_inputs(source, target, [adapter], cfg)
  run = engine.start_run(src, tgt, loaded, engine.plan_transfers(loaded, src, tgt, cfg), cfg)
  engine.project_all(run, None)
  return run, engine.build_results(run, seconds=0.0)[0]


def test_auto_splits_methods_inside_one_program_and_reports_them(tmp_path):
  source, target = _weights(_llama(42, 21), 0, "source"), _weights(_llama(516, 258), 1, "target")
  assert svd_solvers.auto_method((42, 42), RANK) == "gram" and svd_solvers.auto_method((516, 516), RANK) == "randomized"
  adapter = random_adapter(source.arch, seed=2, rank=2, alpha=4, modules=("q_proj",))
  with compiles.count_compiles() as cold:
    _, result = _run(source, target, adapter, svd="auto", cache_dir=None)
  # one decomposition program for both models (gram for one stack, randomized for the other)
  # and one projection: the count a gram run has for one shape pair
  assert 0 < cold.count <= 2, sorted(cold.names)
  assert sum("truncated_svds" in name for name in cold.names) == 1, cold.names
  entries = result.report.entries
  assert {(e["svd_source"], e["svd_target"]) for e in entries} == {("gram", "randomized")}
  groups = result.report.summary["svd_by_shape"]
  assert groups == [{"modules": ["q_proj"], "source_shape": [42, 42], "target_shape": [516, 516], "rank": RANK,
                     "svd_source": "gram", "svd_target": "randomized"}]
  assert "svd auto: q_proj 42x42 gram -> 516x516 randomized" in result.report.text()
  assert json.loads(result.report.to_json())["summary"]["svd_by_shape"] == groups


def test_auto_cache_entries_are_the_used_methods_entries(tmp_path):
  source, target = _weights(_llama(42, 21), 3, "source"), _weights(_llama(514, 257), 4, "target")
  adapter = random_adapter(source.arch, seed=5, rank=2, alpha=4, modules=("q_proj", "k_proj"))
  cache = str(tmp_path / "cache")
  n_layers = 2 * 2  # q_proj and k_proj, 2 layers each model
  gram, gram_result = _run(source, target, adapter, svd="gram", cache_dir=cache)
  assert gram.subspaces_source.computed == gram.subspaces_target.computed == n_layers
  auto, auto_result = _run(source, target, adapter, svd="auto", cache_dir=cache)
  assert [svd_solvers.auto_method(target.arch.shape(m), RANK) for m in ("q_proj", "k_proj")] == ["randomized", "gram"]
  # every source weight and the target's k_proj: gram's entries, read back; the target's q_proj: new, randomized
  assert auto.subspaces_source.loaded == n_layers and auto.subspaces_source.computed == 0
  assert auto.subspaces_target.loaded == 2 and auto.subspaces_target.computed == 2
  written = sorted(p.name for p in (tmp_path / "cache").rglob("q_proj-*randomized*.safetensors"))
  assert len(written) == 2 and all("-randomized-s0-p64-q6-" in name for name in written), written
  rand, _ = _run(source, target, adapter, svd="randomized", cache_dir=cache)
  # auto's randomized entries (target q) are randomized's own; nothing else was randomized before
  assert (rand.subspaces_target.loaded, rand.subspaces_target.computed) == (2, 2)
  assert (rand.subspaces_source.loaded, rand.subspaces_source.computed) == (0, n_layers)
  # without a cache: one program for both models' chunk, each stack by its own method, equals
  # each model's weights decomposed alone by the method auto named for them, bit for bit
  runs = {svd: _run(source, target, adapter, svd=svd, cache_dir=None)[0] for svd in ("auto", "gram", "randomized")}
  for module in ("q_proj", "k_proj"):
    pair = (runs["auto"].subspaces_source, runs["auto"].subspaces_target)
    for subs in pair:
      subs.release(module)
    together = subspaces.get_together([(subs, [0, 1]) for subs in pair], module, RANK)
    for side, got in zip(("source", "target"), together):
      named = getattr(runs["auto"], f"subspaces_{side}").svd_method(module, RANK)
      alone = getattr(runs[named], f"subspaces_{side}")
      alone.release(module)
      for a, b in zip(got, alone.get(module, [0, 1], RANK)):
        np.testing.assert_array_equal(a, b)
  assert auto_result.report.summary["svd_by_shape"] != gram_result.report.summary["svd_by_shape"]


# --- the CLI on the tiny fixtures: auto picks gram everywhere, so its adapter is gram's byte for byte


def _cli(*args, cache):
  env = dict(os.environ, PYTHONPATH=str(ROOT), CROSSLORA_CACHE=str(cache))
  return subprocess.run([sys.executable, "-m", "crosslora_jax.transfer", *map(str, args)],
                        capture_output=True, text=True, env=env, timeout=300)


def test_cli_svd_auto_writes_gram_bytes_on_small_shapes(tmp_path):
  src = fixtures.make_model("llama", tmp_path / "src", seed=0)
  fixtures.make_model("qwen2", tmp_path / "tgt", seed=1)
  fixtures.make_adapter(src, tmp_path / "lora", kind="llama", r=4, seed=1)
  outputs = {}
  for svd in ("gram", "auto"):
    out = tmp_path / svd
    r = _cli("--source_model", tmp_path / "src", "--target_model", tmp_path / "tgt", "--adapter", tmp_path / "lora",
             "--output", out, "--report", tmp_path / f"{svd}.json", "--svd", svd, "--rank", "24", "--noprogress",
             cache=tmp_path / f"cache-{svd}")  # each computes its own subspaces
    assert r.returncode == 0, r.stderr
    outputs[svd] = (out / "adapter_model.safetensors").read_bytes(), json.loads((tmp_path / f"{svd}.json").read_text())
    assert f"svd {svd}: q_proj/o_proj 64x64 gram -> 80x80 gram" in r.stdout, r.stdout
  assert outputs["auto"][0] == outputs["gram"][0]
  groups = outputs["auto"][1]["summary"]["svd_by_shape"]
  assert {g["svd_source"] for g in groups} == {g["svd_target"] for g in groups} == {"gram"}
  assert sorted(m for g in groups for m in g["modules"]) == sorted(MODULES)
  r = _cli("--source_model", tmp_path / "src", "--target_model", tmp_path / "tgt", "--adapter", tmp_path / "lora",
           "--output", tmp_path / "bad", "--svd", "fastest", cache=tmp_path / "cache-bad")
  assert r.returncode == 2 and "auto" in r.stderr and "Traceback" not in r.stderr
