"""The few calls refine makes into the JAX LM runtime (``crosslora_jax.lm``), in one place.

Batches are padded to fixed shapes (rows to ``batch``, length to a multiple of 16)
so each jitted function compiles once per corpus, not once per batch.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import numpy as np

from crosslora_jax.progress import Progress, ProgressBar, enabled

LENGTH_QUANTUM = 16
# Prompts per teacher-sampling call. 64 would sample 10-25% faster on 2 CPU cores (one decode step
# serves every row of a call; docs/design.md, "Teacher sampling"), but the rows set the random
# streams, so it would redraw every corpus measured so far: it waits for a change that redraws them
# (teacher.cache_key carries the rows whenever they are not KEYLESS_SAMPLE_ROWS).
KEYLESS_SAMPLE_ROWS = 32  # what a corpus key without "sample_rows" was sampled with
SAMPLE_ROWS = KEYLESS_SAMPLE_ROWS
SAMPLE_CACHE_BYTES = 1 << 30  # fewer rows a call where long prompts would need a larger KV cache


def load_lm(folder: Any, adapter: Any = None, dtype: str = "float32") -> Any:
  from crosslora_jax import lm
  return lm.load(folder, adapter=adapter, dtype=dtype)


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int, length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(ids (N, T) int32, real (N, T) bool), T = the longest row rounded up to LENGTH_QUANTUM."""
  longest = max((len(r) for r in rows), default=1)
  length = length or -(-max(longest, 2) // LENGTH_QUANTUM) * LENGTH_QUANTUM
  ids = np.full((len(rows), length), pad_id, np.int32)
  real = np.zeros((len(rows), length), bool)
  for i, row in enumerate(rows):
    row = list(row)[:length]
    ids[i, :len(row)] = row
    real[i, :len(row)] = True
  return ids, real


@functools.lru_cache(maxsize=None)
def _jitted_logprobs():
  import jax
  from crosslora_jax.lm import model
  return jax.jit(model.token_logprobs, static_argnums=(2, 3))


def token_logprobs(lm_obj: Any, lora: Any, spec: Any, ids: Any, real: Any) -> Any:
  """(B, T-1) log p(ids[:, t+1] | ids[:, :t+1]); ``lora=None`` is the base model."""
  return _jitted_logprobs()(lm_obj.params, lora, spec, lm_obj.config, ids, real)


def fixed_batches(arrays: Sequence[np.ndarray], batch: int):
  """Yields (start, rows, chunks): ``batch`` rows of each array from ``start``, the last chunk padded
  with copies of its last row to the same shape (one compilation), ``rows`` of them real."""
  for start in range(0, arrays[0].shape[0], batch):
    chunks = [a[start:start + batch] for a in arrays]
    rows = len(chunks[0])
    if rows < batch:
      chunks = [np.concatenate([c, np.repeat(c[-1:], batch - rows, 0)]) for c in chunks]
    yield start, rows, chunks


def batched_logprobs(lm_obj: Any, lora: Any, spec: Any, ids: np.ndarray, real: np.ndarray, *, batch: int,
                     progress: Progress = False, what: str = "log-probs") -> np.ndarray:
  """(N, T-1) float32 next-token log-probs of padded ``ids`` (N, T), ``batch`` rows at a time."""
  bar = ProgressBar(enabled=enabled(progress), unit="sequence") if progress else None
  out = np.zeros((ids.shape[0], ids.shape[1] - 1), np.float32)
  for start, rows, (chunk_ids, chunk_real) in fixed_batches([ids, real], batch):
    lp = np.asarray(token_logprobs(lm_obj, lora, spec, chunk_ids, chunk_real))
    out[start:start + rows] = lp[:rows]
    if bar:
      bar(what, min(start + batch, ids.shape[0]), ids.shape[0])
  return out


def sequence_logprobs(lm_obj: Any, rows: Sequence[Sequence[int]], *, batch: int, use_lora: bool, progress: Progress,
                      what: str) -> list[np.ndarray]:
  """Per-row (len(row) - 1,) float32 log-probs of each next token, with or without the LM's LoRA."""
  ids, real = pad_rows(rows, 0)
  lora, spec = (lm_obj.lora, lm_obj.spec) if use_lora else (None, None)
  out = batched_logprobs(lm_obj, lora, spec, ids, real, batch=batch, progress=progress, what=what)
  return [out[i, :max(len(r) - 1, 0)] for i, r in enumerate(rows)]


def sample_rows(lm_obj: Any, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int) -> int:
  """Prompts per ``sample.generate`` call: SAMPLE_ROWS, fewer where their KV cache would pass SAMPLE_CACHE_BYTES."""
  from crosslora_jax.lm import sample
  longest = max((len(p) for p in prompt_ids), default=1)
  per_row = sample.cache_bytes(lm_obj, 1, longest, max_new_tokens)
  return max(1, min(SAMPLE_ROWS, SAMPLE_CACHE_BYTES // per_row))


def generate(lm_obj: Any, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float, top_p: float,
             seed: int, eos_ids: list[int], progress: Progress) -> list[list[int]]:
  """New token ids per prompt (``lm.sample.generate``), ``sample_rows`` prompts a call (seed + call index each)."""
  from crosslora_jax.lm import sample
  chunk = sample_rows(lm_obj, prompt_ids, max_new_tokens)
  bar = ProgressBar(enabled=enabled(progress), unit="sequence") if progress else None
  outputs: list[list[int]] = []
  for index, start in enumerate(range(0, len(prompt_ids), chunk)):
    part = [list(p) for p in prompt_ids[start:start + chunk]]
    outputs += sample.generate(lm_obj, part, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                               seed=seed * 100_003 + index, eos_ids=eos_ids)
    if bar:
      bar("teacher writes", len(outputs), len(prompt_ids))
  return outputs
