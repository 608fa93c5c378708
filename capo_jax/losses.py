"""Policy-gradient losses of the GRPO family: surrogates, aggregation, KL to a reference, entropy bonus.

The math of every function here is derived in ``docs/MATH.md §1.2`` (surrogates), ``§1.3`` (aggregation) and
``§1.4`` (KL estimators and the entropy bonus).

Shapes: ``B`` rows (completions), ``T`` completion positions. Per-token inputs are ``[B, T]``: log-probabilities of
the sampled tokens under the current policy (``logprobs_bt``, differentiable), under the behaviour policy that
sampled them (``old_logprobs_bt``, constants) and, optionally, under a frozen reference (``ref_logprobs_bt``).
``completion_mask_bt`` is 1 on real completion tokens. ``token_mask_bt`` is an extra 0/1 mask combined with it —
CAPO passes its curvature mask here — and every aggregation renormalises by the **kept** tokens (``docs/MATH.md
§1.3``).

Masks. A mask holds 0 and 1 (or booleans). A concrete mask with any other value (−1 would flip a token's loss, 0.5
would half-count it) raises one ``ValueError``; a traced mask (under ``jax.jit``/``vmap``) cannot be checked and is
read as ``mask > 0``, so a stray value there drops or keeps a token but never rescales or flips it.

Masked-out slots are inert: whatever they hold (NaN, ±inf, garbage log-probs of padding), it never reaches a sum.
``policy_loss`` replaces them with ``jnp.where`` before any arithmetic, so the loss, the metrics **and the gradients**
stay finite (a multiplication by 0 would not do: 0·NaN = NaN, and a backward pass through ``exp`` of a garbage slot
multiplies its zero cotangent by ``exp(garbage)``).

Empty masks are defined, never NaN: a row with no kept token contributes 0 to the loss (its denominator is clamped
to 1) and still counts in the mean over rows; a batch with no kept token has loss 0 and zero gradient.

Overflow. Importance ratios are formed in log space, x = logπ_θ − logπ_old in (at least) float32, and exponentiated
as ρ = exp(min(x, ``MAX_LOG_RATIO``)), ``MAX_LOG_RATIO = 60`` (e^60 ≈ 1.1e26). The clamp changes nothing wherever
the surrogate is flat beyond e^60 (A > 0 above 1+ε_high, A < 0 above the dual-clip bound, A = 0, every CISPO
weight); only where the exact loss grows without bound (A < 0 without dual-clip, ℓ = −ρA) it caps the loss at
e^60·|A| with zero gradient beyond the cap, instead of letting it overflow to inf and the gradient to NaN. The k3 KL
estimator uses the same cap on its log-ratio (``docs/MATH.md §1.4``); on the other side exp underflows harmlessly to
0, which is the exact limit.
"""

from __future__ import annotations

from typing import Literal

import chex
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

Aggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
Method = Literal["clip", "gspo", "cispo"]
KLEstimator = Literal["k1", "k2", "k3"]

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")

# Upper clamp of every log-ratio before ``exp`` (module docstring, docs/MATH.md §1.2): e^60 ≈ 1.1e26 is far beyond
# any clip bound, and e^60 times any sane advantage or token count stays finite in float32.
MAX_LOG_RATIO = 60.0


def _check_binary_mask(mask_bt: Array, name: str) -> None:
  """One clear error for a concrete mask holding anything but 0/1; traced masks are read as ``mask > 0``."""
  if isinstance(mask_bt, jax.core.Tracer) or jnp.dtype(mask_bt.dtype) == jnp.bool_:
    return
  values = np.asarray(mask_bt)
  bad = ~((values == 0) | (values == 1))
  if bad.any():
    where = np.argwhere(bad)
    first = tuple(int(i) for i in where[0])
    raise ValueError(
        f"{name} must be a 0/1 mask, but {len(where)} of its {values.size} entries are other values (first: "
        f"{values[first].item()!r} at index {list(first)}); a −1 would flip that token's loss and a 0.5 would "
        "half-count it. Pass a boolean or 0/1 mask (e.g. mask > 0); weight tokens through the advantages instead."
    )


