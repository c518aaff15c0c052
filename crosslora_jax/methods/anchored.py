"""Method ``anchored``: maps between two models' spaces, anchored in their shared vocabulary.

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
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import pathlib
import re
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from crosslora_jax.formats.architectures import FFN, INPUT_NORM, RESIDUAL, SPACES
from crosslora_jax.errors import CrossLoraError

HIGHEST = lax.Precision.HIGHEST
TOKENIZER_FILE = "tokenizer.json"
# Relative ridge strengths tried (times the mean squared singular value); 0 is plain least squares.
LAMBDAS = (0.0, 1e-7, 1e-5, 1e-4, 1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0)
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


# --- token matching -----------------------------------------------------------------


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


# --- kernels ------------------------------------------------------------------------


class RidgeMap(NamedTuple):
  """y ≈ x @ m, fitted by ridge regression on the fit rows."""

  m: jax.Array  # (d_x, d_y)
  r2: jax.Array  # () held-out R² on the test rows (centred)
  lam: jax.Array  # () the chosen relative ridge strength


def _mm(x, y):
  return jnp.matmul(x, y, precision=HIGHEST)


def _r2(y: jax.Array, pred: jax.Array) -> jax.Array:
  total = jnp.sum(jnp.square(y - jnp.mean(y, axis=0)))
  return jnp.where(total > 0, 1.0 - jnp.sum(jnp.square(y - pred)) / total, 0.0)


@functools.partial(jax.jit, static_argnames=("n_fit", "n_val"))
def fit_ridge_map(x_nd: jax.Array, y_ne: jax.Array, *, n_fit: int, n_val: int) -> RidgeMap:
  """Ridge map y ≈ x m with its strength chosen on validation rows, R² on the rest.

  Rows [0, n_fit) fit, [n_fit, n_fit + n_val) choose λ from ``LAMBDAS`` (relative to the
  mean squared singular value), the remaining rows test. One thin SVD of the fit rows
  (not their Gram matrix, whose condition number is squared in float32) serves every λ:
  m = V diag(σ / (σ² + λ)) Uᵀ y.
  """
  x = x_nd.astype(jnp.float32)
  y = y_ne.astype(jnp.float32)
  xf, yf = x[:n_fit], y[:n_fit]
  xv, yv = x[n_fit:n_fit + n_val], y[n_fit:n_fit + n_val]
  xt, yt = x[n_fit + n_val:], y[n_fit + n_val:]
  u, s, vt = jnp.linalg.svd(xf, full_matrices=False)  # (n, k), (k,), (k, d)
  scale = jnp.maximum(jnp.sum(jnp.square(s)) / x.shape[1], 1e-30)
  rhs = _mm(u.T, yf)  # (k, e)
  left_v = _mm(xv, vt.T)  # (n_val, k)
  lams = jnp.asarray(LAMBDAS, jnp.float32)

  def coef(lam):
    keep = s > s[0] * 1e-6  # λ = 0: the minimum-norm least-squares solution, tiny σ cut
    return rhs * jnp.where(keep, s / (jnp.square(s) + lam * scale + ~keep), 0.0)[:, None]

  val_r2 = lax.map(lambda lam: _r2(yv, _mm(left_v, coef(lam))), lams)
  best = lams[jnp.argmax(val_r2)]
  m = _mm(vt.T, coef(best))
  return RidgeMap(m, _r2(yt, _mm(xt, m)), best)


@functools.partial(jax.jit, static_argnames=("heads", "kv_heads"))
def attention_heads_map(s_v: jax.Array, s_q: jax.Array, r2: jax.Array, lam: jax.Array, *,
                        heads: tuple[int, int], kv_heads: tuple[int, int]) -> RidgeMap:
  """S_attn (H_t·d_t, H_s·d_s): block (h_t, h_s) = w(h_t, h_s) · S_v[kv(h_t), kv(h_s)].

  s_v (K_t·d_t, K_s·d_s) maps kv heads, s_q (H_t·dq_t, H_s·dq_s) gives the head affinity w.
  """
  (h_t, h_s), (k_t, k_s) = heads, kv_heads
  d_t, d_s = s_v.shape[0] // k_t, s_v.shape[1] // k_s
  blocks_q = s_q.reshape(h_t, s_q.shape[0] // h_t, h_s, s_q.shape[1] // h_s)
  w = jnp.sum(jnp.square(blocks_q), axis=(1, 3))  # (H_t, H_s)
  w = w / jnp.maximum(jnp.sum(w, axis=1, keepdims=True), 1e-30)
  blocks_v = s_v.reshape(k_t, d_t, k_s, d_s)
  group_t = jnp.arange(h_t) // (h_t // k_t)
  group_s = jnp.arange(h_s) // (h_s // k_s)
  per_head = blocks_v[group_t][:, :, group_s]  # (H_t, d_t, H_s, d_s)
  m = (per_head * w[:, None, :, None]).reshape(h_t * d_t, h_s * d_s)
  return RidgeMap(m, r2, lam)


class AnchoredFactors(NamedTuple):
  a_ri: jax.Array  # (rank, in_t)
  b_or: jax.Array  # (out_t, rank)
  base_scale: jax.Array  # () ‖W_t‖ / ‖S_out W_s S_inᵀ‖ (1 when not used)
  norm_ratio: jax.Array  # () ‖ΔW_t‖ / ‖ΔW_s‖ after scaling


def _lowrank_fro(a_ri, b_or):
  return jnp.sqrt(jnp.maximum(jnp.sum(_mm(b_or.T, b_or) * _mm(a_ri, a_ri.T)), 0.0))


@functools.partial(jax.jit, static_argnames=("use_base_scale",))
def project_anchored(s_in: jax.Array, s_out: jax.Array, w_s: jax.Array, w_t: jax.Array, a_ri: jax.Array,
                     b_or: jax.Array, factor: jax.Array, *, use_base_scale: bool) -> AnchoredFactors:
  """A_t = A_s S_inᵀ, B_t = factor · c · S_out B_s with c = ‖W_t‖/‖S_out W_s S_inᵀ‖ (or 1).

  s_in (n_t, n_s), s_out (m_t, m_s), w_s (m_s, n_s), w_t (m_t, n_t), a_ri (r, n_s), b_or (m_s, r).
  """
  a = a_ri.astype(jnp.float32)
  b = b_or.astype(jnp.float32)
  a_t = _mm(a, s_in.T)
  b_t = _mm(s_out, b)
  if use_base_scale:
    mapped = _mm(_mm(s_out, w_s.astype(jnp.float32)), s_in.T)
    mapped_norm = jnp.linalg.norm(mapped)
    c = jnp.where(mapped_norm > 0, jnp.linalg.norm(w_t.astype(jnp.float32)) / mapped_norm, 0.0)
  else:
    c = jnp.ones((), jnp.float32)
  b_t = b_t * (c * factor)
  src = _lowrank_fro(a, b)
  return AnchoredFactors(a_t, b_t, c, jnp.where(src > 0, _lowrank_fro(a_t, b_t) / src, 0.0))


def _rms_rows(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.sqrt(np.mean(np.square(x), axis=1, keepdims=True)), 1e-12)


def _activation(config: dict[str, Any]):
  cfg = config.get("text_config") or config
  name = cfg.get("hidden_activation") or cfg.get("hidden_act") or cfg.get("activation_function") or "silu"
  if name in ("silu", "swish"):
    return jax.nn.silu
  if name.startswith("gelu"):
    return functools.partial(jax.nn.gelu, approximate=name != "gelu")
  if name == "relu":
    return jax.nn.relu
  raise CrossLoraError(f"config.json: hidden_act one of silu, gelu*, relu expected by --method anchored, got {name!r}.")


# --- probes and maps ----------------------------------------------------------------


class _Side:
  """One model's probes: what its layers make of the chosen tokens' embeddings."""

  def __init__(self, base, ids: np.ndarray, residual_out: str):
    self.base = base
    self.arch = base.arch
    keys = base.keys() if hasattr(base, "keys") else None
    embed = np.asarray(base.tensor(self.arch.embed_key(keys)))
    # RMSNorm (LayerNorm for GPT-2) is scale free: Gemma's √hidden factor drops out here.
    rows = embed[ids].astype(np.float32)
    if self.arch.spec.conv1d:  # GPT-2 LayerNorm also centres
      rows = rows - rows.mean(axis=1, keepdims=True)
    self.x = _rms_rows(rows)
    self.out_probe = self.x
    if residual_out == "lm_head":
      head = "lm_head.weight"
      table = np.asarray(base.tensor(head))[ids] if base.has(head) else rows
      final = self._final_norm_gain()
      self.out_probe = _rms_rows(np.asarray(table, np.float32) * final[None, :])
    self.act = _activation(getattr(base, "config", {}) or {})
    self._memo: dict[tuple[int, str], np.ndarray] = {}

  def _final_norm_gain(self) -> np.ndarray:
    for key in ("model.norm.weight", "model.language_model.norm.weight", "transformer.ln_f.weight"):
      if self.base.has(key):
        return np.asarray(self.base.tensor(key), np.float32) + self.arch.spec.norm_offset
    return np.ones(self.arch.hidden, np.float32)

  def _gain(self, layer: int, which: str) -> np.ndarray:
    key = self.arch.norm_key(layer, which)
    if not self.base.has(key):
      return np.ones(self.arch.hidden, np.float32)
    return np.asarray(self.base.tensor(key), np.float32) + self.arch.spec.norm_offset

  def _w(self, layer: int, module: str) -> np.ndarray:
    return np.asarray(self.base.weight(layer, module), np.float32)

  def probe(self, layer: int, name: str) -> np.ndarray:
    """(N, dim) probe of one space: 'in:<module>' (what it reads) or 'out:<module>' (what it writes)."""
    key = (layer, name)
    if key in self._memo:
      return self._memo[key]
    side, module = name.split(":")
    in_space, out_space = SPACES[module]
    if side == "in" and in_space == RESIDUAL:
      value = self.x * self._gain(layer, INPUT_NORM[module])[None, :]
    elif side == "out" and out_space == RESIDUAL:
      value = self.out_probe
    elif module in ("q_proj", "k_proj", "v_proj"):  # out: heads
      value = self.probe(layer, f"in:{module}") @ self._w(layer, module).T
    elif module == "o_proj":  # in: v expanded to query heads by GQA group
      v = self.probe(layer, "out:v_proj").reshape(len(self.x), self.arch.num_kv_heads, self.arch.head_dim)
      value = np.repeat(v, self.arch.num_heads // self.arch.num_kv_heads, axis=1).reshape(len(self.x), -1)
    else:  # the FFN activation: one space for gate/up outputs and down's input
      value = self.ffn(layer)
    self._memo[key] = value
    return value

  def ffn(self, layer: int) -> np.ndarray:
    key = (layer, "ffn")
    if key not in self._memo:
      r = self.probe(layer, "in:up_proj")
      up = r @ self._w(layer, "up_proj").T
      if "gate_proj" in self.arch.modules:
        value = np.asarray(self.act(jnp.asarray(r @ self._w(layer, "gate_proj").T))) * up
      else:
        value = np.asarray(self.act(jnp.asarray(up)))
      self._memo[key] = value
    return self._memo[key]


def _space_name(module: str, side: str) -> str:
  """Probe name: gate/up outputs and down's input share the FFN activation space; modules behind one norm share it."""
  in_space, out_space = SPACES[module]
  space = in_space if side == "in" else out_space
  if space == FFN:
    return "ffn:up_proj"
  if side == "in" and space == RESIDUAL:  # one map per norm: q/k/v read one input, gate/up another
    return "in:q_proj" if INPUT_NORM[module] == "attn" else "in:up_proj"
  return f"{side}:{module}"


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
    self.source = _Side(source, self.ids_s, config.residual_out)
    self.target = _Side(target, self.ids_t, config.residual_out)
    self._maps: dict[tuple[int, int, str], RidgeMap] = {}

  def space_map(self, source_layer: int, target_layer: int, module: str, side: str) -> RidgeMap:
    """S (d_t, d_s) with H_t S ≈ H_s in the space ``module`` reads (side 'in') or writes ('out')."""
    name = _space_name(module, side)
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
                            jnp.asarray(self.source._w(source_layer, module)),
                            jnp.asarray(self.target._w(target_layer, module)),
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


