"""End-to-end RL loop at tiny size: metrics fields, learning signal, exact resume after SIGKILL, bad input."""

import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest

from capo_jax import trainer
from capo_jax.run_logging import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = """
PolicyConfig.hidden_size = 32
PolicyConfig.intermediate_size = 64
PolicyConfig.num_layers = 1
PolicyConfig.num_heads = 2
PolicyConfig.num_kv_heads = 1
ArithTask.tokenizer_vocab_size = 512
WarmStartConfig.steps = 30
WarmStartConfig.batch_size = 16
TrainConfig.num_steps = 6
RolloutConfig.prompts_per_step = 4
RolloutConfig.group_size = 4
RolloutConfig.max_new_tokens = 24
EvalConfig.every = 3
EvalConfig.num_problems = 8
EvalConfig.k = 2
CheckpointConfig.every = 2
OptimizerConfig.learning_rate = 1e-3
LossConfig.track_kl = True
"""

REQUIRED_TRAIN_FIELDS = (
    "step", "completions", "reward_mean", "loss", "grad_norm", "lr", "entropy", "kl", "rejected_token_fraction",
    "rejected_by_fisher", "rejected_by_hessian", "m_hessian_p50", "m_hessian_p90", "m_hessian_p99", "m_fisher_p50",
    "m_fisher_p90", "m_fisher_p99", "rollout_s", "learner_s", "tokens_per_s")


def _write_gin(tmp_path, algorithm, extra=""):
  path = tmp_path / f"tiny_{algorithm}.gin"
  path.write_text(f"include 'arith_{algorithm}.gin'\n{TINY}\n{extra}\n")
  return str(path)


def _run_cli(args, **kw):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "experiments.run", *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=600, **kw)


def _in_process(gin_file, workdir, cache_dir, **kw):
  from experiments import run  # pylint: disable=import-outside-toplevel
  import gin  # pylint: disable=import-outside-toplevel
  gin.clear_config()
  cfg, text, fingerprint = run.parse_config([gin_file], [])
  return trainer.train(cfg, str(workdir), config_text=text, fingerprint=fingerprint, cache_dir=str(cache_dir),
                       log=lambda _: None, **kw)


def _comparable(rows):
  return [{k: v for k, v in r.items() if k not in trainer.TIMING_KEYS} for r in rows]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("cache")


@pytest.mark.parametrize("algorithm", ["grpo", "capo"])
def test_tiny_loop_writes_complete_metrics_rows(tmp_path, cache_dir, algorithm):
  rows = _in_process(_write_gin(tmp_path, algorithm), tmp_path / "run", cache_dir)
  train_rows = [r for r in rows if "reward_mean" in r]
  eval_rows = [r for r in rows if "eval_accuracy" in r]
  assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5, 6]
  assert [r["step"] for r in eval_rows] == [0, 3, 6]
  assert train_rows[-1]["completions"] == 6 * 4 * 4
  for row in train_rows:
    missing = [k for k in REQUIRED_TRAIN_FIELDS if row.get(k) is None]
    assert not missing, missing
    assert np.isfinite(row["loss"]) and row["lr"] == pytest.approx(1e-3)
    assert 0.0 <= row["rejected_token_fraction"] <= 1.0
  for row in eval_rows:
    assert 0.0 <= row["eval_accuracy"] <= row["eval_pass_at_2"] <= 1.0 and 0.0 <= row["eval_greedy_accuracy"] <= 1.0
  # The policy moved: parameters changed only where a batch had reward variance (nonzero advantages).
  assert any(r["grad_norm"] > 0 for r in train_rows) == any(r["reward_std"] > 0 for r in train_rows)
  for name in ("accuracy.png", "rejected.png", "curvature.png"):
    assert os.path.getsize(tmp_path / "run" / "plots" / name) > 1000
  assert (tmp_path / "run" / "config.gin").read_text().count(f"TrainConfig.name = '{algorithm}'") == 1
  # m_H and m_F scale with A and A²: batches without reward variance must give exactly zero statistics.
  for row in train_rows:
    if row["reward_std"] == 0.0:
      assert row["m_fisher_max"] == 0.0 and row["m_hessian_p99"] == 0.0


