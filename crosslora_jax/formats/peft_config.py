"""Checks of an adapter_config.json's fields: types, ranges and regexes, all problems raised once."""

from __future__ import annotations

import pathlib
from typing import Any

from crosslora_jax.errors import CrossLoraError
from crosslora_jax.formats.regex_guard import regex_problem


def check_config(config: dict[str, Any], where: pathlib.Path) -> None:
  """Collects every config problem that would crash or mislead later, then raises once."""
  problems = _type_problems(config, where)
  peft_type = str(config.get("peft_type", "LORA")).upper()
  if peft_type != "LORA":
    problems.append(f"{where}: peft_type expected LORA, got {peft_type!r}. Only LoRA adapters can be transferred")
  for field in ("r", "lora_alpha"):
    value = config.get(field)
    if field in config and (not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0):
      problems.append(f"{where}: {field} expected a positive number, got {value!r}")
    elif field == "r" and field in config and not isinstance(value, int):
      problems.append(f"{where}: r expected an integer rank, got {value!r}")
  if config.get("use_dora"):
    problems.append(f"{where}: use_dora expected false, got true. DoRA magnitude vectors cannot be transferred; "
                    "retrain as plain LoRA")
  for field in ("target_modules", "exclude_modules"):
    problems += _module_selector_problems(where, field, config.get(field))
  layers = config.get("layers_to_transform")
  if layers is not None and not isinstance(layers, int) and not (
      isinstance(layers, list) and all(isinstance(i, int) for i in layers)):
    problems.append(f"{where}: layers_to_transform expected a layer index or a list of them, got {layers!r}")
  for field in ("rank_pattern", "alpha_pattern"):
    patterns = config.get(field)
    if patterns is None:
      continue
    if not isinstance(patterns, dict) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in patterns.values()):
      problems.append(f"{where}: {field} expected an object of regex -> positive number, got {patterns!r}")
    else:
      problems += _regex_problems(where, field, list(patterns))
  if problems:
    raise CrossLoraError("; ".join(problems) + ".")


def _module_selector_problems(where: pathlib.Path, field: str, value: Any) -> list[str]:
  """``target_modules`` / ``exclude_modules``: absent, a list of module names, or one regex string."""
  if value is None or (isinstance(value, list) and all(isinstance(t, str) for t in value)):
    return []
  if isinstance(value, str):
    return _regex_problems(where, field, [value])
  return [f"{where}: {field} expected a list of module names or a regex string, got {value!r}"]


def _regex_problems(where: pathlib.Path, field: str, patterns: list[str]) -> list[str]:
  problems = []
  for pattern in patterns:
    why = regex_problem(pattern)
    if why is not None:
      problems.append(f"{where}: {field} expected {why}")
  return problems


_OPTIONAL_BOOL = (bool, type(None))
# Fields read here or copied into the output config, with the JSON types PEFT's LoraConfig takes.
_FIELD_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "use_rslora": (_OPTIONAL_BOOL, "true or false"),
    "use_dora": (_OPTIONAL_BOOL, "true or false"),
    "fan_in_fan_out": (_OPTIONAL_BOOL, "true or false"),
    "lora_bias": (_OPTIONAL_BOOL, "true or false"),
    "inference_mode": (_OPTIONAL_BOOL, "true or false"),
    "peft_type": ((str, type(None)), "a string"),
    "bias": ((str, type(None)), "a string"),
    "base_model_name_or_path": ((str, type(None)), "a string or null"),
    "layers_pattern": ((str, list, type(None)), "a string, a list of strings or null"),
    "modules_to_save": ((list, type(None)), "a list of module names or null"),
}


def _type_problems(config: dict[str, Any], where: pathlib.Path) -> list[str]:
  problems = []
  for field, (types, wanted) in _FIELD_TYPES.items():
    value = config.get(field)
    ok = isinstance(value, types) and not (isinstance(value, list) and not all(isinstance(v, str) for v in value))
    if not ok:
      shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
      problems.append(f"{where}: {field} expected {wanted}, got {shown}")
  return problems
