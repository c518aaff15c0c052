"""Refine benchmark: does distillation from the source model carry the adapter's skill to the target?

  python scripts/bench_refine.py --pair smollm2:qwen05 --arms topk30,null     # a few arms
  python scripts/bench_refine.py --report_only                                 # rebuild results/

For each arm, ``crosslora_jax.refine.refine_adapter`` moves the shipped SmolLM2 pydoc
adapter (the source) to the target; the target's mean token NLL on the held-out
pydoc blocks (``crosslora_bench.textdata``, each model's own tokenizer) is measured
with the JAX runtime, and compared with the target base and with the LoRA trained on
the target (its NLL from results/quality.json, same blocks and recipe):

  recovery = (NLL_base − NLL_arm) / (NLL_base − NLL_trained)

The teacher never reads pydoc: it writes from its separator token. ``--domain stdlib`` repeats
this on a second text domain (CPython's standard-library source): the source adapter and the
trained-on-target bound are then LoRAs trained here on that text by the JAX trainer, with
bench_quality's recipe (as is every source adapter other than the shipped SmolLM2 one, and the
bound of a target results/quality.json has none for). Arms differ in
token selection, loss, anchor, writer and initialisation. Controls: ``null*`` arms
remove the source adapter (B = 0): what training on model-written text does by
itself; ``random-*`` arms replace it with random factors of the same rank and
per-module ‖ΔW‖_F: what a change of the adapter's size in no learned direction does. Every arm's record (per-block NLL, refine report, seconds) is cached
under --cache_dir, so runs can be split and resumed; results/refine.{md,json} are
rebuilt from all records each time.
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
import resource
import sys
import time
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import numpy as np  # noqa: E402

from crosslora_bench import textdata, zoo  # noqa: E402
from bench_quality import EXAMPLE_ADAPTER, MODELS, RECIPE  # noqa: E402
import refine_store  # noqa: E402

ARMS: dict[str, dict[str, Any]] = {  # name -> RefineConfig overrides (+ "init": zero|projection, "null"/"random": bool)
    "delta": {"loss": "delta"},
    "projection+delta": {"loss": "delta", "init": "projection"},
    "random-delta": {"loss": "delta", "random": True},
    "null-delta": {"loss": "delta", "null": True},
    "delta-vocab16": {"loss": "delta", "vocab_k": 16},
    "null-all": {"loss": "nll", "selection": "all", "null": True, "guard": False},
    "random-delta-vocab16": {"loss": "delta", "vocab_k": 16, "random": True},
    "null-delta-vocab16": {"loss": "delta", "vocab_k": 16, "null": True},
    "topk30": {"loss": "nll", "selection": "topk", "fraction": 0.3},
    "all": {"loss": "nll", "selection": "all"},
    "weighted": {"loss": "nll", "selection": "weighted"},
    "topk30-anchor": {"loss": "nll", "selection": "topk", "fraction": 0.3, "anchor": 1.0},
    "null-topk30-anchor": {"loss": "nll", "selection": "topk", "fraction": 0.3, "anchor": 1.0, "null": True, "guard": False},
    "random-topk30-anchor": {"loss": "nll", "selection": "topk", "fraction": 0.3, "anchor": 1.0, "random": True},
    "topk50-anchor": {"loss": "nll", "selection": "topk", "fraction": 0.5, "anchor": 1.0},
    "null-topk50-anchor": {"loss": "nll", "selection": "topk", "fraction": 0.5, "anchor": 1.0, "null": True, "guard": False},
    "random-topk50-anchor": {"loss": "nll", "selection": "topk", "fraction": 0.5, "anchor": 1.0, "random": True},
    "topk50-anchor0.3": {"loss": "nll", "selection": "topk", "fraction": 0.5, "anchor": 0.3},
    "topk50-anchor3": {"loss": "nll", "selection": "topk", "fraction": 0.5, "anchor": 3.0},
    "null-topk50-anchor0.3": {"loss": "nll", "selection": "topk", "fraction": 0.5, "anchor": 0.3, "null": True, "guard": False},
    "topk70-anchor": {"loss": "nll", "selection": "topk", "fraction": 0.7, "anchor": 1.0},
    "null-topk70-anchor": {"loss": "nll", "selection": "topk", "fraction": 0.7, "anchor": 1.0, "null": True, "guard": False},
    "random-topk70-anchor": {"loss": "nll", "selection": "topk", "fraction": 0.7, "anchor": 1.0, "random": True},
    "topk30-noguard": {"loss": "nll", "selection": "topk", "fraction": 0.3, "guard": False},
    "null": {"loss": "nll", "selection": "topk", "fraction": 0.3, "null": True},
    "projection+topk30": {"loss": "nll", "selection": "topk", "fraction": 0.3, "init": "projection"},
    "own-reward": {"writer": "target", "loss": "reward"},
    "own-topk30": {"writer": "target", "loss": "nll", "selection": "topk", "fraction": 0.3},
    "own-delta": {"writer": "target", "loss": "delta"},
    "null-own-topk30": {"writer": "target", "loss": "nll", "selection": "topk", "fraction": 0.3, "null": True},
    "null-own-reward": {"writer": "target", "loss": "reward", "null": True},
    "projection+own-reward": {"writer": "target", "loss": "reward", "init": "projection"},
}

# Arms are overrides of RefineConfig's defaults; the anchor default (1.0) is only the anchor arms'.
for _overrides in ARMS.values():
  _overrides.setdefault("anchor", 0.0)


# The recipe measured run for run against the default in the report: the earlier default
# (topk50-anchor, the default since 2026-12-02, was this table's candidate against it).
COMPARED = "topk30-anchor"


# RefineConfig fields a flag sets for every arm (the budget and the teacher's sampling), with their types.
BUDGET = {"tokens": int, "sample_tokens": int, "steps": int, "batch": int, "lr": float, "seed": int, "eval_every": int,
          "temperature": float, "top_p": float, "pool": int}


def log(message: str) -> None:
  print(f"[{datetime.datetime.now(datetime.timezone.utc):%H:%M:%S}] {message}", file=sys.stderr, flush=True)


def zero_adapter(adapter):
  """The source adapter with every B = 0: the null control's teacher is the source base itself."""
  from crosslora_jax.formats import peft_format
  modules = {p: peft_format.LoraPair(pair.a_ri, np.zeros_like(pair.b_or)) for p, pair in adapter.modules.items()}
  return peft_format.PeftAdapter(dict(adapter.config), modules, path=None)


