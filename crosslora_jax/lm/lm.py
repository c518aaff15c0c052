"""``load`` and :class:`LM`: a loaded model (+ LoRA) with jitted scoring and sampling.

Inputs are checked in Python before anything is traced (ids inside the
vocabulary, lengths inside the context); the jitted functions take the config
and LoRA spec as static arguments, so a second call of the same shapes reuses
the compiled program.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from crosslora_jax.errors import CrossLoraError
from crosslora_jax.formats import peft_format
from crosslora_jax.formats.checkpoint import Checkpoint
from crosslora_jax.lm import model
from crosslora_jax.lm.config import LMConfig, check_ids
from crosslora_jax.lm.lora import LoraParams, LoraSpec, lora_from_peft, lora_to_peft
from crosslora_jax.lm.params import load_params, param_dtype


@functools.partial(jax.jit, static_argnames=("cfg", "spec"))
def _logits(params, lora, ids, mask, *, cfg, spec):
  return model.logits(params, lora, spec, cfg, ids, kv_mask=mask)


@functools.partial(jax.jit, static_argnames=("cfg", "spec", "vocab_chunk"))
def _token_logprobs(params, lora, ids, mask, *, cfg, spec, vocab_chunk):
  return model.token_logprobs(params, lora, spec, cfg, ids, mask, vocab_chunk=vocab_chunk)


@dataclasses.dataclass(frozen=True)
class LM:
  """A base model in JAX, optionally with a LoRA (factors ``lora``, settings ``spec``)."""

  config: LMConfig
  params: dict[str, Any]
  lora: LoraParams | None = None
  spec: LoraSpec | None = None
  folder: pathlib.Path | None = None
  dtype: str = "float32"
  vocab_chunk: int = model.DEFAULT_VOCAB_CHUNK

  # --- inputs -------------------------------------------------------------------
  def check_batch(self, ids: Any, mask: Any = None, *, where: str = "ids") -> tuple[jnp.ndarray, jnp.ndarray | None]:
    """(B, T) int32 ids (a list of equal-length lists or an array) and an optional (B, T) mask."""
    array = np.asarray(ids)
    if array.ndim == 1:
      array = array[None]
    if array.ndim != 2 or array.shape[1] < 1 or not np.issubdtype(array.dtype, np.integer):
      raise CrossLoraError(f"{where}: token ids of shape (batch, length) expected, got {array.shape} {array.dtype}. "
                           "Pad rows to one length and pass a mask.")
    check_ids(self.config, array, where)
    if array.shape[1] > self.config.max_positions:
      raise CrossLoraError(f"{where}: at most {self.config.max_positions} tokens expected (the model's context, "
                           f"max_position_embeddings), got {array.shape[1]}. Cut the text into shorter blocks.")
    if mask is not None:
      mask = np.asarray(mask)
      mask = mask[None] if mask.ndim == 1 else mask
      if mask.shape != array.shape:
        raise CrossLoraError(f"mask: shape {array.shape} (like ids) expected, got {mask.shape}.")
      mask = jnp.asarray(mask.astype(bool))
    return jnp.asarray(array.astype(np.int32)), mask

  # --- scoring ------------------------------------------------------------------
  def logits(self, ids: Any, mask: Any = None) -> jnp.ndarray:
    """(B, T, V) float32 next-token logits."""
    ids, mask = self.check_batch(ids, mask)
    return _logits(self.params, self.lora, ids, mask, cfg=self.config, spec=self.spec)

  def token_logprobs(self, ids: Any, mask: Any = None) -> jnp.ndarray:
    """(B, T-1) float32 log-probabilities of each next token (0 at targets model.target_mask leaves out)."""
    ids, mask = self.check_batch(ids, mask)
    if ids.shape[1] < 2:
      raise CrossLoraError(f"ids: at least 2 tokens per row expected to score a next token, got {ids.shape[1]}.")
    return _token_logprobs(self.params, self.lora, ids, mask, cfg=self.config, spec=self.spec,
                           vocab_chunk=self.vocab_chunk)

  def nll(self, ids: Any, mask: Any = None) -> jnp.ndarray:
    """(B,) mean next-token NLL in nats over each row's real targets."""
    logprobs = self.token_logprobs(ids, mask)
    mask = None if mask is None else self.check_batch(ids, mask)[1]
    return model.mean_nll(logprobs, mask)

  # --- sampling -----------------------------------------------------------------
  def generate(self, prompt_ids: Any, **kwargs: Any) -> list[list[int]]:
    """New tokens per prompt; see :func:`crosslora_jax.lm.sample.generate`."""
    from crosslora_jax.lm.sample import generate  # pylint: disable=import-outside-toplevel

    return generate(self, prompt_ids, **kwargs)

  # --- variants -----------------------------------------------------------------
  def with_lora(self, lora: LoraParams | None, spec: LoraSpec | None) -> "LM":
    """The same base with other LoRA factors (None, None: the bare base)."""
    if (lora is None) != (spec is None):
      raise CrossLoraError("with_lora: lora and spec expected together (or both None).")
    return dataclasses.replace(self, lora=lora, spec=spec)

  def with_adapter(self, adapter: str | os.PathLike[str] | peft_format.PeftAdapter) -> "LM":
    """The same base with a PEFT adapter (a folder or a PeftAdapter)."""
    if not isinstance(adapter, peft_format.PeftAdapter):
      adapter = peft_format.read_adapter(adapter)
    lora, spec = lora_from_peft(adapter, self.config)
    return self.with_lora(lora, spec)

  def adapter(self) -> peft_format.PeftAdapter:
    """The LoRA as a PeftAdapter for this base (write it with ``save_adapter``)."""
    if self.lora is None:
      raise CrossLoraError("LM.adapter: a LoRA expected (load with adapter=... or use with_lora), got none.")
    name = str(self.config_name_or_path())
    return lora_to_peft(self.lora, self.spec, base_model_name_or_path=name, cfg=self.config)

  def save_adapter(self, folder: str | os.PathLike[str], *, overwrite: bool = False) -> pathlib.Path:
    """Writes the LoRA as a PEFT folder, atomically and verified (``formats.adapter_io.save_adapter``)."""
    from crosslora_jax.formats.adapter_io import save_adapter  # pylint: disable=import-outside-toplevel

    return save_adapter(self.adapter(), folder, overwrite=overwrite, target=self.config.arch)

  def config_name_or_path(self) -> str:
    return str(self.folder.resolve()) if self.folder is not None else self.config.family

  @functools.cached_property
  def tokenizer(self) -> Any:
    """The folder's tokenizer (``crosslora_jax.lm.tokenizer.Tokenizer``), loaded on first use."""
    if self.folder is None:
      raise CrossLoraError("LM.tokenizer: a model loaded from a folder expected (this one has none).")
    from crosslora_jax.lm.tokenizer import Tokenizer  # pylint: disable=import-outside-toplevel

    return Tokenizer.from_folder(self.folder)


def load(folder: str | os.PathLike[str], adapter: str | os.PathLike[str] | peft_format.PeftAdapter | None = None,
         dtype: str = "float32") -> LM:
  """Reads an HF model folder (and a PEFT adapter) into an :class:`LM`; base in ``dtype``."""
  param_dtype(dtype)  # refuse a bad dtype before reading anything
  checkpoint = Checkpoint(folder)
  cfg = LMConfig.from_config(checkpoint.config, source=str(checkpoint.path / "config.json"),
                             keys=checkpoint.keys())
  lm = LM(cfg, load_params(checkpoint, cfg, dtype), folder=checkpoint.path, dtype=dtype)
  return lm if adapter is None else lm.with_adapter(adapter)
