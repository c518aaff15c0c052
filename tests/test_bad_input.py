"""The checked list of bad inputs: each ends with exit 2, one line naming the file/key, nothing written.

Every case builds its bad input from tiny random models (session fixtures, copied and
then corrupted by hand) and runs the command line. Most cases run it in-process
(``transfer._parse_flags`` + ``transfer.main``, as ``app.run`` does) to keep the file
fast; ``SUBPROCESS`` cases also run it as a real ``python -m crosslora_jax.transfer``.
After each: exit status 2, exactly one non-empty stderr line starting ``error:`` that
names the file or key, no traceback, nothing on stdout, no output folder and no
``.out.*`` leftovers beside it.
"""

from __future__ import annotations

import importlib
import json
import os
import pathlib
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys

import numpy as np
import pytest
from absl import flags
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import fixtures
from conftest import ROOT
from crosslora_jax.formats import peft_format

# The CLI module (the package-level function is crosslora_jax.transfer_adapters).
cli = importlib.import_module("crosslora_jax.transfer")

Q0 = "model.layers.0.self_attn.q_proj"
V1 = "model.layers.1.self_attn.v_proj"


@pytest.fixture(scope="session")
def models(tmp_path_factory):
  """Source llama (2 layers, hidden 64), a smaller target llama, phi3, gpt2, and adapters."""
  root = tmp_path_factory.mktemp("bad_input_models")
  src = fixtures.make_model("llama", root / "src", num_hidden_layers=2)
  fixtures.make_model("llama", root / "tgt", num_hidden_layers=2, hidden_size=32, intermediate_size=64, seed=3)
  fixtures.make_model("llama", root / "sharded", num_hidden_layers=2, max_shard_size="40KB")
  fixtures.make_model("gpt2", root / "gpt2")
  phi3 = fixtures.make_model("phi3", root / "phi3")
  fixtures.make_adapter(src, root / "ad", kind="llama", target_modules=["q_proj", "v_proj"])
  src = fixtures.make_model("llama", None, num_hidden_layers=2)
  fixtures.make_adapter(src, root / "ad_gate", kind="llama", target_modules=["gate_proj"])
  for name, kwargs in {"ad_dora": dict(use_dora=True),
                       "ad_embed": dict(target_modules=["q_proj", "embed_tokens"]),
                       "ad_saved": dict(modules_to_save=["lm_head"]),
                       "ad_bias": dict(lora_bias=True)}.items():
    src = fixtures.make_model("llama", None, num_hidden_layers=2)
    fixtures.make_adapter(src, root / name, kind="llama", **kwargs)
  other = fixtures.make_model("llama", None, num_hidden_layers=2, hidden_size=48, intermediate_size=96)
  fixtures.make_adapter(other, root / "ad_other_base", kind="llama", target_modules=["q_proj", "v_proj"])
  fixtures.make_adapter(phi3, root / "ad_phi3", kind="phi3")
  return root


class Case:
  """Copies of the session inputs in ``tmp`` that a case may corrupt; ``args()`` is the command line."""

  def __init__(self, models: pathlib.Path, tmp: pathlib.Path):
    self.models, self.tmp = models, tmp
    self.source, self.target, self.adapter = models / "src", models / "tgt", models / "ad"
    self.output = tmp / "out"
    self.extra: list[str] = []
    self.late = False  # found while reading weights lazily: progress lines may precede the error

  def copy(self, name: str) -> pathlib.Path:
    dst = self.tmp / name
    if not dst.exists():
      shutil.copytree(self.models / name, dst)
    return dst

  def args(self) -> list[str]:
    return ["--source_model", self.source, "--target_model", self.target, "--adapter", self.adapter,
            "--output", self.output, "--rank", "8", *self.extra]


def _edit_json(file: pathlib.Path, **changes) -> None:
  data = json.loads(file.read_text())
  for key, value in changes.items():
    if value is _DELETE:
      data.pop(key)
    else:
      data[key] = value
  file.write_text(json.dumps(data))


_DELETE = object()


def _edit_tensors(file: pathlib.Path, edit) -> None:
  with safe_open(str(file), framework="np") as f:
    metadata = f.metadata()
  tensors = load_file(str(file))
  edit(tensors)
  save_file(tensors, str(file), metadata=metadata)


def _poison(key: str, value: float):
  def edit(tensors):
    array = tensors[key].copy()
    array.flat[3] = value
    tensors[key] = array
  return edit


