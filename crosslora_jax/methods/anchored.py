"""Method ``anchored`` (experimental): maps between two models' spaces, anchored in their shared vocabulary.

Two independently trained LLMs share no coordinates, but most token strings exist in
both tokenizers, and each model embeds them. The shared tokens are a data-free probe:

1. **Tokens.** Token strings of both ``tokenizer.json`` files are normalised to bytes
   (byte-level BPE's ``Ġ``/``Ċ`` alphabet decoded; SentencePiece's ``▁`` read as a space,
   ``<0xNN>`` as a byte); special tokens are skipped; equal byte strings are matched.
2. **Probes.** For a chosen set of N shared tokens each model gets, per layer and space,
   a probe matrix (N, dim): the residual as a norm layer outputs it (embedding rows scaled
   to unit RMS, so Gemma's √hidden scale drops out, times the norm gain, (1+γ) for Gemma),
   and what the layer's own base weights make of it: q, k, v outputs, the attention-head
   space (v expanded to query heads by GQA group) and the FFN activation
   act(gate x)·(up x).
3. **Maps.** In every space a ridge regression S (d_t, d_s) with H_t S ≈ H_s on the fit
   tokens; the ridge strength is chosen on validation tokens and the fit reported as R² on
   test tokens. The one S serves both sides of a LoRA, because it matches *functionals*:
   a reading factor goes A_t = A_s Sᵀ (so A_t h_t ≈ A_s h_s for every probe token), a
   writing factor goes B_t = S B_s (the least-squares Δh_t whose inner products with the
   target's probes match the source's: the logit-lens argument for the residual stream).
   Identical models give S = I (ridge chosen ~0) and reproduce the adapter.
4. **Scale and guard.** ΔW_t is rescaled so that the source base weight pushed through the
   same maps has the target base weight's norm (``scale="base"``), and multiplied by the
   predicted transferability p = max(R²_in, 0) · max(R²_out, 0) (shrinkage). Modules with
   p below ``threshold`` are skipped (their B is zero): the data-free guard.

Maps are memoised per (source, target, layer pair, space) for the life of the process.
Step 1 lives in :mod:`~crosslora_jax.methods.anchored_vocab`, steps 2-3 in
:mod:`~crosslora_jax.methods.anchored_maps`; this module builds the maps and moves the factors.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from crosslora_jax.core import kernels
from crosslora_jax.errors import CrossLoraError
from crosslora_jax.formats.architectures import RESIDUAL, SPACES
from crosslora_jax.methods.anchored_maps import (LAMBDAS, ModelProbes, RidgeMap, attention_heads_map,
                                                 fit_ridge_map, project_anchored, space_name)
from crosslora_jax.methods.anchored_vocab import TOKENIZER_FILE, read_vocab, shared_token_ids
from crosslora_jax.methods.base import Method, ProjectionBatch

SCALES = ("base", "none")
RESIDUAL_OUT = ("embed", "lm_head")


@dataclasses.dataclass(frozen=True)
class AnchorConfig:
  """Knobs of the anchored method (defaults are the measured choice, BUILD_NOTES.md)."""

  tokens: int = 2048  # shared tokens used as probes (split fit / validation / test)
  pool: int = 16384  # drawn from the shared tokens with the lowest source ids (frequent merges)
  threshold: float = 0.25  # modules with predicted transferability below it are skipped
  shrink: bool = True  # multiply each update by its predicted transferability
  scale: str = "base"  # "base": ‖S_out W_s S_inᵀ‖ matched to ‖W_t‖; "none"
  residual_out: str = "embed"  # probe for writes into the residual: input or output embeddings
  seed: int = 0

  def __post_init__(self):
    problems = []
    if not isinstance(self.tokens, int) or self.tokens < 16:
      problems.append(f"anchor tokens: an integer >= 16 expected, got {self.tokens!r}")
    if not 0.0 <= self.threshold <= 1.0:
      problems.append(f"anchor threshold: a value in [0, 1] expected, got {self.threshold!r}")
    if self.scale not in SCALES:
      problems.append(f"anchor scale: one of {', '.join(SCALES)} expected, got {self.scale!r}")
    if self.residual_out not in RESIDUAL_OUT:
      problems.append(f"anchor residual_out: one of {', '.join(RESIDUAL_OUT)} expected, got {self.residual_out!r}")
    if problems:
      raise CrossLoraError("; ".join(problems) + ".")


class Anchors:
  """Vocabulary-anchored maps between a source and a target model, computed on demand."""

  def __init__(self, source, target, config: AnchorConfig = AnchorConfig()):
    self.config = config
    for base, what in ((source, "source"), (target, "target")):
      if getattr(base, "path", None) is None:
        raise CrossLoraError(f"{what} model {getattr(base, 'name', base)!r}: a model folder with {TOKENIZER_FILE} "
                             "expected by --method anchored, got in-memory weights. Pass the folder.")
    ids_s, ids_t = shared_token_ids(source.path, target.path)
    vocab_s = _embed_rows(source)
    vocab_t = _embed_rows(target)
    keep = (ids_s < vocab_s) & (ids_t < vocab_t)
    ids_s, ids_t = ids_s[keep], ids_t[keep]
    self.shared = int(len(ids_s))
    if self.shared < 16:
      raise CrossLoraError(f"{source.path} and {target.path}: at least 16 shared tokens expected by --method "
                           f"anchored, got {self.shared}. The vocabularies have too little in common; use "
                           "--method cross_lora.")
    pool = min(config.pool, self.shared)
    n = min(config.tokens, pool)
    pick = np.sort(np.random.default_rng(config.seed).permutation(pool)[:n])
    pick = np.random.default_rng(config.seed + 1).permutation(pick)  # split order: random
    self.ids_s, self.ids_t = ids_s[pick], ids_t[pick]
    self.n_fit = int(round(n * 0.7))
    self.n_val = int(round(n * 0.15))
    self.source = ModelProbes(source, self.ids_s, config.residual_out)
    self.target = ModelProbes(target, self.ids_t, config.residual_out)
    self._maps: dict[tuple[int, int, str], RidgeMap] = {}

  def space_map(self, source_layer: int, target_layer: int, module: str, side: str) -> RidgeMap:
    """S (d_t, d_s) with H_t S ≈ H_s in the space ``module`` reads (side 'in') or writes ('out')."""
    name = space_name(module, side)
    in_space, out_space = SPACES[module]
    residual = (in_space if side == "in" else out_space) == RESIDUAL
    layers = (-1, -1) if residual and side == "out" else (source_layer, target_layer)
    key = layers + (name,)
    if key not in self._maps and module == "o_proj" and side == "in":
      self._maps[key] = self._attention_heads_map(source_layer, target_layer)
    if key not in self._maps:
      h_s = self.source.probe(source_layer, name)
      h_t = self.target.probe(target_layer, name)
      fit = fit_ridge_map(jnp.asarray(h_t), jnp.asarray(h_s), n_fit=self.n_fit, n_val=self.n_val)
      self._maps[key] = jax.tree.map(np.asarray, fit)
    return self._maps[key]

  def _attention_heads_map(self, source_layer: int, target_layer: int) -> RidgeMap:
    """o_proj's input: query heads, each reading its GQA group's v.

    Probes cannot tell the query heads of one group apart (they differ only by their
    attention pattern), so the map is built from parts that can be fitted: the v-space
    map between kv heads, placed in block (h_t, h_s) with a head affinity w(h_t, h_s)
    taken from the q-space map (share of ‖S_q‖² in that head block, rows summing to 1).
    Identical models give w = I and S = I. R² is the v-space map's.
    """
    s_v = self.space_map(source_layer, target_layer, "v_proj", "out")
    s_q = self.space_map(source_layer, target_layer, "q_proj", "out")
    return jax.tree.map(np.asarray, attention_heads_map(
        jnp.asarray(s_v.m), jnp.asarray(s_q.m), jnp.asarray(s_v.r2), jnp.asarray(s_v.lam),
        heads=(self.target.arch.num_heads, self.source.arch.num_heads),
        kv_heads=(self.target.arch.num_kv_heads, self.source.arch.num_kv_heads)))

  def transfer(self, module: str, source_layer: int, target_layer: int, a_ri: np.ndarray,
               b_or: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """One module's factors moved; returns (a_t, b_t, report fields)."""
    s_in = self.space_map(source_layer, target_layer, module, "in")
    s_out = self.space_map(source_layer, target_layer, module, "out")
    r2_in, r2_out = float(s_in.r2), float(s_out.r2)
    predicted = max(r2_in, 0.0) * max(r2_out, 0.0)
    skip = predicted < self.config.threshold
    factor = 0.0 if skip else (predicted if self.config.shrink else 1.0)
    proj = project_anchored(jnp.asarray(s_in.m), jnp.asarray(s_out.m),
                            jnp.asarray(self.source.weight_oi(source_layer, module)),
                            jnp.asarray(self.target.weight_oi(target_layer, module)),
                            jnp.asarray(a_ri), jnp.asarray(b_or), jnp.float32(factor),
                            use_base_scale=self.config.scale == "base")
    info = {
        "anchor_r2_in": r2_in, "anchor_r2_out": r2_out, "predicted_transferability": predicted,
        "guard": "skipped" if skip else ("attenuated" if factor < 1.0 else "kept"),
        "guard_factor": factor, "base_scale": float(proj.base_scale), "norm_ratio": float(proj.norm_ratio),
    }
    return np.asarray(proj.a_ri), np.asarray(proj.b_or), info

  def summary(self) -> dict[str, Any]:
    return {"shared_tokens": self.shared, "probe_tokens": len(self.ids_s), "fit": self.n_fit, "val": self.n_val,
            "test": len(self.ids_s) - self.n_fit - self.n_val,
            "residual_r2": {f"{k[0]}->{k[1]} {k[2]}": float(v.r2) for k, v in self._maps.items()}}


