"""Tests of capo_jax.curvature: the last-layer model against brute-force autodiff (float64), the Adam direction against
optax's own arithmetic, the pitfalls of docs/MATH.md §2.7, chunking/memory, granularities, mask rules, presets and
metrics. The top-K kernel's own tests are in test_top_k.py."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from capo_jax import curvature as cv

N, K, H, V = 7, 5, 4, 11


def _random_token_inputs(seed):
  """Random float64 per-token quantities; token 2 sampled outside the top-K (zero one-hot)."""
  rng = np.random.default_rng(seed)
  h = rng.normal(size=(N, H))
  wk = rng.normal(size=(N, K, H))  # the K×H block of W active at each token
  logits = np.einsum("nkh,nh->nk", wk, h)
  pi = np.exp(logits - logits.max(-1, keepdims=True))
  pi /= pi.sum(-1, keepdims=True)
  actions = rng.integers(0, K, size=N)
  onehot = np.eye(K)[actions]
  onehot[2] = 0.0
  adv = rng.normal(size=N)
  mu = 0.05 * rng.normal(size=(N, K, H))
  nu = 0.01 * rng.uniform(0.1, 1.0, size=(N, K, H))
  return [jnp.asarray(x) for x in (h, wk, pi, onehot, adv, mu, nu)]


def _log_prob(w_kh, h_h, e_k):
  """ℓ(W_K) = e·(W_K h) − logsumexp(W_K h): log softmax_K[a], or −logsumexp when a is outside the top-K."""
  z = w_kh @ h_h
  return e_k @ z - jax.nn.logsumexp(z)


def _brute_force_token(w_kh, h_h, e_k, adv, d_kh, eta):
  """⟨g,d⟩, dᵀĤd and m_F of one token by autodiff of the surrogate J(W) = A·exp(ℓ(W) − ℓ(W₀)) w.r.t. its K×H block;
  also dᵀĤd rebuilt as score outer product + log-softmax Hessian, the latter by forward-over-forward jvp."""
  ell0 = _log_prob(w_kh, h_h, e_k)
  surrogate = lambda w: adv * jnp.exp(_log_prob(w, h_h, e_k) - ell0)
  g = jax.grad(surrogate)(w_kh)
  hess = jax.hessian(surrogate)(w_kh)  # [K,H,K,H]
  dhd = jnp.einsum("ij,ijkl,kl->", d_kh, hess, d_kh)
  ell = lambda w: _log_prob(w, h_h, e_k)
  dl = jax.jvp(ell, (w_kh,), (d_kh,))[1]
  d2l = jax.jvp(lambda w: jax.jvp(ell, (w,), (d_kh,))[1], (w_kh,), (d_kh,))[1]
  return g, jnp.vdot(g, d_kh), dhd, 0.5 * eta**2 * dl**2, adv * (dl**2 + d2l)


_brute_force_tokens = jax.jit(jax.vmap(_brute_force_token, in_axes=(0, 0, 0, 0, 0, None)))


def _optax_adam_direction(g, mu, nu, count, b1=0.9, b2=0.999, eps=1e-8):
  """d from optax's own scale_by_adam: optax sees the LOSS gradient −g and loss moments (mu, nu); d = −update."""
  state = optax.ScaleByAdamState(count=jnp.asarray(count, jnp.int32), mu=mu, nu=nu)
  upd, _ = optax.scale_by_adam(b1=b1, b2=b2, eps=eps).update(-g, state)
  return -upd


