"""The PEFT LoRA adapter format: the only module that parses or formats adapter keys.

On disk an adapter is ``adapter_config.json`` + ``adapter_model.safetensors``
(metadata ``{"format": "pt"}``), keys like
``base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`` holding
``lora_A`` (r, in) and ``lora_B`` (out, r). Here an adapter is a
:class:`PeftAdapter`: the config dict plus, per *module path* (the key of the
adapted nn.Linear inside the base model, ``model.layers.3.self_attn.q_proj``),
a :class:`LoraPair`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import ml_dtypes  # noqa: F401  (bfloat16 for numpy)
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from crosslora_jax.formats import jsonfile, safefiles
from crosslora_jax.formats.checkpoint import check_finite, check_safetensors_header
from crosslora_jax.formats.peft_config import check_config
from crosslora_jax.errors import CrossLoraError
from crosslora_jax import hub

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
LEGACY_WEIGHTS_FILE = "adapter_model.bin"
KEY_PREFIX = "base_model.model."
# Exactly the keys PEFT's set_peft_model_state_dict maps onto a LoRA layer for any adapter name
# (tuners_utils._remap_adapter_state_dict_for_load): "lora_A.weight". A "lora_A.<name>.weight"
# passes through unchanged, so it loads only under adapter name <name>, onto the same
# parameter as "lora_A.weight": ambiguous, refused.
_KEY_RE = re.compile(r"^base_model\.model\.(?P<path>.+)\.(?P<factor>lora_A|lora_B)\.weight$")
_NAMED_KEY_RE = re.compile(r"^base_model\.model\.(?P<path>.+)\.(?P<factor>lora_A|lora_B)\.[^.]+\.weight$")
# A module path PEFT can find with named_modules(): attribute names and ModuleList indices
# as torch writes them ("0", "12"; never "00", "+1" or non-ASCII digits).
MAX_KEY_LENGTH = 200  # real keys are < 100 characters; it also bounds the cost of config regexes
_PATH_PART = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|0|[1-9][0-9]*")
# Tensors PEFT may save that are not a plain LoRA update, and why we cannot move them.
_UNSUPPORTED = (
    ("lora_magnitude_vector", "DoRA magnitude vectors (use_dora) rescale the base weight's columns and have no cross-model counterpart"),
    ("lora_embedding_A", "embedding LoRA lives in token space, which differs between models"),
    ("lora_embedding_B", "embedding LoRA lives in token space, which differs between models"),
    ("modules_to_save", "modules_to_save holds full copies of base weights, which belong to the source model"),
    ("lora_B.bias", "lora_bias adds a bias vector in the source's output space"),
)
DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


class LoraPair(NamedTuple):
  """One adapted module: ΔW = scaling · B A."""

  a_ri: np.ndarray  # lora_A, (rank, in)
  b_or: np.ndarray  # lora_B, (out, rank)


@dataclasses.dataclass
class PeftAdapter:
  """An adapter in memory: PEFT config dict + LoRA pairs by module path."""

  config: dict[str, Any]
  modules: dict[str, LoraPair]
  path: pathlib.Path | None = None
  skipped: list[dict[str, str]] = dataclasses.field(default_factory=list)  # unsupported tensors skipped on read

  @property
  def name(self) -> str:
    return (hub.repo_id_of(self.path) or self.path.name) if self.path is not None else "adapter"

  @property
  def dtype(self) -> np.dtype:
    first = next(iter(self.modules.values()))
    return first.a_ri.dtype

  def rank(self, module_path: str) -> int:
    return self.modules[module_path].a_ri.shape[0]

  def alpha(self, module_path: str) -> float:
    return module_alpha(self.config, module_path)

  def scaling(self, module_path: str) -> float:
    return lora_scaling(self.alpha(module_path), self.rank(module_path), rslora=bool(self.config.get("use_rslora")))


def pattern_value(patterns: Mapping[str, Any] | None, module_path: str, default: Any) -> Any:
  """PEFT's rank_pattern/alpha_pattern lookup: first regex key matching the path's end wins."""
  for key, value in (patterns or {}).items():
    if re.match(rf"(.*\.)?({key})$", module_path):
      return value
  return default


def module_rank(config: Mapping[str, Any], module_path: str) -> int:
  return int(pattern_value(config.get("rank_pattern"), module_path, config.get("r", 8)))


def module_alpha(config: Mapping[str, Any], module_path: str) -> float:
  return float(pattern_value(config.get("alpha_pattern"), module_path, config.get("lora_alpha", 8)))


def lora_scaling(alpha: float, rank: int, *, rslora: bool) -> float:
  """PEFT's scaling: alpha / r, or alpha / √r with use_rslora."""
  return alpha / math.sqrt(rank) if rslora else alpha / rank


