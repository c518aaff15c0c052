"""Quality benchmark: does a transferred adapter help the target model on held-out text?

  python scripts/bench_quality.py                       # everything (hours on 2 CPU cores)
  python scripts/bench_quality.py --pairs smollm2:smollm2 --blocks 32
  python scripts/bench_quality.py --report_only         # rebuild results/ from the cache
  python scripts/bench_quality.py --pairs smollm2:qwen05 --methods none --refine_arms delta,random-delta
                                                        # + refine arms (scripts/bench_refine.py, results/refine.md)

For each (source -> target) pair and method, the target's mean token NLL on the
held-out pydoc text (crosslora_bench.textdata) with the transferred adapter, against
the target's base NLL and against a LoRA trained directly on the target with the
same recipe as the source adapter (the upper bound):

  gain recovery = (NLL_base - NLL_method) / (NLL_base - NLL_trained)

Adapters are evaluated by merging ΔW = scaling · B A into a float32 copy of the
base (factors first rounded to the dtype the CLI would write, float16), which is
what PEFT computes; the self pair checks this against PeftModel.from_pretrained.
The random control draws Gaussian factors of the same LoRA rank per module and
scales each ΔW to the Frobenius norm of cross_lora's ΔW for that module.
``<method>+cal`` is the engine's ``calibrate_norm`` option: each module rescaled so
that ‖ΔW_t‖/‖W_t‖ = ‖ΔW_s‖/‖W_s‖ ("norm-calibrated").

Everything expensive is cached under --cache_dir (trained LoRAs, every NLL with
its per-block values), so the benchmark can be run in pieces with --pairs /
--methods and resumed; results/ is rewritten from the whole cache each time.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import os
import pathlib
import platform
import sys
import time
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from crosslora_jax import methods as method_registry  # noqa: E402
from crosslora_bench import textdata, zoo  # noqa: E402

MODELS = {  # short name -> zoo name
    "smollm2": "smollm2-135m",
    "qwen05": "qwen2.5-coder-0.5b",
    "gemma": "gemma3-270m",
    "qwen15": "qwen2.5-coder-1.5b",
}
EXAMPLE_ADAPTER = REPO / "examples" / "smollm2-pydoc-lora"
# The example adapter's recipe (scripts/train_example_adapter.py defaults): every trained
# LoRA of this benchmark (sources for the other directions, upper bounds) uses it.
RECIPE = dict(steps=16, lr=4e-3, batch_size=8, block_size=128, seed=0, r=8, alpha=16)
PAIRS = ("smollm2:smollm2", "smollm2:qwen05", "smollm2:gemma", "qwen05:smollm2", "gemma:smollm2",
         "qwen05:gemma", "gemma:qwen05", "qwen05:qwen15")
RANK_SWEEP = ("320", "full", "64", "160")  # run order: the default, the exact check, then lower ranks
BASE_METHODS = ("cross_lora", "lora_x", "copy", "truncate_pad", "random")


# Bench-only variants of engine methods: name -> (engine method, TransferConfig overrides).
VARIANTS = {"anchored-noguard": ("anchored", {"threshold": 0.0})}  # every module kept, shrunk by its fit


def all_methods() -> tuple[str, ...]:
  """Engine methods, the random control, bench variants, and "<method>+cal" (--calibrate_norm)."""
  engine = tuple(m for m in method_registry.NAMES if m not in BASE_METHODS) + tuple(VARIANTS)  # e.g. anchored
  return BASE_METHODS + engine + ("cross_lora+cal",) + tuple(m + "+cal" for m in engine)


def log(msg: str) -> None:
  print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def file_digest(path: pathlib.Path) -> str:
  return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


# ----------------------------------------------------------------------------- cache


class Cache:
  """NLL records (json per key) and trained LoRAs under one folder."""

  def __init__(self, root: pathlib.Path):
    self.root = root
    (root / "nll").mkdir(parents=True, exist_ok=True)
    (root / "lora").mkdir(parents=True, exist_ok=True)

  def _file(self, key: str) -> pathlib.Path:
    return self.root / "nll" / (key.replace("/", "__").replace(":", "-") + ".json")

  def get(self, key: str) -> dict[str, Any] | None:
    f = self._file(key)
    return json.loads(f.read_text()) if f.exists() else None

  def put(self, key: str, record: dict[str, Any]) -> None:
    f = self._file(key)
    tmp = f.with_suffix(".tmp")
    tmp.write_text(json.dumps({"key": key, **record}, indent=1))
    os.replace(tmp, f)

  def records(self) -> list[dict[str, Any]]:
    return [json.loads(f.read_text()) for f in sorted((self.root / "nll").glob("*.json"))]


# ----------------------------------------------------------------------------- adapters


TRAIN_OVERRIDES: dict[str, int] = {}  # --train_steps / --train_batch: a cheaper recipe (compute)
USE_EXAMPLE = [True]  # --no_example: train SmolLM2's LoRA here like the others instead of the shipped one


def recipe_for(short: str) -> dict[str, Any]:
  """RECIPE with the --train_* overrides: the recipe of every LoRA this benchmark trains."""
  return {**RECIPE, **TRAIN_OVERRIDES}


def recipe_tag(recipe: dict[str, Any]) -> str:
  return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:8]


def trained_adapter(short: str, cache: Cache, threads: int) -> pathlib.Path:
  """The LoRA trained on ``short``: the shipped example for SmolLM2, else a cached training run."""
  if short == "smollm2" and USE_EXAMPLE[0]:
    if not (EXAMPLE_ADAPTER / "adapter_model.safetensors").exists():
      raise SystemExit(f"error: {EXAMPLE_ADAPTER}: the example adapter expected, got nothing. "
                       "Run scripts/train_example_adapter.py first.")
    return EXAMPLE_ADAPTER
  recipe = recipe_for(short)
  out = cache.root / "lora" / f"{short}-{recipe_tag(recipe)}"
  if (out / "adapter_model.safetensors").exists():
    return out
  import torch

  torch.set_num_threads(threads)
  model_dir = zoo.fetch_model(MODELS[short])
  log(f"training a LoRA on {short} with {recipe} (not cached)")
  t0 = time.perf_counter()
  model = textdata.train_lora(str(model_dir), steps=recipe["steps"], lr=recipe["lr"],
                              batch_size=recipe["batch_size"], block_size=recipe["block_size"],
                              seed=recipe["seed"], r=recipe["r"], alpha=recipe["alpha"])
  seconds = time.perf_counter() - t0
  for name, param in model.named_parameters():
    if ".lora_" in name:  # saved in fp16 like the shipped example
      param.data = param.data.to(torch.float16)
  tmp = out.with_name(out.name + ".tmp")
  model.save_pretrained(str(tmp))
  (tmp / "train_info.json").write_text(json.dumps({"recipe": recipe, "train_seconds": seconds,
                                                   "threads": threads}, indent=1))
  os.replace(tmp, out)
  log(f"trained {short} LoRA in {seconds:.0f}s -> {out}")
  return out


@dataclasses.dataclass
class Update:
  """Per target module path: (a_ri, b_or, scaling) as float32 arrays, ready to merge."""

  factors: dict[str, tuple[np.ndarray, np.ndarray, float]]


def update_from_adapter(adapter) -> Update:
  """PeftAdapter -> Update, rounding factors to float16 as the CLI writes them."""
  out = {}
  for path, pair in adapter.modules.items():
    a = np.asarray(pair.a_ri, np.float32).astype(np.float16).astype(np.float32)
    b = np.asarray(pair.b_or, np.float32).astype(np.float16).astype(np.float32)
    out[path] = (a, b, float(adapter.scaling(path)))
  return Update(out)


def random_like(update: Update, seed: int) -> Update:
  """Gaussian factors of the same rank, each ΔW scaled to the same Frobenius norm."""
  rng = np.random.default_rng(seed)
  out = {}
  for path in sorted(update.factors):
    a, b, s = update.factors[path]
    norm = np.linalg.norm(s * (b @ a))
    a_r = rng.standard_normal(a.shape).astype(np.float32)
    b_r = rng.standard_normal(b.shape).astype(np.float32)
    scale = norm / max(np.linalg.norm(b_r @ a_r), 1e-30)
    out[path] = (a_r, (b_r * scale).astype(np.float32), 1.0)
  return Update(out)


# ----------------------------------------------------------------------------- evaluation


class Target:
  """One target model in float32, its held-out blocks, and exact restore of its base weights."""

  def __init__(self, short: str, n_blocks: int, threads: int):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    self.short = short
    self.dir = zoo.fetch_model(MODELS[short])
    tok = AutoTokenizer.from_pretrained(self.dir)
    self.blocks = textdata.heldout_blocks(tok, n=n_blocks, block_size=128)
    self.model = AutoModelForCausalLM.from_pretrained(self.dir, dtype=torch.float32).eval()
    self._saved: dict[str, Any] = {}

  def _linear(self, path: str):
    return self.model.get_submodule(path)

  def nll(self, update: Update | None) -> tuple[float, np.ndarray, float]:
    import torch

    t0 = time.perf_counter()
    try:
      if update is not None:
        with torch.no_grad():
          for path, (a, b, s) in update.factors.items():
            w = self._linear(path).weight
            if path not in self._saved:  # the checkpoint is bf16: keep the exact original compactly
              self._saved[path] = w.detach().to(torch.bfloat16).clone()
              assert torch.equal(self._saved[path].float(), w), f"{path}: float32 weight not exactly bf16"
            w.add_(s * (torch.from_numpy(b) @ torch.from_numpy(a)))
      mean, per_block = textdata.mean_nll(self.model, self.blocks)
    finally:
      self.restore()
    return mean, per_block, time.perf_counter() - t0

  def restore(self) -> None:
    import torch

    with torch.no_grad():
      for path, w0 in self._saved.items():
        self._linear(path).weight.copy_(w0.float())


_TRANSFERS: dict[tuple, Any] = {}  # one transfer serves cross_lora, random and cross_lora_cal


SVD = ["exact"]  # --svd
SUBSPACE_CACHE: list[pathlib.Path] = []  # <cache_dir>/subspaces: base subspaces shared by the transfers


def transfer(source: str, target: str, adapter_dir: pathlib.Path, method: str, rank: int):
  import crosslora_jax

  key = (source, target, str(adapter_dir), method, rank, SVD[0])
  if key in _TRANSFERS:
    return _TRANSFERS[key]
  name, cal = method.removesuffix("+cal"), method.endswith("+cal")
  anchor = crosslora_jax.methods.anchored.AnchorConfig()
  if name in VARIANTS:
    name, overrides = VARIANTS[name]
    anchor = dataclasses.replace(anchor, **overrides)
  cfg = crosslora_jax.TransferConfig(method=name, rank=rank, calibrate_norm=cal, svd=SVD[0], anchor=anchor,
                                     cache_dir=str(SUBSPACE_CACHE[0]) if SUBSPACE_CACHE else None)
  t0 = time.perf_counter()
  res = crosslora_jax.transfer_adapter(str(zoo.fetch_model(MODELS[source])), str(zoo.fetch_model(MODELS[target])),
                                       str(adapter_dir), cfg)
  _TRANSFERS.clear()  # keep one: adapters of big targets are large
  _TRANSFERS[key] = (res, time.perf_counter() - t0)
  return _TRANSFERS[key]


def parse_rank(text: str) -> int:
  """'full' -> every direction (clipped per weight by the engine); '-' (rank unused) -> the default rank."""
  from crosslora_jax import TransferConfig
  return 1 << 30 if text == "full" else TransferConfig.rank if text == "-" else int(text)


def applicable(method: str, source: str, target: str) -> bool:
  spec = method_registry.REGISTRY.get(method.removesuffix("+cal"))
  if spec is not None and spec.same_shape:
    return zoo.MODELS[MODELS[source]].shape == zoo.MODELS[MODELS[target]].shape
  return True


def run_pairs(args, cache: Cache) -> None:
  pairs = [tuple(p.split(":")) for p in args.pairs.split(",")]
  methods = () if args.methods == "none" else all_methods() if args.methods == "all" else tuple(args.methods.split(","))
  by_target: dict[str, list[str]] = {}
  for s, t in pairs:
    by_target.setdefault(t, []).append(s)
  b = args.blocks
  for target, sources in by_target.items():
    tgt: Target | None = None

    def evaluate(key: str, make_update, extra: dict[str, Any]) -> None:
      nonlocal tgt
      if cache.get(key) is not None:
        log(f"{key}: cached")
        return
      if target == "qwen15" and tgt is not None:  # 6 GB in float32: not held while a transfer runs
        tgt = None
        import gc
        gc.collect()
      update, info = make_update()
      if tgt is None:
        log(f"loading {target} ({b} blocks)")
        tgt = Target(target, b, args.threads)
      mean, per_block, seconds = tgt.nll(update)
      cache.put(key, {"target": target, "blocks": b, "nll": mean, "per_block": per_block.tolist(),
                      "eval_seconds": seconds, **extra, **info})
      log(f"{key}: NLL {mean:.4f} ({seconds:.0f}s eval)")

    evaluate(f"{target}/base/b{b}", lambda: (None, {}), {"variant": "base"})
    if not args.skip_trained and not (target == "qwen15" and not args.train_qwen15):
      ad = trained_adapter(target, cache, args.threads)
      info = json.loads((ad / "train_info.json").read_text()) if (ad / "train_info.json").exists() else {}
      evaluate(f"{target}/trained-{file_digest(ad / 'adapter_model.safetensors')}/b{b}",
               lambda: (update_from_adapter(_read(ad)), {}), {"variant": "trained", "train_info": info})
    for source in sources:
      if not methods:
        continue
      src_adapter = trained_adapter(source, cache, args.threads)
      digest = file_digest(src_adapter / "adapter_model.safetensors")
      ranks = list(RANK_SWEEP) if (source == target and args.rank_sweep) else [str(args.rank)]
      for method in methods:
        if not applicable(method, source, target):
          continue
        method_ranks = ranks if method == "cross_lora" else [str(args.rank)]
        if method.removesuffix("+cal") in ("copy", "truncate_pad", "anchored", *VARIANTS):
          method_ranks = ["-"]  # rank plays no part
        for rank_text in method_ranks:
          svd = "" if args.svd == "exact" else f"-{args.svd}"
          key = f"{target}/{source}-{digest}/{method}/r{rank_text}{svd}/b{b}"
          evaluate(key, _maker(method, source, target, src_adapter, parse_rank(rank_text)),
                   {"variant": method, "source": source, "rank": rank_text, "svd": args.svd})
      if source == target == "smollm2" and cache.get(f"smollm2/peft-check-{digest}/b{b}") is None:
        del tgt
        tgt = None
        peft_check(cache, b, args.threads, src_adapter, digest)
    del tgt


def _read(path: pathlib.Path):
  from crosslora_jax.formats import peft_format

  return peft_format.read_adapter(path)


def _maker(method: str, source: str, target: str, adapter_dir: pathlib.Path, rank: int):
  def make():
    engine_method = "cross_lora" if method == "random" else method
    res, seconds = transfer(source, target, adapter_dir, engine_method, rank)
    update = update_from_adapter(res.adapter)
    if method == "random":
      update = random_like(update, seed=0)
    summary = {k: v for k, v in res.report.summary.items()}
    log(f"transfer {source}->{target} {engine_method} r={rank}: {seconds:.0f}s")
    return update, {"transfer_seconds": seconds, "report_summary": summary}
  return make


def peft_check(cache: Cache, n_blocks: int, threads: int, adapter_dir: pathlib.Path, digest: str) -> None:
  """The harness's merge equals PEFT's forward: SmolLM2's adapter through PeftModel, 4 blocks."""
  import peft
  import torch
  from transformers import AutoModelForCausalLM, AutoTokenizer

  torch.set_num_threads(threads)
  model_dir = zoo.fetch_model(MODELS["smollm2"])
  tok = AutoTokenizer.from_pretrained(model_dir)
  blocks = textdata.heldout_blocks(tok, n=n_blocks, block_size=128)[:4]
  base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
  model = peft.PeftModel.from_pretrained(base, str(adapter_dir)).eval()
  peft_nll, _ = textdata.mean_nll(model, blocks)
  tgt = Target("smollm2", n_blocks, threads)
  tgt.blocks = blocks
  merged_nll, _, _ = tgt.nll(update_from_adapter(_read(adapter_dir)))
  cache.put(f"smollm2/peft-check-{digest}/b{n_blocks}", {"variant": "peft-check", "peft_nll": peft_nll,
                                                         "merged_nll": merged_nll, "blocks": 4,
                                                         "adapter": str(adapter_dir.relative_to(REPO))})
  log(f"peft check: PEFT {peft_nll:.5f} vs merged {merged_nll:.5f}")


