"""Full-network directional model and Theorem 5.1 subset acceptance against dense float64 references.

The policy is a 2-layer pure-JAX MLP over a 5-token vocabulary (45 parameters), small enough that ``jax.hessian``
of every per-token log-probability and the dense Jacobian of every logit are cheap to build.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from capo_jax import curvature_full as cf
from tests.tiny_mlp_policy import V, init_params, logits_and_hidden

B, T = 2, 3


# (logits, hidden): exercises the tuple form of the logits_fn contract.
logits_fn = logits_and_hidden


def make_batch(key, batch_size=B):
  k1, k2, k3 = jax.random.split(key, 3)
  return {
      "tokens": jax.random.randint(k1, (batch_size, T), 0, V),
      "actions": jax.random.randint(k2, (batch_size, T), 0, V),
      "advantages": jax.random.normal(k3, (batch_size,)),
      "completion_mask": jnp.ones((batch_size, T)).at[0, 0].set(0.0),
  }


def dense_setup(temperature):
  """Flat-parameter functions: per-token logπ(a_t) [B,T] and logits/T [B,T,V] of θ ∈ R^P."""
  params = init_params(jax.random.PRNGKey(0), jnp.float64)
  batch = make_batch(jax.random.PRNGKey(1))
  flat, unravel = ravel_pytree(params)
  update = unravel(1e-1 * jax.random.normal(jax.random.PRNGKey(2), flat.shape, jnp.float64))

  def z_flat(theta):
    return logits_fn(unravel(theta), batch)[0] / temperature

  def logp_flat(theta):
    lp = jax.nn.log_softmax(z_flat(theta), axis=-1)
    return jnp.take_along_axis(lp, batch["actions"][..., None], axis=-1)[..., 0]

  return params, batch, flat, unravel, update, z_flat, logp_flat


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_stats_equal_dense_derivatives(temperature):
  with jax.enable_x64(True):
    params, batch, flat, _, update, z_flat, logp_flat = dense_setup(temperature)
    u = ravel_pytree(update)[0]
    stats = jax.jit(
        lambda p, d: cf.full_network_token_stats(
            logits_fn, p, batch, d, batch["actions"], batch["advantages"], temperature=temperature
        )
    )(params, update)
    assert stats.delta_bt.dtype == jnp.float64

    grad_btp = jax.jacobian(logp_flat)(flat)  # [B,T,P]
    hess_btpp = jax.hessian(logp_flat)(flat)  # [B,T,P,P]
    jac_btvp = jax.jacobian(z_flat)(flat)  # [B,T,V,P]
    pi_btv = jax.nn.softmax(z_flat(flat), axis=-1)
    dense_delta = grad_btp @ u
    dense_second = jnp.einsum("btpq,p,q->bt", hess_btpp, u, u)
    # Δθᵀ J_tᵀ (diag π_t − π_tπ_tᵀ) J_t Δθ with the covariance built densely.
    cov_btvw = jax.vmap(jax.vmap(lambda p: jnp.diag(p) - jnp.outer(p, p)))(pi_btv)
    dense_fisher = jnp.einsum("btvp,btvw,btwq,p,q->bt", jac_btvp, cov_btvw, jac_btvp, u, u)
    adv = batch["advantages"][:, None]

    np.testing.assert_allclose(stats.logprob_bt, logp_flat(flat), rtol=1e-12)
    np.testing.assert_allclose(stats.delta_bt, dense_delta, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(stats.second_bt, dense_second, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(stats.fisher_bt, dense_fisher, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(
        stats.m_h_bt, adv * (dense_delta + 0.5 * (dense_delta**2 + dense_second)), rtol=1e-10, atol=1e-14
    )
    np.testing.assert_allclose(stats.m_f_bt, 0.5 * dense_delta**2, rtol=1e-10, atol=1e-16)
    # The statistics are not trivially small: the comparison above has something to compare.
    assert np.min(np.abs(dense_second)) > 1e-4 and np.min(dense_fisher) > 1e-4


def test_m_h_is_the_second_order_change_of_the_surrogate():
  """m_H(sΔθ) = A(π'/π − 1) + O(s³): the residual shrinks 8× when the step halves (finite differences)."""
  with jax.enable_x64(True):
    params, batch, flat, unravel, update, _, logp_flat = dense_setup(1.0)
    u = ravel_pytree(update)[0]
    adv = batch["advantages"][:, None]
    residuals = []
    for s in (0.2, 0.1, 0.05):
      stats = cf.full_network_token_stats(
          logits_fn, params, batch, unravel(s * u), batch["actions"], batch["advantages"]
      )
      exact = adv * (jnp.exp(logp_flat(flat + s * u) - logp_flat(flat)) - 1.0)
      residuals.append(np.max(np.abs(stats.m_h_bt - exact)))
      # Fisher-only pass (one jvp) gives the same δ and F as the jvp∘jvp pass.
      fisher_only = cf.full_network_token_stats(
          logits_fn, params, batch, unravel(s * u), batch["actions"], batch["advantages"],
          second_order=False, fisher="expected",
      )
      np.testing.assert_allclose(fisher_only.delta_bt, stats.delta_bt, rtol=1e-12)
      np.testing.assert_allclose(fisher_only.m_f_bt, 0.5 * stats.fisher_bt, rtol=1e-12)
      assert fisher_only.m_h_bt is None and fisher_only.second_bt is None
    ratios = np.array(residuals[:-1]) / np.array(residuals[1:])
    assert np.all(ratios > 6.0) and np.all(ratios < 10.0), (residuals, ratios)


def test_token_stats_run_on_float32_and_bf16_tangent_dtypes():
  """An optax update in float32 for bf16 params is cast to the tangent dtype; results come back ≥ float32."""
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), init_params(jax.random.PRNGKey(0), jnp.float32))
  batch = make_batch(jax.random.PRNGKey(1))
  update = jax.tree.map(lambda x: 1e-2 * jnp.ones(x.shape, jnp.float32), params)
  stats = cf.full_network_token_stats(logits_fn, params, batch, update, batch["actions"], batch["advantages"])
  assert stats.m_h_bt.dtype == jnp.float32 and np.all(np.isfinite(stats.m_h_bt))


