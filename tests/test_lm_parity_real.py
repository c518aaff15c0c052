"""The JAX runtime against transformers on the three real models (fp32 both sides): logits, NLL, greedy.

Lean on purpose: two short sequences for logits, four held-out pydoc blocks of 64
tokens for NLL, three prompts of 32 greedy tokens per model.
"""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
import torch

from crosslora_bench import textdata, zoo

from crosslora_jax import lm as jlm

pytestmark = pytest.mark.realmodels
ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLE_ADAPTER = ROOT / "examples" / "smollm2-pydoc-lora"
PROMPTS = ["def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
           "The quick brown fox jumps over the lazy dog because",
           "A list comprehension in Python"]
NEW = 32
TIE = 1e-4  # where transformers' top-2 logits are closer than this, either token is right


@pytest.fixture(scope="module", params=["smollm2-135m", "qwen2.5-coder-0.5b", "gemma3-270m"])
def real(request):
  from transformers import AutoModelForCausalLM, AutoTokenizer

  torch.set_num_threads(2)
  folder = zoo.fetch_model(request.param)
  model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
  yield request.param, folder, model, AutoTokenizer.from_pretrained(folder), jlm.load(folder)
  del model


def assert_logits_match(ours, ref):
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert np.abs(ours - ref).max() <= 1e-3 * np.abs(ref).max()
  assert (ours.argmax(-1) == ref.argmax(-1)).mean() >= 0.999


def short_batch(tokenizer) -> np.ndarray:
  rows = [tokenizer(p)["input_ids"] for p in PROMPTS[:2]]
  n = min(len(r) for r in rows)
  return np.asarray([r[:n] for r in rows])


def test_logits_match_transformers(real):
  _, _, model, tokenizer, lm = real
  ids = short_batch(tokenizer)
  with torch.no_grad():
    ref = model(input_ids=torch.tensor(ids)).logits.numpy()
  assert_logits_match(lm.logits(ids), ref)


def test_heldout_nll_matches_the_torch_harness(real):
  _, _, model, tokenizer, lm = real
  blocks = textdata.heldout_blocks(tokenizer, n=4, block_size=64)
  torch_mean, torch_rows = textdata.mean_nll(model, blocks, batch_size=4)
  ours = np.asarray(lm.nll(blocks.numpy()), np.float64)
  assert np.abs(ours - torch_rows).max() < 1e-3
  assert abs(ours.mean() - torch_mean) < 1e-3


def greedy_agrees(ours: list[int], model, prompt: list[int]) -> None:
  with torch.no_grad():
    out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW, do_sample=False, output_scores=True,
                         return_dict_in_generate=True)
  ref = out.sequences[0, len(prompt):].tolist()
  for step, (a, b) in enumerate(zip(ours, ref)):
    if a != b:
      top2 = torch.topk(out.scores[step][0].float(), 2).values
      assert float(top2[0] - top2[1]) < TIE, (step, ours, ref)
      return  # a near tie: the continuations may part from here
  assert len(ours) == len(ref)


def test_greedy_generation_matches_transformers(real):
  _, _, model, tokenizer, lm = real
  prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
  ours = lm.generate(prompts, max_new_tokens=NEW)  # one batch, prompts of different lengths
  for prompt, row in zip(prompts, ours):
    greedy_agrees(row, model, prompt)


def test_example_adapter_logits_match_peft(real):
  name, folder, model, tokenizer, lm = real
  if name != "smollm2-135m":
    pytest.skip("the shipped example adapter is for SmolLM2")
  from peft import PeftModel

  ids = short_batch(tokenizer)
  peft_model = PeftModel.from_pretrained(model, str(EXAMPLE_ADAPTER)).eval()
  try:
    with torch.no_grad():
      ref = peft_model(input_ids=torch.tensor(ids)).logits.numpy()
  finally:
    peft_model.unload()
  with_adapter = lm.with_adapter(EXAMPLE_ADAPTER)
  ours = np.asarray(with_adapter.logits(ids))
  assert np.abs(ours - np.asarray(lm.logits(ids))).max() > 1e-2  # the adapter matters
  assert_logits_match(ours, ref)
