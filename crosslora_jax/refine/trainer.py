"""The student's training: ``lm.loop.fit`` on refine's loss, held-back checks between steps, best step kept.

The checks run in fit's between-steps callback, so the optimizer state carries on
across them; a check's LoRA is copied (fit donates the live one to the next step).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from crosslora_jax.progress import Progress
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


def train_config(config: RefineConfig) -> Any:
  """The refine budget as an ``lm.loop.TrainConfig``: AdamW (no decay), clip 1, optax warm-up + cosine to lr/10."""
  from crosslora_jax.lm.loop import TrainConfig
  warmup = min(config.warmup, config.steps - 1) if config.steps > 1 else 0
  return TrainConfig(steps=config.steps, batch=config.batch, lr=config.lr, warmup=warmup, schedule="warmup_cosine",
                     final_lr_fraction=0.1, weight_decay=0.0, clip_norm=1.0, seed=config.seed,
                     log_every=min(10, config.steps))


def best_step(evals: Sequence[Mapping[str, Any]], check: str) -> int:
  """The step a held-back check picks among ``evals`` (each with ``"step"`` and the check's value).

  The best finite value in the check's direction (``CHECKS``); a tie keeps the earlier step, so
  the initial adapter (step 0) stands unless a later step beats it; the earliest step stands when
  no value is finite.

  >>> best_step([{"step": 0, "agreement": 0.0}, {"step": 8, "agreement": 0.4}, {"step": 16, "agreement": 0.4}], "agreement")
  8
  >>> best_step([{"step": 0, "delta_error": 1.0}, {"step": 8, "delta_error": float("nan")}], "delta_error")
  0
  """
  sign = CHECKS[check]
  ordered = sorted(evals, key=lambda e: int(e["step"]))
  picked, picked_value = int(ordered[0]["step"]), -np.inf
  for e in ordered:
    value = sign * float(e[check])
    if np.isfinite(value) and value > picked_value:
      picked, picked_value = int(e["step"]), value
  return picked


class _Checks:
  """fit's callback: stops on a diverged step, runs the held-back check every ``eval_every`` steps."""

  def __init__(self, target: Any, lora0: Any, spec: Any, held: student.StudentData, config: RefineConfig):
    self.target, self.spec, self.held, self.config = target, spec, held, config
    self.evals = [_evaluate(target, lora0, spec, held, config.batch, 0)]
    self.checkpoints = [(0, lora0)]

  @property
  def best_step(self) -> int:
    return best_step(self.evals, self.config.check)

  @property
  def best_lora(self) -> Any:
    return dict(self.checkpoints)[self.best_step]

  def __call__(self, step: int, lora: Any, loss: Any) -> bool:
    import jax
    import jax.numpy as jnp
    if not np.isfinite(float(loss)):
      return True  # a diverged run: the best step so far (or the initial adapter) stands
    if step % self.config.eval_every and step != self.config.steps:
      return False
    kept = jax.tree.map(jnp.copy, lora)
    self.evals.append(_evaluate(self.target, kept, self.spec, self.held, self.config.batch, step))
    self.checkpoints.append((step, kept))
    return False


def train_student(target: Any, lora0: Any, spec: Any, train: student.StudentData, held: student.StudentData,
                  config: RefineConfig, *, progress: Progress) -> TrainOutcome:
  from crosslora_jax.lm import loop
  checks = _Checks(target, lora0, spec, held, config)
  batches = _batches(len(train.ids), config.batch, config.steps, config.seed)
  vocab = train.cand_ids is not None
  loss_fn = student.make_loss(target.config, spec, loss=config.loss, anchor=config.anchor, clip=config.clip, vocab=vocab)
  result = loop.fit(loss_fn, lora0, lambda index: train.batch(batches[index]), train_config(config),
                    params=target.params, progress=progress, description="refine (student training)",
                    step_key=("refine.student", target.config, spec, config.loss, float(config.anchor), float(config.clip), vocab),
                    callback=checks)
  picked_lora, picked = checks.best_lora, checks.best_step
  if not config.guard and picked == 0 and result.losses and np.isfinite(result.losses[-1]):
    picked_lora, picked = result.lora, len(result.losses)
  return TrainOutcome(best_lora=picked_lora, best_step=picked, losses=result.losses, evals=checks.evals,
                      check=config.check, checkpoints=checks.checkpoints)
