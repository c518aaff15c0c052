"""The README demo: move the shipped example LoRA from SmolLM2-135M to Qwen2.5-Coder-0.5B, then refine it.

  python scripts/demo.py               # or: make demo (installs first)
  python scripts/demo.py --no_refine   # the projection only (make demo-fast)

1. fetches the three small real models (crosslora_bench.zoo; cached after the first time),
2. runs the transfer CLI on examples/smollm2-pydoc-lora with its default method
   (the projection), then, unless --no_refine, twice with ``--refine distill`` at the
   RefineConfig defaults: from the projection and from a zero-init LoRA (the second
   run reads the teacher's text from the corpus cache the first one wrote),
3. prints the held-out NLL (pydoc text never trained on, never shown to the teacher) of
   the target base and of every adapter, loaded with peft.PeftModel.from_pretrained,
   the source's own before/after for reference, and the wall time of each run.

By default it scores 32 held-out blocks of 128 tokens (the benchmark's setting);
--blocks 64 is the model card's setting.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from crosslora_bench import textdata, zoo  # noqa: E402

SOURCE, TARGET = "smollm2-135m", "qwen2.5-coder-0.5b"
ADAPTER = REPO / "examples" / "smollm2-pydoc-lora"
# (row name, output suffix, extra CLI flags): the projection, then refine from it and from zero.
RUNS = (("projection only", "", ()),
        ("projection + refine", "-refine", ("--refine=distill", "--refine_init=projection")),
        ("zero-init + refine", "-refine-zero", ("--refine=distill", "--refine_init=zero")))


def heldout_nlls(model_dir: pathlib.Path, adapters: dict[str, pathlib.Path], n_blocks: int):
  """{"base": (NLL, per-block)} and {name: (NLL, per-block)} for each adapter, one base model loaded."""
  import peft
  import torch
  from transformers import AutoModelForCausalLM, AutoTokenizer

  blocks = textdata.heldout_blocks(AutoTokenizer.from_pretrained(model_dir), n=n_blocks, block_size=128)
  base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
  names = list(adapters)
  model = peft.PeftModel.from_pretrained(base, str(adapters[names[0]]), adapter_name=names[0]).eval()
  for name in names[1:]:
    model.load_adapter(str(adapters[name]), adapter_name=name)
  out = {}
  with model.disable_adapter():
    out["base"] = textdata.mean_nll(model, blocks)
  for name in names:
    model.set_adapter(name)
    out[name] = textdata.mean_nll(model, blocks)
  return out


def transfer(source_dir, target_dir, adapter, output: pathlib.Path, extra) -> tuple[float, dict]:
  """Runs the CLI; returns (wall seconds, its report); exits the demo when it fails."""
  report = output.parent / (output.name + ".report.json")
  cmd = [sys.executable, "-m", "crosslora_jax.transfer", f"--source_model={source_dir}",
         f"--target_model={target_dir}", f"--adapter={adapter}", f"--output={output}", f"--report={report}",
         "--overwrite", f"--plot={output.parent / (output.name + '.png')}", *extra]
  print("$ python -m crosslora_jax.transfer --source_model <zoo>/" + source_dir.name + " --target_model <zoo>/"
        + target_dir.name + f" --adapter {_shown(adapter)} --output {output} --overwrite " + " ".join(extra), flush=True)
  start = time.perf_counter()
  if subprocess.run(cmd, cwd=REPO).returncode != 0:
    print("demo: the transfer failed (see above)", file=sys.stderr)
    sys.exit(1)
  return time.perf_counter() - start, json.loads(report.read_text())


def _shown(path: pathlib.Path):
  return path.relative_to(REPO) if path.is_relative_to(REPO) else path


def _refine_defaults() -> str:
  from crosslora_jax.refine import RefineConfig
  c = RefineConfig()
  return (f"{c.tokens} teacher tokens ({c.samples} samples of {c.sample_tokens}, {c.heldout_samples} held back), "
          f"{c.steps} steps x {c.batch} sequences at lr {c.lr:g}, {c.selection} {c.fraction:g}, loss {c.loss}, "
          f"check {c.check}")


def _print_table(rows, nll, base_name, seconds, reports):
  base, per_base = nll["base"]
  print(f"{'target ' + base_name:<34} {'NLL':>8} {'change (± s.e.)':>19} {'wall':>6}  shipped")
  print(f"{'base (no adapter)':<34} {base:8.4f} {'':>19} {'':>6}")
  for name in rows:
    value, per = nll[name]
    refine = reports[name].get("refine")
    shipped = "" if refine is None else f"{refine['shipped']} ({refine['guard']})"
    print(f"{name:<34} {value:8.4f} {value - base:+9.4f} (± {textdata.paired_se(per, per_base):.4f}) "
          f"{seconds[name]:5.0f}s  {shipped}")


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--blocks", type=int, default=32, help="held-out blocks of 128 tokens to score")
  parser.add_argument("--adapter", default=str(ADAPTER), help="a SmolLM2-135M LoRA (default: the shipped example)")
  parser.add_argument("--output", default=str(REPO / "out" / "demo" / "smollm2-pydoc-lora-on-qwen2.5-coder-0.5b"))
  parser.add_argument("--no_refine", action="store_true", help="the projection only (the fast demo)")
  parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
  args = parser.parse_args(argv)
  t0 = time.perf_counter()
  adapter = pathlib.Path(args.adapter).resolve()
  if not (adapter / "adapter_model.safetensors").exists():
    print(f"demo: {adapter}: a PEFT adapter folder expected, got none. "
          "Run scripts/train_example_adapter.py for the shipped example.", file=sys.stderr)
    return 2
  import torch

  if args.threads:
    torch.set_num_threads(args.threads)
  print("== 1. real models (crosslora_bench.zoo)", flush=True)
  try:
    dirs = {name: zoo.fetch_model(name) for name in zoo.DEFAULT_MODELS}
  except zoo.ZooError as e:
    print(f"demo: {e}", file=sys.stderr)
    return 2
  source_dir, target_dir = dirs[SOURCE], dirs[TARGET]
  runs = RUNS[:1] if args.no_refine else RUNS
  print(f"\n== 2. transfer {_shown(adapter)}: {SOURCE} -> {TARGET}", flush=True)
  if not args.no_refine:
    print(f"refine at the RefineConfig defaults: {_refine_defaults()}", flush=True)
  output = pathlib.Path(args.output)
  output.parent.mkdir(parents=True, exist_ok=True)
  folders, seconds, reports = {}, {}, {}
  for name, suffix, extra in runs:
    print(f"\n-- {name}", flush=True)
    folders[name] = output.with_name(output.name + suffix)
    seconds[name], reports[name] = transfer(source_dir, target_dir, adapter, folders[name], extra)

  print(f"\n== 3. held-out NLL (nats/token, {args.blocks} blocks x 128 tokens of pydoc text not trained on)",
        flush=True)
  t_eval = time.perf_counter()
  target_nll = heldout_nlls(target_dir, folders, args.blocks)
  source_nll = heldout_nlls(source_dir, {"adapter": adapter}, args.blocks)
  t_eval = time.perf_counter() - t_eval
  _print_table([name for name, _, _ in runs], target_nll, TARGET, seconds, reports)
  (s_without, per_without), (s_with, per_with) = source_nll["base"], source_nll["adapter"]
  print(f"{'source ' + SOURCE + ' + its adapter':<34} {s_with:8.4f} {s_with - s_without:+9.4f} "
        f"(± {textdata.paired_se(per_with, per_without):.4f})   (its base: {s_without:.4f}, the gain to move)")
  print(f"\nWall time: {', '.join(f'{n} {s:.0f}s' for n, s in seconds.items())}, evaluation {t_eval:.0f}s, "
        f"total {time.perf_counter() - t0:.0f}s. See results/quality.md and results/refine.md for every arm.")
  return 0


if __name__ == "__main__":
  sys.exit(main())
