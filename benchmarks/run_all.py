"""Runs every benchmark in `benchmarks/` that exists, each in its own process, forwarding --size.

    python -m benchmarks.run_all --size tiny
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys

BENCHMARKS = ("benchmarks.sampler", "benchmarks.sampler_mesh", "benchmarks.learner_step", "benchmarks.compile_time",
              "benchmarks.main_job")


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", default="tiny")
  args = parser.parse_args()
  status = 0
  for module in BENCHMARKS:
    if importlib.util.find_spec(module) is None:
      continue
    print(f"== {module} --size {args.size}", flush=True)
    status |= subprocess.call([sys.executable, "-m", module, "--size", args.size])
  return status


if __name__ == "__main__":
  sys.exit(main())