@pytest.mark.parametrize("model", ["sgd", "adam", "adam_objective_moments", "adam_first_step"])
def test_token_stats_equal_brute_force_autodiff(model):
  """⟨g,d⟩, dᵀĤd and m_F of the last-layer model equal jax.hessian / jvp∘jvp of the per-token surrogate (1e-8)."""
  with jax.enable_x64(True):
    h, wk, pi, onehot, adv, mu, nu = _random_token_inputs(0)
    g = adv[:, None, None] * (onehot - pi)[:, :, None] * h[:, None, :]
    count = 0 if model == "adam_first_step" else 3
    if model == "sgd":
      direction, d = cv.SGDDirection(), g
    elif model == "adam":
      direction, d = cv.AdamDirection(mu, nu, count), _optax_adam_direction(g, mu, nu, count)
    elif model == "adam_objective_moments":  # shadow convention: moments of the objective gradient, +mu
      direction, d = cv.AdamDirection(-mu, nu, count, moments_of_loss=False), _optax_adam_direction(g, mu, nu, count)
    else:  # reference first-step fallback: d = g, not optax's sign-like first step
      direction, d = cv.AdamDirection(mu, nu, count), g
    for eta in (1.0, 0.37):
      stats = cv.last_layer_token_stats(h, pi, onehot, adv, eta, direction, chunk_size=3)
      g_bf, gd, dhd, mf, dhd_decomposed = _brute_force_tokens(wk, h, onehot, adv, d, eta)
      np.testing.assert_allclose(g_bf, g, rtol=1e-10, atol=1e-14)  # g_t = A v hᵀ
      np.testing.assert_allclose(dhd_decomposed, dhd, rtol=1e-10)
      np.testing.assert_allclose(stats.g_dot_d, gd, rtol=1e-8)
      np.testing.assert_allclose(stats.m_hessian, eta * gd + 0.5 * eta**2 * dhd, rtol=1e-8)
      np.testing.assert_allclose(stats.m_fisher, mf, rtol=1e-8)
      if eta == 1.0:  # isolate the bracket: m_H − ⟨g,d⟩ = ½ dᵀĤd
        np.testing.assert_allclose(2 * (stats.m_hessian - stats.g_dot_d), dhd, rtol=1e-8)


def test_adam_direction_is_optax_arithmetic_with_the_loss_sign():
  with jax.enable_x64(True):
    _, _, pi, onehot, adv, mu, nu = _random_token_inputs(1)
    g = jnp.asarray(np.random.default_rng(2).normal(size=mu.shape))
    for count in (1, 7, 200):
      ours = cv.adam_direction(g, mu, nu, count)
      np.testing.assert_allclose(ours, _optax_adam_direction(g, mu, nu, count), rtol=1e-12)
      # Non-default hyper-parameters travel through.
      ours = cv.adam_direction(g, mu, nu, count, b1=0.8, b2=0.99, eps=1e-6)
      np.testing.assert_allclose(ours, _optax_adam_direction(g, mu, nu, count, 0.8, 0.99, 1e-6), rtol=1e-12)
    # Sign pitfall: treating optax's loss moment as the objective's gives a different (wrong) direction.
    wrong = cv.adam_direction(g, mu, nu, 7, moments_of_loss=False)
    assert not np.allclose(wrong, _optax_adam_direction(g, mu, nu, 7), rtol=1e-3)
    # First-step pitfall: optax's first step is sign-like, the reference falls back to g.
    np.testing.assert_array_equal(cv.adam_direction(g, 0 * mu, 0 * nu, 0), g)
    optax_first = _optax_adam_direction(g, 0 * mu, 0 * nu, 0)
    np.testing.assert_allclose(jnp.abs(optax_first), 1.0, rtol=1e-4)


def test_adam_without_moments_falls_back_to_sgd():
  h, _, pi, onehot, adv, _, _ = _random_token_inputs(3)
  sgd = cv.last_layer_token_stats(h, pi, onehot, adv, 0.1, cv.SGDDirection())
  none = cv.last_layer_token_stats(h, pi, onehot, adv, 0.1, cv.AdamDirection(None, None, 5))
  jax.tree.map(np.testing.assert_array_equal, sgd, none)
  # SGD closed form by hand: ⟨g,d⟩ = A²‖h‖²‖v‖², m_F = ½η²(A‖h‖²‖v‖²)².
  v2 = jnp.sum((onehot - pi) ** 2, -1)
  h2 = jnp.sum(h**2, -1)
  np.testing.assert_allclose(sgd.g_dot_d, adv**2 * h2 * v2, rtol=1e-5)
  np.testing.assert_allclose(sgd.m_fisher, 0.5 * 0.01 * (adv * h2 * v2) ** 2, rtol=1e-5)


