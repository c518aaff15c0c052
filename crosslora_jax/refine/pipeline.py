"""refine_adapter: teacher corpus → carried scores → a LoRA on the target trained by distillation.

The held-back slice of teacher text decides twice: the stopping rule keeps the
evaluated step with the best held-back check, and the guard ships the initial
adapter instead when no evaluated step beats it.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np

from crosslora_jax.errors import CrossLoraError
from crosslora_jax.formats import peft_format
from crosslora_jax.progress import Progress
from crosslora_jax.refine import runtime, student, teacher
from crosslora_jax.refine.config import RefineConfig
from crosslora_jax.refine.select import token_weights
from crosslora_jax.refine.trainer import train_student


@dataclasses.dataclass
class RefineResult:
  adapter: peft_format.PeftAdapter  # what ships: the refined adapter, or the initial one when the guard held it back
  refined: bool  # False when the guard returned the initial adapter
  report: dict[str, Any]
  lora: Any = None  # the shipped factors (LoraParams)
  spec: Any = None  # their LoraSpec
  checkpoints: list = dataclasses.field(default_factory=list)  # (step, LoraParams) at every held-back check


def _read(adapter: Any) -> peft_format.PeftAdapter:
  return adapter if isinstance(adapter, peft_format.PeftAdapter) else peft_format.read_adapter(adapter)


def student_spec(source: peft_format.PeftAdapter, config: RefineConfig) -> Any:
  """The source adapter's rank/alpha/modules, with the config's overrides (alpha/r kept when only r changes)."""
  from crosslora_jax.lm.lora import LoraSpec
  src = LoraSpec.from_peft_config(source.config)
  rank = config.rank or src.r
  alpha = config.alpha if config.alpha is not None else src.alpha * rank / src.r
  targets = config.target_modules or tuple(sorted({path.rsplit(".", 1)[-1] for path in source.modules}))
  # rank/alpha patterns name the source's module paths; the student gets uniform ones.
  return LoraSpec(r=rank, alpha=float(alpha), rslora=src.rslora, target_modules=targets)


def _initial(target: Any, init_adapter: Any, source: peft_format.PeftAdapter, config: RefineConfig) -> tuple[Any, Any, str]:
  import jax
  from crosslora_jax.lm import lora as lora_lib
  if init_adapter is not None:
    lora, spec = lora_lib.lora_from_peft(_read(init_adapter), target.config)
    return lora, spec, "projection"
  spec = student_spec(source, config)
  return lora_lib.init_lora(target.config, spec, jax.random.PRNGKey(config.seed)), spec, "zero (B = 0)"


def _split(n: int, config: RefineConfig, sample_scores: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(train rows, held-back rows): the held-back ones at random; with ``config.pool`` > 1 the
  train rows are the ``samples - heldout_samples`` of the rest with the highest ``sample_scores``."""
  order = np.random.default_rng(config.seed).permutation(n)
  held = min(config.heldout_samples, n - 1)
  rest = order[held:]
  if config.pool > 1 and sample_scores is not None:
    keep = max(1, config.samples - held)
    rest = rest[np.argsort(-sample_scores[rest], kind="stable")[:keep]]
  return np.sort(rest), np.sort(order[:held])


def sample_scores(scores: np.ndarray, learn: np.ndarray) -> np.ndarray:
  """(N,) mean carried score over each sample's learnable tokens (-inf for a sample with none)."""
  count = learn.sum(-1)
  total = np.where(learn, scores, 0.0).sum(-1)
  return np.where(count > 0, total / np.maximum(count, 1), -np.inf)


def advantages(scores: np.ndarray, learn: np.ndarray, train_rows: np.ndarray) -> np.ndarray:
  """(N, T-1) scores centred by their mean over the training rows' learnable tokens (0 elsewhere).

  A constant baseline leaves the expected policy gradient unchanged and removes the part
  of the score every token shares; all-zero scores (an adapter that changes nothing) give 0.
  """
  baseline = float(scores[train_rows][learn[train_rows]].mean()) if learn[train_rows].any() else 0.0
  return np.where(learn, scores - baseline, 0.0).astype(np.float32)


