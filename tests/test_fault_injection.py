"""Killing a transfer that replaces an existing output: the old folder stays whole or the new one is.

A wrapper runs the real command line with a Python audit hook that counts file-system
operations under the output's parent folder (mkdir, open, rename, rmtree, ...) and
SIGKILLs its own process at the N-th one, so kills land on chosen points of the write
phase, including both sides of the final swap; other kills land at random times. After
each kill the output is byte-for-byte the old folder or the new one (never a mix),
everything else beside it is a clearly named ``.out.{tmp,old,probe}-<pid>-*`` leftover,
and the next run removes those leftovers. Also: a full disk (ENOSPC) through the library
API leaves the old output untouched.
"""

from __future__ import annotations

import os
import pathlib
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import fixtures
from conftest import ROOT
from crosslora_jax.formats import adapter_io, peft_format
from crosslora_jax.errors import CrossLoraError

SEED = int(os.environ.get("CROSSLORA_FAULT_SEED", "20240805"))  # set it to replay other random points
LEFTOVER = re.compile(r"\.out\.(tmp|old|probe)-(\d+)-.+")

KILLER = r'''
import os, signal, sys, runpy
watch = os.environ["KILL_DIR"]
at = int(os.environ.get("KILL_AT", "0"))
log = os.environ.get("KILL_LOG")
EVENTS = ("open", "os.rename", "os.replace", "os.mkdir", "os.rmdir", "os.remove", "os.unlink", "shutil.rmtree",
          "os.scandir", "os.listdir")
count = 0

def paths(x):
  if isinstance(x, (str, bytes, os.PathLike)):
    yield os.fsdecode(x)
  elif isinstance(x, (tuple, list)):
    for y in x:
      yield from paths(y)

def hook(event, args):
  global count
  if event not in EVENTS or not any(p == watch or p.startswith(watch + os.sep) for p in paths(args)):
    return
  count += 1
  if log:
    with open(log, "a") as f:
      f.write(f"{count} {event} {' '.join(paths(args))}\n")
  if count == at:
    os.kill(os.getpid(), signal.SIGKILL)

if os.environ.get("KILL_NO_EXCHANGE"):  # exercise the two-rename fallback of adapter_io.replace_folder
  import crosslora_jax.formats.adapter_io
  crosslora_jax.formats.adapter_io.exchange = lambda a, b: False
sys.addaudithook(hook)
sys.argv = ["crosslora_jax.transfer", *sys.argv[1:]]
runpy.run_module("crosslora_jax.transfer", run_name="__main__", alter_sys=True)
'''


def files(folder: pathlib.Path) -> dict[str, bytes]:
  return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """Inputs, the old output (a real earlier output plus a marker file) and the expected new one."""
  root = tmp_path_factory.mktemp("fault")
  src = fixtures.make_model("llama", root / "src", num_hidden_layers=2)
  fixtures.make_model("llama", root / "tgt", num_hidden_layers=2, hidden_size=32, intermediate_size=64, seed=3)
  fixtures.make_adapter(src, root / "old_ad", kind="llama", target_modules=["q_proj", "v_proj"], seed=1)
  fixtures.make_adapter(src, root / "ad", kind="llama", target_modules=["q_proj", "v_proj", "down_proj"], seed=2)
  (root / "killer.py").write_text(KILLER)
  old = root / "old"
  r = _cli(root, ["--adapter", root / "old_ad", "--output", old])
  assert r.returncode == 0, r.stderr
  (old / "OLD_MARKER").write_text("the previous output")
  t0 = time.monotonic()
  r = _cli(root, ["--adapter", root / "ad", "--output", root / "new"])
  seconds = time.monotonic() - t0
  assert r.returncode == 0, r.stderr
  assert files(root / "new") != files(old)
  return root, files(old), files(root / "new"), seconds


def _cli(root, extra, env=None, killer=False, popen=False):
  args = ["--source_model", root / "src", "--target_model", root / "tgt", "--method", "truncate_pad",
          "--noprogress", *extra]
  env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
  cmd = [sys.executable, str(root / "killer.py")] if killer else [sys.executable, "-m", "crosslora_jax.transfer"]
  cmd += [str(a) for a in args]
  if popen:
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _fresh_output(root, tmp_path) -> pathlib.Path:
  outdir = tmp_path / "outdir"
  outdir.mkdir(parents=True)
  shutil.copytree(root / "old", outdir / "out")
  return outdir