def _rename_module(old: str, new: str):
  def edit(tensors):
    for key in [k for k in tensors if old in k]:
      tensors[key.replace(old, new)] = tensors.pop(key)
  return edit


def _truncate(file: pathlib.Path, keep: int) -> None:
  data = file.read_bytes()
  file.write_bytes(data[:keep] if keep >= 0 else data[:keep])


def _garble_header(file: pathlib.Path) -> None:
  data = file.read_bytes()
  (n,) = struct.unpack("<Q", data[:8])
  file.write_bytes(data[:8] + b"{not json" + b" " * (n - 9) + data[8 + n:])


# --- the cases: each returns what the error line must name ------------------------------

def missing_source_folder(c):
  c.source = c.tmp / "no_such_model"
  return [str(c.source), "model folder expected"]


def missing_adapter_folder(c):
  c.adapter = c.tmp / "no_such_adapter"
  return [str(c.adapter), "adapter folder expected"]


def missing_config_json(c):
  c.source = c.copy("src")
  (c.source / "config.json").unlink()
  return [str(c.source / "config.json")]


def missing_model_safetensors(c):
  c.target = c.copy("tgt")
  (c.target / "model.safetensors").unlink()
  return [str(c.target), "model.safetensors"]


def missing_adapter_config(c):
  c.adapter = c.copy("ad")
  (c.adapter / "adapter_config.json").unlink()
  return [str(c.adapter / "adapter_config.json")]


def missing_adapter_weights(c):
  c.adapter = c.copy("ad")
  (c.adapter / "adapter_model.safetensors").unlink()
  return [str(c.adapter), "adapter_model.safetensors"]


def missing_shard(c):
  c.source = c.copy("sharded")
  shards = sorted(c.source.glob("model-*.safetensors"))
  shards[-1].unlink()
  return [str(c.source / "model.safetensors.index.json"), shards[-1].name]


def base_only_pytorch_bin(c):
  c.target = c.copy("tgt")
  (c.target / "model.safetensors").rename(c.target / "pytorch_model.bin")
  return [str(c.target), "pytorch_model.bin", "safe_serialization"]


def base_safetensors_cut_in_header(c):
  c.source = c.copy("src")
  _truncate(c.source / "model.safetensors", 5)
  return [str(c.source / "model.safetensors"), "truncated or corrupt"]


def base_safetensors_garbled_header(c):
  c.source = c.copy("src")
  _garble_header(c.source / "model.safetensors")
  return [str(c.source / "model.safetensors"), "truncated or corrupt"]


def base_safetensors_cut_in_data(c):
  c.target = c.copy("tgt")
  _truncate(c.target / "model.safetensors", -100)
  return [str(c.target / "model.safetensors"), "truncated or corrupt"]


def base_shard_cut_in_data(c):
  c.source = c.copy("sharded")
  _truncate(sorted(c.source.glob("model-*.safetensors"))[0], -64)
  return [str(sorted(c.source.glob("model-*.safetensors"))[0]), "truncated or corrupt"]


def adapter_safetensors_cut_in_data(c):
  c.adapter = c.copy("ad")
  _truncate(c.adapter / "adapter_model.safetensors", -10)
  return [str(c.adapter / "adapter_model.safetensors"), "truncated or corrupt"]


def adapter_safetensors_garbled_header(c):
  c.adapter = c.copy("ad")
  _garble_header(c.adapter / "adapter_model.safetensors")
  return [str(c.adapter / "adapter_model.safetensors"), "truncated or corrupt"]


def adapter_safetensors_empty_file(c):
  c.adapter = c.copy("ad")
  (c.adapter / "adapter_model.safetensors").write_bytes(b"")
  return [str(c.adapter / "adapter_model.safetensors")]


def config_json_does_not_parse(c):
  c.target = c.copy("tgt")
  (c.target / "config.json").write_text('{"model_type": "llama", ')
  return [str(c.target / "config.json"), "valid JSON expected"]


def config_json_not_an_object(c):
  c.target = c.copy("tgt")
  (c.target / "config.json").write_text("[1, 2]")
  return [str(c.target / "config.json"), "JSON object expected"]


def adapter_config_does_not_parse(c):
  c.adapter = c.copy("ad")
  (c.adapter / "adapter_config.json").write_bytes(b"\xff\xfe{")
  return [str(c.adapter / "adapter_config.json"), "valid JSON expected"]


