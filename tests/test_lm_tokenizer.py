"""crosslora_jax.lm.tokenizer: the same ids as transformers.AutoTokenizer, offsets, specials, bad folders."""

from __future__ import annotations

import json
import pathlib
import shutil
import unicodedata

import pytest

from crosslora_jax import CrossLoraError
from crosslora_jax.lm.tokenizer import Tokenizer

REAL_MODELS = ("smollm2-135m", "qwen2.5-coder-0.5b", "gemma3-270m")
TEXTS = (
    "Hello world",
    "",
    " ",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\n\n\r\nmixed",
    "def f(x):\n    return x ** 2  # comment\n",
    "unicode: héllo wörld, naïve café, 日本語のテキスト, Ελληνικά, עברית, emoji 🙂🚀👍🏽",
    "combining: e\u0301 and zero\u200bwidth and nbsp\u00a0here",
    "<|im_start|>user\nhi<|im_end|> <bos> <eos> special-looking text",
    "1234567890 3.14159 1e-5 0x1F",
)


def _tiny_tokenizer_folder(folder: pathlib.Path, **config) -> pathlib.Path:
  """A word-level tokenizer.json made with the tokenizers library, plus a tokenizer_config.json."""
  from tokenizers import Tokenizer as Backend
  from tokenizers import models, pre_tokenizers

  vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, "hello": 4, "world": 5, "again": 6}
  backend = Backend(models.WordLevel(vocab, unk_token="<unk>"))
  backend.pre_tokenizer = pre_tokenizers.Whitespace()
  backend.add_special_tokens(["<unk>", "<s>", "</s>", "<pad>"])
  folder.mkdir(parents=True, exist_ok=True)
  backend.save(str(folder / "tokenizer.json"))
  base = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
          "tokenizer_class": "PreTrainedTokenizerFast"}
  (folder / "tokenizer_config.json").write_text(json.dumps({**base, **config}))
  return folder


@pytest.mark.parametrize("config, expect", [
    ({}, [4, 5]),
    ({"add_bos_token": True}, [1, 4, 5]),
    ({"add_bos_token": True, "add_eos_token": True}, [1, 4, 5, 2]),
    ({"add_eos_token": True}, [4, 5, 2]),
])
def test_config_flags_rebuild_the_template(tmp_path, config, expect):
  """add_bos_token / add_eos_token in tokenizer_config.json decide the specials (transformers 5 drops them)."""
  from transformers import AutoTokenizer

  folder = _tiny_tokenizer_folder(tmp_path / "tok", **config)
  tok = Tokenizer.from_folder(folder)
  reference = AutoTokenizer.from_pretrained(str(folder))
  assert tok.encode("hello world") == expect
  for text in ("hello world", "again hello", "unknown words here", ""):
    plain = reference(text, add_special_tokens=False)["input_ids"]
    assert tok.encode(text) == [1] * tok.adds_bos + plain + [2] * tok.adds_eos, (config, text)
  assert tok.adds_bos == bool(config.get("add_bos_token"))
  assert tok.adds_eos == bool(config.get("add_eos_token"))
  assert (tok.bos_id, tok.eos_ids, tok.pad_id) == (1, (2,), 3)


def test_add_bos_and_add_eos_override_the_default(tmp_path):
  tok = Tokenizer.from_folder(_tiny_tokenizer_folder(tmp_path / "tok", add_bos_token=True))
  assert tok.encode("hello", add_bos=False) == [4]
  assert tok.encode("hello", add_bos=True, add_eos=True) == [1, 4, 2]
  ids, offsets = tok.encode_with_offsets("hello world", add_eos=True)
  assert ids == [1, 4, 5, 2]
  assert offsets == [(0, 0), (0, 5), (6, 11), (11, 11)]
  assert tok.encode_batch(["hello", "world again"]) == [[1, 4], [1, 5, 6]]
  assert tok.encode_batch(["hello"], add_bos=False) == [[4]]
  assert tok.decode([1, 4, 5, 2], skip_special_tokens=True) == "hello world"


def test_eos_ids_gather_every_config(tmp_path):
  folder = _tiny_tokenizer_folder(tmp_path / "tok")
  (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [6, 2], "bos_token_id": 1}))
  (folder / "config.json").write_text(json.dumps({"eos_token_id": 5}))
  tok = Tokenizer.from_folder(folder)
  assert tok.eos_ids == (2, 6, 5)
  assert tok.eos_id == 2


def test_chat_template_from_either_place(tmp_path):
  in_config = _tiny_tokenizer_folder(tmp_path / "a", chat_template="{{ messages }}")
  assert Tokenizer.from_folder(in_config).chat_template == "{{ messages }}"
  named = _tiny_tokenizer_folder(tmp_path / "b", chat_template=[{"name": "tool_use", "template": "T"},
                                                                  {"name": "default", "template": "D"}])
  assert Tokenizer.from_folder(named).chat_template == "D"
  jinja = _tiny_tokenizer_folder(tmp_path / "c")
  (jinja / "chat_template.jinja").write_text("{% for m in messages %}{{ m }}{% endfor %}")
  assert Tokenizer.from_folder(jinja).chat_template.startswith("{% for m")
  assert Tokenizer.from_folder(_tiny_tokenizer_folder(tmp_path / "d")).chat_template is None


