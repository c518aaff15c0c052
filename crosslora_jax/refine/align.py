"""Carrying per-token scores from one tokenizer's tokens to another's through character spans.

Both tokenizers see the same text; each token covers a half-open character span
``[start, end)`` of it (``tokenizers``' ``Encoding.offsets``). A teacher token's
score is a log-probability ratio, which adds up along the text, so it is spread
evenly over the characters its span covers and each student token receives the
sum over its own span: the total score of the text is kept, whichever way the
two tokenizers cut it. Byte-level tokenizers give several tokens the same span
(one emoji split into bytes); each adds its share, and on the receiving side a character
covered by several tokens is shared between them, so nothing is counted twice.
Zero-width tokens (BOS, special tokens: span ``(0, 0)``) give and receive nothing.

This is the two-pointer walk over sorted spans, written as a prefix sum over
characters: O(characters + tokens), no Python loop per token.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from crosslora_jax.errors import CrossLoraError

Spans = Sequence[tuple[int, int]]


def _check_spans(spans: np.ndarray, what: str, text_len: int | None) -> None:
  if spans.ndim != 2 or spans.shape[1] != 2:
    raise CrossLoraError(f"{what}: character spans expected (tokens, 2), got shape {spans.shape}.")
  if spans.size and (spans.min() < 0 or np.any(spans[:, 1] < spans[:, 0])):
    raise CrossLoraError(f"{what}: spans with 0 <= start <= end expected, got {spans[spans[:, 1] < spans[:, 0]][:1].tolist()}.")
  if text_len is not None and spans.size and spans.max() > text_len:
    raise CrossLoraError(f"{what}: spans inside the text ({text_len} characters) expected, got end {int(spans.max())}.")


def _coverage(spans: np.ndarray, n_chars: int) -> np.ndarray:
  """(n_chars,) how many spans cover each character."""
  marks = np.zeros(n_chars + 1, np.int64)
  np.add.at(marks, spans[:, 0], 1)
  np.add.at(marks, spans[:, 1], -1)
  return np.cumsum(marks)[:n_chars]


def carry_scores(scores: Sequence[float] | np.ndarray, from_spans: Spans, to_spans: Spans,
                 *, text_len: int | None = None) -> np.ndarray:
  """Per-token scores on ``from_spans`` → per-token scores on ``to_spans`` (same text).

  Args:
    scores: (n_from,) one score per source token.
    from_spans: (n_from, 2) character span of each source token.
    to_spans: (n_to, 2) character span of each target token.
    text_len: length of the text in characters; by default the largest span end.

  Returns:
    (n_to,) float64: each target token's share of the scores of the characters it covers.
  """
  values = np.asarray(scores, dtype=np.float64).reshape(-1)
  src = np.asarray(from_spans, dtype=np.int64).reshape(-1, 2) if len(from_spans) else np.zeros((0, 2), np.int64)
  dst = np.asarray(to_spans, dtype=np.int64).reshape(-1, 2) if len(to_spans) else np.zeros((0, 2), np.int64)
  _check_spans(src, "carry_scores from_spans", text_len)
  _check_spans(dst, "carry_scores to_spans", text_len)
  if values.shape[0] != src.shape[0]:
    raise CrossLoraError(f"carry_scores: one score per source token expected ({src.shape[0]}), got {values.shape[0]}.")
  if not np.all(np.isfinite(values)):
    raise CrossLoraError("carry_scores: finite scores expected, got NaN or inf.")
  n_chars = text_len if text_len is not None else int(max(src.max(initial=0), dst.max(initial=0)))
  width = src[:, 1] - src[:, 0]
  live = width > 0
  # Score density per character: +v/w at start, -v/w at end, then a running sum.
  density = np.zeros(n_chars + 1)
  np.add.at(density, src[live, 0], values[live] / width[live])
  np.add.at(density, src[live, 1], -values[live] / width[live])
  per_char = np.cumsum(density)[:n_chars]
  per_char /= np.maximum(_coverage(dst, n_chars), 1)
  prefix = np.concatenate([[0.0], np.cumsum(per_char)])  # (n_chars + 1,)
  return prefix[dst[:, 1]] - prefix[dst[:, 0]]
