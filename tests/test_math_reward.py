"""Tests for capo_jax.rewards.math_reward and its parts: normalisation, the math-verify worker pool, format reward,
overlong penalty, and adversarial completions.

Pools here are small (≤ 2 workers) with short timeouts so the file stays within about a minute on two shared cores.
"""

import operator
import os
import random
import signal
import threading
import time

import numpy as np
import pytest

from capo_jax.rewards import (
    REASONS,
    MathRewardStats,
    MathVerifyPool,
    answer_key,
    canonical_decimal,
    clean_answer,
    format_reward,
    gold_answer,
    math_reward,
    math_reward_details,
    normalize_answer,
    overlong_penalty,
)

# Generous for real checks (a legitimate one takes < 0.5 s even on a loaded CPU), short enough for adversarial ones.
TIMEOUT_S = 4.0


@pytest.fixture(scope="module")
def pool():
  with MathVerifyPool(timeout_s=TIMEOUT_S, max_workers=2) as pool:
    yield pool


def _assert_healthy(pool):
  """A normal item that needs the checker (not the exact path) still scores 1 on this pool."""
  details = math_reward_details([r"so \boxed{\frac{14}{2}}"], ["7"], pool=pool)
  assert details.reasons_b == ("verified",) and details.rewards_b[0] == 1.0


# -- the reward table -----------------------------------------------------------------------------------------------

# (completion, gold, reward, reason). 'exact' = decided by the normalised keys, 'verified'/'mismatch' via math-verify
# unless both sides are plain decimals (then 'mismatch' is decided without it).
REWARD_CASES = [
    # equivalent forms
    (r"The answer is \boxed{\frac{1}{2}}.", "0.5", 1.0, "verified"),
    (r"\boxed{0.5}", r"\frac12", 1.0, "verified"),
    (r"\boxed{1/2}", r"\frac{1}{2}", 1.0, "exact"),
    (r"\boxed{\dfrac{1}{2}}", r"\frac{1}{2}", 1.0, "exact"),
    (r"\boxed{\tfrac12}", "1/2", 1.0, "exact"),
    (r"\boxed{\sqrt{2}/2}", r"\frac{\sqrt2}{2}", 1.0, "exact"),
    (r"\boxed{\frac{\sqrt{2}}{2}}", r"\frac{1}{\sqrt{2}}", 1.0, "verified"),
    (r"\boxed{-\frac{6}{2}}", "-3", 1.0, "verified"),
    (r"\boxed{-3}", "-3.0", 1.0, "exact"),
    (r"\boxed{3.50}", "3.5", 1.0, "exact"),
    (r"\boxed{.5}", "0.5", 1.0, "exact"),
    (r"\boxed{(1,2]}", "(1, 2]", 1.0, "exact"),
    (r"\boxed{\left(1, 2\right]}", "(1,2]", 1.0, "exact"),
    (r"\boxed{(-\infty, 3)}", r"(-\infty,3)", 1.0, "exact"),
    (r"\boxed{\{1,2\}}", r"\{2,1\}", 1.0, "verified"),
    (r"\boxed{50\%}", "50", 1.0, "exact"),
    (r"\boxed{50}", r"50\%", 1.0, "exact"),
    (r"\boxed{50 percent}", "50", 1.0, "exact"),
    (r"\boxed{0.5}", r"50\%", 1.0, "verified"),           # a percentage also matches its hundredth
    (r"\boxed{5\text{ cm}}", "5", 1.0, "exact"),
    (r"\boxed{12 \mbox{square inches}}", "12", 1.0, "exact"),
    (r"\boxed{5 m}", "5", 1.0, "verified"),                              # one-letter units: math-verify drops them
    (r"\boxed{30^\circ}", "30", 1.0, "exact"),
    (r"\boxed{30^{\circ}}", r"30 degrees", 1.0, "exact"),
    (r"\boxed{\$1{,}000.00}", "1000", 1.0, "exact"),
    (r"\boxed{1,000}", "1000", 1.0, "exact"),
    (r"\boxed{\text{Monday}}", "Monday", 1.0, "exact"),
    (r"\boxed{\textbf{(B)}}", r"\text{(B)}", 1.0, "exact"),
    (r"\boxed{x=3}", "3", 1.0, "exact"),
    (r"\boxed{3}", "x = 3", 1.0, "exact"),
    (r"\boxed{2x+2}", "2(x+1)", 1.0, "verified"),
    (r"\boxed{\pi r^2}", r"r^2\pi", 1.0, "verified"),
    (r"\boxed{\frac{\frac{1}{2}}{2}}", r"\frac14", 1.0, "verified"),     # nested braces
    (r"first \boxed{3}, then \boxed{4}.", "4", 1.0, "exact"),            # the last box counts
    (r"\fbox{7}", "7", 1.0, "exact"),
    ("48 + 25 = 73\n#### 73", "73", 1.0, "exact"),                      # GSM8K style
    ("#### 1,234", 1234, 1.0, "exact"),                                 # int gold
    (r"\boxed{12}", r"Add them: 5 + 7 = \boxed{12}.", 1.0, "exact"),     # gold given as a worked solution
    # wrong answers
    (r"\boxed{\frac{1}{3}}", "0.5", 0.0, "mismatch"),
    (r"\boxed{(1,2)}", "(1,2]", 0.0, "mismatch"),
    (r"\boxed{[1,2]}", "(1,2]", 0.0, "mismatch"),
    (r"\boxed{\{1,3\}}", r"\{1,2\}", 0.0, "mismatch"),
    (r"\boxed{0.5}", "50", 0.0, "mismatch"),                            # no percent sign: 0.5 is not 50
    (r"\boxed{-3}", "3", 0.0, "mismatch"),
    (r"\boxed{2x+3}", "2(x+1)", 0.0, "mismatch"),
    (r"\boxed{\sqrt{3}/2}", r"\frac{\sqrt2}{2}", 0.0, "mismatch"),
    (r"\boxed{3.14}", r"\pi", 0.0, "mismatch"),
    (r"\boxed{0.333}", r"\frac13", 0.0, "mismatch"),
    (r"\boxed{10000000001}", "10000000000", 0.0, "mismatch"),
    (r"\boxed{5x}", "5", 0.0, "mismatch"),                              # a letter after a number is no unit
    (r"\boxed{4} wait, no: \boxed{3}", "4", 0.0, "mismatch"),           # the last box counts
    (r"\boxed{1} #### 2", "2", 0.0, "mismatch"),                        # a box beats ####
    ("#### 41", "42", 0.0, "mismatch"),
    # no answer
    ("The answer is 5.", "5", 0.0, "no_answer"),
    (r"\boxed{\frac{1}{2}", "0.5", 0.0, "no_answer"),                   # unclosed box
    (r"\boxed{}", "1", 0.0, "no_answer"),
    (r"\boxed{ \text{ } }", "1", 0.0, "no_answer"),
]


