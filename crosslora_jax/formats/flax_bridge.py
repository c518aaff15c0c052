"""PEFT LoRA adapters ⇄ Flax LoRA trees (flax.nnx and qwix layouts).

Orientation (docs/design.md, "Conventions"). PEFT holds ``lora_A`` as ``a_ri`` (rank, in) and
``lora_B`` as ``b_or`` (out, rank), ΔW = scaling · B A applied as ``x @ ΔWᵀ``.
Flax holds ``lora_a`` (in, rank) and ``lora_b`` (rank, out) applied as
``x @ lora_a @ lora_b``; a Flax kernel is (in, out). Only
:func:`to_flax_orientation` and :func:`to_torch_orientation` transpose.

A :class:`LoraTree` is a nested dict of arrays (``params``, a JAX pytree you can
``nnx.update`` a model with, jit over or save with Orbax) plus a JSON-able
``meta`` dict that says how to get the PEFT adapter back. Layouts:

* ``nnx``: ``<module>/lora/lora_a`` (in, r) and ``<module>/lora/lora_b`` (r, out),
  ``nnx.LoRAParam`` values of an ``nnx.LoRALinear`` (``lora_path=()`` for a bare
  ``nnx.LoRA``). nnx has no alpha, so the PEFT scaling (alpha/r, or alpha/√r with
  ``use_rslora``; ``rank_pattern``/``alpha_pattern`` per module) is **folded into
  lora_b**: ``lora_b = scaling · Bᵀ`` (multiplied in float64, rounded once).
* ``qwix``: ``<module>/<weight>_lora_a`` (in, r) and ``<module>/<weight>_lora_b``
  (r, out), unscaled; qwix multiplies by ``alpha / rank`` at run time, so meta
  carries a qwix alpha = scaling · rank per module (see :func:`qwix_rules`).
  Plain 2-D dense kernels only.
* ``peft``: ``<module>/lora_A`` (r, in) and ``<module>/lora_B`` (out, r), unscaled,
  torch orientation (how :mod:`crosslora_jax.formats.orbax_io` stores a PeftAdapter).

Exact inversion of the nnx fold: rounding ``scaling · B`` is lossy unless the
scaling is a power of two (at scaling 4/3 about one float32 entry in eight comes
back one ulp off). Meta therefore keeps, per module, the scaling, a SHA-256 of the folded
lora_b and, when dividing back does not restore B bit for bit, the XOR of the
original and divided-back bit patterns (zlib + base64, about a tenth of B's
size). :func:`from_nnx` divides by the scaling and applies that XOR only while
lora_b is unchanged (the hash matches), so PEFT → nnx → PEFT gives back the same
bytes; after training, lora_b / scaling is the new B.

The key mapping from HF module paths (``model.layers.3.self_attn.q_proj``) to
paths in the user's tree is a parameter (:class:`KeyMap`, :func:`key_template`,
a function, or None for the identity split on dots with digits as ints, which is
how ``nnx.state`` names list items; :mod:`crosslora_jax.formats.flax_keys`).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import re
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_dtypes  # noqa: F401  (bfloat16 for numpy)
import numpy as np

from crosslora_jax.errors import CrossLoraError, collect_and_raise
from crosslora_jax.formats import peft_format
from crosslora_jax.formats.flax_keys import (  # noqa: F401  (IDENTITY, KeyMap, key_template, path_str, pure_tree: re-exported)
    IDENTITY, KeyMap, KeyMapLike, TreePath, _get, _set, _tree_path, _walk, as_key_map, key_template, path_str, pure_tree)

LAYOUTS = ("nnx", "qwix", "peft")
META_FORMAT = "crosslora_jax/lora_tree"
META_VERSION = 1
NNX_LORA_PATH = ("lora",)  # nnx.LoRALinear keeps its nnx.LoRA under .lora
QWIX_WEIGHT = "kernel"  # the dense param qwix adds <weight>_lora_a/_lora_b beside


# --- orientation ---------------------------------------------------------------------


def to_flax_orientation(x_torch: Any) -> Any:
  """Torch → Flax orientation of a 2-D linear tensor (a transpose).

  weight (out, in) → kernel (in, out); lora_A (r, in) → lora_a (in, r);
  lora_B (out, r) → lora_b (r, out).
  """
  if np.ndim(x_torch) != 2:
    raise CrossLoraError(f"a 2-D linear tensor expected, got shape {np.shape(x_torch)}.")
  return x_torch.T


def to_torch_orientation(x_flax: Any) -> Any:
  """Flax → torch orientation: the inverse of :func:`to_flax_orientation`."""
  if np.ndim(x_flax) != 2:
    raise CrossLoraError(f"a 2-D linear tensor expected, got shape {np.shape(x_flax)}.")
  return x_flax.T


# --- the scaling fold ------------------------------------------------------------------


def _bits(x: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(x).view(np.dtype(f"u{x.dtype.itemsize}"))


def _digest(x: np.ndarray) -> str:
  x = np.ascontiguousarray(x)
  return hashlib.sha256(f"{x.dtype}{x.shape}".encode() + x.tobytes()).hexdigest()


def fold_scaling(b_ro: np.ndarray, scaling: float) -> tuple[np.ndarray, str | None]:
  """``scaling · b_ro`` in float64, rounded once to b_ro's dtype, and the exact-inverse fix.

  The fix (None when dividing back is already exact) is base64(zlib(XOR of the bit
  patterns of b_ro and of ``unfold_scaling(folded, scaling)``)).
  """
  b_ro = np.asarray(b_ro)
  folded = (b_ro.astype(np.float64) * scaling).astype(b_ro.dtype)
  diff = _bits(b_ro) ^ _bits(unfold_scaling(folded, scaling))
  fix = base64.b64encode(zlib.compress(diff.tobytes(), 9)).decode("ascii") if diff.any() else None
  return folded, fix


def unfold_scaling(folded: np.ndarray, scaling: float, fix: str | None = None) -> np.ndarray:
  """``folded / scaling`` in float64, rounded to folded's dtype; with ``fix``, the exact original."""
  folded = np.asarray(folded)
  out = (folded.astype(np.float64) / scaling).astype(folded.dtype)
  if fix is not None:
    diff = np.frombuffer(zlib.decompress(base64.b64decode(fix)), _bits(out).dtype).reshape(out.shape)
    out = (_bits(out) ^ diff).view(folded.dtype)
  return out


