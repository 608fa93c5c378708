"""Tests of capo_jax.ops.top_k: the prefiltered ``top_k`` and the selecting ``top_k_set`` against ``jax.lax.top_k``
(same values, ids and order / the same (id, value) set; ties by lower id, −∞ and NaN rows, signed zeros, padding
rows, both branches of ``top_k_set``), the selection branch on its own, the bit-packed compaction, and a hypothesis
fuzz."""

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from capo_jax import curvature
from capo_jax.ops import top_k as top_k_ops


@pytest.mark.parametrize("kind", ["normal", "peaked", "ties", "neg_inf", "nan", "small_vocab"])
def test_prefiltered_top_k_is_lax_top_k(kind):
  """The CPU prefilter (lower bound + bisection, entries below it → −∞) returns exactly jax.lax.top_k: same values,
  same ids, same order, ties by lower id, −∞ and NaN rows included."""
  rng = np.random.default_rng(7)
  n, v, k = 64, 512, 50
  x = rng.normal(size=(n, v)).astype(np.float32) * 3
  if kind == "peaked":
    x[:, :38] += 8.0  # a few used tokens far above a flat tail, like the trained task model
  elif kind == "ties":
    x = np.round(x)  # many equal logits across the k-th boundary
  elif kind == "neg_inf":
    x[: n // 2, 20:] = -np.inf  # rows with fewer than k finite logits
  elif kind == "nan":
    x[3, 5] = np.nan
  elif kind == "small_vocab":
    v = 3 * k
    x = x[:, :v]
  x = jnp.asarray(x)
  want = jax.lax.top_k(x, k)
  for steps in (0, 3, 8):
    got = jax.jit(lambda z: top_k_ops.top_k(z, k, prefilter=True, bisection_steps=steps))(x)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[0], want[0])
  # Batched leading axes, and the backend default, go through the same function.
  got = top_k_ops.top_k(x.reshape(4, n // 4, v), k)
  np.testing.assert_array_equal(got[1].reshape(n, k), want[1])
  # Rows masked out by `where` get the placeholder (ids 0..k-1, values 0); the others stay exact.
  rows = np.arange(n) % 3 != 0
  got = jax.jit(lambda z, w: top_k_ops.top_k(z, k, where=w, prefilter=True))(x, rows)
  np.testing.assert_array_equal(got[1][rows], want[1][rows])
  np.testing.assert_array_equal(got[0][rows], want[0][rows])
  np.testing.assert_array_equal(got[1][~rows], np.broadcast_to(np.arange(k), (int((~rows).sum()), k)))
  np.testing.assert_array_equal(got[0][~rows], 0.0)

def _top_k_inputs(kind, n=64, v=1024, k=50, seed=7):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, v)).astype(np.float32) * 3
  if kind == "peaked":
    x[:, :38] += 8.0
  elif kind == "ties":
    x = np.round(x)
  elif kind == "neg_inf":
    x[: n // 2, 20:] = -np.inf
  elif kind == "nan":
    x[3, 5] = np.nan
  elif kind == "small_vocab":
    x = x[:, :3 * k]
  elif kind == "signed_zeros":  # 30 positives, then +0.0 and −0.0 across the k-th boundary (XLA: −0.0 < 0.0)
    x = np.where(rng.uniform(size=(n, v)) < 0.5, np.float32(0.0), np.float32(-0.0))
    x[:, rng.permutation(v)[:30]] = rng.uniform(1, 2, size=(n, 30))
  return jnp.asarray(x)


def _as_sets(values, ids):
  """Sort each row's (id, value) pairs by id so that two top-K results compare as sets."""
  order = np.argsort(np.asarray(ids), axis=-1)
  return np.take_along_axis(np.asarray(ids), order, -1), np.take_along_axis(np.asarray(values), order, -1)


@pytest.mark.parametrize("kind", ["normal", "peaked", "ties", "neg_inf", "nan", "small_vocab", "signed_zeros"])
@pytest.mark.parametrize("capacity", [50, 128])
def test_top_k_set_is_lax_top_k_as_a_set(kind, capacity):
  """top_k_set returns the same (id, value) pairs as jax.lax.top_k (ties by lower id, −0.0 below 0.0, NaN and −∞
  rows included), whichever branch runs: selection when the candidates fit, the exact sort when they do not."""
  k = 50
  x = _top_k_inputs(kind, k=k)
  want = _as_sets(*jax.lax.top_k(x, k))
  got = jax.jit(lambda z: top_k_ops.top_k_set(z, k, enabled=True, capacity=capacity))(x)
  got_ids, got_values = _as_sets(*got)
  np.testing.assert_array_equal(got_ids, want[0])
  np.testing.assert_array_equal(np.signbit(got_values), np.signbit(want[1]))
  np.testing.assert_array_equal(got_values, want[1])
  # Leading axes and `where`: needed rows exact, the others get ids 0..k-1 and values 0.
  rows = np.arange(x.shape[0]) % 3 != 0
  values, ids = jax.jit(lambda z, w: top_k_ops.top_k_set(z, k, where=w, enabled=True, capacity=capacity))(
      x.reshape(4, -1, x.shape[-1]), rows.reshape(4, -1))
  values, ids = values.reshape(-1, k), ids.reshape(-1, k)
  got_ids, got_values = _as_sets(values[rows], ids[rows])
  np.testing.assert_array_equal(got_ids, want[0][rows])
  np.testing.assert_array_equal(got_values, want[1][rows])
  np.testing.assert_array_equal(ids[~rows], np.broadcast_to(np.arange(k), (int((~rows).sum()), k)))
  np.testing.assert_array_equal(values[~rows], 0.0)


@pytest.mark.parametrize("kind", ["normal", "peaked", "ties", "signed_zeros"])
def test_top_k_selection_path_itself(kind):
  """The selection branch on its own (the cond in top_k_set hides which branch ran): candidates z ≥ lo for a lo at
  or below the k-th value, selected with ties by lower id in XLA's float order, give lax.top_k's set."""
  k, n = 50, 64
  x = _top_k_inputs(kind, k=k)
  kth = np.sort(np.asarray(x), axis=-1)[:, -k]
  lo = jnp.asarray(np.where(kind == "signed_zeros", 0.0, kth - 0.3).astype(np.float32))  # 0.0: −0.0 ≥ 0.0 too
  count = int(np.max(np.sum(np.asarray(x) >= np.asarray(lo)[:, None], axis=-1)))
  capacity = -(-count // 32) * 32
  rows = jnp.ones((n,), bool)
  got = jax.jit(lambda z, l: top_k_ops._select_top_k(z, l, rows, k, capacity))(x, lo)
  want = _as_sets(*jax.lax.top_k(x, k))
  got_ids, got_values = _as_sets(*got)
  np.testing.assert_array_equal(got_ids, want[0])
  np.testing.assert_array_equal(np.signbit(got_values), np.signbit(want[1]))
  if kind == "signed_zeros":
    assert count > k  # the boundary really lies inside a run of equal keys


@pytest.mark.parametrize("m", [32, 70, 1024, 64 * 32 + 1, 5000])  # the last two: more words than the unrolled walk
def test_compact_lists_true_positions_in_order(m):
  rng = np.random.default_rng(m)
  mask = rng.uniform(size=(40, m)) < rng.uniform(0.0, 0.3, size=(40, 1))
  mask[0] = False
  mask[1] = True
  slots = 48
  pos, real = jax.jit(lambda a: top_k_ops._compact(a, slots))(jnp.asarray(mask))
  for row, p, r in zip(mask, np.asarray(pos), np.asarray(real)):
    want = np.flatnonzero(row)[:slots]
    np.testing.assert_array_equal(r, np.arange(slots) < len(want))
    np.testing.assert_array_equal(p[: len(want)], want)
    assert np.all((0 <= p) & (p < m))


def test_top_k_set_at_a_large_vocabulary():
  """V = 151,936 (Qwen2.5's vocabulary: 4,748 words of flags, so the candidates' compaction takes the binary search):
  the same sets as lax.top_k, including a row whose k-th value is tied across the vocabulary."""
  k, v = 50, 151936
  rng = np.random.default_rng(0)
  x = rng.normal(size=(6, v)).astype(np.float32)
  x[1, rng.choice(v, 80, replace=False)] = 9.0  # 80 ties at the top: the k lowest ids of them
  x[2, : v // 2] = -np.inf
  x = jnp.asarray(x)
  got = _as_sets(*jax.jit(lambda z: top_k_ops.top_k_set(z, k, enabled=True))(x))
  want = _as_sets(*jax.lax.top_k(x, k))
  np.testing.assert_array_equal(got[0], want[0])
  np.testing.assert_array_equal(got[1], want[1])


@pytest.mark.parametrize("kind", ["normal", "ties", "few_finite", "nan", "signed_zeros"])
def test_top_k_in_rounds_is_lax_top_k(kind):
  """Four rounds of top-16 give lax.top_k's top-50 bit for bit (values, ids, order): ties cut by a round go on in the
  next; rows with fewer than k entries above −∞ or NaN among the top take lax.top_k itself."""
  k, v = 50, 600
  rng = np.random.default_rng(7)
  x = rng.normal(size=(24, v)).astype(np.float32)
  if kind == "ties":
    x = np.round(x * 2).astype(np.float32) / 2  # runs of equal values across the round boundaries
  elif kind == "few_finite":
    x[3, 20:] = -np.inf
    x[5, :] = -np.inf
  elif kind == "nan":
    x[2, [5, 70, 300]] = np.nan
  elif kind == "signed_zeros":
    x = np.where(rng.uniform(size=x.shape) < 0.5, 0.0, -0.0).astype(np.float32)
  got = jax.jit(lambda z: top_k_ops.top_k_in_rounds(z, k))(jnp.asarray(x))
  want = jax.lax.top_k(jnp.asarray(x), k)
  np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))
  np.testing.assert_array_equal(np.asarray(got[0]).view(np.int32), np.asarray(want[0]).view(np.int32))


_FUZZ_TOP_K = {(k, c): jax.jit(lambda z, w, k=k, c=c: top_k_ops.top_k_set(z, k, where=w, enabled=True,
                                                                          capacity=c))
               for k in (8, 50) for c in (64, 128)}


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(seed=st.integers(0, 2**31 - 1), levels=st.sampled_from([3, 20, 1000, 0]),
                  neg_inf=st.sampled_from([0.0, 0.5, 0.97]), k=st.sampled_from([8, 50]),
                  capacity=st.sampled_from([64, 128]))
def test_top_k_set_fuzz(seed, levels, neg_inf, k, capacity):
  """Random rows with few distinct values (heavy ties), −∞ runs, signed zeros and padding rows: top_k_set's needed
  rows always hold lax.top_k's (id, value) set, whichever branch runs."""
  rng = np.random.default_rng(seed)
  n, v = 16, 256
  x = rng.normal(size=(n, v)).astype(np.float32)
  if levels:  # quantise: ties across the k-th boundary, and −0.0 next to 0.0
    x = np.round(x * levels / 4).astype(np.float32) * np.float32(4 / levels)
  x[rng.uniform(size=(n, v)) < neg_inf] = -np.inf
  rows = rng.uniform(size=n) < 0.8
  x = jnp.asarray(x)
  values, ids = _FUZZ_TOP_K[(k, capacity)](x, jnp.asarray(rows))
  want_ids, want_values = _as_sets(*jax.lax.top_k(x, k))
  got_ids, got_values = _as_sets(values, ids)
  np.testing.assert_array_equal(got_ids[rows], want_ids[rows])
  np.testing.assert_array_equal(got_values[rows], want_values[rows])
  np.testing.assert_array_equal(np.signbit(got_values[rows]), np.signbit(want_values[rows]))


def test_curvature_reexports_the_kernel():
  """``capo_jax.curvature.top_k`` / ``top_k_set`` (the public names) are this module's functions, not copies."""
  assert curvature.top_k is top_k_ops.top_k
  assert curvature.top_k_set is top_k_ops.top_k_set
