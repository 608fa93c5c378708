"""Policy-gradient losses of the GRPO family: surrogates, aggregation, KL to a reference, entropy bonus.

Shapes: ``B`` rows (completions), ``T`` completion positions. Per-token inputs are ``[B, T]``: log-probabilities of
the sampled tokens under the current policy (``logprobs_bt``, differentiable), under the behaviour policy that
sampled them (``old_logprobs_bt``, constants) and, optionally, under a frozen reference (``ref_logprobs_bt``).
``completion_mask_bt`` is 1 on real completion tokens. ``token_mask_bt`` is an extra 0/1 mask multiplied into it —
CAPO passes its curvature mask here — and every aggregation renormalises by the **kept** tokens, as the CAPO
reference implementation does.

Empty masks are defined, never NaN: a row with no kept token contributes 0 to the loss (its denominator is clamped
to 1, as in TRL/the reference) and still counts in the mean over rows; a batch with no kept token has loss 0 and
zero gradient.

References: PPO clipping (Schulman et al. 2017); clip-higher ε_low/ε_high (DAPO, Yu et al. 2025); dual-clip (Ye et
al. 2020); GSPO (Zheng et al. 2025); CISPO (MiniMax-M1, 2025); k1/k2/k3 KL estimators (Schulman 2020); Dr.GRPO
aggregation (Liu et al. 2025); CAPO (Melo et al. 2025, arXiv 2510.00819).
"""

from __future__ import annotations

from typing import Literal

import chex
import jax
import jax.numpy as jnp

Array = jax.Array

Aggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
Method = Literal["clip", "gspo", "cispo"]
KLEstimator = Literal["k1", "k2", "k3"]

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def _as_mask(mask_bt: Array) -> Array:
  return mask_bt.astype(jnp.float32)


def aggregate_token_losses(
    token_losses_bt: Array,
    mask_bt: Array,
    *,
    mode: Aggregation = "seq-mean-token-mean",
    max_completion_length: int | None = None,
) -> Array:
  r"""Reduces per-token losses ``ℓ_{i,t}`` under a 0/1 mask ``m_{i,t}`` to a scalar.

  - ``token-mean``:               Σ_{i,t} m ℓ / max(Σ_{i,t} m, 1)   (DAPO)
  - ``seq-mean-token-mean``:      (1/B) Σ_i [Σ_t m ℓ / max(Σ_t m, 1)]   (GRPO, the CAPO reference)
  - ``seq-mean-token-sum``:       (1/B) Σ_i Σ_t m ℓ
  - ``seq-mean-token-sum-norm``:  (1/B) Σ_i Σ_t m ℓ / L_max   (Dr.GRPO; ``L_max = max_completion_length``,
    default T)

  Args:
    token_losses_bt: ``[B, T]`` float per-token losses.
    mask_bt: ``[B, T]`` 0/1 (bool, int or float) mask of the tokens that count.
    mode: one of the four modes above.
    max_completion_length: L_max for ``seq-mean-token-sum-norm``.

  Returns:
    Scalar float32 loss.
  """
  chex.assert_rank([token_losses_bt, mask_bt], 2)
  chex.assert_equal_shape([token_losses_bt, mask_bt])
  m = _as_mask(mask_bt)
  masked = token_losses_bt.astype(jnp.float32) * m
  if mode == "token-mean":
    return jnp.sum(masked) / jnp.maximum(jnp.sum(m), 1.0)
  if mode == "seq-mean-token-mean":
    return jnp.mean(jnp.sum(masked, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0))
  if mode == "seq-mean-token-sum":
    return jnp.mean(jnp.sum(masked, axis=1))
  if mode == "seq-mean-token-sum-norm":
    length = token_losses_bt.shape[1] if max_completion_length is None else max_completion_length
    if length < 1:
      raise ValueError(f"max_completion_length must be ≥ 1, got {length}.")
    return jnp.mean(jnp.sum(masked, axis=1)) / length
  raise ValueError(f"unknown aggregation {mode!r}; choose one of {AGGREGATIONS}.")


