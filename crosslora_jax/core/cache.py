"""On-disk cache of base-weight subspaces: each one is computed once, then reused.

A transfer needs the rank-r truncated SVD of every adapted base weight of both
models; those depend on the base weights only, never on the adapter, so they are
saved here and reused by later runs and by every other adapter.

Layout (root = ``--cache_dir``, by default :func:`default_cache_dir`)::

  <root>/<model id>/model.json                        what the id stands for (for people)
  <root>/<model id>/<module>-L<layer>-<options>.safetensors   u, s, v, energy (float32)
  <root>/<model id>/overlaps-<target model id>/<module>-L<layer>-<options>-T<target layer>.json
                                                      the report's overlap of a source and a target subspace

The model id is the sha256 of ``BaseWeights.fingerprint()``: for a checkpoint
folder, its config.json plus name, size and mtime of every weight file (cheap:
no pass over gigabytes of weights; a copy of the folder elsewhere, with new
mtimes, gets a new id; rewriting a weight file in place with equal size and
mtime would go unnoticed). For in-memory weights it hashes the arrays.

Every entry carries its full key (model id, module, layer, weight shape, rank,
SVD method and its options, format version) and a CRC-32 of its key and tensor
bytes in the safetensors metadata (a check against corruption, not tampering: the
cache is the user's own; CRC-32 reads 2x faster than sha256 here, and a warm run
checks every entry; entries written with a sha256, before 2026-12-02, still load). :meth:`SubspaceCache.load_into` (which :meth:`SubspaceCache.load`
uses) checks both, and the dtypes, shapes and finiteness of what it read: an entry that fails any check is reported as
rejected and treated as a miss, so the caller recomputes it and
:meth:`SubspaceCache.store` overwrites it. Writes go to a temporary file in the
same folder, then ``os.replace``: readers see a whole entry or none.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import stat
import pathlib
import tempfile
import zlib
from typing import Any

import numpy as np
from absl import logging
from safetensors.numpy import save as st_save

from crosslora_jax.core import kernels, svd_solvers

CACHE_ENV = "CROSSLORA_CACHE"  # the cache root: <root>/subspaces, <root>/xla, <root>/models (crosslora_bench.zoo)
FORMAT_VERSION = 3  # bump when a kernel's numbers change: older entries then miss
_FIELDS = ("u", "s", "v", "energy")
OVERLAP_VERSION = 1  # bump when kernels.subspace_overlap's numbers change


def cache_root() -> pathlib.Path:
  """``$CROSSLORA_CACHE``, else ``~/.cache/crosslora_jax``: every cache of the project lives below."""
  root = os.environ.get(CACHE_ENV)
  return pathlib.Path(root).expanduser() if root else pathlib.Path.home() / ".cache" / "crosslora_jax"


def default_cache_dir() -> pathlib.Path:
  """``<cache root>/subspaces``: the subspace cache."""
  return cache_root() / "subspaces"


def default_xla_cache_dir() -> pathlib.Path:
  """``<cache root>/xla``: JAX's persistent compilation cache."""
  return cache_root() / "xla"


def enable_compilation_cache(folder: str | os.PathLike[str]) -> None:
  """Keeps compiled XLA programs in ``folder`` (JAX's persistent compilation cache).

  A transfer compiles two programs per pair of distinct source and target weight shapes
  (a weight and its transpose count once): the decomposition of both models' chunk, and
  the projection with the report's overlaps (``core/compiles.py`` counts them). On one H200 compiling was 152 s of a 170 s cold run
  (cProfile: ``backend_compile_and_load``, 8-layer paper-scale run, BUILD_NOTES "Speed and memory"),
  on 2 CPU cores about 0.3–0.5 s each; with this cache later runs with the same shapes
  load them instead. Call before the first computation. A cache JAX cannot write (a full disk,
  a file size limit) only costs the next run its compile time, so JAX's warning about it is
  silenced: on a full disk the one line that matters is the error about the output.
  """
  import warnings

  import jax
  warnings.filterwarnings("ignore", message="Error writing persistent compilation cache entry", category=UserWarning)
  pathlib.Path(folder).mkdir(parents=True, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", str(folder))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def model_id(fingerprint: str) -> str:
  """Folder name for one base model: sha256 of its fingerprint, shortened."""
  return hashlib.sha256(fingerprint.encode()).hexdigest()[:24]


@dataclasses.dataclass(frozen=True)
class EntryKey:
  """Everything a cached subspace depends on."""

  model: str  # model_id(fingerprint)
  module: str  # canonical module, e.g. "q_proj"
  layer: int
  shape: tuple[int, int]  # (out, in) of the base weight
  rank: int
  method: str  # kernels.SVD_METHODS
  seed: int | None = None  # randomized only; None otherwise
  n_oversamples: int | None = None
  n_power_iter: int | None = None
  version: int = FORMAT_VERSION

  @classmethod
  def make(cls, model: str, module: str, layer: int, shape: tuple[int, int], *, rank: int, method: str,
           seed: int, n_oversamples: int, n_power_iter: int) -> "EntryKey":
    """A key where options that do not affect ``method``'s result are left out (None)."""
    options = svd_solvers.seeded_options(method, n_oversamples, n_power_iter)
    return cls(model, module, int(layer), (int(shape[0]), int(shape[1])), int(rank), method,
               None if options is None else int(seed), *(options or (None, None)))

  def filename(self) -> str:
    opts = f"s{self.seed}-p{self.n_oversamples}-q{self.n_power_iter}-" if self.method in kernels.SEEDED_SVD_METHODS else ""
    return f"{self.module}-L{self.layer:04d}-r{self.rank}-{self.method}-{opts}v{self.version}.safetensors"

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), sort_keys=True)


