"""The student's own corpus: the target base writes, the teacher only scores (``writer="target"``).

Learning the teacher's text teaches the target the teacher's style too: on real models
that alone moves a held-out NLL as much as the adapter does (the null control of
results/refine.md). Here the target base writes the samples, the source model reads
them twice (with and without its adapter), and the score of every token

  score[t] = log p(tok_t | source + adapter) − log p(tok_t | source base)

says which of the target's own choices the adapter favours. An adapter that changes
nothing scores every token 0, and the student learns nothing.
The scored corpus is cached like the teacher's, keyed by both models and the adapter.
"""

from __future__ import annotations

from typing import Any

from crosslora_jax.progress import Progress
from crosslora_jax.refine import corpus_cache, runtime, teacher
from crosslora_jax.refine.config import RefineConfig


def cache_key(source_folder: Any, source_adapter: Any, target_folder: Any, prompts: list[str],
              config: RefineConfig) -> dict[str, Any]:
  from crosslora_jax.formats import checkpoint
  key = teacher.cache_key(checkpoint.open_base(source_folder).fingerprint(), corpus_cache.adapter_hash(source_adapter),
                          prompts if config.prompts_file else None, config, teacher.tokenizer_hash(source_folder))
  target = teacher.cache_key(checkpoint.open_base(target_folder).fingerprint(), "", None, config,
                             teacher.tokenizer_hash(target_folder))
  return {**key, "writer": "target", "target": target["source"], "target_tokenizer": target["tokenizer"]}


def build_own_corpus(source_folder: Any, source_adapter: Any, target_folder: Any, target_lm: Any,
                     config: RefineConfig, *, progress: Progress, source_lm: Any = None) -> tuple[teacher.Corpus, dict[str, Any]]:
  """(corpus written by ``target_lm`` and scored by source base ± adapter, report dict)."""
  prompts = teacher.prompt_texts(config)
  key = cache_key(source_folder, source_adapter, target_folder, prompts, config)

  def score(texts: list[str], prompt_chars: list[int]) -> teacher.Corpus:
    scorer = source_lm if source_lm is not None else runtime.load_lm(source_folder, source_adapter, config.dtype)
    return teacher.score_texts(scorer, texts, prompt_chars, batch=config.batch, progress=progress, prompts=prompts)

  corpus, info = teacher.cached_corpus(key, config, lambda: teacher.write_texts(target_lm, prompts, config,
                                                                                progress=progress), score)
  return corpus, {**info, "writer": "target"}
