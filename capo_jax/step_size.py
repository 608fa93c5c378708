"""A curvature-controlled step size: scale each update so its predicted mean KL meets a target δ.

Derivation and the choice of the rule: ``docs/MATH.md`` §7. The trust region of §5 only shrinks a step whose
predicted KL exceeds δ; this rule also grows a step whose predicted KL falls short of it, up to a cap.

For a proposed update Δθ (all parameters, learning rate included) and the batch's completion tokens:

    KL̂(Δθ) = ½ · (1/N) Σ_t Δz_tᵀ(diag π_t − π_tπ_tᵀ)Δz_t,    Δz_t = J_tΔθ   (one ``jax.jvp`` of the logits)
    KL̂(sΔθ) = s² · KL̂(Δθ)                                                  (the model is quadratic in Δθ)
    s       = clip(√(δ / KL̂(Δθ)), s_min, s_max)          (s = s_max when KL̂ = 0)
    Δθ'     = s · Δθ,        so KL̂(Δθ') = δ whenever s_min < s < s_max

With s_min = 0 and s_max = 1 this is exactly the trust region of §5. Uncapped, the applied step's predicted KL is δ
whatever the learning rate η: Adam's update is ∝ η, so s ∝ 1/η and the applied step sΔθ does not depend on η (§7 for
the range of η over which that holds given the cap).

As an optax transformation, ``kl_target_transform(inner, target_kl=δ, logits_fn=..., max_scale=s_max)`` wraps the
optimizer whose update it scales, with the contract of ``capo_jax.trust_region.trust_region_transform``:
``update(grads, state, params, *, batch, **extra)`` needs ``params`` and the ``batch`` that ``logits_fn(params,
batch)`` reads (both also go to ``inner``); put it last in a chain. The inner optimizer's state advances exactly as
without it. The state is a ``capo_jax.trust_region.TrustRegionState`` (``predicted_kl`` of the inner, unscaled update;
``scale`` = s), so whatever finds and logs the trust region's statistics finds these too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from capo_jax import validation
from capo_jax.curvature_full import LogitsFn, predicted_mean_kl
from capo_jax.trust_region import TrustRegionState

Array = jax.Array
PyTree = Any

__all__ = ["check_scale_bounds", "kl_target_scale", "kl_target_step", "kl_target_transform"]


def check_scale_bounds(min_scale: Any, max_scale: Any) -> None:
  """0 ≤ s_min ≤ s_max < ∞, with s_max > 0."""
  try:
    lo, hi = float(min_scale), float(max_scale)
  except (TypeError, ValueError) as e:
    raise ValueError(f"min_scale and max_scale must be numbers, got {min_scale!r} and {max_scale!r}.") from e
  if not (0.0 <= lo <= hi and 0.0 < hi < float("inf")):
    raise ValueError(f"need 0 <= min_scale <= max_scale < inf and max_scale > 0 (the bounds on the step scale s, "
                     f"e.g. min_scale=0, max_scale=4); got min_scale={min_scale}, max_scale={max_scale}.")


def kl_target_scale(predicted_kl: Array, target_kl: float | Array, *, max_scale: float,
                    min_scale: float = 0.0) -> Array:
  """s = clip(√(δ / KL̂), s_min, s_max); s_max when KL̂ = 0 (a step that changes nothing may grow to the cap)."""
  kl = jnp.asarray(predicted_kl)
  kl = kl.astype(jnp.promote_types(kl.dtype, jnp.float32))
  ratio = jnp.asarray(target_kl, kl.dtype) / jnp.maximum(kl, jnp.finfo(kl.dtype).tiny)
  return jnp.clip(jnp.sqrt(ratio), min_scale, max_scale).astype(kl.dtype)


def kl_target_step(
    logits_fn: LogitsFn,
    params: PyTree,
    batch: PyTree,
    update: PyTree,
    *,
    target_kl: float,
    max_scale: float,
    min_scale: float = 0.0,
    completion_mask_bt: Array | None = None,
    temperature: float = 1.0,
) -> tuple[PyTree, Array, Array]:
  """Scale ``update`` so its predicted mean KL is ``target_kl`` within the scale bounds (module docstring).

  Returns ``(scaled_update, predicted_kl_of_the_unscaled_update, scale)``.
  """
  validation.check_max_kl(target_kl)
  kl = predicted_mean_kl(logits_fn, params, batch, update, completion_mask_bt, temperature=temperature)
  scale = kl_target_scale(kl, target_kl, max_scale=max_scale, min_scale=min_scale)
  return jax.tree.map(lambda u: (u * scale).astype(u.dtype), update), kl, scale


def _default_completion_mask(batch: PyTree) -> Array | None:
  if isinstance(batch, Mapping) and "completion_mask" in batch:
    return batch["completion_mask"]
  return None


def kl_target_transform(
    inner: optax.GradientTransformation,
    *,
    target_kl: float,
    logits_fn: LogitsFn,
    max_scale: float,
    min_scale: float = 0.0,
    completion_mask_fn: Callable[[PyTree], Array | None] | None = None,
    temperature: float = 1.0,
) -> optax.GradientTransformationExtraArgs:
  """Wraps ``inner`` so each update is scaled by clip(√(δ / KL̂), s_min, s_max) (module docstring for the contract).

  Example::

    tx = capo_jax.step_size.kl_target_transform(optax.adam(1e-4), target_kl=5e-4, logits_fn=logits_fn, max_scale=4.)
    state = tx.init(params)
    updates, state = tx.update(grads, state, params, batch=batch)   # state.predicted_kl, state.scale to log
    params = optax.apply_updates(params, updates)

  Args:
    inner: the optimizer (learning rate included) whose update is scaled.
    target_kl: δ > 0, the predicted mean KL each applied step aims at.
    logits_fn: pure ``(params, batch) -> logits_btv`` (or ``(logits, hidden)``).
    max_scale: s_max > 0, the cap on the growth (docs/MATH.md §7: it bounds the step when KL̂ is small or wrong).
    min_scale: s_min ∈ [0, s_max], the floor (0: the step may shrink without bound, as in the trust region).
    completion_mask_fn: ``batch -> [B, T]`` mask of the tokens the KL averages over (default: ``batch
      ["completion_mask"]`` when ``batch`` is a mapping with that key, otherwise every position).
    temperature: the sampling temperature of the policy softmax(z / T).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with ``TrustRegionState`` state.
  """
  if not isinstance(inner, optax.GradientTransformation):
    raise TypeError(f"inner must be an optax.GradientTransformation (e.g. optax.adam(1e-4)), got {type(inner)}.")
  validation.check_max_kl(target_kl)
  check_scale_bounds(min_scale, max_scale)
  if not callable(logits_fn):
    raise TypeError("logits_fn must be a callable (params, batch) -> logits_btv.")
  validation.check_temperature(temperature)
  inner = optax.with_extra_args_support(inner)
  mask_fn = completion_mask_fn or _default_completion_mask

  def init_fn(params):
    return TrustRegionState(inner.init(params), jnp.zeros((), jnp.float32), jnp.ones((), jnp.float32))

  def update_fn(updates, state, params=None, *, batch=None, **extra):
    if params is None:
      raise ValueError("kl_target_transform needs params: call tx.update(grads, state, params, batch=batch).")
    if batch is None:
      raise ValueError("kl_target_transform needs the batch: call tx.update(grads, state, params, batch=batch).")
    inner_updates, inner_state = inner.update(updates, state.inner_state, params, batch=batch, **extra)
    scaled, kl, scale = kl_target_step(
        logits_fn, params, batch, inner_updates, target_kl=target_kl, max_scale=max_scale, min_scale=min_scale,
        completion_mask_bt=mask_fn(batch), temperature=temperature)
    return scaled, TrustRegionState(inner_state, kl.astype(jnp.float32), scale.astype(jnp.float32))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
