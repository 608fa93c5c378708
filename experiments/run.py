"""The main job: RL post-training from gin configs.

    python -m experiments.run --gin_file=experiments/configs/arith_capo.gin [--gin_param=TrainConfig.seed=1]
                              [--workdir=runs/my-run]

Writes into the workdir: config.gin (operative config), metrics.jsonl, tensorboard/, checkpoints/ (Orbax) and
plots/*.png. Rerunning with the same workdir resumes from its latest checkpoint, verified first (with
--allow_fallback, from the newest one that passes); a workdir holding checkpoints of a different config is refused
before anything in it is touched.

A user error never shows a traceback: one line ``error: ...`` naming the field or file and the fix, and the exit
status says what happened (docs/RELIABILITY.md):

    0  the run finished (the summary line shows NaN as nan and counts the skipped updates)
    2  bad input: flags, gin files or bindings, config values, paths (workdir, cache, init_from), another run's workdir
    3  diverged: ReliabilityConfig.max_consecutive_skips steps in a row with a non-finite update (the last good
       checkpoint is intact)
    4  the newest checkpoint failed verification (rerun with --allow_fallback to resume from the previous one)

The ``--fault_*`` flags inject faults for the tests and ``experiments/reliability.py``.
"""

from __future__ import annotations

import contextlib
import datetime
import logging as std_logging
import os
import signal
import sys
import threading
import tokenize

from absl import app
from absl import flags
from absl import logging
import gin

# transformers (tokenizers only here) warns at import that PyTorch is absent; that is expected, not a problem.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")

_GIN_FILE = flags.DEFINE_multi_string("gin_file", [], "Gin config file(s); searched also in experiments/configs.")
_GIN_PARAM = flags.DEFINE_multi_string("gin_param", [], "Gin binding(s), e.g. OptimizerConfig.learning_rate=1e-4.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder (default runs/<config>-<timestamp>).")
_CACHE_DIR = flags.DEFINE_string("cache_dir", None, "Warm-start cache (default: a 'cache' folder beside the workdir).")
_ALLOW_FALLBACK = flags.DEFINE_bool("allow_fallback", False,
                                    "Resume from the newest checkpoint that passes verification, moving failing ones "
                                    "to rejected_checkpoints/ (default: a failing newest checkpoint stops the run).")
_SIGKILL_AFTER = flags.DEFINE_integer("fault_sigkill_after_step", None,
                                      "Fault injection: SIGKILL this process after the given step's metrics row.")
_SIGKILL_AT = flags.DEFINE_string("fault_sigkill_at", None,
                                  "Fault injection: PHASE:STEP[:DELAY_S] — SIGKILL this process DELAY_S seconds after "
                                  "phase PHASE (setup, rollout, learner, eval, save) of step STEP starts.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "Multi-process run (jax.distributed): HOST:PORT of process 0; with --num_processes "
                                   "and --process_id, or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID "
                                   "(docs/SCALING.md).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-process run: the number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-process run: this process's index, 0 … N−1.")
_AUTO_DISTRIBUTED = flags.DEFINE_bool("distributed", False,
                                      "Let JAX find the cluster itself (every worker of a TPU pod slice, SLURM, Open "
                                      "MPI): jax.distributed.initialize() with no arguments.")
_NAN_STEPS = flags.DEFINE_list("fault_nan_steps", [], "Fault injection: steps whose batch gets NaN advantages.")

EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_BAD_CHECKPOINT = 2, 3, 4


class UsageError(Exception):
  """Bad command-line input: reported in one line, exit status 2."""


def resolve_gin_files(names: list[str]) -> list[str]:
  paths = []
  for name in names:
    candidates = [name, os.path.join(CONFIG_DIR, name), os.path.join(CONFIG_DIR, os.path.basename(name))]
    found = next((c for c in candidates if os.path.isfile(c)), None)
    if found is None:
      available = ", ".join(sorted(f for f in os.listdir(CONFIG_DIR) if f.endswith(".gin")))
      raise UsageError(f"gin file not found: {name!r}. Available in experiments/configs: {available}.")
    paths.append(found)
  return paths