# --- the tree + meta -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LoraTree:
  """A LoRA as a nested dict of arrays plus the JSON meta that inverts it to PEFT.

  Not itself a pytree: pass ``params`` to ``nnx.update``, ``jax.jit`` or Orbax.
  ``meta["modules"]`` maps each HF module path to its ``tree_path``, ``rank``,
  ``alpha``, ``scaling`` (and for nnx the fold's ``lora_b_sha256``/``lora_b_fix``).
  """

  params: dict[Any, Any]
  meta: dict[str, Any]

  @property
  def layout(self) -> str:
    return self.meta["layout"]

  @property
  def module_paths(self) -> list[str]:
    return list(self.meta["modules"])


def _leaf_names(meta: Mapping[str, Any]) -> tuple[str, str]:
  layout = meta["layout"]
  if layout == "nnx":
    return "lora_a", "lora_b"
  if layout == "qwix":
    return f"{meta['weight']}_lora_a", f"{meta['weight']}_lora_b"
  return "lora_A", "lora_B"


def _leaf_prefix(meta: Mapping[str, Any]) -> TreePath:
  return tuple(meta.get("lora_path", ())) if meta["layout"] == "nnx" else ()


def check_meta(meta: Any, where: str = "meta") -> dict[str, Any]:
  """Validates a LoraTree meta dict (e.g. one read back from a checkpoint)."""
  if not isinstance(meta, Mapping) or meta.get("format") != META_FORMAT:
    got = meta.get("format") if isinstance(meta, Mapping) else type(meta).__name__
    raise CrossLoraError(f"{where}: format {META_FORMAT!r} expected, got {got!r}. "
                         "Pass the meta that came with the tree (LoraTree.meta).")
  if meta.get("version") != META_VERSION:
    raise CrossLoraError(f"{where}: version {META_VERSION} expected, got {meta.get('version')!r}. "
                         "Re-export the tree with this crosslora_jax.")
  if meta.get("layout") not in LAYOUTS or not isinstance(meta.get("modules"), Mapping):
    raise CrossLoraError(f"{where}: layout in {LAYOUTS} and a modules dict expected, got "
                         f"{meta.get('layout')!r} / {type(meta.get('modules')).__name__}.")
  return dict(meta)


def _base_meta(adapter: peft_format.PeftAdapter, layout: str) -> dict[str, Any]:
  return {"format": META_FORMAT, "version": META_VERSION, "layout": layout,
          "peft_config": dict(adapter.config), "modules": {}}


