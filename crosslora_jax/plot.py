"""A picture of a transfer: the report's per-layer diagnostics, one PNG (``--plot FILE.png``).

Rows of panels, one column per adapter: energy of each base weight captured by its
rank-r subspace, the overlap of the source and target subspaces, the relative
update ‖ΔW‖/‖W‖ of source and target, and which layers were transferred or
skipped; across target layers, one line per module. Callers may add panels of
their own below (:class:`Panel`, e.g. a loss curve). matplotlib is an optional
extra (``pip install 'crosslora_jax[plot]'``); it is imported only here, without
pyplot, so no global backend is changed. Also ``python -m crosslora_jax.plot
REPORT.json FILE.png`` draws a saved ``--report``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pathlib
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from crosslora_jax.errors import CrossLoraError

SUFFIX = ".png"
_INSTALL = "pip install 'crosslora_jax[plot]' (or pip install matplotlib)"


@dataclasses.dataclass(frozen=True)
class Panel:
  """One extra panel: named lines of (x, y) points, e.g. ``{"train": (steps, losses)}``."""

  title: str
  x_label: str
  y_label: str
  lines: Mapping[str, tuple[Sequence[float], Sequence[float]]]
  log_y: bool = False


def require_matplotlib(flag: str = "--plot") -> None:
  """Fails early, with the install command, where matplotlib is missing."""
  try:
    import matplotlib  # noqa: F401
  except ImportError:
    raise CrossLoraError(f"{flag}: matplotlib expected for drawing, got it not installed. {_INSTALL}.") from None


def check_plot_path(file: str | os.PathLike[str], flag: str = "--plot") -> pathlib.Path:
  """A .png path whose folder exists (checked before any work)."""
  path = pathlib.Path(file)
  if path.suffix.lower() != SUFFIX:
    raise CrossLoraError(f"{flag}: a file name ending in {SUFFIX} expected, got {str(path)!r}. Name it like transfer.png.")
  parent = pathlib.Path(os.path.abspath(path)).parent
  if not parent.is_dir():
    raise CrossLoraError(f"{flag}: {path}: an existing folder expected, got nothing at {parent}. Create it first.")
  if path.is_dir():
    raise CrossLoraError(f"{flag}: {path}: a file path expected, got a folder. Choose a file name.")
  require_matplotlib(flag)
  return path


def render_png(reports: Any, *, extra: Sequence[Panel] = (), dpi: int = 100) -> bytes:
  """PNG bytes of one or several reports (``Report`` objects or their dicts), plus ``extra`` panels."""
  require_matplotlib()
  from matplotlib.figure import Figure
  reports = [_as_dict(r) for r in (reports if isinstance(reports, (list, tuple)) else [reports])]
  rows, cols = 4 + len(extra), len(reports)
  fig = Figure(figsize=(6.4 * cols, 2.7 * rows), dpi=dpi, layout="constrained")
  axes = fig.subplots(rows, cols, squeeze=False)
  for ax in axes.flat[: 4 * cols]:  # layers are integers
    ax.xaxis.get_major_locator().set_params(integer=True)
  for c, report in enumerate(reports):
    column = axes[:, c]
    header = (f"{_label(report['adapter'])}: {report['config']['method']}, {_label(report['source'])} → "
              f"{_label(report['target'])}")
    _module_lines(column[0], report, ("energy_target", "energy_source"), "energy captured (Σσ_r² / ‖W‖²)", header)
    _module_lines(column[1], report, ("overlap",), "subspace overlap")
    _module_lines(column[2], report, ("relative_update_target", "relative_update_source"), "‖ΔW‖ / ‖W‖")
    _coverage(column[3], report)
    for row, panel in enumerate(extra, start=4):
      _extra(column[row], panel)
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", metadata={"Software": None})  # no version string: same bytes on reruns
  return buffer.getvalue()


def save(reports: Any, file: str | os.PathLike[str], *, extra: Sequence[Panel] = ()) -> pathlib.Path:
  """Draws ``reports`` into ``file`` (.png), written atomically (temporary sibling, then rename)."""
  path = check_plot_path(file)
  return write_png(path, render_png(reports, extra=extra))


def write_png(file: str | os.PathLike[str], data: bytes) -> pathlib.Path:
  """Writes rendered bytes to ``file`` atomically (a reader sees the old picture or the new one); inside an
  ``adapter_io.transaction`` it is swapped in with the run's other outputs."""
  from crosslora_jax.formats import adapter_io  # pylint: disable=import-outside-toplevel
  return adapter_io.write_bytes_atomic(file, data, overwrite=True, flag="--plot")


def _label(name: str) -> str:
  """A Hub id as it is; a local folder by its own name (full paths crowd the title)."""
  return name if not os.path.isabs(name) else pathlib.PurePath(name).name


def _as_dict(report: Any) -> dict[str, Any]:
  return report.to_dict() if hasattr(report, "to_dict") else dict(report)


def _modules(report: Mapping[str, Any]) -> list[str]:
  return list(dict.fromkeys(e["module"] for e in report["entries"]))


