"""scripts/refine_store: bench_refine's measurements survive a fresh clone's empty cache."""

import importlib.util
import json
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("refine_store", ROOT / "scripts" / "refine_store.py")
store = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(store)

CONFIG = {"seed": 0, "tokens": 6144, "cache_dir": "/somewhere"}


def _record(arm, delta):
  return {"pair": "a:b", "arm": arm, "nll_blocks": [1.0 + delta, 2.0 + delta], "refined": True,
          "report": {"config": dict(CONFIG), "tokens": {}, "best_step": 8, "heldout": [], "losses": [], "shipped": "refined"}}


def test_restore_writes_missing_documents_and_never_overwrites(tmp_path):
  cache = tmp_path / "cache"
  (cache / "records").mkdir(parents=True)
  (cache / "records" / "kept.json").write_text(json.dumps({"mine": 1}))
  committed = {"cache": {"records": {"kept": {"theirs": 1}, "new": _record("x", 0.0)},
                         "bases": {"a-b-2": {"pair": "a:b", "nll_blocks": [1.0, 2.0]}}, "unknown": {"z": {}}}}
  assert store.restore(cache, committed) == 2
  assert json.loads((cache / "records" / "kept.json").read_text()) == {"mine": 1}
  docs = store.cache_docs(cache)
  assert docs["records"]["new"]["arm"] == "x" and docs["bases"]["a-b-2"]["pair"] == "a:b"
  assert not (cache / "unknown").exists()
  assert store.restore(cache, committed) == 0


def test_legacy_rows_are_carried_until_measured_again():
  rows = [{"pair": "a:b", "arm": arm, "config": {**CONFIG, "cache_dir": "/elsewhere"}, "refined": True, "refine_seconds": 1.0,
           "eval_seconds": 1.0, "peak_rss_gb": 1.0, "tokens": {}, "best_step": 16, "heldout": [], "losses": [],
           "delta": -0.1, "delta_se": 0.01} for arm in ("x", "y")]
  rows.append({**rows[0], "arm": "z", "record": "a-b-z-123"})  # has a cached document: restored, not carried
  carried = store.legacy_records({"rows": rows}, [_record("x", 0.0)])
  assert [r["arm"] for r in carried] == ["y"]
  assert carried[0]["legacy"] == {"delta": -0.1, "delta_se": 0.01} and "nll_blocks" not in carried[0]


def test_legacy_goal_rows_go_once_the_arm_and_both_controls_are_back():
  committed = {"meta": {"legacy": {"goal": ["| a:b (2026-12-01) | 30% | x | y | yes | no |"],
                                   "bounds": ["- a:b: a second bound, trained 1.0", "- c:d: a second bound, trained 1.0"]}}}
  bases = {"a:b": {"pair": "a:b"}, "c:d": {"legacy": True}}
  label = lambda r: r["arm"]  # noqa: E731
  g = store.LEGACY_GOAL_ARM
  some = [_record(g, 0.0), _record(f"null-{g}", 0.0)]
  kept = store.legacy_lines(committed, bases, some, [], label)
  assert kept["goal"] and kept["bounds"] == ["- c:d: a second bound, trained 1.0"]
  assert not store.legacy_lines(committed, bases, some + [_record(f"random-{g}", 0.0)], [], label)["goal"]
