r"""Speed benchmark: a paper-scale transfer on CPU against a PyTorch reference.

  python scripts/bench_speed.py                  # everything, writes results/speed.{md,json}
  python scripts/bench_speed.py --study accuracy # SVD methods vs exact on the real models (BUILD_NOTES)
  python scripts/bench_speed.py --study spectra  # singular value decay of the real models

Paper scale is Qwen2.5-1.5B -> Llama-3.2-3B shapes: 28 layers each, hidden 1536 -> 3072,
k/v 256 -> 1024, FFN 8960 -> 8192, all seven modules, a rank-16 LoRA (alpha 32), r = 320.
The weights are synthetic, written as sharded bf16 safetensors under --workdir (kept and
reused across runs; 8.3 GB), with singular values that decay like the real models'
(measured here on whatever real models crosslora_bench.zoo has fetched; a built-in profile
otherwise) and random singular vectors (sign flips, orthonormal DCTs and permutations:
exact spectra without an O(n^3) QR per matrix).

Every timed run is a child process (the CLI, or the reference below), so wall time
includes start-up, reading the weights and writing the adapter, and peak RSS is that
child's own (os.wait4). In one run, on the same inputs:

* reference: plain PyTorch written here that follows the paper authors' procedure as they
  ran it: for every LoRA factor (A and B) of every module, fp32 torch.linalg.svd of both
  base weights (no cache), the lstsq alignment, then the projection. Run on
  --ref_layers layers and extrapolated to 28 (said so in the table).
* crosslora_jax with the default --svd on all 28 layers, cold cache; the other methods on
  --subset_layers layers, extrapolated to 28 with their warm per-layer kernel time
  (measured in a child that decomposes one layer of every module of both models);
* a warm-cache batch of 8 adapters (--adapter_dir) and a warm single adapter: the
  marginal cost of an extra adapter is (batch - single) / 7;
* accuracy against --svd exact on the subset layers: the largest principal angle between
  the rank-r subspaces (from the runs' cache entries) and the relative Frobenius
  difference of the transferred ΔW_t;
* the real small models when fetched: SmolLM2-135M -> Qwen2.5-Coder-0.5B with each method.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import time
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))  # bench_quality's transfer and NLL helpers (--study nll)

import numpy as np  # noqa: E402

from crosslora_jax.formats.architectures import CANONICAL_MODULES  # noqa: E402

MODULES = CANONICAL_MODULES
SOLVERS = ("exact", "gram", "randomized", "krylov")  # the --svd methods measured beside the default (exact first)
PAPER = {
    "source": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], num_hidden_layers=28, hidden_size=1536,
                   num_attention_heads=12, num_key_value_heads=2, head_dim=128, intermediate_size=8960,
                   vocab_size=151936, tie_word_embeddings=True, torch_dtype="bfloat16",
                   _name_or_path="synthetic/Qwen2.5-1.5B-shapes"),
    "target": dict(model_type="llama", architectures=["LlamaForCausalLM"], num_hidden_layers=28, hidden_size=3072,
                   num_attention_heads=24, num_key_value_heads=8, head_dim=128, intermediate_size=8192,
                   vocab_size=128256, tie_word_embeddings=True, torch_dtype="bfloat16",
                   _name_or_path="synthetic/Llama-3.2-3B-shapes"),
}
REAL = {"smollm2": "smollm2-135m", "qwen05": "qwen2.5-coder-0.5b", "gemma": "gemma3-270m",
        "qwen15": "qwen2.5-coder-1.5b"}
GRID = np.linspace(0.0, 1.0, 65)  # spectra are stored as s_i / s_0 at these fractions i / min(m, n)
GENERATOR_VERSION = 1
RANK = 320
# The speed issue's targets (benchmarks, not timed tests; ratios from one run).
TARGETS = {"default_minutes": 5.0, "speedup": 20.0, "real_speedup": 10.0, "real_warm_s": 5.0, "extra_adapter_s": 2.0,
           "peak_gb": 4.0, "tail_ratio": 1.01, "programs": 8}
COMPILE_LINE = "Finished XLA compilation of"  # what JAX_LOG_COMPILES=1 logs once per program built


# --- spectra ----------------------------------------------------------------------


def real_models() -> dict[str, pathlib.Path]:
  from crosslora_bench import zoo
  found = {}
  for short, name in REAL.items():
    path = zoo.model_path(name)
    if path is not None:
      found[short] = path
  return found


def measure_spectra(models: dict[str, pathlib.Path], layers_per_model: int = 3) -> dict[str, Any]:
  """s_i / s_0 on GRID per module, averaged over a few layers of each real model."""
  from crosslora_jax import Checkpoint
  per_model: dict[str, dict[str, list[float]]] = {}
  for short, path in models.items():
    ck = Checkpoint(path)
    n = ck.arch.num_layers
    layers = sorted({0, n // 2, n - 1})[:layers_per_model]
    per_model[short] = {}
    for module in MODULES:
      profiles = []
      for layer in layers:
        s = np.linalg.svd(np.asarray(ck.weight(layer, module), np.float32), compute_uv=False)
        profiles.append(np.interp(GRID, np.arange(len(s)) / max(len(s) - 1, 1), s / s[0]))
      per_model[short][module] = np.mean(profiles, axis=0).tolist()
  mean = {m: np.mean([per_model[k][m] for k in per_model], axis=0).tolist() for m in MODULES} if per_model else {}
  return {"grid": GRID.tolist(), "per_model": per_model, "mean": mean}


def cached_spectra(work: pathlib.Path, models: dict[str, pathlib.Path]) -> dict[str, Any]:
  """measure_spectra, kept in ``work`` for the same set of model folders."""
  file = work / "spectra.json"
  key = sorted(str(p) for p in models.values())
  if file.exists():
    saved = json.loads(file.read_text())
    if saved.get("models") == key:
      return saved["spectra"]
  spectra = measure_spectra(models)
  file.write_text(json.dumps({"models": key, "spectra": spectra}))
  return spectra


def fallback_profile() -> dict[str, list[float]]:
  """Used only when no real model is present: a power-law head over a flat bulk."""
  f = GRID
  prof = np.maximum(1.0 / (1.0 + 40 * f) ** 0.45, 0.05) * (1 - 0.9 * f ** 4)
  return {m: prof.tolist() for m in MODULES}


# --- synthetic checkpoint ---------------------------------------------------------


def spectral_matrix(rng: np.random.Generator, m: int, n: int, s: np.ndarray) -> np.ndarray:
  """An (m, n) float32 matrix with singular values exactly ``s`` and scrambled singular vectors.

  Σ is put on the diagonal, then each side gets two rounds of (random signs, orthonormal
  DCT-II, random permutation): products of orthogonal maps, so the spectrum is kept
  while the vectors spread over all coordinates, in O(mn log) time.
  """
  import scipy.fft
  x = np.zeros((m, n), np.float32)
  k = len(s)
  x[np.arange(k), np.arange(k)] = s
  for axis, size in ((0, m), (1, n)):
    for _ in range(2):
      signs = rng.choice(np.array([-1.0, 1.0], np.float32), size)
      x *= signs[:, None] if axis == 0 else signs[None, :]
      x = scipy.fft.dct(x, type=2, norm="ortho", axis=axis, workers=2).astype(np.float32, copy=False)
      x = np.take(x, rng.permutation(size), axis=axis)
  return x


def _variant(rng: np.random.Generator, base: np.ndarray) -> np.ndarray:
  """Same spectrum, other singular vectors: permute and flip rows and columns."""
  rows, cols = rng.permutation(base.shape[0]), rng.permutation(base.shape[1])
  out = base[rows][:, cols]
  out *= rng.choice(np.array([-1.0, 1.0], np.float32), base.shape[0])[:, None]
  out *= rng.choice(np.array([-1.0, 1.0], np.float32), base.shape[1])[None, :]
  return out


def write_synthetic_model(folder: pathlib.Path, config: dict[str, Any], profiles: dict[str, list[float]], *,
                          seed: int, layers_per_shard: int = 3, pool: int = 2) -> None:
  """A sharded bf16 HF checkpoint of the 7 linear weights per layer (what the transfer reads)."""
  import ml_dtypes
  from safetensors.numpy import save_file
  from crosslora_jax.formats.architectures import Architecture
  arch = Architecture.from_config(config)
  rng = np.random.default_rng(seed)
  tmp = folder.with_name(folder.name + ".partial")
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir(parents=True)
  bases = {}
  for module in MODULES:
    m, n = arch.shape(module)
    k = min(m, n)
    s = np.interp(np.arange(k) / max(k - 1, 1), GRID, profiles[module]).astype(np.float32)
    s *= 0.02 * np.sqrt(m * n) / np.linalg.norm(s)  # entries ~ 0.02 rms, like trained weights
    bases[module] = [spectral_matrix(rng, m, n, s) for _ in range(pool)]
  n_layers = arch.num_layers
  shards = [list(range(i, min(i + layers_per_shard, n_layers))) for i in range(0, n_layers, layers_per_shard)]
  weight_map = {}
  for idx, layers in enumerate(shards):
    name = f"model-{idx + 1:05d}-of-{len(shards):05d}.safetensors"
    tensors = {}
    for layer in layers:
      for module in MODULES:
        stored, _ = arch.stored_for(module)
        key = arch.weight_key(layer, stored)
        tensors[key] = _variant(rng, bases[module][layer % pool]).astype(ml_dtypes.bfloat16)
        weight_map[key] = name
    save_file(tensors, str(tmp / name), metadata={"format": "pt"})
    del tensors
  (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
  (tmp / "config.json").write_text(json.dumps(config, indent=2))
  shutil.rmtree(folder, ignore_errors=True)
  os.rename(tmp, folder)


def write_adapter(folder: pathlib.Path, config: dict[str, Any], *, seed: int, r: int = 16, alpha: int = 32,
                  layers: list[int] | None = None) -> None:
  """A PEFT LoRA (float32, all 7 modules) with random non-zero factors, like a trained one."""
  from crosslora_bench.adapters import random_adapter
  from crosslora_jax.formats import peft_format
  from crosslora_jax.formats.architectures import Architecture
  extra = {"task_type": "CAUSAL_LM", "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
           "base_model_name_or_path": config.get("_name_or_path", "synthetic")}
  adapter = random_adapter(Architecture.from_config(config), seed=seed, rank=r, alpha=alpha, layers=layers,
                           a_scale=None, b_scale=0.02, config=extra)
  folder.mkdir(parents=True, exist_ok=True)
  peft_format.write_adapter_files(adapter, folder, np.float32)


# --- child processes ----------------------------------------------------------------


TIME = shutil.which("time") or "/usr/bin/time"


def timed(cmd: list[str], workdir: pathlib.Path, label: str, env_extra: dict[str, str] | None = None) -> dict[str, Any]:
  """Runs ``cmd`` as a child under GNU time: wall and CPU seconds, peak RSS, stdout.

  Peak RSS comes from GNU time, which forks the command itself: the rusage of a
  child forked from this (large) process would include this process's own memory,
  which Linux counts in the child's maximum RSS up to its exec.
  """
  env = os.environ.copy()
  env.update({"JAX_LOG_COMPILES": "1", **(env_extra or {})})
  logs = workdir / "logs"
  logs.mkdir(parents=True, exist_ok=True)
  out_file, err_file, time_file = logs / f"{label}.out", logs / f"{label}.err", logs / f"{label}.time"
  print(f"[bench] {label}: {' '.join(cmd)}", file=sys.stderr, flush=True)
  t0 = time.perf_counter()
  with open(out_file, "w") as out, open(err_file, "w") as err:
    code = subprocess.call([TIME, "-f", "%M %e %U %S", "-o", str(time_file), *cmd], cwd=REPO, env=env, stdout=out,
                           stderr=err)
  wall = time.perf_counter() - t0
  if code != 0:
    raise RuntimeError(f"{label} failed ({code}): {err_file.read_text()[-3000:]}")
  max_kib, _, user, system = time_file.read_text().split()[-4:]
  peak = int(max_kib) / 2**20  # KiB -> GiB
  cpu = float(user) + float(system)
  print(f"[bench] {label}: {wall:.1f} s wall, {cpu:.1f} s CPU, peak {peak:.2f} GiB", file=sys.stderr, flush=True)
  programs = err_file.read_text(errors="replace").count(COMPILE_LINE)
  return {"seconds": wall, "cpu_seconds": cpu, "peak_gib": peak, "command": " ".join(cmd),
          "stdout": out_file.read_text(), "programs": programs}


def cli(source: pathlib.Path, target: pathlib.Path, out: pathlib.Path, cache_dir: pathlib.Path | None, *,
        adapter: pathlib.Path | None = None, adapter_dir: pathlib.Path | None = None, svd: str = "randomized",
        extra: list[str] | None = None) -> list[str]:
  cmd = [sys.executable, "-m", "crosslora_jax.transfer", f"--source_model={source}", f"--target_model={target}",
         f"--output={out}", f"--svd={svd}", f"--rank={RANK}", "--overwrite", "--noprogress",
         f"--report={out}.report.json"]
  cmd += [f"--adapter={adapter}"] if adapter else [f"--adapter_dir={adapter_dir}"]
  cmd += [f"--cache_dir={cache_dir}"] if cache_dir else ["--no_cache"]
  return cmd + (extra or [])


# --- the PyTorch reference ------------------------------------------------------------


def reference_main(args: argparse.Namespace) -> None:
  """The paper authors' procedure in plain PyTorch (run as a child; prints one JSON line).

  Per module and target layer, per LoRA factor: fp32 SVD of the source and the target base
  weight (torch.linalg.svd, full_matrices=False), rank-r truncation, P = lstsq(U_s, U_t)
  (resp. V), and the factor mapped through it; nothing is cached or reused. ``--ref_layers``
  names target layers ("all": every one); each takes its source layer from the CLI's
  ``--layer_map auto`` (the same index when the depths match, else by relative depth).
  """
  import ml_dtypes  # noqa: F401
  import torch
  from crosslora_jax import Checkpoint
  from crosslora_jax.formats import peft_format
  torch.set_num_threads(args.threads)
  dev = torch.device(args.ref_device)
  src, tgt = Checkpoint(args.source), Checkpoint(args.target)
  adapter = peft_format.read_adapter(args.adapter)
  from crosslora_jax.core.planning import layer_map
  lmap = layer_map("auto", src.arch.num_layers, tgt.arch.num_layers)
  layers = list(range(tgt.arch.num_layers)) if args.ref_layers == "all" else [int(x) for x in args.ref_layers.split(",")]

  def lstsq(a, b):  # CUDA's lstsq takes only overdetermined systems: the pseudo-inverse there
    return torch.linalg.lstsq(a, b).solution if dev.type == "cpu" else torch.linalg.pinv(a) @ b

  t0 = time.perf_counter()
  svds = 0
  for layer in layers:
    s_layer = lmap[layer]
    for module in MODULES:
      path = src.arch.module_path(s_layer, src.arch.stored_for(module)[0])
      pair = adapter.modules[path]
      for factor in ("A", "B"):
        w_s = torch.from_numpy(np.asarray(src.weight(s_layer, module), np.float32)).to(dev)
        w_t = torch.from_numpy(np.asarray(tgt.weight(layer, module), np.float32)).to(dev)
        r = min(RANK, *w_s.shape, *w_t.shape)
        u_s, _, vh_s = torch.linalg.svd(w_s, full_matrices=False)
        u_t, _, vh_t = torch.linalg.svd(w_t, full_matrices=False)
        svds += 2
        if factor == "B":  # B_t = P_U B_s, P_U = lstsq solution of P U_s = U_t
          p = lstsq(u_s[:, :r].T, u_t[:, :r].T).T
          _ = p @ torch.from_numpy(np.asarray(pair.b_or, np.float32)).to(dev)
        else:  # A_t = A_s P_V^T
          p = lstsq(vh_s[:r], vh_t[:r]).T
          _ = torch.from_numpy(np.asarray(pair.a_ri, np.float32)).to(dev) @ p.T
  if dev.type == "cuda":
    torch.cuda.synchronize()
  seconds = time.perf_counter() - t0
  print(json.dumps({"layers": layers, "loop_seconds": seconds, "svds": svds, "threads": args.threads,
                    "device": str(dev)}))


# --- accuracy ---------------------------------------------------------------------------


GAP = 1.01  # a direction is defined by its weight when σ_i / σ_{i+1} (and σ_{i-1} / σ_i) exceed this


def well_posed_errors(w: np.ndarray, s_exact: np.ndarray, u_exact: np.ndarray, u: np.ndarray) -> dict[str, float]:
  """Accuracy of a rank-r subspace ``u`` (m, r) of ``w`` on quantities the matrix defines.

  * tail_ratio: ‖W − U Uᵀ W‖²_F over the Eckart–Young optimum Σ_{i>r} σ_i² (1 is exact);
  * angle_deg: the largest angle between u_i and the exact u_i over the directions i <= r
    whose singular gaps on both sides exceed GAP (isolated: the matrix fixes them); with
    σ_r ≈ σ_{r+1} the rank-r subspace itself is not defined, and neither is its largest
    principal angle to exact nor the ΔW_t built from it.
  ``s_exact`` holds at least the top r singular values; the gap at r needs s_exact[r].
  tail_ratio is None at full rank (r = min(m, n)): there is no tail, any basis of the space is exact.
  """
  w64 = np.asarray(w, np.float64)
  r = u.shape[1]
  total = float(np.sum(w64 ** 2))
  optimum = max(total - float(np.sum(np.asarray(s_exact[:r], np.float64) ** 2)), 1e-300)
  tail = total - float(np.sum((np.asarray(u, np.float64).T @ w64) ** 2))
  tail_ratio = None if r >= min(w.shape) else tail / optimum
  s = np.asarray(s_exact, np.float64)
  n = min(r, len(s) - 1)
  gap_after = s[:n] / np.maximum(s[1:n + 1], 1e-300)
  gap_before = np.concatenate([[np.inf], gap_after[:-1]])
  isolated = np.flatnonzero((gap_after > GAP) & (gap_before > GAP))
  e = np.asarray(u_exact[:, isolated], np.float64)
  x = np.asarray(u[:, isolated], np.float64)
  e, x = e / np.linalg.norm(e, axis=0), x / np.linalg.norm(x, axis=0)
  cos = np.sum(e * x, axis=0)
  angles = np.degrees(np.arctan2(np.linalg.norm(x - cos * e, axis=0), np.abs(cos)))  # accurate near 0, unlike arccos
  return {"tail_ratio": tail_ratio, "angle_deg": float(angles.max()) if len(angles) else 0.0,
          "isolated": int(len(isolated))}


def subspace_errors(cache_a: pathlib.Path, cache_b: pathlib.Path, models: dict[str, pathlib.Path]) -> dict[str, Any]:
  """Worst well_posed_errors per module of cache b's entries against exact's (cache a), both models.

  ``models`` maps a role to its checkpoint folder: the tail energy needs the weight.
  The exact entries hold only the top r singular values, so the gap at r is not checked.
  """
  from safetensors.numpy import load_file
  from crosslora_jax import Checkpoint
  from crosslora_jax.core.cache import model_id
  worst: dict[str, dict[str, float]] = {}
  for folder in models.values():
    ck = Checkpoint(folder)
    mid = model_id(ck.fingerprint())
    for entry in sorted((cache_a / mid).glob("*.safetensors")):
      module, layer = entry.name.split("-")[0], int(entry.name.split("-")[1][1:])
      others = sorted((cache_b / mid).glob(f"{module}-L{layer:04d}-*.safetensors"))
      if not others:
        continue
      a, b = load_file(str(entry)), load_file(str(others[0]))
      w = np.asarray(ck.weight(layer, module), np.float32)
      for side, mat in (("u", w), ("v", w.T)):
        err = well_posed_errors(mat, a["s"], a[side], b[side])
        cur = worst.setdefault(module, {"tail_ratio": None, "angle_deg": 0.0})
        if err["tail_ratio"] is not None:  # None: full rank, no tail
          cur["tail_ratio"] = max(cur["tail_ratio"] or 0.0, err["tail_ratio"])
        cur["angle_deg"] = max(cur["angle_deg"], err["angle_deg"])
  return worst


def dw_differences(ref_folder: pathlib.Path, other_folder: pathlib.Path) -> dict[str, float]:
  """Max over layers of ‖ΔW_other − ΔW_ref‖_F / ‖ΔW_ref‖_F per module, on the ref's modules."""
  import jax.numpy as jnp
  from crosslora_jax.core import kernels
  from crosslora_jax.formats import peft_format
  ref, other = peft_format.read_adapter(ref_folder), peft_format.read_adapter(other_folder)
  worst: dict[str, float] = {}
  for path, pair in ref.modules.items():
    if path not in other.modules:
      continue
    module = path.rsplit(".", 1)[-1]
    o = other.modules[path]
    d = float(kernels.lowrank_relative_difference(*(jnp.asarray(np.asarray(x, np.float32))
                                                    for x in (pair.a_ri, pair.b_or, o.a_ri, o.b_or))))
    worst[module] = max(worst.get(module, 0.0), d)
  return worst


