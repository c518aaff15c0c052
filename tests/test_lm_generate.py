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


# --- the nucleus draw against a brute-force reference ---------------------------------------------


def brute_force_nucleus(probs: np.ndarray, top_p: float) -> np.ndarray:
  """(V,) float64 probabilities -> (V,) bool: sort, keep while the mass before a token is below top_p."""
  order = np.argsort(-probs, kind="stable")
  before = np.cumsum(probs[order]) - probs[order]
  keep = np.zeros(probs.shape, bool)
  keep[order[before < top_p]] = True
  return keep


@pytest.mark.parametrize("vocab", [2, 7, 50, 300])
def test_nucleus_is_the_smallest_set_reaching_top_p(vocab):
  import jax
  rng = np.random.default_rng(vocab)
  logits = (rng.standard_normal((64, vocab)) * rng.uniform(0.3, 4.0, (64, 1))).astype(np.float32)
  logits[:4, : vocab // 2] = -np.inf  # rows with impossible tokens
  probs32 = np.asarray(jax.nn.softmax(logits, -1))
  mask_fn = jax.jit(sample.nucleus_mask)
  for top_p in (1e-6, 0.1, 0.5, 0.9, 0.95, 0.999):
    ours = np.asarray(mask_fn(probs32, np.float32(top_p)))
    for row in range(len(probs32)):
      p = probs32[row].astype(np.float64)
      order_mass = np.cumsum(np.sort(p)[::-1])
      if np.min(np.abs(order_mass - top_p)) < 1e-5:
        continue  # the cut sits on a float32 rounding of the mass: either side is right
      np.testing.assert_array_equal(ours[row], brute_force_nucleus(p, top_p), err_msg=f"row {row} top_p {top_p}")


def test_nucleus_draw_keeps_the_nucleus_and_its_frequencies():
  import jax
  import jax.numpy as jnp
  probs = np.array([0.5, 0.3, 0.15, 0.05])
  logits = jnp.log(jnp.asarray(np.tile(probs, (20000, 1)), jnp.float32))
  draw = jax.jit(lambda key, t, p: sample.sample_token(logits, key, t, p, greedy=False, nucleus=True))
  ids = np.asarray(draw(jax.random.PRNGKey(1), jnp.float32(1.0), jnp.float32(0.9)))
  freq = np.bincount(ids, minlength=4) / len(ids)
  assert freq[3] == 0  # outside the smallest set reaching 0.9
  np.testing.assert_allclose(freq[:3], probs[:3] / 0.95, atol=0.015)
  everything = sample.sample_token(logits, jax.random.PRNGKey(2), jnp.float32(1.0), jnp.float32(1.0), greedy=False,
                                   nucleus=False)
  np.testing.assert_allclose(np.bincount(np.asarray(everything), minlength=4) / len(ids), probs, atol=0.015)
  hot = np.asarray(draw(jax.random.PRNGKey(3), jnp.float32(4.0), jnp.float32(1.0)))  # flatter at temperature 4
  flat = probs ** 0.25 / (probs ** 0.25).sum()
  np.testing.assert_allclose(np.bincount(hot, minlength=4) / len(ids), flat, atol=0.015)


def test_temperature_zero_is_greedy(tiny):
  import jax
  import jax.numpy as jnp
  logits = jnp.asarray(np.random.default_rng(0).standard_normal((16, 50)), jnp.float32)
  picked = sample.sample_token(logits, jax.random.PRNGKey(0), jnp.float32(1e-6), jnp.float32(0.9), greedy=True,
                               nucleus=True)
  np.testing.assert_array_equal(np.asarray(picked), np.argmax(np.asarray(logits), -1))
  _, lm = tiny
  greedy = lm.generate(PROMPTS, max_new_tokens=8, eos_ids=[])
  assert all(lm.generate(PROMPTS, max_new_tokens=8, eos_ids=[], temperature=0.0, top_p=p, seed=s) == greedy
             for p, s in ((0.5, 1), (1.0, 2)))


def test_cache_bytes_is_the_cache_generate_allocates(tiny):
  from crosslora_jax.lm import model
  _, lm = tiny
  longest, new = max(len(p) for p in PROMPTS), 5
  cache = model.init_cache(lm.config, len(PROMPTS), sample._cache_len(longest, new), lm.params["embed"].dtype)
  assert sample.cache_bytes(lm, len(PROMPTS), longest, new) == cache["k"].nbytes + cache["v"].nbytes
  need = sample.cache_bytes(lm, len(PROMPTS), longest, new)
  lm.generate(PROMPTS, max_new_tokens=new, max_cache_bytes=need)  # exactly enough is allowed
  with pytest.raises(CrossLoraError, match="max_cache_bytes"):
    lm.generate(PROMPTS, max_new_tokens=new, max_cache_bytes=need - 1)
