"""Progress bars (tqdm): shown on a terminal, hidden in logs unless asked, never with --noprogress."""

import io
import os
import subprocess
import sys

import pytest

import fixtures
from conftest import ROOT
from crosslora_jax.progress import ProgressBar

LABEL = "decomposing base weights"


class Terminal(io.StringIO):
  def isatty(self):
    return True


def feed(bar, total=5, label=LABEL):
  for done in range(1, total + 1):
    bar(label, done, total)


def test_a_terminal_gets_a_bar_with_rate_and_eta():
  stream = Terminal()
  feed(ProgressBar(stream))
  text = stream.getvalue()
  assert f"{LABEL}: 100%" in text and "5/5" in text
  assert "<" in text and "weight/s" in text  # tqdm's [elapsed<remaining, rate]
  assert text.endswith("\n")  # closed at its total


def test_a_log_gets_nothing_unless_asked():
  quiet, asked, off = io.StringIO(), io.StringIO(), Terminal()
  feed(ProgressBar(quiet))
  feed(ProgressBar(asked, enabled=True))
  feed(ProgressBar(off, enabled=False))
  assert quiet.getvalue() == "" and off.getvalue() == ""
  lines = asked.getvalue().replace("\r", "\n").split("\n")
  assert any(line.startswith(f"{LABEL}: 100%") and "5/5" in line for line in lines)
  assert not any("40%" in line for line in lines)  # no redraw per step in a log: only the start and the end


def test_a_new_label_closes_the_previous_bar_and_totals_may_grow():
  stream = Terminal()
  bar = ProgressBar(stream)
  bar("first", 1, 3)
  bar("second", 2, 4)
  bar("second", 6, 6)
  text = stream.getvalue()
  assert "first:  33%" in text and "second: 100%" in text and "6/6" in text


@pytest.mark.parametrize("flag, shown", [("--progress", True), ("--noprogress", False)])
def test_the_cli_flag(tmp_path_factory, flag, shown):
  root = tmp_path_factory.mktemp("progress")
  src = fixtures.make_model("llama", root / "src", seed=0)
  fixtures.make_adapter(src, root / "lora", kind="llama", r=4, seed=1, target_modules=["q_proj"])
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  r = subprocess.run([sys.executable, "-m", "crosslora_jax.transfer", "--source_model", root / "src",
                      "--target_model", root / "src", "--adapter", root / "lora", "--output", root / "out",
                      "--rank", "8", "--no_cache", flag], capture_output=True, text=True, env=env, timeout=300)
  assert r.returncode == 0, r.stderr
  assert (f"{LABEL}: 100%" in r.stderr) == shown, r.stderr


def test_the_unit_names_what_is_counted():
  stream = Terminal()
  feed(ProgressBar(stream, unit="sequence"), label="teacher writes")
  assert "sequence/s" in stream.getvalue() and "weight" not in stream.getvalue()