def _check_after_kill(outdir, old, new, *, allow_missing=False) -> str:
  """The output is old or new, whole; the rest is clearly named leftovers. Returns which."""
  out = outdir / "out"
  others = sorted(p.name for p in outdir.iterdir() if p.name != "out")
  bad = [n for n in others if not LEFTOVER.fullmatch(n)]
  assert bad == [], f"unclearly named things beside the output: {bad}"
  if not out.exists():
    # Only the fallback (no RENAME_EXCHANGE) has this window: the old output sits whole in .out.old-*.
    assert allow_missing, others
    kept = [outdir / n / "out" for n in others if ".out.old-" in n and (outdir / n / "out").is_dir()]
    assert len(kept) == 1 and files(kept[0]) == old, others
    return "missing (old kept in .old-)"
  got = files(out)
  assert got in (old, new), f"mixed output: {sorted(got)}"
  return "old" if got == old else "new"


def _next_write_cleans_up(outdir, old, new):
  """What the next write does first: put back a stranded old output, remove the leftovers."""
  out = outdir / "out"
  adapter_io.check_output_path(out, overwrite=True)
  adapter_io.remove_leftovers(out)
  assert files(out) in (old, new)
  left = sorted(p.name for p in outdir.iterdir() if p.name != "out")
  assert left == [], f"leftovers of the killed run survived the next write: {left}"


def _rerun(root, outdir, new):
  r = _cli(root, ["--adapter", root / "ad", "--output", outdir / "out", "--overwrite"])
  assert r.returncode == 0, r.stderr
  assert files(outdir / "out") == new
  assert sorted(p.name for p in outdir.iterdir()) == ["out"]


def _count_events(root, tmp_path, env=None) -> list[str]:
  outdir = _fresh_output(root, tmp_path / "dry")
  log = tmp_path / "events.log"
  r = _cli(root, ["--adapter", root / "ad", "--output", outdir / "out", "--overwrite"], killer=True,
           env=dict(KILL_DIR=str(outdir), KILL_LOG=str(log), **(env or {})))
  assert r.returncode == 0, r.stderr
  return log.read_text().splitlines()


def _swap_points(events: list[str]) -> list[int]:
  """Event numbers right before and right after the output changes hands."""
  points = []
  for n, line in enumerate(events, 1):
    if " os.rename " in line or (" open " in line and line.endswith("outdir")):
      points.append(n)
  return points


def test_sigkill_at_file_system_operations(setup, tmp_path):
  root, old, new, _ = setup
  events = _count_events(root, tmp_path)
  assert any(" os.mkdir " in e and ".out.tmp-" in e for e in events), events
  swap = _swap_points(events)
  assert swap, events
  # The swap itself sits between the last fsync of the temp folder and the fsync of the parent:
  # kill just before and just after it, and at a few random operations of the rest.
  first_parent_fsync = swap[0]
  must = {first_parent_fsync - 1, first_parent_fsync}
  rng = random.Random(SEED)
  others = sorted(set(range(1, len(events) + 1)) - must)
  points = sorted(must | set(rng.sample(others, min(3, len(others)))))
  seen = {}
  for at in points:
    outdir = _fresh_output(root, tmp_path / f"kill{at}")
    r = _cli(root, ["--adapter", root / "ad", "--output", outdir / "out", "--overwrite"], killer=True,
             env=dict(KILL_DIR=str(outdir), KILL_AT=str(at)))
    assert r.returncode == -signal.SIGKILL, (at, r.returncode, r.stderr)
    seen[at] = _check_after_kill(outdir, old, new)
    if at == first_parent_fsync:  # a real next run, where the killed one left the most behind
      _rerun(root, outdir, new)
    else:
      _next_write_cleans_up(outdir, old, new)
  # Killing right before the swap keeps the old output; right after, the new one is in place.
  assert seen[first_parent_fsync - 1] == "old", (seen, events)
  assert seen[first_parent_fsync] == "new", (seen, events)


