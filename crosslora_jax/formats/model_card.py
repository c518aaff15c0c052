"""The README.md model card of a transferred adapter, as a PEFT user expects one.

PEFT's ``save_pretrained`` writes a README.md whose YAML front matter names the
``base_model``, ``library_name: peft``, a ``pipeline_tag`` and tags; the Hub reads
it to link the adapter to its base. :func:`render` writes the same front matter
(base_model = the target) and a body that says where the adapter came from, how
it was moved, what was transferred or skipped, and what we measured about the
quality of such transfers. The text is a function of the report's deterministic
fields only (no times, dates, hosts or cache paths), so a rerun writes the same
bytes; a later ``save_pretrained`` by PEFT updates it in place (it keeps our body
and appends its version under "### Framework versions").
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping
from typing import Any

FILE = "README.md"
# Where the measurements behind QUALITY_CAVEAT live, relative to the crosslora_jax repository; the card
# links them absolutely (results_link).
RESULTS_LINK = "results/quality.md"
REFINE_RESULTS_LINK = "results/refine.md"
QUALITY_CAVEAT = (
    "Measured on real models (SmolLM2-135M, Qwen2.5-Coder-0.5B and 1.5B, Gemma-3-270M; held-out "
    "next-token loss), no data-free method of crosslora_jax improved a target of another family: "
    "`cross_lora` was at the level of a random-direction control of the same norms, `truncate_pad` "
    "and norm calibration made targets worse, and `anchored`'s guard left them at their base. Between "
    "identical bases `copy` keeps the whole gain and `cross_lora` part of it. Evaluate this adapter on "
    "your own data before relying on it.")
_METHODS = {
    "cross_lora": "Cross-LoRA (arXiv 2508.05232): the LoRA update projected through rank-r SVD subspaces of "
                  "the source and target base weights",
    "lora_x": "LoRA-X: the update projected onto the target's rank-r SVD subspaces",
    "copy": "the LoRA factors copied unchanged",
    "truncate_pad": "the LoRA factors cut or zero-padded to the target's sizes (a baseline)",
    "anchored": "maps between the two models' spaces fitted on their shared vocabulary, with a data-free guard",
}
# Options that change the result (execution knobs such as chunk_layers or cache_dir do not).
_OPTIONS = ("rank", "layer_map", "svd", "seed", "solver", "dtype", "calibrate_norm", "skip_unsupported")


def render(report: Any, *, base_model: str, source_adapter: str | None = None, source_model: str | None = None,
           target_model: str | None = None, version: str | None = None) -> str:
  """README.md text for one transferred adapter.

  Args:
    report: the transfer's ``Report`` (or its ``to_dict()``).
    base_model: the adapter's ``base_model_name_or_path`` (the target), the card's ``base_model``.
    source_adapter, source_model, target_model: the names as the user gave them (a Hub id with its
      @revision, or a folder); default: the report's.
    version: crosslora_jax's version, default the installed one.
  """
  r = report.to_dict() if hasattr(report, "to_dict") else dict(report)
  if version is None:
    from crosslora_jax import __version__ as version
  names = {"adapter": source_adapter or r["adapter"], "source": source_model or r["source"],
           "target": target_model or r["target"]}
  return (_front_matter(base_model) + "\n" + _body(r, names, base_model) + "\n### Framework versions\n\n"
          f"- crosslora_jax {version}\n")


def write(folder: str | pathlib.Path, text: str) -> pathlib.Path:
  """Writes ``text`` as ``folder/README.md`` (UTF-8, ``\\n`` line ends on every platform)."""
  file = pathlib.Path(folder) / FILE
  file.write_bytes(text.encode("utf-8"))
  return file


def check_written(folder: str | pathlib.Path, text: str) -> list[str]:
  """Problems with ``folder/README.md`` against ``text`` (for the output verification): [] when equal."""
  file = pathlib.Path(folder) / FILE
  try:
    got = file.read_bytes()
  except OSError as e:
    return [f"{file}: the model card expected, got {type(e).__name__}: {e.strerror}"]
  if got != text.encode("utf-8"):
    return [f"{file}: the rendered model card expected, got different bytes"]
  return []


def _front_matter(base_model: str) -> str:
  from huggingface_hub import ModelCardData
  tags = [f"base_model:adapter:{base_model}", "lora", "transformers", "crosslora_jax", "cross-lora"]
  data = ModelCardData(base_model=base_model, library_name="peft", pipeline_tag="text-generation", tags=tags)
  return "---\n" + data.to_yaml() + "\n---\n"


def _link(name: str) -> str:
  """A Hub id becomes a link to its Hub page; a local folder stays code."""
  from crosslora_jax import hub
  parsed = hub.parse_hub_id(name)
  if parsed is None or name.startswith(("/", ".")):
    return f"`{name}`"
  repo, revision = parsed
  url = f"https://huggingface.co/{repo}" + (f"/tree/{revision}" if revision else "")
  return f"[{name}]({url})"


def _body(r: Mapping[str, Any], names: Mapping[str, str], base_model: str) -> str:
  config, summary = r["config"], r["summary"]
  method = config["method"]
  lines = [f"# {pathlib.PurePosixPath(names['adapter'].split('@')[0]).name} on {_short(base_model)}", "",
           f"A LoRA adapter for {_link(names['target'])}, moved {_how(r)} from the adapter "
           f"{_link(names['adapter'])} of {_link(names['source'])} by crosslora_jax "
           f"(`{method}`: {_METHODS.get(method, method)}).",
           "", "## Transfer", "", "| | |", "|---|---|",
           f"| source adapter | {_link(names['adapter'])} |",
           f"| source base model | {_link(names['source'])} |",
           f"| target base model | {_link(names['target'])} |",
           f"| method | `{method}` |",
           f"| options | {_options(config, r.get('output_dtype'))} |",
           f"| transferred | {_transferred(r['entries'])} |",
           f"| skipped | {len(r['skipped'])} |",
           f"| layer map (target layer: source layer) | {_layer_map(r.get('layer_map') or [])} |",
           f"| energy captured (mean, source / target) | {_num(summary.get('mean_energy_source'))} / "
           f"{_num(summary.get('mean_energy_target'))} |",
           f"| subspace overlap (mean) | {_num(summary.get('mean_overlap'))} |",
           f"| relative update ‖ΔW‖/‖W‖ (mean, source / target) | {_num(summary.get('mean_relative_update_source'))} / "
           f"{_num(summary.get('mean_relative_update_target'))} |", ""]
  lines += _skipped(r["skipped"])
  lines += _refine(r["refine"]) if r.get("refine") else []
  lines += ["## Quality: measured, not assumed", "", QUALITY_CAVEAT + f" The measurements: {results_link(RESULTS_LINK)}.",
            "",
            "## How to use", "", "```python", "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM", "",
            f"base = AutoModelForCausalLM.from_pretrained({_from_pretrained_args(names['target'], base_model)})",
            "model = PeftModel.from_pretrained(base, \"path/to/this/adapter\")", "```", ""]
  return "\n".join(lines)


def _from_pretrained_args(target: str, base_model: str) -> str:
  """``"owner/name"`` (plus ``revision="..."`` when the target was given as a Hub id with one)."""
  from crosslora_jax import hub
  parsed = hub.parse_hub_id(target)
  revision = parsed[1] if parsed is not None and parsed[0] == base_model else None
  return json.dumps(base_model) + (f", revision={json.dumps(revision)}" if revision else "")


def _short(name: str) -> str:
  return pathlib.PurePosixPath(name.split("@")[0]).name or name


def _num(value: Any) -> str:
  return "n/a" if value is None or value != value else f"{value:.3f}"


def _options(config: Mapping[str, Any], output_dtype: str | None) -> str:
  parts = []
  for key in _OPTIONS:
    value = config.get(key)
    if key == "dtype":
      value = value or output_dtype
    if isinstance(value, bool):
      value = "on" if value else "off"
    if key in ("rank",) and config.get("method") not in ("cross_lora", "lora_x"):
      continue
    parts.append(f"{key} {value}")
  if config.get("svd") in ("randomized", "auto"):  # auto's randomized weights use these too
    parts.append(f"n_oversamples {config.get('n_oversamples')}, n_power_iter {config.get('n_power_iter')}")
  if config.get("svd") in ("krylov", "auto"):  # krylov's setting is fixed
    from crosslora_jax.core import svd_solvers
    parts.append(f"krylov oversamples {svd_solvers.KRYLOV_OVERSAMPLES}, steps {svd_solvers.KRYLOV_STEPS}")
  anchor = config.get("anchor")
  if config.get("method") == "anchored" and isinstance(anchor, Mapping):
    parts.append("anchor " + ", ".join(f"{k} {v}" for k, v in sorted(anchor.items())))
  return ", ".join(parts)


def _transferred(entries: list[Mapping[str, Any]]) -> str:
  by_module: dict[str, int] = {}
  for e in entries:
    by_module[e["module"]] = by_module.get(e["module"], 0) + 1
  kept = sum(1 for e in entries if e.get("guard") != "skipped")
  guard = f" ({len(entries) - kept} zeroed by the anchored guard)" if kept != len(entries) else ""
  return f"{len(entries)} weights{guard}: " + ", ".join(f"{m} ×{n}" for m, n in by_module.items())


def _layer_map(layer_map: list[int | None]) -> str:
  return ", ".join(f"{t}: {'-' if s is None else s}" for t, s in enumerate(layer_map)) or "n/a"


def _skipped(skipped: list[Mapping[str, Any]]) -> list[str]:
  if not skipped:
    return []
  reasons: dict[str, list[str]] = {}
  for s in skipped:
    reasons.setdefault(s["reason"], []).append(s["source_key"])
  lines = ["### Not transferred", ""]
  for reason, keys in reasons.items():
    shown = ", ".join(f"`{k}`" for k in keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
    lines.append(f"- {len(keys)}: {reason} ({shown})")
  return lines + [""]


def results_link(relative: str) -> str:
  """An absolute link to a results file: the project's URL from the installed package's metadata when it has
  one, else the file in this installation's source tree (a path the user has), else its name in the repository."""
  import importlib.metadata
  try:
    urls = importlib.metadata.metadata("crosslora_jax").get_all("Project-URL") or []
  except importlib.metadata.PackageNotFoundError:
    urls = []
  for entry in urls:  # "Label, https://host/owner/repo"
    url = entry.split(",", 1)[-1].strip().rstrip("/")
    if url.startswith("https://github.com/"):
      return f"[{relative}]({url}/blob/main/{relative})"
  file = pathlib.Path(__file__).resolve().parents[2] / relative
  if file.is_file():
    return f"[{file}]({file.as_uri()})"
  return f"`{relative}` in the crosslora_jax source repository"