def index_json_does_not_parse(c):
  c.source = c.copy("sharded")
  (c.source / "model.safetensors.index.json").write_text("{")
  return [str(c.source / "model.safetensors.index.json"), "valid JSON expected"]


def config_without_hidden_size(c):
  c.source = c.copy("src")
  _edit_json(c.source / "config.json", hidden_size=_DELETE)
  return [str(c.source / "config.json"), "hidden_size"]


def config_with_string_layer_count(c):
  c.target = c.copy("tgt")
  _edit_json(c.target / "config.json", num_hidden_layers="2")
  return [str(c.target / "config.json"), "num_hidden_layers"]


def config_without_model_type(c):
  c.target = c.copy("tgt")
  _edit_json(c.target / "config.json", model_type=_DELETE)
  return [str(c.target / "config.json"), "model_type"]


def unknown_architecture(c):
  c.target = c.copy("tgt")
  _edit_json(c.target / "config.json", model_type="mamba")
  return [str(c.target / "config.json"), "'mamba'"]


def model_type_not_a_string(c):
  c.target = c.copy("tgt")
  _edit_json(c.target / "config.json", model_type=["llama"])
  return [str(c.target / "config.json"), "model_type"]


def weights_do_not_match_own_config(c):
  c.target = c.copy("tgt")
  _edit_json(c.target / "config.json", num_attention_heads=2, num_key_value_heads=2, head_dim=8)
  return [str(c.target / "model.safetensors"), "q_proj.weight", "do not match their config"]


def adapter_for_a_different_base(c):
  c.adapter = c.models / "ad_other_base"
  return [str(c.adapter), f"base_model.model.{Q0}.lora_A.weight", "different base"]


def lora_keys_of_an_unknown_module(c):
  c.adapter = c.copy("ad")
  _edit_tensors(c.adapter / "adapter_model.safetensors", _rename_module("self_attn.q_proj", "self_attn.qq_proj"))
  _edit_json(c.adapter / "adapter_config.json", target_modules=["qq_proj", "v_proj"])
  return [str(c.adapter), "model.layers.0.self_attn.qq_proj.lora_A.weight", "matches none"]


def lora_keys_beyond_the_source_layers(c):
  c.adapter = c.copy("ad")
  _edit_tensors(c.adapter / "adapter_model.safetensors", _rename_module("layers.1.", "layers.7."))
  return [str(c.adapter), "model.layers.7.self_attn.q_proj.lora_A.weight", "layer < 2"]


def lora_keys_outside_target_modules(c):
  c.adapter = c.copy("ad")
  _edit_json(c.adapter / "adapter_config.json", target_modules=["o_proj"])
  return [str(c.adapter / "adapter_model.safetensors"), f"{Q0}", "target_modules"]


def target_modules_absent_in_target(c):
  c.adapter, c.target = c.models / "ad_gate", c.models / "gpt2"
  return ["target model (gpt2)", "gate_proj"]


def lora_a_without_lora_b(c):
  c.adapter = c.copy("ad")
  _edit_tensors(c.adapter / "adapter_model.safetensors",
                lambda t: t.pop(f"base_model.model.{V1}.lora_B.weight"))
  return [str(c.adapter / "adapter_model.safetensors"), f"base_model.model.{V1}.lora_B.weight"]


def rank_pattern_disagrees_with_shapes(c):
  c.adapter = c.copy("ad")
  _edit_json(c.adapter / "adapter_config.json", rank_pattern={"v_proj": 16})
  return [str(c.adapter / "adapter_model.safetensors"), "model.layers.0.self_attn.v_proj", "rank 16"]


def rank_pattern_bad_regex(c):
  c.adapter = c.copy("ad")
  _edit_json(c.adapter / "adapter_config.json", rank_pattern={"(q_proj": 8})
  return [str(c.adapter / "adapter_config.json"), "rank_pattern", "(q_proj"]


def target_modules_wrong_type(c):
  c.adapter = c.copy("ad")
  _edit_json(c.adapter / "adapter_config.json", target_modules=7)
  return [str(c.adapter / "adapter_config.json"), "target_modules"]


def lora_alpha_not_a_number(c):
  c.adapter = c.copy("ad")
  _edit_json(c.adapter / "adapter_config.json", lora_alpha="16")
  return [str(c.adapter / "adapter_config.json"), "lora_alpha"]


def peft_type_not_lora(c):
  c.adapter = c.copy("ad")
  _edit_json(c.adapter / "adapter_config.json", peft_type="IA3")
  return [str(c.adapter / "adapter_config.json"), "peft_type"]


