"""Method ``anchored``: vocabulary matching, planted maps, identity, PEFT interop, the guard."""

import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import fixtures
from crosslora_jax import CrossLoraError, TransferConfig, read_adapter, save_adapter, transfer_adapter
from crosslora_jax.methods import anchored, anchored_vocab
from crosslora_jax.formats.checkpoint import Checkpoint
from peft_helpers import base_logits, load_with_adapter, logits

VOCAB = 512


def _byte_level_token(text: str) -> str:
  table = {b: c for c, b in anchored_vocab._byte_decoder().items()}
  return "".join(table[b] for b in text.encode("utf-8"))


def write_tokenizer(folder: pathlib.Path, strings: list[str], *, style: str = "byte_level", special: int = 2) -> None:
  """A minimal tokenizer.json: ``special`` special tokens, then ``strings`` (ids in order)."""
  tokens = [f"<special{i}>" for i in range(special)]
  for s in strings:
    tokens.append(_byte_level_token(s) if style == "byte_level" else s.replace(" ", "▁"))
  decoder = {"type": "ByteLevel"} if style == "byte_level" else {"type": "Sequence", "decoders": [
      {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"}]}
  data = {
      "added_tokens": [{"id": i, "content": tokens[i], "special": True} for i in range(special)],
      "decoder": decoder,
      "model": {"type": "BPE", "vocab": {t: i for i, t in enumerate(tokens)}},
  }
  (folder / "tokenizer.json").write_text(json.dumps(data))


def _words(n: int) -> list[str]:
  return [(" " if i % 2 else "") + f"w{i}" for i in range(n)]


def test_vocab_matching_normalises_space_markers_and_skips_specials(tmp_path):
  a, b = tmp_path / "a", tmp_path / "b"
  a.mkdir(), b.mkdir()
  write_tokenizer(a, [" the", "x", "\n", " only_a"], style="byte_level")
  write_tokenizer(b, ["y", "x", " the", "<0x0A>"], style="metaspace", special=3)
  vocab = anchored.read_vocab(a)
  assert b" the" in vocab and b"<special0>" not in vocab
  ids_s, ids_t = anchored.shared_token_ids(a, b)
  # " the" (Ġthe / ▁the), "x", and "\n" (Ċ / <0x0A>) are shared; specials never are.
  assert sorted(zip(ids_s.tolist(), ids_t.tolist())) == [(2, 5), (3, 4), (4, 6)]


def test_missing_tokenizer_is_a_clear_error(tmp_path):
  with pytest.raises(CrossLoraError, match="tokenizer.json expected .*--method cross_lora"):
    anchored.read_vocab(tmp_path)


def test_ridge_map_recovers_planted_linear_map():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((600, 24)).astype(np.float32)  # target-side embeddings
  planted = rng.standard_normal((24, 16)).astype(np.float32)
  y = x @ planted + 0.01 * rng.standard_normal((600, 16)).astype(np.float32)
  fit = anchored.fit_ridge_map(jnp.asarray(x), jnp.asarray(y), n_fit=400, n_val=100)
  np.testing.assert_allclose(np.asarray(fit.m), planted, atol=5e-3)
  assert float(fit.r2) > 0.999
  # Unrelated data: held-out R² near zero, not the in-sample fit.
  noise = rng.standard_normal((600, 16)).astype(np.float32)
  assert float(anchored.fit_ridge_map(jnp.asarray(x), jnp.asarray(noise), n_fit=400, n_val=100).r2) < 0.05


def test_dual_form_matches_primal():
  rng = np.random.default_rng(1)
  x = rng.standard_normal((300, 40)).astype(np.float32)
  y = x @ rng.standard_normal((40, 8)).astype(np.float32)
  wide = anchored.fit_ridge_map(jnp.asarray(x), jnp.asarray(y), n_fit=30, n_val=100)  # d > n_fit: dual
  lam = float(wide.lam)
  xf, yf = x[:30], y[:30]
  scale = np.trace(xf @ xf.T) / 40  # mean σ² over the d = 40 columns
  ref = xf.T @ np.linalg.solve(xf @ xf.T + lam * scale * np.eye(30), yf)
  np.testing.assert_allclose(np.asarray(wide.m), ref, rtol=1e-3, atol=1e-4)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  root = tmp_path_factory.mktemp("anchored")
  out = {}
  for kind in ("llama", "qwen2"):
    model = fixtures.make_model(kind, root / kind, seed=len(kind), vocab_size=VOCAB)
    write_tokenizer(root / kind, _words(VOCAB - 2))
    fixtures.make_adapter(model, root / f"{kind}-lora", kind=kind, r=4, alpha=8)
    out[kind] = (root / kind, root / f"{kind}-lora")
  return out


def _save(result, folder, target_dir):
  save_adapter(result.adapter, folder, dtype="float32", target=Checkpoint(target_dir).arch)


def test_identical_models_give_identity_maps_and_reproduce_the_adapter(models, tmp_path):
  src, lora = models["llama"]
  cfg = anchored.AnchorConfig(tokens=VOCAB)
  anchors = anchored.Anchors(Checkpoint(src), Checkpoint(src), cfg)
  for module in ("q_proj", "o_proj", "down_proj"):
    for side in ("in", "out"):
      fit = anchors.space_map(1, 1, module, side)
      np.testing.assert_allclose(fit.m, np.eye(fit.m.shape[0]), atol=2e-3)
      assert float(fit.r2) > 0.999
  result = transfer_adapter(src, src, lora, TransferConfig(method="anchored", anchor=cfg))
  source = read_adapter(lora)
  for path, pair in source.modules.items():
    got = result.adapter.modules[path]
    np.testing.assert_allclose(got.b_or @ got.a_ri, pair.b_or @ pair.a_ri, atol=2e-3 * np.abs(pair.b_or @ pair.a_ri).max())
  assert all(e["guard"] != "skipped" for e in result.report.entries)
  out = tmp_path / "self"
  _save(result, out, src)
  model, caught = load_with_adapter(src, out)
  reference, _ = load_with_adapter(src, lora)
  assert caught == []
  torch.testing.assert_close(logits(model), logits(reference), rtol=1e-3, atol=1e-3)


def test_cross_model_output_loads_in_peft_without_warnings_and_acts(models, tmp_path):
  cfg = anchored.AnchorConfig(tokens=VOCAB, threshold=0.0, shrink=False)
  result = transfer_adapter(models["llama"][0], models["qwen2"][0], models["llama"][1],
                            TransferConfig(method="anchored", anchor=cfg))
  out = tmp_path / "llama-to-qwen2"
  _save(result, out, models["qwen2"][0])
  model, caught = load_with_adapter(models["qwen2"][0], out)
  assert caught == []
  with_adapter = logits(model)
  assert torch.isfinite(with_adapter).all()
  assert (with_adapter - base_logits(model)).abs().max() > 1e-4
  for e in result.report.entries:
    assert -10 < e["anchor_r2_in"] <= 1 and -10 < e["anchor_r2_out"] <= 1
    assert e["relative_update_target"] >= 0 and e["calibration_scale"] is None


def test_default_guard_on_unrelated_models_keeps_the_target_at_its_base(models, tmp_path):
  # Two random models share a vocabulary but nothing else: predicted transferability is ~0.
  result = transfer_adapter(models["llama"][0], models["qwen2"][0], models["llama"][1],
                            TransferConfig(method="anchored", anchor=anchored.AnchorConfig(tokens=VOCAB)))
  assert {e["guard"] for e in result.report.entries} == {"skipped"}
  assert f"anchored guard: skipped {len(result.report.entries)};" in result.report.text()
  assert all(np.abs(p.b_or).max() == 0 for p in result.adapter.modules.values())


def test_guard_skips_the_module_whose_planted_alignment_is_random(models, tmp_path):
  src, lora = models["llama"]
  tgt = tmp_path / "llama-random-v1"
  tgt.mkdir()
  for name in ("config.json", "tokenizer.json"):
    (tgt / name).write_text((src / name).read_text())
  weights = load_file(src / "model.safetensors")
  key = "model.layers.1.self_attn.v_proj.weight"
  rng = np.random.default_rng(7)
  weights[key] = rng.standard_normal(weights[key].shape).astype(np.float32) * weights[key].std()
  save_file(weights, tgt / "model.safetensors", metadata={"format": "pt"})
  cfg = anchored.AnchorConfig(tokens=VOCAB, threshold=0.5)
  result = transfer_adapter(src, tgt, lora, TransferConfig(method="anchored", anchor=cfg))
  guard = {(e["target_layer"], e["module"]): e for e in result.report.entries}
  assert guard[(1, "v_proj")]["guard"] == "skipped"
  assert guard[(1, "v_proj")]["predicted_transferability"] < 0.5
  assert guard[(0, "v_proj")]["guard"] != "skipped"
  assert guard[(1, "q_proj")]["guard"] != "skipped"
  v1 = result.adapter.modules["model.layers.1.self_attn.v_proj"]
  assert np.abs(v1.b_or).max() == 0


def test_calibrate_norm_matches_relative_update_norms(models):
  result = transfer_adapter(models["llama"][0], models["qwen2"][0], models["llama"][1],
                            TransferConfig(method="truncate_pad", calibrate_norm=True))
  for e in result.report.entries:
    assert e["calibration_scale"] is not None
    np.testing.assert_allclose(e["relative_update_target"], e["relative_update_source"], rtol=1e-4)


def test_bad_inputs(models, tmp_path):
  bare = tmp_path / "bare"
  fixtures.make_model("qwen2", bare, vocab_size=VOCAB)  # no tokenizer.json
  with pytest.raises(CrossLoraError, match="tokenizer.json expected"):
    transfer_adapter(models["llama"][0], bare, models["llama"][1], TransferConfig(method="anchored"))
  with pytest.raises(CrossLoraError, match="anchor threshold"):
    anchored.AnchorConfig(threshold=2.0)
  with pytest.raises(CrossLoraError, match="--method: one of .*anchored"):
    TransferConfig(method="anchor")
  # The shape rules of every method: an adapter of another base is refused before any work.
  with pytest.raises(CrossLoraError, match="lora_A"):
    transfer_adapter(models["qwen2"][0], models["llama"][0], models["llama"][1], TransferConfig(method="anchored"))
