"""LoRA as PEFT applies it: y = W x + b + scaling · B (A x), factors as a differentiable pytree.

``LoraParams`` is a plain dict ``{module_path: {"a": (r, in) float32, "b": (out, r) float32}}``
keyed by the PEFT module path (``model.layers.3.self_attn.q_proj``; fused Phi-3
``qkv_proj`` and GPT-2 Conv1D ``attn.c_attn`` included), in torch (out, in)
orientation whatever the base stores (PEFT's lora_A/lora_B are nn.Linear on
Conv1D too; fan_in_fan_out only concerns the base weight). :class:`LoraSpec`
holds the static part (ranks, alphas, rsLoRA, targets) and computes every
module's scaling with ``formats.peft_format``'s own rank/alpha pattern logic.
Dropout is an inference no-op and is not modelled.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from crosslora_jax.errors import CrossLoraError
from crosslora_jax.formats import peft_format
from crosslora_jax.lm.config import LMConfig

LoraParams = dict  # {module_path: {"a": (r, in), "b": (out, r)}}
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  """Static LoRA settings (hashable: a jit static argument), as in PEFT's LoraConfig."""

  r: int = 8
  alpha: float = 8.0
  rslora: bool = False
  target_modules: tuple[str, ...] | str = DEFAULT_TARGETS  # names, or one regex over module paths
  rank_pattern: tuple[tuple[str, int], ...] = ()
  alpha_pattern: tuple[tuple[str, float], ...] = ()
  layers_to_transform: tuple[int, ...] | None = None
  fan_in_fan_out: bool = False  # GPT-2 Conv1D bases: written into adapter_config.json

  def __post_init__(self):
    if not isinstance(self.r, int) or self.r <= 0:
      raise CrossLoraError(f"LoraSpec.r: a positive integer expected, got {self.r!r}.")
    if not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
      raise CrossLoraError(f"LoraSpec.alpha: a positive number expected, got {self.alpha!r}.")
    if isinstance(self.target_modules, list):
      object.__setattr__(self, "target_modules", tuple(self.target_modules))
    for field in ("rank_pattern", "alpha_pattern"):
      value = getattr(self, field)
      if isinstance(value, Mapping):
        object.__setattr__(self, field, tuple(value.items()))

  def peft_config(self) -> dict[str, Any]:
    """The adapter_config.json fields that decide targets, ranks and scalings."""
    targets = self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules)
    layers = None if self.layers_to_transform is None else list(self.layers_to_transform)
    return {"r": self.r, "lora_alpha": self.alpha, "use_rslora": self.rslora, "target_modules": targets,
            "rank_pattern": dict(self.rank_pattern), "alpha_pattern": dict(self.alpha_pattern),
            "layers_to_transform": layers}

  def rank(self, module_path: str) -> int:
    return peft_format.module_rank(self.peft_config(), module_path)

  def scaling(self, module_path: str) -> float:
    config = self.peft_config()
    alpha = peft_format.module_alpha(config, module_path)
    return peft_format.lora_scaling(alpha, self.rank(module_path), rslora=self.rslora)

  def module_paths(self, cfg: LMConfig) -> tuple[str, ...]:
    """Every module path of ``cfg``'s model that PEFT would put a LoRA on."""
    config = self.peft_config()
    arch = cfg.arch
    return tuple(path for layer in range(cfg.layers) for stored in arch.spec.stored
                 if peft_format.targets_module(config, path := arch.module_path(layer, stored)))

  @classmethod
  def from_peft_config(cls, config: Mapping[str, Any], *, fan_in_fan_out: bool = False) -> "LoraSpec":
    targets = config.get("target_modules")
    layers = config.get("layers_to_transform")
    return cls(
        r=int(config.get("r", 8)), alpha=float(config.get("lora_alpha", 8)),
        rslora=bool(config.get("use_rslora", False)),
        target_modules=targets if isinstance(targets, str) else tuple(targets or ()),
        rank_pattern=tuple((config.get("rank_pattern") or {}).items()),
        alpha_pattern=tuple((config.get("alpha_pattern") or {}).items()),
        layers_to_transform=None if layers is None else tuple([layers] if isinstance(layers, int) else layers),
        fan_in_fan_out=fan_in_fan_out)


def _check_module(cfg: LMConfig, path: str, a_shape: tuple[int, ...], b_shape: tuple[int, ...], where: str) -> None:
  parsed = cfg.arch.parse_module_path(path)
  if parsed is None or parsed[0] >= cfg.layers:
    raise CrossLoraError(f"{where}: {path}: a linear module of the {cfg.family} model expected "
                         f"(like {cfg.arch.module_path(0, cfg.arch.spec.stored[0])}), got a path it does not have. "
                         "Use an adapter trained on this base model.")
  out_dim, in_dim = cfg.arch.stored_shape(parsed[1])
  if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[1] != in_dim or b_shape[0] != out_dim or a_shape[0] != b_shape[1]:
    raise CrossLoraError(f"{where}: {path}: lora_A (r, {in_dim}) and lora_B ({out_dim}, r) expected, "
                         f"got {tuple(a_shape)} and {tuple(b_shape)}. Use an adapter trained on this base model.")


