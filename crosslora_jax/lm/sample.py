"""Sampling with a KV cache: greedy, temperature, top-p; a batch of prompts of different lengths.

Prompts are left-padded to one length (padding slots are never attended and
positions count only real tokens, so each row decodes as it would alone). The
prefill runs once; then one jitted step per new token samples from the last
logits and appends its token to the cache (donated, so it is updated in place).
Shapes are bucketed (prompt length to 16, cache length to 32), and temperature
and top-p are traced values: new tokens, and new settings, reuse the compiled step.
The nucleus is found without sorting the vocabulary (:func:`nucleus_mask`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from crosslora_jax.errors import CrossLoraError
from crosslora_jax.formats.jsonfile import read_object
from crosslora_jax.lm import model
from crosslora_jax.lm.config import check_ids

PROMPT_BUCKET = 16
CACHE_BUCKET = 32


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


@functools.partial(jax.jit, static_argnames=("cfg", "spec", "cache_len"))
def _prefill(params, lora, ids, mask, *, cfg, spec, cache_len):
  """ids/mask (B, P) left-padded -> (logits of each row's last token (B, V) float32, cache)."""
  cache = model.init_cache(cfg, ids.shape[0], cache_len, params["embed"].dtype)
  hidden, cache = model.forward(params, lora, spec, cfg, ids, cache=cache, kv_mask=mask)
  return model.logits_from_hidden(params, cfg, hidden[:, -1:])[:, 0], cache


def nucleus_mask(probs: jnp.ndarray, top_p: jnp.ndarray) -> jnp.ndarray:
  """(B, V) probabilities -> (B, V) bool: the smallest set {p >= τ} whose mass reaches ``top_p``.

  The same set as sorting and cutting the cumulative mass (ties at τ are all kept),
  found with no sort: τ is bisected over the float32 bit patterns, which order like
  the values for p >= 0, so 31 halvings land on τ exactly. Each halving is one masked
  sum over the vocabulary; on 2 CPU cores that is ~10x faster than an argsort over
  49k tokens at batch 32 (3.9 s per step).
  """
  bits = jax.lax.bitcast_convert_type(probs.astype(jnp.float32), jnp.int32)  # (B, V)
  enough = lambda t: jnp.sum(jnp.where(bits >= t[:, None], probs, 0.0), -1) >= top_p  # (B,)

  def halve(_, bounds):  # invariant: {bits >= low} reaches top_p, {bits >= high} does not
    low, high = bounds
    mid = low + (high - low) // 2
    ok = enough(mid)
    return jnp.where(ok, mid, low), jnp.where(ok, high, mid)

  low = jnp.zeros(probs.shape[0], jnp.int32)
  high = jnp.max(bits, -1) + 1
  low, _ = jax.lax.fori_loop(0, 31, halve, (low, high))
  return bits >= low[:, None]


def sample_token(logits: jnp.ndarray, key: jax.Array, temperature: jnp.ndarray, top_p: jnp.ndarray, *,
                 greedy: bool, nucleus: bool) -> jnp.ndarray:
  """(B, V) float32 logits -> (B,) int32 tokens: argmax, or a draw at ``temperature`` within top-p mass.

  The draw inverts the kept mass's cumulative sum at one uniform per row (no
  per-token random numbers).
  """
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  probs = jax.nn.softmax(logits.astype(jnp.float32) / temperature, axis=-1)  # (B, V)
  if nucleus:
    probs = jnp.where(nucleus_mask(probs, top_p), probs, 0.0)
  cumulative = jnp.cumsum(probs, axis=-1)
  u = jax.random.uniform(key, (probs.shape[0], 1)) * cumulative[:, -1:]
  return jnp.minimum(jnp.sum(cumulative <= u, axis=-1), probs.shape[1] - 1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "spec", "greedy", "nucleus"), donate_argnames=("cache",))