def to_tree(adapter: peft_format.PeftAdapter, *, layout: str = "nnx", key_map: KeyMapLike = None,
            lora_path: Sequence[str] = NNX_LORA_PATH, weight: str = QWIX_WEIGHT) -> LoraTree:
  """A PEFT adapter as a LoraTree of ``layout`` (see the module docstring). Inputs are not mutated."""
  if layout not in LAYOUTS:
    raise CrossLoraError(f"layout: one of {', '.join(LAYOUTS)} expected, got {layout!r}.")
  km = as_key_map(key_map)
  meta = _base_meta(adapter, layout)
  if layout == "nnx":
    meta["lora_path"] = list(lora_path)
  elif layout == "qwix":
    meta["weight"] = weight
  name_a, name_b = _leaf_names(meta)
  prefix = _leaf_prefix(meta)
  rslora = bool(adapter.config.get("use_rslora"))
  params: dict[Any, Any] = {}
  for hf_path, pair in adapter.modules.items():
    a_ri, b_or = np.asarray(pair.a_ri), np.asarray(pair.b_or)
    rank = a_ri.shape[0]
    alpha = adapter.alpha(hf_path)
    scaling = peft_format.lora_scaling(alpha, rank, rslora=rslora)
    tree_path = _tree_path(km, hf_path)
    entry: dict[str, Any] = {"tree_path": list(tree_path), "rank": rank, "alpha": alpha, "scaling": scaling}
    if layout == "peft":
      leaves = (a_ri, b_or)
    elif layout == "qwix":
      entry["qwix_alpha"] = scaling * rank  # qwix applies alpha / rank
      leaves = (to_flax_orientation(a_ri), to_flax_orientation(b_or))
    else:
      b_ro, fix = fold_scaling(to_flax_orientation(b_or), scaling)
      entry["lora_b_sha256"] = _digest(b_ro)
      entry["lora_b_fix"] = fix
      leaves = (to_flax_orientation(a_ri), b_ro)
    node = {name_a: _as_jax(leaves[0]), name_b: _as_jax(leaves[1])}
    for key in reversed(prefix):
      node = {key: node}
    _set(params, tree_path, node)
    meta["modules"][hf_path] = entry
  return LoraTree(params, meta)


def _as_jax(x: np.ndarray) -> Any:
  import jax.numpy as jnp
  return jnp.asarray(np.ascontiguousarray(x))


def to_nnx(adapter: peft_format.PeftAdapter, *, key_map: KeyMapLike = None,
           lora_path: Sequence[str] = NNX_LORA_PATH) -> LoraTree:
  """PEFT → flax.nnx LoRA params: lora_a = Aᵀ (in, r), lora_b = scaling · Bᵀ (r, out).

  The scaling is folded into lora_b (nnx.LoRA has no alpha); ``nnx.update(model,
  tree.params)`` then makes each ``nnx.LoRALinear`` compute ``x @ kernel + x @ lora_a
  @ lora_b`` = PEFT's ``x Wᵀ + scaling · x Aᵀ Bᵀ``. Keep ``tree.meta`` to go back.
  """
  return to_tree(adapter, layout="nnx", key_map=key_map, lora_path=lora_path)


def to_qwix(adapter: peft_format.PeftAdapter, *, key_map: KeyMapLike = None, weight: str = QWIX_WEIGHT) -> LoraTree:
  """PEFT → qwix LoRA params ``<weight>_lora_a`` = Aᵀ (in, r), ``<weight>_lora_b`` = Bᵀ (r, out), unscaled.

  qwix scales by ``alpha / rank`` at run time: build its rules with :func:`qwix_rules`.
  """
  return to_tree(adapter, layout="qwix", key_map=key_map, weight=weight)


def qwix_rules(tree: LoraTree | Mapping[str, Any]) -> list[dict[str, Any]]:
  """``qwix.LoraRule`` keyword arguments reproducing PEFT's per-module scaling.

  One rule per distinct (rank, alpha), ``module_path`` a regex of the ``/``-joined
  tree paths (what qwix fullmatches). For use_rslora adapters alpha = scaling · rank.
  """
  meta = check_meta(tree.meta if isinstance(tree, LoraTree) else tree)
  if meta["layout"] != "qwix":
    raise CrossLoraError(f"qwix_rules: a qwix-layout tree expected, got layout {meta['layout']!r}. Use to_qwix.")
  groups: dict[tuple[int, float], list[str]] = {}
  for entry in meta["modules"].values():
    groups.setdefault((entry["rank"], entry["qwix_alpha"]), []).append(re.escape(path_str(entry["tree_path"])))
  return [{"module_path": "|".join(paths), "rank": rank, "alpha": alpha} for (rank, alpha), paths in groups.items()]


