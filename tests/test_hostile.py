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
import shutil
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


# --- 2. all or nothing ------------------------------------------------------------------------

@pytest.fixture
def old_outputs(tmp_path):
  """An existing adapter folder, report and Orbax folder (markers only) that a failed run must keep."""
  out, report, orbax = tmp_path / "out", tmp_path / "report.json", tmp_path / "orbax"
  out.mkdir()
  (out / "keep.txt").write_text("mine")
  report.write_text("old report")
  orbax.mkdir()
  (orbax / "keep.txt").write_text("mine")
  return out, report, orbax


@pytest.mark.parametrize("fails", ["report", "orbax", "adapter_verify", "second_swap"])
def test_a_late_failure_leaves_every_output_as_it_was(fails, old_outputs, models, tmp_path, capsys, monkeypatch):
  from crosslora_jax.formats import adapter_io, orbax_io
  out, report, orbax = old_outputs
  c = Hostile(models, tmp_path)
  c.watch += [out, report, orbax]
  c.extra += ["--overwrite", "--report", str(report), "--orbax_output", str(orbax)]
  if fails == "report":
    monkeypatch.setattr(os, "fsync", _fail_for(lambda fd: os.readlink(f"/proc/self/fd/{fd}").count("report.json")))
  elif fails == "orbax":
    def broken(*args, **kwargs):
      raise OSError(28, "No space left on device")
    monkeypatch.setattr(orbax_io, "_write", broken)
  elif fails == "adapter_verify":
    def broken(*args, **kwargs):
      raise adapter_io.CrossLoraError("out: output verification failed: simulated")
    monkeypatch.setattr(adapter_io, "verify_adapter_folder", broken)
  else:
    real, calls = adapter_io._swap_in, []
    def swap(new, final):
      calls.append(final)
      if len(calls) == 2:
        raise OSError(5, "Input/output error", str(final))
      return real(new, final)
    monkeypatch.setattr(adapter_io, "_swap_in", swap)
  refused(c, capsys)
  left = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))
  assert left == [], left


def _fail_for(select):
  real = os.fsync
  def fsync(fd):
    if select(fd):
      raise OSError(28, "No space left on device")
    return real(fd)
  return fsync


def test_all_outputs_are_new_together(old_outputs, models, tmp_path, capsys):
  out, report, orbax = old_outputs
  c = Hostile(models, tmp_path)
  c.extra += ["--overwrite", "--report", str(report), "--orbax_output", str(orbax)]
  rc, _, err = run_in_process(c.args(), capsys)
  assert rc == 0, err
  assert not (out / "keep.txt").exists() and not (orbax / "keep.txt").exists()
  assert json.loads(report.read_text())["config"]["method"] == "truncate_pad"
  assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


# --- 3. confinement: what a folder's files name, and what they are ----------------------------

def _shard_index(c: Hostile, name: str, tmp_path) -> pathlib.Path:
  """A sharded copy of the source whose index names ``name`` (relative to the folder) for one key."""
  c.source = c.copy("sharded")
  index = c.source / "model.safetensors.index.json"
  data = json.loads(index.read_text())
  key = sorted(data["weight_map"])[0]
  data["weight_map"][key] = name
  index.write_text(json.dumps(data))
  return index


@pytest.mark.parametrize("name", ["../outside/model.safetensors", "/etc/passwd", "link_out", "sub/../../x",
                                  "a\\..\\..\\b", 7, ""])
def test_index_names_outside_the_folder_are_refused(name, models, tmp_path, capsys):
  c = Hostile(models, tmp_path)
  (tmp_path / "outside").mkdir()
  save_file({"x": np.zeros(2, np.float32)}, str(tmp_path / "outside" / "model.safetensors"))
  index = _shard_index(c, name, tmp_path)
  (c.source / "link_out").symlink_to(tmp_path / "outside" / "model.safetensors")
  refused(c, capsys, [str(index), "weight_map"])


