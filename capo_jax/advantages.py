"""Advantage estimators of the GRPO family.

Every estimator maps a flat batch of scalar rewards ``rewards_b`` (``B = P·G`` rows, grouped prompt-major, so row
``i`` belongs to prompt ``i // G``) to one advantage per row. They are pure, jit-able functions; ``group_size`` is
static (it fixes shapes), everything else is traced.

References: GRPO, Shao et al. 2024 (arXiv 2402.03300); Dr.GRPO, Liu et al. 2025 (arXiv 2503.20783); RLOO, Ahmadian
et al. 2024 (arXiv 2402.14740); CAPO, Melo et al. 2025 (arXiv 2510.00819), whose reference implementation (a TRL
fork) fixes the exact GRPO formula used by default here.
"""

from __future__ import annotations

from typing import Literal

import chex
import jax
import jax.numpy as jnp

Array = jax.Array

StdScope = Literal["group", "batch"]


def _check_rewards(rewards_b: Array, group_size: int) -> int:
  """Validates shapes/dtypes; returns the number of groups."""
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
  return batch // group_size


def _zero_constant_groups(r_gn: Array, adv_gn: Array) -> Array:
  """Equal rewards must give exactly zero: the mean of equal floats can be off by one ulp."""
  constant_g1 = jnp.max(r_gn, axis=1, keepdims=True) == jnp.min(r_gn, axis=1, keepdims=True)
  return jnp.where(constant_g1, 0.0, adv_gn)


def grpo_advantages(
    rewards_b: Array,
    group_size: int,
    *,
    normalize_std: bool = True,
    std_eps: float = 1e-4,
    unbiased_std: bool = True,
    std_scope: StdScope = "group",
) -> Array:
  r"""GRPO group-relative advantages (Dr.GRPO with ``normalize_std=False``).

  For row ``i`` of group ``g`` (G rows)::

      A_i = (r_i − mean_g r) / (std r + std_eps)      if normalize_std
      A_i =  r_i − mean_g r                           otherwise (Dr.GRPO)

  ``std`` is the group's standard deviation (``std_scope="group"``, the reference) or the standard deviation of all
  B rewards (``std_scope="batch"``, TRL's ``scale_rewards="batch"``); ``unbiased_std=True`` divides by ``n − 1`` as
  ``torch.std`` does in the reference implementation. The defaults are exactly the reference's formula.

  A group whose rewards are all equal gets advantage exactly 0 (not a rounding residue over ``std_eps``, never NaN).

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
  r_gn = rewards_b.reshape(num_groups, group_size)
  centred_gn = _zero_constant_groups(r_gn, r_gn - jnp.mean(r_gn, axis=1, keepdims=True))
  if normalize_std:
    ddof = 1 if unbiased_std else 0
    if std_scope == "group":
      std = jnp.std(r_gn, axis=1, keepdims=True, ddof=ddof)
    else:
      std = jnp.std(rewards_b, ddof=ddof if rewards_b.shape[0] > 1 else 0)
    centred_gn = centred_gn / (std + std_eps)
  return centred_gn.reshape(-1).astype(rewards_b.dtype)


def drgrpo_advantages(rewards_b: Array, group_size: int) -> Array:
  r"""Dr.GRPO advantages: ``A_i = r_i − mean_g r`` (no std division, Liu et al. 2025)."""
  return grpo_advantages(rewards_b, group_size, normalize_std=False)


def rloo_advantages(rewards_b: Array, group_size: int) -> Array:
  r"""REINFORCE leave-one-out advantages.

  ``A_i = r_i − (1/(G−1)) Σ_{j≠i} r_j = G/(G−1) · (r_i − mean_g r)``. Needs ``G ≥ 2``.
  """
  num_groups = _check_rewards(rewards_b, group_size)
  if group_size < 2:
    raise ValueError("RLOO needs group_size ≥ 2 (the baseline leaves one sample out).")
  r_gn = rewards_b.reshape(num_groups, group_size)
  loo_mean_gn = (jnp.sum(r_gn, axis=1, keepdims=True) - r_gn) / (group_size - 1)
  return _zero_constant_groups(r_gn, r_gn - loo_mean_gn).reshape(-1)


def reinforce_advantages(rewards_b: Array, group_size: int = 1) -> Array:
  r"""Plain REINFORCE: ``A_i = r_i`` (no baseline), the base of ReinCAPO."""
  _check_rewards(rewards_b, group_size)
  return rewards_b


def batch_normalize_advantages(advantages_b: Array, *, eps: float = 1e-8) -> Array:
  r"""Batch-level whitening ``(A − mean_B A) / (std_B A + eps)`` (REINFORCE++ style), applied on top of any estimator."""
  chex.assert_rank(advantages_b, 1)
  mean = jnp.mean(advantages_b)
  std = jnp.std(advantages_b)
  return (advantages_b - mean) / (std + eps)


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
