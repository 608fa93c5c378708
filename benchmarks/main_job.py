"""Wall time of the README's main job on this machine, warm start included, from a clean workdir and cache.

    python -m benchmarks.main_job [--config arith_capo.gin] [--size tiny]

Runs ``python -m experiments.run --gin_file=experiments/configs/<config>`` in a fresh temporary workdir (and a fresh
warm-start cache, so the supervised warm start is timed too), then prints the start/final held-out accuracy and, as
the last line, ``main_job_wall_s=<seconds>``. ``--size`` is accepted for ``benchmarks.run_all`` and ignored.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="arith_capo.gin")
  parser.add_argument("--size", default="tiny")
  parser.add_argument("--keep", default=None, help="run root folder (default: a fresh temporary folder)")
  args = parser.parse_args()
  root = args.keep or tempfile.mkdtemp(prefix="capo-main-job-")
  workdir = os.path.join(root, "run")
  t0 = time.time()
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.run", f"--gin_file=experiments/configs/{args.config}",
       f"--workdir={workdir}", f"--cache_dir={os.path.join(root, 'cache')}"], cwd=REPO)
  wall = time.time() - t0
  if proc.returncode != 0:
    print(f"main job failed with exit status {proc.returncode}")
    return proc.returncode
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  evals = [r for r in rows if "eval_accuracy" in r]
  train = [r for r in rows if "reward_mean" in r]
  print(f"config={args.config} steps={len(train)} completions={train[-1]['completions']} "
        f"warm_start_eval_accuracy={evals[0]['eval_accuracy']:.3f} final_eval_accuracy={evals[-1]['eval_accuracy']:.3f}"
        f" mean_rejected_token_fraction={sum(r['rejected_token_fraction'] for r in train) / len(train):.4f}")
  print(f"main_job_wall_s={wall:.1f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