# --- back to PEFT ----------------------------------------------------------------------


def _find_modules(params: Any, meta: Mapping[str, Any], km: KeyMap) -> dict[str, TreePath]:
  """HF module path → tree path of every LoRA pair in ``params`` (no meta: via km.to_hf)."""
  if km.to_hf is None:
    raise CrossLoraError("key_map: an inverse (to_hf) or the tree's meta expected to name the modules, got neither. "
                         "Pass meta=, or a KeyMap/key_template with to_hf.")
  name_a, name_b = _leaf_names(meta)
  prefix = _leaf_prefix(meta)
  found: dict[str, TreePath] = {}
  problems = []
  for path, node in _walk(params):
    if name_a not in node and name_b not in node:
      continue
    if len(path) <= len(prefix) or tuple(path[len(path) - len(prefix):]) != prefix:
      problems.append(f"{path_str(path)}: {name_a}/{name_b} under a module's {path_str(prefix)} expected, got "
                      "them elsewhere. Pass lora_path= to match your tree")
      continue
    module_path = tuple(path[:len(path) - len(prefix)])
    hf = km.to_hf(module_path)
    if hf is None:
      problems.append(f"{path_str(module_path)}: a tree path the key_map can name expected, got one it cannot")
      continue
    found[hf] = module_path
  collect_and_raise(problems)
  if not found:
    raise CrossLoraError(f"params: {name_a}/{name_b} leaves expected, got none. Is this a {meta['layout']} LoRA tree?")
  return found


def from_tree(tree: LoraTree | Any, meta: Mapping[str, Any] | None = None, *, layout: str | None = None,
              key_map: KeyMapLike = None, lora_path: Sequence[str] = NNX_LORA_PATH, weight: str = QWIX_WEIGHT,
              alpha: float | Mapping[str, float] | Callable[[str], float] | None = None,
              base_model: str | None = None, fan_in_fan_out: bool = False) -> peft_format.PeftAdapter:
  """A LoraTree (or ``params`` + ``meta``) back to a PEFT adapter, exactly when unchanged.

  With meta, modules are looked up at its tree paths (or at ``key_map``'s, when
  given) and the original adapter_config comes back. Without meta, ``layout`` and
  an invertible ``key_map`` find the modules; nnx trees are read with scaling 1
  (lora_alpha = r), qwix and peft trees need ``alpha`` (scaling alpha / r).
  Factors keep the dtype of the tree's arrays. ``params`` may be an nnx.Module
  (its LoRAParam state) or nnx.State.
  """
  if isinstance(tree, LoraTree):
    if meta is not None:
      raise CrossLoraError("from_tree: meta expected once, got a LoraTree and meta=. Pass one of them.")
    tree, meta = tree.params, tree.meta
  params = pure_tree(tree)
  if not isinstance(params, Mapping):
    raise CrossLoraError(f"params: a nested dict of arrays (or nnx.State/Module) expected, "
                         f"got {type(params).__name__}.")
  if meta is not None:
    meta = check_meta(meta)
    if layout is not None and layout != meta["layout"]:
      raise CrossLoraError(f"layout: {meta['layout']!r} expected (from meta), got {layout!r}.")
    km = as_key_map(key_map) if key_map is not None else None
    paths = {hf: (_tree_path(km, hf) if km is not None else tuple(e["tree_path"])) for hf, e in meta["modules"].items()}
  else:
    if layout not in LAYOUTS:
      raise CrossLoraError(f"layout: one of {', '.join(LAYOUTS)} expected without meta, got {layout!r}.")
    meta = {"layout": layout, "lora_path": list(lora_path), "weight": weight, "modules": {}}
    paths = _find_modules(params, meta, as_key_map(key_map))
  modules: dict[str, peft_format.LoraPair] = {}
  problems = []
  for hf, module_path in paths.items():
    read = _read_module(params, meta, hf, module_path)
    if isinstance(read, str):
      problems.append(read)
    else:
      modules[hf] = read
  collect_and_raise(problems)
  if "peft_config" in meta:
    return peft_format.PeftAdapter(dict(meta["peft_config"]), modules)
  ranks = {hf: pair.a_ri.shape[0] for hf, pair in modules.items()}
  if meta["layout"] == "nnx":
    alphas = {hf: float(r) for hf, r in ranks.items()}  # scaling 1: the fold is already in lora_b
  else:
    alphas = {hf: _alpha_for(alpha, hf) for hf in modules}  # qwix and PEFT both scale by alpha / r
  config = peft_format.build_config({"peft_type": "LORA", "lora_dropout": 0.0, "bias": "none"},
                                    base_model=base_model or "", ranks=ranks, alphas=alphas, all_paths_by_name={},
                                    fan_in_fan_out=fan_in_fan_out)
  return peft_format.PeftAdapter(config, modules)