def _embed_rows(base) -> int:
  keys = base.keys() if hasattr(base, "keys") else None
  key = base.arch.embed_key(keys)
  if hasattr(base, "shape"):
    return int(base.shape(key)[0])
  return int(np.asarray(base.tensor(key)).shape[0])


_CACHE: dict[tuple[str, str, AnchorConfig], Anchors] = {}


def anchors_for(source, target, config: AnchorConfig = AnchorConfig()) -> Anchors:
  """Anchors memoised by the two models' fingerprints and the fields the maps depend on.

  One pair is kept. Guard settings (threshold, shrink, scale) do not change the maps: a
  cached pair is handed out as a shallow copy carrying ``config``, sharing its maps.
  """
  maps_only = dataclasses.replace(config, threshold=AnchorConfig.threshold, shrink=AnchorConfig.shrink,
                                  scale=AnchorConfig.scale)
  key = (source.fingerprint(), target.fingerprint(), maps_only)
  if key not in _CACHE:
    _CACHE.clear()
    _CACHE[key] = Anchors(source, target, maps_only)
  view = copy.copy(_CACHE[key])
  view.config = config
  return view


def project(batch: ProjectionBatch):
  """The anchored transfer of a batch, item by item (maps differ per layer pair)."""
  anchors: Anchors = batch.context
  a_out, b_out, ratios, extras = [], [], [], []
  for items in batch.items:
    a_t, b_t, ratio_t, infos = [], [], [], []
    for w in items:
      a, b, info = anchors.transfer(batch.module, w.source_layer, w.target_layer, w.factors.a_ri, w.factors.b_or)
      a_t.append(a)
      b_t.append(b)
      ratio_t.append(info.pop("norm_ratio"))
      infos.append(info)
    a_out.append(np.stack(a_t))
    b_out.append(np.stack(b_t))
    ratios.append(np.asarray(ratio_t, np.float32))
    extras.append(infos)
  return kernels.Projected(np.stack(a_out), np.stack(b_out), np.stack(ratios)), extras


METHOD = Method("anchored", "ridge maps fitted on the shared vocabulary, with a data-free guard; experimental",
                needs_source_subspaces=False, needs_target_subspaces=False, same_shape=False, project=project,
                prepare=lambda source, target, config: anchors_for(source, target, config.anchor),
                experimental=True)

__all__: Sequence[str] = ("AnchorConfig", "Anchors", "LAMBDAS", "METHOD", "RidgeMap", "TOKENIZER_FILE", "anchors_for",
                          "attention_heads_map", "fit_ridge_map", "project", "project_anchored", "read_vocab",
                          "shared_token_ids")
