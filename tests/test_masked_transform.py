"""Tests of capo_jax.masked_transform: construction errors, the gradient through the mask, real/shadow moments,
η sources, a jitted optax.chain on a tiny policy, and an Orbax round trip that continues identically."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from capo_jax import curvature as cv
from capo_jax.masked_transform import MaskedTransformState, find_unembedding, masked_transform
from capo_jax.ops import chunking

V, H, B, T, K = 13, 8, 4, 6, 5


def _params(seed=0, tied=False):
  k = jax.random.split(jax.random.key(seed), 3)
  p = {"embed": {"embedding": 0.5 * jax.random.normal(k[0], (V, H))},
       "mlp": {"w": jax.random.normal(k[1], (H, H)) / np.sqrt(H), "b": jnp.zeros(H)}}
  if not tied:
    p["lm_head"] = {"weight": 0.5 * jax.random.normal(k[2], (V, H))}
  return p


def _forward(params, tokens_bt1):
  """Tiny causal policy: embedding → causal running mean → MLP → RMS norm → unembedding ([V,H], 'lm_head')."""
  x = params["embed"]["embedding"][tokens_bt1[:, :-1]]
  x = jnp.cumsum(x, axis=1) / jnp.arange(1, x.shape[1] + 1)[None, :, None]
  h = jnp.tanh(x @ params["mlp"]["w"] + params["mlp"]["b"])
  h = h * jax.lax.rsqrt(jnp.mean(h**2, -1, keepdims=True) + 1e-6)
  w = params["lm_head"]["weight"] if "lm_head" in params else params["embed"]["embedding"]
  return h, h @ w.T


def _pg_loss(logits_btv, actions_bt, adv_b, mask_bt):
  """GRPO surrogate at ρ = 1, seq-mean-token-mean over the kept tokens (renormalised by the kept count)."""
  lp = jnp.take_along_axis(jax.nn.log_softmax(logits_btv), actions_bt[..., None], -1)[..., 0]
  per_token = -jnp.exp(lp - jax.lax.stop_gradient(lp)) * adv_b[:, None]
  return jnp.mean(jnp.sum(per_token * mask_bt, 1) / jnp.maximum(jnp.sum(mask_bt, 1), 1.0))


def _batch(seed=1):
  rng = np.random.default_rng(seed)
  tokens = jnp.asarray(rng.integers(0, V, size=(B, T + 1)))
  adv = jnp.asarray(rng.normal(size=B), jnp.float32)
  mask = jnp.ones((B, T)).at[0, 4:].set(0.0).at[2, 5:].set(0.0)
  return tokens, adv, mask


def _make_step(capo, tx):
  """The README train step: one forward, mask from the state, one backward, update with the aux."""

  def loss_fn(params, opt_state, tokens, adv, mask):
    hidden, logits = _forward(params, tokens)
    keep_bt, aux = capo.token_mask(opt_state, hidden, logits, tokens[:, 1:], adv, mask)
    return _pg_loss(logits, tokens[:, 1:], adv, keep_bt), aux

  @jax.jit
  def step(params, opt_state, tokens, adv, mask):
    grads, aux = jax.grad(loss_fn, has_aux=True)(params, opt_state, tokens, adv, mask)
    updates, opt_state = tx.update(grads, opt_state, params, capo_aux=aux)
    return optax.apply_updates(params, updates), opt_state, aux

  return loss_fn, step


def test_construction_errors():
  for bad in (0.0, -1e-4):
    with pytest.raises(ValueError, match="tau_fisher"):
      masked_transform(optax.adam(1e-3), tau_fisher=bad, tau_hessian=1e-2, learning_rate=1e-3)
    with pytest.raises(ValueError, match="tau_hessian"):
      masked_transform(optax.adam(1e-3), tau_fisher=1e-4, tau_hessian=bad, learning_rate=1e-3)
  with pytest.raises(ValueError, match="ScaleByAdamState"):  # Adam model asked of an optimizer without moments
    masked_transform(optax.sgd(1e-3), tau_fisher=1e-4, tau_hessian=1e-2, learning_rate=1e-3)
  with pytest.raises(ValueError, match="learning rate"):
    masked_transform(optax.adam(1e-3), tau_fisher=1e-4, tau_hessian=1e-2)
  with pytest.raises(ValueError, match="direction"):
    masked_transform(optax.adam(1e-3), tau_fisher=1e-4, tau_hessian=1e-2, learning_rate=1e-3, direction="newton")
  with pytest.raises(ValueError, match="moments"):
    masked_transform(optax.adam(1e-3), tau_fisher=1e-4, tau_hessian=1e-2, learning_rate=1e-3, moments="fake")
  # These are fine: SGD model needs no moments, shadow keeps its own, η from inject_hyperparams.
  masked_transform(optax.sgd(1e-3), tau_fisher=1e-4, tau_hessian=1e-2, learning_rate=1e-3, direction="sgd")
  masked_transform(optax.sgd(1e-3), tau_fisher=1e-4, tau_hessian=1e-2, learning_rate=1e-3, moments="shadow")
  masked_transform(optax.inject_hyperparams(optax.adam)(learning_rate=1e-3), tau_fisher=1e-4, tau_hessian=1e-2)


def test_init_errors():
  tx = masked_transform(optax.adam(1e-3), tau_fisher=1e-4, tau_hessian=1e-2, learning_rate=1e-3, top_k=V + 1)
  with pytest.raises(ValueError, match="exceeds the vocabulary"):
    tx.init(_params())
  tx = masked_transform(optax.adam(1e-3), tau_fisher=1e-4, tau_hessian=1e-2, learning_rate=1e-3, top_k=K)
  with pytest.raises(ValueError, match="no rank-2 parameter matches"):
    tx.init({"body": {"w": jnp.ones((3, 3))}})
  tx = masked_transform(optax.adam(1e-3), tau_fisher=1e-4, tau_hessian=1e-2, learning_rate=1e-3, top_k=K,
                        unembedding_predicate=lambda names, leaf: True)
  with pytest.raises(ValueError, match="matches 3 rank-2"):
    tx.init(_params())
  # Optimizers whose init needs the real params structure are checked at init instead of construction.
  multi = optax.multi_transform({"a": optax.sgd(1e-3), "b": optax.sgd(1e-3)},
                                {"embed": {"embedding": "a"}, "mlp": {"w": "a", "b": "a"}, "lm_head": {"weight": "b"}})
  tx = masked_transform(multi, tau_fisher=1e-4, tau_hessian=1e-2, learning_rate=1e-3, top_k=K)
  with pytest.raises(ValueError, match="ScaleByAdamState"):
    tx.init(_params())


def test_construction_probe_defers_structure_errors_and_raises_real_ones():
  """The construction-time probe (the inner init on a dummy params tree) defers to init only the errors of an
  optimizer that needs the real params structure (a labels function reading a key the dummy lacks: KeyError); an
  error of another kind raised by the inner init — a bug — propagates from the construction instead of being hidden."""

  def labels(p):  # reads the real structure: KeyError on the probe's dummy tree
    return {"embed": {"embedding": "a"}, "mlp": jax.tree.map(lambda _: "a", p["mlp"]), "lm_head": {"weight": "b"}}

  by_labels = optax.multi_transform({"a": optax.sgd(1e-3), "b": optax.adam(1e-3)}, labels)
  tx = masked_transform(by_labels, tau_fisher=1e-4, tau_hessian=1e-2, learning_rate=1e-3, top_k=K)
  state = tx.init(_params())  # checked here instead: exactly one ScaleByAdamState, on the unembedding
  assert state.inner_state is not None

  class InnerBug(RuntimeError):
    pass

  def buggy_init(params):
    del params
    raise InnerBug("bug in the inner optimizer's init")

  buggy = optax.GradientTransformation(buggy_init, optax.identity().update)
  with pytest.raises(InnerBug, match="bug in the inner"):
    masked_transform(buggy, tau_fisher=1e-4, tau_hessian=1e-2, learning_rate=1e-3, direction="sgd")

  def dividing_init(params):
    return 1 // 0

  with pytest.raises(ZeroDivisionError):
    masked_transform(optax.GradientTransformation(dividing_init, optax.identity().update), tau_fisher=1e-4,
                     tau_hessian=1e-2, learning_rate=1e-3, direction="sgd")


def test_find_unembedding_untied_and_tied():
  names, w = find_unembedding(_params())
  assert names == ("lm_head", "weight") and w.shape == (V, H)
  names, w = find_unembedding(_params(tied=True))
  assert names == ("embed", "embedding")


def _adam_after_one_step(capo, tx, params, batch):
  _, step = _make_step(capo, tx)
  opt_state = tx.init(params)
  params, opt_state, _ = step(params, opt_state, *batch)
  return params, opt_state


def test_gradient_through_the_mask_is_the_gradient_without_rejected_tokens():
  params, batch = _params(), _batch()
  tokens, adv, mask = batch
  loose = masked_transform(optax.adam(0.05), tau_fisher=1e9, tau_hessian=1e9, learning_rate=0.05, top_k=K)
  params, opt_state = _adam_after_one_step(loose, loose, params, batch)  # real, non-zero Adam moments
  hidden, logits = _forward(params, tokens)
  _, aux = jax.jit(loose.token_mask)(opt_state, hidden, logits, tokens[:, 1:], adv, mask)
  tau_h = float(jnp.median(jnp.abs(aux.m_hessian[mask > 0])))  # rejects about half of the tokens
  capo = masked_transform(optax.adam(0.05), tau_fisher=1e9, tau_hessian=tau_h, learning_rate=0.05, top_k=K)
  loss_fn, _ = _make_step(capo, capo)

  grads, aux = jax.jit(jax.grad(loss_fn, has_aux=True))(params, opt_state, tokens, adv, mask)
  kept = aux.mask_bt
  assert 0 < int(kept.sum()) < int(mask.sum())
  np.testing.assert_array_equal(kept, mask * (jnp.abs(aux.m_hessian) < tau_h))

  def loss_without_rejected(p):  # the mask as fixed data: rejected tokens removed from the completion mask
    _, lg = _forward(p, tokens)
    return _pg_loss(lg, tokens[:, 1:], adv, mask * kept)

  expected = jax.jit(jax.grad(loss_without_rejected))(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads, expected)
  unmasked = jax.jit(jax.grad(lambda p: _pg_loss(_forward(p, tokens)[1], tokens[:, 1:], adv, mask)))(params)
  assert not np.allclose(unmasked["lm_head"]["weight"], grads["lm_head"]["weight"], atol=1e-4)
  # And the transform's update of those gradients is the inner Adam's update of the same gradients.
  updates, _ = capo.update(grads, opt_state, params, capo_aux=aux)
  inner_updates, _ = optax.adam(0.05).update(expected, opt_state.inner_state, params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), updates, inner_updates)


def test_real_moments_and_injected_learning_rate_reach_the_statistics():
  params, batch = _params(), _batch()
  tokens, adv, mask = batch
  inner = optax.inject_hyperparams(optax.adam)(learning_rate=0.05, b1=0.8)
  capo = masked_transform(inner, tau_fisher=1e9, tau_hessian=1e9, top_k=K)
  params, opt_state = _adam_after_one_step(capo, capo, params, batch)
  hidden, logits = _forward(params, tokens)
  _, aux = capo.token_mask(opt_state, hidden, logits, tokens[:, 1:], adv, mask)
  adam = opt_state.inner_state.inner_state[0]
  assert int(adam.count) == 1
  expected = cv.curvature_statistics(
      hidden, logits, tokens[:, 1:], adv, mask, top_k=K, learning_rate=0.05,
      direction=cv.AdamDirection(adam.mu["lm_head"]["weight"], adam.nu["lm_head"]["weight"], 1, b1=0.8))
  np.testing.assert_allclose(aux.m_hessian, expected.m_hessian, rtol=1e-5, atol=1e-9)
  np.testing.assert_allclose(aux.metrics["learning_rate"], 0.05, rtol=1e-6)
  # The objective moment is −mu: reading optax's mu with the objective's sign gives other statistics.
  wrong = cv.curvature_statistics(
      hidden, logits, tokens[:, 1:], adv, mask, top_k=K, learning_rate=0.05,
      direction=cv.AdamDirection(adam.mu["lm_head"]["weight"], adam.nu["lm_head"]["weight"], 1, b1=0.8,
                                 moments_of_loss=False))
  assert not np.allclose(aux.m_hessian, wrong.m_hessian, rtol=1e-2)


def test_shadow_moments_follow_the_reference_update():
  params, (tokens, adv, mask) = _params(), _batch()
  capo = masked_transform(optax.adam(0.05), tau_fisher=1e9, tau_hessian=0.02, learning_rate=0.05, top_k=K,
                          moments="shadow")
  _, step = _make_step(capo, capo)
  opt_state = capo.init(params)
  mu, nu = np.zeros((V, H)), np.zeros((V, H))
  for i in range(2):
    hidden, logits = _forward(params, tokens)
    params, opt_state, aux = step(params, opt_state, tokens, adv, mask)
    if i == 0:  # no shadow moments yet: the reference's fallback d = g, i.e. the SGD model
      sgd = cv.curvature_statistics(hidden, logits, tokens[:, 1:], adv, mask, top_k=K, learning_rate=0.05)
      np.testing.assert_allclose(aux.m_hessian, sgd.m_hessian, rtol=1e-5, atol=1e-9)
    # Reference shadow update by hand: masked batch-mean per-row gradient, then Adam moments (0.9, 0.999).
    top = cv.top_k_policy(logits, tokens[:, 1:], K)
    keep = np.asarray(aux.mask_bt)
    g = np.zeros((V, H))
    for b in range(B):
      for t in range(T):
        if keep[b, t]:
          v = np.asarray(top.onehot_btk[b, t] - top.probs_btk[b, t])
          for k in range(K):
            g[int(top.ids_btk[b, t, k])] += float(adv[b]) * v[k] * np.asarray(hidden[b, t])
    g /= keep.sum()
    mu, nu = 0.1 * g + 0.9 * mu, 0.001 * g**2 + 0.999 * nu
    np.testing.assert_allclose(opt_state.shadow.mu, mu, rtol=1e-4, atol=1e-8)
    np.testing.assert_allclose(opt_state.shadow.nu, nu, rtol=1e-4, atol=1e-12)
    assert int(opt_state.shadow.count) == i + 1
    assert 0 < keep.sum() < mask.sum()
  with pytest.raises(ValueError, match="capo_aux"):
    capo.update(jax.tree.map(jnp.zeros_like, params), opt_state, params)


def test_chain_jits_three_steps_and_orbax_restore_continues_identically(tmp_path):
  params, batch = _params(tied=True), _batch()
  sched = optax.linear_schedule(0.05, 0.01, 10)
  capo = masked_transform(optax.adamw(sched), tau_fisher=1e-3, tau_hessian=1e-2, learning_rate=sched, top_k=K)
  tx = optax.chain(optax.clip_by_global_norm(1.0), capo, optax.scale(1.0))
  _, step = _make_step(capo, tx)
  opt_state = tx.init(params)
  for i in range(3):
    params, opt_state, aux = step(params, opt_state, *batch)
    assert int(opt_state[1].count) == i + 1
    np.testing.assert_allclose(aux.metrics["learning_rate"], sched(i), rtol=1e-6)
  assert all(np.isfinite(v) for v in jax.tree.leaves(opt_state[1].metrics))
  assert set(opt_state[1].metrics) >= {"rejected_fraction", "m_hessian_p99", "m_fisher_max"}

  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / "state", {"params": params, "opt_state": opt_state})
  ckpt.wait_until_finished()
  target = {"params": params, "opt_state": tx.init(params)}
  restored = ckpt.restore(tmp_path / "state", target)
  assert isinstance(restored["opt_state"][1], MaskedTransformState)

  a = (params, opt_state)
  b = (restored["params"], restored["opt_state"])
  for _ in range(2):
    *a, aux_a = step(*a, *batch)
    *b, aux_b = step(*b, *batch)
    np.testing.assert_array_equal(aux_a.mask_bt, aux_b.mask_bt)
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_sentence_granularity_masks_whole_rows():
  params, (tokens, adv, mask) = _params(), _batch()
  loose = masked_transform(optax.adam(0.05), tau_fisher=1e9, tau_hessian=1e9, learning_rate=0.05, top_k=K,
                           granularity="sentence", direction="sgd")
  hidden, logits = _forward(params, tokens)
  _, aux = loose.token_mask(loose.init(params), hidden, logits, tokens[:, 1:], adv, mask)
  assert aux.m_hessian.shape == (B,)
  tau = float(jnp.median(jnp.abs(aux.m_hessian)))
  capo = masked_transform(optax.adam(0.05), tau_fisher=1e9, tau_hessian=tau, learning_rate=0.05, top_k=K,
                          granularity="sentence", direction="sgd")
  keep, aux = capo.token_mask(capo.init(params), hidden, logits, tokens[:, 1:], adv, mask)
  rows = np.abs(np.asarray(aux.m_hessian)) < tau
  np.testing.assert_array_equal(keep, mask * rows[:, None])
  assert 0 < rows.sum() < B


@pytest.mark.parametrize("logits_chunk", [None, 4])
def test_token_mask_from_hidden_equals_token_mask(logits_chunk, monkeypatch):
  """The trainer's entry point (logits formed per time chunk from h and W) gives token_mask's mask, statistics,
  top-K and metrics; with a chunk of 4 over T = 6 a remainder chunk is exercised too."""
  params, batch = _params(), _batch()
  tokens, adv, mask = batch
  capo = masked_transform(optax.adam(0.05), tau_fisher=1e9, tau_hessian=1e9, learning_rate=0.05, top_k=K)
  params, opt_state = _adam_after_one_step(capo, capo, params, batch)
  hidden, logits = _forward(params, tokens)
  _, aux = capo.token_mask(opt_state, hidden, logits, tokens[:, 1:], adv, mask)
  tau_h = float(jnp.median(jnp.abs(aux.m_hessian[mask > 0])))  # a mask that really rejects tokens
  capo = masked_transform(optax.adam(0.05), tau_fisher=1e9, tau_hessian=tau_h, learning_rate=0.05, top_k=K)
  if logits_chunk is not None:
    monkeypatch.setattr(chunking, "AUTO_CHUNK_ELEMENTS", B * V * logits_chunk)
  want_mask, want = jax.jit(capo.token_mask)(opt_state, hidden, logits, tokens[:, 1:], adv, mask)
  got_mask, got = jax.jit(capo.token_mask_from_hidden)(
      opt_state, hidden, params["lm_head"]["weight"], tokens[:, 1:], adv, mask)
  assert 0 < int(got_mask.sum()) < int(mask.sum())
  np.testing.assert_array_equal(got_mask, want_mask)
  np.testing.assert_allclose(got.m_hessian, want.m_hessian, rtol=1e-5, atol=1e-9)
  np.testing.assert_allclose(got.m_fisher, want.m_fisher, rtol=1e-5, atol=1e-12)
  np.testing.assert_array_equal(got.top_k.ids_btk, want.top_k.ids_btk)
  for key in want.metrics:
    np.testing.assert_allclose(got.metrics[key], want.metrics[key], rtol=1e-5, atol=1e-12)
