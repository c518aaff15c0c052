"""The method registry: what each method declares, the design doc's example method, and a light import."""

import pathlib
import re
import subprocess
import sys
import types

import numpy as np
import pytest

from crosslora_bench.adapters import random_adapter
from crosslora_jax import CrossLoraError, DictWeights, TransferConfig, methods, transfer_adapter
from crosslora_jax.core import pytree_api
from crosslora_jax.formats.architectures import Architecture

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = dict(model_type="llama", num_hidden_layers=2, hidden_size=16, num_attention_heads=2,
              num_key_value_heads=1, head_dim=8, intermediate_size=24)


def _weights(seed, config=CONFIG):
  arch = Architecture.from_config(config)
  rng = np.random.default_rng(seed)
  return DictWeights(config, {arch.weight_key(l, s): rng.standard_normal(arch.stored_shape(s)).astype(np.float32)
                              for l in range(arch.num_layers) for s in arch.spec.stored})


def test_registry_declares_what_each_method_needs():
  assert methods.NAMES == ("cross_lora", "lora_x", "copy", "truncate_pad", "anchored")
  needs = {name: (m.needs_source_subspaces, m.needs_target_subspaces, m.same_shape)
           for name, m in methods.REGISTRY.items()}
  assert needs == {"cross_lora": (True, True, False), "lora_x": (False, True, True), "copy": (False, False, True),
                   "truncate_pad": (False, False, False), "anchored": (False, False, False)}
  assert [n for n, m in methods.REGISTRY.items() if m.experimental] == ["anchored"]
  assert pytree_api.FACTOR_METHODS == ("cross_lora", "lora_x", "copy", "truncate_pad")
  with pytest.raises(CrossLoraError, match="--method: one of cross_lora, lora_x"):
    methods.get("magic")


def _design_doc_method() -> types.ModuleType:
  """The example method of docs/design.md ("Adding a method"), as a module."""
  text = (ROOT / "docs" / "design.md").read_text()
  section = text[text.index("### Adding a method"):]
  code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
  module = types.ModuleType("scaled_copy")
  exec(compile(code, "docs/design.md", "exec"), module.__dict__)  # noqa: S102  (our own doc)
  return module


def test_the_design_doc_example_method_plugs_in_with_one_registry_line(monkeypatch):
  example = _design_doc_method()
  monkeypatch.setitem(methods.REGISTRY, "scaled_copy", example.METHOD)
  source, target = _weights(0), _weights(1)
  adapter = random_adapter(source.arch, seed=2, rank=3, modules=("q_proj", "down_proj"))
  result = transfer_adapter(source, target, adapter, TransferConfig(method="scaled_copy", svd="exact"))
  assert result.adapter.modules.keys() == adapter.modules.keys()
  for path, pair in adapter.modules.items():
    np.testing.assert_array_equal(result.adapter.modules[path].a_ri, pair.a_ri)
    np.testing.assert_allclose(result.adapter.modules[path].b_or, 0.5 * pair.b_or, rtol=1e-6)
  assert all(e["rank_used"] is None and e["norm_ratio"] == 0.5 for e in result.report.entries)
  calibrated = transfer_adapter(source, target, adapter, TransferConfig(method="scaled_copy", calibrate_norm=True))
  assert all(e["calibration_scale"] is not None for e in calibrated.report.entries)
  # The planner asks the method for its shape rule.
  other = _weights(3, dict(CONFIG, hidden_size=24))
  with pytest.raises(CrossLoraError, match="equal .* shapes expected by --method scaled_copy"):
    transfer_adapter(source, other, adapter, TransferConfig(method="scaled_copy"))
  # And the pytree API's per-module function offers it through project_module.
  w = np.eye(6, 4, dtype=np.float32)
  out = pytree_api.transfer_factors(w, w, np.ones((2, 4), np.float32), np.ones((6, 2), np.float32),
                                    method="copy", rank=2)
  np.testing.assert_array_equal(np.asarray(out.b_or), np.ones((6, 2)))


def test_importing_the_package_imports_no_torch_transformers_or_peft():
  code = ("import sys, crosslora_jax, crosslora_jax.transfer, crosslora_jax.methods, crosslora_jax.core.pytree_api\n"
          "assert callable(crosslora_jax.transfer_adapters) and callable(crosslora_jax.transfer_adapter)\n"
          "heavy = sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules)\n"
          "assert not heavy, heavy\n")
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
