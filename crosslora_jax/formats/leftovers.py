"""What killed runs leave beside an output, and putting a stranded previous output back.

Temporary entries are named ``.<name>.{tmp,old,probe}-<pid>-<random>`` beside the
output ``<name>``; once their process is gone they are leftovers, removed by the next
write of the same output.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import re
import shutil

_log = logging.getLogger(__name__)
LEFTOVER_KINDS = ("tmp", "old", "probe")


def leftovers(folder: str | os.PathLike[str]) -> list[pathlib.Path]:
  """``.<name>.tmp-<pid>-*`` / ``.<name>.old-<pid>-*`` siblings of ``folder`` whose process is gone."""
  folder = pathlib.Path(folder)
  parent = parent_of(folder)
  pattern = re.compile(rf"\.{re.escape(folder.name)}\.(?:{'|'.join(LEFTOVER_KINDS)})-(\d+)-.+")
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
    remove_path(path)


def remove_path(path: pathlib.Path) -> None:
  """Deletes a file, symlink or folder tree, ignoring what cannot be deleted."""
  if path.is_dir() and not path.is_symlink():
    shutil.rmtree(path, ignore_errors=True)
  else:
    with contextlib.suppress(OSError):
      path.unlink()


def parent_of(path: pathlib.Path) -> pathlib.Path:
  """The folder holding the entry ``path`` (a symlink's own folder, not its target's)."""
  return pathlib.Path(os.path.abspath(path)).parent
