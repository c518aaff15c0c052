"""Regular expressions from adapter configs, matched as PEFT matches them, but never forever.

PEFT matches ``target_modules`` (a string), ``exclude_modules``, ``rank_pattern`` and
``alpha_pattern`` keys with Python's backtracking ``re`` against module paths (about
60 characters). Python's ``re`` has no timeout, and a pattern such as ``(a+)+$`` or
``(a|aa)*b`` takes time exponential in the path's length. So instead of a clock, a
pattern is refused up front when its structure allows super-linear backtracking:

- a repeat that can run more than once (``*``, ``+``, ``{2,}``) whose body holds
  another variable repeat or an alternation (the classic exponential shapes);
- more than ``MAX_OPEN_REPEATS`` unbounded repeats in one pattern (each adds a
  factor of the path's length: ``.*.*.*.*x`` is polynomial of that degree);
- backreferences, ``{m,n}`` counts above ``MAX_COUNT``, and patterns longer than
  ``MAX_LENGTH`` characters.

What is accepted is matched with ``re`` exactly as PEFT does, so the result is PEFT's;
real configs (``q_proj``, ``.*\\.layers\\.(0|1)\\.self_attn\\.(q|v)_proj``, the
``^model\\.layers\\.3\\.mlp\\.down_proj`` keys this package writes) pass.
"""

from __future__ import annotations

import re
from typing import Any

try:  # Python 3.11+
  import re._constants as _c
  import re._parser as _parser
except ImportError:  # pragma: no cover - Python 3.10
  import sre_constants as _c  # type: ignore[no-redef]
  import sre_parse as _parser  # type: ignore[no-redef]

MAX_LENGTH = 1000
MAX_COUNT = 1000
MAX_OPEN_REPEATS = 3
_REPEATS = (_c.MAX_REPEAT, _c.MIN_REPEAT, getattr(_c, "POSSESSIVE_REPEAT", _c.MAX_REPEAT))


def regex_problem(pattern: Any) -> str | None:
  """What is wrong with ``pattern`` as a config regex ("a valid ..., got ..."), or None."""
  if not isinstance(pattern, str):
    return f"regular expressions (strings), got {type(pattern).__name__}"
  shown = pattern if len(pattern) <= 80 else pattern[:77] + "..."
  if len(pattern) > MAX_LENGTH:
    return f"regular expressions of at most {MAX_LENGTH} characters, got {len(pattern)}"
  try:
    re.compile(pattern)
    tree = _parser.parse(pattern)
  except (re.error, RecursionError, OverflowError) as e:
    return f"valid regular expressions, got {shown!r} ({e})"
  why = _walk(tree, inside_repeat=False, counter=[0])
  if why is not None:
    return (f"regular expressions that match in linear time, got {shown!r} ({why}). "
            "Write the module names out, e.g. (q_proj|v_proj) without a repeat around the group")
  return None


def _children(op: Any, arg: Any) -> list[Any]:
  """The sub-patterns below one parsed node."""
  if op in _REPEATS:
    return [arg[2]]
  if op == _c.SUBPATTERN:
    return [arg[-1]]
  if op == _c.BRANCH:
    return list(arg[1])
  if op in (_c.ASSERT, _c.ASSERT_NOT):
    return [arg[1]]
  if op == getattr(_c, "ATOMIC_GROUP", None):
    return [arg]
  if op == _c.GROUPREF_EXISTS:
    return [a for a in arg[1:] if a is not None]
  return []


def _walk(tree: Any, *, inside_repeat: bool, counter: list[int]) -> str | None:
  for op, arg in tree:
    if op in (_c.GROUPREF, _c.GROUPREF_EXISTS):
      return "a backreference"
    if op in _REPEATS:
      low, high = arg[0], arg[1]
      unbounded = high == _c.MAXREPEAT
      if not unbounded and high > MAX_COUNT:
        return f"a repeat count above {MAX_COUNT}"
      variable = low != high
      if inside_repeat and variable:
        return "a repeat inside a repeat"
      if unbounded:
        counter[0] += 1
        if counter[0] > MAX_OPEN_REPEATS:
          return f"more than {MAX_OPEN_REPEATS} unbounded repeats"
      why = _walk(arg[2], inside_repeat=inside_repeat or high > 1, counter=counter)
      if why is not None:
        return why
      continue
    if op == _c.BRANCH and inside_repeat:
      return "an alternation inside a repeat"
    for child in _children(op, arg):
      why = _walk(child, inside_repeat=inside_repeat, counter=counter)
      if why is not None:
        return why
  return None
