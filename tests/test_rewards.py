"""Tests for capo_jax.rewards.boxed: boxed and final-answer extraction, the exact integer reward.

The math reward (normalisation, math-verify workers) is tested in test_math_reward.py.
"""

import sys
import time

import numpy as np
import pytest

from capo_jax.rewards import extract_boxed, extract_final_answer, integer_reward, integer_rewards


# -- extract_boxed --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    (r"so \boxed{73}", "73"),
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),                      # nested braces
    (r"\boxed{\frac{\sqrt{2}}{2}} done.", r"\frac{\sqrt{2}}{2}"),  # two levels of nesting
    (r"first \boxed{1}, then \boxed{2}, finally \boxed{3}.", "3"),  # last wins
    (r"\fbox{42}", "42"),
    (r"\boxed{1} and \fbox{2}", "2"),
    (r"\boxed {5}", "5"),                                           # space before the brace
    (r"\boxed{ -7 }", " -7 "),                                      # content is not stripped
    (r"\boxed{\boxed{9}}", r"\boxed{9}"),                           # the outer box is the answer
    (r"\boxed{\{1,2\}}", r"\{1,2\}"),                               # escaped braces are literal
    (r"\boxed{}", ""),
])
def test_extract_boxed_hand_cases(text, expected):
  assert extract_boxed(text) == expected


@pytest.mark.parametrize("text", [
    "8*6=48. 37+48=85. 85-12=73.",        # no box
    "",
    r"\boxed{\frac{1}{2}",                # unbalanced
    r"\boxed{1} then \boxed{2",           # last box unbalanced: the final answer is malformed
    r"\boxed 5",                          # no brace
    r"\boxedx{5}",                        # another command
    r"\{1\}",
])
def test_extract_boxed_none(text):
  assert extract_boxed(text) is None


def test_extract_boxed_rejects_non_str():
  with pytest.raises(TypeError, match="decode"):
    extract_boxed([1, 2, 3])


# -- integer_reward -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, answer, expected", [
    (r"8*6=48. 37+48=85. 85-12=73. \boxed{73}", 73, 1.0),
    (r"\boxed{ 73 }", 73, 1.0),
    (r"\boxed{+73}", 73, 1.0),
    (r"\boxed{-4}", -4, 1.0),
    (r"\boxed{073}", 73, 1.0),
    (r"\boxed{72} wait \boxed{73}", 73, 1.0),
    (r"\boxed{73} wait \boxed{72}", 73, 0.0),
    (r"\boxed{74}", 73, 0.0),
    (r"\boxed{-73}", 73, 0.0),
    (r"\boxed{1,000}", 1000, 0.0),
    (r"\boxed{73.0}", 73, 0.0),
    (r"\boxed{x=73}", 73, 0.0),
    (r"\boxed{73 apples}", 73, 0.0),
    (r"\boxed{7 3}", 73, 0.0),
    (r"\boxed{++73}", 73, 0.0),
    (r"\boxed{٧٣}", 73, 0.0),   # Arabic-Indic digits: int() would accept them, the reward does not
    (r"\boxed{1_000}", 1000, 0.0),
    ("73", 73, 0.0),             # right number, no box
    (r"\boxed{73", 73, 0.0),
])
def test_integer_reward_hand_cases(text, answer, expected):
  assert integer_reward(text, answer) == expected


def test_integer_reward_accepts_numpy_int_and_rejects_non_int_gold():
  assert integer_reward(r"\boxed{12}", np.int64(12)) == 1.0
  for bad in ("73", 73.0, True, None):
    with pytest.raises(TypeError, match="int gold answer"):
      integer_reward(r"\boxed{73}", bad)


def test_integer_rewards_batch():
  completions = [r"\boxed{3}", r"\boxed{4}", "no box", r"\boxed{+5}"]
  rewards_b = integer_rewards(completions, [3, 3, 3, 5])
  assert rewards_b.dtype == np.float32 and rewards_b.shape == (4,)
  np.testing.assert_array_equal(rewards_b, [1.0, 0.0, 0.0, 1.0])
  with pytest.raises(ValueError, match="3 completions but 2 answers"):
    integer_rewards(completions[:3], [3, 3])
  with pytest.raises(TypeError, match="integer_reward for one"):
    integer_rewards(r"\boxed{3}", 3)


# -- integers past Python's int/str digit limit ---------------------------------------------------------------------

def test_integer_reward_scores_integers_longer_than_the_int_str_limit():
  limit = sys.int_info.default_max_str_digits  # 4300: int("1" * 4301) raises ValueError.
  digits = "9" * 10_000
  gold = 10**10_000 - 1  # The int whose decimal digits are `digits`.
  start = time.monotonic()
  assert integer_reward(rf"\boxed{{{digits}}}", gold) == 1.0
  assert integer_reward(rf"\boxed{{-{digits}}}", -gold) == 1.0
  assert integer_reward(rf"\boxed{{+000{digits}}}", gold) == 1.0
  assert integer_reward(rf"\boxed{{{digits}}}", gold - 1) == 0.0       # last digit differs
  assert integer_reward(rf"\boxed{{{digits}}}", -gold) == 0.0          # sign differs
  assert integer_reward(rf"\boxed{{{'1' * (limit + 1)}}}", 73) == 0.0  # huge prediction, small gold
  assert integer_reward(rf"\boxed{{{'7' * 1_000_000}}}", 7) == 0.0     # a megabyte of digits
  assert integer_reward(r"\boxed{-0}", 0) == 1.0 and integer_reward(r"\boxed{000}", 0) == 1.0
  rewards_b = integer_rewards([rf"\boxed{{{digits}}}", r"\boxed{5}"], [gold, 5])  # the batch does not fail
  np.testing.assert_array_equal(rewards_b, [1.0, 1.0])
  assert time.monotonic() - start < 10.0


# -- extract_final_answer -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    (r"so \boxed{73}", "73"),
    ("48 + 25 = 73.\n#### 73", "73"),
    ("#### 1,000\nthanks", "1,000"),                      # the rest of that line only
    ("#### 1\n#### 2", "2"),                              # the last marker
    (r"#### 5 but \boxed{6}", "6"),                       # a box beats ####
    (r"\boxed{6} #### 5", "6"),
    (r"#### 5 \boxed{6", None),                           # an unclosed box is not rescued by ####
    ("####   \n", None),                                  # empty answer
    ("The answer is 5.", None),
    ("", None),
])
def test_extract_final_answer(text, expected):
  assert extract_final_answer(text) == expected
