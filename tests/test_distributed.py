"""Several processes as one run, for real: two CLI processes on 127.0.0.1, two CPU devices each.

The layer-sharded decompositions run on one 4-device mesh over both processes (gloo
collectives), process 0 writes the outputs, and they equal, byte for byte, what one
process with 4 devices writes. A failure in one process ends both with its one line.
"""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys

import pytest

import fixtures
from conftest import ROOT
from crosslora_jax.core.distributed import DistributedConfig
from crosslora_jax.errors import CrossLoraError

OUTPUT_FILES = ("adapter_model.safetensors", "adapter_config.json", "README.md")


def _env(devices: int) -> dict[str, str]:
  return dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _cli(*args) -> list[str]:
  return [sys.executable, "-m", "crosslora_jax.transfer", "--rank=8", "--chunk_layers=2", "--noprogress",
          *map(str, args)]


def run_processes(common: list, per_process: list[list] | None = None, *, n: int = 2, timeout_s: int = 60):
  """Starts ``n`` CLI processes of one run (2 CPU devices each); returns their CompletedProcess-like results."""
  port = _free_port()
  procs = []
  for pid in range(n):
    extra = per_process[pid] if per_process else []
    cmd = _cli(*common, *extra, f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={n}",
               f"--process_id={pid}", f"--distributed_timeout={timeout_s}")
    procs.append(subprocess.Popen(cmd, cwd=ROOT, env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True))
  results = []
  for p in procs:
    out, err = p.communicate(timeout=300)
    results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
  return results


def run_single(*args, devices: int = 4):
  return subprocess.run(_cli(*args), cwd=ROOT, env=_env(devices), capture_output=True, text=True, timeout=300)


def _error_lines(stderr: str) -> list[str]:
  return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  root = tmp_path_factory.mktemp("distributed")
  fixtures.make_model("llama", root / "src", seed=0)
  fixtures.make_model("qwen2", root / "tgt", seed=1)
  for i, r in enumerate((4, 4, 8)):
    fixtures.make_adapter(fixtures.make_model("llama", None, seed=0), root / "adapters" / f"a{i}", kind="llama",
                          seed=10 + i, r=r)
  return root


def _same_bytes(a: pathlib.Path, b: pathlib.Path) -> None:
  for name in OUTPUT_FILES:
    assert (a / name).read_bytes() == (b / name).read_bytes(), (a / name, b / name)


def test_one_adapter_two_processes_equal_one_process(tiny, tmp_path):
  bases = [f"--source_model={tiny / 'src'}", f"--target_model={tiny / 'tgt'}", f"--adapter={tiny / 'adapters/a0'}"]
  single = run_single(*bases, f"--output={tmp_path / 'single'}", "--no_cache")
  assert single.returncode == 0, single.stderr
  shared_cache = tmp_path / "cache"
  runs = run_processes([*bases, f"--output={tmp_path / 'two'}", f"--cache_dir={shared_cache}"])
  assert [r.returncode for r in runs] == [0, 0], [r.stderr[-2000:] for r in runs]
  _same_bytes(tmp_path / "single", tmp_path / "two")
  assert "wrote" in runs[0].stdout and "wrote" not in runs[1].stdout  # one writer
  assert any(shared_cache.rglob("*.safetensors"))


def test_batch_two_processes_equal_one_process_with_caches_that_disagree(tiny, tmp_path):
  bases = [f"--source_model={tiny / 'src'}", f"--target_model={tiny / 'tgt'}", f"--adapter_dir={tiny / 'adapters'}"]
  single = run_single(*bases, f"--output={tmp_path / 'single'}", "--no_cache")
  assert single.returncode == 0, single.stderr
  # Warm process 0's cache only: a hit counts only when both processes have it, so both recompute.
  warm = run_single(*bases, f"--output={tmp_path / 'warmup'}", f"--cache_dir={tmp_path / 'cache0'}", devices=1)
  assert warm.returncode == 0, warm.stderr
  outputs = [f"--output={tmp_path / 'two'}", f"--report={tmp_path / 'report.json'}",
             f"--orbax_output={tmp_path / 'orbax'}"]
  runs = run_processes([*bases, *outputs], [[f"--cache_dir={tmp_path / f'cache{p}'}"] for p in (0, 1)])
  assert [r.returncode for r in runs] == [0, 0], [r.stderr[-2000:] for r in runs]
  assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["a0", "a1", "a2"]
  for name in ("a0", "a1", "a2"):
    _same_bytes(tmp_path / "single" / name, tmp_path / "two" / name)
  assert sorted(p.name for p in (tmp_path / "orbax").iterdir()) == ["a0", "a1", "a2"]
  assert (tmp_path / "report.json").read_text().startswith("[")
  assert any((tmp_path / "cache1").rglob("*.safetensors"))  # process 1 decomposed (and cached) too
  assert "wrote" not in runs[1].stdout