def accuracy_study(args: argparse.Namespace) -> dict[str, Any]:
  """SVD methods and randomized settings against exact on real weights: accuracy, flops, time.

  For each real pair and a few layer pairs, every module of both models: the tail energy
  ratio to the Eckart–Young optimum and the largest angle over isolated directions
  (:func:`well_posed_errors`, U and V), the leading-term flops (svd_solvers.flops) and
  the warm time of one decomposition (second call; BLAS at one thread as in the CLI).
  ΔW_t against exact (a random rank-16 ΔW_s) is kept for comparison: it is not a
  well-posed target, since near-equal σ let exact itself pair the directions at the
  cut arbitrarily. The "bf16 noise" row is exact SVD of W plus noise of bf16 rounding
  size (relative 2^-9 per entry): how far the weights' storage precision alone moves
  each figure, a floor for any method.
  """
  import jax
  import jax.numpy as jnp
  from crosslora_jax import Checkpoint
  from crosslora_jax.core import kernels, svd_solvers
  models = real_models()
  pairs = [p.split(":") for p in args.pairs.split(",")]
  pairs = [(s, t) for s, t in pairs if s in models and t in models]
  if not pairs:
    raise SystemExit(f"accuracy study: none of {args.pairs} fetched (python scripts/fetch_models.py)")
  configs = [("gram", 0, 0)] + [("randomized", int(p), int(q)) for p, q in
                                (c.split("/") for c in args.randomized_grid.split(","))]
  rows: dict[str, list[dict[str, Any]]] = {}
  rng = np.random.default_rng(0)
  svd = jax.jit(kernels.truncated_svd, static_argnames=("rank", "method", "n_oversamples", "n_power_iter"))

  def timed_svd(w, key, **kw):
    jax.block_until_ready(svd(w, key, **kw))
    t0 = time.perf_counter()
    out = jax.block_until_ready(svd(w, key, **kw))
    return out, time.perf_counter() - t0

  fracs = [float(x) for x in args.study_layers.split(",")]
  for s_name, t_name in pairs:
    src, tgt = Checkpoint(models[s_name]), Checkpoint(models[t_name])
    ls, lt = src.arch.num_layers, tgt.arch.num_layers
    for frac in fracs:
      l_s, l_t = round(frac * (ls - 1)), round(frac * (lt - 1))
      for module in args.study_modules.split(","):
        w_s = np.asarray(src.weight(l_s, module), np.float32)
        w_t = np.asarray(tgt.weight(l_t, module), np.float32)
        r = min(args.rank, *w_s.shape, *w_t.shape)
        a = jnp.asarray(rng.standard_normal((16, w_s.shape[1])).astype(np.float32))
        b = jnp.asarray(rng.standard_normal((w_s.shape[0], 16)).astype(np.float32))
        key = jax.random.key(l_s * 7 + MODULES.index(module))
        (ex_s, t_es), (ex_t, t_et) = (timed_svd(jnp.asarray(w), key, rank=r, method="exact") for w in (w_s, w_t))
        ref = kernels.project_cross_lora(ex_s, ex_t, a, b)
        full = {"s": (np.asarray(ex_s.u), np.asarray(ex_s.s), np.asarray(ex_s.v).T),
                "t": (np.asarray(ex_t.u), np.asarray(ex_t.s), np.asarray(ex_t.v).T)}  # top r: no gap check at r
        variants = {"exact": ((ex_s, t_es), (ex_t, t_et), ("exact", 0, 0))}
        if args.study_noise:
          noisy = [w * (1 + rng.uniform(-2**-9, 2**-9, w.shape).astype(np.float32)) for w in (w_s, w_t)]
          variants["exact + bf16 noise"] = (timed_svd(jnp.asarray(noisy[0]), key, rank=r, method="exact"),
                                            timed_svd(jnp.asarray(noisy[1]), key, rank=r, method="exact"),
                                            ("exact", 0, 0))
        for method, p, q in configs:
          name = method if method != "randomized" else f"randomized p={p} q={q}"
          kw = dict(rank=r, method=method, n_oversamples=p, n_power_iter=q)
          variants[name] = (timed_svd(jnp.asarray(w_s), key, **kw), timed_svd(jnp.asarray(w_t), key, **kw), (method, p, q))
        for name, ((f_s, sec_s), (f_t, sec_t), (method, p, q)) in variants.items():
          proj = kernels.project_cross_lora(f_s, f_t, a, b)
          errs = []
          for (w, (u_x, s_x, vt_x)), f in ((w_s, full["s"]), f_s), ((w_t, full["t"]), f_t):
            errs.append(well_posed_errors(w, s_x, u_x, np.asarray(f.u)))
            errs.append(well_posed_errors(w.T, s_x, vt_x.T, np.asarray(f.v)))
          tails = [e["tail_ratio"] for e in errs if e["tail_ratio"] is not None]  # none: full rank
          tail = max(tails) if tails else None
          print(f"[study]   {module} {name}: tail {'full rank' if tail is None else f'{tail:.5f}'} angle "
                f"{max(e['angle_deg'] for e in errs):.3f} {sec_s + sec_t:.2f} s", file=sys.stderr, flush=True)
          rows.setdefault(name, []).append({
              "pair": f"{s_name}->{t_name}", "layers": [l_s, l_t], "module": module, "rank": r,
              "tail_ratio": tail, "angle_deg": max(e["angle_deg"] for e in errs),
              "isolated": min(e["isolated"] for e in errs), "seconds": sec_s + sec_t,
              "flops": sum(svd_solvers.flops(method, w.shape, r, n_oversamples=p, n_power_iter=q) for w in (w_s, w_t)),
              "dw_rel": float(kernels.lowrank_relative_difference(ref.a_ri, ref.b_or, proj.a_ri, proj.b_or))})
        print(f"[study] {s_name}->{t_name} layers {l_s}/{l_t} {module} done", file=sys.stderr, flush=True)
  summary = {}
  for name, rs in rows.items():
    tailed = [x for x in rs if x["tail_ratio"] is not None] or rs  # full-rank weights have no tail
    worst = max(tailed, key=lambda x: x["tail_ratio"] or 0.0)
    summary[name] = {"tail_ratio_max": worst["tail_ratio"],
                     "tail_ratio_mean": float(np.mean([x["tail_ratio"] or 0.0 for x in tailed])),
                     "angle_deg_max": max(x["angle_deg"] for x in rs), "seconds": sum(x["seconds"] for x in rs),
                     "gflop": sum(x["flops"] for x in rs) / 1e9, "dw_rel_max": max(x["dw_rel"] for x in rs),
                     "worst": f"{worst['pair']} {worst['module']} L{worst['layers']}"}
  return {"rank": args.rank, "pairs": [f"{s}->{t}" for s, t in pairs], "summary": summary, "rows": rows}


