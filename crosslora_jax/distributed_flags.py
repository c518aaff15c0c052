"""The transfer CLI's flags for running one transfer on several processes (hosts) together.

Each flag falls back to JAX's environment variable (JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID); none of them set means one process. Checked by
:class:`crosslora_jax.core.distributed.DistributedConfig` (one line, exit 2).
"""

from __future__ import annotations

from absl import flags

from crosslora_jax.core import distributed

_DEFAULTS = distributed.DistributedConfig()

COORDINATOR = flags.DEFINE_string("coordinator_address", None, "Several processes (hosts) as one run: host:port where "
                                  "process 0 listens (default: $JAX_COORDINATOR_ADDRESS). Every process runs the same "
                                  "command with its own --process_id; process 0 writes the outputs.")
NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes taking part (default: $JAX_NUM_PROCESSES; "
                                     "none: one).")
PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0 .. --num_processes - 1 (default: "
                                  "$JAX_PROCESS_ID).")
TIMEOUT = flags.DEFINE_integer("distributed_timeout", _DEFAULTS.timeout_s, "Seconds any process waits for the others "
                               "(start-up, each exchange, the end of the run) before it gives up with an error.")


def initialize() -> None:
  """Joins the run the flags (or JAX's variables) describe; nothing when they describe one process."""
  distributed.initialize(distributed.DistributedConfig.from_env(
      coordinator_address=COORDINATOR.value, num_processes=NUM_PROCESSES.value, process_id=PROCESS_ID.value,
      timeout_s=TIMEOUT.value))
