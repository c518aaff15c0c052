"""The ``--refine*`` flags of the transfer CLI and their mapping onto :class:`RefineConfig`.

Every default is the dataclass's own (``RefineConfig()``), so it is defined once.
A bad value is refused before any work, with the flag's name in the one-line error.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re

from absl import flags

from crosslora_jax import outputs
from crosslora_jax.errors import CrossLoraError
from crosslora_jax.refine.config import CHECKS, LOSSES, WRITERS, RefineConfig
from crosslora_jax.refine.prompts import read_prompts
from crosslora_jax.refine.select import SELECTIONS

_DEFAULTS = RefineConfig()
_INT = dict(upper_bound=2**31 - 1)

REFINE = flags.DEFINE_enum("refine", "none", ["none", "distill"], "After the projection, refine each moved adapter: "
                           "none (the projection ships as it is) or distill (the source base + its adapter writes "
                           "text, and a LoRA on the target learns the tokens the adapter changed most).")
INIT = flags.DEFINE_enum("refine_init", "projection", ["projection", "zero"], "--refine distill: the student's start: "
                         "the projection of --method, or a standard LoRA init (B = 0) of the source adapter's shape.")
PROMPTS = flags.DEFINE_string("refine_prompts", _DEFAULTS.prompts_file, "--refine distill: UTF-8 file of prompts for "
                              "the teacher, one a line or JSONL with a 'prompt' field (rendered with the source's "
                              "chat template when it has one); default: every sample starts from the BOS token alone.")
_FLAG_FIELDS = {  # flag name -> RefineConfig field
    "refine_tokens": "tokens", "refine_sample_tokens": "sample_tokens", "refine_temperature": "temperature",
    "refine_top_p": "top_p", "refine_steps": "steps", "refine_batch": "batch", "refine_lr": "lr",
    "refine_seed": "seed", "refine_rank": "rank", "refine_alpha": "alpha", "refine_select": "selection",
    "refine_fraction": "fraction", "refine_loss": "loss", "refine_anchor": "anchor", "refine_check": "check",
    "refine_eval_every": "eval_every", "refine_writer": "writer", "refine_clip": "clip", "refine_vocab_k": "vocab_k",
    "refine_pool": "pool",
}
flags.DEFINE_integer("refine_tokens", _DEFAULTS.tokens, "--refine distill: synthetic tokens the teacher writes in all "
                     "(samples = ceil(tokens / sample_tokens), a share held back for the checks).", **_INT)
flags.DEFINE_integer("refine_sample_tokens", _DEFAULTS.sample_tokens, "--refine distill: new tokens per teacher "
                     "sample.", **_INT)
flags.DEFINE_float("refine_temperature", _DEFAULTS.temperature, "--refine distill: teacher sampling temperature "
                   "(0 = greedy).")
flags.DEFINE_float("refine_top_p", _DEFAULTS.top_p, "--refine distill: teacher nucleus sampling mass, in (0, 1].")
flags.DEFINE_integer("refine_steps", _DEFAULTS.steps, "--refine distill: student training steps (optimizer updates).",
                     **_INT)
flags.DEFINE_integer("refine_pool", _DEFAULTS.pool, "--refine distill: the teacher writes this many times the "
                     "samples; the student trains on the ones the adapter changed most (as many as with 1), "
                     "held-back ones drawn from all: more teacher time, the same training time.", **_INT)
flags.DEFINE_integer("refine_batch", _DEFAULTS.batch, "--refine distill: teacher samples per training step.", **_INT)
flags.DEFINE_float("refine_lr", _DEFAULTS.lr, "--refine distill: peak AdamW learning rate (warmup, then cosine decay).")
flags.DEFINE_integer("refine_seed", _DEFAULTS.seed, "--refine distill: seed of the teacher's sampling, the held-back "
                     "split and the batch order.", **_INT)
flags.DEFINE_integer("refine_rank", _DEFAULTS.rank, "--refine_init zero: student LoRA rank (default: the source "
                     "adapter's; a projection start keeps its own).", **_INT)
flags.DEFINE_float("refine_alpha", _DEFAULTS.alpha, "--refine_init zero: student LoRA alpha (default: the source "
                   "adapter's alpha/r times the rank).")
flags.DEFINE_enum("refine_select", _DEFAULTS.selection, list(SELECTIONS), "--refine distill: which teacher tokens "
                  "the student learns, by the adapter's score log p(source + adapter) - log p(source): topk (the "
                  "--refine_fraction highest), weighted (weight ~ max(score, 0)) or all.")
flags.DEFINE_float("refine_fraction", _DEFAULTS.fraction, "--refine_select topk: share of tokens learned, in (0, 1].")
flags.DEFINE_enum("refine_loss", _DEFAULTS.loss, list(LOSSES), "--refine distill: nll (learn the "
                  "--refine_select tokens of the text, the others anchored to the target base by --refine_anchor), "
                  "delta (match the student's log-prob change against its base to the teacher's score, on every "
                  "token) or reward (with --refine_writer target: raise the student's "
                  "own tokens by their score, PPO-clipped at ratio 1 +- --refine_clip).")
flags.DEFINE_enum("refine_writer", _DEFAULTS.writer, list(WRITERS), "--refine distill: who writes the text: source "
                  "(source base + adapter) or target (the target base writes, source +- adapter score it).")
flags.DEFINE_float("refine_clip", _DEFAULTS.clip, "--refine_loss reward: PPO clip of the probability ratio.")
flags.DEFINE_float("refine_anchor", _DEFAULTS.anchor, "--refine_loss nll: weight of the squared log-prob change "
                   "against the target base on the tokens not selected (0 = off).")
flags.DEFINE_integer("refine_vocab_k", _DEFAULTS.vocab_k, "--refine_loss delta: also match the adapter's change of "
                     "the teacher's K likeliest next tokens where both tokenizers start a token at the same character "
                     "and share the token (0 = the sampled token only).", **_INT)
flags.DEFINE_enum("refine_check", _DEFAULTS.check, list(CHECKS), "--refine distill: held-back measure that picks the "
                  "step that ships: agreement (correlation of the student's and teacher's log-prob changes), "
                  "delta_error or nll_selected (nats).")
flags.DEFINE_integer("refine_eval_every", _DEFAULTS.eval_every, "--refine distill: training steps between held-back "
                     "checks (the last step is always checked).", **_INT)
NO_GUARD = flags.DEFINE_bool("no_refine_guard", not _DEFAULTS.guard, "--refine distill: ship the refined adapter "
                             "even when no checked step beats the start on the held-back check.")
CACHE_DIR = flags.DEFINE_string("refine_cache_dir", _DEFAULTS.cache_dir, "--refine distill: teacher corpus cache "
                                "(one adapter moved to several targets writes its text once; default: "
                                "$CROSSLORA_CACHE/refine or ~/.cache/crosslora_jax/refine; --no_cache: none).")

_FIELD_FLAGS = {field: "--" + flag for flag, field in _FLAG_FIELDS.items()}
_FIELD_NAME = re.compile(r"(?<![\w-])(" + "|".join(sorted(_FIELD_FLAGS, key=len, reverse=True)) + r")(?=: )")


def enabled() -> bool:
  return REFINE.value != "none"


def planned_inputs() -> list[outputs.Planned]:
  """The files refine reads besides the models (outputs must stay apart from them)."""
  return [outputs.Planned.of("--refine_prompts", PROMPTS.value)] if enabled() and PROMPTS.value else []


def planned_caches() -> dict[str, tuple[outputs.Planned, bool]]:
  """The corpus cache folder (when refining) and whether the user named it, for the run's path checks."""
  if not enabled():
    return {}
  folder = CACHE_DIR.value or RefineConfig().cache_root()
  return {"--refine_cache_dir": (outputs.Planned.of("--refine_cache_dir", folder), bool(CACHE_DIR.value))}


