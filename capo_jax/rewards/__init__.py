"""Verifiable rewards: completion text → scalar reward in {0, 1}.

- `extract_boxed`, `integer_reward`, `integer_rewards`: exact integer match on the last `\\boxed{}` (the embedded
  arithmetic task's reward).
- `MathVerifyPool`, `math_verify_reward`, `math_verify_rewards`: symbolic equivalence with HF math_verify in a
  worker process with a hard timeout (real math datasets).

No jax here: rewards run on the host, on decoded text.
"""

from capo_jax.rewards.boxed import extract_boxed, integer_reward, integer_rewards
from capo_jax.rewards.math_verify_reward import (
    MathVerifyPool,
    math_verify_reward,
    math_verify_rewards,
    verify_with_math_verify,
)

__all__ = [
    "MathVerifyPool",
    "extract_boxed",
    "integer_reward",
    "integer_rewards",
    "math_verify_reward",
    "math_verify_rewards",
    "verify_with_math_verify",
]