def test_tables_gathered_rows_and_chunk_sizes_agree():
  with jax.enable_x64(True):
    rng = np.random.default_rng(4)
    h, _, pi, onehot, adv, _, _ = _random_token_inputs(4)
    ids = jnp.asarray(np.stack([rng.choice(V, K, replace=False) for _ in range(N)]))
    mu_t, nu_t = jnp.asarray(rng.normal(size=(V, H))), jnp.asarray(rng.uniform(0.1, 1, size=(V, H)))
    ref = cv.last_layer_token_stats(h, pi, onehot, adv, 0.2, cv.AdamDirection(mu_t[ids], nu_t[ids], 4), chunk_size=N)
    for chunk in (1, 3, 100):
      got = cv.last_layer_token_stats(h, pi, onehot, adv, 0.2, cv.AdamDirection(mu_t, nu_t, 4), row_ids_nk=ids,
                                      chunk_size=chunk)
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12), got, ref)
    with pytest.raises(ValueError, match="row_ids_nk"):
      cv.last_layer_token_stats(h, pi, onehot, adv, 0.2, cv.AdamDirection(mu_t, nu_t, 4))


def _all_avals(jaxpr):
  """Shapes of every variable in a jaxpr and its sub-jaxprs (scan bodies)."""
  for eqn in jaxpr.eqns:
    for var in eqn.outvars:
      yield eqn.primitive.name, tuple(getattr(var.aval, "shape", ()))
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      yield from _all_avals(sub)


def test_adam_token_model_never_materialises_n_k_h():
  """Memory claim: with [V,H] tables, no intermediate holds all N·K·H elements; the per-chunk ones do exist."""
  n, k, h, v, chunk = 64, 6, 8, 40, 4
  args = (jnp.ones((n, h)), jnp.full((n, k), 1 / k), jnp.zeros((n, k)), jnp.ones(n))
  ids = jnp.tile(jnp.arange(k), (n, 1))
  fn = lambda mu, nu: cv.last_layer_token_stats(*args, 0.1, cv.AdamDirection(mu, nu, 3), row_ids_nk=ids,
                                                chunk_size=chunk)
  jaxpr = jax.make_jaxpr(fn)(jnp.ones((v, h)), jnp.ones((v, h))).jaxpr
  sizes = [int(np.prod(s)) for _, s in _all_avals(jaxpr)]
  assert max(sizes) < n * k * h, max(sizes)
  assert chunk * k * h in sizes  # the chunked K×H work is really there


def test_top_k_policy_one_hot_and_out_of_top_k():
  logits = jnp.array([[[0.0, 3.0, 1.0, 2.0, -1.0], [5.0, 0.0, 0.0, 0.0, 4.0]]])
  tokens = jnp.array([[3, 2]])  # second position samples a token outside the top-2
  top = cv.top_k_policy(logits, tokens, 2)
  np.testing.assert_array_equal(top.ids_btk, [[[1, 3], [0, 4]]])
  np.testing.assert_allclose(top.probs_btk[0, 0], jax.nn.softmax(jnp.array([3.0, 2.0])), rtol=1e-6)
  np.testing.assert_array_equal(top.onehot_btk, [[[0, 1], [0, 0]]])
  with pytest.raises(ValueError, match="top_k"):
    cv.top_k_policy(logits, tokens, 6)



def _model_outputs(seed, b=2, t=5):
  rng = np.random.default_rng(seed)
  w = jnp.asarray(rng.normal(size=(V, H)))
  hidden = jnp.asarray(rng.normal(size=(b, t, H)))
  logits = hidden @ w.T
  tokens = jnp.asarray(rng.integers(0, V, size=(b, t)))
  adv = jnp.asarray(rng.normal(size=b))
  mask = jnp.asarray((rng.uniform(size=(b, t)) < 0.8).astype(np.float64)).at[:, 0].set(1.0)
  mu = jnp.asarray(0.05 * rng.normal(size=(V, H)))
  nu = jnp.asarray(0.01 * rng.uniform(0.1, 1, size=(V, H)))
  return w, hidden, logits, tokens, adv, mask, mu, nu


def test_token_granularity_matches_the_isolated_function():
  with jax.enable_x64(True):
    w, hidden, logits, tokens, adv, mask, mu, nu = _model_outputs(5)
    stats = cv.curvature_statistics(hidden, logits, tokens, adv, mask, top_k=K, learning_rate=0.1,
                                    direction=cv.AdamDirection(mu, nu, 2))
    top = stats.top_k
    assert stats.m_hessian.shape == tokens.shape
    flat = lambda x: x.reshape(-1, *x.shape[2:])
    ids = flat(top.ids_btk)
    ref = cv.last_layer_token_stats(flat(hidden), flat(top.probs_btk), flat(top.onehot_btk),
                                    jnp.repeat(adv, tokens.shape[1]), 0.1, cv.AdamDirection(mu[ids], nu[ids], 2))
    np.testing.assert_allclose(flat(stats.m_hessian), ref.m_hessian, rtol=1e-12)
    np.testing.assert_allclose(flat(stats.m_fisher), ref.m_fisher, rtol=1e-12)


