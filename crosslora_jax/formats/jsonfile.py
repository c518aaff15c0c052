"""The one JSON reader for every config a user hands in (config.json, adapter_config.json, indexes).

Strict and bounded, so that no file can make the reader crash, hang or allocate
without limit: a regular file of at most ``max_bytes``; UTF-8; nesting at most
``MAX_DEPTH`` deep; numbers finite (no ``NaN``/``Infinity``) and integers within
±2**53 (a 5000-digit integer is refused, not parsed); no key twice in one object
(JSON leaves that undefined; Python would keep the last silently). Every failure is
one CrossLoraError line naming the file. Typed field getters below check values
one field at a time with the same message shape.
"""

from __future__ import annotations

import json
import math
import pathlib
import re
from collections.abc import Mapping
from typing import Any

from crosslora_jax.errors import CrossLoraError
from crosslora_jax.formats import safefiles

MAX_BYTES = 64 << 20  # a 70B model's shard index is ~100 KB; configs are a few KB
MAX_DEPTH = 32  # HF configs nest 3-4 levels
MAX_INT = 2**53  # integers beyond float precision are no plausible size, count or id
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKET = re.compile(r"[\[\]{}]")


class _Refused(ValueError):
  pass


def _constant(name: str) -> Any:
  raise _Refused(f"finite numbers expected, got {name}")


def _integer(text: str) -> int:
  if len(text.lstrip("-")) > 16:
    raise _Refused(f"integers within ±2**53 expected, got one of {len(text.lstrip('-'))} digits")
  value = int(text)
  if abs(value) > MAX_INT:
    raise _Refused(f"integers within ±2**53 expected, got {value}")
  return value


def _float(text: str) -> float:
  value = float(text)
  if not math.isfinite(value):
    raise _Refused(f"finite numbers expected, got {text[:40]}")
  return value


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
  out: dict[str, Any] = {}
  for key, value in pairs:
    if key in out:
      raise _Refused(f"each key once per object expected, got {key!r} twice")
    out[key] = value
  return out


def _depth(text: str) -> int:
  """Deepest nesting of ``text`` (brackets inside strings do not count)."""
  depth = deepest = 0
  for match in _BRACKET.finditer(_STRING.sub('""', text)):
    depth += 1 if match.group() in "[{" else -1
    deepest = max(deepest, depth)
    if deepest > MAX_DEPTH:
      break
  return deepest


def parse(text: str, where: str) -> Any:
  """Parses JSON ``text`` under the bounds above; ``where`` names it in errors."""
  if _depth(text) > MAX_DEPTH:
    raise CrossLoraError(f"{where}: JSON nested at most {MAX_DEPTH} deep expected, got deeper. "
                         "This is not a real config; fix or re-download the file.")
  try:
    return json.loads(text, parse_constant=_constant, parse_int=_integer, parse_float=_float,
                      object_pairs_hook=_no_duplicates)
  except _Refused as e:
    raise CrossLoraError(f"{where}: {e}. Fix or re-download the file.") from None
  except (json.JSONDecodeError, RecursionError, ValueError) as e:
    raise CrossLoraError(f"{where}: valid JSON expected, got a parse error ({e}). Fix or re-download the file.") from None


def read_object(path: pathlib.Path, what: str = "JSON", *, max_bytes: int = MAX_BYTES) -> dict[str, Any]:
  """Reads a JSON object file (a regular file within ``max_bytes``), strictly; see the module doc."""
  safefiles.regular_file(path, what, max_bytes=max_bytes)
  try:
    raw = path.read_bytes()[:max_bytes + 1]
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise CrossLoraError(f"{path}: valid JSON expected (UTF-8 text), got undecodable bytes ({e.reason} at {e.start}). "
                         "Fix or re-download the file.") from None
  except OSError as e:
    raise CrossLoraError(f"{path}: a readable {what} file expected, got {e.strerror or e}. Check its permissions.") from None
  if len(raw) > max_bytes:
    raise CrossLoraError(f"{path}: {what} of at most {max_bytes} bytes expected, got more (it grew while read).")
  value = parse(text, str(path))
  if not isinstance(value, dict):
    raise CrossLoraError(f"{path}: a JSON object expected, got {type(value).__name__}. Fix or re-download the file.")
  return value


def optional_object(config: Mapping[str, Any], field: str, where: str) -> dict[str, Any] | None:
  """``config[field]`` when it is an object, None when absent or null; anything else is refused."""
  value = config.get(field)
  if value is not None and not isinstance(value, dict):
    raise CrossLoraError(f"{where}: {field} expected an object, got {type(value).__name__} {_short(value)}. "
                         "Fix the config.")
  return value


def _short(value: Any) -> str:
  text = repr(value)
  return text if len(text) <= 60 else text[:57] + "..."
