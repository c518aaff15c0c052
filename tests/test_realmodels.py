"""Real pretrained models (crosslora_bench.zoo): transfers load in PEFT, act, and report sane numbers.

The models are read from the models folder (``$CROSSLORA_MODELS``, see
crosslora_bench.zoo.models_dir), where ``python scripts/fetch_models.py`` puts them
(scripts/test.sh runs it first); the tests never download. Pairs: the shipped example adapter SmolLM2 -> Qwen2.5-Coder-0.5B
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

from crosslora_bench.adapters import random_adapter
from crosslora_jax import CrossLoraError, TransferConfig, read_adapter, save_adapter, transfer_adapter
from crosslora_jax import methods
from crosslora_jax.formats.architectures import CANONICAL_MODULES
from crosslora_jax.formats.checkpoint import Checkpoint
from peft_helpers import base_logits, load_with_adapter, logits

pytestmark = pytest.mark.realmodels

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The shipped example adapter; CROSSLORA_EXAMPLE_ADAPTER points the tests at another SmolLM2 LoRA.
EXAMPLE = pathlib.Path(os.environ.get("CROSSLORA_EXAMPLE_ADAPTER", ROOT / "examples" / "smollm2-pydoc-lora"))
MODELS = ("smollm2-135m", "qwen2.5-coder-0.5b", "gemma3-270m")
CROSS_SHAPE_METHODS = tuple(name for name, m in methods.REGISTRY.items() if not m.same_shape)
SAME_SHAPE_METHODS = tuple(name for name, m in methods.REGISTRY.items() if m.same_shape)
PAIRS = (("smollm2-135m", "qwen2.5-coder-0.5b"), ("smollm2-135m", "gemma3-270m"),
         ("qwen2.5-coder-0.5b", "smollm2-135m"))
PAIR_IDS = ("smollm2_to_qwen", "smollm2_to_gemma", "qwen_to_smollm2")


@pytest.fixture(scope="session")
def zoo_dirs() -> dict[str, pathlib.Path]:
  from crosslora_bench import zoo

  found = {name: zoo.model_path(name) for name in MODELS}
  missing = [name for name, folder in found.items() if folder is None]
  if missing:
    pytest.fail(f"real models {', '.join(missing)} expected in {zoo.models_dir()}, got none there: run "
                f"python scripts/fetch_models.py first (scripts/test.sh does), or point ${zoo.MODELS_ENV} at them")
  return found


@pytest.fixture(scope="session")
def qwen_adapter(zoo_dirs, tmp_path_factory) -> pathlib.Path:
  """A random, nonzero LoRA (r=4, all seven modules) for the real Qwen2.5-Coder-0.5B.

  The config is PEFT's own (LoraConfig.to_dict); the factors are drawn here with the
  shapes of the real checkpoint, so no 0.5B model has to be loaded to make it.
  """
  from peft import LoraConfig

  arch = Checkpoint(zoo_dirs["qwen2.5-coder-0.5b"]).arch
  config = LoraConfig(r=4, lora_alpha=8, target_modules=list(CANONICAL_MODULES), task_type="CAUSAL_LM").to_dict()
  config = {k: sorted(v) if isinstance(v, set) else getattr(v, "value", v) for k, v in config.items()}
  config["base_model_name_or_path"] = str(zoo_dirs["qwen2.5-coder-0.5b"])
  adapter = random_adapter(arch, seed=0, rank=4, a_scale=None, b_scale=0.02, config=config)
  out = tmp_path_factory.mktemp("qwen-lora") / "qwen-random-lora"
  save_adapter(adapter, out, dtype="float16", target=arch)
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


@pytest.mark.parametrize("method", SAME_SHAPE_METHODS)
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
