"""Compute resources: the stacked layer axis over a 1-D device mesh, and BLAS threads.

Each layer's decomposition is independent, so the layer axis of a (L, out, in)
batch is sharded over a ``Mesh`` with one axis (``"layers"``) and every device
runs the batched kernel (kernels.map_layers) on its own slice inside ``jax.shard_map``: no
communication, and each layer's result is the one it would get on one device.
With one visible device everything goes through :func:`kernels.batched_truncated_svd`
unchanged. After ``jax.distributed`` starts (:mod:`crosslora_jax.core.distributed`) the
mesh spans every process's devices; each process then puts only its own layers on its
devices and the results are gathered back to every process (one all-gather). On CPU,
``XLA_FLAGS=--xla_force_host_platform_device_count=4`` gives four devices (set before JAX
starts; library code never changes it).

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
  """A 1-D mesh over ``devices`` (default: every process's), or None when there is only one.

  Ordered by (process, device id), so every process builds the same mesh and each
  process's devices hold consecutive layers.
  """
  devices = sorted(jax.devices() if devices is None else devices, key=lambda d: (d.process_index, d.id))
  if len(devices) <= 1:
    return None
  return Mesh(np.asarray(devices), (AXIS,))


def spans_processes(mesh: Mesh | None) -> bool:
  """Whether ``mesh`` holds devices of other processes (its arrays are then not all addressable here)."""
  return mesh is not None and len({d.process_index for d in mesh.devices.flat}) > 1


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
  out = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec), out_specs=spec)(w_loi, keys)
  if spans_processes(mesh):  # every process needs every layer's result on the host: gather them
    out = jax.lax.with_sharding_constraint(out, NamedSharding(mesh, PartitionSpec()))
  return out


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
  w = put_global(w_loi, sharding)
  keys = put_global(keys, sharding)
  return _sharded_svd(w, keys, mesh=mesh, rank=rank, method=method, n_oversamples=n_oversamples,
                      n_power_iter=n_power_iter)


def as_bits(stack: np.ndarray) -> tuple[np.ndarray, str | None]:
  """(a uint16 view, its dtype name) of a bfloat16 or float16 stack, else (the stack, None).

  XLA's CPU backend has no 16-bit float dynamic-slice: given a bf16 stack, the layer
  loop of :func:`kernels.map_layers` upcasts the whole stack to float32 before the loop (1.2 GiB
  of temporaries for a chunk of 8 paper-shaped MLP weights of both models). A uint16
  stack is sliced as it is, and :func:`kernels.batched_truncated_svds` (``bits_of``) upcasts one
  layer at a time. The view costs nothing.
  """
  if str(stack.dtype) in ("bfloat16", "float16"):
    return stack.view(np.uint16), str(stack.dtype)
  return stack, None


def truncated_svd_stacks(stacks: Sequence[np.ndarray], layer_ids: Sequence[np.ndarray], *, seed: int,
                         module_id: int, mesh: Mesh | None, rank: int, method: str | tuple[str, ...],
                         n_oversamples: int = kernels.DEFAULT_OVERSAMPLES,
                         n_power_iter: int = kernels.DEFAULT_POWER_ITER) -> tuple[kernels.Subspace, ...]:
  """Subspaces of several (L, big, small) stacks (one per model) in one program, each sharded
  over ``mesh``'s layer axis when given; the PRNG keys are made inside from the layer ids (L,).

  Every ``L`` must be a multiple of the mesh size (pad with :func:`round_up`). ``method``:
  one name, or one per stack (as :func:`kernels.batched_truncated_svds` takes it).
  """
  method = method if isinstance(method, str) else tuple(method)  # a static jit argument: hashable
  stacks, bits_of = zip(*map(as_bits, stacks))  # 16-bit floats travel as their bits: no f32 copy
  options = dict(rank=rank, method=method, n_oversamples=n_oversamples, n_power_iter=n_power_iter,
                 bits_of=tuple(bits_of))
  seed, module_id = np.uint32(seed), np.uint32(module_id)
  layer_ids = tuple(np.asarray(ids, np.uint32) for ids in layer_ids)
  if mesh is None:
    return kernels.batched_truncated_svds(stacks, layer_ids, seed, module_id, **options)
  for w in stacks:
    if w.shape[0] % num_shards(mesh):
      raise ValueError(f"w_loi: a layer axis divisible by {num_shards(mesh)} devices expected, got {w.shape[0]} layers")
  sharding = NamedSharding(mesh, PartitionSpec(AXIS))
  stacks = tuple(put_global(w, sharding) for w in stacks)
  layer_ids = tuple(put_global(ids, sharding) for ids in layer_ids)
  return _sharded_svds(stacks, layer_ids, seed, module_id, mesh=mesh, **options)


@functools.partial(jax.jit, static_argnames=("mesh", "rank", "method", "n_oversamples", "n_power_iter", "bits_of"))
def _sharded_svds(stacks, layer_ids, seed, module_id, *, mesh: Mesh, rank: int, method: str | tuple[str, ...],
                  n_oversamples: int, n_power_iter: int,
                  bits_of: tuple[str | None, ...]) -> tuple[kernels.Subspace, ...]:
  local = functools.partial(kernels.batched_truncated_svds, rank=rank, method=method, n_oversamples=n_oversamples,
                            n_power_iter=n_power_iter, bits_of=bits_of)
  stacked = tuple(PartitionSpec(AXIS) for _ in stacks)
  out = jax.shard_map(local, mesh=mesh, in_specs=(stacked, stacked, PartitionSpec(), PartitionSpec()),
                      out_specs=stacked)(stacks, layer_ids, seed, module_id)
  if spans_processes(mesh):  # every process needs every layer's result on the host: gather them
    out = jax.lax.with_sharding_constraint(out, NamedSharding(mesh, PartitionSpec()))
  return out


def put_global(x: np.ndarray | jax.Array, sharding: NamedSharding) -> jax.Array:
  """``x`` (the same on every process) placed by ``sharding``: each process fills only its own devices.

  With one process this is ``jax.device_put``; over several, device_put refuses arrays
  already on a device, so their values go through the host (PRNG keys as their raw data).
  """
  if sharding.is_fully_addressable:
    return jax.device_put(x, sharding)
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    data = put_global(np.asarray(jax.random.key_data(x)), sharding)
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


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
