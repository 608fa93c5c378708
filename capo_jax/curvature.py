"""CAPO's last-layer curvature model, its mask rules and the released presets.

Melo, Abate, Gal, *Stabilizing Policy Gradients for Sample-Efficient Reinforcement Learning in LLM Reasoning*
(arXiv 2510.00819), and its PyTorch reference (``luckeciano/stable-pg-llm``). The derivations are in
``docs/MATH.md`` §2.

Only the unembedding W ∈ R^{V×H} is modelled (logits z_t = W h_t), restricted at each position t to the K rows of
the policy's top-K logits. With π_t the softmax over those K logits, e_t the one-hot of the sampled token inside the
top-K (all zeros when it fell outside: the reference's convention) and v_t = e_t − π_t, the per-token surrogate of
row i at ρ = 1 is

    J_t(W) = A_i · exp(ℓ_t(W) − ℓ_t(W₀)),   ℓ_t(W) = e_t·(W_K h_t) − logsumexp(W_K h_t)

(ℓ_t is log softmax_K(W_K h_t)[a_t] when a_t is in the top-K). Its derivatives along a K×H direction d are

    ∇J_t = g_t = A_i v_t h_tᵀ                                    (objective gradient, rank 1)
    dᵀĤ_t d = A_i [ (v_t·u_t)² − u_tᵀ(diag π_t − π_t π_tᵀ) u_t ],  u_t = d h_t ∈ R^K
              (score outer product + log-softmax Hessian)

and CAPO's two statistics for a learning rate η and the direction d_t the optimizer would take for the token are

    m_H(t) = η ⟨g_t, d_t⟩ + ½ η² d_tᵀ Ĥ_t d_t,    ⟨g_t, d_t⟩ = A_i (v_t·u_t)
    m_F(t) = ½ η² (v_t·u_t)²                       (sampled-action Fisher: ½(η ∇ℓ_t·d_t)²)

Direction models (``SGDDirection``, ``AdamDirection``): SGD d_t = g_t; Adam d_t is the step ``optax.scale_by_adam``
would take from the current moments of the K rows with g_t as the next gradient (prospective moments, bias
correction at c + 1). Pitfalls of the formulas (docs/MATH.md §2.7) handled here, each tested:

* sign — optax's moments are of the LOSS gradient −g, so its first moment enters with a minus sign
  (``AdamDirection.moments_of_loss=True``, the default); the second moment is sign-free;
* first step — with no moments (c = 0 or ``mu is None``) the Adam model would give d = sign(g); the reference falls
  back to d_t = g_t and so do we;
* out-of-top-K sampled token — e_t = 0, v_t = −π_t (reference behaviour; m_H then no longer describes that token);
* scale — g_t is one token's unweighted gradient while the moments are of the batch-mean gradient, so d_t stays
  sign-like; we keep the reference's arithmetic and only document the drift.

Memory: the per-token direction is K×H. It is never materialised for the whole batch: tokens are processed in chunks
(``jax.lax.map`` with ``batch_size=chunk_size``), so the extra peak memory of the Adam token model is
O(chunk_size·K·H) (about six buffers of that size: gathered m, s rows, g, m', s', d); SGD needs no gather and is
O(N·K) in closed form. Sentence/global granularities add one dense [V,H] accumulator per row in flight.

The top-K itself is ``capo_jax.ops.top_k.top_k_set`` (re-exported here with ``top_k``), or on a mesh whose ``tensor``
axis splits the vocabulary ``capo_jax.sharding.vocab_parallel_top_k``; the logits of ``top_k_policy_from_hidden`` are
formed per time chunk by ``capo_jax.ops.chunking``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, NamedTuple

import chex
import jax
import jax.numpy as jnp

from capo_jax import sharding
from capo_jax import validation
from capo_jax.ops import chunking
from capo_jax.ops import top_k as top_k_ops
from capo_jax.ops.top_k import top_k, top_k_set  # pylint: disable=unused-import  (re-exported: curvature.top_k(_set))

Array = jax.Array
HessianRule = Literal["symmetric", "nonsymmetric"]
Granularity = Literal["token", "sentence", "global"]


# ----------------------------------------------------------------------------------------------------------------
# Direction models.
# ----------------------------------------------------------------------------------------------------------------


class SGDDirection(NamedTuple):
  """SGD direction model: d_t = g_t (the per-token objective gradient itself)."""


class AdamDirection(NamedTuple):
  """Adam direction model: the step Adam would take from moments (mu, nu) with g as the next gradient.

  Attributes:
    mu: first moment of the unembedding rows, either gathered per token ``[N, K, H]`` or the whole ``[V, H]`` table
      (then pass ``row_ids_nk``); None = no moments yet (first step → d = g, as the reference).
    nu: second moment, same layout as ``mu``.
    count: c, the number of optimizer steps already taken (optax's ``ScaleByAdamState.count``).
    b1, b2, eps: Adam's hyper-parameters (optax's ``scale_by_adam`` defaults; ``eps_root`` is taken as 0).
    moments_of_loss: True when ``mu`` is the moment of the LOSS gradient (optax's convention: the gradient of −J);
      then −mu is the objective's moment. False for moments of the objective gradient (the reference's shadow).
  """

  mu: Array | None = None
  nu: Array | None = None
  count: Array | int = 0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  moments_of_loss: bool = True


DirectionModel = SGDDirection | AdamDirection


def adam_direction(
    grad: Array,
    mu: Array,
    nu: Array,
    count: Array | int,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    moments_of_loss: bool = True,
) -> Array:
  """Prospective Adam step of the OBJECTIVE for a gradient ``grad`` (any shape, elementwise).

      σ  = −1 if moments_of_loss else +1        (optax stores moments of the loss gradient −g)
      m' = (1 − β1) g + β1 σ mu,   s' = (1 − β2) g² + β2 nu
      d  = (m' / (1 − β1^{c+1})) / (√(s' / (1 − β2^{c+1})) + ε)
      d  = g                    if c = 0     (reference's first-step fallback; Adam would give sign(g))

  Equals −``optax.scale_by_adam(b1, b2, eps).update(−g, ScaleByAdamState(c, mu, nu))`` for c > 0.
  """
  dtype = grad.dtype
  sign = jnp.where(jnp.asarray(moments_of_loss), -1.0, 1.0).astype(dtype)
  m = (1.0 - b1) * grad + b1 * (sign * mu.astype(dtype))
  s = (1.0 - b2) * jnp.square(grad) + b2 * nu.astype(dtype)
  step = jnp.asarray(count).astype(dtype) + 1.0
  m_hat = m / (1.0 - jnp.asarray(b1, dtype) ** step)
  s_hat = s / (1.0 - jnp.asarray(b2, dtype) ** step)
  d = m_hat / (jnp.sqrt(s_hat) + eps)
  return jnp.where(jnp.asarray(count) == 0, grad, d)


# ----------------------------------------------------------------------------------------------------------------
# Per-token statistics (the function to check against the reference formulas in isolation).
# ----------------------------------------------------------------------------------------------------------------


class LastLayerStats(NamedTuple):
  """Per-unit statistics of the last-layer model (shape [N] for tokens, [B] per sentence, [] global)."""

  g_dot_d: Array  # ⟨g, d⟩
  m_hessian: Array  # m_H = η⟨g,d⟩ + ½η² dᵀĤd
  m_fisher: Array  # m_F = ½η² (v·u)²


def _compute_dtype(*xs: Array) -> jnp.dtype:
  return jnp.promote_types(jnp.result_type(*xs), jnp.float32)


def _second_order_terms(v_k: Array, u_k: Array, pi_k: Array) -> tuple[Array, Array]:
  """(v·u, uᵀ(diag π − ππᵀ)u) along the last axis; the quadratic form as the π-variance of u (≥ 0, stable)."""
  vu = jnp.sum(v_k * u_k, axis=-1)
  mean_u = jnp.sum(pi_k * u_k, axis=-1, keepdims=True)
  quad = jnp.sum(pi_k * jnp.square(u_k - mean_u), axis=-1)
  return vu, quad


def _assemble(adv: Array, vu: Array, quad: Array, eta: Array) -> LastLayerStats:
  g_dot_d = adv * vu
  m_hessian = eta * g_dot_d + 0.5 * eta**2 * adv * (jnp.square(vu) - quad)
  m_fisher = 0.5 * eta**2 * jnp.square(vu)
  return LastLayerStats(g_dot_d, m_hessian, m_fisher)


def last_layer_token_stats(
    hidden_nh: Array,
    probs_nk: Array,
    action_onehot_nk: Array,
    advantages_n: Array,
    learning_rate: Array | float,
    direction: DirectionModel = SGDDirection(),
    *,
    row_ids_nk: Array | None = None,
    chunk_size: int = 256,
) -> LastLayerStats:
  """Per-token ⟨g,d⟩, m_H and m_F of CAPO's last-layer model (docs/MATH.md §2.2–§2.4), from exactly its quantities.

  For token t (h = hidden_nh[t], π = probs_nk[t], e = action_onehot_nk[t], A = advantages_n[t], η):

      v = e − π,  g = A v hᵀ ∈ R^{K×H},  d = direction(g),  u = d h ∈ R^K
      ⟨g,d⟩ = A (v·u)
      m_H   = η ⟨g,d⟩ + ½ η² A [ (v·u)² − uᵀ(diag π − ππᵀ)u ]
      m_F   = ½ η² (v·u)²

  SGD (d = g) is closed form, u = A‖h‖² v, ⟨g,d⟩ = A²‖h‖²‖v‖², with no K×H tensor at all. Adam builds d per token from
  the K gathered moment rows (see ``adam_direction``; sign, first-step fallback documented there).

  Memory: Adam tokens are processed ``chunk_size`` at a time (``jax.lax.map``), so the extra peak memory is
  ≈ 6·chunk_size·K·H elements, never N·K·H (unless the caller passes already-gathered ``[N,K,H]`` moments, which
  then are the caller's memory). With ``[V,H]`` moment tables the rows are gathered inside each chunk.

  Args:
    hidden_nh: [N, H] final normed hidden states (the vectors the unembedding multiplies).
    probs_nk: [N, K] π, softmax over the top-K logits (renormalised over the K).
    action_onehot_nk: [N, K] one-hot of the sampled token inside the top-K; all-zero row if it is outside.
    advantages_n: [N] advantage A of each token's row.
    learning_rate: η, scalar.
    direction: ``SGDDirection()`` or ``AdamDirection(mu, nu, count, ...)``; moments are [N,K,H] gathered rows or
      [V,H] tables (then ``row_ids_nk`` [N,K] gives the top-K token ids).
    row_ids_nk: [N, K] int top-K ids, required with [V,H] moment tables.
    chunk_size: tokens per chunk for the Adam model.

  Returns:
    ``LastLayerStats`` of [N] arrays.
  """
  chex.assert_rank([hidden_nh, probs_nk, action_onehot_nk, advantages_n], [2, 2, 2, 1])
  chex.assert_equal_shape([probs_nk, action_onehot_nk])
  chex.assert_equal_shape_prefix([hidden_nh, probs_nk, advantages_n], 1)
  validation.check_chunk_size(chunk_size)
  dtype = _compute_dtype(hidden_nh, probs_nk)
  h_nh = hidden_nh.astype(dtype)
  pi_nk = probs_nk.astype(dtype)
  v_nk = action_onehot_nk.astype(dtype) - pi_nk
  adv_n = advantages_n.astype(dtype)
  eta = jnp.asarray(learning_rate, dtype)

  if isinstance(direction, SGDDirection) or (isinstance(direction, AdamDirection) and direction.mu is None):
    # d = g: u = A‖h‖² v, no K×H tensor needed.
    u_nk = (adv_n * jnp.sum(jnp.square(h_nh), axis=-1))[:, None] * v_nk
    vu, quad = _second_order_terms(v_nk, u_nk, pi_nk)
    return _assemble(adv_n, vu, quad, eta)

  if not isinstance(direction, AdamDirection):
    raise TypeError(f"direction must be SGDDirection() or AdamDirection(...), got {type(direction).__name__}.")
  if direction.nu is None:
    raise ValueError("AdamDirection.mu is given but nu is None; pass both moments or neither.")

  def adam_u(h_h, pi_k, v_k, adv, mu_kh, nu_kh):
    g_kh = adv * v_k[:, None] * h_h[None, :]
    d_kh = adam_direction(
        g_kh, mu_kh, nu_kh, direction.count, b1=direction.b1, b2=direction.b2, eps=direction.eps,
        moments_of_loss=direction.moments_of_loss)
    return d_kh @ h_h

  mu, nu = direction.mu, direction.nu
  if mu.ndim == 3:
    chex.assert_shape([mu, nu], (*probs_nk.shape, hidden_nh.shape[-1]))
    u_nk = jax.lax.map(lambda x: adam_u(*x), (h_nh, pi_nk, v_nk, adv_n, mu, nu), batch_size=chunk_size)
  elif mu.ndim == 2:
    if row_ids_nk is None:
      raise ValueError("AdamDirection with [V,H] moment tables needs row_ids_nk (the [N,K] top-K token ids).")
    chex.assert_equal_shape([mu, nu])
    chex.assert_shape(row_ids_nk, probs_nk.shape)
    if mu.shape[1] != hidden_nh.shape[-1]:
      raise ValueError(f"moment tables must be [V,H] with H={hidden_nh.shape[-1]}, got {mu.shape}.")

    def gathered(x):
      h_h, pi_k, v_k, adv, ids_k = x
      return adam_u(h_h, pi_k, v_k, adv, mu[ids_k], nu[ids_k])

    u_nk = jax.lax.map(gathered, (h_nh, pi_nk, v_nk, adv_n, row_ids_nk), batch_size=chunk_size)
  else:
    raise ValueError(f"AdamDirection.mu must be [N,K,H] gathered rows or a [V,H] table, got shape {mu.shape}.")
  vu, quad = _second_order_terms(v_nk, u_nk, pi_nk)
  return _assemble(adv_n, vu, quad, eta)


# ----------------------------------------------------------------------------------------------------------------
# From model outputs: top-K policy, granularities.
# ----------------------------------------------------------------------------------------------------------------


class TopKPolicy(NamedTuple):
  """The policy restricted to its top-K logits at each position."""

  ids_btk: Array  # int32 token ids of the K largest logits
  probs_btk: Array  # π: softmax over those K logits
  onehot_btk: Array  # e: one-hot of the sampled token among the K (all zero if it is outside)


def top_k_policy(logits_btv: Array, tokens_bt: Array, top_k: int, temperature: float = 1.0,
                 valid_bt: Array | None = None) -> TopKPolicy:
  """π over the top-K logits and the one-hot of the sampled token inside them.

      ids = argtopK(z),   π = softmax(z[ids] / temperature),   e_k = [ids_k = a]

  ``logits_btv[:, t]`` must be the distribution that sampled ``tokens_bt[:, t]`` (already shifted). The top-K is
  ``capo_jax.ops.top_k.top_k_set``: the same K (logit, id) pairs as ``jax.lax.top_k``, in an unspecified order along K
  (ascending id on CPU) — every statistic is a sum over the K. Traced on a mesh whose ``tensor`` axis splits the
  vocabulary (``jax.set_mesh``, as the trainer's learner step is), it is ``capo_jax.sharding.vocab_parallel_top_k``
  instead (``lax.top_k``'s result from each shard's own top-K and one gather of T·K candidates, where XLA's
  partitioning of a plain top-K gathers the whole rows). ``valid_bt``: positions whose policy is needed
  (completion tokens); elsewhere the result may be a placeholder (ids 0…K−1, logits 0).
  """
  chex.assert_rank([logits_btv, tokens_bt], [3, 2])
  chex.assert_equal_shape_prefix([logits_btv, tokens_bt], 2)
  validation.check_top_k(top_k, logits_btv.shape[-1])
  dtype = _compute_dtype(logits_btv)
  where = None if valid_bt is None else valid_bt > 0
  mesh = sharding.vocab_split_mesh(logits_btv.shape[-1], top_k)
  if mesh is None:
    top_logits_btk, ids_btk = top_k_ops.top_k_set(logits_btv.astype(dtype), top_k, where=where)
  else:  # traced on a mesh whose tensor axis splits the vocabulary: per-shard top-K, one gather of T·K candidates
    top_logits_btk, ids_btk = sharding.vocab_parallel_top_k(logits_btv.astype(dtype), top_k, mesh)
  probs_btk = jax.nn.softmax(top_logits_btk / temperature, axis=-1)
  onehot_btk = (ids_btk == tokens_bt[..., None]).astype(dtype)
  return TopKPolicy(ids_btk.astype(jnp.int32), probs_btk, onehot_btk)


def top_k_policy_from_hidden(hidden_bth: Array, unembedding_vh: Array, tokens_bt: Array, top_k: int,
                             temperature: float = 1.0, valid_bt: Array | None = None,
                             chunk_size: int | None = None) -> TopKPolicy:
  """``top_k_policy`` of the logits z = h Wᵀ without materialising the [B, T, V] logits.

  The unembedding matmul (float32 accumulation) and the top-K run per time chunk, so the extra peak memory is one
  [B, chunk, V] float32 block (default ``chunk_size``: ≤ 64 MiB per block) plus the [B, T, K] result — at Qwen's
  vocabulary and 8 × 1024 tokens that is 64 MiB instead of 5 GiB. ``valid_bt`` as in ``top_k_policy``.
  """
  chex.assert_rank([hidden_bth, unembedding_vh, tokens_bt], [3, 2, 2])
  chex.assert_equal_shape_prefix([hidden_bth, tokens_bt], 2)
  batch, time, width = hidden_bth.shape
  vocab = unembedding_vh.shape[0]
  if unembedding_vh.shape[1] != width:
    raise ValueError(f"hidden width {width} does not match the unembedding's {unembedding_vh.shape[1]} ([V, H] "
                     "layout expected).")
  validation.check_top_k(top_k, vocab)
  valid_bt = jnp.ones((batch, time), bool) if valid_bt is None else valid_bt
  w_vh = unembedding_vh.astype(hidden_bth.dtype)

  def chunk_fn(h_bch, tok_bc, valid_bc):
    z_bcv = jnp.einsum("bch,vh->bcv", h_bch, w_vh, preferred_element_type=jnp.float32)
    return top_k_policy(z_bcv, tok_bc, top_k, temperature, valid_bt=valid_bc)

  chunk = chunking.auto_chunk(batch, time, vocab, chunk_size)  # the loss's own chunking (≤ 64 MiB)
  return chunking.map_time_chunks(chunk_fn, (hidden_bth, tokens_bt, valid_bt), chunk)


class CurvatureStatistics(NamedTuple):
  """``curvature_statistics`` output: stats of shape [B,T] (token), [B] (sentence) or [] (global), and the top-K."""

  g_dot_d: Array
  m_hessian: Array
  m_fisher: Array
  top_k: TopKPolicy


def unembedding_gradient(
    hidden_nh: Array,
    probs_nk: Array,
    action_onehot_nk: Array,
    row_ids_nk: Array,
    advantages_n: Array,
    weights_n: Array,
    vocab_size: int,
    *,
    chunk_size: int = 256,
) -> Array:
  """Weighted sum of the per-token top-K objective gradients, scattered into the [V,H] unembedding.

      G = Σ_t w_t A_t Σ_k v_t[k] 1[row ids_t[k]] h_tᵀ      (rows outside every top-K stay 0)

  With w = mask / Σ mask this is the masked batch-mean per-row gradient the reference feeds its shadow Adam, and the
  per-row / batch-mean gradient of the sentence / global granularities. Peak extra memory: V·H + chunk_size·K·H.
  """
  chex.assert_rank([hidden_nh, probs_nk, action_onehot_nk, row_ids_nk, advantages_n, weights_n], [2, 2, 2, 2, 1, 1])
  dtype = _compute_dtype(hidden_nh, probs_nk)
  v_nk = action_onehot_nk.astype(dtype) - probs_nk.astype(dtype)
  coef_nk = (weights_n * advantages_n).astype(dtype)[:, None] * v_nk  # w_t A_t v_t
  chunk = min(chunk_size, hidden_nh.shape[0])
  xs = tuple(chunking.pad_to_chunks(x, chunk) for x in (hidden_nh.astype(dtype), coef_nk, row_ids_nk))

  def add_chunk(g_vh, x):
    h_ch, coef_ck, ids_ck = x
    return g_vh.at[ids_ck].add(coef_ck[..., None] * h_ch[:, None, :]), None

  g_vh, _ = jax.lax.scan(add_chunk, jnp.zeros((vocab_size, hidden_nh.shape[-1]), dtype), xs)
  return g_vh


def _shared_direction_stats(
    h_nh: Array,
    top: TopKPolicy,  # flattened [N, K] fields
    adv_n: Array,
    w_n: Array,
    vocab_size: int,
    direction: DirectionModel,
    eta: Array,
    chunk_size: int,
) -> LastLayerStats:
  """Statistics of the weighted-mean surrogate J = Σ_t w_t J_t along ONE direction D = direction(∇J).

      G = ∇J (``unembedding_gradient``),  D = G (SGD) or adam_direction(G, tables),  u_t = D[ids_t] h_t
      ⟨G,D⟩ = Σ_t w_t A_t (v_t·u_t)
      m_H   = η⟨G,D⟩ + ½η² Σ_t w_t A_t [(v_t·u_t)² − u_tᵀ(diag π_t − π_tπ_tᵀ)u_t]
      m_F   = ½η² Σ_t w_t (v_t·u_t)²
  """
  dtype = h_nh.dtype
  g_vh = unembedding_gradient(h_nh, top.probs_btk, top.onehot_btk, top.ids_btk, adv_n, w_n, vocab_size,
                              chunk_size=chunk_size)
  if isinstance(direction, SGDDirection) or direction.mu is None:
    d_vh = g_vh
  else:
    chex.assert_shape([direction.mu, direction.nu], g_vh.shape)
    d_vh = adam_direction(g_vh, direction.mu, direction.nu, direction.count, b1=direction.b1, b2=direction.b2,
                          eps=direction.eps, moments_of_loss=direction.moments_of_loss)
  chunk = min(chunk_size, h_nh.shape[0])
  xs = tuple(chunking.pad_to_chunks(x, chunk) for x in (h_nh, top.ids_btk))
  u_nk = jax.lax.map(lambda x: jnp.einsum("ckh,ch->ck", d_vh[x[1]], x[0]), xs)
  u_nk = u_nk.reshape(-1, u_nk.shape[-1])[: h_nh.shape[0]]
  v_nk = top.onehot_btk - top.probs_btk
  vu, quad = _second_order_terms(v_nk, u_nk, top.probs_btk)
  w_n = w_n.astype(dtype)
  g_dot_d = jnp.sum(w_n * adv_n * vu)
  m_hessian = eta * g_dot_d + 0.5 * eta**2 * jnp.sum(w_n * adv_n * (jnp.square(vu) - quad))
  m_fisher = 0.5 * eta**2 * jnp.sum(w_n * jnp.square(vu))
  return LastLayerStats(g_dot_d, m_hessian, m_fisher)


def _check_statistics_inputs(hidden_bth, tokens_bt, advantages_b, completion_mask_bt, granularity) -> None:
  chex.assert_rank([hidden_bth, tokens_bt, advantages_b, completion_mask_bt], [3, 2, 1, 2])
  chex.assert_equal_shape_prefix([hidden_bth, tokens_bt, completion_mask_bt], 2)
  chex.assert_equal_shape_prefix([hidden_bth, advantages_b], 1)
  validation.check_granularity(granularity)


def curvature_statistics(
    hidden_bth: Array,
    logits_btv: Array,
    tokens_bt: Array,
    advantages_b: Array,
    completion_mask_bt: Array,
    *,
    top_k: int,
    learning_rate: Array | float,
    direction: DirectionModel = SGDDirection(),
    granularity: Granularity = "token",
    temperature: float = 1.0,
    chunk_size: int = 256,
) -> CurvatureStatistics:
  """CAPO's last-layer statistics from one forward pass's outputs, at the token, sentence or global granularity.

  Call under ``jax.lax.stop_gradient`` (or on stopped inputs) for masking; without it for penalties.
  ``logits_btv[:, t]`` and ``hidden_bth[:, t]`` are the ones that produced ``tokens_bt[:, t]`` (already shifted).
  Adam moments, if any, are ``[V,H]`` tables of the unembedding (rows gathered by top-K id here).

  * ``"token"`` → [B,T]: ``last_layer_token_stats`` per token, each with its own direction d_t (docs/MATH.md §2.2).
  * ``"sentence"`` → [B]: per row i the surrogate J_i = mean over the row's completion tokens of J_t; one direction
    D_i = direction(∇J_i) from the per-row mean gradient G_i; m_H(i) = η⟨G_i,D_i⟩ + ½η² D_iᵀ∇²J_i D_i and
    m_F(i) = ½η² mean_t (∇ℓ_t·D_i)² (mean per-token Fisher along the shared step).
  * ``"global"`` → []: the same with the batch mean over all completion tokens.

  Sentence/global memory: one dense [V,H] gradient and direction per row in flight (rows are processed sequentially).
  """
  chex.assert_rank(logits_btv, 3)
  _check_statistics_inputs(hidden_bth, tokens_bt, advantages_b, completion_mask_bt, granularity)
  chex.assert_equal_shape_prefix([hidden_bth, logits_btv], 2)
  top = top_k_policy(logits_btv, tokens_bt, top_k, temperature, valid_bt=completion_mask_bt)
  return curvature_statistics_from_top_k(hidden_bth, top, logits_btv.shape[-1], advantages_b, completion_mask_bt,
                                         learning_rate=learning_rate, direction=direction,
                                         granularity=granularity, chunk_size=chunk_size)


def curvature_statistics_from_hidden(
    hidden_bth: Array,
    unembedding_vh: Array,
    tokens_bt: Array,
    advantages_b: Array,
    completion_mask_bt: Array,
    *,
    top_k: int,
    learning_rate: Array | float,
    direction: DirectionModel = SGDDirection(),
    granularity: Granularity = "token",
    temperature: float = 1.0,
    chunk_size: int = 256,
    logits_chunk_size: int | None = None,
) -> CurvatureStatistics:
  """``curvature_statistics`` with the logits z = h Wᵀ formed one time chunk at a time (``top_k_policy_from_hidden``):
  the same statistics without a [B, T, V] array (``logits_chunk_size``: time steps per chunk, default ≤ 64 MiB)."""
  chex.assert_rank(unembedding_vh, 2)
  _check_statistics_inputs(hidden_bth, tokens_bt, advantages_b, completion_mask_bt, granularity)
  top = top_k_policy_from_hidden(hidden_bth, unembedding_vh, tokens_bt, top_k, temperature,
                                 valid_bt=completion_mask_bt > 0, chunk_size=logits_chunk_size)
  return curvature_statistics_from_top_k(hidden_bth, top, unembedding_vh.shape[0], advantages_b, completion_mask_bt,
                                         learning_rate=learning_rate, direction=direction,
                                         granularity=granularity, chunk_size=chunk_size)


def curvature_statistics_from_top_k(
    hidden_bth: Array,
    top: TopKPolicy,
    vocab: int,
    advantages_b: Array,
    completion_mask_bt: Array,
    *,
    learning_rate: Array | float,
    direction: DirectionModel = SGDDirection(),
    granularity: Granularity = "token",
    chunk_size: int = 256,
) -> CurvatureStatistics:
  """``curvature_statistics`` from a top-K policy already formed from the logits (by ``top_k_policy`` here, or by the
  caller inside the loss's own chunked logits pass, so that a step computes the logits once): the same statistics."""
  _check_statistics_inputs(hidden_bth, top.ids_btk[..., 0], advantages_b, completion_mask_bt, granularity)
  chex.assert_equal_shape([top.ids_btk, top.probs_btk, top.onehot_btk])
  b, t, h = hidden_bth.shape
  dtype = top.probs_btk.dtype
  hidden_bth = hidden_bth.astype(dtype)
  adv_bt = jnp.broadcast_to(advantages_b.astype(dtype)[:, None], (b, t))
  eta = jnp.asarray(learning_rate, dtype)
  mask_bt = completion_mask_bt.astype(dtype)

  if granularity == "token":
    flat = lambda x: x.reshape(b * t, *x.shape[2:])
    stats = last_layer_token_stats(flat(hidden_bth), flat(top.probs_btk), flat(top.onehot_btk), flat(adv_bt), eta,
                                   direction, row_ids_nk=flat(top.ids_btk), chunk_size=chunk_size)
    stats = jax.tree.map(lambda x: x.reshape(b, t), stats)
  elif granularity == "sentence":
    w_bt = mask_bt / jnp.maximum(jnp.sum(mask_bt, axis=1, keepdims=True), 1.0)

    def row(x):
      h_th, ids_tk, pi_tk, e_tk, adv_t, w_t = x
      return _shared_direction_stats(h_th, TopKPolicy(ids_tk, pi_tk, e_tk), adv_t, w_t, vocab, direction, eta,
                                     chunk_size)

    stats = jax.lax.map(row, (hidden_bth, top.ids_btk, top.probs_btk, top.onehot_btk, adv_bt, w_bt))
  else:
    w_bt = mask_bt / jnp.maximum(jnp.sum(mask_bt), 1.0)
    flat = lambda x: x.reshape(b * t, *x.shape[2:])
    stats = _shared_direction_stats(flat(hidden_bth), jax.tree.map(flat, top), flat(adv_bt), flat(w_bt), vocab,
                                    direction, eta, chunk_size)
  return CurvatureStatistics(stats.g_dot_d, stats.m_hessian, stats.m_fisher, top)


# ----------------------------------------------------------------------------------------------------------------
# Mask rules, penalties, presets, logging.
# ----------------------------------------------------------------------------------------------------------------


def fisher_keep(m_fisher: Array, tau_fisher: Array | float) -> Array:
  """Fisher rule: keep iff m_F < τ_F (bool, same shape as m_fisher)."""
  validation.check_positive("tau_fisher", tau_fisher)
  return m_fisher < tau_fisher


def hessian_keep(m_hessian: Array, tau_hessian: Array | float, hessian_rule: HessianRule = "symmetric") -> Array:
  """Hessian rule: symmetric keep iff −τ_H < m_H < τ_H (every released run); nonsymmetric keep iff 0 ≤ m_H < τ_H."""
  validation.check_positive("tau_hessian", tau_hessian)
  validation.check_hessian_rule(hessian_rule)
  if hessian_rule == "symmetric":
    return jnp.abs(m_hessian) < tau_hessian
  return (m_hessian >= 0) & (m_hessian < tau_hessian)


class CurvatureMask(NamedTuple):
  keep: Array  # bool: both rules pass
  fisher_keep: Array  # bool
  hessian_keep: Array  # bool


def curvature_mask(
    m_hessian: Array,
    m_fisher: Array,
    *,
    tau_fisher: Array | float,
    tau_hessian: Array | float,
    hessian_rule: HessianRule = "symmetric",
) -> CurvatureMask:
  """CAPO's mask at any granularity: keep = [m_F < τ_F] ∧ Hessian rule. Multiply by the completion mask after."""
  chex.assert_equal_shape([m_hessian, m_fisher])
  f = fisher_keep(m_fisher, tau_fisher)
  hs = hessian_keep(m_hessian, tau_hessian, hessian_rule)
  return CurvatureMask(f & hs, f, hs)


def broadcast_to_tokens(keep: Array, shape_bt: tuple[int, int]) -> Array:
  """A token [B,T], sentence [B] or global [] mask as [B,T]."""
  if keep.ndim == 1:
    keep = keep[:, None]
  return jnp.broadcast_to(keep, shape_bt)


def curvature_penalty(
    m_hessian: Array,
    m_fisher: Array,
    weights: Array,
    *,
    lambda_hessian: float = 0.0,
    lambda_fisher: float = 0.0,
    hessian_rule: HessianRule = "symmetric",
) -> Array:
  """Penalty variant: λ·m added to the loss instead of masking, as a weighted mean over units.

      P = Σ w (λ_F m_F + λ_H φ(m_H)) / Σ w,   φ = |·| (symmetric) or max(−·, 0) (nonsymmetric: only predicted
      degradation is penalised, the side the non-symmetric mask's lower bound rejects).

  φ is our reading of "λ·m" for the signed m_H (the paper does not fix it; docs/MATH.md §2.6). For a gradient,
  compute the statistics WITHOUT stop_gradient (``weights``: completion mask for tokens, ones for sentences, 1 for
  global).
  """
  validation.check_hessian_rule(hessian_rule)
  chex.assert_equal_shape([m_hessian, m_fisher])
  phi = jnp.abs(m_hessian) if hessian_rule == "symmetric" else jnp.maximum(-m_hessian, 0.0)
  w = jnp.broadcast_to(weights, m_hessian.shape).astype(m_hessian.dtype)
  return jnp.sum(w * (lambda_fisher * m_fisher + lambda_hessian * phi)) / jnp.maximum(jnp.sum(w), 1e-12)


_QUANTILES = (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))
METRIC_KEYS = (
    "rejected_fraction", "rejected_by_fisher", "rejected_by_hessian",
    *(f"m_hessian_{n}" for n, _ in _QUANTILES), "m_hessian_max",
    *(f"m_fisher_{n}" for n, _ in _QUANTILES), "m_fisher_max",
)


def mask_metrics(m_hessian: Array, m_fisher: Array, mask: CurvatureMask, valid: Array) -> dict[str, Array]:
  """Scalars for logging (keys ``METRIC_KEYS``), all float32.

  ``rejected_*``: fraction of the valid units (completion tokens / rows) failing both / the Fisher / the Hessian rule
  (the last two overlap). Quantiles p50/p90/p99/max of the signed m_H and of m_F over the KEPT valid units (0 when
  nothing is kept).
  """
  valid = jnp.broadcast_to(valid, m_hessian.shape).astype(bool)
  n = jnp.maximum(jnp.sum(valid), 1).astype(jnp.float32)
  frac = lambda keep: jnp.sum(valid & ~keep).astype(jnp.float32) / n
  out = {
      "rejected_fraction": frac(mask.keep),
      "rejected_by_fisher": frac(mask.fisher_keep),
      "rejected_by_hessian": frac(mask.hessian_keep),
  }
  kept = (valid & mask.keep).reshape(-1)
  any_kept = jnp.any(kept)
  for name, m in (("m_hessian", m_hessian), ("m_fisher", m_fisher)):
    m = m.reshape(-1).astype(jnp.float32)
    masked = jnp.where(kept, m, jnp.nan)
    qs = jnp.nanquantile(masked, jnp.asarray([q for _, q in _QUANTILES], jnp.float32))  # one sort for all
    for i, (qname, _) in enumerate(_QUANTILES):
      out[f"{name}_{qname}"] = jnp.where(any_kept, qs[i], 0.0)
    out[f"{name}_max"] = jnp.where(any_kept, jnp.nanmax(masked), 0.0)
  return out


@dataclasses.dataclass(frozen=True)
class CurvatureMaskConfig:
  """A CAPO mask setting. ``as_kwargs()`` feeds ``capo_jax.masked_transform(inner, **config.as_kwargs(), ...)``.

  ``advantage_estimator`` names the base algorithm the thresholds were released with (informational).
  """

  tau_fisher: float
  tau_hessian: float
  hessian_rule: HessianRule = "symmetric"
  granularity: Granularity = "token"
  direction: Literal["adam", "sgd"] = "adam"
  top_k: int = 50
  advantage_estimator: str = "grpo"

  def __post_init__(self):
    validation.check_mask_setting(tau_fisher=self.tau_fisher, tau_hessian=self.tau_hessian,
                                  hessian_rule=self.hessian_rule, granularity=self.granularity,
                                  direction=self.direction, top_k=self.top_k)

  def as_kwargs(self) -> dict[str, Any]:
    return dict(tau_fisher=self.tau_fisher, tau_hessian=self.tau_hessian, hessian_rule=self.hessian_rule,
                granularity=self.granularity, direction=self.direction, top_k=self.top_k)


# Released thresholds (docs/MATH.md §2.5): all Adam direction, symmetric Hessian rule, token granularity, K = 50.
CAPO = CurvatureMaskConfig(tau_fisher=1e-4, tau_hessian=1e-2, advantage_estimator="grpo")
DR_CAPO = CurvatureMaskConfig(tau_fisher=1e-3, tau_hessian=5e-4, advantage_estimator="dr_grpo")
REIN_CAPO = CurvatureMaskConfig(tau_fisher=1e-5, tau_hessian=1e-1, advantage_estimator="reinforce")
PRESETS = {"capo": CAPO, "dr_capo": DR_CAPO, "rein_capo": REIN_CAPO}


def preset(name: str) -> CurvatureMaskConfig:
  """The released setting by name: 'CAPO', 'Dr.CAPO' or 'ReinCAPO' (case and '.', '-', '_' ignored)."""
  normalise = lambda s: "".join(c for c in s.lower() if c.isalnum())
  by_key = {normalise(k): v for k, v in PRESETS.items()}
  if normalise(name) not in by_key:
    raise ValueError(f"unknown CAPO preset {name!r}; choose one of {sorted(PRESETS)}.")
  return by_key[normalise(name)]


