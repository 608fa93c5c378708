"""Logits processing for sampling: temperature, top-k, top-p (nucleus), as pure functions.

Every sampling parameter is a *traced* value (a scalar array, or a Python number that jit turns into one), so a
jitted sampler compiles once and serves any temperature / top_k / top_p. Shapes are the only static inputs.

The order follows HF transformers' warpers (and so the policy RL code usually assumes): temperature first, then top-k
on the scaled logits, then top-p on the distribution renormalised over the top-k survivors.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np

# Masked logits are -inf so that softmax gives them exactly zero mass and categorical never draws them.
_NEG_INF = -jnp.inf
# Temperatures below the smallest normal float32 (~1.2e-38) are greedy, like 0: backends that flush subnormals to zero
# would otherwise disagree on whether such a temperature samples.
GREEDY_BELOW_TEMPERATURE = float(np.finfo(np.float32).tiny)


def _samples(temperature: chex.Numeric) -> jax.Array:
  """Whether ``temperature`` samples (``T >= GREEDY_BELOW_TEMPERATURE``) rather than taking the argmax."""
  return jnp.asarray(temperature, jnp.float32) >= GREEDY_BELOW_TEMPERATURE


def _safe_temperature(temperature: chex.Numeric) -> jax.Array:
  """Temperature used for scaling: the given value when it samples, else 1 (greedy is handled apart)."""
  return jnp.where(_samples(temperature), jnp.asarray(temperature, jnp.float32), 1.0)


def scale_logits(logits_bv: chex.Array, temperature: chex.Numeric) -> jax.Array:
  """Temperature scaling in f32: ``(z - max_v z) / T`` when ``T`` samples; ``z - max_v z`` when it is greedy
  (``T < GREEDY_BELOW_TEMPERATURE``, i.e. ``T = 0`` or below the smallest normal float32).

  The per-row shift by the largest logit changes neither the softmax nor the order, and keeps every scaled entry
  ``<= 0``: however small a sampling ``T`` is, the largest entry stays 0 and the others at worst become ``-inf`` (zero
  probability), so log-probs of drawable tokens stay finite where ``z / T`` alone would overflow to ``±inf``
  (e.g. ``|z| = 50`` at ``T = 1e-37``).

  Args:
    logits_bv: ``[B, V]`` logits (any float dtype; computed in f32).
    temperature: scalar, traced.

  Returns:
    ``[B, V]`` float32 scaled logits, row maximum 0 (for rows with a finite maximum).
  """
  chex.assert_rank(logits_bv, 2)
  logits_bv = logits_bv.astype(jnp.float32)
  max_b1 = jnp.max(logits_bv, axis=-1, keepdims=True)
  shift_b1 = jax.lax.stop_gradient(jnp.where(jnp.isfinite(max_b1), max_b1, 0.0))
  return (logits_bv - shift_b1) / _safe_temperature(temperature)


def _filter_sorted(scaled_bv: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
  """Top-k then top-p filtering of already temperature-scaled logits, via one descending sort per row.

  Both filters keep a *prefix* of the descending order, so the kept set is ``{v : z_v >= cutoff_b}`` where ``cutoff_b``
  is the smallest kept sorted logit. Ties at the cutoff are all kept (as HF does for top-k).
  """
  vocab = scaled_bv.shape[-1]
  sorted_bv = -jnp.sort(-scaled_bv, axis=-1)  # descending
  # top_k <= 0 disables the filter; clip to [1, V] so a too-large k keeps everything instead of indexing out of range.
  k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab).astype(jnp.int32)
  rank_v = jnp.arange(vocab, dtype=jnp.int32)
  keep_k_bv = rank_v[None, :] < k
  # Top-p on the top-k renormalised distribution: keep rank r iff the mass strictly before r is < p, i.e. the
  # smallest prefix whose mass reaches p. Rank 0 is always kept (mass before it is 0 < p for any p > 0).
  probs_bv = jax.nn.softmax(jnp.where(keep_k_bv, sorted_bv, _NEG_INF), axis=-1)
  mass_before_bv = jnp.cumsum(probs_bv, axis=-1) - probs_bv
  keep_bv = keep_k_bv & ((mass_before_bv < top_p) | (rank_v[None, :] == 0))
  num_kept_b = jnp.sum(keep_bv, axis=-1)
  cutoff_b = jnp.take_along_axis(sorted_bv, (num_kept_b - 1)[:, None], axis=-1)
  return jnp.where(scaled_bv >= cutoff_b, scaled_bv, _NEG_INF)


def process_logits(
    logits_bv: chex.Array,
    temperature: chex.Numeric = 1.0,
    top_k: chex.Numeric = 0,
    top_p: chex.Numeric = 1.0,
) -> jax.Array:
  """Temperature-scaled, top-k/top-p-truncated logits; truncated entries are ``-inf``.

  With ``z`` the logits and ``T`` the temperature, ``s = (z - max z) / T`` (:func:`scale_logits`; the shift leaves
  the softmax unchanged and keeps tiny temperatures from overflowing). Let ``σ`` sort ``s`` descending.

  * top-k (``k > 0``): keep ``{v : s_v >= s_{σ(k)}}`` (the k largest; ties at the boundary kept).
  * top-p (``0 < p < 1``): with ``q = softmax`` of the top-k survivors, keep the smallest prefix of ``σ`` whose mass
    ``Σ_{r' <= r} q_{σ(r')}`` reaches ``p``, i.e. rank ``r`` is kept iff ``Σ_{r' < r} q_{σ(r')} < p``.

  ``softmax(process_logits(z, T, k, p))`` is then the distribution a sampler draws from. The sort is skipped through
  ``lax.cond`` when both filters are off (``k <= 0`` and ``p >= 1``), which is the common RL setting and saves a
  ``[B, V]`` sort per decode step.

  Args:
    logits_bv: ``[B, V]`` logits.
    temperature: scalar, traced; ``< GREEDY_BELOW_TEMPERATURE`` (e.g. 0) leaves logits unscaled (greedy callers take
      the argmax).
    top_k: scalar int, traced; ``<= 0`` disables.
    top_p: scalar float, traced; ``>= 1`` disables.

  Returns:
    ``[B, V]`` float32 processed logits (shifted so the row maximum is 0).
  """
  chex.assert_rank(logits_bv, 2)
  scaled_bv = scale_logits(logits_bv, temperature)
  top_k = jnp.asarray(top_k, jnp.int32)
  top_p = jnp.asarray(top_p, jnp.float32)
  need_filter = (top_k > 0) | (top_p < 1.0)
  return jax.lax.cond(
      need_filter,
      lambda s: _filter_sorted(s, top_k, top_p),
      lambda s: s,
      scaled_bv,
  )


def sample_tokens(
    key: chex.PRNGKey,
    logits_bv: chex.Array,
    temperature: chex.Numeric = 1.0,
    top_k: chex.Numeric = 0,
    top_p: chex.Numeric = 1.0,
) -> jax.Array:
  """Draws one token per row from ``softmax(process_logits(logits, T, k, p))``; greedy (argmax) when
  ``T < GREEDY_BELOW_TEMPERATURE`` (``T = 0``, or a subnormal that some backends flush to 0).

  Args:
    key: PRNG key.
    logits_bv: ``[B, V]`` logits.
    temperature, top_k, top_p: traced scalars, see :func:`process_logits`.

  Returns:
    ``[B]`` int32 token ids.
  """
  chex.assert_rank(logits_bv, 2)
  processed_bv = process_logits(logits_bv, temperature, top_k, top_p)
  sampled_b = jax.random.categorical(key, processed_bv, axis=-1)
  greedy_b = jnp.argmax(logits_bv, axis=-1)
  return jnp.where(_samples(temperature), sampled_b, greedy_b).astype(jnp.int32)


def token_logprobs_at_temperature(
    logits_bv: chex.Array, tokens_b: chex.Array, temperature: chex.Numeric = 1.0
) -> jax.Array:
  """``log softmax(z / T)[token]`` in f32, the *untruncated* tempered policy (what TRL-style learners score).

  Top-k/top-p truncation is deliberately not applied: the learner recomputes ``log softmax(z / T)`` over the full
  vocabulary, and importance ratios must compare like with like. A greedy ``T`` (``< GREEDY_BELOW_TEMPERATURE``)
  scores at ``T = 1``. The logits are shifted by their maximum before the division (:func:`scale_logits`), so any
  sampling ``T`` gives finite log-probs for every token of non-zero probability (``-inf`` only where ``exp``
  underflows to exactly 0, a token that :func:`sample_tokens` never draws).

  Args:
    logits_bv: ``[B, V]`` logits.
    tokens_b: ``[B]`` int token ids.
    temperature: scalar, traced.

  Returns:
    ``[B]`` float32 log-probabilities.
  """
  chex.assert_rank([logits_bv, tokens_b], [2, 1])
  logp_bv = jax.nn.log_softmax(scale_logits(logits_bv, temperature), axis=-1)
  return jnp.take_along_axis(logp_bv, tokens_b[:, None].astype(jnp.int32), axis=-1)[:, 0]
