"""Unit tests of the JAX runtime's pieces: config reading, rope, LoRA spec/init/round trip, chunked scoring."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crosslora_jax import lm as jlm
from crosslora_jax.errors import CrossLoraError
from crosslora_jax.formats import peft_format
from crosslora_jax.lm import model as M
from crosslora_jax.lm.lora import LoraSpec, init_lora, lora_from_peft, lora_to_peft, stack_lora

LLAMA = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
         "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 100, "max_position_embeddings": 64}


def test_old_style_rope_scaling_reads_like_rope_parameters():
  scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
             "original_max_position_embeddings": 32}
  old = jlm.LMConfig.from_config({**LLAMA, "rope_theta": 500000.0, "rope_scaling": scaling})
  new = jlm.LMConfig.from_config({**LLAMA, "rope_parameters": {**scaling, "rope_theta": 500000.0}})
  assert old.rope_full == new.rope_full
  plain = jlm.LMConfig.from_config({**LLAMA, "rope_theta": 500000.0})
  scaled, base = new.rope_full.inv_freq(), plain.rope_full.inv_freq()
  assert scaled[0] == base[0] and scaled[-1] == pytest.approx(base[-1] / 8)  # high freqs kept, low ones / factor


def test_phi3_su_is_longrope_and_switches_past_the_original_context():
  cfg = jlm.LMConfig.from_config({**LLAMA, "model_type": "phi3", "original_max_position_embeddings": 16,
                                  "rope_scaling": {"type": "su", "short_factor": [1.0] * 8, "long_factor": [4.0] * 8}})
  rope = cfg.rope_full
  assert rope.kind == "longrope" and rope.attention_factor == pytest.approx(math.sqrt(1 + math.log(4) / math.log(16)))
  np.testing.assert_allclose(rope.inv_freq(long=True), rope.inv_freq() / 4, rtol=1e-6)


@pytest.mark.parametrize("config, match", [
    ({**LLAMA, "rope_scaling": {"rope_type": "mystery", "factor": 2.0}}, "rope_type expected one of"),
    ({**LLAMA, "rope_scaling": {"rope_type": "llama3", "factor": 2.0}}, "rope parameter 'low_freq_factor'"),
    ({**LLAMA, "model_type": "falcon"}, "model_type expected one of"),
    ({**LLAMA, "hidden_act": "mish"}, "hidden_act expected one of"),
    ({**LLAMA, "model_type": "mistral", "sliding_window": -3}, "sliding_window expected"),
])
def test_bad_configs_are_refused_with_the_field_named(config, match):
  with pytest.raises(CrossLoraError, match=match) as info:
    jlm.LMConfig.from_config(config, source="cfg.json")
  assert str(info.value).startswith("cfg.json") and "\n" not in str(info.value)


def test_family_defaults_follow_transformers():
  gemma2 = jlm.LMConfig.from_config({**LLAMA, "model_type": "gemma2", "head_dim": 16})
  assert gemma2.attn_softcap == 50.0 and gemma2.final_softcap == 30.0 and gemma2.query_scale == 256 ** -0.5
  assert gemma2.layer_sliding == (True, False) and gemma2.norm_offset == 1.0 and gemma2.embed_scale
  qwen = jlm.LMConfig.from_config({**LLAMA, "model_type": "qwen2"})
  assert qwen.sliding_window is None and qwen.biased == ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
  gpt2 = jlm.LMConfig.from_config({"model_type": "gpt2", "n_embd": 48, "n_layer": 2, "n_head": 4, "vocab_size": 100})
  assert gpt2.ffn == 192 and gpt2.activation == "gelu_tanh" and gpt2.rope_full is None and gpt2.max_positions == 1024


def test_lmconfig_is_a_static_argument():
  a, b = jlm.LMConfig.from_config(LLAMA), jlm.LMConfig.from_config(dict(LLAMA))
  assert a == b and hash(a) == hash(b)


def _random_params(cfg, seed=0):
  """A random pytree with the loader's structure (no checkpoint needed)."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape).astype(np.float32) * 0.2)
  layers = {name: {"scale": 1 + normal(cfg.layers, cfg.hidden)} for name in ("attn_norm", "ffn_norm")}
  for stored in cfg.arch.spec.stored:
    out_dim, in_dim = cfg.arch.stored_shape(stored)
    layers[stored.path] = {"w": normal(cfg.layers, out_dim, in_dim)}
  return {"embed": normal(cfg.vocab_size, cfg.hidden), "final_norm": {"scale": 1 + normal(cfg.hidden)},
          "layers": layers, "lm_head": normal(cfg.vocab_size, cfg.hidden)}


