"""Every gin config under experiments/configs builds its run; the algorithm presets bind the released values; every
config field is validated with one clear message."""

import glob
import math
import os

import gin
import pytest

from capo_jax import components
from capo_jax import config as cfg_lib
from capo_jax import curvature
from capo_jax.tasks import ArithTask
from experiments import run
from tests.test_trainer import TINY, _in_process

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "configs")
RUN_CONFIGS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(CONFIG_DIR, "arith_*.gin"))
                     if not p.endswith("arith_base.gin"))
PRESETS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(CONFIG_DIR, "algorithms", "*.gin")))


def test_the_config_folder_is_complete():
  assert len(RUN_CONFIGS) == 13 and len(PRESETS) == 9, (RUN_CONFIGS, PRESETS)


@pytest.mark.parametrize("name", RUN_CONFIGS)
def test_every_run_config_parses_and_builds_its_optimizer_and_learner(name):
  cfg, text, fingerprint = run.parse_config([name], [])
  assert isinstance(cfg.task, ArithTask) and cfg.task.difficulty == 0 and cfg.task.wrong_step_fraction == 0.6
  assert cfg.optimizer.learning_rate == (5e-4 if "aggressive" in name else 1e-4)
  algorithm = name[len("arith_"):-len(".gin")].replace("_aggressive", "")
  assert cfg.name == algorithm and f"TrainConfig.name = '{algorithm}'" in text and len(fingerprint) == 16
  _, capo = components.build_optimizer(cfg, logits_fn=lambda params, batch: None)  # built, not run
  assert capo is not None  # arith_base.gin turns the monitor on for every algorithm
  assert (cfg.curvature.mode == "last_layer") == algorithm.endswith("capo")
  assert math.isfinite(cfg.curvature.tau_fisher) == algorithm.endswith("capo")


@pytest.mark.parametrize("preset,estimator,aggregation,released", [
    ("grpo", "grpo", "seq-mean-token-mean", None), ("drgrpo", "drgrpo", "seq-mean-token-sum-norm", None),
    ("reinforce", "reinforce", "seq-mean-token-mean", None), ("rloo", "rloo", "seq-mean-token-mean", None),
    ("capo", "grpo", "seq-mean-token-mean", "CAPO"), ("drcapo", "drgrpo", "seq-mean-token-sum-norm", "DrCAPO"),
    ("reincapo", "reinforce", "seq-mean-token-mean", "ReinCAPO"),
])
def test_algorithm_presets_bind_independent_fields_with_the_released_thresholds(preset, estimator, aggregation,
                                                                               released):
  cfg, text, _ = run.parse_config(["arith_base.gin", f"algorithms/{preset}.gin"], [])
  assert (cfg.loss.advantage_estimator, cfg.loss.aggregation) == (estimator, aggregation)
  if released is None:
    assert cfg.curvature.mode == "none" and math.isinf(cfg.curvature.tau_fisher)
  else:
    want = curvature.preset(released)
    assert cfg.curvature == cfg_lib.CurvatureConfig.from_preset(released, monitor=True)
    assert (cfg.curvature.tau_fisher, cfg.curvature.tau_hessian) == (want.tau_fisher, want.tau_hessian)
  assert f"LossConfig.advantage_estimator = '{estimator}'" in text


def test_kl_target_preset():
  cfg, _, _ = run.parse_config(["arith_kl_target.gin"], [])
  assert cfg.curvature.step_control == "kl_target" and cfg.curvature.max_kl == 2e-3 and cfg.curvature.max_scale == 4.0
  assert cfg.loss.advantage_estimator == "grpo" and cfg.curvature.mode == "none"


def test_trust_region_preset():
  cfg, _, _ = run.parse_config(["arith_base.gin", "algorithms/trust_region.gin"], [])
  assert cfg.curvature.step_control == "trust_region" and cfg.curvature.max_kl == 5e-4
  assert cfg.loss.advantage_estimator == "grpo" and cfg.curvature.mode == "none"