def test_sigkill_and_resume_gives_identical_metrics(tmp_path, cache_dir):
  gin_file = _write_gin(tmp_path, "capo")
  reference = _in_process(gin_file, tmp_path / "uninterrupted", cache_dir)
  workdir = tmp_path / "killed"
  common = [f"--gin_file={gin_file}", f"--workdir={workdir}", f"--cache_dir={cache_dir}"]
  killed = _run_cli(common + ["--fault_sigkill_after_step=5"])
  assert killed.returncode == -9, killed.stderr[-2000:]
  partial = read_metrics(workdir / "metrics.jsonl")
  assert max(r["step"] for r in partial) == 5  # step 5 was logged after the step-4 checkpoint, then the kill
  resumed = _run_cli(common)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  rows = read_metrics(workdir / "metrics.jsonl")
  assert len(rows) == len(reference)
  for got, want in zip(_comparable(rows), _comparable(reference)):
    assert got.keys() == want.keys()
    for k in got:
      if isinstance(want[k], float):
        assert got[k] == pytest.approx(want[k], rel=1e-6, abs=1e-6), k
      else:
        assert got[k] == want[k], k


def _digest(folder):
  h = hashlib.sha256()
  for root, _, files in sorted(os.walk(folder)):
    for f in sorted(files):
      h.update(f.encode())
      with open(os.path.join(root, f), "rb") as fh:
        h.update(fh.read())
  return h.hexdigest()


def test_bad_input_fails_cleanly_without_touching_the_workdir(tmp_path, cache_dir):
  missing = _run_cli(["--gin_file=experiments/configs/no_such.gin", f"--workdir={tmp_path / 'w1'}"])
  assert missing.returncode == 2 and "gin file not found" in missing.stderr and "arith_capo.gin" in missing.stderr
  assert not (tmp_path / "w1").exists()

  unknown = _run_cli(["--gin_file=arith_grpo.gin", "--gin_param=OptimizerConfig.learning_rat=1e-3",
                      f"--workdir={tmp_path / 'w2'}"])
  assert unknown.returncode == 2 and "learning_rat" in unknown.stderr
  assert not (tmp_path / "w2").exists()

  blocker = tmp_path / "a_file"
  blocker.write_text("not a folder")
  unwritable = _run_cli([f"--gin_file={_write_gin(tmp_path, 'grpo')}", f"--workdir={blocker / 'run'}"])
  assert unwritable.returncode == 2 and "not writable" in unwritable.stderr

  # A workdir with checkpoints of another config (GRPO, 2 steps) is refused and left byte-identical.
  workdir = tmp_path / "other"
  _in_process(_write_gin(tmp_path, "grpo", "TrainConfig.num_steps = 2"), workdir, cache_dir)
  before = _digest(workdir)
  clash = _run_cli([f"--gin_file={_write_gin(tmp_path, 'capo')}", f"--workdir={workdir}",
                    f"--cache_dir={cache_dir}"])
  assert clash.returncode == 2 and "different config" in clash.stderr
  assert _digest(workdir) == before


def test_options_trust_region_minibatches_dynamic_sampling_and_kl(tmp_path, cache_dir):
  extra = """
TrainConfig.num_steps = 2
EvalConfig.every = 2
CurvatureConfig.step_control = 'trust_region'
CurvatureConfig.max_kl = 1e-6
OptimizerConfig.num_iterations = 2
OptimizerConfig.num_minibatches = 2
RolloutConfig.dynamic_sampling = True
LossConfig.kl_coef = 0.1
"""
  workdir = tmp_path / "run"
  rows = _in_process(_write_gin(tmp_path, "grpo", extra), workdir, cache_dir)
  train_rows = [r for r in rows if "reward_mean" in r]
  assert len(train_rows) == 2
  for step, row in enumerate(train_rows, 1):
    assert row["predicted_kl"] >= 0.0 and 0.0 < row["trust_region_scale"] <= 1.0
    # Dynamic sampling keeps only groups with reward variance; the kept share is a multiple of 1/4 (4 groups).
    assert row["kept_groups"] * 4 == round(row["kept_groups"] * 4)
    if row["predicted_kl"] > 1e-6:  # the step was scaled down to the budget
      assert row["trust_region_scale"] < 1.0
    # 2 passes × 2 minibatches = 4 optimizer updates per step.
    assert row["optimizer_updates"] == 4 * step
    assert row["kl"] is not None and row["kl"] >= 0.0
  # The data position checkpointed is the number of prompts consumed.
  from capo_jax.checkpointing import Checkpointer  # pylint: disable=import-outside-toplevel
  ckpt = Checkpointer(str(workdir / "checkpoints"), "unused")
  assert ckpt.read_meta(2)["data_position"] == 2 * 4
  ckpt.close()


