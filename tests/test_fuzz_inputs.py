"""Fuzzing the command line with mutated inputs: success with a verified output, or one line and exit 2.

Hypothesis mutates one input file per example: a value, key or the raw text of
``config.json``, ``adapter_config.json`` or a shard index, or the JSON header of
``adapter_model.safetensors`` (re-packed in front of the original data). The command
line runs in-process on private copies. Allowed outcomes: status 0 with an output that
reads back as a valid adapter, or status 2 with exactly one ``error:`` line and no
output; anything else (a traceback, status 1, a second line, a hang) fails. Runs are
derandomized (same examples every time); CROSSLORA_FUZZ_EXAMPLES for more, CROSSLORA_FUZZ_SEED
for others.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import struct
import tempfile
import pathlib

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from crosslora_jax.formats import peft_format
from test_bad_input import models, run_in_process  # noqa: F401  (fixture)

EXAMPLES = int(os.environ.get("CROSSLORA_FUZZ_EXAMPLES", "100"))
SEED = os.environ.get("CROSSLORA_FUZZ_SEED")  # unset: the same derandomized examples on every run
OUTCOMES: collections.Counter[str] = collections.Counter()

RAW_TOKENS = ["NaN", "Infinity", "-Infinity", "1e999", "9" * 400, "[" * 200 + "]" * 200, '"\\u0000\\n"',
              "-0", "1.5", "true", "null", '{"": {}}', '"../../etc/passwd"', '"/dev/zero"']
VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12), st.sampled_from(["q_proj", "(a+)+$", "layers.00", "llama", "gemma3", "../x", "\n"]),
    st.lists(st.integers(-3, 300), max_size=3), st.dictionaries(st.text(max_size=6), st.integers(0, 64), max_size=2))


def _paths(value, prefix=()):
  """Every (path, value) inside a JSON value, containers included."""
  yield prefix, value
  if isinstance(value, dict):
    for k, v in value.items():
      yield from _paths(v, prefix + (k,))
  elif isinstance(value, list):
    for i, v in enumerate(value[:4]):
      yield from _paths(v, prefix + (i,))


@st.composite
def json_mutation(draw, data):
  """A mutated JSON text of ``data``: one value replaced, a key dropped or added, or raw text spliced in."""
  paths = [p for p, _ in _paths(data) if p]
  kind = draw(st.sampled_from(["replace", "drop", "add", "raw", "truncate"]))
  data = json.loads(json.dumps(data))
  if kind == "truncate":
    text = json.dumps(data)
    return text[:draw(st.integers(0, max(len(text) - 1, 0)))]
  path = draw(st.sampled_from(paths)) if paths else ()
  parent = data
  for part in path[:-1]:
    parent = parent[part]
  last = path[-1] if path else None
  if kind == "drop" and isinstance(parent, dict) and last in parent:
    del parent[last]
    return json.dumps(data)
  if kind == "add" and isinstance(parent, dict):
    parent[draw(st.sampled_from(["text_config", "quantization_config", "rank_pattern", "alpha_pattern",
                                 "layers_to_transform", "exclude_modules", "weight_map", "head_dim"]))] = draw(VALUES)
    return json.dumps(data)
  if kind == "raw" and last is not None:
    parent[last] = "__RAW__"
    return json.dumps(data).replace('"__RAW__"', draw(st.sampled_from(RAW_TOKENS)))
  if last is not None:
    parent[last] = draw(VALUES)
  return json.dumps(data)


def _header(file: pathlib.Path) -> tuple[dict, bytes]:
  data = file.read_bytes()
  (n,) = struct.unpack("<Q", data[:8])
  return json.loads(data[8:8 + n]), data[8 + n:]


TARGETS = ["source/config.json", "target/config.json", "adapter/adapter_config.json",
           "adapter/adapter_model.safetensors", "source/model.safetensors.index.json"]


@pytest.mark.filterwarnings("ignore")
@settings(max_examples=EXAMPLES, deadline=None, derandomize=SEED is None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@seed(int(SEED or 0))
@given(data=st.data())
def test_mutated_inputs_end_in_success_or_one_line(data, models, capsys):
  work = pathlib.Path(tempfile.mkdtemp(prefix="fuzz-"))
  try:
    target = data.draw(st.sampled_from(TARGETS), label="file")
    roles = {"source": "sharded" if target.endswith("index.json") else "src", "target": "tgt", "adapter": "ad"}
    for role, name in roles.items():
      shutil.copytree(models / name, work / role)
    file = work / target
    if file.suffix == ".safetensors":
      header, rest = _header(file)
      text = data.draw(json_mutation(header), label="header").encode()
      file.write_bytes(struct.pack("<Q", len(text)) + text + rest)
    else:
      file.write_text(data.draw(json_mutation(json.loads(file.read_text())), label="json"))
    method = data.draw(st.sampled_from(["truncate_pad"] * 5 + ["cross_lora"]), label="method")
    output = work / "out"
    args = ["--source_model", work / "source", "--target_model", work / "target", "--adapter", work / "adapter",
            "--output", output, "--rank", "4", "--method", method, "--no_cache", "--noprogress"]
    rc, out, err = run_in_process(args, capsys)
    assert "Traceback" not in err + out, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    if rc == 0:
      assert errors == [], err
      written = peft_format.read_adapter(output)
      assert written.modules
      OUTCOMES[f"success ({target})"] += 1
    else:
      assert rc == 2, (rc, err)
      assert len(errors) == 1 and len([x for x in err.splitlines() if x.strip()]) == 1, err
      assert not output.exists()
      OUTCOMES[f"exit 2 ({target})"] += 1
  finally:
    shutil.rmtree(work, ignore_errors=True)


def test_fuzz_outcome_summary():
  """Prints what the fuzzer saw (pytest -s); runs after it in file order."""
  if OUTCOMES:
    total = sum(OUTCOMES.values())
    print(f"\nfuzz: {total} runs: " + ", ".join(f"{k}: {v}" for k, v in sorted(OUTCOMES.items())))
