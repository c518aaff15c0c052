"""Tokenization from a model folder without transformers: ``tokenizer.json`` through ``tokenizers``.

The special-token rules follow what ``transformers.AutoTokenizer`` does with the
same folder, so the ids match:

* the pipeline (normalizer, pre-tokenizer, BPE/Unigram model, post-processor)
  comes from ``tokenizer.json`` as is;
* BOS/EOS insertion is the ``tokenizer.json`` post-processor (Gemma's adds
  ``<bos>``; SmolLM2's and Qwen's add nothing), unless ``tokenizer_config.json``
  states ``add_bos_token`` / ``add_eos_token`` or the file has no post-processor:
  then the template is rebuilt from those flags (default off) and the config's
  ``bos_token`` / ``eos_token``, as transformers' ``update_post_processor`` does
  (transformers 5's generic backend drops the flags on load; the model was
  trained with them, so they are kept here);
* ``bos_id`` is the config's ``bos_token`` (else ``bos_token_id`` of
  generation_config.json / config.json); ``eos_ids`` gathers every end-of-turn id
  the folder names (generation_config.json first, then the tokenizer's
  ``eos_token``, then config.json), since sampling should stop on any of them.

One class rule on top: a ``Qwen2Tokenizer`` folder whose ``tokenizer.json`` has no
normalizer (GGUF conversions drop it) gets Qwen's NFC normalizer back, as the
transformers class sets it.

Offsets are character offsets into the Python string, one ``(start, end)`` per
token; added special tokens get ``(0, 0)``. Byte-level BPE can split one
character over two tokens, which then share its span; a normalizer that changes
the text (NFC composing ``e`` + U+0301) can leave the composed-away character
outside every span.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from crosslora_jax.errors import CrossLoraError

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
GENERATION_CONFIG = "generation_config.json"
MODEL_CONFIG = "config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_JSON = "chat_template.json"
_NFC_CLASSES = ("Qwen2Tokenizer", "Qwen2TokenizerFast")  # Qwen's pipeline starts with NFC


def _read_optional_json(path: pathlib.Path) -> dict[str, Any]:
  """A JSON object file, {} when absent; a garbled one is a one-line error naming it."""
  if not path.is_file():
    return {}
  try:
    value = json.loads(path.read_text(encoding="utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CrossLoraError(f"{path}: valid JSON expected, got a parse error ({e}). "
                         "Fix or re-download the file.") from None
  if not isinstance(value, dict):
    raise CrossLoraError(f"{path}: a JSON object expected, got {type(value).__name__}. Fix or re-download the file.")
  return value


def _token_text(value: Any) -> str | None:
  """tokenizer_config.json writes a special token as a string or as {"content": ...}."""
  if isinstance(value, Mapping):
    value = value.get("content")
  return value if isinstance(value, str) else None


def _id_list(value: Any) -> list[int]:
  if isinstance(value, bool) or value is None:
    return []
  if isinstance(value, int):
    return [value]
  if isinstance(value, list):
    return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
  return []


def _load_backend(folder: pathlib.Path) -> Any:
  from tokenizers import Tokenizer as Backend  # pylint: disable=import-outside-toplevel

  file = folder / TOKENIZER_FILE
  if not file.is_file():
    others = sorted(p.name for p in folder.glob("tokenizer*") if p.is_file()) if folder.is_dir() else []
    found = f"only {', '.join(others)}" if others else "no tokenizer file"
    raise CrossLoraError(f"{file}: a tokenizers JSON file expected, got {found}"
                         f"{'' if folder.is_dir() else ' (the folder does not exist)'}. "
                         "Save one with transformers' tokenizer.save_pretrained() or copy it from the model's repository.")
  try:
    return Backend.from_file(str(file))
  except Exception as e:  # tokenizers raises its own Exception type carrying serde's message
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise CrossLoraError(f"{file}: a tokenizers JSON file expected, got one that does not parse ({reason}). "
                         "Re-download it or save it again with tokenizer.save_pretrained().") from None


def _chat_template(folder: pathlib.Path, tok_config: Mapping[str, Any]) -> str | None:
  """The default chat template: chat_template.jinja, chat_template.json or tokenizer_config.json."""
  jinja = folder / CHAT_TEMPLATE_FILE
  if jinja.is_file():
    return jinja.read_text(encoding="utf-8")
  template = _read_optional_json(folder / CHAT_TEMPLATE_JSON).get("chat_template", tok_config.get("chat_template"))
  if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
    named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
    template = named.get("default", next(iter(named.values()), None))
  return template if isinstance(template, str) else None


@dataclasses.dataclass(frozen=True)
class Tokenizer:
  """A model folder's tokenizer: ids, offsets, decoding and the special ids a model needs."""

  backend: Any  # tokenizers.Tokenizer, with the post-processor transformers would use
  bos_id: int | None
  eos_ids: tuple[int, ...]  # every id that ends a generation; eos_ids[0] is the tokenizer's own
  pad_id: int | None
  chat_template: str | None
  adds_bos: bool  # whether encode(text) puts bos_id in front by default
  adds_eos: bool
  folder: pathlib.Path | None = None

  @classmethod
  def from_folder(cls, folder: str | os.PathLike[str]) -> Tokenizer:
    """Reads tokenizer.json plus the special-token facts of the folder's config files."""
    folder = pathlib.Path(folder)
    backend = _load_backend(folder)
    tok_config = _read_optional_json(folder / TOKENIZER_CONFIG)
    gen_config = _read_optional_json(folder / GENERATION_CONFIG)
    model_config = _read_optional_json(folder / MODEL_CONFIG)
    model_config = {**model_config.get("text_config", {}), **model_config}

    def token_id(name: str) -> int | None:
      text = _token_text(tok_config.get(name))
      return backend.token_to_id(text) if text is not None else None

    bos_id = token_id("bos_token")
    if bos_id is None:
      bos_id = next(iter(_id_list(gen_config.get("bos_token_id")) + _id_list(model_config.get("bos_token_id"))), None)
    eos_ids = list(dict.fromkeys(_id_list(token_id("eos_token")) + _id_list(gen_config.get("eos_token_id"))
                                 + _id_list(model_config.get("eos_token_id"))))
    pad_id = token_id("pad_token")
    if pad_id is None:
      pad_id = next(iter(_id_list(gen_config.get("pad_token_id")) + _id_list(model_config.get("pad_token_id"))), None)
    if tok_config.get("tokenizer_class") in _NFC_CLASSES and backend.normalizer is None:
      from tokenizers import normalizers  # pylint: disable=import-outside-toplevel

      backend.normalizer = normalizers.NFC()
    if "add_bos_token" in tok_config or "add_eos_token" in tok_config or backend.post_processor is None:
      _rebuild_template(backend, folder / TOKENIZER_CONFIG, bos_id if tok_config.get("add_bos_token") else None,
                        token_id("eos_token") if tok_config.get("add_eos_token") else None)
    probe = backend.encode("a", add_special_tokens=True).ids
    plain = backend.encode("a", add_special_tokens=False).ids
    adds_bos = bos_id is not None and len(probe) > len(plain) and probe[0] == bos_id
    adds_eos = bool(eos_ids) and len(probe) > len(plain) and probe[-1] in eos_ids
    return cls(backend=backend, bos_id=bos_id, eos_ids=tuple(eos_ids), pad_id=pad_id,
               chat_template=_chat_template(folder, tok_config), adds_bos=adds_bos, adds_eos=adds_eos, folder=folder)

  @property
  def eos_id(self) -> int | None:
    return self.eos_ids[0] if self.eos_ids else None

  @property
  def vocab_size(self) -> int:
    """Ids in use, added tokens included (the model's embedding may be padded beyond it)."""
    return self.backend.get_vocab_size(with_added_tokens=True)

  def token_to_id(self, token: str) -> int | None:
    return self.backend.token_to_id(token)

  def id_to_token(self, token_id: int) -> str | None:
    return self.backend.id_to_token(token_id)

  def encode(self, text: str, *, add_bos: bool | None = None, add_eos: bool | None = None) -> list[int]:
    """Token ids of ``text``; ``add_bos``/``add_eos`` None = the folder's default, True/False force it."""
    return self.encode_with_offsets(text, add_bos=add_bos, add_eos=add_eos)[0]

  def encode_batch(self, texts: Sequence[str], *, add_bos: bool | None = None,
                   add_eos: bool | None = None) -> list[list[int]]:
    """encode() of each text, tokenized in parallel by the backend."""
    _check_texts(texts)
    default = add_bos is None and add_eos is None
    encodings = self.backend.encode_batch(list(texts), add_special_tokens=default)
    if default:
      return [list(e.ids) for e in encodings]
    return [self._with_specials(e.ids, e.offsets, add_bos, add_eos)[0] for e in encodings]

  def encode_with_offsets(self, text: str, *, add_bos: bool | None = None,
                          add_eos: bool | None = None) -> tuple[list[int], list[tuple[int, int]]]:
    """(ids, offsets): offsets[i] = (start, end) characters of ``text`` that token i covers."""
    _check_texts([text])
    if add_bos is None and add_eos is None:  # the folder's own post-processor, exactly as transformers runs it
      encoding = self.backend.encode(text, add_special_tokens=True)
      return list(encoding.ids), [tuple(o) for o in encoding.offsets]
    encoding = self.backend.encode(text, add_special_tokens=False)
    return self._with_specials(encoding.ids, encoding.offsets, add_bos, add_eos)

  def _with_specials(self, ids: list[int], offsets: list[tuple[int, int]], add_bos: bool | None,
                     add_eos: bool | None) -> tuple[list[int], list[tuple[int, int]]]:
    ids, offsets = list(ids), [tuple(o) for o in offsets]
    if self.adds_bos if add_bos is None else add_bos:
      if self.bos_id is None:
        raise CrossLoraError(f"{self._where()}: add_bos=True needs a bos_token, got a tokenizer without one. "
                             "Pass add_bos=False.")
      ids, offsets = [self.bos_id] + ids, [(0, 0)] + offsets
    if self.adds_eos if add_eos is None else add_eos:
      if self.eos_id is None:
        raise CrossLoraError(f"{self._where()}: add_eos=True needs an eos_token, got a tokenizer without one. "
                             "Pass add_eos=False.")
      end = offsets[-1][1] if offsets else 0
      ids, offsets = ids + [self.eos_id], offsets + [(end, end)]
    return ids, offsets

  def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < self.vocab_size]
    if bad:
      raise CrossLoraError(f"ids: token ids in [0, {self.vocab_size}) expected, got {bad[:5]}. "
                           "Decode ids made by this model's tokenizer.")
    return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

  def _where(self) -> str:
    return str(self.folder / TOKENIZER_FILE) if self.folder is not None else "tokenizer"


def _rebuild_template(backend: Any, config_file: pathlib.Path, bos_id: int | None, eos_id: int | None) -> None:
  """transformers' update_post_processor: ``[bos] $A [eos]`` from the config's flags."""
  from tokenizers import processors  # pylint: disable=import-outside-toplevel

  specials = [(backend.id_to_token(i), i) for i in (bos_id, eos_id) if i is not None]
  if any(token is None for token, _ in specials):
    raise CrossLoraError(f"{config_file}: bos_token/eos_token in the vocabulary expected, got ids {bos_id}, {eos_id} "
                         "without a token. Fix the special tokens in the file.")
  bos = f"{specials[0][0]}:0 " if bos_id is not None else ""
  eos = f" {specials[-1][0]}:0" if eos_id is not None else ""
  backend.post_processor = processors.TemplateProcessing(single=f"{bos}$A:0{eos}", pair=f"{bos}$A:0{eos} $B:1",
                                                         special_tokens=specials)


def _check_texts(texts: Sequence[Any]) -> None:
  bad = next((t for t in texts if not isinstance(t, str)), None)
  if bad is not None:
    raise CrossLoraError(f"text: a str expected, got {type(bad).__name__}. Pass the text, not token ids or bytes.")
