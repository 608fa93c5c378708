"""The paper's configurations (experiments/configs/paper/): every one binds the aggressive regime's hyper-parameters
and its algorithm's preset, and builds its run — policy, prompt-ready data, optax chain (with CAPO's
``masked_transform`` for the CAPO variants), learner step — on a tiny stand-in of its model family.

The stand-in is a 2-layer, hidden-32 Qwen2 checkpoint with a ChatML tokenizer (`tests.test_eval_cli.
write_boxed_answer_checkpoint`: it answers `\\boxed{2}` or `\\boxed{5}`, so rewards vary and the updates are real),
and the data a tiny MATH-format JSONL written here; the configs' MODEL / TRAIN_DATA / EVAL_DATA macros are pointed at
them with ``--gin_param``. Every config is parsed and built, and every one trains 2 steps through ``trainer.train``
with steps, batch and completion length overridden to tiny values (prompt lengths stay the paper's 512).
"""

import glob
import json
import math
import os

import gin
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from capo_jax import components
from capo_jax import config as cfg_lib
from capo_jax import curvature
from capo_jax import trainer
from capo_jax.data import DatasetTask
from capo_jax.models import CausalLM
from experiments import run
from tests.test_eval_cli import write_boxed_answer_checkpoint

PAPER_DIR = os.path.join(run.CONFIG_DIR, "paper")
PAPER_CONFIGS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(PAPER_DIR, "*.gin"))
                       if not p.endswith("base.gin"))
ALGORITHMS = {"grpo": ("grpo", "seq-mean-token-mean", None), "drgrpo": ("drgrpo", "seq-mean-token-sum-norm", None),
              "reinforce": ("reinforce", "seq-mean-token-mean", None), "capo": ("grpo", "seq-mean-token-mean", "CAPO"),
              "drcapo": ("drgrpo", "seq-mean-token-sum-norm", "DrCAPO"),
              "reincapo": ("reinforce", "seq-mean-token-mean", "ReinCAPO")}
MODEL_PLACEHOLDERS = {"qwen2.5-math-7b": "/path/to/Qwen2.5-Math-7B", "qwen2.5-math-1.5b": "/path/to/Qwen2.5-Math-1.5B",
                      "qwen2.5-0.5b": "/path/to/Qwen2.5-0.5B-Instruct"}
TINY = ["TrainConfig.num_steps=2", "RolloutConfig.prompts_per_step=2", "RolloutConfig.group_size=4",
        "RolloutConfig.max_new_tokens=16", "EvalConfig.num_problems=2", "EvalConfig.k=2", "CheckpointConfig.every=2"]


def math_records(answers, first):
  levels, types = ("Level 1", "Level 2", "Level 3"), ("Algebra", "Prealgebra")
  return [{"problem": f"Exercise {first + i}: what is the answer?", "level": levels[i % 3], "type": types[i % 2],
           "solution": f"Done: $\\boxed{{{a}}}$."} for i, a in enumerate(answers)]


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
  """(model folder, train file, eval file) and the ``--gin_param`` bindings pointing the macros at them."""
  folder = tmp_path_factory.mktemp("paper")
  model = write_boxed_answer_checkpoint(folder / "Qwen2-tiny")
  paths = {}
  for split, answers, first in (("train", "2552525225", 0), ("test", "2552", 100)):
    paths[split] = folder / f"math_{split}.jsonl"
    paths[split].write_text("".join(json.dumps(r) + "\n" for r in math_records(list(answers), first)))
  bindings = [f"MODEL='{model}'", f"TRAIN_DATA='{paths['train']}'", f"EVAL_DATA='{paths['test']}'"]
  return model, paths, bindings


def parse(name, bindings):
  gin.clear_config()
  return run.parse_config([f"paper/{name}"], bindings)


def test_the_paper_folder_is_complete():
  assert PAPER_CONFIGS == sorted(
      [f"qwen2.5-math-7b_{a}.gin" for a in ALGORITHMS] + ["qwen2.5-math-7b_grpo_conservative.gin"]
      + [f"{m}_{a}.gin" for m in ("qwen2.5-0.5b", "qwen2.5-math-1.5b") for a in ("grpo", "capo")])


