"""Per-family model configuration: everything the one forward pass needs, as static data.

:class:`LMConfig` is read from an HF ``config.json`` dict with the defaults the
transformers config class of each family applies, so a folder that omits a
field runs as transformers runs it. It is a frozen, hashable dataclass: pass it
to ``jax.jit`` as a static argument.

>>> cfg = LMConfig.from_config({"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64,
...     "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 100})
>>> cfg.norm, cfg.activation, cfg.gated_mlp, cfg.rope_full.kind, cfg.head_dim
('rms', 'silu', True, 'default', 16)
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
from collections.abc import Mapping
from typing import Any

from crosslora_jax.errors import CrossLoraError
from crosslora_jax.formats.architectures import Architecture
from crosslora_jax.formats.jsonfile import read_object
from crosslora_jax.lm.rope import RopeConfig, rope_from_params

FAMILIES = ("llama", "mistral", "qwen2", "gemma", "gemma2", "gemma3_text", "phi3", "gpt2")
# transformers' ACT2FN names -> the function the forward applies.
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh",
               "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh", "relu": "relu"}
_GEMMA = ("gemma", "gemma2", "gemma3_text")
_DEFAULT_THETA = {"gemma3_text": 1_000_000.0}
_BIG_WINDOW = 1 << 30  # "no window": larger than any context


@dataclasses.dataclass(frozen=True)
class LMConfig:
  """Static description of one causal LM (sizes, layer recipe, rope, masking, special ids)."""

  family: str  # the config's model_type
  arch: Architecture  # weight names and sizes (shared with the transfer)
  vocab_size: int
  hidden: int
  layers: int
  heads: int
  kv_heads: int
  head_dim: int
  ffn: int
  norm: str  # "rms" | "layer" (LayerNorm with bias)
  norm_eps: float
  norm_offset: float  # Gemma RMSNorm multiplies by (1 + gamma)
  activation: str  # "silu" | "gelu" | "gelu_tanh" | "relu"
  gated_mlp: bool  # down(act(gate(x)) * up(x)) rather than down(act(up(x)))
  biased: tuple[str, ...]  # stored module paths ("self_attn.q_proj") that carry a bias
  post_norms: bool  # Gemma-2/3: norms after attention and after the MLP as well
  qk_norm: bool  # Gemma-3: RMSNorm over head_dim on queries and keys
  embed_scale: bool  # Gemma: embeddings times sqrt(hidden), cast to the weight dtype
  learned_positions: bool  # GPT-2 wpe
  max_positions: int
  query_scale: float  # multiplies q·k (head_dim**-0.5 or query_pre_attn_scalar**-0.5)
  scale_by_inverse_layer: bool  # GPT-2 scale_attn_by_inverse_layer_idx
  attn_softcap: float | None
  final_softcap: float | None
  sliding_window: int | None
  layer_sliding: tuple[bool, ...]  # per layer: sliding-window attention (own rope on Gemma-3)
  rope_full: RopeConfig | None  # None: no rotary embedding (GPT-2)
  rope_sliding: RopeConfig | None
  tie_embeddings: bool
  bos_id: int | None
  eos_ids: tuple[int, ...]
  pad_id: int | None

  @classmethod
  def from_folder(cls, folder: str | os.PathLike[str]) -> "LMConfig":
    path = pathlib.Path(folder) / "config.json"
    return cls.from_config(read_object(path, "config.json"), source=str(path))

  @classmethod
  def from_config(cls, config: Mapping[str, Any], *, source: str = "config.json",
                  keys: Any = None) -> "LMConfig":
    """Builds the config from an HF config dict; ``keys`` (the checkpoint's) picks the key prefix."""
    family = config.get("model_type")
    if family not in FAMILIES:
      raise CrossLoraError(f"{source}: model_type expected one of {', '.join(FAMILIES)} for the JAX runtime, "
                           f"got {family!r}. Use a checkpoint of a supported family.")
    arch = Architecture.from_config(config, keys, source=source)
    get = config.get
    if family in ("gemma3_text",) and get("use_bidirectional_attention"):
      raise CrossLoraError(f"{source}: use_bidirectional_attention expected false (a causal LM), got true. "
                           "Use a causal Gemma-3 checkpoint.")
    gpt2 = family == "gpt2"
    activation = _activation(config, family, source)
    layers = arch.num_layers
    window, sliding = _sliding(config, family, layers, source)
    rope_full, rope_sliding = _ropes(config, family, arch, source)
    eos = get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
    default_bos = {"gpt2": 50256, "phi3": 1, "qwen2": None}.get(family, 2 if family in _GEMMA else 1)
    scalar = get("query_pre_attn_scalar", 256 if family in ("gemma2", "gemma3_text") else None)
    return cls(
        family=family, arch=arch, vocab_size=_positive(config, "vocab_size", source),
        hidden=arch.hidden, layers=layers, heads=arch.num_heads, kv_heads=arch.num_kv_heads,
        head_dim=arch.head_dim, ffn=arch.intermediate,
        norm="layer" if gpt2 else "rms",
        norm_eps=float(get("layer_norm_epsilon", 1e-5) if gpt2 else get("rms_norm_eps", _default_eps(family))),
        norm_offset=1.0 if family in _GEMMA else 0.0,
        activation=activation, gated_mlp=not gpt2, biased=_biased(config, family),
        post_norms=family in ("gemma2", "gemma3_text"), qk_norm=family == "gemma3_text",
        embed_scale=family in _GEMMA, learned_positions=gpt2,
        max_positions=_positive(config, "n_positions" if gpt2 else "max_position_embeddings", source,
                                default=1024 if gpt2 else 2048),
        query_scale=(float(scalar) ** -0.5 if scalar else
                     (arch.head_dim ** -0.5 if not gpt2 or get("scale_attn_weights", True) else 1.0)),
        scale_by_inverse_layer=gpt2 and bool(get("scale_attn_by_inverse_layer_idx", False)),
        attn_softcap=_float_or_none(get("attn_logit_softcapping", 50.0 if family == "gemma2" else None)),
        final_softcap=_float_or_none(get("final_logit_softcapping", 30.0 if family == "gemma2" else None)),
        sliding_window=window, layer_sliding=sliding, rope_full=rope_full, rope_sliding=rope_sliding,
        tie_embeddings=bool(get("tie_word_embeddings", gpt2 or family in _GEMMA)),
        bos_id=get("bos_token_id", default_bos), eos_ids=eos_ids, pad_id=get("pad_token_id"),
    )

  def window_for(self, layer: int) -> int:
    """Attention window of ``layer`` in tokens (a huge number when it attends to everything)."""
    return self.sliding_window if self.layer_sliding[layer] and self.sliding_window else _BIG_WINDOW


def _positive(config: Mapping[str, Any], name: str, source: str, default: Any = None) -> int:
  value = config.get(name, default)
  if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
    raise CrossLoraError(f"{source}: {name} expected a positive integer, got {value!r}. Fix config.json.")
  return value


def _float_or_none(value: Any) -> float | None:
  return None if value is None else float(value)


def _default_eps(family: str) -> float:
  return 1e-5 if family == "phi3" else 1e-6


def _activation(config: Mapping[str, Any], family: str, source: str) -> str:
  if family == "gpt2":
    field = "activation_function"
    name = config.get(field, "gelu_new")
  elif family in ("gemma2", "gemma3_text"):
    field = "hidden_activation"
    name = config.get(field) or config.get("hidden_act") or "gelu_pytorch_tanh"
  else:
    field = "hidden_act"
    name = config.get(field, "gelu_pytorch_tanh" if family == "gemma" else "silu")
  if name not in ACTIVATIONS:
    raise CrossLoraError(f"{source}: {field} expected one of {', '.join(sorted(ACTIVATIONS))}, got {name!r}. "
                         "This activation is not implemented in the JAX runtime.")
  return ACTIVATIONS[name]


def _biased(config: Mapping[str, Any], family: str) -> tuple[str, ...]:
  """Stored module paths with a bias vector, by transformers' rules for each family."""
  attn = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
  mlp = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
  if family == "gpt2":
    return ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
  if family == "qwen2":
    return attn[:3]
  out: tuple[str, ...] = ()
  if family in ("llama",) + _GEMMA and config.get("attention_bias"):
    out += attn
  if family == "llama" and config.get("mlp_bias"):
    out += mlp
  return out


def _sliding(config: Mapping[str, Any], family: str, layers: int, source: str) -> tuple[int | None, tuple[bool, ...]]:
  """(window, per-layer flag) as transformers masks: kv attends when q - kv < window."""
  get = config.get
  if family in ("llama", "gemma", "gpt2"):
    return None, (False,) * layers
  if family == "qwen2":
    window = get("sliding_window", 4096) if get("use_sliding_window", False) else None
  elif family == "mistral":
    window = get("sliding_window", 4096)
  elif family == "phi3":
    window = get("sliding_window")
  else:
    window = get("sliding_window", 4096)
  if window is not None and (not isinstance(window, int) or window <= 0):
    raise CrossLoraError(f"{source}: sliding_window expected a positive integer or null, got {window!r}.")
  types = get("layer_types")
  if types is not None:
    if len(types) != layers or any(t not in ("sliding_attention", "full_attention") for t in types):
      raise CrossLoraError(f"{source}: layer_types expected {layers} entries of sliding_attention/full_attention, "
                           f"got {types!r}. Fix config.json.")
    flags = tuple(t == "sliding_attention" for t in types)
  elif family in ("mistral", "phi3"):
    flags = (window is not None,) * layers
  elif family == "qwen2":
    first = get("max_window_layers", 28)
    flags = tuple(window is not None and i >= first for i in range(layers))
  elif family == "gemma2":
    flags = tuple(bool((i + 1) % 2) for i in range(layers))
  else:  # gemma3_text
    pattern = get("sliding_window_pattern", get("_sliding_window_pattern", 6))
    flags = tuple(bool((i + 1) % pattern) for i in range(layers))
  if family in ("mistral", "phi3") and window is not None:
    flags = (True,) * layers  # these mask every layer with the window
  return (window if any(flags) else None), flags


def _ropes(config: Mapping[str, Any], family: str, arch: Architecture, source: str):
  """(rope of full-attention layers, rope of sliding layers); both None for GPT-2."""
  if family == "gpt2":
    return None, None
  get = config.get
  theta = get("rope_theta", _DEFAULT_THETA.get(family, 10_000.0))
  partial = get("partial_rotary_factor", 1.0)
  params = get("rope_parameters") or {}
  scaling = get("rope_scaling")
  original = get("original_max_position_embeddings")
  max_pos = get("max_position_embeddings", 2048)
  common = dict(head_dim=arch.head_dim, max_positions=max_pos, source=source)
  if family == "gemma3_text":
    full = dict(params.get("full_attention") or {"rope_type": "default"})
    local = dict(params.get("sliding_attention") or {"rope_type": "default"})
    if scaling:
      full.update(scaling)
    full.setdefault("rope_theta", theta)
    local.setdefault("rope_theta", get("rope_local_base_freq", 10_000.0))
    return (rope_from_params(full, original=None, **common),
            rope_from_params(local, original=None, **common))
  merged = dict(scaling or params)
  if scaling and params:
    merged = {**params, **scaling}
  merged.setdefault("rope_theta", params.get("rope_theta", theta))
  merged.setdefault("partial_rotary_factor", params.get("partial_rotary_factor", partial))
  if family == "phi3" and merged.get("rope_type", merged.get("type")) in ("su", "yarn"):
    merged["rope_type"] = "longrope"  # Phi-3's config names LongRoPE "su" (and "yarn") too
  rope = rope_from_params(merged, original=original, **common)
  return rope, rope


def check_ids(cfg: LMConfig, ids: Any, where: str = "ids") -> None:
  """Refuses token ids outside the vocabulary (before any tracing)."""
  import numpy as np  # local: keeps this module numpy-free at import for the doctest

  array = np.asarray(ids)
  if array.size and (array.min() < 0 or array.max() >= cfg.vocab_size):
    bad = int(array.max() if array.max() >= cfg.vocab_size else array.min())
    raise CrossLoraError(f"{where}: token ids in [0, {cfg.vocab_size}) expected (vocab_size of the {cfg.family} "
                         f"model), got {bad}. Tokenize with this model's tokenizer.")


def sqrt_hidden(cfg: LMConfig) -> float:
  return math.sqrt(cfg.hidden)