def parse_config(gin_files: list[str], gin_params: list[str]):
  """Parses gin files and bindings and builds the run's config.

  Returns ``(config, operative config text, fingerprint)``: the text lists every field of every sub-config; the
  fingerprint (``capo_jax.config.config_fingerprint``) is of the explicit bindings, includes expanded.
  """
  from capo_jax import config as config_lib  # pylint: disable=g-import-not-at-top  (registers the configurables)
  import capo_jax.data  # pylint: disable=g-import-not-at-top,unused-import  (registers DatasetTask)
  import capo_jax.tasks  # pylint: disable=g-import-not-at-top,unused-import  (registers the built-in tasks)
  if not gin_files:
    raise UsageError("no --gin_file given; e.g. --gin_file=experiments/configs/arith_capo.gin.")
  paths = resolve_gin_files(gin_files)
  gin.add_config_file_search_path(CONFIG_DIR)
  try:
    with _quiet_gin_includes():
      gin.parse_config_files_and_bindings(paths, gin_params)
    config = config_lib.TrainConfig()
  except config_lib.ConfigError as e:
    raise UsageError(f"bad config: {_without_gin_context(e)}") from e
  except (ValueError, TypeError, LookupError, AttributeError, SyntaxError, tokenize.TokenError, ImportError,
          OSError) as e:
    lines = _without_gin_context(e).splitlines()
    first = lines[0] if lines else type(e).__name__
    if isinstance(e, tokenize.TokenError):
      first = f"unbalanced brackets or quotes in a binding ({e.args[0] if e.args else e})"
    raise UsageError(f"bad gin config: {first} — check the binding names against capo_jax/config.py (PolicyConfig, "
                     "RolloutConfig, OptimizerConfig, LossConfig, CurvatureConfig, EvalConfig, ...).") from e
  return config, gin.operative_config_str(), config_lib.config_fingerprint(gin.config_str())


def _without_gin_context(error: BaseException) -> str:
  """The error's message without the "In call to configurable ..." lines gin appends to it."""
  lines = [line for line in str(error).strip().splitlines() if not line.strip().startswith("In call to configurable")]
  return "\n".join(lines).strip()


@contextlib.contextmanager
def _quiet_gin_includes():
  """gin logs an error for each search-path candidate of an ``include`` that does not exist before it finds the one
  that does; those are not errors here (the include is resolved, or gin raises)."""
  logger = std_logging.getLogger()
  previous = logger.level
  logger.setLevel(std_logging.CRITICAL)
  try:
    yield
  finally:
    logger.setLevel(previous)


def default_workdir(gin_files: list[str]) -> str:
  name = os.path.splitext(os.path.basename(gin_files[-1]))[0]
  return os.path.join("runs", f"{name}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}")


def _sigkill_hook(kill_step: int | None):
  if kill_step is None:
    return None

  def hook(step: int) -> None:
    if step == kill_step:
      os.kill(os.getpid(), signal.SIGKILL)

  return hook


def _fault_hook(spec: str | None):
  """``trainer.train``'s ``fault`` callable of a ``--fault_sigkill_at`` value (None: no hook)."""
  if spec is None:
    return None
  from capo_jax.trainer import FAULT_PHASES  # pylint: disable=g-import-not-at-top
  parts = spec.split(":")
  try:
    phase, step, delay = parts[0], int(parts[1]), float(parts[2]) if len(parts) > 2 else 0.0
    if phase not in FAULT_PHASES or len(parts) > 3 or delay < 0:
      raise ValueError
  except (IndexError, ValueError):
    raise UsageError(f"--fault_sigkill_at={spec!r}: expected PHASE:STEP[:DELAY_S] with PHASE one of "
                     f"{', '.join(FAULT_PHASES)}, e.g. learner:3:0.5.") from None

  def kill():
    os.kill(os.getpid(), signal.SIGKILL)

  def hook(p: str, s: int) -> None:
    if p == phase and s == step:
      if delay:
        timer = threading.Timer(delay, kill)
        timer.daemon = True  # a run that ends first exits normally
        timer.start()
      else:
        kill()

  return hook


