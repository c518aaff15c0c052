"""Exploration (not a package method): randomized block Krylov against randomized subspace iteration
and gram on the paper-scale weight shapes, tail energy over the Eckart–Young optimum, time and flops.

Block Krylov (Musco & Musco 2015) keeps every block of the iteration: z = orth[Ω, (xᵀx)Ω, …,
(xᵀx)^q Ω] with Ω (small, b) Gaussian and b = ceil(K / (q + 1)), each new block orthogonalised
against the basis so far (two Gram–Schmidt passes, then Householder QR), then the SVD of x
restricted to span(z) as ``svd_solvers.randomized_svd`` ends (CholeskyQR of x z, SVD of R). Its
products with x cost 4·m·n·b·q + 2·m·n·K against randomized's (2q + 1)·2·m·n·(r + p), but the
final QR and SVD grow with K.

  python scripts/explore_krylov.py [--configs 704/7,448/5] [--rank 320]

A config P/Q is K = rank + P basis columns from Q Krylov steps. Same weights as
scripts/bench_paper_svd.py (singular values set exactly to the profile measured on the small
real pair, or with ``--profile fallback`` bench_speed's synthetic one), BLAS at
one thread as in the CLI. Prints one line per (shape, method) and writes results/krylov.json.
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

import bench_paper_svd  # noqa: E402
import bench_speed  # noqa: E402


def krylov_svd(w, key, rank: int, k_total: int, n_iter: int):
  """The package's ``svd_solvers.krylov_svd`` at K = ``k_total`` columns from ``n_iter`` steps.

  results/krylov.json and results/krylov_measured.json were written by this script's earlier
  prototype of it, which ended with the SVD of the (K, K) R instead of the eigh that keeps
  rank + 32 directions. The shipped 576/5 with the eigh step was measured again in
  results/paper_svd.json (same or smaller tails there); the other configs were not."""
  from crosslora_jax.core import svd_solvers
  return svd_solvers.krylov_svd(w, rank, key, n_oversamples=k_total - rank, n_steps=n_iter)


def krylov_flops(shape: tuple[int, int], rank: int, k_total: int, n_iter: int) -> float:
  """Leading terms: the products with x, the re-orthogonalisation, and the final CholeskyQR and SVD."""
  m, n = max(shape), min(shape)
  k = min(k_total, n)
  b = -(-k // (n_iter + 1))
  products = 4.0 * m * n * b * n_iter + 2.0 * m * n * k
  reorth = sum(2 * 4.0 * n * b * (j + 1) * b for j in range(n_iter))
  return products + reorth + 3 * 4.0 * m * k * k + 20.0 * k ** 3


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--configs", default="704/7,448/5,192/5,64/5")
  p.add_argument("--rank", type=int, default=320)
  p.add_argument("--profile", choices=("measured", "fallback"), default="measured",
                 help="singular value profile: measured on SmolLM2-135M and Qwen2.5-Coder-0.5B (as bench_paper_svd, "
                      "when they are cached) or bench_speed's synthetic fallback")
  p.add_argument("--out", default=str(REPO / "results" / "krylov.json"))
  args = p.parse_args()
  import jax
  from crosslora_jax.core import kernels, svd_solvers
  from crosslora_jax.core.sharding import blas_threads
  configs = [tuple(int(v) for v in c.split("/")) for c in args.configs.split(",")]
  fast = jax.jit(kernels.truncated_svd, static_argnames=("rank", "method", "n_oversamples", "n_power_iter"))
  kry = jax.jit(krylov_svd, static_argnames=("rank", "k_total", "n_iter"))
  key, rows = jax.random.key(0), []
  profiles, profile = bench_speed.fallback_profile(), "fallback"
  models = {k: v for k, v in bench_speed.real_models().items() if k in ("smollm2", "qwen05")}
  if args.profile == "measured" and models:
    profiles, profile = bench_speed.measure_spectra(models, layers_per_model=1)["mean"], "measured on " + ", ".join(models)
  print(f"spectrum profile: {profile}", flush=True)
  with blas_threads(1):
    for model, group, mult, shape, w, s in bench_paper_svd.paper_weights(profiles):
      r = min(args.rank, *shape)
      if r >= shape[1]:
        continue  # full rank: every method is exact there
      runs = [("gram", fast.lower(w, key, rank=r, method="gram", n_oversamples=0, n_power_iter=0),
               svd_solvers.flops("gram", shape, r)),
              ("randomized 64/6", fast.lower(w, key, rank=r, method="randomized", n_oversamples=64, n_power_iter=6),
               svd_solvers.flops("randomized", shape, r, n_oversamples=64, n_power_iter=6))]
      runs += [(f"krylov {pk}/{q}", kry.lower(w, key, rank=r, k_total=r + pk, n_iter=q),
                krylov_flops(shape, r, r + pk, q)) for pk, q in configs]
      for name, lowered, flops in runs:
        compiled = lowered.compile()
        t0 = time.perf_counter()
        out = jax.block_until_ready(compiled(w, key))
        seconds = time.perf_counter() - t0
        u = np.asarray(out.u if hasattr(out, "u") else out[0])
        row = {"model": model, "group": group, "modules": mult, "shape": list(shape), "method": name,
               "seconds": seconds, "gflop": flops / 1e9, "tail_ratio": bench_paper_svd.tail_ratio(w, s, u)}
        rows.append(row)
        print(f"{model} {group} {tuple(shape)} {name}: {seconds:.2f} s, {row['gflop']:.0f} GFLOP, "
              f"tail {row['tail_ratio']:.5f}", flush=True)
  summary = {}
  for name in dict.fromkeys(x["method"] for x in rows):
    mine = [x for x in rows if x["method"] == name]
    summary[name] = {"layer_pair_seconds": sum(x["seconds"] * x["modules"] for x in mine),
                     "layer_pair_tflop": sum(x["gflop"] * x["modules"] for x in mine) / 1e3,
                     "tail_ratio_max": max(x["tail_ratio"] for x in mine)}
  print("\n| method | layer pair (s, full-rank k/v left out) | TFLOP | worst tail / optimum |\n|---|---:|---:|---:|")
  for name, v in summary.items():
    print(f"| {name} | {v['layer_pair_seconds']:.1f} | {v['layer_pair_tflop']:.2f} | {v['tail_ratio_max']:.4f} |")
  pathlib.Path(args.out).write_text(json.dumps({"rank": args.rank, "profile": profile, "machine": bench_speed.machine(),
                                                "rows": rows, "summary": summary}, indent=1))


if __name__ == "__main__":
  main()
