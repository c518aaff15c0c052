"""The forward pass of every family, as pure functions over the parameter pytree.

One decoder layer, driven by :class:`LMConfig`, is scanned over the stacked
layer weights (``lax.scan``: one layer compiled, whatever the depth). LoRA
factors are an argument of their own, so ``jax.grad`` with respect to ``lora``
trains them while the base stays frozen. Masking follows transformers: causal
over cache slots, a sliding window ``q - kv < window`` on sliding layers, and
padding slots (``kv_mask``) never attended.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from crosslora_jax.lm import layers as L
from crosslora_jax.lm.config import LMConfig
from crosslora_jax.lm.lora import LoraParams, LoraSpec, stack_lora
from crosslora_jax.lm.rope import apply_rope, cos_sin

Cache = dict  # {"k", "v": (L, B, S, kv_heads, D), "valid": (B, S) bool, "index": () int32, "next_pos": (B,) int32}
DEFAULT_VOCAB_CHUNK = 8192


def init_cache(cfg: LMConfig, batch: int, max_len: int, dtype: Any = jnp.float32) -> Cache:
  """An empty KV cache for ``batch`` rows of up to ``max_len`` tokens."""
  shape = (cfg.layers, batch, max_len, cfg.kv_heads, cfg.head_dim)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
          "valid": jnp.zeros((batch, max_len), bool), "index": jnp.zeros((), jnp.int32),
          "next_pos": jnp.zeros((batch,), jnp.int32)}


def positions_from_mask(kv_mask: jnp.ndarray, start: jnp.ndarray | int = 0) -> jnp.ndarray:
  """Positions (B, T) counting only real tokens: left padding leaves each row starting at ``start``."""
  return start + jnp.maximum(jnp.cumsum(kv_mask.astype(jnp.int32), axis=1) - 1, 0)


def embed(params: dict[str, Any], cfg: LMConfig, ids: jnp.ndarray, positions: jnp.ndarray) -> jnp.ndarray:
  x = jnp.take(params["embed"], ids, axis=0)
  if cfg.embed_scale:  # transformers casts sqrt(hidden) to the weight dtype first
    x = x * jnp.asarray(math.sqrt(cfg.hidden), x.dtype)
  if cfg.learned_positions:
    x = x + jnp.take(params["positions"], positions, axis=0)
  return x


def _rope_tables(cfg: LMConfig, positions: jnp.ndarray, dtype: Any):
  """(cos, sin) per layer kind, shape (2 kinds: full, sliding, B, T, rotary_dim); None without rope."""
  if cfg.rope_full is None:
    return None
  full = cos_sin(cfg.rope_full, positions, dtype)
  local = full if cfg.rope_sliding == cfg.rope_full else cos_sin(cfg.rope_sliding, positions, dtype)
  return jnp.stack([full[0], local[0]]), jnp.stack([full[1], local[1]])


def _decoder_layer(cfg: LMConfig, x, layer, lora, sliding, window, scale, rope, allowed_causal, kv_write):
  """One block: x (B, T, H) -> (B, T, H); ``kv_write(k, v) -> (k_all, v_all)`` handles the cache."""
  B, T, _ = x.shape
  h = L.norm(x, layer["attn_norm"], cfg)
  q, k, v = L.project(h, layer, lora, ("q_proj", "k_proj", "v_proj"), cfg)
  q = q.reshape(B, T, cfg.heads, cfg.head_dim)
  k = k.reshape(B, T, cfg.kv_heads, cfg.head_dim)
  v = v.reshape(B, T, cfg.kv_heads, cfg.head_dim)
  if cfg.qk_norm:
    q, k = L.norm(q, layer["q_norm"], cfg), L.norm(k, layer["k_norm"], cfg)
  if rope is not None:
    kind = sliding.astype(jnp.int32)
    cos, sin = rope[0][kind], rope[1][kind]
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
  k_all, v_all = kv_write(k, v)
  allowed = allowed_causal(window)
  attn = L.attention(q, k_all, v_all, allowed, scale, cfg)
  (o,) = L.project(attn, layer, lora, ("o_proj",), cfg)
  if cfg.post_norms:
    o = L.norm(o, layer["post_attn_norm"], cfg)
  x = x + o
  h = L.norm(x, layer["ffn_norm"], cfg)
  if cfg.gated_mlp:
    gate, up = L.project(h, layer, lora, ("gate_proj", "up_proj"), cfg)
    hidden = L.activation(gate, cfg) * up
  else:
    (up,) = L.project(h, layer, lora, ("up_proj",), cfg)
    hidden = L.activation(up, cfg)
  (down,) = L.project(hidden, layer, lora, ("down_proj",), cfg)
  if cfg.post_norms:
    down = L.norm(down, layer["post_ffn_norm"], cfg)
  return x + down


def _allowed(q_slots, kv_slots, valid, window):
  """(B, T, S) bool: causal over slots, inside ``window``, real keys only.

  A padding query also sees itself, so that no softmax row is empty.
  """
  delta = q_slots[:, None] - kv_slots[None, :]
  allowed = ((delta >= 0) & (delta < window))[None] & valid[:, None, :]
  return allowed | (delta == 0)[None]


def _layer_constants(cfg: LMConfig):
  """Per-layer scanned constants: sliding flag, window length, query scale."""
  sliding = jnp.asarray(cfg.layer_sliding, bool)
  windows = jnp.asarray([cfg.window_for(i) for i in range(cfg.layers)], jnp.int32)
  scales = [cfg.query_scale / ((i + 1) if cfg.scale_by_inverse_layer else 1) for i in range(cfg.layers)]
  return sliding, windows, jnp.asarray(scales, jnp.float32)


def forward(params: dict[str, Any], lora: LoraParams | None, spec: LoraSpec | None, cfg: LMConfig,
            ids: jnp.ndarray, *, positions: jnp.ndarray | None = None, cache: Cache | None = None,
            kv_mask: jnp.ndarray | None = None, remat: bool = False) -> tuple[jnp.ndarray, Cache | None]:
  """Final-norm hidden states (B, T, hidden) and the updated cache.

  ids (B, T) int. ``kv_mask`` (B, T) bool marks real tokens (False: padding, never
  attended); ``positions`` default to the count of real tokens before each one
  (continuing from the cache). With ``cache``, the T new tokens go into slots
  ``cache["index"] ...`` and attend to every valid earlier slot. ``remat``: recompute
  each layer in the backward pass instead of keeping its activations (training memory
  then grows with one layer's activations, not all of them).
  """
  B, T = ids.shape
  real = jnp.ones((B, T), bool) if kv_mask is None else kv_mask.astype(bool)
  start = jnp.zeros((), jnp.int32) if cache is None else cache["index"]
  if positions is None:
    positions = positions_from_mask(real, 0 if cache is None else cache["next_pos"][:, None])
  x = embed(params, cfg, ids, positions)
  rope = _rope_tables(cfg, positions, x.dtype)
  stacked = stack_lora(lora, spec, cfg)
  q_slots = start + jnp.arange(T)
  if cache is None:
    kv_slots, valid = q_slots, real
  else:
    kv_slots = jnp.arange(cache["valid"].shape[1])
    valid = jax.lax.dynamic_update_slice(cache["valid"], real, (0, start))

  allowed_causal = functools.partial(_allowed, q_slots, kv_slots, valid)
  sliding, windows, scales = _layer_constants(cfg)
  # The cache rides in xs (one layer's slice per step) and only the T new keys/values come
  # out as ys; a single update after the scan writes them in place. Carrying the whole
  # cache through the scan instead made XLA copy it once per layer.
  old_kv = () if cache is None else (cache["k"], cache["v"])
  xs = (params["layers"], stacked, sliding, windows, scales, old_kv)

  def step(x, xs_l):
    layer, lora_l, slide, window, scale, kv = xs_l

    def kv_write(k, v):
      if not kv:
        return k, v
      k_all = jax.lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), (0, start, 0, 0))
      v_all = jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), (0, start, 0, 0))
      new_kv.append((k.astype(kv[0].dtype), v.astype(kv[1].dtype)))
      return k_all, v_all

    new_kv: list[Any] = []
    x = _decoder_layer(cfg, x, layer, lora_l, slide, window, scale, rope, allowed_causal, kv_write)
    return x, (new_kv[0] if new_kv else ())

  x, new_kv = jax.lax.scan(jax.checkpoint(step) if remat else step, x, xs)
  x = L.norm(x, params["final_norm"], cfg)
  if cache is None:
    return x, None
  k_cache = jax.lax.dynamic_update_slice(cache["k"], new_kv[0], (0, 0, start, 0, 0))
  v_cache = jax.lax.dynamic_update_slice(cache["v"], new_kv[1], (0, 0, start, 0, 0))
  new_cache = {"k": k_cache, "v": v_cache, "valid": valid, "index": start + T, "next_pos": positions[:, -1] + 1}
  return x, new_cache


def unembedding(params: dict[str, Any], cfg: LMConfig) -> jnp.ndarray:
  """(V, hidden): the output head (the embedding when tied)."""
  return params["embed"] if cfg.tie_embeddings else params["lm_head"]


def _softcap(logits: jnp.ndarray, cfg: LMConfig) -> jnp.ndarray:
  if cfg.final_softcap is None:
    return logits
  return jnp.tanh(logits / cfg.final_softcap) * cfg.final_softcap


def logits_from_hidden(params: dict[str, Any], cfg: LMConfig, hidden: jnp.ndarray) -> jnp.ndarray:
  out = jnp.einsum("bth,vh->btv", hidden, unembedding(params, cfg), preferred_element_type=jnp.float32)
  return _softcap(out, cfg)


def logits(params: dict[str, Any], lora: LoraParams | None, spec: LoraSpec | None, cfg: LMConfig,
           ids: jnp.ndarray, *, kv_mask: jnp.ndarray | None = None) -> jnp.ndarray:
  """Full next-token logits (B, T, V) float32 (tests and small vocabularies; see token_logprobs)."""
  hidden, _ = forward(params, lora, spec, cfg, ids, kv_mask=kv_mask)
  return logits_from_hidden(params, cfg, hidden)


def chunked_logsumexp(hidden: jnp.ndarray, head: jnp.ndarray, cfg: LMConfig,
                      vocab_chunk: int = DEFAULT_VOCAB_CHUNK) -> jnp.ndarray:
  """logsumexp(hidden headᵀ) over the vocabulary, (B, T) float32, never holding more than (B, T, chunk) logits.

  An online log-sum-exp over vocabulary chunks (``lax.scan``); each chunk's body is
  rematerialised under ``jax.checkpoint`` so the backward pass does not keep every
  chunk's logits either. The last chunk is shifted to end at V and masks the
  entries an earlier chunk already counted, so V need not divide by the chunk.
  """
  V = head.shape[0]
  size = min(vocab_chunk, V)
  n_chunks = -(-V // size)

  @jax.checkpoint
  def body(carry, i):
    run_max, run_sum = carry
    first = jnp.minimum(i * size, V - size)
    w = jax.lax.dynamic_slice_in_dim(head, first, size, axis=0)
    chunk = _softcap(jnp.einsum("bth,ch->btc", hidden, w, preferred_element_type=jnp.float32), cfg)
    fresh = (first + jnp.arange(size)) >= i * size
    chunk = jnp.where(fresh, chunk, -jnp.inf)
    new_max = jax.lax.stop_gradient(jnp.maximum(run_max, chunk.max(-1)))
    run_sum = run_sum * jnp.exp(run_max - new_max) + jnp.exp(chunk - new_max[..., None]).sum(-1)
    return (new_max, run_sum), None

  shape = hidden.shape[:-1]
  init = (jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32))
  (run_max, run_sum), _ = jax.lax.scan(body, init, jnp.arange(n_chunks))
  return run_max + jnp.log(run_sum)


def chunked_log_softmax_at(hidden: jnp.ndarray, head: jnp.ndarray, targets: jnp.ndarray, cfg: LMConfig,
                           vocab_chunk: int = DEFAULT_VOCAB_CHUNK) -> jnp.ndarray:
  """log softmax(hidden headᵀ)[targets]: (B, T) for targets (B, T), (B, T, K) for targets (B, T, K)
  (K candidate tokens per position); the normaliser from :func:`chunked_logsumexp`."""
  rows = jnp.take(head, targets, axis=0)  # (B, T, [K,] H)
  spec = "bth,bth->bt" if targets.ndim == 2 else "bth,btkh->btk"
  picked = _softcap(jnp.einsum(spec, hidden, rows, preferred_element_type=jnp.float32), cfg)
  lse = chunked_logsumexp(hidden, head, cfg, vocab_chunk)
  return picked - (lse if targets.ndim == 2 else lse[..., None])


def token_logprobs(params: dict[str, Any], lora: LoraParams | None, spec: LoraSpec | None, cfg: LMConfig,
                   ids: jnp.ndarray, mask: jnp.ndarray | None = None, *,
                   vocab_chunk: int = DEFAULT_VOCAB_CHUNK, remat: bool = False) -> jnp.ndarray:
  """(B, T-1) float32: log p(ids[:, t+1] | ids[:, :t+1]); 0 at targets ``target_mask(mask)`` leaves out.

  ``mask`` also keeps padding out of attention and out of the position count, so
  left- and right-padded batches score their real tokens as unpadded ones would.
  """
  hidden, _ = forward(params, lora, spec, cfg, ids, kv_mask=mask, remat=remat)
  out = chunked_log_softmax_at(hidden[:, :-1], unembedding(params, cfg), ids[:, 1:], cfg, vocab_chunk)
  if mask is not None:
    out = jnp.where(target_mask(mask), out, 0.0)
  return out


def target_mask(mask: jnp.ndarray) -> jnp.ndarray:
  """(B, T-1) bool: the targets scored, real tokens that follow a real token (a left-padded row's
  first token has no context and is not scored, as it is not in an unpadded row)."""
  mask = mask.astype(bool)
  return mask[:, 1:] & mask[:, :-1]


def mean_nll(logprobs: jnp.ndarray, mask: jnp.ndarray | None = None) -> jnp.ndarray:
  """(B,) mean next-token NLL over the real targets of each row."""
  if mask is None:
    return -logprobs.mean(-1)
  weights = target_mask(mask).astype(jnp.float32)
  return -(logprobs * weights).sum(-1) / jnp.maximum(weights.sum(-1), 1.0)
