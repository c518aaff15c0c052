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
import re
from collections.abc import Mapping
from typing import Any, Protocol

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy before safetensors reads it)
import numpy as np
from safetensors import safe_open

from crosslora_jax.formats import jsonfile, safefiles
from crosslora_jax.formats.architectures import Architecture, to_out_in
from crosslora_jax.errors import CrossLoraError
from crosslora_jax import hub

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit on the JSON header
# safetensors dtype names: what a base weight may be stored as, and why the rest is refused.
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
_DTYPE_FIX = {
    "F8": "float8 weights are not supported: convert the checkpoint to bfloat16 first "
          "(load it with transformers and save_pretrained with torch_dtype=torch.bfloat16)",
    "I": "integer weights are quantized (they need their scales): use the unquantized float checkpoint",
    "U": "integer weights are quantized (they need their scales): use the unquantized float checkpoint",
    "BOOL": "boolean tensors are no linear weights: use the unquantized float checkpoint",
    "C": "complex weights have no real-valued LoRA counterpart: use a real float checkpoint",
}


def dtype_problem(dtype: str) -> str | None:
  """Why a base weight stored as safetensors ``dtype`` cannot be used (None: it can)."""
  if dtype in FLOAT_DTYPES:
    return None
  for prefix, fix in _DTYPE_FIX.items():
    if dtype.startswith(prefix):
      return fix
  return "use a checkpoint stored in float16, bfloat16 or float32"


def _numpy_dtype_name(dtype: np.dtype) -> str:
  """numpy dtype -> the safetensors name dtype_problem judges (bfloat16 counts as BF16)."""
  if dtype == ml_dtypes.bfloat16:
    return "BF16"
  kinds = {"f": "F", "i": "I", "u": "U", "b": "BOOL", "c": "C"}
  name = kinds.get(dtype.kind, "other")
  if name == "F" and dtype.itemsize == 1:
    return "F8"
  return name + (str(dtype.itemsize * 8) if name in ("F", "I", "U", "C") else "")


def check_safetensors_header(file: pathlib.Path) -> None:
  """The 8-byte header length must fit the file before safetensors maps it (a regular file)."""
  size = safefiles.regular_file(file, "safetensors file")
  try:
    with open(file, "rb") as f:
      head = f.read(8)
  except OSError as e:
    raise CrossLoraError(f"{file}: a readable safetensors file expected, got {e.strerror or e}.") from None
  length = int.from_bytes(head, "little") if len(head) == 8 else -1
  if length <= 0 or length > MAX_HEADER_BYTES or 8 + length > size:
    raise CrossLoraError(f"{file}: a safetensors header of 1..{min(MAX_HEADER_BYTES, max(size - 8, 0))} bytes expected, "
                         f"got {'a file of ' + str(size) + ' bytes' if length < 0 else str(length) + ' bytes'}. "
                         "The file is truncated or corrupt; re-download or re-convert it.")


def _check_config_shape(config: Mapping[str, Any], where: str) -> None:
  """What would make the architecture reader crash or mislead: quantization, a non-object text_config."""
  jsonfile.optional_object(config, "text_config", where)
  quant = jsonfile.optional_object(config, "quantization_config", where)
  if quant is not None:
    method = quant.get("quant_method", "unknown")
    raise CrossLoraError(f"{where}: an unquantized float checkpoint expected, got quantization_config "
                         f"(quant_method {_short(method)}). Use the original float16/bfloat16 checkpoint.")


def _short(value: Any) -> str:
  text = repr(value)
  return text if len(text) <= 80 else text[:77] + "..."


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
    """Checks the stored shape and dtype of every layer's linear weights against the config, before any work.

    Reads headers only (safetensors), so a checkpoint that does not match its
    config.json is refused up front, naming the first bad key. ``require_all``: a
    missing key is an error too (a folder must be complete; a dict may hold a subset).
    A config claiming more layers than the weights could hold is refused before the
    per-layer loop, so it costs nothing to claim 10**8 of them.
    """
    layers = self._plausible_layers(require_all)
    problems = []
    for layer in range(layers):
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
        why = dtype_problem(self.dtype_name(key))
        if why is not None:
          raise CrossLoraError(f"{self._where(key)}: float16, bfloat16 or float32 expected, got "
                               f"{self.dtype_name(key)}. {why}.")
        if len(problems) > 100:
          break
    if problems:
      raise CrossLoraError(problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
                           + ". The weights do not match their config.")

  def _plausible_layers(self, require_all: bool) -> int:
    """How many layers to check: the config's count, refused when the tensors cannot back it."""
    keys = self.keys()
    per_layer = len(self.arch.spec.stored)
    if require_all and self.arch.num_layers * per_layer > len(keys):
      raise CrossLoraError(
          f"{self._config_source}: at most {len(keys) // max(per_layer, 1)} layers expected from the {len(keys)} "
          f"tensors present, got {self.arch.num_layers} in config.json. Fix num_hidden_layers (or its equivalent).")
    if require_all:
      return self.arch.num_layers
    present = [int(m.group(1)) for k in keys for m in [_LAYER_INDEX.search(k)] if m is not None]
    return min(self.arch.num_layers, max(present, default=-1) + 1)

  def dtype_name(self, key: str) -> str:
    raise NotImplementedError


