"""Teacher sampling time against prompts per sampling call (``refine.runtime.SAMPLE_ROWS``).

  python scripts/bench_teacher_rows.py                       # SmolLM2-135M + the shipped adapter
  python scripts/bench_teacher_rows.py --rows 32,64 --samples 64

Samples ``--samples`` continuations of ``--new`` tokens from the separator token alone, as refine's
teacher does (temperature 1.0, top-p 0.95, EOS honoured), once per rows setting, in one process one
after the other. Each setting is timed twice: the first call (compile included) and a second
call with another seed (steady state). Writes results/teacher_rows.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from crosslora_bench import zoo  # noqa: E402
from bench_quality import EXAMPLE_ADAPTER, MODELS  # noqa: E402


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="smollm2", help="teacher short name (" + ", ".join(MODELS) + "); smollm2 gets the shipped adapter")
  p.add_argument("--rows", default="32,64,128", help="comma list of prompts per sampling call")
  p.add_argument("--samples", type=int, default=128, help="continuations to write (refine's default budget writes 64)")
  p.add_argument("--new", type=int, default=96, help="new tokens per continuation (RefineConfig.sample_tokens)")
  p.add_argument("--out", default=str(REPO / "results"))
  args = p.parse_args(argv)
  from crosslora_jax.refine import runtime
  folder = zoo.fetch_model(MODELS[args.model])
  teacher = runtime.load_lm(folder, EXAMPLE_ADAPTER if args.model == "smollm2" else None, "float32")
  tok = teacher.tokenizer
  separator = tok.bos_id if tok.bos_id is not None else tok.eos_id
  prompts = [[separator]] * args.samples
  rows_list = [int(r) for r in args.rows.split(",")]
  table = []
  for rows in rows_list:
    runtime.SAMPLE_ROWS = rows
    times, tokens = [], 0
    for seed in (0, 1):
      t0 = time.perf_counter()
      out = runtime.generate(teacher, prompts, max_new_tokens=args.new, temperature=1.0, top_p=0.95, seed=seed,
                             eos_ids=list(tok.eos_ids), progress=False)
      times.append(time.perf_counter() - t0)
      tokens = sum(len(o) for o in out)
    table.append({"rows": rows, "first_s": times[0], "steady_s": times[1], "tokens_steady": tokens,
                  "tokens_per_s": tokens / times[1]})
    print(f"rows {rows:4d}: first {times[0]:6.1f} s, steady {times[1]:6.1f} s ({tokens / times[1]:6.1f} tokens/s)", flush=True)
  ref = table[0]["steady_s"]
  print(f"\nteacher {args.model}, {args.samples} samples x {args.new} new tokens, T 1.0, top-p 0.95")
  print(f"{'rows':>6} {'first s':>8} {'steady s':>9} {'vs ' + str(rows_list[0]):>8}")
  for r in table:
    print(f"{r['rows']:>6} {r['first_s']:>8.1f} {r['steady_s']:>9.1f} {r['steady_s'] / ref:>8.2f}")
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "teacher_rows.json").write_text(json.dumps({"model": args.model, "samples": args.samples, "new": args.new,
                                                     "date": time.strftime("%Y-%m-%d"), "rows": table}, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