def test_sigkill_in_the_fallback_without_exchange(setup, tmp_path):
  """Without renameat2 the output is briefly absent, but the old one is whole in .out.old-*."""
  root, old, new, _ = setup
  events = _count_events(root, tmp_path, env=dict(KILL_NO_EXCHANGE="1"))
  renames = [n for n, e in enumerate(events, 1) if " os.rename " in e]
  assert len(renames) == 2, events  # output -> .old-*/out, temp -> output
  for at in renames:
    outdir = _fresh_output(root, tmp_path / f"kill{at}")
    r = _cli(root, ["--adapter", root / "ad", "--output", outdir / "out", "--overwrite"], killer=True,
             env=dict(KILL_DIR=str(outdir), KILL_AT=str(at), KILL_NO_EXCHANGE="1"))
    assert r.returncode == -signal.SIGKILL, r.stderr
    state = _check_after_kill(outdir, old, new, allow_missing=True)
    assert state == ("old" if at == renames[0] else "missing (old kept in .old-)")
    if at == renames[1]:  # the next run first puts the old output back, then replaces it
      _rerun(root, outdir, new)
    else:
      _next_write_cleans_up(outdir, old, new)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT], ids=["SIGKILL", "SIGTERM", "SIGINT"])
def test_signal_at_a_random_time(sig, setup, tmp_path):
  """Several runs, each signalled at a random moment from interpreter start to past the end.

  SIGTERM/SIGINT: status 128 + signal (or 0 if the run had already finished), no traceback
  or crash, at most one error line, the output old or new and whole, no temporary folder left.
  """
  root, old, new, seconds = setup
  rng = random.Random(SEED + sig)
  runs = 1 if sig == signal.SIGKILL else RANDOM_SIGNAL_RUNS
  seen = []
  for run in range(runs):
    delay = rng.uniform(0.0, seconds * 1.1)
    outdir = _fresh_output(root, tmp_path / f"run{run}")
    proc = _cli(root, ["--adapter", root / "ad", "--output", outdir / "out", "--overwrite"], popen=True)
    time.sleep(delay)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    assert "Traceback" not in err and "Fatal Python error" not in err and "Segmentation" not in err, err
    state = _check_after_kill(outdir, old, new)
    if sig != signal.SIGKILL:
      assert proc.returncode in (0, 128 + sig), (delay, proc.returncode, err)
      assert len([line for line in err.splitlines() if line.startswith("error:")]) <= 1, err
      assert not [p.name for p in outdir.iterdir() if ".out.tmp-" in p.name], delay
      assert state == "new" or proc.returncode == 128 + sig
    seen.append((round(delay, 2), proc.returncode, state))
    _next_write_cleans_up(outdir, old, new)
  print(f"{signal.Signals(sig).name} at random times (delay s, status, output): {seen}")


RANDOM_SIGNAL_RUNS = int(os.environ.get("CROSSLORA_SIGNAL_RUNS", "4"))


def test_disk_full_through_the_library_keeps_the_old_output(tmp_path, monkeypatch):
  """ENOSPC on the second file of an overwrite: a CrossLoraError, old output untouched, no temp left."""
  rng = np.random.default_rng(0)
  path = "model.layers.0.self_attn.q_proj"
  adapter = peft_format.PeftAdapter({"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "peft_type": "LORA"},
                                    {path: peft_format.LoraPair(rng.standard_normal((2, 8), np.float32),
                                                                rng.standard_normal((8, 2), np.float32))})
  out = tmp_path / "out"
  out.mkdir()
  (out / "OLD_MARKER").write_text("old")

  def full(self, *args, **kwargs):
    raise OSError(28, "No space left on device", str(self))

  monkeypatch.setattr(pathlib.Path, "write_text", full)
  with pytest.raises(CrossLoraError, match=r"out: a complete write expected, got ENOSPC"):
    adapter_io.save_adapter(adapter, out, overwrite=True)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
  assert sorted(p.name for p in out.iterdir()) == ["OLD_MARKER"]
  monkeypatch.undo()
  adapter_io.save_adapter(adapter, out, overwrite=True)
  assert sorted(p.name for p in out.iterdir()) == [peft_format.CONFIG_FILE, peft_format.WEIGHTS_FILE]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_sigterm_inside_a_gc_callback_is_deferred_not_swallowed():
  """A SystemExit raised in a gc callback would be printed and dropped: the handler defers instead."""
  import gc
  import sys

  import importlib

  cli = importlib.import_module("crosslora_jax.transfer")  # the CLI module
  seen = []

  def callback(phase, info):
    if phase == "start" and not seen:
      seen.append(cli._in_finalizer(sys._getframe()))

  gc.callbacks.append(callback)
  try:
    gc.collect()
  finally:
    gc.callbacks.remove(callback)
  assert seen == [True]
  assert not cli._in_finalizer(sys._getframe())
