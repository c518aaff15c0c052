"""Training LoRA factors in JAX: optax AdamW, warm-up + cosine/constant, clipping, accumulation.

The trainable pytree is the LoRA (``{module_path: {"a": (r, in), "b": (out, r)}}``,
float32); the base weights stay frozen and enter the jitted step as an argument,
never as a closed-over constant (XLA would copy a constant into the executable:
2 GB for a 0.5B model in float32).

One optimizer step sees ``config.batch`` sequences, split into ``grad_accum``
equal microbatches that a ``lax.scan`` runs one after the other, so activations
are held for one microbatch only. A loss is a pair ``(numerator, denominator)``
summed over microbatches before the division, so accumulated gradients equal the
full batch's (up to float rounding): the default loss is ``(Σ w·nll, Σ w)`` over
the target tokens.

Runs are deterministic for ``config.seed``: the LoRA init key and the numpy
generator that draws training blocks both derive from it, and XLA on CPU runs
the same program the same way.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
import pathlib
import sys
import time
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from crosslora_jax.errors import CrossLoraError, collect_and_raise

SCHEDULES = ("cosine", "constant")
Batch = dict[str, Any]  # {"ids": (B, T) int32, "weights": (B, T) float32, ...}; leaves share the leading B axis
LossFn = Callable[..., Any]  # (lora, batch[, params]) -> scalar or (numerator, denominator)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimizer and loop settings (the LoRA shape lives in the LoraSpec)."""

  steps: int = 100
  batch: int = 8  # sequences per optimizer step, all microbatches together
  lr: float = 1e-4
  warmup: int | None = None  # linear warm-up steps; None = max(1, steps // 10)
  schedule: str = "cosine"  # after warm-up: "cosine" decay to 0, or "constant"
  weight_decay: float = 0.0
  clip_norm: float | None = 1.0  # global gradient-norm clip; None = off
  grad_accum: int = 1  # microbatches per step; batch must divide by it
  seed: int = 0
  log_every: int = 10
  memory_budget_gb: float | None = None  # refuse a step whose compiled footprint exceeds it
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8

  def __post_init__(self):
    problems = []
    for name in ("steps", "batch", "grad_accum", "log_every"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        problems.append(f"TrainConfig.{name}: a positive integer expected, got {value!r}")
    if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
      problems.append(f"TrainConfig.lr: a positive finite number expected, got {self.lr!r}")
    if self.schedule not in SCHEDULES:
      problems.append(f"TrainConfig.schedule: one of {', '.join(SCHEDULES)} expected, got {self.schedule!r}")
    if self.warmup is not None and (not isinstance(self.warmup, int) or self.warmup < 0):
      problems.append(f"TrainConfig.warmup: a step count >= 0 or None expected, got {self.warmup!r}")
    if self.clip_norm is not None and not self.clip_norm > 0:
      problems.append(f"TrainConfig.clip_norm: a positive number or None expected, got {self.clip_norm!r}")
    if self.memory_budget_gb is not None and not self.memory_budget_gb > 0:
      problems.append(f"TrainConfig.memory_budget_gb: a positive number of GB or None expected, "
                      f"got {self.memory_budget_gb!r}")
    if self.weight_decay < 0:
      problems.append(f"TrainConfig.weight_decay: a number >= 0 expected, got {self.weight_decay!r}")
    if not problems and self.batch % self.grad_accum:
      problems.append(f"TrainConfig.grad_accum: a divisor of batch={self.batch} expected, got {self.grad_accum}")
    collect_and_raise([p + ". Fix the value." for p in problems])

  @property
  def warmup_steps(self) -> int:
    return max(1, self.steps // 10) if self.warmup is None else self.warmup


def make_schedule(config: TrainConfig) -> optax.Schedule:
  """lr · factor(step): (step + 1) / warmup during warm-up, then cosine to 0 or constant.

  The same factor as torch's LambdaLR in the repository's torch recipe, so the
  first step already moves (lr / warmup) and the last cosine step is near 0.
  """
  warmup, steps, peak = config.warmup_steps, config.steps, config.lr

  def schedule(count):
    count = jnp.asarray(count, jnp.float32)
    ramp = (count + 1.0) / max(warmup, 1)
    if config.schedule == "constant":
      after = jnp.ones_like(count)
    else:
      after = 0.5 * (1.0 + jnp.cos(jnp.pi * (count - warmup) / max(1, steps - warmup)))
    return peak * jnp.where(count < warmup, ramp, after)

  return schedule


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
  """Clip by global norm (optional), then AdamW with the schedule (decoupled weight decay)."""
  adamw = optax.adamw(make_schedule(config), b1=config.b1, b2=config.b2, eps=config.eps,
                      weight_decay=config.weight_decay)
  if config.clip_norm is None:
    return adamw
  return optax.chain(optax.clip_by_global_norm(config.clip_norm), adamw)


def _as_pair(value: Any) -> tuple[jax.Array, jax.Array]:
  """A loss result as (numerator, denominator): a scalar counts as (loss, 1) per microbatch."""
  if isinstance(value, tuple) and len(value) == 2:
    return jnp.asarray(value[0], jnp.float32), jax.lax.stop_gradient(jnp.asarray(value[1], jnp.float32))
  return jnp.asarray(value, jnp.float32), jnp.ones((), jnp.float32)


def _takes_params(loss_fn: LossFn) -> bool:
  try:
    parameters = inspect.signature(loss_fn).parameters.values()
  except (TypeError, ValueError):
    return False
  positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
  return len(positional) >= 3 or any(p.kind == p.VAR_POSITIONAL for p in parameters)


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, grad_accum: int) -> Callable:
  """(lora, opt_state, params, batch) -> (lora, opt_state, loss, grad_norm), to be jitted.

  ``loss_fn(lora, batch, params)`` returns a scalar or ``(numerator, denominator)``;
  with ``grad_accum`` > 1 every leaf of ``batch`` (B, ...) is cut into
  (grad_accum, B / grad_accum, ...) and scanned.
  """

  def numerator_and_denominator(lora, batch, params):
    numerator, denominator = _as_pair(loss_fn(lora, batch, params))
    return numerator, denominator

  grad_fn = jax.value_and_grad(numerator_and_denominator, has_aux=True)

  def step(lora, opt_state, params, batch):
    if grad_accum == 1:
      (numerator, denominator), grads = grad_fn(lora, batch, params)
    else:
      micro = jax.tree.map(lambda x: x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:]), batch)

      def accumulate(carry, microbatch):
        grads_sum, numerator_sum, denominator_sum = carry
        (numerator, denominator), grads = grad_fn(lora, microbatch, params)
        grads_sum = jax.tree.map(jnp.add, grads_sum, grads)
        return (grads_sum, numerator_sum + numerator, denominator_sum + denominator), None

      zeros = jax.tree.map(jnp.zeros_like, lora)
      (grads, numerator, denominator), _ = jax.lax.scan(
          accumulate, (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)), micro)
    grads = jax.tree.map(lambda g: g / denominator, grads)
    updates, opt_state = optimizer.update(grads, opt_state, lora)
    return optax.apply_updates(lora, updates), opt_state, numerator / denominator, optax.global_norm(grads)

  return step