def adapter_tensor_integer_dtype(c):
  c.adapter = c.copy("ad")
  key = f"base_model.model.{Q0}.lora_A.weight"
  _edit_tensors(c.adapter / "adapter_model.safetensors", lambda t: t.update({key: t[key].astype(np.int32)}))
  return [str(c.adapter / "adapter_model.safetensors"), key, "int32"]


def dora_adapter(c):
  c.adapter = c.models / "ad_dora"
  return [str(c.adapter / "adapter_config.json"), "use_dora"]


def dora_magnitude_without_config_flag(c):
  c.adapter = c.copy("ad_dora")
  _edit_json(c.adapter / "adapter_config.json", use_dora=False)
  return [str(c.adapter / "adapter_model.safetensors"), "lora_magnitude_vector", "DoRA"]


def embedding_lora(c):
  c.adapter = c.models / "ad_embed"
  return [str(c.adapter / "adapter_model.safetensors"), "embed_tokens", "embedding LoRA"]


def modules_to_save(c):
  c.adapter = c.models / "ad_saved"
  return [str(c.adapter / "adapter_model.safetensors"), "base_model.model.lm_head.weight", "modules_to_save"]


def lora_bias(c):
  c.adapter = c.models / "ad_bias"
  return [str(c.adapter / "adapter_model.safetensors"), "lora_B.bias", "lora_bias"]


def fused_adapter_on_unfused_source(c):
  c.adapter = c.models / "ad_phi3"
  return [str(c.adapter), "layers.0.mlp.gate_up_proj.lora_A.weight", "matches none", "phi3 model"]


def unfused_adapter_on_fused_source(c):
  c.source = c.models / "phi3"
  return [str(c.adapter), "layers.0.self_attn.q_proj.lora_A.weight", "llama model"]


def nan_in_adapter(c):
  c.adapter = c.copy("ad")
  key = f"base_model.model.{V1}.lora_A.weight"
  _edit_tensors(c.adapter / "adapter_model.safetensors", _poison(key, np.nan))
  return [str(c.adapter / "adapter_model.safetensors"), key, "NaN or Inf"]


def inf_in_adapter(c):
  c.adapter = c.copy("ad")
  key = f"base_model.model.{Q0}.lora_B.weight"
  _edit_tensors(c.adapter / "adapter_model.safetensors", _poison(key, -np.inf))
  return [str(c.adapter / "adapter_model.safetensors"), key, "NaN or Inf"]


def nan_in_source_weight(c):
  c.source = c.copy("src")
  c.late = True
  _edit_tensors(c.source / "model.safetensors", _poison(f"{Q0}.weight", np.nan))
  return [str(c.source / "model.safetensors"), f"{Q0}.weight", "NaN or Inf"]


def inf_in_target_weight(c):
  c.target = c.copy("tgt")
  c.late = True
  _edit_tensors(c.target / "model.safetensors", _poison(f"{V1}.weight", np.inf))
  return [str(c.target / "model.safetensors"), f"{V1}.weight", "NaN or Inf"]


def rank_zero(c):
  c.extra = ["--rank", "0"]
  return ["--rank", "positive integer", "got 0"]


def rank_negative(c):
  c.extra = ["--rank", "-4"]
  return ["--rank", "positive integer", "got -4"]


def unknown_method(c):
  c.extra = ["--method", "magic"]
  return ["--method", "magic"]


def missing_flags(c):
  c.target = ""
  return ["--target_model"]


def existing_output_without_overwrite(c):
  c.output.mkdir()
  (c.output / "keep.txt").write_text("mine")
  return [str(c.output), "--overwrite"]


def output_parent_missing(c):
  c.output = c.tmp / "no" / "such" / "out"
  return [str(c.output), "parent folder"]


def output_parent_is_a_file(c):
  (c.tmp / "afile").write_text("x")
  c.output = c.tmp / "afile" / "out"
  return [str(c.output), "parent folder"]


def output_parent_unwritable(c):
  c.output = pathlib.Path("/proc/crosslora_out")  # creating anything in /proc fails, even as root
  return [str(c.output), "writable parent folder"]


def report_path_unwritable(c):
  c.extra = ["--report", "/proc/crosslora_report.json"]
  return ["/proc/crosslora_report.json", "writable parent folder", "--report"]


