"""What both peer scripts share: their command line and the prompt records they read (docs/PERFORMANCE.md, "Peers").

Plain Python, importable in the peers' scratch environments (no capo_jax there).
"""

import argparse
import json


def args_and_records(*extra_flags: tuple[str, int]) -> tuple[argparse.Namespace, list[dict]]:
  """The parsed command line (``benchmarks.peers`` passes --model, --prompts, --steps, --out and the shape flags;
  ``extra_flags``: further ``(flag, default)`` integer options) and the first ``steps × prompts_per_step`` records of
  the --prompts JSONL file, in order."""
  parser = argparse.ArgumentParser()
  parser.add_argument("--model", required=True)
  parser.add_argument("--prompts", required=True)
  parser.add_argument("--steps", type=int, required=True)
  parser.add_argument("--prompts-per-step", type=int, default=16)
  parser.add_argument("--num-generations", type=int, default=8)
  parser.add_argument("--max-new-tokens", type=int, default=32)
  for flag, default in extra_flags:
    parser.add_argument(flag, type=int, default=default)
  parser.add_argument("--out", required=True)
  args = parser.parse_args()
  with open(args.prompts) as f:
    records = [json.loads(line) for line in f][:args.steps * args.prompts_per_step]
  return args, records
