"""The training loop: optax AdamW, warm-up + cosine/constant, clipping, accumulation, one compile.

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

Runs are deterministic: the loop adds no randomness of its own (``train_lora``
derives the LoRA init key and the block sampler from ``config.seed``), and XLA
on CPU runs the same program the same way.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import sys
import time
from collections.abc import Callable, Hashable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from crosslora_jax.errors import CrossLoraError, collect_and_raise
from crosslora_jax.progress import ALWAYS, Progress

SCHEDULES = ("cosine", "constant", "warmup_cosine")
Batch = dict[str, Any]  # {"ids": (B, T) int32, "weights": (B, T) float32, ...}; leaves share the leading B axis
LossFn = Callable[..., Any]  # (lora, batch[, params]) -> scalar or (numerator, denominator)
StepCallback = Callable[[int, Any, Any], Any]  # (step (1-based), lora after it, its loss (device scalar)) -> stop?


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimizer and loop settings (the LoRA shape lives in the LoraSpec)."""

  steps: int = 100
  batch: int = 8  # sequences per optimizer step, all microbatches together
  lr: float = 1e-4
  warmup: int | None = None  # linear warm-up steps; None = max(1, steps // 10)
  schedule: str = "cosine"  # after warm-up: "cosine" decay, or "constant"; "warmup_cosine": optax's, from lr 0
  final_lr_fraction: float = 0.0  # the cosine schedules end at lr * final_lr_fraction
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
    if not 0 <= self.final_lr_fraction <= 1:
      problems.append(f"TrainConfig.final_lr_fraction: a number in [0, 1] expected, got {self.final_lr_fraction!r}")
    if self.weight_decay < 0:
      problems.append(f"TrainConfig.weight_decay: a number >= 0 expected, got {self.weight_decay!r}")
    if not problems and self.batch % self.grad_accum:
      problems.append(f"TrainConfig.grad_accum: a divisor of batch={self.batch} expected, got {self.grad_accum}")
    collect_and_raise([p + ". Fix the value." for p in problems])

  @property
  def warmup_steps(self) -> int:
    return max(1, self.steps // 10) if self.warmup is None else self.warmup


def make_schedule(config: TrainConfig) -> optax.Schedule:
  """lr · factor(step): (step + 1) / warmup during warm-up, then cosine to ``final_lr_fraction`` or constant.

  The same factor as torch's LambdaLR in the repository's torch recipe, so the
  first step already moves (lr / warmup) and the last cosine step is near the end
  value. ``"warmup_cosine"`` is ``optax.warmup_cosine_decay_schedule`` instead: lr 0
  at step 0, linear to lr at step ``warmup``, cosine to lr · final_lr_fraction at ``steps``.
  """
  warmup, steps, peak, final = config.warmup_steps, config.steps, config.lr, config.final_lr_fraction
  if config.schedule == "warmup_cosine":
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, steps, end_value=final * peak)

  def schedule(count):
    count = jnp.asarray(count, jnp.float32)
    ramp = (count + 1.0) / max(warmup, 1)
    if config.schedule == "constant":
      after = jnp.ones_like(count)
    else:
      cosine = 0.5 * (1.0 + jnp.cos(jnp.pi * (count - warmup) / max(1, steps - warmup)))
      after = cosine if final == 0 else final + (1.0 - final) * cosine
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
  seconds: float  # the steps and callbacks, compile excluded
  compile_seconds: float
  memory_bytes: int  # the compiled step's argument + output + temporary buffers
  stopped_early: bool = False  # the callback ended the loop before config.steps


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
        params: Any = None, progress: Progress = True, description: str = "train",
        step_key: Hashable | None = None, callback: StepCallback | None = None,
        callback_every: int = 1) -> FitResult:
  """The training loop over any differentiable ``loss_fn(lora, batch[, params])``.

  ``next_batch(step)`` returns the full batch of that step (numpy or jax leaves
  with a leading ``config.batch`` axis). ``params`` (the frozen base) is passed to
  a 3-argument ``loss_fn`` as a jit argument. ``lora`` is not modified.
  ``step_key``: a hashable that fixes ``loss_fn``'s maths (not an object holding
  arrays); runs with equal keys, optimizer settings and shapes share one compile.
  ``callback(step, lora, loss)`` runs between steps, every ``callback_every`` steps
  and after the last (``step`` counts from 1; ``loss`` is that step's, a device
  scalar): the place to evaluate or checkpoint without resetting the optimizer. A
  true return ends the loop after that step (``stopped_early``); the loop's own
  finite-loss check runs after it, so a callback may stop on a diverged step. The
  ``lora`` it gets is donated to the next step: keep a copy (``jnp.copy`` per leaf).
  """
  if isinstance(callback_every, bool) or not isinstance(callback_every, int) or callback_every < 1:
    raise CrossLoraError(f"callback_every: a positive integer expected, got {callback_every!r}. Fix the value.")
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
  losses, norms, stopped = [], [], False
  bar = _progress_bar(config.steps, description, progress)
  start = time.perf_counter()
  try:
    for index in range(config.steps):
      batch = first if index == 0 else _device_batch(next_batch(index), config)
      lora, opt_state, value, norm = step(lora, opt_state, params, batch)
      losses.append(value)
      norms.append(norm)
      if callback is not None and ((index + 1) % callback_every == 0 or index + 1 == config.steps):
        stopped = bool(callback(index + 1, lora, value))
        if stopped:
          bar.update(1)
          break
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
                   compile_seconds=compile_seconds, memory_bytes=used, stopped_early=stopped)


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


def _progress_bar(total: int, description: str, progress: Progress):
  """tqdm with ETA on an interactive stderr; in logs only with progress="always" (one
  redraw per 30 s); nothing with progress=False."""
  tty = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
  if not progress or (progress != ALWAYS and not tty):
    return _Quiet()
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel

  return tqdm(total=total, desc=description, unit="step", dynamic_ncols=tty, file=sys.stderr,
              mininterval=0.1 if tty else 30.0)
