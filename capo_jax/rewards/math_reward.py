"""The math reward: one batch entry point for every math task, plus the format reward.

The verifiable reward of the GRPO family (docs/MATH.md §1): r_i = 1 if completion i's final answer equals the gold
answer, else 0. Per item, `math_reward_details` runs this pipeline and records why the item scored what it did:

1. extract the final answer (`extract_final_answer`: the last `\\boxed{}`/`\\fbox{}`, else a `#### n` line) —
   none, or nothing left after cleaning: **no_answer**;
2. clean both sides (`clean_answer`) and compare their exact-match keys (`answer_key`): equal keys: **exact**;
3. two plain decimal numbers with different keys (`3.5` vs `7/2` is not this case, `3.5` vs `3.50001` is) with no
   percent sign on either side: **mismatch**, decided without the checker (exact digits, no rounding tolerance);
4. a cleaned prediction longer than `max_answer_chars`: **too_long** (never handed to sympy);
5. otherwise the cleaned pair goes to `math_verify` in a `MathVerifyPool` worker: **verified** or **mismatch**, or
   **parse_error** (the checker raised), **timeout** (past the pool's per-check limit; the worker is killed),
   **worker_died** (the worker process ended mid-check). Identical pairs in a batch are checked once.

Only exact and verified items score 1. Nothing here raises on model output (any str — megabytes long, lone
surrogates, NUL bytes, code — gets a score), and nothing evaluates it: the only parser that sees it is math_verify's,
inside the worker.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from capo_jax.rewards.boxed import BOX_OPEN, extract_boxed, extract_final_answer
from capo_jax.rewards.math_verify_reward import MathVerifyPool
from capo_jax.rewards.normalize import answer_key, canonical_decimal, clean_answer

__all__ = ["MathRewardDetails", "MathRewardStats", "REASONS", "format_reward", "gold_answer", "math_reward",
           "math_reward_details"]

REASONS = ("exact", "verified", "mismatch", "no_answer", "too_long", "parse_error", "timeout", "worker_died")
_CONTROL_CHARACTER = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


@dataclasses.dataclass(frozen=True)
class MathRewardStats:
  """How many items of a batch ended with each reason (see the module docstring); add two with `+`."""
  exact: int = 0
  verified: int = 0
  mismatch: int = 0
  no_answer: int = 0
  too_long: int = 0
  parse_error: int = 0
  timeout: int = 0
  worker_died: int = 0

  @classmethod
  def from_reasons(cls, reasons: Sequence[str]) -> "MathRewardStats":
    counts = dict.fromkeys(REASONS, 0)
    for reason in reasons:
      counts[reason] += 1
    return cls(**counts)

  def __add__(self, other: "MathRewardStats") -> "MathRewardStats":
    return MathRewardStats(**{name: getattr(self, name) + getattr(other, name) for name in REASONS})

  @property
  def total(self) -> int:
    return sum(getattr(self, name) for name in REASONS)

  def as_dict(self) -> dict[str, int]:
    """`{reason: count}` in `REASONS` order, e.g. for a metrics logger."""
    return {name: getattr(self, name) for name in REASONS}


class MathRewardDetails(NamedTuple):
  """Per-item outcome of `math_reward_details` for B completions.

  Attributes:
    rewards_b: float32 [B] in {0, 1}.
    reasons_b: B reasons from `REASONS`.
    answer_keys_b: B exact-match keys of the extracted answers (`answer_key`), None where there was no answer; the
      votes of majority voting (`capo_jax.eval_metrics.maj_at_k`).
  """
  rewards_b: np.ndarray
  reasons_b: tuple[str, ...]
  answer_keys_b: tuple[str | None, ...]

  @property
  def stats(self) -> MathRewardStats:
    return MathRewardStats.from_reasons(self.reasons_b)


def gold_answer(answer: str | int) -> str:
  """The gold answer text of a dataset record: the last `\\boxed{}` of a worked solution, the text after `####`, an
  int written in decimal, or the string itself.

  Raises:
    TypeError: for anything but a str or an int (a float gold is ambiguous: pass the dataset's string).
  """
  if isinstance(answer, (bool, np.bool_)) or not isinstance(answer, (str, int, np.integer)):
    raise TypeError(f"gold answers must be str (or int), got {answer!r} ({type(answer).__name__}); pass the "
                    "dataset's answer string, e.g. '0.5' or '\\\\frac{1}{2}'.")
  if not isinstance(answer, str):
    return str(int(answer))
  extracted = extract_final_answer(answer)
  return answer if extracted is None else extracted


def math_reward_details(completions: Sequence[str], answers: Sequence[str | int], *,
                        pool: MathVerifyPool | None = None, timeout_s: float = 5.0,
                        max_answer_chars: int = 1000) -> MathRewardDetails:
  """Scores B completions against their gold answers and says why each scored what it did (module docstring).

  Args:
    completions: B decoded completions (any str).
    answers: B gold answers aligned with `completions` (see `gold_answer`; for P prompts × G samples, repeat each
      prompt's answer G times).
    pool: a `MathVerifyPool` to reuse (the training loop should always pass one). Without one, a temporary pool
      with `timeout_s` is started only if some item needs the checker, and closed before returning.
    timeout_s: per-check limit of the temporary pool; ignored when `pool` is given.
    max_answer_chars: longest cleaned prediction handed to the checker.

  Returns:
    `MathRewardDetails` (rewards, reasons, answer keys); `.stats` counts the reasons.

  Raises:
    TypeError / ValueError: on malformed arguments (not str completions, misaligned lengths, a gold that is empty
      after cleaning) — never on the content of a completion.
  """
  if isinstance(completions, str) or isinstance(answers, (str, int)):
    raise TypeError("math_reward takes sequences of completions and answers (one per completion), not a single one.")
  if len(completions) != len(answers):
    raise ValueError(f"math_reward got {len(completions)} completions but {len(answers)} answers; repeat each "
                     "prompt's answer once per sample (e.g. [a for a in answers for _ in range(G)]).")
  if not isinstance(max_answer_chars, int) or max_answer_chars < 1:
    raise ValueError(f"max_answer_chars must be a positive int, got {max_answer_chars!r}.")
  for completion in completions:
    if not isinstance(completion, str):
      raise TypeError(f"completions must be decoded strings, got {type(completion).__name__}; decode token ids "
                      "first.")
  gold_cache: dict[str, tuple[str, str]] = {}  # gold text -> (cleaned, key); a group's G rows share one.
  golds_b = []
  for i, answer in enumerate(answers):
    text = gold_answer(answer)
    if text not in gold_cache:
      cleaned = clean_answer(text)
      if not cleaned:
        raise ValueError(f"gold answer {i} ({answer!r}) is empty after cleaning; fix the dataset record.")
      gold_cache[text] = (cleaned, answer_key(cleaned))
    golds_b.append(gold_cache[text])

  rewards_b = np.zeros(len(completions), dtype=np.float32)
  reasons_b: list[str] = [""] * len(completions)
  keys_b: list[str | None] = [None] * len(completions)
  to_check: dict[tuple[str, str], list[int]] = {}
  for i, completion in enumerate(completions):
    raw = extract_final_answer(completion)
    cleaned = clean_answer(raw) if raw is not None else ""
    key = answer_key(cleaned) if cleaned else ""
    if not key:
      reasons_b[i] = "no_answer"
      continue
    keys_b[i] = key
    gold_cleaned, gold_key = golds_b[i]
    if key == gold_key:
      rewards_b[i], reasons_b[i] = 1.0, "exact"
    elif (canonical_decimal(key) is not None and canonical_decimal(gold_key) is not None
          and "\\%" not in cleaned and "\\%" not in gold_cleaned):
      reasons_b[i] = "mismatch"
    elif len(cleaned) > max_answer_chars:
      reasons_b[i] = "too_long"
    else:
      to_check.setdefault((cleaned, gold_cleaned), []).append(i)

  if to_check:
    pairs = list(to_check)
    temporary = MathVerifyPool(timeout_s=timeout_s) if pool is None else None
    try:
      checker = pool if pool is not None else temporary
      result = checker.check([p for p, _ in pairs], [g for _, g in pairs])
    finally:
      if temporary is not None:
        temporary.close()
    for pair, score, reason in zip(pairs, result.scores, result.reasons):
      for i in to_check[pair]:
        rewards_b[i], reasons_b[i] = score, reason
  return MathRewardDetails(rewards_b, tuple(reasons_b), tuple(keys_b))


def math_reward(completions: Sequence[str], answers: Sequence[str | int], *, pool: MathVerifyPool | None = None,
                timeout_s: float = 5.0, max_answer_chars: int = 1000) -> np.ndarray:
  """r_i = 1 iff completion i's final answer is equivalent to answers[i]: float32 [B] (`math_reward_details`)."""
  return math_reward_details(completions, answers, pool=pool, timeout_s=timeout_s,
                             max_answer_chars=max_answer_chars).rewards_b


def _is_well_formed_text(text: str) -> bool:
  """Encodable as UTF-8 (no lone surrogates) and free of control characters other than tab, newline, return."""
  try:
    text.encode("utf-8")
  except UnicodeEncodeError:
    return False
  return _CONTROL_CHARACTER.search(text) is None


def format_reward(completions: Sequence[str]) -> np.ndarray:
  """f_i = 1 iff completion i states exactly one boxed final answer in well-formed text, else 0: float32 [B].

  Rule, all four required: (1) the completion opens exactly one `\\boxed{`/`\\fbox{` (a box nested in another counts
  as a second one); (2) that box closes (its braces balance, `\\{`/`\\}` being literal); (3) its content is not
  blank; (4) the text is well-formed: valid UTF-8 (no lone surrogates) and no control characters other than tab,
  newline and carriage return (no NUL). Correctness of the answer plays no part.
  """
  if isinstance(completions, str):
    raise TypeError("format_reward takes a sequence of completions, not a single string.")
  rewards_b = np.zeros(len(completions), dtype=np.float32)
  for i, text in enumerate(completions):
    if not isinstance(text, str):
      raise TypeError(f"completions must be decoded strings, got {type(text).__name__}.")
    if len(BOX_OPEN.findall(text)) != 1:
      continue
    content = extract_boxed(text)
    rewards_b[i] = float(content is not None and content.strip() != "" and _is_well_formed_text(text))
  return rewards_b
