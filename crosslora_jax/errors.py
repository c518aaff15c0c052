"""The one exception type a user sees.

Every problem with the user's input (a file, a key, a flag) is raised as
:class:`CrossLoraError` with a message of the form
``<file or key>: <what> expected <expected>, got <actual>. <fix>``. The command
line turns it into one line on stderr and exit status 2.
"""

from __future__ import annotations


class CrossLoraError(ValueError):
  """Bad input that the user can fix; the message says where and how."""


def collect_and_raise(problems: list[str], header: str | None = None) -> None:
  """Raises one CrossLoraError naming every problem (checks collect, then raise once)."""
  if not problems:
    return
  if len(problems) == 1 and header is None:
    raise CrossLoraError(problems[0])
  lines = problems[:10]
  more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
  prefix = f"{header}: " if header else ""
  raise CrossLoraError(prefix + "; ".join(lines) + more)
