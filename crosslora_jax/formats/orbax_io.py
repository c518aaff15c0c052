"""Orbax checkpoints of LoRA adapters: a LoraTree or a PeftAdapter ⇄ a checkpoint.

A checkpoint is an Orbax composite of two items:

* ``params``: the array tree (``ocp.args.StandardSave`` / ``StandardRestore``);
* ``meta``: JSON (``ocp.args.JsonSave`` / ``JsonRestore``): the LoraTree meta
  (:mod:`crosslora_jax.formats.flax_bridge`) plus every leaf's typed path, shape and dtype,
  so the tree comes back with the same keys (int list indices stay ints), shapes
  and dtypes without a template, and a template that does not match is refused
  before Orbax reads anything.

A PeftAdapter is stored in the ``peft`` layout (torch orientation, unscaled) and
comes back as a PeftAdapter; a LoraTree comes back as a LoraTree.

Single folders: :func:`save` / :func:`restore` (atomic: temporary folder, verify,
rename). Step-managed runs: :func:`make_manager`, :func:`manager_save`,
:func:`manager_restore`, or :func:`save_args` / :func:`restore_args` with your own
``ocp.CheckpointManager``.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from crosslora_jax.formats import flax_bridge, adapter_io, peft_format
from crosslora_jax.errors import CrossLoraError, collect_and_raise

PARAMS, META = "params", "meta"
_KIND_ADAPTER, _KIND_TREE = "PeftAdapter", "LoraTree"

Lora = flax_bridge.LoraTree | peft_format.PeftAdapter


def _as_tree(lora: Lora) -> tuple[flax_bridge.LoraTree, str]:
  if isinstance(lora, peft_format.PeftAdapter):
    return flax_bridge.to_tree(lora, layout="peft"), _KIND_ADAPTER
  if isinstance(lora, flax_bridge.LoraTree):
    flax_bridge.check_meta(lora.meta, "LoraTree.meta")
    return lora, _KIND_TREE
  raise CrossLoraError(f"lora: a LoraTree or PeftAdapter expected, got {type(lora).__name__}.")


def _leaves(params: Any) -> list[tuple[tuple[Any, ...], Any]]:
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  out = []
  for path, leaf in flat:
    keys = []
    for k in path:
      if not isinstance(k, jax.tree_util.DictKey):
        raise CrossLoraError(f"params: nested dicts expected, got a {type(k).__name__} at "
                             f"{flax_bridge.path_str(keys + [k])}. Convert lists and tuples to dicts.")
      keys.append(k.key)
    out.append((tuple(keys), leaf))
  return out


def save_args(lora: Lora) -> ocp.args.Composite:
  """``ocp.args.Composite(params=StandardSave, meta=JsonSave)`` for a CheckpointManager.save."""
  tree, kind = _as_tree(lora)
  leaves = [{"path": list(path), "shape": list(np.shape(x)), "dtype": str(np.dtype(x.dtype))}
            for path, x in _leaves(tree.params)]
  meta = dict(tree.meta, orbax={"kind": kind, "leaves": leaves})
  # Host numpy, not jax.Array: with several JAX processes Orbax refuses a process-local jax.Array.
  params = jax.tree.map(np.asarray, tree.params)
  return ocp.args.Composite(**{PARAMS: ocp.args.StandardSave(params), META: ocp.args.JsonSave(meta)})


def _abstract_from_meta(meta: Mapping[str, Any], where: str) -> dict[Any, Any]:
  info = meta.get("orbax")
  if not isinstance(info, Mapping) or not isinstance(info.get("leaves"), list):
    raise CrossLoraError(f"{where}: meta.orbax.leaves expected (written by crosslora_jax.formats.orbax_io), got none. "
                         "Was this checkpoint written with orbax_io.save?")
  tree: dict[Any, Any] = {}
  for leaf in info["leaves"]:
    sds = jax.ShapeDtypeStruct(tuple(leaf["shape"]), np.dtype(peft_format.DTYPES.get(leaf["dtype"], leaf["dtype"])))
    node = tree
    for key in leaf["path"][:-1]:
      node = node.setdefault(key, {})
    node[leaf["path"][-1]] = sds
  return tree


def _shapes(tree: Any) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  return {flax_bridge.path_str(p): (tuple(np.shape(x)), np.dtype(x.dtype)) for p, x in _leaves(tree)}


def _check_like(saved: Any, like: Any, where: str) -> Any:
  """Abstract restore target in ``like``'s structure, or one clear error listing every difference."""
  want = {flax_bridge.path_str(p): x for p, x in _leaves(saved)}
  got = {flax_bridge.path_str(p): x for p, x in _leaves(like)}
  problems = [f"missing {p}" for p in sorted(set(want) - set(got))]
  problems += [f"not in the checkpoint: {p}" for p in sorted(set(got) - set(want))]
  for p in sorted(set(want) & set(got)):
    s, g = want[p], got[p]
    if tuple(np.shape(s)) != tuple(np.shape(g)) or np.dtype(s.dtype) != np.dtype(g.dtype):
      problems.append(f"{p}: {tuple(np.shape(s))} {np.dtype(s.dtype)} saved, {tuple(np.shape(g))} "
                      f"{np.dtype(g.dtype)} in like")
  collect_and_raise(problems, header=(
      f"{where}: a restore target with the saved tree structure, shapes and dtypes expected (restore without like= "
      "to get the saved tree, then convert it with crosslora_jax.formats.flax_bridge), got differences"))
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, like)


