"""The one exception type a user sees, and the one place error text is made safe to print.

Every problem with the user's input (a file, a key, a flag) is raised as
:class:`CrossLoraError` with a message of the form
``<file or key>: <what> expected <expected>, got <actual>. <fix>``. The command
line turns it into one line on stderr and exit status 2.

Messages echo names taken from the input (tensor names, paths, JSON values), and
those may hold newlines or terminal escapes; :func:`one_line` escapes them so that a
message is always exactly one printable line (nobody parsing stderr can be fed a
forged second ``error:`` line).
"""

from __future__ import annotations

import re

# C0 and C1 control characters, DEL, and the Unicode line/paragraph separators that
# str.splitlines() also breaks on.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_MAX_MESSAGE = 2000  # characters: a hostile 1 MB key name must not become a 1 MB error line


def one_line(text: str, *, limit: int = _MAX_MESSAGE) -> str:
  """``text`` with every control character escaped (``\\n``, ``\\x1b``) and cut to ``limit``."""
  escaped = _UNPRINTABLE.sub(lambda m: repr(m.group())[1:-1], str(text))
  if len(escaped) > limit:
    escaped = escaped[:limit] + f"... ({len(escaped) - limit} more characters)"
  return escaped


class CrossLoraError(ValueError):
  """Bad input that the user can fix; the message says where and how (always one line)."""

  def __init__(self, message: object = ""):
    super().__init__(one_line(str(message)))


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
