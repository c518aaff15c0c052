"""Planning: which source weight feeds which target weight, grouped by module.

Planning is pure Python over shapes and names, separate from execution: it turns
a PEFT adapter into canonical per-(layer, module) factors, maps target layers to
source layers, groups work by canonical module (every q_proj of a model has one
shape, so one module's work stacks into one array), and records every skip with a reason.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from crosslora_jax import methods
from crosslora_jax.errors import CrossLoraError, collect_and_raise
from crosslora_jax.formats import peft_format
from crosslora_jax.formats.architectures import Architecture

METHODS = methods.NAMES  # the --method choices, in the registry's order
LAYER_MAPS = ("auto", "identity", "depth")


@dataclasses.dataclass(frozen=True)
class CanonicalLora:
  """One canonical module's update: ΔW = scaling · b_or @ a_ri (a fused B is split by rows)."""

  a_ri: np.ndarray
  b_or: np.ndarray
  scaling: float
  module_path: str  # where it came from in the adapter


def canonical_factors(adapter: peft_format.PeftAdapter, arch: Architecture,
                      where: str = "adapter") -> dict[tuple[int, str], CanonicalLora]:
  """Splits an adapter into canonical (layer, module) factors, checking shapes against ``arch``."""
  out: dict[tuple[int, str], CanonicalLora] = {}
  unknown, problems = [], []  # a key of another architecture says more than a shape: report it first
  for path, pair in sorted(adapter.modules.items()):
    key = peft_format.lora_key(path, "A")
    parsed = arch.parse_module_path(path)
    if parsed is None:
      unknown.append(f"{where}: {key}: a module of the source model ({arch.model_type}: "
                     f"{', '.join(s.path for s in arch.spec.stored)}) expected, got a LoRA key that matches none"
                     + _other_family_hint(path, arch))
      continue
    layer, stored = parsed
    if layer >= arch.num_layers:
      problems.append(f"{where}: {key}: layer < {arch.num_layers} expected (source num_hidden_layers), got {layer}")
      continue
    out_dim, in_dim = arch.stored_shape(stored)
    if pair.a_ri.shape[1] != in_dim or pair.b_or.shape[0] != out_dim:
      problems.append(
          f"{where}: {key}: lora_A (r, {in_dim}) and lora_B ({out_dim}, r) expected from --source_model, "
          f"got {pair.a_ri.shape} and {pair.b_or.shape}. Was this adapter trained on a different base? "
          "Pass the model it was trained on as --source_model")
      continue
    scaling = adapter.scaling(path)
    for part in stored.parts:
      _, rows = arch.stored_for(part)
      out[(layer, part)] = CanonicalLora(pair.a_ri, pair.b_or[rows], scaling, path)
  collect_and_raise(unknown + problems)
  return out


def _other_family_hint(path: str, arch: Architecture) -> str:
  """' (a phi3 module: ...)' when ``path`` is stored that way by another family (fused vs unfused)."""
  from crosslora_jax.formats.architectures import SPECS
  for spec in SPECS:
    if spec is arch.spec:
      continue
    for stored in spec.stored:
      if path.endswith("." + stored.path) and set(stored.parts) != {
          p for s in arch.spec.stored if s.path == stored.path for p in s.parts}:
        layout = f"fused {'+'.join(stored.parts)}" if len(stored.parts) > 1 else "unfused"
        return (f" ({stored.name} is {spec.name}'s {layout} layout: was the adapter trained on a {spec.name} "
                "model? Pass that model as --source_model)")
  return ""


def layer_map(kind: str, num_source: int, num_target: int) -> list[int | None]:
  """Source layer feeding each target layer (None: no source layer).

  identity: j <- j (extra layers dropped); depth: j <- round(j (L_s - 1) / (L_t - 1)).
  """
  if kind == "auto":
    kind = "identity" if num_source == num_target else "depth"
  if kind == "identity":
    return [j if j < num_source else None for j in range(num_target)]
  if kind == "depth":
    if num_target == 1:
      return [0]
    return [int(np.floor(j * (num_source - 1) / (num_target - 1) + 0.5)) for j in range(num_target)]
  raise CrossLoraError(f"--layer_map: one of {', '.join(LAYER_MAPS)} expected, got {kind!r}.")


@dataclasses.dataclass(frozen=True)
class WorkItem:
  module: str
  target_layer: int
  source_layer: int
  factors: CanonicalLora


@dataclasses.dataclass
class Plan:
  """Everything execution needs, decided before any weight is read."""

  by_module: dict[str, list[WorkItem]]  # canonical module -> items sorted by target layer
  rank: dict[str, int]  # r_eff per module: min(r, m_s, n_s, m_t, n_t)
  layer_map: list[int | None]
  skipped: list[dict[str, Any]]


