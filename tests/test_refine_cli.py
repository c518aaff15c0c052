"""--refine on the command line, in a subprocess, on tiny models with two different tokenizers."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT

BUDGET = ("--refine_tokens", "96", "--refine_sample_tokens", "16", "--refine_steps", "4", "--refine_batch", "2",
          "--refine_eval_every", "2", "--refine_lr", "2e-2")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  from refine_fixtures import make_refine_models
  return make_refine_models(tmp_path_factory.mktemp("refine_cli"))


def run_cli(models, tmp_path, *args):
  # One cache root for the module (under its temporary folder): later runs reuse the subspaces and kernels.
  env = dict(os.environ, PYTHONPATH=str(ROOT), CROSSLORA_CACHE=str(models / "cache"), HF_HUB_OFFLINE="1")
  base = ("--source_model", models / "source", "--target_model", models / "target", "--adapter", models / "adapter",
          "--rank", "8", "--noprogress")
  return subprocess.run([sys.executable, "-m", "crosslora_jax.transfer", *map(str, base + args)],
                        capture_output=True, text=True, env=env, timeout=300)


def test_refine_distill_writes_a_peft_adapter_and_a_report_section(models, tmp_path):
  from crosslora_jax.formats import peft_format
  from peft_helpers import load_with_adapter
  r = run_cli(models, tmp_path, "--output", tmp_path / "plain")
  assert r.returncode == 0, r.stderr
  r = run_cli(models, tmp_path, "--output", tmp_path / "out", "--report", tmp_path / "report.json",
              "--plot", tmp_path / "plot.png", "--refine", "distill", "--no_refine_guard", *BUDGET)
  assert r.returncode == 0, r.stderr
  assert "refine (student training)" not in r.stderr  # --noprogress
  assert "refine distill (init projection" in r.stdout and "shipped refined" in r.stdout
  report = json.loads((tmp_path / "report.json").read_text())
  refine = report["refine"]
  assert refine["corpus"]["samples"] == 6 and refine["corpus"]["cache"] == "miss"
  assert len(refine["losses"]) == 4 and [e["step"] for e in refine["heldout"]] == [0, 2, 4]
  assert refine["shipped"] == "refined" and refine["init"] == "projection"
  assert set(refine["seconds"]) >= {"teacher", "train", "total"}
  assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  from crosslora_jax import plot
  plain_report = tmp_path / "plain_report.json"
  plain_report.write_text(json.dumps({k: v for k, v in report.items() if k != "refine"}))
  assert plot.main([str(tmp_path / "report.json"), str(tmp_path / "again.png")]) == 0
  assert plot.main([str(plain_report), str(tmp_path / "plain.png")]) == 0
  height = lambda png: int.from_bytes((tmp_path / png).read_bytes()[20:24], "big")  # the IHDR height
  assert height("again.png") == height("plot.png") > height("plain.png")  # two panels more: the refine ones
  refined, projected = (peft_format.read_adapter(tmp_path / name) for name in ("out", "plain"))
  assert set(refined.modules) == set(projected.modules)
  assert any(not np.allclose(refined.modules[p].b_or, projected.modules[p].b_or) for p in projected.modules)
  assert refined.config["base_model_name_or_path"] == projected.config["base_model_name_or_path"]
  _, caught = load_with_adapter(models / "target", tmp_path / "out")
  assert caught == []
  # The teacher's corpus was cached: a second run reads it back, for each of two adapters with the same bytes.
  shutil.copytree(models / "adapter", tmp_path / "twin")
  r = run_cli(models, tmp_path, "--adapter", tmp_path / "twin", "--output", tmp_path / "again", "--refine", "distill",
              *BUDGET, "--progress")
  assert r.returncode == 0, r.stderr
  # --progress (given) draws the bars in a log too, refine's training included
  assert "decomposing base weights" in r.stderr and r.stderr.count("refine (student training)") >= 2
  assert r.stdout.count("(cache hit)") == 2
  assert sorted(p.name for p in (tmp_path / "again").iterdir()) == ["adapter", "twin"]


def test_refine_none_is_a_plain_run(models, tmp_path):
  outputs = {}
  for name, extra in (("plain", ()), ("none", ("--refine", "none", "--refine_steps", "3"))):
    r = run_cli(models, tmp_path, "--output", tmp_path / name, "--report", tmp_path / f"{name}.json", *extra)
    assert r.returncode == 0, r.stderr
    assert "refine distill" not in r.stdout
    outputs[name] = {p.name: p.read_bytes() for p in sorted((tmp_path / name).iterdir())}
  assert outputs["plain"] == outputs["none"]
  plain, none = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("plain", "none"))
  untimed = lambda report: [{k: v for k, v in e.items() if k != "seconds"} for e in report["entries"]]
  assert "refine" not in none and list(none) == list(plain) and untimed(none) == untimed(plain)


def _prompts(tmp_path, case):
  """(extra flags, what the one-line error names) for each kind of bad refine input."""
  file = tmp_path / "prompts.txt"
  if case == "missing":
    return ("--refine_prompts", file), "prompts file expected"
  if case == "empty":
    file.write_text("\n  \n")
    return ("--refine_prompts", file), "at least one prompt"
  if case == "not_utf8":
    file.write_bytes(b"def f():\n  return '\xff'\n")
    return ("--refine_prompts", file), "UTF-8"
  if case == "steps_0":
    return ("--refine_steps", "0"), "--refine_steps"
  if case == "rank_with_projection":
    return ("--refine_rank", "2"), "--refine_init zero"
  file.write_text("def add(a, b):\n")
  if case == "prompts_is_output":
    return ("--refine_prompts", file, "--output", file), "--refine_prompts"
  (tmp_path / "out").mkdir()
  inside = tmp_path / "out" / "prompts.txt"
  shutil.move(file, inside)
  return ("--refine_prompts", inside, "--overwrite"), "--refine_prompts"


@pytest.mark.parametrize("case", ["missing", "empty", "not_utf8", "steps_0", "rank_with_projection",
                                  "prompts_is_output", "prompts_inside_output"])
def test_bad_refine_input_is_one_line_before_any_work(models, tmp_path, case):
  extra, named = _prompts(tmp_path, case)
  before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
  args = ("--output", tmp_path / "out") if "--output" not in extra else ()
  r = run_cli(models, tmp_path, *args, "--report", tmp_path / "report.json", "--refine", "distill", *extra)
  assert r.returncode == 2, r.stderr
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], r.stderr
  after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
  assert after == before  # no output, no report, inputs untouched


def test_a_target_without_tokenizer_is_refused_before_the_transfer(models, tmp_path):
  bare = tmp_path / "bare"
  shutil.copytree(models / "target", bare)
  (bare / "tokenizer.json").unlink()
  env = dict(os.environ, PYTHONPATH=str(ROOT), CROSSLORA_CACHE=str(models / "cache"))
  r = subprocess.run([sys.executable, "-m", "crosslora_jax.transfer", "--source_model", str(models / "source"),
                      "--target_model", str(bare), "--adapter", str(models / "adapter"), "--output",
                      str(tmp_path / "out"), "--refine", "distill", "--noprogress"],
                     capture_output=True, text=True, env=env, timeout=300)
  assert r.returncode == 2 and "--target_model" in r.stderr and "tokenizer" in r.stderr, r.stderr
  assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


# Both signals take the CLI's one handler whatever the phase: each phase gets one of them (a run is ~30 s).
@pytest.mark.parametrize("phase, sig", [("sampling", "SIGTERM"), ("training", "SIGINT")])
def test_a_signal_during_refine_leaves_existing_outputs_and_no_partial_cache(models, tmp_path, phase, sig):
  import signal
  from refine_fixtures import SIGNAL_RUNNER
  old = {"out/OLD_MARKER": b"old adapter", "report.json": b'{"old": true}\n', "plot.png": b"old picture"}
  for name, data in old.items():
    (tmp_path / name).parent.mkdir(exist_ok=True)
    (tmp_path / name).write_bytes(data)
  corpus_cache = tmp_path / "corpus-cache"
  env = dict(os.environ, PYTHONPATH=str(ROOT), CROSSLORA_CACHE=str(models / "cache"), HF_HUB_OFFLINE="1")
  args = ("--source_model", models / "source", "--target_model", models / "target", "--adapter", models / "adapter",
          "--rank", "8", "--noprogress", "--output", tmp_path / "out", "--report", tmp_path / "report.json",
          "--plot", tmp_path / "plot.png", "--overwrite", "--refine", "distill", "--refine_cache_dir", corpus_cache,
          *BUDGET)
  r = subprocess.run([sys.executable, "-c", SIGNAL_RUNNER, sig, phase, *map(str, args)], capture_output=True,
                     text=True, env=env, timeout=300)
  assert r.returncode == 128 + getattr(signal, sig), r.stderr
  assert r.stderr.strip().splitlines() == [f"error: interrupted by {sig}"], r.stderr
  found = {str(p.relative_to(tmp_path)): p.read_bytes() for p in tmp_path.rglob("*")
           if p.is_file() and not p.is_relative_to(corpus_cache)}
  assert found == old  # every existing output untouched, no temporary sibling left
  assert {p.name for p in tmp_path.iterdir()} - {"corpus-cache"} == {"out", "plot.png", "report.json"}
  entries = sorted(p.name for p in corpus_cache.rglob("*")) if corpus_cache.exists() else []
  if phase == "sampling":
    assert entries == []  # the teacher's text was never finished: no cache entry, no temporary file
  else:
    assert len(entries) == 1 and entries[0].endswith(".json") and not entries[0].startswith(".")
    assert json.loads((corpus_cache / entries[0]).read_text())["payload"]["texts"]  # whole, not half-written