def _kept(mask_bt: Array) -> Array:
  """The boolean mask of the tokens that count: ``mask > 0`` (equal to ``mask == 1`` for a checked 0/1 mask)."""
  return mask_bt if jnp.dtype(mask_bt.dtype) == jnp.bool_ else mask_bt > 0


def _float(x: Array) -> Array:
  """``x`` in at least float32 (bf16 → f32, f64 stays f64)."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _log_ratio(logprobs_bt: Array, old_logprobs_bt: Array) -> Array:
  """x = logπ_θ − sg[logπ_old] in at least float32 (differentiable in ``logprobs_bt`` only)."""
  return _float(logprobs_bt) - jax.lax.stop_gradient(_float(old_logprobs_bt))


def _ratio(log_ratio: Array) -> Array:
  """ρ = exp(min(x, MAX_LOG_RATIO)): never inf (module docstring for where the clamp is exact)."""
  return jnp.exp(jnp.minimum(log_ratio, MAX_LOG_RATIO))


def _aggregate(token_losses_bt: Array, kept_bt: Array, mode: str, max_completion_length: int | None) -> Array:
  """``aggregate_token_losses`` on a boolean mask, without the value check."""
  m = kept_bt.astype(jnp.float32)
  masked = jnp.where(kept_bt, _float(token_losses_bt), 0.0)
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


def aggregate_token_losses(
    token_losses_bt: Array,
    mask_bt: Array,
    *,
    mode: Aggregation = "seq-mean-token-mean",
    max_completion_length: int | None = None,
) -> Array:
  r"""Reduces per-token losses ``ℓ_{i,t}`` under a 0/1 mask ``m_{i,t}`` to a scalar (``docs/MATH.md §1.3``).

  - ``token-mean``:               Σ_{i,t} m ℓ / max(Σ_{i,t} m, 1)
  - ``seq-mean-token-mean``:      (1/B) Σ_i [Σ_t m ℓ / max(Σ_t m, 1)]   (GRPO, CAPO's default)
  - ``seq-mean-token-sum``:       (1/B) Σ_i Σ_t m ℓ
  - ``seq-mean-token-sum-norm``:  (1/B) Σ_i Σ_t m ℓ / L_max   (Dr.GRPO; ``L_max = max_completion_length``,
    default T)

  "m ℓ" is ``jnp.where(m, ℓ, 0)``: a masked slot's value never enters a sum, even when it is NaN or ±inf, and its
  cotangent is exactly 0.

  Args:
    token_losses_bt: ``[B, T]`` float per-token losses.
    mask_bt: ``[B, T]`` 0/1 (bool, int or float) mask of the tokens that count; a concrete mask with other values
      raises ``ValueError``, a traced one is read as ``mask > 0``.
    mode: one of the four modes above.
    max_completion_length: L_max for ``seq-mean-token-sum-norm``.

  Returns:
    Scalar loss in at least float32.
  """
  chex.assert_rank([token_losses_bt, mask_bt], 2)
  chex.assert_equal_shape([token_losses_bt, mask_bt])
  _check_binary_mask(mask_bt, "mask_bt")
  return _aggregate(token_losses_bt, _kept(mask_bt), mode, max_completion_length)


def clipped_surrogate_token_losses(
    logprobs_bt: Array,
    old_logprobs_bt: Array,
    advantages_b: Array,
    *,
    eps_low: float = 0.2,
    eps_high: float | None = None,
    dual_clip: float | None = None,
) -> tuple[Array, Array, Array]:
  r"""PPO/GRPO clipped surrogate per token, with clip-higher and optional dual-clip (``docs/MATH.md §1.2``).

  ρ_t = exp(min(x_t, 60)),  x_t = logπ_θ(a_t) − logπ_old(a_t)   (log space; the clamp: module docstring)
  ℓ_t = −min(ρ_t A_i, clip(ρ_t, 1−ε_low, 1+ε_high) A_i)
  and with dual-clip c > 1, for A_i < 0: ℓ_t = −max(min(ρ_t A_i, clip(ρ_t) A_i), c A_i).

  At ρ = 1 (one gradient step per batch, CAPO's regime) ∇ℓ_t = −A_i ∇logπ_θ(a_t): REINFORCE.

  Returns:
    ``(token_losses_bt, ratio_bt, clipped_bt)``; ``clipped_bt`` is 1 where clipping zeroes the token's gradient.
  """
  eps_high = eps_low if eps_high is None else eps_high
  if eps_low < 0 or eps_high < 0:
    raise ValueError(f"clip ranges must be ≥ 0, got eps_low={eps_low}, eps_high={eps_high}.")
  if dual_clip is not None and dual_clip <= 1.0:
    raise ValueError(f"dual_clip must be > 1 (it bounds ρ·A for A < 0 at c·A), got {dual_clip}.")
  adv_b1 = _float(advantages_b)[:, None]
  ratio_bt = _ratio(_log_ratio(logprobs_bt, old_logprobs_bt))
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
  r"""GSPO: the clipped surrogate on the sequence-level, length-normalised importance ratio (``docs/MATH.md §1.2``).

  s_i = exp(min(x̄_i, 60)),  x̄_i = (1/|y_i|) Σ_t m_t (logπ_θ − logπ_old),  and per token (GSPO-token form, same
  value and gradient) s_{i,t} = sg[s_i] · π_θ(a_t)/sg[π_θ(a_t)],
  ℓ_{i,t} = −min(s_{i,t} A_i, clip(s_{i,t}, 1−ε_low, 1+ε_high) A_i).
  The sequence mean uses the mask it is given (completion × token mask; 0/1, checked as in
  ``aggregate_token_losses``). Defaults are GSPO's ε (3e-4, 4e-4).
  """
  chex.assert_equal_shape([logprobs_bt, old_logprobs_bt, mask_bt])
  _check_binary_mask(mask_bt, "mask_bt")
  eps_high = eps_low if eps_high is None else eps_high
  kept_bt = _kept(mask_bt)
  log_ratio_bt = _log_ratio(logprobs_bt, old_logprobs_bt)
  kept_count_b = jnp.sum(kept_bt.astype(log_ratio_bt.dtype), axis=1)
  seq_log_ratio_b = jnp.sum(jnp.where(kept_bt, log_ratio_bt, 0.0), axis=1) / jnp.maximum(kept_count_b, 1.0)
  seq_ratio_b1 = _ratio(seq_log_ratio_b)[:, None]
  lp = _float(logprobs_bt)
  ratio_bt = jax.lax.stop_gradient(seq_ratio_b1) * jnp.exp(lp - jax.lax.stop_gradient(lp))
  adv_b1 = _float(advantages_b)[:, None]
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
  r"""CISPO: clip the importance weight, not the update; every token keeps a gradient (``docs/MATH.md §1.2``).

  ℓ_t = −sg[clip(ρ_t, 1−ε_low, 1+ε_high)] · A_i · logπ_θ(a_t)   (``eps_low=None``: no lower bound);
  ρ_t as in ``clipped_surrogate_token_losses`` (the clamp at e^60 never changes the clipped weight).
  """
  ratio_bt = _ratio(_log_ratio(logprobs_bt, old_logprobs_bt))
  low = 0.0 if eps_low is None else 1.0 - eps_low
  weight_bt = jax.lax.stop_gradient(jnp.clip(ratio_bt, low, 1.0 + eps_high))
  adv_b1 = _float(advantages_b)[:, None]
  is_clipped = (ratio_bt > 1.0 + eps_high) | (ratio_bt < low)
  return -weight_bt * adv_b1 * _float(logprobs_bt), ratio_bt, is_clipped.astype(jnp.float32)


def kl_divergence(
    logprobs_bt: Array,
    ref_logprobs_bt: Array,
    *,
    estimator: KLEstimator = "k3",
    clamp: float | None = None,
) -> Array:
  r"""Per-token estimate of KL(π_θ ‖ π_ref) from the sampled token's log-probabilities (``docs/MATH.md §1.4``).

  With x = logπ_ref(a) − logπ_θ(a) (a ~ π_θ):
  - k1 = −x                        (unbiased, can be negative)
  - k2 = ½ x²                      (biased, ≥ 0)
  - k3 = eˣ − x − 1 = expm1(x) − x   (unbiased, ≥ 0; ``expm1`` keeps small x exact; floored at 0 so that rounding
    can never make it negative; x is capped at ``MAX_LOG_RATIO`` = 60 first, so k3 ≤ e^60 − 61 and its gradient
    is 0 beyond the cap instead of overflowing — exact wherever x ≤ 60)

  ``clamp`` bounds x to [−clamp, clamp] first, for every estimator.
  """
  chex.assert_equal_shape([logprobs_bt, ref_logprobs_bt])
  x = _float(ref_logprobs_bt) - _float(logprobs_bt)
  if clamp is not None:
    x = jnp.clip(x, -clamp, clamp)
  if estimator == "k1":
    return -x
  if estimator == "k2":
    return 0.5 * jnp.square(x)
  if estimator == "k3":
    x = jnp.minimum(x, MAX_LOG_RATIO)
    return jnp.maximum(jnp.expm1(x) - x, 0.0)
  raise ValueError(f"unknown KL estimator {estimator!r}; choose 'k1', 'k2' or 'k3'.")


def _masked_mean(x_bt: Array, kept_bt: Array) -> Array:
  return jnp.sum(jnp.where(kept_bt, x_bt, 0.0)) / jnp.maximum(jnp.sum(kept_bt.astype(jnp.float32)), 1.0)


def _masked_max(x_bt: Array, kept_bt: Array, empty_value: float) -> Array:
  """Max over kept tokens; ``empty_value`` (not ±inf) when nothing is kept."""
  return jnp.where(jnp.any(kept_bt), jnp.max(jnp.where(kept_bt, x_bt, -jnp.inf)), empty_value)


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
  r"""The full GRPO-family objective and its metrics, from per-token log-probabilities (``docs/MATH.md §1``).

  loss = agg_m(ℓ^{PG}) + β · agg_m(KL(π_θ ‖ π_ref)) − c_H · agg_m(H)

  where ``m = completion_mask ∧ token_mask`` and ``agg`` is ``aggregation`` (see ``aggregate_token_losses``);
  ``ℓ^{PG}`` is the surrogate of ``method``: ``"clip"`` (PPO/GRPO with clip-higher, optional dual-clip; ε defaults
  0.2/0.2), ``"gspo"`` (sequence ratio; ε defaults 3e-4/4e-4) or ``"cispo"`` (clipped IS weight; ε_high 0.28).

  Masked-out slots of every per-token input (and the advantage of a row with no kept token) are replaced by 0 with
  ``jnp.where`` before any arithmetic: NaN or ±inf there changes neither the loss, nor the metrics, nor the
  gradient (which is exactly 0 on those slots), also under ``jax.jit``.

  Args:
    logprobs_bt: ``[B, T]`` float log π_θ of the sampled tokens (the only differentiable input).
    old_logprobs_bt: ``[B, T]`` behaviour-policy log-probs (pass ``stop_gradient(logprobs_bt)`` for ρ ≡ 1).
    advantages_b: ``[B]`` per-row advantages.
    completion_mask_bt: ``[B, T]`` 0/1 mask of real completion tokens.
    token_mask_bt: optional ``[B, T]`` 0/1 mask (CAPO's) combined with the completion mask. A concrete mask with a
      value other than 0/1 raises ``ValueError`` (both masks); under tracing a mask is read as ``mask > 0``.
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
  _check_binary_mask(completion_mask_bt, "completion_mask_bt")
  kept_bt = _kept(completion_mask_bt)
  if token_mask_bt is not None:
    chex.assert_equal_shape([token_mask_bt, completion_mask_bt])
    _check_binary_mask(token_mask_bt, "token_mask_bt")
    kept_bt = kept_bt & _kept(token_mask_bt)

  # Whatever a masked-out slot holds must not reach a sum, nor the backward pass (0 · NaN = NaN there).
  def clean(x_bt):
    return jnp.where(kept_bt, x_bt, jnp.zeros((), x_bt.dtype))

  logprobs_bt, old_logprobs_bt = clean(logprobs_bt), clean(old_logprobs_bt)
  advantages_b = jnp.where(jnp.any(kept_bt, axis=1), advantages_b, jnp.zeros((), advantages_b.dtype))

  if method == "clip":
    token_losses, ratio, clipped = clipped_surrogate_token_losses(
        logprobs_bt, old_logprobs_bt, advantages_b,
        eps_low=0.2 if eps_low is None else eps_low, eps_high=eps_high, dual_clip=dual_clip)
  elif method == "gspo":
    token_losses, ratio, clipped = gspo_token_losses(
        logprobs_bt, old_logprobs_bt, advantages_b, kept_bt,
        eps_low=3e-4 if eps_low is None else eps_low, eps_high=4e-4 if eps_high is None else eps_high)
  elif method == "cispo":
    token_losses, ratio, clipped = cispo_token_losses(
        logprobs_bt, old_logprobs_bt, advantages_b, eps_low=eps_low, eps_high=0.28 if eps_high is None else eps_high)
  else:
    raise ValueError(f"unknown policy-loss method {method!r}; choose 'clip', 'gspo' or 'cispo'.")

  def agg(x_bt):
    return _aggregate(x_bt, kept_bt, aggregation, max_completion_length)

  pg_loss = agg(token_losses)
  loss = pg_loss
  sg = jax.lax.stop_gradient
  metrics = {
      "pg_loss": sg(pg_loss),
      "clip_fraction": _masked_mean(clipped, kept_bt),
      "ratio_mean": sg(_masked_mean(ratio, kept_bt)),
      "ratio_min": sg(-_masked_max(-ratio, kept_bt, -1.0)),
      "ratio_max": sg(_masked_max(ratio, kept_bt, 1.0)),
      "kept_tokens": jnp.sum(kept_bt.astype(jnp.float32)),
  }
  if ref_logprobs_bt is not None:
    chex.assert_equal_shape([ref_logprobs_bt, logprobs_bt])
    kl_bt = kl_divergence(logprobs_bt, clean(ref_logprobs_bt), estimator=kl_estimator, clamp=kl_clamp)
    metrics["kl"] = sg(_masked_mean(kl_bt, kept_bt))
    if kl_coef:
      loss = loss + kl_coef * agg(kl_bt)
  elif kl_coef:
    raise ValueError("kl_coef > 0 needs ref_logprobs_bt (log-probs of the sampled tokens under the reference).")
  if entropy_bt is not None:
    chex.assert_equal_shape([entropy_bt, logprobs_bt])
    entropy_bt = clean(entropy_bt)
    metrics["entropy"] = sg(_masked_mean(entropy_bt, kept_bt))
    if entropy_coef:
      loss = loss - entropy_coef * agg(entropy_bt)
  elif entropy_coef:
    raise ValueError("entropy_coef > 0 needs entropy_bt (from capo_jax.token_logprobs).")
  return loss, metrics