def make_plan(factors: Mapping[tuple[int, str], CanonicalLora], source: Architecture, target: Architecture, *,
              method: str, rank: int, layer_map_kind: str) -> Plan:
  same_shape = methods.get(method).same_shape
  lmap = layer_map(layer_map_kind, source.num_layers, target.num_layers)
  by_module: dict[str, list[WorkItem]] = {}
  skipped: list[dict[str, Any]] = []
  target_modules = set(target.modules)
  used: set[tuple[int, str]] = set()
  for j, i in enumerate(lmap):
    if i is None:
      continue
    for module in target.modules:
      lora = factors.get((i, module))
      if lora is not None:
        by_module.setdefault(module, []).append(WorkItem(module, j, i, lora))
        used.add((i, module))
  for (i, module), lora in sorted(factors.items()):
    if module not in target_modules:
      skipped.append({"source_key": lora.module_path, "module": module, "source_layer": i,
                      "reason": f"target {target.model_type} has no {module}"})
    elif (i, module) not in used:
      skipped.append({"source_key": lora.module_path, "module": module, "source_layer": i,
                      "reason": f"source layer {i} is not mapped to any target layer ({layer_map_kind} layer map)"})
  if not by_module:
    raise CrossLoraError(
        f"target model ({target.model_type}): modules {', '.join(sorted({m for _, m in factors}))} expected, "
        f"got none that the adapter's target_modules can reach. Choose a target with these modules.")
  problems = []
  ranks = {}
  for module in by_module:
    s_shape, t_shape = source.shape(module), target.shape(module)
    if same_shape and s_shape != t_shape:
      problems.append(f"{module}: equal (out, in) shapes expected by --method {method}, got source {s_shape} "
                      f"and target {t_shape}")
    ranks[module] = min(rank, *s_shape, *t_shape)
  if problems:
    raise CrossLoraError("; ".join(problems) + ". Use --method cross_lora for models of different shapes.")
  for items in by_module.values():
    items.sort(key=lambda w: w.target_layer)
  return Plan(by_module, ranks, lmap, skipped)


def assemble(target: Architecture, results: Mapping[tuple[int, str], tuple[np.ndarray, np.ndarray, float]],
             source_config: Mapping[str, Any], *, base_model: str) -> peft_format.PeftAdapter:
  """Canonical target factors -> a PEFT adapter for ``target``'s stored modules.

  ``results`` maps (layer, module) -> (a_ri, b_or, scaling). A fused stored module
  (Phi-3 qkv_proj) gets A stacked by rows and B block-diagonal, rank = Σ part ranks,
  so ΔW of each part is exact; part scalings are folded into B relative to the first.
  """
  rslora = bool(source_config.get("use_rslora"))
  by_stored: dict[tuple[int, Any], list[str]] = {}
  for (layer, module) in results:
    stored, _ = target.stored_for(module)
    by_stored.setdefault((layer, stored), []).append(module)
  modules: dict[str, peft_format.LoraPair] = {}
  ranks: dict[str, int] = {}
  alphas: dict[str, float] = {}
  for (layer, stored), parts in sorted(by_stored.items(), key=lambda kv: (kv[0][0], kv[0][1].path)):
    parts = [p for p in stored.parts if p in parts]
    path = target.module_path(layer, stored)
    if len(stored.parts) == 1:
      a, b, scaling = results[(layer, parts[0])]
      rank = a.shape[0]
    else:
      scaling = results[(layer, parts[0])][2]
      out_dim, in_dim = target.stored_shape(stored)
      rank = sum(results[(layer, p)][0].shape[0] for p in parts)
      a = np.zeros((rank, in_dim), np.float32)
      b = np.zeros((out_dim, rank), np.float32)
      col = 0
      for p in parts:
        a_p, b_p, s_p = results[(layer, p)]
        k = a_p.shape[0]
        _, rows = target.stored_for(p)
        a[col:col + k] = a_p
        b[rows, col:col + k] = b_p * (s_p / scaling)
        col += k
    modules[path] = peft_format.LoraPair(np.asarray(a, np.float32), np.asarray(b, np.float32))
    ranks[path] = rank
    alphas[path] = peft_format.alpha_for_scaling(scaling, rank, rslora=rslora)
  all_paths: dict[str, set[str]] = {}
  for layer in range(target.num_layers):
    for stored in target.spec.stored:
      all_paths.setdefault(stored.name, set()).add(target.module_path(layer, stored))
  config = peft_format.build_config(source_config, base_model=base_model, ranks=ranks, alphas=alphas,
                                    all_paths_by_name=all_paths, fan_in_fan_out=target.spec.conv1d)
  return peft_format.PeftAdapter(config, modules)