@dataclasses.dataclass
class FitResult:
  lora: Any
  losses: list[float]  # the loss of each step, before its update
  grad_norms: list[float]  # before clipping
  seconds: float  # the steps, compile excluded
  compile_seconds: float
  memory_bytes: int  # the compiled step's argument + output + temporary buffers


_COMPILED: dict[Hashable, tuple[Any, int]] = {}  # (step key, argument avals) -> (executable, bytes)
_COMPILED_MAX = 8


def _avals(*trees: Any) -> Hashable:
  leaves, treedef = jax.tree.flatten(trees)
  return treedef, tuple((np.shape(x), jnp.result_type(x)) for x in leaves)


def _compile(make_step: Callable[[], Callable], key: Hashable | None, args: tuple, config: TrainConfig):
  """AOT-compiles the step (reused for an equal ``key`` and equal shapes); refuses it over the memory budget."""
  start = time.perf_counter()
  cache_key = None if key is None else (key, _avals(*args))
  if cache_key in _COMPILED:
    compiled, used = _COMPILED[cache_key]
  else:
    compiled = jax.jit(make_step(), donate_argnums=(0, 1)).lower(*args).compile()
    stats = compiled.memory_analysis()
    used = 0 if stats is None else int(stats.argument_size_in_bytes + stats.output_size_in_bytes
                                       + stats.temp_size_in_bytes - stats.alias_size_in_bytes)
    if cache_key is not None:
      while len(_COMPILED) >= _COMPILED_MAX:
        _COMPILED.pop(next(iter(_COMPILED)))
      _COMPILED[cache_key] = (compiled, used)
  seconds = time.perf_counter() - start
  budget = config.memory_budget_gb
  if budget is not None and used > budget * 1e9:
    temp = compiled.memory_analysis().temp_size_in_bytes
    fixed = used - temp
    fits = [a for a in range(config.grad_accum, config.batch + 1)
            if config.batch % a == 0 and fixed + temp * config.grad_accum / a <= budget * 1e9]
    fix = (f"Raise grad_accum to {fits[0]}" if fits else "Lower the batch or the sequence length") + \
        " or raise memory_budget_gb."
    raise CrossLoraError(f"TrainConfig.memory_budget_gb: a train step within {budget:g} GB expected, got "
                         f"{used / 1e9:.2f} GB ({fixed / 1e9:.2f} GB weights and state + {temp / 1e9:.2f} GB "
                         f"activations) for batch {config.batch} in {config.grad_accum} microbatch(es). {fix}")
  return compiled, seconds, used