@pytest.mark.parametrize("chunk", [100, 7, 64, 1000])
def test_chunked_log_softmax_equals_the_full_one(chunk):
  cfg = jlm.LMConfig.from_config(LLAMA)
  rng = np.random.default_rng(1)
  hidden = jnp.asarray(rng.normal(size=(2, 5, 64)).astype(np.float32))
  head = jnp.asarray(rng.normal(size=(100, 64)).astype(np.float32))
  targets = jnp.asarray(rng.integers(0, 100, (2, 5)))
  full = jax.nn.log_softmax(hidden @ head.T, -1)
  expected = jnp.take_along_axis(full, targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(M.chunked_log_softmax_at(hidden, head, targets, cfg, chunk), expected, atol=1e-5)
  # and its gradient with respect to the hidden states
  grad = jax.grad(lambda h: M.chunked_log_softmax_at(h, head, targets, cfg, chunk).sum())(hidden)
  ref = jax.grad(lambda h: jnp.take_along_axis(jax.nn.log_softmax(h @ head.T, -1), targets[..., None], -1).sum())(hidden)
  np.testing.assert_allclose(grad, ref, atol=1e-4)


def test_padding_changes_no_real_token_score():
  cfg = jlm.LMConfig.from_config(LLAMA)
  params = _random_params(cfg)
  lm = jlm.LM(cfg, params)
  row = [3, 14, 15, 92, 65, 35]
  alone = np.asarray(lm.token_logprobs([row]))[0]
  left = np.asarray(lm.token_logprobs([[0, 0, 0] + row], mask=[[0, 0, 0] + [1] * 6]))[0]
  right = np.asarray(lm.token_logprobs([row + [0, 0, 0]], mask=[[1] * 6 + [0, 0, 0]]))[0]
  np.testing.assert_allclose(left[3:], alone, atol=1e-5)
  np.testing.assert_allclose(right[:5], alone, atol=1e-5)
  assert not right[5:].any() and not left[:3].any()
  nll = np.asarray(lm.nll([row + [0, 0, 0]], mask=[[1] * 6 + [0, 0, 0]]))
  np.testing.assert_allclose(nll, -alone.mean(), atol=1e-5)


def test_ids_and_lengths_are_checked_before_tracing():
  lm = jlm.LM(jlm.LMConfig.from_config(LLAMA), {})
  with pytest.raises(CrossLoraError, match=r"ids: token ids in \[0, 100\) expected.*got 100"):
    lm.logits([[1, 2, 100]])
  with pytest.raises(CrossLoraError, match="at most 64 tokens"):
    lm.nll(np.zeros((1, 65), np.int64))
  with pytest.raises(CrossLoraError, match="mask: shape"):
    lm.nll([[1, 2, 3]], mask=[[1, 1]])


def test_init_lora_is_peft_default_and_spec_patterns_follow_peft():
  cfg = jlm.LMConfig.from_config(LLAMA)
  spec = LoraSpec(r=4, alpha=8, target_modules=("q_proj", "down_proj"), rank_pattern={"layers.1.self_attn.q_proj": 2},
                  alpha_pattern={"down_proj": 2.0}, rslora=True)
  lora = init_lora(cfg, spec, jax.random.key(0))
  assert sorted(lora) == ["model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_proj",
                          "model.layers.1.mlp.down_proj", "model.layers.1.self_attn.q_proj"]
  assert lora["model.layers.1.self_attn.q_proj"]["a"].shape == (2, 64)
  assert lora["model.layers.0.mlp.down_proj"]["a"].shape == (4, 128)
  assert not lora["model.layers.0.mlp.down_proj"]["b"].any()
  assert float(jnp.abs(lora["model.layers.0.mlp.down_proj"]["a"]).max()) <= 1 / math.sqrt(128)
  assert spec.scaling("model.layers.0.mlp.down_proj") == pytest.approx(2.0 / 2.0)  # rsLoRA: alpha / sqrt(r)
  assert spec.scaling("model.layers.1.self_attn.q_proj") == pytest.approx(8 / math.sqrt(2))
  stacked = stack_lora(lora, spec, cfg)["self_attn.q_proj"]
  assert stacked["a"].shape == (2, 4, 64) and not stacked["a"][1, 2:].any()  # rank 2 zero-padded to 4


def test_lora_round_trips_through_the_peft_writer(tmp_path):
  from crosslora_jax.formats.adapter_io import save_adapter

  cfg = jlm.LMConfig.from_config(LLAMA)
  spec = LoraSpec(r=4, alpha=16, rank_pattern={"q_proj": 2})
  lora = init_lora(cfg, spec, jax.random.key(1))
  lora = jax.tree.map(lambda x: x + 0.01, lora)
  save_adapter(lora_to_peft(lora, spec, base_model_name_or_path="tiny"), tmp_path / "out")
  again, spec_again = lora_from_peft(peft_format.read_adapter(tmp_path / "out"), cfg)
  assert spec_again.peft_config() == spec.peft_config()
  for path in lora:
    np.testing.assert_array_equal(again[path]["a"], lora[path]["a"])
    np.testing.assert_array_equal(again[path]["b"], lora[path]["b"])
  written = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
  assert written["rank_pattern"] == {"q_proj": 2} and written["peft_type"] == "LORA"


def test_lora_for_another_model_is_refused():
  cfg = jlm.LMConfig.from_config(LLAMA)
  pair = peft_format.LoraPair(np.zeros((4, 32), np.float32), np.zeros((64, 4), np.float32))
  adapter = peft_format.PeftAdapter({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]},
                                    {"model.layers.0.self_attn.q_proj": pair})
  with pytest.raises(CrossLoraError, match=r"lora_A \(r, 64\) and lora_B \(64, r\) expected"):
    lora_from_peft(adapter, cfg)