def nll_study(args: argparse.Namespace) -> dict[str, Any]:
  """End to end: held-out NLL of real transfers with each --svd method against exact, paired.

  SmolLM2-135M -> Qwen2.5-Coder-0.5B with the shipped example adapter (cross_lora, r 320), through
  scripts/bench_quality.py's own transfer() and NLL evaluation (the target merged in float32, the
  factors rounded to float16 as the CLI writes them); the difference to exact with its paired
  standard error over the held-out blocks (textdata.paired_se).
  """
  import bench_quality as bq
  from crosslora_jax.core import compiles
  methods = args.nll_methods.split(",")
  bq.SUBSPACE_CACHE.append(pathlib.Path(args.workdir).expanduser() / "nll-subspaces")
  target = bq.Target("qwen05", args.blocks, args.threads)
  base, base_blocks, _ = target.nll(None)
  per: dict[str, Any] = {}
  for method in ["exact"] + [m for m in methods if m != "exact"]:
    bq.SVD[0] = method
    with compiles.count_compiles() as built:  # the first transfer of the process builds every program it needs
      res, seconds = bq.transfer("smollm2", "qwen05", bq.EXAMPLE_ADAPTER, "cross_lora", RANK)
    mean, blocks, _ = target.nll(bq.update_from_adapter(res.adapter))
    per[method] = {"nll": mean, "per_block": blocks.tolist(), "transfer_seconds": seconds,
                   "programs_built": built.count, "compile_seconds": built.seconds,
                   "timing": res.report.timing}
    print(f"[nll] {method}: {mean:.5f} (base {base:.5f}), transfer {seconds:.0f} s, {built.count} programs built, "
          f"timing {res.report.timing}", file=sys.stderr, flush=True)
  ex = np.asarray(per["exact"]["per_block"])
  for method, rec in per.items():
    rec["minus_exact"] = rec["nll"] - per["exact"]["nll"]
    rec["se"] = bq.se(np.asarray(rec["per_block"]), ex) if method != "exact" else 0.0
  return {"pair": "smollm2->qwen05", "adapter": str(bq.EXAMPLE_ADAPTER.relative_to(REPO)), "blocks": args.blocks,
          "base_nll": base, "methods": per}