def config_from_flags() -> RefineConfig:
  """The flags as a RefineConfig without a corpus cache (:func:`with_cache` adds the checked folder).

  A bad value is one line naming its flag.
  """
  values = {field: flags.FLAGS[flag].value for flag, field in _FLAG_FIELDS.items()}
  if INIT.value == "projection":
    given = [f"--{f}" for f in ("refine_rank", "refine_alpha") if flags.FLAGS[f].present]
    if given:
      raise CrossLoraError(f"{given[0]}: applies to --refine_init zero only, got it with --refine_init projection "
                           "(the projection sets the rank and alpha). Drop it or pass --refine_init zero.")
  try:
    return RefineConfig(**values, prompts_file=PROMPTS.value, guard=not NO_GUARD.value, use_cache=False)
  except CrossLoraError as e:
    raise CrossLoraError(_FIELD_NAME.sub(lambda m: _FIELD_FLAGS[m.group(1)], str(e))) from None


def with_cache(config: RefineConfig, cache_dir: pathlib.Path | None) -> RefineConfig:
  """``config`` reading and writing its corpus cache in ``cache_dir`` (None: no cache)."""
  if cache_dir is None:
    return config
  return dataclasses.replace(config, cache_dir=str(cache_dir), use_cache=True)


def check_inputs(config: RefineConfig, source_folder: pathlib.Path, target_folder: pathlib.Path) -> None:
  """What refine reads besides the models, checked before any work: the prompts and both tokenizers."""
  if config.prompts_file is not None:
    try:
      read_prompts(config.prompts_file)
    except CrossLoraError as e:
      raise CrossLoraError(f"--refine_prompts: {e}") from None
  from crosslora_jax.lm.tokenizer import Tokenizer
  for flag, folder in (("--source_model", source_folder), ("--target_model", target_folder)):
    try:
      Tokenizer.from_folder(folder)
    except CrossLoraError as e:
      raise CrossLoraError(f"{flag} (--refine distill reads its tokenizer): {e}") from None
