"""RefineConfig: every knob of the distillation refine stage, checked once.

The defaults are the recipe measured in ``scripts/bench_refine.py`` (results/refine.md):
64 teacher samples of 96 tokens, 16 steps of 4 sequences at lr 1e-3; the student learns the
50% of the teacher's tokens the adapter raised most, anchored to its base on the others
(squared log-prob change, weight 1). They fit a 2-core CPU; they were not tuned on the
evaluation text: the arms were compared on two text domains and four pairs, each against
its null control (the same run with the adapter removed) and a random-teacher control, and
the top 50% against the earlier top 30% run for run over seeds.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib

from crosslora_jax.errors import CrossLoraError, collect_and_raise
from crosslora_jax.refine.select import SELECTIONS

LOSSES = ("nll", "delta", "reward")
WRITERS = ("source", "target")
CHECKS = {"agreement": +1, "delta_error": -1, "nll_selected": -1}  # held-back check -> sign of "better"
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class RefineConfig:
  """Options of :func:`crosslora_jax.refine.refine_adapter`.

  Teacher text: ``tokens`` synthetic tokens in samples of ``sample_tokens`` new tokens,
  written by source base + adapter at ``temperature`` / ``top_p`` from ``seed``;
  prompts from ``prompts_file`` (one a line or JSONL with a "prompt" field), else from
  the separator token alone. ``heldout_fraction`` of the samples are held back for the
  stopping rule and the guard. ``pool``: the teacher writes ``pool`` times the samples;
  the held-back ones are drawn from all of them, and the student trains on the others whose
  tokens the adapter changed most (mean score over their learnable tokens), as many as
  ``pool`` 1 would train on: more teacher time, the same training time.

  Student: target base + LoRA of ``rank`` / ``alpha`` / ``target_modules`` (the source
  adapter's when None), trained ``steps`` steps of ``batch`` sequences at ``lr``.
  ``loss``: ``"nll"`` (default) learns the teacher's tokens chosen by ``selection``
  (``fraction`` for top-k), plus ``anchor`` × squared log-prob change against the target
  base on the tokens not chosen: the anchor keeps the student from learning the source's
  style on the tokens the adapter did not change;
  ``"delta"`` matches the student's log-prob change against its base to the teacher's
  carried score on every token (a zero adapter leaves the student at its base).
  ``"reward"`` (with ``writer="target"``) raises the student's log-prob of its own tokens in
  proportion to their centred score, clipped like PPO at ratio 1 ± ``clip``: the KL-regularised
  move towards target base × (source + adapter) / source base, with nothing learned where
  the adapter changed nothing.
  ``writer``: who writes the text: ``"source"`` (source base + adapter, the teacher) or
  ``"target"`` (the target base writes, the teacher only scores it: no text of another
  model's style is learned).
  ``vocab_k``: with ``"delta"``, also match the adapter's change of the teacher's ``vocab_k``
  likeliest next tokens wherever both tokenizers start a token at the same character and
  hold the token (:mod:`crosslora_jax.refine.vocab`); 0 = the sampled token only.
  ``check``: the held-back measure that picks the best evaluated step (see
  ``student.heldout_metrics``); ``eval_every``: steps between checks;
  ``guard``: return the initial adapter when no evaluated step beats it on ``check``.
  """

  tokens: int = 6144
  sample_tokens: int = 96
  temperature: float = 1.0
  top_p: float = 0.95
  seed: int = 0
  prompts_file: str | None = None
  heldout_fraction: float = 0.125
  pool: int = 1
  selection: str = "topk"
  fraction: float = 0.5
  loss: str = "nll"
  anchor: float = 1.0
  vocab_k: int = 0
  clip: float = 0.2
  writer: str = "source"
  steps: int = 16
  batch: int = 4
  lr: float = 1e-3
  warmup: int = 2
  rank: int | None = None
  alpha: float | None = None
  target_modules: tuple[str, ...] | None = None
  check: str = "agreement"
  eval_every: int = 8
  guard: bool = True
  dtype: str = "float32"
  cache_dir: str | None = None
  use_cache: bool = True

  def __post_init__(self):
    problems = []

    def positive_int(name: str, allow_zero: bool = False) -> None:
      value = getattr(self, name)
      ok = isinstance(value, int) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
      if not ok:
        problems.append(f"{name}: a {'non-negative' if allow_zero else 'positive'} integer expected, got {value!r}")

    def number_in(name: str, low: float, high: float, low_open: bool = True) -> None:
      value = getattr(self, name)
      ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
      ok = ok and (low < value if low_open else low <= value) and value <= high
      if not ok:
        problems.append(f"{name}: a number in {'(' if low_open else '['}{low}, {high}] expected, got {value!r}")

    for name in ("tokens", "sample_tokens", "steps", "batch", "eval_every", "pool"):
      positive_int(name)
    positive_int("warmup", allow_zero=True)
    positive_int("seed", allow_zero=True)
    positive_int("vocab_k", allow_zero=True)
    if self.vocab_k and (self.loss != "delta" or self.writer != "source"):
      problems.append(f"vocab_k: only with loss 'delta' on the teacher's text (writer 'source'), got loss {self.loss!r}, "
                      f"writer {self.writer!r}")
    if self.rank is not None:
      positive_int("rank")
    number_in("temperature", 0.0, 10.0, low_open=False)
    number_in("top_p", 0.0, 1.0)
    number_in("heldout_fraction", 0.0, 0.5)
    number_in("fraction", 0.0, 1.0)
    number_in("lr", 0.0, 1.0)
    number_in("anchor", 0.0, 1e6, low_open=False)
    number_in("clip", 0.0, 10.0)
    if self.alpha is not None:
      number_in("alpha", 0.0, 1e6)
    if self.selection not in SELECTIONS:
      problems.append(f"selection: one of {', '.join(SELECTIONS)} expected, got {self.selection!r}")
    if self.loss not in LOSSES:
      problems.append(f"loss: one of {', '.join(LOSSES)} expected, got {self.loss!r}")
    if self.writer not in WRITERS:
      problems.append(f"writer: one of {', '.join(WRITERS)} expected, got {self.writer!r}")
    if self.check not in CHECKS:
      problems.append(f"check: one of {', '.join(CHECKS)} expected, got {self.check!r}")
    if self.dtype not in DTYPES:
      problems.append(f"dtype: one of {', '.join(DTYPES)} expected, got {self.dtype!r}")
    if self.target_modules is not None and (not isinstance(self.target_modules, tuple) or not self.target_modules
                                            or not all(isinstance(m, str) and m for m in self.target_modules)):
      problems.append(f"target_modules: a non-empty tuple of module names expected, got {self.target_modules!r}")
    if isinstance(self.tokens, int) and isinstance(self.sample_tokens, int) and 0 < self.tokens < self.sample_tokens:
      problems.append(f"tokens: at least sample_tokens ({self.sample_tokens}) expected, got {self.tokens}")
    collect_and_raise([p + ". Fix the refine option." for p in problems] if len(problems) == 1 else problems,
                      header=None if len(problems) == 1 else "refine options")

  @property
  def samples(self) -> int:
    """Number of teacher samples (held-back ones included): ceil(tokens / sample_tokens), at least 2."""
    return max(2, -(-self.tokens // self.sample_tokens))

  @property
  def written_samples(self) -> int:
    """Samples the teacher writes: ``pool`` times ``samples``."""
    return self.samples * self.pool

  @property
  def heldout_samples(self) -> int:
    return max(1, int(round(self.samples * self.heldout_fraction)))

  def cache_root(self) -> pathlib.Path:
    if self.cache_dir is not None:
      return pathlib.Path(self.cache_dir).expanduser()
    from crosslora_jax.core.cache import default_cache_dir
    return default_cache_dir().parent / "refine"
