"""Per-token log-probs/entropies: hand values, chunking equivalence, fused unembedding, memory bound; and the
time-chunking helpers they share with CAPO's mask (capo_jax.ops.chunking)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import capo_jax
from capo_jax.ops import chunking


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_logprob_and_entropy_by_hand(jit):
  p = np.array([0.1, 0.2, 0.3, 0.4])
  logits = jnp.log(jnp.asarray(p, jnp.float32))[None, None, :] + 7.0  # a constant shift must not matter
  tokens = jnp.array([[2]])
  f = jax.jit(capo_jax.token_logprobs) if jit else capo_jax.token_logprobs
  lp, ent = f(logits, tokens)
  assert lp.dtype == jnp.float32 and ent.dtype == jnp.float32
  np.testing.assert_allclose(lp[0, 0], math.log(0.3), rtol=1e-6)
  np.testing.assert_allclose(ent[0, 0], -(p * np.log(p)).sum(), rtol=1e-6)
  # Temperature 2: probabilities ∝ sqrt(p).
  lp2, ent2 = capo_jax.token_logprobs(logits, tokens, temperature=2.0)
  q = np.sqrt(p) / np.sqrt(p).sum()
  np.testing.assert_allclose(lp2[0, 0], math.log(q[2]), rtol=1e-6)
  np.testing.assert_allclose(ent2[0, 0], -(q * np.log(q)).sum(), rtol=1e-6)


def test_chunked_equals_unchunked_values_and_gradients():
  key = jax.random.PRNGKey(0)
  logits = 3.0 * jax.random.normal(key, (3, 7, 11))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (3, 7), 0, 11)
  weights = jax.random.normal(jax.random.PRNGKey(2), (3, 7))

  def objective(z, chunk):
    lp, ent = capo_jax.token_logprobs(z, tokens, chunk_size=chunk)
    return jnp.sum(weights * lp) + 0.3 * jnp.sum(ent)

  full, g_full = jax.value_and_grad(objective)(logits, None)
  for chunk in (1, 3, 7):  # 3 leaves a remainder of 1
    val, g = jax.value_and_grad(objective)(logits, chunk)
    np.testing.assert_allclose(val, full, rtol=1e-5)
    np.testing.assert_allclose(g, g_full, rtol=1e-5, atol=1e-6)
  # Gradient of Σ w logπ(a) w.r.t. the logits is w (e_a − π): check one position by hand.
  pi = jax.nn.softmax(logits[0, 0])
  lp_only = jax.grad(lambda z: jnp.sum(weights * capo_jax.token_logprobs(z, tokens, chunk_size=3)[0]))(logits)
  np.testing.assert_allclose(lp_only[0, 0], weights[0, 0] * (jax.nn.one_hot(tokens[0, 0], 11) - pi), atol=1e-6)


def test_fused_unembedding_equals_logits_path_and_bf16_gives_float32():
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(3), 3)
  h = jax.random.normal(k1, (2, 5, 8))
  w = jax.random.normal(k2, (13, 8))
  tokens = jax.random.randint(k3, (2, 5), 0, 13)
  lp_ref, ent_ref = capo_jax.token_logprobs(h @ w.T, tokens)
  lp, ent = capo_jax.token_logprobs_from_hidden(h, w, tokens, chunk_size=2)
  np.testing.assert_allclose(lp, lp_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ent, ent_ref, rtol=1e-5, atol=1e-5)
  g_ref = jax.grad(lambda h, w: capo_jax.token_logprobs(h @ w.T, tokens)[0].sum(), argnums=(0, 1))(h, w)
  g = jax.grad(lambda h, w: capo_jax.token_logprobs_from_hidden(h, w, tokens, chunk_size=2)[0].sum(),
               argnums=(0, 1))(h, w)
  for a, b in zip(g, g_ref):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  lp16, _ = capo_jax.token_logprobs((h @ w.T).astype(jnp.bfloat16), tokens)
  assert lp16.dtype == jnp.float32
  np.testing.assert_allclose(lp16, lp_ref, atol=0.1)  # bf16 logits carry ~3 significant digits


def test_chunking_bounds_memory():
  """The compiled program never holds a float32 copy of the [B,T,V] logits (forward), nor does the fused path
  hold the logits at all in forward+backward."""
  b, t, v, hdim = 4, 64, 4096, 64
  full_copy = b * t * v * 4
  tokens = jnp.zeros((b, t), jnp.int32)
  # float32 logits: XLA:CPU upcasts a whole bf16 operand to f32 before the loop (a CPU-backend pass), so bf16 memory
  # is not measurable here; with f32 logits any extra full copy (softmax, shifted logits) would show.
  logits = jnp.zeros((b, t, v), jnp.float32)
  fwd = jax.jit(lambda z: capo_jax.token_logprobs(z, tokens, chunk_size=8)[0].sum())
  assert fwd.lower(logits).compile().memory_analysis().temp_size_in_bytes < 0.5 * full_copy
  h, w = jnp.zeros((b, t, hdim)), jnp.zeros((v, hdim))
  fused_grad = jax.jit(jax.grad(
      lambda h, w: capo_jax.token_logprobs_from_hidden(h, w, tokens, chunk_size=8)[0].sum(), argnums=(0, 1)))
  assert fused_grad.lower(h, w).compile().memory_analysis().temp_size_in_bytes < 0.6 * full_copy


def test_bad_input():
  with pytest.raises(ValueError, match="shape"):
    capo_jax.token_logprobs(jnp.zeros((2, 3, 4)), jnp.zeros((2, 4), jnp.int32))
  with pytest.raises(TypeError, match="integer"):
    capo_jax.token_logprobs(jnp.zeros((2, 3, 4)), jnp.zeros((2, 3)))
  with pytest.raises(ValueError, match="unembedding"):
    capo_jax.token_logprobs_from_hidden(jnp.zeros((2, 3, 4)), jnp.zeros((4, 5)), jnp.zeros((2, 3), jnp.int32))
  with pytest.raises(ValueError, match="chunk_size"):
    capo_jax.token_logprobs(jnp.zeros((2, 3, 4)), jnp.zeros((2, 3), jnp.int32), chunk_size=0)


def test_auto_chunk_rule_by_hand():
  """The one chunk-length rule of the loss and CAPO's mask: the caller's size capped at T, else the most time steps
  whose [B, chunk, V] block holds ≤ AUTO_CHUNK_ELEMENTS (2²⁴) elements, at least one."""
  assert chunking.AUTO_CHUNK_ELEMENTS == 1 << 24
  assert chunking.auto_chunk(2, 100, 1 << 20, None) == 8  # 2²⁴ / (2 · 2²⁰)
  assert chunking.auto_chunk(1, 5, 10, None) == 5  # everything fits: one chunk of all T
  assert chunking.auto_chunk(4, 10, 1 << 25, None) == 1  # one step is already over the budget
  assert chunking.auto_chunk(2, 10, 3, 4) == 4
  assert chunking.auto_chunk(2, 3, 5, 8) == 3
  with pytest.raises(ValueError, match="chunk_size"):
    chunking.auto_chunk(2, 3, 5, 0)


@pytest.mark.parametrize("remat", [False, True])
def test_map_time_chunks_equals_the_unchunked_function(remat):
  """A pytree-valued fn over T = 7 in chunks of 3 (two full chunks through lax.map, a remainder of 1) equals fn on the
  whole arrays, values and gradients, with or without rematerialisation; fn only ever sees chunk-length slices."""
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 7, 3))
  y = jax.random.normal(jax.random.PRNGKey(1), (2, 7))
  seen = []

  def fn(x_bch, y_bc):
    seen.append(x_bch.shape[1])
    return {"a": jnp.sin(x_bch) * y_bc[..., None], "b": (jnp.sum(x_bch**2, axis=-1),)}

  whole = fn(x, y)
  seen.clear()
  chunked = chunking.map_time_chunks(fn, (x, y), 3, remat=remat)
  assert sorted(set(seen)) == [1, 3]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), chunked, whole)
  loss = lambda f: lambda x: jnp.sum(f(x)["a"]) + jnp.sum(f(x)["b"][0] * y)
  g_whole = jax.grad(loss(lambda x: fn(x, y)))(x)
  g_chunked = jax.grad(loss(lambda x: chunking.map_time_chunks(fn, (x, y), 3, remat=remat)))(x)
  np.testing.assert_allclose(g_chunked, g_whole, rtol=1e-6)


def test_pad_to_chunks_by_hand():
  np.testing.assert_array_equal(chunking.pad_to_chunks(jnp.arange(5), 2), [[0, 1], [2, 3], [4, 0]])
  x = jnp.arange(10.0).reshape(5, 2)
  got = chunking.pad_to_chunks(x, 5)
  assert got.shape == (1, 5, 2)
  np.testing.assert_array_equal(got[0], x)
