"""The teacher's corpus: source base + adapter writes text, every token scored by the adapter's change.

A sample is ``prompt + continuation`` as text. The text is re-encoded with the
source tokenizer (with offsets), so scores belong to the canonical tokens of the
text, which is what the student's tokens are aligned to:

  score[t] = log p(tok_t | source + adapter) − log p(tok_t | source base)

Prompt tokens (characters before ``prompt_chars``) are context only: score 0.
The corpus (texts, prompt lengths, teacher spans and scores) is cached on disk
(:mod:`crosslora_jax.refine.corpus_cache`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from typing import Any, Callable, Sequence

import numpy as np

from crosslora_jax.progress import Progress
from crosslora_jax.refine import corpus_cache, runtime
from crosslora_jax.refine.config import RefineConfig
from crosslora_jax.refine.prompts import read_prompts, render_prompt


@dataclasses.dataclass
class Corpus:
  texts: list[str]  # rendered prompt + continuation, as the teacher saw it
  prompt_chars: list[int]  # characters of each text that are prompt (context, never learned)
  prompts: list[str]  # the raw prompts ("" = from the separator token): the student renders its own
  spans: list[list[tuple[int, int]]]  # teacher tokens' character spans
  scores: list[list[float]]  # teacher tokens' scores (nats), 0 on prompt and special tokens
  # With RefineConfig.vocab_k: per token, the k candidates of its distribution and their change (refine.vocab).
  cand_ids: list[list[list[int]]] | None = None
  cand_deltas: list[list[list[float]]] | None = None

  def to_payload(self) -> dict[str, Any]:
    payload = {"texts": self.texts, "prompt_chars": self.prompt_chars, "prompts": self.prompts,
               "spans": [[list(s) for s in row] for row in self.spans], "scores": self.scores}
    if self.cand_ids is not None:
      payload.update(cand_ids=self.cand_ids, cand_deltas=self.cand_deltas)
    return payload

  @classmethod
  def from_payload(cls, payload: dict[str, Any]) -> Corpus:
    n = len(payload["texts"])
    return cls(texts=list(payload["texts"]), prompt_chars=[int(c) for c in payload.get("prompt_chars", [0] * n)],
               prompts=[str(p) for p in payload.get("prompts", [""] * n)],
               spans=[[tuple(s) for s in row] for row in payload["spans"]], scores=[list(map(float, r)) for r in payload["scores"]],
               cand_ids=payload.get("cand_ids"), cand_deltas=payload.get("cand_deltas"))


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "chat_template.json",
                   "special_tokens_map.json", "generation_config.json")


def tokenizer_hash(folder: Any) -> str:
  """sha256 of the source folder's tokenizer files (not part of the checkpoint fingerprint)."""
  import pathlib
  h = hashlib.sha256()
  for name in TOKENIZER_FILES:
    file = pathlib.Path(folder) / name
    if file.is_file():
      h.update(name.encode() + b"\x00" + file.read_bytes())
  return h.hexdigest()


def cache_key(source_fingerprint: str, adapter_sha: str, prompts: Sequence[str] | None, config: RefineConfig,
              tokenizer_sha: str = "") -> dict[str, Any]:
  prompts_sha = hashlib.sha256("\x00".join(prompts).encode()).hexdigest() if prompts else None
  extra = {"vocab_k": config.vocab_k} if config.vocab_k else {}  # keys of corpora without candidates unchanged
  if runtime.SAMPLE_ROWS != runtime.KEYLESS_SAMPLE_ROWS:  # the rows a call set the random streams
    extra["sample_rows"] = runtime.SAMPLE_ROWS
  return {**extra, "source": hashlib.sha256(source_fingerprint.encode()).hexdigest(), "tokenizer": tokenizer_sha, "adapter": adapter_sha,
          "prompts": prompts_sha, "samples": config.written_samples, "sample_tokens": config.sample_tokens,
          "temperature": float(config.temperature), "top_p": float(config.top_p), "seed": config.seed}


def prompt_texts(config: RefineConfig) -> list[str]:
  """One prompt text per sample: the file's prompts in turn, else "" (the separator token alone)."""
  prompts = read_prompts(config.prompts_file) if config.prompts_file else [""]
  return [prompts[i % len(prompts)] for i in range(config.written_samples)]


def write_texts(teacher: Any, prompts: Sequence[str], config: RefineConfig, *, progress: Progress) -> tuple[list[str], list[int]]:
  """Samples continuations; returns (texts = rendered prompt + continuation, prompt lengths in characters)."""
  tok = teacher.tokenizer
  separator = tok.bos_id if tok.bos_id is not None else tok.eos_id
  rendered = [render_prompt(tok, p)[0] for p in prompts]
  prompt_ids = [([separator] if separator is not None else []) + tok.encode(p, add_bos=False, add_eos=False) for p in rendered]
  outputs = runtime.generate(teacher, prompt_ids, max_new_tokens=config.sample_tokens, temperature=config.temperature,
                             top_p=config.top_p, seed=config.seed, eos_ids=list(tok.eos_ids), progress=progress)
  texts, prompt_chars = [], []
  for prompt, new_ids in zip(rendered, outputs):
    stop = next((i for i, t in enumerate(new_ids) if t in tok.eos_ids), len(new_ids))
    texts.append(prompt + tok.decode(new_ids[:stop], skip_special_tokens=True))
    prompt_chars.append(len(prompt))
  return texts, prompt_chars