def test_written_config_lists_every_field_of_every_sub_config(tmp_path, cache_dir):
  import dataclasses  # pylint: disable=import-outside-toplevel
  from capo_jax import config  # pylint: disable=import-outside-toplevel
  _in_process(_write_gin(tmp_path, "capo", "TrainConfig.num_steps = 1"), tmp_path / "run", cache_dir)
  text = (tmp_path / "run" / "config.gin").read_text()
  for kind in (config.PolicyConfig, config.WarmStartConfig, config.RolloutConfig, config.OptimizerConfig,
               config.LossConfig, config.CurvatureConfig, config.EvalConfig, config.CheckpointConfig):
    for field in dataclasses.fields(kind):
      assert f"{kind.__name__}.{field.name} = " in text, (kind.__name__, field.name)
  assert "ArithTask.difficulty = 0" in text and "TrainConfig.task = @ArithTask()" in text


NEW_TASK = r'''
import gin, numpy as np
from capo_jax.tasks import build_arith_tokenizer

@gin.configurable
class EchoDigitTask:
  """Repeat a digit in a box: prompts, answers, a reward."""
  def __init__(self, offset=0):
    self.offset = offset
  def _problem(self, i):
    d = str((i + self.offset) % 10)
    return type("P", (), dict(prompt=f"Repeat {d}.\n", answer=d, solution="\\boxed{" + d + "}"))()
  def train_problems(self, position, count):
    return [self._problem(position + k) for k in range(count)]
  def eval_problems(self, count):
    return [self._problem(10**6 + k) for k in range(count)]
  def score(self, completions, problems):
    return np.array([float(c.strip() == "\\boxed{" + p.answer + "}") for c, p in zip(completions, problems)],
                    np.float32)
  def tokenizer(self):
    return build_arith_tokenizer(vocab_size=512)
'''


def test_a_new_task_trains_through_the_cli_with_a_gin_file_alone(tmp_path, cache_dir):
  (tmp_path / "echo_task.py").write_text(NEW_TASK)
  gin_file = tmp_path / "echo.gin"
  gin_file.write_text(f"""include 'algorithms/grpo.gin'
import echo_task
TrainConfig.task = @EchoDigitTask()
EchoDigitTask.offset = 3
{TINY}
TrainConfig.num_steps = 2
EvalConfig.every = 2
RolloutConfig.max_new_tokens = 8
WarmStartConfig.steps = 150
""")
  workdir = tmp_path / "run"
  env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{tmp_path}", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "experiments.run", f"--gin_file={gin_file}", f"--workdir={workdir}",
                         f"--cache_dir={cache_dir}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = read_metrics(workdir / "metrics.jsonl")
  assert [r["step"] for r in rows if "reward_mean" in r] == [1, 2]
  # The warm start learnt the task's own solutions, so its own reward scores the policy's completions.
  evals = [r for r in rows if "eval_accuracy" in r]
  assert evals[0]["eval_accuracy"] > 0.5, evals
  assert "EchoDigitTask.offset = 3" in (workdir / "config.gin").read_text()
  # No alarming start-up noise.
  assert "Path not found" not in proc.stderr and "PyTorch was not found" not in proc.stderr, proc.stderr[-2000:]


def test_track_kl_off_skips_the_reference_and_changes_nothing_else(tmp_path, cache_dir, monkeypatch):
  from capo_jax import rollout as rollout_lib  # pylint: disable=import-outside-toplevel
  calls = []
  real_init = rollout_lib.Rollout.__init__

  def counting_init(self, *args, **kw):
    real_init(self, *args, **kw)
    inner = self._reference_logprobs
    self._reference_logprobs = lambda *a: (calls.append(1), inner(*a))[1]

  monkeypatch.setattr(rollout_lib.Rollout, "__init__", counting_init)
  extra = "TrainConfig.num_steps = 2\nEvalConfig.every = 2\n"
  on = _in_process(_write_gin(tmp_path, "grpo", extra), tmp_path / "on", cache_dir)
  assert len(calls) == 2  # one reference forward per step
  off = _in_process(_write_gin(tmp_path, "grpo", extra + "LossConfig.track_kl = False\n"), tmp_path / "off",
                    cache_dir)
  assert len(calls) == 2  # none more
  on_train, off_train = ([r for r in rows if "reward_mean" in r] for rows in (on, off))
  assert all(r["kl"] is not None and r["kl"] >= 0 for r in on_train)
  assert all(r["kl"] is None for r in off_train)
  # The reference enters nothing else at kl_coef = 0: every other number is the same.
  strip = lambda rows: [{k: v for k, v in r.items() if k != "kl"} for r in _comparable(rows)]
  assert strip(on) == strip(off)
