"""The subspace cache: a hit skips the decomposition and changes nothing; a miss, a
corrupt entry or an entry for other options is recomputed, never trusted."""

from __future__ import annotations

import os
import pathlib

import numpy as np
import pytest

from crosslora_jax import DictWeights, TransferConfig
from crosslora_bench.adapters import random_adapter
from crosslora_jax.core import cache, engine, kernels, sharding
from crosslora_jax.formats import peft_format
from crosslora_jax.formats.architectures import Architecture

CONFIG = dict(model_type="llama", num_hidden_layers=2, hidden_size=16, num_attention_heads=2,
              num_key_value_heads=1, head_dim=8, intermediate_size=24)
MODULES = ("q_proj", "down_proj")


def _weights(seed, name, config=CONFIG):
  arch = Architecture.from_config(config)
  rng = np.random.default_rng(seed)
  return DictWeights(config, {arch.weight_key(l, s): rng.standard_normal(arch.stored_shape(s)).astype(np.float32)
                              for l in range(arch.num_layers) for s in arch.spec.stored}, name=name)


def _adapter(arch, seed, r=2):
  return random_adapter(arch, seed=seed, rank=r, alpha=4, modules=MODULES)


@pytest.fixture(scope="module")
def models():
  source, target = _weights(0, "source"), _weights(1, "target")
  return source, target, _adapter(source.arch, 2)


@pytest.fixture
def decompositions(monkeypatch):
  """Counts the weights that go through the SVD kernel."""
  calls = []
  real = sharding.truncated_svd_stacks

  def spy(stacks, layer_ids, **kw):
    calls.append(sum(int(w.shape[0]) for w in stacks))
    return real(stacks, layer_ids, **kw)

  monkeypatch.setattr(sharding, "truncated_svd_stacks", spy)
  return calls


def _run(models, tmp_path, **kw):
  source, target, adapter = models
  config = TransferConfig(**{"rank": 4, "cache_dir": str(tmp_path / "cache"), **kw})
  return engine.transfer_adapters(source, target, [adapter], config)[0]


def _same(r1, r2):
  for path, pair in r1.adapter.modules.items():
    np.testing.assert_array_equal(pair.a_ri, r2.adapter.modules[path].a_ri)
    np.testing.assert_array_equal(pair.b_or, r2.adapter.modules[path].b_or)


def _entries(tmp_path):
  return sorted((tmp_path / "cache").glob("*/*.safetensors"))


def test_miss_then_hit(models, tmp_path, decompositions):
  first = _run(models, tmp_path, svd="randomized")
  assert decompositions  # computed
  n_entries = len(_entries(tmp_path))
  assert n_entries == 2 * 2 * len(MODULES)  # 2 models x 2 layers x 2 modules
  decompositions.clear()
  second = _run(models, tmp_path, svd="randomized")
  assert decompositions == []  # every subspace came from the cache
  _same(first, second)
  assert second.report.entries == [{**e, "seconds": e2["seconds"]}
                                   for e, e2 in zip(first.report.entries, second.report.entries)]
  assert len(_entries(tmp_path)) == n_entries
  assert not list((tmp_path / "cache").glob("*/.*"))  # no temporary files left behind


def test_cached_equals_uncached(models, tmp_path):
  _same(_run(models, tmp_path, svd="exact"),
        engine.transfer_adapters(models[0], models[1], [models[2]], TransferConfig(rank=4, svd="exact"))[0])


