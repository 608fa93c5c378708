"""Exact-match rewards on the final `\\boxed{...}` answer of a completion.

The verifiable reward of the GRPO family (../shared/CAPO.md §1): r = 1 if the completion's final answer is right,
else 0. The final answer is the content of the LAST top-level `\\boxed{...}` (or `\\fbox{...}`) in the completion,
the convention of MATH/DeepScaleR-style graders. This module is pure Python (no jax) so the host loop can call it on
decoded text without touching the accelerator.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

__all__ = ["extract_boxed", "integer_reward", "integer_rewards"]

# `\boxed` or `\fbox`, optional spaces, then the opening brace. The brace is required: `\boxed 5` is rejected as
# malformed rather than guessed at.
_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")
# An integer answer: optional sign, ASCII digits only (so "1,000", "1_000", "٣" and "7.0" are all wrong answers).
_INTEGER = re.compile(r"[+-]?[0-9]+")


def _matching_brace(text: str, open_index: int) -> int | None:
  """Index of the `}` closing the `{` at `open_index`, or None if unbalanced. `\\{` and `\\}` are literal braces."""
  depth = 0
  i = open_index
  while i < len(text):
    ch = text[i]
    if ch == "\\":
      i += 2  # An escaped character (`\{`, `\}`, `\\`) never opens or closes a group.
      continue
    if ch == "{":
      depth += 1
    elif ch == "}":
      depth -= 1
      if depth == 0:
        return i
    i += 1
  return None


def extract_boxed(text: str) -> str | None:
  """Content of the last top-level `\\boxed{...}` / `\\fbox{...}` in `text`, or None.

  Scans left to right; each box's content runs to its matching brace, so nested braces (`\\boxed{\\frac{1}{2}}` →
  `\\frac{1}{2}`) and boxes inside boxes (the outer one is the answer) are handled. If the last box opened is never
  closed the completion's final answer is malformed and the result is None, even when an earlier box was complete.

  Args:
    text: a decoded completion.

  Returns:
    The raw content (not stripped) of the last box, or None when there is no box or the last one is unbalanced.
  """
  if not isinstance(text, str):
    raise TypeError(f"extract_boxed expects a str, got {type(text).__name__}; decode token ids first.")
  last: str | None = None
  pos = 0
  while (match := _BOX_OPEN.search(text, pos)) is not None:
    open_index = match.end() - 1
    close_index = _matching_brace(text, open_index)
    if close_index is None:
      return None  # Everything after an unclosed box is inside it: no later box can be top-level.
    last = text[open_index + 1 : close_index]
    pos = close_index + 1  # Skip boxes nested in this one.
  return last


def _check_integer_answer(answer: object) -> int:
  # bool is an int subclass; True as a gold answer is always a bug upstream.
  if isinstance(answer, (bool, np.bool_)) or not isinstance(answer, (int, np.integer)):
    raise TypeError(f"integer_reward needs an int gold answer, got {answer!r} ({type(answer).__name__}); "
                    "use math_verify_reward for non-integer answers.")
  return int(answer)


def integer_reward(completion_text: str, answer: int) -> float:
  """Exact integer reward: 1.0 iff the last box holds exactly the integer `answer`, else 0.0.

  r = 1[ int(strip(extract_boxed(completion_text))) == answer ], where the boxed content must be an optional
  sign followed by ASCII digits once surrounding whitespace is removed; `+73` and ` 73 ` score like `73`, and
  `073` parses to 73. Anything else — no box, an unbalanced box, `1,000`, `73.0`, `x=73`, `73 apples` — scores 0.

  Args:
    completion_text: the decoded completion.
    answer: the gold integer.

  Returns:
    1.0 or 0.0 (a Python float).
  """
  gold = _check_integer_answer(answer)
  content = extract_boxed(completion_text)
  if content is None:
    return 0.0
  content = content.strip()
  if _INTEGER.fullmatch(content) is None:
    return 0.0
  return 1.0 if int(content) == gold else 0.0


def integer_rewards(completions: Sequence[str], answers: Sequence[int]) -> np.ndarray:
  """`integer_reward` over a batch: rewards_b[i] = integer_reward(completions[i], answers[i]).

  Args:
    completions: B decoded completions (for P prompts × G samples, row i holds prompt i // G's answer).
    answers: B gold integers, aligned with `completions`.

  Returns:
    rewards_b: float32 array of shape [B] with values in {0, 1}.
  """
  if isinstance(completions, str) or isinstance(answers, (str, int)):
    raise TypeError("integer_rewards takes sequences of completions and answers; use integer_reward for one pair.")
  if len(completions) != len(answers):
    raise ValueError(f"integer_rewards got {len(completions)} completions but {len(answers)} answers; repeat each "
                     "prompt's answer once per sample (e.g. [a for a in answers for _ in range(G)]).")
  return np.asarray([integer_reward(c, a) for c, a in zip(completions, answers)], dtype=np.float32).reshape(-1)
