"""Refine pieces that need no LM runtime: score carrying, selection, cache, config, prompts."""

import json

import numpy as np
import pytest

from crosslora_jax.errors import CrossLoraError
from crosslora_jax.refine import RefineConfig, carry_scores, read_prompts, token_weights
from crosslora_jax.refine import corpus_cache

TEXT = 'def foo(x):\n    """Return x, doubled."""  é 日本 🙂 done\n\nclass Bar:  # ok\n'


def _tokenizer(name):
  from tokenizers import Tokenizer
  from crosslora_bench import zoo
  folder = zoo.model_path(name)
  if folder is None:
    pytest.skip(f"{name} not fetched")
  return Tokenizer.from_file(str(folder / "tokenizer.json"))


def test_carry_keeps_total_and_splits_by_characters():
  # teacher: "ab|cd" ; student: "a|bcd"
  out = carry_scores([2.0, 4.0], [(0, 2), (2, 4)], [(0, 1), (1, 4)])
  np.testing.assert_allclose(out, [1.0, 1.0 + 4.0])


def test_carry_identity_and_zero_width_tokens():
  spans = [(0, 0), (0, 3), (3, 5), (5, 5)]
  out = carry_scores([9.0, 1.0, -2.0, 7.0], spans, spans)
  np.testing.assert_allclose(out, [0.0, 1.0, -2.0, 0.0])


def test_carry_shared_spans_counted_once_each():
  # byte-level tokenizers give the pieces of one emoji the same span
  out = carry_scores([1.0, 2.0, 3.0], [(0, 1), (0, 1), (1, 2)], [(0, 2)])
  np.testing.assert_allclose(out, [6.0])


@pytest.mark.parametrize("bad", [dict(scores=[1.0], from_spans=[(0, 1), (1, 2)]),
                                 dict(scores=[np.nan], from_spans=[(0, 1)]),
                                 dict(scores=[1.0], from_spans=[(2, 1)])])
def test_carry_rejects_bad_input(bad):
  with pytest.raises(CrossLoraError):
    carry_scores(bad["scores"], bad["from_spans"], [(0, 1)])


@pytest.mark.parametrize("teacher,student", [("smollm2-135m", "qwen2.5-coder-0.5b"),
                                             ("qwen2.5-coder-0.5b", "gemma3-270m"),
                                             ("gemma3-270m", "smollm2-135m")])
def test_carry_on_real_tokenizer_pairs(teacher, student):
  t_enc = _tokenizer(teacher).encode(TEXT)
  s_enc = _tokenizer(student).encode(TEXT)
  assert t_enc.ids != s_enc.ids  # the two tokenizers really differ on this text
  rng = np.random.default_rng(0)
  scores = rng.normal(size=len(t_enc.ids))
  scores[[i for i, (a, b) in enumerate(t_enc.offsets) if a == b]] = 0.0  # special tokens carry nothing
  out = carry_scores(scores, t_enc.offsets, s_enc.offsets, text_len=len(TEXT))
  assert out.shape == (len(s_enc.ids),)
  np.testing.assert_allclose(out.sum(), scores.sum(), atol=1e-9)
  # A score on one teacher token lands only on student tokens overlapping its characters.
  k = next(i for i, (a, b) in enumerate(t_enc.offsets) if TEXT[a:b].strip() == "Return")
  one = np.zeros(len(t_enc.ids)); one[k] = 1.0
  got = carry_scores(one, t_enc.offsets, s_enc.offsets, text_len=len(TEXT))
  a, b = t_enc.offsets[k]
  for j, (sa, sb) in enumerate(s_enc.offsets):
    overlaps = min(b, sb) > max(a, sa)
    assert (got[j] > 0) == overlaps, (j, (sa, sb), (a, b))
  # Round trip through the other tokenizer keeps totals per character range.
  back = carry_scores(out, s_enc.offsets, t_enc.offsets, text_len=len(TEXT))
  np.testing.assert_allclose(back.sum(), scores.sum(), atol=1e-9)


