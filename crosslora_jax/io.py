"""Writing outputs safely: temporary folder, verify what was written, rename at the end."""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np
from safetensors import safe_open

from crosslora_jax import peft_format
from crosslora_jax.architectures import Architecture
from crosslora_jax.errors import CrossLoraError


def check_output_path(folder: str | os.PathLike[str], *, overwrite: bool) -> pathlib.Path:
  """Fails early (before any work) if ``folder`` exists without overwrite or cannot be written."""
  folder = pathlib.Path(folder)
  if folder.exists() and not overwrite:
    raise CrossLoraError(f"{folder}: a path that does not exist expected, got an existing "
                         f"{'folder' if folder.is_dir() else 'file'}. Pass --overwrite to replace it.")
  parent = folder.resolve().parent
  if not parent.is_dir():
    raise CrossLoraError(f"{folder}: an existing parent folder expected, got no {parent}. Create it first.")
  if not os.access(parent, os.W_OK | os.X_OK):
    raise CrossLoraError(f"{folder}: a writable parent folder expected, got {parent} without write permission. "
                         "Choose another --output.")
  return folder


@contextlib.contextmanager
def atomic_folder(folder: str | os.PathLike[str], *, overwrite: bool) -> Iterator[pathlib.Path]:
  """Yields a temporary sibling folder; on success it replaces ``folder`` whole.

  On any error the temporary folder is removed and ``folder`` is untouched. The
  temporary name starts with ``.<name>.tmp-`` so a killed run leaves something
  clearly named.
  """
  folder = check_output_path(folder, overwrite=overwrite)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.resolve().parent))
  try:
    yield tmp
    replace_folder(tmp, folder)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def replace_folder(new: pathlib.Path, folder: pathlib.Path) -> None:
  """Moves ``new`` to ``folder``; an existing ``folder`` is moved aside first, then deleted."""
  if folder.exists() or folder.is_symlink():
    old = pathlib.Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.resolve().parent))
    os.rename(folder, old / folder.name)
    os.rename(new, folder)
    shutil.rmtree(old, ignore_errors=True)
  else:
    os.rename(new, folder)


def verify_adapter_folder(folder: pathlib.Path, expected: peft_format.PeftAdapter, dtype: Any,
                          target: Architecture | None = None) -> None:
  """Re-opens a written adapter and checks every key, shape and dtype (and against ``target``)."""
  file = folder / peft_format.WEIGHTS_FILE
  want = peft_format.adapter_tensors(expected)
  problems = []
  with safe_open(str(file), framework="np") as f:
    if (f.metadata() or {}).get("format") != "pt":
      problems.append(f"{file}: metadata format 'pt' expected, got {f.metadata()!r}")
    keys = set(f.keys())
    if keys != set(want):
      problems.append(f"{file}: keys expected {len(want)}, got {len(keys)} (differ: {sorted(keys ^ set(want))[:3]})")
    for key in sorted(keys & set(want)):
      got = f.get_slice(key)
      if tuple(got.get_shape()) != want[key].shape:
        problems.append(f"{file}: {key}: shape expected {want[key].shape}, got {tuple(got.get_shape())}")
  config = peft_format.read_adapter(folder).config if not problems else {}
  if target is not None and not problems:
    for path, pair in expected.modules.items():
      parsed = target.parse_module_path(path)
      if parsed is None:
        problems.append(f"{file}: {peft_format.lora_key(path, 'A')}: a module of the target model expected, got none")
        continue
      out_dim, in_dim = target.stored_shape(parsed[1])
      if pair.a_ri.shape[1] != in_dim or pair.b_or.shape[0] != out_dim:
        problems.append(f"{file}: {path}: shapes (r, {in_dim}) / ({out_dim}, r) expected, got "
                        f"{pair.a_ri.shape} / {pair.b_or.shape}")
      if not peft_format.targets_module(config, path):
        problems.append(f"{folder / peft_format.CONFIG_FILE}: target_modules expected to select {path}, got none")
  if problems:
    raise CrossLoraError("output verification failed: " + "; ".join(problems[:5]))
  del dtype


def save_adapter(adapter: peft_format.PeftAdapter, folder: str | os.PathLike[str], *, dtype: Any | None = None,
                 overwrite: bool = False, target: Architecture | None = None) -> pathlib.Path:
  """Writes a PEFT folder atomically (temp folder, verify, rename)."""
  np_dtype = peft_format.DTYPES[dtype] if isinstance(dtype, str) else dtype
  with atomic_folder(folder, overwrite=overwrite) as tmp:
    peft_format.write_adapter_files(adapter, tmp, np_dtype)
    verify_adapter_folder(tmp, adapter, np_dtype, target)
  return pathlib.Path(folder)
