"""Property-based tests of the pytree-level API (hypothesis; in memory, no transformers).

Random llama-family models (layer counts, head counts, head_dim, widths, dtypes) as
``DictWeights`` and random adapters (target subsets, layers_to_transform, r,
rank_pattern, alpha_pattern, rslora, dtypes) as ``PeftAdapter``: the transfer never
crashes on valid input, every output fits the target and survives the strict writer,
and the maths holds against numpy for the exact and Gram SVDs (the randomized one, now
the default, approximates the subspaces, so it is checked for fit only): with source =
target, cross_lora gives ΔW_t = U Uᵀ ΔW_s V Vᵀ; across models ‖ΔW_t‖_F = ‖U_sᵀ ΔW_s V_s‖_F.
Base weights get well separated singular values so that the rank-r subspaces are
well defined (the maths is about subspaces, not about breaking ties).
"""

from __future__ import annotations

import pathlib
import tempfile

import ml_dtypes
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crosslora_jax import DictWeights, TransferConfig
from crosslora_jax.core import engine
from crosslora_jax.formats import adapter_io, peft_format
from crosslora_jax.formats.architectures import CANONICAL_MODULES, Architecture

DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
SETTINGS = settings(max_examples=6, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))


@st.composite
def model_configs(draw):
  heads = draw(st.sampled_from([1, 2, 4]))
  return dict(model_type="llama", num_hidden_layers=draw(st.integers(1, 3)),
              hidden_size=draw(st.sampled_from([8, 12, 16])), num_attention_heads=heads,
              num_key_value_heads=draw(st.sampled_from([d for d in (1, 2, 4) if heads % d == 0])),
              head_dim=draw(st.sampled_from([4, 6])), intermediate_size=draw(st.sampled_from([10, 24])))


def well_conditioned(rng, m, n):
  """A random (m, n) matrix with singular values 1, 1.5, 2, ...: gaps of 0.5."""
  k = min(m, n)
  u, _ = np.linalg.qr(rng.standard_normal((m, k)))
  v, _ = np.linalg.qr(rng.standard_normal((n, k)))
  return (u * (1.0 + 0.5 * np.arange(k)[::-1])) @ v.T


def make_weights(config, seed, dtype, name):
  arch = Architecture.from_config(config)
  rng = np.random.default_rng(seed)
  weights = {arch.weight_key(layer, stored): well_conditioned(rng, *arch.stored_shape(stored)).astype(dtype)
             for layer in range(arch.num_layers) for stored in arch.spec.stored}
  return DictWeights(config, weights, name=name)


@st.composite
def adapters(draw, arch):
  """A valid PEFT LoRA config and factors for ``arch``: ranks follow r / rank_pattern."""
  modules = draw(st.lists(st.sampled_from(CANONICAL_MODULES), min_size=1, max_size=7, unique=True))
  r = draw(st.integers(1, 6))
  config = {"peft_type": "LORA", "r": r, "lora_alpha": draw(st.sampled_from([1, 8, 16.5])),
            "target_modules": sorted(modules), "use_rslora": draw(st.booleans())}
  if draw(st.booleans()):
    config["rank_pattern"] = {draw(st.sampled_from(modules)): draw(st.integers(1, 6))}
  if draw(st.booleans()):
    config["alpha_pattern"] = {draw(st.sampled_from(modules)): draw(st.sampled_from([2, 32]))}
  layers = list(range(arch.num_layers))
  if draw(st.booleans()):
    layers = draw(st.lists(st.sampled_from(layers), min_size=1, unique=True))
    config["layers_to_transform"] = sorted(layers)
  dtype = DTYPES[draw(st.sampled_from(sorted(DTYPES)))]
  rng = np.random.default_rng(draw(st.integers(0, 2**16)))
  pairs = {}
  for layer in layers:
    for module in modules:
      path = arch.module_path(layer, arch.stored_for(module)[0])
      rank = peft_format.module_rank(config, path)
      out_dim, in_dim = arch.shape(module)
      pairs[path] = peft_format.LoraPair((0.3 * rng.standard_normal((rank, in_dim))).astype(dtype),
                                         (0.3 * rng.standard_normal((out_dim, rank))).astype(dtype))
  return peft_format.PeftAdapter(config, pairs)


def svd_basis(w, rank):
  u, _, vt = np.linalg.svd(np.asarray(w, np.float64), full_matrices=False)
  return u[:, :rank], vt[:rank].T


def f32(x):
  return np.asarray(x).astype(np.float32).astype(np.float64)