# --- the benchmark ---------------------------------------------------------------------


def machine() -> str:
  cpu = "?"
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
  return f"{os.cpu_count()} CPU cores ({cpu}), {mem:.0f} GiB RAM, no GPU; {platform.platform()}"


def prepare_data(work: pathlib.Path, profiles: dict[str, list[float]]) -> dict[str, pathlib.Path]:
  import hashlib
  tag = hashlib.sha256(json.dumps([GENERATOR_VERSION, PAPER, profiles], sort_keys=True).encode()).hexdigest()[:12]
  data = work / f"data-{tag}"
  paths = {"source": data / "source", "target": data / "target", "adapter": data / "adapters" / "a0",
           "batch": data / "adapters", "subset": data / "subset" / "a0-layers"}
  t0 = time.perf_counter()
  for role, seed in (("source", 1), ("target", 2)):
    if not (paths[role] / "config.json").exists():
      print(f"[bench] writing the synthetic {role} checkpoint to {paths[role]}", file=sys.stderr, flush=True)
      write_synthetic_model(paths[role], PAPER[role], profiles, seed=seed)
  for i in range(8):
    if not (paths["batch"] / f"a{i}" / "adapter_config.json").exists():
      write_adapter(paths["batch"] / f"a{i}", PAPER["source"], seed=100 + i)
  for old in data.glob("*.stale"):
    shutil.rmtree(old, ignore_errors=True)
  print(f"[bench] data ready in {time.perf_counter() - t0:.0f} s: {data}", file=sys.stderr, flush=True)
  for stale in work.glob("data-*"):
    if stale != data:
      shutil.rmtree(stale, ignore_errors=True)
  return paths


