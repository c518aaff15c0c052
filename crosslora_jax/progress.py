"""Progress bars on stderr with tqdm, the library transformers and huggingface_hub use.

:class:`ProgressBar` is the engine's ``progress(label, done, total)`` callback: one
tqdm bar per label (with rate and ETA), closed when it reaches its total or when a
new label starts. By default a bar is shown only when the stream is a terminal,
so logs and CI output stay clean; ``enabled=True`` shows it anyway (off a
terminal, at most one redraw per 30 s), ``enabled=False`` never. Functions that
take ``progress`` (refine, the training loop) take a :data:`Progress`: True,
``"always"`` or False, the same three choices.
"""

from __future__ import annotations

import sys
from typing import Literal, TextIO, Union

from tqdm.auto import tqdm

ALWAYS = "always"
Progress = Union[bool, Literal["always"]]
"""A ``progress`` argument: True draws bars on a terminal only, ``"always"`` in logs too
(at most one redraw per 30 s off a terminal), False never."""


def enabled(progress: Progress) -> bool | None:
  """:class:`ProgressBar`'s ``enabled`` for a ``progress`` argument.

  >>> enabled(True), enabled("always"), enabled(False)
  (None, True, False)
  """
  return True if progress == ALWAYS else (None if progress else False)


class ProgressBar:
  """Callable ``(label, done, total)`` that draws one tqdm bar per label.

  Args:
    stream: where bars go (default: sys.stderr, looked up at each new bar).
    enabled: None shows bars on a terminal only; True always; False never.
    unit: what ``done`` counts, for the rate (the engine's weights by default).
  """

  def __init__(self, stream: TextIO | None = None, *, enabled: bool | None = None, unit: str = "weight"):
    self.stream = stream
    self.enabled = enabled
    self.unit = unit
    self._bar: tqdm | None = None
    self._label: str | None = None

  def __call__(self, label: str, done: int, total: int) -> None:
    if self.enabled is False:
      return
    if label != self._label or self._bar is None:
      self.close()
      self._label = label
      self._bar = self._new_bar(label, total)
    bar = self._bar
    if bar.total != total:  # the engine may learn the total late; keep the bar honest
      bar.total = total
    bar.update(max(0, done - bar.n))
    if done >= total:
      self.close()

  def _new_bar(self, label: str, total: int) -> tqdm:
    stream = self.stream or sys.stderr
    tty = bool(getattr(stream, "isatty", lambda: False)())
    # disable=None is tqdm's own rule: off when the stream is not a terminal.
    disable = None if self.enabled is None else False
    # Off a terminal every redraw is one more record in a log: at most one per 30 s, and the final count.
    mininterval = 0.1 if tty else 30.0
    return tqdm(total=total, desc=label, file=stream, disable=disable, mininterval=mininterval,
                unit=self.unit, dynamic_ncols=tty, leave=True)

  def close(self) -> None:
    """Ends the current bar (drawn once more at its final count)."""
    if self._bar is not None:
      self._bar.close()
    self._bar, self._label = None, None

  def __enter__(self) -> "ProgressBar":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
