"""JAX (crosslora_jax.lm) against torch + transformers on this CPU: scoring, LoRA training, generation.

  python scripts/bench_lm.py                                  # every model, every section
  python scripts/bench_lm.py --models smollm2-135m --repeats 2 --length 128
  python scripts/bench_lm.py --sections train_check           # only the JAX-vs-torch training check

Every measurement runs in its own child process (so peak RSS is that one job's,
read from wait4's rusage), JAX and torch one after the other on the same model
with the same sizes in the same run. Compile time (JAX: tracing + XLA; torch: the
first, warm-up call) is reported apart from the steady state (median of
``--repeats`` timed calls).

Sections:
  forward   next-token log-probs of a (batch, length) block: JAX ``LM.token_logprobs``
            (vocabulary-chunked), torch ``model(ids).logits`` + log_softmax gather;
  train     one LoRA step (r 16, alpha 32, the 7 modules, AdamW, clip 1.0): JAX
            ``train_lora``, torch peft + torch.optim.AdamW;
  generate  greedy, ``--gen-batch`` prompts of ``--gen-prompt`` tokens, exactly
            ``--gen-new`` new tokens: JAX ``LM.generate``, torch ``model.generate``;
  train_check  the shipped example's recipe (scripts/train_example_adapter.py) with
            the JAX trainer on SmolLM2; its saved adapter is scored by torch + peft on
            the held-out pydoc blocks next to the shipped torch-trained adapter, and
            its logits are compared with the JAX model's.

Writes results/lm.json (sections merged with an existing file) and results/lm.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODELS = ("smollm2-135m", "qwen2.5-coder-0.5b", "gemma3-270m")
SECTIONS = ("forward", "train", "generate", "train_check")
SEVEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
EXAMPLE = REPO / "examples" / "smollm2-pydoc-lora"


def _timed(fn, repeats):
  """(first call seconds, median of ``repeats`` more calls)."""
  start = time.perf_counter()
  fn()
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return first, statistics.median(times)


def _ids(vocab, shape, seed=0):
  import numpy as np

  return np.random.default_rng(seed).integers(0, vocab, size=shape)


# --- JAX children -----------------------------------------------------------------------------------

def jax_forward(folder, args):
  import jax

  from crosslora_jax import lm as jlm

  model = jlm.load(folder, dtype=args.dtype)
  ids = _ids(model.config.vocab_size, (args.batch, args.length))
  first, steady = _timed(lambda: jax.block_until_ready(model.token_logprobs(ids)), args.repeats)
  return {"tokens_per_s": args.batch * args.length / steady, "compile_s": first - steady, "step_s": steady}


def jax_train(folder, args):
  from crosslora_jax import lm as jlm
  from crosslora_jax.lm.train import TrainConfig, train_lora

  model = jlm.load(folder, dtype=args.dtype)
  blocks = _ids(model.config.vocab_size, (64, args.train_length))
  config = TrainConfig(steps=args.repeats + 1, batch=args.train_batch, lr=1e-4, grad_accum=args.grad_accum)
  spec = jlm.LoraSpec(r=16, alpha=32, target_modules=SEVEN)
  result = train_lora(model, blocks, config, spec=spec, progress=False)
  step = result.seconds / config.steps
  return {"tokens_per_s": args.train_batch * args.train_length / step, "compile_s": result.compile_seconds,
          "step_s": step, "compiled_step_gb": result.memory_bytes / 1e9}


def jax_generate(folder, args):
  from crosslora_jax import lm as jlm

  model = jlm.load(folder, dtype=args.dtype)
  prompts = _ids(model.config.vocab_size, (args.gen_batch, args.gen_prompt)).tolist()
  out = []
  first, steady = _timed(lambda: out.append(model.generate(prompts, max_new_tokens=args.gen_new, eos_ids=())),
                         args.gen_repeats)
  assert all(len(row) == args.gen_new for row in out[-1])
  return {"tokens_per_s": args.gen_batch * args.gen_new / steady, "compile_s": first - steady, "call_s": steady}


class _HFLikeTokenizer:
  """The two things crosslora_bench.textdata asks of a tokenizer, from crosslora_jax's own."""

  def __init__(self, tokenizer):
    self.tok = tokenizer
    self.eos_token_id = tokenizer.eos_id

  def __call__(self, text, add_special_tokens=True):
    ids = self.tok.encode(text) if add_special_tokens else self.tok.encode(text, add_bos=False, add_eos=False)
    return {"input_ids": ids}