def test_other_options_miss(models, tmp_path, decompositions):
  _run(models, tmp_path, svd="randomized", seed=0)
  decompositions.clear()
  _run(models, tmp_path, svd="randomized", seed=1)  # another seed: other subspaces
  assert sum(decompositions) > 0
  _run(models, tmp_path, svd="exact", seed=0)
  decompositions.clear()
  _run(models, tmp_path, svd="exact", seed=5)  # the seed does not matter to an exact SVD
  assert decompositions == []
  decompositions.clear()
  _run(models, tmp_path, svd="exact", rank=3)
  assert sum(decompositions) > 0


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "swap_entries", "garbage"])
def test_corrupt_entry_is_recomputed(models, tmp_path, decompositions, damage):
  first = _run(models, tmp_path, svd="exact")
  entries = _entries(tmp_path)
  victim = next(p for p in entries if p.name.startswith("down_proj-L0001"))
  data = bytearray(victim.read_bytes())
  if damage == "flip_byte":
    data[-7] ^= 0x40  # inside the tensor bytes: only the checksum can tell
  elif damage == "truncate":
    data = data[: len(data) // 2]
  elif damage == "swap_entries":  # a valid entry, but for another layer
    data = bytearray(next(p for p in entries if p.name.startswith("down_proj-L0000")).read_bytes())
  else:
    data = bytearray(b"not a safetensors file")
  victim.write_bytes(bytes(data))
  others = {p: p.stat().st_mtime_ns for p in entries if p != victim}
  decompositions.clear()
  second = _run(models, tmp_path, svd="exact")
  assert decompositions == [2]  # one call: the damaged layer (padded to the bucket of 2 layers)
  assert {p: p.stat().st_mtime_ns for p in others} == others  # the others were read, not rewritten
  _same(first, second)
  decompositions.clear()
  _run(models, tmp_path, svd="exact")
  assert decompositions == []  # and rewritten whole


def test_a_warm_read_fills_the_stack_in_place(models, tmp_path):
  """Cached layers are read straight into the (L, ...) stack a chunk needs: the same values as the
  entries, handed out without another copy (read-only, as it is shared); another order is a copy."""
  from crosslora_jax.core.subspaces import Subspaces
  _run(models, tmp_path, svd="exact")
  store = cache.SubspaceCache(tmp_path / "cache")
  subs = Subspaces(models[0], TransferConfig(rank=4, svd="exact"), cache=store)
  got = subs.get("q_proj", [0, 1], 4)
  assert subs.loaded == 2 and subs.computed == 0 and not got.u.flags.writeable
  assert not subs._memo[("q_proj", 0, 4)].u.flags.writeable  # the held rows share the stack: read-only too
  for i in (0, 1):
    for x, y in zip(got, store.load(subs.entry_key("q_proj", i, 4))):
      np.testing.assert_array_equal(x[i], y)
  flipped = subs.get("q_proj", [1, 0], 4)
  assert flipped.u.flags.writeable
  np.testing.assert_array_equal(flipped.v, got.v[::-1])


def test_an_entry_whose_header_lies_is_rejected(tmp_path):
  """Shapes, dtypes and data offsets are checked before anything is read into the stack."""
  from safetensors.numpy import save as st_save
  store = cache.SubspaceCache(tmp_path)
  key = cache.EntryKey.make("m", "q_proj", 0, (6, 5), rank=2, method="exact", seed=0, n_oversamples=0, n_power_iter=0)
  good = {"u": np.ones((6, 2), np.float32), "s": np.ones(2, np.float32), "v": np.ones((5, 2), np.float32),
          "energy": np.ones(1, np.float32)}
  key_json = key.to_json()
  store.path(key).parent.mkdir(parents=True)
  for i, change in enumerate([{"u": np.ones((5, 2), np.float32)}, {"s": np.ones(2, np.float64)},
                              {"energy": np.ones(2, np.float32)}], start=1):
    tensors = {**good, **change}
    meta = {"key": key_json, "crc32": cache._checksum(key_json, tensors)}
    store.path(key).write_bytes(st_save(tensors, metadata=meta))
    assert store.load(key) is None and store.rejected == i
  data = bytearray(st_save(good, metadata={"key": key_json, "crc32": cache._checksum(key_json, good)}))
  store.path(key).write_bytes(bytes(data[:-4]))  # the last tensor cut short
  assert store.load(key) is None and store.rejected == 4
  store.path(key).write_bytes(bytes(data))
  assert store.load(key) is not None and store.hits == 1


def test_overlaps_are_cached_beside_the_subspaces(models, tmp_path, monkeypatch):
  """A warm run takes the report's overlaps from the cache (its projections skip them), same numbers;
  a damaged overlap entry is computed again and rewritten."""
  first = _run(models, tmp_path)
  files = sorted((tmp_path / "cache").glob("*/overlaps-*/*.json"))
  assert len(files) == 2 * len(MODULES)  # 2 layer pairs x 2 modules
  overlaps = [e["overlap"] for e in first.report.entries]
  assert all(isinstance(x, float) for x in overlaps)
  wanted = []
  real = kernels.project_cross_lora_adapters_and_overlaps

  def spy(*args, with_overlaps=True, **kw):
    wanted.append(with_overlaps)
    return real(*args, with_overlaps=with_overlaps, **kw)

  monkeypatch.setattr(kernels, "project_cross_lora_adapters_and_overlaps", spy)
  second = _run(models, tmp_path)
  assert wanted and not any(wanted)
  assert [e["overlap"] for e in second.report.entries] == overlaps
  damaged = files[0].read_text()
  files[0].write_text(damaged.replace('"overlap": ', '"overlap": "x", "was": '))
  wanted.clear()
  third = _run(models, tmp_path)
  assert wanted.count(True) == 1
  assert [e["overlap"] for e in third.report.entries] == overlaps
  assert files[0].read_text() == damaged


def test_overlap_entry_is_checked_against_both_keys(tmp_path):
  store = cache.SubspaceCache(tmp_path)
  key = lambda model, layer: cache.EntryKey.make(model, "q_proj", layer, (8, 8), rank=2, method="gram", seed=0,
                                                  n_oversamples=0, n_power_iter=0)
  store.store_overlap(key("a", 0), key("b", 1), 0.25)
  assert store.load_overlap(key("a", 0), key("b", 1)) == 0.25
  assert store.load_overlap(key("a", 0), key("b", 2)) is None  # another target layer
  assert store.load_overlap(key("a", 0), key("c", 1)) is None  # another target model
  assert store.load_overlap(key("a", 1), key("b", 1)) is None


def test_changed_checkpoint_misses(models, tmp_path, decompositions):
  source, target, adapter = models
  _run(models, tmp_path, svd="exact")
  changed = _weights(7, "source")  # same config and names, other values
  decompositions.clear()
  engine.transfer_adapters(changed, target, [adapter], TransferConfig(rank=4, svd="exact", cache_dir=str(tmp_path / "cache")))
  assert sum(decompositions) == 2 * len(MODULES)  # all source weights again, no target weight


def test_checkpoint_fingerprint_follows_file_changes(tmp_path, models):
  import json
  from safetensors.numpy import save_file
  from crosslora_jax import Checkpoint
  source = models[0]
  folder = tmp_path / "m"
  folder.mkdir()
  (folder / "config.json").write_text(json.dumps(CONFIG))
  save_file({k: source.tensor(k) for k in source.keys()}, str(folder / "model.safetensors"))
  before = cache.model_id(Checkpoint(folder).fingerprint())
  assert cache.model_id(Checkpoint(folder).fingerprint()) == before
  file = folder / "model.safetensors"
  st = file.stat()
  os.utime(file, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
  assert cache.model_id(Checkpoint(folder).fingerprint()) != before


def test_store_load_round_trip_and_key_check(tmp_path):
  store = cache.SubspaceCache(tmp_path)
  rng = np.random.default_rng(0)
  sub = kernels.Subspace(rng.standard_normal((6, 2)).astype(np.float32), np.array([2.0, 1.0], np.float32),
                         rng.standard_normal((5, 2)).astype(np.float32), np.float32(0.5))
  key = cache.EntryKey.make("m", "q_proj", 3, (6, 5), rank=2, method="randomized", seed=1, n_oversamples=4,
                            n_power_iter=2)
  assert store.load(key) is None and store.misses == 1
  store.store(key, sub)
  got = store.load(key)
  for x, y in zip(got, sub):
    np.testing.assert_array_equal(x, y)
  assert store.hits == 1
  # The same bytes under another key's file name are rejected, not trusted.
  other = cache.EntryKey.make("m", "q_proj", 3, (6, 5), rank=2, method="randomized", seed=2, n_oversamples=4,
                              n_power_iter=2)
  store.path(other).write_bytes(store.path(key).read_bytes())
  assert store.load(other) is None and store.rejected == 1
  # Non-finite values never come back either, even with a valid checksum.
  bad = kernels.Subspace(sub.u, np.array([np.nan, 1.0], np.float32), sub.v, sub.energy)
  store.store(key, bad)
  assert store.load(key) is None and store.rejected == 2


def test_entries_written_with_a_sha256_still_load(tmp_path):
  """Entries from before the CRC-32 (their metadata has a sha256) load and are checked with it."""
  from safetensors.numpy import save as st_save
  store = cache.SubspaceCache(tmp_path)
  rng = np.random.default_rng(0)
  sub = kernels.Subspace(rng.standard_normal((6, 2), dtype=np.float32), np.array([2.0, 1.0], np.float32),
                         rng.standard_normal((5, 2), dtype=np.float32), np.array(0.9, np.float32))
  key = cache.EntryKey.make("m", "q_proj", 0, (6, 5), rank=2, method="exact", seed=0, n_oversamples=0, n_power_iter=0)
  tensors = {"u": sub.u, "s": sub.s, "v": sub.v, "energy": sub.energy.reshape(1)}
  key_json = key.to_json()
  store.path(key).parent.mkdir(parents=True)
  legacy = {"key": key_json, "sha256": cache._checksum(key_json, tensors, "sha256")}
  store.path(key).write_bytes(st_save(tensors, metadata=legacy))
  np.testing.assert_array_equal(store.load(key).u, sub.u)
  tensors["s"] = np.array([2.0, 1.5], np.float32)  # changed bytes under the old checksum
  store.path(key).write_bytes(st_save(tensors, metadata=legacy))
  assert store.load(key) is None and store.rejected == 1
  store.path(key).write_bytes(st_save(tensors, metadata={"key": key_json}))  # no checksum at all
  assert store.load(key) is None and store.rejected == 2


def test_default_cache_dir_follows_environment(monkeypatch, tmp_path):
  monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "root"))
  assert cache.default_cache_dir() == tmp_path / "root" / "subspaces"
  monkeypatch.delenv(cache.CACHE_ENV)
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert cache.default_cache_dir() == tmp_path / "home" / ".cache" / "crosslora_jax" / "subspaces"