def test_reward_table(pool):
  assert len(REWARD_CASES) >= 40
  completions = [c for c, _, _, _ in REWARD_CASES]
  golds = [g for _, g, _, _ in REWARD_CASES]
  details = math_reward_details(completions, golds, pool=pool)
  got = list(zip(details.rewards_b.tolist(), details.reasons_b))
  expected = [(r, why) for _, _, r, why in REWARD_CASES]
  wrong = [(case[:2], g, e) for case, g, e in zip(REWARD_CASES, got, expected) if g != e]
  assert not wrong, wrong
  assert details.rewards_b.dtype == np.float32
  np.testing.assert_array_equal(math_reward(completions, golds, pool=pool), details.rewards_b)
  stats = details.stats
  assert stats.total == len(REWARD_CASES) and stats.exact + stats.verified == sum(r for _, _, r, _ in REWARD_CASES)


def test_answer_keys_vote_together():
  details = math_reward_details([r"\boxed{\dfrac{1}{2}}", r"\boxed{1/2}", r"\boxed{0.50}", "none"],
                                ["1/2", "1/2", "0.5", "1"])
  assert details.answer_keys_b == ("1/2", "1/2", "0.5", None)
  assert details.reasons_b == ("exact", "exact", "exact", "no_answer")  # No checker needed: no pool was started.


def test_without_a_pool_a_temporary_one_is_started_and_closed():
  rewards_b = math_reward([r"\boxed{\frac{1}{2}}", r"\boxed{3}"], ["0.5", "4"], timeout_s=30.0)
  np.testing.assert_array_equal(rewards_b, [1.0, 0.0])


def test_bad_arguments_raise_clear_errors(pool):
  with pytest.raises(ValueError, match="2 completions but 1 answers"):
    math_reward(["a", "b"], ["1"], pool=pool)
  with pytest.raises(TypeError, match="decode token ids"):
    math_reward([[1, 2]], ["1"], pool=pool)
  with pytest.raises(TypeError, match="not a single one"):
    math_reward(r"\boxed{1}", "1", pool=pool)
  with pytest.raises(TypeError, match="gold answers must be str"):
    math_reward([r"\boxed{1}"], [0.5], pool=pool)
  with pytest.raises(ValueError, match="empty after cleaning"):
    math_reward([r"\boxed{1}"], ["  $ $ "], pool=pool)
  assert gold_answer(12) == "12" and gold_answer(r"so \boxed{3}") == "3" and gold_answer("#### 9") == "9"