def test_token_mask_rules():
  m_h = jnp.array([[0.0, -0.5, 0.5, 2.0]])
  m_f = jnp.array([[0.1, 0.1, 0.1, 0.1]]).at[0, 0].set(3.0)
  stats = cf.FullNetworkTokenStats(m_h, m_h, m_h, m_f, m_h, m_f)
  completion = jnp.array([[1.0, 1.0, 1.0, 0.0]])
  # τ_F = 1 rejects token 0; τ_H = 1 rejects token 3 (|2| ≥ 1), which the completion mask drops anyway.
  sym = cf.full_network_token_mask(stats, completion, tau_fisher=1.0, tau_hessian=1.0)
  np.testing.assert_array_equal(sym, [[0.0, 1.0, 1.0, 0.0]])
  nonsym = cf.full_network_token_mask(stats, jnp.ones_like(completion), tau_fisher=1.0, tau_hessian=1.0,
                                      hessian_rule="nonsymmetric")
  np.testing.assert_array_equal(nonsym, [[0.0, 0.0, 1.0, 0.0]])  # m_H = −0.5 < 0 is rejected too
  fisher_only = cf.full_network_token_mask(stats, jnp.ones_like(completion), tau_fisher=1.0, tau_hessian=None)
  np.testing.assert_array_equal(fisher_only, [[0.0, 1.0, 1.0, 1.0]])
  with pytest.raises(ValueError, match="tau_fisher"):
    cf.full_network_token_mask(stats, completion, tau_fisher=0.0, tau_hessian=1.0)
  with pytest.raises(ValueError, match="second_order=True"):
    cf.full_network_token_mask(stats._replace(m_h_bt=None), completion, tau_fisher=1.0, tau_hessian=1.0)


def surrogate(logits_btv, batch):
  """GRPO surrogate at one gradient step: −mean_t mask·A·exp(logπ − logπ_old) (ρ ≡ 1 at θ_old)."""
  lp = jnp.take_along_axis(jax.nn.log_softmax(logits_btv, axis=-1), batch["actions"][..., None], axis=-1)[..., 0]
  rho = jnp.exp(lp - batch["old_logp"])
  mask = batch["completion_mask"]
  return -jnp.sum(mask * batch["advantages"][:, None] * rho) / jnp.sum(mask)