def clipped_surrogate_token_losses(
    logprobs_bt: Array,
    old_logprobs_bt: Array,
    advantages_b: Array,
    *,
    eps_low: float = 0.2,
    eps_high: float | None = None,
    dual_clip: float | None = None,
) -> tuple[Array, Array, Array]:
  r"""PPO/GRPO clipped surrogate per token, with clip-higher and optional dual-clip.

  ρ_t = exp(logπ_θ(a_t) − logπ_old(a_t)),
  ℓ_t = −min(ρ_t A_i, clip(ρ_t, 1−ε_low, 1+ε_high) A_i)
  and with dual-clip c > 1, for A_i < 0: ℓ_t = −max(min(ρ_t A_i, clip(ρ_t) A_i), c A_i).

  At ρ = 1 (one gradient step per batch, the paper's regime) ∇ℓ_t = −A_i ∇logπ_θ(a_t): REINFORCE.

  Returns:
    ``(token_losses_bt, ratio_bt, clipped_bt)``; ``clipped_bt`` is 1 where clipping zeroes the token's gradient.
  """
  eps_high = eps_low if eps_high is None else eps_high
  if eps_low < 0 or eps_high < 0:
    raise ValueError(f"clip ranges must be ≥ 0, got eps_low={eps_low}, eps_high={eps_high}.")
  if dual_clip is not None and dual_clip <= 1.0:
    raise ValueError(f"dual_clip must be > 1 (it bounds ρ·A for A < 0 at c·A), got {dual_clip}.")
  adv_b1 = advantages_b.astype(jnp.float32)[:, None]
  log_ratio_bt = logprobs_bt - jax.lax.stop_gradient(old_logprobs_bt)
  ratio_bt = jnp.exp(log_ratio_bt)
  unclipped = ratio_bt * adv_b1
  clipped = jnp.clip(ratio_bt, 1.0 - eps_low, 1.0 + eps_high) * adv_b1
  objective = jnp.minimum(unclipped, clipped)
  is_clipped = ((ratio_bt > 1.0 + eps_high) & (adv_b1 > 0)) | ((ratio_bt < 1.0 - eps_low) & (adv_b1 < 0))
  if dual_clip is not None:
    lower = dual_clip * adv_b1
    dual_active = (adv_b1 < 0) & (objective < lower)
    objective = jnp.where(adv_b1 < 0, jnp.maximum(objective, lower), objective)
    is_clipped = is_clipped | dual_active
  return -objective, ratio_bt, is_clipped.astype(jnp.float32)