CASES = [
    missing_source_folder, missing_adapter_folder, missing_config_json, missing_model_safetensors,
    missing_adapter_config, missing_adapter_weights, missing_shard, base_only_pytorch_bin,
    base_safetensors_cut_in_header, base_safetensors_garbled_header, base_safetensors_cut_in_data,
    base_shard_cut_in_data, adapter_safetensors_cut_in_data, adapter_safetensors_garbled_header,
    adapter_safetensors_empty_file, config_json_does_not_parse, config_json_not_an_object,
    adapter_config_does_not_parse, index_json_does_not_parse, config_without_hidden_size,
    config_with_string_layer_count, config_without_model_type, unknown_architecture, model_type_not_a_string,
    weights_do_not_match_own_config, adapter_for_a_different_base, lora_keys_of_an_unknown_module,
    lora_keys_beyond_the_source_layers, lora_keys_outside_target_modules, target_modules_absent_in_target,
    lora_a_without_lora_b, rank_pattern_disagrees_with_shapes, rank_pattern_bad_regex, target_modules_wrong_type,
    lora_alpha_not_a_number, peft_type_not_lora, adapter_tensor_integer_dtype, dora_adapter,
    dora_magnitude_without_config_flag, embedding_lora, modules_to_save, lora_bias,
    fused_adapter_on_unfused_source, unfused_adapter_on_fused_source, nan_in_adapter, inf_in_adapter,
    nan_in_source_weight, inf_in_target_weight, rank_zero, rank_negative, unknown_method, missing_flags,
    existing_output_without_overwrite, output_parent_missing, output_parent_is_a_file, output_parent_unwritable,
    report_path_unwritable,
]
# A representative set also runs as a real process (JAX start-up costs seconds each).
SUBPROCESS = {
    missing_source_folder, base_safetensors_garbled_header, adapter_config_does_not_parse, unknown_architecture,
    adapter_for_a_different_base, dora_adapter, nan_in_adapter, inf_in_target_weight, rank_zero, unknown_method,
    existing_output_without_overwrite, output_parent_unwritable,
}


def run_subprocess(args, *, preexec_fn=None):
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  r = subprocess.run([sys.executable, "-m", "crosslora_jax.transfer", *map(str, args)], capture_output=True,
                     text=True, env=env, timeout=300, preexec_fn=preexec_fn)
  return r.returncode, r.stdout, r.stderr


def run_in_process(args, capsys):
  """What ``app.run(main, flags_parser=_parse_flags)`` does, without a new interpreter."""
  capsys.readouterr()  # drop what the fixtures printed
  previous = signal.getsignal(signal.SIGTERM)
  flags.FLAGS.unparse_flags()
  try:
    try:
      rc = cli.main(cli._parse_flags(["crosslora_jax.transfer", *map(str, args)]))
    except SystemExit as e:
      rc = e.code
  finally:
    signal.signal(signal.SIGTERM, previous)
    flags.FLAGS.unparse_flags()
  out, err = capsys.readouterr()
  return rc, out, err


PROGRESS_LINE = re.compile(r"[a-z ]+: \d+/\d+ \(\d+%, [\d.]+s\)")


def assert_refused(rc, out, err, c: Case, names):
  lines = [line for line in err.splitlines() if line.strip()]
  assert rc == 2, (rc, out, err)
  assert "Traceback" not in err and "Traceback" not in out
  if c.late:  # weights are read (and checked) lazily, once the progress bar has started
    assert all(PROGRESS_LINE.fullmatch(line) for line in lines[:-1]), err
    lines = lines[-1:]
  assert len(lines) == 1, err
  assert lines[0].startswith("error: "), lines
  for name in names:
    assert name in lines[0], (name, lines[0])
  assert out == ""
  assert not c.output.exists() or (c.output / "keep.txt").read_text() == "mine"
  if c.output.parent.is_dir():
    left = [p.name for p in c.output.parent.iterdir() if p.name.startswith(f".{c.output.name}.")]
    assert left == [], left


@pytest.mark.parametrize("case", CASES, ids=[f.__name__ for f in CASES])
def test_refused_in_process(case, models, tmp_path, capsys):
  c = Case(models, tmp_path)
  names = case(c)
  assert_refused(*run_in_process(c.args(), capsys), c, names)


@pytest.mark.parametrize("case", sorted(SUBPROCESS, key=CASES.index), ids=lambda f: f.__name__)
def test_refused_in_subprocess(case, models, tmp_path):
  c = Case(models, tmp_path)
  names = case(c)
  assert_refused(*run_subprocess(c.args()), c, names)