def test_selection_modes():
  scores = np.array([[5.0, -1.0, 3.0, 0.5], [2.0, 9.0, -4.0, 1.0]])
  mask = np.array([[True, True, True, False], [True, True, True, True]])
  np.testing.assert_array_equal(token_weights(scores, mask, selection="all"), mask.astype(np.float32))
  top = token_weights(scores, mask, selection="topk", fraction=3 / 7)
  np.testing.assert_array_equal(top, [[1, 0, 1, 0], [0, 1, 0, 0]])  # 9, 5, 3: never the masked 0.5
  w = token_weights(scores, mask, selection="weighted")
  assert w[0, 3] == 0 and w[0, 1] == 0 and w[1, 2] == 0
  np.testing.assert_allclose(w[mask].mean(), 1.0, rtol=1e-6)
  np.testing.assert_allclose(w[1, 1] / w[0, 0], 9 / 5, rtol=1e-6)
  with pytest.raises(CrossLoraError, match="selection"):
    token_weights(scores, mask, selection="best")
  with pytest.raises(CrossLoraError, match="fraction"):
    token_weights(scores, mask, selection="topk", fraction=0.0)


def test_topk_ties_keep_exactly_k():
  w = token_weights(np.ones((2, 5)), np.ones((2, 5), bool), selection="topk", fraction=0.3)
  assert w.sum() == 3


KEY = {"source": "abc", "adapter": "def", "temperature": 1.0, "seed": 3}
PAYLOAD = {"texts": ["hi there", "x"], "spans": [[[0, 2], [2, 8]], [[0, 1]]], "scores": [[0.5, -1.0], [2.0]]}


def test_cache_miss_hit_and_key(tmp_path):
  assert corpus_cache.load(tmp_path, KEY) == (None, "absent")
  path = corpus_cache.store(tmp_path, KEY, PAYLOAD)
  assert path is not None and path.parent == tmp_path
  assert corpus_cache.load(tmp_path, KEY) == (PAYLOAD, "hit")
  assert corpus_cache.load(tmp_path, {**KEY, "seed": 4}) == (None, "absent")
  assert not list(tmp_path.glob(".*tmp"))  # no temporary file left behind


