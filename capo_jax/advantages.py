"""Advantage estimators of the GRPO family (the derivations: ``docs/MATH.md §1.1``).

Every estimator maps a flat batch of scalar rewards ``rewards_b`` (``B = P·G`` rows, grouped prompt-major, so row
``i`` belongs to prompt ``i // G``) to one advantage per row. They are pure, jit-able functions; ``group_size`` is
static (it fixes shapes), everything else is traced.

Non-finite rewards (NaN, ±inf: a crashed verifier, a division by zero in a reward shaper) have no meaningful
advantage. Concrete rewards holding one raise one ``ValueError`` naming how many and where. Traced rewards (under
``jax.jit``) cannot raise: there the **whole group** of a non-finite reward gets advantage exactly 0 — its
completions then contribute nothing to the policy gradient, as for a group whose rewards are all equal — and it is
left out of any batch-level statistic (``std_scope="batch"``, ``batch_normalize_advantages``), so one bad reward
never turns the rest of the batch into NaN.
"""

from __future__ import annotations

from typing import Literal

import chex
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

StdScope = Literal["group", "batch"]


def _check_finite(values_b: Array, group_size: int, name: str) -> None:
  """One clear error for concrete non-finite values; traced values are handled by the estimators (module docstring)."""
  if isinstance(values_b, jax.core.Tracer):
    return
  values = np.asarray(values_b)
  bad = ~np.isfinite(values)
  if not bad.any():
    return
  rows = np.flatnonzero(bad)
  kinds = [f"{n} {kind}" for n, kind in ((int(np.isnan(values).sum()), "NaN"),
                                        (int(np.isposinf(values).sum()), "+inf"),
                                        (int(np.isneginf(values).sum()), "−inf")) if n]
  shown = ", ".join(str(int(r)) for r in rows[:10]) + (", …" if len(rows) > 10 else "")
  groups = np.unique(rows // group_size)
  shown_groups = ", ".join(str(int(g)) for g in groups[:10]) + (", …" if len(groups) > 10 else "")
  raise ValueError(
      f"{name} hold {len(rows)} non-finite value(s) ({', '.join(kinds)}) at rows [{shown}] (groups [{shown_groups}] "
      f"of G={group_size}); the reward function must return finite floats: fix it, or map its failures to a finite "
      "reward (e.g. jnp.nan_to_num(rewards, nan=0.0)) before computing advantages. Under jax.jit such a group gets "
      "advantage 0 instead."
  )


def _check_rewards(rewards_b: Array, group_size: int) -> int:
  """Validates shapes, dtype and (when concrete) finiteness; returns the number of groups."""
  chex.assert_rank(rewards_b, 1)
  if not jnp.issubdtype(rewards_b.dtype, jnp.floating):
    raise TypeError(
        f"rewards must be a floating-point array, got dtype {rewards_b.dtype}; cast with rewards.astype(jnp.float32)."
    )
  if not isinstance(group_size, int) or group_size < 1:
    raise ValueError(f"group_size must be a positive int, got {group_size!r}.")
  batch = rewards_b.shape[0]
  if batch == 0 or batch % group_size:
    raise ValueError(
        f"group_size={group_size} does not divide the batch of {batch} rewards; the batch must hold whole groups of "
        "G completions per prompt (B = P·G)."
    )
  _check_finite(rewards_b, group_size, "rewards")
  return batch // group_size


def _finite_groups(rewards_b: Array, num_groups: int) -> tuple[Array, Array]:
  """``(r_gn, finite_g1)``: rewards as [groups, G] with every group holding a non-finite reward set to 0, and the
  [groups, 1] flag of the groups that were all finite."""
  r_gn = rewards_b.reshape(num_groups, -1)
  finite_g1 = jnp.all(jnp.isfinite(r_gn), axis=1, keepdims=True)
  return jnp.where(finite_g1, r_gn, jnp.zeros((), r_gn.dtype)), finite_g1


def _zero_constant_groups(r_gn: Array, adv_gn: Array) -> Array:
  """Equal rewards must give exactly zero: the mean of equal floats can be off by one ulp."""
  constant_g1 = jnp.max(r_gn, axis=1, keepdims=True) == jnp.min(r_gn, axis=1, keepdims=True)
  return jnp.where(constant_g1, 0.0, adv_gn)


def _std_over(x: Array, where: Array, ddof: int) -> Array:
  """Standard deviation of ``x`` over the ``where`` entries (plain ``jnp.std`` when all count); 0 when fewer than
  ``ddof + 1`` entries count."""
  std = jnp.where(jnp.all(where), jnp.std(x, ddof=ddof), jnp.std(x, ddof=ddof, where=where))
  return jnp.where(jnp.isfinite(std), std, jnp.zeros((), std.dtype))


def grpo_advantages(
    rewards_b: Array,
    group_size: int,
    *,
    normalize_std: bool = True,
    std_eps: float = 1e-4,
    unbiased_std: bool = True,
    std_scope: StdScope = "group",
) -> Array:
  r"""GRPO group-relative advantages (Dr.GRPO with ``normalize_std=False``), ``docs/MATH.md §1.1``.

  For row ``i`` of group ``g`` (G rows)::

      A_i = (r_i − mean_g r) / (std r + std_eps)      if normalize_std
      A_i =  r_i − mean_g r                           otherwise (Dr.GRPO)

  ``std`` is the group's standard deviation (``std_scope="group"``, CAPO's setting) or the standard deviation of all
  B rewards (``std_scope="batch"``); ``unbiased_std=True`` divides by ``n − 1``. The defaults are exactly the
  formula CAPO was released with (``docs/MATH.md §1.1``).

  A group whose rewards are all equal gets advantage exactly 0 (not a rounding residue over ``std_eps``, never NaN);
  so does, under ``jax.jit``, a group holding a non-finite reward (concrete ones raise; module docstring), which is
  also left out of the batch-scope std.

  Args:
    rewards_b: ``[B]`` float rewards, prompt-major groups.
    group_size: G, completions per prompt; must divide B (and be ≥ 2 for the unbiased std).
    normalize_std: divide by the standard deviation (GRPO) or not (Dr.GRPO).
    std_eps: added to the standard deviation.
    unbiased_std: Bessel-corrected standard deviation.
    std_scope: ``"group"`` or ``"batch"``.

  Returns:
    ``[B]`` advantages in the rewards' dtype; they sum to zero within every group.
  """
  num_groups = _check_rewards(rewards_b, group_size)
  if std_scope not in ("group", "batch"):
    raise ValueError(f"std_scope must be 'group' or 'batch', got {std_scope!r}.")
  if normalize_std and unbiased_std and group_size < 2 and std_scope == "group":
    raise ValueError("the unbiased group std needs group_size ≥ 2; pass unbiased_std=False or use G ≥ 2.")
  r_gn, finite_g1 = _finite_groups(rewards_b, num_groups)
  centred_gn = _zero_constant_groups(r_gn, r_gn - jnp.mean(r_gn, axis=1, keepdims=True))
  if normalize_std:
    ddof = 1 if unbiased_std else 0
    if std_scope == "group":
      std = jnp.std(r_gn, axis=1, keepdims=True, ddof=ddof)
    else:
      finite_gn = jnp.broadcast_to(finite_g1, r_gn.shape)
      std = _std_over(r_gn, finite_gn, ddof if rewards_b.shape[0] > 1 else 0)
    centred_gn = centred_gn / (std + std_eps)
  return jnp.where(finite_g1, centred_gn, 0.0).reshape(-1).astype(rewards_b.dtype)


def drgrpo_advantages(rewards_b: Array, group_size: int) -> Array:
  r"""Dr.GRPO advantages: ``A_i = r_i − mean_g r`` (no std division), ``docs/MATH.md §1.1``."""
  return grpo_advantages(rewards_b, group_size, normalize_std=False)


def rloo_advantages(rewards_b: Array, group_size: int) -> Array:
  r"""REINFORCE leave-one-out advantages, ``docs/MATH.md §1.1``.

  ``A_i = r_i − (1/(G−1)) Σ_{j≠i} r_j = G/(G−1) · (r_i − mean_g r)``. Needs ``G ≥ 2``. Non-finite rewards: as
  ``grpo_advantages`` (module docstring).
  """
  num_groups = _check_rewards(rewards_b, group_size)
  if group_size < 2:
    raise ValueError("RLOO needs group_size ≥ 2 (the baseline leaves one sample out).")
  r_gn, finite_g1 = _finite_groups(rewards_b, num_groups)
  loo_mean_gn = (jnp.sum(r_gn, axis=1, keepdims=True) - r_gn) / (group_size - 1)
  adv_gn = _zero_constant_groups(r_gn, r_gn - loo_mean_gn)
  return jnp.where(finite_g1, adv_gn, 0.0).reshape(-1).astype(rewards_b.dtype)


def reinforce_advantages(rewards_b: Array, group_size: int = 1) -> Array:
  r"""Plain REINFORCE: ``A_i = r_i`` (no baseline), the base of ReinCAPO, ``docs/MATH.md §1.1``.

  Non-finite rewards: concrete ones raise; under ``jax.jit`` their group (the row itself for ``group_size=1``) gets 0.
  """
  num_groups = _check_rewards(rewards_b, group_size)
  r_gn, _ = _finite_groups(rewards_b, num_groups)
  return r_gn.reshape(-1)


def batch_normalize_advantages(advantages_b: Array, *, eps: float = 1e-8) -> Array:
  r"""Batch-level whitening ``(A − mean_B A) / (std_B A + eps)`` (REINFORCE++ style), applied on top of any
  estimator (``docs/MATH.md §1.1``).

  Concrete non-finite advantages raise ``ValueError``; under ``jax.jit`` they are left out of the mean and std and
  returned as 0.
  """
  chex.assert_rank(advantages_b, 1)
  _check_finite(advantages_b, 1, "advantages")
  finite_b = jnp.isfinite(advantages_b)
  a_b = jnp.where(finite_b, advantages_b, jnp.zeros((), advantages_b.dtype))
  mean = jnp.where(jnp.all(finite_b), jnp.mean(a_b), jnp.mean(a_b, where=finite_b))
  std = _std_over(a_b, finite_b, 0)
  return jnp.where(finite_b, (a_b - mean) / (std + eps), 0.0).astype(advantages_b.dtype)


ESTIMATORS = {
    "grpo": grpo_advantages,
    "drgrpo": drgrpo_advantages,
    "rloo": rloo_advantages,
    "reinforce": reinforce_advantages,
}


def compute_advantages(rewards_b: Array, group_size: int, estimator: str = "grpo", **kwargs) -> Array:
  """Dispatches to a registered estimator by name (``grpo``, ``drgrpo``, ``rloo``, ``reinforce``)."""
  if estimator not in ESTIMATORS:
    raise ValueError(f"unknown advantage estimator {estimator!r}; choose one of {sorted(ESTIMATORS)}.")
  return ESTIMATORS[estimator](rewards_b, group_size, **kwargs)
