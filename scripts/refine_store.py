"""Where bench_refine's measurements live between sessions.

The working cache (``--cache_dir``, ignored by git) holds one JSON document per measured arm,
base, source gain and bound. A fresh clone has no cache, so ``results/refine.json`` keeps a copy of
every document (its ``cache`` section, per-block NLLs included) and :func:`restore` writes back
whatever the cache lacks before a run: paired comparisons with earlier arms keep working, and a
report rebuilt in a new session keeps every earlier row.

``results/refine.json`` files written before the copy existed (2026-12-01 and earlier) kept only
the table rows, without per-block NLLs. :func:`legacy_records` carries those rows as measured
(their Δ and paired s.e. against the base), so they stay in the tables, but no new paired
comparison can use them; a row measured again replaces its legacy copy. The report lines such a
file's Markdown had and its JSON did not (bounds, source gains, the goal and step tables, the
commands) travel in ``meta.legacy`` and are dropped once a new measurement covers them.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

KINDS = ("records", "bases", "sources", "bounds")
# The arm meta.legacy's goal rows are of: RefineConfig's default when they were written (2026-12-01).
LEGACY_GOAL_ARM = "topk30-anchor"


def read_committed(out: pathlib.Path) -> dict[str, Any]:
  """``out/refine.json`` as committed, or {} where there is none."""
  path = out / "refine.json"
  return json.loads(path.read_text()) if path.exists() else {}


def restore(cache_dir: pathlib.Path, committed: dict[str, Any]) -> int:
  """Write every document of ``committed['cache']`` the cache lacks; never overwrite one. Returns the count."""
  written = 0
  for kind, docs in committed.get("cache", {}).items():
    if kind not in KINDS:
      continue
    (cache_dir / kind).mkdir(parents=True, exist_ok=True)
    for name, doc in docs.items():
      path = cache_dir / kind / f"{pathlib.Path(name).name}.json"
      if not path.exists():
        path.write_text(json.dumps(doc, indent=1))
        written += 1
  return written


def cache_docs(cache_dir: pathlib.Path) -> dict[str, dict[str, Any]]:
  """Every cached document by kind and file stem: refine.json's ``cache`` section, which :func:`restore` reads back."""
  return {kind: {f.stem: json.loads(f.read_text()) for f in sorted((cache_dir / kind).glob("*.json"))} for kind in KINDS}


def config_key(pair: str, arm: str, config: dict[str, Any]) -> str:
  """What identifies a measurement across sessions: pair, arm and its settings (not where its cache lived)."""
  return json.dumps({"pair": pair, "arm": arm, "config": {k: v for k, v in config.items() if k != "cache_dir"}},
                    sort_keys=True, default=str)


def legacy_records(committed: dict[str, Any], records: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Committed rows with no cached document behind them, in the shape of a record, minus per-block NLLs."""
  seen = {config_key(r["pair"], r["arm"], r["report"]["config"]) for r in records}
  carried = []
  for row in committed.get("rows", []):
    if row.get("record") or config_key(row["pair"], row["arm"], row["config"]) in seen:
      continue
    carried.append({**{k: row[k] for k in ("pair", "arm", "refined", "refine_seconds", "eval_seconds", "peak_rss_gb")},
                    "report": {"config": row["config"], "tokens": row["tokens"], "best_step": row["best_step"],
                               "heldout": row["heldout"], "losses": row["losses"],
                               "shipped": "refined" if row["refined"] else "initial"},
                    "legacy": {"delta": row["delta"], "delta_se": row["delta_se"]}})
  return carried


def legacy_bases(committed: dict[str, Any], bases: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
  """Committed bases of pairs the cache has no base for (no per-block NLLs; trained_nll already the best bound)."""
  return {pair: {**base, "legacy": True, "domain": pair.split("/")[1] if "/" in pair else "pydoc"}
          for pair, base in committed.get("meta", {}).get("bases", {}).items()
          if pair not in bases}


def legacy_lines(committed: dict[str, Any], bases: dict[str, dict[str, Any]], records: list[dict[str, Any]],
                 sources: list[dict[str, Any]], label) -> dict[str, list[str]]:
  """meta.legacy's report lines that no new measurement covers (``label(record)`` names an arm as the tables do;
  a goal row, of :data:`LEGACY_GOAL_ARM`, goes once that arm and both its controls are measured again on its pair)."""
  legacy, arm = committed.get("meta", {}).get("legacy", {}), LEGACY_GOAL_ARM
  measured_pairs = {p for p, b in bases.items() if not b.get("legacy")}
  measured_arms = {(r["pair"], label(r)) for r in records if "nll_blocks" in r}
  measured_sources = {f"- {s['source']} ({s['domain']}):" for s in sources}
  cell = lambda line, i: line.split("|")[i].strip()  # noqa: E731
  by_pair = lambda kind: [x for x in legacy.get(kind, []) if x[2:].split(": ")[0] not in measured_pairs]  # noqa: E731
  return {"bases": by_pair("bases"), "bounds": by_pair("bounds"),
          "sources": [x for x in legacy.get("sources", []) if not any(x.startswith(s) for s in measured_sources)],
          "goal": [x for x in legacy.get("goal", []) if not {(cell(x, 1).split(" (")[0], a) for a in
                                                                 (arm, f"null-{arm}", f"random-{arm}")} <= measured_arms],
          "steps": [x for x in legacy.get("steps", []) if (cell(x, 1), cell(x, 2)) not in measured_arms],
          "commands": legacy.get("commands", [])}