# ----------------------------------------------------------------------------- results


def pct(x: float | None) -> str:
  return "—" if x is None else f"{100 * x:.0f}%"


def se(a, b) -> float:
  return textdata.paired_se(np.asarray(a), np.asarray(b))


def smollm2_digest(cache: Cache) -> str | None:
  """Digest of the SmolLM2 adapter in play (shipped example, or --no_example's trained one)."""
  if USE_EXAMPLE[0]:
    f = EXAMPLE_ADAPTER / "adapter_model.safetensors"
  else:
    f = cache.root / "lora" / f"smollm2-{recipe_tag(recipe_for('smollm2'))}" / "adapter_model.safetensors"
  return file_digest(f) if f.exists() else None


def _digest(rec: dict[str, Any]) -> str:
  return rec["key"].split("/")[1].rsplit("-", 1)[-1]


def collect(cache: Cache) -> dict[str, Any]:
  """Rows for every cached (pair, method, rank), each against base/trained on the same blocks.

  When one row was measured at several block counts, the largest count wins. Only the
  SmolLM2 adapter in play counts (as source, and as SmolLM2's trained upper bound).
  """
  digest = smollm2_digest(cache)
  recs = [r for r in cache.records()
          if not ((r.get("source") == "smollm2" or (r.get("target") == "smollm2" and r["variant"] == "trained"))
                  and _digest(r) != digest)
          and not (r["variant"] == "peft-check" and not r["key"].endswith(f"-{digest}/b{r['key'].split('/b')[-1]}"))]
  base = {(r["target"], r["blocks"]): r for r in recs if r["variant"] == "base"}
  trained = {(r["target"], r["blocks"]): r for r in recs if r["variant"] == "trained"}
  best: dict[tuple, dict[str, Any]] = {}
  for r in recs:
    if r["variant"] in ("base", "trained", "peft-check") or (r.get("target"), r.get("blocks")) not in base:
      continue
    k = (r["source"], r["target"], r["variant"], r["rank"])
    if k not in best or r["blocks"] > best[k]["blocks"]:
      best[k] = r
  rows = []
  for r in best.values():
    t, s, n = r["target"], r["source"], r["blocks"]
    b = base[(t, n)]
    row = {"source": s, "target": t, "method": r["variant"], "rank": r["rank"], "blocks": n, "nll": r["nll"],
           "base_nll": b["nll"], "delta": r["nll"] - b["nll"], "delta_se": se(r["per_block"], b["per_block"]),
           "transfer_seconds": r.get("transfer_seconds"), "eval_seconds": r.get("eval_seconds"),
           "report_summary": r.get("report_summary")}
    tr = trained.get((t, n))
    row["trained_nll"] = tr["nll"] if tr else None
    row["recovery"] = (b["nll"] - r["nll"]) / (b["nll"] - tr["nll"]) if tr else None
    src = [(trained[k]["nll"], base[k]["nll"]) for k in sorted(trained, key=lambda k: -k[1])
           if k[0] == s and k in base]
    row["source_gain"] = src[0][1] - src[0][0] if src else None
    rows.append(row)
  targets = {}
  for (t, n), b in sorted(base.items()):
    tr = trained.get((t, n))
    targets[f"{t} ({n} blocks)"] = {
        "target": t, "blocks": n, "base_nll": b["nll"], "trained_nll": tr["nll"] if tr else None,
        "trained_delta_se": se(tr["per_block"], b["per_block"]) if tr else None,
        "trained_recipe": (tr.get("train_info") or {}).get("recipe") if tr else None,
        "train_seconds": (tr.get("train_info") or {}).get("train_seconds") if tr else None,
        "eval_seconds": b.get("eval_seconds")}
  check = [r for r in recs if r["variant"] == "peft-check"]
  return {"rows": rows, "targets": targets, "peft_check": check[0] if check else None}


