"""Checkpoint and adapter formats: sharded/single, dtypes, patterns, fused and Conv1D layouts."""

import json

import ml_dtypes
import numpy as np
import pytest
import torch

import fixtures
from crosslora_jax import Checkpoint, CrossLoraError
from crosslora_jax.formats import peft_format
from crosslora_jax.core import planning
from crosslora_jax.formats.architectures import Architecture


def test_sharded_equals_single(tmp_path):
  fixtures.make_model("qwen2", tmp_path / "single", seed=3)
  fixtures.make_model("qwen2", tmp_path / "sharded", seed=3, max_shard_size="60KB")
  assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
  single, sharded = Checkpoint(tmp_path / "single"), Checkpoint(tmp_path / "sharded")
  assert len({str(f) for f in sharded._key_to_file.values()}) > 1
  for layer in range(single.arch.num_layers):
    for module in single.arch.modules:
      np.testing.assert_array_equal(single.weight(layer, module), sharded.weight(layer, module))


def test_bf16_checkpoint_reads_as_bfloat16(tmp_path):
  model = fixtures.make_model("llama", tmp_path / "m", dtype=torch.bfloat16)
  ckpt = Checkpoint(tmp_path / "m")
  w = ckpt.weight(1, "down_proj")
  assert w.dtype == ml_dtypes.bfloat16
  ref = model.model.layers[1].mlp.down_proj.weight.detach().float().numpy()
  np.testing.assert_array_equal(w.astype(np.float32), ref)


def test_head_dim_from_config_gemma(tmp_path):
  fixtures.make_model("gemma2", tmp_path / "g")
  arch = Checkpoint(tmp_path / "g").arch
  assert arch.shape("q_proj") == (80, 64)  # 2 heads x head_dim 40, not hidden/heads
  assert arch.shape("k_proj") == (40, 64)


@pytest.mark.parametrize("kind", sorted(fixtures.TINY_CONFIGS))
def test_every_family_names_its_own_norms_and_embeddings(tmp_path, kind):
  # The anchored probes read these gains; a key the checkpoint lacks would silently give 1s.
  fixtures.make_model(kind, tmp_path / kind)
  ckpt = Checkpoint(tmp_path / kind)
  for layer in range(ckpt.arch.num_layers):
    for which in ("attn", "ffn"):
      assert ckpt.has(ckpt.arch.norm_key(layer, which)), (kind, ckpt.arch.norm_key(layer, which))
  assert ckpt.has(ckpt.arch.embed_key(ckpt.keys()))


def test_phi3_fused_split(tmp_path):
  model = fixtures.make_model("phi3", tmp_path / "p")
  ckpt = Checkpoint(tmp_path / "p")
  qkv = model.model.layers[0].self_attn.qkv_proj.weight.detach().numpy()
  q, k, v = (ckpt.weight(0, m) for m in ("q_proj", "k_proj", "v_proj"))
  assert q.shape == (64, 64) and k.shape == (32, 64) and v.shape == (32, 64)
  np.testing.assert_array_equal(np.concatenate([q, k, v]), qkv)
  gate_up = model.model.layers[1].mlp.gate_up_proj.weight.detach().numpy()
  np.testing.assert_array_equal(np.concatenate([ckpt.weight(1, "gate_proj"), ckpt.weight(1, "up_proj")]), gate_up)


def test_gpt2_conv1d_orientation(tmp_path):
  model = fixtures.make_model("gpt2", tmp_path / "g")
  ckpt = Checkpoint(tmp_path / "g")
  assert ckpt.arch.modules == ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")
  c_fc = model.transformer.h[1].mlp.c_fc.weight.detach().numpy()  # Conv1D: (in, out)
  np.testing.assert_array_equal(ckpt.weight(1, "up_proj"), c_fc.T)
  assert ckpt.weight(1, "up_proj").shape == (192, 48)


def test_unknown_model_type_names_supported():
  with pytest.raises(CrossLoraError, match="model_type expected one of .*llama.*got 'bert'"):
    Architecture.from_config({"model_type": "bert"})


