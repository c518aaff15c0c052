"""Architecture specs as data: which weights a model has and which spaces they join.

This is the only module that knows weight names. Every architecture is described
by the same seven *canonical* modules (``q_proj`` … ``down_proj``, torch (out, in)
orientation); an architecture says where each is stored (key template, fused row
block, Conv1D orientation) and which config fields give its sizes.

>>> arch = Architecture.from_config({"model_type": "llama", "num_hidden_layers": 2,
...     "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
...     "intermediate_size": 128})
>>> arch.shape("k_proj")  # (out, in): kv heads x residual
(32, 64)
>>> arch.module_path(1, arch.stored_for("k_proj")[0])
'model.layers.1.self_attn.k_proj'
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from typing import Any

from crosslora_jax.errors import CrossLoraError

CANONICAL_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Spaces: what each canonical weight reads (input) and writes (output).
RESIDUAL, Q_HEADS, KV_HEADS, ATTN_HEADS, FFN = "residual", "q_heads", "kv_heads", "attn_heads", "ffn"
SPACES: dict[str, tuple[str, str]] = {  # module -> (input space, output space)
    "q_proj": (RESIDUAL, Q_HEADS),
    "k_proj": (RESIDUAL, KV_HEADS),
    "v_proj": (RESIDUAL, KV_HEADS),
    "o_proj": (ATTN_HEADS, RESIDUAL),
    "gate_proj": (RESIDUAL, FFN),
    "up_proj": (RESIDUAL, FFN),
    "down_proj": (FFN, RESIDUAL),
}
# The norm whose output a residual-reading module sees (for anchored maps).
INPUT_NORM = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "gate_proj": "ffn", "up_proj": "ffn"}


@dataclasses.dataclass(frozen=True)
class StoredModule:
  """One nn.Linear (or Conv1D) as stored: a path template and the canonical parts it holds.

  ``parts`` lists the canonical modules whose rows are stacked in this weight, in
  order (Phi-3 ``qkv_proj`` holds ("q_proj", "k_proj", "v_proj")).
  """

  path: str  # relative to the layer prefix, e.g. "self_attn.q_proj"
  parts: tuple[str, ...]

  @property
  def name(self) -> str:
    """The short name PEFT's ``target_modules`` uses (the last path component)."""
    return self.path.rsplit(".", 1)[-1]


@dataclasses.dataclass(frozen=True)
class ArchSpec:
  """Static description of one architecture family."""

  name: str
  model_types: tuple[str, ...]
  layer_prefixes: tuple[str, ...]  # candidates, first one present in the checkpoint wins
  stored: tuple[StoredModule, ...]
  layers_field: str = "num_hidden_layers"
  hidden_field: str = "hidden_size"
  heads_field: str = "num_attention_heads"
  kv_heads_field: str | None = "num_key_value_heads"
  intermediate_field: str = "intermediate_size"
  conv1d: bool = False  # base weights stored (in, out), adapters use fan_in_fan_out
  text_config: bool = False  # sizes live under config["text_config"]
  embed: tuple[str, ...] = ("model.embed_tokens.weight",)
  attn_norm: str = "input_layernorm"
  ffn_norm: str = "post_attention_layernorm"
  norm_offset: float = 0.0  # Gemma RMSNorm multiplies by (1 + gamma)
  embed_scale_sqrt_hidden: bool = False  # Gemma scales embeddings by sqrt(hidden)


_LLAMA_STORED = (
    StoredModule("self_attn.q_proj", ("q_proj",)),
    StoredModule("self_attn.k_proj", ("k_proj",)),
    StoredModule("self_attn.v_proj", ("v_proj",)),
    StoredModule("self_attn.o_proj", ("o_proj",)),
    StoredModule("mlp.gate_proj", ("gate_proj",)),
    StoredModule("mlp.up_proj", ("up_proj",)),
    StoredModule("mlp.down_proj", ("down_proj",)),
)

