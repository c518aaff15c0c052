"""The student's data and losses: teacher text on the target's tokens, with carried scores.

Arrays, all (N, T-1) over predicted positions (position t predicts token t+1):
``real`` the token exists; ``learn`` it is a real, non-prompt, non-special token;
``target`` the carried teacher score (nats); ``weights`` from the token selection;
``base_lp`` the target base's log-prob of the token (for the anchor, the delta loss
and the held-back check: Δ_student = log p_student − log p_target base).
With the vocabulary term (:mod:`crosslora_jax.refine.vocab`), (N, T-1, k): ``cand_ids``
candidate next tokens, ``cand_target`` the teacher's change of each, ``cand_mask`` the
carried ones, ``cand_base`` the target base's log-probs of them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from crosslora_jax.refine.align import carry_scores
from crosslora_jax.refine.runtime import LENGTH_QUANTUM


@dataclasses.dataclass
class StudentData:
  ids: np.ndarray  # (N, T) int32
  real: np.ndarray  # (N, T) bool, real input tokens
  learn: np.ndarray  # (N, T-1) bool
  target: np.ndarray  # (N, T-1) float32
  weights: np.ndarray | None = None  # (N, T-1) float32
  base_lp: np.ndarray | None = None  # (N, T-1) float32
  cand_ids: np.ndarray | None = None  # (N, T-1, k) int32
  cand_target: np.ndarray | None = None  # (N, T-1, k) float32
  cand_mask: np.ndarray | None = None  # (N, T-1, k) bool
  cand_base: np.ndarray | None = None  # (N, T-1, k) float32

  def rows(self, index: np.ndarray) -> StudentData:
    pick = lambda a: None if a is None else a[index]
    return StudentData(self.ids[index], self.real[index], self.learn[index], self.target[index],
                       pick(self.weights), pick(self.base_lp), pick(self.cand_ids), pick(self.cand_target),
                       pick(self.cand_mask), pick(self.cand_base))

  def batch(self, index: np.ndarray) -> dict[str, np.ndarray]:
    part = self.rows(index)
    out = {"ids": part.ids, "real": part.real, "learn": part.learn, "target": part.target,
           "weights": part.weights, "base_lp": part.base_lp}
    if part.cand_ids is not None:
      out.update(cand_ids=part.cand_ids, cand_target=part.cand_target, cand_mask=part.cand_mask, cand_base=part.cand_base)
    return out


def _shift(spans, by: int) -> np.ndarray:
  """Spans of a text → spans of its suffix from character ``by`` (tokens before it become empty)."""
  array = np.asarray(spans, np.int64).reshape(-1, 2) - by
  return np.maximum(array, 0)


def encode_corpus(corpus: Any, tokenizer: Any, *, max_tokens: int, mapping: np.ndarray | None = None) -> StudentData:
  """Tokenizes the teacher texts for the student and carries the teacher's scores onto its tokens.

  The continuation is the same text for both; the prompt is rendered in each model's own
  chat template (when prompts came with one), so scores are carried on the continuation.
  With ``mapping`` (source id → target id, :func:`crosslora_jax.refine.vocab.vocab_map`) and a
  corpus holding candidates, the candidates are carried too (``cand_*`` arrays).
  """
  from crosslora_jax.refine.prompts import render_prompt
  rows, learn_rows, target_rows, cand_rows = [], [], [], []
  with_candidates = mapping is not None and corpus.cand_ids is not None
  for index, (text, p_chars, prompt, spans, scores) in enumerate(zip(corpus.texts, corpus.prompt_chars, corpus.prompts,
                                                                     corpus.spans, corpus.scores)):
    continuation = text[p_chars:]
    student_prompt = render_prompt(tokenizer, prompt)[0]
    own_chars = len(student_prompt)
    ids, offsets = tokenizer.encode_with_offsets(student_prompt + continuation)
    ids, offsets = ids[:max_tokens], offsets[:max_tokens]
    if offsets:
      carried = carry_scores(scores, _shift(spans, p_chars), _shift(offsets, own_chars), text_len=len(continuation))
    else:
      carried = np.zeros(0)
    learnable = np.array([end > start and start >= own_chars for start, end in offsets], bool)
    rows.append(ids)
    learn_rows.append(learnable[1:])
    target_rows.append(carried[1:])
    if with_candidates:
      cand_rows.append(_carry_candidates(corpus, index, spans, p_chars, offsets, own_chars, learnable, mapping))
  length = -(-max(max(len(r) for r in rows), 2) // LENGTH_QUANTUM) * LENGTH_QUANTUM
  n = len(rows)
  pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
  ids = np.full((n, length), pad_id, np.int32)
  real = np.zeros((n, length), bool)
  learn = np.zeros((n, length - 1), bool)
  target = np.zeros((n, length - 1), np.float32)
  for i, (row, lrn, tgt) in enumerate(zip(rows, learn_rows, target_rows)):
    ids[i, :len(row)] = row
    real[i, :len(row)] = True
    learn[i, :len(lrn)] = lrn
    target[i, :len(tgt)] = tgt
  data = StudentData(ids, real, learn, target)
  if with_candidates:
    k = len(corpus.cand_ids[0][0]) if corpus.cand_ids and corpus.cand_ids[0] else 0
    data.cand_ids = np.zeros((n, length - 1, k), np.int32)
    data.cand_target = np.zeros((n, length - 1, k), np.float32)
    data.cand_mask = np.zeros((n, length - 1, k), bool)
    for i, (c_ids, c_target, c_mask) in enumerate(cand_rows):
      m = len(c_ids)
      data.cand_ids[i, :m], data.cand_target[i, :m], data.cand_mask[i, :m] = c_ids, c_target, c_mask
  return data


def _carry_candidates(corpus: Any, index: int, spans, p_chars: int, offsets, own_chars: int, learnable: np.ndarray,
                      mapping: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """One sample's teacher candidates on its student tokens, (n_student - 1, k) each (predicted positions)."""
  from crosslora_jax.refine.vocab import align_row
  t_spans = np.asarray(spans, np.int64).reshape(-1, 2)
  t_live = (t_spans[:, 1] > t_spans[:, 0]) & (t_spans[:, 0] >= p_chars)
  t_live[:1] = False  # token 0 has no prediction
  s_spans = np.asarray(offsets, np.int64).reshape(-1, 2)
  s_live = learnable.copy()
  s_live[:1] = False
  ids, target, mask = align_row(t_spans[:, 0] - p_chars, t_live, np.asarray(corpus.cand_ids[index], np.int64),
                                np.asarray(corpus.cand_deltas[index], np.float32), s_spans[:, 0] - own_chars, s_live,
                                mapping)
  return ids[1:], target[1:], mask[1:]