# -- normalisation --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, cleaned, key", [
    (r"\$\dfrac{1}{2}\,\text{cm}.", r"\frac{1}{2}", "1/2"),
    ("x = 1{,}000", "1000", "1000"),
    (r"1\,000", "1000", "1000"),
    ("1,2", "1,2", "1,2"),                                               # a list, not a thousands separator
    ("50 percent", r"50\%", "50"),
    (r"\left(1, 2\right]", "(1, 2]", "(1,2]"),
    (r"\theta = 30^\circ", "30", "30"),
    ("a_1 = 2", "2", "2"),
    ("x=1, x=2", "x=1, x=2", "x=1,x=2"),                                 # two assignments: kept for math-verify
    ("f(x) = 2x", "f(x) = 2x", "f(x)=2x"),
    (r"4\pi \text{ cm}^2", r"4\pi", r"4\pi"),
    (r"\pi r^2", r"\pi r^2", r"\pi r^2"),                                # a command keeps its separating space
    (r"\begin{pmatrix}1\\ 2\\[2pt]3\end{pmatrix}", r"\begin{pmatrix}1\\ 2\\[2pt]3\end{pmatrix}",
     r"\begin{pmatrix}1\\2\\[2pt]3\end{pmatrix}"),                        # `\\` is a row break, not `\` + space
    ("{{5}}", "{{5}}", "5"),
    (r"{1}+{2}", r"{1}+{2}", r"{1}+{2}"),
    (r"-\frac{1}{2}", r"-\frac{1}{2}", "-1/2"),
    (r"\frac{1}{2}x", r"\frac{1}{2}x", r"\frac{1}{2}x"),                 # not a lone fraction: no a/b rewrite
    (r"\frac{2\pi}{3}", r"\frac{2\pi}{3}", r"2\pi/3"),
    (r"\sqrt2+\frac1{2}", r"\sqrt2+\frac1{2}", r"\sqrt{2}+\frac{1}{2}"),
    ("+07.50", "+07.50", "7.5"),
    ("-0.0", "-0.0", "0"),
])
def test_clean_and_key(raw, cleaned, key):
  assert clean_answer(raw) == cleaned
  assert answer_key(clean_answer(raw)) == key == normalize_answer(raw)


@pytest.mark.parametrize("text, expected", [
    ("007", "7"), ("-0", "0"), ("+3.140", "3.14"), ("5.", "5"), (".25", "0.25"), ("-.5", "-0.5"),
    ("1e3", None), ("1,000", None), ("", None), (".", None), ("--1", None), ("٣", None),
    ("1" * 10_000, "1" * 10_000),
])
def test_canonical_decimal(text, expected):
  assert canonical_decimal(text) == expected


# -- adversarial completions ----------------------------------------------------------------------------------------