def _write_folder(folder, weights):
  import json
  from safetensors.numpy import save_file
  folder.mkdir()
  (folder / "config.json").write_text(json.dumps(weights.config))
  save_file({k: np.asarray(weights.tensor(k)) for k in weights.keys()}, str(folder / "model.safetensors"))


def test_cli_adapter_dir_cache_dir_and_no_cache(models, tmp_path):
  import subprocess
  import sys
  source, target, adapter = models
  _write_folder(tmp_path / "src", source)
  _write_folder(tmp_path / "tgt", target)
  adapters = tmp_path / "adapters"
  for name, seed in (("alpha", 3), ("beta", 4)):
    (adapters / name).mkdir(parents=True)
    peft_format.write_adapter_files(_adapter(source.arch, seed), adapters / name, np.float32)
  (adapters / "notes").mkdir()  # no adapter_config.json: not an adapter
  root = pathlib.Path(__file__).resolve().parents[1]

  def run(*flags):
    return subprocess.run([sys.executable, "-m", "crosslora_jax.transfer", f"--source_model={tmp_path / 'src'}",
                           f"--target_model={tmp_path / 'tgt'}", f"--adapter_dir={adapters}", "--rank=4",
                           "--noprogress", *flags], cwd=root, capture_output=True, text=True, timeout=600)

  first = run(f"--output={tmp_path / 'out1'}", f"--cache_dir={tmp_path / 'c1'}")
  assert first.returncode == 0, first.stderr
  assert sorted(p.name for p in (tmp_path / "out1").iterdir()) == ["alpha", "beta"]
  assert len(list((tmp_path / "c1").glob("*/*.safetensors"))) == 2 * 2 * len(MODULES)
  second = run(f"--output={tmp_path / 'out2'}", f"--cache_dir={tmp_path / 'c2'}", "--no_cache")
  assert second.returncode == 0, second.stderr
  assert not (tmp_path / "c2").exists()
  for name in ("alpha", "beta"):  # computed then cached == computed without a cache, byte for byte
    file = f"{name}/{peft_format.WEIGHTS_FILE}"
    assert (tmp_path / "out1" / file).read_bytes() == (tmp_path / "out2" / file).read_bytes()


def test_adapter_dir_errors(tmp_path):
  import importlib
  from crosslora_jax import CrossLoraError
  transfer = importlib.import_module("crosslora_jax.transfer")  # the CLI module
  with pytest.raises(CrossLoraError, match="got nothing"):
    transfer.adapters_in(str(tmp_path / "missing"))
  (tmp_path / "empty" / "sub").mkdir(parents=True)
  with pytest.raises(CrossLoraError, match="adapter_config.json expected, got none"):
    transfer.adapters_in(str(tmp_path / "empty"))