def jax_train_check(folder, args):
  import numpy as np

  from crosslora_bench import textdata
  from crosslora_jax import lm as jlm
  from crosslora_jax.lm.train import TrainConfig, train_lora

  model = jlm.load(folder)
  tokenizer = _HFLikeTokenizer(model.tokenizer)
  blocks = textdata.token_blocks(tokenizer, textdata.train_texts(), 128).numpy()
  heldout = textdata.heldout_blocks(tokenizer, n=args.heldout, block_size=128).numpy()
  config = TrainConfig(steps=16, batch=8, lr=4e-3, warmup=1, schedule="cosine", weight_decay=0.0, clip_norm=1.0,
                       seed=0, grad_accum=args.check_accum)
  spec = jlm.LoraSpec(r=8, alpha=16, target_modules=SEVEN)
  out = pathlib.Path(args.workdir) / "jax-adapter"
  result = train_lora(model, blocks, config, spec=spec, output=out, progress=True)
  trained = model.with_lora(result.lora, result.spec)
  nll = np.concatenate([np.asarray(trained.nll(heldout[i:i + 8])) for i in range(0, len(heldout), 8)])
  np.save(pathlib.Path(args.workdir) / "jax-logits.npy", np.asarray(trained.logits(heldout[:2])))
  np.save(pathlib.Path(args.workdir) / "heldout.npy", heldout)
  np.save(pathlib.Path(args.workdir) / "train-blocks-head.npy", blocks[:32])
  return {"train_blocks": int(blocks.shape[0]), "losses": result.losses, "train_s": result.seconds,
          "compile_s": result.compile_seconds, "heldout_nll_jax": float(nll.mean()), "adapter": str(out)}


# --- torch children ---------------------------------------------------------------------------------

def _torch_model(folder, args):
  import torch
  from transformers import AutoModelForCausalLM

  torch.set_num_threads(args.threads)
  dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
  return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()


def torch_forward(folder, args):
  import torch

  model = _torch_model(folder, args)
  ids = torch.tensor(_ids(model.config.vocab_size, (args.batch, args.length)))

  def score():
    with torch.no_grad():
      logits = model(input_ids=ids).logits
      return torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])

  first, steady = _timed(score, args.repeats)
  return {"tokens_per_s": args.batch * args.length / steady, "compile_s": first - steady, "step_s": steady}


def torch_train(folder, args):
  import torch
  from peft import LoraConfig, get_peft_model

  model = _torch_model(folder, args)
  model.config.use_cache = False
  model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=list(SEVEN),
                                           task_type="CAUSAL_LM"))
  model.train()
  params = [p for p in model.parameters() if p.requires_grad]
  optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
  blocks = torch.tensor(_ids(model.config.vocab_size, (64, args.train_length)))
  generator = torch.Generator().manual_seed(0)
  accum = args.grad_accum

  def step():
    batch = blocks[torch.randint(0, 64, (args.train_batch,), generator=generator)]
    for micro in batch.chunk(accum):
      (model(input_ids=micro, labels=micro).loss / accum).backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

  first, steady = _timed(step, args.repeats)
  return {"tokens_per_s": args.train_batch * args.train_length / steady, "compile_s": first - steady,
          "step_s": steady}


