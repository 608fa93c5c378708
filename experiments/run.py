"""The main job: RL post-training from gin configs.

    python -m experiments.run --gin_file=experiments/configs/arith_capo.gin [--gin_param=TrainConfig.seed=1]
                              [--workdir=runs/my-run]

Writes into the workdir: config.gin (operative config), metrics.jsonl, tensorboard/, checkpoints/ (Orbax) and
plots/*.png. Rerunning with the same workdir resumes from its latest checkpoint; a workdir holding checkpoints of a
different config is refused before anything in it is touched.
"""

from __future__ import annotations

import contextlib
import datetime
import logging as std_logging
import os
import signal
import sys

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
_SIGKILL_AFTER = flags.DEFINE_integer("fault_sigkill_after_step", None,
                                      "Fault injection: SIGKILL this process after the given step's metrics row.")


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
    raise UsageError(f"bad config: {e}") from e
  except (ValueError, TypeError, KeyError, SyntaxError, ImportError, OSError) as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise UsageError(f"bad gin config: {first} — check the binding names against capo_jax/config.py (PolicyConfig, "
                     "RolloutConfig, OptimizerConfig, LossConfig, CurvatureConfig, EvalConfig, ...).") from e
  return config, gin.operative_config_str(), config_lib.config_fingerprint(gin.config_str())


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


def main(argv) -> int:
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  from capo_jax import trainer  # pylint: disable=g-import-not-at-top
  from capo_jax.checkpointing import CheckpointMismatchError  # pylint: disable=g-import-not-at-top
  try:
    config, config_text, fingerprint = parse_config(_GIN_FILE.value, _GIN_PARAM.value)
    workdir = _WORKDIR.value or default_workdir(_GIN_FILE.value)
    print(f"{trainer.describe(config)} → {workdir}", flush=True)
    rows = trainer.train(config, workdir, config_text=config_text, fingerprint=fingerprint,
                         cache_dir=_CACHE_DIR.value, after_step=_sigkill_hook(_SIGKILL_AFTER.value))
  except UsageError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except (trainer.WorkdirError, CheckpointMismatchError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  evals = [r for r in rows if "eval_accuracy" in r]
  if evals:
    print(f"eval_accuracy start={evals[0]['eval_accuracy']:.3f} final={evals[-1]['eval_accuracy']:.3f} "
          f"workdir={workdir}")
  return 0


def run() -> None:
  app.run(lambda argv: sys.exit(main(argv)))


if __name__ == "__main__":
  run()
