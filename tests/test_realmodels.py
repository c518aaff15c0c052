"""Real pretrained models (crosslora_bench.zoo): transfers load in PEFT, act, and report sane numbers.

The models are fetched (downloaded and converted once, then cached) by the
session fixture. Pairs: the shipped example adapter SmolLM2 -> Qwen2.5-Coder-0.5B
and SmolLM2 -> Gemma-3-270M, and back Qwen2.5 -> SmolLM2 with a small random
(nonzero) PEFT LoRA made on Qwen here. Every method that applies to a pair is run;
methods that need equal shapes must refuse a cross-shape pair with a clear error.
"""

from __future__ import annotations

import math
import os
import pathlib

import numpy as np
import pytest
import torch

from crosslora_jax import CrossLoraError, TransferConfig, read_adapter, save_adapter, transfer_adapter
from crosslora_jax.core import planning
from crosslora_jax.formats.checkpoint import Checkpoint
from peft_helpers import base_logits, load_with_adapter, logits

pytestmark = pytest.mark.realmodels

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The shipped example adapter; CROSSLORA_EXAMPLE_ADAPTER points the tests at another SmolLM2 LoRA.
EXAMPLE = pathlib.Path(os.environ.get("CROSSLORA_EXAMPLE_ADAPTER", ROOT / "examples" / "smollm2-pydoc-lora"))
MODELS = ("smollm2-135m", "qwen2.5-coder-0.5b", "gemma3-270m")
CROSS_SHAPE_METHODS = tuple(m for m in planning.METHODS if m not in planning.SAME_SHAPE_METHODS)
PAIRS = (("smollm2-135m", "qwen2.5-coder-0.5b"), ("smollm2-135m", "gemma3-270m"),
         ("qwen2.5-coder-0.5b", "smollm2-135m"))
PAIR_IDS = ("smollm2_to_qwen", "smollm2_to_gemma", "qwen_to_smollm2")


@pytest.fixture(scope="session")
def zoo_dirs() -> dict[str, pathlib.Path]:
  from crosslora_bench import zoo

  return {name: zoo.fetch_model(name) for name in MODELS}


@pytest.fixture(scope="session")
def qwen_adapter(zoo_dirs, tmp_path_factory) -> pathlib.Path:
  """A random, nonzero LoRA (r=4, all seven modules) for the real Qwen2.5-Coder-0.5B.

  The config is PEFT's own (LoraConfig.to_dict); the factors are drawn here with the
  shapes of the real checkpoint, so no 0.5B model has to be loaded to make it.
  """
  from peft import LoraConfig

  from crosslora_jax import PeftAdapter
  from crosslora_jax.formats.peft_format import LoraPair

  arch = Checkpoint(zoo_dirs["qwen2.5-coder-0.5b"]).arch
  modules = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
  config = LoraConfig(r=4, lora_alpha=8, target_modules=list(modules), task_type="CAUSAL_LM").to_dict()
  config = {k: sorted(v) if isinstance(v, set) else getattr(v, "value", v) for k, v in config.items()}
  config["base_model_name_or_path"] = str(zoo_dirs["qwen2.5-coder-0.5b"])
  rng = np.random.default_rng(0)
  pairs = {}
  for layer in range(arch.num_layers):
    for stored in arch.spec.stored:
      out_dim, in_dim = arch.stored_shape(stored)
      pairs[arch.module_path(layer, stored)] = LoraPair(
          (rng.standard_normal((4, in_dim)) / np.sqrt(in_dim)).astype(np.float32),
          (rng.standard_normal((out_dim, 4)) * 0.02).astype(np.float32))
  out = tmp_path_factory.mktemp("qwen-lora") / "qwen-random-lora"
  save_adapter(PeftAdapter(config, pairs), out, dtype="float16", target=arch)
  return out


def _source_adapter(source: str, qwen_adapter: pathlib.Path) -> pathlib.Path:
  return qwen_adapter if source == "qwen2.5-coder-0.5b" else EXAMPLE