SPECS: tuple[ArchSpec, ...] = (
    ArchSpec("llama", ("llama", "mistral", "qwen2"), ("model.layers.{layer}.",), _LLAMA_STORED),
    # Gemma 1 keeps llama's two norms per layer; Gemma 2 and 3 add post-norms and read the FFN
    # input from pre_feedforward_layernorm (their post_attention_layernorm normalises attn's output).
    ArchSpec(
        "gemma", ("gemma",), ("model.layers.{layer}.",), _LLAMA_STORED, norm_offset=1.0,
        embed_scale_sqrt_hidden=True),
    ArchSpec(
        "gemma2", ("gemma2", "gemma3_text"), ("model.layers.{layer}.",), _LLAMA_STORED,
        ffn_norm="pre_feedforward_layernorm", norm_offset=1.0, embed_scale_sqrt_hidden=True),
    ArchSpec(
        "gemma3", ("gemma3",),
        ("model.language_model.layers.{layer}.", "language_model.model.layers.{layer}."),
        _LLAMA_STORED, text_config=True,
        embed=("model.language_model.embed_tokens.weight", "language_model.model.embed_tokens.weight"),
        ffn_norm="pre_feedforward_layernorm", norm_offset=1.0, embed_scale_sqrt_hidden=True),
    ArchSpec(
        "phi3", ("phi3",), ("model.layers.{layer}.",),
        (
            StoredModule("self_attn.qkv_proj", ("q_proj", "k_proj", "v_proj")),
            StoredModule("self_attn.o_proj", ("o_proj",)),
            StoredModule("mlp.gate_up_proj", ("gate_proj", "up_proj")),
            StoredModule("mlp.down_proj", ("down_proj",)),
        )),
    ArchSpec(
        "gpt2", ("gpt2",), ("transformer.h.{layer}.", "h.{layer}."),
        (
            StoredModule("attn.c_attn", ("q_proj", "k_proj", "v_proj")),
            StoredModule("attn.c_proj", ("o_proj",)),
            StoredModule("mlp.c_fc", ("up_proj",)),
            StoredModule("mlp.c_proj", ("down_proj",)),
        ),
        layers_field="n_layer", hidden_field="n_embd", heads_field="n_head", kv_heads_field=None,
        intermediate_field="n_inner", conv1d=True, embed=("transformer.wte.weight", "wte.weight"),
        attn_norm="ln_1", ffn_norm="ln_2"),
)
_BY_MODEL_TYPE = {t: spec for spec in SPECS for t in spec.model_types}
SUPPORTED_MODEL_TYPES = tuple(sorted(_BY_MODEL_TYPE))


