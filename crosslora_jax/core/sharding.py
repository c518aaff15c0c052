"""Compute resources: the stacked layer axis over a 1-D device mesh, and BLAS threads.

Each layer's decomposition is independent, so the layer axis of a (L, out, in)
batch is sharded over a ``Mesh`` with one axis (``"layers"``) and every device
runs the batched kernel (kernels.map_layers) on its own slice inside ``jax.shard_map``: no
communication, and each layer's result is the one it would get on one device.
With one visible device everything goes through :func:`kernels.batched_truncated_svd`
unchanged. On CPU, ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` gives
four devices (set before JAX starts; library code never changes it).

:func:`blas_threads` bounds the LAPACK/BLAS threads that run beside XLA's own.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from crosslora_jax.core import kernels

AXIS = "layers"


def layer_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh | None:
  """A 1-D mesh over ``devices`` (default: all visible), or None when there is only one."""
  devices = list(jax.devices() if devices is None else devices)
  if len(devices) <= 1:
    return None
  return Mesh(np.asarray(devices), (AXIS,))


def num_shards(mesh: Mesh | None) -> int:
  return 1 if mesh is None else mesh.devices.size


def round_up(n: int, mesh: Mesh | None) -> int:
  """Smallest multiple of the mesh size that is >= n (batch sizes must divide evenly)."""
  k = num_shards(mesh)
  return -(-n // k) * k


@functools.partial(jax.jit, static_argnames=("mesh", "rank", "method", "n_oversamples", "n_power_iter"))
def _sharded_svd(w_loi: jax.Array, keys: jax.Array, *, mesh: Mesh, rank: int, method: str, n_oversamples: int,
                 n_power_iter: int) -> kernels.Subspace:
  fn = functools.partial(kernels.truncated_svd, rank=rank, method=method, n_oversamples=n_oversamples,
                         n_power_iter=n_power_iter)
  local = functools.partial(kernels.map_layers, fn)
  spec = PartitionSpec(AXIS)
  return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec), out_specs=spec)(w_loi, keys)


def truncated_svd_layers(w_loi: np.ndarray | jax.Array, keys: jax.Array, *, mesh: Mesh | None, rank: int,
                         method: str, n_oversamples: int = kernels.DEFAULT_OVERSAMPLES,
                         n_power_iter: int = kernels.DEFAULT_POWER_ITER) -> kernels.Subspace:
  """Subspaces of a (L, out, in) batch, sharded over ``mesh``'s layer axis when given.

  ``L`` must be a multiple of the mesh size (pad with :func:`round_up`); ``keys``
  is one PRNG key per layer (L,).
  """
  if mesh is None:
    return kernels.batched_truncated_svd(w_loi, keys, rank=rank, method=method, n_oversamples=n_oversamples,
                                         n_power_iter=n_power_iter)
  n = w_loi.shape[0]
  if n % num_shards(mesh):
    raise ValueError(f"w_loi: a layer axis divisible by {num_shards(mesh)} devices expected, got {n} layers")
  sharding = NamedSharding(mesh, PartitionSpec(AXIS))
  w = jax.device_put(w_loi, sharding)
  keys = jax.device_put(keys, sharding)
  return _sharded_svd(w, keys, mesh=mesh, rank=rank, method=method, n_oversamples=n_oversamples,
                      n_power_iter=n_power_iter)


@contextlib.contextmanager
def blas_threads(n: int | None):
  """Limits BLAS/LAPACK threads (OpenBLAS, MKL, ...) inside the block; restores them after.

  jaxlib's CPU linear algebra (QR, Cholesky, eigh, SVD) calls LAPACK from the
  OpenBLAS that scipy ships, which spins its own threads beside XLA's: on a busy
  2-core machine a 330x330 Cholesky took 0.6 s instead of 3 ms, and a 3072x3072 SVD
  124 s instead of 26 s (BUILD_NOTES.md, "Speed and memory"). Needs threadpoolctl; a no-op without it.
  """
  if n is None:
    yield
    return
  try:
    from threadpoolctl import threadpool_limits
  except ImportError:
    logging.info("threadpoolctl is not installed: BLAS threads left as they are")
    yield
    return
  with threadpool_limits(limits=n, user_api="blas"):
    yield