@pytest.fixture(scope="module")
def transferred(zoo_dirs, qwen_adapter, tmp_path_factory):
  """get(source, target, method) -> (TransferResult, output folder written in float16), made once."""
  root = tmp_path_factory.mktemp("realmodels")
  done = {}

  def get(source, target, method):
    if (source, target, method) not in done:
      result = transfer_adapter(zoo_dirs[source], zoo_dirs[target], _source_adapter(source, qwen_adapter),
                                TransferConfig(method=method, svd="randomized"))  # CI time: matmul-based SVD
      folder = root / f"{source}-to-{target}-{method}"
      save_adapter(result.adapter, folder, dtype="float16", target=Checkpoint(zoo_dirs[target]).arch)
      done[(source, target, method)] = (result, folder)
    return done[(source, target, method)]

  return get


def test_example_adapter_is_shipped():
  adapter = read_adapter(EXAMPLE)
  assert len(adapter.modules) == 30 * 7  # SmolLM2: 30 layers, all seven modules
  assert all(np.abs(p.b_or).max() > 0 for p in adapter.modules.values())


@pytest.mark.parametrize("source,target", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("method", CROSS_SHAPE_METHODS)
def test_transfer_loads_in_peft_and_changes_logits(transferred, zoo_dirs, source, target, method):
  result, folder = transferred(source, target, method)
  model, caught = load_with_adapter(zoo_dirs[target], folder)
  assert caught == []
  with_adapter, without = logits(model), base_logits(model)
  assert torch.isfinite(with_adapter).all()
  if all(e.get("guard") == "skipped" for e in result.report.entries):  # anchored's guard may drop everything
    torch.testing.assert_close(with_adapter, without)
  else:
    assert (with_adapter - without).abs().max() > 1e-3
  # Every layer of the target got all seven modules (depth map: no target layer is left out).
  n_layers = Checkpoint(zoo_dirs[target]).arch.num_layers
  assert len(result.adapter.modules) == 7 * n_layers
  assert result.adapter.config["base_model_name_or_path"] == Checkpoint(zoo_dirs[target]).name


@pytest.mark.parametrize("source,target", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("method", CROSS_SHAPE_METHODS)
def test_report_numbers_are_finite_and_in_range(transferred, source, target, method):
  report = transferred(source, target, method)[0].report
  assert report.entries and report.summary["modules_transferred"] == len(report.entries)
  for e in report.entries:
    assert math.isfinite(e["norm_ratio"]) and e["norm_ratio"] >= 0, e
    for key in ("energy_source", "energy_target"):
      if e[key] is not None:
        assert 0 < e[key] <= 1 + 1e-6, (key, e)
    if e["overlap"] is not None:
      assert -1 - 1e-6 <= e["overlap"] <= 1 + 1e-6, e
  if method == "cross_lora":
    assert all(e["energy_source"] is not None and e["overlap"] is not None for e in report.entries)
    assert all(e["rank_used"] == min(320, *e["source_shape"], *e["target_shape"]) for e in report.entries)
    # Projection onto rank-r subspaces never grows the update.
    assert max(e["norm_ratio"] for e in report.entries) <= 1 + 1e-4


@pytest.mark.parametrize("method", planning.SAME_SHAPE_METHODS)
def test_same_shape_methods_refuse_a_cross_family_pair(zoo_dirs, method):
  with pytest.raises(CrossLoraError, match="equal"):
    transfer_adapter(zoo_dirs["smollm2-135m"], zoo_dirs["qwen2.5-coder-0.5b"], EXAMPLE,
                     TransferConfig(method=method))


def test_copy_onto_the_same_model_reproduces_the_example_adapter(zoo_dirs, tmp_path):
  result = transfer_adapter(zoo_dirs["smollm2-135m"], zoo_dirs["smollm2-135m"], EXAMPLE, TransferConfig(method="copy"))
  save_adapter(result.adapter, tmp_path / "copy", dtype="float16")
  copied, caught = load_with_adapter(zoo_dirs["smollm2-135m"], tmp_path / "copy")
  reference, _ = load_with_adapter(zoo_dirs["smollm2-135m"], EXAMPLE)
  assert caught == []
  torch.testing.assert_close(logits(copied), logits(reference), rtol=1e-4, atol=1e-4)
  assert (logits(reference) - base_logits(reference)).abs().max() > 1e-2