def kernel_times_main(args: argparse.Namespace) -> None:
  """Warm per-layer decomposition time of each SVD method at paper scale (a child; one JSON line).

  For every module of both models: decompose layer 0 (compiles), then time layer 1.
  Used to extrapolate the subset runs of the slower methods to 28 layers.
  """
  import jax
  from crosslora_jax import Checkpoint
  from crosslora_jax.core import kernels
  from crosslora_jax.core.sharding import blas_threads
  from crosslora_jax.core.subspaces import layer_keys
  src, tgt = Checkpoint(args.source), Checkpoint(args.target)
  out: dict[str, Any] = {}
  with blas_threads(1):
    for method in args.methods.split(","):
      per_module = {}
      for role, ck in (("source", src), ("target", tgt)):
        for module in MODULES:
          r = min(RANK, *src.arch.shape(module), *tgt.arch.shape(module))
          for layer in (0, 1):
            w = np.stack([ck.weight(layer, module)])
            t0 = time.perf_counter()
            jax.block_until_ready(kernels.batched_truncated_svd(w, layer_keys(0, module, [layer]), rank=r,
                                                                method=method))
          per_module[f"{role}.{module}"] = time.perf_counter() - t0
      out[method] = {"per_layer_seconds": sum(per_module.values()), "per_module": per_module}
  print(json.dumps(out))


