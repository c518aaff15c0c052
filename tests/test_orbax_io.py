"""Orbax checkpoints of LoRA trees and PEFT adapters: exact restore, clear failures."""

from __future__ import annotations

import numpy as np
import pytest

from crosslora_jax.formats import flax_bridge as fb
from crosslora_jax.formats import orbax_io, peft_format
from crosslora_jax.errors import CrossLoraError

jax = pytest.importorskip("jax")
nnx = pytest.importorskip("flax.nnx")
ocp = pytest.importorskip("orbax.checkpoint")

BF16 = peft_format.DTYPES["bfloat16"]


def make_adapter(seed: int = 0, dtype=np.float32) -> peft_format.PeftAdapter:
  """A small in-memory adapter for a 2-layer llama-shaped model, scaling 8/6 on q_proj (a lossy fold)."""
  rng = np.random.default_rng(seed)
  shapes = {"self_attn.q_proj": (32, 16), "self_attn.v_proj": (8, 16), "mlp.down_proj": (16, 40)}
  modules = {}
  for layer in range(2):
    for name, (out_dim, in_dim) in shapes.items():
      r = 6 if name == "self_attn.q_proj" else 4
      modules[f"model.layers.{layer}.{name}"] = peft_format.LoraPair(
          rng.standard_normal((r, in_dim)).astype(dtype), rng.standard_normal((out_dim, r)).astype(dtype))
  config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"],
            "rank_pattern": {"q_proj": 6}, "alpha_pattern": {}, "use_rslora": False}
  return peft_format.PeftAdapter(config, modules)


def assert_same_tree(got, want):
  assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
  for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert np.asarray(x).dtype == np.asarray(y).dtype
    assert np.asarray(x).shape == np.asarray(y).shape
    assert np.ascontiguousarray(x).tobytes() == np.ascontiguousarray(y).tobytes()


@pytest.mark.parametrize("dtype", [np.float32, BF16])
def test_lora_tree_save_restore_is_exact(tmp_path, dtype):
  tree = fb.to_nnx(make_adapter(dtype=dtype))
  assert any(e["lora_b_fix"] for e in tree.meta["modules"].values())
  orbax_io.save(tmp_path / "ckpt", tree)
  got = orbax_io.restore(tmp_path / "ckpt")
  assert isinstance(got, fb.LoraTree)
  assert_same_tree(got.params, tree.params)  # int layer keys come back as ints
  assert 0 in got.params["model"]["layers"]
  assert got.meta == tree.meta
  # and the restored tree still inverts exactly to the adapter
  back = fb.from_nnx(got)
  for path, pair in make_adapter(dtype=dtype).modules.items():
    assert back.modules[path].b_or.tobytes() == np.ascontiguousarray(pair.b_or).tobytes()


def test_peft_adapter_save_restore_is_exact(tmp_path):
  adapter = make_adapter(1)
  orbax_io.save(tmp_path / "ckpt", adapter)
  got = orbax_io.restore(tmp_path / "ckpt")
  assert isinstance(got, peft_format.PeftAdapter)
  assert got.config == adapter.config
  assert sorted(got.modules) == sorted(adapter.modules)
  for path, pair in adapter.modules.items():
    for x, y in zip(got.modules[path], pair):
      assert isinstance(x, np.ndarray) and x.flags.writeable and x.dtype == y.dtype and x.shape == y.shape
      assert np.array_equal(x, y)


def test_qwix_tree_save_restore(tmp_path):
  tree = fb.to_qwix(make_adapter(2), key_map=("model.layers.{layer}.{block}.{name}", "layers/{layer}/{block}/{name}"))
  orbax_io.save(tmp_path / "ckpt", tree)
  got = orbax_io.restore(tmp_path / "ckpt", like=tree)
  assert_same_tree(got.params, tree.params)
  assert fb.qwix_rules(got) == fb.qwix_rules(tree)


def test_restore_into_like_uses_its_structure(tmp_path):
  tree = fb.to_nnx(make_adapter(3))
  orbax_io.save(tmp_path / "ckpt", tree)
  like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree.params)
  got = orbax_io.restore(tmp_path / "ckpt", like=like)
  assert_same_tree(got.params, tree.params)


def test_restore_into_wrong_tree_fails_clearly(tmp_path):
  tree = fb.to_nnx(make_adapter(4))
  orbax_io.save(tmp_path / "ckpt", tree)
  missing = jax.tree.map(lambda x: x, tree.params)
  del missing["model"]["layers"][1]
  with pytest.raises(CrossLoraError, match=r"not in the checkpoint|missing model/layers/1/"):
    orbax_io.restore(tmp_path / "ckpt", like=missing)
  extra = jax.tree.map(lambda x: x, tree.params)
  extra["model"]["layers"][0]["mlp"]["up_proj"] = {"lora": {"lora_a": np.zeros((16, 4), np.float32),
                                                            "lora_b": np.zeros((4, 40), np.float32)}}
  with pytest.raises(CrossLoraError, match=r"not in the checkpoint: model/layers/0/mlp/up_proj/lora/lora_a"):
    orbax_io.restore(tmp_path / "ckpt", like=extra)
  reshaped = jax.tree.map(lambda x: x, tree.params)
  reshaped["model"]["layers"][0]["self_attn"]["q_proj"]["lora"]["lora_a"] = np.zeros((16, 4), np.float32)
  with pytest.raises(CrossLoraError, match=r"q_proj/lora/lora_a: \(16, 6\) float32 saved, \(16, 4\) float32 in like"):
    orbax_io.restore(tmp_path / "ckpt", like=reshaped)
  recast = jax.tree.map(lambda x: x.astype(BF16), tree.params)
  with pytest.raises(CrossLoraError, match="bfloat16 in like"):
    orbax_io.restore(tmp_path / "ckpt", like=recast)


def test_save_refuses_existing_and_restore_refuses_non_checkpoints(tmp_path):
  tree = fb.to_nnx(make_adapter(5))
  orbax_io.save(tmp_path / "ckpt", tree)
  with pytest.raises(CrossLoraError, match="--overwrite|overwrite"):
    orbax_io.save(tmp_path / "ckpt", tree)
  orbax_io.save(tmp_path / "ckpt", fb.to_nnx(make_adapter(6)), overwrite=True)
  assert not np.array_equal(jax.tree.leaves(orbax_io.restore(tmp_path / "ckpt").params)[0],
                            jax.tree.leaves(tree.params)[0])
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary folders left
  (tmp_path / "not_a_ckpt").mkdir()
  (tmp_path / "not_a_ckpt" / "adapter_config.json").write_text("{}")
  with pytest.raises(CrossLoraError, match="Orbax checkpoint"):
    orbax_io.restore(tmp_path / "not_a_ckpt")
  with pytest.raises(CrossLoraError, match="nothing"):
    orbax_io.restore(tmp_path / "absent")


def test_checkpoint_manager(tmp_path):
  tree = fb.to_nnx(make_adapter(7))
  with orbax_io.make_manager(tmp_path / "run") as manager:
    orbax_io.manager_save(manager, 10, tree)
    orbax_io.manager_save(manager, 20, make_adapter(8))
  # A fresh plain manager (no handlers registered) reads them back too.
  with ocp.CheckpointManager(tmp_path / "run") as manager:
    assert list(manager.all_steps()) == [10, 20]
    assert isinstance(orbax_io.manager_restore(manager), peft_format.PeftAdapter)
    assert_same_tree(orbax_io.manager_restore(manager, 10, like=tree).params, tree.params)
    with pytest.raises(CrossLoraError, match="step 30"):
      orbax_io.manager_restore(manager, 30)
