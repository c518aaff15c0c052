r"""Speed benchmark on one GPU: the paper-scale transfer on an accelerator.

  python scripts/bench_speed_gpu.py --spectra spectra.json --out results/

The GPU half of ``scripts/bench_speed.py`` (same synthetic Qwen2.5-1.5B -> Llama-3.2-3B
shapes, same generator and spectra, same CLI command lines), sized for a short lease on a
machine that cannot reach the real models: the spectra measured on the real models by
``bench_speed.py`` are passed in as a file. In one run, each a child process timed from
start to exit (so start-up, JAX initialisation, reading the 8.3 GB of bf16 weights and
writing and verifying the adapter are all inside the wall time):

* crosslora_jax on all 28 layers, cold cache, for each --svd method;
* a warm single adapter and a warm batch of 8 with the default method;
* the PyTorch reference (the paper authors' procedure: fp32 SVD of both bases per LoRA
  factor) on the same GPU, on --ref_layers layers, extrapolated to 28.

Writes speed_gpu.json and speed_gpu.md to --out after every step, so a run cut short
still leaves what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import bench_speed as bs  # noqa: E402


def timed(cmd: list[str], logs: pathlib.Path, label: str) -> dict[str, Any]:
  """Runs ``cmd``; wall seconds and the child's own peak RSS (os.wait4: this parent stays small)."""
  logs.mkdir(parents=True, exist_ok=True)
  print(f"[gpu] {label}: {' '.join(cmd)}", file=sys.stderr, flush=True)
  t0 = time.perf_counter()
  with open(logs / f"{label}.out", "w") as out, open(logs / f"{label}.err", "w") as err:
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=err)
    _, status, usage = os.wait4(proc.pid, 0)
  wall = time.perf_counter() - t0
  code = os.waitstatus_to_exitcode(status)
  if code != 0:
    raise RuntimeError(f"{label} failed ({code}): {(logs / f'{label}.err').read_text()[-3000:]}")
  peak = usage.ru_maxrss / 2**20  # KiB -> GiB
  print(f"[gpu] {label}: {wall:.1f} s wall, peak RSS {peak:.2f} GiB", file=sys.stderr, flush=True)
  return {"seconds": wall, "peak_gib": peak, "cpu_seconds": usage.ru_utime + usage.ru_stime,
          "command": " ".join(cmd), "stdout": (logs / f"{label}.out").read_text()}


def _write_model(role: str, folder: str, profiles: dict[str, list[float]], seed: int) -> float:
  t0 = time.perf_counter()
  bs.write_synthetic_model(pathlib.Path(folder), bs.PAPER[role], profiles, seed=seed)
  return time.perf_counter() - t0


def prepare(work: pathlib.Path, profiles: dict[str, list[float]]) -> dict[str, pathlib.Path]:
  """bench_speed.prepare_data, with source and target written in parallel processes."""
  import hashlib
  tag = hashlib.sha256(json.dumps([bs.GENERATOR_VERSION, bs.PAPER, profiles], sort_keys=True).encode()).hexdigest()[:12]
  data = work / f"data-{tag}"
  todo = [(role, seed) for role, seed in (("source", 1), ("target", 2)) if not (data / role / "config.json").exists()]
  if todo:
    with ProcessPoolExecutor(len(todo)) as pool:
      for (role, _), f in zip(todo, [pool.submit(_write_model, role, str(data / role), profiles, seed)
                                     for role, seed in todo]):
        print(f"[gpu] synthetic {role} written in {f.result():.0f} s", file=sys.stderr, flush=True)
  return bs.prepare_data(work, profiles)  # the adapters (and a check that both models are there)


