"""Transfer without files: base weights as mappings (or lazy loaders), LoRA as a pytree.

:func:`transfer` is a thin layer over :func:`crosslora_jax.core.engine.transfer_adapters`,
the function the CLI calls, so both give the same adapter on the same inputs. It
takes the LoRA as a PeftAdapter or a :class:`~crosslora_jax.formats.flax_bridge.LoraTree`
(nnx / qwix / peft layout) and gives it back in the same form, for the target.

For users whose shapes are static, :func:`transfer_factors` (torch orientation)
and :func:`transfer_flax_factors` (Flax orientation) are the per-module maths as
pure functions of arrays: jit them with the options static, vmap them over
stacked layers.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Union

import jax
import jax.numpy as jnp
import numpy as np

from crosslora_jax import methods
from crosslora_jax.core import engine, kernels
from crosslora_jax.formats import flax_bridge, peft_format
from crosslora_jax.formats.checkpoint import BaseWeights, DictWeights
from crosslora_jax.errors import CrossLoraError
from crosslora_jax.core.report import Report

BaseLike = Union[str, os.PathLike, BaseWeights, Mapping[str, Any]]
LoraLike = Union[peft_format.PeftAdapter, flax_bridge.LoraTree, str, os.PathLike]
# Methods whose per-module maths needs the two weights alone (registry order).
FACTOR_METHODS = tuple(name for name, m in methods.REGISTRY.items() if m.project_module is not None)
_DEFAULTS = engine.TransferConfig()  # option defaults are the config's (svd excepted: see transfer_factors)
# The options of transfer_factors / transfer_flax_factors that fix shapes or code paths: static under jit.
STATIC_ARGNAMES = ("rank", "method", "svd", "solver", "n_oversamples", "n_power_iter")


class LazyWeights(Mapping):
  """A read-only mapping HF key → array that calls ``load(key)`` only when a key is read.

  >>> w = LazyWeights(["a.weight"], lambda key: np.zeros((2, 3)))
  >>> list(w), w["a.weight"].shape
  (['a.weight'], (2, 3))
  """

  def __init__(self, keys: Sequence[str], load: Callable[[str], Any]):
    self._keys = list(keys)
    self._known = set(self._keys)
    self._load = load

  def __getitem__(self, key: str) -> Any:
    if key not in self._known:
      raise KeyError(key)
    return self._load(key)

  def __contains__(self, key: object) -> bool:
    return key in self._known

  def __iter__(self) -> Iterator[str]:
    return iter(self._keys)

  def __len__(self) -> int:
    return len(self._keys)


def base_weights(model: BaseLike, config: Mapping[str, Any] | None = None, *, name: str | None = None,
                 role: str = "model") -> BaseWeights | str | os.PathLike:
  """A folder path or BaseWeights as is; a mapping HF key → array (+ its HF config dict) as DictWeights."""
  if isinstance(model, (str, os.PathLike)) or hasattr(model, "arch"):
    if config is not None:
      raise CrossLoraError(f"{role}_config: none expected with a folder or BaseWeights (it has its own config), "
                           f"got one. Drop {role}_config.")
    return model
  if not isinstance(model, Mapping):
    raise CrossLoraError(f"{role}: a folder, BaseWeights or mapping HF key -> array expected, got "
                         f"{type(model).__name__}.")
  if config is None:
    raise CrossLoraError(f"{role}_config: the model's HF config dict (config.json) expected with a mapping of "
                         f"weights, got none. Pass {role}_config=model.config.to_dict() or the parsed config.json.")
  return DictWeights(config, model, name=name or role)


@dataclasses.dataclass
class PytreeResult:
  """One transferred adapter, in the input's form and as PEFT (what the CLI writes)."""

  lora: peft_format.PeftAdapter | flax_bridge.LoraTree  # same form as the input LoRA
  adapter: peft_format.PeftAdapter  # PEFT form, in the output dtype
  report: Report


def output_adapter(result: engine.TransferResult, config: engine.TransferConfig) -> peft_format.PeftAdapter:
  """The engine's float32 adapter cast to the output dtype, as the CLI writes it."""
  dtype = np.dtype(peft_format.DTYPES[config.dtype or result.report.output_dtype])
  modules = {p: peft_format.LoraPair(np.asarray(x.a_ri).astype(dtype), np.asarray(x.b_or).astype(dtype))
             for p, x in result.adapter.modules.items()}
  return peft_format.PeftAdapter(dict(result.adapter.config), modules)


