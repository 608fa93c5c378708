"""Curvature trust region: predicted KL against the dense second-order form and the exact KL; the optax transform."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.flatten_util import ravel_pytree

import capo_jax.trust_region as tr
from tests.tiny_mlp_policy import V, init_params, logits_fn

T = 3


def make_batch(key, rows):
  k1, k2, k3 = jax.random.split(key, 3)
  return {
      "tokens": jax.random.randint(k1, (rows, T), 0, V),
      "actions": jax.random.randint(k2, (rows, T), 0, V),
      "advantages": jax.random.normal(k3, (rows,)),
      "completion_mask": jnp.ones((rows, T)).at[0, 0].set(0.0),
  }


def setup(dtype, rows=4):
  params = init_params(jax.random.PRNGKey(0), dtype)
  batch = make_batch(jax.random.PRNGKey(1), rows)
  direction = jax.tree.map(lambda x: x / jnp.linalg.norm(x), init_params(jax.random.PRNGKey(2), dtype))
  return params, batch, direction


def exact_mean_kl(params, new_params, batch):
  """Mean over completion tokens of KL(π_θ ‖ π_θ') = Σ_v π (logπ − logπ'), from the two softmaxes."""
  lp0 = jax.nn.log_softmax(logits_fn(params, batch), axis=-1)
  lp1 = jax.nn.log_softmax(logits_fn(new_params, batch), axis=-1)
  kl_bt = jnp.sum(jnp.exp(lp0) * (lp0 - lp1), axis=-1)
  mask = batch["completion_mask"]
  return jnp.sum(mask * kl_bt) / jnp.sum(mask)


def test_predicted_kl_equals_dense_second_order_form_and_exact_kl_for_small_steps():
  with jax.enable_x64(True):
    params, batch, direction = setup(jnp.float64)
    flat, unravel = ravel_pytree(params)
    u = ravel_pytree(direction)[0]
    pred = tr.predicted_mean_kl(logits_fn, params, batch, direction, batch["completion_mask"])
    # Dense: ½ uᵀ ∇²_θ' KL(π_θ ‖ π_θ')|_{θ'=θ} u — the Hessian of the exact KL at zero step is the mean Fisher.
    hess = jax.hessian(lambda th: exact_mean_kl(params, unravel(th), batch))(flat)
    np.testing.assert_allclose(pred, 0.5 * u @ hess @ u, rtol=1e-10)
    # A real step: the second-order model matches the exact KL within a few % for a small step, and the error
    # grows with the step (it is a model, not an identity).
    rel = []
    for s in (0.01, 0.03):
      step = jax.tree.map(lambda d, s=s: s * d, direction)
      exact = exact_mean_kl(params, jax.tree.map(jnp.add, params, step), batch)
      pred_s = tr.predicted_mean_kl(logits_fn, params, batch, step, batch["completion_mask"])
      rel.append(abs(float(pred_s / exact) - 1.0))
    print("relative error of predicted vs exact KL", rel)
    assert rel[0] < 0.03 and rel[0] < rel[1], rel
    # Tokens outside the completion mask do not count.
    only_first = batch["completion_mask"].at[1:].set(0.0)
    pred_first = tr.predicted_mean_kl(logits_fn, params, batch, direction, only_first)
    assert not np.isclose(pred_first, pred)


def test_scaled_step_respects_the_budget():
  with jax.enable_x64(True):
    params, batch, direction = setup(jnp.float64)
    kl = float(tr.predicted_mean_kl(logits_fn, params, batch, direction, batch["completion_mask"]))
    # Outside the region: scaled to exactly δ, by s = √(δ/KL).
    delta = kl / 9.0
    scaled, kl_pred, scale = tr.trust_region_step(
        logits_fn, params, batch, direction, max_kl=delta, completion_mask_bt=batch["completion_mask"])
    np.testing.assert_allclose(kl_pred, kl, rtol=1e-12)
    np.testing.assert_allclose(scale, 1.0 / 3.0, rtol=1e-12)
    kl_after = tr.predicted_mean_kl(logits_fn, params, batch, scaled, batch["completion_mask"])
    np.testing.assert_allclose(kl_after, delta, rtol=1e-10)
    # Inside the region: untouched.
    same, _, scale_in = tr.trust_region_step(
        logits_fn, params, batch, direction, max_kl=2 * kl, completion_mask_bt=batch["completion_mask"])
    assert float(scale_in) == 1.0
    for a, b in zip(jax.tree.leaves(same), jax.tree.leaves(direction)):
      np.testing.assert_array_equal(a, b)
  assert float(tr.trust_region_scale(jnp.float32(0.0), 1e-3)) == 1.0


def test_transform_under_jit_scales_adam_and_state_round_trips_through_orbax(tmp_path):
  params, batch, _ = setup(jnp.float32)
  adam = optax.adam(0.3)  # a large step so the trust region binds
  max_kl = 1e-3
  tx = optax.chain(optax.clip_by_global_norm(10.0), tr.trust_region_transform(adam, max_kl=max_kl,
                                                                              logits_fn=logits_fn))

  def loss(p, b):
    lp = jax.nn.log_softmax(logits_fn(p, b), axis=-1)
    lp = jnp.take_along_axis(lp, b["actions"][..., None], axis=-1)[..., 0]
    return -jnp.sum(b["completion_mask"] * b["advantages"][:, None] * lp) / jnp.sum(b["completion_mask"])

  @jax.jit
  def step(p, state, b):
    grads = jax.grad(loss)(p, b)
    updates, state = tx.update(grads, state, p, batch=b)
    return optax.apply_updates(p, updates), state, updates, grads

  state = tx.init(params)
  p, ref_adam_state = params, adam.init(params)
  for _ in range(2):
    new_p, state, updates, grads = step(p, state, batch)
    tr_state = state[1]
    # The applied update is the inner Adam update times the reported scale; its predicted KL is ≤ δ.
    ref_update, ref_adam_state = adam.update(optax.clip_by_global_norm(10.0).update(grads, None)[0],
                                             ref_adam_state, p)
    scale = float(tr_state.scale)
    assert 0.0 < scale < 1.0 and float(tr_state.predicted_kl) > max_kl
    np.testing.assert_allclose(scale, np.sqrt(max_kl / float(tr_state.predicted_kl)), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(ref_update)):
      np.testing.assert_allclose(a, scale * b, rtol=1e-5, atol=1e-8)
    kl_applied = tr.predicted_mean_kl(logits_fn, p, batch, updates, batch["completion_mask"])
    np.testing.assert_allclose(kl_applied, max_kl, rtol=1e-4)
    p = new_p

  # Orbax: the state saves, restores into the same structure, and the restored run continues identically.
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / "state", state)
  ckpt.wait_until_finished()
  restored = ckpt.restore(tmp_path / "state", jax.tree.map(ocp.utils.to_shape_dtype_struct, state))
  assert isinstance(restored[1], tr.TrustRegionState)
  a = step(p, state, batch)
  b = step(p, restored, batch)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def test_bad_input_is_one_clear_error():
  params, batch, _ = setup(jnp.float32)
  with pytest.raises(ValueError, match="max_kl must be > 0"):
    tr.trust_region_transform(optax.adam(1e-3), max_kl=0.0, logits_fn=logits_fn)
  with pytest.raises(ValueError, match="max_kl must be > 0"):
    tr.trust_region_transform(optax.adam(1e-3), max_kl=-1.0, logits_fn=logits_fn)
  with pytest.raises(TypeError, match="GradientTransformation"):
    tr.trust_region_transform(lambda g: g, max_kl=1e-3, logits_fn=logits_fn)
  tx = tr.trust_region_transform(optax.adam(1e-3), max_kl=1e-3, logits_fn=logits_fn)
  state = tx.init(params)
  with pytest.raises(ValueError, match="batch=batch"):
    tx.update(params, state, params)
  with pytest.raises(ValueError, match="needs params"):
    tx.update(params, state, batch=batch)