def make_loss(cfg: Any, spec: Any, *, loss: str, anchor: float, clip: float = 0.2, vocab: bool = False):
  """loss_fn(lora, batch, params) -> scalar, batch = :meth:`StudentData.batch` as jnp arrays.

  ``vocab``: the delta loss adds the vocabulary term, the same squared error on the carried
  candidates (``cand_*``), averaged over them.

  The base ``params`` are an argument, not a closure: a closed-over pytree would be
  baked into the compiled step as constants (gigabytes for a real model).
  """
  import jax.numpy as jnp
  from crosslora_jax.lm import model

  def loss_fn(lora, batch, params):
    if vocab:
      return delta_with_vocab(lora, batch, params)
    lp = model.token_logprobs(params, lora, spec, cfg, batch["ids"], batch["real"])  # (B, T-1)
    learn = batch["learn"].astype(jnp.float32)
    change = lp - batch["base_lp"]
    if loss == "delta":
      # A token the adapter left exactly unchanged (score 0) carries no signal; without this a
      # null teacher would train on float noise in `change`, which Adam scales up to full steps.
      matched = learn * (batch["target"] != 0.0)
      return jnp.sum(matched * (change - batch["target"]) ** 2) / jnp.maximum(jnp.sum(matched), 1.0)
    if loss == "reward":
      # PPO's clipped surrogate on the student's own tokens (behaviour policy = the target base):
      # advantage = the centred carried score; the clip stops a token once its ratio left 1 ± clip.
      advantage = batch["weights"]
      ratio = jnp.exp(change)
      surrogate = jnp.minimum(ratio * advantage, jnp.clip(ratio, 1.0 - clip, 1.0 + clip) * advantage)
      return -jnp.sum(learn * surrogate) / jnp.maximum(jnp.sum(learn), 1.0)
    weights = batch["weights"] * learn
    nll = -jnp.sum(weights * lp) / jnp.maximum(jnp.sum(weights), 1.0)
    if anchor == 0.0:
      return nll
    others = learn * (weights == 0)
    return nll + anchor * jnp.sum(others * change ** 2) / jnp.maximum(jnp.sum(others), 1.0)

  def delta_with_vocab(lora, batch, params):
    hidden, _ = model.forward(params, lora, spec, cfg, batch["ids"], kv_mask=batch["real"])
    # The sampled token and its k candidates share one pass over the vocabulary.
    targets = jnp.concatenate([batch["ids"][:, 1:, None], batch["cand_ids"]], axis=-1)
    lp = model.chunked_log_softmax_at(hidden[:, :-1], model.unembedding(params, cfg), targets, cfg)
    matched = batch["learn"].astype(jnp.float32) * (batch["target"] != 0.0)
    sampled = jnp.sum(matched * (lp[..., 0] - batch["base_lp"] - batch["target"]) ** 2) / jnp.maximum(jnp.sum(matched), 1.0)
    carried = batch["cand_mask"].astype(jnp.float32)
    error = (lp[..., 1:] - batch["cand_base"] - batch["cand_target"]) ** 2
    return sampled + jnp.sum(carried * error) / jnp.maximum(jnp.sum(carried), 1.0)

  return loss_fn


def heldout_metrics(lp: np.ndarray, data: StudentData) -> dict[str, float]:
  """Held-back checks from the student's log-probs ``lp`` (N, T-1) on held-back teacher text.

  ``delta_error``: mean (Δ_student − Δ_teacher)² over learnable tokens, lower is better
  (0 = the student changed exactly as the adapter changed the source);
  ``agreement``: correlation of the two changes; ``nll_selected``: the student's NLL on
  the selected tokens; ``nll_all``: on every learnable token.
  """
  learn = data.learn
  change = (lp - data.base_lp)[learn]
  teacher = data.target[learn]
  # Reward advantages are signed: the selected tokens are the ones it raises.
  weights = np.maximum(data.weights * learn, 0.0)[learn] if data.weights is not None else np.ones_like(teacher)
  spread = change.std() * teacher.std()
  agreement = float(np.mean((change - change.mean()) * (teacher - teacher.mean())) / spread) if spread > 0 else 0.0
  return {"delta_error": float(np.mean((change - teacher) ** 2)), "agreement": agreement,
          "nll_selected": float(-np.sum(weights * lp[learn]) / max(weights.sum(), 1e-9)),
          "nll_all": float(-np.mean(lp[learn])), "mean_change": float(change.mean())}
