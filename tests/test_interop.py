"""Transferred adapters load into the real peft/transformers with no warnings, and act."""

import numpy as np
import pytest
import torch

import fixtures
from crosslora_jax import TransferConfig, save_adapter, transfer_adapter
from peft_helpers import base_logits, load_with_adapter, logits


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  root = tmp_path_factory.mktemp("interop")
  out = {}
  for kind in ("llama", "qwen2", "gemma", "gemma2", "mistral", "phi3", "gpt2"):
    model = fixtures.make_model(kind, root / kind, seed=len(kind))
    fixtures.make_adapter(model, root / f"{kind}-lora", kind=kind, r=4, alpha=8)
    out[kind] = (root / kind, root / f"{kind}-lora")
  return out


def _transfer(models, src, tgt, tmp_path, **config):
  result = transfer_adapter(models[src][0], models[tgt][0], models[src][1], TransferConfig(**config))
  out = tmp_path / f"{src}-to-{tgt}"
  from crosslora_jax import Checkpoint
  save_adapter(result.adapter, out, dtype="float32", target=Checkpoint(models[tgt][0]).arch)
  return result, out


@pytest.mark.parametrize("src,tgt", [("llama", "qwen2"), ("qwen2", "gemma2"), ("gemma", "llama"), ("mistral", "llama"),
                                     ("phi3", "llama"), ("llama", "phi3"), ("llama", "gpt2")])
def test_cross_model_loads_without_warnings_and_changes_logits(models, tmp_path, src, tgt):
  result, out = _transfer(models, src, tgt, tmp_path, rank=16)
  model, caught = load_with_adapter(models[tgt][0], out)
  assert caught == []
  with_adapter = logits(model)
  assert torch.isfinite(with_adapter).all()
  assert (with_adapter - base_logits(model)).abs().max() > 1e-4
  # Every weight that the target has and the source adapted was transferred.
  assert result.report.summary["modules_transferred"] == len(result.adapter.modules) or tgt in ("phi3", "gpt2")
  # Nothing was skipped silently: a module the target lacks shows up in the report.
  if tgt == "gpt2":
    assert any("gate_proj" in s["reason"] for s in result.report.skipped)


@pytest.mark.parametrize("kind", ["llama", "phi3", "gpt2"])
def test_copy_onto_same_model_reproduces_source_logits(models, tmp_path, kind):
  _, out = _transfer(models, kind, kind, tmp_path, method="copy")
  model, caught = load_with_adapter(models[kind][0], out)
  reference, _ = load_with_adapter(models[kind][0], models[kind][1])
  assert caught == []
  torch.testing.assert_close(logits(model), logits(reference), rtol=1e-4, atol=1e-4)


def test_cross_lora_same_model_full_rank_square_modules_exact(models, tmp_path):
  # llama q_proj and o_proj are square 64x64: at full rank their ΔW is reproduced exactly.
  result, _ = _transfer(models, "llama", "llama", tmp_path, rank=64)
  from crosslora_jax import read_adapter
  source = read_adapter(models["llama"][1])
  for path in ("model.layers.0.self_attn.q_proj", "model.layers.2.self_attn.o_proj"):
    got = result.adapter.modules[path]
    want = source.modules[path]
    np.testing.assert_allclose(got.b_or @ got.a_ri, want.b_or @ want.a_ri, atol=1e-4)


def test_rank_pattern_preserved_on_target(models, tmp_path_factory, tmp_path):
  root = tmp_path_factory.mktemp("patterns")
  model = fixtures.make_model("llama", root / "m", seed=0)
  fixtures.make_adapter(model, root / "a", kind="llama", r=4, alpha=8, use_rslora=True,
                        rank_pattern={"down_proj": 6}, alpha_pattern={"q_proj": 2})
  result = transfer_adapter(root / "m", models["qwen2"][0], root / "a", TransferConfig(rank=16))
  cfg = result.adapter.config
  assert cfg["use_rslora"] is True and cfg["r"] == 4
  assert result.adapter.rank("model.layers.3.mlp.down_proj") == 6
  assert result.adapter.scaling("model.layers.1.self_attn.q_proj") == pytest.approx(2 / 2)
  save_adapter(result.adapter, tmp_path / "out")
  peft_model, caught = load_with_adapter(models["qwen2"][0], tmp_path / "out")
  assert caught == []
  lora = peft_model.base_model.model.model.layers[3].mlp.down_proj
  assert lora.r["default"] == 6 and lora.scaling["default"] == pytest.approx(8 / np.sqrt(6))
  q = peft_model.base_model.model.model.layers[0].self_attn.q_proj
  assert q.scaling["default"] == pytest.approx(1.0)


def test_methods_same_shape_only(models):
  from crosslora_jax import CrossLoraError
  with pytest.raises(CrossLoraError, match="equal .* shapes expected by --method lora_x"):
    transfer_adapter(models["llama"][0], models["qwen2"][0], models["llama"][1], TransferConfig(method="lora_x"))
  r = transfer_adapter(models["llama"][0], models["qwen2"][0], models["llama"][1], TransferConfig(method="truncate_pad"))
  assert r.adapter.modules["model.layers.0.self_attn.q_proj"].a_ri.shape == (4, 80)


def test_warning_harness_catches_missing_keys(models, tmp_path):
  # The no-warning assertions above mean something only if a broken adapter is caught.
  from safetensors.numpy import load_file, save_file
  _, out = _transfer(models, "llama", "qwen2", tmp_path, rank=16)
  tensors = load_file(out / "adapter_model.safetensors")
  del tensors[sorted(tensors)[0]]
  save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
  _, caught = load_with_adapter(models["qwen2"][0], out)
  assert any("missing adapter keys" in w for w in caught)
