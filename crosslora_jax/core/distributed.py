"""Several processes (hosts) as one run: ``jax.distributed``, one global mesh, one writer.

Every process runs the same command with its own process id. After
:func:`initialize`, ``jax.devices()`` lists every process's devices, so
:func:`crosslora_jax.core.sharding.layer_mesh` is one global mesh and each batched
decomposition's layer axis is split over all of them (on CPU the cross-process
gather of the results goes through gloo, ``jax_cpu_collectives_implementation``).
The rest of the run (planning, projection, report) is cheap and repeated by each
process on its local devices, so every process ends with the same adapters;
process 0 alone writes them (:func:`is_writer`) and the others wait for it at
:func:`finish`.

The SPMD programs only line up if every process makes the same decisions, so a
subspace-cache hit counts only when every process has the entry
(:class:`AgreedCache`). A failure anywhere is published through the coordinator's
key-value store; a watchdog thread in every other process prints the same one-line
error and exits with the same status (:func:`fail_everywhere`), so no process waits
forever in a collective for a peer that has gone. Every wait has a timeout.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import threading
import time

import jax
from absl import logging

from crosslora_jax.errors import CrossLoraError, one_line

_FAILURE = "crosslora/failure"  # value: "<status>\t<process id>\t<one-line message>"
_ACK = "crosslora/ack/"  # + process id: this process has seen the failure
_LEFT = "crosslora/left/"  # + process id: the failing process has its acks and is leaving
_DONE = "crosslora/done"  # barrier: process 0 has written every output
_ADDRESS = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):([0-9]{1,5})$")
ENV = {"coordinator_address": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
       "process_id": "JAX_PROCESS_ID"}


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
  """Where process 0 listens, how many processes take part and which one this is.

  All None: one process (nothing to initialise). ``timeout_s`` bounds every wait:
  start-up, each key-value exchange and the final barrier.
  """

  coordinator_address: str | None = None  # host:port of process 0
  num_processes: int | None = None
  process_id: int | None = None
  timeout_s: int = 300

  def __post_init__(self):
    problems = []
    n, pid, address = self.num_processes, self.process_id, self.coordinator_address
    if n is not None and (not isinstance(n, int) or n < 1):
      problems.append(f"--num_processes: a positive integer expected, got {n!r}")
    if pid is not None and (not isinstance(pid, int) or pid < 0):
      problems.append(f"--process_id: an integer >= 0 expected, got {pid!r}")
    elif pid is not None and isinstance(n, int) and pid >= n:
      problems.append(f"--process_id: 0 .. {n - 1} expected with --num_processes={n}, got {pid}")
    if address is not None and not _ADDRESS.match(address):
      problems.append(f"--coordinator_address: host:port of process 0 expected, got {address!r}")
    if (n or 1) > 1 and address is None:
      problems.append(f"--coordinator_address: host:port of process 0 expected with --num_processes={n}, got none")
    if self.several and (n is None or pid is None):
      problems.append(f"--num_processes and --process_id: both expected with --coordinator_address, got "
                      f"{n if n is not None else 'none'} and {pid if pid is not None else 'none'}")
    if not isinstance(self.timeout_s, int) or self.timeout_s <= 0:
      problems.append(f"--distributed_timeout: a positive number of seconds expected, got {self.timeout_s!r}")
    if problems:
      raise CrossLoraError("; ".join(problems) + ".")

  @property
  def several(self) -> bool:
    return self.coordinator_address is not None or (self.num_processes or 1) > 1

  @classmethod
  def from_env(cls, environ=os.environ, **given) -> "DistributedConfig":
    """``given`` values (flags; None = not given) over JAX's variables JAX_COORDINATOR_ADDRESS, ...

    A variable that is not an integer where one is expected is refused, naming it.
    """
    values = dict(given)
    for field, var in ENV.items():
      if values.get(field) is None and environ.get(var):
        text = environ[var]
        if field == "coordinator_address":
          values[field] = text
        elif re.fullmatch(r"[0-9]+", text.strip()):
          values[field] = int(text)
        else:
          raise CrossLoraError(f"{var}: an integer expected, got {one_line(text)!r}. Fix or unset it.")
    return cls(**{k: v for k, v in values.items() if v is not None})


class _State:
  client = None  # jax's DistributedRuntimeClient once initialised
  config: DistributedConfig | None = None
  stop = threading.Event()  # set when the run is over: the watchdog stops watching
  exiting = threading.Lock()  # held by whoever reports the run's failure (one error line per process)
  sequence = 0  # key-value exchanges so far (the same on every process: they run the same steps)


def initialize(config: DistributedConfig) -> None:
  """Joins the run (``jax.distributed.initialize``) and starts the failure watchdog; no-op for one process.

  Must run before anything touches a JAX backend. If not every process has joined within
  ``timeout_s``, the process prints one error line and exits with status 2 (jaxlib itself
  would abort it); jaxlib refusing to start (a port in use) is a CrossLoraError.
  """
  if not config.several or _State.client is not None:
    return
  where = (f"--coordinator_address {config.coordinator_address}: all {config.num_processes} processes expected to "
           f"join within {config.timeout_s} s (this is process {config.process_id})")
  fix = ("Start every process with the same address and count (and a free port on process 0), or raise "
         "--distributed_timeout.")
  # jaxlib ends the process (SIGABRT) when its own join deadline passes: give up first, with one line.
  timer = threading.Timer(config.timeout_s, _exit_now, (f"{where}, got no answer. {fix}", 2))
  timer.daemon = True
  timer.start()
  try:
    jax.distributed.initialize(config.coordinator_address, config.num_processes, config.process_id,
                               initialization_timeout=config.timeout_s + 60,
                               heartbeat_timeout_seconds=min(config.timeout_s, 100))
  except Exception as e:  # noqa: BLE001  (jaxlib raises its own runtime error types)
    raise CrossLoraError(f"{where}, got {type(e).__name__}: {one_line(str(e), limit=300)}. {fix}") from e
  finally:
    timer.cancel()
  _State.client, _State.config = _client(), config
  _State.stop.clear()
  threading.Thread(target=_watch_for_failure, name="crosslora-distributed-watchdog", daemon=True).start()


def _exit_now(message: str, status: int) -> None:
  print(f"error: {one_line(message)}", file=sys.stderr, flush=True)
  os._exit(status)


def _client():
  """The key-value client of ``jax.distributed``: ours, or one a library user started; None for one process."""
  from jax._src import distributed as jax_distributed  # the client has no public name
  return jax_distributed.global_state.client


def active() -> bool:
  """Whether this process is one of several (``jax.distributed`` is initialised, by us or by the caller)."""
  return _client() is not None


def is_writer() -> bool:
  """Whether this process writes the run's outputs: process 0 (or the only process)."""
  return jax.process_index() == 0


