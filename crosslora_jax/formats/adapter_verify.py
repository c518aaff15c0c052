"""Checking a written adapter folder against what was computed, before it is renamed into place."""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import numpy as np
from safetensors import safe_open

from crosslora_jax.formats import peft_format
from crosslora_jax.formats.architectures import Architecture
from crosslora_jax.errors import CrossLoraError


def verify_adapter_folder(folder: pathlib.Path, expected: peft_format.PeftAdapter, dtype: Any,
                          target: Architecture | None = None, *,
                          shown_as: str | os.PathLike[str] | None = None, readme: str | None = None) -> None:
  """Re-opens a written adapter and checks it against what was computed and against ``target``.

  Every key, shape, dtype and byte of adapter_model.safetensors must equal
  ``expected`` cast to ``dtype`` (None: as held); adapter_config.json must parse
  back to ``expected.config`` and select exactly the written modules with their
  ranks; with ``target``, every module must exist in the target with matching
  (out, in) sizes; with ``readme``, README.md must hold exactly that model card.
  Any difference is a bug, never a user error, but it is still raised as
  CrossLoraError so that nothing broken is renamed into place. Messages
  name ``shown_as`` (the final output path) instead of the temporary ``folder``.
  """
  np_dtype = peft_format.DTYPES[dtype] if isinstance(dtype, str) else dtype
  file = folder / peft_format.WEIGHTS_FILE
  want = peft_format.adapter_tensors(expected, np_dtype)
  problems = []
  try:
    with safe_open(str(file), framework="np") as f:
      if (f.metadata() or {}).get("format") != "pt":
        problems.append(f"{file}: metadata format 'pt' expected, got {f.metadata()!r}")
      keys = set(f.keys())
      if keys != set(want):
        problems.append(f"{file}: {len(want)} keys expected, got {len(keys)} (differ: {sorted(keys ^ set(want))[:3]})")
      for key in sorted(keys & set(want)):
        got = f.get_tensor(key)
        if got.shape != want[key].shape:
          problems.append(f"{file}: {key}: shape expected {want[key].shape}, got {got.shape}")
        elif got.dtype != want[key].dtype:
          problems.append(f"{file}: {key}: dtype expected {want[key].dtype}, got {got.dtype}")
        elif got.tobytes() != want[key].tobytes():
          problems.append(f"{file}: {key}: the computed values expected, got different bytes")
  except Exception as e:  # safetensors' own error types
    problems.append(f"{file}: a readable safetensors file expected, got {type(e).__name__}: {e}")
  if not problems:
    try:
      written = peft_format.read_adapter(folder)  # config parse, pairing, target_modules, ranks, finite
    except CrossLoraError as e:
      problems.append(str(e).rstrip("."))
    else:
      problems += _check_written(folder, written, expected, target)
  if readme is not None:
    from crosslora_jax.formats import model_card
    problems += model_card.check_written(folder, readme)
  if problems:
    message = (f"{folder}: output verification failed: " + "; ".join(problems[:5])
               + ". Nothing was written; please report this as a bug.")
    raise CrossLoraError(message.replace(str(folder), str(shown_as or folder)))


def _check_written(folder: pathlib.Path, written: peft_format.PeftAdapter, expected: peft_format.PeftAdapter,
                   target: Architecture | None) -> list[str]:
  problems = []
  config_file = folder / peft_format.CONFIG_FILE
  if written.config != json.loads(json.dumps(expected.config)):
    problems.append(f"{config_file}: the computed config expected, got a different one")
  if set(written.modules) != set(expected.modules):
    problems.append(f"{config_file}: modules {sorted(expected.modules)[:3]} expected, got {sorted(written.modules)[:3]}")
  for path in sorted(set(written.modules) & set(expected.modules)):
    if not np.isclose(written.scaling(path), expected.scaling(path), rtol=1e-6):
      problems.append(f"{config_file}: {path}: scaling {expected.scaling(path)} expected, got {written.scaling(path)}")
  if target is None:
    return problems
  if bool(written.config.get("fan_in_fan_out")) != target.spec.conv1d:
    problems.append(f"{config_file}: fan_in_fan_out {target.spec.conv1d} expected for {target.model_type}, "
                    f"got {written.config.get('fan_in_fan_out')!r}")
  for path, pair in sorted(written.modules.items()):
    key = peft_format.lora_key(path, "A")
    parsed = target.parse_module_path(path)
    if parsed is None or parsed[0] >= target.num_layers:
      problems.append(f"{folder / peft_format.WEIGHTS_FILE}: {key}: a module of the target model "
                      f"({target.model_type}, {target.num_layers} layers) expected, got none")
      continue
    out_dim, in_dim = target.stored_shape(parsed[1])
    if pair.a_ri.shape[1] != in_dim or pair.b_or.shape[0] != out_dim:
      problems.append(f"{folder / peft_format.WEIGHTS_FILE}: {key}: lora_A (r, {in_dim}) and lora_B ({out_dim}, r) "
                      f"expected from the target, got {pair.a_ri.shape} and {pair.b_or.shape}")
  return problems