def _checksum(key_json: str, tensors: dict[str, np.ndarray], kind: str = "crc32") -> str:
  """``kind`` ("crc32", or "sha256" for entries written before 2026-12-02) of the key and every tensor's bytes."""
  parts = [key_json.encode()]
  for name in _FIELDS:
    a = np.ascontiguousarray(tensors[name])
    parts += [f"{name}:{a.dtype.str}:{a.shape}".encode(), memoryview(a).cast("B")]
  if kind == "sha256":
    h = hashlib.sha256()
    for part in parts:
      h.update(part)
    return h.hexdigest()
  crc = 0
  for part in parts:
    crc = zlib.crc32(part, crc)
  return f"{crc:08x}"


def _checksum_ok(meta: dict[str, str], key_json: str, tensors: dict[str, np.ndarray]) -> bool:
  kind = next((k for k in ("crc32", "sha256") if k in meta), None)
  return kind is not None and meta[kind] == _checksum(key_json, tensors, kind)


def _atomic_write_bytes(path: pathlib.Path, data: bytes) -> None:
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise


class SubspaceCache:
  """Subspaces on disk under ``root``; counts hits, misses and rejected entries."""

  def __init__(self, root: str | os.PathLike[str] | None = None):
    self.root = pathlib.Path(root).expanduser() if root is not None else default_cache_dir()
    self.hits = 0
    self.misses = 0
    self.rejected = 0  # entries found but corrupt or not matching their key: recomputed
    self.writes = 0
    self._described: set[str] = set()

  def path(self, key: EntryKey) -> pathlib.Path:
    return self.root / key.model / key.filename()

  def load(self, key: EntryKey) -> kernels.Subspace | None:
    """The cached subspace (numpy float32), or None on a miss or a rejected entry."""
    rows = empty_rows(key, 1)
    if not self.load_into(key, rows, 0):
      return None
    return kernels.Subspace(rows.u[0], rows.s[0], rows.v[0], rows.energy[0])

  def load_into(self, key: EntryKey, rows: kernels.Subspace, row: int) -> bool:
    """Reads one entry straight into row ``row`` of stacked arrays (:func:`empty_rows`); False on a
    miss or a rejected entry (that row then holds nothing to use).

    One copy from the file into its place in the stack, where reading the bytes, parsing them
    into arrays and stacking those made three (a warm run reads ~1 GB of entries on the real
    pair). The checks are :meth:`load`'s: key, tensor names, dtypes and shapes, checksum, finite.
    """
    path = self.path(key)
    out_dim, in_dim = key.shape
    want = {"u": (out_dim, key.rank), "s": (key.rank,), "v": (in_dim, key.rank), "energy": (1,)}
    dest = dict(zip(_FIELDS, (rows.u[row], rows.s[row], rows.v[row], rows.energy[row:row + 1])))
    try:
      if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block the read forever
        return self._reject(path, "not a regular file")
      with open(path, "rb") as f:
        header, start = _read_header(f)
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict) or meta.get("key") != key.to_json():
          return self._reject(path, "key mismatch")
        if set(header) != set(_FIELDS):
          return self._reject(path, f"tensors {sorted(header)} instead of {list(_FIELDS)}")
        for name, shape in want.items():
          info = header[name]
          if not isinstance(info, dict) or info.get("dtype") != "F32" or info.get("shape") != list(shape):
            got = (info.get("dtype"), info.get("shape")) if isinstance(info, dict) else info
            return self._reject(path, f"{name}: float32 {shape} expected, got {got}")
          begin, stop = info.get("data_offsets", (0, -1))
          if stop - begin != dest[name].nbytes:
            return self._reject(path, f"{name}: data offsets {begin}..{stop} do not fit {shape}")
          f.seek(start + begin)
          if f.readinto(memoryview(dest[name]).cast("B")) != dest[name].nbytes:
            return self._reject(path, f"{name}: the file ends inside the tensor")
    except FileNotFoundError:
      self.misses += 1
      return False
    except OSError as e:
      return self._reject(path, f"unreadable ({e})")
    except (ValueError, TypeError, KeyError, AttributeError) as e:  # a header that is not what safetensors writes
      return self._reject(path, f"not a readable safetensors file ({type(e).__name__}: {e})")
    if not _checksum_ok(meta, key.to_json(), dest):
      return self._reject(path, "checksum mismatch")
    if not all(np.isfinite(a).all() for a in dest.values()):
      return self._reject(path, "not finite")
    self.hits += 1
    return True

  def store(self, key: EntryKey, sub: kernels.Subspace, *, describe: dict[str, Any] | None = None) -> None:
    """Writes one entry atomically (replacing a rejected one). ``describe`` goes to model.json once."""
    # energy is stored as (1,): safetensors has no 0-d tensors.
    tensors = {name: np.ascontiguousarray(np.asarray(x, np.float32).reshape(-1 if name == "energy" else np.shape(x)))
               for name, x in zip(_FIELDS, sub)}
    key_json = key.to_json()
    meta = {"key": key_json, "crc32": _checksum(key_json, tensors)}
    folder = self.root / key.model
    try:  # a cache is an optimisation: a full disk or an entry replaced by a folder skips the write
      folder.mkdir(parents=True, exist_ok=True)
      if describe is not None and key.model not in self._described:
        self._described.add(key.model)
        info = folder / "model.json"
        if not info.exists():
          _atomic_write_bytes(info, (json.dumps(describe, indent=2, sort_keys=True) + "\n").encode())
      _atomic_write_bytes(self.path(key), st_save(tensors, metadata=meta))
    except OSError as e:
      logging.warning("subspace cache: %s: not written (%s: %s); the run goes on without it",
                      self.path(key), type(e).__name__, e.strerror or e)
      return
    self.writes += 1

  def overlap_path(self, source: EntryKey, target: EntryKey) -> pathlib.Path:
    stem = source.filename().removesuffix(".safetensors")
    return self.root / source.model / f"overlaps-{target.model}" / f"{stem}-T{target.layer:04d}.json"

  def load_overlap(self, source: EntryKey, target: EntryKey) -> float | None:
    """The report's overlap of two cached subspaces (a source and a target weight's), or None.

    Cached beside the subspaces because it costs more than the projections of a warm
    run; an entry whose keys or value do not check out is a miss.
    """
    path = self.overlap_path(source, target)
    try:
      if not stat.S_ISREG(os.stat(path).st_mode):
        return None
      entry = json.loads(path.read_bytes())
    except (OSError, ValueError):
      return None
    want = {"version": OVERLAP_VERSION, "source": source.to_json(), "target": target.to_json()}
    if not isinstance(entry, dict) or any(entry.get(k) != v for k, v in want.items()):
      return None
    value = entry.get("overlap")
    return value if type(value) is float and np.isfinite(value) else None

  def store_overlap(self, source: EntryKey, target: EntryKey, value: float) -> None:
    path = self.overlap_path(source, target)
    entry = {"version": OVERLAP_VERSION, "source": source.to_json(), "target": target.to_json(), "overlap": float(value)}
    try:  # an optimisation, like the subspaces: a failed write is skipped
      path.parent.mkdir(parents=True, exist_ok=True)
      _atomic_write_bytes(path, (json.dumps(entry, sort_keys=True) + "\n").encode())
    except OSError as e:
      logging.warning("subspace cache: %s: not written (%s: %s)", path, type(e).__name__, e.strerror or e)

  def _reject(self, path: pathlib.Path, why: str) -> bool:
    self.rejected += 1
    logging.warning("subspace cache: %s: %s; recomputing it", path, why)
    return False

  def stats(self) -> dict[str, Any]:
    return {"root": str(self.root), "hits": self.hits, "misses": self.misses, "rejected": self.rejected,
            "writes": self.writes}


def empty_rows(key: EntryKey, n: int) -> kernels.Subspace:
  """Uninitialised float32 stacks for ``n`` entries of ``key``'s shape and rank: u (n, out, r), s (n, r),
  v (n, in, r), energy (n,); :meth:`SubspaceCache.load_into` fills a row."""
  out_dim, in_dim = key.shape
  return kernels.Subspace(np.empty((n, out_dim, key.rank), np.float32), np.empty((n, key.rank), np.float32),
                          np.empty((n, in_dim, key.rank), np.float32), np.empty((n,), np.float32))


def _read_header(f) -> tuple[dict[str, Any], int]:
  """The JSON header of an open safetensors file (u64 length + JSON) and where its data starts."""
  size = os.fstat(f.fileno()).st_size
  n = int.from_bytes(f.read(8), "little")
  if n <= 0 or 8 + n > size:
    raise ValueError("header length out of range")
  header = json.loads(f.read(n))
  if not isinstance(header, dict):
    raise ValueError("the header is not an object")
  return header, 8 + n
