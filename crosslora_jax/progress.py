"""A small progress bar on stderr (no dependency): redraws in place on a terminal,
prints a line every 10% otherwise (logs, CI)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class ProgressBar:
  def __init__(self, stream: TextIO | None = None, width: int = 30):
    self.stream = stream or sys.stderr
    self.width = width
    self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
    self._label = None
    self._last_decile = -1
    self._t0 = time.perf_counter()

  def __call__(self, label: str, done: int, total: int) -> None:
    if label != self._label:
      self._finish_line()
      self._label, self._last_decile, self._t0 = label, -1, time.perf_counter()
    frac = done / total if total else 1.0
    elapsed = time.perf_counter() - self._t0
    if self.tty:
      filled = int(frac * self.width)
      bar = "#" * filled + "-" * (self.width - filled)
      self.stream.write(f"\r{label} [{bar}] {done}/{total} {elapsed:5.1f}s")
      if done >= total:
        self.stream.write("\n")
        self._label = None
    else:
      decile = int(frac * 10)
      if decile != self._last_decile:
        self._last_decile = decile
        self.stream.write(f"{label}: {done}/{total} ({frac:.0%}, {elapsed:.1f}s)\n")
    self.stream.flush()

  def _finish_line(self) -> None:
    if self.tty and self._label is not None:
      self.stream.write("\n")