@pytest.mark.parametrize("which", ["model_fifo", "config_fifo", "adapter_fifo", "adapter_config_fifo",
                                   "model_is_dev_zero", "shard_fifo"])
def test_special_files_are_refused_without_blocking(which, models, tmp_path, capsys):
  c = Hostile(models, tmp_path)
  folder, name = {"model_fifo": (c.source, "model.safetensors"), "config_fifo": (c.target, "config.json"),
                  "adapter_fifo": (c.adapter, "adapter_model.safetensors"),
                  "adapter_config_fifo": (c.adapter, "adapter_config.json"),
                  "model_is_dev_zero": (c.source, "model.safetensors"), "shard_fifo": (None, None)}[which]
  if which == "shard_fifo":
    c.source = c.copy("sharded")
    folder, name = c.source, sorted(p.name for p in c.source.glob("*.safetensors"))[0]
  (folder / name).unlink()
  if which == "model_is_dev_zero":
    (folder / name).symlink_to("/dev/zero")
  else:
    os.mkfifo(folder / name)
  refused(c, capsys, [name, "regular file"], timeout=30)


@pytest.mark.parametrize("claim", ["beyond_file", "zero", "huge"])
def test_safetensors_header_length_is_checked_before_reading(claim, models, tmp_path, capsys):
  c = Hostile(models, tmp_path)
  file = c.adapter / "adapter_model.safetensors"
  data = file.read_bytes()
  n = {"beyond_file": len(data), "zero": 0, "huge": 2**62}[claim]
  file.write_bytes(struct.pack("<Q", n) + data[8:])
  refused(c, capsys, [str(file), "safetensors header"])


# --- 4. strict, bounded parsing ---------------------------------------------------------------

def _raw_json(file: pathlib.Path, field: str, raw: str) -> None:
  """Sets ``field`` of a JSON object file to the literal text ``raw`` (NaN, huge integers, ...)."""
  data = json.loads(file.read_text())
  data[field] = "__RAW__"
  file.write_text(json.dumps(data).replace('"__RAW__"', raw))


@pytest.mark.parametrize("file,field,raw,says", [
    ("src/config.json", "num_hidden_layers", "[" * 50000 + "]" * 50000, "nested at most"),
    ("src/config.json", "hidden_size", "9" * 5000, "integers within"),
    ("tgt/config.json", "rms_norm_eps", "1e999", "finite numbers"),
    ("ad/adapter_config.json", "r", "NaN", "finite numbers"),
    ("ad/adapter_config.json", "lora_alpha", "Infinity", "finite numbers"),
    ("ad/adapter_config.json", "lora_alpha", "-Infinity", "finite numbers"),
    ("src/config.json", "text_config", "[1, 2]", "text_config expected an object"),
    ("tgt/config.json", "text_config", '"gemma"', "text_config expected an object"),
    ("src/config.json", "quantization_config", '{"quant_method": "bitsandbytes"}', "unquantized"),
    ("src/config.json", "num_hidden_layers", "100000000", "layers expected from the"),
    ("tgt/config.json", "num_hidden_layers", "4000000", "layers expected from the"),
])
def test_configs_are_parsed_strictly(file, field, raw, says, models, tmp_path, capsys):
  c = Hostile(models, tmp_path)
  _raw_json(tmp_path / file, field, raw)
  refused(c, capsys, [file.split("/")[1], says], timeout=30)


@pytest.mark.parametrize("text,says", [('{"r": 4, "r": 8}', "twice"), (b"\xff\xfe{", "UTF-8"),
                                       ('["not", "an", "object"]', "a JSON object expected")])
def test_adapter_config_shapes(text, says, models, tmp_path, capsys):
  c = Hostile(models, tmp_path)
  file = c.adapter / "adapter_config.json"
  file.write_bytes(text if isinstance(text, bytes) else text.encode())
  refused(c, capsys, [str(file), says])


