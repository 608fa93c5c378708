"""A curvature trust region on the whole step: scale the optimizer's update so its predicted mean KL stays ≤ δ.

Derivation: ``docs/MATH.md`` §5. Masking tokens or groups only changes the direction of an Adam step whose size is set
by the learning rate; this controls the size of the step itself.

For a proposed update Δθ (all parameters, learning rate included) and the batch's completion tokens:

    KL_pred(Δθ) = ½ · (1/N) Σ_t Δz_tᵀ(diag π_t − π_tπ_tᵀ)Δz_t,    Δz_t = J_tΔθ  (one ``jax.jvp`` of the logits)
    s           = min(1, √(δ / KL_pred))
    Δθ'         = s · Δθ,        so KL_pred(Δθ') = s² KL_pred(Δθ) = min(KL_pred(Δθ), δ)

KL_pred is the second-order expansion of the mean KL(π_θ ‖ π_{θ+Δθ}); for large steps it can over- or under-shoot the
exact KL (docs/results/RESULTS_MINI.md), so δ is a knob on the model's scale, not a guarantee.

As an optax transformation, ``trust_region_transform(inner, max_kl=δ, logits_fn=...)`` wraps the optimizer whose
update it limits. Contract of ``update(grads, state, params, *, batch, **extra)``:
  * ``params`` is required (the jvp linearises the model at θ);
  * ``batch`` (keyword extra arg) is what ``logits_fn(params, batch)`` needs; it is also passed on to ``inner``
    together with ``**extra`` (an inner ``GradientTransformationExtraArgs`` may use them, a plain one ignores them);
  * the completion tokens N come from ``completion_mask_fn(batch)`` — by default ``batch["completion_mask"]`` when
    ``batch`` is a mapping with that key, otherwise every position counts;
  * put it **last** in an ``optax.chain`` (or wrap everything that changes the update after the learning rate): the KL
    is predicted for the update this transformation returns.
The inner optimizer's state advances exactly as without the trust region (its moments are of the gradients, which are
unchanged); only the applied step shrinks. The state records ``predicted_kl`` (of the inner, unscaled update) and
``scale`` for logging.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from capo_jax import validation
from capo_jax.curvature_full import LogitsFn, predicted_mean_kl

Array = jax.Array
PyTree = Any


def trust_region_scale(predicted_kl: Array, max_kl: float | Array) -> Array:
  """s = min(1, √(δ / KL_pred)); 1 when KL_pred ≤ δ (including KL_pred = 0)."""
  kl = jnp.asarray(predicted_kl)
  kl = kl.astype(jnp.promote_types(kl.dtype, jnp.float32))
  ratio = jnp.asarray(max_kl, kl.dtype) / jnp.maximum(kl, jnp.finfo(kl.dtype).tiny)
  return jnp.where(kl > max_kl, jnp.sqrt(ratio), 1.0).astype(kl.dtype)


def trust_region_step(
    logits_fn: LogitsFn,
    params: PyTree,
    batch: PyTree,
    update: PyTree,
    *,
    max_kl: float,
    completion_mask_bt: Array | None = None,
    temperature: float = 1.0,
) -> tuple[PyTree, Array, Array]:
  """Scale ``update`` so that its predicted mean KL is ≤ ``max_kl`` (module docstring for the math).

  Returns ``(scaled_update, predicted_kl_of_the_unscaled_update, scale)``.
  """
  validation.check_max_kl(max_kl)
  kl = predicted_mean_kl(logits_fn, params, batch, update, completion_mask_bt, temperature=temperature)
  scale = trust_region_scale(kl, max_kl)
  return jax.tree.map(lambda u: (u * scale).astype(u.dtype), update), kl, scale


class TrustRegionState(NamedTuple):
  """State of ``trust_region_transform``: the inner optimizer's state and the last step's statistics."""

  inner_state: optax.OptState
  predicted_kl: Array  # float32 scalar: KL_pred of the inner (unscaled) update at the last step
  scale: Array  # float32 scalar: the factor s applied at the last step


def _default_completion_mask(batch: PyTree) -> Array | None:
  if isinstance(batch, Mapping) and "completion_mask" in batch:
    return batch["completion_mask"]
  return None


def trust_region_transform(
    inner: optax.GradientTransformation,
    *,
    max_kl: float,
    logits_fn: LogitsFn,
    completion_mask_fn: Callable[[PyTree], Array | None] | None = None,
    temperature: float = 1.0,
) -> optax.GradientTransformationExtraArgs:
  """Wraps ``inner`` so each update is scaled by min(1, √(δ / KL_pred)) (module docstring for math and contract).

  Example::

    tx = capo_jax.trust_region_transform(optax.adam(1e-4), max_kl=1e-3, logits_fn=logits_fn)
    state = tx.init(params)
    updates, state = tx.update(grads, state, params, batch=batch)   # state.predicted_kl, state.scale to log
    params = optax.apply_updates(params, updates)

  Args:
    inner: the optimizer (learning rate included) whose update is limited.
    max_kl: δ > 0, the predicted mean-KL budget per step.
    logits_fn: pure ``(params, batch) -> logits_btv`` (or ``(logits, hidden)``).
    completion_mask_fn: ``batch -> [B, T]`` mask of the tokens the KL averages over (default in the module docstring).
    temperature: the sampling temperature of the policy softmax(z / T).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with ``TrustRegionState`` state.
  """
  if not isinstance(inner, optax.GradientTransformation):
    raise TypeError(f"inner must be an optax.GradientTransformation (e.g. optax.adam(1e-4)), got {type(inner)}.")
  validation.check_max_kl(max_kl)
  if not callable(logits_fn):
    raise TypeError("logits_fn must be a callable (params, batch) -> logits_btv.")
  validation.check_temperature(temperature)
  inner = optax.with_extra_args_support(inner)
  mask_fn = completion_mask_fn or _default_completion_mask

  def init_fn(params):
    return TrustRegionState(inner.init(params), jnp.zeros((), jnp.float32), jnp.ones((), jnp.float32))

  def update_fn(updates, state, params=None, *, batch=None, **extra):
    if params is None:
      raise ValueError("trust_region_transform needs params: call tx.update(grads, state, params, batch=batch).")
    if batch is None:
      raise ValueError("trust_region_transform needs the batch: call tx.update(grads, state, params, batch=batch).")
    inner_updates, inner_state = inner.update(updates, state.inner_state, params, batch=batch, **extra)
    scaled, kl, scale = trust_region_step(
        logits_fn, params, batch, inner_updates, max_kl=max_kl, completion_mask_bt=mask_fn(batch),
        temperature=temperature,
    )
    # The state keeps float32 statistics so its structure and dtypes never change between steps.
    return scaled, TrustRegionState(inner_state, kl.astype(jnp.float32), scale.astype(jnp.float32))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
