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