@pytest.mark.parametrize("field,value,says", [("modules_to_save", 1.5, "a list of module names"),
                                             ("use_dora", "yes", "true or false"), ("r", 4.5, "integer rank"),
                                             ("use_rslora", "true", "true or false"), ("layers_pattern", 3, "a string"),
                                             ("base_model_name_or_path", {"a": 1}, "a string or null")])
def test_adapter_config_fields_of_the_wrong_type(field, value, says, models, tmp_path, capsys):
  c = Hostile(models, tmp_path)
  _edit_json(c.adapter / "adapter_config.json", **{field: value})
  refused(c, capsys, [str(c.adapter / "adapter_config.json"), field, says])


@pytest.mark.parametrize("pattern", ["(a+)+$", "(.*a){12}", "(q|q_|_p)*roj", "(x*)*y", ".*.*.*.*v_proj",
                                     r"(\w+)\1", "q{2000}"])
def test_pathological_regexes_are_refused_at_once(pattern, models, tmp_path, capsys):
  c = Hostile(models, tmp_path)
  _edit_json(c.adapter / "adapter_config.json", rank_pattern={pattern: 4})
  refused(c, capsys, ["rank_pattern expected"], timeout=10)


def test_peft_pattern_semantics_are_kept():
  """The accepted patterns match exactly as PEFT's get_pattern_key does."""
  from peft.utils.other import get_pattern_key
  from crosslora_jax.formats import peft_format
  patterns = {"q_proj": 4, r"layers\.1\.self_attn\.v_proj": 6, "^model.layers.0.mlp": 2, "(k|o)_proj": 3}
  for path in ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj",
               "model.layers.0.self_attn.v_proj", "model.layers.0.mlp.up_proj", "model.layers.2.self_attn.o_proj"]:
    want = patterns.get(get_pattern_key(list(patterns), path), 8)
    assert peft_format.pattern_value(patterns, path, 8) == want, path


def test_legacy_bin_that_is_no_state_dict(models, tmp_path, capsys):
  import torch
  for i, payload in enumerate([[1, 2, 3], {"base_model.model.x.lora_A.weight": [1.0]},
                               {"base_model.model.x.lora_A.weight": torch.zeros(2, dtype=torch.int8)}]):
    c = Hostile(models, tmp_path / str(i))
    (c.adapter / "adapter_model.safetensors").unlink()
    torch.save(payload, c.adapter / "adapter_model.bin")
    refused(c, capsys, [str(c.adapter / "adapter_model.bin")])


@pytest.mark.parametrize("flag", [["--seed", str(2**70)], ["--seed", str(-(2**64))], ["--rank", str(2**40)],
                                  ["--anchor_threshold", "nan"], ["--chunk_layers", str(2**65)]])
def test_flag_values_beyond_their_bounds(flag, models, tmp_path, capsys):
  c = Hostile(models, tmp_path)
  c.extra += flag
  refused(c, capsys, [flag[0]])


# --- 5. keys mean what PEFT means; base dtypes --------------------------------------------------

def _add_alias(old: str, new: str):
  def edit(tensors):
    for key in [k for k in tensors if old in k]:
      tensors[key.replace(old, new)] = tensors[key] * 2
  return edit


@pytest.mark.parametrize("old,new,says", [
    ("layers.0.", "layers.00.", "'00'"),
    ("layers.1.", "layers.\u0661.", "'\u0661'"),
    ("layers.1.", "layers.+1.", "'+1'"),
    ("lora_A.weight", "lora_A.default.weight", "adapter name inside the key"),
    ("lora_B.weight", "lora_B.other.weight", "adapter name inside the key"),
])
def test_keys_peft_would_read_as_other_modules_are_refused(old, new, says, models, tmp_path, capsys):
  c = Hostile(models, tmp_path)
  _edit_tensors(c.adapter / "adapter_model.safetensors", _add_alias(old, new))
  refused(c, capsys, [new.strip("."), says])


