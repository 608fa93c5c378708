"""Shared validation helpers: the argument checks of the curvature modules, written once.

``capo_jax.curvature``, ``capo_jax.curvature_full``, ``capo_jax.masked_transform``, ``capo_jax.trust_region`` and the
chunked kernels of ``capo_jax.ops`` check their arguments with these functions, so one bad value gets the same error
(naming the argument, the value and what is accepted) wherever it is passed. Checks run on Python values at
construction or trace time; traced values (a schedule's output inside ``jit``) are passed through unchecked.
"""

from __future__ import annotations

import numbers
from typing import Any

import jax

HESSIAN_RULES = ("symmetric", "nonsymmetric")  # CAPO's Hessian mask rules (docs/MATH.md §2.5)
GRANULARITIES = ("token", "sentence", "global")  # units the statistics are computed for (docs/MATH.md §2.6)
DIRECTIONS = ("adam", "sgd")  # direction models of the last-layer statistics (docs/MATH.md §2.3)


def check_one_of(name: str, value: Any, choices: tuple[Any, ...]) -> None:
  """``value`` must be one of ``choices``."""
  if value not in choices:
    raise ValueError(f"{name} must be one of {choices}, got {value!r}.")


def check_positive(name: str, value: Any, meaning: str = "a threshold on a non-negative statistic") -> None:
  """A real ``value`` must be > 0 (NaN fails; +∞ passes: an infinite threshold disables its rule). Non-real values
  (arrays, schedules, traced values) are not checked."""
  if isinstance(value, numbers.Real) and not value > 0:
    raise ValueError(f"{name} must be > 0 ({meaning}), got {value}.")


def check_hessian_rule(hessian_rule: str) -> None:
  check_one_of("hessian_rule", hessian_rule, HESSIAN_RULES)


def check_granularity(granularity: str) -> None:
  check_one_of("granularity", granularity, GRANULARITIES)


def check_top_k(top_k: Any, vocab_size: int | None = None, where: str = "") -> None:
  """K of the top-K policy: a positive int, at most ``vocab_size`` when that is known (``where`` names the vocabulary's
  source in the message)."""
  if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1:
    raise ValueError(f"top_k must be a positive int (K of the top-K policy, e.g. 50), got {top_k!r}.")
  if vocab_size is not None and top_k > vocab_size:
    raise ValueError(f"top_k={top_k} exceeds the vocabulary size {vocab_size}{where}; use top_k <= vocab_size.")


def check_chunk_size(chunk_size: Any) -> None:
  if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
    raise ValueError(f"chunk_size must be an int ≥ 1 (items per chunk), got {chunk_size!r}.")


def check_temperature(temperature: Any) -> None:
  check_positive("temperature", temperature, "the sampling temperature T of the policy softmax(z / T)")


def check_max_kl(max_kl: Any) -> None:
  """δ of the curvature trust region: > 0. A traced budget (e.g. a schedule's value inside jit) is not checked."""
  try:
    value = float(max_kl)
  except (TypeError, jax.errors.ConcretizationTypeError):
    return
  if not value > 0:
    raise ValueError(f"max_kl must be > 0 (the predicted mean-KL budget δ per step, e.g. 1e-3); got {max_kl}.")


def check_mask_setting(*, tau_fisher: Any, tau_hessian: Any, hessian_rule: str, granularity: str, direction: str,
                       top_k: Any) -> None:
  """The arguments of a CAPO last-layer mask (``CurvatureMaskConfig``, ``masked_transform``), checked together."""
  check_positive("tau_fisher", tau_fisher)
  check_positive("tau_hessian", tau_hessian)
  check_hessian_rule(hessian_rule)
  check_granularity(granularity)
  check_one_of("direction", direction, DIRECTIONS)
  check_top_k(top_k)
