r"""Scaling law: decomposition time and peak memory of a transfer vs model size, up to Llama-3-70B shapes.

  python scripts/bench_scaling.py                      # writes results/scaling.{md,json}
  python scripts/bench_scaling.py --shapes 0.5b,3b     # skip the 70B shape

Three same-shape pairs of synthetic bf16 checkpoints (source seed 1 -> target seed 2):
Qwen2.5-0.5B-like, Llama-3.2-3B-like and Llama-3-70B (80 layers, hidden 8192, kv 1024,
FFN 28672). Only a few layers of each are written (under --workdir, deleted at the end;
a 70B layer is 1.7 GB of bf16 per model), and per shape, in child processes:

* per-module decomposition time, wall and CPU seconds (read the bf16 weight, decompose at
  r = 320 with the CLI's default --svd, as the engine's Subspaces does) on the target. Small
  shapes: layer 1 of every module, after layer 0 compiled. 70B: layer 0 of q and k, compile
  included; o costs what q does (same shape), v what k does, up and down what gate does (the
  Gram matrix is 8192 x 8192 either way);
* one whole CLI transfer with --chunk_layers 1: wall time, CPU and peak RSS (GNU time). Small
  shapes: cross_lora, every module of every written layer; 70B: lora_x on gate_proj of layer 0
  (one decomposition of the largest weight, the memory peak; its report gives gate's time).

Per-layer time of a transfer = 2 (source and target) x the sum over the 7 modules; full
depth = layers x that; a power law t = a P^b over the shapes (P = parameters in one layer's
7 linear weights) is the fit, and a FLOP model of the --svd used, calibrated on the measured
rates, extrapolates to every shape. --rows merges rows.json files of separate runs. Nothing
here is a timed test.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import shutil
import sys
import time
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import numpy as np  # noqa: E402

import bench_speed  # noqa: E402  (the synthetic checkpoint writer, its spectra and the timed child runner)
from crosslora_jax.formats.architectures import CANONICAL_MODULES  # noqa: E402

RANK = bench_speed.RANK
_LLAMA = dict(model_type="llama", architectures=["LlamaForCausalLM"], head_dim=128, vocab_size=128256,
              tie_word_embeddings=False, torch_dtype="bfloat16")
SHAPES: dict[str, dict[str, Any]] = {
    "0.5b": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], num_hidden_layers=24, hidden_size=896,
                 num_attention_heads=14, num_key_value_heads=2, head_dim=64, intermediate_size=4864,
                 vocab_size=151936, tie_word_embeddings=True, torch_dtype="bfloat16"),
    "3b": dict(_LLAMA, num_hidden_layers=28, hidden_size=3072, num_attention_heads=24, num_key_value_heads=8,
               intermediate_size=8192, tie_word_embeddings=True),
    "70b": dict(_LLAMA, num_hidden_layers=80, hidden_size=8192, num_attention_heads=64, num_key_value_heads=8,
                intermediate_size=28672),
}
# Per shape: layers written and transferred, modules timed in the child, what the CLI run transfers.
# 70B: the CLI run moves gate_proj of layer 0 with lora_x (target subspaces only: one decomposition
# of the largest weight, whose read + decompose time it reports), q and k are timed in the child.
PLAN = {"0.5b": dict(layers=2, timed=CANONICAL_MODULES, cli=CANONICAL_MODULES, method="cross_lora"),
        "3b": dict(layers=2, timed=CANONICAL_MODULES, cli=CANONICAL_MODULES, method="cross_lora"),
        "70b": dict(layers=1, timed=("q_proj", "k_proj"), cli=("gate_proj",), method="lora_x")}
SAME_COST = {"o_proj": "q_proj", "v_proj": "k_proj", "up_proj": "gate_proj", "down_proj": "gate_proj"}


def layer_params(config: dict[str, Any]) -> int:
  from crosslora_jax.formats.architectures import Architecture
  arch = Architecture.from_config(config)
  return sum(int(np.prod(arch.shape(m))) for m in CANONICAL_MODULES)


def write_checkpoint(folder: pathlib.Path, config: dict[str, Any], *, seed: int) -> None:
  """A bf16 checkpoint of ``config``'s layers: bench_speed's writer, or one file per weight when big.

  bench_speed.write_synthetic_model keeps every module's float32 base matrix at once (3.4 GB
  for a 70B layer) beside a shard; past 1 GB of bases this writes one weight at a time with
  the same generator (bench_speed.spectral_matrix), so the peak is one float32 weight and its
  DCT copies (~3 GB at 28672 x 8192).
  """
  profiles = bench_speed.fallback_profile()
  if layer_params(config) * 4 < 2**30:
    bench_speed.write_synthetic_model(folder, config, profiles, seed=seed, layers_per_shard=1)
    return
  import ml_dtypes
  from safetensors.numpy import save_file
  from crosslora_jax.formats.architectures import Architecture
  arch = Architecture.from_config(config)
  rng = np.random.default_rng(seed)
  tmp = folder.with_name(folder.name + ".partial")
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir(parents=True)
  weight_map = {}
  for layer in range(arch.num_layers):
    for module in CANONICAL_MODULES:
      m, n = arch.shape(module)
      k = min(m, n)
      s = np.interp(np.arange(k) / max(k - 1, 1), bench_speed.GRID, profiles[module]).astype(np.float32)
      s *= 0.02 * np.sqrt(m * n) / np.linalg.norm(s)  # entries ~ 0.02 rms, like trained weights
      key = arch.weight_key(layer, arch.stored_for(module)[0])
      name = f"{key}.safetensors"
      w = bench_speed.spectral_matrix(rng, m, n, s).astype(ml_dtypes.bfloat16)
      save_file({key: w}, str(tmp / name), metadata={"format": "pt"})
      del w
      weight_map[key] = name
  (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
  (tmp / "config.json").write_text(json.dumps(config, indent=2))
  shutil.rmtree(folder, ignore_errors=True)
  os.rename(tmp, folder)


def write_adapter(folder: pathlib.Path, config: dict[str, Any], modules) -> None:
  from crosslora_bench.adapters import random_adapter
  from crosslora_jax.formats import peft_format
  from crosslora_jax.formats.architectures import Architecture
  extra = {"task_type": "CAUSAL_LM", "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
           "base_model_name_or_path": config["_name_or_path"]}
  adapter = random_adapter(Architecture.from_config(config), seed=7, rank=16, alpha=32, modules=modules,
                           a_scale=None, b_scale=0.02, config=extra)
  folder.mkdir(parents=True, exist_ok=True)
  peft_format.write_adapter_files(adapter, folder, np.float32)


def module_times_main(args: argparse.Namespace) -> None:
  """Child: seconds to read and decompose one weight per module, as the engine does (one JSON line)."""
  from crosslora_jax import Checkpoint
  from crosslora_jax.core.engine import TransferConfig, blas_threads
  from crosslora_jax.core.subspaces import Subspaces
  ck = Checkpoint(args.target)
  config = TransferConfig(rank=RANK, chunk_layers=1)
  out: dict[str, Any] = {"svd": config.svd, "cpu": {}}
  with blas_threads(config.blas_threads):
    for module in args.modules.split(","):
      rank = min(RANK, *ck.arch.shape(module))
      subs = Subspaces(ck, config)
      for layer in range(args.timed_layer + 1):  # the earlier layers compile
        t0, c0 = time.perf_counter(), time.process_time()
        subs.get(module, [layer], rank, batch_layers=1)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        subs.release(module)
      out[module], out["cpu"][module] = seconds, cpu
      print(f"[scaling] {module}: {seconds:.2f} s wall, {cpu:.2f} s CPU", file=sys.stderr, flush=True)
  print(json.dumps(out))


def measure_shape(name: str, work: pathlib.Path) -> dict[str, Any]:
  config = dict(SHAPES[name], _name_or_path=f"synthetic/{name}-shapes")
  plan = PLAN[name]
  small = dict(config, num_hidden_layers=plan["layers"])  # only the layers measured are written
  data = work / name
  t0 = time.perf_counter()
  for role, seed in (("source", 1), ("target", 2)):
    write_checkpoint(data / role, dict(small, _name_or_path=f"synthetic/{name}-shapes-{role}"), seed=seed)
  write_adapter(data / "adapter", small, plan["cli"])
  write_seconds = time.perf_counter() - t0
  print(f"[scaling] {name}: checkpoints written in {write_seconds:.0f} s", file=sys.stderr, flush=True)
  timed_layer = 0 if plan["layers"] == 1 else 1
  kt = bench_speed.timed([sys.executable, str(pathlib.Path(__file__).resolve()), "--module_times",
                          f"--target={data / 'target'}", f"--modules={','.join(plan['timed'])}",
                          f"--timed_layer={timed_layer}"], work, f"{name}-module-times")
  times = json.loads(kt["stdout"].strip().splitlines()[-1])
  cli = bench_speed.timed([sys.executable, "-m", "crosslora_jax.transfer", f"--source_model={data / 'source'}",
                           f"--target_model={data / 'target'}", f"--adapter={data / 'adapter'}",
                           f"--output={data / 'out'}", f"--report={data / 'report.json'}", f"--rank={RANK}",
                           f"--method={plan['method']}", "--chunk_layers=1", "--no_cache", "--noprogress",
                           "--overwrite"], work, f"{name}-cli")
  report = json.loads((data / "report.json").read_text())
  cpu_times = times.pop("cpu")
  if plan["method"] == "lora_x":  # one target weight decomposed: the CLI's own read + decompose time
    times.update({m: report["seconds_decompose"] for m in plan["cli"]})
    # CPU of that weight: the process's CPU less what the rest of it took (wall minus decomposition),
    # counted at one core; an estimate, said so in the results.
    cpu_times.update({m: max(cli["cpu_seconds"] - (cli["seconds"] - report["seconds_decompose"]), 0.0)
                      for m in plan["cli"]})
  per_module = {m: times.get(m, times.get(SAME_COST.get(m, m))) for m in CANONICAL_MODULES}
  per_module_cpu = {m: cpu_times.get(m, cpu_times.get(SAME_COST.get(m, m))) for m in CANONICAL_MODULES}
  measured = [m for m in CANONICAL_MODULES if m in times and m != "svd"]
  shutil.rmtree(data, ignore_errors=True)
  per_layer = 2 * sum(per_module.values())  # source and target, 7 modules
  per_layer_cpu = 2 * sum(per_module_cpu.values())
  depth = SHAPES[name]["num_hidden_layers"]
  return {"shape": name, "config": config, "layer_params": layer_params(config), "layers": depth,
          "layers_written": plan["layers"], "modules_timed": measured, "timed_layer": timed_layer,
          "module_seconds": per_module, "measured_module_seconds": {m: times[m] for m in measured},
          "cli_method": plan["method"],
          "module_cpu_seconds": per_module_cpu, "layer_cpu_seconds": per_layer_cpu,
          "full_decompose_cpu_seconds": per_layer_cpu * depth,
          "svd": times["svd"], "layer_seconds": per_layer, "full_decompose_seconds": per_layer * depth,
          "cli": {k: cli[k] for k in ("seconds", "cpu_seconds", "peak_gib", "command")},
          "cli_modules": list(plan["cli"]), "cli_decompose_seconds": report.get("seconds_decompose"),
          "write_seconds": write_seconds}


def layer_flops(config: dict[str, Any], svd: str) -> float:
  """FLOPs of one layer of one model at ``--svd svd``: per weight, ``svd_solvers.flops`` of the method
  it resolves to (``auto`` picks per shape) at r = min(320, m, n) and randomized's default p and q."""
  from crosslora_jax.core import svd_solvers
  from crosslora_jax.formats.architectures import Architecture
  arch = Architecture.from_config(config)
  total = 0.0
  for module in CANONICAL_MODULES:
    shape = arch.shape(module)
    r = min(RANK, *shape)
    method = svd_solvers.resolve_method(svd, shape, r)
    total += svd_solvers.flops(method, shape, r, n_oversamples=svd_solvers.RANDOMIZED_OVERSAMPLES,
                               n_power_iter=svd_solvers.RANDOMIZED_POWER_ITER)
  return total


