"""Tests for capo_jax.eval_metrics: pass@k against brute-force subset enumeration, avg@k, maj@k, breakdowns."""

import itertools
import math

import numpy as np
import pytest

from capo_jax.eval_metrics import GroupMean, breakdown, maj_at_k, mean_at_k, pass_at_k


def _pass_at_k_brute_force(row: np.ndarray, k: int) -> float:
  """Fraction of the C(n, k) size-k subsets of the samples that contain at least one correct sample."""
  subsets = list(itertools.combinations(range(len(row)), k))
  return sum(bool(row[list(s)].any()) for s in subsets) / len(subsets)


def test_pass_at_k_matches_brute_force_on_random_matrices():
  rng = np.random.default_rng(0)
  for n in range(1, 11):
    correct_pn = rng.random((12, n)) < rng.random((12, 1))  # per-problem accuracies from 0 to 1
    for k in range(1, n + 1):
      expected = [_pass_at_k_brute_force(row, k) for row in correct_pn]
      np.testing.assert_allclose(pass_at_k(correct_pn, k), expected, rtol=0, atol=1e-12)


def test_pass_at_k_hand_cases():
  row = np.array([[1, 0, 1, 0, 0]])                       # n = 5, c = 2
  assert pass_at_k(row, 2)[0] == pytest.approx(1 - math.comb(3, 2) / math.comb(5, 2))  # = 0.7
  assert pass_at_k(row, 2)[0] == pytest.approx(0.7)
  assert pass_at_k(row, 1)[0] == pytest.approx(0.4)       # k = 1 is c / n
  assert pass_at_k(row, 4)[0] == 1.0                       # n − c = 3 < k: every 4-subset holds a correct one
  assert pass_at_k(row, 5)[0] == 1.0                       # k = n: any correct sample passes
  np.testing.assert_array_equal(pass_at_k(np.zeros((3, 6), bool), 3), [0.0, 0.0, 0.0])  # c = 0
  np.testing.assert_array_equal(pass_at_k(np.ones((2, 6), bool), 1), [1.0, 1.0])        # c = n
  out = pass_at_k(np.array([[True, False], [False, False]]), 2)
  assert out.dtype == np.float64 and out.tolist() == [1.0, 0.0]


def test_pass_at_k_large_n_is_stable():
  # n = 1000, c = 1: pass@k = k / n exactly, where C(1000, 500) alone would overflow a float64.
  row = np.zeros((1, 1000), bool)
  row[0, 17] = True
  for k in (1, 10, 500, 999):
    assert pass_at_k(row, k)[0] == pytest.approx(k / 1000, rel=1e-12)


def test_pass_at_k_bad_input():
  with pytest.raises(ValueError, match="k=6 exceeds the n=5"):
    pass_at_k(np.zeros((2, 5)), 6)
  with pytest.raises(ValueError, match="k >= 1"):
    pass_at_k(np.zeros((2, 5)), 0)
  with pytest.raises(ValueError, match="num_problems, n"):
    pass_at_k(np.zeros(5), 1)
  with pytest.raises(ValueError, match="in \\{0, 1\\}"):
    pass_at_k(np.full((2, 5), 0.5), 1)
  with pytest.raises(ValueError, match="k=3 exceeds"):
    mean_at_k(np.zeros((1, 2)), 3)


def test_mean_at_k():
  correct_pn = np.array([[1, 0, 1, 1], [0, 0, 0, 1]])
  np.testing.assert_allclose(mean_at_k(correct_pn, 1), [1.0, 0.0])
  np.testing.assert_allclose(mean_at_k(correct_pn, 2), [0.5, 0.0])
  np.testing.assert_allclose(mean_at_k(correct_pn, 4), [0.75, 0.25])  # k = n: c / n
  # Averaged over every size-k subset, avg@k is c / n for every k (what makes the first k an unbiased estimate).
  row = correct_pn[:1]
  for k in range(1, 5):
    subset_means = [row[0, list(s)].mean() for s in itertools.combinations(range(4), k)]
    assert np.mean(subset_means) == pytest.approx(0.75)


def test_maj_at_k():
  answers = [
      ["1/2", "1/3", "1/2", "7"],    # 1/2 wins 2–1 and is correct
      ["1/3", "1/2", "1/3", "1/2"],  # tie 2–2 at k = 4: the first to appear (1/3) wins, and it is wrong
      [None, None, "5", "6"],        # unanswered samples do not vote; k = 2 has no vote at all
      ["4", "4", "9", "9"],
  ]
  correct = np.array([
      [1, 0, 1, 0],
      [0, 1, 0, 1],
      [0, 0, 1, 0],
      [0, 0, 1, 1],
  ])
  np.testing.assert_array_equal(maj_at_k(answers, correct, 4), [1.0, 0.0, 1.0, 0.0])
  np.testing.assert_array_equal(maj_at_k(answers, correct, 2), [1.0, 0.0, 0.0, 0.0])
  np.testing.assert_array_equal(maj_at_k(answers, correct, 1), [1.0, 0.0, 0.0, 0.0])
  np.testing.assert_array_equal(maj_at_k(answers, correct, 3), [1.0, 0.0, 1.0, 0.0])
  # The winner is correct if any sample that gave it was graded correct (e.g. one copy timed out in the grader).
  np.testing.assert_array_equal(maj_at_k([["a", "a", "b"]], np.array([[0, 1, 0]]), 3), [1.0])
  with pytest.raises(ValueError, match="shaped like correct_pn"):
    maj_at_k([["a", "b"]], np.zeros((1, 3)), 2)


def test_maj_at_k_equals_brute_force_vote():
  rng = np.random.default_rng(1)
  keys = ["a", "b", "c", None]
  for _ in range(50):
    answers = [[keys[i] for i in rng.integers(0, 4, size=6)] for _ in range(5)]
    correct = np.array([[a == "b" for a in row] for row in answers])  # "b" is the right answer everywhere
    for k in range(1, 7):
      expected = []
      for row in answers:
        votes = [a for a in row[:k] if a is not None]
        if not votes:
          expected.append(0.0)
          continue
        best = max(votes.count(a) for a in votes)
        winner = next(a for a in votes if votes.count(a) == best)
        expected.append(float(winner == "b"))
      np.testing.assert_array_equal(maj_at_k(answers, correct, k), expected)


def test_breakdown():
  values = np.array([1.0, 0.0, 0.5, 1.0, 0.25])
  groups = ["Level 2", "Level 1", "Level 2", "Level 3", "Level 1"]
  assert breakdown(values, groups) == {
      "Level 1": GroupMean(0.125, 2),
      "Level 2": GroupMean(0.75, 2),
      "Level 3": GroupMean(1.0, 1),
  }
  assert list(breakdown([1.0, 2.0, 3.0], [2, 10, 1])) == [1, 10, 2]  # sorted by str, so mixed labels work too
  with pytest.raises(ValueError, match="one group label per value"):
    breakdown(values, groups[:3])
  with pytest.raises(ValueError, match="shape \\[P\\]"):
    breakdown(np.zeros((2, 2)), ["a", "b"])
