"""A KV-cache sampler over ``crosslora_jax.lm.model`` with a sort-free nucleus draw.

Temperature and nucleus (top-p) sampling from an explicit PRNG key; prompts are
left-padded to one length (``kv_mask`` keeps padding out of attention and positions);
one jitted step per new token, compiled once per (batch, cache length).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import numpy as np


def _pick(logits, key, temperature: float, top_p: float):
  """(B, V) logits -> (B,) token ids, with no sort and no per-token random numbers.

  The nucleus is {p >= τ} for the largest τ whose kept mass is still >= top_p, found by
  bisection (24 halvings: float32 precision); a token is then drawn by inverting the
  kept mass's cumulative sum at one uniform per row. On 2 CPU cores this is ~10x
  faster than argsort + scatter over a 49k vocabulary (3.9 s per step at batch 32).
  """
  import jax
  import jax.numpy as jnp
  if temperature == 0.0:
    return jnp.argmax(logits, -1)
  probs = jax.nn.softmax(logits / temperature, -1)  # (B, V)
  if top_p < 1.0:
    def halve(_, bounds):
      low, high = bounds
      mid = 0.5 * (low + high)
      enough = jnp.sum(jnp.where(probs >= mid[:, None], probs, 0.0), -1) >= top_p
      return jnp.where(enough, mid, low), jnp.where(enough, high, mid)
    low, _ = jax.lax.fori_loop(0, 24, halve, (jnp.zeros(probs.shape[0]), jnp.max(probs, -1)))
    probs = jnp.where(probs >= low[:, None], probs, 0.0)
  cumulative = jnp.cumsum(probs, -1)
  u = jax.random.uniform(key, (probs.shape[0], 1)) * cumulative[:, -1:]
  return jnp.minimum(jnp.sum(cumulative <= u, -1), probs.shape[1] - 1)


@functools.lru_cache(maxsize=None)
def _functions(cfg: Any, spec: Any, temperature: float, top_p: float):
  import jax
  from crosslora_jax.lm import model

  def prefill(params, lora, ids, mask, cache, key):
    hidden, cache = model.forward(params, lora, spec, cfg, ids, cache=cache, kv_mask=mask)
    logits = model.logits_from_hidden(params, cfg, hidden[:, -1:])[:, 0]
    return _pick(logits.astype("float32"), key, temperature, top_p), cache

  def step(params, lora, token, cache, key):
    hidden, cache = model.forward(params, lora, spec, cfg, token[:, None], cache=cache)
    logits = model.logits_from_hidden(params, cfg, hidden[:, -1:])[:, 0]
    return _pick(logits.astype("float32"), key, temperature, top_p), cache

  return jax.jit(prefill), jax.jit(step)


def generate(lm_obj: Any, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 1.0,
             top_p: float = 1.0, seed: int = 0, eos_ids: Sequence[int] = ()) -> list[list[int]]:
  """New token ids per prompt (up to ``max_new_tokens``; a row stops at its first EOS)."""
  import jax
  from crosslora_jax.lm import model
  rows = [list(p) for p in prompt_ids]
  width = max(len(r) for r in rows)
  ids = np.zeros((len(rows), width), np.int32)
  mask = np.zeros((len(rows), width), bool)
  for i, row in enumerate(rows):  # left padding: every row's last prompt token is at the same slot
    ids[i, width - len(row):] = row
    mask[i, width - len(row):] = True
  prefill, step = _functions(lm_obj.config, lm_obj.spec, float(temperature), float(top_p))
  cache = model.init_cache(lm_obj.config, len(rows), width + max_new_tokens)
  keys = jax.random.split(jax.random.PRNGKey(seed), max_new_tokens)
  token, cache = prefill(lm_obj.params, lm_obj.lora, ids, mask, cache, keys[0])
  out = [np.asarray(token)]
  done = np.isin(out[-1], list(eos_ids))
  for index in range(1, max_new_tokens):
    if done.all():
      break
    token, cache = step(lm_obj.params, lm_obj.lora, token, cache, keys[index])
    out.append(np.asarray(token))
    done |= np.isin(out[-1], list(eos_ids))
  new = np.stack(out, 1)
  result = []
  for row in new.tolist():
    stop = next((i + 1 for i, t in enumerate(row) if t in eos_ids), len(row))
    result.append(row[:stop])
  return result