@pytest.mark.parametrize("binding,message", [
    ("OptimizerConfig.learning_rate = 'abc'", "OptimizerConfig.learning_rate must be a number"),
    ("OptimizerConfig.learning_rate = 1e999", "OptimizerConfig.learning_rate must be a number"),
    ("OptimizerConfig.eps = 0.0", "OptimizerConfig.eps must be a number"),
    ("RolloutConfig.group_size = 1", "RolloutConfig.group_size must be an integer ≥ 2"),
    ("RolloutConfig.temperature = 0.0", "RolloutConfig.temperature must be a number"),
    ("RolloutConfig.temperature = 'hot'", "RolloutConfig.temperature must be a number"),
    ("RolloutConfig.top_p = 0.0", "RolloutConfig.top_p must be a number"),
    ("TrainConfig.num_steps = 2.5", "TrainConfig.num_steps must be an integer ≥ 1"),
    ("EvalConfig.num_problems = 0", "EvalConfig.num_problems must be an integer ≥ 1"),
    ("CurvatureConfig.tau_fisher = 0.0", "CurvatureConfig.tau_fisher must be a number"),
    ("CurvatureConfig.tau_fisher = -1.0", "CurvatureConfig.tau_fisher must be a number"),
    ("CurvatureConfig.mode = 'fullnet'", "CurvatureConfig.mode must be one of"),
    ("LossConfig.aggregation = 'mean'", "LossConfig.aggregation must be one of"),
    ("PolicyConfig.num_heads = 3", "hidden_size=128 must be a multiple of num_heads=3"),
    ("OptimizerConfig.num_minibatches = 3", "num_minibatches=3 must divide"),
    ("OptimizerConfig.micro_batches = 3", "micro_batches=3 must divide the 512 rows"),
    ("PolicyConfig.dtype = 'bf16'", "PolicyConfig.dtype must be one of ['float32', 'bfloat16', 'float16']"),
    ("PolicyConfig.remat = 'some'", "PolicyConfig.remat must be one of ['none', 'full', 'dots_saveable'"),
])
def test_bad_fields_give_one_clear_message(binding, message):
  with pytest.raises(run.UsageError, match="bad config: ") as e:
    run.parse_config(["arith_capo.gin"], [binding.replace(" = ", "=")])
  assert message in str(e.value)


def test_a_config_without_a_task_names_the_binding():
  with pytest.raises(cfg_lib.ConfigError, match=r"TrainConfig.task is not set.*@ArithTask\(\)"):
    cfg_lib.TrainConfig()
  with pytest.raises(cfg_lib.ConfigError, match="lacks train_problems, eval_problems, score"):
    cfg_lib.TrainConfig(task=object())


EXTRA_STEP = TINY + """
TrainConfig.num_steps = 1
EvalConfig.every = 1
EvalConfig.num_problems = 4
"""


@pytest.mark.parametrize("algorithm", ["drgrpo", "reinforce", "drcapo", "reincapo"])
def test_the_other_algorithm_configs_train_one_step(tmp_path, algorithm):
  gin.clear_config()
  path = tmp_path / f"{algorithm}.gin"
  path.write_text(f"include 'arith_{algorithm}.gin'\n{EXTRA_STEP}")
  rows = _in_process(str(path), tmp_path / "run", tmp_path.parent / "shared-cache")
  train_rows = [r for r in rows if "reward_mean" in r]
  assert len(train_rows) == 1 and math.isfinite(train_rows[0]["loss"])
  assert (train_rows[0]["rejected_token_fraction"] > 0.0) <= algorithm.endswith("capo")


def test_precision_and_remat_enter_the_warm_start_key_only_when_not_default():
  """Warm starts cached before PolicyConfig had dtype / param_dtype / remat keep their keys (the defaults are what
  they were built with); another precision or remat policy trains, and caches, its own."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  from capo_jax.tasks.warm_start import warm_start_key  # pylint: disable=import-outside-toplevel
  key = lambda policy: warm_start_key(ArithTask(), policy, cfg_lib.WarmStartConfig(), cfg_lib.RolloutConfig(), 0, 100)
  without = dataclasses.make_dataclass("PolicyConfig", [
      (f.name, f.type, dataclasses.field(default=f.default)) for f in dataclasses.fields(cfg_lib.PolicyConfig)
      if f.name not in ("dtype", "param_dtype", "remat")])
  assert key(cfg_lib.PolicyConfig()) == key(without())
  keys = {key(cfg_lib.PolicyConfig()), key(cfg_lib.PolicyConfig(dtype="bfloat16")),
          key(cfg_lib.PolicyConfig(param_dtype="bfloat16")), key(cfg_lib.PolicyConfig(remat="full"))}
  assert len(keys) == 4