@dataclasses.dataclass(frozen=True)
class Architecture:
  """An ArchSpec bound to one model's config (sizes) and key naming (prefix)."""

  spec: ArchSpec
  model_type: str
  num_layers: int
  hidden: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  intermediate: int
  layer_prefix: str  # e.g. "model.layers.{layer}."

  @classmethod
  def from_config(cls, config: Mapping[str, Any], keys: Iterable[str] | None = None,
                  source: str = "config.json") -> "Architecture":
    """Reads sizes from an HF config dict; ``keys`` (the checkpoint's) picks the prefix."""
    model_type = config.get("model_type")
    spec = _BY_MODEL_TYPE.get(model_type) if isinstance(model_type, str) else None
    if spec is None:
      raise CrossLoraError(
          f"{source}: model_type expected one of {', '.join(SUPPORTED_MODEL_TYPES)}, "
          f"got {model_type!r}. Use a checkpoint of a supported architecture.")
    cfg = config.get("text_config") or {} if spec.text_config else config
    if spec.text_config and not cfg:
      raise CrossLoraError(f"{source}: text_config expected for model_type {model_type!r}, got none.")
    where = f"{source}" + (" text_config" if spec.text_config else "")

    def field(name: str, default: Any = None) -> int:
      value = cfg.get(name)
      value = default if value is None else value
      if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise CrossLoraError(
            f"{where}: {name} expected a positive integer (needed by {spec.name} checkpoints), "
            f"got {value!r}. Fix config.json.")
      return value

    num_layers = field(spec.layers_field)
    hidden = field(spec.hidden_field)
    num_heads = field(spec.heads_field)
    num_kv = field(spec.kv_heads_field, num_heads) if spec.kv_heads_field else num_heads
    head_dim = cfg.get("head_dim") or hidden // num_heads
    head_dim = field("head_dim", head_dim)
    intermediate = field(spec.intermediate_field, 4 * hidden if spec.conv1d else None)  # GPT-2: n_inner=None
    prefix = spec.layer_prefixes[0]
    if keys is not None:
      keys = set(keys)
      probe = spec.stored[0]
      for candidate in spec.layer_prefixes:
        if candidate.format(layer=0) + probe.path + ".weight" in keys:
          prefix = candidate
          break
    return cls(spec, model_type, num_layers, hidden, num_heads, num_kv, head_dim, intermediate, prefix)

  # --- sizes -------------------------------------------------------------------
  def space_dim(self, space: str) -> int:
    return {
        RESIDUAL: self.hidden,
        Q_HEADS: self.num_heads * self.head_dim,
        ATTN_HEADS: self.num_heads * self.head_dim,
        KV_HEADS: self.num_kv_heads * self.head_dim,
        FFN: self.intermediate,
    }[space]

  def shape(self, module: str) -> tuple[int, int]:
    """Canonical (out, in) shape of one module's weight."""
    in_space, out_space = SPACES[module]
    return self.space_dim(out_space), self.space_dim(in_space)

  @property
  def modules(self) -> tuple[str, ...]:
    """Canonical modules this architecture has, in canonical order."""
    present = {p for s in self.spec.stored for p in s.parts}
    return tuple(m for m in CANONICAL_MODULES if m in present)

  # --- names -------------------------------------------------------------------
  def stored_for(self, module: str) -> tuple[StoredModule, slice]:
    """The stored weight holding canonical ``module`` and its row block (torch orientation)."""
    for stored in self.spec.stored:
      if module in stored.parts:
        start = 0
        for part in stored.parts:
          rows = self.shape(part)[0]
          if part == module:
            return stored, slice(start, start + rows)
          start += rows
    raise KeyError(module)

  def stored_shape(self, stored: StoredModule) -> tuple[int, int]:
    """(out, in) shape of a stored module, fused parts stacked along out."""
    shapes = [self.shape(p) for p in stored.parts]
    return sum(s[0] for s in shapes), shapes[0][1]

  def module_path(self, layer: int, stored: StoredModule) -> str:
    return self.layer_prefix.format(layer=layer) + stored.path

  def weight_key(self, layer: int, stored: StoredModule) -> str:
    return self.module_path(layer, stored) + ".weight"

  def parse_module_path(self, path: str) -> tuple[int, StoredModule] | None:
    """Inverse of module_path: ``model.layers.3.self_attn.q_proj`` -> (3, q_proj's StoredModule)."""
    match = self._path_re.fullmatch(path)
    if match is None:
      return None
    layer = int(match.group("layer"))
    for stored in self.spec.stored:
      if stored.path == match.group("path"):
        return layer, stored
    return None

  @property
  def _path_re(self) -> re.Pattern[str]:
    prefix = re.escape(self.layer_prefix).replace(re.escape("{layer}"), r"(?P<layer>\d+)")
    paths = "|".join(re.escape(s.path) for s in self.spec.stored)
    return re.compile(prefix + f"(?P<path>{paths})")

  def norm_key(self, layer: int, which: str) -> str:
    """Key of the RMSNorm/LayerNorm gain in front of 'attn' or 'ffn' inputs."""
    name = self.spec.attn_norm if which == "attn" else self.spec.ffn_norm
    return self.layer_prefix.format(layer=layer) + name + ".weight"

  def embed_key(self, keys: Iterable[str] | None = None) -> str:
    if keys is None:
      return self.spec.embed[0]
    keys = set(keys)
    for key in self.spec.embed:
      if key in keys:
        return key
    return self.spec.embed[0]


def to_out_in(weight: Any, *, conv1d: bool) -> Any:
  """Stored base weight -> torch (out, in) orientation (Conv1D stores (in, out))."""
  return weight.T if conv1d else weight

