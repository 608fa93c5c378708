"""Shared prompts: the rows of a group (G completions of one prompt) run the prompt's columns once per group
(``CausalLM.shared_prefix_hidden``, ``learner.Objective.prompt_group_size``, ``OptimizerConfig.shared_prompts``).

Asserted: the hidden states, log-probs, gradients and learner updates equal those of running every row whole
(float32, to rounding); a row whose prompt differs from its group's comes back NaN; slices of a batch (micro-batches,
minibatches, Theorem 5.1 subsets) keep only aligned runs; and the compiled step does the expected fraction of the work.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

from capo_jax import components
from capo_jax import config as cfg_lib
from capo_jax import learner
from capo_jax import trainer
from capo_jax.models import CausalLM, ModelConfig
from capo_jax.tasks import ArithTask

GROUPS, G, P, N = 3, 4, 7, 5
ROWS = GROUPS * G


def _grouped_batch(rng, vocab, groups=GROUPS, group=G, prompt=P, n=N):
  """Left-padded prompts, the same within each group of ``group`` rows (group 0's fills every prompt column, group
  1's half of them, the others 1…P); completions of 0…N tokens, right-padded; normal rewards."""
  rows = groups * group
  tokens = np.zeros((rows, prompt + n), np.int32)
  mask = np.zeros_like(tokens)
  for g in range(groups):
    length = prompt if g == 0 else prompt // 2 if g == 1 else int(rng.integers(1, prompt + 1))
    ids = rng.integers(1, vocab, length)
    for j in range(group):
      r = g * group + j
      tokens[r, prompt - length:prompt], mask[r, prompt - length:prompt] = ids, 1
      k = int(rng.integers(0, n + 1))
      tokens[r, prompt:prompt + k], mask[r, prompt:prompt + k] = rng.integers(1, vocab, k), 1
  completion = mask[:, prompt:].astype(np.float32)
  rewards = rng.normal(size=(groups, group)).astype(np.float32)
  adv = (rewards - rewards.mean(1, keepdims=True)).reshape(-1)
  return learner.SequenceBatch(jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(completion), jnp.asarray(adv),
                               jnp.zeros((rows, n)), jnp.zeros((rows, n)), jnp.ones((rows,), jnp.float32))


@pytest.fixture(scope="module")
def model_cfg():
  return ModelConfig(vocab_size=48, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                     attention_bias=True)


@pytest.fixture(scope="module")
def problem(model_cfg):
  graphdef, params = nnx.split(CausalLM(model_cfg, rngs=nnx.Rngs(0)))
  return graphdef, params, _grouped_batch(np.random.default_rng(0), model_cfg.vocab_size)


@pytest.mark.parametrize("remat", ["none", "dots_with_no_batch_dims_saveable"])
def test_shared_prefix_hidden_equals_the_whole_rows(model_cfg, remat):
  model = CausalLM(dataclasses.replace(model_cfg, remat=remat), rngs=nnx.Rngs(1))
  batch = _grouped_batch(np.random.default_rng(1), model_cfg.vocab_size)
  tokens, mask = batch.tokens_bs, batch.attention_mask_bs
  whole = model(tokens, attention_mask_bt=mask, return_logits=False).hidden
  for prefix in (1, P - 1, P + 2):  # inside the prompt, up to its last token, and past it (equal completions too)
    if prefix > P:
      tokens = tokens.at[:, P:P + 2].set(jnp.repeat(tokens[::G, P:P + 2], G, axis=0))
      mask = mask.at[:, P:P + 2].set(1)
      whole = model(tokens, attention_mask_bt=mask, return_logits=False).hidden
    shared = model.shared_prefix_hidden(tokens, mask, prefix_length=prefix, group_size=G)
    assert shared.shape == (ROWS, P + N - prefix, model_cfg.hidden_size)
    np.testing.assert_allclose(np.asarray(shared), np.asarray(whole[:, prefix:]), atol=2e-6, rtol=1e-5,
                               err_msg=f"prefix {prefix}")


def test_a_row_with_another_prompt_comes_back_nan(problem):
  graphdef, params, batch = problem
  model = nnx.merge(graphdef, params)
  tokens = np.array(batch.tokens_bs)
  mask = np.array(batch.attention_mask_bs)
  tokens[1, P - 2] = tokens[1, P - 2] % 40 + 1  # a real prompt token of group 0's second row
  mask[9, 0], tokens[9, 0] = 1 - mask[9, 0], 3  # the padding of group 2's second row
  tokens[5, 0] = 7  # under group 1's padding: not a difference
  shared = np.asarray(model.shared_prefix_hidden(jnp.asarray(tokens), jnp.asarray(mask), prefix_length=P - 1,
                                                 group_size=G))
  nan_rows = np.isnan(shared).all(axis=(1, 2))
  assert nan_rows.tolist() == [r in (1, 9) for r in range(ROWS)]
  assert np.isfinite(shared[~nan_rows]).all()
  # The learner's metric counts exactly those rows (here the prompt is the first P − 1 = S − 1 − N columns).
  mismatch = learner.prompt_group_mismatch(jnp.asarray(tokens), jnp.asarray(mask), N, G)
  assert float(mismatch) == pytest.approx(2 / ROWS)
  assert float(learner.prompt_group_mismatch(batch.tokens_bs, batch.attention_mask_bs, N, G)) == 0.0
  assert float(learner.prompt_group_mismatch(jnp.asarray(tokens), jnp.asarray(mask), N, 1)) == 0.0


def test_a_batch_that_breaks_the_groups_is_skipped_and_says_why(problem):
  graphdef, params, batch = problem
  broken = batch._replace(tokens_bs=batch.tokens_bs.at[5, P - 1 - 1].add(1))  # a real prompt token of row 5
  p, metrics = _step((graphdef, params, broken), _config(True))
  np.testing.assert_array_equal(p, np.asarray(ravel_pytree(params)[0]))  # skipped: parameters unchanged
  assert float(metrics["skipped_nonfinite"]) == 1.0
  assert float(metrics["prompt_group_mismatch"]) == pytest.approx(1 / ROWS)
  # The host loop names the cause in its warning and, at the limit, in the error.
  cfg = _config(True)
  row = {"skipped_nonfinite": 1.0, "loss": float("nan"), "prompt_group_mismatch": 1 / ROWS}
  lines = []
  assert trainer._count_skips(cfg, 1, row, 0, None, lines.append) == 1
  assert "differs from their group's first row" in lines[0] and "shared_prompts" in lines[0]

  class NoCheckpoint:
    def latest_step(self):
      return None

  with pytest.raises(trainer.DivergedError, match="shared_prompts = False"):
    trainer._count_skips(cfg, 3, row, cfg.reliability.max_consecutive_skips - 1, NoCheckpoint(), lines.append)


@pytest.mark.parametrize("prefix, group", [(0, G), (P + N, G), (3, 0), (3, 5)])
def test_bad_prefix_or_group_raises(problem, prefix, group):
  graphdef, params, batch = problem
  model = nnx.merge(graphdef, params)
  with pytest.raises(ValueError, match="prefix_length"):
    model.shared_prefix_hidden(batch.tokens_bs, batch.attention_mask_bs, prefix_length=prefix, group_size=group)


def test_objective_rejects_a_bad_group_size():
  with pytest.raises(ValueError, match="prompt_group_size"):
    learner.Objective(completion_length=N, prompt_group_size=0)


def test_log_probs_and_gradients_equal_the_whole_rows(problem):
  graphdef, params, batch = problem
  weights = jax.random.normal(jax.random.PRNGKey(0), (ROWS, N))

  def loss(p, group):
    lp, ent = learner.completion_logprobs(graphdef, p, batch.tokens_bs, batch.attention_mask_bs, N,
                                          prompt_group_size=group)
    return jnp.sum(lp * weights * batch.completion_mask_bn) + 0.1 * jnp.sum(ent), lp

  (l1, lp1), g1 = jax.value_and_grad(loss, has_aux=True)(params, 1)
  (l4, lp4), g4 = jax.value_and_grad(loss, has_aux=True)(params, G)
  np.testing.assert_allclose(np.asarray(lp4), np.asarray(lp1), atol=2e-6)
  np.testing.assert_allclose(float(l4), float(l1), rtol=1e-5)
  f1, f4 = np.asarray(ravel_pytree(g1)[0]), np.asarray(ravel_pytree(g4)[0])
  assert np.abs(f1).max() > 0
  np.testing.assert_allclose(f4, f1, atol=2e-5 * np.abs(f1).max())


def _config(shared, micro_batches=1, num_minibatches=1, **curvature):
  return cfg_lib.TrainConfig(
      task=ArithTask(), num_steps=4,
      rollout=cfg_lib.RolloutConfig(prompts_per_step=GROUPS, group_size=G, max_new_tokens=N),
      optimizer=cfg_lib.OptimizerConfig(learning_rate=1e-2, micro_batches=micro_batches, shared_prompts=shared,
                                        num_minibatches=num_minibatches),
      loss=cfg_lib.LossConfig(track_kl=False), curvature=cfg_lib.CurvatureConfig(**curvature))


_ADAM_ATOL = 2e-5  # of steps of lr 1e-2


def _step(problem, cfg):
  graphdef, params, batch = problem
  optimizer, capo = components.build_optimizer(cfg, lambda p, b: learner.completion_logits(
      graphdef, p, b, N, prompt_group_size=components.prompt_group_size(cfg)))
  step = components.make_learner_step(cfg, graphdef, optimizer, capo)
  p, _, metrics = step(jax.tree.map(jnp.copy, params), optimizer.init(params), batch)
  return np.asarray(ravel_pytree(p)[0]), metrics


def test_option_sets_the_group_size():
  assert components.objective(_config(True)).prompt_group_size == G
  assert components.objective(_config(False)).prompt_group_size == 1


@pytest.fixture(scope="module")
def whole_rows_step(problem):
  return _step(problem, _config(False))


@pytest.mark.parametrize("micro_batches", [1, 2, 3])
def test_learner_step_is_the_whole_rows_step(problem, whole_rows_step, micro_batches):
  """M = 2 leaves runs of G / 2 = 2 rows per micro-batch; M = 3 does not divide G: no shared runs (rows 12 / 3)."""
  params0 = np.asarray(ravel_pytree(problem[1])[0])
  whole, m_whole = whole_rows_step
  shared, m_shared = _step(problem, _config(True, micro_batches))
  assert np.abs(whole - params0).max() > 1e-4  # the update moved the parameters
  # Adam's first step is g / (|g| + ε): a coordinate whose gradient is near ε moves by a rounding-sensitive amount.
  np.testing.assert_allclose(shared, whole, atol=_ADAM_ATOL)
  for key in ("loss", "grad_norm", "entropy", "kept_tokens"):
    np.testing.assert_allclose(float(m_shared[key]), float(m_whole[key]), rtol=1e-5, err_msg=key)
  assert float(m_shared["skipped_nonfinite"]) == 0.0


def test_full_network_step_is_the_whole_rows_step(problem):
  """jvp∘jvp of the completion logits through the shared forward (the full-network mask along the Adam proposal)."""
  curvature = dict(mode="full_network", tau_fisher=1e9, tau_hessian=1e9)
  whole, m_whole = _step(problem, _config(False, **curvature))
  shared, m_shared = _step(problem, _config(True, **curvature))
  np.testing.assert_allclose(shared, whole, atol=_ADAM_ATOL)
  for key in ("loss", "grad_norm", "fullnet_m_fisher_max", "fullnet_m_hessian_p50"):
    np.testing.assert_allclose(float(m_shared[key]), float(m_whole[key]), rtol=1e-4, err_msg=key)


def test_slices_keep_aligned_runs_only(problem):
  """A contiguous slice of 4 rows starting at row 2 is half of two groups: gcd(4, G) = 4 would be wrong there, and
  the slices the learner makes are aligned (minibatches, Theorem 5.1 subsets): rows 4…7 share, and equal whole."""
  graphdef, params, batch = problem
  sub = jax.tree.map(lambda x: x[4:8], batch)
  shared = learner.completion_logits(graphdef, params, sub, N, prompt_group_size=G)
  whole = learner.completion_logits(graphdef, params, sub, N)
  np.testing.assert_allclose(np.asarray(shared), np.asarray(whole), atol=1e-5)
  misaligned = jax.tree.map(lambda x: x[2:6], batch)
  assert np.isnan(np.asarray(learner.completion_logits(graphdef, params, misaligned, N, prompt_group_size=G))).any()


def test_compiled_step_does_the_expected_share_of_the_work(model_cfg):
  """XLA's cost analysis of the learner's gradient: the flops fall about as the tokens through the model,
  (B/G)·(P−1) + B·N of B·(P+N−1), at a shape where the prompt dominates (P = 24, N = 4, G = 8)."""
  rows, group, prompt, n = 16, 8, 24, 4
  graphdef, params = nnx.split(CausalLM(model_cfg, rngs=nnx.Rngs(0)))
  batch = _grouped_batch(np.random.default_rng(2), model_cfg.vocab_size, rows // group, group, prompt, n)

  def flops(group_size):
    def loss(p):
      lp, _ = learner.completion_logprobs(graphdef, p, batch.tokens_bs, batch.attention_mask_bs, n,
                                          prompt_group_size=group_size)
      return jnp.sum(lp)
    cost = jax.jit(jax.grad(loss)).lower(params).compile().cost_analysis()
    return float((cost[0] if isinstance(cost, list) else cost)["flops"])

  tokens_ratio = (rows // group * (prompt - 1) + rows * n) / (rows * (prompt + n - 1))  # 110 / 432 = 0.255
  ratio = flops(group) / flops(1)
  # 0.267 measured: the unembedding and loss of the B·N completion positions and the attention of the rows over the
  # repeated prompt keys are the same work either way.
  assert tokens_ratio < ratio < tokens_ratio + 0.05
