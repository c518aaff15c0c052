"""Hostile input and the user's own files: each kind of breakage, at least three inputs of each.

Kinds (docs/refusals.md, "Hostile input"): outputs that would overwrite or nest with an
input or each other; half a result; files named outside their folder or of the wrong
type; configs that are malformed, unbounded or implausible; keys PEFT would read as
other modules, and base dtypes that are not plain floats; error text with control
characters or from unexpected exceptions. Every case runs the command line in-process
and must end with exit status 2 (1 for a bug), exactly one ``error:`` line, no
traceback, every input byte-for-byte as before and nothing new at any output path.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import signal
import struct
import time

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from test_bad_input import Case, Q0, _edit_json, _edit_tensors, models, run_in_process  # noqa: F401  (fixture)

NO_CACHE = ["--no_cache", "--noprogress", "--method", "truncate_pad"]


def tree_digest(path: pathlib.Path) -> dict[str, str]:
  """Every entry under ``path`` (or the file itself): kind and content hash, symlinks not followed."""
  if not os.path.lexists(path):
    return {}
  entries = [path] + (sorted(path.rglob("*")) if path.is_dir() and not path.is_symlink() else [])
  out = {}
  for p in entries:
    rel = str(p.relative_to(path)) if p != path else "."
    if p.is_symlink():
      out[rel] = "link:" + os.readlink(p)
    elif p.is_file():
      out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    else:
      out[rel] = "dir" if p.is_dir() else "special"
  return out


class Hostile(Case):
  """A Case whose inputs are all private copies, so that a test can prove they stay unchanged."""

  def __init__(self, models, tmp):
    super().__init__(models, tmp)
    self.source, self.target, self.adapter = self.copy("src"), self.copy("tgt"), self.copy("ad")
    self.extra = list(NO_CACHE)
    self.watch: list[pathlib.Path] = []  # paths that must be unchanged afterwards (inputs, old outputs)

  def snapshot(self) -> None:
    self.before = {p: tree_digest(p) for p in [self.source, self.target, self.adapter, *self.watch]}

  def unchanged(self) -> None:
    for p, digest in self.before.items():
      assert tree_digest(p) == digest, f"{p} changed"


def refused(c: Hostile, capsys, names=(), *, status=2, timeout=60.0):
  """Runs the case; checks the status, one error line naming ``names``, inputs unchanged."""
  c.snapshot()
  t0 = time.monotonic()
  rc, out, err = run_in_process(c.args(), capsys)
  assert time.monotonic() - t0 < timeout
  lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("W", "I"))]
  assert rc == status, (rc, out, err)
  assert "Traceback" not in err and "Traceback" not in out
  assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1, err
  assert len(lines) == 1 and lines[0].startswith("error: "), err
  for name in names:
    assert name in lines[0], (name, lines[0])
  c.unchanged()
  return lines[0]


# --- 1. outputs that would overwrite an input or another output ---------------------------

@pytest.mark.parametrize("where", ["adapter", "source", "target", "inside_adapter", "contains_adapter",
                                   "symlink_to_source", "under_symlinked_parent"])
def test_output_over_an_input_is_refused(where, models, tmp_path, capsys):
  c = Hostile(models, tmp_path)
  c.extra += ["--overwrite"]
  if where in ("adapter", "source", "target"):
    c.output = {"adapter": c.adapter, "source": c.source, "target": c.target}[where]
  elif where == "inside_adapter":
    c.output = c.adapter / "out"
  elif where == "contains_adapter":
    c.output = tmp_path
  elif where == "symlink_to_source":
    c.output = tmp_path / "link"
    c.output.symlink_to(c.source)
    c.watch.append(c.output)
  else:
    (tmp_path / "alias").symlink_to(c.target)
    c.output = tmp_path / "alias" / "out"
  refused(c, capsys, ["a path outside every input expected"])


@pytest.mark.parametrize("flag,where", [("--report", "source_config"), ("--report", "adapter_config"),
                                        ("--report", "adapter_weights"), ("--orbax_output", "adapter"),
                                        ("--cache_dir", "source"), ("--xla_cache_dir", "inside_target")])
def test_other_outputs_over_an_input_are_refused(flag, where, models, tmp_path, capsys):
  c = Hostile(models, tmp_path)
  path = {"source_config": c.source / "config.json", "adapter_config": c.adapter / "adapter_config.json",
          "adapter_weights": c.adapter / "adapter_model.safetensors", "adapter": c.adapter,
          "source": c.source, "inside_target": c.target / "xla"}[where]
  c.extra = ["--noprogress", "--method", "truncate_pad", "--overwrite", flag, str(path)]
  if flag == "--cache_dir":
    c.extra += ["--xla_cache_dir", ""]
  refused(c, capsys, ["a path outside every input expected", flag])


@pytest.mark.parametrize("clash", ["orbax_is_output", "report_is_output", "report_inside_output",
                                   "orbax_inside_output", "cache_inside_output"])
def test_outputs_that_collide_are_refused(clash, models, tmp_path, capsys):
  c = Hostile(models, tmp_path)
  other = {"orbax_is_output": ["--orbax_output", c.output], "report_is_output": ["--report", c.output],
           "report_inside_output": ["--report", c.output / "r.json"],
           "orbax_inside_output": ["--orbax_output", c.output / "orbax"],
           "cache_inside_output": ["--cache_dir", c.output / "cache", "--xla_cache_dir", ""]}[clash]
  c.extra = ["--noprogress", "--method", "truncate_pad", *map(str, other)]
  refused(c, capsys, ["apart from every other output"])
  assert not os.path.lexists(c.output)


@pytest.mark.parametrize("entry", ["dangling_symlink", "symlink_to_a_folder", "file", "fifo"])
def test_anything_at_an_output_needs_overwrite(entry, models, tmp_path, capsys):
  c = Hostile(models, tmp_path)
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  (elsewhere / "keep.txt").write_text("mine")
  if entry == "dangling_symlink":
    c.output.symlink_to(tmp_path / "nothing_here")
  elif entry == "symlink_to_a_folder":
    c.output.symlink_to(elsewhere)
  elif entry == "file":
    c.output.write_text("mine")
  else:
    os.mkfifo(c.output)
  c.watch += [c.output, elsewhere]
  refused(c, capsys, ["Pass --overwrite"])


def test_report_at_an_existing_folder_is_refused_before_work(models, tmp_path, capsys):
  c = Hostile(models, tmp_path)
  (tmp_path / "rep").mkdir()
  (tmp_path / "rep" / "keep.txt").write_text("mine")
  c.watch.append(tmp_path / "rep")
  c.extra += ["--overwrite", "--report", str(tmp_path / "rep")]
  refused(c, capsys, ["--report expected to be a file", "never replaced"])
  assert not c.output.exists()