def write_results(data: dict[str, Any], args, out: pathlib.Path) -> None:
  import torch

  out.mkdir(parents=True, exist_ok=True)
  meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
          "command": "python scripts/bench_quality.py " + " ".join(sys.argv[1:]),
          "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores (shared), torch {torch.__version__}, "
                     f"Python {sys.version.split()[0]}, no GPU",
          "block_size": 128, "recipe": RECIPE, "note": args.note, "default_rank": args.rank}
  runs_file = pathlib.Path(args.cache_dir) / "runs.jsonl"
  meta["runs"] = [json.loads(l) for l in runs_file.read_text().splitlines()] if runs_file.exists() else []
  (out / "quality.json").write_text(json.dumps({"meta": meta, **data}, indent=1, default=float) + "\n")
  rows = sorted(data["rows"], key=lambda r: (PAIRS.index(f"{r['source']}:{r['target']}")
                                             if f"{r['source']}:{r['target']}" in PAIRS else 99,
                                             all_methods().index(r["method"]) if r["method"] in all_methods() else 99,
                                             parse_rank(r["rank"])))
  f = lambda v, p=3: "—" if v is None else f"{v:.{p}f}"
  lines = ["# Transfer quality on real models", "",
           f"Measured {meta['date']} on {meta['machine']}.", "",
           *([f"**Status.** {args.note}", ""] if args.note else []),
           "Produced in pieces (resumable; every NLL cached), by these runs:", "",
           *[f"- `python scripts/bench_quality.py {' '.join(r['argv'])}` (finished {r['finished']}, {r['seconds']} s)"
             for r in meta["runs"]],
           f"- tables rebuilt by `{meta['command']}`", "",
           "Held-out NLL: mean next-token NLL (nats) of the target on the held-out pydoc blocks of 128 "
           "tokens (count in the *blocks* column; each model's own tokenizer, `crosslora_bench.textdata.heldout_blocks`). Δ = NLL − base NLL, "
           "± the paired standard error over blocks. Recovery = (base − method) / (base − trained), "
           "where *trained* is a LoRA trained on the target "
           + (f"(SmolLM2: the shipped example adapter, {RECIPE}; other models: see the Targets table)"
              if USE_EXAMPLE[0] else "(every model, SmolLM2 included, trained here: recipe in the Targets table); "
              "the same LoRA is the source adapter when that model is the source")
           + ". Source gain = the source's own base − trained NLL.", "",
           "| source → target | method | rank | blocks | NLL | Δ vs base (± s.e.) | recovery | target base / trained | source gain |",
           "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['source']} → {r['target']} | {r['method']} | {r['rank'] if r['method'] not in ('copy', 'truncate_pad') else '—'} "
                 f"| {r['blocks']} | {f(r['nll'])} | {r['delta']:+.3f} (± {r['delta_se']:.3f}) | "
                 f"{pct(r['recovery'])} | "
                 f"{f(r['base_nll'])} / {f(r['trained_nll'])} | {f(r['source_gain'])} |")
  lines += ["", "## Targets", "", "| model | base NLL | trained NLL (Δ ± s.e.) | trained recipe | train s | eval s (base) |",
            "|---|---|---|---|---|---|"]
  for t, v in data["targets"].items():
    d = "—" if v["trained_nll"] is None else f"{v['trained_nll']:.3f} ({v['trained_nll'] - v['base_nll']:+.3f} ± {v['trained_delta_se']:.3f})"
    recipe = v["trained_recipe"] or (RECIPE if v["target"] == "smollm2" and v["trained_nll"] is not None else None)
    lines.append(f"| {t} | {v['base_nll']:.3f} | {d} | {recipe or '—'} | {f(v['train_seconds'], 0)} | {f(v['eval_seconds'], 0)} |")
  if data["peft_check"]:
    c = data["peft_check"]
    lines += ["", f"Harness check: SmolLM2's source adapter (`{c.get('adapter', '')}`) through `PeftModel.from_pretrained` gives NLL "
              f"{c['peft_nll']:.5f} on 4 blocks, the harness's merged ΔW {c['merged_nll']:.5f}."]
  sweep = [r for r in rows if r["source"] == r["target"] and r["method"] == "cross_lora"]
  if sweep:
    lines += ["", "## cross_lora rank sweep (source onto itself)", "",
              "| rank | mean energy captured (source) | mean overlap | mean ‖ΔW_t‖/‖ΔW_s‖ | recovery |", "|---|---|---|---|---|"]
    for r in sorted(sweep, key=lambda r: parse_rank(r["rank"])):
      s = r["report_summary"] or {}
      lines.append(f"| {r['rank']} ({s.get('rank_used')}) | {f(s.get('mean_energy_source'))} | {f(s.get('mean_overlap'))} "
                   f"| {f(s.get('mean_norm_ratio'))} | {pct(r['recovery'])} |")
  lines += ["", "## Wall times", "", "| source → target | method | rank | transfer s | eval s |", "|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['source']} → {r['target']} | {r['method']} | {r['rank']} | {f(r['transfer_seconds'], 0)} "
                 f"| {f(r['eval_seconds'], 0)} |")
  (out / "quality.md").write_text("\n".join(lines) + "\n")
  plot(rows, out / "quality.png")