def _tree_options(meta: Mapping[str, Any]) -> dict[str, Any]:
  if meta["layout"] == "nnx":
    return {"lora_path": tuple(meta["lora_path"])}
  if meta["layout"] == "qwix":
    return {"weight": meta["weight"]}
  return {}


def transfer_many(source: BaseLike, target: BaseLike, loras: Sequence[LoraLike], *,
                  config: engine.TransferConfig = engine.TransferConfig(),
                  source_config: Mapping[str, Any] | None = None, target_config: Mapping[str, Any] | None = None,
                  key_map: flax_bridge.KeyMapLike = None, target_key_map: flax_bridge.KeyMapLike = None,
                  progress: engine.Progress | None = None) -> list[PytreeResult]:
  """Several LoRAs at once: base weights are decomposed once for all. See :func:`transfer`."""
  src = base_weights(source, source_config, role="source")
  tgt = base_weights(target, target_config, role="target")
  adapters = []
  for lora in loras:
    if isinstance(lora, flax_bridge.LoraTree):
      adapters.append(flax_bridge.from_tree(lora, key_map=key_map))
    elif isinstance(lora, (peft_format.PeftAdapter, str, os.PathLike)):
      adapters.append(lora)
    else:
      raise CrossLoraError(f"lora: a PeftAdapter, LoraTree or PEFT folder expected, got {type(lora).__name__}. "
                           "Wrap a bare params tree with its meta: flax_bridge.LoraTree(params, meta).")
  results = engine.transfer_adapters(src, tgt, adapters, config, progress=progress)
  out_map = target_key_map if target_key_map is not None else key_map
  outputs = []
  for lora, result in zip(loras, results):
    adapter = output_adapter(result, config)
    if isinstance(lora, flax_bridge.LoraTree):
      form = flax_bridge.to_tree(adapter, layout=lora.layout, key_map=out_map, **_tree_options(lora.meta))
    else:
      form = adapter
    outputs.append(PytreeResult(form, adapter, result.report))
  return outputs


def transfer(source: BaseLike, target: BaseLike, lora: LoraLike, *,
             config: engine.TransferConfig = engine.TransferConfig(),
             source_config: Mapping[str, Any] | None = None, target_config: Mapping[str, Any] | None = None,
             key_map: flax_bridge.KeyMapLike = None, target_key_map: flax_bridge.KeyMapLike = None,
             progress: engine.Progress | None = None) -> PytreeResult:
  """Moves one LoRA from ``source`` to ``target`` base weights; no files needed.

  Args:
    source, target: HF folders, BaseWeights (``Checkpoint``/``DictWeights``), or
      mappings HF key → array in the checkpoint's stored orientation (torch
      (out, in); a lazy :class:`LazyWeights` reads only what the transfer needs),
      each with its HF config dict as ``source_config``/``target_config``.
    lora: a PeftAdapter, a PEFT folder, or a LoraTree (nnx/qwix/peft layout) made
      by :mod:`crosslora_jax.formats.flax_bridge` (its meta says how to read it).
    config: the CLI's options (method, rank, layer_map, svd, seed, dtype …).
    key_map: maps HF module paths to the input tree's paths (default: the tree's meta).
    target_key_map: the same for the output tree (default: ``key_map``, else identity).

  Returns:
    ``PytreeResult(lora, adapter, report)``: ``lora`` in the input's form for the
    target (a LoraTree keeps its layout; nnx gets the scaling folded again),
    ``adapter`` the same as PEFT in the output dtype (byte-identical to what the
    CLI writes), and the transfer report.
  """
  return transfer_many(source, target, [lora], config=config, source_config=source_config,
                       target_config=target_config, key_map=key_map, target_key_map=target_key_map,
                       progress=progress)[0]


# --- the per-module maths as pure functions ------------------------------------------