def _nan_steps(values: list[str]) -> list[int]:
  try:
    return [int(v) for v in values]
  except ValueError:
    raise UsageError(f"--fault_nan_steps={','.join(values)!r}: expected step numbers, e.g. 2,3.") from None


def _one_line(error: BaseException) -> str:
  return " ".join(str(error).split()) or type(error).__name__


def _summary(rows: list[dict], workdir: str) -> str:
  """The closing line: start and final held-out accuracy (NaN prints as nan) and the skipped updates."""
  evals = [r for r in rows if "eval_accuracy" in r]
  skipped = sum(float(r.get("skipped_nonfinite") or 0) for r in rows)
  losses = [r["loss"] for r in rows if "loss" in r]
  parts = []
  if evals:
    parts.append(f"eval_accuracy start={float(evals[0]['eval_accuracy']):.3f} "
                 f"final={float(evals[-1]['eval_accuracy']):.3f}")
  if losses:
    parts.append(f"final_loss={float(losses[-1]):.4g}")
  parts.append(f"skipped_updates={skipped:g}")
  return " ".join(parts) + f" workdir={workdir}"


def main(argv) -> int:
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  from capo_jax import trainer  # pylint: disable=g-import-not-at-top
  from capo_jax import checkpointing  # pylint: disable=g-import-not-at-top
  from capo_jax.config import ConfigError  # pylint: disable=g-import-not-at-top
  try:
    distributed = _initialize_distributed()
    fault = _fault_hook(_SIGKILL_AT.value)
    nan_steps = _nan_steps(_NAN_STEPS.value)
    config, config_text, fingerprint = parse_config(_GIN_FILE.value, _GIN_PARAM.value)
    if distributed and not _WORKDIR.value:
      raise UsageError("a multi-process run needs --workdir (the same folder, on a file system every process sees).")
    workdir = _WORKDIR.value or default_workdir(_GIN_FILE.value)
    import jax  # pylint: disable=g-import-not-at-top
    primary = jax.process_index() == 0
    log = print if primary else (lambda _: None)
    log(f"{trainer.describe(config)} → {workdir}" + (f" ({jax.process_count()} processes, {jax.device_count()} "
                                                      "devices)" if distributed else ""))
    rows = trainer.train(config, workdir, config_text=config_text, fingerprint=fingerprint,
                         cache_dir=_CACHE_DIR.value, after_step=_sigkill_hook(_SIGKILL_AFTER.value),
                         allow_fallback=_ALLOW_FALLBACK.value, fault=fault, fault_nan_steps=nan_steps, log=log)
  except (UsageError, ConfigError, trainer.InputError, checkpointing.CheckpointMismatchError) as e:
    print(f"error: {_one_line(e)}", file=sys.stderr)
    return EXIT_BAD_INPUT
  except (trainer.DivergedError, checkpointing.NonFiniteStateError) as e:
    print(f"error: {_one_line(e)}", file=sys.stderr)
    return EXIT_DIVERGED
  except checkpointing.CheckpointCorruptError as e:
    print(f"error: {_one_line(e)}", file=sys.stderr)
    return EXIT_BAD_CHECKPOINT
  if primary:
    print(_summary(rows, workdir))
  return 0


def _initialize_distributed() -> bool:
  """``capo_jax.sharding.initialize_distributed`` from the flags (or the environment), before any JAX computation;
  whether this is a multi-process run."""
  from capo_jax import sharding  # pylint: disable=g-import-not-at-top
  try:
    started = sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                              auto_detect=_AUTO_DISTRIBUTED.value)
  except ValueError as e:
    raise UsageError(str(e)) from e
  import jax  # pylint: disable=g-import-not-at-top
  return started and jax.process_count() > 1


def run() -> None:
  app.run(lambda argv: sys.exit(main(argv)))


if __name__ == "__main__":
  run()
