"""Advantage estimators: hand-derived values, group properties, jit agreement, bad input, non-finite rewards."""

import functools
import math

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import capo_jax

JIT_MODES = pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])


def _run(fn, rewards, group_size, jit, **kw):
  f = functools.partial(fn, group_size=group_size, **kw)
  return np.asarray(jax.jit(f)(rewards) if jit else f(rewards))


@JIT_MODES
def test_grpo_matches_reference_formula_by_hand(jit):
  # Group [1, 0, 0, 1]: mean 0.5, unbiased std sqrt(4·0.25/3) = 0.57735…, eps 1e-4.
  a = _run(capo_jax.grpo_advantages, jnp.array([1.0, 0.0, 0.0, 1.0]), 4, jit)
  expected = 0.5 / (math.sqrt(1.0 / 3.0) + 1e-4)
  np.testing.assert_allclose(a, [expected, -expected, -expected, expected], rtol=1e-6)


@JIT_MODES
def test_grpo_biased_std_and_batch_scope(jit):
  a = _run(capo_jax.grpo_advantages, jnp.array([1.0, 0.0, 0.0, 1.0]), 4, jit, unbiased_std=False)
  np.testing.assert_allclose(a, np.array([1, -1, -1, 1]) * 0.5 / 0.5001, rtol=1e-6)
  # Batch scope: centred per group, divided by the std of all 8 rewards (mean 0.5, unbiased var 2/7).
  r = jnp.array([1.0, 0, 0, 0, 1, 1, 1, 0])
  a = _run(capo_jax.grpo_advantages, r, 4, jit, std_scope="batch")
  centred = np.array([0.75, -0.25, -0.25, -0.25, 0.25, 0.25, 0.25, -0.75])
  np.testing.assert_allclose(a, centred / (math.sqrt(2.0 / 7.0) + 1e-4), rtol=1e-6)


@JIT_MODES
def test_drgrpo_rloo_reinforce_by_hand(jit):
  r = jnp.array([1.0, 0.0, 0.0, 1.0, 3.0, 0.0])
  np.testing.assert_allclose(_run(capo_jax.drgrpo_advantages, r, 2, jit), [0.5, -0.5, -0.5, 0.5, 1.5, -1.5])
  # RLOO, G=3 (groups [1,0,0], [1,3,0]): A_i = r_i − mean of the other two.
  np.testing.assert_allclose(
      _run(capo_jax.rloo_advantages, r, 3, jit), [1.0, -0.5, -0.5, -0.5, 2.5, -2.0], rtol=1e-6)
  np.testing.assert_allclose(_run(capo_jax.reinforce_advantages, r, 3, jit), np.asarray(r))


@JIT_MODES
def test_zero_variance_groups_give_exact_zero_not_nan(jit):
  # 0.1 × 3 averages to 0.10000000000000002 in floating point; the result must still be exactly zero.
  r = jnp.array([0.1, 0.1, 0.1, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0])
  for fn in (capo_jax.grpo_advantages, capo_jax.drgrpo_advantages, capo_jax.rloo_advantages):
    a = _run(fn, r, 3, jit)
    assert np.all(np.isfinite(a))
    np.testing.assert_array_equal(a, np.zeros(9))


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(
    rewards=st.lists(st.floats(-10, 10, allow_nan=False, width=32), min_size=8, max_size=8),
    shift=st.floats(-5, 5, width=32),
    estimator=st.sampled_from(["grpo", "drgrpo", "rloo"]),
)
def test_advantages_sum_to_zero_and_ignore_constant_shift(rewards, shift, estimator):
  r = jnp.array(rewards, jnp.float32)
  a = np.asarray(capo_jax.compute_advantages(r, 4, estimator))
  np.testing.assert_allclose(a.reshape(2, 4).sum(axis=1), 0.0, atol=1e-3 * (1 + np.abs(a).max()))
  shifted = np.asarray(capo_jax.compute_advantages(r + shift, 4, estimator))
  # The shift changes the floats' rounding, so compare with a tolerance relative to the reward scale.
  scale = 1 + np.abs(np.asarray(r)).max() + abs(shift)
  np.testing.assert_allclose(shifted, a, atol=2e-4 * scale * (1 + np.abs(a).max()))


def test_batch_normalize_whitens():
  a = capo_jax.batch_normalize_advantages(jnp.array([1.0, 2.0, 3.0, 6.0]))
  assert abs(float(a.mean())) < 1e-6 and abs(float(a.std()) - 1.0) < 1e-6