def _module_lines(ax: Any, report: Mapping[str, Any], fields: Sequence[str], label: str, header: str = "") -> None:
  """One line per module across target layers: the first field solid, a second one dashed."""
  drawn = False
  colors = {}
  for m, module in enumerate(_modules(report)):
    for f, field in enumerate(fields):
      points = sorted((e["target_layer"], e[field]) for e in report["entries"]
                      if e["module"] == module and e.get(field) is not None)
      if not points:
        continue
      xs, ys = zip(*points)
      style = dict(color=colors.setdefault(module, f"C{m % 10}"), linestyle="-" if f == 0 else "--",
                   marker="." if len(xs) < 40 else None)
      ax.plot(xs, ys, label=module if f == 0 else None, **style)
      drawn = True
  ax.set_ylabel(label, fontsize=8)
  ax.set_xlabel("target layer", fontsize=8)
  note = f"solid: {fields[0].rsplit('_', 1)[-1]}, dashed: {fields[1].rsplit('_', 1)[-1]}" if len(fields) > 1 else ""
  title = "\n".join(t for t in (header, note) if t)
  if title:
    ax.set_title(title, fontsize=8)
  if not drawn:
    ax.text(0.5, 0.5, f"not measured by --method {report['config']['method']}", ha="center", va="center",
            transform=ax.transAxes, fontsize=8)
    return
  ax.legend(fontsize=6, ncol=4, loc="best")
  ax.grid(alpha=0.3)


def _coverage(ax: Any, report: Mapping[str, Any]) -> None:
  """Module x layer: transferred target weights, weights the guard zeroed, and skipped source modules."""
  modules = list(dict.fromkeys(_modules(report) + [s.get("module") for s in report["skipped"] if s.get("module")]))
  row = {m: i for i, m in enumerate(modules)}
  kinds = {"transferred": ([], [], "s", "0.6"), "zeroed by guard (target layer)": ([], [], "s", "C1"),
           "skipped (source layer)": ([], [], "x", "C3")}
  for e in report["entries"]:
    kind = "zeroed by guard (target layer)" if e.get("guard") == "skipped" else "transferred"
    kinds[kind][0].append(e["target_layer"]); kinds[kind][1].append(row[e["module"]])
  unplaced = 0
  for s in report["skipped"]:
    if s.get("module") in row and s.get("source_layer") is not None:
      kinds["skipped (source layer)"][0].append(s["source_layer"]); kinds["skipped (source layer)"][1].append(row[s["module"]])
    else:
      unplaced += 1
  for name, (xs, ys, marker, color) in kinds.items():
    if xs:
      ax.scatter(xs, ys, marker=marker, color=color, s=14, label=f"{name}: {len(xs)}")
  unmapped = [t for t, s in enumerate(report.get("layer_map") or []) if s is None]
  if unmapped:
    ax.scatter(unmapped, [-0.8] * len(unmapped), marker="|", color="C3", label=f"target layers with no source: {len(unmapped)}")
  ax.set_yticks(range(len(modules)), modules, fontsize=7)
  ax.set_xlabel("layer", fontsize=8)
  ax.set_title("transferred and skipped" + (f" ({unplaced} other tensors skipped, see the report)" if unplaced else ""),
               fontsize=8)
  if any(xs for xs, *_ in kinds.values()) or unmapped:
    ax.legend(fontsize=6, loc="best")


def _extra(ax: Any, panel: Panel) -> None:
  for name, (xs, ys) in panel.lines.items():
    ax.plot(list(xs), list(ys), label=name)
  ax.set_title(panel.title, fontsize=9)
  ax.set_xlabel(panel.x_label, fontsize=8)
  ax.set_ylabel(panel.y_label, fontsize=8)
  if panel.log_y:
    ax.set_yscale("log")
  if panel.lines:
    ax.legend(fontsize=7)
  ax.grid(alpha=0.3)


def main(argv: Sequence[str]) -> int:
  """``python -m crosslora_jax.plot REPORT.json FILE.png``: draws a saved --report (one or a list)."""
  if len(argv) != 2:
    print("usage: python -m crosslora_jax.plot REPORT.json FILE.png", file=sys.stderr)
    return 2
  try:
    try:
      reports = json.loads(pathlib.Path(argv[0]).read_text())
    except (OSError, ValueError) as e:
      raise CrossLoraError(f"{argv[0]}: a --report JSON file expected, got {type(e).__name__}: {e}.") from None
    try:
      listed = reports if isinstance(reports, list) else [reports]
      refined = all(isinstance(r, dict) and r.get("refine") for r in listed)
      if refined:  # a --refine run's report: its loss and held-back panels too
        from crosslora_jax.refine.batch import plot_panels
      save(reports, argv[1], extra=plot_panels(listed) if refined else ())
    except (KeyError, TypeError, AttributeError) as e:
      raise CrossLoraError(f"{argv[0]}: a --report JSON file expected, got one without {e}.") from None
  except CrossLoraError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {argv[1]}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