def test_gradients_flow_to_lora_only():
  cfg = jlm.LMConfig.from_config(LLAMA)
  params = _random_params(cfg)
  spec = LoraSpec(r=2, alpha=4)
  lora = jax.tree.map(lambda x: x + 0.05, init_lora(cfg, spec, jax.random.key(2)))
  ids = jnp.asarray(np.random.default_rng(3).integers(0, 100, (2, 9)))
  loss = lambda lo: -M.token_logprobs(params, lo, spec, cfg, ids, vocab_chunk=32).mean()
  grads = jax.grad(loss)(lora)
  assert set(grads) == set(lora) and all(float(jnp.abs(g["b"]).max()) > 0 for g in grads.values())
  path = "model.layers.1.mlp.down_proj"  # a finite-difference check on one factor entry
  eps = 1e-2
  bumped = {**lora, path: {**lora[path], "b": lora[path]["b"].at[3, 1].add(eps)}}
  numeric = (loss(bumped) - loss(lora)) / eps
  assert float(grads[path]["b"][3, 1]) == pytest.approx(float(numeric), rel=0.05, abs=1e-4)


def test_importing_the_runtime_is_cheap_and_torch_free():
  code = ("import sys, crosslora_jax, crosslora_jax.lm; "
          "assert not any(m in sys.modules for m in ('torch', 'transformers', 'peft')), 'torch imported'")
  subprocess.run([sys.executable, "-c", code], check=True)