def flop_model_lines(rows: list[dict[str, Any]]) -> list[str]:
  """The measured FLOP rates and every shape's full-depth FLOPs and time at them (markdown lines)."""
  svd = rows[0]["svd"]
  per_layer = {name: 2 * layer_flops(cfg, svd) for name, cfg in SHAPES.items()}  # both models
  rates = {r["shape"]: per_layer[r["shape"]] / r["layer_cpu_seconds"] for r in rows}
  wall_rates = {r["shape"]: per_layer[r["shape"]] / r["layer_seconds"] for r in rows}
  lines = [f"**FLOP model** (`svd_solvers.flops` of the method `--svd {svd}` takes for each weight, leading terms): "
           + "; ".join(f"{name}: {per_layer[name] / 1e12:.2f} TFLOP per layer (2 models)"
                       + (f", measured {rates[name] / 1e9:.1f} GFLOP per CPU-second, {wall_rates[name] / 1e9:.1f} "
                          "per wall-second" if name in rates else "")
                       for name in SHAPES) + "."]
  best, best_wall = max(rates.values()), max(wall_rates.values())
  for name, cfg in SHAPES.items():
    flops = per_layer[name] * cfg["num_hidden_layers"]
    lines.append(f"- {name} at full depth ({cfg['num_hidden_layers']} layers, both models): {flops / 1e15:.3f} "
                 f"PFLOP = {flops / best / 3600:.2f} CPU-hours at the best measured rate ({best / 1e9:.1f} "
                 f"GFLOP/CPU-s), {flops / best_wall / 3600:.2f} h of wall time at the best measured wall rate "
                 f"({best_wall / 1e9:.1f} GFLOP/s).")
  return lines + [""]