def torch_generate(folder, args):
  import torch

  model = _torch_model(folder, args)
  ids = torch.tensor(_ids(model.config.vocab_size, (args.gen_batch, args.gen_prompt)))
  pad = model.generation_config.pad_token_id
  pad = pad if pad is not None else 0

  def run():
    with torch.no_grad():
      out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.gen_new,
                           min_new_tokens=args.gen_new, do_sample=False, pad_token_id=pad)
    assert out.shape[1] == args.gen_prompt + args.gen_new

  first, steady = _timed(run, args.gen_repeats)
  return {"tokens_per_s": args.gen_batch * args.gen_new / steady, "compile_s": first - steady, "call_s": steady}


def torch_train_check(folder, args):
  import numpy as np
  import torch
  from peft import PeftModel

  from crosslora_bench import textdata

  work = pathlib.Path(args.workdir)
  heldout = torch.tensor(np.load(work / "heldout.npy"))
  scores = {}
  for name, adapter in (("jax", work / "jax-adapter"), ("torch_example", EXAMPLE)):
    model = PeftModel.from_pretrained(_torch_model(folder, args), str(adapter)).eval()
    scores[name] = textdata.mean_nll(model, heldout)[1]
    if name == "jax":
      with torch.no_grad():
        theirs = model(input_ids=heldout[:2]).logits.numpy()
      ours = np.load(work / "jax-logits.npy")
      logit_error = float(np.abs(theirs - ours).max() / np.abs(theirs).max())
      argmax = float((theirs.argmax(-1) == ours.argmax(-1)).mean())
    del model
  base = textdata.mean_nll(_torch_model(folder, args), heldout)[1]
  from transformers import AutoTokenizer

  head = np.load(work / "train-blocks-head.npy")
  torch_blocks = textdata.token_blocks(AutoTokenizer.from_pretrained(folder), textdata.train_texts(), 128)
  return {"train_blocks_equal_transformers": bool((torch_blocks[:len(head)].numpy() == head).all()),
          "heldout_nll_base": float(base.mean()), "heldout_nll_jax_adapter": float(scores["jax"].mean()),
          "heldout_nll_torch_example": float(scores["torch_example"].mean()),
          "delta_jax_minus_torch": float(scores["jax"].mean() - scores["torch_example"].mean()),
          "paired_se": textdata.paired_se(scores["jax"], scores["torch_example"]),
          "peft_logit_max_rel_error": logit_error, "peft_argmax_agreement": argmax}


CHILDREN = {(f, s): globals()[f"{f}_{s}"] for f in ("jax", "torch") for s in SECTIONS}


# --- parent -----------------------------------------------------------------------------------------

def run_child(framework, section, model, args):
  """Runs one measurement in a fresh process; returns its result dict with peak_rss_gb (or an error)."""
  command = [sys.executable, __file__, "--child", framework, section, model] + args.passthrough
  env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  start = time.perf_counter()
  process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=None, env=env, text=True)
  output = process.stdout.read()
  _, status, usage = os.wait4(process.pid, 0)
  process.returncode = os.waitstatus_to_exitcode(status)
  lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
  result = json.loads(lines[-1][7:]) if lines and process.returncode == 0 else {
      "error": f"exit {process.returncode}: {output.strip().splitlines()[-1:] or ''}"}
  result.update(peak_rss_gb=usage.ru_maxrss * 1024 / 1e9, wall_s=time.perf_counter() - start)
  print(f"[bench_lm] {model} {section} {framework}: {json.dumps(_short(result))}", file=sys.stderr, flush=True)
  return result


def _short(result):
  return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in result.items() if k != "losses"}


def child_main(framework, section, model, args):
  from crosslora_bench import zoo

  folder = str(zoo.fetch_model(model, progress=lambda message: None))
  result = CHILDREN[framework, section](folder, args)
  print("RESULT " + json.dumps(result), flush=True)
  return 0


def _ratio(jax_value, torch_value):
  return None if not jax_value or not torch_value else jax_value / torch_value


def write_results(results, meta, out):
  path = out / "lm.json"
  old = json.loads(path.read_text()) if path.is_file() else {}
  merged = {"meta": {**old.get("meta", {}), **meta}, "runs": {**old.get("runs", {}), **results}}
  out.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(merged, indent=2, sort_keys=True) + "\n")
  (out / "lm.md").write_text(markdown(merged))
  return merged


