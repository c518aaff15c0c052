"""A KV-cache sampler over ``crosslora_jax.lm.model``, used while the runtime has no ``lm.sample``.

Temperature and nucleus (top-p) sampling from an explicit PRNG key; prompts are
left-padded to one length (``kv_mask`` keeps padding out of attention and positions);
one jitted step per new token, compiled once per (batch, cache length).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import numpy as np


def _pick(logits, key, temperature: float, top_p: float):
  """(B, V) logits -> (B,) token ids."""
  import jax
  import jax.numpy as jnp
  if temperature == 0.0:
    return jnp.argmax(logits, -1)
  logits = logits / temperature
  if top_p < 1.0:
    order = jnp.argsort(-logits, -1)
    sorted_logits = jnp.take_along_axis(logits, order, -1)
    probs = jax.nn.softmax(sorted_logits, -1)
    before = jnp.cumsum(probs, -1) - probs  # mass of the tokens ranked above each one
    sorted_logits = jnp.where(before < top_p, sorted_logits, -jnp.inf)
    logits = jnp.full_like(logits, -jnp.inf).at[jnp.arange(logits.shape[0])[:, None], order].set(sorted_logits)
  return jax.random.categorical(key, logits, -1)


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