def alpha_for_scaling(scaling: float, rank: int, *, rslora: bool) -> float:
  """Inverse of lora_scaling: the alpha that gives ``scaling`` at ``rank``."""
  alpha = scaling * (math.sqrt(rank) if rslora else rank)
  return float(round(alpha)) if abs(alpha - round(alpha)) < 1e-9 else alpha


def targets_module(config: Mapping[str, Any], module_path: str) -> bool:
  """Whether PEFT would put a LoRA on ``module_path`` given target_modules & co."""
  target = config.get("target_modules")
  exclude = config.get("exclude_modules")
  if isinstance(exclude, str) and re.fullmatch(exclude, module_path):
    return False
  if isinstance(exclude, list) and any(module_path == e or module_path.endswith("." + e) for e in exclude):
    return False
  if target is None:
    return False
  if isinstance(target, str):
    return bool(re.fullmatch(target, module_path)) or target == "all-linear"
  if module_path in target:
    return True
  if not any(module_path.endswith("." + t) for t in target):
    return False
  layers = config.get("layers_to_transform")
  if layers is None:
    return True
  layers = [layers] if isinstance(layers, int) else list(layers)
  found = re.search(r"\.(\d+)\.", module_path)
  return found is not None and int(found.group(1)) in layers


def _unsupported_reason(key: str, config: Mapping[str, Any]) -> str | None:
  """Why ``key`` is not a plain LoRA factor that can be moved (None: it is one)."""
  reason = next((why for marker, why in _UNSUPPORTED if marker in key), None)
  if reason is not None:
    return reason
  saved = config.get("modules_to_save") or []
  module = key[len(KEY_PREFIX):] if key.startswith(KEY_PREFIX) else key
  module = module.rsplit(".", 1)[0]  # drop .weight / .bias
  if any(module == m or module.endswith("." + m) for m in saved if isinstance(m, str)):
    return dict(_UNSUPPORTED)["modules_to_save"]
  if key.endswith(".base_layer.weight"):
    return _BASE_COPY
  if _NAMED_KEY_RE.match(key) is not None and _KEY_RE.match(key) is None:
    return _NAMED
  if _KEY_RE.match(key) is None:
    return _NOT_LORA
  return None


_BASE_COPY = "a full copy of a base weight (saved with embedding LoRA), which belongs to the source model"
_NAMED = ("an adapter name inside the key (lora_A.<name>.weight): PEFT loads it only when the adapter is loaded "
          "under that name, and then onto the same parameter as lora_A.weight, so which tensor is meant is ambiguous")
_NOT_LORA = "not a LoRA factor (expected base_model.model.<module>.lora_A.weight / lora_B.weight)"
_REASON_ORDER = [why for _, why in _UNSUPPORTED] + [_BASE_COPY, _NAMED, _NOT_LORA]  # most specific first


def _check_module_paths(keys: list[str], file: pathlib.Path) -> None:
  """Refuses a key whose module path PEFT would look up as another module than the one we would read.

  PEFT matches module paths as strings (``layers.00`` is no module of any model and is
  ignored), while an integer parse would fold it into ``layers.0``: refuse instead.
  """
  for key in keys:
    match = _KEY_RE.match(key)
    if match is None:
      continue
    if len(key) > MAX_KEY_LENGTH:
      raise CrossLoraError(f"{file}: {key[:80]}...: a key of at most {MAX_KEY_LENGTH} characters expected, got "
                           f"{len(key)}. No model has module paths that long; fix the key names.")
    bad = [p for p in match.group("path").split(".") if not _PATH_PART.fullmatch(p)]
    if bad:
      raise CrossLoraError(f"{file}: {key}: a module path of attribute names and plain indices expected, got "
                           f"{bad[0]!r}, which PEFT would look up as a module of that exact name (no model has "
                           "one) and ignore. Fix the key names.")