def _speed_rows(runs):
  rows = ["| model | section | JAX tok/s | torch tok/s | JAX / torch | JAX compile s | torch warm-up s "
          "| JAX peak RSS GB | torch peak RSS GB |", "|---|---|---|---|---|---|---|---|---|"]
  for key, run in sorted(runs.items()):
    if run.get("section") == "train_check":
      continue
    j, t = run.get("jax", {}), run.get("torch", {})
    ratio = _ratio(j.get("tokens_per_s"), t.get("tokens_per_s"))

    def cell(d, k, fmt="{:.1f}"):
      return fmt.format(d[k]) if isinstance(d.get(k), (int, float)) else d.get("error", "-")

    rows.append(f"| {run['model']} | {run['section']} | {cell(j, 'tokens_per_s')} | {cell(t, 'tokens_per_s')} | "
                f"{'-' if ratio is None else f'{ratio:.2f}x'} | {cell(j, 'compile_s')} | {cell(t, 'compile_s')} | "
                f"{cell(j, 'peak_rss_gb', '{:.2f}')} | {cell(t, 'peak_rss_gb', '{:.2f}')} |")
  return rows


def _check_rows(runs):
  run = runs.get("smollm2-135m/train_check")
  if not run:
    return []
  j, t = run.get("jax", {}), run.get("torch", {})
  if "error" in j or "error" in t:
    return ["", f"Training check failed: {j.get('error') or t.get('error')}"]
  verdict = "within" if abs(t["delta_jax_minus_torch"]) <= 0.02 else "NOT within"
  return [
      "", "## Training check: the example's recipe with the JAX trainer (SmolLM2-135M)", "",
      "16 steps x 8 blocks x 128 tokens, lr 4e-3 (1 warm-up step, cosine), clip 1.0, AdamW wd 0, seed 0, "
      "LoRA r 8 / alpha 16 on the 7 modules (the shipped adapter's recipe), fp32. Blocks tokenized by "
      f"crosslora_jax's tokenizer ({j['train_blocks']} training blocks; equal to transformers' blocks: "
      f"{t['train_blocks_equal_transformers']}). Held-out NLL by torch + peft on {run['heldout']} held-out blocks:", "",
      "| adapter | held-out NLL |", "|---|---|",
      f"| none (base) | {t['heldout_nll_base']:.4f} |",
      f"| shipped example (torch-trained, fp16) | {t['heldout_nll_torch_example']:.4f} |",
      f"| JAX-trained, saved by save_adapter, loaded in peft.PeftModel | {t['heldout_nll_jax_adapter']:.4f} |",
      f"| JAX-trained, scored in JAX | {j['heldout_nll_jax']:.4f} |", "",
      f"JAX - torch: {t['delta_jax_minus_torch']:+.4f} nats (paired s.e. {t['paired_se']:.4f}), {verdict} 0.02. "
      f"The saved adapter in peft vs the JAX model: max |dlogit| / max |logit| = {t['peft_logit_max_rel_error']:.2e}, "
      f"argmax agreement {t['peft_argmax_agreement']:.4f}. JAX training {j['train_s']:.0f} s + compile "
      f"{j['compile_s']:.0f} s; losses {', '.join(f'{x:.3f}' for x in j['losses'])}.", "",
      f"Command: `{run.get('command')}` ({run.get('date')}), on the shared machine."]