def _read_module(params: Mapping, meta: Mapping[str, Any], hf: str,
                 module_path: TreePath) -> peft_format.LoraPair | str:
  """One module's factors in torch orientation (nnx fold undone), or the problem as one line."""
  name_a, name_b = _leaf_names(meta)
  prefix = _leaf_prefix(meta)
  node = _get(params, module_path + prefix)
  where = path_str(module_path + prefix)
  if not isinstance(node, Mapping) or name_a not in node or name_b not in node:
    return (f"{where}: {name_a} and {name_b} expected (module {hf}), got "
            f"{sorted(map(str, node)) if isinstance(node, Mapping) else 'nothing'}")
  x_a, x_b = np.asarray(node[name_a]), np.asarray(node[name_b])
  torch_layout = meta["layout"] == "peft"
  rank_axes = (0, 1) if torch_layout else (1, 0)  # the r axis of the A and B arrays
  if x_a.ndim != 2 or x_b.ndim != 2 or x_a.shape[rank_axes[0]] != x_b.shape[rank_axes[1]]:
    want = "lora_A (r, in) and lora_B (out, r)" if torch_layout else f"{name_a} (in, r) and {name_b} (r, out)"
    return f"{where}: {want} with equal r expected, got {x_a.shape} and {x_b.shape}"
  rank = x_a.shape[rank_axes[0]]
  entry = meta["modules"].get(hf)
  if entry is not None and entry["rank"] != rank:
    return f"{where}: rank {entry['rank']} expected (from meta), got {rank}"
  if torch_layout:
    a_ri, b_or = x_a, x_b
  else:
    b_ro = x_b
    if meta["layout"] == "nnx" and entry is not None:
      fix = entry.get("lora_b_fix") if entry.get("lora_b_sha256") == _digest(x_b) else None
      b_ro = unfold_scaling(x_b, entry["scaling"], fix)
    a_ri, b_or = to_torch_orientation(x_a), to_torch_orientation(b_ro)
  return peft_format.LoraPair(np.array(a_ri, order="C"), np.array(b_or, order="C"))  # owned, writable


def _alpha_for(alpha: float | Mapping[str, float] | Callable[[str], float] | None, hf: str) -> float:
  if alpha is None:
    raise CrossLoraError(f"alpha: the LoRA alpha expected for a tree without meta (it is not in the arrays), "
                         f"got none for {hf}. Pass alpha= (a number, a dict by module path, or a function).")
  value = alpha(hf) if callable(alpha) else alpha.get(hf) if isinstance(alpha, Mapping) else alpha
  if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
    raise CrossLoraError(f"alpha: {hf}: a positive number expected, got {value!r}.")
  return float(value)


def from_nnx(params: Any, meta: Mapping[str, Any] | None = None, *, key_map: KeyMapLike = None,
             lora_path: Sequence[str] = NNX_LORA_PATH, base_model: str | None = None) -> peft_format.PeftAdapter:
  """flax.nnx LoRA params → PEFT: A = lora_aᵀ, B = lora_bᵀ / scaling (exact while lora_b is unchanged)."""
  if isinstance(params, LoraTree):
    params, meta = params.params, params.meta if meta is None else meta
  return from_tree(params, meta, layout="nnx", key_map=key_map, lora_path=lora_path, base_model=base_model)


def from_qwix(params: Any, meta: Mapping[str, Any] | None = None, *, key_map: KeyMapLike = None,
              weight: str = QWIX_WEIGHT, alpha: float | Mapping[str, float] | Callable[[str], float] | None = None,
              base_model: str | None = None) -> peft_format.PeftAdapter:
  """qwix LoRA params → PEFT: A = ``<weight>_lora_a``ᵀ, B = ``<weight>_lora_b``ᵀ (no scaling in the arrays)."""
  if isinstance(params, LoraTree):
    params, meta = params.params, params.meta if meta is None else meta
  return from_tree(params, meta, layout="qwix", key_map=key_map, weight=weight, alpha=alpha, base_model=base_model)
