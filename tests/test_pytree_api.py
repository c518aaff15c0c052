"""The pytree API: same result as the file-based CLI, trees in and out, lazy weights, jit-able maths."""

from __future__ import annotations

import functools
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import fixtures
from crosslora_jax.core import engine, pytree_api
from crosslora_jax.formats import flax_bridge as fb, orbax_io, peft_format
from crosslora_jax.formats.checkpoint import Checkpoint
from crosslora_jax.errors import CrossLoraError

jax = pytest.importorskip("jax")
jnp = jax.numpy

ROOT = pathlib.Path(__file__).resolve().parents[1]
RANK = 8
CONFIG = engine.TransferConfig(rank=RANK, svd="exact", base_model_name="tiny-qwen2")  # exact: comparable per module
TEMPLATE = ("model.layers.{layer}.{block}.{name}", "blocks/{layer}/{block}/{name}")
Q = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def made(tmp_path_factory):
  """Source llama (3 layers, hidden 64) with an rslora + rank_pattern adapter; target qwen2 (4 layers, hidden 80)."""
  root = tmp_path_factory.mktemp("pytree")
  src = fixtures.make_model("llama", root / "src")
  tgt = fixtures.make_model("qwen2", root / "tgt", seed=3)
  weights = {name: ({k: v.detach().numpy().copy() for k, v in m.state_dict().items()}, m.config.to_dict())
             for name, m in (("src", src), ("tgt", tgt))}
  fixtures.make_adapter(src, root / "adapter", kind="llama", r=4, alpha=8, use_rslora=True,
                        rank_pattern={"q_proj": 6}, alpha_pattern={"v_proj": 5})
  return root, weights


def _same_adapter(got: peft_format.PeftAdapter, want: peft_format.PeftAdapter) -> None:
  """Same config, modules, dtypes and shapes; values equal to float32 rounding. Not byte for byte:
  the API in this process and the CLI in a subprocess were byte-equal on earlier machines but
  differ in the last bits on this one (AMD EPYC, 2026-12-02: relative 2e-6 on down_proj); the
  cause is not found (XLA's CPU kernels per program or thread layout are the likely suspects)."""
  assert json.loads(json.dumps(got.config)) == json.loads(json.dumps(want.config))
  assert sorted(got.modules) == sorted(want.modules)
  for path, pair in want.modules.items():
    for x, y in zip(got.modules[path], pair):
      x, y = np.ascontiguousarray(x), np.ascontiguousarray(y)
      assert x.dtype == y.dtype and x.shape == y.shape, path
      np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6 * float(np.abs(y).max()), err_msg=path)


@pytest.fixture(scope="module")
def api_result(made):
  root, weights = made
  (src, src_cfg), (tgt, tgt_cfg) = weights["src"], weights["tgt"]
  adapter = peft_format.read_adapter(root / "adapter")
  return pytree_api.transfer(src, tgt, adapter, config=CONFIG, source_config=src_cfg, target_config=tgt_cfg)


def test_pytree_api_matches_cli(made, api_result, tmp_path):
  root, _ = made
  out, orbax_out = tmp_path / "out", tmp_path / "out_orbax"
  cmd = [sys.executable, "-m", "crosslora_jax.transfer", f"--source_model={root / 'src'}",
         f"--target_model={root / 'tgt'}", f"--adapter={root / 'adapter'}", f"--output={out}", f"--rank={RANK}", "--svd=exact",
         "--base_model_name_or_path=tiny-qwen2", "--noprogress", f"--orbax_output={orbax_out}"]
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  cli = peft_format.read_adapter(out)
  _same_adapter(api_result.adapter, cli)
  assert isinstance(api_result.lora, peft_format.PeftAdapter)
  assert api_result.report.summary["modules_transferred"] == 4 * 7
  # The CLI's Orbax output is the same adapter as an nnx tree.
  restored = orbax_io.restore(orbax_out)
  assert restored.layout == "nnx"
  _same_adapter(fb.from_nnx(restored), cli)
  want = fb.to_nnx(cli)  # the same process wrote both: byte for byte
  assert restored.meta == want.meta
  assert jax.tree.all(jax.tree.map(lambda x, y: np.array_equal(np.asarray(x), np.asarray(y)),
                                   restored.params, want.params))


@pytest.mark.parametrize("layout", ["nnx", "qwix"])
def test_tree_in_tree_out(made, api_result, layout):
  root, weights = made
  (src, src_cfg), (tgt, tgt_cfg) = weights["src"], weights["tgt"]
  adapter = peft_format.read_adapter(root / "adapter")
  tree = fb.to_tree(adapter, layout=layout, key_map=TEMPLATE)
  got = pytree_api.transfer(src, tgt, tree, config=CONFIG, source_config=src_cfg, target_config=tgt_cfg,
                            key_map=TEMPLATE)
  assert isinstance(got.lora, fb.LoraTree) and got.lora.layout == layout
  assert "blocks" in got.lora.params and 3 in got.lora.params["blocks"]  # target has 4 layers
  _same_adapter(got.adapter, api_result.adapter)
  _same_adapter(fb.from_tree(got.lora), api_result.adapter)