def read_adapter(path: str | os.PathLike[str], *, skip_unsupported: bool = False) -> PeftAdapter:
  """Reads a PEFT LoRA folder; refuses what is not a plain LoRA unless ``skip_unsupported``."""
  path = pathlib.Path(hub.resolve_folder(path, kind="adapter"))  # a folder, or a Hub id from the HF cache
  if not path.is_dir():
    raise CrossLoraError(f"{path}: adapter folder expected, got {'a file' if path.exists() else 'nothing'}. "
                         f"Pass the folder holding {CONFIG_FILE}.")
  config = jsonfile.read_object(path / CONFIG_FILE, CONFIG_FILE)
  check_config(config, path / CONFIG_FILE)
  tensors = _read_tensors(path)
  _check_module_paths(sorted(tensors), path / WEIGHTS_FILE)
  factors: dict[str, dict[str, np.ndarray]] = {}
  skipped: list[dict[str, str]] = []
  reasons = {key: _unsupported_reason(key, config) for key in sorted(tensors)}
  refused = [key for key, why in reasons.items() if why is not None]
  if refused and not skip_unsupported:
    # Name a specific kind (DoRA, embedding, ...) before a merely unrecognised key.
    key = min(refused, key=lambda k: (_REASON_ORDER.index(reasons[k]), k))
    raise CrossLoraError(f"{path / WEIGHTS_FILE}: {key}: a plain LoRA factor expected, got {reasons[key]}. "
                         "Pass --skip_unsupported to drop such tensors (they are listed in the report).")
  for key, reason in reasons.items():
    if reason is not None:
      skipped.append({"key": key, "reason": reason})
      continue
    match = _KEY_RE.match(key)
    factors.setdefault(match.group("path"), {})[match.group("factor")] = tensors[key]
  modules: dict[str, LoraPair] = {}
  problems = []
  for module, pair in sorted(factors.items()):
    if set(pair) != {"lora_A", "lora_B"}:
      missing = ({"lora_A", "lora_B"} - set(pair)).pop()
      problems.append(f"{path / WEIGHTS_FILE}: {KEY_PREFIX}{module}.{missing}.weight expected beside its twin, got none")
      continue
    a, b = pair["lora_A"], pair["lora_B"]
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
      problems.append(f"{path / WEIGHTS_FILE}: {KEY_PREFIX}{module}: lora_A (r, in) and lora_B (out, r) with equal r "
                      f"expected, got {a.shape} and {b.shape}")
      continue
    if not targets_module(config, module):
      problems.append(f"{path / WEIGHTS_FILE}: {KEY_PREFIX}{module}: a module matched by target_modules "
                      f"{config.get('target_modules')!r} expected, got a LoRA key that matches none. Fix adapter_config.json")
      continue
    rank = module_rank(config, module)
    if rank != a.shape[0]:
      problems.append(f"{path / WEIGHTS_FILE}: {KEY_PREFIX}{module}: rank {rank} expected from r/rank_pattern, "
                      f"got {a.shape[0]}. Fix rank_pattern in adapter_config.json")
      continue
    modules[module] = LoraPair(a, b)
  if problems:
    raise CrossLoraError(problems[0] + (f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else "") + ".")
  if not modules:
    raise CrossLoraError(f"{path / WEIGHTS_FILE}: LoRA factors expected, got none. Is this a LoRA adapter?")
  return PeftAdapter(config, modules, path, skipped)


def _read_tensors(path: pathlib.Path) -> dict[str, np.ndarray]:
  file = path / WEIGHTS_FILE
  if file.exists() or file.is_symlink():
    check_safetensors_header(file)
    try:
      with safe_open(str(file), framework="np") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
      raise CrossLoraError(f"{file}: a readable safetensors file expected, got {type(e).__name__}: {e}. "
                           "The file is truncated or corrupt; save the adapter again.") from None
  elif (path / LEGACY_WEIGHTS_FILE).exists():
    safefiles.regular_file(path / LEGACY_WEIGHTS_FILE, LEGACY_WEIGHTS_FILE)
    tensors = _read_legacy(path / LEGACY_WEIGHTS_FILE)
  else:
    raise CrossLoraError(f"{path}: {WEIGHTS_FILE} expected, got no such file. Save the adapter with PEFT's save_pretrained.")
  for key, array in tensors.items():
    if array.dtype not in [np.dtype(d) for d in DTYPES.values()]:
      raise CrossLoraError(f"{file}: {key}: dtype expected one of {', '.join(DTYPES)}, got {array.dtype}. "
                           "Save the adapter in float32, float16 or bfloat16.")
    check_finite(array, f"{file}: {key}")
  return tensors


