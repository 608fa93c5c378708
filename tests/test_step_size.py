"""The curvature-controlled step size (capo_jax.step_size, docs/MATH.md §7) on its definition.

The hand-computed model: one token, two classes, logits z = W x with W = 0 and x = 1, so π = (½, ½). An update
ΔW = (a, −a)ᵀ moves the logits by Δz = (a, −a), and

    Δzᵀ(diag π − ππᵀ)Δz = Σ_v π_v Δz_v² − (Σ_v π_v Δz_v)² = a² − 0,    KL̂ = ½ a².

With a = 0.1, KL̂ = 5e-3, and s = clip(√(δ / 5e-3), s_min, s_max).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from capo_jax import components
from capo_jax import learner
from capo_jax.config import ConfigError, CurvatureConfig
from capo_jax.step_size import kl_target_scale, kl_target_step, kl_target_transform
from capo_jax.trust_region import TrustRegionState, trust_region_transform
from experiments import run

A = 0.1
KL_A = 0.5 * A**2  # 5e-3


def two_class_logits(params, batch):
  """[B=1, T=1, V=2] logits W x with x = batch["x"]."""
  return jnp.einsum("vh,bth->btv", params["w"], batch["x"])


PARAMS = {"w": jnp.zeros((2, 1), jnp.float32)}
BATCH = {"x": jnp.ones((1, 1, 1), jnp.float32), "completion_mask": jnp.ones((1, 1), jnp.float32)}
UPDATE = {"w": jnp.asarray([[A], [-A]], jnp.float32)}


@pytest.mark.parametrize(
    "target, max_scale, min_scale, expected",
    [
        (4 * KL_A, 4.0, 0.0, 2.0),  # below target: grows by √4
        (KL_A / 4, 4.0, 0.0, 0.5),  # above target: shrinks by √(1/4)
        (100 * KL_A, 4.0, 0.0, 4.0),  # √100 = 10 is capped at s_max
        (KL_A / 100, 4.0, 0.2, 0.2),  # √(1/100) = 0.1 is floored at s_min
        (KL_A, 4.0, 0.0, 1.0),  # on target: unchanged
    ])
def test_scale_and_scaled_update_hand_computed(target, max_scale, min_scale, expected):
  scaled, kl, scale = kl_target_step(two_class_logits, PARAMS, BATCH, UPDATE, target_kl=target, max_scale=max_scale,
                                     min_scale=min_scale, completion_mask_bt=BATCH["completion_mask"])
  np.testing.assert_allclose(kl, KL_A, rtol=1e-6)
  np.testing.assert_allclose(scale, expected, rtol=1e-6)
  np.testing.assert_allclose(scaled["w"], expected * np.asarray(UPDATE["w"]), rtol=1e-6)
  # The applied step's own predicted KL is s² KL̂: exactly the target unless a bound was hit.
  _, kl_applied, _ = kl_target_step(two_class_logits, PARAMS, BATCH, scaled, target_kl=target, max_scale=max_scale,
                                    completion_mask_bt=BATCH["completion_mask"])
  np.testing.assert_allclose(kl_applied, expected**2 * KL_A, rtol=1e-5)
  if min_scale < expected < max_scale:
    np.testing.assert_allclose(kl_applied, target, rtol=1e-5)


def test_scale_of_a_zero_step_is_the_cap_and_the_rule_is_the_trust_region_at_cap_one():
  assert float(kl_target_scale(0.0, 1e-3, max_scale=3.0)) == 3.0
  kls = jnp.asarray([1e-6, 1e-4, 1e-3, 4e-3, 1.0])
  np.testing.assert_allclose(kl_target_scale(kls, 1e-3, max_scale=1.0),
                             [1.0, 1.0, 1.0, 0.5, math.sqrt(1e-3)], rtol=1e-6)


def test_transform_in_a_chain_scales_the_inner_update_and_keeps_its_state():
  """chain(clip, kl_target(sgd with momentum)): step 1's inner update is −lr·g; step 2's is −lr·(g + μ·g)."""
  lr, momentum, target = 0.05, 0.5, 4 * KL_A
  grads = {"w": jnp.asarray([[-A / lr], [A / lr]], jnp.float32)}  # −lr·g = (a, −a): KL̂ = 5e-3
  inner = optax.sgd(lr, momentum=momentum)
  tx = optax.chain(optax.clip_by_global_norm(1e6),
                   kl_target_transform(inner, target_kl=target, logits_fn=two_class_logits, max_scale=4.0))
  state = tx.init(PARAMS)
  updates, state = tx.update(grads, state, PARAMS, batch=BATCH)
  tr_state = components.trust_region_state(state)
  assert isinstance(tr_state, TrustRegionState)
  np.testing.assert_allclose(tr_state.predicted_kl, KL_A, rtol=1e-6)
  np.testing.assert_allclose(tr_state.scale, 2.0, rtol=1e-6)
  np.testing.assert_allclose(updates["w"], 2.0 * np.asarray(UPDATE["w"]), rtol=1e-6)
  # The momentum trace holds the gradient, not the scaled step: the inner optimizer advances as without the wrapper.
  ref_updates, ref_state = inner.update(grads, inner.init(PARAMS), PARAMS)
  np.testing.assert_allclose(jax.tree.leaves(state[1].inner_state), jax.tree.leaves(ref_state), rtol=1e-6)
  # Step 2: inner update (1 + μ)(a, −a), KL̂ = (1 + μ)² · 5e-3 = 1.125e-2 < δ = 2e-2: grows by √(2e-2 / 1.125e-2) = 4/3.
  updates, state = tx.update(grads, state, PARAMS, batch=BATCH)
  tr_state = components.trust_region_state(state)
  np.testing.assert_allclose(tr_state.predicted_kl, (1 + momentum)**2 * KL_A, rtol=1e-5)
  np.testing.assert_allclose(tr_state.scale, 4 / 3, rtol=1e-5)
  np.testing.assert_allclose(updates["w"], 4 / 3 * (1 + momentum) * np.asarray(UPDATE["w"]), rtol=1e-5)


def test_cap_one_matches_the_trust_region_transform():
  grads = {"w": jnp.asarray([[-3.0], [1.0]], jnp.float32)}
  for target in (1e-4, 1e-1):  # one where the trust region shrinks, one where it leaves the step alone
    a = kl_target_transform(optax.sgd(0.1), target_kl=target, logits_fn=two_class_logits, max_scale=1.0)
    b = trust_region_transform(optax.sgd(0.1), max_kl=target, logits_fn=two_class_logits)
    ua, sa = a.update(grads, a.init(PARAMS), PARAMS, batch=BATCH)
    ub, sb = b.update(grads, b.init(PARAMS), PARAMS, batch=BATCH)
    np.testing.assert_allclose(ua["w"], ub["w"], rtol=1e-6)
    np.testing.assert_allclose([sa.predicted_kl, sa.scale], [sb.predicted_kl, sb.scale], rtol=1e-6)


def test_bad_arguments():
  with pytest.raises(ValueError, match="max_scale"):
    kl_target_transform(optax.sgd(1.0), target_kl=1e-3, logits_fn=two_class_logits, max_scale=0.0)
  with pytest.raises(ValueError, match="min_scale"):
    kl_target_transform(optax.sgd(1.0), target_kl=1e-3, logits_fn=two_class_logits, max_scale=1.0, min_scale=2.0)
  with pytest.raises(ValueError, match="max_kl must be > 0"):
    kl_target_transform(optax.sgd(1.0), target_kl=0.0, logits_fn=two_class_logits, max_scale=1.0)
  tx = kl_target_transform(optax.sgd(1.0), target_kl=1e-3, logits_fn=two_class_logits, max_scale=2.0)
  with pytest.raises(ValueError, match="needs the batch"):
    tx.update(UPDATE, tx.init(PARAMS), PARAMS)
  with pytest.raises(ConfigError, match="needs CurvatureConfig.max_kl"):
    CurvatureConfig(step_control="kl_target", max_kl=1e-3)
  with pytest.raises(ConfigError, match="min_scale"):
    CurvatureConfig(step_control="kl_target", max_kl=1e-3, max_scale=1.0, min_scale=2.0)
  with pytest.raises(ConfigError, match="bound the kl_target step scale"):
    CurvatureConfig(step_control="trust_region", max_kl=1e-3, max_scale=2.0)
  with pytest.raises(ConfigError, match="not supported"):
    CurvatureConfig(mode="subset", step_control="kl_target", max_kl=1e-3, max_scale=2.0)


def _one_token_sequence_batch():
  """A learner.SequenceBatch whose completion mask × row weight is the single token of the hand-computed model."""
  one = jnp.ones((1, 1), jnp.float32)
  return learner.SequenceBatch(tokens_bs=jnp.ones((1, 2), jnp.int32), attention_mask_bs=jnp.ones((1, 2), jnp.int32),
                               completion_mask_bn=one, advantages_b=jnp.zeros((1,)), old_logprobs_bn=0 * one,
                               ref_logprobs_bn=0 * one, row_weight_b=jnp.ones((1,)))


@pytest.mark.parametrize("max_kl", [None, 1.25e-9])
def test_gin_preset_builds_the_chain_that_scales_as_defined(max_kl):
  """algorithms/kl_target.gin selects the rule; the built chain (clip → AdamW → kl_target) scales AdamW's first step.

  AdamW's first step from W = 0 is −η·g/(|g| + ε) ≈ −η·sign(g): with g = (−1, 1) and η = 1e-4 it is (η, −η), so
  KL̂ = ½η² = 5e-9 — far below the preset's δ (s = its cap), or 4× above δ = 1.25e-9 (s = ½).
  """
  params = [f"CurvatureConfig.max_kl = {max_kl!r}"] if max_kl else []
  cfg, _, _ = run.parse_config(["arith_base.gin", "algorithms/kl_target.gin"],
                               params + ["OptimizerConfig.learning_rate = 1e-4", "CurvatureConfig.monitor = False"])
  curv = cfg.curvature
  assert cfg.name == "kl_target" and curv.step_control == "kl_target" and curv.min_scale == 0.0
  assert curv.max_kl > 1e-6 if max_kl is None else curv.max_kl == max_kl
  expected_scale = curv.max_scale if max_kl is None else 0.5
  assert expected_scale >= 1.0 or max_kl is not None  # the preset's δ ≫ 5e-9: the step grows to the cap
  chain, capo = components.build_optimizer(cfg, lambda p, b: two_class_logits(p, BATCH))
  assert capo is None
  state = chain.init(PARAMS)
  grads = {"w": jnp.asarray([[-1.0], [1.0]], jnp.float32)}
  updates, state = chain.update(grads, state, PARAMS, batch=_one_token_sequence_batch())
  inner_step = 1e-4 * np.asarray([[1.0], [-1.0]]) / (1.0 + cfg.optimizer.eps)
  tr_state = components.trust_region_state(state)
  np.testing.assert_allclose(tr_state.predicted_kl, 0.5 * (1e-4)**2, rtol=1e-4)
  np.testing.assert_allclose(tr_state.scale, expected_scale, rtol=1e-4)
  np.testing.assert_allclose(updates["w"], expected_scale * inner_step, rtol=1e-4)
