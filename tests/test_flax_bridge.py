"""PEFT ⇄ flax.nnx / qwix LoRA trees: numerics against PEFT semantics, exact round trips, key maps."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import fixtures
from crosslora_jax.formats import flax_bridge as fb
from crosslora_jax.formats import peft_format
from crosslora_jax.errors import CrossLoraError

jax = pytest.importorskip("jax")
nnx = pytest.importorskip("flax.nnx")

# Non-power-of-two scalings on purpose: 8/6 (rank_pattern), 5/4 (alpha_pattern), 8/√6 (rslora).
ADAPTERS = {
    "patterns": dict(r=4, alpha=8, rank_pattern={"q_proj": 6, "down_proj": 2}, alpha_pattern={"v_proj": 5}),
    "rslora_patterns": dict(r=4, alpha=8, use_rslora=True, rank_pattern={"q_proj": 6, "down_proj": 2},
                            alpha_pattern={"v_proj": 5}),
}
TEMPLATE = ("model.layers.{layer}.{block}.{name}", "layer_{layer}/{block}/{name}")


@pytest.fixture(scope="module")
def made(tmp_path_factory):
  """(base weights by HF key, {name: (PeftAdapter, peft torch model)})."""
  root = tmp_path_factory.mktemp("bridge")
  base = {k: v.detach().numpy().copy() for k, v in fixtures.make_model("llama").state_dict().items()}
  out = {}
  for n, (name, kwargs) in enumerate(ADAPTERS.items()):
    peft_model = fixtures.make_adapter(fixtures.make_model("llama"), root / name, kind="llama", seed=n + 1, **kwargs)
    out[name] = (peft_format.read_adapter(root / name), peft_model)
  return base, out


def _same_bytes(x, y) -> bool:
  x, y = np.ascontiguousarray(x), np.ascontiguousarray(y)
  return x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()


def _assert_same_adapter(got: peft_format.PeftAdapter, want: peft_format.PeftAdapter) -> None:
  assert got.config == want.config
  assert sorted(got.modules) == sorted(want.modules)
  for path, pair in want.modules.items():
    assert _same_bytes(got.modules[path].a_ri, pair.a_ri), path
    assert _same_bytes(got.modules[path].b_or, pair.b_or), path


class Node(nnx.Module):
  """A module tree built from paths; calling it runs every leaf layer on its own input."""

  def __call__(self, inputs):
    return {path: _resolve(self, path.split("/"))(x) for path, x in inputs.items()}


def _resolve(node, parts):
  for p in parts:
    node = getattr(node, p)
  return node


def build_model(layers: dict[tuple, nnx.Module]) -> Node:
  root = Node()
  for path, layer in layers.items():
    node = root
    for p in path[:-1]:
      if not hasattr(node, p):
        setattr(node, p, Node())
      node = getattr(node, p)
    setattr(node, path[-1], layer)
  return root


def abstract(make):
  """``make()`` under nnx.eval_shape: no initializer runs (values come from nnx.update), nothing compiles."""
  return nnx.eval_shape(make)


@nnx.jit
def run(model, inputs):
  return model(inputs)


def kernel_state(base, paths, km) -> dict:
  out = {}
  for path in paths:
    fb._set(out, km.to_tree(path) + ("kernel",), fb.to_flax_orientation(base[path + ".weight"]))
  return out


def lora_linears(base, adapter, km) -> Node:
  rngs = nnx.Rngs(0)
  return build_model({km.to_tree(p): nnx.LoRALinear(*base[p + ".weight"].shape[::-1], lora_rank=adapter.rank(p),
                                                     use_bias=False, rngs=rngs) for p in adapter.modules})


def peft_reference(base, adapter, path, x):
  """PEFT semantics in float64: x Wᵀ + scaling · x Aᵀ Bᵀ."""
  w = base[path + ".weight"].astype(np.float64)
  pair = adapter.modules[path]
  a, b = pair.a_ri.astype(np.float64), pair.b_or.astype(np.float64)
  return x @ w.T, adapter.scaling(path) * (x @ a.T @ b.T)


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_nnx_lora_linear_matches_peft(made, name):
  base, adapters = made
  adapter, peft_model = adapters[name]
  tree = fb.to_nnx(adapter, key_map=TEMPLATE)
  km = fb.as_key_map(TEMPLATE)
  model = abstract(lambda: lora_linears(base, adapter, km))
  nnx.update(model, kernel_state(base, adapter.modules, km), tree.params)
  rng = np.random.default_rng(0)
  xs = {fb.path_str(km.to_tree(p)): rng.standard_normal((5, base[p + ".weight"].shape[1])).astype(np.float32)
        for p in adapter.modules}
  ys = run(model, xs)
  scalings = set()
  for path in adapter.modules:
    key = fb.path_str(km.to_tree(path))
    x = xs[key].astype(np.float64)
    base_out, lora_out = peft_reference(base, adapter, path, x)
    want = base_out + lora_out
    got = np.asarray(ys[key], np.float64)
    scale = np.abs(want).max()
    np.testing.assert_allclose(got, want, atol=2e-5 * scale, rtol=0, err_msg=path)
    # The test can fail: the LoRA term is far above tolerance, so a missing or wrong scaling shows.
    assert np.abs(lora_out).max() > 1e-2 * scale
    assert np.abs(got - (base_out + lora_out / adapter.scaling(path))).max() > 1e-3 * scale
    # And the real PEFT module agrees.
    module = peft_model.get_submodule("base_model.model." + path)
    with torch.no_grad():
      torch_out = module(torch.from_numpy(xs[key])).numpy()
    np.testing.assert_allclose(got, torch_out, atol=2e-5 * scale, rtol=0, err_msg=path)
    scalings.add(round(adapter.scaling(path), 6))
  assert len(scalings) >= 3  # rank_pattern / alpha_pattern really gave per-module scalings


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_peft_nnx_peft_round_trip_is_exact(made, name):
  adapter = made[1][name][0]
  tree = fb.to_nnx(adapter)
  # The fold is lossy at these scalings: plain division would not restore B ...
  fixed = [p for p, e in tree.meta["modules"].items() if e["lora_b_fix"] is not None]
  assert fixed
  path = fixed[0]
  node = tree.params
  for k in tree.meta["modules"][path]["tree_path"] + ["lora", "lora_b"]:
    node = node[k]
  plain = fb.unfold_scaling(np.asarray(node), tree.meta["modules"][path]["scaling"])
  assert not _same_bytes(fb.to_torch_orientation(plain), adapter.modules[path].b_or)
  # ... but the carried fix does.
  _assert_same_adapter(fb.from_nnx(tree), adapter)
  _assert_same_adapter(fb.from_tree(tree), adapter)


def test_nnx_round_trip_from_module_state_and_bf16(made):
  adapter = made[1]["patterns"][0]
  dtype = peft_format.DTYPES["bfloat16"]
  bf16 = peft_format.PeftAdapter(adapter.config, {p: peft_format.LoraPair(x.a_ri.astype(dtype), x.b_or.astype(dtype))
                                                  for p, x in adapter.modules.items()})
  tree = fb.to_nnx(bf16, key_map=TEMPLATE)
  assert {str(x.dtype) for x in jax.tree.leaves(tree.params)} == {"bfloat16"}
  state = nnx.State(tree.params)
  _assert_same_adapter(fb.from_nnx(state, tree.meta), bf16)


def test_nnx_after_training_divides_by_scaling(made):
  adapter = made[1]["patterns"][0]
  tree = fb.to_nnx(adapter)
  trained = jax.tree.map(lambda x: x * 1.5, tree.params)
  back = fb.from_nnx(trained, tree.meta)
  for path, pair in adapter.modules.items():
    np.testing.assert_allclose(back.modules[path].b_or, 1.5 * pair.b_or, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(back.modules[path].a_ri, 1.5 * pair.a_ri, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_peft_qwix_peft_round_trip_is_exact(made, name):
  adapter = made[1][name][0]
  tree = fb.to_qwix(adapter, key_map=TEMPLATE)
  leaf = tree.params["layer_0"]["self_attn"]["q_proj"]
  assert set(leaf) == {"kernel_lora_a", "kernel_lora_b"}
  pair = adapter.modules["model.layers.0.self_attn.q_proj"]
  assert leaf["kernel_lora_a"].shape == pair.a_ri.T.shape and leaf["kernel_lora_b"].shape == pair.b_or.T.shape
  _assert_same_adapter(fb.from_qwix(tree), adapter)


def test_qwix_rules_reproduce_peft_scaling(made):
  adapter = made[1]["rslora_patterns"][0]
  tree = fb.to_qwix(adapter, key_map=TEMPLATE)
  rules = fb.qwix_rules(tree)
  for path in adapter.modules:
    tp = fb.path_str(fb.as_key_map(TEMPLATE).to_tree(path))
    rule = next(r for r in rules if re.fullmatch(r["module_path"], tp))
    assert rule["rank"] == adapter.rank(path)
    assert rule["alpha"] / rule["rank"] == pytest.approx(adapter.scaling(path), rel=1e-12)


def test_qwix_model_matches_peft(made):
  qwix = pytest.importorskip("qwix")
  base, adapters = made
  adapter = adapters["rslora_patterns"][0]
  tree = fb.to_qwix(adapter, key_map=TEMPLATE)
  km = fb.as_key_map(TEMPLATE)
  rng = np.random.default_rng(1)
  xs = {fb.path_str(km.to_tree(p)): jax.numpy.asarray(rng.standard_normal((3, base[p + ".weight"].shape[1])),
                                                      jax.numpy.float32) for p in adapter.modules}
  provider = qwix.LoraProvider([qwix.LoraRule(**r) for r in fb.qwix_rules(tree)])

  def make():
    rngs = nnx.Rngs(0)
    model = build_model({km.to_tree(p): nnx.Linear(*base[p + ".weight"].shape[::-1], use_bias=False, rngs=rngs)
                         for p in adapter.modules})
    return qwix.apply_lora_to_model(model, provider, xs, rngs=nnx.Rngs(1))  # qwix promotes jax arrays only

  lora_model = abstract(make)
  assert "kernel_lora_a" in nnx.state(lora_model, nnx.LoRAParam).to_pure_dict()["layer_0"]["self_attn"]["q_proj"]
  nnx.update(lora_model, kernel_state(base, adapter.modules, km), tree.params)
  ys = run(lora_model, xs)
  for path in adapter.modules:
    key = fb.path_str(km.to_tree(path))
    base_out, lora_out = peft_reference(base, adapter, path, np.asarray(xs[key], np.float64))
    scale = np.abs(base_out + lora_out).max()
    np.testing.assert_allclose(np.asarray(ys[key], np.float64), base_out + lora_out, atol=2e-5 * scale, rtol=0,
                               err_msg=path)


def test_trees_without_meta(made):
  adapter = made[1]["patterns"][0]
  # nnx trained from scratch: scaling 1, so the exported adapter has alpha = r and B = lora_bᵀ.
  tree = fb.to_nnx(adapter, key_map=TEMPLATE)
  back = fb.from_nnx(tree.params, key_map=TEMPLATE, base_model="my-model")
  assert sorted(back.modules) == sorted(adapter.modules)
  assert back.config["base_model_name_or_path"] == "my-model"
  for path, pair in adapter.modules.items():
    assert back.scaling(path) == 1.0
    delta = back.modules[path].b_or.astype(np.float64) @ back.modules[path].a_ri
    want = adapter.scaling(path) * pair.b_or.astype(np.float64) @ pair.a_ri
    np.testing.assert_allclose(delta, want, rtol=1e-6, atol=1e-7)
  # qwix needs alpha from the user: it is not in the tree.
  qtree = fb.to_qwix(adapter)
  with pytest.raises(CrossLoraError, match="alpha"):
    fb.from_qwix(qtree.params)
  back = fb.from_qwix(qtree.params, alpha=lambda p: adapter.scaling(p) * adapter.rank(p))
  for path in adapter.modules:
    assert back.scaling(path) == pytest.approx(adapter.scaling(path))
  # A forward-only key map cannot find modules without meta.
  with pytest.raises(CrossLoraError, match="inverse"):
    fb.from_nnx(tree.params, key_map=lambda p: tuple(p.split(".")))


def test_from_nnx_module_directly(made):
  adapter = made[1]["patterns"][0]
  paths = [p for p in adapter.modules if ".0." in p]
  small = peft_format.PeftAdapter(adapter.config, {p: adapter.modules[p] for p in paths})
  tree = fb.to_nnx(small, key_map=TEMPLATE)
  model = abstract(lambda: lora_linears(made[0], small, fb.as_key_map(TEMPLATE)))
  nnx.update(model, tree.params)
  _assert_same_adapter(fb.from_nnx(model, tree.meta), small)


def test_key_template():
  km = fb.key_template(("model.layers.{layer}.self_attn.{name}", "blocks/{layer}/attn/{name}"),
                       ("model.layers.{layer}.mlp.{name}", "blocks/{layer}/ffn/{name}"))
  assert km.to_tree("model.layers.12.mlp.down_proj") == ("blocks", 12, "ffn", "down_proj")
  assert km.to_hf(("blocks", 12, "ffn", "down_proj")) == "model.layers.12.mlp.down_proj"
  assert km.to_hf(("elsewhere", 1)) is None
  with pytest.raises(CrossLoraError, match="matching"):
    km.to_tree("lm_head")
  with pytest.raises(CrossLoraError, match="same"):
    fb.key_template(("model.layers.{layer}.{block}.{name}", "blocks/{layer}/{name}"))
  assert fb.IDENTITY.to_tree("model.layers.3.mlp.up_proj") == ("model", "layers", 3, "mlp", "up_proj")


def test_bad_trees_raise_clear_errors(made):
  adapter = made[1]["patterns"][0]
  tree = fb.to_nnx(adapter)
  broken = jax.tree.map(lambda x: x, tree.params)
  del broken["model"]["layers"][1]["self_attn"]["q_proj"]["lora"]["lora_b"]
  with pytest.raises(CrossLoraError, match=r"model/layers/1/self_attn/q_proj/lora: lora_a and lora_b expected"):
    fb.from_nnx(broken, tree.meta)
  wrong = jax.tree.map(lambda x: x, tree.params)
  wrong["model"]["layers"][0]["mlp"]["up_proj"]["lora"]["lora_b"] = np.zeros((3, 7), np.float32)
  with pytest.raises(CrossLoraError, match=r"up_proj/lora: lora_a \(in, r\) and lora_b \(r, out\)"):
    fb.from_nnx(wrong, tree.meta)
  with pytest.raises(CrossLoraError, match="format"):
    fb.from_nnx(tree.params, {"layout": "nnx"})
  with pytest.raises(CrossLoraError, match="one module per tree path"):
    fb.to_nnx(adapter, key_map=lambda p: ("same",))
