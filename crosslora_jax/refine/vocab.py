"""The delta loss's vocabulary term: how the adapter changed the teacher's whole next-token distribution.

The plain delta loss sees one number per position, the adapter's change of the sampled
token's log-prob. The teacher's distribution says more: at every position the adapter
raises some continuations and lowers others. For each teacher position this keeps the
``k`` tokens with the largest probability under either teacher (source + adapter, or
source base) and their change

  delta[t, j] = log p(cand_j | prefix, source + adapter) − log p(cand_j | prefix, source base)

The student gets the same targets where the two tokenizations agree: a student token that
starts at the same character as a teacher token has the same prefix text, and a candidate
carries over when its bytes are one token of the student's vocabulary too (the shared
tokens of :mod:`crosslora_jax.methods.anchored_vocab`). The student then matches its own
log-prob change on those tokens, the same squared error as the delta loss.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import numpy as np

from crosslora_jax.refine.runtime import fixed_batches, pad_rows


@functools.lru_cache(maxsize=None)
def _jitted_candidates():
  import jax
  import jax.numpy as jnp
  from crosslora_jax.lm import model

  def candidates(params, lora, spec, cfg, ids, real, k):
    def log_probs(adapter, adapter_spec):
      hidden, _ = model.forward(params, adapter, adapter_spec, cfg, ids, kv_mask=real)
      return jax.nn.log_softmax(model.logits_from_hidden(params, cfg, hidden[:, :-1]), axis=-1)
    with_adapter, base = log_probs(lora, spec), log_probs(None, None)
    _, cand = jax.lax.top_k(jnp.maximum(with_adapter, base), k)
    delta = jnp.take_along_axis(with_adapter, cand, -1) - jnp.take_along_axis(base, cand, -1)
    return cand.astype(jnp.int32), delta

  return jax.jit(candidates, static_argnums=(2, 3, 6))


def teacher_candidates(teacher: Any, rows: Sequence[Sequence[int]], k: int, *, batch: int) -> tuple[list, list]:
  """Per row: (len(row), k) candidate ids and (len(row), k) changes, row t = the distribution of token t
  (row 0, which nothing predicts, is zeros)."""
  ids, real = pad_rows(rows, 0)
  fn = _jitted_candidates()
  cand_rows, delta_rows = [], []
  for start, real_rows, (chunk_ids, chunk_real) in fixed_batches([ids, real], batch):
    cand, delta = fn(teacher.params, teacher.lora, teacher.spec, teacher.config, chunk_ids, chunk_real, k)
    cand, delta = np.asarray(cand), np.asarray(delta, np.float32)
    for i in range(real_rows):
      n = len(rows[start + i])
      cand_rows.append(np.concatenate([np.zeros((1, k), np.int32), cand[i, :n - 1]]).tolist())
      delta_rows.append(np.round(np.concatenate([np.zeros((1, k), np.float32), delta[i, :n - 1]]), 5).tolist())
  return cand_rows, delta_rows


def vocab_map(source_folder: Any, target_folder: Any) -> np.ndarray:
  """(source ids,) int64: the target id of the token with the same bytes, −1 where the target has none."""
  from crosslora_jax.methods.anchored_vocab import shared_token_ids
  src, dst = shared_token_ids(source_folder, target_folder)
  out = np.full(int(src.max(initial=-1)) + 1, -1, np.int64)
  out[src] = dst
  return out


def align_row(teacher_starts: np.ndarray, teacher_live: np.ndarray, cand: np.ndarray, delta: np.ndarray,
              student_starts: np.ndarray, student_live: np.ndarray, mapping: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """One text's candidates on the student's tokens.

  ``*_starts``: each token's start character (in the shared text's coordinates); ``*_live``:
  tokens that may be learned. A student token gets the candidates of the first live teacher
  token that starts at the same character, mapped through ``mapping`` (source id → target id).
  Returns (n_student, k) target ids (0 where unmapped), changes, and the mask of the mapped ones.
  """
  k = cand.shape[1] if cand.ndim == 2 else 0
  first: dict[int, int] = {}
  for index in np.flatnonzero(teacher_live):
    first.setdefault(int(teacher_starts[index]), int(index))
  ids = np.zeros((len(student_starts), k), np.int32)
  target = np.zeros((len(student_starts), k), np.float32)
  mask = np.zeros((len(student_starts), k), bool)
  for j in np.flatnonzero(student_live):
    t = first.get(int(student_starts[j]))
    if t is None:
      continue
    source_ids = cand[t]
    mapped = np.where(source_ids < len(mapping), mapping[np.minimum(source_ids, len(mapping) - 1)], -1)
    mask[j] = mapped >= 0
    ids[j] = np.where(mask[j], mapped, 0)
    target[j] = np.where(mask[j], delta[t], 0.0)
  return ids, target, mask


@functools.lru_cache(maxsize=None)
def _jitted_candidate_logprobs():
  import jax
  from crosslora_jax.lm import model

  def logprobs(params, lora, spec, cfg, ids, real, cand):
    hidden, _ = model.forward(params, lora, spec, cfg, ids, kv_mask=real)
    return model.chunked_log_softmax_at(hidden[:, :-1], model.unembedding(params, cfg), cand, cfg)

  return jax.jit(logprobs, static_argnums=(2, 3))


def candidate_logprobs(lm_obj: Any, ids: np.ndarray, real: np.ndarray, cand: np.ndarray, *, batch: int) -> np.ndarray:
  """(N, T-1, k) the base model's log-probs of the candidates ``cand`` (N, T-1, k) of padded ``ids`` (N, T)."""
  fn = _jitted_candidate_logprobs()
  out = np.zeros(cand.shape, np.float32)
  for start, rows, chunk in fixed_batches([ids, real, cand], batch):
    out[start:start + rows] = np.asarray(fn(lm_obj.params, None, None, lm_obj.config, *chunk))[:rows]
  return out
