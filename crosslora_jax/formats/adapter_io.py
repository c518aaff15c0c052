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
import os
import pathlib
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator, Mapping
from typing import Any

from crosslora_jax.formats import model_card, peft_format
from crosslora_jax.formats.leftovers import leftovers as leftovers
from crosslora_jax.formats.leftovers import parent_of, remove_path
from crosslora_jax.formats.leftovers import recover_previous_output as recover_previous_output
from crosslora_jax.formats.leftovers import remove_leftovers as remove_leftovers
from crosslora_jax.formats.adapter_verify import verify_adapter_folder as verify_adapter_folder
from crosslora_jax.formats.architectures import Architecture
from crosslora_jax.errors import CrossLoraError

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def check_output_path(folder: str | os.PathLike[str], *, overwrite: bool, flag: str = "--output",
                      kind: str = "folder") -> pathlib.Path:
  """Fails early (before any work) if ``folder`` exists without overwrite or cannot be written.

  Anything at the path counts as existing, a dangling symlink included. With
  ``overwrite``, an existing entry must be of ``kind`` ("folder" or "file"; a symlink
  itself is replaced, never what it points to). Writability is probed by creating
  (and removing) a folder beside it: permission bits alone say nothing for root,
  read-only mounts or /proc.
  """
  folder = pathlib.Path(folder)
  if folder.name in ("", ".", ".."):
    raise CrossLoraError(f"{folder}: a path ending in a new name expected for {flag}, got {str(folder)!r}. "
                         f"Name the {kind} to write.")
  recover_previous_output(folder)
  if os.path.lexists(folder):
    found = _entry_kind(folder)
    if not overwrite:
      raise CrossLoraError(f"{folder}: a path that does not exist expected, got an existing {found}. "
                           f"Pass --overwrite to replace it.")
    if found not in (kind, "symlink", "dangling symlink"):
      raise CrossLoraError(f"{folder}: {flag} expected to be a {kind} (or nothing), got an existing {found}. "
                           f"Choose another {flag}; a {found} is never replaced by a {kind}.")
  parent = parent_of(folder)
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


def _entry_kind(path: pathlib.Path) -> str:
  if path.is_symlink():
    return "symlink" if path.exists() else "dangling symlink"
  if path.is_dir():
    return "folder"
  return "file" if path.is_file() else "special file"


def _sibling(folder: pathlib.Path, kind: str) -> pathlib.Path:
  """A fresh, clearly named folder beside ``folder``: ``.<name>.<kind>-<pid>-<random>``."""
  return pathlib.Path(tempfile.mkdtemp(prefix=f".{folder.name}.{kind}-{os.getpid()}-", dir=parent_of(folder)))


class _Transaction:
  """Outputs staged and verified, swapped in together at the end (see :func:`transaction`)."""

  def __init__(self) -> None:
    self.staged: list[tuple[pathlib.Path, pathlib.Path]] = []  # (temporary sibling, final path)

  def discard(self) -> None:
    for tmp, _ in self.staged:
      remove_path(tmp)
    self.staged.clear()

  def commit(self) -> None:
    """Swaps every staged output in; if one swap fails, the ones done are swapped back."""
    done: list[tuple[pathlib.Path, pathlib.Path, pathlib.Path | None]] = []  # (tmp, final, old)
    try:
      for tmp, final in self.staged:
        done.append((tmp, final, _swap_in(tmp, final)))
    except OSError as e:
      for tmp, final, old in reversed(done):
        with contextlib.suppress(OSError):
          _swap_back(tmp, final, old)
      self.discard()
      raise _write_error(final, e) from None
    for _, final, _ in done:
      _fsync_dir(parent_of(final))
    for _, final, old in done:
      if old is not None:
        _dispose(old, final)
    self.staged.clear()


_active: list[_Transaction] = []


@contextlib.contextmanager
def transaction() -> Iterator[None]:
  """Inside it, :func:`atomic_folder` and :func:`write_text_atomic` stage and verify but do not swap.

  At the end every staged output is swapped in, back to back with SIGINT/SIGTERM held
  off, so a run ends with all its outputs new or none of them; on any error (or a
  signal) before that, every staged output is removed and nothing existing changed.
  """
  txn = _Transaction()
  _active.append(txn)
  try:
    yield
  except BaseException:
    txn.discard()
    raise
  finally:
    _active.remove(txn)
  with _signals_held():
    txn.commit()


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
  held = {signal.SIGINT, signal.SIGTERM}
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
  try:
    yield
  finally:
    signal.pthread_sigmask(signal.SIG_SETMASK, previous)  # a signal that came meanwhile is delivered now


def _finish(tmp: pathlib.Path, final: pathlib.Path) -> None:
  """Swaps a verified temporary output in now, or defers it to the open transaction."""
  if _active:
    _active[-1].staged.append((tmp, final))
  else:
    replace_folder(tmp, final)


@contextlib.contextmanager
def atomic_folder(folder: str | os.PathLike[str], *, overwrite: bool, flag: str = "--output") -> Iterator[pathlib.Path]:
  """Yields a temporary sibling folder; on success it replaces ``folder`` whole.

  On any error the temporary folder is removed and ``folder`` is untouched; an
  OSError (disk full, permissions) becomes one CrossLoraError line. Inside a
  :func:`transaction` the swap waits for the transaction's end.
  """
  folder = check_output_path(folder, overwrite=overwrite, flag=flag)
  remove_leftovers(folder)
  try:
    tmp = _sibling(folder, "tmp")
  except OSError as e:
    raise _write_error(folder, e) from None
  try:
    yield tmp
    _fsync_tree(tmp)
    _finish(tmp, folder)
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
  """Moves ``new`` (a folder or file) to ``folder``, swapping atomically with an existing ``folder``.

  The previous output ends up in ``.<name>.old-<pid>-*`` and is deleted; failing
  to delete it does not fail the write (the next write removes it).
  """
  old = _swap_in(new, folder)
  _fsync_dir(parent_of(folder))
  if old is not None:
    _dispose(old, folder)