def lora_from_peft(adapter: peft_format.PeftAdapter, cfg: LMConfig) -> tuple[LoraParams, LoraSpec]:
  """A PeftAdapter (``formats.peft_format.read_adapter``) -> float32 factors and their spec."""
  spec = LoraSpec.from_peft_config(adapter.config, fan_in_fan_out=cfg.arch.spec.conv1d)
  where = str(adapter.path) if adapter.path is not None else adapter.name
  lora: LoraParams = {}
  for path, pair in sorted(adapter.modules.items()):
    _check_module(cfg, path, pair.a_ri.shape, pair.b_or.shape, where)
    lora[path] = {"a": jnp.asarray(np.asarray(pair.a_ri, np.float32)),
                  "b": jnp.asarray(np.asarray(pair.b_or, np.float32))}
  return lora, spec


def lora_to_peft(lora: LoraParams, spec: LoraSpec, *, base_model_name_or_path: str = "",
                 cfg: LMConfig | None = None, dtype: Any = np.float32) -> peft_format.PeftAdapter:
  """Factors -> a PeftAdapter; write it with ``formats.adapter_io.save_adapter`` (atomic, verified).

  ``cfg`` (the base's) sets fan_in_fan_out for Conv1D bases; without it ``spec.fan_in_fan_out`` does.
  """
  fan_in_fan_out = cfg.arch.spec.conv1d if cfg is not None else spec.fan_in_fan_out
  config = {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
      "bias": "none", "lora_dropout": 0.0, "fan_in_fan_out": fan_in_fan_out, "inference_mode": True,
      "init_lora_weights": True, "use_dora": False, "modules_to_save": None, "layers_pattern": None,
      "exclude_modules": None, **spec.peft_config()}
  modules = {path: peft_format.LoraPair(np.asarray(f["a"]).astype(dtype), np.asarray(f["b"]).astype(dtype))
             for path, f in sorted(lora.items())}
  return peft_format.PeftAdapter(config, modules)


def init_lora(cfg: LMConfig, spec: LoraSpec, key: jax.Array) -> LoraParams:
  """PEFT's default init on every targeted module: A ~ U(±1/√in) (kaiming_uniform a=√5), B = 0."""
  paths = spec.module_paths(cfg)
  if not paths:
    raise CrossLoraError(f"target_modules: names of {cfg.family} modules expected "
                         f"({', '.join(sorted({s.name for s in cfg.arch.spec.stored}))}), got {spec.target_modules!r}.")
  lora: LoraParams = {}
  for path, subkey in zip(paths, jax.random.split(key, len(paths))):
    _, stored = cfg.arch.parse_module_path(path)
    out_dim, in_dim = cfg.arch.stored_shape(stored)
    rank = spec.rank(path)
    bound = 1.0 / math.sqrt(in_dim)
    lora[path] = {"a": jax.random.uniform(subkey, (rank, in_dim), jnp.float32, -bound, bound),
                  "b": jnp.zeros((out_dim, rank), jnp.float32)}
  return lora


def stack_lora(lora: LoraParams | None, spec: LoraSpec | None, cfg: LMConfig) -> dict[str, dict[str, Any]]:
  """Per stored module with any LoRA: {"a": (L, r_max, in), "b": (L, out, r_max), "scale": (L,)}.

  Ranks differ between modules under rank_pattern; zero-padding every layer to the
  largest rank changes no product (the padded rows of A meet zero columns of B),
  and a layer without a LoRA gets zeros, so the layer scan sees one shape.
  """
  if not lora:
    return {}
  if spec is None:
    raise CrossLoraError("spec: a LoraSpec expected alongside LoRA factors, got None.")
  by_stored: dict[str, dict[int, tuple[str, Any]]] = {}
  for path, factors in lora.items():
    parsed = cfg.arch.parse_module_path(path)
    if parsed is None:
      raise CrossLoraError(f"lora: {path}: a module path of the {cfg.family} model expected, got one it does not have.")
    by_stored.setdefault(parsed[1].path, {})[parsed[0]] = (path, factors)
  out = {}
  for stored in cfg.arch.spec.stored:
    entries = by_stored.get(stored.path)
    if not entries:
      continue
    out_dim, in_dim = cfg.arch.stored_shape(stored)
    r_max = max(f["a"].shape[0] for _, f in entries.values())
    a_rows, b_cols, scales = [], [], np.zeros((cfg.layers,), np.float32)
    for layer in range(cfg.layers):
      if layer not in entries:
        a_rows.append(jnp.zeros((r_max, in_dim), jnp.float32))
        b_cols.append(jnp.zeros((out_dim, r_max), jnp.float32))
        continue
      path, f = entries[layer]
      pad = r_max - f["a"].shape[0]
      a_rows.append(jnp.pad(f["a"].astype(jnp.float32), ((0, pad), (0, 0))))
      b_cols.append(jnp.pad(f["b"].astype(jnp.float32), ((0, 0), (0, pad))))
      scales[layer] = spec.scaling(path)
    out[stored.path] = {"a": jnp.stack(a_rows), "b": jnp.stack(b_cols), "scale": jnp.asarray(scales)}
  return out