def plot(rows, path: pathlib.Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = [r for r in rows if r["recovery"] is not None and (r["method"] != "cross_lora" or r["source"] != r["target"]
                                                            or r["rank"] == "320")]
  pairs = sorted({f"{r['source']}→{r['target']}" for r in rows}, key=lambda p: PAIRS.index(p.replace("→", ":"))
                 if p.replace("→", ":") in PAIRS else 99)
  methods = [m for m in all_methods() if any(r["method"] == m for r in rows)]
  fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(pairs) + 2), 4.5))
  width = 0.8 / max(1, len(methods))
  for i, m in enumerate(methods):
    xs, ys = [], []
    for j, p in enumerate(pairs):
      for r in rows:
        if r["method"] == m and f"{r['source']}→{r['target']}" == p:
          xs.append(j + (i - (len(methods) - 1) / 2) * width)
          ys.append(100 * r["recovery"])
    ax.bar(xs, ys, width, label=m)
  ax.axhline(0, color="black", lw=0.8)
  ax.axhline(100, color="gray", lw=0.8, ls="--")
  ax.set_xticks(range(len(pairs)), pairs, rotation=15)
  ax.set_ylabel("gain recovery (%)")
  ax.set_title("Held-out NLL gain recovered by the transferred adapter (rank 320)")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--pairs", default=",".join(PAIRS), help="source:target,... with short names " + ", ".join(MODELS))
  p.add_argument("--methods", default="all", help="comma list of " + ", ".join(all_methods()) + ", or all")
  p.add_argument("--blocks", type=int, default=32, help="held-out blocks of 128 tokens")
  p.add_argument("--rank", type=int, default=320, help="SVD rank for cross_lora / lora_x")
  p.add_argument("--no_rank_sweep", dest="rank_sweep", action="store_false",
                 help="skip the cross_lora rank sweep (64, 160, 320, full) on a source onto itself")
  p.add_argument("--skip_trained", action="store_true", help="skip the trained-on-target upper bound")
  p.add_argument("--train_steps", type=int, default=None,
                 help="steps for the LoRAs trained on models other than SmolLM2 (default: the example's recipe)")
  p.add_argument("--train_batch", type=int, default=None, help="batch size for those LoRAs (default: the recipe's)")
  p.add_argument("--no_example", action="store_true",
                 help="train SmolLM2's LoRA with the (overridden) recipe instead of using the shipped example")
  p.add_argument("--train_qwen15", action="store_true", help="also train the Qwen2.5-1.5B upper bound")
  p.add_argument("--svd", default="exact", help="the engine's truncated-SVD algorithm (exact, gram, randomized)")
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--cache_dir", default=str(REPO / ".cache" / "bench_quality"))
  p.add_argument("--out", default=str(REPO / "results"))
  p.add_argument("--report_only", action="store_true", help="only rebuild results/ from the cache")
  p.add_argument("--note", default="", help="a status paragraph for the top of quality.md")
  p.add_argument("--refine_arms", default="", help="also run these scripts/bench_refine.py arms (e.g. delta,random-delta) "
                 "on every pair; their table, next to these projections, is results/refine.md")
  args = p.parse_args(argv)
  for pair in args.pairs.split(","):
    parts = pair.split(":")
    if len(parts) != 2 or any(x not in MODELS for x in parts):
      print(f"error: --pairs: source:target with names in {', '.join(MODELS)} expected, got {pair!r}", file=sys.stderr)
      return 2
  USE_EXAMPLE[0] = not args.no_example
  SVD[0] = args.svd
  SUBSPACE_CACHE.append(pathlib.Path(args.cache_dir) / "subspaces")
  if args.train_steps:
    TRAIN_OVERRIDES["steps"] = args.train_steps
  if args.train_batch:
    TRAIN_OVERRIDES["batch_size"] = args.train_batch
  cache = Cache(pathlib.Path(args.cache_dir))
  if not args.report_only:
    t0 = time.perf_counter()
    run_pairs(args, cache)
    log(f"done in {time.perf_counter() - t0:.0f}s")
    with open(cache.root / "runs.jsonl", "a") as f:
      f.write(json.dumps({"finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                          "seconds": round(time.perf_counter() - t0), "argv": sys.argv[1:]}) + "\n")
  write_results(collect(cache), args, pathlib.Path(args.out))
  if args.refine_arms:
    import bench_refine  # here, not at the top: bench_refine imports this module
    for pair in args.pairs.split(","):
      if pair.split(":")[0] != pair.split(":")[1]:
        bench_refine.main(["--pair", pair, "--arms", args.refine_arms, "--blocks", str(args.blocks), "--out", args.out])
  return 0


if __name__ == "__main__":
  sys.exit(main())
