"""The JAX runtime against transformers (+ peft), fp32 on both sides, on tiny models of every family.

Each variant in ``fixtures.LM_VARIANTS`` exercises one family rule (sliding windows
shorter than the test sequence, soft-caps, llama3 / longrope / linear rope, local
and global Gemma-3 layers, biases, partial rotary, GPT-2's inverse-layer scaling)
with every 1-D weight perturbed so that norm conventions matter.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fixtures import LM_VARIANTS, LORA_MODULES, DEFAULT_MODULES, make_adapter, make_lm_model

from crosslora_jax import lm as jlm

SEQ = 40  # longer than every window (8) and every original rope context (32)


def assert_logits_match(ours: np.ndarray, ref: np.ndarray) -> None:
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert ours.shape == ref.shape
  scale = np.abs(ref).max()
  assert np.abs(ours - ref).max() <= 1e-3 * scale, (np.abs(ours - ref).max(), scale)
  assert (ours.argmax(-1) == ref.argmax(-1)).mean() >= 0.999


def torch_logits(model, ids: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids)).logits.float().numpy()


@pytest.fixture(scope="module", params=sorted(LM_VARIANTS))
def variant(request, tmp_path_factory):
  """(name, kind, folder, torch model, ids (2, SEQ))."""
  name = request.param
  kind = LM_VARIANTS[name][0]
  folder = tmp_path_factory.mktemp(name)
  model = make_lm_model(name, folder)
  ids = np.random.default_rng(0).integers(0, 128, (2, SEQ))
  return name, kind, folder, model, ids


def test_base_logits_match_transformers(variant):
  name, _, folder, model, ids = variant
  lm = jlm.load(folder)
  assert_logits_match(lm.logits(ids), torch_logits(model, ids))
  if name == "phi3_longrope":  # below the original context the short factors apply
    assert_logits_match(lm.logits(ids[:, :20]), torch_logits(model, ids[:, :20]))


def _patterned_lora_kwargs(kind: str, folder) -> dict:
  """rsLoRA with a rank_pattern on one layer's first module and an alpha_pattern on another module."""
  targets = LORA_MODULES.get(kind, DEFAULT_MODULES)
  arch = jlm.LMConfig.from_folder(folder).arch
  first = arch.module_path(0, next(s for s in arch.spec.stored if s.name == targets[0]))
  return dict(use_rslora=True, rank_pattern={first: 6, targets[1]: 2}, alpha_pattern={targets[-1]: 3.0})


def test_each_rule_matters(variant):
  """Switching a variant's special rule off moves the logits: the parity above tests it."""
  import dataclasses

  name, _, folder, model, ids = variant
  lm = jlm.load(folder)
  cfg = lm.config
  if cfg.sliding_window is not None and cfg.sliding_window < SEQ:
    changed = dataclasses.replace(cfg, sliding_window=None)
  elif cfg.rope_full is not None and cfg.rope_full.kind != "default":
    changed = dataclasses.replace(cfg, rope_full=dataclasses.replace(cfg.rope_full, kind="default"),
                                  rope_sliding=dataclasses.replace(cfg.rope_sliding, kind="default"))
  elif cfg.norm_offset:
    changed = dataclasses.replace(cfg, norm_offset=0.0)
  elif cfg.scale_by_inverse_layer:
    changed = dataclasses.replace(cfg, scale_by_inverse_layer=False)
  else:
    pytest.skip(f"{name} has no switchable rule")
  ref = np.asarray(lm.logits(ids))
  moved = np.asarray(jlm.LM(changed, lm.params).logits(ids))
  assert float(np.abs(moved - ref).max()) > 1e-3 * float(np.abs(ref).max())


LORA_CASES = [(kind, flavour) for kind in sorted({k for k, _ in LM_VARIANTS.values()})
              for flavour in ("plain", "patterns", "one_layer")] + [("llama_bias_untied", "plain")]


@pytest.fixture(scope="module", params=LORA_CASES, ids=lambda case: "-".join(case))
def lora_case(request, tmp_path_factory):
  name, flavour = request.param
  folder = tmp_path_factory.mktemp(name)
  ids = np.random.default_rng(0).integers(0, 128, (2, SEQ))
  return name, LM_VARIANTS[name][0], folder, make_lm_model(name, folder), ids, flavour


