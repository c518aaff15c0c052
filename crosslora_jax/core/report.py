"""The transfer report: per target weight what was done and kept, and a human summary."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any


def _mean(values: list[float | None]) -> float | None:
  vals = [v for v in values if v is not None]
  return sum(vals) / len(vals) if vals else None


@dataclasses.dataclass
class Report:
  """What one adapter's transfer did; ``to_json`` is the ``--report`` file."""

  adapter: str
  source: str
  target: str
  config: dict[str, Any]
  entries: list[dict[str, Any]]  # one per target weight
  skipped: list[dict[str, Any]]  # source modules not transferred, with reasons
  layer_map: list[int | None]
  seconds: float
  seconds_decompose: float
  output_dtype: str
  summary: dict[str, Any] = dataclasses.field(default_factory=dict)
  refine: dict[str, Any] | None = None  # the refine stage's report (``--refine distill``), else None
  timing: dict[str, float] | None = None  # seconds by phase: read, decompose, project, other (engine only)

  @classmethod
  def build(cls, **kwargs) -> "Report":
    report = cls(**kwargs)
    e = report.entries
    report.summary = {
        "modules_transferred": len(e),
        "modules_skipped": len(report.skipped),
        "mean_energy_source": _mean([x["energy_source"] for x in e]),
        "mean_energy_target": _mean([x["energy_target"] for x in e]),
        "mean_norm_ratio": _mean([x["norm_ratio"] for x in e]),
        "mean_overlap": _mean([x["overlap"] for x in e]),
        "rank_used": sorted({x["rank_used"] for x in e if x["rank_used"] is not None}),
        # --method anchored: the guard's decisions; any method: norm calibration
        "guard": {g: sum(x.get("guard") == g for x in e) for g in ("kept", "attenuated", "skipped")
                  if any(x.get("guard") == g for x in e)},
        "mean_predicted_transferability": _mean([x.get("predicted_transferability") for x in e]),
        "norm_calibrated": bool(report.config.get("calibrate_norm")),
        "mean_relative_update_source": _mean([x.get("relative_update_source") for x in e]),
        "mean_relative_update_target": _mean([x.get("relative_update_target") for x in e]),
        "svd_by_shape": svd_by_shape(e),
    }
    return report

  def to_dict(self) -> dict[str, Any]:
    """The report as JSON-ready data; ``refine`` only when a refine ran (plain reports stay as they were)."""
    data = dataclasses.asdict(self)
    for optional in ("refine", "timing"):
      if data[optional] is None:
        del data[optional]
    return data

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, default=_jsonable)

  def text(self) -> str:
    """A few lines a person reads on stdout."""
    s = self.summary
    fmt = lambda v: "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"
    by_module: dict[str, int] = {}
    for x in self.entries:
      by_module[x["module"]] = by_module.get(x["module"], 0) + 1
    lines = [
        f"{self.adapter}: {self.config['method']} {self.source} -> {self.target}",
        f"  transferred {s['modules_transferred']} weights ("
        + ", ".join(f"{m} x{n}" for m, n in by_module.items()) + f"), skipped {s['modules_skipped']}",
        f"  rank used {s['rank_used'] or 'n/a'}; energy captured source {fmt(s['mean_energy_source'])}, "
        f"target {fmt(s['mean_energy_target'])}; |dW_t|/|dW_s| {fmt(s['mean_norm_ratio'])}; "
        f"overlap {fmt(s['mean_overlap'])}",
        f"  {self.seconds:.1f} s ({self.seconds_decompose:.1f} s decomposing base weights), output {self.output_dtype}",
    ]
    lines.append(f"  |dW|/|W| source {fmt(s['mean_relative_update_source'])}, target "
                 f"{fmt(s['mean_relative_update_target'])} (norm calibration {'on' if s['norm_calibrated'] else 'off'})")
    if s["svd_by_shape"]:
      lines.append(f"  svd {self.config.get('svd')}: " + "; ".join(
          f"{'/'.join(g['modules'])} {_dims(g['source_shape'])} {g['svd_source'] or '-'} -> "
          f"{_dims(g['target_shape'])} {g['svd_target'] or '-'}" for g in s["svd_by_shape"]))
    if s["guard"]:
      lines.append(f"  anchored guard: " + ", ".join(f"{g} {n}" for g, n in s["guard"].items())
                   + f"; mean predicted transferability {fmt(s['mean_predicted_transferability'])}"
                   + f" (threshold {report_threshold(self.config)})")
    reasons: dict[str, int] = {}
    for x in self.skipped:
      reasons[x["reason"]] = reasons.get(x["reason"], 0) + 1
    for reason, n in reasons.items():
      lines.append(f"  skipped {n}: {reason}")
    if self.refine is not None:
      lines += refine_lines(self.refine)
    return "\n".join(lines)