_LAYER_INDEX = re.compile(r"\.(0|[1-9][0-9]{0,8})\.")


class Checkpoint(_WeightMixin):
  """An HF model folder, read lazily."""

  def __init__(self, path: str | os.PathLike[str]):
    self.path = pathlib.Path(hub.resolve_folder(path, kind="model"))  # a folder, or a Hub id from the HF cache
    if not self.path.is_dir():
      raise CrossLoraError(f"{self.path}: model folder expected, got {'a file' if self.path.exists() else 'nothing'}. "
                           "Pass the folder holding config.json and *.safetensors.")
    self._config_source = str(self.path / "config.json")
    self.config = jsonfile.read_object(self.path / "config.json", "config.json")
    _check_config_shape(self.config, self._config_source)
    self._files = self._find_files()
    self._handles: dict[pathlib.Path, Any] = {}
    self._key_to_file: dict[str, pathlib.Path] = {}
    for file in sorted(set(self._files.values()) if self._files else []):
      for key in self._open(file).keys():
        self._key_to_file[key] = file
    if self._index_map is not None:
      missing = [k for k, f in self._index_map.items() if self._key_to_file.get(k) != f]
      if missing:
        raise CrossLoraError(f"{self.path / INDEX_FILE}: weight_map names {missing[0]!r}, which its shard does not hold. Re-download the checkpoint.")
    self.arch = Architecture.from_config(self.config, self._key_to_file, source=self._config_source)
    self.name = hub.repo_id_of(self.path) or str(self.config.get("_name_or_path") or self.path.resolve())
    self.check_layout(require_all=True)

  def _find_files(self) -> dict[str, pathlib.Path]:
    self._index_map = None
    index = self.path / INDEX_FILE
    if index.exists() or index.is_symlink():
      weight_map = jsonfile.read_object(index, INDEX_FILE).get("weight_map")
      if not isinstance(weight_map, dict) or not weight_map:
        raise CrossLoraError(f"{index}: weight_map expected (tensor -> shard file), got {_short(weight_map)}. Re-download the checkpoint.")
      files = {}
      for key, name in weight_map.items():
        file = safefiles.named_file(self.path, name, f"{index}: weight_map[{key!r}]")
        if not file.exists():
          raise CrossLoraError(f"{index}: shard {name!r} (holding {key!r}) expected, got no such file. Re-download the missing shard.")
        files[key] = file
      for file in set(files.values()):
        safefiles.regular_file(file, "safetensors shard")
      self._index_map = files
      return files
    single = self.path / SINGLE_FILE
    if single.exists() or single.is_symlink():
      safefiles.regular_file(single, SINGLE_FILE)
      return {"": single}
    others = sorted(self.path.glob("*.safetensors"))
    if others:
      for file in others:
        safefiles.regular_file(file, "safetensors file")
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
    check_safetensors_header(file)
    try:
      return safe_open(str(file), framework="np")
    except Exception as e:  # safetensors raises its own error types for bad headers
      raise CrossLoraError(f"{file}: a readable safetensors file expected, got {type(e).__name__}: {e}. "
                           "The file is truncated or corrupt; re-download or re-convert it.") from None

  def dtype_name(self, key: str) -> str:
    return str(self._open(self._key_to_file[key]).get_slice(key).get_dtype())

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
    self._config_source = f"{name} config"
    _check_config_shape(self.config, self._config_source)
    self.arch = Architecture.from_config(self.config, weights.keys(), source=f"{name} config")
    self.name = name
    self.check_layout(require_all=False)

  def has(self, key: str) -> bool:
    return key in self._weights

  def keys(self) -> list[str]:
    return list(self._weights)

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(np.shape(self._weights[key]))

  def dtype_name(self, key: str) -> str:
    return _numpy_dtype_name(np.dtype(self._weights[key].dtype))

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