def test_peft_itself_reads_those_keys_as_other_modules(models):
  """Why they are refused: PEFT ignores ``layers.00`` (no such module) and loads ``lora_A.default.weight``
  onto the very parameter ``lora_A.weight`` goes to, so one of two different tensors silently wins."""
  import fixtures
  import torch
  from peft import PeftModel
  from peft.utils.save_and_load import set_peft_model_state_dict
  model = PeftModel.from_pretrained(fixtures.make_model("llama", None, num_hidden_layers=2), str(models / "ad"))
  state = {k: torch.from_numpy(v.copy()) for k, v in load_file(str(models / "ad" / "adapter_model.safetensors")).items()}
  padded = {k.replace("layers.0.", "layers.00."): v for k, v in state.items() if "layers.0." in k}
  result = set_peft_model_state_dict(model, padded)
  assert sorted(result.unexpected_keys) == sorted(padded)
  key = f"base_model.model.{Q0}.lora_A.weight"
  named = {key: state[key], key.replace("lora_A.weight", "lora_A.default.weight"): state[key] * 2}
  result = set_peft_model_state_dict(model, named)
  assert result.unexpected_keys == []
  loaded = dict(model.named_parameters())[key.replace("lora_A.weight", "lora_A.default.weight")]
  assert torch.equal(loaded, state[key]) or torch.equal(loaded, state[key] * 2)


def _retype(key_part: str, dtype):
  def edit(tensors):
    for key in [k for k in tensors if key_part in k]:
      tensors[key] = (tensors[key] * 100).astype(dtype)
  return edit


@pytest.mark.parametrize("dtype,says", [(np.int8, "I8"), (np.int32, "I32"), (np.uint8, "U8"),
                                        (np.complex64, "C64"), (np.bool_, "BOOL")])
def test_base_weights_that_are_not_plain_floats(dtype, says, models, tmp_path, capsys):
  c = Hostile(models, tmp_path)
  if dtype is np.complex64:  # safetensors' numpy writer has no complex: write the header by hand
    _write_with_dtype(c.source / "model.safetensors", "q_proj", "C64", 8)
  else:
    _edit_tensors(c.source / "model.safetensors", _retype("q_proj", dtype))
  refused(c, capsys, ["q_proj", says, "float16, bfloat16 or float32 expected"])


def test_float8_base_weights_are_refused_with_the_fix(models, tmp_path, capsys):
  c = Hostile(models, tmp_path)
  _write_with_dtype(c.target / "model.safetensors", "v_proj", "F8_E4M3", 1)
  refused(c, capsys, ["v_proj", "F8_E4M3", "float8 weights are not supported", "bfloat16"])


def _write_with_dtype(file: pathlib.Path, key_part: str, dtype: str, itemsize: int) -> None:
  """Rewrites a safetensors file with every ``key_part`` tensor declared as ``dtype`` (zero bytes)."""
  tensors = load_file(str(file))
  header, blobs, offset = {}, [], 0
  for key in sorted(tensors):
    array = tensors[key]
    data = (np.zeros(array.size * itemsize, np.uint8).tobytes() if key_part in key
            else np.ascontiguousarray(array).tobytes())
    header[key] = {"dtype": dtype if key_part in key else "F32", "shape": list(array.shape),
                   "data_offsets": [offset, offset + len(data)]}
    if key_part not in key:
      assert array.dtype == np.float32
    blobs.append(data)
    offset += len(data)
  text = json.dumps(header).encode()
  text += b" " * (-len(text) % 8)
  file.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


# --- 6. one line, whatever the error ------------------------------------------------------------

def test_a_tensor_name_with_a_newline_stays_one_line(models, tmp_path, capsys):
  c = Hostile(models, tmp_path)
  _edit_tensors(c.adapter / "adapter_model.safetensors",
                lambda t: t.update({"base_model.model.x\nerror: forged.lora_A.weight": np.zeros((4, 4), np.float32)}))
  line = refused(c, capsys, ["\\nerror: forged"])
  assert "\x1b" not in line


def test_a_path_with_control_characters_stays_one_line(models, tmp_path, capsys):
  c = Hostile(models, tmp_path)
  c.adapter = tmp_path / "no\nerror: such\x1b[2J\u2028adapter"
  refused(c, capsys, ["\\nerror: such\\x1b[2J\\u2028adapter"])