def subset_setup(num_subsets=4, rows=8, dtype=jnp.float64):
  params = init_params(jax.random.PRNGKey(3), dtype)
  batch = make_batch(jax.random.PRNGKey(4), rows)
  lp = jax.nn.log_softmax(logits_fn(params, batch)[0], axis=-1)
  batch["old_logp"] = jnp.take_along_axis(lp, batch["actions"][..., None], axis=-1)[..., 0]
  return params, cf.split_into_subsets(batch, num_subsets)


def dense_subset_quantities(params, sub, update_fn):
  """∇L_i, Δθ_i, dense H_LΔθ_i and dense F̄Δθ_i for one subset, by jax.hessian / jax.jacobian on flat θ."""
  flat, unravel = ravel_pytree(params)

  def loss_flat(theta):
    return surrogate(logits_fn(unravel(theta), sub)[0], sub)

  g = jax.grad(loss_flat)(flat)
  u = ravel_pytree(update_fn(unravel(g)))[0]
  hess = jax.hessian(loss_flat)(flat)
  jac = jax.jacobian(lambda th: logits_fn(unravel(th), sub)[0])(flat)  # [b,T,V,P]
  pi = jax.nn.softmax(logits_fn(params, sub)[0], axis=-1)
  cov = jax.vmap(jax.vmap(lambda p: jnp.diag(p) - jnp.outer(p, p)))(pi)
  w = sub["completion_mask"] / jnp.sum(sub["completion_mask"])
  fisher = jnp.einsum("bt,btvp,btvw,btwq->pq", w, jac, cov, jac)
  return g, u, hess, fisher, unravel