@pytest.mark.parametrize("damage", ["truncate", "flip", "key", "payload"])
def test_cache_corrupt_entry_is_a_miss(tmp_path, damage):
  path = corpus_cache.store(tmp_path, KEY, PAYLOAD)
  raw = path.read_text()
  if damage == "truncate":
    path.write_text(raw[: len(raw) // 2])
  elif damage == "flip":
    path.write_text(raw.replace("hi there", "hi thera"))
  elif damage == "key":
    entry = json.loads(raw); entry["key"]["seed"] = 99; path.write_text(json.dumps(entry))
  else:
    entry = json.loads(raw); entry["payload"]["scores"] = [[0.5], [2.0]]; path.write_text(json.dumps(entry))
  payload, why = corpus_cache.load(tmp_path, KEY)
  assert payload is None and why.startswith("corrupt"), why
  corpus_cache.store(tmp_path, KEY, PAYLOAD)  # recomputed entry overwrites the bad one
  assert corpus_cache.load(tmp_path, KEY) == (PAYLOAD, "hit")


def test_cache_unwritable_root_is_not_an_error(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("x")
  assert corpus_cache.store(blocker / "sub", KEY, PAYLOAD) is None


@pytest.mark.parametrize("field,value", [("tokens", 0), ("tokens", -5), ("steps", 0), ("lr", 0.0), ("lr", float("nan")),
                                         ("fraction", 1.5), ("batch", 2.5), ("selection", "best"), ("loss", "kl2"),
                                         ("temperature", -1.0), ("rank", 0), ("heldout_fraction", 0.9),
                                         ("seed", -1), ("anchor", -0.1), ("target_modules", ()), ("steps", True),
                                         ("pool", 0)])
def test_config_rejects_bad_values_in_one_line(field, value):
  with pytest.raises(CrossLoraError) as info:
    RefineConfig(**{field: value})
  message = str(info.value)
  assert field in message and "\n" not in message


def test_config_defaults_and_counts():
  cfg = RefineConfig(tokens=1000, sample_tokens=100, heldout_fraction=0.2)
  assert cfg.samples == 10 and cfg.heldout_samples == 2
  with pytest.raises(CrossLoraError, match="refine options"):
    RefineConfig(tokens=0, steps=0)


def test_prompts_lines_and_jsonl(tmp_path):
  lines = tmp_path / "p.txt"
  lines.write_text("\ufeffWrite a function.\n\n  Explain lists.  \n", encoding="utf-8")
  assert read_prompts(lines) == ["Write a function.", "Explain lists."]
  jsonl = tmp_path / "p.jsonl"
  jsonl.write_text('{"prompt": "a\\nb"}\n{"prompt": "c", "id": 2}\n')
  assert read_prompts(jsonl) == ["a\nb", "c"]


@pytest.mark.parametrize("content,match", [(None, "prompts file expected"), (b"", "at least one prompt"),
                                           (b"\n  \n", "at least one prompt"), (b"caf\xe9\n", "UTF-8"),
                                           (b'{"prompt": 3}\n', "prompt"), (b'{"prompt": "a"\n', "JSON")])
def test_prompts_errors_are_one_line(tmp_path, content, match):
  path = tmp_path / "prompts.txt"
  if content is not None:
    path.write_bytes(content)
  with pytest.raises(CrossLoraError, match=match) as info:
    read_prompts(path)
  assert "\n" not in str(info.value) and str(path) in str(info.value)


def _runtime_tokenizer(name):
  from crosslora_bench import zoo
  from crosslora_jax.lm.tokenizer import Tokenizer
  folder = zoo.model_path(name)
  if folder is None:
    pytest.skip(f"{name} not fetched")
  return Tokenizer.from_folder(folder)


def test_render_prompt_uses_each_models_chat_template():
  from crosslora_jax.refine.prompts import render_prompt
  smol, qwen = _runtime_tokenizer("smollm2-135m"), _runtime_tokenizer("qwen2.5-coder-0.5b")
  s_text, s_applied = render_prompt(smol, "Sort a list.")
  q_text, q_applied = render_prompt(qwen, "Sort a list.")
  assert s_applied and q_applied and s_text != q_text
  assert "Sort a list." in s_text and "<|im_start|>assistant" in q_text
  assert render_prompt(qwen, "") == ("", False)  # from the separator token: no template


def test_student_learns_only_the_continuation_under_its_own_template():
  from crosslora_jax.refine import student
  from crosslora_jax.refine.prompts import render_prompt
  from crosslora_jax.refine.teacher import Corpus
  smol, qwen = _runtime_tokenizer("smollm2-135m"), _runtime_tokenizer("qwen2.5-coder-0.5b")
  prompt, continuation = "Sort a list.", "Use sorted(items) to get a new list."
  rendered = render_prompt(smol, prompt)[0]
  text = rendered + continuation
  ids, spans = smol.encode_with_offsets(text)
  scores = [1.0 if start >= len(rendered) and end > start else 0.0 for start, end in spans]
  corpus = Corpus(texts=[text], prompt_chars=[len(rendered)], prompts=[prompt], spans=[spans], scores=[scores])
  data = student.encode_corpus(corpus, qwen, max_tokens=256)
  s_ids, s_spans = qwen.encode_with_offsets(render_prompt(qwen, prompt)[0] + continuation)
  n = len(s_ids)
  np.testing.assert_array_equal(data.ids[0, :n], s_ids)
  own = len(render_prompt(qwen, prompt)[0])
  expected_learn = [start >= own and end > start for start, end in s_spans[1:]]
  np.testing.assert_array_equal(data.learn[0, :n - 1], expected_learn)
  # Every teacher score sits on the continuation, so the student's carried scores add up to it.
  np.testing.assert_allclose(data.target[0].sum(), sum(scores), rtol=1e-6)
  assert not data.target[0, :n - 1][~np.asarray(expected_learn)].any()


def test_teacher_sampling_rows_follow_the_kv_budget(monkeypatch, tmp_path):
  from fixtures import make_lm_model
  from crosslora_jax import lm as jlm
  from crosslora_jax.lm import sample
  from crosslora_jax.refine import runtime
  make_lm_model("gpt2", tmp_path / "m")
  lm = jlm.load(tmp_path / "m")
  short, long = [[1, 2, 3]] * 10, [[1] * 60] * 10
  assert runtime.sample_rows(lm, short, 8) == runtime.SAMPLE_ROWS  # a tiny model: the cap
  budget = 4 * sample.cache_bytes(lm, 1, 60, 8)
  monkeypatch.setattr(runtime, "SAMPLE_CACHE_BYTES", budget)
  assert runtime.sample_rows(lm, long, 8) == 4
  assert runtime.sample_rows(lm, short, 8) == min(runtime.SAMPLE_ROWS, budget // sample.cache_bytes(lm, 1, 3, 8))
  monkeypatch.setattr(runtime, "SAMPLE_CACHE_BYTES", 1)
  assert runtime.sample_rows(lm, long, 8) == 1  # never zero rows
  # Calls of 4 rows, seed * 100_003 + call index each: the same as calling the sampler that way.
  monkeypatch.setattr(runtime, "SAMPLE_CACHE_BYTES", budget)
  got = runtime.generate(lm, long, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=3, eos_ids=[], progress=False)
  want = [row for i, start in enumerate(range(0, 10, 4))
          for row in sample.generate(lm, long[start:start + 4], max_new_tokens=8, temperature=1.0, top_p=0.9,
                                     seed=3 * 100_003 + i, eos_ids=[])]
  assert got == want and len(got) == 10


def test_corpus_key_carries_sample_rows_only_off_32(monkeypatch):
  from crosslora_jax.refine import runtime, teacher
  config = RefineConfig()
  monkeypatch.setattr(runtime, "SAMPLE_ROWS", 32)
  at_32 = teacher.cache_key("fp", "sha", None, config)
  assert "sample_rows" not in at_32  # the keys of every corpus written so far
  monkeypatch.setattr(runtime, "SAMPLE_ROWS", 64)
  at_64 = teacher.cache_key("fp", "sha", None, config)
  assert at_64 == {**at_32, "sample_rows": 64}


def test_pool_trains_on_the_samples_the_adapter_changed_most():
  from crosslora_jax.refine import pipeline
  config = RefineConfig(tokens=96 * 8, pool=2)  # 8 samples, 1 held back; the teacher writes 16
  assert (config.samples, config.heldout_samples, config.written_samples) == (8, 1, 16)
  scores = np.random.default_rng(5).normal(size=16)
  train, held = pipeline._split(16, config, scores)
  rest = [i for i in range(16) if i not in set(held)]
  assert len(held) == 1 and list(train) == sorted(sorted(rest, key=lambda i: -scores[i])[:7])
  one = RefineConfig(tokens=96 * 8)  # pool 1: held back at random, every other sample trained on
  train1, held1 = pipeline._split(8, one, scores[:8])
  order = np.random.default_rng(one.seed).permutation(8)
  assert list(held1) == sorted(order[:1]) and list(train1) == sorted(order[1:])
  learn = np.array([[True, True, False], [False, False, False], [True, False, False]])
  per_token = np.array([[1.0, 3.0, 100.0], [5.0, 5.0, 5.0], [-1.0, 9.0, 9.0]])
  np.testing.assert_allclose(pipeline.sample_scores(per_token, learn), [2.0, -np.inf, -1.0])