def test_a_config_value_with_control_characters_stays_one_line(models, tmp_path, capsys):
  c = Hostile(models, tmp_path)
  _edit_json(c.target / "config.json", model_type="llama\r\nerror: forged\x07")
  refused(c, capsys, ["\\r\\nerror: forged\\x07"])


@pytest.mark.parametrize("exc,status", [(RuntimeError("boom\nerror: second line"), 1), (MemoryError(), 1),
                                        (OSError(5, "Input/output error", "/some/where"), 2),
                                        (KeyError("x\ny"), 1)])
def test_unexpected_exceptions_give_one_line(exc, status, models, tmp_path, capsys, monkeypatch):
  from crosslora_jax.core import engine
  def broken(*args, **kwargs):
    raise exc
  monkeypatch.setattr(engine, "transfer_adapters", broken)
  c = Hostile(models, tmp_path)
  line = refused(c, capsys, [type(exc).__name__], status=status)
  assert not c.output.exists()
  if status == 1:
    assert "bug" in line


@pytest.mark.parametrize("flag,make", [("--cache_dir", "file"), ("--cache_dir", "under_a_file"),
                                       ("--cache_dir", "unwritable"), ("--xla_cache_dir", "file"),
                                       ("--xla_cache_dir", "unwritable")])
def test_unusable_cache_folders_named_by_the_user(flag, make, models, tmp_path, capsys):
  c = Hostile(models, tmp_path)
  (tmp_path / "afile").write_text("x")
  path = {"file": tmp_path / "afile", "under_a_file": tmp_path / "afile" / "cache",
          "unwritable": pathlib.Path("/proc/crosslora_cache")}[make]
  c.extra = ["--noprogress", "--method", "truncate_pad", flag, str(path)]
  c.extra += ["--xla_cache_dir", ""] if flag == "--cache_dir" else ["--cache_dir", str(tmp_path / "subspaces")]
  refused(c, capsys, [flag, "a writable folder expected", "--no_cache"])


def test_an_unusable_default_cache_root_is_skipped_with_a_warning(models, tmp_path, capsys, caplog, monkeypatch):
  (tmp_path / "afile").write_text("x")
  monkeypatch.setenv("CROSSLORA_CACHE", str(tmp_path / "afile"))
  c = Hostile(models, tmp_path)
  c.extra = ["--noprogress", "--method", "truncate_pad"]
  rc, _, err = run_in_process(c.args(), capsys)
  assert rc == 0, err
  assert "running without this cache" in caplog.text + err and "error:" not in err
  assert (c.output / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("damage", ["entry_is_a_folder", "model_folder_is_a_file", "entry_is_a_fifo"])
def test_damaged_cache_entries_are_recomputed(damage, models, tmp_path, capsys):
  c = Hostile(models, tmp_path)
  cache_dir = tmp_path / "subspaces"
  c.extra = ["--noprogress", "--rank", "4", "--cache_dir", str(cache_dir), "--xla_cache_dir", ""]
  rc, _, err = run_in_process(c.args(), capsys)
  assert rc == 0, err
  reference = (c.output / "adapter_model.safetensors").read_bytes()
  entries = sorted(p for p in cache_dir.rglob("*.safetensors"))
  assert entries
  if damage == "entry_is_a_folder":
    for p in entries:
      p.unlink()
      p.mkdir()
  elif damage == "entry_is_a_fifo":
    for p in entries:
      p.unlink()
      os.mkfifo(p)
  else:
    for folder in {p.parent for p in entries}:
      shutil.rmtree(folder)  # its entries and the overlaps kept beside them
      folder.write_text("not a folder")
  c.extra += ["--overwrite"]
  rc, _, err = run_in_process(c.args(), capsys)
  assert rc == 0, err
  assert "Traceback" not in err and "error:" not in err
  assert (c.output / "adapter_model.safetensors").read_bytes() == reference