def fit(loss_fn: LossFn, lora: Any, next_batch: Callable[[int], Batch], config: TrainConfig, *,
        params: Any = None, progress: bool = True, description: str = "train",
        step_key: Hashable | None = None) -> FitResult:
  """The training loop over any differentiable ``loss_fn(lora, batch[, params])``.

  ``next_batch(step)`` returns the full batch of that step (numpy or jax leaves
  with a leading ``config.batch`` axis). ``params`` (the frozen base) is passed to
  a 3-argument ``loss_fn`` as a jit argument. ``lora`` is not modified.
  ``step_key``: a hashable that fixes ``loss_fn``'s maths (not an object holding
  arrays); runs with equal keys, optimizer settings and shapes share one compile.
  """
  three = _takes_params(loss_fn)
  loss = loss_fn if three else (lambda lora_, batch_, _params: loss_fn(lora_, batch_))
  optimizer = make_optimizer(config)
  lora = jax.tree.map(lambda x: jnp.array(x, jnp.float32), lora)  # a fresh copy: the step donates it
  opt_state = optimizer.init(lora)
  first = _device_batch(next_batch(0), config)
  step_key = None if step_key is None else (step_key, dataclasses.replace(
      config, seed=0, log_every=1, memory_budget_gb=None))  # the fields that shape the compiled step
  step, compile_seconds, used = _compile(lambda: make_train_step(loss, optimizer, config.grad_accum), step_key,
                                         (lora, opt_state, params, first), config)
  losses, norms = [], []
  bar = _progress_bar(config.steps, description, progress)
  start = time.perf_counter()
  try:
    for index in range(config.steps):
      batch = first if index == 0 else _device_batch(next_batch(index), config)
      lora, opt_state, value, norm = step(lora, opt_state, params, batch)
      losses.append(value)
      norms.append(norm)
      if (index + 1) % config.log_every == 0 or index + 1 == config.steps:
        recent = np.asarray(jax.device_get(losses[-config.log_every:]), np.float64)
        if not np.isfinite(recent).all():
          raise CrossLoraError(f"{description}: finite losses expected, got {recent[-1]} at step {index + 1}. "
                               "Lower TrainConfig.lr or check the data and weights.")
        bar.set_postfix(loss=f"{recent.mean():.4f}", refresh=False)
      bar.update(1)
    jax.block_until_ready(lora)
  finally:
    bar.close()
  seconds = time.perf_counter() - start
  return FitResult(lora=lora, losses=[float(v) for v in jax.device_get(losses)],
                   grad_norms=[float(v) for v in jax.device_get(norms)], seconds=seconds,
                   compile_seconds=compile_seconds, memory_bytes=used)


def _device_batch(batch: Batch, config: TrainConfig) -> Batch:
  sizes = {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in jax.tree.leaves(batch)}
  if sizes != {config.batch}:
    raise CrossLoraError(f"batch: leaves with a leading axis of TrainConfig.batch={config.batch} expected, "
                         f"got sizes {sorted(sizes, key=str)}. Make every batch hold {config.batch} sequences.")
  return jax.tree.map(jnp.asarray, batch)


class _Quiet:
  def set_postfix(self, *args, **kwargs):
    pass

  def update(self, n=1):
    pass

  def close(self):
    pass


def _progress_bar(total: int, description: str, progress: bool):
  """tqdm with ETA on an interactive stderr; nothing in logs, CI, or with progress=False."""
  if not progress or not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty()):
    return _Quiet()
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel

  return tqdm(total=total, desc=description, unit="step", dynamic_ncols=True, file=sys.stderr)


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
               spec: Any = None, loss_fn: LossFn | None = None, progress: bool = True,
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
  length = np.shape(jax.tree.leaves(next_batch(0))[0])[1] if np.ndim(jax.tree.leaves(next_batch(0))[0]) > 1 else 1
  result = TrainResult(adapter=adapter, lora=fitted.lora, spec=spec, losses=fitted.losses, seconds=fitted.seconds,
                       compile_seconds=fitted.compile_seconds,
                       tokens_per_second=config.steps * config.batch * length / max(fitted.seconds, 1e-9),
                       memory_bytes=fitted.memory_bytes, grad_norms=fitted.grad_norms)
  if output is not None:
    result.save(output, dtype=save_dtype, overwrite=overwrite, target=lm.config.arch)
  return result
