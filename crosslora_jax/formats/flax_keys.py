"""Flax LoRA trees, the parts below :mod:`crosslora_jax.formats.flax_bridge`: key maps and nested dicts.

The key mapping from HF module paths (``model.layers.3.self_attn.q_proj``) to paths in
the user's tree is a parameter (:class:`KeyMap`, :func:`key_template`, a function, or
None for the identity split on dots with digits as ints, which is how ``nnx.state``
names list items). The nested-dict helpers read and write such trees.

>>> key_template(("model.layers.{i}.self_attn.{m}", "layers/{i}/attn/{m}")).to_tree("model.layers.3.self_attn.q_proj")
('layers', 3, 'attn', 'q_proj')
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Union


from crosslora_jax.errors import CrossLoraError

TreePath = tuple[Union[str, int], ...]


def _split_hf(path: str) -> TreePath:
  return tuple(int(p) if p.isdigit() else p for p in path.split("."))


def _join_hf(tree_path: TreePath) -> str:
  return ".".join(str(p) for p in tree_path)


def path_str(tree_path: Sequence[Any]) -> str:
  """A tree path as qwix and error messages write it: ``layers/3/attn/q_proj``."""
  return "/".join(str(p) for p in tree_path)


@dataclasses.dataclass(frozen=True)
class KeyMap:
  """HF module path ⇄ path of that module in the user's tree.

  ``to_tree`` maps ``model.layers.3.self_attn.q_proj`` to a tuple of dict keys
  (str, or int for list items). ``to_hf`` is its inverse (None: unknown, used to
  find modules in a tree without meta; with meta the HF paths are listed there).
  """

  to_tree: Callable[[str], TreePath]
  to_hf: Callable[[TreePath], str | None] | None = None


IDENTITY = KeyMap(_split_hf, _join_hf)

_FIELD_RE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _template_re(template: str, sep: str) -> tuple[re.Pattern[str], tuple[str, ...]]:
  fields: list[str] = []
  out, pos = [], 0
  for m in _FIELD_RE.finditer(template):
    out.append(re.escape(template[pos:m.start()]))
    name = m.group(1)
    if name in fields:
      out.append(f"(?P={name})")
    else:
      fields.append(name)
      out.append(f"(?P<{name}>[^{re.escape(sep)}]+)")
    pos = m.end()
  out.append(re.escape(template[pos:]))
  return re.compile("".join(out)), tuple(fields)


def key_template(*rules: tuple[str, str]) -> KeyMap:
  """A KeyMap from (HF pattern, tree pattern) pairs; the first matching pair wins.

  HF patterns are dotted, tree patterns ``/``-separated; ``{field}`` matches one
  path component and both sides of a pair must use the same fields. A tree
  component that comes out all digits becomes an int (nnx list index).

  >>> km = key_template(("model.layers.{layer}.self_attn.{name}", "blocks/{layer}/attn/{name}"),
  ...                   ("model.layers.{layer}.mlp.{name}", "blocks/{layer}/ffn/{name}"))
  >>> km.to_tree("model.layers.3.self_attn.q_proj")
  ('blocks', 3, 'attn', 'q_proj')
  >>> km.to_hf(("blocks", 1, "ffn", "up_proj"))
  'model.layers.1.mlp.up_proj'
  """
  if not rules:
    raise CrossLoraError("key_template: at least one (hf pattern, tree pattern) pair expected, got none.")
  compiled = []
  for rule in rules:
    if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and all(isinstance(s, str) for s in rule)):
      raise CrossLoraError(f"key_template: (hf pattern, tree pattern) string pairs expected, got {rule!r}.")
    hf, tree = rule
    hf_re, hf_fields = _template_re(hf, ".")
    tree_re, tree_fields = _template_re(tree, "/")
    if set(hf_fields) != set(tree_fields):
      raise CrossLoraError(f"key_template: the same {{fields}} on both sides expected, got {sorted(hf_fields)} in "
                           f"{hf!r} and {sorted(tree_fields)} in {tree!r}. Every field must be recoverable both ways.")
    compiled.append((hf, tree, hf_re, tree_re))

  def to_tree(path: str) -> TreePath:
    for _, tree, hf_re, _ in compiled:
      m = hf_re.fullmatch(path)
      if m:
        return tuple(int(p) if p.isdigit() else p for p in tree.format(**m.groupdict()).split("/"))
    raise CrossLoraError(f"key_template: {path}: a module path matching one of "
                         f"{[r[0] for r in compiled]} expected, got none. Add a rule for it.")

  def to_hf(tree_path: TreePath) -> str | None:
    s = path_str(tree_path)
    for hf, _, _, tree_re in compiled:
      m = tree_re.fullmatch(s)
      if m:
        return hf.format(**m.groupdict())
    return None

  return KeyMap(to_tree, to_hf)


KeyMapLike = Union[KeyMap, Callable[[str], Sequence[Any]], tuple, list, None]


def as_key_map(key_map: KeyMapLike) -> KeyMap:
  """None → identity; a KeyMap; a function HF path → tree path; or key_template rule(s)."""
  if key_map is None:
    return IDENTITY
  if isinstance(key_map, KeyMap):
    return key_map
  if isinstance(key_map, tuple) and len(key_map) == 2 and all(isinstance(s, str) for s in key_map):
    return key_template(key_map)
  if isinstance(key_map, (tuple, list)):
    return key_template(*key_map)
  if callable(key_map):
    return KeyMap(key_map)
  raise CrossLoraError(f"key_map: a KeyMap, a function, key_template pairs or None expected, got {key_map!r}.")


def _tree_path(key_map: KeyMap, hf_path: str) -> TreePath:
  path = key_map.to_tree(hf_path)
  if isinstance(path, str) or not isinstance(path, Sequence) or not path or not all(
      isinstance(p, (str, int)) and not isinstance(p, bool) for p in path):
    raise CrossLoraError(f"key_map: {hf_path}: a non-empty tuple of str/int keys expected, got {path!r}.")
  return tuple(path)


def pure_tree(tree: Any) -> Any:
  """nnx.Module → its LoRAParam state; nnx.State → pure dict; anything else as is."""
  from flax import nnx
  if isinstance(tree, nnx.Module):
    tree = nnx.state(tree, nnx.LoRAParam)
  if isinstance(tree, nnx.State):
    tree = tree.to_pure_dict()
  return tree


def _get(tree: Any, path: Sequence[Any]) -> Any:
  for key in path:
    if not isinstance(tree, Mapping) or key not in tree:
      return None
    tree = tree[key]
  return tree


def _set(tree: dict, path: Sequence[Any], value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
    if not isinstance(tree, dict):
      raise CrossLoraError(f"{path_str(path)}: a dict at {key!r} expected, got a leaf. Two modules map to "
                           "nested paths; fix the key_map.")
  if path[-1] in tree:
    raise CrossLoraError(f"{path_str(path)}: one module per tree path expected, got two. Fix the key_map.")
  tree[path[-1]] = value


def _walk(tree: Any, prefix: TreePath = ()) -> Iterator[tuple[TreePath, Mapping]]:
  """Every dict node of a nested dict, depth first, with its path."""
  if isinstance(tree, Mapping):
    yield prefix, tree
    for key, value in tree.items():
      yield from _walk(value, prefix + (key,))
