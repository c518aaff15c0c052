"""``train_lora``: LoRA factors trained on a frozen base in JAX, returned as a PEFT adapter.

The loop itself (optimizer, schedule, accumulation, compile, progress) is
:mod:`crosslora_jax.lm.loop`; this module turns a loaded :class:`~crosslora_jax.lm.LM`
and token blocks into batches and a loss, and the result into a PeftAdapter
written through ``formats.adapter_io.save_adapter`` (atomic, verified).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from crosslora_jax.errors import CrossLoraError
from crosslora_jax.lm.loop import Batch, FitResult, LossFn, TrainConfig, fit, make_optimizer, make_schedule
from crosslora_jax.progress import Progress

__all__ = ["Batch", "FitResult", "LossFn", "TrainConfig", "TrainResult", "block_sampler", "fit", "make_optimizer",
           "make_schedule", "train_lora", "weighted_nll_loss"]


@dataclasses.dataclass
class TrainResult:
  """A trained LoRA: the factors, their PEFT form, and how the run went."""

  adapter: Any  # formats.peft_format.PeftAdapter (float32 factors)
  lora: Any  # LoraParams, jax arrays
  spec: Any  # LoraSpec
  losses: list[float]  # one per step: the batch loss before that step's update
  seconds: float  # training steps, compile excluded
  compile_seconds: float
  tokens_per_second: float  # sequence tokens through the step per second, steady state
  memory_bytes: int  # compiled step buffers (arguments incl. the base, outputs, temporaries)
  grad_norms: list[float] = dataclasses.field(default_factory=list)
  path: pathlib.Path | None = None  # where it was saved, if anywhere

  def save(self, folder: str | os.PathLike[str], *, dtype: str = "float32", overwrite: bool = False,
           target: Any = None) -> pathlib.Path:
    """Writes the adapter with ``formats.adapter_io.save_adapter`` (atomic, verified)."""
    from crosslora_jax.formats.adapter_io import save_adapter  # pylint: disable=import-outside-toplevel

    self.path = save_adapter(self.adapter, folder, dtype=dtype, overwrite=overwrite, target=target)
    return self.path


def _block_data(cfg: Any, data: Any, weights: Any, where: str = "data") -> tuple[np.ndarray, np.ndarray]:
  """(N, T) int32 token blocks and (N, T) float32 weights, checked before anything is traced."""
  from crosslora_jax.lm.config import check_ids  # pylint: disable=import-outside-toplevel

  blocks = np.asarray(data)
  if blocks.ndim != 2 or blocks.shape[0] == 0 or blocks.shape[1] < 2:
    raise CrossLoraError(f"{where}: token blocks of shape (n_blocks >= 1, length >= 2) expected, got shape "
                         f"{blocks.shape}. Pass tokenized training text cut into equal blocks.")
  if not np.issubdtype(blocks.dtype, np.integer):
    raise CrossLoraError(f"{where}: integer token ids expected, got dtype {blocks.dtype}. Tokenize the text first.")
  check_ids(cfg, blocks, where)
  if weights is None:
    return blocks.astype(np.int32), np.ones(blocks.shape, np.float32)
  weights = np.asarray(weights, np.float32)
  if weights.shape != blocks.shape:
    raise CrossLoraError(f"weights: shape {blocks.shape} (like {where}; weights[:, t] weighs predicting token t) "
                         f"expected, got {weights.shape}.")
  if not np.isfinite(weights).all() or (weights < 0).any() or not (weights[:, 1:] > 0).any():
    raise CrossLoraError("weights: finite values >= 0 with some target (column >= 1) above 0 expected, got "
                         f"min {np.nanmin(weights):g}, max {np.nanmax(weights):g}. Fix the loss weights.")
  return blocks.astype(np.int32), weights


def block_sampler(blocks: np.ndarray, weights: np.ndarray, config: TrainConfig) -> Callable[[int], Batch]:
  """Step i's batch: ``config.batch`` blocks drawn uniformly with replacement (seeded by ``config.seed``)."""
  index = np.random.default_rng(config.seed).integers(0, blocks.shape[0], size=(config.steps, config.batch))
  return lambda step: {"ids": blocks[index[step]], "weights": weights[index[step]]}


def _batch_source(cfg: Any, data: Any, weights: Any, config: TrainConfig) -> Callable[[int], Batch]:
  """Token blocks (sampled), a sequence of batch dicts (cycled), or a callable step -> batch."""
  if callable(data):
    return data
  if isinstance(data, Sequence) and data and isinstance(data[0], dict):
    if weights is not None:
      raise CrossLoraError("weights: None expected with a list of batches, got an array. "
                           "Put each batch's weights under its 'weights' key.")
    for number, batch in enumerate(data):
      if "ids" in batch:
        _block_data(cfg, batch["ids"], batch.get("weights"), where=f"data[{number}]['ids']")
    return lambda step: data[step % len(data)]
  if isinstance(data, Sequence) and not data:
    raise CrossLoraError("data: training batches or token blocks expected, got an empty sequence. "
                         "Pass at least one block.")
  return block_sampler(*_block_data(cfg, data, weights), config)


