"""Fetches and converts the real base models (crosslora_bench.zoo); prints one folder per line.

  python scripts/fetch_models.py                        # smollm2-135m, qwen2.5-coder-0.5b, gemma3-270m
  python scripts/fetch_models.py --models gemma3-270m
  python scripts/fetch_models.py --with_1_5b            # also qwen2.5-coder-1.5b (1.1 GB download)

Progress goes to stderr; on failure one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from crosslora_bench import zoo  # pylint: disable=wrong-import-position


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default=",".join(zoo.DEFAULT_MODELS),
                      help=f"comma-separated names from: {', '.join(zoo.MODELS)}")
  parser.add_argument("--with_1_5b", action="store_true", help="also fetch qwen2.5-coder-1.5b")
  parser.add_argument("--cache_dir", default=None,
                      help=f"cache root (default ${zoo.CACHE_ENV} or ~/.cache/crosslora_jax)")
  parser.add_argument("--threads", type=int, default=2, help="torch threads for the conversion")
  args = parser.parse_args(argv)
  names = [n.strip() for n in args.models.split(",") if n.strip()]
  if args.with_1_5b and "qwen2.5-coder-1.5b" not in names:
    names.append("qwen2.5-coder-1.5b")
  try:
    for name in names:
      zoo.get_spec(name)
    for name in names:
      print(zoo.fetch_model(name, cache_dir=args.cache_dir, num_threads=args.threads), flush=True)
  except zoo.ZooError as e:
    print(f"fetch_models: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
