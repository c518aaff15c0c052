"""scripts/bench_refine: the held-back checks are scored by the rule the trainer ships with."""

import importlib.util
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
_spec = importlib.util.spec_from_file_location("bench_refine", ROOT / "scripts" / "bench_refine.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def _record(arm, checks, nll):
  heldout = [{"step": step, "agreement": a, "delta_error": d, "nll_selected": n} for step, (a, d, n) in checks.items()]
  return {"arm": arm, "nll_by_step": {str(step): [v, v] for step, v in nll.items()}, "report": {"heldout": heldout}}


def test_check_picks_skip_undefined_values_and_keep_the_earlier_step_on_ties():
  nan = float("nan")
  record = _record("topk50", {0: (0.0, 1.0, 3.0), 8: (nan, nan, 2.0), 16: (0.5, 1.0, 2.0)}, {0: 3.0, 8: 2.5, 16: 2.8})
  picks = bench.check_picks([record, _record("null-topk50", {0: (0.0, 1.0, 3.0), 8: (0.2, 0.5, 2.9)}, {0: 3.0, 8: 3.1})])
  # agreement: step 8 is undefined, so step 16 (0.5 > 0.0) is picked: 2.8 - 2.5
  # delta_error: step 8 undefined, 16 ties step 0, the earlier step stands: 3.0 - 2.5
  # nll_selected: 8 and 16 tie, the earlier step, 8: no regret
  assert picks["agreement"]["arms"] == [2.8 - 2.5]
  assert picks["delta_error"]["arms"] == [3.0 - 2.5]
  assert picks["nll_selected"]["arms"] == [0.0]
  # the control's checks all pick step 8, which is worse than step 0 on held-out NLL
  assert all(abs(groups["controls"][0] - 0.1) < 1e-9 for groups in picks.values())


def _run(pair, seed, nll, **config):
  return {"arm": "topk50-anchor", "pair": pair, "nll_blocks": nll,
          "report": {"config": {"seed": seed, **config}, "best_step": 16}}


def test_lever_table_pairs_each_lever_with_the_default_at_its_seed_and_reports_the_seed_spread():
  bases = {"a:b": {"base_nll": 3.0, "trained_nll": 2.0, "nll_blocks": [3.0, 3.0, 3.0]}}
  records = [_run("a:b", 0, [2.5, 2.6, 2.7]), _run("a:b", 1, [2.6, 2.6, 2.8]),
             _run("a:b", 1, [2.4, 2.5, 2.6], tokens=12288, batch=8), _run("a:b", 0, [2.7, 2.8, 2.9], lr=0.002)]
  lines = bench.lever_table(records, bases, "topk50-anchor").splitlines()
  rows = {line.split(" | ")[1]: line for line in lines if line.startswith("| a:b")}
  assert set(rows) == {"seed 1 (against seed 0)", "tokens 12288, batch 8", "lr 0.002"}
  assert "+0.067" in rows["seed 1 (against seed 0)"]  # seed 1 default − seed 0 default
  assert "-0.167" in rows["tokens 12288, batch 8"]  # against the seed-1 default, not seed 0's
  assert "+0.200" in rows["lr 0.002"]
  assert "|Δ| 0.067 to 0.067 nats over 1 pair (" in lines[-1]