def random_adapter(adapter, seed: int = 0):
  """Gaussian factors of the source adapter's rank, each ΔW with the same Frobenius norm: the
  random control's teacher changes the source as much as the adapter does, in no learned direction."""
  from crosslora_jax.formats import peft_format
  rng = np.random.default_rng(seed)
  modules = {}
  for path in sorted(adapter.modules):
    pair = adapter.modules[path]
    a, b = np.asarray(pair.a_ri, np.float32), np.asarray(pair.b_or, np.float32)
    a_r, b_r = rng.standard_normal(a.shape).astype(np.float32), rng.standard_normal(b.shape).astype(np.float32)
    b_r *= np.linalg.norm(b @ a) / max(np.linalg.norm(b_r @ a_r), 1e-30)
    modules[path] = peft_format.LoraPair(a_r.astype(pair.a_ri.dtype), b_r.astype(pair.b_or.dtype))
  return peft_format.PeftAdapter(dict(adapter.config), modules, path=None)


def trained_lora(short: str, cache_dir: pathlib.Path, model=None, domain: str = "pydoc", lr: float | None = None) -> pathlib.Path:
  """A LoRA trained on ``short`` with bench_quality's RECIPE on ``domain``'s training text, by the JAX
  trainer, cached under cache_dir/lora.

  The source adapter of a pair whose source is not SmolLM2 (whose adapter is the shipped
  example), and the upper bound of a target that results/quality.json has none for. The
  recipe's schedule is textdata.train_lora's: one warm-up step, cosine to 0, AdamW without
  weight decay, clip 1.0; results/lm.md measured this trainer equal to torch's on SmolLM2.
  ``model``: the already loaded ``short`` (float32), so a 1.5B target is not held twice; ``lr``
  replaces the recipe's learning rate (a second upper bound, see measure_bound).
  """
  recipe = {**RECIPE, **({"lr": lr} if lr is not None else {})}
  from transformers import AutoTokenizer
  from crosslora_jax import lm as jlm
  from crosslora_jax.lm.train import TrainConfig, train_lora
  tag = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:8]
  out = cache_dir / "lora" / (f"{short}-jax-{tag}" if domain == "pydoc" else f"{short}-{domain}-jax-{tag}")
  if (out / "train_info.json").exists():
    return out
  folder = zoo.fetch_model(MODELS[short])
  blocks = textdata.token_blocks(AutoTokenizer.from_pretrained(folder), textdata.train_texts(domain), recipe["block_size"])
  config = TrainConfig(steps=recipe["steps"], batch=recipe["batch_size"], lr=recipe["lr"], warmup=max(1, recipe["steps"] // 10),
                       schedule="cosine", weight_decay=0.0, clip_norm=1.0, seed=recipe["seed"])
  spec = jlm.LoraSpec(r=recipe["r"], alpha=recipe["alpha"], target_modules=textdata.SEVEN_MODULES)
  log(f"training a LoRA on {short} ({domain}) with {recipe} (JAX, not cached)")
  result = train_lora(model if model is not None else jlm.load(folder), blocks.numpy().astype(np.int32), config, spec=spec, output=out, overwrite=True,
                      save_dtype="float16")
  (out / "train_info.json").write_text(json.dumps({"recipe": recipe, "domain": domain, "trainer": "crosslora_jax.lm.train.train_lora",
                                                   "train_seconds": result.seconds, "compile_seconds": result.compile_seconds,
                                                   "losses": result.losses}, indent=1))
  log(f"trained {short} in {result.seconds:.0f} s (+ {result.compile_seconds:.0f} s compile) -> {out}")
  return out


# A source whose adapter is trained at another learning rate than the recipe's: at 4e-3 the
# recipe leaves Qwen2.5-Coder-1.5B worse than its base on pydoc (2.410 against 2.363; at 2e-3,
# 1.985), and a source adapter that hurts its own base has no skill to move.
SOURCE_LR = {"qwen15": 2e-3}


def source_adapter_dir(short: str, cache_dir: pathlib.Path, domain: str = "pydoc") -> pathlib.Path:
  """The pair's source adapter: the shipped example on SmolLM2 for pydoc, else a LoRA trained here
  (at SOURCE_LR's learning rate where it names the source)."""
  if (short, domain) == ("smollm2", "pydoc"):
    return EXAMPLE_ADAPTER
  return trained_lora(short, cache_dir, domain=domain, lr=SOURCE_LR.get(short))


def pair_id(args) -> str:
  """``source:target``, with ``/domain`` after it for text other than pydoc."""
  return args.pair if args.domain == "pydoc" else f"{args.pair}/{args.domain}"


def trained_reference(target: str, blocks: int) -> dict[str, Any] | None:
  """The torch-trained upper bound of results/quality.json, or None where it has none."""
  data = json.loads((REPO / "results" / "quality.json").read_text())
  ref = data["targets"].get(f"{target} ({blocks} blocks)")
  return ref if ref and ref.get("trained_nll") is not None else None


def heldout_ids(folder: pathlib.Path, blocks: int, domain: str = "pydoc") -> np.ndarray:
  from transformers import AutoTokenizer
  return textdata.heldout_blocks(AutoTokenizer.from_pretrained(folder), n=blocks, block_size=128,
                                 domain=domain).numpy().astype(np.int32)


def block_nll(target_lm, lora, spec, ids: np.ndarray) -> np.ndarray:
  """(n_blocks,) mean next-token NLL of each held-out block, with the JAX runtime."""
  from crosslora_jax.refine import runtime
  lp = runtime.batched_logprobs(target_lm, lora, spec, ids, np.ones_like(ids, bool), batch=8)
  return -lp.astype(np.float64).mean(axis=1)


def adapter_nll(model, folder: pathlib.Path, ids: np.ndarray) -> np.ndarray:
  """block_nll of ``model`` with the PEFT adapter in ``folder``."""
  from crosslora_jax.formats import peft_format
  from crosslora_jax.lm.lora import lora_from_peft
  lora, spec = lora_from_peft(peft_format.read_adapter(folder), model.config)
  return block_nll(model, lora, spec, ids)


def arm_config(name: str, args) -> tuple[Any, dict[str, Any]]:
  from crosslora_jax.refine import RefineConfig
  overrides = dict(ARMS[name])
  extra = {k: overrides.pop(k) for k in ("init", "null", "random") if k in overrides}
  budget = {k: getattr(args, k) for k in BUDGET if getattr(args, k) is not None}
  return RefineConfig(**{**budget, **overrides, "cache_dir": str(pathlib.Path(args.cache_dir) / "corpus")}), extra


LATER_FIELDS = {"pool": 1}  # RefineConfig fields added after records were written, at their defaults


def record_key(pair: str, name: str, config, blocks: int) -> str:
  """The record's file name: what the arm measures, not where the cache lives."""
  settings = {k: v for k, v in dataclasses.asdict(config).items() if k != "cache_dir"}
  for field, default in LATER_FIELDS.items():  # records written before a field existed keep their names
    if settings.get(field) == default:
      del settings[field]
  body = json.dumps({"pair": pair, "arm": ARMS[name], "config": settings, "blocks": blocks}, sort_keys=True, default=str)
  return f"{pair.replace(':', '-').replace('/', '-')}-{name}-{hashlib.sha256(body.encode()).hexdigest()[:10]}"


def run_arm(name: str, args, state: dict[str, Any]) -> dict[str, Any]:
  from crosslora_jax.formats import peft_format
  from crosslora_jax.refine import refine_adapter
  config, extra = arm_config(name, args)
  source_adapter = peft_format.read_adapter(state["source_adapter"])
  if extra.get("null"):
    source_adapter = zero_adapter(source_adapter)
  if extra.get("random"):
    source_adapter = random_adapter(source_adapter)
  init = None
  if extra.get("init") == "projection":
    from bench_quality import transfer
    result, _ = transfer(args.source, args.target, state["source_adapter"], "cross_lora", 320)
    init = result.adapter
  t0 = time.perf_counter()
  result = refine_adapter(state["source_dir"], source_adapter, state["target_dir"], init, config,
                          progress="always", target_lm=state["target_lm"])
  refine_seconds = time.perf_counter() - t0
  t0 = time.perf_counter()
  # Every checked step's NLL (step 0 of a zero init is the base): how well each held-back
  # check would have picked, measured instead of guessed.
  by_step = {}
  for step, step_lora in result.checkpoints:
    if step == 0 and init is None:
      by_step["0"] = state["base_blocks"]
      continue
    by_step[str(step)] = block_nll(state["target_lm"], step_lora, result.spec, state["blocks"]).tolist()
    log(f"{name}: step {step}: NLL {np.mean(by_step[str(step)]):.4f}")
  shipped_step = str(result.report["best_step"] if result.refined else 0)
  per_block = np.asarray(by_step[shipped_step]) if shipped_step in by_step else block_nll(
      state["target_lm"], result.lora, result.spec, state["blocks"])
  eval_seconds = time.perf_counter() - t0
  return {"nll_by_step": by_step, "arm": name, "pair": pair_id(args), "overrides": ARMS[name], "nll_blocks": per_block.tolist(),
          "refine_seconds": refine_seconds, "eval_seconds": eval_seconds, "report": result.report,
          "refined": result.refined, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
          "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "command": " ".join(sys.argv)}


def arm_label(rec: dict[str, Any]) -> str:
  """The arm's name, with its seed and budget where they are not the default ones."""
  from crosslora_jax.refine import RefineConfig
  config, default = rec["report"]["config"], RefineConfig()
  notes = [f"seed {config['seed']}"] if config.get("seed", 0) else []
  notes += [f"{config[k]} {k}" for k in ("tokens", "steps", "batch") if config.get(k, getattr(default, k)) != getattr(default, k)]
  notes += [f"{k.replace('_', ' ')} {config[k]:g}" for k in ("lr", "temperature", "top_p", "pool")
            if config.get(k, getattr(default, k)) != getattr(default, k)]
  return rec["arm"] if not notes else f"{rec['arm']} ({', '.join(notes)})"


def table(records: list[dict[str, Any]], bases: dict[str, dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
  rows, lines = [], ["| pair | arm | NLL | Δ vs base (± s.e.) | recovery (± s.e.) | shipped | best step | tokens kept | refine s | eval s |",
                     "|---|---|---|---|---|---|---|---|---|---|"]
  for rec in records:
    base = bases.get(rec["pair"])
    if base is None:
      continue
    if "nll_blocks" in rec:
      arm, ref = np.asarray(rec["nll_blocks"]), np.asarray(base["nll_blocks"])
      delta, delta_se = float(arm.mean() - ref.mean()), textdata.paired_se(arm, ref)
    else:  # a legacy row (refine_store): its Δ as measured, against the same base
      delta, delta_se = rec["legacy"]["delta"], rec["legacy"]["delta_se"]
    nll = base["base_nll"] + delta
    share = recovery(base, delta)
    share_se = None if share is None else recovery(base, -delta_se)
    tokens = rec["report"]["tokens"]
    rows.append({**{k: rec[k] for k in ("pair", "arm", "refined", "refine_seconds", "eval_seconds", "peak_rss_gb")},
                 "label": arm_label(rec), "record": rec.get("record"),
                 "nll": nll, "delta": delta, "delta_se": delta_se, "recovery": share,
                 "recovery_se": share_se, "best_step": rec["report"]["best_step"], "tokens": tokens,
                 "heldout": rec["report"]["heldout"], "losses": rec["report"]["losses"], "config": rec["report"]["config"]})
    lines.append(f"| {rec['pair']} | {arm_label(rec)} | {nll:.3f} | {delta:+.3f} (± {delta_se:.3f}) | "
                 f"{'—' if share is None else f'{percent(share)} (± {percent(share_se)})'} | {rec['report']['shipped']} | {rec['report']['best_step']} | "
                 f"{tokens['selected_tokens']}/{tokens['learnable_tokens']} | {rec['refine_seconds']:.0f} | {rec['eval_seconds']:.0f} |")
  return rows, "\n".join(lines)


def recovery(base: dict[str, Any], delta: float) -> float | None:
  """The share of the trained bound's gain that an arm's Δ NLL vs the base recovers; None where
  the bound is no better than the base (it defines no recovery)."""
  gain = base["base_nll"] - base["trained_nll"]
  return -delta / gain if gain > 0 else None


def percent(share: float | None) -> str:
  return "—" if share is None else f"{100 * share:.0f}%"


def step_table(records: list[dict[str, Any]], bases: dict[str, dict[str, Any]]) -> str:
  """Every checked step of every arm: held-out NLL next to what each held-back check said."""
  lines = ["| pair | arm | step | NLL | Δ vs base (± s.e.) | recovery | held-back agreement | delta_error | nll_selected |",
           "|---|---|---|---|---|---|---|---|---|"]
  for rec in records:
    base = bases.get(rec["pair"])
    if base is None or "nll_blocks" not in rec:
      continue
    ref = np.asarray(base["nll_blocks"])
    checks = {str(e["step"]): e for e in rec["report"]["heldout"]}
    for step, values in sorted(rec.get("nll_by_step", {}).items(), key=lambda kv: int(kv[0])):
      arm = np.asarray(values)
      delta = float(arm.mean() - ref.mean())
      se = textdata.paired_se(arm, ref) if delta != 0.0 else 0.0
      e = checks.get(step, {})
      lines.append(f"| {rec['pair']} | {arm_label(rec)} | {step} | {arm.mean():.3f} | {delta:+.3f} (± {se:.3f}) | "
                   f"{percent(recovery(base, delta))} | {e.get('agreement', float('nan')):.3f} | "
                   f"{e.get('delta_error', float('nan')):.3f} | {e.get('nll_selected', float('nan')):.3f} |")
  return "\n".join(lines)


def check_picks(records: list[dict[str, Any]]) -> dict[str, dict[str, list[float]]]:
  """Per held-back check and group (arms, controls): for every run with held-out NLLs at two or more
  checked steps, the NLL of the step the check picks (step 0 = the guard holding back) minus the
  best checked step's: what each check would have cost, whichever the run used."""
  from crosslora_jax.refine.config import CHECKS
  from crosslora_jax.refine.trainer import best_step
  picks: dict[str, dict[str, list[float]]] = {c: {"arms": [], "controls": []} for c in CHECKS}
  for rec in records:
    nll = {step: float(np.mean(v)) for step, v in rec.get("nll_by_step", {}).items()}
    evals = {str(e["step"]): e for e in rec["report"].get("heldout", []) if str(e["step"]) in nll}
    if len(evals) < 2:
      continue
    group = "controls" if rec["arm"].startswith(("null", "random")) else "arms"
    for check in CHECKS:
      if all(check in e for e in evals.values()):
        picked = str(best_step(list(evals.values()), check))
        picks[check][group].append(nll[picked] - min(nll[step] for step in evals))
  return picks


def check_table(records: list[dict[str, Any]]) -> str:
  """How often each held-back check picks the checked step with the best held-out NLL, and its regret."""
  lines = ["| held-back check | group | runs | picked the best step | mean regret (nats) | largest regret |", "|---|---|---|---|---|---|"]
  for check, groups in check_picks(records).items():
    for group, regrets in groups.items():
      if regrets:
        r = np.asarray(regrets)
        lines.append(f"| {check} | {group} | {len(r)} | {int((r <= 1e-12).sum())} | {r.mean():.4f} | {r.max():.4f} |")
  return "\n".join(lines)


def method_table(rows: list[dict[str, Any]], bases: dict[str, dict[str, Any]]) -> str:
  """Method against method: one row per method, one column per pair; the data-free projections of
  results/quality.json above the refine arms.

  Only refine arms at the default seed and budget; the projection rows are bench_quality's
  (torch NLL, same held-out blocks; exact SVD, rank 320), their recovery against the same bound.
  """
  quality = json.loads((REPO / "results" / "quality.json").read_text())["rows"]
  projections = ("cross_lora", "random", "anchored")
  arms = [a for a in ARMS if any(r["arm"] == a and r["label"] == a for r in rows)]
  pairs = sorted(bases, key=lambda k: (k.split(":")[0] != "smollm2", k))
  cell = lambda d, se, rec: f"{d:+.3f} ± {se:.3f} ({100 * rec:.0f}%)" if rec is not None else f"{d:+.3f} ± {se:.3f}"  # noqa: E731
  columns = {}
  for pair in pairs:
    source, target = pair.split("/")[0].split(":")
    found = {} if "/" in pair else {r["method"]: r for r in quality
             if (r["source"], r["target"], r["blocks"]) == (source, target, bases[pair]["blocks"]) and str(r["rank"]) in ("320", "-")}
    mine = {r["arm"]: r for r in rows if r["pair"] == pair and r["label"] == r["arm"]}
    # The projections' recovery against the same best bound as the refine arms.
    column = {f"{m} (projection)": cell(found[m]["delta"], found[m]["delta_se"], recovery(bases[pair], found[m]["delta"]))
              for m in projections if m in found}
    column.update({f"refine {a}": cell(mine[a]["delta"], mine[a]["delta_se"], mine[a]["recovery"]) for a in arms if a in mine})
    columns[pair] = column
  names = [f"{m} (projection)" for m in projections] + [f"refine {a}" for a in arms]
  header = [f"{p.split('/')[0].replace(':', ' → ')}{' (' + p.split('/')[1] + ')' if '/' in p else ''}" for p in pairs]
  lines = ["| method | " + " | ".join(header) + " |", "|---" * (1 + len(pairs)) + "|"]
  for name in names:
    lines.append(f"| {name} | " + " | ".join(columns[p].get(name, "—") for p in pairs) + " |")
  return "\n".join(lines)


def default_arm() -> str:
  """The arm whose overrides are all RefineConfig's defaults (no null, random or init key): the
  recipe the issue's goal is checked on, found so that it follows a change of the defaults."""
  from crosslora_jax.refine import RefineConfig
  default = RefineConfig()
  return next(name for name, overrides in ARMS.items()
              if all(hasattr(default, k) and getattr(default, k) == v for k, v in overrides.items()))


GOAL_HEADER = ("| pair | recovery | Δ NLL vs its null control (± s.e., z) | Δ NLL vs its random control (± s.e., z) | "
               "not worse than base | goal met |", "|---|---|---|---|---|---|")


def goal_table(records: list[dict[str, Any]], bases: dict[str, dict[str, Any]], goal_arm: str) -> str:
  """The goal, per pair, for ``goal_arm`` at seed 0 and the default budget: recovery >= 50%,
  better than its null and its random control by > 2 paired s.e., not worse than the base."""
  lines = list(GOAL_HEADER)
  for pair, base in bases.items():
    found = {r["arm"]: np.asarray(r["nll_blocks"]) for r in records
             if r["pair"] == pair and arm_label(r) == r["arm"] and "nll_blocks" in r}
    if goal_arm not in found:
      continue
    unpaired = {r["arm"] for r in records if r["pair"] == pair and arm_label(r) == r["arm"] and "nll_blocks" not in r}
    arm, ref = found[goal_arm], np.asarray(base["nll_blocks"])
    share = recovery(base, float(arm.mean() - ref.mean()))
    checks, cells = [share is not None and share >= 0.5], []
    for control in (f"null-{goal_arm}", f"random-{goal_arm}"):
      if control not in found:
        cells.append("no per-block NLLs (the 2026-12-01 row)" if control in unpaired else "not run")
        checks.append(None)
        continue
      diff, se = float(arm.mean() - found[control].mean()), textdata.paired_se(arm, found[control])
      z = -diff / se if se > 0 else float("inf")
      cells.append(f"{diff:+.3f} (± {se:.3f}, z {z:.1f})")
      checks.append(z > 2)
    worse = float(arm.mean() - ref.mean()) > 0
    checks.append(not worse)
    met = "no" if False in checks else ("not all checks run" if None in checks else "yes")
    lines.append(f"| {pair} | {percent(share)} | {cells[0]} | {cells[1]} | "
                 f"{'no' if worse else 'yes'} | {met} |")
  return "\n".join(lines)


def goal_section(records: list[dict[str, Any]], bases: dict[str, dict[str, Any]], goal_arm: str,
                 legacy_goal: list[str]) -> list[str]:
  """The goal table's Markdown lines, with meta.legacy's goal rows (refine_store): in the table
  when they are of ``goal_arm``, else after it under their own caption."""
  lines = [f"`{goal_arm}` (RefineConfig's default) at seed 0 and the default budget; the issue's goal: recovery ≥ 50%, "
           "better than its null and its random control by more than 2 paired s.e. (z = the arm's advantage over the "
           "control / its paired s.e.), and no target worse than its base.", "", goal_table(records, bases, goal_arm)]
  if not legacy_goal:
    return lines
  carried = ("Rows marked (2026-12-01) are carried from that report: their per-block NLLs were not kept, so they stay "
             f"until `{refine_store.LEGACY_GOAL_ARM}` and both its controls are measured again on the pair.")
  if goal_arm == refine_store.LEGACY_GOAL_ARM:
    return [f"{lines[0]} {carried}", "", lines[2], *legacy_goal]
  return lines + ["", f"The same goal for the earlier default, `{refine_store.LEGACY_GOAL_ARM}`. {carried}", "",
                  *GOAL_HEADER, *legacy_goal]


def versus_table(records: list[dict[str, Any]], bases: dict[str, dict[str, Any]], goal_arm: str, challenger: str) -> str:
  """``challenger`` against ``goal_arm`` wherever both ran with the same seed and budget: the paired
  Δ NLL per run, and how often it was better, equal (|z| < 2) or worse. The spread between seeds
  of one pair is the yardstick the per-block s.e. does not give."""
  def runs(name):
    return {(r["pair"], arm_label(r)[len(name):]): r for r in records if r["arm"] == name and "nll_blocks" in r}
  ours, theirs = runs(goal_arm), runs(challenger)
  lines = [f"| pair | run | {goal_arm} recovery | {challenger} recovery | Δ NLL {challenger} − {goal_arm} (± s.e., z) |",
           "|---|---|---|---|---|"]
  tally = {"better": 0, "equal": 0, "worse": 0}
  for key in sorted(set(ours) & set(theirs)):
    base = bases[key[0]]
    a, b = np.asarray(theirs[key]["nll_blocks"]), np.asarray(ours[key]["nll_blocks"])
    diff, se = float(a.mean() - b.mean()), textdata.paired_se(a, b)
    z = diff / se if se > 0 else 0.0
    tally["equal" if abs(z) < 2 else ("better" if z < 0 else "worse")] += 1
    rec = lambda x: percent(recovery(base, float(x.mean() - base["base_nll"])))  # noqa: E731
    lines.append(f"| {key[0]} | {key[1].strip(' ()') or 'seed 0'} | {rec(b)} | {rec(a)} | {diff:+.3f} (± {se:.3f}, z {z:.1f}) |")
  return "\n".join(lines + ["", f"{challenger} was better in {tally['better']}, equal in {tally['equal']} and worse in "
                                 f"{tally['worse']} of these runs (|z| ≥ 2 counts)."])


def lever_table(records: list[dict[str, Any]], bases: dict[str, dict[str, Any]], goal_arm: str) -> str:
  """Every run of ``goal_arm`` with a non-default budget, sampling, anchor weight or seed against the default run of
  the same pair at the same seed (default budget): the paired Δ NLL per run. A run that differs only
  in its seed is the yardstick: how far the corpus' draw alone moves the result, which the per-block
  s.e. (same corpus on both sides) does not include; the last line sums it up."""
  from crosslora_jax.refine import RefineConfig
  default = RefineConfig()
  levers = ("tokens", "sample_tokens", "steps", "batch", "lr", "eval_every", "temperature", "top_p", "pool")

  goal = ARMS[goal_arm]

  def variant(arm: str) -> bool:  # goal_arm, or an arm that is goal_arm but for its anchor weight
    same = lambda o: {k: v for k, v in o.items() if k != "anchor"}  # noqa: E731
    return arm in ARMS and same(ARMS[arm]) == same(goal)

  def changed(rec):
    config = rec["report"]["config"]
    out = {k: config[k] for k in levers if config.get(k, getattr(default, k)) != getattr(default, k)}
    if config.get("anchor", goal["anchor"]) != goal["anchor"]:
      out["anchor"] = config["anchor"]
    return out

  runs = [r for r in records if variant(r["arm"]) and "nll_blocks" in r]
  plain = {(r["pair"], r["report"]["config"].get("seed", 0)): r for r in runs if not changed(r)}
  lines = [f"| pair | lever | seed | recovery | default's recovery | Δ NLL lever − default (± s.e., z) |",
           "|---|---|---|---|---|---|"]
  spread = []
  for rec in sorted(runs, key=lambda r: (r["pair"], arm_label(r))):
    seed, lever = rec["report"]["config"].get("seed", 0), changed(rec)
    against = plain.get((rec["pair"], seed if lever else 0))
    if against is None or against is rec or rec["pair"] not in bases:
      continue
    base = bases[rec["pair"]]
    a, b = np.asarray(rec["nll_blocks"]), np.asarray(against["nll_blocks"])
    diff, se = float(a.mean() - b.mean()), textdata.paired_se(a, b)
    if not lever:
      spread.append(abs(diff))
    rec_share = lambda x: percent(recovery(base, float(x.mean() - base["base_nll"])))  # noqa: E731
    name = ", ".join(f"{k.replace('_', ' ')} {v:g}" for k, v in lever.items()) or f"seed {seed} (against seed 0)"
    lines.append(f"| {rec['pair']} | {name} | {seed} | {rec_share(a)} | {rec_share(b)} | {diff:+.3f} (± {se:.3f}, z {diff / se if se > 0 else 0.0:.1f}) |")
  if spread:
    lines += ["", f"The default's own seed-to-seed change: |Δ| {min(spread):.3f} to {max(spread):.3f} nats over {len(spread)} pair{'s' if len(spread) != 1 else ''} "
                  f"(mean {np.mean(spread):.3f}). A lever whose Δ is inside that range has not been shown to matter by one "
                  "seed, whatever its z against the same corpus."]
  return "\n".join(lines)


def load_results(cache_dir: pathlib.Path, committed: dict[str, Any]) -> dict[str, Any]:
  """Records, bases, bounds and sources from the cache, with the committed legacy rows (refine_store) after them."""
  docs = refine_store.cache_docs(cache_dir)
  records = [{**doc, "record": name} for name, doc in docs["records"].items()]
  bases = {doc["pair"]: dict(doc) for doc in docs["bases"].values()}  # best_bounds writes into copies, not the cache
  bound_lines = best_bounds(list(docs["bounds"].values()), bases)
  records += refine_store.legacy_records(committed, records)
  bases.update(refine_store.legacy_bases(committed, bases))
  sources = list(docs["sources"].values())
  return {"docs": docs, "records": records, "bases": bases, "bound_lines": bound_lines, "sources": sources,
          "legacy": refine_store.legacy_lines(committed, bases, records, sources, arm_label)}


def target_lines(res: dict[str, Any]) -> list[str]:
  """The report's lines on each target's base and bounds, and on each source adapter's own gain."""
  legacy = res["legacy"]
  lines = [f"- {k}: base {v['base_nll']:.3f} (JAX" + (f"; results/quality.md: {v['base_nll_reference']:.3f}" if v.get("base_nll_reference") else "")
           + f"), trained {v['trained_nll_recipe']:.3f} ({v.get('trained_by', 'torch (results/quality.json)')}, "
           f"bench_quality's recipe {RECIPE}), {v['blocks']} blocks" for k, v in res["bases"].items() if not v.get("legacy")]
  lines += legacy["bases"] + res["bound_lines"] + legacy["bounds"]
  return lines + ["", "Source adapters (their own gain on the source base, same held-out blocks, JAX):",
                  *[f"- {v['source']} ({v['domain']}): base {v['base_nll']:.3f}, with the adapter {v['adapter_nll']:.3f}, "
                    f"gain {v['gain']:.3f} ± {v['gain_se']:.3f} (`{pathlib.Path(v['adapter']).name}`)" for v in res["sources"]],
                  *legacy["sources"]]


def when_measured(records: list[dict[str, Any]]) -> str:
  days = sorted({r["finished"][:10] for r in records if r.get("finished")})
  text = (f"Arms ran {days[0]}" + (f" to {days[-1]}" if days[-1] != days[0] else "")) if days else \
      "No arm ran since the report kept per-block NLLs"
  return text + ("; rows without per-block NLLs are carried from reports written before 2026-12-02 (refine_store)."
                 if any("legacy" in r for r in records) else ".")


def write_results(cache_dir: pathlib.Path, out: pathlib.Path, note: str) -> None:
  goal_arm = default_arm()
  res = load_results(cache_dir, refine_store.read_committed(out))
  records, bases, legacy = res["records"], res["bases"], res["legacy"]
  rows, text = table(records, bases)
  meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "machine": platform.machine(),
          "cpus": os.cpu_count(), "note": note, "legacy": legacy,
          "bases": {k: {kk: v.get(kk) for kk in ("base_nll", "trained_nll", "trained_nll_recipe", "base_nll_reference", "blocks", "trained_by")}
                    for k, v in bases.items()}}
  out.mkdir(parents=True, exist_ok=True)
  commands = sorted({r["command"] for r in records if r.get("command")} | set(legacy["commands"]))
  md = ["# Refine by distillation from the source model", "", f"Measured {meta['date']} on {meta['machine']}, "
        f"{meta['cpus']} CPU cores (shared with other jobs), JAX CPU. {when_measured(records)}", "", note, "", "Targets:",
        *target_lines(res), "",
        "Recovery = (base − arm) / (base − trained), *trained* = the best bound measured for that target; s.e. is the paired standard error over blocks (the trained NLL's own "
        "uncertainty is not in it). Tokens kept = selected / learnable student tokens of the training samples.", "",
        "## Method against method", "",
        "Δ held-out NLL vs the target base (± paired s.e.) and recovery; projections from results/quality.json, "
        "refine arms at seed 0 and the default budget (the table below has every run).", "",
        method_table(rows, bases), "", "## The goal, for the default recipe", "",
        *goal_section(records, bases, goal_arm, legacy["goal"]), "", f"## The default against the earlier default, `{COMPARED}`", "",
        versus_table(records, bases, goal_arm, COMPARED), "", "## Levers of the default, run for run", "",
        lever_table(records, bases, goal_arm), "", "## Every arm", "", text, "",
        "Every checked step (step 0 = the initial adapter; for a zero init, the base), with the held-back checks "
        "on teacher text the student never trained on (agreement: correlation of the student's log-prob change "
        "with the teacher's carried score; delta_error: their mean squared difference; nll_selected: the "
        "student's NLL on the selected tokens):", "", step_table(records, bases), *legacy["steps"], "",
        "How each held-back check would have picked the step that ships, over the runs above with held-out NLLs at "
        "every checked step (the check a run used does not change its checkpoints, so all three are scored on every run; "
        "regret = held-out NLL of the picked step − the best checked step's; *controls* = the null and random arms):", "",
        check_table(records), "",
        "Commands:", *[f"- `{c}`" for c in commands], ""]
  (out / "refine.json").write_text(json.dumps({"meta": meta, "rows": rows, "cache": res["docs"]}, indent=1))
  (out / "refine.md").write_text("\n".join(md))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--pair", default="smollm2:qwen05", help="source:target short names (" + ", ".join(MODELS) + ")")
  p.add_argument("--arms", default="topk30,null", help="comma list of " + ", ".join(ARMS))
  p.add_argument("--blocks", type=int, default=32, help="held-out blocks of 128 tokens")
  p.add_argument("--domain", default="pydoc", choices=textdata.DOMAINS,
                 help="the text the source adapter is trained on and the target evaluated on (crosslora_bench.textdata)")
  for flag, kind in BUDGET.items():
    p.add_argument(f"--{flag}", type=kind, default=None, help=f"RefineConfig.{flag} for every arm (default: RefineConfig's)")
  p.add_argument("--bound_lr", type=float, action="append", default=[],
                 help="also train the target's bound at this learning rate (repeatable); recovery uses the best bound measured")
  p.add_argument("--cache_dir", default=str(REPO / ".cache" / "bench_refine"))
  p.add_argument("--out", default=str(REPO / "results"))
  p.add_argument("--note", default="", help="a status paragraph for the top of refine.md")
  p.add_argument("--report_only", action="store_true")
  args = p.parse_args(argv)
  args.source, args.target = args.pair.split(":")
  cache_dir = pathlib.Path(args.cache_dir)
  for sub in ("records", "bases", "corpus", "lora", "sources", "bounds"):
    (cache_dir / sub).mkdir(parents=True, exist_ok=True)
  # The committed records, and those of a report written elsewhere (--out): a run into a scratch
  # folder must not measure again what results/refine.json holds.
  for out in dict.fromkeys((REPO / "results", pathlib.Path(args.out))):
    restored = refine_store.restore(cache_dir, refine_store.read_committed(out))
    if restored:
      log(f"restored {restored} cached documents from {out}/refine.json")
  if not args.report_only:
    run(args, cache_dir)
  write_results(cache_dir, pathlib.Path(args.out), args.note)
  return 0


def measure_base(args, state: dict[str, Any], cache_dir: pathlib.Path) -> dict[str, Any]:
  """The target base's per-block NLL, and the trained-on-target bound: results/quality.json's
  torch-trained one where it has it, else a LoRA trained here by the JAX trainer, same recipe."""
  t0 = time.perf_counter()
  per_block = block_nll(state["target_lm"], None, None, state["blocks"])
  ref = trained_reference(args.target, args.blocks) if args.domain == "pydoc" else None
  record = {"pair": pair_id(args), "domain": args.domain, "blocks": args.blocks, "nll_blocks": per_block.tolist(), "base_nll": float(per_block.mean()),
            "base_nll_reference": ref["base_nll"] if ref else None}
  if ref:
    record.update(trained_nll=ref["trained_nll"], trained_by="torch (results/quality.json)")
  else:
    trained = adapter_nll(state["target_lm"], trained_lora(args.target, cache_dir, state["target_lm"], args.domain), state["blocks"])
    record.update(trained_nll=float(trained.mean()), trained_blocks=trained.tolist(), trained_by="JAX (trained here)")
  record["seconds"] = time.perf_counter() - t0
  log(f"base NLL {record['base_nll']:.4f} (reference {record['base_nll_reference']}), trained {record['trained_nll']:.4f} "
      f"({record['trained_by']}) in {record['seconds']:.0f} s")
  return record


def source_gain(args, state: dict[str, Any], cache_dir: pathlib.Path) -> dict[str, Any]:
  """The source adapter's own gain on the source base, same held-out blocks: what a perfect move could bring."""
  path = cache_dir / "sources" / f"{args.source}-{args.domain}-{args.blocks}.json"
  if path.exists():
    return json.loads(path.read_text())
  from crosslora_jax.refine import runtime
  model = runtime.load_lm(state["source_dir"], None, "float32")
  ids = heldout_ids(state["source_dir"], args.blocks, args.domain)
  base, tuned = block_nll(model, None, None, ids), adapter_nll(model, state["source_adapter"], ids)
  record = {"source": args.source, "domain": args.domain, "blocks": args.blocks, "adapter": str(state["source_adapter"]),
            "base_nll": float(base.mean()), "adapter_nll": float(tuned.mean()), "gain": float(base.mean() - tuned.mean()),
            "gain_se": textdata.paired_se(tuned, base)}
  path.write_text(json.dumps(record))
  log(f"source {args.source} ({args.domain}): base {record['base_nll']:.4f}, with its adapter {record['adapter_nll']:.4f}")
  return record


def measure_bound(args, state: dict[str, Any], cache_dir: pathlib.Path, lr: float) -> None:
  """A second trained-on-target bound: the recipe at learning rate ``lr`` (4e-3 makes Qwen's loss spike)."""
  path = cache_dir / "bounds" / f"{args.target}-{args.domain}-{args.blocks}-lr{lr:g}.json"
  if path.exists():
    return
  folder = trained_lora(args.target, cache_dir, state["target_lm"], args.domain, lr=lr)
  nll = adapter_nll(state["target_lm"], folder, state["blocks"])
  path.write_text(json.dumps({"target": args.target, "domain": args.domain, "blocks": args.blocks, "lr": lr,
                              "recipe": json.loads((folder / "train_info.json").read_text())["recipe"],
                              "trained_nll": float(nll.mean()), "nll_blocks": nll.tolist()}))
  log(f"bound {args.target} ({args.domain}) at lr {lr:g}: NLL {nll.mean():.4f}")


def best_bounds(bounds: list[dict[str, Any]], bases: dict[str, dict[str, Any]]) -> list[str]:
  """Every base's trained_nll becomes the best bound measured for its target, domain and blocks; returns their lines.
  A legacy base (refine_store) already carries its best bound, and its lines travel in meta.legacy."""
  lines = []
  for pair, base in bases.items():
    if base.get("legacy"):
      continue
    target, domain = pair.split("/")[0].split(":")[1], base.get("domain", "pydoc")
    found = [b for b in bounds if (b["target"], b["domain"], b["blocks"]) == (target, domain, base["blocks"])]
    for b in found:
      lines.append(f"- {pair}: a second bound, the recipe at lr {b['lr']:g} (JAX): trained {b['trained_nll']:.3f}")
    base["trained_nll_recipe"] = recipe_bound(target, base)
    base["trained_nll"] = min([base["trained_nll_recipe"]] + [b["trained_nll"] for b in found])
  return lines


def recipe_bound(target: str, base: dict[str, Any]) -> float:
  """The bound of bench_quality's recipe itself, from where it was measured (its per-block NLLs
  when trained here, else results/quality.json), not from the base's trained_nll: documents
  written before 2026-12-02 (afternoon) stored the best bound there."""
  if "trained_blocks" in base:
    return float(np.mean(base["trained_blocks"]))
  ref = trained_reference(target, base["blocks"]) if base.get("domain", "pydoc") == "pydoc" else None
  return float(ref["trained_nll"]) if ref else float(base["trained_nll"])


def run(args, cache_dir: pathlib.Path) -> None:
  from crosslora_jax.refine import runtime
  state = {"source_dir": zoo.fetch_model(MODELS[args.source]), "target_dir": zoo.fetch_model(MODELS[args.target]),
           "source_adapter": source_adapter_dir(args.source, cache_dir, args.domain)}
  source_gain(args, state, cache_dir)
  state["target_lm"] = runtime.load_lm(state["target_dir"], None, "float32")
  state["blocks"] = heldout_ids(state["target_dir"], args.blocks, args.domain)
  base_file = cache_dir / "bases" / f"{pair_id(args).replace(':', '-').replace('/', '-')}-{args.blocks}.json"
  if not base_file.exists():
    base_file.write_text(json.dumps(measure_base(args, state, cache_dir)))
  for lr in args.bound_lr:
    measure_bound(args, state, cache_dir, lr)
  state["base_blocks"] = json.loads(base_file.read_text())["nll_blocks"]
  for name in args.arms.split(","):
    config, _ = arm_config(name, args)
    out = cache_dir / "records" / f"{record_key(pair_id(args), name, config, args.blocks)}.json"
    if out.exists():
      log(f"{name}: cached")
      continue
    log(f"{name}: refining")
    record = run_arm(name, args, state)
    out.write_text(json.dumps(record, indent=1))
    log(f"{name}: NLL {np.mean(record['nll_blocks']):.4f}, shipped {record['report']['shipped']}, "
        f"{record['refine_seconds']:.0f} s")
    write_results(cache_dir, pathlib.Path(args.out), args.note)


if __name__ == "__main__":
  sys.exit(main())
