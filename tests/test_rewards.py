"""Tests for capo_jax.rewards: boxed extraction, exact integer reward, math_verify in a worker with a timeout."""

import os
import time

import numpy as np
import pytest

from capo_jax.rewards import (
    MathVerifyPool,
    extract_boxed,
    integer_reward,
    integer_rewards,
    math_verify_reward,
    math_verify_rewards,
)


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


# -- math_verify in a worker process ----------------------------------------------------------------------------------

def _slow_or_crashing_verify(prediction: str, gold: str) -> float:
  """An injected check (module-level so the spawned worker can unpickle it): sleeps, crashes or compares text."""
  if "slow" in prediction:
    time.sleep(60.0)
  if "crash" in prediction:
    os._exit(3)  # Kills the worker without a Python exception.
  if "raise" in prediction:
    raise RuntimeError("grader bug")
  return 1.0 if prediction == f"\\boxed{{{gold}}}" else 0.0


@pytest.fixture(scope="module")
def math_pool():
  with MathVerifyPool(timeout_s=20.0) as pool:  # Generous: the CPU is shared; timeouts are tested separately.
    yield pool


def test_math_verify_equivalence(math_pool):
  half = r"The answer is \boxed{\frac{1}{2}}."
  assert math_verify_reward(half, "0.5", pool=math_pool) == 1.0
  assert math_verify_reward(half, "1/3", pool=math_pool) == 0.0
  rewards_b = math_verify_rewards(
      [half, r"\boxed{0.5}", r"\boxed{2x+2}", r"\boxed{2(x+1)}", "0.5 with no box", r"\boxed{\frac{1}{2}"],
      ["0.5", r"\frac{1}{2}", "2(x+1)", "2x+3", "0.5", "0.5"], pool=math_pool)
  np.testing.assert_array_equal(rewards_b, [1.0, 1.0, 1.0, 0.0, 0.0, 0.0])
  assert math_pool.num_timeouts == 0


def test_math_verify_reward_without_a_pool_starts_and_closes_one():
  assert math_verify_reward(r"\boxed{\frac{1}{2}}", "0.5", timeout_s=20.0) == 1.0


def test_timeouts_and_crashes_score_zero_without_hanging():
  completions = [r"\boxed{1}", r"\boxed{slow}", r"\boxed{2}", r"\boxed{crash}", r"\boxed{raise}", r"\boxed{3}"]
  golds = ["1", "x", "2", "x", "x", "3"]
  with MathVerifyPool(timeout_s=0.5, verify_fn=_slow_or_crashing_verify, startup_timeout_s=60.0) as pool:
    start = time.monotonic()
    rewards_b = pool.score(completions, golds)
    elapsed = time.monotonic() - start
    np.testing.assert_array_equal(rewards_b, [1.0, 0.0, 1.0, 0.0, 0.0, 1.0])
    assert pool.num_timeouts == 2  # The sleeper and the crasher; a raising check keeps its worker.
    assert elapsed < 30.0, elapsed  # Far below the 60 s sleep: the stuck worker was killed, not awaited.
    # The pool stays usable after restarts.
    np.testing.assert_array_equal(pool.score([r"\boxed{4}"], ["4"]), [1.0])
  with pytest.raises(RuntimeError, match="closed"):
    pool.score([r"\boxed{4}"], ["4"])


def test_pool_bad_input():
  with pytest.raises(ValueError, match="timeout_s"):
    MathVerifyPool(timeout_s=0)
  with pytest.raises(ValueError, match="fork"):
    MathVerifyPool(mp_context="fork")
  pool = MathVerifyPool()
  with pytest.raises(ValueError, match="2 completions but 1 golds"):
    pool.score(["a", "b"], ["1"])
  with pytest.raises(TypeError, match="strings"):
    pool.score([r"\boxed{1}"], [1])
  pool.close()
