"""Quick evaluation loop for --method anchored: transfer, then held-out NLL on few blocks.

  python scripts/explore_anchored.py --adapter examples/smollm2-pydoc-lora \
      --targets smollm2-135m,gemma3-270m,qwen2.5-coder-0.5b --blocks 16 \
      --variants anchored,anchored:threshold=0,anchored:threshold=0:shrink=0,cross_lora:cal

Each variant is ``method[:key=value...]`` where keys are AnchorConfig fields, ``cal``
(norm calibration) or ``rank``. The update is merged into the target's weights in place
(W += scaling·B·A), measured, and removed again, so one base model serves every variant.
Prints one line per (target, variant): NLL, the difference to the base with its paired
standard error, gain recovery against the source's own gain, and the guard's decisions.
Results are appended as JSON lines to --out.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from crosslora_jax import TransferConfig, read_adapter, transfer_adapter
from crosslora_jax.methods import anchored
from crosslora_bench import textdata, zoo  # noqa: E402


def parse_variant(text: str) -> tuple[str, TransferConfig]:
  method, *opts = text.split(":")
  anchor, kwargs = {}, {}
  for opt in opts:
    key, _, value = opt.partition("=")
    if key == "cal":
      kwargs["calibrate_norm"] = True
    elif key == "rank":
      kwargs["rank"] = int(value)
    else:
      field = {f.name: f for f in anchored.AnchorConfig.__dataclass_fields__.values()}[key]
      anchor[key] = (value not in ("0", "false")) if field.type in ("bool", bool) else type(
          getattr(anchored.AnchorConfig(), key))(value)
  return text, TransferConfig(method=method, anchor=anchored.AnchorConfig(**anchor), **kwargs)


def merged_nll(model, adapter, blocks) -> tuple[float, np.ndarray]:
  """NLL with ΔW = scaling·B·A added to the base weights, then removed."""
  deltas = []
  for path, pair in adapter.modules.items():
    weight = model.get_parameter(path + ".weight")
    delta = torch.from_numpy(adapter.scaling(path) * (np.asarray(pair.b_or, np.float32) @ np.asarray(pair.a_ri, np.float32)))
    if adapter.config.get("fan_in_fan_out"):
      delta = delta.T
    weight.data += delta
    deltas.append((weight, delta))
  try:
    return textdata.mean_nll(model, blocks)
  finally:
    for weight, delta in deltas:
      weight.data -= delta


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--adapter", required=True)
  parser.add_argument("--source", default="smollm2-135m")
  parser.add_argument("--targets", default="smollm2-135m,gemma3-270m,qwen2.5-coder-0.5b")
  parser.add_argument("--variants", default="anchored")
  parser.add_argument("--blocks", type=int, default=16)
  parser.add_argument("--block_size", type=int, default=128)
  parser.add_argument("--threads", type=int, default=2)
  parser.add_argument("--out", default="/tmp/explore_anchored.jsonl")
  args = parser.parse_args()
  torch.set_num_threads(args.threads)
  from transformers import AutoModelForCausalLM, AutoTokenizer

  source_dir = zoo.model_path(args.source)
  source_adapter = read_adapter(args.adapter)
  src_tok = AutoTokenizer.from_pretrained(source_dir)
  src_model = AutoModelForCausalLM.from_pretrained(source_dir, dtype=torch.float32).eval()
  src_blocks = textdata.heldout_blocks(src_tok, args.blocks, args.block_size)
  src_base, src_base_pb = textdata.mean_nll(src_model, src_blocks)
  src_tuned, _ = merged_nll(src_model, source_adapter, src_blocks)
  del src_model
  print(f"source {args.source}: base {src_base:.4f} -> adapter {src_tuned:.4f} (gain {src_base - src_tuned:.4f})", flush=True)
  for target in args.targets.split(","):
    target_dir = zoo.model_path(target)
    tok = AutoTokenizer.from_pretrained(target_dir)
    model = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    blocks = textdata.heldout_blocks(tok, args.blocks, args.block_size)
    base, base_pb = textdata.mean_nll(model, blocks)
    print(f"{target}: base {base:.4f}", flush=True)
    for text in args.variants.split(","):
      name, config = parse_variant(text)
      t0 = time.perf_counter()
      result = transfer_adapter(source_dir, target_dir, source_adapter, config)
      seconds = time.perf_counter() - t0
      nll, pb = merged_nll(model, result.adapter, blocks)
      guard: dict[str, int] = {}
      for e in result.report.entries:
        guard[e.get("guard", "-")] = guard.get(e.get("guard", "-"), 0) + 1
      p = [e["predicted_transferability"] for e in result.report.entries if "predicted_transferability" in e]
      row = {"source": args.source, "target": target, "variant": name, "nll": nll, "base": base,
             "delta": nll - base, "se": textdata.paired_se(pb, base_pb),
             "recovery_vs_source_gain": (base - nll) / (src_base - src_tuned), "guard": guard,
             "mean_predicted": float(np.mean(p)) if p else None, "seconds": seconds, "blocks": args.blocks}
      print(f"  {name:50s} nll {nll:.4f}  d {nll - base:+.4f} ± {row['se']:.4f}  "
            f"rec {row['recovery_vs_source_gain']:+.2f}  guard {guard}  p̄ {row['mean_predicted']}  {seconds:.0f}s",
            flush=True)
      with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")
    del model


if __name__ == "__main__":
  main()
