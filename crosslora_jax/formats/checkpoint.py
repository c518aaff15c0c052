"""Lazy reading of Hugging Face model folders (single or sharded safetensors).

A :class:`Checkpoint` reads ``config.json`` and the safetensors headers up front
and one tensor at a time afterwards, so a 3B model never sits in memory.
:class:`DictWeights` offers the same interface over an in-memory mapping of
arrays (the pytree API). Both hand out base weights in torch (out, in) orientation.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any, Protocol

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy before safetensors reads it)
import numpy as np
from safetensors import safe_open

from crosslora_jax.formats.architectures import Architecture, to_out_in
from crosslora_jax.errors import CrossLoraError
from crosslora_jax import hub

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def read_json(path: pathlib.Path, what: str = "JSON") -> dict[str, Any]:
  """Parses a JSON object file, turning every failure into one CrossLoraError line."""
  if not path.is_file():
    raise CrossLoraError(f"{path}: {what} file expected, got nothing there. Check the folder.")
  try:
    value = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CrossLoraError(f"{path}: valid JSON expected, got a parse error ({e}). Fix or re-download the file.") from None
  if not isinstance(value, dict):
    raise CrossLoraError(f"{path}: a JSON object expected, got {type(value).__name__}.")
  return value


def check_finite(array: np.ndarray, where: str) -> None:
  if array.dtype.kind == "f" or array.dtype == ml_dtypes.bfloat16:
    if not np.isfinite(array.astype(np.float32, copy=False)).all():
      raise CrossLoraError(f"{where}: finite values expected, got NaN or Inf. The file is corrupt or the training diverged.")


class BaseWeights(Protocol):
  """What the transfer needs from a base model."""

  arch: Architecture
  name: str  # written as base_model_name_or_path

  def has(self, key: str) -> bool: ...
  def tensor(self, key: str) -> np.ndarray: ...
  def weight(self, layer: int, module: str) -> np.ndarray: ...
  def fingerprint(self) -> str: ...


class _WeightMixin:
  arch: Architecture

  def weight(self, layer: int, module: str) -> np.ndarray:
    """Canonical ``module`` of ``layer`` as an (out, in) array in the stored dtype."""
    stored, rows = self.arch.stored_for(module)
    key = self.arch.weight_key(layer, stored)
    full = to_out_in(self.tensor(key), conv1d=self.arch.spec.conv1d)
    expected = self.arch.stored_shape(stored)
    if tuple(full.shape) != expected:
      raise CrossLoraError(
          f"{self._where(key)}: shape expected {expected} (out, in) from config.json, got {tuple(full.shape)}. "
          "The weights do not match their config.")
    return full[rows]

  def _where(self, key: str) -> str:
    return key

  def check_layout(self, *, require_all: bool) -> None:
    """Checks the stored shape of every layer's linear weights against the config, before any work.

    Reads shapes only (safetensors headers), so a checkpoint that does not match its
    config.json is refused up front, naming the first bad key. ``require_all``: a
    missing key is an error too (a folder must be complete; a dict may hold a subset).
    """
    problems = []
    for layer in range(self.arch.num_layers):
      for stored in self.arch.spec.stored:
        key = self.arch.weight_key(layer, stored)
        expected = self.arch.stored_shape(stored)
        if not self.has(key):
          if require_all:
            problems.append(f"{self._where(key)}: tensor expected ({self.arch.model_type} with "
                            f"{self.arch.num_layers} layers per config.json), got no such key")
          continue
        got = tuple(self.shape(key))
        got = got[::-1] if self.arch.spec.conv1d else got
        if got != expected:
          problems.append(f"{self._where(key)}: shape expected {expected} (out, in) from config.json, got {got}")
    if problems:
      raise CrossLoraError(problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
                           + ". The weights do not match their config.")


class Checkpoint(_WeightMixin):
  """An HF model folder, read lazily."""

  def __init__(self, path: str | os.PathLike[str]):
    self.path = pathlib.Path(hub.resolve_folder(path, kind="model"))  # a folder, or a Hub id from the HF cache
    if not self.path.is_dir():
      raise CrossLoraError(f"{self.path}: model folder expected, got {'a file' if self.path.exists() else 'nothing'}. "
                           "Pass the folder holding config.json and *.safetensors.")
    self.config = read_json(self.path / "config.json", "config.json")
    self._files = self._find_files()
    self._handles: dict[pathlib.Path, Any] = {}
    self._key_to_file: dict[str, pathlib.Path] = {}
    for file in sorted(set(self._files.values()) if self._files else []):
      for key in self._open(file).keys():
        self._key_to_file[key] = file
    if self._index_map is not None:
      missing = [k for k, f in self._index_map.items() if k not in self._key_to_file]
      if missing:
        raise CrossLoraError(f"{self.path / INDEX_FILE}: weight_map names {missing[0]!r}, which its shard does not hold. Re-download the checkpoint.")
    self.arch = Architecture.from_config(self.config, self._key_to_file, source=str(self.path / "config.json"))
    self.name = hub.repo_id_of(self.path) or str(self.config.get("_name_or_path") or self.path.resolve())
    self.check_layout(require_all=True)

  def _find_files(self) -> dict[str, pathlib.Path]:
    self._index_map = None
    index = self.path / INDEX_FILE
    if index.exists():
      weight_map = read_json(index, INDEX_FILE).get("weight_map")
      if not isinstance(weight_map, dict) or not weight_map:
        raise CrossLoraError(f"{index}: weight_map expected (tensor -> shard file), got {weight_map!r}. Re-download the checkpoint.")
      self._index_map = weight_map
      files = {}
      for key, name in weight_map.items():
        file = self.path / name
        if not file.is_file():
          raise CrossLoraError(f"{index}: shard {name!r} (holding {key!r}) expected, got no such file. Re-download the missing shard.")
        files[key] = file
      return files
    single = self.path / SINGLE_FILE
    if single.is_file():
      return {"": single}
    others = sorted(self.path.glob("*.safetensors"))
    if others:
      return {str(f): f for f in others}
    hint = " (found pytorch_model.bin: convert it with transformers' save_pretrained(safe_serialization=True))" if (
        self.path / "pytorch_model.bin").exists() else ""
    raise CrossLoraError(f"{self.path}: {SINGLE_FILE} or {INDEX_FILE} expected, got neither{hint}.")

  def _open(self, file: pathlib.Path) -> Any:
    """A handle kept for the header (keys, shapes); tensors are read through :meth:`_safe_open`."""
    handle = self._handles.get(file)
    if handle is None:
      handle = self._handles[file] = self._safe_open(file)
    return handle

  @staticmethod
  def _safe_open(file: pathlib.Path) -> Any:
    try:
      return safe_open(str(file), framework="np")
    except Exception as e:  # safetensors raises its own error types for bad headers
      raise CrossLoraError(f"{file}: a readable safetensors file expected, got {type(e).__name__}: {e}. "
                           "The file is truncated or corrupt; re-download or re-convert it.") from None

  def _where(self, key: str) -> str:
    return f"{self._key_to_file.get(key, self.path)}: {key}"

  def keys(self) -> list[str]:
    return list(self._key_to_file)

  def has(self, key: str) -> bool:
    return key in self._key_to_file

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self._open(self._key_to_file[key]).get_slice(key).get_shape())

  def tensor(self, key: str) -> np.ndarray:
    """One tensor in its stored dtype (bf16 comes back as ml_dtypes.bfloat16)."""
    file = self._key_to_file.get(key)
    if file is None:
      raise CrossLoraError(f"{self.path}: tensor {key!r} expected, got no such key. "
                           f"Is this a {self.arch.spec.name} checkpoint with {self.arch.num_layers} layers?")
    # A handle of its own, closed right after: a cached handle keeps every page it has read
    # mapped, and the process's RSS then grows by the whole checkpoint (measured: 5.6 GB of
    # file-backed RSS after reading the 5.3 GB paper-scale target; 95 MB anonymous).
    with self._safe_open(file) as handle:
      try:
        array = handle.get_tensor(key)
      except Exception as e:
        raise CrossLoraError(f"{file}: {key}: readable tensor data expected, got {type(e).__name__}: {e}. "
                             "The file is truncated or corrupt; re-download it.") from None
    check_finite(array, f"{file}: {key}")
    return array

  def fingerprint(self) -> str:
    """Content identity for caches: config plus name, size and mtime of every weight file."""
    parts = [json.dumps(self.config, sort_keys=True)]
    for file in sorted(set(self._key_to_file.values())):
      st = file.stat()
      parts.append(f"{file.name}:{st.st_size}:{st.st_mtime_ns}")
    return "\n".join(parts)


class DictWeights(_WeightMixin):
  """Base weights held in memory: HF key -> array (numpy or JAX), stored orientation."""

  def __init__(self, config: Mapping[str, Any], weights: Mapping[str, Any], name: str = "in-memory"):
    self.config = dict(config)
    self._weights = weights
    self.arch = Architecture.from_config(self.config, weights.keys(), source=f"{name} config")
    self.name = name
    self.check_layout(require_all=False)

  def has(self, key: str) -> bool:
    return key in self._weights

  def keys(self) -> list[str]:
    return list(self._weights)

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(np.shape(self._weights[key]))

  def tensor(self, key: str) -> np.ndarray:
    if key not in self._weights:
      raise CrossLoraError(f"{self.name}: tensor {key!r} expected, got no such key.")
    array = np.asarray(self._weights[key])
    check_finite(array, f"{self.name}: {key}")
    return array

  def fingerprint(self) -> str:
    import hashlib
    h = hashlib.sha256(json.dumps(self.config, sort_keys=True).encode())
    for key in sorted(self._weights):
      a = np.ascontiguousarray(np.asarray(self._weights[key]))
      h.update(key.encode()); h.update(str(a.dtype).encode()); h.update(a.tobytes())
    return h.hexdigest()


def open_base(model: str | os.PathLike[str] | BaseWeights) -> BaseWeights:
  """A folder path -> Checkpoint; anything already BaseWeights-like passes through."""
  if isinstance(model, (str, os.PathLike)):
    return Checkpoint(model)
  return model
