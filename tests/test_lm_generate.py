"""KV-cache sampling against transformers' greedy generate, and the sampler's own contracts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fixtures import make_lm_model

from crosslora_jax import lm as jlm
from crosslora_jax.errors import CrossLoraError
from crosslora_jax.lm import sample

PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]]
NEW = 20  # prompt + new tokens run past every window (8) and the longrope original context (32)


@pytest.fixture(scope="module", params=["mistral_window", "gemma3_local_global", "phi3_longrope", "gpt2"])
def tiny(request, tmp_path_factory):
  folder = tmp_path_factory.mktemp(request.param)
  return make_lm_model(request.param, folder), jlm.load(folder)


def hf_greedy(model, prompt: list[int], new: int) -> list[int]:
  with torch.no_grad():
    out = model.generate(torch.tensor([prompt]), max_new_tokens=new, min_new_tokens=new, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
  return out[0, len(prompt):].tolist()


def test_batched_greedy_equals_transformers_one_prompt_at_a_time(tiny):
  model, lm = tiny
  ours = lm.generate(PROMPTS, max_new_tokens=NEW, eos_ids=[])
  assert [len(o) for o in ours] == [NEW] * len(PROMPTS)
  for prompt, row in zip(PROMPTS, ours):
    assert row == hf_greedy(model, prompt, NEW)
  # the padded-array form gives the same rows
  padded = np.zeros((3, 11), np.int64)
  for i, p in enumerate(PROMPTS):
    padded[i, :len(p)] = p
  assert lm.generate(padded, lengths=[len(p) for p in PROMPTS], max_new_tokens=NEW, eos_ids=[]) == ours


def test_new_tokens_and_new_settings_do_not_recompile(tiny):
  _, lm = tiny
  lm.generate(PROMPTS, max_new_tokens=2, eos_ids=[])
  steps, prefills = sample._decode_step._cache_size(), sample._prefill._cache_size()
  lm.generate(PROMPTS, max_new_tokens=14, eos_ids=[])  # same shape buckets, 7x the tokens
  lm.generate(PROMPTS, max_new_tokens=14, eos_ids=[], seed=3)
  assert sample._decode_step._cache_size() == steps
  assert sample._prefill._cache_size() == prefills
  lm.generate(PROMPTS, max_new_tokens=14, temperature=0.7, seed=1)
  lm.generate(PROMPTS, max_new_tokens=14, temperature=1.3, seed=2)  # another temperature: traced, no compile
  assert sample._decode_step._cache_size() <= steps + 1


def test_sampling_is_seeded_and_top_p_limits_the_choice(tiny):
  _, lm = tiny
  draw = lambda seed, **kw: lm.generate(PROMPTS, max_new_tokens=12, eos_ids=[], temperature=1.0, seed=seed, **kw)
  assert draw(0) == draw(0)
  assert draw(0) != draw(1)
  greedy = lm.generate(PROMPTS, max_new_tokens=12, eos_ids=[])
  assert draw(5, top_p=1e-6) == greedy  # the nucleus of a tiny mass is the argmax alone


def test_eos_and_stop_end_each_row(tiny):
  _, lm = tiny
  free = lm.generate(PROMPTS, max_new_tokens=12, eos_ids=[])
  eos = free[0][3]
  ended = lm.generate(PROMPTS, max_new_tokens=12, eos_ids=[eos])
  first = free[0].index(eos)
  assert ended[0] == free[0][:first + 1]
  for free_row, row in zip(free, ended):  # every row stops at its own first eos, or runs to the end
    assert row == (free_row[:free_row.index(eos) + 1] if eos in free_row else free_row)
  stop = free[2][4:6]
  stopped = lm.generate(PROMPTS, max_new_tokens=12, eos_ids=[], stop=[stop])
  assert stopped[2][-2:] == stop and len(stopped[2]) <= 6


def test_bad_requests_are_refused_in_one_line(tiny):
  _, lm = tiny
  context = lm.config.max_positions
  with pytest.raises(CrossLoraError, match="max_new_tokens"):
    lm.generate(PROMPTS, max_new_tokens=context)
  with pytest.raises(CrossLoraError, match=r"prompt_ids: token ids in \[0, 128\)"):
    lm.generate([[1, 2, 128]], max_new_tokens=2)
  with pytest.raises(CrossLoraError, match="max_cache_bytes"):
    lm.generate(PROMPTS, max_new_tokens=4, max_cache_bytes=1000)
  with pytest.raises(CrossLoraError, match="prompt_ids"):
    lm.generate([[]], max_new_tokens=2)