def write(res: dict[str, Any], out: pathlib.Path) -> None:
  out.mkdir(parents=True, exist_ok=True)
  (out / "speed_gpu.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
  n = bs.PAPER["source"]["num_hidden_layers"]
  lines = ["# Speed at paper scale on one GPU", "",
           f"Measured {res['date']} on {res['machine']}.", "",
           f"Command: `{res['command']}`. Synthetic Qwen2.5-1.5B -> Llama-3.2-3B shapes as in `speed.md` "
           f"({n} layers, 7 modules, r = {bs.RANK}, a rank-16 LoRA), bf16 sharded safetensors written on that machine "
           "just before (so read from the page cache). Wall time = the whole CLI process.", "",
           "| run | wall time | peak host RSS |", "|---|---:|---:|"]
  for label, r in res["runs"].items():
    if label == "reference":
      continue
    lines.append(f"| {label} | {r['seconds']:.1f} s | {r['peak_gib']:.2f} GiB |")
  ref = res["runs"].get("reference")
  if ref:
    full = ref["loop_seconds"] / len(ref["layers"]) * n
    lines.append(f"| PyTorch reference on {ref['device']}: {len(ref['layers'])} layer(s) measured "
                 f"({ref['loop_seconds']:.1f} s loop), 28 extrapolated | {full:.1f} s | {ref['peak_gib']:.2f} GiB |")
    for label, r in res["runs"].items():
      if label.startswith("cold"):
        lines.append(f"\nReference / crosslora_jax `{label}`: {full / r['seconds']:.1f}x.")
  if "warm1" in res["runs"] and "warm8" in res["runs"]:
    w1, w8 = res["runs"]["warm1"]["seconds"], res["runs"]["warm8"]["seconds"]
    lines.append(f"\nExtra adapter with a warm cache: ({w8:.1f} s - {w1:.1f} s) / 7 = {(w8 - w1) / 7:.2f} s.")
  if res.get("notes"):
    lines += ["", *res["notes"]]
  (out / "speed_gpu.md").write_text("\n".join(lines) + "\n")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--spectra", required=True, help="spectra.json written by bench_speed.py (real-model decay)")
  parser.add_argument("--workdir", default="/tmp/crosslora_bench_speed")
  parser.add_argument("--out", default=str(REPO / "results"))
  parser.add_argument("--methods", default="gram,randomized,exact", help="cold whole-model runs, in this order")
  parser.add_argument("--ref_layers", default="0")
  parser.add_argument("--ref_device", default="cuda")
  parser.add_argument("--tiny", action="store_true", help="small shapes: a smoke test of this script on any machine")
  parser.add_argument("--layers", type=int, default=None, help="layers per model (default: the paper's 28)")
  parser.add_argument("--profile", default=None, help="cProfile the first cold run; write its top functions here")
  parser.add_argument("--skip_reference", action="store_true")
  args = parser.parse_args()
  import platform
  if args.tiny:
    for role, (h, ffn) in (("source", (128, 320)), ("target", (256, 384))):
      bs.PAPER[role].update(num_hidden_layers=4, hidden_size=h, intermediate_size=ffn, num_attention_heads=h // 32,
                            num_key_value_heads=1, head_dim=32)
    bs.RANK = 32
  if args.layers:
    for role in ("source", "target"):
      bs.PAPER[role]["num_hidden_layers"] = args.layers
  spectra = json.loads(pathlib.Path(args.spectra).read_text())
  spectra = spectra.get("spectra", spectra)
  work = pathlib.Path(args.workdir)
  t0 = time.perf_counter()
  paths = prepare(work, spectra["mean"])
  try:
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip()
  except OSError:
    gpu = "no nvidia-smi"
  res: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                         "machine": f"{gpu}; {os.cpu_count()} CPU cores; {platform.platform()}",
                         "command": "python scripts/bench_speed_gpu.py " + " ".join(sys.argv[1:]),
                         "prepare_seconds": time.perf_counter() - t0, "runs": {}, "notes": []}
  import jax
  res["jax"] = f"jax {jax.__version__}, devices {jax.devices()}"
  write(res, pathlib.Path(args.out))
  src, tgt, runs, logs = paths["source"], paths["target"], work / "runs", work / "logs"
  runs.mkdir(parents=True, exist_ok=True)
  out = pathlib.Path(args.out)
  methods = args.methods.split(",")
  d = methods[0]

  def cold(method):
    cmd = bs.cli(src, tgt, runs / method, runs / f"cache-{method}", adapter=paths["adapter"], svd=method)
    prof = None
    if args.profile and not res["runs"]:
      prof = runs / "cold.prof"
      cmd = [cmd[0], "-m", "cProfile", "-o", str(prof)] + cmd[1:]
    res["runs"][f"cold {method}"] = timed(cmd, logs, f"cold-{method}")
    write(res, out)
    if prof is not None:
      import io
      import pstats
      for sort in ("cumulative", "tottime"):
        text = io.StringIO()
        pstats.Stats(str(prof), stream=text).sort_stats(sort).print_stats(45)
        pathlib.Path(f"{args.profile}.{sort}.txt").write_text(text.getvalue())

  for method in methods:  # exact, the slowest, last: a cut-short run keeps the rest
    if method != "exact":
      cold(method)
  res["runs"]["warm1"] = timed(bs.cli(src, tgt, runs / "warm1", runs / f"cache-{d}", adapter=paths["batch"] / "a1",
                                      svd=d), logs, "warm1")
  res["runs"]["warm8"] = timed(bs.cli(src, tgt, runs / "warm8", runs / f"cache-{d}", adapter_dir=paths["batch"],
                                      svd=d), logs, "warm8")
  write(res, out)
  if args.skip_reference:
    return
  ref = timed([sys.executable, str(REPO / "scripts" / "bench_speed.py"), "--reference", f"--source={src}",
               f"--target={tgt}", f"--adapter={paths['adapter']}", f"--ref_layers={args.ref_layers}",
               f"--ref_device={args.ref_device}"], logs, "reference")
  ref.update(json.loads(ref["stdout"].strip().splitlines()[-1]))
  res["runs"]["reference"] = ref
  write(res, out)
  if "exact" in methods:
    cold("exact")
    acc = {m: {"angle_deg": bs.subspace_errors(runs / "cache-exact", runs / f"cache-{m}"),
               "dw_rel": bs.dw_differences(runs / "exact", runs / m)} for m in methods if m != "exact"}
    res["accuracy_vs_exact"] = acc
    for m, a in acc.items():
      res["notes"].append(f"- {m} vs exact (this GPU, all 28 layers): worst principal angle "
                          f"{max(a['angle_deg'].values()):.3g} deg, worst ΔW_t difference "
                          f"{100 * max(a['dw_rel'].values()):.3g}%")
  write(res, pathlib.Path(args.out))
  print((pathlib.Path(args.out) / "speed_gpu.md").read_text())


if __name__ == "__main__":
  main()