def test_the_macros_default_to_placeholders_that_fail_with_the_missing_path():
  with pytest.raises(run.UsageError, match="/path/to/MATH/train.jsonl does not exist"):
    parse("qwen2.5-math-7b_capo.gin", [])


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_every_paper_config_binds_the_aggressive_regime_and_builds_its_run(name, stand_in, tmp_path):
  model_folder, paths, bindings = stand_in
  family, algorithm = name[:-len(".gin")].split("_", 1)
  conservative = algorithm == "grpo_conservative"
  algorithm = algorithm.replace("_conservative", "")

  # The placeholders: each file's own model macro (only the data are pointed at real files here).
  cfg, _, _ = parse(name, bindings[1:])
  assert cfg.policy.init_from == MODEL_PLACEHOLDERS[family]

  cfg, text, fingerprint = parse(name, bindings)
  assert cfg.policy.init_from == str(model_folder) and "PolicyConfig.init_from = %MODEL" in gin.config_str()
  task = cfg.task
  assert isinstance(task, DatasetTask) and task.train_files == (str(paths["train"]),)
  assert task.eval_files == (str(paths["test"]),) and (task.num_train, task.num_eval) == (10, 4)
  assert task.max_prompt_tokens == 512 and task.train_schemas == ("math",)
  # The aggressive regime (README "Running the paper's configurations").
  assert cfg.num_steps == 100
  assert (cfg.rollout.prompts_per_step, cfg.rollout.group_size) == (12, 8) and cfg.rollout.batch_size == 96
  assert (cfg.rollout.max_prompt_length, cfg.rollout.max_new_tokens) == (512, 1024)
  assert (cfg.rollout.temperature, cfg.rollout.top_k, cfg.rollout.top_p) == (1.0, 50, 1.0)
  opt = cfg.optimizer
  assert opt.learning_rate == (3e-6 if conservative else 1.5e-5)
  assert (opt.schedule, opt.warmup_fraction, opt.b1, opt.b2, opt.eps) == ("cosine", 0.1, 0.9, 0.999, 1e-8)
  assert (opt.weight_decay, opt.max_grad_norm, opt.num_iterations, opt.num_minibatches) == (0.0, 1.0, 1, 1)
  assert (cfg.loss.kl_coef, cfg.loss.eps_low, cfg.loss.eps_high) == (0.0, 0.2, None)
  assert (cfg.eval.temperature, cfg.eval.top_p, cfg.eval.greedy) == (0.6, 0.95, False)
  estimator, aggregation, preset = ALGORITHMS[algorithm]
  assert (cfg.loss.advantage_estimator, cfg.loss.aggregation) == (estimator, aggregation)
  assert cfg.name == ("grpo_conservative" if conservative else algorithm) and len(fingerprint) == 16
  if preset is None:
    assert cfg.curvature == cfg_lib.CurvatureConfig()
  else:
    assert cfg.curvature == cfg_lib.CurvatureConfig.from_preset(preset)
    want = curvature.preset(preset)
    assert (cfg.curvature.tau_fisher, cfg.curvature.tau_hessian, cfg.curvature.top_k) == (want.tau_fisher,
                                                                                          want.tau_hessian, 50)
  # Cosine with a 10-update linear warm-up from 0 over 100 updates: peak at 10, half of it at 55, 0 at 100.
  schedule = cfg_lib.learning_rate_schedule(opt, cfg.num_steps)
  peak = opt.learning_rate
  assert [float(schedule(i)) for i in (0, 5, 10, 55, 100)] == pytest.approx([0.0, peak / 2, peak, peak / 2, 0.0],
                                                                            abs=peak * 1e-6)

  # Its run, as trainer.train builds it.
  tokenizer, model = trainer.load_policy(cfg, str(tmp_path / "cache"), lambda _: None)
  assert isinstance(model, CausalLM) and model.config.num_layers == 2 and model.config.hidden_size == 32
  # Mixed precision (PolicyConfig.dtype / param_dtype): bf16 hidden states over float32 weights, float32 logits.
  assert (model.config.dtype, model.config.param_dtype, model.config.remat) == ("bfloat16", "float32", "full")
  assert {x.dtype for x in jax.tree.leaves(nnx.state(model))} == {jnp.dtype("float32")}
  out = model(jnp.ones((1, 3), jnp.int32))
  assert (out.hidden.dtype, out.logits.dtype) == (jnp.bfloat16, jnp.float32)
  ready = trainer.prompt_ready_task(cfg.task, tokenizer)
  problem = ready.train_problems(0, 1)[0]
  assert problem.prompt.startswith("<|im_start|>system\nPlease reason step by step") and problem.prompt.endswith(
      "<|im_start|>assistant\n")
  assert ready.num_train == 10 and ready.train_dropped_too_long == 0
  optimizer, capo = components.build_optimizer(cfg, lambda params, batch: None)
  assert (capo is not None) == (preset is not None)
  graphdef, params = nnx.split(model)
  opt_state = optimizer.init(params)
  assert components.optimizer_count(opt_state) == 0
  assert callable(components.make_learner_step(cfg, graphdef, optimizer, capo))
  ready.close()


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_every_paper_config_trains_two_steps_on_the_stand_in(name, stand_in, tmp_path):
  _, _, bindings = stand_in
  cfg, text, fingerprint = parse(name, bindings + TINY)
  rows = trainer.train(cfg, str(tmp_path / "run"), config_text=text, fingerprint=fingerprint,
                       cache_dir=str(tmp_path / "cache"), log=lambda _: None)
  steps = [r for r in rows if "reward_mean" in r]
  evals = [r for r in rows if "eval_accuracy" in r]
  assert [r["step"] for r in steps] == [1, 2] and [r["step"] for r in evals] == [0, 2]
  # The cosine schedule's warm-up: update 0 at lr 0, update 1 (the end of the 1-update warm-up of 2) at the peak.
  peak = 3e-6 if "conservative" in name else 1.5e-5
  assert [r["lr"] for r in steps] == pytest.approx([0.0, peak], abs=1e-12)
  assert [r["completions"] for r in steps] == [8, 16]
  for r in steps:
    assert 0.0 < r["reward_mean"] < 1.0 and math.isfinite(r["loss"]) and r["grad_norm"] > 0.0
  if name.endswith("capo.gin"):  # CAPO, Dr.CAPO, ReinCAPO: the last-layer mask ran on every update
    assert all(math.isfinite(r["m_hessian_p99"]) and 0.0 <= r["rejected_token_fraction"] <= 1.0 for r in steps)
  else:  # no mask: nothing rejected
    assert all(r["rejected_token_fraction"] == 0.0 for r in steps)
  assert os.path.isdir(tmp_path / "run" / "checkpoints" / "2")
  assert all(0.0 <= r["eval_accuracy"] <= 1.0 for r in evals)