def transfer_factors(w_s_oi: jax.Array, w_t_oi: jax.Array, a_ri: jax.Array, b_or: jax.Array,
                     key: jax.Array | None = None, *, rank: int = _DEFAULTS.rank, method: str = _DEFAULTS.method,
                     svd: str = "exact", solver: str = _DEFAULTS.solver, n_oversamples: int = _DEFAULTS.n_oversamples,
                     n_power_iter: int = _DEFAULTS.n_power_iter) -> kernels.Projected:
  """One module's transfer in torch orientation; pure, jit with the keyword options static.

  ``w_s_oi`` (out_s, in_s) and ``w_t_oi`` (out_t, in_t) are the base weights,
  ``a_ri`` (r, in_s) / ``b_or`` (out_s, r) the source LoRA (scaled or not: the maps
  are linear in B). Returns ``Projected(a_ri (r, in_t), b_or (out_t, r), norm_ratio)``
  in float32. The SVD rank is clipped to min(rank, out_s, in_s, out_t, in_t) as the
  planner does. ``svd`` defaults to "exact", which needs no key; the engine's
  default is ``kernels.DEFAULT_SVD``, so pass ``svd="exact"`` to both to compare
  numbers. ``key`` (for ``svd="randomized"`` or ``"krylov"``, and ``"auto"`` where it picks one of them
  for a weight's shape) is split between source and target, so random draws differ from the
  engine's per-layer keys.

  >>> f = jax.jit(transfer_factors, static_argnames=STATIC_ARGNAMES)
  >>> out = f(jnp.eye(6, 4), jnp.eye(5, 3), jnp.ones((2, 4)), jnp.ones((6, 2)), rank=3)
  >>> out.a_ri.shape, out.b_or.shape
  ((2, 3), (5, 2))
  """
  if method not in FACTOR_METHODS:
    raise CrossLoraError(f"method: one of {', '.join(FACTOR_METHODS)} expected, got {method!r}. Methods that need "
                         "more than the two weights (anchored) run through transfer().")
  if w_s_oi.ndim != 2 or w_t_oi.ndim != 2 or a_ri.ndim != 2 or b_or.ndim != 2:
    raise CrossLoraError(f"2-D arrays expected, got w_s_oi {w_s_oi.shape}, w_t_oi {w_t_oi.shape}, "
                         f"a_ri {a_ri.shape}, b_or {b_or.shape}.")
  (out_s, in_s), (out_t, in_t) = w_s_oi.shape, w_t_oi.shape
  if a_ri.shape[1] != in_s or b_or.shape != (out_s, a_ri.shape[0]):
    raise CrossLoraError(f"a_ri (r, {in_s}) and b_or ({out_s}, r) expected to match w_s_oi ({out_s}, {in_s}), "
                         f"got {a_ri.shape} and {b_or.shape}.")
  spec = methods.get(method)
  if spec.same_shape and (out_s, in_s) != (out_t, in_t):
    raise CrossLoraError(f"method {method}: equal (out, in) shapes expected, got source {(out_s, in_s)} and target "
                         f"{(out_t, in_t)}. Use method='cross_lora'.")
  k = min(rank, out_s, in_s, out_t, in_t)
  key_s = key_t = None
  if key is not None:
    key_s, key_t = jax.random.split(key)
  svd_options = dict(rank=k, method=svd, n_oversamples=n_oversamples, n_power_iter=n_power_iter)
  sub_t = kernels.truncated_svd(w_t_oi, key_t, **svd_options) if spec.needs_target_subspaces else None
  sub_s = kernels.truncated_svd(w_s_oi, key_s, **svd_options) if spec.needs_source_subspaces else None
  return spec.project_module(sub_s, sub_t, a_ri, b_or, out_t=out_t, in_t=in_t, solver=solver)


def transfer_flax_factors(kernel_s_io: jax.Array, kernel_t_io: jax.Array, lora_a_ir: jax.Array,
                          lora_b_ro: jax.Array, key: jax.Array | None = None, *, rank: int = _DEFAULTS.rank,
                          method: str = _DEFAULTS.method, svd: str = "exact", solver: str = _DEFAULTS.solver,
                          n_oversamples: int = _DEFAULTS.n_oversamples,
                          n_power_iter: int = _DEFAULTS.n_power_iter) -> tuple[jax.Array, jax.Array]:
  """:func:`transfer_factors` in Flax orientation: kernels (in, out), lora_a (in, r), lora_b (r, out).

  Returns the target's ``(lora_a (in_t, r), lora_b (r, out_t))`` in float32. An
  nnx lora_b with the scaling folded in stays folded (the map is linear in B).
  """
  to_torch = flax_bridge.to_torch_orientation
  out = transfer_factors(to_torch(kernel_s_io), to_torch(kernel_t_io), to_torch(lora_a_ir), to_torch(lora_b_ro),
                         key, rank=rank, method=method, svd=svd, solver=solver, n_oversamples=n_oversamples,
                         n_power_iter=n_power_iter)
  return flax_bridge.to_flax_orientation(out.a_ri), flax_bridge.to_flax_orientation(out.b_or)