def bench(args: argparse.Namespace) -> dict[str, Any]:
  work = pathlib.Path(args.workdir).expanduser()
  work.mkdir(parents=True, exist_ok=True)
  t_start = time.perf_counter()
  models = real_models()
  spectra = cached_spectra(work, models) if models else None
  profiles = spectra["mean"] if spectra else fallback_profile()
  paths = prepare_data(work, profiles)
  subset = [int(x) for x in args.subset_layers.split(",")]
  sub_adapter = paths["subset"].with_name(f"a0-layers-{'-'.join(map(str, subset))}")
  if not (sub_adapter / "adapter_config.json").exists():
    write_adapter(sub_adapter, PAPER["source"], seed=100, layers=subset)  # = a0's factors on those layers
  runs = work / "runs"
  shutil.rmtree(runs, ignore_errors=True)
  runs.mkdir()
  res: dict[str, Any] = {"runs": {}, "default": args.default}
  src, tgt = paths["source"], paths["target"]
  R = res["runs"]
  d = args.default
  # 1. crosslora_jax, the default method, the whole model, cold cache.
  R["default"] = timed(cli(src, tgt, runs / d, runs / f"cache-{d}", adapter=paths["adapter"], svd=d), work,
                       f"jax-{d}-cold")
  # 2. a warm single adapter and a warm batch of 8 (same cache).
  R["warm1"] = timed(cli(src, tgt, runs / "warm1", runs / f"cache-{d}", adapter=paths["batch"] / "a1", svd=d),
                     work, f"jax-{d}-warm-1")
  R["warm8"] = timed(cli(src, tgt, runs / "warm8", runs / f"cache-{d}", adapter_dir=paths["batch"], svd=d),
                     work, f"jax-{d}-warm-8")
  # 3. the other SVD methods on the subset layers (cold), for accuracy and extrapolation.
  others = [m for m in SOLVERS if m != d]
  for method in others:
    R[f"{method}-subset"] = timed(cli(src, tgt, runs / f"{method}-subset", runs / f"cache-{method}-subset",
                                      adapter=sub_adapter, svd=method), work, f"jax-{method}-subset")
  kt = timed([sys.executable, str(pathlib.Path(__file__).resolve()), "--kernel_times", f"--source={src}",
              f"--target={tgt}", f"--methods={','.join(SOLVERS)}"], work, "kernel-times")
  res["kernel_times"] = json.loads(kt["stdout"].strip().splitlines()[-1])
  # 4. the PyTorch reference on --ref_layers layers.
  ref_cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--reference", f"--source={src}",
             f"--target={tgt}", f"--adapter={paths['adapter']}", f"--ref_layers={args.ref_layers}",
             f"--threads={args.threads}"]
  R["reference"] = timed(ref_cmd, work, "torch-reference", {"OMP_WAIT_POLICY": "PASSIVE"})
  inner = json.loads(R["reference"]["stdout"].strip().splitlines()[-1])
  R["reference"].update(inner, process_seconds=R["reference"]["seconds"], seconds=inner["loop_seconds"])
  # 5. accuracy against exact on the subset layers.
  ref_out, ref_cache = runs / "exact-subset", runs / "cache-exact-subset"
  res["accuracy"] = {}
  measured = SOLVERS[1:] + ((d,) if d not in SOLVERS else ())  # the default too when it is auto
  for method in measured:
    out, cache = (runs / d, runs / f"cache-{d}") if method == d else (runs / f"{method}-subset",
                                                                       runs / f"cache-{method}-subset")
    res["accuracy"][method] = {"well_posed": subspace_errors(ref_cache, cache, {"source": src, "target": tgt}),
                               "dw_rel": dw_differences(ref_out, out)}
  # 6. real small models.
  res["real"] = {}
  if "smollm2" in models and "qwen05" in models and not args.skip_real:
    real_adapter = REPO / "examples" / "smollm2-pydoc-lora"  # the shipped SmolLM2 LoRA, r 16 on 7 modules
    for method in SOLVERS + ((d,) if d not in SOLVERS else ()):
      res["real"][method] = timed(cli(models["smollm2"], models["qwen05"], runs / f"real-{method}",
                                      runs / f"cache-real-{method}", adapter=real_adapter, svd=method),
                                  work, f"real-smollm2-qwen05-{method}")
    res["real"][f"{d}-warm"] = timed(cli(models["smollm2"], models["qwen05"], runs / f"real-{d}-warm",
                                         runs / f"cache-real-{d}", adapter=real_adapter, svd=d),
                                     work, f"real-smollm2-qwen05-{d}-warm")
    # The same PyTorch reference on the whole real pair (every target layer): the cold-run ratio.
    res["real_reference"] = timed([sys.executable, str(pathlib.Path(__file__).resolve()), "--reference",
                                   f"--source={models['smollm2']}", f"--target={models['qwen05']}",
                                   f"--adapter={real_adapter}", "--ref_layers=all", f"--threads={args.threads}"],
                                  work, "torch-reference-real", {"OMP_WAIT_POLICY": "PASSIVE"})
    inner = json.loads(res["real_reference"]["stdout"].strip().splitlines()[-1])
    res["real_reference"].update(inner, process_seconds=res["real_reference"]["seconds"])
    real_models_used = {"source": models["smollm2"], "target": models["qwen05"]}
    res["real_accuracy"] = {m: {"well_posed": subspace_errors(runs / "cache-real-exact", runs / f"cache-real-{m}",
                                                              real_models_used),
                                "dw_rel": dw_differences(runs / "real-exact", runs / f"real-{m}")}
                            for m in measured}
  res["spectra"] = spectra
  res["bench_seconds"] = time.perf_counter() - t_start
  res["subset_layers"] = subset
  return res


