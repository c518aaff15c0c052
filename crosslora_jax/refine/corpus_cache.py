"""On-disk cache of teacher corpora: one adapter moved to several targets writes its text once.

An entry is one JSON file ``<root>/<key sha256[:32]>.json`` holding the full key
(source checkpoint fingerprint hash, adapter bytes hash, sampling options, seed,
format version), the payload (texts, teacher spans and scores) and a sha256 of the
canonical payload. :func:`load` checks key and checksum and the payload's shape;
an entry that fails any check is a miss with its reason (the caller recomputes it and
:func:`store` overwrites it): a cache is never trusted over a recomputation. Writes
go to a temporary sibling, fsync, then ``os.replace``: readers see a whole entry or none.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
import tempfile
from typing import Any, Mapping

import numpy as np

FORMAT_VERSION = 2  # 2: the teacher samples with lm.sample (exact nucleus, its key schedule)


def adapter_hash(adapter: Any) -> str:
  """sha256 of a PeftAdapter's config and factor bytes (what the teacher's text depends on)."""
  h = hashlib.sha256(json.dumps(adapter.config, sort_keys=True, default=str).encode())
  for path in sorted(adapter.modules):
    for factor in adapter.modules[path]:
      a = np.ascontiguousarray(factor)
      h.update(f"{path}:{a.dtype.str}:{a.shape}".encode())
      h.update(memoryview(a).cast("B"))
  return h.hexdigest()


def text_hash(text: str) -> str:
  return hashlib.sha256(text.encode()).hexdigest()


def _canonical(obj: Any) -> str:
  return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def entry_path(root: pathlib.Path, key: Mapping[str, Any]) -> pathlib.Path:
  digest = hashlib.sha256(_canonical({**key, "format": FORMAT_VERSION}).encode()).hexdigest()
  return pathlib.Path(root) / f"{digest[:32]}.json"


def _check_payload(payload: Any) -> str | None:
  """None when the payload has the corpus shape, else what is wrong."""
  if not isinstance(payload, dict):
    return "payload is not an object"
  texts, spans, scores = payload.get("texts"), payload.get("spans"), payload.get("scores")
  if not (isinstance(texts, list) and isinstance(spans, list) and isinstance(scores, list)):
    return "texts, spans or scores missing"
  if not (len(texts) == len(spans) == len(scores)) or not texts:
    return "texts, spans and scores differ in length"
  for text, span, score in zip(texts, spans, scores):
    if not isinstance(text, str) or not isinstance(span, list) or not isinstance(score, list) or len(span) != len(score):
      return "a sample's spans and scores differ in length"
  return _check_candidates(payload, spans)


def _check_candidates(payload: dict, spans: list) -> str | None:
  """None when the optional candidate arrays (refine.vocab) are absent or one (k,) row per token."""
  if "cand_ids" not in payload:
    return None
  ids, deltas = payload.get("cand_ids"), payload.get("cand_deltas")
  if not (isinstance(ids, list) and isinstance(deltas, list) and len(ids) == len(deltas) == len(spans)):
    return "candidate ids and changes missing or not one list per sample"
  widths = set()
  for id_rows, delta_rows, span in zip(ids, deltas, spans):
    if not (isinstance(id_rows, list) and isinstance(delta_rows, list) and len(id_rows) == len(delta_rows) == len(span)):
      return "a sample's candidates differ in length from its tokens"
    for i_row, d_row in zip(id_rows, delta_rows):
      if not (isinstance(i_row, list) and isinstance(d_row, list) and len(i_row) == len(d_row)):
        return "a token's candidate ids and changes differ in length"
      widths.add(len(i_row))
  return None if len(widths) <= 1 else "tokens with different numbers of candidates"


def load(root: pathlib.Path, key: Mapping[str, Any]) -> tuple[dict[str, Any] | None, str]:
  """(payload, "hit") or (None, why it missed: "absent", "corrupt: ...")."""
  path = entry_path(root, key)
  try:
    raw = path.read_bytes()
  except FileNotFoundError:
    return None, "absent"
  except OSError as e:
    return None, f"unreadable: {e.strerror}"
  try:
    entry = json.loads(raw.decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
    return None, "corrupt: not JSON"
  if not isinstance(entry, dict) or entry.get("format") != FORMAT_VERSION:
    return None, "corrupt: wrong format"
  if entry.get("key") != json.loads(_canonical(dict(key))):
    return None, "corrupt: key differs"
  payload = entry.get("payload")
  problem = _check_payload(payload)
  if problem:
    return None, f"corrupt: {problem}"
  if hashlib.sha256(_canonical(payload).encode()).hexdigest() != entry.get("sha256"):
    return None, "corrupt: checksum differs"
  return payload, "hit"


def store(root: pathlib.Path, key: Mapping[str, Any], payload: Mapping[str, Any]) -> pathlib.Path | None:
  """Writes the entry atomically; returns its path, or None when the cache folder is not writable."""
  path = entry_path(root, key)
  body = _canonical({"format": FORMAT_VERSION, "key": dict(key), "payload": dict(payload),
                     "sha256": hashlib.sha256(_canonical(dict(payload)).encode()).hexdigest()})
  tmp = None
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.write(body)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
    return path
  except OSError:
    # A cache that cannot be written costs time next run, never the result of this one.
    if tmp is not None:
      with contextlib.suppress(OSError):
        os.unlink(tmp)
    return None