def markdown(merged):
  meta = merged["meta"]
  lines = ["# crosslora_jax.lm against torch + transformers (CPU)", "",
           f"Machine: {meta.get('cpus')} CPUs, {meta.get('platform')}; jax {meta.get('jax')}, torch {meta.get('torch')}, "
           f"transformers {meta.get('transformers')}. **The machine was shared with other jobs during the run** "
           f"(load average {meta.get('load_before')} before, {meta.get('load_after')} after), so absolute timings are "
           "noisy; JAX and torch ran back to back on the same model and sizes, so compare the ratios.", "",
           f"Command: `{meta.get('command')}` ({meta.get('date')}).", "",
           f"Sizes: forward {meta.get('forward_shape')}, train {meta.get('train_shape')} (LoRA r 16 / alpha 32 on the "
           f"7 modules), generate {meta.get('generate_shape')}; steady state = median of {meta.get('repeats')} calls; "
           "compile = first call minus steady (torch: its warm-up call). Peak RSS = the child process's ru_maxrss.", ""]
  return "\n".join(lines + _speed_rows(merged["runs"]) + _check_rows(merged["runs"])) + "\n"


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default=",".join(MODELS))
  parser.add_argument("--sections", default=",".join(SECTIONS))
  parser.add_argument("--frameworks", default="jax,torch")
  sizes = parser.add_argument_group("sizes (passed to the children)")
  sizes.add_argument("--batch", type=int, default=8)
  sizes.add_argument("--length", type=int, default=256)
  sizes.add_argument("--train-batch", type=int, default=8)
  sizes.add_argument("--train-length", type=int, default=256)
  sizes.add_argument("--grad-accum", type=int, default=1)
  sizes.add_argument("--gen-batch", type=int, default=16)
  sizes.add_argument("--gen-prompt", type=int, default=32)
  sizes.add_argument("--gen-new", type=int, default=128)
  sizes.add_argument("--repeats", type=int, default=3)
  sizes.add_argument("--gen-repeats", type=int, default=1)
  sizes.add_argument("--heldout", type=int, default=64)
  sizes.add_argument("--check-accum", type=int, default=1)
  sizes.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  sizes.add_argument("--threads", type=int, default=2)
  sizes.add_argument("--workdir", default=None)
  parser.add_argument("--out", default=str(REPO / "results"))
  parser.add_argument("--child", nargs=3, metavar=("FRAMEWORK", "SECTION", "MODEL"), help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  args.passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
  return args


def main(argv=None):
  args = parse_args(argv)
  if args.child:
    return child_main(*args.child, args)
  import jax
  import torch
  import transformers

  models, sections = args.models.split(","), args.sections.split(",")
  unknown = [m for m in models if m not in MODELS] + [s for s in sections if s not in SECTIONS]
  if unknown:
    print(f"bench_lm: --models/--sections: names from {MODELS} / {SECTIONS} expected, got {unknown}.", file=sys.stderr)
    return 2
  meta = {"command": "python scripts/bench_lm.py " + " ".join(sys.argv[1:] if argv is None else argv),
          "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "cpus": os.cpu_count(), "platform": platform.platform(), "jax": jax.__version__, "torch": torch.__version__,
          "transformers": transformers.__version__, "load_before": round(os.getloadavg()[0], 1),
          "forward_shape": f"{args.batch} x {args.length}", "train_shape": f"{args.train_batch} x {args.train_length}"
          f" (grad_accum {args.grad_accum})", "generate_shape": f"{args.gen_batch} prompts x {args.gen_prompt} + "
          f"{args.gen_new} new", "repeats": args.repeats}
  results = {}
  with tempfile.TemporaryDirectory(prefix="bench_lm-") as work:
    args.passthrough += ["--workdir", work]
    for model in models:
      for section in sections:
        if section == "train_check" and model != "smollm2-135m":
          continue
        run = {"model": model, "section": section, "command": meta["command"], "date": meta["date"]}
        if section == "train_check":
          run["heldout"] = args.heldout
        for framework in args.frameworks.split(","):
          run[framework] = run_child(framework, section, model, args)
        results[f"{model}/{section}"] = run
        meta["load_after"] = round(os.getloadavg()[0], 1)
        write_results(results, meta, pathlib.Path(args.out))  # after every run: a cut-short run keeps its part
  meta["load_after"] = round(os.getloadavg()[0], 1)
  print(markdown(write_results(results, meta, pathlib.Path(args.out))))
  return 0


if __name__ == "__main__":
  sys.exit(main())
