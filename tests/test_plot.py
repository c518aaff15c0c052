"""--plot: the picture of a report exists, decodes, has its panels, and changes when the report does."""

import copy
import io
import json
import subprocess
import sys
import os

import numpy as np
import pytest

import fixtures
from conftest import ROOT
from crosslora_jax import CrossLoraError, TransferConfig, transfer_adapter
from crosslora_jax import plot


@pytest.fixture(scope="module")
def report(tmp_path_factory):
  """A real report: llama (3 layers) -> qwen2 (4 layers), depth map, two modules the qwen2 target lacks none."""
  root = tmp_path_factory.mktemp("plot")
  src = fixtures.make_model("llama", root / "src", seed=0)
  fixtures.make_model("qwen2", root / "tgt", seed=1)
  fixtures.make_adapter(src, root / "lora", kind="llama", r=4, seed=1)
  result = transfer_adapter(root / "src", root / "tgt", root / "lora", TransferConfig(rank=8))
  return result.report.to_dict()


def decode(data: bytes) -> np.ndarray:
  import matplotlib.image
  return matplotlib.image.imread(io.BytesIO(data), format="png")


def test_picture_decodes_and_is_the_same_for_the_same_report(report, tmp_path):
  path = plot.save(report, tmp_path / "t.png")
  pixels = decode(path.read_bytes())
  assert pixels.ndim == 3 and pixels.shape[0] > 800 and pixels.shape[1] > 400
  assert pixels.std() > 0.05  # something is drawn
  assert plot.render_png(report) == path.read_bytes()
  assert [p.name for p in tmp_path.iterdir()] == ["t.png"]  # no temporary file left


def test_picture_changes_when_the_report_does(report):
  before = decode(plot.render_png(report))
  changed = copy.deepcopy(report)
  for e in changed["entries"]:
    if e["module"] == "v_proj":
      e["overlap"] = 0.99
  after = decode(plot.render_png(changed))
  assert before.shape == after.shape and not np.array_equal(before, after)
  skipped = copy.deepcopy(report)
  skipped["skipped"].append({"source_key": "model.layers.1.mlp.up_proj", "module": "up_proj", "source_layer": 1,
                             "reason": "source layer 1 is not mapped"})
  assert not np.array_equal(before, decode(plot.render_png(skipped)))


def test_an_extra_panel_adds_a_row(report):
  loss = plot.Panel("refine loss", "step", "loss", {"train": ([0, 1, 2], [3.0, 2.5, 2.2]), "held out": ([0, 2], [3.1, 2.6])})
  plain, extra = decode(plot.render_png(report)), decode(plot.render_png(report, extra=[loss]))
  assert extra.shape[0] > plain.shape[0] * 1.15 and extra.shape[1] == plain.shape[1]


def test_several_reports_get_columns_and_other_methods_draw(report):
  other = copy.deepcopy(report)
  other["config"]["method"] = "truncate_pad"
  for e in other["entries"]:
    e["overlap"] = e["energy_source"] = e["energy_target"] = None  # truncate_pad measures none of these
  both = decode(plot.render_png([report, other]))
  assert both.shape[1] > decode(plot.render_png(report)).shape[1] * 1.8


def test_bad_paths_and_missing_matplotlib(tmp_path, monkeypatch):
  with pytest.raises(CrossLoraError, match=r"--plot: a file name ending in \.png expected"):
    plot.check_plot_path(tmp_path / "t.jpg")
  with pytest.raises(CrossLoraError, match="an existing folder expected"):
    plot.check_plot_path(tmp_path / "no" / "t.png")
  monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an install without the extra looks like
  with pytest.raises(CrossLoraError, match=r"matplotlib expected .* pip install 'crosslora_jax\[plot\]'"):
    plot.check_plot_path(tmp_path / "t.png")


def test_plot_a_saved_report_from_the_command_line(report, tmp_path):
  (tmp_path / "report.json").write_text(json.dumps(report))
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  r = subprocess.run([sys.executable, "-m", "crosslora_jax.plot", tmp_path / "report.json", tmp_path / "r.png"],
                     capture_output=True, text=True, env=env, timeout=120)
  assert r.returncode == 0, r.stderr
  assert np.array_equal(decode((tmp_path / "r.png").read_bytes()), decode(plot.render_png(report)))
  (tmp_path / "bad.json").write_text("{}")
  r = subprocess.run([sys.executable, "-m", "crosslora_jax.plot", tmp_path / "bad.json", tmp_path / "b.png"],
                     capture_output=True, text=True, env=env, timeout=120)
  assert r.returncode == 2 and r.stderr.count("\n") == 1 and "a --report JSON file expected" in r.stderr


def test_the_picture_is_swapped_in_with_the_other_outputs_of_a_transaction(report, tmp_path):
  from crosslora_jax.formats import adapter_io
  png, text = tmp_path / "t.png", tmp_path / "report.json"
  png.write_bytes(b"old picture")
  data = plot.render_png(report)
  with pytest.raises(RuntimeError):  # a failure after the picture was staged: nothing changes
    with adapter_io.transaction():
      plot.write_png(png, data)
      adapter_io.write_text_atomic(text, "{}\n")
      raise RuntimeError("later step failed")
  assert png.read_bytes() == b"old picture" and not text.exists()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["t.png"]  # no staged leftovers
  with adapter_io.transaction():
    plot.write_png(png, data)
    assert png.read_bytes() == b"old picture"  # staged, not yet swapped in
  assert png.read_bytes() == data
