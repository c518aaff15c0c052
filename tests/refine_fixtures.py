"""Tiny model folders with their own small BPE tokenizers (two different ones), for refine tests."""

from __future__ import annotations

import json
import pathlib

TEXT = ("the quick brown fox jumps over the lazy dog. a function returns a value; a class holds "
        "methods and data. lists, tuples and dicts are containers. for each item in the list, print it. "
        "numbers add up: one two three four five six seven eight nine ten. ") * 4


def write_tokenizer(folder: pathlib.Path, vocab_size: int) -> int:
  """A Metaspace BPE tokenizer trained on TEXT (decode(encode(t)) == t); returns its vocabulary size."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Metaspace()
  tok.decoder = decoders.Metaspace()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<unk>"], show_progress=False)
  tok.train_from_iterator([TEXT], trainer=trainer)
  tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
  folder.mkdir(parents=True, exist_ok=True)
  tok.save(str(folder / "tokenizer.json"))
  (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
  return tok.get_vocab_size()


def make_model_folder(folder: pathlib.Path, kind: str, tokenizer_vocab: int, seed: int):
  """A tiny random ``kind`` model whose vocabulary is its tokenizer's; returns the torch model."""
  from fixtures import make_model

  vocab = write_tokenizer(folder, tokenizer_vocab)
  return make_model(kind, folder, seed=seed, vocab_size=vocab, bos_token_id=0, eos_token_id=1,
                    max_position_embeddings=256)
