"""A sweep over methods × learning rates × seeds at an equal budget of completions (issue 6).

    python -m experiments.sweep --methods grpo,capo,trust_region --lrs 1e-4,5e-4 --seeds 0,1,2 \\
        --root runs/sweep-mini [--parallel 2] [--prompts_per_step 16 --group_size 8 --num_steps 60] \\
        [--gin_param EvalConfig.every=10 ...]

    python -m experiments.sweep --runs kl_target@5e-4,grpo@1e-4,grpo@2e-4 --seeds 0,1,2 --root ... --parallel 2

Every (method, lr, seed) is one ``python -m experiments.run`` subprocess with its own workdir
``<root>/<method>/lr<lr>/seed<seed>`` and one shared warm-start cache ``<root>/cache`` (all methods of one seed share
one warm start). At most ``--parallel`` run at once; while a seed's warm start is being built, no second run of that
seed starts (it would build the same warm start again). With ``--parallel`` > 1 every run is pinned to its own share
of the CPUs (``cpu_lanes``), so that the runs' XLA thread pools do not oversubscribe the cores; and the runs share
JAX's persistent compilation cache ``<cache_dir>/jax-compilation`` (runs of one shape compile once).

Resumable: a finished run (its ``metrics.jsonl`` holds the eval row of the final step) is skipped; an unfinished one is
rerun with the same command and resumes from its latest checkpoint. Equal budget: every run gets the same
``prompts_per_step × group_size × num_steps`` completions; a preset or ``--gin_param`` that changes one of those fields
is refused. ``<root>/manifest.json`` records every run's exact command, status, exit code and wall time, and every
invocation of the sweep.

A method is a named preset: a gin file from ``experiments/configs`` plus bindings (``PRESETS``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import fcntl
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from typing import Sequence

from capo_jax.run_logging import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The trust region's per-step budget δ on the predicted mean KL: the median predicted KL of a stable run
# (docs/MATH.md §5). Measured once on this task (GRPO, 16×8, lr 1e-4, seed 0, δ = ∞ so nothing was scaled): median
# predicted KL over steps 1–20 = 5.3e-4 (p10 2.3e-4, p90 1.4e-3). Overridable with --trust_region_kl.
DEFAULT_TRUST_REGION_KL = 5e-4

_TRUST_REGION = ("CurvatureConfig.step_control='trust_region'", "CurvatureConfig.max_kl={tr_kl}")

# The learning rate at which the released CAPO τ's are taken as calibrated, for the η-scaled preset: at lr η,
# τ_H = 1e-2 · (η / η_ref) and τ_F = 1e-4 · (η / η_ref)², the exponents m_H ∝ η and m_F ∝ η² that the first-step
# quantiles follow (docs/results/RESULTS_MINI.md), so the mask rejects the same tokens at every η.
TAU_REFERENCE_LR = 1e-4

# name → (gin file, extra bindings). "{tr_kl}" is replaced by --trust_region_kl, "{tau_h_eta}" / "{tau_f_eta}" by the
# run's η-scaled τ's (TAU_REFERENCE_LR).
PRESETS: dict[str, tuple[str, tuple[str, ...]]] = {
    "grpo": ("arith_grpo.gin", ()),
    "drgrpo": ("arith_drgrpo.gin", ()),
    "reinforce": ("arith_reinforce.gin", ()),
    "rloo": ("arith_grpo.gin", ("LossConfig.advantage_estimator='rloo'", "TrainConfig.name='rloo'")),
    "capo": ("arith_capo.gin", ()),
    "drcapo": ("arith_drcapo.gin", ()),
    "reincapo": ("arith_reincapo.gin", ()),
    # GRPO with the curvature trust region on the whole step (docs/MATH.md §5).
    "trust_region": ("arith_grpo.gin", (*_TRUST_REGION, "TrainConfig.name='trust_region'")),
    # CAPO's last-layer mask and the trust region together.
    "capo_trust_region": ("arith_capo.gin", (*_TRUST_REGION, "TrainConfig.name='capo_trust_region'")),
    # CAPO's token mask (released τ) from the full-network directional model along the chain's proposal
    # (docs/MATH.md §4): m_H by jvp∘jvp and both rules, or one jvp and the Fisher rule only.
    "capo_fullnet": ("arith_capo.gin", ("CurvatureConfig.mode='full_network'", "CurvatureConfig.second_order=True",
                                        "TrainConfig.name='capo_fullnet'")),
    "capo_fullnet_fisher": ("arith_capo.gin", ("CurvatureConfig.mode='full_network'",
                                               "CurvatureConfig.second_order=False",
                                               "TrainConfig.name='capo_fullnet_fisher'")),
    # CAPO with the τ's scaled to the learning rate ("{tau_h_eta}", "{tau_f_eta}": see TAU_REFERENCE_LR).
    "capo_eta": ("arith_capo.gin", ("CurvatureConfig.tau_hessian={tau_h_eta}", "CurvatureConfig.tau_fisher={tau_f_eta}",
                                    "TrainConfig.name='capo_eta'")),
    # GRPO with the curvature-controlled step size (docs/MATH.md §7): s = clip(√(δ / KL̂), 0, s_max), δ and s_max
    # from algorithms/kl_target.gin (its own δ, not --trust_region_kl: a target, not a ceiling).
    "kl_target": ("arith_kl_target.gin", ()),
    # The same rule with δ = 5e-4, about the predicted KL of a GRPO step at lr 1e-4 on the task with RL headroom
    # (docs/RESULTS.md): lr-free GRPO at that rate, where the preset's δ = 2e-3 corresponds to about 2e-4.
    "kl_target_low": ("arith_kl_target.gin", ("CurvatureConfig.max_kl=5e-4", "TrainConfig.name='kl_target_low'")),
    # GRPO with Theorem 5.1 acceptance of the prompt groups (docs/MATH.md §3), default δ_H = 0, no KL bound.
    "subset": ("arith_grpo.gin", ("CurvatureConfig.mode='subset'", "TrainConfig.name='subset'")),
    # The same with the theorem's KL condition: a group is also refused when its own step's predicted mean KL
    # exceeds δ_F = the trust region's δ (the median predicted KL of a stable GRPO step, measured as noted above).
    "subset_kl": ("arith_grpo.gin", ("CurvatureConfig.mode='subset'", "CurvatureConfig.subset_delta_f={tr_kl}",
                                     "TrainConfig.name='subset_kl'")),
}

# Fields that set the budget of completions: equal for every run of a sweep.
BUDGET_FIELDS = ("prompts_per_step", "group_size", "num_steps")
# Fields the sweep sets per run (a --gin_param must not override them).
SWEEP_FIELDS = BUDGET_FIELDS + ("learning_rate", "seed")


@dataclasses.dataclass(frozen=True)
class PlannedRun:
  """One (method, lr, seed) of the grid with its workdir and exact command (argv, run from the repository root)."""
  method: str
  lr: float
  seed: int
  workdir: str
  argv: tuple[str, ...]

  @property
  def run_id(self) -> str:
    return f"{self.method}/lr{fmt_lr(self.lr)}/seed{self.seed}"

  @property
  def command(self) -> str:
    return " ".join(shlex.quote(a) for a in self.argv)


def fmt_lr(lr: float) -> str:
  """A learning rate as a short stable string: 1e-4, 2.5e-4, 0.001 → 1e-3."""
  mantissa, exponent = f"{lr:e}".split("e")
  mantissa = mantissa.rstrip("0").rstrip(".")
  return f"{mantissa}e{int(exponent)}"


def _parse_list(text: str, kind, name: str) -> list:
  items = [t.strip() for t in text.split(",") if t.strip()]
  if not items:
    raise ValueError(f"--{name} is empty; give a comma-separated list, e.g. --{name}=" +
                     {"methods": "grpo,capo", "lrs": "1e-4,5e-4", "seeds": "0,1,2", "runs": "grpo@1e-4,capo@5e-4"}[name] + ".")
  try:
    values = [kind(t) for t in items]
  except ValueError as e:
    raise ValueError(f"--{name}: cannot parse {text!r} as a comma-separated list of {kind.__name__}.") from e
  if len(set(values)) != len(values):
    raise ValueError(f"--{name} lists a value twice: {text!r}.")
  return values


def parse_pairs(text: str) -> list[tuple[str, float]]:
  """``--runs``: ``method@lr,method@lr,...`` → [(method, lr)] in the order given."""
  pairs = []
  for item in _parse_list(text, str, "runs"):
    method, _, lr = item.partition("@")
    try:
      pairs.append((method.strip(), float(lr)))
    except ValueError as e:  # no "@", or not a number after it
      raise ValueError(f"--runs: {item!r} is not method@lr; write e.g. --runs grpo@1e-4,kl_target@5e-4.") from e
  if len(set(pairs)) != len(pairs):
    raise ValueError(f"--runs lists a (method, lr) twice: {text!r}.")
  return pairs


def plan(methods: Sequence[str], lrs: Sequence[float], seeds: Sequence[int], root: str, *,
         prompts_per_step: int = 16, group_size: int = 8, num_steps: int = 60,
         gin_params: Sequence[str] = (), trust_region_kl: float = DEFAULT_TRUST_REGION_KL,
         cache_dir: str | None = None, python: str = sys.executable,
         pairs: Sequence[tuple[str, float]] | None = None) -> list[PlannedRun]:
  """The grid as a list of runs: learning rates in the order given (list the most important first, so a partial sweep
  has it), methods within each, and seeds interleaved so that consecutive runs have different seeds (two workers
  build two warm starts at once). ``pairs`` (then ``methods`` and ``lrs`` are ignored): the (method, lr) cells in
  the order given, e.g. the most expensive first, so that the workers finish together.

  Every run's command is ``python -m experiments.run --gin_file=<preset> --workdir=<root>/<method>/lr<lr>/seed<seed>
  --cache_dir=<root>/cache`` with the budget, ``learning_rate`` and ``seed`` bound last (after ``gin_params`` and the
  preset's bindings), so the budget prompts_per_step × group_size × num_steps is the same for every run.
  ``cache_dir`` (default ``<root>/cache``) may be shared between sweeps: warm starts do not depend on the RL budget.
  """
  if pairs is not None:
    methods = list(dict.fromkeys(m for m, _ in pairs))
    lrs = list(dict.fromkeys(lr for _, lr in pairs))
  unknown = [m for m in methods if m not in PRESETS]
  if unknown:
    raise ValueError(f"unknown method(s) {unknown}; choose from {sorted(PRESETS)}.")
  for name, value in (("prompts_per_step", prompts_per_step), ("group_size", group_size), ("num_steps", num_steps)):
    if int(value) < 1:
      raise ValueError(f"{name} must be ≥ 1, got {value}.")
  for lr in lrs:
    if not lr > 0:
      raise ValueError(f"learning rates must be > 0, got {lr}.")
  if not trust_region_kl > 0:
    raise ValueError(f"--trust_region_kl must be > 0, got {trust_region_kl}.")
  for p in gin_params:
    field = p.split("=", 1)[0].strip().rsplit(".", 1)[-1]
    if field in SWEEP_FIELDS:
      raise ValueError(f"--gin_param {p!r} sets {field}, which the sweep controls; use --{field} "
                       "(budget fields) or --lrs/--seeds instead.")
  for m in methods:  # a preset must not change the budget either (the sweep's bindings come last, but say so)
    for b in PRESETS[m][1]:
      field = b.split("=", 1)[0].strip().rsplit(".", 1)[-1]
      if field in SWEEP_FIELDS:
        raise ValueError(f"preset {m!r} binds {field}, which the sweep controls; remove it from PRESETS.")
  root = os.path.normpath(root)
  cache_dir = os.path.normpath(cache_dir) if cache_dir else os.path.join(root, "cache")
  runs = []
  grid = list(pairs) if pairs is not None else [(m, lr) for lr in lrs for m in methods]  # lr-major by default
  for i, (method, lr) in enumerate(grid):
    for seed in seeds:
      gin_file, bindings = PRESETS[method]
      workdir = os.path.join(root, method, f"lr{fmt_lr(lr)}", f"seed{seed}")
      argv = [python, "-m", "experiments.run", f"--gin_file=experiments/configs/{gin_file}",
              f"--workdir={workdir}", f"--cache_dir={cache_dir}"]
      scale = float(lr) / TAU_REFERENCE_LR
      params = list(gin_params) + [b.format(tr_kl=repr(float(trust_region_kl)), tau_h_eta=repr(1e-2 * scale),
                                            tau_f_eta=repr(1e-4 * scale**2)) for b in bindings]
      params += [f"RolloutConfig.prompts_per_step={int(prompts_per_step)}",
                 f"RolloutConfig.group_size={int(group_size)}", f"TrainConfig.num_steps={int(num_steps)}",
                 f"OptimizerConfig.learning_rate={lr!r}", f"TrainConfig.seed={int(seed)}"]
      argv += [f"--gin_param={p}" for p in params]
      runs.append((i, seed, PlannedRun(method, float(lr), int(seed), workdir, tuple(argv))))
  # Seed-interleaved: grid cell 0 of every seed, then cell 1 of every seed, ...
  runs.sort(key=lambda x: (x[0], seeds.index(x[1])))
  return [r for _, _, r in runs]


def read_rows(workdir: str) -> list[dict]:
  """The rows of ``<workdir>/metrics.jsonl`` (a torn last line of a killed run is ignored)."""
  path = os.path.join(workdir, "metrics.jsonl")
  return read_metrics(path) if os.path.exists(path) else []


def is_finished(workdir: str, num_steps: int) -> bool:
  """A run is finished when its metrics hold the eval row (``eval_accuracy``) of step ``num_steps``."""
  return any(r.get("step") == num_steps and "eval_accuracy" in r for r in read_rows(workdir))


def _has_started_rl(workdir: str) -> bool:
  """True once a run has written its first metrics row (its warm start is then in the cache)."""
  return bool(read_rows(workdir))


def machine_info() -> dict:
  return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
          "cpu_count": os.cpu_count(), "python": platform.python_version()}


class Manifest:
  """``<root>/manifest.json``: the runs (keyed by run id) with their commands and outcomes, and the invocations.

  Safe for several sweeps on one root at once (e.g. two method groups sharing a warm-start cache): every change
  re-reads the file under an exclusive ``fcntl`` lock on ``<root>/manifest.lock``, applies itself and rewrites the
  file atomically, so no invocation overwrites another's records.
  """

  def __init__(self, root: str):
    self.path = os.path.join(root, "manifest.json")
    self.lock_path = os.path.join(root, "manifest.lock")
    self.data = self._load()

  def _load(self) -> dict:
    if os.path.exists(self.path):
      with open(self.path) as f:
        return json.load(f)
    return {"runs": {}, "invocations": []}

  def _update(self, change) -> None:
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    with open(self.lock_path, "a") as lock:
      fcntl.flock(lock, fcntl.LOCK_EX)
      try:
        data = self._load()
        change(data)
        tmp = f"{self.path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
          json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, self.path)
        self.data = data
      finally:
        fcntl.flock(lock, fcntl.LOCK_UN)

  def add_invocation(self, invocation: dict) -> str:
    """Appends an invocation record; returns its id (used by ``update_invocation``)."""
    inv_id = f"{invocation.get('start', '')}-{os.getpid()}-{time.time_ns()}"
    self._update(lambda d: d.setdefault("invocations", []).append(dict(invocation, id=inv_id)))
    return inv_id

  def update_invocation(self, inv_id: str, **fields) -> None:
    def change(d):
      for inv in d.setdefault("invocations", []):
        if inv.get("id") == inv_id:
          inv.update(fields)
    self._update(change)

  def record(self, run: PlannedRun, **fields) -> None:
    def change(d):
      entry = d.setdefault("runs", {}).setdefault(run.run_id, {})
      entry.update({"method": run.method, "lr": run.lr, "seed": run.seed, "workdir": run.workdir,
                    "command": run.command}, **fields)
    self._update(change)


def cpu_lanes(cpus: Sequence[int], parallel: int) -> list[tuple[int, ...]] | None:
  """``parallel`` disjoint, near-equal shares of ``cpus`` (one per worker), or None when there are fewer CPUs than
  workers (or one worker: nothing to pin)."""
  cpus = sorted(cpus)
  if parallel < 2 or len(cpus) < parallel:
    return None
  return [tuple(cpus[i * len(cpus) // parallel:(i + 1) * len(cpus) // parallel]) for i in range(parallel)]


def _pinned(cpus: tuple[int, ...] | None):
  """A ``preexec_fn`` that restricts the child to ``cpus`` (XLA sizes its thread pool by the CPUs it may use)."""
  if cpus is None or not hasattr(os, "sched_setaffinity"):
    return None
  return lambda: os.sched_setaffinity(0, cpus)


def execute(runs: Sequence[PlannedRun], root: str, *, num_steps: int, parallel: int = 1, argv: Sequence[str] = (),
            poll_s: float = 1.0, log=print, env: dict | None = None, pin: bool = True,
            compile_cache_dir: str | None = None) -> dict[str, str]:
  """Runs the planned runs (skipping finished ones), at most ``parallel`` at once. Returns run id → status
  (``skipped``, ``finished`` or ``failed rc=N``).

  ``pin``: each worker's runs keep to one share of this process's CPUs (``cpu_lanes``). ``compile_cache_dir``: JAX's
  persistent compilation cache for the runs (``JAX_COMPILATION_CACHE_DIR``, every compilation cached), unless the
  environment already names one.
  """
  if parallel < 1:
    raise ValueError(f"--parallel must be ≥ 1, got {parallel}.")
  lanes = cpu_lanes(os.sched_getaffinity(0), parallel) if pin and hasattr(os, "sched_getaffinity") else None
  os.makedirs(root, exist_ok=True)
  manifest = Manifest(root)
  invocation = {"argv": list(argv), "start": datetime.datetime.now().isoformat(timespec="seconds"),
                "machine": machine_info()}
  inv_id = manifest.add_invocation(invocation)
  t_start = time.time()
  status: dict[str, str] = {}
  pending = []
  for run in runs:
    if is_finished(run.workdir, num_steps):
      status[run.run_id] = "skipped"
      manifest.record(run, status="finished")
      log(f"[sweep] skip (finished): {run.run_id}")
    else:
      pending.append(run)
  running: dict[str, tuple[PlannedRun, subprocess.Popen, float, object, int]] = {}
  ready_seeds = {r.seed for r in runs if status.get(r.run_id) == "skipped" or _has_started_rl(r.workdir)}
  env = dict(os.environ if env is None else env)
  env.setdefault("PYTHONPATH", REPO)
  if compile_cache_dir and "JAX_COMPILATION_CACHE_DIR" not in env:
    env.update(JAX_COMPILATION_CACHE_DIR=os.path.abspath(compile_cache_dir),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  free_lanes = list(range(parallel))
  try:
    while pending or running:
      # Seeds whose warm start now exists (a run of theirs has written a metrics row).
      for run, *_ in running.values():
        if run.seed not in ready_seeds and _has_started_rl(run.workdir):
          ready_seeds.add(run.seed)
      busy_seeds = {run.seed for run, *_ in running.values()}
      started = False
      if len(running) < parallel:
        for run in pending:
          if run.seed in ready_seeds or run.seed not in busy_seeds:
            os.makedirs(run.workdir, exist_ok=True)
            logf = open(os.path.join(run.workdir, "run.log"), "a")
            lane = free_lanes.pop(0)
            proc = subprocess.Popen(list(run.argv), cwd=REPO, stdout=logf, stderr=subprocess.STDOUT, env=env,
                                    preexec_fn=_pinned(lanes[lane] if lanes else None))
            running[run.run_id] = (run, proc, time.time(), logf, lane)
            pending.remove(run)
            manifest.record(run, status="running", pid=proc.pid, cpus=list(lanes[lane]) if lanes else None)
            log(f"[sweep] start {run.run_id} (pid {proc.pid}; {len(pending)} pending)")
            started = True
            break
      for run_id, (run, proc, t0, logf, lane) in list(running.items()):
        rc = proc.poll()
        if rc is None:
          continue
        logf.close()
        del running[run_id]
        free_lanes.append(lane)
        wall = time.time() - t0
        ok = rc == 0 and is_finished(run.workdir, num_steps)
        status[run_id] = "finished" if ok else f"failed rc={rc}"
        prev = manifest.data["runs"].get(run_id, {}).get("wall_s_total", 0.0)
        manifest.record(run, status=status[run_id], returncode=rc, wall_s=wall, wall_s_total=prev + wall)
        log(f"[sweep] {status[run_id]}: {run_id} ({wall:.0f}s)")
      if not started:
        time.sleep(poll_s)
  finally:
    for run, proc, _, logf, _ in running.values():  # interrupted: stop our children (they resume on the next call)
      proc.terminate()
      proc.wait()
      logf.close()
      manifest.record(run, status="interrupted")
    manifest.update_invocation(inv_id, end=datetime.datetime.now().isoformat(timespec="seconds"),
                               wall_s=time.time() - t_start)
  return status


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m experiments.sweep", description=__doc__.split("\n\n")[0])
  p.add_argument("--methods", help=f"comma-separated presets: {','.join(PRESETS)}")
  p.add_argument("--lrs", help="comma-separated learning rates, e.g. 1e-4,5e-4")
  p.add_argument("--runs", help="instead of --methods × --lrs: comma-separated method@lr cells, in the order to run "
                 "them, e.g. kl_target@5e-4,grpo@1e-4")
  p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
  p.add_argument("--root", required=True, help="sweep folder (runs, cache and manifest.json)")
  p.add_argument("--parallel", type=int, default=1, help="runs at once")
  p.add_argument("--prompts_per_step", type=int, default=16)
  p.add_argument("--group_size", type=int, default=8)
  p.add_argument("--num_steps", type=int, default=60)
  p.add_argument("--trust_region_kl", type=float, default=DEFAULT_TRUST_REGION_KL,
                 help="δ of the trust_region presets (predicted mean KL per step)")
  p.add_argument("--cache_dir", default=None, help="warm-start cache (default <root>/cache; shareable)")
  p.add_argument("--gin_param", action="append", default=[], help="extra binding for every run (repeatable)")
  p.add_argument("--no_pin", action="store_true", help="do not pin parallel runs to separate CPUs")
  p.add_argument("--dry_run", action="store_true", help="print the commands and exit")
  return p


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = build_parser().parse_args(argv)
  try:
    grid_flags = (args.methods is not None, args.lrs is not None)
    if grid_flags != ((False, False) if args.runs is not None else (True, True)):
      raise ValueError("give either --methods and --lrs (their grid) or --runs method@lr,... (those cells).")
    pairs = parse_pairs(args.runs) if args.runs is not None else None
    methods = _parse_list(args.methods, str, "methods") if pairs is None else []
    lrs = _parse_list(args.lrs, float, "lrs") if pairs is None else []
    runs = plan(methods, lrs, _parse_list(args.seeds, int, "seeds"), args.root,
                prompts_per_step=args.prompts_per_step, group_size=args.group_size, num_steps=args.num_steps,
                gin_params=args.gin_param, trust_region_kl=args.trust_region_kl, cache_dir=args.cache_dir,
                pairs=pairs)
    if args.parallel < 1:
      raise ValueError(f"--parallel must be ≥ 1, got {args.parallel}.")
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.dry_run:
    for r in runs:
      print(r.command)
    return 0
  cache_dir = args.cache_dir or os.path.join(args.root, "cache")
  status = execute(runs, args.root, num_steps=args.num_steps, parallel=args.parallel,
                   argv=["python", "-m", "experiments.sweep", *argv], pin=not args.no_pin,
                   compile_cache_dir=os.path.join(cache_dir, "jax-compilation"))
  failed = {k: v for k, v in status.items() if v.startswith("failed")}
  print(f"[sweep] {len(status) - len(failed)}/{len(status)} runs finished; manifest {args.root}/manifest.json")
  for k, v in failed.items():
    print(f"[sweep] {v}: {k} (log: {os.path.join(args.root, k, 'run.log')})", file=sys.stderr)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
