"""Policy losses: hand-derived surrogate/aggregation/KL values, REINFORCE equivalence at ρ = 1, bad input, and
hardening: 0/1 mask checks, inert masked-out slots (NaN, ±inf), finite losses and gradients at log-ratios of ±1000."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import capo_jax

JIT_MODES = pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])


def _maybe_jit(fn, jit, **static):
  f = functools.partial(fn, **static)
  return jax.jit(f) if jit else f


@JIT_MODES
def test_clipped_surrogate_by_hand(jit):
  # Rows: (ρ=1.5, A=+1) clipped at 1.2; (ρ=1.5, A=−1) unclipped; (ρ=0.5, A=−1) clipped at 0.8; (ρ=0.5, A=+1) unclipped.
  ratios = jnp.array([[1.5], [1.5], [0.5], [0.5]])
  adv = jnp.array([1.0, -1.0, -1.0, 1.0])
  f = _maybe_jit(capo_jax.clipped_surrogate_token_losses, jit, eps_low=0.2)
  losses, ratio, clipped = f(jnp.log(ratios), jnp.zeros((4, 1)), adv)
  np.testing.assert_allclose(losses[:, 0], [-1.2, 1.5, 0.8, -0.5], rtol=1e-6)
  np.testing.assert_allclose(ratio[:, 0], [1.5, 1.5, 0.5, 0.5], rtol=1e-6)
  np.testing.assert_array_equal(clipped[:, 0], [1, 0, 1, 0])
  # Clip-higher: ε_high = 0.28 lets ρ·A grow to 1.28.
  f = _maybe_jit(capo_jax.clipped_surrogate_token_losses, jit, eps_low=0.2, eps_high=0.28)
  np.testing.assert_allclose(f(jnp.log(ratios), jnp.zeros((4, 1)), adv)[0][0, 0], -1.28, rtol=1e-6)
  # Dual-clip c = 3: ρ = 5, A = −1 → min(−5, −1.2) = −5, bounded below at −3 → loss 3.
  f = _maybe_jit(capo_jax.clipped_surrogate_token_losses, jit, eps_low=0.2, dual_clip=3.0)
  losses, _, clipped = f(jnp.log(jnp.array([[5.0], [5.0]])), jnp.zeros((2, 1)), jnp.array([-1.0, 1.0]))
  np.testing.assert_allclose(losses[:, 0], [3.0, -1.2], rtol=1e-6)
  np.testing.assert_array_equal(clipped[:, 0], [1, 1])


@JIT_MODES
def test_aggregations_by_hand(jit):
  losses = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
  mask = jnp.array([[1, 1, 0], [1, 0, 0]])
  expected = {
      "token-mean": 7.0 / 3.0,
      "seq-mean-token-mean": (1.5 + 4.0) / 2.0,
      "seq-mean-token-sum": 3.5,
      "seq-mean-token-sum-norm": 3.5 / 3.0,
  }
  for mode, value in expected.items():
    f = _maybe_jit(capo_jax.aggregate_token_losses, jit, mode=mode)
    np.testing.assert_allclose(f(losses, mask), value, rtol=1e-6, err_msg=mode)
  # Dr.GRPO: Σ / L_max with an explicit max completion length.
  f = _maybe_jit(capo_jax.aggregate_token_losses, jit, mode="seq-mean-token-sum-norm", max_completion_length=10)
  np.testing.assert_allclose(f(losses, mask), 3.5 / 10.0, rtol=1e-6)


def test_drgrpo_aggregation_is_sum_over_max_len():
  key = jax.random.PRNGKey(0)
  losses = jax.random.normal(key, (5, 9))
  mask = jax.random.bernoulli(jax.random.PRNGKey(1), 0.6, (5, 9))
  got = capo_jax.aggregate_token_losses(losses, mask, mode="seq-mean-token-sum-norm", max_completion_length=16)
  np.testing.assert_allclose(got, float(jnp.sum(losses * mask)) / (5 * 16), rtol=1e-5)


def test_empty_masks_are_defined_and_give_zero_gradient():
  losses = jnp.array([[1.0, 2.0], [3.0, 4.0]])
  row_empty = jnp.array([[1, 1], [0, 0]])
  # An empty row contributes 0 and still counts in the mean over rows.
  np.testing.assert_allclose(capo_jax.aggregate_token_losses(losses, row_empty), 0.75)
  lp = jnp.log(jnp.full((2, 2), 0.5))
  for mode in capo_jax.losses.AGGREGATIONS:
    loss_fn = lambda lp: capo_jax.policy_loss(lp, jax.lax.stop_gradient(lp), jnp.array([1.0, -1.0]),
                                              jnp.zeros((2, 2)), aggregation=mode)
    (loss, metrics), grad = jax.value_and_grad(loss_fn, has_aux=True)(lp)
    assert float(loss) == 0.0 and np.all(np.asarray(grad) == 0.0), mode
    assert all(np.isfinite(float(v)) for v in metrics.values()), (mode, metrics)


def test_token_mask_renormalises_by_kept_tokens():
  # The CAPO mask removes token 1 of row 0: row 0's mean is over its one remaining token.
  lp = jnp.log(jnp.array([[0.5, 0.25, 0.5], [0.5, 0.5, 0.5]]))
  adv = jnp.array([2.0, 1.0])
  comp = jnp.array([[1, 1, 0], [1, 1, 1]])
  capo_mask = jnp.array([[1, 0, 1], [1, 1, 1]])
  loss_fn = lambda lp: capo_jax.policy_loss(lp, jax.lax.stop_gradient(lp), adv, comp, token_mask_bt=capo_mask)[0]
  grad = jax.grad(loss_fn)(lp)
  # d loss / d logπ_t = −A_i / (B · kept_i) on kept tokens, 0 elsewhere.
  np.testing.assert_allclose(grad, [[-2.0 / 2, 0, 0], [-1.0 / 6, -1.0 / 6, -1.0 / 6]], rtol=1e-6)
  _, metrics = capo_jax.policy_loss(lp, lp, adv, comp, token_mask_bt=capo_mask)
  assert float(metrics["kept_tokens"]) == 4.0


def test_surrogate_gradient_at_ratio_one_equals_reinforce_on_linear_policy():
  """At ρ = 1, ∇ loss = −(1/B) Σ_i (1/n_i) Σ_t A_i ∇logπ(a_t), with ∇_W logπ(a|x) = x (e_a − π)ᵀ in closed form."""
  b, t, d, v = 3, 4, 5, 6
  kx, kw, ka, km = jax.random.split(jax.random.PRNGKey(7), 4)
  x = jax.random.normal(kx, (b, t, d))
  w = 0.5 * jax.random.normal(kw, (d, v))
  actions = jax.random.randint(ka, (b, t), 0, v)
  mask = jnp.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
  adv = jnp.array([1.5, -0.5, 2.0])

  def loss_fn(w):
    lp, _ = capo_jax.token_logprobs(jnp.einsum("btd,dv->btv", x, w), actions)
    return capo_jax.policy_loss(lp, jax.lax.stop_gradient(lp), adv, mask)[0]

  pi = np.asarray(jax.nn.softmax(np.einsum("btd,dv->btv", x, w), axis=-1))
  expected = np.zeros((d, v))
  n = np.asarray(mask).sum(axis=1)
  for i in range(b):
    for s in range(t):
      if mask[i, s]:
        score = np.asarray(jax.nn.one_hot(actions[i, s], v)) - pi[i, s]
        expected -= float(adv[i]) / (b * n[i]) * np.outer(np.asarray(x[i, s]), score)
  np.testing.assert_allclose(jax.grad(loss_fn)(w), expected, rtol=1e-5, atol=1e-6)
  # CISPO and GSPO have the same gradient at ρ = 1 (their weights are 1 there).
  for method in ("cispo", "gspo"):
    def other(w, method=method):
      lp, _ = capo_jax.token_logprobs(jnp.einsum("btd,dv->btv", x, w), actions)
      return capo_jax.policy_loss(lp, jax.lax.stop_gradient(lp), adv, mask, method=method)[0]
    np.testing.assert_allclose(jax.grad(other)(w), expected, rtol=1e-5, atol=1e-6, err_msg=method)


@JIT_MODES
def test_gspo_value_and_gradient_by_hand(jit):
  # log-ratios log 1.1 and log 0.9 → s = sqrt(0.99); with ε = (3e-4, 4e-4), A = 1: min(s, 0.9997) = s.
  old = jnp.zeros((1, 2))
  lp = jnp.log(jnp.array([[1.1, 0.9]]))
  s = math.sqrt(0.99)
  f = _maybe_jit(capo_jax.gspo_token_losses, jit)
  losses, ratio, clipped = f(lp, old, jnp.array([1.0]), jnp.ones((1, 2)))
  np.testing.assert_allclose(losses, [[-s, -s]], rtol=1e-6)
  np.testing.assert_array_equal(clipped, [[0, 0]])
  # Sequence form: d(−s·A)/d logπ_t = −A·s/n.
  grad = jax.grad(lambda lp: capo_jax.policy_loss(lp, old, jnp.array([1.0]), jnp.ones((1, 2)), method="gspo")[0])(lp)
  np.testing.assert_allclose(grad, [[-s / 2, -s / 2]], rtol=1e-5)


@JIT_MODES
def test_cispo_keeps_gradient_of_clipped_tokens(jit):
  # ρ = 2 → weight clipped to 1.28 but the token still gets gradient −1.28·A.
  lp = jnp.log(jnp.array([[2.0, 1.0]]))
  f = _maybe_jit(capo_jax.cispo_token_losses, jit)
  losses, _, clipped = f(lp, jnp.zeros((1, 2)), jnp.array([3.0]))
  np.testing.assert_allclose(losses, [[-1.28 * 3 * math.log(2.0), 0.0]], rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(clipped, [[1, 0]])
  grad = jax.grad(lambda lp: jnp.sum(capo_jax.cispo_token_losses(lp, jnp.zeros((1, 2)), jnp.array([3.0]))[0]))(lp)
  np.testing.assert_allclose(grad, [[-1.28 * 3, -3.0]], rtol=1e-6)


@JIT_MODES
def test_kl_estimators_by_hand(jit):
  # x = logπ_ref − logπ = ln 2.
  lp = jnp.array([[0.0]])
  ref = jnp.array([[math.log(2.0)]])
  for est, value in (("k1", -math.log(2.0)), ("k2", 0.5 * math.log(2.0) ** 2), ("k3", 2 - 1 - math.log(2.0))):
    f = _maybe_jit(capo_jax.kl_divergence, jit, estimator=est)
    np.testing.assert_allclose(f(lp, ref)[0, 0], value, rtol=1e-6, err_msg=est)
  f = _maybe_jit(capo_jax.kl_divergence, jit, estimator="k3", clamp=10.0)
  np.testing.assert_allclose(f(jnp.zeros((1, 1)), jnp.full((1, 1), 50.0))[0, 0], math.expm1(10.0) - 10.0, rtol=1e-6)


def test_k3_nonnegative_and_finite_for_large_and_tiny_gaps_float32():
  gaps = jnp.array([[-50.0, -20.0, -1e-7, -1e-30, 0.0, 1e-30, 1e-7, 20.0, 50.0]], jnp.float32)
  k3 = capo_jax.kl_divergence(jnp.zeros_like(gaps), gaps, estimator="k3")
  assert k3.dtype == jnp.float32
  assert np.all(np.isfinite(k3)) and np.all(np.asarray(k3) >= 0)
  np.testing.assert_allclose(k3[0, 0], 49.0, rtol=1e-6)  # e^{−50} + 50 − 1
  np.testing.assert_allclose(k3[0, -1], math.expm1(50.0) - 50.0, rtol=1e-5)
  # Small gaps: k3 ≈ x²/2, which the naive exp(x) − x − 1 rounds to 0 or garbage at 1e-4.
  np.testing.assert_allclose(capo_jax.kl_divergence(jnp.zeros((1, 1)), jnp.full((1, 1), 1e-3))[0, 0], 5.0017e-7,
                             rtol=1e-3)


def test_policy_loss_kl_entropy_terms_and_metrics():
  lp = jnp.log(jnp.array([[0.5, 0.5], [0.25, 0.5]]))
  old = lp - jnp.array([[0.0, math.log(1.5)], [0.0, 0.0]])  # ρ = 1.5 on token (0, 1)
  adv = jnp.array([1.0, -1.0])
  comp = jnp.ones((2, 2))
  ref = lp + math.log(2.0)  # x = ln 2 everywhere → k3 = 1 − ln 2
  ent = jnp.array([[0.5, 1.0], [1.5, 2.0]])
  base, m0 = capo_jax.policy_loss(lp, old, adv, comp)
  # Row 0: tokens −1 and −1.2 (clipped) → mean −1.1; row 1: +1, +1 → 1. Mean over rows −0.05.
  np.testing.assert_allclose(base, -0.05, rtol=1e-5)
  np.testing.assert_allclose(m0["clip_fraction"], 0.25)
  np.testing.assert_allclose(m0["ratio_max"], 1.5, rtol=1e-6)
  np.testing.assert_allclose(m0["ratio_mean"], (1 + 1.5 + 1 + 1) / 4, rtol=1e-6)
  full, m1 = capo_jax.policy_loss(lp, old, adv, comp, ref_logprobs_bt=ref, kl_coef=0.1, entropy_bt=ent,
                                  entropy_coef=0.01)
  np.testing.assert_allclose(full, -0.05 + 0.1 * (1 - math.log(2.0)) - 0.01 * (0.75 + 1.75) / 2, rtol=1e-5)
  np.testing.assert_allclose(m1["kl"], 1 - math.log(2.0), rtol=1e-6)
  np.testing.assert_allclose(m1["entropy"], 1.25, rtol=1e-6)


def test_policy_loss_jit_matches_eager():
  key = jax.random.PRNGKey(4)
  lp = -jax.random.uniform(key, (4, 6))
  old = lp + 0.1 * jax.random.normal(jax.random.PRNGKey(5), (4, 6))
  adv = jax.random.normal(jax.random.PRNGKey(6), (4,))
  mask = jax.random.bernoulli(jax.random.PRNGKey(8), 0.7, (4, 6))
  for method in ("clip", "gspo", "cispo"):
    f = functools.partial(capo_jax.policy_loss, method=method, aggregation="token-mean", ref_logprobs_bt=old,
                          kl_coef=0.05)
    eager, _ = f(lp, old, adv, mask)
    jitted, _ = jax.jit(f)(lp, old, adv, mask)
    np.testing.assert_allclose(eager, jitted, rtol=1e-6, err_msg=method)


def test_policy_loss_bad_input():
  lp = jnp.zeros((2, 3))
  with pytest.raises(AssertionError, match="rank"):
    capo_jax.policy_loss(lp, lp, jnp.zeros((2, 1)), jnp.ones((2, 3)))
  with pytest.raises(AssertionError, match="shape"):
    capo_jax.policy_loss(lp, jnp.zeros((2, 4)), jnp.zeros(2), jnp.ones((2, 3)))
  with pytest.raises(TypeError, match="floating"):
    capo_jax.policy_loss(jnp.zeros((2, 3), jnp.int32), lp, jnp.zeros(2), jnp.ones((2, 3)))
  with pytest.raises(ValueError, match="ref_logprobs"):
    capo_jax.policy_loss(lp, lp, jnp.zeros(2), jnp.ones((2, 3)), kl_coef=0.1)
  with pytest.raises(ValueError, match="unknown aggregation"):
    capo_jax.policy_loss(lp, lp, jnp.zeros(2), jnp.ones((2, 3)), aggregation="sum")
  with pytest.raises(ValueError, match="unknown policy-loss method"):
    capo_jax.policy_loss(lp, lp, jnp.zeros(2), jnp.ones((2, 3)), method="ppo2")
  with pytest.raises(ValueError, match="dual_clip"):
    capo_jax.policy_loss(lp, lp, jnp.zeros(2), jnp.ones((2, 3)), dual_clip=0.5)
  with pytest.raises(ValueError, match="unknown KL"):
    capo_jax.kl_divergence(lp, lp, estimator="k4")


# ---------------------------------------------------------------------------------------------------------------
# Input hardening: mask values, garbage in masked-out slots, extreme log-ratios.


def test_concrete_mask_with_values_other_than_0_1_raises_one_clear_error():
  lp = jnp.log(jnp.full((2, 3), 0.5))
  adv = jnp.array([1.0, -1.0])
  ones = jnp.ones((2, 3))
  flipped = ones.at[1, 2].set(-1.0)
  with pytest.raises(ValueError, match=r"completion_mask_bt must be a 0/1 mask, but 1 of its 6 entries .*-1\.0.* "
                                       r"index \[1, 2\]"):
    capo_jax.policy_loss(lp, lp, adv, flipped)
  with pytest.raises(ValueError, match=r"token_mask_bt must be a 0/1 mask, but 2 of its 6 entries"):
    capo_jax.policy_loss(lp, lp, adv, ones, token_mask_bt=ones.at[0, 0].set(0.5).at[1, 1].set(jnp.nan))
  with pytest.raises(ValueError, match="mask_bt must be a 0/1 mask"):
    capo_jax.aggregate_token_losses(lp, jnp.full((2, 3), 2))
  with pytest.raises(ValueError, match="mask_bt must be a 0/1 mask"):
    capo_jax.gspo_token_losses(lp, lp, adv, flipped)
  # Boolean, int and float 0/1 masks are all accepted and mean the same thing.
  keep = np.array([[1, 1, 0], [1, 0, 0]])
  values = [float(capo_jax.policy_loss(lp - 0.1, lp, adv, m)[0])
            for m in (jnp.asarray(keep, bool), jnp.asarray(keep, jnp.int32), jnp.asarray(keep, jnp.float32))]
  assert values[0] == values[1] == values[2]


def test_traced_mask_is_read_as_positive_entries_never_flipping_a_token():
  # Under jit the values cannot be checked: −1 must drop the token (as 0 does), not flip the sign of its loss.
  lp = jnp.log(jnp.array([[0.5, 0.25, 0.5]]))
  old = lp - jnp.array([[0.1, 0.0, -0.1]])
  adv = jnp.array([2.0])
  f = jax.jit(lambda lp, m: capo_jax.policy_loss(lp, old, adv, m)[0])
  dropped = f(lp, jnp.array([[1.0, 1.0, 0.0]]))
  np.testing.assert_array_equal(f(lp, jnp.array([[1.0, 1.0, -1.0]])), dropped)
  # Row 0: tokens with ρ = e^0.1 (≤ 1.2, unclipped) and ρ = 1 → mean of −2e^0.1 and −2.
  np.testing.assert_allclose(dropped, -(2 * math.exp(0.1) + 2) / 2, rtol=1e-6)
  np.testing.assert_array_equal(jax.grad(f)(lp, jnp.array([[1.0, 1.0, -1.0]])),
                                jax.grad(f)(lp, jnp.array([[1.0, 1.0, 0.0]])))


@pytest.mark.parametrize("method", ["clip", "gspo", "cispo"])
@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@JIT_MODES
def test_garbage_in_masked_slots_changes_neither_loss_metrics_nor_gradients(method, aggregation, jit):
  k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(11), 4)
  lp = -jax.random.uniform(k1, (3, 5), minval=0.1, maxval=3.0)
  old = lp + 0.3 * jax.random.normal(k2, (3, 5))
  ref = lp + 0.3 * jax.random.normal(k3, (3, 5))
  ent = jax.random.uniform(k4, (3, 5))
  comp = jnp.array([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], jnp.float32)  # row 1: nothing kept
  capo = jnp.array([[1, 0, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 0, 1, 1]], jnp.float32)
  kept = (comp * capo) > 0
  adv = jnp.array([1.5, 0.7, -0.8])

  def dirty(x, fill):
    return jnp.where(kept, x, fill)

  def run(lp, old, ref, ent, adv):
    f = functools.partial(capo_jax.policy_loss, method=method, aggregation=aggregation, kl_coef=0.1,
                          entropy_coef=0.01)

    def loss_fn(lp):
      return f(lp, old, adv, comp, token_mask_bt=capo, ref_logprobs_bt=ref, entropy_bt=ent)

    vg = jax.value_and_grad(loss_fn, has_aux=True)
    return (jax.jit(vg) if jit else vg)(lp)

  (clean_loss, clean_metrics), clean_grad = run(lp, old, ref, ent, adv)
  (loss, metrics), grad = run(dirty(lp, jnp.nan), dirty(old, jnp.inf), dirty(ref, -jnp.inf), dirty(ent, jnp.nan),
                              adv.at[1].set(jnp.nan))
  assert np.isfinite(float(loss)) and np.all(np.isfinite(np.asarray(grad)))
  np.testing.assert_array_equal(loss, clean_loss)
  np.testing.assert_array_equal(grad, clean_grad)
  assert np.all(np.asarray(grad)[~np.asarray(kept)] == 0.0)
  for key, value in clean_metrics.items():
    np.testing.assert_array_equal(metrics[key], value, err_msg=key)


def _extreme_cases():
  """(method, kwargs, A, x = logπ − logπ_old, loss, dloss/dlogπ): the analytic values at |x| = 1000 and beyond."""
  big = 1000.0
  cases = [
      ("clip-pos-A-huge-ratio", "clip", {}, 1.0, big, -1.2, 0.0),       # ρ ≫ 1+ε, A > 0: clipped at (1+ε)A
      ("clip-pos-A-zero-ratio", "clip", {}, 1.0, -big, 0.0, 0.0),       # ρ = e^{−1000} = 0 (exact limit): −ρA = 0
      ("clip-neg-A-zero-ratio", "clip", {}, -1.0, -big, 0.8, 0.0),      # ρ ≪ 1−ε, A < 0: clipped at (1−ε)A
      ("clip-zero-A-huge-ratio", "clip", {}, 0.0, big, 0.0, 0.0),       # A = 0: inf·0 must not become NaN
      ("dual-clip-neg-A-huge-ratio", "clip", {"dual_clip": 3.0}, -1.0, big, 3.0, 0.0),  # −ρA bounded at −cA
      ("clip-neg-A-below-cap", "clip", {}, -1.0, 5.0, math.exp(5.0), math.exp(5.0)),  # unbounded branch, exact
      ("clip-neg-A-capped", "clip", {}, -1.0, big, math.exp(60.0), 0.0),  # e^1000 overflows: capped at e^60·|A|
      ("cispo-huge-ratio", "cispo", {}, 2.0, big, 0.0, -1.28 * 2.0),   # weight 1+ε_high = 1.28; ℓ = −1.28·A·logπ
      ("cispo-zero-ratio", "cispo", {}, 2.0, -big, 0.0, 0.0),          # weight ρ = 0 (no lower bound)
      ("gspo-huge-ratio", "gspo", {}, 1.0, big, -(1 + 4e-4), 0.0),     # sequence ratio ≫ 1+ε_high
      ("gspo-zero-ratio", "gspo", {}, 1.0, -big, 0.0, 0.0),            # sequence ratio 0
  ]
  return [pytest.param(*case[1:], id=case[0]) for case in cases]


@pytest.mark.parametrize("method,kwargs,adv,x,loss,grad", _extreme_cases())
@JIT_MODES
def test_extreme_log_ratios_give_finite_analytic_losses_and_gradients(method, kwargs, adv, x, loss, grad, jit):
  # logπ = 0 for CISPO's ℓ = −w·A·logπ to be finite at the point; old = logπ − x.
  lp = jnp.zeros((1, 1)) if x > 0 or method != "cispo" else jnp.full((1, 1), -1000.0)
  old = lp - x

  def loss_fn(lp):
    return capo_jax.policy_loss(lp, old, jnp.array([adv]), jnp.ones((1, 1)), method=method, **kwargs)[0]

  vg = jax.value_and_grad(loss_fn)
  value, g = (jax.jit(vg) if jit else vg)(lp)
  assert np.isfinite(float(value)) and np.isfinite(float(g[0, 0]))
  np.testing.assert_allclose(value, loss, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(g[0, 0], grad, rtol=1e-5, atol=1e-7)


@JIT_MODES
def test_kl_estimators_at_extreme_log_ratios(jit):
  # x = logπ_ref − logπ = ±1000. k1 = −x, k2 = x²/2, k3 = eˣ − x − 1 (999 at x = −1000; capped at e^60 − 61 above).
  lp = jnp.zeros((1, 2))
  ref = jnp.array([[1000.0, -1000.0]])
  expected = {
      "k1": ([-1000.0, 1000.0], [1.0, 1.0]),
      "k2": ([5e5, 5e5], [-1000.0, 1000.0]),
      "k3": ([math.expm1(60.0) - 60.0, 999.0], [0.0, 1.0]),
  }
  for est, (value, grad) in expected.items():
    f = _maybe_jit(capo_jax.kl_divergence, jit, estimator=est)
    np.testing.assert_allclose(f(lp, ref)[0], value, rtol=1e-6, err_msg=est)
    for i in range(2):
      g = jax.grad(lambda lp, i=i: f(lp, ref)[0, i])(lp)
      np.testing.assert_allclose(g[0, i], grad[i], rtol=1e-6, err_msg=f"{est} token {i}")
  # In the full loss (k3, β = 0.1, ρ ≡ 1) the value and gradient stay finite with x = ±1000.
  loss_fn = lambda lp: capo_jax.policy_loss(lp, jax.lax.stop_gradient(lp), jnp.array([1.0]), jnp.ones((1, 2)),
                                            ref_logprobs_bt=ref, kl_coef=0.1)[0]
  value, g = jax.jit(jax.value_and_grad(loss_fn))(lp)
  # pg = −A·ρ = −1 per token; KL mean (e^60 − 61 + 999)/2; gradient −1/2 + 0.1·(0 + 1)/2 per token.
  np.testing.assert_allclose(value, -1.0 + 0.1 * (math.expm1(60.0) - 60.0 + 999.0) / 2, rtol=1e-5)
  np.testing.assert_allclose(g, [[-0.5, -0.5 + 0.05]], rtol=1e-5)
