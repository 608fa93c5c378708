"""Sampling-based evaluation metrics over a correctness matrix: pass@k, avg@k, maj@k, and per-group breakdowns.

Input convention: `correct_pn` is a [P, n] matrix — P problems, n sampled completions each, entry 1 (True) when
that completion's reward says it is correct. Every function returns one value per problem ([P] float64); the
benchmark number is its mean over problems, and `breakdown` gives the mean per level or subject. Pure numpy, no jax:
evaluation runs on the host after decoding.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import NamedTuple

import numpy as np

__all__ = ["GroupMean", "breakdown", "maj_at_k", "mean_at_k", "pass_at_k"]


def _check_correct(correct_pn, k: int, name: str) -> np.ndarray:
  """Validates a [P, n] 0/1 matrix and 1 <= k <= n; returns it as bool."""
  correct_pn = np.asarray(correct_pn)
  if correct_pn.ndim != 2:
    raise ValueError(f"{name} needs a [num_problems, n] correctness matrix, got shape {correct_pn.shape}; reshape "
                     "flat rewards with rewards.reshape(num_problems, n).")
  if correct_pn.dtype != bool:
    if not np.issubdtype(correct_pn.dtype, np.number) or not np.isin(correct_pn, (0, 1)).all():
      raise ValueError(f"{name} needs correctness values in {{0, 1}} (or bool); threshold scores first, e.g. "
                       "rewards >= 1.")
    correct_pn = correct_pn.astype(bool)
  if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)) or k < 1:
    raise ValueError(f"{name} needs an int k >= 1, got {k!r}.")
  n = correct_pn.shape[1]
  if k > n:
    raise ValueError(f"{name}: k={k} exceeds the n={n} samples per problem; draw at least k samples or lower k.")
  return correct_pn


def pass_at_k(correct_pn, k: int) -> np.ndarray:
  """Unbiased pass@k per problem: the probability that at least one of k samples drawn without replacement from
  the n is correct (Chen et al. 2021, arXiv 2107.03374, Eq. 1).

    pass@k = 1 − C(n − c, k) / C(n, k) = 1 − ∏_{i = n−c+1}^{n} (1 − k / i),

  with c the number of correct samples. The product form never forms a binomial coefficient, so it neither
  overflows nor cancels in float64 for any n; when n − c < k some factor is 1 − k/k = 0 and pass@k = 1, as every
  k-subset then holds a correct sample.

  Args:
    correct_pn: [P, n] bool or 0/1 correctness.
    k: samples per attempt, 1 <= k <= n.

  Returns:
    [P] float64 in [0, 1]; the benchmark's pass@k is its mean.

  Raises:
    ValueError: if k > n, k < 1, or the matrix is not [P, n] of 0/1.
  """
  correct_pn = _check_correct(correct_pn, k, "pass_at_k")
  n = correct_pn.shape[1]
  num_correct_p = correct_pn.sum(axis=1)
  i_n = np.arange(1, n + 1, dtype=np.float64)
  factors_pn = np.where(i_n[None, :] > (n - num_correct_p)[:, None], 1.0 - k / i_n[None, :], 1.0)
  return 1.0 - np.abs(np.prod(factors_pn, axis=1))  # abs: a product through a zero factor may be -0.0.


def mean_at_k(correct_pn, k: int) -> np.ndarray:
  """avg@k per problem: the mean correctness of the FIRST k samples, (1/k) Σ_{j<k} correct[p, j].

  Each sample's correctness estimates the single-sample accuracy, so every k gives an unbiased estimate; a larger k
  only lowers the variance (with k = n it is c/n). Sample order must therefore not depend on correctness.

  Args:
    correct_pn: [P, n] bool or 0/1 correctness.
    k: samples averaged, 1 <= k <= n.

  Returns:
    [P] float64 in [0, 1].
  """
  correct_pn = _check_correct(correct_pn, k, "mean_at_k")
  return correct_pn[:, :k].mean(axis=1, dtype=np.float64)


def maj_at_k(answers_pn: Sequence[Sequence[Hashable | None]], correct_pn, k: int) -> np.ndarray:
  """maj@k per problem (majority vote, "cons@k"): 1 iff the most frequent answer among the first k samples is
  correct.

  Votes are the samples' normalised answers (e.g. `MathRewardDetails.answer_keys_b`, so `\\frac12` and `1/2` vote
  together); a sample with no answer (None) does not vote. Ties between equally frequent answers go to the answer
  that appears first in sample order. The winning answer is correct iff some sample among the first k that gave it
  is marked correct in `correct_pn` (so correctness comes from the reward, which knows that `0.5` ≡ `1/2` when the
  gold is written differently). A problem whose first k samples all lack an answer scores 0.

  Args:
    answers_pn: P rows of n hashable answer keys (or None), aligned with `correct_pn`.
    correct_pn: [P, n] bool or 0/1 correctness.
    k: votes per problem, 1 <= k <= n.

  Returns:
    [P] float64 in {0, 1}.
  """
  correct_pn = _check_correct(correct_pn, k, "maj_at_k")
  num_problems, n = correct_pn.shape
  if len(answers_pn) != num_problems or any(len(row) != n for row in answers_pn):
    raise ValueError(f"maj_at_k needs answers shaped like correct_pn ({num_problems} rows of {n}); got "
                     f"{len(answers_pn)} rows of lengths {sorted({len(row) for row in answers_pn})}.")
  scores_p = np.zeros(num_problems, dtype=np.float64)
  for p, row in enumerate(answers_pn):
    votes: dict[Hashable, int] = {}  # Insertion order = first appearance, which breaks ties.
    correct_answers = set()
    for j in range(k):
      answer = row[j]
      if answer is None:
        continue
      votes[answer] = votes.get(answer, 0) + 1
      if correct_pn[p, j]:
        correct_answers.add(answer)
    if votes:
      winner = max(votes, key=votes.__getitem__)  # max keeps the first of equal maxima.
      scores_p[p] = float(winner in correct_answers)
  return scores_p


class GroupMean(NamedTuple):
  mean: float
  count: int


def breakdown(values_p, groups_p: Sequence[Hashable]) -> dict[Hashable, GroupMean]:
  """Mean of a per-problem metric within each group (level, subject, source …): {group: GroupMean(mean, count)}.

  mean_g = (1/|P_g|) Σ_{p ∈ P_g} values[p], with P_g the problems whose group is g. Groups appear in sorted order
  (by `str` of the group, so mixed types sort too).

  Args:
    values_p: [P] per-problem values, e.g. `pass_at_k(correct_pn, 1)`.
    groups_p: P group labels aligned with `values_p`, e.g. `[problem.metadata["level"] for problem in problems]`.

  Returns:
    A dict from each group to its mean and problem count.
  """
  values_p = np.asarray(values_p, dtype=np.float64)
  if values_p.ndim != 1:
    raise ValueError(f"breakdown needs one value per problem (shape [P]), got shape {values_p.shape}.")
  if isinstance(groups_p, str) or len(groups_p) != len(values_p):
    raise ValueError(f"breakdown needs one group label per value: {len(values_p)} values but "
                     f"{'a string' if isinstance(groups_p, str) else len(groups_p)} labels.")
  members: dict[Hashable, list[int]] = {}
  for p, group in enumerate(groups_p):
    members.setdefault(group, []).append(p)
  return {group: GroupMean(float(values_p[members[group]].mean()), len(members[group]))
          for group in sorted(members, key=str)}
