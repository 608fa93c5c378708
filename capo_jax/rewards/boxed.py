"""Final-answer extraction and the exact integer reward.

The verifiable reward of the GRPO family (docs/MATH.md §1): r = 1 if the completion's final answer is right, else 0.
The final answer is the content of the LAST top-level `\\boxed{...}` (or `\\fbox{...}`) in the completion, the
convention of MATH/DeepScaleR-style graders; a completion with no box at all may instead end in a GSM8K-style
`#### 42` line. This module is pure Python (no jax) so the host loop can call it on decoded text without touching the
accelerator, and it never evaluates the text it reads.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

__all__ = ["extract_boxed", "extract_final_answer", "integer_reward", "integer_rewards", "matching_brace"]

# `\boxed` or `\fbox`, optional spaces, then the opening brace. The brace is required: `\boxed 5` is rejected as
# malformed rather than guessed at.
BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")
# An integer answer: optional sign, ASCII digits only (so "1,000", "1_000", "٣" and "7.0" are all wrong answers).
_INTEGER = re.compile(r"[+-]?[0-9]+")
# Decimal digits Python's int <-> str conversions may handle (sys.int_info.default_max_str_digits is 4300).
_SAFE_DIGITS = 4000


def matching_brace(text: str, open_index: int) -> int | None:
  """Index of the `}` closing the `{` at `open_index`, or None if unbalanced. `\\{` and `\\}` are literal braces.

  One left-to-right pass, O(len(text)), no recursion: safe on megabyte strings and thousands of nested braces.
  """
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
  while (match := BOX_OPEN.search(text, pos)) is not None:
    open_index = match.end() - 1
    close_index = matching_brace(text, open_index)
    if close_index is None:
      return None  # Everything after an unclosed box is inside it: no later box can be top-level.
    last = text[open_index + 1 : close_index]
    pos = close_index + 1  # Skip boxes nested in this one.
  return last


def extract_final_answer(text: str) -> str | None:
  """The completion's final answer: the last `\\boxed{}` content, else the text after the last `####`, else None.

  Rule: if the completion opens any `\\boxed{`/`\\fbox{`, the answer is `extract_boxed(text)` (None when the last box
  is unclosed: a malformed box is not rescued by a `####` line). Only a completion with no box falls back to the
  GSM8K convention: the rest of the line after the last `####`, stripped (`"... #### 1,000\\n"` → `"1,000"`); an
  empty rest is None. No other phrasing ("The answer is 5") counts as an answer.

  Args:
    text: a decoded completion.

  Returns:
    The raw answer text, or None.
  """
  if not isinstance(text, str):
    raise TypeError(f"extract_final_answer expects a str, got {type(text).__name__}; decode token ids first.")
  if BOX_OPEN.search(text) is not None:
    return extract_boxed(text)
  marker = text.rfind("####")
  if marker < 0:
    return None
  line_end = text.find("\n", marker)
  answer = text[marker + 4 : line_end if line_end >= 0 else len(text)].strip()
  return answer or None


def _check_integer_answer(answer: object) -> int:
  # bool is an int subclass; True as a gold answer is always a bug upstream.
  if isinstance(answer, (bool, np.bool_)) or not isinstance(answer, (int, np.integer)):
    raise TypeError(f"integer_reward needs an int gold answer, got {answer!r} ({type(answer).__name__}); "
                    "use math_reward for non-integer answers.")
  return int(answer)


def _decimal_digits(value: int) -> str:
  """Decimal digits of |value| without tripping Python's int-to-str digit limit (chunked for huge values)."""
  value = abs(value)
  if value.bit_length() <= _SAFE_DIGITS * 3:  # 3 bits per digit bounds the digit count by 3·_SAFE_DIGITS·log10(2).
    return str(value)
  chunks = []
  base = 10**_SAFE_DIGITS
  while value:
    value, chunk = divmod(value, base)
    chunks.append(str(chunk).zfill(_SAFE_DIGITS))
  return "".join(reversed(chunks)).lstrip("0") or "0"


def integer_reward(completion_text: str, answer: int) -> float:
  """Exact integer reward: 1.0 iff the last box holds exactly the integer `answer`, else 0.0.

  r = 1[ strip(extract_boxed(completion_text)) denotes `answer` ], where the boxed content must be an optional sign
  followed by ASCII digits once surrounding whitespace is removed; `+73` and ` 73 ` score like `73`, `073` denotes
  73 and `-0` denotes 0. Anything else — no box, an unbalanced box, `1,000`, `73.0`, `x=73`, `73 apples` — scores 0.
  The comparison is on digit strings (sign, then digits without leading zeros), so an integer of any length is
  scored without converting the completion's text to an int.

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
  digits = content.lstrip("+-").lstrip("0") or "0"
  negative = content.startswith("-") and digits != "0"
  if negative != (gold < 0):
    return 0.0
  if len(digits) > gold.bit_length() // 3 + 1:  # More digits than |gold| can have: skip building its digits.
    return 0.0
  return 1.0 if digits == _decimal_digits(gold) else 0.0


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
