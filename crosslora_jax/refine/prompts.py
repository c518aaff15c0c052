"""Prompts for the teacher: a file (one a line, or JSONL with a "prompt" field), or none.

Without a file the teacher starts every sample from its separator token alone (BOS,
else EOS), so what it writes is what the adapter made likely, with no prompt of ours.
"""

from __future__ import annotations

import json
import os
import pathlib

from crosslora_jax.errors import CrossLoraError

MAX_PROMPTS_BYTES = 64 << 20
MAX_PROMPTS = 1_000_000


def _jsonl_prompt(line: str, file: pathlib.Path, number: int) -> str:
  try:
    record = json.loads(line)
  except json.JSONDecodeError as e:
    raise CrossLoraError(f"{file}: line {number}: a JSON object expected (the file is JSONL), got {e.msg}. "
                         "Write one JSON object per line, or plain text with no line starting with '{'.") from None
  prompt = record.get("prompt") if isinstance(record, dict) else None
  if not isinstance(prompt, str) or not prompt.strip():
    raise CrossLoraError(f"{file}: line {number}: a non-empty string field 'prompt' expected, got "
                         f"{type(prompt).__name__ if prompt is not None else 'none'}. Add \"prompt\": \"...\".")
  return prompt


def read_prompts(path: str | os.PathLike[str]) -> list[str]:
  """The prompts in ``path``; JSONL when every non-blank line starts with '{'."""
  file = pathlib.Path(path)
  if not file.is_file():
    raise CrossLoraError(f"{file}: a prompts file expected, got {'a folder' if file.is_dir() else 'nothing'}. "
                         "Pass a text file (one prompt per line) or JSONL with a 'prompt' field.")
  size = file.stat().st_size
  if size > MAX_PROMPTS_BYTES:
    raise CrossLoraError(f"{file}: a prompts file of at most {MAX_PROMPTS_BYTES >> 20} MiB expected, got {size >> 20} MiB.")
  try:
    text = file.read_bytes().decode("utf-8")
  except UnicodeDecodeError as e:
    raise CrossLoraError(f"{file}: UTF-8 text expected, got byte {e.object[e.start]:#04x} at offset {e.start}. "
                         "Save the prompts as UTF-8.") from None
  except OSError as e:
    raise CrossLoraError(f"{file}: a readable prompts file expected, got {e.strerror}.") from None
  text = text.removeprefix("\ufeff")
  lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
  if not lines:
    raise CrossLoraError(f"{file}: at least one prompt expected, got an empty file. Write one prompt per line.")
  if len(lines) > MAX_PROMPTS:
    raise CrossLoraError(f"{file}: at most {MAX_PROMPTS} prompts expected, got {len(lines)}.")
  if all(line.lstrip().startswith("{") for _, line in lines):
    return [_jsonl_prompt(line, file, n) for n, line in lines]
  return [line.strip() for _, line in lines]


def render_prompt(tokenizer, prompt: str) -> tuple[str, bool]:
  """``prompt`` as a user turn in the tokenizer's chat template (generation prompt added), if it has one.

  Returns (text, applied). The template is rendered with jinja2 in its sandbox, as
  transformers does; without a template, without jinja2, or for an empty prompt (the
  teacher writes from its separator token) the prompt is used as it is.
  """
  template = getattr(tokenizer, "chat_template", None)
  if not prompt or not template:
    return prompt, False
  try:
    from jinja2.sandbox import ImmutableSandboxedEnvironment
  except ImportError:
    return prompt, False
  def token_text(token_id):
    return tokenizer.id_to_token(token_id) if token_id is not None else ""
  try:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    text = env.from_string(template).render(messages=[{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            bos_token=token_text(tokenizer.bos_id), eos_token=token_text(tokenizer.eos_id))
  except Exception as e:  # a template is user data: any failure is theirs to fix
    raise CrossLoraError(f"{getattr(tokenizer, 'folder', 'tokenizer')}: a chat template that renders one user turn expected, "
                         f"got {type(e).__name__}: {e}. Fix the template or pass prompts without one.") from None
  bos = token_text(tokenizer.bos_id)
  # The template writes BOS as text; encoding adds it again when the tokenizer does.
  if bos and getattr(tokenizer, "adds_bos", False) and text.startswith(bos):
    text = text[len(bos):]
  return text, True