@pytest.mark.parametrize("granularity", ["sentence", "global"])
@pytest.mark.parametrize("model", ["sgd", "adam"])
def test_sentence_and_global_equal_autodiff_of_the_mean_surrogate(granularity, model):
  """m_H = η⟨G,D⟩ + ½η² Dᵀ∇²J D and m_F = ½η² mean_t (∇ℓ_t·D)² for J the row / batch mean surrogate over the
  completion tokens, G = ∇J on the full [V,H] W, D = G (SGD) or optax's Adam step for G; Hessian by jvp of grad."""
  with jax.enable_x64(True):
    w, hidden, logits, tokens, adv, mask, mu, nu = _model_outputs(6)
    eta, count = 0.3, 4
    top = cv.top_k_policy(logits, tokens, K)

    def ell(w_vh, b, t):
      z = w_vh[top.ids_btk[b, t]] @ hidden[b, t]
      return top.onehot_btk[b, t] @ z - jax.nn.logsumexp(z)

    @jax.jit
    def brute(weights_bt):
      cells = [(b, t) for b in range(tokens.shape[0]) for t in range(tokens.shape[1])]
      j = lambda w_vh: sum(weights_bt[b, t] * adv[b] * jnp.exp(ell(w_vh, b, t) - ell(w, b, t)) for b, t in cells)
      g = jax.grad(j)(w)
      d = g if model == "sgd" else _optax_adam_direction(g, mu, nu, count)
      hd = jax.jvp(jax.grad(j), (w,), (d,))[1]
      dl = {c: jax.jvp(lambda x: ell(x, *c), (w,), (d,))[1] for c in cells}
      m_h = eta * jnp.vdot(g, d) + 0.5 * eta**2 * jnp.vdot(d, hd)
      m_f = 0.5 * eta**2 * sum(weights_bt[b, t] * dl[(b, t)] ** 2 for b, t in cells)
      return m_h, m_f

    direction = cv.SGDDirection() if model == "sgd" else cv.AdamDirection(mu, nu, count)
    stats = cv.curvature_statistics(hidden, logits, tokens, adv, mask, top_k=K, learning_rate=eta,
                                    direction=direction, granularity=granularity, chunk_size=2)
    if granularity == "global":
      assert stats.m_hessian.shape == ()
      m_h, m_f = brute(mask / mask.sum())
      np.testing.assert_allclose(stats.m_hessian, m_h, rtol=1e-8)
      np.testing.assert_allclose(stats.m_fisher, m_f, rtol=1e-8)
    else:
      assert stats.m_hessian.shape == (tokens.shape[0],)
      for b in range(tokens.shape[0]):
        row_w = jnp.zeros_like(mask).at[b].set(mask[b] / mask[b].sum())
        m_h, m_f = brute(row_w)
        np.testing.assert_allclose(stats.m_hessian[b], m_h, rtol=1e-8)
        np.testing.assert_allclose(stats.m_fisher[b], m_f, rtol=1e-8)


def test_unembedding_gradient_is_the_top_k_surrogate_gradient():
  with jax.enable_x64(True):
    w, hidden, logits, tokens, adv, mask, _, _ = _model_outputs(7)
    top = cv.top_k_policy(logits, tokens, K)
    flat = lambda x: x.reshape(-1, *x.shape[2:])
    wts = flat(mask) / mask.sum()
    got = cv.unembedding_gradient(flat(hidden), flat(top.probs_btk), flat(top.onehot_btk), flat(top.ids_btk),
                                  jnp.repeat(adv, tokens.shape[1]), wts, V, chunk_size=3)

    def j(w_vh):  # Σ_t w_t A_t ℓ_t(W) restricted to the top-K rows
      z = jnp.einsum("nkh,nh->nk", w_vh[flat(top.ids_btk)], flat(hidden))
      ell = jnp.sum(flat(top.onehot_btk) * z, -1) - jax.nn.logsumexp(z, -1)
      return jnp.sum(wts * jnp.repeat(adv, tokens.shape[1]) * ell)

    np.testing.assert_allclose(got, jax.grad(j)(w), rtol=1e-10, atol=1e-14)