def test_adversarial_completions_score_zero_without_crashing(pool, tmp_path):
  pwned = tmp_path / "pwned"
  ten_thousand_digits = "".join(random.Random(0).choice("0123456789") for _ in range(10_000)).lstrip("0")
  cases = [  # (completion, gold, expected reward)
      ("x" * 1_000_000, "1", 0.0),                                           # 1 MB, no box
      (r"\boxed{" + "x" * 1_000_000 + "}", "1", 0.0),                        # 1 MB inside a box: too long
      ("{" * 500_000 + r"\boxed{1}" + "}" * 500_000, "1", 1.0),              # 1 MB of braces around a box
      (r"\boxed{10^{10^{10^{10}}}}", "1", 0.0),
      (r"\boxed{" + "{" * 1000 + "1" + "}" * 1000 + "}", "1", 1.0),          # 1,000 nested braces around 1
      (r"\boxed{" + "{" * 1000 + "x" + "}" * 999 + "}", "1", 0.0),           # unbalanced inside
      (r"\boxed{" * 1000, "1", 0.0),                                        # unclosed boxes
      (r"\boxed{1} \boxed{2", "1", 0.0),
      ("\\boxed{1\ud800}", "1", 0.0),                                       # lone surrogates
      ("\ud800\udfff\\boxed{1}", "1", 1.0),
      ("\\boxed{1\x00}", "1", 0.0),                                         # NUL bytes
      ("\x00" * 1000 + "\\boxed{2}", "2", 1.0),
      (rf"\boxed{{__import__('os').system('touch {pwned}')}}", "1", 0.0),   # code is never run
      (rf"\boxed{{exec(\"open('{pwned}', 'w')\")}}", "1", 0.0),
      (rf"\boxed{{{ten_thousand_digits}}}", ten_thousand_digits, 1.0),       # beyond int's 4300-digit limit
      (rf"\boxed{{{ten_thousand_digits}}}", "42", 0.0),
      (rf"\boxed{{{ten_thousand_digits}1}}", ten_thousand_digits, 0.0),
  ]
  start = time.monotonic()
  details = math_reward_details([c for c, _, _ in cases], [g for _, g, _ in cases], pool=pool)
  elapsed = time.monotonic() - start
  np.testing.assert_array_equal(details.rewards_b, [r for _, _, r in cases])
  assert all(reason in REASONS for reason in details.reasons_b)
  assert details.reasons_b[1] == "too_long"
  assert details.reasons_b[3] in ("timeout", "parse_error", "worker_died", "mismatch")
  assert not pwned.exists()
  # At most one check (the power tower) can run into the timeout; everything else is milliseconds of string work.
  assert elapsed < 2 * TIMEOUT_S + 20.0, elapsed
  _assert_healthy(pool)


_TOKENS = ["\\boxed{", "\\fbox{", "{", "}", "}", "\\frac", "\\sqrt", "^", "_", "1", "2", "7", "x", "=", ",", "\\%",
           "\\text{", " cm", "\\left(", "\\right)", "(", ")", "[", "]", "\\{", "\\}", "-", "+", ".", "$", "####", "\n",
           "\\", " ", "\ud800", "\x00", "é", "\\dfrac", "\\pi", "10^{10^{", "\\infty", "\\cup", "a", "%", "\\!", "0"]


def _random_completion(rng: random.Random) -> str:
  def junk(max_tokens):
    return "".join(rng.choice(_TOKENS) for _ in range(rng.randint(0, max_tokens)))
  if rng.random() < 0.5:
    return junk(12)
  return junk(12) + "\\boxed{" + junk(6) + "}" + junk(6)  # Half carry a closed box, so they reach the checker.


def test_two_thousand_generated_completions(pool):
  rng = random.Random(1234)
  completions = [_random_completion(rng) for _ in range(2000)]
  golds = [rng.choice(["1", "2", r"\frac12", "x", "(1,2]", r"7\%", "x+1"]) for _ in range(2000)]
  details = math_reward_details(completions, golds, pool=pool)
  assert details.rewards_b.shape == (2000,) and set(details.rewards_b.tolist()) <= {0.0, 1.0}
  assert all(reason in REASONS for reason in details.reasons_b)
  stats = details.stats
  assert stats.total == 2000
  assert stats.mismatch + stats.verified + stats.parse_error + stats.timeout > 100  # The checker was exercised.
  for completion, gold, reward, reason in zip(completions, golds, details.rewards_b, details.reasons_b):
    assert (reward == 1.0) == (reason in ("exact", "verified")), (completion, gold, reason)
  _assert_healthy(pool)


def test_timeout_kills_only_that_check(pool):
  restarts = pool.num_restarts
  start = time.monotonic()
  result = pool.check(["{" * 1000 + "x" + "}" * 1000, r"\frac{1}{2}", "3"], ["1", "0.5", "4"])
  elapsed = time.monotonic() - start
  assert result.reasons == ("timeout", "verified", "mismatch")  # 1,000 nested braces take sympy ~20 s.
  np.testing.assert_array_equal(result.scores, [0.0, 1.0, 0.0])
  assert pool.num_restarts == restarts + 1
  assert elapsed < TIMEOUT_S + 10.0, elapsed
  _assert_healthy(pool)


def test_worker_killed_mid_check_is_replaced_and_the_check_scores_zero():
  with MathVerifyPool(timeout_s=60.0, max_workers=1) as pool:
    _assert_healthy(pool)  # Starts and warms the worker.
    (pid,) = pool.worker_pids()
    checking = threading.Event()

    def kill_mid_check():
      checking.wait()
      time.sleep(1.0)  # The check is handed over within microseconds of the event; its parse lasts ~20 s.
      os.kill(pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_mid_check)
    killer.start()
    start = time.monotonic()
    checking.set()
    result = pool.check(["{" * 1000 + "x" + "}" * 1000, "2"], ["1", "2"])
    killer.join()
    assert result.reasons == ("worker_died", "verified")
    np.testing.assert_array_equal(result.scores, [0.0, 1.0])
    assert time.monotonic() - start < 30.0
    assert pool.num_worker_deaths == 1 and pool.num_timeouts == 0
    assert pool.worker_pids() and pool.worker_pids() != [pid]
    _assert_healthy(pool)