def _adapter(tmp_path, kind="llama", **kwargs):
  model = fixtures.make_model(kind, tmp_path / "m")
  fixtures.make_adapter(model, tmp_path / "a", kind=kind, **kwargs)
  return Checkpoint(tmp_path / "m"), peft_format.read_adapter(tmp_path / "a")


def test_adapter_round_trip_with_patterns(tmp_path):
  ckpt, adapter = _adapter(tmp_path, r=4, alpha=8, use_rslora=True,
                           rank_pattern={"q_proj": 2, "layers.1.mlp.down_proj": 6},
                           alpha_pattern={"v_proj": 3})
  path = "model.layers.1.mlp.down_proj"
  assert adapter.rank(path) == 6 and adapter.rank("model.layers.0.self_attn.q_proj") == 2
  assert adapter.scaling("model.layers.0.self_attn.v_proj") == pytest.approx(3 / 2)  # rslora: alpha/sqrt(r)
  assert adapter.scaling(path) == pytest.approx(8 / np.sqrt(6))
  out = tmp_path / "copy"
  out.mkdir()
  peft_format.write_adapter_files(adapter, out)
  again = peft_format.read_adapter(out)
  assert again.config == json.loads((out / "adapter_config.json").read_text())
  for p, pair in adapter.modules.items():
    np.testing.assert_array_equal(again.modules[p].a_ri, pair.a_ri)
    assert again.scaling(p) == adapter.scaling(p)
  from safetensors import safe_open
  with safe_open(str(out / "adapter_model.safetensors"), framework="np") as f:
    assert f.metadata() == {"format": "pt"}


def test_canonical_factors_split_fused_lora(tmp_path):
  ckpt, adapter = _adapter(tmp_path, kind="phi3", r=3)
  factors = planning.canonical_factors(adapter, ckpt.arch)
  pair = adapter.modules["model.layers.0.self_attn.qkv_proj"]
  parts = [factors[(0, m)] for m in ("q_proj", "k_proj", "v_proj")]
  np.testing.assert_array_equal(np.concatenate([p.b_or for p in parts]), pair.b_or)
  assert all(p.a_ri is pair.a_ri for p in parts)


def test_assemble_fuses_back_exactly(tmp_path):
  ckpt, adapter = _adapter(tmp_path, kind="phi3", r=3, alpha=5)
  factors = planning.canonical_factors(adapter, ckpt.arch)
  results = {k: (f.a_ri, f.b_or, f.scaling * (2 if k[1] == "k_proj" else 1)) for k, f in factors.items()}
  new = planning.assemble(ckpt.arch, results, adapter.config, base_model="x")
  path = "model.layers.1.self_attn.qkv_proj"
  assert new.rank(path) == 9  # three parts, block-diagonal B
  dw = new.scaling(path) * new.modules[path].b_or @ new.modules[path].a_ri
  for m in ("q_proj", "k_proj", "v_proj"):
    a, b, s = results[(1, m)]
    _, rows = ckpt.arch.stored_for(m)
    np.testing.assert_allclose(dw[rows], s * b @ a, rtol=1e-5, atol=1e-6)


def test_key_matching_no_module_is_refused(tmp_path):
  ckpt, adapter = _adapter(tmp_path)
  pair = adapter.modules.pop("model.layers.0.self_attn.q_proj")
  adapter.modules["model.layers.0.self_attn.qq_proj"] = pair
  with pytest.raises(CrossLoraError, match="qq_proj.*matches none"):
    planning.canonical_factors(adapter, ckpt.arch)


def test_layer_maps():
  assert planning.layer_map("identity", 3, 5) == [0, 1, 2, None, None]
  assert planning.layer_map("depth", 30, 18)[0] == 0 and planning.layer_map("depth", 30, 18)[-1] == 29
  assert planning.layer_map("auto", 4, 4) == [0, 1, 2, 3]
  assert planning.layer_map("depth", 4, 7) == [0, 1, 1, 2, 2, 3, 3]