def test_lora_logits_match_peft(lora_case, tmp_path):
  name, kind, folder, model, ids, flavour = lora_case
  kwargs = {"plain": {}, "patterns": _patterned_lora_kwargs(kind, folder), "one_layer": dict(layers_to_transform=[1])}
  base = torch_logits(model, ids)
  peft_model = make_adapter(model, tmp_path / "adapter", kind=kind, **kwargs[flavour])
  try:
    ref = torch_logits(peft_model, ids)
  finally:
    peft_model.unload()  # give the fixture's model back without LoRA layers
  assert np.abs(ref - base).max() > 1e-2 * np.abs(base).max()  # the adapter matters
  lm = jlm.load(folder, adapter=tmp_path / "adapter")
  assert_logits_match(lm.logits(ids), ref)


def test_lora_gradients_match_peft(tmp_path):
  """d(mean NLL)/d(lora factors) as torch autograd gives it through the PeftModel."""
  import jax

  from crosslora_jax.lm import model as M

  folder = tmp_path / "model"
  model = make_lm_model("qwen2", folder)
  peft_model = make_adapter(model, tmp_path / "adapter", kind="qwen2", use_rslora=True, rank_pattern={"v_proj": 2})
  ids = np.random.default_rng(4).integers(0, 128, (2, 24))
  labels = torch.tensor(ids)
  peft_model.train()
  peft_model(input_ids=labels, labels=labels).loss.backward()
  lm = jlm.load(folder, adapter=tmp_path / "adapter")
  grads = jax.grad(lambda lora: -M.token_logprobs(lm.params, lora, lm.spec, lm.config, ids, vocab_chunk=40).mean())(lm.lora)
  named = dict(peft_model.named_parameters())
  for path, g in grads.items():
    for factor in ("a", "b"):
      ref = named[f"base_model.model.{path}.lora_{factor.upper()}.default.weight"].grad.numpy()
      np.testing.assert_allclose(np.asarray(g[factor]), ref, atol=1e-5 * max(1.0, np.abs(ref).max()), rtol=1e-3)


def test_bfloat16_base_stays_close_to_float32(tmp_path):
  folder = tmp_path / "model"
  model = make_lm_model("gemma3_local_global", folder)
  ids = np.random.default_rng(5).integers(0, 128, (2, SEQ))
  ref = torch_logits(model, ids)
  ours = np.asarray(jlm.load(folder, dtype="bfloat16").logits(ids))
  assert ours.dtype == np.float32
  assert np.abs(ours - ref).max() <= 0.05 * np.abs(ref).max()
  assert (ours.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


def test_token_logprobs_and_nll_match_torch(variant):
  name, _, folder, model, ids = variant
  if name not in ("gemma2_window_softcap", "llama", "gpt2"):
    pytest.skip("scoring is family-independent past the logits; three variants cover it")
  ref = F.log_softmax(torch.tensor(torch_logits(model, ids)), -1)
  ref = ref[:, :-1].gather(-1, torch.tensor(ids)[:, 1:, None])[..., 0].numpy()
  lm = jlm.load(folder)
  lm = jlm.LM(lm.config, lm.params, folder=folder, vocab_chunk=48)  # 128 = 48 + 48 + 32: a ragged last chunk
  np.testing.assert_allclose(np.asarray(lm.token_logprobs(ids)), ref, atol=2e-5)
  np.testing.assert_allclose(np.asarray(lm.nll(ids)), -ref.mean(-1), atol=2e-5)


@pytest.mark.parametrize("name", ["gpt2", "phi3"])
def test_a_jax_lora_saved_loads_in_peft_without_warnings(name, tmp_path):
  """init_lora -> (perturbed) -> lora_to_peft -> save_adapter -> peft.PeftModel: same logits, no warnings."""
  import jax

  from peft_helpers import load_with_adapter

  from crosslora_jax.formats.adapter_io import save_adapter

  folder = tmp_path / "model"
  make_lm_model(name, folder)
  lm = jlm.load(folder)
  spec = jlm.LoraSpec(r=4, alpha=8, target_modules=tuple(LORA_MODULES[name]), rank_pattern={LORA_MODULES[name][0]: 2})
  keys = iter(jax.random.split(jax.random.key(0), 1000))
  lora = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(next(keys), x.shape), jlm.init_lora(lm.config, spec, jax.random.key(1)))
  if name == "gpt2":
    save_adapter(jlm.lora_to_peft(lora, spec, base_model_name_or_path=str(folder), cfg=lm.config), tmp_path / "adapter")
  else:
    lm.with_lora(lora, spec).save_adapter(tmp_path / "adapter")
  peft_model, caught = load_with_adapter(folder, tmp_path / "adapter")
  assert caught == []
  ids = np.random.default_rng(6).integers(0, 128, (2, SEQ))
  assert_logits_match(lm.with_lora(lora, spec).logits(ids), torch_logits(peft_model, ids))