def summarize(res: dict[str, Any], args: argparse.Namespace, command: str) -> dict[str, Any]:
  R = res["runs"]
  d = res["default"]
  n_layers = PAPER["source"]["num_hidden_layers"]
  n_sub = len(res["subset_layers"])
  ref = R["reference"]
  ref_full = ref["seconds"] / len(ref["layers"]) * n_layers  # SVD/lstsq loop only: favours torch
  kt = res["kernel_times"]

  def report(run):  # the engine's own report of a CLI run
    data = json.loads(pathlib.Path(run["command"].split("--report=")[1].split()[0]).read_text())
    return data[0] if isinstance(data, list) else data

  full = R["default"]
  rows = [{"what": f"crosslora_jax --svd {d} (default), 28 layers, cold cache", "seconds": full["seconds"],
           "measured": True, "peak_gib": full["peak_gib"], "cpu_seconds": full["cpu_seconds"]}]
  for method in SOLVERS:
    if method == d:
      continue
    run = R[f"{method}-subset"]
    est = run["seconds"] + (n_layers - n_sub) * kt[method]["per_layer_seconds"]
    rows.append({"what": f"crosslora_jax --svd {method}, cold cache: {n_sub} layer(s) measured, 28 extrapolated",
                 "seconds": est, "measured": False, "measured_seconds": run["seconds"], "peak_gib": run["peak_gib"],
                 "cpu_seconds": run["cpu_seconds"]})
  rows.append({"what": f"PyTorch reference (authors' procedure): {len(ref['layers'])} layer(s) measured, "
                       f"28 extrapolated", "seconds": ref_full, "measured": False,
               "measured_seconds": ref["seconds"], "peak_gib": ref["peak_gib"], "cpu_seconds": ref["cpu_seconds"]})
  for row in rows:
    row["vs_reference"] = ref_full / row["seconds"]
  w1, w8 = R["warm1"], R["warm8"]
  extra = (w8["seconds"] - w1["seconds"]) / 7
  batch = {"warm_1_seconds": w1["seconds"], "warm_8_seconds": w8["seconds"], "per_adapter_seconds": w8["seconds"] / 8,
           "extra_adapter_seconds": extra, "peak_gib_8": w8["peak_gib"], "engine_seconds_8": report(w8)["seconds"],
           "engine_seconds_1": report(w1)["seconds"]}
  acc = res["accuracy"]
  default_tail = max((v["tail_ratio"] for v in acc[d]["well_posed"].values() if v["tail_ratio"] is not None),
                     default=None) if d in acc else None
  peak = max(full["peak_gib"], w8["peak_gib"])
  real, real_ref = res.get("real", {}), res.get("real_reference")
  real_cold, real_warm = real.get(d), real.get(f"{d}-warm")
  real_ratio = real_ref["loop_seconds"] / real_cold["seconds"] if real_ref and real_cold else None
  targets = {
      f"paper scale, cold, default, 2-core CPU <= {TARGETS['default_minutes']:g} min": (
          full["seconds"] <= 60 * TARGETS["default_minutes"], f"{full['seconds'] / 60:.1f} min"),
      f">= {TARGETS['speedup']:g}x the PyTorch reference in the same run": (
          ref_full / full["seconds"] >= TARGETS["speedup"],
          f"{ref_full / full['seconds']:.1f}x (reference extrapolated from {len(ref['layers'])} layer)"),
      f"real pair, cold whole CLI >= {TARGETS['real_speedup']:g}x the PyTorch reference": (
          None if real_ratio is None else real_ratio >= TARGETS["real_speedup"],
          "not run" if real_ratio is None else f"{real_ratio:.1f}x ({real_cold['seconds']:.1f} s against the reference's "
          f"{real_ref['loop_seconds']:.1f} s loop, all {len(real_ref['layers'])} target layers)"),
      f"real pair, second adapter with warm caches <= {TARGETS['real_warm_s']:g} s": (
          None if real_warm is None else real_warm["seconds"] <= TARGETS["real_warm_s"],
          "not run" if real_warm is None else f"{real_warm['seconds']:.1f} s"),
      "extra adapter, warm cache <= 2 s": (extra <= TARGETS["extra_adapter_s"], f"{extra:.2f} s"),
      "peak host memory <= 4 GB": (peak * 2**30 <= TARGETS["peak_gb"] * 1e9, f"{peak:.2f} GiB"),
      f"default ({d}) tail energy <= 1.01x the rank-r optimum": (
          None if default_tail is None else default_tail <= TARGETS["tail_ratio"],
          "n/a" if default_tail is None else f"max {default_tail:.4f}x"),
      "compiled programs, cold default run <= 8": (full["programs"] <= TARGETS["programs"], str(full["programs"])),
      "GPU: paper scale cold <= 20 s, warm <= 10 s (scripts/bench_speed_gpu.py)": (None, "not measured here (CPU bench)"),
  }
  return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine(),
          "command": command, "default": d, "rows": rows, "batch": batch, "accuracy": acc, "kernel_times": kt,
          "real": {k: {"seconds": v["seconds"], "peak_gib": v["peak_gib"], "programs": v["programs"],
                       "timing": report(v).get("timing")} for k, v in res.get("real", {}).items()},
          "programs": {k: v.get("programs") for k, v in R.items()}, "timing": report(full).get("timing"),
          "process_seconds": full["seconds"], "engine_seconds": report(full)["seconds"],
          "real_reference": None if real_ref is None else {k: real_ref[k] for k in ("loop_seconds", "process_seconds",
                                                                                    "svds", "layers", "peak_gib")},
          "real_accuracy": res.get("real_accuracy"), "targets": {k: {"met": v[0], "value": v[1]}
                                                                  for k, v in targets.items()},
          "bench_seconds": res["bench_seconds"], "load_average_end": os.getloadavg(), "spectra": res["spectra"],
          "commands": {k: v["command"] for k, v in R.items()}}


