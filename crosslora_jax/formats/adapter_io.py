"""Writing outputs safely: temporary folder, verify what was written, swap it in at the end.

Crash safety: everything is written into a sibling ``.<name>.tmp-<pid>-<random>``
folder, fsynced, re-read and checked, then swapped with an existing output in one
``renameat2(RENAME_EXCHANGE)`` call (Linux), so ``<name>`` is always either the
old output or the new one, whole. Where the kernel or file system cannot exchange,
the old output is first renamed to ``.<name>.old-<pid>-<random>`` (a short window
in which ``<name>`` does not exist, but nothing is ever mixed). Leftovers of a
killed run carry the dead process's id; the next write of the same output removes them.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import pathlib
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np
from safetensors import safe_open

from crosslora_jax.formats import model_card, peft_format
from crosslora_jax.formats.architectures import Architecture
from crosslora_jax.errors import CrossLoraError

_log = logging.getLogger(__name__)
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_LEFTOVER_KINDS = ("tmp", "old", "probe")


def check_output_path(folder: str | os.PathLike[str], *, overwrite: bool, flag: str = "--output") -> pathlib.Path:
  """Fails early (before any work) if ``folder`` exists without overwrite or cannot be written.

  Writability is probed by creating (and removing) a folder beside it: permission
  bits alone say nothing for root, read-only mounts or /proc.
  """
  folder = pathlib.Path(folder)
  recover_previous_output(folder)
  if folder.exists() and not overwrite:
    raise CrossLoraError(f"{folder}: a path that does not exist expected, got an existing "
                         f"{'folder' if folder.is_dir() else 'file'}. Pass --overwrite to replace it.")
  parent = _parent(folder)
  if not parent.is_dir():
    fix = f"Choose another {flag}" if parent.exists() else "Create it first"
    raise CrossLoraError(f"{folder}: an existing parent folder expected, got {'a file' if parent.exists() else 'nothing'} "
                         f"at {parent}. {fix}.")
  try:
    os.rmdir(_sibling(folder, "probe"))
  except OSError as e:
    raise CrossLoraError(f"{folder}: a writable parent folder expected, got {parent} that refuses new entries "
                         f"({errno.errorcode.get(e.errno, e.errno)}: {e.strerror}). Choose another {flag}.") from None
  return folder


def leftovers(folder: str | os.PathLike[str]) -> list[pathlib.Path]:
  """``.<name>.tmp-<pid>-*`` / ``.<name>.old-<pid>-*`` siblings of ``folder`` whose process is gone."""
  folder = pathlib.Path(folder)
  parent = _parent(folder)
  pattern = re.compile(rf"\.{re.escape(folder.name)}\.(?:{'|'.join(_LEFTOVER_KINDS)})-(\d+)-.+")
  found = []
  for path in sorted(parent.glob(f".{_glob_escape(folder.name)}.*-*")):
    match = pattern.fullmatch(path.name)
    if match is not None and not _pid_alive(int(match.group(1))):
      found.append(path)
  return found


def _glob_escape(name: str) -> str:
  return re.sub(r"([*?[])", r"[\1]", name)


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def recover_previous_output(folder: pathlib.Path) -> None:
  """Puts the previous output back if a run was killed inside the fallback swap.

  Without RENAME_EXCHANGE, replace_folder moves the old output to
  ``.<name>.old-<pid>-*/<name>`` before renaming the new one in; a kill between the
  two renames leaves ``folder`` missing and the old output whole in there.
  """
  if folder.exists() or folder.is_symlink():
    return
  kept = [p / folder.name for p in leftovers(folder) if ".old-" in p.name and (p / folder.name).exists()]
  if len(kept) == 1:
    with contextlib.suppress(OSError):  # if it cannot be moved back, it stays clearly named
      os.rename(kept[0], folder)
      _log.warning("restored %s from %s, left by a killed run", folder, kept[0])


def remove_leftovers(folder: pathlib.Path) -> None:
  """Deletes what killed earlier runs left beside ``folder`` (see :func:`leftovers`).

  A stale ``.old-`` is kept while ``folder`` itself is missing: it may be the only
  copy of the previous output (see :func:`recover_previous_output`).
  """
  for path in leftovers(folder):
    if ".old-" in path.name and not (folder.exists() or folder.is_symlink()):
      continue
    _log.info("removing %s, left by a killed run", path)
    _remove(path)


def _remove(path: pathlib.Path) -> None:
  if path.is_dir() and not path.is_symlink():
    shutil.rmtree(path, ignore_errors=True)
  else:
    with contextlib.suppress(OSError):
      path.unlink()


def _parent(path: pathlib.Path) -> pathlib.Path:
  """The folder holding the entry ``path`` (a symlink's own folder, not its target's)."""
  return pathlib.Path(os.path.abspath(path)).parent


def _sibling(folder: pathlib.Path, kind: str) -> pathlib.Path:
  """A fresh, clearly named folder beside ``folder``: ``.<name>.<kind>-<pid>-<random>``."""
  return pathlib.Path(tempfile.mkdtemp(prefix=f".{folder.name}.{kind}-{os.getpid()}-", dir=_parent(folder)))


@contextlib.contextmanager
def atomic_folder(folder: str | os.PathLike[str], *, overwrite: bool) -> Iterator[pathlib.Path]:
  """Yields a temporary sibling folder; on success it replaces ``folder`` whole.

  On any error the temporary folder is removed and ``folder`` is untouched; an
  OSError (disk full, permissions) becomes one CrossLoraError line.
  """
  folder = check_output_path(folder, overwrite=overwrite)
  remove_leftovers(folder)
  try:
    tmp = _sibling(folder, "tmp")
  except OSError as e:
    raise _write_error(folder, e) from None
  try:
    yield tmp
    _fsync_tree(tmp)
    replace_folder(tmp, folder)
  except BaseException as e:
    shutil.rmtree(tmp, ignore_errors=True)
    if isinstance(e, OSError):
      raise _write_error(folder, e) from None
    raise


def _write_error(folder: pathlib.Path, e: OSError) -> CrossLoraError:
  return CrossLoraError(f"{folder}: a complete write expected, got {_describe(e)}. Nothing was changed; "
                        "free disk space or choose another --output.")


def _describe(e: BaseException) -> str:
  if isinstance(e, OSError) and e.errno is not None:
    where = f" at {e.filename}" if e.filename else ""
    return f"{errno.errorcode.get(e.errno, e.errno)} ({e.strerror}){where}"
  return f"{type(e).__name__}: {e}"


def _fsync_tree(root: pathlib.Path) -> None:
  """Flushes every file and folder under ``root`` to disk before it is renamed into place."""
  for dirpath, _, filenames in os.walk(root):
    for name in filenames:
      fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
      try:
        os.fsync(fd)
      finally:
        os.close(fd)
    _fsync_dir(pathlib.Path(dirpath))


def _fsync_dir(path: pathlib.Path) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  except OSError:  # some file systems cannot fsync a folder; the rename is still atomic
    pass
  finally:
    os.close(fd)


def exchange(a: pathlib.Path, b: pathlib.Path) -> bool:
  """Atomically swaps two existing paths (Linux renameat2 RENAME_EXCHANGE).

  Returns False where the platform, C library or file system cannot; raises
  OSError for any other failure.
  """
  if not sys.platform.startswith("linux"):
    return False
  try:
    renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
  except (OSError, AttributeError):  # glibc < 2.28, musl
    return False
  renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
  renameat2.restype = ctypes.c_int
  if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
    return True
  err = ctypes.get_errno()
  if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
    return False
  raise OSError(err, os.strerror(err), str(a), None, str(b))


def replace_folder(new: pathlib.Path, folder: pathlib.Path) -> None:
  """Moves ``new`` to ``folder``, swapping atomically with an existing ``folder``.

  The previous output ends up in ``.<name>.old-<pid>-*`` and is deleted; failing
  to delete it does not fail the write (the next write removes it).
  """
  parent = _parent(folder)
  if not (folder.exists() or folder.is_symlink()):
    os.rename(new, folder)
    _fsync_dir(parent)
    return
  if exchange(new, folder):
    _fsync_dir(parent)
    with contextlib.suppress(OSError):  # ``new`` now holds the previous output
      old = _sibling(folder, "old")
      os.rename(new, old / folder.name)
      _remove(old)
    return
  old = _sibling(folder, "old")
  os.rename(folder, old / folder.name)
  try:
    os.rename(new, folder)
  except OSError:
    os.rename(old / folder.name, folder)  # put the previous output back
    _remove(old)
    raise
  _fsync_dir(parent)
  _remove(old)


def write_text_atomic(file: str | os.PathLike[str], text: str) -> None:
  """Writes a small text file (the report) via a temporary sibling and os.replace."""
  file = pathlib.Path(file)
  tmp = None
  try:
    fd, tmp = tempfile.mkstemp(prefix=f".{file.name}.tmp-{os.getpid()}-", dir=_parent(file))
    with os.fdopen(fd, "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, file)
  except OSError as e:
    if tmp is not None:
      with contextlib.suppress(OSError):
        os.unlink(tmp)
    raise CrossLoraError(f"{file}: a complete write expected, got {_describe(e)}. "
                         "Free disk space or choose another path.") from None


def verify_adapter_folder(folder: pathlib.Path, expected: peft_format.PeftAdapter, dtype: Any,
                          target: Architecture | None = None, *,
                          shown_as: str | os.PathLike[str] | None = None, readme: str | None = None) -> None:
  """Re-opens a written adapter and checks it against what was computed and against ``target``.

  Every key, shape, dtype and byte of adapter_model.safetensors must equal
  ``expected`` cast to ``dtype`` (None: as held); adapter_config.json must parse
  back to ``expected.config`` and select exactly the written modules with their
  ranks; with ``target``, every module must exist in the target with matching
  (out, in) sizes; with ``readme``, README.md must hold exactly that model card.
  Any difference is a bug, never a user error, but it is still raised as
  CrossLoraError so that nothing broken is renamed into place. Messages
  name ``shown_as`` (the final output path) instead of the temporary ``folder``.
  """
  np_dtype = peft_format.DTYPES[dtype] if isinstance(dtype, str) else dtype
  file = folder / peft_format.WEIGHTS_FILE
  want = peft_format.adapter_tensors(expected, np_dtype)
  problems = []
  try:
    with safe_open(str(file), framework="np") as f:
      if (f.metadata() or {}).get("format") != "pt":
        problems.append(f"{file}: metadata format 'pt' expected, got {f.metadata()!r}")
      keys = set(f.keys())
      if keys != set(want):
        problems.append(f"{file}: {len(want)} keys expected, got {len(keys)} (differ: {sorted(keys ^ set(want))[:3]})")
      for key in sorted(keys & set(want)):
        got = f.get_tensor(key)
        if got.shape != want[key].shape:
          problems.append(f"{file}: {key}: shape expected {want[key].shape}, got {got.shape}")
        elif got.dtype != want[key].dtype:
          problems.append(f"{file}: {key}: dtype expected {want[key].dtype}, got {got.dtype}")
        elif got.tobytes() != want[key].tobytes():
          problems.append(f"{file}: {key}: the computed values expected, got different bytes")
  except Exception as e:  # safetensors' own error types
    problems.append(f"{file}: a readable safetensors file expected, got {type(e).__name__}: {e}")
  if not problems:
    try:
      written = peft_format.read_adapter(folder)  # config parse, pairing, target_modules, ranks, finite
    except CrossLoraError as e:
      problems.append(str(e).rstrip("."))
    else:
      problems += _check_written(folder, written, expected, target)
  if readme is not None:
    problems += model_card.check_written(folder, readme)
  if problems:
    message = (f"{folder}: output verification failed: " + "; ".join(problems[:5])
               + ". Nothing was written; please report this as a bug.")
    raise CrossLoraError(message.replace(str(folder), str(shown_as or folder)))


def _check_written(folder: pathlib.Path, written: peft_format.PeftAdapter, expected: peft_format.PeftAdapter,
                   target: Architecture | None) -> list[str]:
  problems = []
  config_file = folder / peft_format.CONFIG_FILE
  if written.config != json.loads(json.dumps(expected.config)):
    problems.append(f"{config_file}: the computed config expected, got a different one")
  if set(written.modules) != set(expected.modules):
    problems.append(f"{config_file}: modules {sorted(expected.modules)[:3]} expected, got {sorted(written.modules)[:3]}")
  for path in sorted(set(written.modules) & set(expected.modules)):
    if not np.isclose(written.scaling(path), expected.scaling(path), rtol=1e-6):
      problems.append(f"{config_file}: {path}: scaling {expected.scaling(path)} expected, got {written.scaling(path)}")
  if target is None:
    return problems
  if bool(written.config.get("fan_in_fan_out")) != target.spec.conv1d:
    problems.append(f"{config_file}: fan_in_fan_out {target.spec.conv1d} expected for {target.model_type}, "
                    f"got {written.config.get('fan_in_fan_out')!r}")
  for path, pair in sorted(written.modules.items()):
    key = peft_format.lora_key(path, "A")
    parsed = target.parse_module_path(path)
    if parsed is None or parsed[0] >= target.num_layers:
      problems.append(f"{folder / peft_format.WEIGHTS_FILE}: {key}: a module of the target model "
                      f"({target.model_type}, {target.num_layers} layers) expected, got none")
      continue
    out_dim, in_dim = target.stored_shape(parsed[1])
    if pair.a_ri.shape[1] != in_dim or pair.b_or.shape[0] != out_dim:
      problems.append(f"{folder / peft_format.WEIGHTS_FILE}: {key}: lora_A (r, {in_dim}) and lora_B ({out_dim}, r) "
                      f"expected from the target, got {pair.a_ri.shape} and {pair.b_or.shape}")
  return problems


def save_adapter(adapter: peft_format.PeftAdapter, folder: str | os.PathLike[str], *, dtype: Any | None = None,
                 overwrite: bool = False, target: Architecture | None = None, readme: str | None = None) -> pathlib.Path:
  """Writes a PEFT folder atomically (temp folder, verify, swap in); ``readme``: its README.md model card."""
  np_dtype = peft_format.DTYPES[dtype] if isinstance(dtype, str) else dtype
  with atomic_folder(folder, overwrite=overwrite) as tmp:
    peft_format.write_adapter_files(adapter, tmp, np_dtype)
    if readme is not None:
      model_card.write(tmp, readme)
    verify_adapter_folder(tmp, adapter, np_dtype, target, shown_as=folder, readme=readme)
  return pathlib.Path(folder)