def _read_legacy(file: pathlib.Path) -> dict[str, np.ndarray]:
  try:
    import torch
  except ImportError:
    raise CrossLoraError(f"{file}: {WEIGHTS_FILE} expected (a legacy .bin needs torch, which is not installed). "
                         "Re-save the adapter with safe_serialization=True, or pip install torch.") from None
  try:
    state = torch.load(str(file), map_location="cpu", weights_only=True)
  except Exception as e:
    raise CrossLoraError(f"{file}: a readable torch state dict expected, got {type(e).__name__}: {e}.") from None
  if not isinstance(state, Mapping):
    raise CrossLoraError(f"{file}: a state dict (tensor name -> tensor) expected, got {type(state).__name__}. "
                         f"Re-save the adapter with PEFT's save_pretrained.")
  out = {}
  for key, t in state.items():
    if not isinstance(key, str) or not isinstance(t, torch.Tensor):
      raise CrossLoraError(f"{file}: {key!r}: a tensor under a string key expected, got {type(t).__name__}. "
                           f"Re-save the adapter with PEFT's save_pretrained.")
    if t.dtype.is_complex or not t.dtype.is_floating_point:
      raise CrossLoraError(f"{file}: {key}: dtype expected one of {', '.join(DTYPES)}, got {t.dtype}. "
                           "Save the adapter in float32, float16 or bfloat16.")
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
      out[key] = t.float().numpy().astype(ml_dtypes.bfloat16)
    else:
      out[key] = t.numpy()
  return out


def lora_key(module_path: str, factor: str) -> str:
  """``model.layers.0.self_attn.q_proj``, ``"A"`` -> the saved PEFT key."""
  return f"{KEY_PREFIX}{module_path}.lora_{factor}.weight"


def adapter_tensors(adapter: PeftAdapter, dtype: Any | None = None) -> dict[str, np.ndarray]:
  """The flat safetensors dict of an adapter, cast to ``dtype`` (default: as held)."""
  out = {}
  for module, pair in sorted(adapter.modules.items()):
    for factor, array in (("A", pair.a_ri), ("B", pair.b_or)):
      array = np.asarray(array)
      out[lora_key(module, factor)] = np.ascontiguousarray(array.astype(dtype) if dtype is not None else array)
  return out


def write_adapter_files(adapter: PeftAdapter, folder: pathlib.Path, dtype: Any | None = None) -> None:
  """Writes adapter_config.json and adapter_model.safetensors into an existing folder."""
  file = folder / WEIGHTS_FILE
  try:
    save_file(adapter_tensors(adapter, dtype), str(file), metadata={"format": "pt"})
  except Exception as e:  # safetensors wraps I/O errors in its own type: give back an OSError
    found = re.search(r"os error (\d+)", str(e))
    if found is None:
      raise
    code = int(found.group(1))
    raise OSError(code, os.strerror(code), str(file)) from None
  (folder / CONFIG_FILE).write_text(json.dumps(adapter.config, indent=2, sort_keys=True) + "\n")


def build_config(base: Mapping[str, Any], *, base_model: str, ranks: Mapping[str, int],
                 alphas: Mapping[str, float], all_paths_by_name: Mapping[str, set[str]],
                 fan_in_fan_out: bool) -> dict[str, Any]:
  """An adapter_config.json for the written modules, deriving r/alpha patterns from them.

  ``ranks``/``alphas`` map every written module path to its rank/alpha;
  ``all_paths_by_name`` maps each short module name (q_proj) to every module path
  of that name in the target model, so that a short-name target_modules list is
  used only when it selects exactly the written modules.
  """
  config = {k: v for k, v in base.items() if k not in ("rank_pattern", "alpha_pattern")}
  written = sorted(ranks)
  names = sorted({p.rsplit(".", 1)[-1] for p in written})
  covered = set().union(*(all_paths_by_name.get(n, set()) for n in names))
  if covered == set(written):
    config["target_modules"] = names
  else:
    config["target_modules"] = "(" + "|".join(re.escape(p) for p in written) + ")"
  default_r = _most_common([ranks[p] for p in written])
  default_alpha = _most_common([alphas[p] for p in written if ranks[p] == default_r])
  config.update(
      base_model_name_or_path=base_model,
      r=default_r,
      lora_alpha=default_alpha,
      rank_pattern={"^" + re.escape(p): ranks[p] for p in written if ranks[p] != default_r},
      alpha_pattern={"^" + re.escape(p): alphas[p] for p in written if alphas[p] != default_alpha},
      layers_to_transform=None,
      layers_pattern=None,
      exclude_modules=None,
      modules_to_save=None,
      fan_in_fan_out=fan_in_fan_out,
      use_dora=False,
      peft_type="LORA",
      inference_mode=True,
  )
  config.pop("lora_bias", None)
  return config


def _most_common(values: list[Any]) -> Any:
  counts: dict[Any, int] = {}
  for v in values:
    counts[v] = counts.get(v, 0) + 1
  return max(counts, key=lambda v: (counts[v], -values.index(v)))