def fit(rows: list[dict[str, Any]], field: str) -> dict[str, float]:
  """Least squares of log t = log a + b log P over the shapes (P: one layer's parameters; t: ``field``)."""
  p = np.log([r["layer_params"] for r in rows])
  t = np.log([r[field] for r in rows])
  b, log_a = np.polyfit(p, t, 1)
  predicted = np.exp(log_a + b * p)
  return {"a": float(np.exp(log_a)), "b": float(b),
          "max_rel_residual": float(np.max(np.abs(predicted / np.exp(t) - 1)))}


def write_results(rows: list[dict[str, Any]], law: dict[str, dict[str, float]] | None, out: pathlib.Path,
                  command: str, total_seconds: float) -> str:
  lines = [
      "# Scaling law: decomposition time and peak memory vs model size", "",
      f"Measured {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%dT%H:%M} UTC on {bench_speed.machine()}. "
      f"Load average at the end {os.getloadavg()[0]:.1f} (above ~2 on these 2 cores, other jobs shared them and "
      "wall times include waiting); CPU seconds (all threads of the process) are the steadier measure, and the "
      "CPU fit uses them.",
      "", f"Command: `{command}` (total {total_seconds / 60:.1f} min). Same-shape pairs of synthetic bf16 "
      f"checkpoints (source seed 1 -> target seed 2), r = {RANK}, `--svd {rows[0]['svd']}` (the CLI default), a "
      "rank-16 LoRA; built-in spectrum profile (bench_speed.fallback_profile).", "",
      "| shape | params / layer (7 linear) | layers | per-module CPU s (read + decompose, one model) | "
      "per layer, 2 models: CPU s / wall s | full depth, extrapolated: CPU / wall | CLI run | wall s / CPU s | "
      "peak RSS |",
      "|---|---:|---:|---|---:|---:|---|---:|---:|"]
  for r in rows:
    mods = ", ".join(f"{m.split('_')[0]} {s:.2f}" + ("" if m in r["modules_timed"] else "*")
                     for m, s in r["module_cpu_seconds"].items())
    modules = "all 7 modules" if len(r["cli_modules"]) == 7 else "+".join(r["cli_modules"])
    what = f"{r['cli_method']}, {modules} x {r['layers_written']} layer(s), --chunk_layers 1"
    what += f" ({r['cli_note']})" if r.get("cli_note") else ""
    lines.append(f"| {r['shape']} | {r['layer_params'] / 1e6:.1f} M | {r['layers']} | {mods} | "
                 f"{r['layer_cpu_seconds']:.1f} / {r['layer_seconds']:.1f} | "
                 f"{r['full_decompose_cpu_seconds'] / 60:.1f} / {r['full_decompose_seconds'] / 60:.1f} min | {what} | "
                 f"{r['cli']['seconds']:.1f} / {r['cli']['cpu_seconds']:.1f} | {r['cli']['peak_gib']:.2f} GiB |")
  lines += ["", "\\* not measured: the cost of the module of the same Gram size (o = q, v = k, up = down = gate). "
            "Small shapes: layer 1 timed after layer 0 compiled; 70B: q and k of layer 0, compile included, and "
            "gate from the lora_x CLI run's own read + decompose seconds (its CPU estimated as the process's CPU "
            "less the rest of its wall time). Full depth = layers x per-layer seconds (decomposition only; start-up, "
            "projection and writing add the CLI run's remainder).", ""]
  if law is not None:
    for field, label in (("layer_cpu_seconds", "CPU"), ("layer_seconds", "wall")):
      f = law[field]
      lines.append(f"**Fit, {label}** (per-layer seconds of a transfer vs P = parameters of one layer's 7 "
                   f"linear weights): t = {f['a']:.3g} x P^{f['b']:.3f}; largest relative residual "
                   f"{f['max_rel_residual']:.1%}.")
    lines.append("")
  lines += flop_model_lines(rows)
  big = [r for r in rows if r["shape"] == "70b"]
  if big:
    r = big[0]
    ok = r["cli"]["peak_gib"] * 2**30 / 1e9 <= 8
    lines += [f"**70B-shaped peak host memory:** {r['cli']['peak_gib']:.2f} GiB for the CLI run "
              f"({'meets' if ok else 'misses'} the <= 8 GB target) with `--chunk_layers 1`, decomposing gate_proj "
              "(28672 x 8192, the largest weight) of one layer. The engine holds one chunk of weights at a time, so "
              "a full-depth run peaks at the same chunk plus the adapters held in memory (a rank-16 LoRA on all 7 "
              "modules of 80 layers is ~0.83 GB in float32, once as input and once as output) and the subspaces "
              "of the chunk (U, V of 28672 x 320 and 8192 x 320, float32: ~47 MB per weight).", ""]
  text = "\n".join(lines)
  out.mkdir(parents=True, exist_ok=True)
  (out / "scaling.md").write_text(text)
  (out / "scaling.json").write_text(json.dumps({"rows": rows, "fit": law, "command": command}, indent=1))
  return text


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--shapes", default="0.5b,3b,70b")
  parser.add_argument("--workdir", default="/tmp/crosslora-bench-scaling")
  parser.add_argument("--out", default=str(REPO / "results"))
  parser.add_argument("--keep", action="store_true", help="keep the other shapes' rows from an earlier run")
  parser.add_argument("--rows", help="measure nothing: write the results of these rows.json files (comma-separated)")
  parser.add_argument("--module_times", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--target", help=argparse.SUPPRESS)
  parser.add_argument("--modules", help=argparse.SUPPRESS)
  parser.add_argument("--timed_layer", type=int, default=1, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.module_times:
    module_times_main(args)
    return
  if args.rows:
    rows = sorted((r for f in args.rows.split(",") for r in json.loads(pathlib.Path(f).read_text())),
                  key=lambda r: list(SHAPES).index(r["shape"]))
    law = {f: fit(rows, f) for f in ("layer_cpu_seconds", "layer_seconds")} if len(rows) >= 2 else None
    total = sum(r.get("total_seconds", 0.0) for r in rows)
    commands = "`; `".join(dict.fromkeys(r.get("command", "python scripts/bench_scaling.py") for r in rows))
    print(write_results(rows, law, pathlib.Path(args.out), f"{commands}`, merged by `python "
                        f"scripts/bench_scaling.py --rows {args.rows}", total))
    return
  work = pathlib.Path(args.workdir)
  work.mkdir(parents=True, exist_ok=True)
  t0 = time.perf_counter()
  saved = work / "rows.json"  # every shape measured so far (a later run can add or redo shapes)
  rows = [r for r in (json.loads(saved.read_text()) if saved.exists() and args.keep else [])
          if r["shape"] not in args.shapes.split(",")]
  try:
    for name in args.shapes.split(","):
      t_shape = time.perf_counter()
      rows.append(measure_shape(name, work))
      rows[-1].update(total_seconds=time.perf_counter() - t_shape,
                      command=" ".join(["python scripts/bench_scaling.py"] + sys.argv[1:]))
      rows.sort(key=lambda r: list(SHAPES).index(r["shape"]))
      saved.write_text(json.dumps(rows, indent=1))
  finally:
    for name in SHAPES:
      shutil.rmtree(work / name, ignore_errors=True)
  law = {f: fit(rows, f) for f in ("layer_cpu_seconds", "layer_seconds")} if len(rows) >= 2 else None
  command = " ".join(["python scripts/bench_scaling.py"] + sys.argv[1:])
  print(write_results(rows, law, pathlib.Path(args.out), command, time.perf_counter() - t0))


if __name__ == "__main__":
  main()