def write_results(summary: dict[str, Any], out_dir: pathlib.Path) -> str:
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / "speed.json").write_text(json.dumps(summary, indent=1) + "\n")
  fmt_acc = lambda d: ", ".join(f"{m.replace('_proj', '')} {'full rank' if v is None else f'{v:.3g}'}"
                                for m, v in d.items()) if d else "n/a"
  lines = [
      "# Speed at paper scale",
      "",
      f"Measured {summary['date']} on {summary['machine']}. **A CPU run: "
      "the GPU targets are scripts/bench_speed_gpu.py's.** The 2 cores are shared with other jobs (load average "
      f"at the end {summary['load_average_end'][0]:.1f}), so times are noisy: compare ratios within the run.",
      "",
      f"Command: `{summary['command']}` (total {summary['bench_seconds'] / 60:.0f} min).",
      "",
      "Paper scale: Qwen2.5-1.5B -> Llama-3.2-3B shapes (28 layers, hidden 1536 -> 3072, k/v 256 -> 1024, "
      "FFN 8960 -> 8192, 7 modules, r = 320), a rank-16 LoRA (alpha 32), synthetic bf16 sharded safetensors "
      "with singular values decaying like the real models' (spectra in speed.json).",
      "",
      "| run | wall time | measured (wall / CPU) | peak RSS | reference / run |",
      "|---|---:|---:|---:|---:|",
  ]
  for row in summary["rows"]:
    measured = (f"{row['seconds']:.0f} s / {row['cpu_seconds']:.0f} s" if row["measured"] else
                f"{row['measured_seconds']:.0f} s / {row['cpu_seconds']:.0f} s (subset)")
    lines.append(f"| {row['what']} | {row['seconds'] / 60:.1f} min | {measured} | {row['peak_gib']:.2f} GiB | "
                 f"{row['vs_reference']:.1f}x |")
  b = summary["batch"]
  lines += [
      "",
      "Wall times are whole CLI processes (start-up, reading weights, decomposition, projection, writing and "
      "verifying the adapter); the reference's is its SVD/lstsq loop only (no start-up or output), which favours it. "
      "Extrapolation: a subset run's wall time plus (28 - subset) x the method's warm per-layer kernel time "
      "(both models, 7 modules: " + ", ".join(f"{m} {v['per_layer_seconds']:.1f} s"
                                               for m, v in summary["kernel_times"].items())
      + "); the reference's per-layer time x 28.",
      "",
      f"**Batches of adapters (warm cache, --svd {summary['default']}):** "
      f"1 adapter {b['warm_1_seconds']:.1f} s, 8 adapters {b['warm_8_seconds']:.1f} s "
      f"({b['per_adapter_seconds']:.2f} s per adapter; an extra adapter costs "
      f"{b['extra_adapter_seconds']:.2f} s = (8-run - 1-run) / 7); peak {b['peak_gib_8']:.2f} GiB. "
      f"Engine time inside the process: {b['engine_seconds_1']:.1f} s / {b['engine_seconds_8']:.1f} s.",
      "",
      f"**Compiled programs** (JAX_LOG_COMPILES lines per child): "
      + ", ".join(f"{k} {v}" for k, v in summary["programs"].items() if v is not None) + ".",
      "",
      "**Where the cold default run's time went** (engine report; 'other' = cache, planning, report; the process "
      f"outside the engine = start-up, writing and verifying): process {summary['process_seconds']:.0f} s, engine "
      f"{summary['engine_seconds']:.0f} s = " + ", ".join(f"{k} {v:.1f} s" for k, v in (summary["timing"] or {}).items())
      + ".",
      "",
      "**Accuracy against --svd exact** (same layers; per module, worst over layers and over U/V of both models): "
      "tail = ||W - U U^T W||_F^2 over the rank-r optimum sum_{i>r} s_i^2 (1 = exact); angle = largest angle in "
      "degrees between u_i and the exact u_i over the directions whose singular gaps exceed 1.01 on both sides; "
      "dW = ||dW_t - dW_t,exact||_F / ||dW_t,exact||_F (not well posed: with s_r ~ s_{r+1} exact's own pairing of "
      "the directions at the cut is arbitrary, so it is shown, not targeted):",
      "",
  ]
  wp = lambda acc, key: {m: v[key] for m, v in acc["well_posed"].items()}
  for name, acc in summary["accuracy"].items():
    lines.append(f"- {name}: tail {fmt_acc(wp(acc, 'tail_ratio'))}; angle {fmt_acc(wp(acc, 'angle_deg'))}; "
                 f"dW {fmt_acc(acc['dw_rel'])}")
  if summary["real"]:
    lines += ["", "**Real models** (SmolLM2-135M -> Qwen2.5-Coder-0.5B, examples/smollm2-pydoc-lora (r 16, 7 modules), "
              "r = 320, whole CLI processes, cold subspace cache; '-warm': the same again with the cache warm):", ""]
    for method, r in summary["real"].items():
      split = ", ".join(f"{k} {v:.1f} s" for k, v in (r.get("timing") or {}).items())
      lines.append(f"- --svd {method}: {r['seconds']:.1f} s, peak {r['peak_gib']:.2f} GiB, {r['programs']} programs; "
                   f"engine {split}")
    rr = summary.get("real_reference")
    if rr:
      lines.append(f"- PyTorch reference (the authors' procedure, every target layer, {rr['svds']} SVDs): loop "
                   f"{rr['loop_seconds']:.1f} s (process {rr['process_seconds']:.1f} s), peak {rr['peak_gib']:.2f} GiB")
    for name, acc in (summary["real_accuracy"] or {}).items():
      lines.append(f"- {name} vs exact: tail {fmt_acc(wp(acc, 'tail_ratio'))}; angle {fmt_acc(wp(acc, 'angle_deg'))}; "
                   f"dW {fmt_acc(acc['dw_rel'])}")
  lines += ["", "## Targets", "", "| target | met | value |", "|---|---|---|"]
  for name, t in summary["targets"].items():
    met = "n/a" if t["met"] is None else ("yes" if t["met"] else "**no**")
    lines.append(f"| {name} | {met} | {t['value']} |")
  text = "\n".join(lines) + "\n"
  (out_dir / "speed.md").write_text(text)
  return text


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", default=str(pathlib.Path.home() / ".cache" / "crosslora_jax" / "bench_speed"),
                      help="synthetic checkpoints (8.3 GB, kept), run outputs and logs")
  parser.add_argument("--out", default=str(REPO / "results"))
  parser.add_argument("--subset_layers", default="0", help="layers for the exact/gram runs and accuracy")
  parser.add_argument("--ref_layers", default="0", help="layers the PyTorch reference runs on")
  parser.add_argument("--ref_device", default="cpu", help="torch device of the reference (cpu, cuda)")
  parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (reference)")
  parser.add_argument("--skip_real", action="store_true")
  parser.add_argument("--default", default=None, help="the method of the whole-model run (default: the CLI's)")
  parser.add_argument("--study", choices=["accuracy", "spectra", "nll"])
  parser.add_argument("--nll_methods", default=",".join(SOLVERS), help="--study nll: --svd methods")
  parser.add_argument("--blocks", type=int, default=32, help="--study nll: held-out blocks of 128 tokens")
  parser.add_argument("--pairs", default="qwen05:qwen15,smollm2:qwen05,gemma:smollm2", help="--study accuracy")
  parser.add_argument("--rank", type=int, default=RANK, help="--study accuracy")
  parser.add_argument("--randomized_grid", default="10/2,32/4,64/6", help="p/q settings")
  parser.add_argument("--study_layers", default="0,0.5,1", help="--study accuracy: layer fractions per model")
  parser.add_argument("--study_modules", default=",".join(MODULES), help="--study accuracy: modules")
  parser.add_argument("--study_noise", action="store_true", help="--study accuracy: add the exact + bf16 noise row")
  parser.add_argument("--summarize_only", action="store_true",
                      help="rebuild speed.{md,json} from the last whole bench's measurements (--workdir/bench_raw.json)")
  # Internal: the reference child.
  parser.add_argument("--reference", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--kernel_times", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--methods", help=argparse.SUPPRESS)
  parser.add_argument("--source", help=argparse.SUPPRESS)
  parser.add_argument("--target", help=argparse.SUPPRESS)
  parser.add_argument("--adapter", help=argparse.SUPPRESS)
  args = parser.parse_args()
  command = "python scripts/bench_speed.py " + " ".join(sys.argv[1:])
  if args.reference:
    reference_main(args)
    return
  if args.kernel_times:
    kernel_times_main(args)
    return
  if args.default is None:
    from crosslora_jax.core import kernels
    args.default = kernels.DEFAULT_SVD
  if args.study == "spectra":
    print(json.dumps(measure_spectra(real_models()), indent=1))
    return
  if args.study == "nll":
    result = dict(nll_study(args), command=command)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "svd_nll.json").write_text(json.dumps(result, indent=1) + "\n")
    for method, rec in result["methods"].items():
      print(f"{method:12s} NLL {rec['nll']:.5f}  minus exact {rec['minus_exact']:+.5f} (± {rec['se']:.5f})")
    return
  if args.study == "accuracy":
    from crosslora_jax.core.sharding import blas_threads
    with blas_threads(1):
      result = accuracy_study(args)
    result["command"] = command
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "svd_accuracy.json").write_text(json.dumps(result, indent=1) + "\n")
    for name, s in result["summary"].items():
      print(f"{name:28s} tail/optimum max {s['tail_ratio_max']:.5f} (mean {s['tail_ratio_mean']:.5f})  isolated-"
            f"direction angle max {s['angle_deg_max']:6.2f} deg  {s['gflop']:8.1f} GFLOP  {s['seconds']:7.2f} s  "
            f"dW max {100 * s['dw_rel_max']:6.2f}%  worst {s['worst']}")
    return
  raw = pathlib.Path(args.workdir).expanduser() / "bench_raw.json"
  if args.summarize_only:  # rebuild the report from the last whole bench's measurements
    saved = json.loads(raw.read_text())
    res, command = saved["res"], saved["command"]
  else:
    res = bench(args)
    raw.write_text(json.dumps({"res": res, "command": command}, default=str))
  summary = summarize(res, args, command)
  print(write_results(summary, pathlib.Path(args.out)))


if __name__ == "__main__":
  main()
