"""Per-token log-probabilities and entropies of a policy, in float32, memory-bounded over large vocabularies.

A policy over a vocabulary of V tokens produces logits ``z_btv``; for each position the learner needs

    logπ(a_t) = z_t[a_t]/T − logsumexp(z_t/T)          (T = sampling temperature)
    H_t       = logsumexp(z_t/T) − Σ_v softmax(z_t/T)_v · z_t[v]/T

With V ≈ 150k and B·T ≈ 10⁵ a float32 copy of the logits is tens of GiB, so both functions here work on chunks of the
time axis (``capo_jax.ops.chunking.map_time_chunks``) whose body is rematerialised (``jax.checkpoint``): at most one
float32 chunk ``[B, chunk, V]`` (plus its softmax) is alive at a time, forward and backward.
``token_logprobs_from_hidden`` fuses the unembedding as well, so the full ``[B, T, V]`` logits never exist at all.
"""

from __future__ import annotations

from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp

from capo_jax.ops import chunking

Array = jax.Array


def _logprob_entropy_of_logits(z_bcv: Array, tokens_bc: Array, inv_temperature: Array) -> tuple[Array, Array]:
  """The two formulas of the module docstring on one chunk, in float32."""
  z_bcv = z_bcv.astype(jnp.float32) * inv_temperature
  lse_bc = jax.nn.logsumexp(z_bcv, axis=-1)
  picked_bc = jnp.take_along_axis(z_bcv, tokens_bc[..., None], axis=-1)[..., 0]
  p_bcv = jnp.exp(z_bcv - lse_bc[..., None])
  entropy_bc = lse_bc - jnp.sum(p_bcv * z_bcv, axis=-1)
  return picked_bc - lse_bc, entropy_bc


def _check_tokens(tokens_bt: Array, batch_time: tuple[int, int]) -> None:
  chex.assert_rank(tokens_bt, 2)
  if not jnp.issubdtype(tokens_bt.dtype, jnp.integer):
    raise TypeError(f"tokens must be an integer array, got dtype {tokens_bt.dtype}.")
  if tokens_bt.shape != batch_time:
    raise ValueError(f"tokens have shape {tokens_bt.shape} but the model outputs have [B, T] = {batch_time}.")


def token_logprobs(
    logits_btv: Array,
    tokens_bt: Array,
    *,
    temperature: float | Array = 1.0,
    chunk_size: int | None = None,
) -> tuple[Array, Array]:
  """Log-probability of each token and the policy's entropy at each position, both float32.

  Args:
    logits_btv: ``[B, T, V]`` logits in any float dtype (bf16 logits are upcast one chunk at a time); position ``t``
      scores ``tokens_bt[:, t]`` (shift the model's outputs before calling).
    tokens_bt: ``[B, T]`` integer token ids.
    temperature: the sampling temperature T (> 0); the policy is ``softmax(z / T)``.
    chunk_size: time steps per chunk; default keeps one float32 chunk ≤ 64 MiB.

  Returns:
    ``(logprobs_bt, entropy_bt)``, float32 ``[B, T]``; gradients flow to ``logits_btv``.
  """
  chex.assert_rank(logits_btv, 3)
  if not jnp.issubdtype(logits_btv.dtype, jnp.floating):
    raise TypeError(f"logits must be floating point, got dtype {logits_btv.dtype}.")
  batch, time, vocab = logits_btv.shape
  _check_tokens(tokens_bt, (batch, time))
  inv_t = 1.0 / jnp.asarray(temperature, jnp.float32)
  chunk = chunking.auto_chunk(batch, time, vocab, chunk_size)
  return chunking.map_time_chunks(lambda z, tok: _logprob_entropy_of_logits(z, tok, inv_t), (logits_btv, tokens_bt),
                                  chunk, remat=True)


def token_logprobs_from_hidden(
    hidden_bth: Array,
    unembedding_vh: Array,
    tokens_bt: Array,
    *,
    temperature: float | Array = 1.0,
    chunk_size: int | None = None,
    logits_stats_fn: Callable[..., Any] | None = None,
    logits_stats_inputs: tuple[Array, ...] = (),
) -> tuple[Array, Array] | tuple[Array, Array, Any]:
  """``token_logprobs`` of the logits ``z = h Wᵀ`` without ever materialising the ``[B, T, V]`` logits.

  The unembedding matmul runs per time chunk with float32 accumulation, inside the rematerialised scan, so the
  peak extra memory is one ``[B, chunk, V]`` float32 block in the forward and in the backward pass.

  Args:
    hidden_bth: ``[B, T, H]`` final normed hidden states.
    unembedding_vh: ``[V, H]`` unembedding rows (the embedding table for tied models).
    tokens_bt: ``[B, T]`` token ids scored at each position.
    temperature: sampling temperature.
    chunk_size: time steps per chunk (default: ≤ 64 MiB per float32 chunk).
    logits_stats_fn: optional ``(z_bcv, tokens_bc, *inputs_bc) -> pytree of [B, c, …]``, called on each chunk's
      float32 logits (before the temperature) under ``stop_gradient``: per-position statistics of the same logits
      (e.g. CAPO's top-K policy) without a second unembedding matmul. Its outputs carry no gradient and are not
      recomputed in the backward pass.
    logits_stats_inputs: ``[B, T, …]`` arrays chunked along with the tokens and passed to ``logits_stats_fn``.

  Returns:
    ``(logprobs_bt, entropy_bt)`` float32, and with ``logits_stats_fn`` its outputs as a third element (leaves
    ``[B, T, …]``); gradients flow to both ``hidden_bth`` and ``unembedding_vh``.
  """
  chex.assert_rank([hidden_bth, unembedding_vh], [3, 2])
  batch, time, width = hidden_bth.shape
  vocab, w_width = unembedding_vh.shape
  if w_width != width:
    raise ValueError(f"hidden width {width} does not match the unembedding's {w_width} ([V, H] layout expected).")
  _check_tokens(tokens_bt, (batch, time))
  inv_t = 1.0 / jnp.asarray(temperature, jnp.float32)
  chunk = chunking.auto_chunk(batch, time, vocab, chunk_size)

  def chunk_fn(h_bch, tok_bc, *inputs_bc):
    z_bcv = jnp.einsum("bch,vh->bcv", h_bch, unembedding_vh, preferred_element_type=jnp.float32)
    out = _logprob_entropy_of_logits(z_bcv, tok_bc, inv_t)
    if logits_stats_fn is None:
      return out
    return (*out, logits_stats_fn(jax.lax.stop_gradient(z_bcv), tok_bc, *inputs_bc))

  return chunking.map_time_chunks(chunk_fn, (hidden_bth, tokens_bt, *logits_stats_inputs), chunk, remat=True)