def test_hvp_and_fvp_equal_dense_products():
  with jax.enable_x64(True):
    params, subsets = subset_setup()
    sub = jax.tree.map(lambda x: x[1], subsets)
    g, u, hess, fisher, unravel = dense_subset_quantities(params, sub, cf.sgd_proposal(0.3))
    v = unravel(jax.random.normal(jax.random.PRNGKey(5), g.shape, jnp.float64))
    v_flat = ravel_pytree(v)[0]
    hvp = cf.hessian_vector_product(lambda p: surrogate(logits_fn(p, sub)[0], sub), params, v)
    fvp = cf.fisher_vector_product(logits_fn, params, sub, v, sub["completion_mask"])
    np.testing.assert_allclose(ravel_pytree(hvp)[0], hess @ v_flat, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(ravel_pytree(fvp)[0], fisher @ v_flat, rtol=1e-10, atol=1e-13)
    # vᵀF̄v is twice the predicted mean KL of the step v.
    kl = cf.predicted_mean_kl(logits_fn, params, sub, v, sub["completion_mask"])
    np.testing.assert_allclose(2 * kl, v_flat @ fisher @ v_flat, rtol=1e-10)


@pytest.mark.parametrize("proposal", ["sgd", "adam"])
def test_subset_acceptance_matches_dense_theorem_rule(proposal):
  with jax.enable_x64(True):
    params, subsets = subset_setup()
    if proposal == "sgd":
      propose = cf.sgd_proposal(0.5)
    else:
      adam = optax.adam(0.05)
      propose = cf.optimizer_proposal(adam, adam.init(params), params)
    num = jax.tree.leaves(subsets)[0].shape[0]
    dense = [dense_subset_quantities(params, jax.tree.map(lambda x, i=i: x[i], subsets), propose)
             for i in range(num)]
    m_h = np.array([-(g @ u) - 0.5 * u @ hess @ u for g, u, hess, _, _ in dense])
    m_f = np.array([0.5 * u @ fisher @ u for _, u, _, fisher, _ in dense])
    # Thresholds between the dense values so that each rule rejects at least one subset.
    delta_h = float(np.sort(m_h)[0] + np.sort(m_h)[1]) / 2 if np.sort(m_h)[1] > 0 else 0.0
    delta_f = float(np.sort(m_f)[-1] + np.sort(m_f)[-2]) / 2
    run = jax.jit(lambda p, s: cf.subset_acceptance(
        logits_fn, surrogate, p, s, propose, delta_h=delta_h, delta_f=delta_f,
        completion_mask_fn=lambda b: b["completion_mask"]))
    grads, stats = run(params, subsets)
    np.testing.assert_allclose(stats.m_h_s, m_h, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(stats.m_f_s, m_f, rtol=1e-10, atol=1e-14)
    expected_accept = (m_h >= delta_h) & (m_f <= delta_f)
    assert 0 < expected_accept.sum() < num
    np.testing.assert_array_equal(stats.accepted_s, expected_accept)
    assert int(stats.num_accepted) == expected_accept.sum()
    expected_grad = np.mean([d[0] for d, a in zip(dense, expected_accept) if a], axis=0)
    np.testing.assert_allclose(ravel_pytree(grads)[0], expected_grad, rtol=1e-10, atol=1e-14)


def test_subset_acceptance_rejects_everything_gives_zero_gradient_and_bad_input_errors():
  params, subsets = subset_setup(dtype=jnp.float32)
  grads, stats = cf.subset_acceptance(logits_fn, surrogate, params, subsets, cf.sgd_proposal(0.1),
                                      delta_h=1e9, delta_f=1.0)
  assert int(stats.num_accepted) == 0 and float(stats.accepted_fraction) == 0.0
  assert all(np.all(g == 0) for g in jax.tree.leaves(grads))
  with pytest.raises(ValueError, match="delta_f"):
    cf.subset_acceptance(logits_fn, surrogate, params, subsets, cf.sgd_proposal(0.1), delta_h=0.0, delta_f=0.0)
  with pytest.raises(ValueError, match="delta_h"):
    cf.subset_acceptance(logits_fn, surrogate, params, subsets, cf.sgd_proposal(0.1), delta_h=-1.0, delta_f=1.0)
  with pytest.raises(ValueError, match="num_subsets"):
    cf.split_into_subsets({"x": jnp.ones((6, 2))}, 4)
  with pytest.raises(ValueError, match="tree structure"):
    cf.predicted_mean_kl(logits_fn, params, jax.tree.map(lambda x: x[0], subsets), {"w2": params["w2"]})
  with pytest.raises(ValueError, match="fisher"):
    cf.full_network_token_stats(logits_fn, params, jax.tree.map(lambda x: x[0], subsets), params,
                                subsets["actions"][0], subsets["advantages"][0], fisher="typo")


def test_token_stats_on_a_tiny_causal_lm_match_finite_differences():
  """The contract works on an ``nnx.State`` of ``capo_jax.models.CausalLM``: δ_t and κ_t against central
  differences of logπ(a_t) along Δθ."""
  from flax import nnx

  from capo_jax.models import CausalLM, ModelConfig, apply

  cfg = ModelConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                    num_kv_heads=1, initializer_range=0.3)
  graphdef, params = nnx.split(CausalLM(cfg, rngs=nnx.Rngs(0)))
  tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 7), 0, cfg.vocab_size)
  batch = {"tokens": tokens}

  def lm_logits(p, b):
    out = apply(graphdef, p, b["tokens"])
    return out.logits[:, :-1], out.hidden[:, :-1]

  actions = tokens[:, 1:]
  update = jax.tree.map(lambda x: 0.05 * x, params)  # a structured direction: every parameter moves

  def logp(p):
    lp = jax.nn.log_softmax(lm_logits(p, batch)[0], axis=-1)
    return jnp.take_along_axis(lp, actions[..., None], axis=-1)[..., 0]

  stats = jax.jit(lambda p, d: cf.full_network_token_stats(lm_logits, p, batch, d, actions, jnp.ones((2,))))(
      params, update)
  eps = 0.25
  plus, minus = (logp(jax.tree.map(lambda x, d, s=s: x + s * eps * d, params, update)) for s in (1.0, -1.0))
  base = logp(params)
  fd_delta = (plus - minus) / (2 * eps)
  fd_second = (plus - 2 * base + minus) / eps**2
  # Central differences are O(ε²) accurate; float32 rounding limits the second difference.
  print("max |δ|", np.max(np.abs(fd_delta)), "err", np.max(np.abs(stats.delta_bt - fd_delta)),
        "max |κ|", np.max(np.abs(fd_second)), "err", np.max(np.abs(stats.second_bt - fd_second)))
  np.testing.assert_allclose(stats.delta_bt, fd_delta, rtol=0.02, atol=2e-3)
  np.testing.assert_allclose(stats.second_bt, fd_second, rtol=0.05, atol=1.5e-3)
  assert np.max(np.abs(stats.delta_bt)) > 0.05 and np.max(np.abs(stats.second_bt)) > 0.01