def score_texts(teacher: Any, texts: Sequence[str], prompt_chars: Sequence[int], *, batch: int, progress: Progress,
                prompts: Sequence[str] | None = None, vocab_k: int = 0) -> Corpus:
  """Scores every teacher token of ``texts`` by log p(with adapter) − log p(base); with ``vocab_k``,
  also the change of each position's ``vocab_k`` likeliest tokens (:mod:`crosslora_jax.refine.vocab`)."""
  tok = teacher.tokenizer
  encoded = [tok.encode_with_offsets(t) for t in texts]
  ids_rows = [e[0] for e in encoded]
  with_adapter = runtime.sequence_logprobs(teacher, ids_rows, batch=batch, use_lora=True, progress=progress, what="teacher scores (adapter)")
  without = runtime.sequence_logprobs(teacher, ids_rows, batch=batch, use_lora=False, progress=progress, what="teacher scores (base)")
  spans, scores = [], []
  for (ids, offsets), lp_a, lp_b, p_chars in zip(encoded, with_adapter, without, prompt_chars):
    row = np.zeros(len(ids))
    row[1:] = lp_a - lp_b  # token 0 is never predicted
    for i, (start, end) in enumerate(offsets):
      if end <= start or start < p_chars:
        row[i] = 0.0
    spans.append([tuple(o) for o in offsets])
    scores.append(row.tolist())
  corpus = Corpus(texts=list(texts), prompt_chars=list(prompt_chars), prompts=list(prompts or [""] * len(texts)),
                  spans=spans, scores=scores)
  if vocab_k:
    from crosslora_jax.refine.vocab import teacher_candidates
    corpus.cand_ids, corpus.cand_deltas = teacher_candidates(teacher, ids_rows, vocab_k, batch=batch)
  return corpus


def build_corpus(source_folder: Any, source_adapter: Any, config: RefineConfig, *, progress: Progress,
                 teacher: Any = None) -> tuple[Corpus, dict[str, Any]]:
  """The scored teacher corpus, from the cache when an intact entry is there; plus a report dict."""
  from crosslora_jax.formats import checkpoint
  prompts = prompt_texts(config)
  key = cache_key(checkpoint.open_base(source_folder).fingerprint(), corpus_cache.adapter_hash(source_adapter),
                  prompts if config.prompts_file else None, config, tokenizer_hash(source_folder))
  loaded: list[Any] = [teacher]

  def lm() -> Any:  # loaded on a cache miss only
    if loaded[0] is None:
      loaded[0] = runtime.load_lm(source_folder, source_adapter, config.dtype)
    return loaded[0]

  return cached_corpus(key, config, lambda: write_texts(lm(), prompts, config, progress=progress),
                       lambda texts, chars: score_texts(lm(), texts, chars, batch=config.batch, progress=progress,
                                                        prompts=prompts, vocab_k=config.vocab_k))


def cached_corpus(key: dict[str, Any], config: RefineConfig, write: Callable[[], tuple[list[str], list[int]]],
                  score: Callable[[list[str], list[int]], Corpus]) -> tuple[Corpus, dict[str, Any]]:
  """The corpus under ``key`` from the cache when an intact entry is there, else ``write()`` then
  ``score(texts, prompt_chars)``, stored; plus the report dict (cache status, seconds per phase)."""
  start = time.perf_counter()
  root = config.cache_root()
  status = "disabled"
  if config.use_cache:
    payload, status = corpus_cache.load(root, key)
    if payload is not None and len(payload["texts"]) == config.written_samples and (not config.vocab_k or "cand_ids" in payload):
      corpus = Corpus.from_payload(payload)
      return corpus, {"cache": "hit", "seconds": time.perf_counter() - start, "samples": len(corpus.texts),
                      "teacher_tokens": sum(len(s) for s in corpus.spans)}
  t_sample = time.perf_counter()
  texts, prompt_chars = write()
  t_score = time.perf_counter()
  corpus = score(texts, prompt_chars)
  stored = corpus_cache.store(root, key, corpus.to_payload()) if config.use_cache else None
  return corpus, {"cache": "miss" if status == "absent" else status, "stored": stored is not None,
                  "seconds": time.perf_counter() - start, "sample_seconds": t_score - t_sample,
                  "score_seconds": time.perf_counter() - t_score, "samples": len(texts),
                  "teacher_tokens": sum(len(s) for s in corpus.spans)}
