"""Execution: read base weights bucket by bucket, decompose once, project every adapter.

:func:`transfer` is the library entry point the CLI calls. Base subspaces are
computed once per (model, module, layer) and shared by every adapter of the run.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from crosslora_jax import anchored, kernels, peft_format, planning
from crosslora_jax.checkpoint import BaseWeights, open_base
from crosslora_jax.errors import CrossLoraError
from crosslora_jax.report import Report

Progress = Callable[[str, int, int], None]  # (label, done, total)


@dataclasses.dataclass(frozen=True)
class TransferConfig:
  """Options of one transfer run (the CLI's flags, validated)."""

  method: str = "cross_lora"
  rank: int = 320
  layer_map: str = "auto"
  svd: str = "exact"
  seed: int = 0
  solver: str = "closed"
  dtype: str | None = None  # output dtype; None keeps the adapter's
  skip_unsupported: bool = False
  chunk_layers: int = 8  # layers stacked per jitted call: bounds memory
  base_model_name: str | None = None  # base_model_name_or_path; default: the target's name
  calibrate_norm: bool = False  # rescale each module so |dW_t|/|W_t| = |dW_s|/|W_s| (any method)
  anchor: anchored.AnchorConfig = dataclasses.field(default_factory=anchored.AnchorConfig)  # method anchored

  def __post_init__(self):
    problems = []
    if self.method not in planning.METHODS:
      problems.append(f"--method: one of {', '.join(planning.METHODS)} expected, got {self.method!r}")
    if not isinstance(self.rank, int) or self.rank <= 0:
      problems.append(f"--rank: a positive integer expected, got {self.rank!r}")
    if self.layer_map not in planning.LAYER_MAPS:
      problems.append(f"--layer_map: one of {', '.join(planning.LAYER_MAPS)} expected, got {self.layer_map!r}")
    if self.svd not in kernels.SVD_METHODS:
      problems.append(f"--svd: one of {', '.join(kernels.SVD_METHODS)} expected, got {self.svd!r}")
    if self.solver not in ("closed", "lstsq"):
      problems.append(f"--solver: closed or lstsq expected, got {self.solver!r}")
    if self.dtype is not None and self.dtype not in peft_format.DTYPES:
      problems.append(f"--dtype: one of {', '.join(peft_format.DTYPES)} expected, got {self.dtype!r}")
    if not isinstance(self.anchor, anchored.AnchorConfig):
      problems.append(f"anchor: an anchored.AnchorConfig expected, got {type(self.anchor).__name__}")
    if self.chunk_layers <= 0:
      problems.append(f"chunk_layers: a positive integer expected, got {self.chunk_layers!r}")
    if problems:
      raise CrossLoraError("; ".join(problems) + ".")


@dataclasses.dataclass
class TransferResult:
  adapter: peft_format.PeftAdapter  # float32 factors, config for the target
  report: Report

  def save(self, folder: str | os.PathLike[str], dtype: Any | None = None) -> None:
    from crosslora_jax import io
    io.save_adapter(self.adapter, folder, dtype=dtype)


class Subspaces:
  """Rank-r subspaces of one base model's weights, computed once per (module, layer, rank)."""

  def __init__(self, base: BaseWeights, config: TransferConfig, role: str):
    self.base = base
    self.config = config
    self.role = role
    self._memo: dict[tuple[str, int, int], kernels.Subspace] = {}
    self.seconds = 0.0

  def get(self, module: str, layers: Sequence[int], rank: int,
          progress: Callable[[int], None] | None = None) -> kernels.Subspace:
    """Stacked subspaces (L, ...) of ``module`` for ``layers`` (repeats allowed), as numpy."""
    todo = sorted({l for l in layers if (module, l, rank) not in self._memo})
    chunk = self.config.chunk_layers
    for start in range(0, len(todo), chunk):
      t0 = time.perf_counter()
      part = todo[start:start + chunk]
      stack = np.stack([np.asarray(self.base.weight(l, module)) for l in part])
      pad = chunk - len(part) if len(todo) > chunk else 0  # one compiled shape per bucket
      if pad:
        stack = np.concatenate([stack, np.zeros((pad,) + stack.shape[1:], stack.dtype)])
      keys = self._keys(module, part + [0] * pad)
      sub = kernels.batched_truncated_svd(jnp.asarray(stack), keys, rank=rank, method=self.config.svd)
      sub = jax.tree.map(np.asarray, sub)
      for n, l in enumerate(part):
        self._memo[(module, l, rank)] = jax.tree.map(lambda x: x[n], sub)
      self.seconds += time.perf_counter() - t0
      if progress is not None:
        progress(len(part))
    return jax.tree.map(lambda *xs: np.stack(xs), *[self._memo[(module, l, rank)] for l in layers])

  def _keys(self, module: str, layers: Sequence[int]) -> jax.Array:
    """One PRNG key per (role, module, layer), independent of chunking."""
    base = jax.random.fold_in(jax.random.key(self.config.seed), ("source", "target").index(self.role))
    base = jax.random.fold_in(base, _module_index(module))
    return jax.vmap(lambda l: jax.random.fold_in(base, l))(jnp.asarray(layers, jnp.uint32))


def _module_index(module: str) -> int:
  from crosslora_jax.architectures import CANONICAL_MODULES
  return CANONICAL_MODULES.index(module)


def transfer(source: str | os.PathLike[str] | BaseWeights, target: str | os.PathLike[str] | BaseWeights,
             adapters: Sequence[str | os.PathLike[str] | peft_format.PeftAdapter],
             config: TransferConfig = TransferConfig(), *, progress: Progress | None = None) -> list[TransferResult]:
  """Moves each adapter from ``source`` to ``target``; bases are decomposed once for all.

  Paths are read lazily; already-loaded ``BaseWeights``/``PeftAdapter`` objects are used as
  they are. Returns float32 adapters (cast on save) and one report per adapter.
  """
  t_start = time.perf_counter()
  source_w, target_w = open_base(source), open_base(target)
  loaded = [a if isinstance(a, peft_format.PeftAdapter)
            else peft_format.read_adapter(a, skip_unsupported=config.skip_unsupported) for a in adapters]
  plans = []
  for adapter in loaded:
    factors = planning.canonical_factors(adapter, source_w.arch, where=str(adapter.path or adapter.name))
    plans.append(planning.make_plan(factors, source_w.arch, target_w.arch, method=config.method,
                                    rank=config.rank, layer_map_kind=config.layer_map))
  subs_s = Subspaces(source_w, config, "source")
  subs_t = Subspaces(target_w, config, "target")
  modules = sorted({m for p in plans for m in p.buckets}, key=_module_index)
  needs_source = config.method == "cross_lora"
  anchors = anchored.anchors_for(source_w, target_w, config.anchor) if config.method == "anchored" else None
  needs_target = config.method in ("cross_lora", "lora_x")
  total = 0
  for module in modules:
    src_layers = sorted({w.source_layer for p in plans for w in p.buckets.get(module, [])})
    tgt_layers = sorted({w.target_layer for p in plans for w in p.buckets.get(module, [])})
    total += (len(src_layers) if needs_source else 0) + (len(tgt_layers) if needs_target else 0)
  done = 0

  def tick(n: int) -> None:
    nonlocal done
    done += n
    if progress is not None:
      progress("decomposing base weights", done, total)

  results = []
  per_adapter = [dict() for _ in loaded]
  entries = [[] for _ in loaded]
  for module in modules:
    rank = max(p.rank[module] for p in plans if module in p.buckets)
    all_items = [w for p in plans for w in p.buckets.get(module, [])]
    sub_s_all = sub_t_all = None
    if needs_source:
      subs_s.get(module, [w.source_layer for w in all_items], rank, tick)
    if needs_target:
      subs_t.get(module, [w.target_layer for w in all_items], rank, tick)
    for n, plan in enumerate(plans):
      items = plan.buckets.get(module, [])
      if not items:
        continue
      t0 = time.perf_counter()
      if needs_source:
        sub_s_all = subs_s.get(module, [w.source_layer for w in items], rank)
      if needs_target:
        sub_t_all = subs_t.get(module, [w.target_layer for w in items], rank)
      out_t, in_t = target_w.arch.shape(module)
      # Group by LoRA rank: each group is one vmapped call.
      by_rank: dict[int, list[int]] = {}
      for idx, w in enumerate(items):
        by_rank.setdefault(w.factors.a_ri.shape[0], []).append(idx)
      for k, idxs in by_rank.items():
        a = jnp.asarray(np.stack([np.asarray(items[i].factors.a_ri, np.float32) for i in idxs]))
        b = jnp.asarray(np.stack([np.asarray(items[i].factors.b_or, np.float32) for i in idxs]))
        take = lambda sub: jax.tree.map(lambda x: jnp.asarray(x[np.asarray(idxs)]), sub)
        extra = [{} for _ in idxs]  # method-specific report fields
        if config.method == "cross_lora":
          proj = kernels.batched_project_cross_lora(take(sub_s_all), take(sub_t_all), a, b, solver=config.solver)
        elif config.method == "lora_x":
          proj = kernels.batched_project_lora_x(take(sub_t_all), a, b)
        elif config.method == "truncate_pad":
          proj = kernels.batched_truncate_pad(a, b, out_t=out_t, in_t=in_t)
        elif config.method == "anchored":
          proj, extra = anchored.project_bucket(anchors, module, [items[i] for i in idxs])
        else:  # copy
          proj = kernels.Projected(a, b, jnp.ones(len(idxs)))
        proj = jax.tree.map(np.asarray, proj)  # block before dispatching more (see overlap below)
        proj, calib = anchored.calibrate_bucket(source_w, target_w, module, [items[i] for i in idxs], proj,
                                                apply=config.calibrate_norm)
        proj = jax.tree.map(np.asarray, proj)
        overlap = None
        if needs_source:
          # Two overlap computations in flight at once (async dispatch) deadlocked XLA's CPU
          # runtime on real-model sizes (all threads in futex wait): run them one at a time.
          ov_u = np.asarray(kernels.batched_overlap(take(sub_s_all).u, take(sub_t_all).u))
          ov_v = np.asarray(kernels.batched_overlap(take(sub_s_all).v, take(sub_t_all).v))
          overlap = (ov_u + ov_v) / 2
        for row, i in enumerate(idxs):
          w = items[i]
          per_adapter[n][(w.target_layer, module)] = (proj.a_ri[row], proj.b_or[row], w.factors.scaling)
          entries[n].append({
              "target_key": target_w.arch.module_path(w.target_layer, target_w.arch.stored_for(module)[0]),
              "module": module,
              "target_layer": w.target_layer,
              "source_key": w.factors.module_path,
              "source_layer": w.source_layer,
              "source_shape": list(source_w.arch.shape(module)),
              "target_shape": [out_t, in_t],
              "lora_rank": k,
              "rank_used": plan.rank[module] if config.method in ("cross_lora", "lora_x") else None,
              "energy_source": float(sub_s_all.energy[i]) if needs_source else None,
              "energy_target": float(sub_t_all.energy[i]) if needs_target else None,
              "norm_ratio": float(proj.norm_ratio[row]),
              "overlap": float(overlap[row]) if overlap is not None else None,
              **extra[row], **calib[row],
          })
      seconds = time.perf_counter() - t0
      for e in entries[n][-len(items):]:
        e["seconds"] = seconds / len(items)
  wall = time.perf_counter() - t_start
  base_name = config.base_model_name or target_w.name
  for n, adapter in enumerate(loaded):
    new = planning.assemble(target_w.arch, per_adapter[n], adapter.config, base_model=base_name)
    new.path = None
    report = Report.build(
        adapter=adapter.name, source=source_w.name, target=target_w.name, config=dataclasses.asdict(config),
        entries=sorted(entries[n], key=lambda e: (e["target_layer"], _module_index(e["module"]))),
        skipped=plans[n].skipped + [{"source_key": s["key"], "reason": s["reason"]} for s in adapter.skipped],
        layer_map=plans[n].layer_map, seconds=wall,
        seconds_decompose=subs_s.seconds + subs_t.seconds,
        output_dtype=config.dtype or str(np.dtype(adapter.dtype)))
    results.append(TransferResult(new, report))
  return results


def transfer_adapter(source, target, adapter, config: TransferConfig = TransferConfig(), **kwargs) -> TransferResult:
  """One adapter: see :func:`transfer`."""
  return transfer(source, target, [adapter], config, **kwargs)[0]
