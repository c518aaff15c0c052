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


def make_refine_models(root: pathlib.Path) -> pathlib.Path:
  """``root`` with ``source`` (tiny llama), its ``adapter`` and ``target`` (tiny qwen2): two different tokenizers."""
  from fixtures import make_adapter
  source = make_model_folder(root / "source", "llama", 120, seed=0)
  make_adapter(source, root / "adapter", kind="llama", scale=2.0)
  make_model_folder(root / "target", "qwen2", 90, seed=1)
  return root


# Runs the transfer CLI (argv[3:]) with a signal sent to itself at a chosen point of --refine distill:
# argv[1] the signal's name, argv[2] "sampling" (the teacher's 3rd decode step) or "training" (the
# student's 2nd held-back check, after step eval_every). The handlers are the CLI's own, as for a real kill.
SIGNAL_RUNNER = """
import os, signal, sys
from crosslora_jax.lm import sample
from crosslora_jax.refine import trainer
signum, phase = getattr(signal, sys.argv[1]), sys.argv[2]
module, name, at = (sample, "_decode_step", 3) if phase == "sampling" else (trainer, "_evaluate", 2)
real, calls = getattr(module, name), []
def signalled(*args, **kwargs):
  calls.append(1)
  if len(calls) == at:
    os.kill(os.getpid(), signum)
  return real(*args, **kwargs)
setattr(module, name, signalled)
sys.argv = ["crosslora_jax.transfer"] + sys.argv[3:]
from crosslora_jax import transfer
transfer.entry_point()
"""
