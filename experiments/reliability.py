"""Reproduces the table of docs/RELIABILITY.md: every fault and bad input tried, how many cases, what happened.

    python -m experiments.reliability [--root runs/reliability] [--seed 0] [--kill_points 10] [--corrupt_trials 8]

Runs, through ``python -m experiments.run`` (CPU, the tiny configuration of tests/test_trainer.py on
``ParityArith``, a few minutes on 2 cores):

- bad inputs: config values, gin files, flags, paths (``init_from`` folders, cache, workdir): exit 2, one line,
  the workdir left reusable;
- NaN injected at chosen steps (``--fault_nan_steps``): skipped updates, then divergence: exit 3, the last
  checkpoint intact and resumable;
- random bytes in the newest checkpoint's data files (seeded): exit 4 naming the file, ``--allow_fallback``
  resumes from the previous checkpoint;
- SIGKILL at seeded random points of every phase (``--fault_sigkill_at``), with ``metrics.jsonl`` shortened and
  deleted between the kills and a corrupted checkpoint on the way: the final rows equal an uninterrupted run's.

tests/test_reliability.py runs the same functions with assertions. ``ParityArith`` (registered with gin when this
module is imported) is the embedded arithmetic task with a reward that a barely trained policy earns about half the
time, so that every step moves the parameters and a resume has real optimizer state to get right.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
from typing import Any, Callable

import gin
import numpy as np

from capo_jax.tasks.arith import ArithTask

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHASES = ("setup", "rollout", "learner", "eval", "save")
_PHASE_ORDER = {p: i for i, p in enumerate(PHASES)}
EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_BAD_CHECKPOINT = 2, 3, 4
# Wall-clock fields (trainer.TIMING_KEYS): they differ between an interrupted and an uninterrupted run.
TIMING_KEYS = ("rollout_s", "learner_s", "eval_s", "step_s", "tokens_per_s", "wall_s")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ParityArith(ArithTask):
  """``ArithTask`` scored 1 for a completion of even length (a reward about half of any policy's samples earn)."""

  def score(self, completions, problems) -> np.ndarray:
    del problems
    return np.array([float(len(c) % 2 == 0) for c in completions], np.float32)


# The tiny configuration of tests/test_trainer.py, on ParityArith from a random initialisation (no warm start: the
# reward needs none): 6 steps, evaluation every 3, checkpoints every 2.
TINY = """
import experiments.reliability
TrainConfig.task = @ParityArith()
ParityArith.difficulty = 0
ParityArith.tokenizer_vocab_size = 512
PolicyConfig.hidden_size = 32
PolicyConfig.intermediate_size = 64
PolicyConfig.num_layers = 1
PolicyConfig.num_heads = 2
PolicyConfig.num_kv_heads = 1
WarmStartConfig.steps = 0
TrainConfig.num_steps = 6
RolloutConfig.prompts_per_step = 4
RolloutConfig.group_size = 4
RolloutConfig.max_new_tokens = 24
EvalConfig.every = 3
EvalConfig.num_problems = 8
EvalConfig.k = 2
CheckpointConfig.every = 2
OptimizerConfig.learning_rate = 1e-3
"""
NUM_STEPS, EVAL_EVERY, CHECKPOINT_EVERY = 6, 3, 2


def write_gin(folder: str, name: str, *, algorithm: str = "capo", extra: str = "") -> str:
  """A gin file ``<folder>/<name>.gin``: ``arith_<algorithm>.gin``, then ``TINY``, then ``extra``."""
  os.makedirs(folder, exist_ok=True)
  path = os.path.join(folder, f"{name}.gin")
  with open(path, "w") as f:
    f.write(f"include 'arith_{algorithm}.gin'\n{TINY}\n{extra}\n")
  return path


def environment(root: str) -> dict[str, str]:
  """The subprocesses' environment: CPU, the repo importable, a persistent XLA compilation cache under ``root``
  (every process after the first loads its executables instead of compiling them)."""
  return dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu",
              JAX_COMPILATION_CACHE_DIR=os.path.join(root, "jax_cache"),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def cli(args: list[str], env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
  """``python -m experiments.run *args`` from the repo root."""
  return subprocess.run([sys.executable, "-m", "experiments.run", *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=timeout)


def error_lines(stderr: str) -> list[str]:
  """The non-empty lines of a failed run's stderr (a user error must give exactly one, ``error: ...``)."""
  return [line for line in stderr.splitlines() if line.strip()]


def read_rows(workdir: str) -> list[dict[str, Any]]:
  from capo_jax.run_logging import read_metrics  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, "metrics.jsonl")
  return read_metrics(path) if os.path.exists(path) else []


def comparable(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
  return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def rows_differ(got: list[dict[str, Any]], want: list[dict[str, Any]], rel: float = 1e-6) -> str | None:
  """None when ``got`` equals ``want`` (timing fields aside; floats to ``rel``, NaN equal to NaN), else the first
  difference."""
  got, want = comparable(got), comparable(want)
  if len(got) != len(want):
    return f"{len(got)} rows vs {len(want)}"
  for i, (g, w) in enumerate(zip(got, want)):
    if g.keys() != w.keys():
      return f"row {i}: keys {sorted(set(g) ^ set(w))}"
    for k, wv in w.items():
      gv = g[k]
      if isinstance(wv, float) and isinstance(gv, (int, float)):
        if not (math.isclose(gv, wv, rel_tol=rel, abs_tol=rel) or (math.isnan(gv) and math.isnan(wv))):
          return f"row {i} (step {w.get('step')}): {k} = {gv} vs {wv}"
      elif gv != wv:
        return f"row {i} (step {w.get('step')}): {k} = {gv!r} vs {wv!r}"
  return None


# ---------------------------------------------------------------------------------------------------------------
# Bad inputs.


def make_model_folder(folder: str, *, vocab_size: int = 512, hidden_size: int = 32) -> str:
  """A small valid HF model folder (random weights, the arithmetic tokenizer) to damage in the path cases."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from capo_jax.config import PolicyConfig  # pylint: disable=g-import-not-at-top
  from capo_jax.models import CausalLM  # pylint: disable=g-import-not-at-top
  from capo_jax.models.hf import save_hf  # pylint: disable=g-import-not-at-top
  from capo_jax.tasks import build_arith_tokenizer  # pylint: disable=g-import-not-at-top
  tokenizer = build_arith_tokenizer(vocab_size=vocab_size)
  policy = PolicyConfig(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_layers=1, num_heads=2,
                        num_kv_heads=1)
  model = CausalLM(policy.architecture(len(tokenizer)), rngs=nnx.Rngs(0))
  save_hf(model, folder, tokenizer=tokenizer, overwrite=True)
  return folder


def _damaged_folders(root: str) -> dict[str, str]:
  """Model folders with one defect each: ``{case name: folder}``."""
  good = make_model_folder(os.path.join(root, "model_good"))
  out = {"init_from: missing folder": os.path.join(root, "no_such_model")}

  def copy(name):
    target = os.path.join(root, name)
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(good, target)
    return target

  folder = copy("model_no_tokenizer")
  os.remove(os.path.join(folder, "tokenizer.json"))
  out["init_from: no tokenizer.json"] = folder
  folder = copy("model_truncated")
  weights = os.path.join(folder, "model.safetensors")
  with open(weights, "r+b") as f:
    f.truncate(os.path.getsize(weights) // 2)
  out["init_from: truncated safetensors"] = folder
  folder = copy("model_wrong_shapes")
  config_path = os.path.join(folder, "config.json")
  with open(config_path) as f:
    config = json.load(f)
  config["intermediate_size"] = config["intermediate_size"] * 2
  with open(config_path, "w") as f:
    json.dump(config, f)
  out["init_from: shapes differ from config.json"] = folder
  folder = copy("model_no_config")
  os.remove(os.path.join(folder, "config.json"))
  out["init_from: no config.json"] = folder
  folder = copy("model_nan")
  from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top
  tensors = load_file(os.path.join(folder, "model.safetensors"))
  name = sorted(tensors)[0]
  tensors[name] = np.full_like(tensors[name], np.nan)
  save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "np"})
  out["init_from: NaN weights"] = folder
  return out


@dataclasses.dataclass
class BadInput:
  name: str
  args: list[str]  # flags after --gin_file/--workdir/--cache_dir
  expect: str  # a substring the one error line must hold
  gin_file: str | None = None  # None: the tiny GRPO file
  workdir: str | None = None  # None: a fresh folder per case
  cache_dir: str | None = None


def bad_inputs(root: str, cache_dir: str) -> list[BadInput]:
  """The bad-input cases: config values (each validated at construction), gin files and flags, paths."""
  p = lambda binding: [f"--gin_param={binding}"]  # pylint: disable=unnecessary-lambda-assignment
  cases = [
      BadInput("group_size=1", p("RolloutConfig.group_size=1"), "RolloutConfig.group_size"),
      BadInput("tau_fisher=0", p("CurvatureConfig.tau_fisher=0"), "CurvatureConfig.tau_fisher"),
      BadInput("tau_fisher=-1", p("CurvatureConfig.tau_fisher=-1.0"), "CurvatureConfig.tau_fisher"),
      BadInput("temperature='hot'", p("RolloutConfig.temperature='hot'"), "RolloutConfig.temperature"),
      BadInput("temperature=0", p("RolloutConfig.temperature=0.0"), "RolloutConfig.temperature"),
      BadInput("num_steps=2.5", p("TrainConfig.num_steps=2.5"), "TrainConfig.num_steps"),
      BadInput("top_p=0", p("RolloutConfig.top_p=0.0"), "RolloutConfig.top_p"),
      BadInput("eval num_problems=0", p("EvalConfig.num_problems=0"), "EvalConfig.num_problems"),
      BadInput("learning_rate='abc'", p("OptimizerConfig.learning_rate='abc'"), "OptimizerConfig.learning_rate"),
      BadInput("learning_rate=1e999", p("OptimizerConfig.learning_rate=1e999"), "OptimizerConfig.learning_rate"),
      BadInput("learning_rate=1e10", p("OptimizerConfig.learning_rate=1e10"), "OptimizerConfig.learning_rate"),
      BadInput("adam eps=0", p("OptimizerConfig.eps=0.0"), "OptimizerConfig.eps"),
      BadInput("adam b1=1", p("OptimizerConfig.b1=1.0"), "OptimizerConfig.b1"),
      BadInput("dual_clip=1", p("LossConfig.dual_clip=1.0"), "LossConfig.dual_clip"),
      BadInput("tis_cap with 2 passes", p("LossConfig.tis_cap=2.0") + p("OptimizerConfig.num_iterations=2"),
               "tis_cap"),
      BadInput("max_consecutive_skips=0", p("ReliabilityConfig.max_consecutive_skips=0"),
               "ReliabilityConfig.max_consecutive_skips"),
      BadInput("misspelt binding", p("OptimizerConfig.learning_rat=1e-3"), "learning_rat"),
      BadInput("malformed binding", p("OptimizerConfig.learning_rate=("), "bad gin config"),
      BadInput("missing gin file", [], "gin file not found", gin_file="no_such.gin"),
      BadInput("bad --fault_sigkill_at", ["--fault_sigkill_at=compile"], "fault_sigkill_at"),
  ]
  for name, folder in _damaged_folders(os.path.join(root, "models")).items():
    expect = {"init_from: missing folder": "not a folder", "init_from: no tokenizer.json": "tokenizer.json",
              "init_from: truncated safetensors": "truncated", "init_from: shapes differ from config.json": "shape",
              "init_from: no config.json": "config.json", "init_from: NaN weights": "NaN"}[name]
    cases.append(BadInput(name, p(f"PolicyConfig.init_from='{folder}'"), expect))
  blocker = os.path.join(root, "a_file")
  with open(blocker, "w") as f:
    f.write("not a folder")
  cases.append(BadInput("workdir under a file", [], "workdir", workdir=os.path.join(blocker, "run")))
  cases.append(BadInput("cache dir under a file (a read-only cache)", [], "cache dir",
                        cache_dir=os.path.join(blocker, "cache")))
  return cases


def run_bad_inputs(root: str, cache_dir: str, runner: Callable[[list[str]], tuple[int, str]],
                   gin_file: str) -> list[dict[str, Any]]:
  """Runs every ``bad_inputs`` case through ``runner(args) -> (exit status, stderr)``; one result dict per case
  (name, rc, the error lines, whether they hold ``expect``, whether the workdir stayed reusable: no config.gin, no
  checkpoints)."""
  results = []
  for i, case in enumerate(bad_inputs(root, cache_dir)):
    workdir = case.workdir or os.path.join(root, "bad_input_runs", f"case{i}")
    args = [f"--gin_file={case.gin_file or gin_file}", f"--workdir={workdir}",
            f"--cache_dir={case.cache_dir or cache_dir}", *case.args]
    rc, stderr = runner(args)
    lines = error_lines(stderr)
    clean = not (os.path.exists(os.path.join(workdir, "config.gin"))
                 or os.path.exists(os.path.join(workdir, "checkpoints")))
    results.append({"name": case.name, "rc": rc, "lines": lines, "expected": case.expect,
                    "ok": rc == EXIT_BAD_INPUT and len(lines) == 1 and lines[0].startswith("error: ")
                    and case.expect in lines[0] and "Traceback" not in stderr and clean,
                    "workdir_reusable": clean})
  return results


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint corruption.


def data_files(checkpoint: str) -> list[str]:
  """The array data files of an Orbax checkpoint folder (``state/**/d/*``)."""
  out = []
  for folder, _, files in os.walk(os.path.join(checkpoint, "state")):
    if os.path.basename(folder) == "d":
      out.extend(os.path.join(folder, f) for f in files)
  return sorted(out)


def write_random_bytes(path: str, rng: random.Random, count: int = 16) -> int:
  """Overwrites ``count`` bytes of ``path`` at a random offset with random bytes (never a no-op); returns the
  offset."""
  with open(path, "r+b") as f:
    data = bytearray(f.read())
    offset = rng.randrange(max(len(data) - count, 1))
    old = bytes(data[offset:offset + count])
    new = old
    while new == old:
      new = bytes(rng.randrange(256) for _ in range(len(old)))
    f.seek(offset)
    f.write(new)
  return offset


# ---------------------------------------------------------------------------------------------------------------
# SIGKILL at seeded points of every phase.


@dataclasses.dataclass
class KillPoint:
  phase: str
  offset: int  # which occurrence of the phase after the resume point (1: the next one)
  delay: float  # seconds between the phase's start and the SIGKILL

  def target(self, resumed_from: int | None) -> int:
    """The step whose ``phase`` arms the kill, for a process that resumes from checkpoint ``resumed_from``."""
    start = resumed_from or 0
    if self.phase == "setup":
      return 0
    if self.phase in ("rollout", "learner"):
      return min(start + self.offset, NUM_STEPS)
    every = EVAL_EVERY if self.phase == "eval" else CHECKPOINT_EVERY
    steps = sorted({s for s in range(every, NUM_STEPS + 1, every)} | {NUM_STEPS})
    steps = [s for s in steps if s > start]
    if self.phase == "eval" and resumed_from is None:
      steps = [0] + steps
    return steps[min(self.offset, len(steps)) - 1]


def kill_plan(seed: int, count: int) -> list[KillPoint]:
  """``count`` kill points, every phase ``count // 5`` or more times, in a seeded order: ``setup`` kills after
  0–6 s (loading, restoring, tracing and compiling, first steps), the others 0–50 ms into their phase (the first
  rollout, learner and evaluation of a process compile, so those kills land in compilation too)."""
  rng = random.Random(seed)
  phases = [PHASES[i % len(PHASES)] for i in range(count)]
  rng.shuffle(phases)
  return [KillPoint(p, rng.randint(1, 2), rng.uniform(0.0, 6.0) if p == "setup" else rng.uniform(0.0, 0.05))
          for p in phases]


def first_call(spec: str, resumed_from: int | None) -> bool:
  """Whether a ``--fault_sigkill_at`` spec arms the kill at the process's first rollout, learner step or evaluation
  (which compile; a ``setup`` kill lands in loading, restoring or tracing, or later)."""
  phase, step = spec.split(":")[0], int(spec.split(":")[1])
  start = resumed_from or 0
  if phase in ("rollout", "learner"):
    return step == start + 1
  if phase == "eval":
    return step == 0 or (resumed_from is not None and step == min(s for s in (*range(EVAL_EVERY, NUM_STEPS + 1,
                                                                                        EVAL_EVERY), NUM_STEPS)
                                                                   if s > start))
  return False


def _latest(workdir: str) -> int | None:
  folder = os.path.join(workdir, "checkpoints")
  steps = sorted(int(n) for n in os.listdir(folder) if n.isdigit()) if os.path.isdir(folder) else []
  return steps[-1] if steps else None


def _steps(workdir: str) -> list[int]:
  folder = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(folder) if n.isdigit()) if os.path.isdir(folder) else []


def _has_manifest(workdir: str, step: int) -> bool:
  return os.path.isfile(os.path.join(workdir, "checkpoints", str(step), "capo_manifest.json"))


def run_kill_chain(workdir: str, gin_file: str, cache_dir: str, env: dict[str, str], *, seed: int,
                   count: int) -> dict[str, Any]:
  """Kills one run ``count`` times (``kill_plan``), mutating it on the way, then lets it finish.

  Before the 4th process ``metrics.jsonl`` is cut to 60 % of its bytes (mid-line), before the 7th it is deleted;
  from the 9th on, once two checkpoints exist, random bytes go into a data file of the newest, a plain rerun must
  exit 4 and the next process runs with ``--allow_fallback`` (when two checkpoints never coexist this is done after
  the chain, on checkpoint 6). Each mutation waits for a newest checkpoint with a manifest (complete, with its
  metrics copy). Returns ``{"kills": [...], "mutations": [...], "final": CompletedProcess, "rows": [...]}``.
  """
  rng = random.Random(seed + 1)
  common = [f"--gin_file={gin_file}", f"--workdir={workdir}", f"--cache_dir={cache_dir}"]
  kills, mutations = [], []
  pending = {"shorten": 3, "delete": 6, "corrupt": 8}
  fallback_next = False

  def corrupt_newest(label: str) -> None:
    newest = _latest(workdir)
    target = rng.choice(data_files(os.path.join(workdir, "checkpoints", str(newest))))
    write_random_bytes(target, rng)
    refused = cli(common, env)
    mutations.append({"what": f"random bytes in checkpoint {newest} ({label})", "file": target,
                      "rc": refused.returncode, "lines": error_lines(refused.stderr)})

  for i, point in enumerate(kill_plan(seed, count)):
    latest = _latest(workdir)
    ready = latest is not None and _has_manifest(workdir, latest)
    metrics = os.path.join(workdir, "metrics.jsonl")
    if "shorten" in pending and i >= pending["shorten"] and ready and os.path.exists(metrics):
      size = os.path.getsize(metrics)
      with open(metrics, "r+b") as f:
        f.truncate(int(size * 0.6))
      mutations.append({"what": f"metrics.jsonl cut from {size} to {int(size * 0.6)} bytes"})
      del pending["shorten"]
    elif "delete" in pending and i >= pending["delete"] and ready and os.path.exists(metrics):
      os.remove(metrics)
      mutations.append({"what": "metrics.jsonl deleted"})
      del pending["delete"]
    elif "corrupt" in pending and i >= pending["corrupt"] and ready and len(_steps(workdir)) >= 2:
      corrupt_newest("inside the chain")
      del pending["corrupt"]
      fallback_next = True
    spec = f"{point.phase}:{point.target(latest)}:{point.delay:.3f}"
    t0 = time.time()
    proc = cli(common + [f"--fault_sigkill_at={spec}"] + (["--allow_fallback"] if fallback_next else []), env)
    kills.append({"spec": spec, "resumed_from": latest, "rc": proc.returncode, "seconds": time.time() - t0,
                  "fallback": fallback_next, "stderr": proc.stderr[-2000:]})
    fallback_next = False
  final = cli(common, env)
  if "corrupt" in pending and final.returncode == 0:
    corrupt_newest("after the chain")
    final = cli(common + ["--allow_fallback"], env)
  rejected = os.path.join(workdir, "rejected_checkpoints")
  result = {"kills": kills, "mutations": mutations, "final": final, "rows": read_rows(workdir),
            "rejected": sorted(os.listdir(rejected)) if os.path.isdir(rejected) else []}
  with open(os.path.join(os.path.dirname(workdir), "kill_chain.json"), "w") as f:
    json.dump({k: v for k, v in result.items() if k in ("kills", "mutations", "rejected")}, f, indent=1)
  return result


# ---------------------------------------------------------------------------------------------------------------
# The table.


def _nan_and_divergence(root: str, cache_dir: str, env: dict[str, str]) -> dict[str, Any]:
  """GRPO without the τ = ∞ monitor (a NaN advantage reaches the loss): NaN at steps 2, 4, 5 with
  ``max_consecutive_skips = 2``, then a plain rerun."""
  gin_file = write_gin(root, "nan_grpo", algorithm="grpo",
                       extra="CurvatureConfig.monitor = False\nReliabilityConfig.max_consecutive_skips = 2")
  workdir = os.path.join(root, "nan_run")
  common = [f"--gin_file={gin_file}", f"--workdir={workdir}", f"--cache_dir={cache_dir}"]
  diverged = cli(common + ["--fault_nan_steps=2,4,5"], env)
  rows = read_rows(workdir)
  checkpoints = _steps(workdir)
  resumed = cli(common, env)
  return {"diverged": diverged, "rows": rows, "checkpoints": checkpoints, "resumed": resumed,
          "resumed_rows": read_rows(workdir)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--root", default="runs/reliability")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--kill_points", type=int, default=10)
  parser.add_argument("--corrupt_trials", type=int, default=8)
  args = parser.parse_args()
  root = os.path.abspath(args.root)
  shutil.rmtree(root, ignore_errors=True)
  os.makedirs(root)
  env = environment(root)
  cache_dir = os.path.join(root, "cache")
  table = []

  def add(fault: str, cases: int, result: str) -> None:
    result = result.replace(root, "<root>")
    table.append((fault, cases, result))
    print(f"| {fault} | {cases} | {result} |", flush=True)

  print("| fault or bad input | cases | what happened |\n|---|---|---|", flush=True)
  reference_gin = write_gin(root, "tiny_grpo", algorithm="grpo")
  reference = cli([f"--gin_file={reference_gin}", f"--workdir={os.path.join(root, 'reference')}",
                   f"--cache_dir={cache_dir}"], env)
  if reference.returncode != 0:
    raise SystemExit(f"the reference run failed:\n{reference.stderr[-3000:]}")
  want = read_rows(os.path.join(root, "reference"))

  results = run_bad_inputs(root, cache_dir, lambda a: (lambda p: (p.returncode, p.stderr))(cli(a, env)),
                           reference_gin)
  for r in results:
    line = (r["lines"][0] if r["lines"] else "").replace(root, "<root>")
    add(f"bad input: {r['name']}", 1, ("exit 2, one line: " if r["ok"] else "UNEXPECTED: ") + f"`{line}`"
        + ("" if r["workdir_reusable"] else " (workdir not reusable)"))
  case = [r["name"] for r in results].index("init_from: missing folder")
  failed_workdir = os.path.join(root, "bad_input_runs", f"case{case}")
  corrected = cli([f"--gin_file={reference_gin}", f"--workdir={failed_workdir}", f"--cache_dir={cache_dir}",
                   "--gin_param=TrainConfig.num_steps=1"], env)
  add("the corrected rerun in the workdir of a failed start (init_from missing)", 1,
      f"exit {corrected.returncode}, {len(read_rows(failed_workdir))} rows")

  nan = _nan_and_divergence(root, cache_dir, env)
  skipped = [r["step"] for r in nan["rows"] if r.get("skipped_nonfinite")]
  add("NaN loss injected at steps 2, 4, 5 (max_consecutive_skips = 2)", 1,
      f"steps {skipped} skipped (loss NaN in the row and on the console), exit {nan['diverged'].returncode} at step "
      f"5: `{error_lines(nan['diverged'].stderr)[-1][:160]}…`; checkpoints {nan['checkpoints']} finite; the plain "
      f"rerun exit {nan['resumed'].returncode}, {len(nan['resumed_rows'])} rows")

  # Random bytes in the newest checkpoint's data files, through the CLI, each on a fresh copy of the reference run.
  rng = random.Random(args.seed)

  def corrupted_copy(name: str, keep_manifest: bool) -> tuple[str, str]:
    workdir = os.path.join(root, name)
    shutil.copytree(os.path.join(root, "reference"), workdir)
    if not keep_manifest:  # resume from checkpoint 4 (not the final one), so a resumed run recomputes steps 5–6
      shutil.rmtree(os.path.join(workdir, "checkpoints", str(NUM_STEPS)))
    newest = os.path.join(workdir, "checkpoints", str(_latest(workdir)))
    if not keep_manifest:  # a checkpoint as an earlier version wrote it: only state_sha256 can tell
      os.remove(os.path.join(newest, "capo_manifest.json"))
    target = rng.choice(data_files(newest))
    write_random_bytes(target, rng)
    return workdir, target

  common = lambda workdir: [f"--gin_file={reference_gin}", f"--workdir={workdir}",  # pylint: disable=g-long-lambda
                            f"--cache_dir={cache_dir}"]
  named = 0
  for trial in range(args.corrupt_trials):
    workdir, target = corrupted_copy(f"corrupt{trial}", keep_manifest=True)
    proc = cli(common(workdir), env)
    lines = error_lines(proc.stderr)
    named += proc.returncode == EXIT_BAD_CHECKPOINT and len(lines) == 1 and target in lines[0]
  add("random bytes in a data file of the newest checkpoint", args.corrupt_trials,
      f"{named} refused with exit 4 and one line naming the checkpoint and the file (and --allow_fallback)")
  workdir, _ = corrupted_copy("corrupt_fallback", keep_manifest=True)
  proc = cli(common(workdir) + ["--allow_fallback"], env)
  diff = rows_differ(read_rows(workdir), want)
  add("the same, rerun with --allow_fallback", 1,
      f"exit {proc.returncode}: checkpoint moved to rejected_checkpoints/, resumed from the previous one, rows "
      + ("equal to the uninterrupted run's" if diff is None else f"DIFFER: {diff}"))
  legacy = {"detected": 0, "equal": 0, "wrong": 0}
  for trial in range(4):
    workdir, _ = corrupted_copy(f"corrupt_legacy{trial}", keep_manifest=False)
    proc = cli(common(workdir), env)
    if proc.returncode == EXIT_BAD_CHECKPOINT:
      legacy["detected"] += 1
    else:
      legacy["equal" if rows_differ(read_rows(workdir), want) is None else "wrong"] += 1
  add("the same on a checkpoint without its manifest (as an earlier version wrote them)", 4,
      f"{legacy['detected']} refused (Orbax's read or state_sha256), {legacy['equal']} restored bit-exact (the "
      f"damaged bytes are not read), {legacy['wrong']} restored wrong")

  chain = run_kill_chain(os.path.join(root, "killed"), reference_gin, cache_dir, env, seed=args.seed,
                         count=args.kill_points)
  killed = sum(k["rc"] == -9 for k in chain["kills"])
  diff = rows_differ(chain["rows"], want)
  specs = [k["spec"] + (" [compiling]" if first_call(k["spec"], k["resumed_from"]) else "") for k in chain["kills"]]
  specs = [s + f" from {k['resumed_from'] or 'start'}" for s, k in zip(specs, chain["kills"])]
  add("SIGKILL at seeded points: PHASE:STEP:DELAY_S (" + ", ".join(specs) + ")", len(chain["kills"]),
      f"{killed} killed; mutations: " + "; ".join(m["what"] + (f" → exit {m['rc']}" if "rc" in m else "")
                                                 for m in chain["mutations"])
      + f"; final exit {chain['final'].returncode}, rows " + ("equal to the uninterrupted run's" if diff is None
                                                              else f"DIFFER: {diff}"))


if __name__ == "__main__":
  main()