def test_failure_in_one_process_ends_both_with_its_line(tiny, tmp_path):
  common = [f"--source_model={tiny / 'src'}", f"--target_model={tiny / 'tgt'}", f"--output={tmp_path / 'out'}",
            "--no_cache"]
  runs = run_processes(common, [[f"--adapter={tiny / 'adapters/a0'}"], [f"--adapter={tmp_path / 'missing'}"]])
  assert [r.returncode for r in runs] == [2, 2], [r.stderr[-2000:] for r in runs]
  lines = [_error_lines(r.stderr) for r in runs]
  assert all(len(x) == 1 for x in lines), lines
  assert "missing" in lines[1][0] and lines[0][0].startswith(lines[1][0]) and "(process 1 of 2)" in lines[0][0]
  assert not (tmp_path / "out").exists()


def test_a_peer_that_never_comes_is_an_error_not_a_hang(tiny, tmp_path):
  cmd = _cli(f"--source_model={tiny / 'src'}", f"--target_model={tiny / 'tgt'}", f"--adapter={tiny / 'adapters/a0'}",
             f"--output={tmp_path / 'out'}", "--no_cache", f"--coordinator_address=127.0.0.1:{_free_port()}",
             "--num_processes=2", "--process_id=0", "--distributed_timeout=3")
  r = subprocess.run(cmd, cwd=ROOT, env=_env(2), capture_output=True, text=True, timeout=120)
  assert r.returncode == 2, r.stderr
  assert len(_error_lines(r.stderr)) == 1 and "--coordinator_address" in r.stderr
  assert not (tmp_path / "out").exists()


def test_bad_flag_combination_exits_2_with_one_line(tiny, tmp_path):
  r = run_single(f"--source_model={tiny / 'src'}", f"--target_model={tiny / 'tgt'}",
                 f"--adapter={tiny / 'adapters/a0'}", f"--output={tmp_path / 'out'}", "--num_processes=2",
                 "--process_id=2", "--coordinator_address=127.0.0.1:1")
  assert r.returncode == 2
  assert _error_lines(r.stderr) == ["error: --process_id: 0 .. 1 expected with --num_processes=2, got 2."]


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_processes=2, process_id=0), "--coordinator_address: host:port of process 0 expected"),
    (dict(num_processes=2, process_id=5, coordinator_address="h:1"), "--process_id: 0 .. 1 expected"),
    (dict(coordinator_address="h:1"), "--num_processes and --process_id: both expected"),
    (dict(coordinator_address="no-port", num_processes=2, process_id=0), "host:port of process 0 expected"),
    (dict(num_processes=0), "--num_processes: a positive integer expected"),
    (dict(process_id=-1), "--process_id: an integer >= 0 expected"),
])
def test_config_refuses_bad_combinations(kwargs, message):
  with pytest.raises(CrossLoraError, match=message.replace(".", r"\.")):
    DistributedConfig(**kwargs)


def test_config_from_environment_and_flags_over_it():
  env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
  assert DistributedConfig.from_env(env) == DistributedConfig("10.0.0.1:1234", 4, 3)
  assert DistributedConfig.from_env(env, process_id=1).process_id == 1
  assert not DistributedConfig.from_env({}).several
  assert not DistributedConfig(num_processes=1).several
  with pytest.raises(CrossLoraError, match="JAX_NUM_PROCESSES: an integer expected"):
    DistributedConfig.from_env(dict(env, JAX_NUM_PROCESSES="four"))
