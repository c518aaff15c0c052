"""The README demo: move the shipped example LoRA from SmolLM2-135M to Qwen2.5-Coder-0.5B.

  python scripts/demo.py            # or: make demo (installs first)

1. fetches the three small real models (crosslora_bench.zoo; cached after the first time),
2. runs the transfer CLI on examples/smollm2-pydoc-lora with its default method,
3. prints the report, then the held-out NLL (pydoc text never trained on) of the
   target without and with the transferred adapter, loaded with
   peft.PeftModel.from_pretrained, and the source's own before/after for reference.

By default it scores 32 held-out blocks of 128 tokens (the benchmark's setting) so
the whole demo stays within a few minutes on 2 CPU cores once the models are
cached; --blocks 64 is the model card's setting.
"""

from __future__ import annotations

import argparse
import pathlib
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from crosslora_bench import textdata, zoo  # noqa: E402

SOURCE, TARGET = "smollm2-135m", "qwen2.5-coder-0.5b"
ADAPTER = REPO / "examples" / "smollm2-pydoc-lora"


def heldout_nll(model_dir: pathlib.Path, adapter_dir: pathlib.Path, n_blocks: int):
  """(NLL without the adapter, NLL with it, paired s.e. of the difference) on held-out blocks."""
  import peft
  import torch
  from transformers import AutoModelForCausalLM, AutoTokenizer

  blocks = textdata.heldout_blocks(AutoTokenizer.from_pretrained(model_dir), n=n_blocks, block_size=128)
  base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
  model = peft.PeftModel.from_pretrained(base, str(adapter_dir)).eval()
  with_adapter, per_with = textdata.mean_nll(model, blocks)
  with model.disable_adapter():
    without, per_without = textdata.mean_nll(model, blocks)
  return without, with_adapter, textdata.paired_se(per_with, per_without)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--blocks", type=int, default=32, help="held-out blocks of 128 tokens to score")
  parser.add_argument("--adapter", default=str(ADAPTER), help="a SmolLM2-135M LoRA (default: the shipped example)")
  parser.add_argument("--output", default=str(REPO / "out" / "demo" / "smollm2-pydoc-lora-on-qwen2.5-coder-0.5b"))
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

  shown = adapter.relative_to(REPO) if adapter.is_relative_to(REPO) else adapter
  print(f"\n== 2. transfer {shown}: {SOURCE} -> {TARGET}", flush=True)
  output = pathlib.Path(args.output)
  output.parent.mkdir(parents=True, exist_ok=True)
  cmd = [sys.executable, "-m", "crosslora_jax.transfer", f"--source_model={source_dir}",
         f"--target_model={target_dir}", f"--adapter={adapter}", f"--output={output}",
         f"--report={output.parent / (output.name + '.report.json')}", "--overwrite",
         f"--plot={output.parent / (output.name + '.png')}"]  # the per-layer diagnostics as a picture
  print("$ python -m crosslora_jax.transfer --source_model <zoo>/" + source_dir.name + " --target_model <zoo>/"
        + target_dir.name + f" --adapter {shown} --output {output} --overwrite", flush=True)
  t_transfer = time.perf_counter()
  if subprocess.run(cmd, cwd=REPO).returncode != 0:
    print("demo: the transfer failed (see above)", file=sys.stderr)
    return 1
  t_transfer = time.perf_counter() - t_transfer

  print(f"\n== 3. held-out NLL (nats/token, {args.blocks} blocks x 128 tokens of pydoc text not trained on)",
        flush=True)
  t_eval = time.perf_counter()
  rows = [(f"target {TARGET}", *heldout_nll(target_dir, output, args.blocks)),
          (f"source {SOURCE} (reference)", *heldout_nll(source_dir, adapter, args.blocks))]
  t_eval = time.perf_counter() - t_eval
  print(f"{'model':<42} {'without':>8} {'with':>8} {'change (± s.e.)':>18}")
  for name, without, with_adapter, se in rows:
    print(f"{name:<42} {without:8.4f} {with_adapter:8.4f} {with_adapter - without:+9.4f} (± {se:.4f})")
  (_, t_without, t_with, t_se), (_, s_without, s_with, _) = rows
  change = t_with - t_without
  verdict = "lowers" if change < -2 * t_se else "raises" if change > 2 * t_se else "does not clearly change"
  print(f"\nThe transferred adapter {verdict} the target's held-out NLL ({change:+.4f} nats/token, "
        f"± {t_se:.4f}); on its own source it changes it by {s_with - s_without:+.4f}.")
  print(f"Wall time: transfer {t_transfer:.0f}s, evaluation {t_eval:.0f}s, total {time.perf_counter() - t0:.0f}s. "
        "See results/quality.md for every method and model pair.")
  return 0


if __name__ == "__main__":
  sys.exit(main())
