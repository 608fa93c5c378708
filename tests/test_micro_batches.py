"""Gradient accumulation (``OptimizerConfig.micro_batches``): the trainer's learner step over M slices of the rows
gives the update of one pass over the whole batch (docs/MATH.md §1.3), for every aggregation, with zero-weight rows,
with CAPO's last-layer mask, and holds less memory; bad settings fail with one clear error."""

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

from capo_jax import components
from capo_jax import config as cfg_lib
from capo_jax import learner
from capo_jax.models import CausalLM, ModelConfig
from capo_jax.tasks import ArithTask

PROMPTS, GROUP, PROMPT, N = 4, 4, 5, 6
ROWS = PROMPTS * GROUP


def _config(micro_batches, aggregation="seq-mean-token-mean", **curvature):
  return cfg_lib.TrainConfig(
      task=ArithTask(), num_steps=4,
      rollout=cfg_lib.RolloutConfig(prompts_per_step=PROMPTS, group_size=GROUP, max_new_tokens=N),
      optimizer=cfg_lib.OptimizerConfig(learning_rate=1e-2, micro_batches=micro_batches),
      loss=cfg_lib.LossConfig(aggregation=aggregation, track_kl=False),
      curvature=cfg_lib.CurvatureConfig(**curvature))


@pytest.fixture(scope="module")
def problem():
  """A 2-layer model and a batch of G completions per prompt with left padding, completions of 1…N tokens and
  zero-weight rows — every row of slice 1 when M = 4 (rows ≡ 1 mod 4 are slice 1's; here rows 1, 5, 9, 13 all get
  weight 0)."""
  cfg = ModelConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2, num_kv_heads=1)
  graphdef, params = nnx.split(CausalLM(cfg, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, cfg.vocab_size, (ROWS, PROMPT + N)).astype(np.int32)
  tokens[:, :PROMPT] = np.repeat(tokens[::GROUP, :PROMPT], GROUP, axis=0)  # G completions of each prompt
  attention = np.ones_like(tokens)
  attention[:GROUP, :2] = 0
  attention[2 * GROUP:3 * GROUP, :1] = 0
  lengths = rng.integers(1, N + 1, ROWS)
  completion = (np.arange(N)[None] < lengths[:, None]).astype(np.float32)
  attention[:, PROMPT:] = completion
  rewards = rng.integers(0, 2, ROWS).astype(np.float32)
  rewards[:GROUP] = 1.0  # one constant group: zero advantages, so CAPO keeps its tokens
  adv = (rewards.reshape(PROMPTS, GROUP) - rewards.reshape(PROMPTS, GROUP).mean(1, keepdims=True)).reshape(-1)
  row_weight = np.ones(ROWS, np.float32)
  row_weight[1::4] = 0.0
  batch = learner.SequenceBatch(jnp.asarray(tokens), jnp.asarray(attention), jnp.asarray(completion),
                                jnp.asarray(adv), jnp.zeros((ROWS, N)), jnp.zeros((ROWS, N)), jnp.asarray(row_weight))
  return graphdef, params, batch


def _two_steps(problem, cfg):
  """Two learner steps of ``cfg`` from the same start (the second reads the first's Adam moments)."""
  gin.clear_config()
  graphdef, params, batch = problem
  optimizer, capo = components.build_optimizer(cfg)
  step = components.make_learner_step(cfg, graphdef, optimizer, capo)
  p = jax.tree.map(jnp.copy, params)
  o = optimizer.init(p)
  p, o, m1 = step(p, o, batch)
  p, o, m2 = step(p, o, batch)
  return p, m1, m2


def _assert_tree_close(a, b, rtol=2e-5):
  fa, fb = np.asarray(ravel_pytree(a)[0]), np.asarray(ravel_pytree(b)[0])
  np.testing.assert_allclose(fa, fb, rtol=rtol, atol=rtol * np.abs(fb).max())


# The two kinds of normaliser: kept tokens (token-mean) and row weights (the sequence means; seq-mean-token-mean,
# the default, is the CAPO test's below).
@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-sum-norm"])
def test_micro_batches_give_the_one_pass_update(problem, aggregation):
  whole, w1, w2 = _two_steps(problem, _config(1, aggregation))
  sliced, s1, s2 = _two_steps(problem, _config(4, aggregation))
  _assert_tree_close(sliced, whole)
  for key in ("loss", "pg_loss", "grad_norm", "entropy", "sampler_learner_kl", "sampler_learner_max_abs_diff",
              "ratio_min", "ratio_max"):
    np.testing.assert_allclose(float(s1[key]), float(w1[key]), rtol=2e-5, err_msg=key)
    np.testing.assert_allclose(float(s2[key]), float(w2[key]), rtol=2e-5, err_msg=key)
  assert float(s2["kept_tokens"]) == float(w2["kept_tokens"])
  assert float(w1["grad_norm"]) > 0  # the update is not trivially zero


def test_micro_batches_with_capo_mask_give_the_same_mask_and_update(problem):
  curvature = dict(mode="last_layer", tau_fisher=1e-9, tau_hessian=1e-2, top_k=8)
  whole, w1, w2 = _two_steps(problem, _config(1, **curvature))
  sliced, s1, s2 = _two_steps(problem, _config(4, **curvature))
  assert 0.0 < float(w2["rejected_fraction"]) < 1.0  # the mask is neither empty nor everything
  for key in ("rejected_fraction", "kept_tokens", "loss", "pg_loss", "grad_norm", "sampler_learner_kl"):
    np.testing.assert_allclose(float(s1[key]), float(w1[key]), rtol=2e-5, err_msg=key)
    np.testing.assert_allclose(float(s2[key]), float(w2[key]), rtol=2e-5, err_msg=key)
  np.testing.assert_allclose(float(s2["m_fisher_max"]), float(w2["m_fisher_max"]), rtol=2e-5)
  _assert_tree_close(sliced, whole)


def test_micro_batches_lower_the_step_temporary_memory():
  """XLA's memory analysis of the compiled step: the activations of B / 4 rows instead of B."""
  cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1)
  graphdef, params = nnx.split(CausalLM(cfg, rngs=nnx.Rngs(0)))
  rows, n = 32, 32
  batch = learner.SequenceBatch(jnp.ones((rows, 2 * n), jnp.int32), jnp.ones((rows, 2 * n), jnp.int32),
                                jnp.ones((rows, n)), jnp.ones((rows,)), jnp.zeros((rows, n)), jnp.zeros((rows, n)),
                                jnp.ones((rows,)))
  temp = {}
  for m in (1, 4):
    train_cfg = cfg_lib.TrainConfig(
        task=ArithTask(), rollout=cfg_lib.RolloutConfig(prompts_per_step=4, group_size=8, max_new_tokens=n),
        optimizer=cfg_lib.OptimizerConfig(micro_batches=m), loss=cfg_lib.LossConfig(track_kl=False))
    optimizer, _ = components.build_optimizer(train_cfg)
    step = components.make_learner_step(train_cfg, graphdef, optimizer, None)
    compiled = step.lower(params, optimizer.init(params), batch).compile()
    temp[m] = compiled.memory_analysis().temp_size_in_bytes
  assert temp[4] < 0.5 * temp[1], temp


def test_bad_micro_batches_fail_with_one_clear_error():
  with pytest.raises(cfg_lib.ConfigError, match="micro_batches=3 must divide the 16 rows"):
    _config(3)
  with pytest.raises(cfg_lib.ConfigError, match="needs the whole batch in one pass"):
    _config(2, mode="full_network", tau_fisher=1.0)
  with pytest.raises(cfg_lib.ConfigError, match="micro_batches must be an integer ≥ 1"):
    cfg_lib.OptimizerConfig(micro_batches=0)