def weighted_nll_loss(lm: Any) -> LossFn:
  """(lora, batch, params) -> (Σ w·nll, Σ w) over targets; batch = ids (B, T), weights (B, T), mask (B, T)?"""
  from crosslora_jax.lm import model  # pylint: disable=import-outside-toplevel

  cfg, vocab_chunk = lm.config, getattr(lm, "vocab_chunk", model.DEFAULT_VOCAB_CHUNK)

  def loss(lora, batch, params, spec):
    mask = batch.get("mask")
    logprobs = model.token_logprobs(params, lora, spec, cfg, batch["ids"], mask, vocab_chunk=vocab_chunk)
    target_weights = batch["weights"][:, 1:].astype(jnp.float32) if "weights" in batch else \
        jnp.ones(logprobs.shape, jnp.float32)
    if mask is not None:
      target_weights = target_weights * mask[:, 1:].astype(jnp.float32)
    return -(logprobs * target_weights).sum(), target_weights.sum()

  return loss


def _initial_lora(lm: Any, init: Any, spec: Any, seed: int) -> tuple[Any, Any]:
  from crosslora_jax.lm.lora import init_lora  # pylint: disable=import-outside-toplevel

  if init is not None:
    spec = spec if spec is not None else lm.spec
    if spec is None:
      raise CrossLoraError("spec: the LoraSpec of init expected, got None (and lm has no LoRA). "
                           "Pass the spec the factors were made with.")
    return init, spec
  if spec is not None:
    return init_lora(lm.config, spec, jax.random.fold_in(jax.random.key(seed), 0)), spec
  if lm.lora is not None:
    return lm.lora, lm.spec
  raise CrossLoraError("spec: a LoraSpec (the LoRA to train) expected when lm has no LoRA and init is None, "
                       "got None. Pass spec=LoraSpec(r=16, alpha=32) or load lm with an adapter.")


def train_lora(lm: Any, data: Any, config: TrainConfig | None = None, *, weights: Any = None, init: Any = None,
               spec: Any = None, loss_fn: LossFn | None = None, progress: Progress = True,
               output: str | os.PathLike[str] | None = None, overwrite: bool = False,
               save_dtype: str = "float32") -> TrainResult:
  """Trains LoRA factors on ``lm``'s frozen base and returns them as a PEFT adapter.

  ``data``: (N, T) token blocks (+ ``weights`` (N, T), the weight of predicting
  token t), drawn ``config.batch`` at a time with replacement; or a list of batch
  dicts used in turn; or a callable ``step -> batch``. The LoRA starts from
  ``init`` (with ``spec`` or ``lm.spec``), else PEFT's init of ``spec``, else
  ``lm``'s own LoRA. ``loss_fn(lora, batch)`` or ``loss_fn(lora, batch, params)``
  replaces the weighted next-token NLL; it returns a scalar or a
  ``(numerator, denominator)`` pair. With ``output`` the adapter is written
  there (checked before training, written atomically and verified after).
  """
  from crosslora_jax.formats.adapter_io import check_output_path  # pylint: disable=import-outside-toplevel
  from crosslora_jax.lm.lora import lora_to_peft  # pylint: disable=import-outside-toplevel

  config = TrainConfig() if config is None else config
  if output is not None:
    check_output_path(output, overwrite=overwrite, flag="output")
  lora, spec = _initial_lora(lm, init, spec, config.seed)
  next_batch = _batch_source(lm.config, data, weights, config)
  name = lm.folder.name if getattr(lm, "folder", None) is not None else "model"
  step_key = None
  if loss_fn is None:
    step_key = ("weighted_nll", lm.config, spec, getattr(lm, "vocab_chunk", None))
    nll = weighted_nll_loss(lm)
    loss_fn = lambda lora_, batch, params: nll(lora_, batch, params, spec)  # noqa: E731
  fitted = fit(loss_fn, lora, next_batch, config, params=lm.params, progress=progress, description=f"train {name}",
               step_key=step_key)
  base_name = str(lm.folder) if getattr(lm, "folder", None) is not None else ""
  adapter = lora_to_peft(fitted.lora, spec, base_model_name_or_path=base_name)
  first_leaf = jax.tree.leaves(next_batch(0))[0]
  tokens_per_step = config.batch * (np.shape(first_leaf)[1] if np.ndim(first_leaf) > 1 else 1)
  result = TrainResult(adapter=adapter, lora=fitted.lora, spec=spec, losses=fitted.losses, seconds=fitted.seconds,
                       compile_seconds=fitted.compile_seconds,
                       tokens_per_second=config.steps * tokens_per_step / max(fitted.seconds, 1e-9),
                       memory_bytes=fitted.memory_bytes, grad_norms=fitted.grad_norms)
  if output is not None:
    result.save(output, dtype=save_dtype, overwrite=overwrite, target=lm.config.arch)
  return result