def _decode_step(params, lora, cache, logits, key, done, temperature, top_p, pad_id, *, cfg, spec, greedy, nucleus):
  """Samples one token per row from ``logits`` (B, V) and runs it through the model.

  Returns (tokens (B,), logits for the next step (B, V), cache); rows already
  ``done`` emit ``pad_id``.
  """
  token = sample_token(logits, key, temperature, top_p, greedy=greedy, nucleus=nucleus)
  token = jnp.where(done, pad_id, token)
  hidden, cache = model.forward(params, lora, spec, cfg, token[:, None], cache=cache)
  return token, model.logits_from_hidden(params, cfg, hidden)[:, 0], cache


def _prompts(lm: Any, prompt_ids: Any, lengths: Any) -> list[list[int]]:
  if lengths is not None:
    padded = np.asarray(prompt_ids)
    lengths = np.asarray(lengths)
    if padded.ndim != 2 or lengths.shape != (padded.shape[0],) or (lengths < 1).any() or (lengths > padded.shape[1]).any():
      raise CrossLoraError(f"lengths: one length in [1, {padded.shape[-1]}] per row of prompt_ids {padded.shape} "
                           f"expected, got {lengths.tolist()}.")
    prompts = [padded[i, :n].tolist() for i, n in enumerate(lengths)]  # right-padded rows
  else:
    rows = prompt_ids.tolist() if hasattr(prompt_ids, "tolist") else list(prompt_ids)
    flat = bool(rows) and not isinstance(rows[0], (list, tuple)) and not hasattr(rows[0], "__len__")
    prompts = [[int(t) for t in row] for row in ([rows] if flat else rows)]
  if not prompts or any(len(p) == 0 for p in prompts):
    raise CrossLoraError("prompt_ids: a non-empty list of non-empty token id lists expected, got an empty prompt.")
  check_ids(lm.config, np.concatenate([np.asarray(p, np.int64) for p in prompts]), "prompt_ids")
  return prompts


def default_eos_ids(lm: Any) -> tuple[int, ...]:
  """The config's EOS ids plus generation_config.json's, as transformers' generate stops on both."""
  ids = list(lm.config.eos_ids)
  if lm.folder is not None and (lm.folder / "generation_config.json").is_file():
    eos = read_object(lm.folder / "generation_config.json", "generation_config.json").get("eos_token_id")
    ids += eos if isinstance(eos, list) else ([] if eos is None else [eos])
  return tuple(dict.fromkeys(int(i) for i in ids))


def _stop_sequences(lm: Any, stop: Any) -> list[list[int]]:
  if stop is None:
    return []
  stop = [stop] if isinstance(stop, str) else list(stop)
  out = []
  for item in stop:
    seq = lm.tokenizer.encode(item, add_bos=False) if isinstance(item, str) else [int(t) for t in item]
    if not seq:
      raise CrossLoraError(f"stop: non-empty strings or token id lists expected, got {item!r}.")
    out.append(seq)
  return out


def _cache_len(longest_prompt: int, max_new_tokens: int) -> int:
  return _round_up(_round_up(longest_prompt, PROMPT_BUCKET) + max_new_tokens, CACHE_BUCKET)


def cache_bytes(lm: Any, batch: int, longest_prompt: int, max_new_tokens: int) -> int:
  """Bytes of the KV cache ``generate`` allocates for ``batch`` prompts of at most ``longest_prompt`` tokens."""
  cfg = lm.config
  itemsize = jnp.dtype(lm.params["embed"].dtype).itemsize
  return 2 * cfg.layers * batch * _cache_len(longest_prompt, max_new_tokens) * cfg.kv_heads * cfg.head_dim * itemsize


def _check_cache_bytes(lm: Any, batch: int, longest: int, max_new_tokens: int, max_cache_bytes: int | None) -> None:
  need = cache_bytes(lm, batch, longest, max_new_tokens)
  if max_cache_bytes is not None and need > max_cache_bytes:
    raise CrossLoraError(f"max_cache_bytes: a KV cache of at most {max_cache_bytes} bytes asked for, but {batch} prompts "
                         f"x {_cache_len(longest, max_new_tokens)} slots need {need}. Pass fewer prompts or fewer new tokens.")


