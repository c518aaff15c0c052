"""The command line in a subprocess: outputs, report, several adapters, help."""

import json
import os
import subprocess
import sys

import pytest

import fixtures
from conftest import ROOT
from peft_helpers import load_with_adapter


def run_cli(*args, cwd=None):
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  return subprocess.run([sys.executable, "-m", "crosslora_jax.transfer", *map(str, args)],
                        capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("cli")
  src = fixtures.make_model("llama", root / "src", seed=0)
  fixtures.make_model("qwen2", root / "tgt", seed=1, num_hidden_layers=6)
  fixtures.make_adapter(src, root / "one", kind="llama", r=4, seed=1)
  src = fixtures.make_model("llama", None, seed=0)
  fixtures.make_adapter(src, root / "two", kind="llama", r=8, seed=2, target_modules=["q_proj", "v_proj"])
  return root


def test_single_adapter_with_report(setup, tmp_path):
  r = run_cli("--source_model", setup / "src", "--target_model", setup / "tgt", "--adapter", setup / "one",
              "--output", tmp_path / "out", "--report", tmp_path / "report.json", "--dtype", "bfloat16", "--rank", "24",
              "--progress")  # stderr is a pipe: bars are shown only when asked
  assert r.returncode == 0, r.stderr
  assert "transferred 42 weights" in r.stdout  # 7 modules x 6 target layers (depth map from 3 layers)
  assert "decomposing base weights" in r.stderr  # progress
  report = json.loads((tmp_path / "report.json").read_text())
  assert report["layer_map"] == [0, 0, 1, 1, 2, 2]
  entry = report["entries"][0]
  for field in ("source_key", "source_layer", "source_shape", "target_shape", "rank_used", "energy_source",
                "energy_target", "norm_ratio", "overlap", "seconds"):
    assert field in entry
  assert all(0 < e["energy_source"] <= 1 + 1e-6 and 0 < e["energy_target"] <= 1 + 1e-6 for e in report["entries"])
  assert {e["rank_used"] for e in report["entries"]} == {16, 24}  # kv space of qwen2 is 16 wide: clipped
  cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
  assert cfg["base_model_name_or_path"] == str((setup / "tgt").resolve())
  from safetensors import safe_open
  with safe_open(str(tmp_path / "out" / "adapter_model.safetensors"), framework="np") as f:
    assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
  _, caught = load_with_adapter(setup / "tgt", tmp_path / "out")
  assert caught == []


def test_several_adapters_get_subfolders(setup, tmp_path):
  r = run_cli("--source_model", setup / "src", "--target_model", setup / "tgt", "--adapter", setup / "one",
              "--adapter", setup / "two", "--output", tmp_path / "out", "--noprogress")
  assert r.returncode == 0, r.stderr
  assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["one", "two"]
  assert (tmp_path / "out" / "two" / "README.md").is_file()  # each output carries its model card
  cfg = json.loads((tmp_path / "out" / "two" / "adapter_config.json").read_text())
  assert cfg["r"] == 8 and sorted(cfg["target_modules"]) == ["q_proj", "v_proj"]
  assert "decomposing" not in r.stderr


def test_existing_output_refused_then_overwritten(setup, tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  (out / "keep.txt").write_text("x")
  args = ("--source_model", setup / "src", "--target_model", setup / "tgt", "--adapter", setup / "one", "--output", out)
  r = run_cli(*args)
  assert r.returncode == 2 and "--overwrite" in r.stderr and "Traceback" not in r.stderr
  assert (out / "keep.txt").exists()
  r = run_cli(*args, "--overwrite")
  assert r.returncode == 0, r.stderr
  assert not (out / "keep.txt").exists() and (out / "adapter_config.json").exists()
  assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folders left


def test_help_explains_methods():
  r = run_cli("--help")
  assert r.returncode == 0
  for word in ("cross_lora", "truncate_pad", "--layer_map", "--rank"):
    assert word in r.stdout
