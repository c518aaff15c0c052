"""Refine every adapter a transfer run moved: each base model loaded once, the refined adapter put in its result.

What ships is what :func:`refine_adapter` returns, except that an unrefined projection
(the guard held the refine back) ships exactly as projected, and the output keeps the
projection's ``base_model_name_or_path`` (``--base_model_name_or_path`` applies).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from crosslora_jax import hub
from crosslora_jax.formats import peft_format
from crosslora_jax.progress import Progress
from crosslora_jax.refine.config import RefineConfig


def refine_results(source: str, target: str, adapters: Sequence[str], results: Sequence[Any], config: RefineConfig,
                   *, from_projection: bool, skip_unsupported: bool, progress: Progress) -> list[Any]:
  """``results`` (TransferResults, one per adapter) with the refined adapter and a ``refine`` report each.

  ``from_projection``: the student starts from each result's adapter, else from B = 0.
  The target base is loaded once; with several adapters the source base too (each
  adapter's teacher is that base with the adapter's LoRA).
  """
  from crosslora_jax.refine import pipeline, runtime
  source_folder = hub.resolve_folder(source, kind="model")
  target_folder = hub.resolve_folder(target, kind="model")
  target_lm = runtime.load_lm(target_folder, None, config.dtype)
  source_base = runtime.load_lm(source_folder, None, config.dtype) if len(adapters) > 1 else None
  refined = []
  for adapter, result in zip(adapters, results):
    source_adapter = peft_format.read_adapter(adapter, skip_unsupported=skip_unsupported)
    teacher = source_base.with_adapter(source_adapter) if source_base is not None else None
    outcome = pipeline.refine_adapter(source_folder, source_adapter, target_folder,
                                      result.adapter if from_projection else None, config, progress=progress,
                                      source_lm=teacher, target_lm=target_lm)
    refined.append(_with_refine(result, outcome, from_projection))
  return refined


def _with_refine(result: Any, outcome: Any, from_projection: bool) -> Any:
  report = dataclasses.replace(result.report, refine=outcome.report)
  if from_projection and not outcome.refined:
    return dataclasses.replace(result, report=report)
  config = {**outcome.adapter.config, "base_model_name_or_path": result.adapter.config["base_model_name_or_path"]}
  return dataclasses.replace(result, adapter=peft_format.PeftAdapter(config, outcome.adapter.modules), report=report)


def plot_panels(reports: Sequence[Any]) -> list[Any]:
  """Two extra ``--plot`` panels: training loss per step, and the held-back check at each checked step.

  ``reports``: Report objects or their dicts (a saved ``--report``) holding a refine section.
  """
  from crosslora_jax.plot import Panel
  reports = [r.to_dict() if hasattr(r, "to_dict") else r for r in reports]
  several = len(reports) > 1
  losses, checks = {}, {}
  check = "check"
  for report in reports:
    refine = report["refine"]
    name = f"{report['adapter']}: " if several else ""
    losses[f"{name}train loss"] = (list(range(1, len(refine["losses"]) + 1)), refine["losses"])
    check = refine["config"]["check"]
    checks[f"{name}held-back {check}"] = ([e["step"] for e in refine["heldout"]],
                                          [e[check] for e in refine["heldout"]])
  return [Panel("refine: training loss", "step", "loss", losses),
          Panel("refine: held-back check (picks the step that ships)", "step", check, checks)]
