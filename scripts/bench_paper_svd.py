"""gram against randomized subspace iteration on paper-scale weight shapes: time, CPU time, tail, flops.

One synthetic weight per distinct oriented shape of the paper pair (Qwen2.5-1.5B -> Llama-3.2-3B:
q/o, k/v and gate/up/down of each model), with singular values set exactly (the bench's
spectrum profile measured on SmolLM2-135M and Qwen2.5-Coder-0.5B, scaled to 0.02 rms entries), so the Eckart–Young optimum
Σ_{i>r} σ_i² is known without an exact SVD. Each method decomposes each weight once
after an ahead-of-time compile (BLAS at one thread, as in the CLI); a layer pair's time is
the sum over the 7 modules of both models (shapes repeat: q/o 2, k/v 2, gate/up/down 3).

  python scripts/bench_paper_svd.py [--methods gram,randomized:64/6,krylov] [--rank 320]

Prints one line per (method, shape) and a table; writes results/paper_svd.json.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import numpy as np  # noqa: E402

import bench_speed  # noqa: E402  (PAPER shapes, spectra, spectral_matrix)

# (oriented shape, modules of one layer with that shape) per model
GROUPS = (("q/o", ("q_proj", "o_proj")), ("k/v", ("k_proj", "v_proj")), ("gate/up/down", ("gate_proj", "up_proj", "down_proj")))


def paper_weights(profiles: dict[str, list[float]], seed: int = 0):
  """(model, group, multiplicity, (m, n) oriented big x small, W float32, exact σ) per distinct shape."""
  from crosslora_jax.formats.architectures import Architecture
  rng = np.random.default_rng(seed)
  for model in ("source", "target"):
    arch = Architecture.from_config(bench_speed.PAPER[model])
    for group, modules in GROUPS:
      m, n = arch.shape(modules[0])
      m, n = max(m, n), min(m, n)
      s = np.interp(np.arange(n) / max(n - 1, 1), bench_speed.GRID, profiles[modules[0]]).astype(np.float32)
      s *= 0.02 * np.sqrt(m * n) / np.linalg.norm(s)
      yield model, group, len(modules), (m, n), bench_speed.spectral_matrix(rng, m, n, s), s


def tail_ratio(w: np.ndarray, s: np.ndarray, u: np.ndarray) -> float | None:
  """‖W − U Uᵀ W‖²_F / Σ_{i>r} σ_i² (1 = the best rank-r basis); None at full rank (no tail)."""
  w64 = np.asarray(w, np.float64)
  r = u.shape[1]
  if r >= len(s):
    return None
  optimum = float(np.sum(np.asarray(s[r:], np.float64) ** 2))
  tail = float(np.sum(w64 ** 2)) - float(np.sum((np.asarray(u, np.float64).T @ w64) ** 2))
  return tail / max(optimum, 1e-300)


def run(args: argparse.Namespace) -> dict:
  import jax
  from crosslora_jax.core import kernels, svd_solvers
  from crosslora_jax.core.sharding import blas_threads
  profiles = bench_speed.fallback_profile()
  models = {k: v for k, v in bench_speed.real_models().items() if k in ("smollm2", "qwen05")}  # the small pair's
  if models:
    profiles = bench_speed.measure_spectra(models, layers_per_model=1)["mean"]
  methods = []
  for spec in args.methods.split(","):
    name, _, pq = spec.partition(":")
    p, q = (int(x) for x in pq.split("/")) if pq else (0, 0)
    methods.append((spec, name, p, q))
  rows = []
  svd = jax.jit(kernels.truncated_svd, static_argnames=("rank", "method", "n_oversamples", "n_power_iter"))
  key = jax.random.key(0)
  with blas_threads(1):
    for model, group, mult, shape, w, s in paper_weights(profiles):
      r = min(args.rank, *shape)
      for spec, name, p, q in methods:
        kw = dict(rank=r, method=name, n_oversamples=p, n_power_iter=q)
        compiled = svd.lower(w, key, **kw).compile()
        t0, c0 = time.perf_counter(), time.process_time()
        sub = jax.block_until_ready(compiled(w, key))
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        row = {"model": model, "group": group, "modules": mult, "shape": list(shape), "rank": r, "method": spec,
               "seconds": wall, "cpu_seconds": cpu, "tail_ratio": tail_ratio(w, s, np.asarray(sub.u)),
               "gflop": svd_solvers.flops(name, shape, r, n_oversamples=p, n_power_iter=q) / 1e9}
        rows.append(row)
        tail = "full rank" if row["tail_ratio"] is None else f"{row['tail_ratio']:.5f}"
        print(f"{model} {group} {shape} {spec}: {wall:.1f} s wall, {cpu:.1f} s CPU, tail {tail}, "
              f"{row['gflop']:.0f} GFLOP", file=sys.stderr, flush=True)
  summary = {}
  for spec, *_ in methods:
    mine = [x for x in rows if x["method"] == spec]
    summary[spec] = {"layer_pair_seconds": sum(x["seconds"] * x["modules"] for x in mine),
                     "layer_pair_cpu_seconds": sum(x["cpu_seconds"] * x["modules"] for x in mine),
                     "layer_pair_tflop": sum(x["gflop"] * x["modules"] for x in mine) / 1e3,
                     "tail_ratio_max": max((x["tail_ratio"] for x in mine if x["tail_ratio"] is not None),
                                           default=None)}
  auto = auto_summary(rows)
  if auto:
    summary["auto (per shape, from the rows above)"] = auto
  return {"rank": args.rank, "rows": rows, "summary": summary}


def auto_summary(rows: list[dict]) -> dict | None:
  """``--svd auto``'s layer pair: per shape, the gram, randomized (at its defaults) or krylov row
  that ``svd_solvers.auto_method`` picks; None unless every row it picks was measured."""
  from crosslora_jax.core import svd_solvers
  spec = {"gram": "gram", "krylov": "krylov",
          "randomized": f"randomized:{svd_solvers.RANDOMIZED_OVERSAMPLES}/{svd_solvers.RANDOMIZED_POWER_ITER}"}
  by = {(x["model"], x["group"], x["method"]): x for x in rows}
  picked = []
  for x in rows:
    if x["method"] != "gram":
      continue
    pick = by.get((x["model"], x["group"], spec[svd_solvers.auto_method(tuple(x["shape"]), x["rank"])]))
    if pick is None:
      return None
    picked.append(pick)
  if not picked:
    return None
  return {"layer_pair_seconds": sum(x["seconds"] * x["modules"] for x in picked),
          "layer_pair_cpu_seconds": sum(x["cpu_seconds"] * x["modules"] for x in picked),
          "layer_pair_tflop": sum(x["gflop"] * x["modules"] for x in picked) / 1e3,
          "tail_ratio_max": max((x["tail_ratio"] for x in picked if x["tail_ratio"] is not None), default=None),
          "choices": {f"{x['model']} {x['group']}": x["method"] for x in picked}}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--methods", default="gram,randomized:64/6,krylov")
  parser.add_argument("--rank", type=int, default=bench_speed.RANK)
  parser.add_argument("--out", default=str(REPO / "results" / "paper_svd.json"))
  args = parser.parse_args()
  res = run(args)
  pathlib.Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
  print("| method | layer pair wall | layer pair CPU | TFLOP | worst tail / optimum |\n|---|---:|---:|---:|---:|")
  for spec, x in res["summary"].items():
    print(f"| {spec} | {x['layer_pair_seconds']:.1f} s | {x['layer_pair_cpu_seconds']:.1f} s | "
          f"{x['layer_pair_tflop']:.2f} | {x['tail_ratio_max']} |")


if __name__ == "__main__":
  main()