def _swap_in(new: pathlib.Path, folder: pathlib.Path) -> pathlib.Path | None:
  """Puts ``new`` at ``folder``; returns where the previous entry now is (None: there was none)."""
  if not os.path.lexists(folder):
    os.rename(new, folder)
    return None
  if exchange(new, folder):
    return new  # ``new`` now holds the previous output
  old = _sibling(folder, "old")
  os.rename(folder, old / folder.name)
  try:
    os.rename(new, folder)
  except OSError:
    os.rename(old / folder.name, folder)  # put the previous output back
    remove_path(old)
    raise
  return old


def _swap_back(new: pathlib.Path, folder: pathlib.Path, old: pathlib.Path | None) -> None:
  """Undoes :func:`_swap_in`: the previous entry (if any) back at ``folder``, ours back at ``new``."""
  if old is None:
    os.rename(folder, new)
  elif old == new:
    if not exchange(new, folder):
      raise OSError(errno.ENOTSUP, "cannot exchange back", str(folder))
  else:
    os.rename(folder, new)
    os.rename(old / folder.name, folder)
    remove_path(old)


def _dispose(old: pathlib.Path, folder: pathlib.Path) -> None:
  """Deletes the previous output, moved aside by :func:`_swap_in`, under a clear ``.old-`` name."""
  with contextlib.suppress(OSError):
    if ".old-" not in old.name:
      aside = _sibling(folder, "old")
      os.rename(old, aside / folder.name)
      old = aside
    remove_path(old)


def write_text_atomic(file: str | os.PathLike[str], text: str, *, overwrite: bool = True,
                      flag: str = "--report") -> pathlib.Path:
  """Writes a small text file (the report) via a temporary sibling swapped in at the end."""
  return write_bytes_atomic(file, text.encode("utf-8"), overwrite=overwrite, flag=flag)


def write_bytes_atomic(file: str | os.PathLike[str], data: bytes, *, overwrite: bool = True,
                       flag: str = "--report") -> pathlib.Path:
  """Writes a small file (a report, a picture) via a temporary sibling swapped in at the end (or the transaction's)."""
  file = check_output_path(file, overwrite=overwrite, flag=flag, kind="file")
  tmp = None
  try:
    fd, name = tempfile.mkstemp(prefix=f".{file.name}.tmp-{os.getpid()}-", dir=parent_of(file))
    tmp = pathlib.Path(name)
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    if tmp.read_bytes() != data:
      raise CrossLoraError(f"{file}: output verification failed: the bytes written do not read back. "
                           "Nothing was written; please report this as a bug.")
    _finish(tmp, file)
  except BaseException as e:
    if tmp is not None:
      with contextlib.suppress(OSError):
        os.unlink(tmp)
    if isinstance(e, OSError):
      raise CrossLoraError(f"{file}: a complete write expected, got {_describe(e)}. "
                           "Free disk space or choose another path.") from None
    raise
  return file


def output_dtype(result: Any, dtype: Any | None = None) -> Any:
  """The one dtype rule for writing a transfer result: ``dtype`` if given, else the report's
  ``output_dtype`` (the requested --dtype, else the source adapter's own)."""
  return dtype if dtype is not None else result.report.output_dtype


def save_adapter(adapter: peft_format.PeftAdapter, folder: str | os.PathLike[str], *, dtype: Any | None = None,
                 overwrite: bool = False, target: Architecture | None = None) -> pathlib.Path:
  """Writes a PEFT folder atomically (temp folder, verify, swap in); ``dtype`` None keeps the adapter's."""
  return save_results({"": adapter}, folder, dtype=dtype, overwrite=overwrite, target=target)


def save_results(adapters: Mapping[str, peft_format.PeftAdapter], folder: str | os.PathLike[str], *,
                 dtype: Any | Mapping[str, Any] | None = None, overwrite: bool = False,
                 target: Architecture | None = None, readmes: Mapping[str, str] | None = None) -> pathlib.Path:
  """Writes adapters by name atomically: one fills ``folder``, several get a subfolder each.

  ``dtype``: one for all, or one per name (None: as held). ``readmes``: the README.md
  model card of each name. Each folder is re-read and checked
  (:func:`verify_adapter_folder`) before anything is swapped in.
  """
  folder = pathlib.Path(folder)
  with atomic_folder(folder, overwrite=overwrite) as tmp:
    for name, adapter in adapters.items():
      sub, shown = (tmp / name, folder / name) if len(adapters) > 1 else (tmp, folder)
      sub.mkdir(exist_ok=True)
      one = dtype.get(name) if isinstance(dtype, Mapping) else dtype
      np_dtype = peft_format.DTYPES[one] if isinstance(one, str) else one
      peft_format.write_adapter_files(adapter, sub, np_dtype)
      readme = (readmes or {}).get(name)
      if readme is not None:
        model_card.write(sub, readme)
      verify_adapter_folder(sub, adapter, np_dtype, target, shown_as=shown, readme=readme)
  return folder


def save_result(result: Any, folder: str | os.PathLike[str], *, dtype: Any | None = None, overwrite: bool = False,
                target: Architecture | None = None) -> pathlib.Path:
  """``TransferResult.save``: the adapter in :func:`output_dtype` with its model card, atomically and verified."""
  card = model_card.render(result.report, base_model=result.adapter.config["base_model_name_or_path"])
  return save_results({"": result.adapter}, folder, dtype=output_dtype(result, dtype), overwrite=overwrite,
                      target=target, readmes={"": card})