def restore_args(meta: Mapping[str, Any], *, like: Any = None, where: str = "checkpoint") -> ocp.args.Composite:
  """Restore args for the params item, given the meta item (restored first with JsonRestore).

  ``like`` (a params tree, LoraTree, nnx.State or nnx.Module, arrays or
  ShapeDtypeStructs) must match the saved tree leaf for leaf; its key types and
  shardings are used. Without it the saved tree comes back as saved.
  """
  saved = _abstract_from_meta(meta, where)
  if like is not None:
    like = like.params if isinstance(like, flax_bridge.LoraTree) else flax_bridge.pure_tree(like)
    target = _check_like(saved, like, where)
  else:
    target = saved
  return ocp.args.Composite(**{PARAMS: ocp.args.StandardRestore(target)})


def _result(params: Any, meta: Mapping[str, Any], where: str) -> Lora:
  meta = dict(meta)
  kind = meta.pop("orbax", {}).get("kind")
  tree = flax_bridge.LoraTree(params, flax_bridge.check_meta(meta, f"{where}: meta"))
  if kind == _KIND_ADAPTER:
    return flax_bridge.from_tree(tree)  # numpy arrays, as read_adapter gives
  return tree


def _checkpointer() -> ocp.Checkpointer:
  """A checkpointer of this process alone: the arrays are host numpy, and with several JAX
  processes only one of them writes (Orbax's default would wait for all at its barriers)."""
  alone = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(), active_processes={jax.process_index()})
  handler = ocp.CompositeCheckpointHandler(
      composite_options=ocp.CompositeOptions(multiprocessing_options=alone),
      **{PARAMS: ocp.StandardCheckpointHandler(multiprocessing_options=alone),
         META: ocp.JsonCheckpointHandler(multiprocessing_options=alone)})
  return ocp.Checkpointer(handler, multiprocessing_options=alone)


def _write(folder: pathlib.Path, lora: Lora, where: str) -> None:
  """Saves into ``folder`` (replaced: it is a temporary folder of ours) and checks what Orbax wrote."""
  args = save_args(lora)
  ckpt = _checkpointer()
  ckpt.save(folder, args=args, force=True)
  want, got = _shapes(args[PARAMS].item), _shapes(ckpt.metadata(folder).item_metadata[PARAMS].tree)
  if want != got:
    diff = sorted(set(want.items()) ^ set(got.items()), key=str)[:3]
    raise CrossLoraError(f"{where}: output verification failed: {len(want)} arrays expected, Orbax wrote "
                         f"{len(got)} (differ: {diff}).")