def test_mask_rules_by_hand():
  m_h = jnp.array([-0.02, -0.005, 0.0, 0.005, 0.02, 0.009])
  m_f = jnp.array([1e-5, 1e-5, 1e-5, 2e-4, 1e-5, 1e-5])
  sym = cv.curvature_mask(m_h, m_f, tau_fisher=1e-4, tau_hessian=1e-2)
  np.testing.assert_array_equal(sym.hessian_keep, [False, True, True, True, False, True])
  np.testing.assert_array_equal(sym.fisher_keep, [True, True, True, False, True, True])
  np.testing.assert_array_equal(sym.keep, [False, True, True, False, False, True])
  non = cv.curvature_mask(m_h, m_f, tau_fisher=1e-4, tau_hessian=1e-2, hessian_rule="nonsymmetric")
  np.testing.assert_array_equal(non.hessian_keep, [False, False, True, True, False, True])
  for bad in (0.0, -1e-3):
    with pytest.raises(ValueError, match="tau_fisher"):
      cv.curvature_mask(m_h, m_f, tau_fisher=bad, tau_hessian=1e-2)
    with pytest.raises(ValueError, match="tau_hessian"):
      cv.CurvatureMaskConfig(tau_fisher=1e-4, tau_hessian=bad)
  with pytest.raises(ValueError, match="hessian_rule"):
    cv.hessian_keep(m_h, 1e-2, "both")
  np.testing.assert_array_equal(cv.broadcast_to_tokens(jnp.array([True, False]), (2, 3)),
                                [[True] * 3, [False] * 3])


def test_presets_have_the_released_thresholds():
  assert (cv.preset("CAPO").tau_fisher, cv.preset("CAPO").tau_hessian) == (1e-4, 1e-2)
  assert (cv.preset("Dr.CAPO").tau_fisher, cv.preset("Dr.CAPO").tau_hessian) == (1e-3, 5e-4)
  assert (cv.preset("ReinCAPO").tau_fisher, cv.preset("rein_capo").tau_hessian) == (1e-5, 1e-1)
  for p in cv.PRESETS.values():
    assert (p.direction, p.hessian_rule, p.granularity, p.top_k) == ("adam", "symmetric", "token", 50)
  assert cv.DR_CAPO.as_kwargs()["tau_hessian"] == 5e-4
  with pytest.raises(ValueError, match="preset"):
    cv.preset("grpo")


def test_mask_setting_is_checked_once_for_config_and_transform():
  """CurvatureMaskConfig and masked_transform share validation.check_mask_setting: each bad field is named, with the
  accepted values; an infinite τ (a disabled rule, the τ = ∞ monitor) and a NaN τ are told apart."""
  good = dict(tau_fisher=1e-4, tau_hessian=1e-2)
  for field, bad, message in (("granularity", "row", r"granularity must be one of \('token', 'sentence', 'global'\)"),
                              ("direction", "newton", r"direction must be one of \('adam', 'sgd'\)"),
                              ("hessian_rule", "both", "hessian_rule must be one of"),
                              ("top_k", 0, "top_k must be a positive int"),
                              ("top_k", 2.5, "top_k must be a positive int"),
                              ("tau_fisher", float("nan"), "tau_fisher must be > 0")):
    with pytest.raises(ValueError, match=message):
      cv.CurvatureMaskConfig(**{**good, field: bad})
  assert cv.CurvatureMaskConfig(tau_fisher=float("inf"), tau_hessian=float("inf")).top_k == 50
  with pytest.raises(ValueError, match="top_k=6 exceeds the vocabulary size 5"):
    cv.top_k_policy(jnp.zeros((1, 2, 5)), jnp.zeros((1, 2), jnp.int32), 6)