def relative_update_norms(w_s: np.ndarray, w_t: np.ndarray, a_s, b_s, a_t, b_t) -> tuple[float, float]:
  """(‖ΔW_s‖/‖W_s‖, ‖ΔW_t‖/‖W_t‖) without forming ΔW; factors exclude the LoRA scaling."""
  ns = float(_lowrank_fro(jnp.asarray(a_s, jnp.float32), jnp.asarray(b_s, jnp.float32)))
  nt = float(_lowrank_fro(jnp.asarray(a_t, jnp.float32), jnp.asarray(b_t, jnp.float32)))
  ws = float(np.linalg.norm(np.asarray(w_s, np.float32)))
  wt = float(np.linalg.norm(np.asarray(w_t, np.float32)))
  return (ns / ws if ws else 0.0), (nt / wt if wt else 0.0)


__all__: Sequence[str] = ("AnchorConfig", "Anchors", "RidgeMap", "anchors_for", "fit_ridge_map", "project_anchored",
                          "read_vocab", "shared_token_ids")


# --- engine hooks -------------------------------------------------------------------


def project_bucket(anchors: Anchors, module: str, items: Sequence[Any]):
  """Engine hook: the anchored transfer of same-rank work items of one module.

  Returns (kernels.Projected with stacked factors, one report dict per item).
  """
  from crosslora_jax.core import kernels
  a_out, b_out, ratios, infos = [], [], [], []
  for w in items:
    a_t, b_t, info = anchors.transfer(module, w.source_layer, w.target_layer, w.factors.a_ri, w.factors.b_or)
    a_out.append(a_t)
    b_out.append(b_t)
    ratios.append(info.pop("norm_ratio"))
    infos.append(info)
  return kernels.Projected(np.stack(a_out), np.stack(b_out), np.asarray(ratios, np.float32)), infos