def _timeout_ms() -> int:
  return 1000 * (_State.config.timeout_s if _State.config is not None else 300)


def fail_everywhere(message: str, status: int) -> None:
  """Publishes this process's failure so every other process exits with the same line and status.

  Waits (a few seconds at most) until the others have seen it: process 0 hosts the
  key-value store, so it must not leave before they read it. No-op for one process.
  """
  if _State.client is None:
    return
  _State.exiting.acquire()  # from here on the watchdog prints nothing: this process reports its own error
  _State.stop.set()
  me = jax.process_index()
  try:
    _State.client.key_value_set(_FAILURE, f"{status}\t{me}\t{one_line(message)}")
  except Exception:  # noqa: BLE001  (another process failed first: its message stands for the run)
    pass
  deadline = time.monotonic() + 10
  for other in range(jax.process_count()):
    left = int(1000 * (deadline - time.monotonic()))
    if other == me or left <= 0:
      continue
    try:
      _State.client.blocking_key_value_get(f"{_ACK}{other}", left)
    except Exception:  # noqa: BLE001  (gone already, or it is failing itself)
      pass
  try:  # process 0 hosts the store: it waits for this before leaving (see _watch_for_failure)
    _State.client.key_value_set(f"{_LEFT}{me}", "1")
  except Exception:  # noqa: BLE001
    pass


def _watch_for_failure() -> None:
  """Watchdog thread: when another process publishes a failure, print it and leave with its status."""
  me = jax.process_index()
  while not _State.stop.is_set():
    try:
      value = _State.client.blocking_key_value_get(_FAILURE, 1000)
    except Exception as e:  # noqa: BLE001  (deadline: nothing yet; else the coordinator is gone)
      if "DEADLINE_EXCEEDED" in str(e) or _State.stop.is_set() or not _State.exiting.acquire(blocking=False):
        continue
      _exit_now(f"--coordinator_address {_State.config.coordinator_address}: process 0 of the run expected to "
                f"answer, got {type(e).__name__}: {one_line(str(e), limit=300)}. See process 0's error.", 2)
    status, origin, message = value.split("\t", 2)
    if int(origin) == me or not _State.exiting.acquire(blocking=False):
      return  # this process is reporting (its own, or this same) failure itself
    try:
      _State.client.key_value_set(f"{_ACK}{me}", "1")
      if me == 0:  # the store's host leaving first can abort the failing process (SIGABRT, not its status)
        _State.client.blocking_key_value_get(f"{_LEFT}{origin}", 2000)
        time.sleep(0.2)
    except Exception:  # noqa: BLE001
      pass
    _exit_now(f"{message} (process {origin} of {jax.process_count()})", int(status))


def finish() -> None:
  """Everyone waits until process 0 has written the outputs, then leaves the run; no-op for one process."""
  if _State.client is None:
    return
  try:
    _State.client.wait_at_barrier(_DONE, _timeout_ms())
  except Exception as e:  # noqa: BLE001
    if _State.exiting.locked():  # the watchdog is reporting a peer's failure and exits in a moment
      time.sleep(60)
    raise CrossLoraError(f"--distributed_timeout: every process expected at the end of the run within "
                         f"{_State.config.timeout_s} s, got {type(e).__name__}: {one_line(str(e), limit=300)}. "
                         "Raise --distributed_timeout if writing takes longer.") from e
  _State.stop.set()
  try:
    jax.distributed.shutdown()
  except Exception as e:  # noqa: BLE001  (the outputs are written: a slow peer at shut-down is no failure)
    logging.warning("jax.distributed.shutdown: %s", e)
  _State.client = None


def agree(flag: bool) -> bool:
  """True only if every process passes True (one key-value exchange); ``flag`` itself for one process."""
  client = _client()
  if client is None:
    return flag
  _State.sequence += 1
  prefix = f"crosslora/agree/{_State.sequence}/"
  client.key_value_set(f"{prefix}{jax.process_index()}", "1" if flag else "0")
  return all(client.blocking_key_value_get(f"{prefix}{p}", _timeout_ms()) == "1" for p in range(jax.process_count()))


class AgreedCache:
  """A SubspaceCache whose hits count only when every process has the entry (else all recompute).

  Each process reads and writes its own cache folder (a shared folder works too: writes are
  atomic), so the batched decompositions, which span every process, stay in step.
  """

  def __init__(self, cache):
    self.inner = cache

  def load(self, key):
    sub = self.inner.load(key)
    return sub if agree(sub is not None) else None

  def load_into(self, key, rows, row):
    return agree(self.inner.load_into(key, rows, row))

  def __getattr__(self, name):
    return getattr(self.inner, name)