def _how(r: Mapping[str, Any]) -> str:
  refine = r.get("refine")
  if not refine:
    return "without data or training"
  if refine["shipped"] != "refined":
    return "without user data (a distillation refine ran, but its held-back check kept the projection)"
  return "without user data, then refined by distillation on text the source model wrote"


def _refine(refine: Mapping[str, Any]) -> list[str]:
  """The refine stage: what ran, the held-back check, what shipped (deterministic fields only: no cache, no times)."""
  config, corpus, tokens = refine["config"], refine["corpus"], refine["tokens"]
  check = config["check"]
  evals = {e["step"]: e[check] for e in refine["heldout"]}
  selected = f"top {config['fraction']:g}" if config["selection"] == "topk" else config["selection"]
  checks = ", ".join(f"step {step}: {_num(value)}" for step, value in evals.items())
  return ["## Refine by distillation", "", "| | |", "|---|---|",
          f"| teacher | source base + the source adapter, {corpus['samples']} samples of up to "
          f"{config['sample_tokens']} tokens (temperature {config['temperature']:g}, top-p {config['top_p']:g}, "
          f"seed {config['seed']}), {corpus['teacher_tokens']} tokens |",
          f"| student | the target base + a LoRA (r {refine['rank']}, alpha {refine['alpha']:g}), started from "
          f"the {refine['init']} |",
          f"| training | {len(refine['losses'])} steps x {config['batch']} samples at lr {config['lr']:g}, loss "
          f"`{config['loss']}` on the {selected} tokens by adapter score ({tokens['selected_tokens']} of "
          f"{tokens['learnable_tokens']}), anchor {config['anchor']:g} |",
          f"| held-back check | `{check}` on {tokens['heldout_samples']} teacher samples never trained on: {checks} |",
          f"| shipped | {refine['shipped']} ({refine['guard']}) |", "",
          f"The refine's own measurements: {results_link(REFINE_RESULTS_LINK)}.", ""]
