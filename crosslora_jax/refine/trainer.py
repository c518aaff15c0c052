"""The student's training loop: AdamW on the LoRA factors, held-back checks, best step kept.

A loop of its own rather than ``lm.train.train_lora``: the stopping rule needs the
held-back check between steps without resetting the optimizer state.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np

from crosslora_jax.progress import ProgressBar
from crosslora_jax.refine import runtime, student
from crosslora_jax.refine.config import CHECKS, RefineConfig


@dataclasses.dataclass
class TrainOutcome:
  best_lora: Any
  best_step: int  # 0 = nothing beat the initial adapter
  losses: list[float]  # (steps,) training loss per step
  evals: list[dict[str, float]]  # held-back checks, step 0 first
  check: str
  checkpoints: list[tuple[int, Any]] = dataclasses.field(default_factory=list)  # (step, LoraParams) per check


def _batches(n: int, batch: int, steps: int, seed: int) -> list[np.ndarray]:
  """``steps`` index arrays of ``batch`` rows: epochs of fresh permutations (rows repeat only across epochs)."""
  rng = np.random.default_rng(seed + 1)
  stream: list[int] = []
  while len(stream) < steps * batch:
    stream += rng.permutation(n).tolist()
  return [np.array(stream[i * batch:(i + 1) * batch]) for i in range(steps)]


def _evaluate(target: Any, lora: Any, spec: Any, held: student.StudentData, batch: int, step: int) -> dict[str, float]:
  lp = runtime.batched_logprobs(target, lora, spec, held.ids, held.real, batch=batch)
  return {"step": step, **student.heldout_metrics(lp, held)}


@functools.lru_cache(maxsize=8)
def _train_step(cfg: Any, spec: Any, loss: str, anchor: float, lr: float, warmup: int, steps: int, clip: float = 0.2):
  """(optimizer, jitted step): one compilation per target and recipe, reused by later adapters."""
  import jax
  import optax

  loss_fn = student.make_loss(cfg, spec, loss=loss, anchor=anchor, clip=clip)
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(warmup, steps - 1) if steps > 1 else 0, steps,
                                                end_value=0.1 * lr)
  optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.0))

  @jax.jit
  def step_fn(lora, state, params, batch):
    value, grads = jax.value_and_grad(loss_fn)(lora, batch, params)
    updates, state = optimizer.update(grads, state, lora)
    return optax.apply_updates(lora, updates), state, value

  return optimizer, step_fn


def train_student(target: Any, lora0: Any, spec: Any, train: student.StudentData, held: student.StudentData,
                  config: RefineConfig, *, progress: bool) -> TrainOutcome:
  import jax.numpy as jnp

  optimizer, step_fn = _train_step(target.config, spec, config.loss, config.anchor, config.lr,
                                   config.warmup, config.steps, config.clip)
  lora, state = lora0, optimizer.init(lora0)
  sign = CHECKS[config.check]
  evals = [_evaluate(target, lora0, spec, held, config.batch, 0)]
  best_value, best_step, best_lora = sign * evals[0][config.check], 0, lora0
  losses: list[float] = []
  checkpoints = [(0, lora0)]
  bar = ProgressBar() if progress else None
  for step, index in enumerate(_batches(len(train.ids), config.batch, config.steps, config.seed), 1):
    batch = {k: jnp.asarray(v) for k, v in train.batch(index).items()}
    lora, state, loss = step_fn(lora, state, target.params, batch)
    losses.append(float(loss))
    if not np.isfinite(losses[-1]):
      break  # a diverged run: the best step so far (or the initial adapter) stands
    if step % config.eval_every == 0 or step == config.steps:
      evals.append(_evaluate(target, lora, spec, held, config.batch, step))
      checkpoints.append((step, lora))
      value = sign * evals[-1][config.check]
      if np.isfinite(value) and value > best_value:
        best_value, best_step, best_lora = value, step, lora
    if bar:
      bar("refine (student training)", step, config.steps)
  if not config.guard and best_step == 0 and np.isfinite(losses[-1] if losses else np.nan):
    best_lora, best_step = lora, len(losses)
  return TrainOutcome(best_lora=best_lora, best_step=best_step, losses=losses, evals=evals, check=config.check,
                      checkpoints=checkpoints)