def test_lazy_weights_read_only_what_is_needed(made, api_result):
  root, weights = made
  reads = {"src": [], "tgt": []}

  def loader(name):
    ckpt = Checkpoint(root / name)

    def load(key):
      reads[name].append(key)
      return ckpt.tensor(key)

    return pytree_api.LazyWeights(ckpt.keys(), load)

  got = pytree_api.transfer(loader("src"), loader("tgt"), root / "adapter", config=CONFIG,
                            source_config=weights["src"][1], target_config=weights["tgt"][1])
  _same_adapter(got.adapter, api_result.adapter)
  modules = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
             "mlp.up_proj", "mlp.down_proj")
  for name, layers in (("src", 3), ("tgt", 4)):  # no embeddings, norms or lm_head: only the adapted weights
    assert set(reads[name]) == {f"model.layers.{l}.{m}.weight" for l in range(layers) for m in modules}
    assert len(set(reads[name])) < len(weights[name][0])


def test_bad_base_inputs(made):
  root, weights = made
  src, src_cfg = weights["src"]
  with pytest.raises(CrossLoraError, match="source_config"):
    pytree_api.transfer(src, root / "tgt", root / "adapter", config=CONFIG)
  with pytest.raises(CrossLoraError, match="target_config: none expected"):
    pytree_api.transfer(src, root / "tgt", root / "adapter", config=CONFIG, source_config=src_cfg,
                        target_config=src_cfg)
  with pytest.raises(CrossLoraError, match="lora: a PeftAdapter, LoraTree"):
    pytree_api.transfer(root / "src", root / "tgt", {"params": {}}, config=CONFIG)


def _module_inputs(weights, adapter, layer):
  path = f"model.layers.{layer}.self_attn.q_proj"
  pair = adapter.modules[path]
  return (weights["src"][0][path + ".weight"], weights["tgt"][0][path + ".weight"], pair.a_ri, pair.b_or)


def test_transfer_factors_jit_matches_engine(made, api_result):
  root, weights = made
  adapter = peft_format.read_adapter(root / "adapter")
  traces = []

  def counted(*args, **kwargs):
    traces.append(1)
    return pytree_api.transfer_factors(*args, **kwargs)

  f = jax.jit(functools.partial(counted, rank=RANK))
  out = f(*_module_inputs(weights, adapter, 0))
  want = api_result.adapter.modules[Q]  # target layer 0 <- source layer 0 (depth map)
  for got, ref in ((out.a_ri, want.a_ri), (out.b_or, want.b_or)):
    np.testing.assert_allclose(np.asarray(got), ref, atol=1e-5 * np.abs(ref).max(), rtol=0)
  f(*_module_inputs(weights, adapter, 1))
  assert len(traces) == 1  # same shapes: no recompilation
  # vmap over stacked layers gives the per-layer results.
  stacked = [np.stack(xs) for xs in zip(*(_module_inputs(weights, adapter, l) for l in range(2)))]
  batched = jax.vmap(functools.partial(pytree_api.transfer_factors, rank=RANK))(*stacked)
  np.testing.assert_allclose(np.asarray(batched.b_or[0]), np.asarray(out.b_or), atol=1e-6, rtol=0)


def test_transfer_flax_factors_keeps_the_fold(made, api_result):
  root, weights = made
  adapter = peft_format.read_adapter(root / "adapter")
  w_s, w_t, a_ri, b_or = _module_inputs(weights, adapter, 0)
  scaling = adapter.scaling(Q)
  lora_a, lora_b = jax.jit(functools.partial(pytree_api.transfer_flax_factors, rank=RANK))(
      fb.to_flax_orientation(w_s), fb.to_flax_orientation(w_t), a_ri.T, scaling * b_or.T)
  node = fb.to_nnx(api_result.adapter).params["model"]["layers"][0]["self_attn"]["q_proj"]["lora"]
  for got, ref in ((lora_a, node["lora_a"]), (lora_b, node["lora_b"])):
    ref = np.asarray(ref)
    np.testing.assert_allclose(np.asarray(got), ref, atol=1e-5 * np.abs(ref).max(), rtol=0)


def test_transfer_factors_checks_shapes_and_methods():
  w = jnp.zeros((6, 4))
  with pytest.raises(CrossLoraError, match=r"a_ri \(r, 4\) and b_or \(6, r\)"):
    pytree_api.transfer_factors(w, w, jnp.zeros((2, 5)), jnp.zeros((6, 2)))
  with pytest.raises(CrossLoraError, match="equal"):
    pytree_api.transfer_factors(w, jnp.zeros((5, 4)), jnp.zeros((2, 4)), jnp.zeros((6, 2)), method="lora_x")
  with pytest.raises(CrossLoraError, match="anchored"):
    pytree_api.transfer_factors(w, w, jnp.zeros((2, 4)), jnp.zeros((6, 2)), method="anchored")
  out = pytree_api.transfer_factors(w, jnp.zeros((5, 3)), jnp.ones((2, 4)), jnp.ones((6, 2)), method="truncate_pad")
  assert out.a_ri.shape == (2, 3) and out.b_or.shape == (5, 2)