def calibrate_bucket(source, target, module: str, items: Sequence[Any], proj, *, apply: bool):
  """Engine hook: norm calibration, for every method.

  Reports ‖ΔW‖/‖W‖ of source and target per item; with ``apply`` each B is rescaled so
  the target's ratio equals the source's (a zero update stays zero). Returns
  (Projected, one report dict per item).
  """
  from crosslora_jax.core import kernels
  a_all, b_all = np.asarray(proj.a_ri), np.array(proj.b_or, np.float32)
  infos = []
  ratios = np.array(proj.norm_ratio, np.float32)
  for row, w in enumerate(items):
    rel_s, rel_t = relative_update_norms(source.weight(w.source_layer, module), target.weight(w.target_layer, module),
                                         w.factors.a_ri, w.factors.b_or, a_all[row], b_all[row])
    rel_s, rel_t = rel_s * w.factors.scaling, rel_t * w.factors.scaling  # as the model applies them
    scale = (rel_s / rel_t if rel_t > 0 else 0.0) if apply else 1.0
    if apply:
      b_all[row] *= scale
      ratios[row] *= scale
    infos.append({"relative_update_source": rel_s, "relative_update_target": rel_t * scale,
                  "calibration_scale": scale if apply else None})
  return kernels.Projected(a_all, b_all, ratios), infos