def check_fits_target(result, adapter, source, target, rank):
  """Every output module exists in the target with its sizes, keeps its LoRA rank and scaling."""
  out = result.adapter
  adapted = set()  # (source layer, canonical module)
  for path in adapter.modules:
    layer, stored = source.arch.parse_module_path(path)
    adapted |= {(layer, m) for m in stored.parts}
  expected = {(j, m) for j, i in enumerate(result.report.layer_map) if i is not None
              for m in target.arch.modules if (i, m) in adapted}
  assert {(e["target_layer"], e["module"]) for e in result.report.entries} == expected
  for entry in result.report.entries:
    path, source_path = entry["target_key"], entry["source_key"]
    a_t, b_t = out.modules[path]
    out_t, in_t = target.arch.shape(entry["module"])
    assert a_t.shape == (adapter.rank(source_path), in_t) and b_t.shape == (out_t, adapter.rank(source_path))
    assert np.isfinite(a_t).all() and np.isfinite(b_t).all()
    assert peft_format.targets_module(out.config, path)
    assert np.isclose(out.scaling(path), adapter.scaling(source_path), rtol=1e-9)
    if entry["rank_used"] is not None:
      assert entry["rank_used"] == min(rank, *source.arch.shape(entry["module"]), out_t, in_t)
  with tempfile.TemporaryDirectory() as tmp:  # the strict writer re-reads and checks everything
    dtype = str(np.dtype(adapter.dtype))
    adapter_io.save_adapter(out, pathlib.Path(tmp) / "out", dtype=dtype, target=target.arch)
    back = peft_format.read_adapter(pathlib.Path(tmp) / "out")
    assert sorted(back.modules) == sorted(out.modules)
    assert all(back.rank(p) == out.rank(p) and np.isclose(back.scaling(p), out.scaling(p)) for p in out.modules)


@SETTINGS
@given(data=st.data())
def test_cross_model_transfer_fits_target_and_keeps_projected_norm(data):
  src_cfg, tgt_cfg = data.draw(model_configs(), "source"), data.draw(model_configs(), "target")
  source = make_weights(src_cfg, 0, DTYPES[data.draw(st.sampled_from(sorted(DTYPES)), "source dtype")], "source")
  target = make_weights(tgt_cfg, 1, DTYPES[data.draw(st.sampled_from(sorted(DTYPES)), "target dtype")], "target")
  adapter = data.draw(adapters(source.arch), "adapter")
  rank = data.draw(st.integers(1, 40), "rank")  # above a weight's sizes it is clipped
  method = data.draw(st.sampled_from(["cross_lora", "truncate_pad"]), "method")
  layer_map = data.draw(st.sampled_from(["auto", "identity", "depth"]), "layer map")
  svd = data.draw(st.sampled_from(["exact", "gram", "randomized"]), "svd")
  result = engine.transfer_adapter(source, target, adapter,
                                   TransferConfig(method=method, rank=rank, layer_map=layer_map, svd=svd))
  check_fits_target(result, adapter, source, target, rank)
  if method != "cross_lora" or svd == "randomized":  # randomized approximates the subspaces
    return
  for entry in result.report.entries:
    a_s, b_s = (f32(x) for x in adapter.modules[entry["source_key"]])
    a_t, b_t = (f32(x) for x in result.adapter.modules[entry["target_key"]])
    w_s = f32(source.weight(entry["source_layer"], entry["module"]))
    u_s, v_s = svd_basis(w_s, entry["rank_used"])
    dw_s = b_s @ a_s
    want = np.linalg.norm(u_s.T @ dw_s @ v_s)
    assert abs(np.linalg.norm(b_t @ a_t) - want) <= 1e-4 * np.linalg.norm(dw_s) + 1e-6, entry


@SETTINGS
@given(data=st.data())
def test_same_model_cross_lora_is_the_subspace_projection(data):
  config = data.draw(model_configs(), "model")
  base = make_weights(config, 2, DTYPES[data.draw(st.sampled_from(sorted(DTYPES)), "dtype")], "model")
  adapter = data.draw(adapters(base.arch), "adapter")
  rank = data.draw(st.integers(1, 40), "rank")
  svd = data.draw(st.sampled_from(["exact", "gram"]), "svd")
  result = engine.transfer_adapter(base, base, adapter, TransferConfig(method="cross_lora", rank=rank, svd=svd))
  check_fits_target(result, adapter, base, base, rank)
  assert len(result.report.entries) == len(adapter.modules)
  for entry in result.report.entries:
    assert entry["target_key"] == entry["source_key"]
    a_s, b_s = (f32(x) for x in adapter.modules[entry["source_key"]])
    a_t, b_t = (f32(x) for x in result.adapter.modules[entry["target_key"]])
    u, v = svd_basis(f32(base.weight(entry["target_layer"], entry["module"])), entry["rank_used"])
    dw_s = b_s @ a_s
    np.testing.assert_allclose(b_t @ a_t, u @ u.T @ dw_s @ v @ v.T, atol=1e-4 * np.linalg.norm(dw_s) + 1e-6)
