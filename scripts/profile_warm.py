"""Profile of the README's CLI run with warm caches, and the subspace cache's checksum cost.

  python scripts/profile_warm.py cold       # fills --cache_dir (a cold run, minutes)
  python scripts/profile_warm.py warm       # cProfile of a warm run: the top functions by cumulative time
  python scripts/profile_warm.py checksum   # CRC-32 against sha256 over every cached entry, alternated

SmolLM2-135M -> Qwen2.5-Coder-0.5B with the shipped example adapter (scripts/fetch_models.py
puts the models in place). Profiles are for fractions, not speed figures, unless the machine is
quiet; the checksum ratio is measured side by side in one process.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pathlib
import pstats
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from crosslora_bench import zoo  # noqa: E402


def cli(work: pathlib.Path, out: str) -> None:
  from absl import app
  from crosslora_jax import transfer
  argv = ["transfer", "--source_model", str(zoo.fetch_model("smollm2-135m")),
          "--target_model", str(zoo.fetch_model("qwen2.5-coder-0.5b")),
          "--adapter", str(REPO / "examples" / "smollm2-pydoc-lora"), "--output", str(work / out), "--overwrite",
          "--cache_dir", str(work / "cache"), "--xla_cache_dir", str(work / "xla")]
  try:
    app.run(transfer.main, argv=argv)
  except SystemExit as e:
    if e.code:
      raise


def checksums(cache_dir: pathlib.Path, repeats: int = 5) -> str:
  from safetensors.numpy import load as st_load
  from crosslora_jax.core import cache
  blobs = [st_load(f.read_bytes()) for f in sorted(cache_dir.rglob("*.safetensors"))]
  total = sum(a.nbytes for b in blobs for a in b.values())
  best = {"crc32": float("inf"), "sha256": float("inf")}
  for _ in range(repeats):
    for kind in best:
      t0 = time.perf_counter()
      for b in blobs:
        cache._checksum("key", b, kind)
      best[kind] = min(best[kind], time.perf_counter() - t0)
  return (f"{len(blobs)} entries, {total / 2**20:.0f} MiB; min of {repeats}, alternated: crc32 {best['crc32']:.3f} s, "
          f"sha256 {best['sha256']:.3f} s; sha256 / crc32 {best['sha256'] / best['crc32']:.2f}")


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("mode", choices=("cold", "warm", "checksum"))
  p.add_argument("--work", default="/tmp/crosslora_profile_warm", help="outputs, subspace and XLA caches")
  p.add_argument("--top", type=int, default=40)
  args = p.parse_args()
  work = pathlib.Path(args.work)
  work.mkdir(parents=True, exist_ok=True)
  t0 = time.perf_counter()
  if args.mode == "checksum":
    print(checksums(work / "cache"))
  elif args.mode == "cold":
    cli(work, "cold")
  else:
    profile = cProfile.Profile()
    profile.runcall(cli, work, "warm")
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("cumulative").print_stats(args.top)
    print(text.getvalue())
  print(f"[{args.mode}] {time.perf_counter() - t0:.1f} s in process")
  return 0


if __name__ == "__main__":
  sys.exit(main())
