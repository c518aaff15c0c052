"""Where a run may write, decided before any work: inputs stay read-only, outputs never overlap.

Every output (``--output``, ``--report``, ``--orbax_output``) and every cache folder
is resolved with symlinks followed, both as the entry that will be replaced and as
what that entry points to, and refused (CrossLoraError) when it equals, lies inside
or contains an input (a model, an adapter, an adapter folder), or another output.
Then each output is checked like :func:`adapter_io.check_output_path` (``--overwrite``
for anything already there, a writable parent); caches must be folders that can be
created and written. Only then does the transfer start, and the outputs are committed
together at its end (:func:`adapter_io.transaction`).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import tempfile
from collections.abc import Mapping, Sequence

from absl import logging

from crosslora_jax.errors import CrossLoraError
from crosslora_jax.formats import adapter_io


@dataclasses.dataclass(frozen=True)
class Planned:
  """One path a run reads or writes: the flag that named it, as given, and where it resolves."""

  flag: str
  given: str
  entry: pathlib.Path  # the entry itself: its folder resolved, its own name kept (a symlink stays a symlink)
  real: pathlib.Path  # what it points to (== entry unless the entry is a symlink)

  @classmethod
  def of(cls, flag: str, path: str | os.PathLike[str]) -> "Planned":
    given = os.fspath(path)
    absolute = pathlib.Path(os.path.abspath(os.path.expanduser(given)))
    entry = pathlib.Path(os.path.realpath(absolute.parent)) / absolute.name
    return cls(flag, given, entry, pathlib.Path(os.path.realpath(entry)))

  def where(self) -> str:
    return f"{self.flag} {self.given}"


def _relation(a: pathlib.Path, b: pathlib.Path) -> str | None:
  if a == b:
    return "is"
  if b in a.parents:
    return "lies inside"
  if a in b.parents:
    return "contains"
  return None


def _clash(out: Planned, other: Planned) -> str | None:
  for mine in {out.entry, out.real}:
    for theirs in {other.entry, other.real}:
      how = _relation(mine, theirs)
      if how is not None:
        return how
  return None


def check_disjoint(outputs: Sequence[Planned], inputs: Sequence[Planned], caches: Sequence[Planned] = ()) -> None:
  """Refuses an output or cache that is, holds or sits inside an input, or two that overlap."""
  for i, out in enumerate([*outputs, *caches]):
    for other in inputs:
      how = _clash(out, other)
      if how is not None:
        raise CrossLoraError(f"{out.where()}: a path outside every input expected, got one that {how} the input "
                             f"{other.where()}{_resolved(out, other)}. Inputs are never written: choose another "
                             f"{out.flag}.")
    for other in [*outputs, *caches][i + 1:]:
      how = _clash(out, other)
      if how is not None:
        raise CrossLoraError(f"{out.where()}: a path apart from every other output expected, got one that {how} "
                             f"{other.where()}{_resolved(out, other)}. Choose distinct paths.")


def _resolved(a: Planned, b: Planned) -> str:
  shown = {str(p) for p in (a.real, b.real)} - {a.given, b.given}
  return f" (resolved: {a.real} and {b.real})" if shown else ""


def check_cache_folder(cache: Planned, *, explicit: bool) -> pathlib.Path | None:
  """Creates and probes a cache folder. Returns it, or None when a default one is unusable.

  A cache the user named (``explicit``) that is a file, cannot be created or refuses
  new entries is bad input; the default one is skipped with a warning instead, since
  the run does not need it.
  """
  try:
    if cache.real.exists() and not cache.real.is_dir():
      raise NotADirectoryError(20, "Not a directory", str(cache.real))
    cache.real.mkdir(parents=True, exist_ok=True)
    os.rmdir(tempfile.mkdtemp(prefix=".probe-", dir=cache.real))
  except OSError as e:
    why = f"{type(e).__name__} ({e.strerror or e})"
    if explicit:
      raise CrossLoraError(f"{cache.where()}: a writable folder expected, got {why}. Choose another "
                           f"{cache.flag}, or pass --no_cache.") from None
    logging.warning("default cache folder %s (%s): %s; running without this cache", cache.real, cache.flag, why)
    return None
  return cache.real


def check_outputs(outputs: Mapping[str, tuple[Planned, str]], *, overwrite: bool) -> None:
  """Each output: nothing there unless ``overwrite``, a kind that matches, a writable parent."""
  for planned, kind in outputs.values():
    adapter_io.check_output_path(planned.entry, overwrite=overwrite, flag=planned.flag, kind=kind)