def _bad_folder(tmp_path, kind):
  folder = _tiny_tokenizer_folder(tmp_path / "bad")
  file = folder / "tokenizer.json"
  if kind == "missing":
    file.unlink()
    (folder / "tokenizer.model").write_bytes(b"\x00sentencepiece")
  elif kind == "truncated":
    file.write_text(file.read_text()[:200])
  elif kind == "not_a_tokenizer":
    file.write_text(json.dumps({"hello": "world"}))
  elif kind == "binary":
    file.write_bytes(b"\xff\xfe\x00garbage")
  elif kind == "bad_config":
    (folder / "tokenizer_config.json").write_text("{not json")
    return folder, "tokenizer_config.json"
  elif kind == "no_folder":
    shutil.rmtree(folder)
  return folder, "tokenizer.json"


@pytest.mark.parametrize("kind", ["missing", "truncated", "not_a_tokenizer", "binary", "bad_config", "no_folder"])
def test_unusable_folder_is_one_line_naming_the_file(tmp_path, kind):
  folder, name = _bad_folder(tmp_path, kind)
  before = sorted((p.name, p.read_bytes()) for p in folder.iterdir()) if folder.exists() else None
  with pytest.raises(CrossLoraError) as caught:
    Tokenizer.from_folder(folder)
  message = str(caught.value)
  assert "\n" not in message
  assert str(folder / name) in message
  assert message.rstrip().endswith(".")
  if kind == "missing":
    assert "tokenizer.model" in message
  after = sorted((p.name, p.read_bytes()) for p in folder.iterdir()) if folder.exists() else None
  assert before == after


def test_bad_arguments(tmp_path):
  tok = Tokenizer.from_folder(_tiny_tokenizer_folder(tmp_path / "tok"))
  with pytest.raises(CrossLoraError, match="text: a str expected, got list"):
    tok.encode([4, 5])
  with pytest.raises(CrossLoraError, match=r"ids: token ids in \[0, 7\) expected, got \[99\]"):
    tok.decode([4, 99])
  no_bos = _tiny_tokenizer_folder(tmp_path / "nobos", bos_token=None)
  with pytest.raises(CrossLoraError, match="add_bos=True needs a bos_token"):
    Tokenizer.from_folder(no_bos).encode("hello", add_bos=True)


@pytest.fixture(scope="module")
def real_folders():
  from crosslora_bench import zoo

  return {name: zoo.fetch_model(name) for name in REAL_MODELS}


@pytest.mark.realmodels
@pytest.mark.parametrize("name", REAL_MODELS)
def test_real_models_match_transformers(real_folders, name):
  from transformers import AutoTokenizer

  folder = real_folders[name]
  tok = Tokenizer.from_folder(folder)
  reference = AutoTokenizer.from_pretrained(str(folder))
  for text in TEXTS:
    assert tok.encode(text) == reference(text)["input_ids"], (name, text)
    plain = reference(text, add_special_tokens=False)["input_ids"]
    assert tok.encode(text, add_bos=False, add_eos=False) == plain, (name, text)
    assert tok.decode(plain) == reference.decode(plain), (name, text)
  assert tok.encode_batch(list(TEXTS)) == [reference(t)["input_ids"] for t in TEXTS]
  assert tok.bos_id == reference.bos_token_id
  assert tok.eos_id == reference.eos_token_id
  assert tok.pad_id == reference.pad_token_id
  assert tok.vocab_size == len(reference)
  assert tok.adds_bos == (name == "gemma3-270m")  # Gemma puts <bos> in front; SmolLM2 and Qwen add nothing
  assert (tok.chat_template is not None) == (reference.chat_template is not None)
  if tok.chat_template is not None:
    assert tok.chat_template == reference.chat_template


@pytest.mark.realmodels
@pytest.mark.parametrize("name", REAL_MODELS)
def test_real_offsets_cover_the_text(real_folders, name):
  """Every token's span is inside the text, spans never go backwards, and the union covers every character."""
  tok = Tokenizer.from_folder(real_folders[name])
  for text in TEXTS:
    ids, offsets = tok.encode_with_offsets(text)
    assert len(ids) == len(offsets)
    assert ids == tok.encode(text)
    covered = set()
    previous_start = 0
    for token_id, (start, end) in zip(ids, offsets):
      assert 0 <= start <= end <= len(text)
      assert start >= previous_start
      previous_start = start
      if token_id == tok.bos_id and (start, end) == (0, 0):
        continue
      covered.update(range(start, end))
    if unicodedata.normalize("NFC", text) == text:  # NFC composition may drop a combining mark's span
      assert covered == set(range(len(text))), (name, text)