def gspo_token_losses(
    logprobs_bt: Array,
    old_logprobs_bt: Array,
    advantages_b: Array,
    mask_bt: Array,
    *,
    eps_low: float = 3e-4,
    eps_high: float | None = 4e-4,
) -> tuple[Array, Array, Array]:
  r"""GSPO: the clipped surrogate on the sequence-level, length-normalised importance ratio.

  s_i = exp((1/|y_i|) Σ_t m_t (logπ_θ − logπ_old)),  and per token (GSPO-token form, same value and gradient)
  s_{i,t} = sg[s_i] · π_θ(a_t)/sg[π_θ(a_t)],  ℓ_{i,t} = −min(s_{i,t} A_i, clip(s_{i,t}, 1−ε_low, 1+ε_high) A_i).
  The sequence mean uses the mask it is given (completion × token mask). Defaults are GSPO's ε (3e-4, 4e-4).
  """
  eps_high = eps_low if eps_high is None else eps_high
  m = _as_mask(mask_bt)
  log_ratio_bt = logprobs_bt - jax.lax.stop_gradient(old_logprobs_bt)
  seq_log_ratio_b = jnp.sum(log_ratio_bt * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
  seq_ratio_b1 = jnp.exp(seq_log_ratio_b)[:, None]
  ratio_bt = jax.lax.stop_gradient(seq_ratio_b1) * jnp.exp(logprobs_bt - jax.lax.stop_gradient(logprobs_bt))
  adv_b1 = advantages_b.astype(jnp.float32)[:, None]
  objective = jnp.minimum(ratio_bt * adv_b1, jnp.clip(ratio_bt, 1.0 - eps_low, 1.0 + eps_high) * adv_b1)
  is_clipped = ((ratio_bt > 1.0 + eps_high) & (adv_b1 > 0)) | ((ratio_bt < 1.0 - eps_low) & (adv_b1 < 0))
  return -objective, ratio_bt, is_clipped.astype(jnp.float32)


def cispo_token_losses(
    logprobs_bt: Array,
    old_logprobs_bt: Array,
    advantages_b: Array,
    *,
    eps_low: float | None = None,
    eps_high: float = 0.28,
) -> tuple[Array, Array, Array]:
  r"""CISPO: clip the importance weight, not the update; every token keeps a gradient.

  ℓ_t = −sg[clip(ρ_t, 1−ε_low, 1+ε_high)] · A_i · logπ_θ(a_t)   (``eps_low=None``: no lower bound, as MiniMax-M1).
  """
  log_ratio_bt = logprobs_bt - jax.lax.stop_gradient(old_logprobs_bt)
  ratio_bt = jnp.exp(log_ratio_bt)
  low = 0.0 if eps_low is None else 1.0 - eps_low
  weight_bt = jax.lax.stop_gradient(jnp.clip(ratio_bt, low, 1.0 + eps_high))
  adv_b1 = advantages_b.astype(jnp.float32)[:, None]
  is_clipped = (ratio_bt > 1.0 + eps_high) | (ratio_bt < low)
  return -weight_bt * adv_b1 * logprobs_bt, ratio_bt, is_clipped.astype(jnp.float32)


def kl_divergence(
    logprobs_bt: Array,
    ref_logprobs_bt: Array,
    *,
    estimator: KLEstimator = "k3",
    clamp: float | None = None,
) -> Array:
  r"""Per-token estimate of KL(π_θ ‖ π_ref) from the sampled token's log-probabilities.

  With x = logπ_ref(a) − logπ_θ(a) (a ~ π_θ):
  - k1 = −x                       (unbiased, can be negative)
  - k2 = ½ x²                     (biased, ≥ 0)
  - k3 = eˣ − x − 1 = expm1(x) − x   (unbiased, ≥ 0; ``expm1`` keeps small x exact; the result is floored at 0 so
    that rounding can never make it negative)

  ``clamp`` bounds x to [−clamp, clamp] first (the GRPO reference clamps the k3 log-ratio; without it k3 is finite
  in float32 up to x ≈ 88).
  """
  chex.assert_equal_shape([logprobs_bt, ref_logprobs_bt])
  x = ref_logprobs_bt.astype(jnp.float32) - logprobs_bt.astype(jnp.float32)
  if clamp is not None:
    x = jnp.clip(x, -clamp, clamp)
  if estimator == "k1":
    return -x
  if estimator == "k2":
    return 0.5 * jnp.square(x)
  if estimator == "k3":
    return jnp.maximum(jnp.expm1(x) - x, 0.0)
  raise ValueError(f"unknown KL estimator {estimator!r}; choose 'k1', 'k2' or 'k3'.")


def _masked_mean(x_bt: Array, mask_bt: Array) -> Array:
  m = _as_mask(mask_bt)
  return jnp.sum(x_bt * m) / jnp.maximum(jnp.sum(m), 1.0)


def _masked_max(x_bt: Array, mask_bt: Array, empty_value: float) -> Array:
  """Max over kept tokens; ``empty_value`` (not ±inf) when nothing is kept."""
  kept = mask_bt > 0
  return jnp.where(jnp.any(kept), jnp.max(jnp.where(kept, x_bt, -jnp.inf)), empty_value)


def policy_loss(
    logprobs_bt: Array,
    old_logprobs_bt: Array,
    advantages_b: Array,
    completion_mask_bt: Array,
    *,
    token_mask_bt: Array | None = None,
    method: Method = "clip",
    eps_low: float | None = None,
    eps_high: float | None = None,
    dual_clip: float | None = None,
    aggregation: Aggregation = "seq-mean-token-mean",
    max_completion_length: int | None = None,
    ref_logprobs_bt: Array | None = None,
    kl_coef: float = 0.0,
    kl_estimator: KLEstimator = "k3",
    kl_clamp: float | None = None,
    entropy_bt: Array | None = None,
    entropy_coef: float = 0.0,
) -> tuple[Array, dict[str, Array]]:
  r"""The full GRPO-family objective and its metrics, from per-token log-probabilities.

  loss = agg_m(ℓ^{PG}) + β · agg_m(KL(π_θ ‖ π_ref)) − c_H · agg_m(H)

  where ``m = completion_mask × token_mask`` and ``agg`` is ``aggregation`` (see ``aggregate_token_losses``);
  ``ℓ^{PG}`` is the surrogate of ``method``: ``"clip"`` (PPO/GRPO with clip-higher, optional dual-clip; ε defaults
  0.2/0.2), ``"gspo"`` (sequence ratio; ε defaults 3e-4/4e-4) or ``"cispo"`` (clipped IS weight; ε_high 0.28).

  Args:
    logprobs_bt: ``[B, T]`` float log π_θ of the sampled tokens (the only differentiable input).
    old_logprobs_bt: ``[B, T]`` behaviour-policy log-probs (pass ``stop_gradient(logprobs_bt)`` for ρ ≡ 1).
    advantages_b: ``[B]`` per-row advantages.
    completion_mask_bt: ``[B, T]`` 0/1 mask of real completion tokens.
    token_mask_bt: optional ``[B, T]`` 0/1 mask (CAPO's) multiplied into the completion mask.
    method, eps_low, eps_high, dual_clip: the surrogate.
    aggregation, max_completion_length: see ``aggregate_token_losses``.
    ref_logprobs_bt, kl_coef, kl_estimator, kl_clamp: KL penalty to a reference policy (skipped when ``kl_coef`` is
      0 or there is no reference).
    entropy_bt, entropy_coef: entropy bonus (per-token entropies from ``capo_jax.token_logprobs``).

  Returns:
    ``(loss, metrics)``; metrics (scalars, over kept tokens, gradient-free) are ``pg_loss``, ``clip_fraction``,
    ``ratio_mean``, ``ratio_min``, ``ratio_max``, ``kl`` (when a reference is given), ``entropy`` (when given) and
    ``kept_tokens``.
  """
  chex.assert_rank([logprobs_bt, old_logprobs_bt, advantages_b, completion_mask_bt], [2, 2, 1, 2])
  chex.assert_equal_shape([logprobs_bt, old_logprobs_bt, completion_mask_bt])
  chex.assert_equal_shape_prefix([logprobs_bt, advantages_b], 1)
  for name, x in (("logprobs", logprobs_bt), ("old_logprobs", old_logprobs_bt), ("advantages", advantages_b)):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(f"{name} must be floating point, got dtype {x.dtype}.")
  mask_bt = _as_mask(completion_mask_bt)
  if token_mask_bt is not None:
    chex.assert_equal_shape([token_mask_bt, completion_mask_bt])
    mask_bt = mask_bt * _as_mask(token_mask_bt)

  if method == "clip":
    token_losses, ratio, clipped = clipped_surrogate_token_losses(
        logprobs_bt, old_logprobs_bt, advantages_b,
        eps_low=0.2 if eps_low is None else eps_low, eps_high=eps_high, dual_clip=dual_clip)
  elif method == "gspo":
    token_losses, ratio, clipped = gspo_token_losses(
        logprobs_bt, old_logprobs_bt, advantages_b, mask_bt,
        eps_low=3e-4 if eps_low is None else eps_low, eps_high=4e-4 if eps_high is None else eps_high)
  elif method == "cispo":
    token_losses, ratio, clipped = cispo_token_losses(
        logprobs_bt, old_logprobs_bt, advantages_b, eps_low=eps_low, eps_high=0.28 if eps_high is None else eps_high)
  else:
    raise ValueError(f"unknown policy-loss method {method!r}; choose 'clip', 'gspo' or 'cispo'.")

  def agg(x_bt):
    return aggregate_token_losses(x_bt, mask_bt, mode=aggregation, max_completion_length=max_completion_length)

  pg_loss = agg(token_losses)
  loss = pg_loss
  sg = jax.lax.stop_gradient
  metrics = {
      "pg_loss": sg(pg_loss),
      "clip_fraction": _masked_mean(clipped, mask_bt),
      "ratio_mean": sg(_masked_mean(ratio, mask_bt)),
      "ratio_min": sg(-_masked_max(-ratio, mask_bt, -1.0)),
      "ratio_max": sg(_masked_max(ratio, mask_bt, 1.0)),
      "kept_tokens": jnp.sum(mask_bt),
  }
  if ref_logprobs_bt is not None:
    kl_bt = kl_divergence(logprobs_bt, ref_logprobs_bt, estimator=kl_estimator, clamp=kl_clamp)
    metrics["kl"] = sg(_masked_mean(kl_bt, mask_bt))
    if kl_coef:
      loss = loss + kl_coef * agg(kl_bt)
  elif kl_coef:
    raise ValueError("kl_coef > 0 needs ref_logprobs_bt (log-probs of the sampled tokens under the reference).")
  if entropy_bt is not None:
    chex.assert_equal_shape([entropy_bt, logprobs_bt])
    metrics["entropy"] = sg(_masked_mean(entropy_bt, mask_bt))
    if entropy_coef:
      loss = loss - entropy_coef * agg(entropy_bt)
  elif entropy_coef:
    raise ValueError("entropy_coef > 0 needs entropy_bt (from capo_jax.token_logprobs).")
  return loss, metrics
