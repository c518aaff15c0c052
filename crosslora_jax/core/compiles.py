"""Counting the XLA programs a run builds (compiled, or loaded from the persistent cache).

JAX reports every executable it builds through ``jax.monitoring`` as one
``/jax/core/compile/backend_compile_duration`` event (a persistent-cache hit is
reported too, inside it, as ``/jax/compilation_cache/cache_hits``). A jitted
function called again with the same shapes builds nothing, so the count is the
number of distinct programs: what a cold run pays for on an accelerator, where
each one takes seconds to compile.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import jax

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"


@dataclasses.dataclass
class CompileLog:
  """What :func:`count_compiles` saw: one name per program built, its seconds, and cache hits."""

  names: list[str] = dataclasses.field(default_factory=list)
  seconds: float = 0.0  # compile (or cache load) time, summed
  cache_hits: int = 0  # programs loaded from the persistent compilation cache

  @property
  def count(self) -> int:
    return len(self.names)


@contextlib.contextmanager
def count_compiles() -> Iterator[CompileLog]:
  """Records every XLA program built inside the block (any thread)."""
  log = CompileLog()

  def on_duration(event: str, seconds: float, **kwargs) -> None:
    if event == BACKEND_COMPILE_EVENT:
      log.names.append(str(kwargs.get("fun_name", "?")))
      log.seconds += seconds

  def on_event(event: str, **kwargs) -> None:
    if event == CACHE_HIT_EVENT:
      log.cache_hits += 1

  jax.monitoring.register_event_duration_secs_listener(on_duration)
  jax.monitoring.register_event_listener(on_event)
  try:
    yield log
  finally:
    jax.monitoring.unregister_event_duration_listener(on_duration)
    jax.monitoring.unregister_event_listener(on_event)