def prepare_student(target: Any, corpus: teacher.Corpus, config: RefineConfig,
                    mapping: np.ndarray | None = None) -> tuple[student.StudentData, student.StudentData, dict]:
  """(train, held-back) student data with weights and the target base's log-probs filled in;
  ``mapping`` (source id → target id) carries the corpus's candidates (``config.vocab_k``)."""
  data = student.encode_corpus(corpus, target.tokenizer,
                               max_tokens=min(4 * config.sample_tokens + 64, target.config.max_positions),
                               mapping=mapping if config.vocab_k else None)
  train_rows, held_rows = _split(len(corpus.texts), config, sample_scores(data.target, data.learn))
  data.weights = np.zeros_like(data.target)
  if config.loss == "reward":
    data.weights = advantages(data.target, data.learn, train_rows)
  elif config.loss == "delta":
    data.weights = data.learn.astype(np.float32)  # every learnable token is matched
  else:
    data.weights[train_rows] = token_weights(data.target[train_rows], data.learn[train_rows],
                                             selection=config.selection, fraction=config.fraction)
    # Held-back tokens are selected with the train threshold's rule on their own (same fraction).
    data.weights[held_rows] = token_weights(data.target[held_rows], data.learn[held_rows],
                                            selection=config.selection, fraction=config.fraction)
  # The target base's log-probs: always on held-back rows (the check), on train rows only when
  # the loss reads them (a forward pass over the corpus on the biggest model costs minutes on CPU).
  used = np.sort(np.concatenate([train_rows, held_rows]))  # every row unless config.pool > 1
  rows = used if (config.loss != "nll" or config.anchor > 0) else held_rows
  data.base_lp = np.zeros_like(data.target)
  data.base_lp[rows] = runtime.batched_logprobs(target, None, None, data.ids[rows], data.real[rows], batch=config.batch,
                                                progress=False, what="target base log-probs")
  if data.cand_ids is not None:
    from crosslora_jax.refine.vocab import candidate_logprobs
    data.cand_base = candidate_logprobs(target, data.ids, data.real, data.cand_ids, batch=config.batch)
  info = {"student_tokens": int(data.real[used].sum()), "learnable_tokens": int(data.learn[used].sum()),
          "selected_tokens": int((data.weights[train_rows] > 0).sum()), "train_samples": int(len(train_rows)),
          "heldout_samples": int(len(held_rows)), "unused_samples": int(len(corpus.texts) - len(used)),
          "length": int(data.ids.shape[1])}
  if data.cand_mask is not None:
    info["carried_candidates"] = int(data.cand_mask[train_rows].sum())
    info["positions_with_candidates"] = int(data.cand_mask[train_rows].any(-1).sum())
  return data.rows(train_rows), data.rows(held_rows), info


def refine_adapter(source_folder: Any, source_adapter: Any, target_folder: Any, init_adapter: Any,
                   config: RefineConfig, *, progress: Progress = True, source_lm: Any = None,
                   target_lm: Any = None) -> RefineResult:
  """Refines a LoRA on ``target_folder`` by distillation from source base + ``source_adapter``.

  ``init_adapter``: a PeftAdapter (or folder) on the target to start from (a projection
  result), or None for standard LoRA init (B = 0). ``source_lm`` / ``target_lm``: already
  loaded runtimes to reuse (batch jobs load each base once). ``progress``: bars with ETA
  for sampling, scoring and training on a terminal (True), in logs too (``"always"``), or
  never (False). Returns the adapter that ships and a report (corpus, tokens kept, loss
  curve, held-back checks, seconds per phase).
  """
  if not isinstance(config, RefineConfig):
    raise CrossLoraError(f"config: a RefineConfig expected, got {type(config).__name__}.")
  started = time.perf_counter()
  source = _read(source_adapter)
  from crosslora_jax.lm.tokenizer import Tokenizer
  # Both tokenizers and the student's start are checked before minutes of sampling.
  Tokenizer.from_folder(source_folder)
  phases: dict[str, float] = {}
  target = target_lm or runtime.load_lm(target_folder, None, config.dtype)
  target.tokenizer  # noqa: B018 - raises the one-line error for a target without a tokenizer
  lora0, spec, init_kind = _initial(target, init_adapter, source, config)
  if config.writer == "target":
    from crosslora_jax.refine.own_text import build_own_corpus
    corpus, corpus_info = build_own_corpus(source_folder, source, target_folder, target, config, progress=progress,
                                           source_lm=source_lm)
  elif source_lm is None and config.use_cache:
    corpus, corpus_info = teacher.build_corpus(source_folder, source, config, progress=progress)
  else:
    source_lm = source_lm or runtime.load_lm(source_folder, source, config.dtype)
    corpus, corpus_info = teacher.build_corpus(source_folder, source, config, progress=progress, teacher=source_lm)
  corpus_info.setdefault("writer", "source")
  phases["teacher"] = corpus_info["seconds"]
  t0 = time.perf_counter()
  mapping = None
  if config.vocab_k:
    from crosslora_jax.refine.vocab import vocab_map
    mapping = vocab_map(source_folder, getattr(target, "folder", None) or target_folder)
  train, held, tokens_info = prepare_student(target, corpus, config, mapping)
  phases["student_data"] = time.perf_counter() - t0
  t0 = time.perf_counter()
  outcome = train_student(target, lora0, spec, train, held, config, progress=progress)
  phases["train"] = time.perf_counter() - t0
  refined = outcome.best_step > 0 or not config.guard
  lora = outcome.best_lora if refined else lora0
  from crosslora_jax.lm.lora import lora_to_peft
  adapter = lora_to_peft(lora, spec, base_model_name_or_path=str(getattr(target, "folder", target_folder)))
  phases["total"] = time.perf_counter() - started
  report = {"corpus": {k: v for k, v in corpus_info.items() if k != "seconds"}, "tokens": tokens_info,
            "init": init_kind, "rank": spec.r, "alpha": spec.alpha, "target_modules": list(spec.target_modules),
            "config": {k: v for k, v in dataclasses.asdict(config).items() if k not in ("cache_dir",)},
            "losses": outcome.losses, "heldout": outcome.evals, "best_step": outcome.best_step,
            "shipped": "refined" if refined else "initial",
            "guard": (f"held-back {outcome.check} improved at step {outcome.best_step}" if outcome.best_step > 0 else
                      f"no evaluated step improved the held-back {outcome.check}: the initial adapter ships"),
            "seconds": phases}
  return RefineResult(adapter=adapter, refined=refined, report=report, lora=lora, spec=spec,
                      checkpoints=outcome.checkpoints)
