"""Opening files an input names, safely: inside their folder, regular files only, bounded sizes.

A model or adapter folder is the user's, but what its files *say* (a shard index's
``weight_map``) comes from whoever published it. So a name from a file must be a plain
relative path inside the folder, and whatever it resolves to (symlinks followed) must
stay inside that folder too; the one exception is the Hugging Face Hub cache layout,
where ``<repo>/snapshots/<revision>/<file>`` is a symlink into ``<repo>/blobs/``.
Before anything is opened its type is checked with ``os.stat``: a FIFO, device or
socket would block or never end, so only regular files are read.
"""

from __future__ import annotations

import os
import pathlib
import re
import stat

from crosslora_jax.errors import CrossLoraError

_COMPONENT = re.compile(r"[^/\\\x00]+")


def _kind(mode: int) -> str:
  for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
                     (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
    if test(mode):
      return name
  return "a special file"


def regular_file(path: pathlib.Path, what: str, *, max_bytes: int | None = None) -> int:
  """The size of ``path`` after checking it is a regular file (symlinks followed) within ``max_bytes``."""
  try:
    st = os.stat(path)
  except FileNotFoundError:
    raise CrossLoraError(f"{path}: {what} file expected, got nothing there. Check the folder.") from None
  except OSError as e:
    raise CrossLoraError(f"{path}: a readable {what} file expected, got {e.strerror or e}. Check its permissions.") from None
  if not stat.S_ISREG(st.st_mode):
    raise CrossLoraError(f"{path}: {what} expected to be a regular file, got {_kind(st.st_mode)}. "
                         "Replace it with the real file.")
  if max_bytes is not None and st.st_size > max_bytes:
    raise CrossLoraError(f"{path}: {what} of at most {max_bytes} bytes expected, got {st.st_size}. "
                         "This is not a real file of that kind; re-download it.")
  return st.st_size


def _within(path: pathlib.Path, root: pathlib.Path) -> bool:
  return path == root or root in path.parents


def _allowed_roots(folder: pathlib.Path) -> list[pathlib.Path]:
  """``folder`` itself, plus ``<repo>/blobs`` when ``folder`` is a Hub cache ``<repo>/snapshots/<rev>``."""
  real = folder.resolve()
  roots = [real]
  if real.parent.name == "snapshots" and (real.parent.parent / "blobs").is_dir():
    roots.append(real.parent.parent / "blobs")
  return roots


def named_file(folder: pathlib.Path, name: object, where: str) -> pathlib.Path:
  """``folder / name`` for a file name read from an input, refused unless it stays inside ``folder``.

  ``name`` must be a relative path of plain components (no ``..``, no absolute path, no
  drive or NUL) and must resolve, symlinks followed, inside ``folder`` (or its Hub blobs).
  """
  if not isinstance(name, str) or not name:
    raise CrossLoraError(f"{where}: a file name (string) expected, got {name!r}. Re-download the checkpoint.")
  parts = re.split(r"[/\\]", name)
  if (name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name) or "\x00" in name
      or any(p in ("", ".", "..") or not _COMPONENT.fullmatch(p) for p in parts)):
    raise CrossLoraError(f"{where}: a file name inside {folder} expected, got {name!r}. "
                         "Index entries must name files of the checkpoint folder; re-download it.")
  path = folder / name
  resolved = path.resolve()
  if not any(_within(resolved, root) for root in _allowed_roots(folder)):
    raise CrossLoraError(f"{where}: {name!r} expected to stay inside {folder}, got a link to {resolved}. "
                         "Copy the real file into the folder.")
  return path