def svd_by_shape(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """The SVD method each model's weights went through, per group of modules sharing oriented shapes and rank.

  Shapes are (big, small): a weight and its transpose (gate_proj and down_proj) share one
  decomposition program and one ``--svd auto`` choice. Empty when no entry used a subspace.
  """
  groups: dict[tuple, dict[str, Any]] = {}
  for x in entries:
    if x.get("svd_source") is None and x.get("svd_target") is None:
      continue
    shapes = [sorted(x[side], reverse=True) for side in ("source_shape", "target_shape")]
    key = (*map(tuple, shapes), x["rank_used"], x["svd_source"], x["svd_target"])
    group = groups.setdefault(key, {"modules": [], "source_shape": shapes[0], "target_shape": shapes[1],
                                    "rank": x["rank_used"], "svd_source": x["svd_source"],
                                    "svd_target": x["svd_target"]})
    if x["module"] not in group["modules"]:
      group["modules"].append(x["module"])
  return list(groups.values())


def _dims(shape: list[int]) -> str:
  return "x".join(map(str, shape))


def refine_lines(refine: dict[str, Any]) -> list[str]:
  """The refine section of the summary: corpus, tokens kept, loss, held-back check, what shipped, time."""
  corpus, tokens, config = refine["corpus"], refine["tokens"], refine["config"]
  losses, check = refine["losses"], config["check"]
  best = next((e for e in refine["heldout"] if e["step"] == refine["best_step"]), None)
  start = refine["heldout"][0] if refine["heldout"] else None
  selected = (f"{config['selection']} {config['fraction']:g}" if config["selection"] == "topk" else config["selection"])
  if config.get("loss", "nll") != "nll":
    selected = f"all, loss {config['loss']}"
  loss = f"{losses[0]:.3f} -> {losses[-1]:.3f}" if losses else "n/a"
  at_best = (f"{check} {best[check]:.4f} at step {refine['best_step']} (start {start[check]:.4f})"
             if best is not None and start is not None else "n/a")
  seconds = ", ".join(f"{phase.replace('_', ' ')} {s:.1f}" for phase, s in refine["seconds"].items())
  return [
      f"  refine distill (init {refine['init']}, r {refine['rank']}): {corpus.get('writer', 'source')}-written corpus "
      f"{corpus['samples']} samples, "
      f"{corpus['teacher_tokens']} tokens (cache {corpus['cache']})",
      f"  tokens kept {tokens['selected_tokens']} of {tokens['learnable_tokens']} ({selected}); "
      f"{tokens['train_samples']} samples trained on, {tokens['heldout_samples']} held back"
      + (f", {tokens['unused_samples']} left out (the pool's lowest scores)" if tokens.get("unused_samples") else ""),
      f"  training loss {loss} over {len(losses)} steps; held-back {at_best}",
      f"  shipped {refine['shipped']}: {refine['guard']}",
      f"  refine seconds: {seconds}",
  ]


def report_threshold(config: dict[str, Any]) -> str:
  anchor = config.get("anchor") or {}
  return f"{anchor['threshold']:g}" if isinstance(anchor, dict) and "threshold" in anchor else "n/a"


def _jsonable(x: Any) -> Any:
  if hasattr(x, "tolist"):
    return x.tolist()
  return str(x)
