"""Verifiable rewards: completion text → scalar reward. No jax here: rewards run on the host, on decoded text.

- `math_reward` (and `math_reward_details`, with per-item reasons and `MathRewardStats`): the reward of every math
  task — final-answer extraction, normalisation, exact match, then math-verify equivalence in `MathVerifyPool`
  workers with a hard per-check timeout.
- `format_reward`: one well-formed boxed answer or not. `overlong_penalty`: DAPO's soft length shaping, in tokens.
- `extract_boxed`, `extract_final_answer`: the final answer of a completion. `clean_answer`, `normalize_answer`,
  `answer_key`, `canonical_decimal`: the normalisation rules.
- `integer_reward`, `integer_rewards`: exact integer match on the last `\\boxed{}` (the embedded arithmetic task).
"""

from capo_jax.rewards.boxed import extract_boxed, extract_final_answer, integer_reward, integer_rewards
from capo_jax.rewards.math_reward import (
    REASONS,
    MathRewardDetails,
    MathRewardStats,
    format_reward,
    gold_answer,
    math_reward,
    math_reward_details,
)
from capo_jax.rewards.math_verify_reward import CheckResult, MathVerifyPool, verify_with_math_verify
from capo_jax.rewards.normalize import answer_key, canonical_decimal, clean_answer, normalize_answer
from capo_jax.rewards.shaping import overlong_penalty

__all__ = [
    "REASONS",
    "CheckResult",
    "MathRewardDetails",
    "MathRewardStats",
    "MathVerifyPool",
    "answer_key",
    "canonical_decimal",
    "clean_answer",
    "extract_boxed",
    "extract_final_answer",
    "format_reward",
    "gold_answer",
    "integer_reward",
    "integer_rewards",
    "math_reward",
    "math_reward_details",
    "normalize_answer",
    "overlong_penalty",
    "verify_with_math_verify",
]