def test_custom_verify_fn_and_pool_lifecycle():
  with MathVerifyPool(timeout_s=30.0, verify_fn=operator.eq, warm_up=False) as pool:
    result = pool.check(["a", "b", "c"], ["a", "x", "c"])
    assert result.reasons == ("verified", "mismatch", "verified")
    assert pool.check([], []).reasons == ()
  with pytest.raises(RuntimeError, match="closed"):
    pool.check(["a"], ["a"])
  with pytest.raises(TypeError, match="module-level function"):
    MathVerifyPool(verify_fn=lambda p, g: 1.0)
  with pytest.raises(ValueError, match="timeout_s"):
    MathVerifyPool(timeout_s=0)
  with pytest.raises(ValueError, match="max_workers"):
    MathVerifyPool(max_workers=0)
  with pytest.raises(ValueError, match="memory_limit_mb"):
    MathVerifyPool(memory_limit_mb=10)
  unstarted = MathVerifyPool()
  with pytest.raises(ValueError, match="2 predictions but 1 golds"):
    unstarted.check(["a", "b"], ["1"])
  with pytest.raises(TypeError, match="strings"):
    unstarted.check(["1"], [1])
  assert unstarted.worker_pids() == []  # Nothing starts before a check needs a worker.
  unstarted.close()


def test_stats_add_and_count():
  a = MathRewardStats.from_reasons(["exact", "timeout", "exact"])
  b = MathRewardStats.from_reasons(["worker_died", "no_answer"])
  total = a + b
  assert total.as_dict() == {"exact": 2, "verified": 0, "mismatch": 0, "no_answer": 1, "too_long": 0,
                             "parse_error": 0, "timeout": 1, "worker_died": 1}
  assert total.total == 5


# -- format reward and overlong penalty -----------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    (r"We add. The answer is $\boxed{5}$.", 1.0),
    (r"\fbox{x+1}", 1.0),
    ("\\boxed{\\frac{1}{2}}\n", 1.0),
    ("no box here", 0.0),
    (r"\boxed{1} and \boxed{2}", 0.0),           # two answers
    (r"\boxed{\boxed{2}}", 0.0),                 # a nested box counts as a second one
    (r"\boxed{2", 0.0),                          # unclosed
    (r"\boxed{  }", 0.0),                        # blank
    ("#### 5", 0.0),                             # the format asks for a box
    ("\\boxed{5}\x00", 0.0),                     # NUL
    ("\ud800 \\boxed{5}", 0.0),                  # lone surrogate: not valid UTF-8
])
def test_format_reward(text, expected):
  rewards_b = format_reward([text])
  assert rewards_b.dtype == np.float32 and rewards_b.tolist() == [expected]


def test_overlong_penalty_hand_values():
  # max_len 100, buffer 20: zero through 80, then (80 − L)/20 down to −1 at 100, −1 beyond.
  lengths = np.array([0, 80, 81, 90, 99, 100, 150])
  expected = [0.0, 0.0, -0.05, -0.5, -0.95, -1.0, -1.0]
  np.testing.assert_allclose(overlong_penalty(lengths, 100, 20), expected, rtol=0, atol=1e-7)
  assert overlong_penalty(lengths.reshape(7, 1), 100, 20).shape == (7, 1)
  np.testing.assert_allclose(overlong_penalty([9, 10], 10, 10), [-0.9, -1.0], atol=1e-7)  # buffer = max_len
  assert overlong_penalty(np.array([], dtype=np.int32), 10, 5).shape == (0,)


def test_overlong_penalty_bad_input():
  with pytest.raises(ValueError, match="buffer"):
    overlong_penalty([1], 100, 0)
  with pytest.raises(ValueError, match="buffer"):
    overlong_penalty([1], 100, 101)
  with pytest.raises(TypeError, match="integer token counts"):
    overlong_penalty([1.5], 100, 10)
  with pytest.raises(ValueError, match=">= 0"):
    overlong_penalty([-1], 100, 10)
  with pytest.raises(TypeError, match="max_len"):
    overlong_penalty([1], 100.0, 10)