def test_verbosity_shows_the_traceback(models, tmp_path):
  c = Case(models, tmp_path)
  names = nan_in_adapter(c)
  rc, _, err = run_subprocess(c.args() + ["--verbosity=1"])
  assert rc != 0 and "Traceback" in err and "CrossLoraError" in err and names[1] in err
  assert not c.output.exists()


def test_too_large_rank_is_clipped_not_refused(models, tmp_path, capsys):
  c = Case(models, tmp_path)
  report = tmp_path / "report.json"
  c.extra = ["--rank", "100000", "--noprogress", "--report", report]
  rc, out, err = run_in_process(c.args(), capsys)
  assert rc == 0, err
  used = {e["module"]: e["rank_used"] for e in json.loads(report.read_text())["entries"]}
  assert used == {"q_proj": 32, "v_proj": 16}  # min(r, m_s, n_s, m_t, n_t): target q 32x32, v 16x32
  assert (c.output / "adapter_model.safetensors").is_file()


def test_skip_unsupported_drops_and_reports(models, tmp_path, capsys):
  c = Case(models, tmp_path)
  c.adapter = models / "ad_bias"
  c.extra = ["--skip_unsupported", "--noprogress", "--method", "truncate_pad"]
  rc, out, err = run_in_process(c.args(), capsys)
  assert rc == 0, err
  assert "skipped 14: lora_bias" in out  # 7 modules x 2 layers
  with safe_open(str(c.output / "adapter_model.safetensors"), framework="np") as f:
    assert not [k for k in f.keys() if "bias" in k]


def _enospc(*args, **kwargs):
  raise OSError(28, "No space left on device")


@pytest.mark.parametrize("where", ["safetensors", "config"])
def test_disk_full_in_process(where, models, tmp_path, capsys, monkeypatch):
  """ENOSPC while writing either file: one line, no output, the old output (with --overwrite) untouched."""
  c = Case(models, tmp_path)
  c.output.mkdir()
  (c.output / "keep.txt").write_text("mine")
  c.extra = ["--overwrite", "--noprogress", "--method", "truncate_pad"]
  if where == "safetensors":  # what safetensors raises: its own error type with the OS error inside
    def full(*args, **kwargs):
      raise Exception("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr(peft_format, "save_file", full)
  else:
    monkeypatch.setattr(pathlib.Path, "write_text", _enospc)
  rc, out, err = run_in_process(c.args(), capsys)
  assert_refused(rc, out, err, c, [str(c.output), "ENOSPC"])
  assert sorted(p.name for p in c.output.iterdir()) == ["keep.txt"]


def test_file_size_limit_in_subprocess(models, tmp_path):
  """A real process whose writes fail (RLIMIT_FSIZE, SIGXFSZ ignored: EFBIG) like a full disk."""
  c = Case(models, tmp_path)
  c.extra = ["--noprogress", "--method", "truncate_pad"]

  def limit():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))

  rc, out, err = run_subprocess(c.args(), preexec_fn=limit)
  assert_refused(rc, out, err, c, [str(c.output), "EFBIG"])


@pytest.mark.parametrize("fault", ["dtype", "missing_key", "bytes", "config"])
def test_output_verification_catches_a_broken_write(fault, models, tmp_path, capsys, monkeypatch):
  """A writer that silently drifts (dtype, a key, a value, the config) never gets its output renamed in."""
  c = Case(models, tmp_path)
  c.extra = ["--noprogress", "--method", "truncate_pad", "--dtype", "float32"]
  real = peft_format.write_adapter_files

  def broken(adapter, folder, dtype=None):
    real(adapter, folder, np.float16 if fault == "dtype" else dtype)
    file = folder / peft_format.WEIGHTS_FILE
    if fault == "missing_key":
      _edit_tensors(file, lambda t: t.pop(sorted(t)[0]))
    elif fault == "bytes":
      _edit_tensors(file, _poison(sorted(load_file(str(file)))[-1], 0.125))
    elif fault == "config":
      _edit_json(folder / peft_format.CONFIG_FILE, lora_alpha=1234)

  monkeypatch.setattr(peft_format, "write_adapter_files", broken)
  names = {"dtype": ["dtype expected float32, got float16"], "missing_key": ["keys expected"],
           "bytes": ["different bytes"], "config": ["the computed config expected"]}[fault]
  assert_refused(*run_in_process(c.args(), capsys), c, [str(c.output), "output verification failed", *names])