def save(directory: str | os.PathLike[str], lora: Lora, *, overwrite: bool = False) -> pathlib.Path:
  """Writes ``lora`` as an Orbax checkpoint folder, atomically, and checks what was written."""
  with adapter_io.atomic_folder(directory, overwrite=overwrite) as tmp:
    _write(tmp, lora, str(directory))
  return pathlib.Path(directory)


def save_adapters_as_nnx(directory: str | os.PathLike[str], adapters: Mapping[str, peft_format.PeftAdapter], *,
                         overwrite: bool = False) -> pathlib.Path:
  """The CLI's ``--orbax_output``: each adapter as an nnx-layout checkpoint (identity key map).

  One adapter fills ``directory``; several get one subfolder each, by name. Atomic as a whole.
  """
  with adapter_io.atomic_folder(directory, overwrite=overwrite) as tmp:
    for name, adapter in adapters.items():
      _write(tmp / name if len(adapters) > 1 else tmp, flax_bridge.to_nnx(adapter), f"{directory}: {name}")
  return pathlib.Path(directory)


def _read_meta(restore_fn, where: str) -> dict[str, Any]:
  try:
    meta = restore_fn(ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META]
  except (FileNotFoundError, ValueError, KeyError, OSError) as e:
    raise CrossLoraError(f"{where}: an Orbax checkpoint written by crosslora_jax.formats.orbax_io expected (items "
                         f"{PARAMS!r} and {META!r}), got {type(e).__name__}: {str(e).splitlines()[0][:200]}.") from None
  if not isinstance(meta, dict):
    raise CrossLoraError(f"{where}: a JSON meta item expected, got {type(meta).__name__}.")
  return meta


def _restore_with(restore_fn, *, like: Any, where: str) -> Lora:
  meta = _read_meta(restore_fn, where)
  args = restore_args(meta, like=like, where=where)
  try:
    params = restore_fn(args)[PARAMS]
  except (ValueError, FileNotFoundError, OSError) as e:
    raise CrossLoraError(f"{where}: arrays matching the checkpoint's meta expected, got {type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200]}. The checkpoint is incomplete or corrupt.") from None
  return _result(params, meta, where)


def restore(directory: str | os.PathLike[str], *, like: Any = None) -> Lora:
  """Reads a checkpoint written by :func:`save`: the same arrays, dtypes and tree.

  ``like``: see :func:`restore_args`; a tree of another structure raises
  CrossLoraError naming the differing leaves.
  """
  directory = pathlib.Path(directory)
  if not directory.is_dir():
    raise CrossLoraError(f"{directory}: an Orbax checkpoint folder expected, got "
                         f"{'a file' if directory.exists() else 'nothing'}.")
  ckpt = _checkpointer()
  return _restore_with(lambda args: ckpt.restore(directory, args=args), like=like, where=str(directory))


def make_manager(directory: str | os.PathLike[str], options: ocp.CheckpointManagerOptions | None = None
                 ) -> ocp.CheckpointManager:
  """An ``ocp.CheckpointManager`` whose ``params``/``meta`` items have their handlers registered."""
  return ocp.CheckpointManager(
      os.fspath(directory), options=options,
      item_handlers={PARAMS: ocp.StandardCheckpointHandler(), META: ocp.JsonCheckpointHandler()})


def manager_save(manager: ocp.CheckpointManager, step: int, lora: Lora, **kwargs: Any) -> bool:
  """``manager.save(step, args=save_args(lora))``; waits for the write to finish."""
  saved = manager.save(step, args=save_args(lora), **kwargs)
  manager.wait_until_finished()
  return saved


def manager_restore(manager: ocp.CheckpointManager, step: int | None = None, *, like: Any = None) -> Lora:
  """Restores ``step`` (default: the latest) from a manager; see :func:`restore`."""
  step = manager.latest_step() if step is None else step
  where = f"{manager.directory} step {step}"
  if step is None or step not in manager.all_steps():
    raise CrossLoraError(f"{manager.directory}: step {step} expected among the saved steps, got "
                         f"{list(manager.all_steps())}.")
  return _restore_with(lambda args: manager.restore(step, args=args), like=like, where=where)