def _left_pad(prompts: list[list[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """(ids (B, length) int32, mask (B, length) bool): every row's last prompt token in the last slot."""
  ids = np.full((len(prompts), length), pad_id, np.int32)
  mask = np.zeros((len(prompts), length), bool)
  for row, p in enumerate(prompts):
    ids[row, length - len(p):] = p
    mask[row, length - len(p):] = True
  return ids, mask


def generate(lm: Any, prompt_ids: Any, *, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             seed: int = 0, eos_ids: Sequence[int] | None = None, stop: Any = None, lengths: Any = None,
             max_cache_bytes: int | None = None) -> list[list[int]]:
  """New token ids per prompt (each row ends at its first EOS or stop sequence, which it includes).

  ``prompt_ids``: a list of token id lists of any lengths, or a right-padded (B, P)
  array with ``lengths``. ``temperature=0`` is greedy; otherwise tokens are drawn
  from softmax(logits / temperature) restricted to the top-``top_p`` mass, from a
  PRNG key made from ``seed`` (token i of every row with
  the i-th of ``split(PRNGKey(seed), max_new_tokens)``). ``eos_ids`` default to the model's
  (config.json and generation_config.json). ``stop``: strings (through the
  model's tokenizer) or token id lists. ``max_cache_bytes`` refuses a batch whose
  KV cache would be larger.
  """
  cfg = lm.config
  if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
    raise CrossLoraError(f"max_new_tokens: a positive integer expected, got {max_new_tokens!r}.")
  if temperature < 0 or not 0 < top_p <= 1:
    raise CrossLoraError(f"temperature >= 0 and 0 < top_p <= 1 expected, got temperature={temperature}, top_p={top_p}.")
  prompts = _prompts(lm, prompt_ids, lengths)
  longest = max(len(p) for p in prompts)
  if longest + max_new_tokens > cfg.max_positions:
    raise CrossLoraError(f"prompt_ids: prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) within the "
                         f"model's context of {cfg.max_positions} expected. Shorten the prompt or ask for fewer tokens.")
  prompt_len = _round_up(longest, PROMPT_BUCKET)
  cache_len = _cache_len(longest, max_new_tokens)
  _check_cache_bytes(lm, len(prompts), longest, max_new_tokens, max_cache_bytes)
  pad_id = cfg.pad_id if cfg.pad_id is not None and 0 <= cfg.pad_id < cfg.vocab_size else 0
  ids, mask = _left_pad(prompts, prompt_len, pad_id)
  batch = len(prompts)
  eos = set(default_eos_ids(lm) if eos_ids is None else (int(e) for e in eos_ids))
  stops = _stop_sequences(lm, stop)
  logits, cache = _prefill(lm.params, lm.lora, jnp.asarray(ids), jnp.asarray(mask), cfg=cfg, spec=lm.spec,
                           cache_len=cache_len)
  keys = jax.random.split(jax.random.PRNGKey(seed), max_new_tokens)  # (max_new_tokens, 2): token i draws with keys[i]
  flags = dict(greedy=temperature == 0, nucleus=top_p < 1.0)
  scalars = (jnp.float32(max(temperature, 1e-6)), jnp.float32(top_p), jnp.int32(pad_id))
  out: list[list[int]] = [[] for _ in prompts]
  done = np.zeros((batch,), bool)
  for index in range(max_new_tokens):
    token, logits, cache = _decode_step(lm.params, lm.lora, cache, logits, keys[index], jnp.asarray(done), *scalars,
                                        cfg=cfg, spec=lm.spec, **flags)
    for row, t in enumerate(np.asarray(token).tolist()):
      if done[row]:
        continue
      out[row].append(t)
      if t in eos or any(out[row][-len(s):] == s for s in stops):
        done[row] = True
    if done.all():
      break
  return out