def test_bad_input_raises_clear_errors():
  with pytest.raises(ValueError, match="does not divide"):
    capo_jax.grpo_advantages(jnp.zeros(6), 4)
  with pytest.raises(TypeError, match="floating-point"):
    capo_jax.grpo_advantages(jnp.zeros(4, jnp.int32), 2)
  with pytest.raises(AssertionError, match="rank"):
    capo_jax.grpo_advantages(jnp.zeros((2, 2)), 2)
  with pytest.raises(ValueError, match="group_size ≥ 2"):
    capo_jax.grpo_advantages(jnp.zeros(4), 1)
  with pytest.raises(ValueError, match="unknown advantage estimator"):
    capo_jax.compute_advantages(jnp.zeros(4), 2, "ppo")
  with pytest.raises(ValueError, match="std_scope"):
    capo_jax.grpo_advantages(jnp.zeros(4), 2, std_scope="prompt")


# ---------------------------------------------------------------------------------------------------------------
# Non-finite rewards: one clear error when concrete; under jit the group gets 0 and the rest is untouched.


@pytest.mark.parametrize("estimator", ["grpo", "drgrpo", "rloo", "reinforce"])
def test_concrete_non_finite_rewards_raise_naming_count_and_rows(estimator):
  r = jnp.array([1.0, 0.0, jnp.nan, 1.0, 0.0, 0.0, jnp.inf, -jnp.inf])
  with pytest.raises(ValueError, match=r"rewards hold 3 non-finite value\(s\) \(1 NaN, 1 \+inf, 1 −inf\) at rows "
                                       r"\[2, 6, 7\] \(groups \[0, 1\] of G=4\)"):
    capo_jax.compute_advantages(r, 4, estimator)
  with pytest.raises(ValueError, match=r"advantages hold 1 non-finite value\(s\) \(1 NaN\) at rows \[1\]"):
    capo_jax.batch_normalize_advantages(jnp.array([1.0, jnp.nan, 0.0]))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_jitted_group_with_non_finite_reward_gets_zero_and_others_are_unchanged(bad):
  # Group 1 holds the bad reward; groups 0 and 2 must equal what they get on their own.
  r = jnp.array([1.0, 0.0, 0.0, 1.0, 1.0, bad, 0.0, 1.0, 3.0, 0.0, 1.0, 1.0])
  good = jnp.concatenate([r[:4], r[8:]])
  for estimator, kwargs in (("grpo", {}), ("drgrpo", {}), ("rloo", {}), ("grpo", {"std_scope": "batch"}),
                            ("grpo", {"unbiased_std": False})):
    f = jax.jit(lambda r, e=estimator, kw=kwargs: capo_jax.compute_advantages(r, 4, e, **kw))
    a = np.asarray(f(r))
    assert np.all(np.isfinite(a)), (estimator, kwargs)
    np.testing.assert_array_equal(a[4:8], 0.0)
    expected = np.asarray(capo_jax.compute_advantages(good, 4, estimator, **kwargs))
    np.testing.assert_allclose(np.concatenate([a[:4], a[8:]]), expected, rtol=1e-6, err_msg=f"{estimator} {kwargs}")
  # Batch-scope std over the 8 finite rewards only (mean 0.875, unbiased var 6.875/7), by hand for group 0.
  a = jax.jit(lambda r: capo_jax.grpo_advantages(r, 4, std_scope="batch"))(r)
  np.testing.assert_allclose(a[:4], np.array([0.5, -0.5, -0.5, 0.5]) / (math.sqrt(6.875 / 7) + 1e-4), rtol=1e-6)
  # REINFORCE: A = r, with the bad row's group zeroed (the row alone for G = 1).
  np.testing.assert_array_equal(jax.jit(capo_jax.reinforce_advantages)(r), np.where(np.arange(12) == 5, 0.0, r))
  np.testing.assert_array_equal(jax.jit(lambda r: capo_jax.reinforce_advantages(r, 4))(r),
                                np.where((np.arange(12) // 4) == 1, 0.0, r))
  # Batch whitening: non-finite entries are left out of the statistics and returned as 0.
  adv = jnp.array([1.0, bad, 2.0, 3.0, 6.0])
  w = np.asarray(jax.jit(capo_jax.batch_normalize_advantages)(adv))
  assert w[1] == 0.0
  np.testing.assert_allclose(w[[0, 2, 3, 4]], capo_jax.batch_normalize_advantages(adv[jnp.array([0, 2, 3, 4])]),
                             rtol=1e-6)


def test_jitted_all_groups_non_finite_gives_zeros_not_nan():
  r = jnp.array([jnp.nan, 1.0, 0.0, jnp.inf])
  for kwargs in ({}, {"std_scope": "batch"}):
    np.testing.assert_array_equal(jax.jit(lambda r, kw=kwargs: capo_jax.grpo_advantages(r, 2, **kw))(r), np.zeros(4))
  np.testing.assert_array_equal(jax.jit(capo_jax.batch_normalize_advantages)(jnp.full(3, jnp.nan)), np.zeros(3))
