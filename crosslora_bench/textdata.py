"""Real text for losses: CPython's ``pydoc_data.topics``, split by topic (and a second domain).

The text ships with every CPython (``from pydoc_data.topics import topics``, a
dict topic name -> plain-text help page, about 465k characters in 79 topics on
3.11), so it is available offline. Its exact contents follow the Python version;
record ``sys.version`` next to any number measured on it.

The split, deterministic and documented:

* **held-out** = the topics whose ``int(sha1(name).hexdigest(), 16) % 5 == 0``
  (19 of 79 topics, about 88k characters on 3.11), in sorted-name order;
* **train** = the other topics, in sorted-name order, with every paragraph
  (blank-line separated chunk) that also occurs verbatim in a held-out topic
  removed. The topics quote one another (``attribute-access``, ``function``,
  ``sequence-types`` and ``with`` are copied whole inside ``specialnames`` and
  ``compound``), so without this step about 40% of the held-out text would be
  training text. After it, under 1% of held-out 60-character windows occur in
  train.

A second domain, ``"stdlib"``: the source of CPython's top-level standard-library
modules (``Lib/*.py``: 168 files, about 4.7 MB on 3.11), code rather than prose, split
by the same rule applied to the file name (39 held-out files, about 1.1 MB). Every
function below takes ``domain`` ("pydoc", the default, or "stdlib").

Torch and transformers are imported inside the functions that need them, so
importing this module is cheap.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from crosslora_jax.errors import CrossLoraError
from crosslora_jax.formats.architectures import CANONICAL_MODULES

if TYPE_CHECKING:
  import torch

HELDOUT_MODULUS = 5
SEVEN_MODULES = CANONICAL_MODULES  # the LoRA targets of the shipped adapters
_PARAGRAPH_SPLIT = re.compile(r"\n\s*\n")


def _topics() -> dict[str, str]:
  from pydoc_data.topics import topics  # pylint: disable=import-outside-toplevel

  return dict(topics)


def is_heldout_topic(name: str) -> bool:
  """The split rule: sha1 of the topic name, mod 5, equals 0."""
  return int(hashlib.sha1(name.encode("utf-8")).hexdigest(), 16) % HELDOUT_MODULUS == 0


def heldout_topics() -> list[str]:
  return [name for name in sorted(_topics()) if is_heldout_topic(name)]


def train_topics() -> list[str]:
  return [name for name in sorted(_topics()) if not is_heldout_topic(name)]


DOMAINS = ("pydoc", "stdlib")


def _stdlib_files() -> dict[str, str]:
  import sysconfig  # pylint: disable=import-outside-toplevel
  import pathlib  # pylint: disable=import-outside-toplevel

  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  return {p.name: p.read_text(encoding="utf-8", errors="replace") for p in sorted(root.glob("*.py"))}


def _paragraphs(text: str) -> list[str]:
  return [p for p in _PARAGRAPH_SPLIT.split(text) if p.strip()]


@functools.lru_cache(maxsize=2)
def _split(domain: str = "pydoc") -> tuple[tuple[str, ...], tuple[str, ...]]:
  if domain not in DOMAINS:
    raise CrossLoraError(f"domain: one of {', '.join(DOMAINS)} expected, got {domain!r}.")
  if domain == "stdlib":
    files = _stdlib_files()
    return (tuple(files[n] for n in files if not is_heldout_topic(n)), tuple(files[n] for n in files if is_heldout_topic(n)))
  topics = _topics()
  heldout = tuple(topics[name] for name in heldout_topics())
  seen = {p.strip() for text in heldout for p in _paragraphs(text)}
  train = []
  for name in train_topics():
    kept = [p for p in _paragraphs(topics[name]) if p.strip() not in seen]
    if kept:
      train.append("\n\n".join(kept))
  return tuple(train), heldout


def train_texts(domain: str = "pydoc") -> list[str]:
  """Training documents (pydoc: one per train topic, held-out paragraphs removed; stdlib: one per file)."""
  return list(_split(domain)[0])


def heldout_texts(domain: str = "pydoc") -> list[str]:
  """Held-out documents (one per held-out topic or file, unchanged)."""
  return list(_split(domain)[1])


def _prefix_ids(tokenizer: Any) -> list[int]:
  """The ids the tokenizer puts in front of a text by default (e.g. Gemma's <bos>), else []."""
  plain = tokenizer("a", add_special_tokens=False)["input_ids"]
  full = tokenizer("a")["input_ids"]
  for start in range(len(full) - len(plain) + 1):
    if full[start:start + len(plain)] == plain:
      return list(full[:start])
  return []


def token_blocks(tokenizer: Any, texts: Sequence[str], block_size: int = 128,
                 max_blocks: int | None = None) -> torch.Tensor:
  """Cuts documents into equal blocks of token ids, LongTensor (n_blocks, block_size).

  Each document is tokenized without special tokens; the documents are joined
  with ``tokenizer.eos_token_id`` after each one, and the stream is cut into
  consecutive blocks (the remainder is dropped). When the tokenizer adds
  tokens in front of a text by default (Gemma's ``<bos>``), each block starts
  with them and holds ``block_size - len(prefix)`` stream tokens, so every
  block looks like the start of a sequence to the model it was made for.
  ``max_blocks`` keeps the first blocks.
  """
  import torch  # pylint: disable=import-outside-toplevel

  eos = tokenizer.eos_token_id
  if eos is None:
    raise CrossLoraError(f"tokenizer {type(tokenizer).__name__}: an eos_token_id expected, got None. "
                         "Use a tokenizer with an end-of-sequence token.")
  prefix = _prefix_ids(tokenizer)
  body = block_size - len(prefix)
  if body < 1:
    raise CrossLoraError(f"block_size: more than the {len(prefix)} prefix token(s) expected, got {block_size}.")
  stream: list[int] = []
  for text in texts:
    stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
    stream.append(eos)
  n = len(stream) // body
  if max_blocks is not None:
    n = min(n, max_blocks)
  ids = torch.tensor(stream[:n * body], dtype=torch.long).reshape(n, body)
  if prefix:
    ids = torch.cat([torch.tensor(prefix, dtype=torch.long).expand(n, len(prefix)), ids], dim=1)
  return ids


def heldout_blocks(tokenizer: Any, n: int = 64, block_size: int = 128, domain: str = "pydoc") -> torch.Tensor:
  """The default evaluation set: ``n`` blocks spread evenly over the held-out stream.

  Deterministic for a given tokenizer and Python version: block i is the
  ``round(i * (N - 1) / (n - 1))``-th of the N held-out blocks.
  """
  blocks = token_blocks(tokenizer, heldout_texts(domain), block_size)
  total = blocks.shape[0]
  if total < n:
    raise CrossLoraError(f"heldout_blocks: at least {n} blocks of {block_size} tokens expected, got {total}. "
                         "Ask for fewer or shorter blocks.")
  index = np.round(np.linspace(0, total - 1, n)).astype(np.int64) if n > 1 else np.zeros(1, np.int64)
  return blocks[index]


def mean_nll(model: Any, blocks: torch.Tensor, batch_size: int = 8) -> tuple[float, np.ndarray]:
  """Mean next-token NLL (nats) of a causal LM on token blocks.

  Returns ``(mean over blocks, per-block mean NLL as float64 array (n_blocks,))``;
  every block has the same number of predicted tokens, so the overall mean is
  the mean of the per-block values. The per-block values let two models be
  compared on the same blocks with :func:`paired_se`. Runs under
  ``torch.no_grad`` in eval mode and restores the model's training flag.
  """
  import torch  # pylint: disable=import-outside-toplevel
  import torch.nn.functional as F  # pylint: disable=import-outside-toplevel

  if blocks.ndim != 2 or blocks.shape[1] < 2:
    raise CrossLoraError(f"blocks: shape (n_blocks, block_size >= 2) expected, got {tuple(blocks.shape)}.")
  was_training = model.training
  model.eval()
  device = next(model.parameters()).device
  per_block = []
  try:
    with torch.no_grad():
      for start in range(0, blocks.shape[0], batch_size):
        batch = blocks[start:start + batch_size].to(device)
        logits = model(input_ids=batch).logits
        for row in range(batch.shape[0]):  # upcast one row at a time: vocab x tokens floats add up
          nll = F.cross_entropy(logits[row, :-1].float(), batch[row, 1:], reduction="mean")
          per_block.append(float(nll))
  finally:
    model.train(was_training)
  values = np.asarray(per_block, dtype=np.float64)
  return float(values.mean()), values


def paired_se(a: np.ndarray, b: np.ndarray) -> float:
  """Standard error of mean(a - b) over paired per-block values (ddof=1)."""
  a = np.asarray(a, dtype=np.float64)
  b = np.asarray(b, dtype=np.float64)
  if a.shape != b.shape or a.ndim != 1 or a.shape[0] < 2:
    raise CrossLoraError(f"paired_se: two 1-D arrays of the same length >= 2 expected, got {a.shape} and {b.shape}.")
  d = a - b
  return float(d.std(ddof=1) / math.sqrt(d.shape[0]))


def _stderr_print(message: str) -> None:
  import sys  # pylint: disable=import-outside-toplevel

  print(message, file=sys.stderr, flush=True)


def train_lora(model_dir: str, *, steps: int, lr: float, batch_size: int, block_size: int, seed: int,
               r: int = 16, alpha: int = 32, target_modules: Sequence[str] = SEVEN_MODULES,
               warmup_steps: int | None = None, log_every: int = 10,
               progress: Callable[[str], None] = _stderr_print) -> Any:
  """Trains a PEFT LoRA on :func:`train_texts`, fp32, and returns the PeftModel (eval mode).

  The recipe: LoRA rank ``r``/``alpha`` on ``target_modules``, dropout 0, no
  bias; AdamW (weight decay 0) with linear warm-up over ``warmup_steps``
  (default 10% of ``steps``) then cosine decay to 0; gradient-norm clip 1.0.
  Each step draws ``batch_size`` blocks of ``block_size`` tokens uniformly
  with replacement from the training blocks, from a ``torch.Generator``
  seeded with ``seed``; ``torch.manual_seed(seed)`` fixes the LoRA init.
  Thread count is the caller's business (``torch.set_num_threads``).
  """
  import torch  # pylint: disable=import-outside-toplevel
  from peft import LoraConfig, get_peft_model  # pylint: disable=import-outside-toplevel
  from transformers import AutoModelForCausalLM, AutoTokenizer  # pylint: disable=import-outside-toplevel

  tokenizer = AutoTokenizer.from_pretrained(model_dir)
  blocks = token_blocks(tokenizer, train_texts(), block_size)
  torch.manual_seed(seed)
  model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
  model.config.use_cache = False
  config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                      target_modules=list(target_modules))
  model = get_peft_model(model, config)
  params = [p for p in model.parameters() if p.requires_grad]
  optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
  warmup = max(1, steps // 10) if warmup_steps is None else warmup_steps

  def schedule(step: int) -> float:
    if step < warmup:
      return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

  scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
  generator = torch.Generator().manual_seed(seed)
  progress(f"[train_lora] {blocks.shape[0]} train blocks of {block_size} tokens; {steps} steps x {batch_size}")
  model.train()
  start = time.perf_counter()
  running = 0.0
  for step in range(steps):
    index = torch.randint(0, blocks.shape[0], (batch_size,), generator=generator)
    batch = blocks[index]
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    running += loss.item()
    if (step + 1) % log_every == 0 or step + 1 == steps:
      count = (step % log_every) + 1
      progress(f"[train_lora] step {step + 1}/{steps} loss {running / count:.4f} "
               f"({time.perf_counter() - start:.0f}s)")
      running = 0.0
  model.eval()
  return model
