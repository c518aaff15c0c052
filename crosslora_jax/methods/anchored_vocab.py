"""Method ``anchored``, step 1: the tokens two vocabularies share, as normalised bytes.

Token strings of both ``tokenizer.json`` files are normalised to bytes (byte-level BPE's
``Ġ``/``Ċ`` alphabet decoded; SentencePiece's ``▁`` read as a space, ``<0xNN>`` as a
byte); special tokens are skipped; equal byte strings are matched.
"""

from __future__ import annotations

import functools
import json
import pathlib
import re

import numpy as np

from crosslora_jax.errors import CrossLoraError

TOKENIZER_FILE = "tokenizer.json"


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
  """Inverse of GPT-2's bytes_to_unicode: the byte-level BPE alphabet -> byte values."""
  bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return {chr(c): b for b, c in zip(bs, cs)}


_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _normalise(token: str, byte_level: bool) -> bytes | None:
  if byte_level:
    table = _byte_decoder()
    try:
      return bytes(table[c] for c in token)
    except KeyError:
      return None
  match = _BYTE_TOKEN.fullmatch(token)
  if match:
    return bytes([int(match.group(1), 16)])
  return token.replace("▁", " ").encode("utf-8")


def read_vocab(folder: str | pathlib.Path, *, what: str = "model") -> dict[bytes, int]:
  """Normalised token bytes -> lowest id, special tokens skipped, from ``folder/tokenizer.json``."""
  path = pathlib.Path(folder) / TOKENIZER_FILE
  if not path.is_file():
    raise CrossLoraError(
        f"{path}: {TOKENIZER_FILE} expected (--method anchored matches the two models' vocabularies), got "
        f"{'a folder' if path.exists() else 'nothing'}. Copy the {what}'s tokenizer.json next to its "
        "config.json, or use --method cross_lora.")
  try:
    data = json.loads(path.read_text())
    vocab = data["model"]["vocab"]
  except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
    raise CrossLoraError(f"{path}: a tokenizer.json with model.vocab expected, got {type(e).__name__}: {e}. "
                         "Re-save the tokenizer with transformers.") from None
  if isinstance(vocab, list):  # Unigram: [[piece, score], ...]
    vocab = {piece[0]: i for i, piece in enumerate(vocab)}
  if not isinstance(vocab, dict) or not vocab:
    raise CrossLoraError(f"{path}: model.vocab expected a non-empty token -> id mapping, got {type(vocab).__name__}.")
  special = {t.get("id") for t in data.get("added_tokens") or [] if t.get("special")}
  byte_level = "ByteLevel" in json.dumps(data.get("decoder")) or "ByteLevel" in json.dumps(data.get("pre_tokenizer"))
  out: dict[bytes, int] = {}
  for token, idx in sorted(vocab.items(), key=lambda kv: kv[1]):
    if idx in special:
      continue
    key = _normalise(token, byte_level)
    if key and key not in out:
      out[key] = int(idx)
  return out


def shared_token_ids(source_folder, target_folder) -> tuple[np.ndarray, np.ndarray]:
  """Ids of the tokens both vocabularies hold, paired, sorted by source id: (n,), (n,)."""
  vs = read_vocab(source_folder, what="source model")
  vt = read_vocab(target_folder, what="target model")
  pairs = sorted((i, vt[k]) for k, i in vs.items() if k in vt)
  if not pairs:
    return np.zeros(0, np.int64), np.zeros(0, np.int64)
  ids = np.asarray(pairs, np.int64)
  return ids[:, 0], ids[:, 1]