def test_penalty_by_hand():
  m_h = jnp.array([-0.2, 0.1, 0.4])
  m_f = jnp.array([0.01, 0.02, 0.03])
  w = jnp.array([1.0, 1.0, 0.0])
  sym = cv.curvature_penalty(m_h, m_f, w, lambda_hessian=2.0, lambda_fisher=10.0)
  np.testing.assert_allclose(sym, ((10 * 0.01 + 2 * 0.2) + (10 * 0.02 + 2 * 0.1)) / 2, rtol=1e-6)
  non = cv.curvature_penalty(m_h, m_f, w, lambda_hessian=2.0, hessian_rule="nonsymmetric")
  np.testing.assert_allclose(non, (2 * 0.2 + 0.0) / 2, rtol=1e-6)
  # The penalty is differentiable through the statistics (computed without stop_gradient).
  h, _, pi, onehot, adv, _, _ = _random_token_inputs(8)
  grad = jax.grad(lambda hh: cv.curvature_penalty(
      *cv.last_layer_token_stats(hh, pi, onehot, adv, 0.1)[1:], jnp.ones(N), lambda_fisher=1.0))(h)
  assert float(jnp.abs(grad).sum()) > 0


def test_mask_metrics_by_hand():
  m_h = jnp.array([[0.1, 0.2, 0.3, 5.0], [0.4, -9.0, 0.0, 0.0]])
  m_f = jnp.array([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 99.0, 0.0]])
  valid = jnp.array([[1, 1, 1, 1], [1, 1, 1, 0]])
  mask = cv.curvature_mask(m_h, m_f, tau_fisher=10.0, tau_hessian=1.0)
  out = cv.mask_metrics(m_h, m_f, mask, valid)
  assert set(out) == set(cv.METRIC_KEYS)
  # valid = 7 units; rejected: 5.0 (Hessian), -9.0 (Hessian), 99 (Fisher) → 3/7.
  np.testing.assert_allclose(out["rejected_fraction"], 3 / 7, rtol=1e-6)
  np.testing.assert_allclose(out["rejected_by_hessian"], 2 / 7, rtol=1e-6)
  np.testing.assert_allclose(out["rejected_by_fisher"], 1 / 7, rtol=1e-6)
  kept_h, kept_f = np.array([0.1, 0.2, 0.3, 0.4]), np.array([1.0, 2.0, 3.0, 4.0])
  np.testing.assert_allclose(out["m_hessian_p50"], np.quantile(kept_h, 0.5), rtol=1e-6)
  np.testing.assert_allclose(out["m_fisher_p90"], np.quantile(kept_f, 0.9), rtol=1e-6)
  np.testing.assert_allclose(out["m_hessian_max"], 0.4, rtol=1e-6)
  np.testing.assert_allclose(out["m_fisher_max"], 4.0, rtol=1e-6)


@pytest.mark.parametrize("chunk", [None, 3])
def test_top_k_policy_from_hidden_never_forms_the_logits(chunk, monkeypatch):
  """top_k_policy_from_hidden = top_k_policy(h Wᵀ) (as sets along K; the CPU path selects, V = 1024, K = 50), with
  a time remainder chunk (T = 7, chunk 3), and no intermediate of B·T·V elements exists — with an explicit chunk and
  with the automatic one (its element budget lowered here so that it must split T = 7 into chunks of 2)."""
  from capo_jax.ops import chunking  # pylint: disable=import-outside-toplevel
  b, t, h, v, k = 3, 7, 16, 1024, 50
  monkeypatch.setattr(chunking, "AUTO_CHUNK_ELEMENTS", 2 * b * v)
  expected_chunk = 3 if chunk is not None else 2
  rng = np.random.default_rng(3)
  hidden = jnp.asarray(rng.normal(size=(b, t, h)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(v, h)), jnp.float32)
  tokens = jnp.asarray(rng.integers(0, v, size=(b, t)))
  valid = jnp.asarray(rng.uniform(size=(b, t)) < 0.8)
  logits = jnp.einsum("bth,vh->btv", hidden, w, preferred_element_type=jnp.float32)
  want = cv.top_k_policy(logits, tokens, k, 0.7, valid_bt=valid)
  fn = lambda hd, ww: cv.top_k_policy_from_hidden(hd, ww, tokens, k, 0.7, valid_bt=valid, chunk_size=chunk)
  got = jax.jit(fn)(hidden, w)
  for field in ("ids_btk", "probs_btk", "onehot_btk"):
    np.testing.assert_allclose(getattr(got, field), getattr(want, field), rtol=1e-6, atol=1e-7, err_msg=field)
  sizes = [int(np.prod(s)) for _, s in _all_avals(jax.make_jaxpr(fn)(hidden, w).jaxpr)]
  assert max(sizes) < b * t * v, max(sizes)
  assert b * expected_chunk * v in sizes  # the per-chunk logits block is really there
