"""The embedded default task: synthetic multi-step integer arithmetic with worked solutions.

A problem is an expression over small integers with 1–3 of the operators `+ - *` and the usual precedence
(`*` first, then `+`/`-` left to right), e.g.

  prompt:    "Solve step by step and give the final answer in \\boxed{}.\\nWhat is 37 + 8 * 6 - 12?\\n"
  solution:  "8*6=48. 37+48=85. 85-12=73. \\boxed{73}"
  answer:    73

Everything is a pure function of integers, so data never needs to be stored or checkpointed:

- problem `i` of the train stream depends only on (seed, i); `batch(step, P)` is problems [step·P, (step+1)·P), so
  a resumed run that restores `step` sees exactly the same prompts.
- the split is a function of the question text alone: a problem is held-out iff a stable hash (BLAKE2b) of its
  question falls in the held-out bucket. Train draws that land there are redrawn, so no held-out problem can ever
  appear in train, for any seed or number of steps.

Headroom for RL (``wrong_step_fraction`` = f > 0): a share f of the *train* problems carry a worked solution with one
wrong step, of ``wrong_step_kind``:

- ``"offset"``: a step's result is moved by ±1 or ±2 and every later step is computed correctly from the wrong value,
  so the boxed value is wrong too;
- ``"early_box"``: the solution stops one step early and boxes the previous step's result (a premature answer;
  one-operator problems have no earlier result and stay correct).

Only ``solution`` changes (the supervised warm start's target); ``answer`` (the reward) and the held-out problems stay
correct. A model warm-started on these can do the task but takes the wrong path with probability ≈ f at the
corrupted step: sampled pass@k stays well above pass@1, and RL has that gap to close (docs/MAIN_JOB.md,
docs/RESULTS.md). Which train problems are corrupted is a pure function of (seed, index), independent of the problem
itself, and the sets are nested: every problem corrupted at fraction f is corrupted (the same way) at any f' > f.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import gin
import numpy as np

from capo_jax.rewards.boxed import integer_reward

__all__ = ["INSTRUCTION", "DIFFICULTIES", "ArithProblem", "ArithTask", "Difficulty", "format_prompt",
           "solve_expression"]

INSTRUCTION = "Solve step by step and give the final answer in \\boxed{}."


class Difficulty(NamedTuple):
  """Shape of a difficulty level.

  Attributes:
    min_ops, max_ops: number of binary operators, drawn uniformly in [min_ops, max_ops].
    add_range: inclusive range of operands that are only added/subtracted.
    mul_range: inclusive range of operands adjacent to a `*` (kept small so products stay small).
    ops: the operator alphabet.
  """
  min_ops: int
  max_ops: int
  add_range: tuple[int, int]
  mul_range: tuple[int, int]
  ops: str = "+-*"


# Level 0 is the embedded default: two steps over small numbers, which a 2-layer model learns to ~0.5 greedy accuracy
# in a ~1-minute warm start on 2 CPU cores (room for RL to improve, like the paper's ~0.6 start).
# Level 2 contains the `a + b * c` (a ∈ 10..99, b, c ∈ 2..9) family among its 9 templates.
DIFFICULTIES: dict[int, Difficulty] = {
    0: Difficulty(2, 2, (0, 20), (2, 9)),
    1: Difficulty(1, 1, (0, 99), (2, 12)),
    2: Difficulty(2, 2, (10, 99), (2, 9)),
    3: Difficulty(2, 3, (10, 99), (2, 9)),
    4: Difficulty(3, 3, (10, 99), (2, 12)),
}

_TRAIN_STREAM, _HELDOUT_STREAM, _CORRUPTION_STREAM = 0, 1, 2
WRONG_STEP_POSITIONS = ("any", "first", "last")
WRONG_STEP_KINDS = ("offset", "early_box")
_WRONG_OFFSETS = (-2, -1, 1, 2)
_HASH_BUCKETS = 10_000
_MAX_DRAWS = 10_000  # Per problem; only reachable with an (almost) empty split or all-negative problems.


@dataclasses.dataclass(frozen=True)
class ArithProblem:
  """One task record.

  Attributes:
    expression: e.g. '37 + 8 * 6 - 12' (spaces around operators; Python-evaluable).
    question: 'What is 37 + 8 * 6 - 12?'.
    prompt: INSTRUCTION + '\\n' + question + '\\n' — what the policy is conditioned on.
    solution: the reference completion, e.g. '8*6=48. 37+48=85. 85-12=73. \\boxed{73}'.
      (For a train problem of a task with ``wrong_step_fraction`` > 0 it may contain a wrong step.)
    answer: the integer value of the expression.
  """
  expression: str
  question: str
  prompt: str
  solution: str
  answer: int

  @property
  def text(self) -> str:
    """prompt + solution: the supervised warm start's target text (add <bos>/<eos> when tokenizing)."""
    return self.prompt + self.solution


def format_prompt(question: str) -> str:
  """The fixed prompt template: instruction line, question line, trailing newline (the completion starts after)."""
  return f"{INSTRUCTION}\n{question}\n"


def solve_expression(operands: Sequence[int], ops: Sequence[str],
                     errors: Mapping[int, int] | None = None) -> tuple[list[str], int]:
  """Worked solution of `operands[0] ops[0] operands[1] ...` with `*` before `+`/`-`, left to right.

  Args:
    operands, ops: the expression.
    errors: optional {step index: offset}: the written result of that step is off by ``offset``, and every later
      step computes correctly from the wrong value (a solution with a wrong step; the returned value is then wrong).

  Returns:
    (steps, value): steps like ['8*6=48', '37+48=85', '85-12=73'], one per operator, in the order a person would
    write them; value the (last step's) result.
  """
  if len(operands) != len(ops) + 1:
    raise ValueError(f"need len(operands) == len(ops) + 1, got {len(operands)} operands and {len(ops)} ops.")
  for op in ops:
    if op not in "+-*" or len(op) != 1:
      raise ValueError(f"unknown operator {op!r}; use one of '+', '-', '*'.")
  errors = dict(errors or {})
  if any(not 0 <= k < len(ops) for k in errors):
    raise ValueError(f"errors must map step indices in [0, {len(ops)}) to offsets, got {errors}.")
  steps: list[str] = []
  # Pass 1: collapse each run of products into one term.
  terms = [int(operands[0])]
  signs: list[str] = []
  for op, operand in zip(ops, operands[1:]):
    if op == "*":
      product = terms[-1] * int(operand) + errors.get(len(steps), 0)
      steps.append(f"{terms[-1]}*{int(operand)}={product}")
      terms[-1] = product
    else:
      signs.append(op)
      terms.append(int(operand))
  # Pass 2: add/subtract the terms left to right.
  value = terms[0]
  for sign, term in zip(signs, terms[1:]):
    new_value = (value + term if sign == "+" else value - term) + errors.get(len(steps), 0)
    steps.append(f"{value}{sign}{term}={new_value}")
    value = new_value
  return steps, value


def _check_difficulty(spec: Difficulty) -> None:
  if not 1 <= spec.min_ops <= spec.max_ops:
    raise ValueError(f"Difficulty needs 1 <= min_ops <= max_ops, got {spec.min_ops}, {spec.max_ops}.")
  for name, (low, high) in (("add_range", spec.add_range), ("mul_range", spec.mul_range)):
    if not 0 <= low <= high:
      raise ValueError(f"Difficulty.{name} must be (low, high) with 0 <= low <= high, got {(low, high)}.")
  if not spec.ops or any(op not in "+-*" for op in spec.ops):
    raise ValueError(f"Difficulty.ops must be a non-empty string over '+-*', got {spec.ops!r}.")


def _question_bucket(question: str) -> int:
  # hash() is salted per process; BLAKE2b is stable across processes, machines and Python versions.
  digest = hashlib.blake2b(question.encode("utf-8"), digest_size=8).digest()
  return int.from_bytes(digest, "little") % _HASH_BUCKETS


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ArithTask:
  """A deterministic family of arithmetic problems with disjoint train / held-out splits (a ``capo_jax.tasks.Task``).

  Attributes:
    seed: selects the train stream and the order of the held-out set (the split itself does not depend on it).
    difficulty: a key of DIFFICULTIES (0 easiest … 4 hardest), or a custom `Difficulty`.
    heldout_fraction: share of the problem space reserved for evaluation, in (0, 1).
    allow_negative: whether intermediate results and answers may be negative (redrawn when not).
    tokenizer_vocab_size: size of the subword tokenizer the task brings (``tokenizer()``).
    wrong_step_fraction: share f ∈ [0, 1) of train problems whose ``solution`` has one wrong step (module
      docstring); 0 keeps every solution correct. ``answer`` and the held-out problems are never corrupted.
    wrong_step_position: which step is wrong in a corrupted solution: ``"any"`` (uniform over the steps), ``"first"``
      (an intermediate result; the error propagates to the answer) or ``"last"`` (the boxed answer's step); used by
      ``wrong_step_kind="offset"``.
    wrong_step_kind: ``"offset"`` or ``"early_box"`` (module docstring).
  """
  seed: int = 0
  difficulty: int | Difficulty = 1
  heldout_fraction: float = 0.1
  allow_negative: bool = False
  tokenizer_vocab_size: int = 1024
  wrong_step_fraction: float = 0.0
  wrong_step_position: str = "any"
  wrong_step_kind: str = "offset"

  def __post_init__(self):
    if not isinstance(self.seed, (int, np.integer)) or isinstance(self.seed, bool) or self.seed < 0:
      raise ValueError(f"seed must be a non-negative int, got {self.seed!r}.")
    if isinstance(self.difficulty, Difficulty):
      _check_difficulty(self.difficulty)
    elif isinstance(self.difficulty, bool) or self.difficulty not in DIFFICULTIES:
      raise ValueError(f"difficulty must be one of {sorted(DIFFICULTIES)} or a Difficulty(...), got "
                       f"{self.difficulty!r}.")
    if not 0.0 < self.heldout_fraction < 1.0:
      raise ValueError(f"heldout_fraction must lie in (0, 1), got {self.heldout_fraction!r}.")
    if (not isinstance(self.tokenizer_vocab_size, (int, np.integer)) or isinstance(self.tokenizer_vocab_size, bool)
        or self.tokenizer_vocab_size < 256):
      raise ValueError(f"tokenizer_vocab_size must be an int ≥ 256, got {self.tokenizer_vocab_size!r}.")
    if (isinstance(self.wrong_step_fraction, bool) or not isinstance(self.wrong_step_fraction, (int, float))
        or not 0.0 <= self.wrong_step_fraction < 1.0):
      raise ValueError(f"wrong_step_fraction must lie in [0, 1) (0: every solution correct), got "
                       f"{self.wrong_step_fraction!r}.")
    if self.wrong_step_position not in WRONG_STEP_POSITIONS:
      raise ValueError(f"wrong_step_position must be one of {WRONG_STEP_POSITIONS}, got {self.wrong_step_position!r}.")
    if self.wrong_step_kind not in WRONG_STEP_KINDS:
      raise ValueError(f"wrong_step_kind must be one of {WRONG_STEP_KINDS}, got {self.wrong_step_kind!r}.")

  @property
  def spec(self) -> Difficulty:
    return self.difficulty if isinstance(self.difficulty, Difficulty) else DIFFICULTIES[self.difficulty]

  def is_heldout(self, question: str) -> bool:
    """Split membership, a function of the question text only: bucket(question) < heldout_fraction · 10⁴."""
    return _question_bucket(question) < round(self.heldout_fraction * _HASH_BUCKETS)

  def _draw(self, rng: np.random.Generator, corrupt: np.random.Generator | None = None) -> ArithProblem | None:
    spec = self.spec
    num_ops = int(rng.integers(spec.min_ops, spec.max_ops + 1))
    ops = [spec.ops[int(k)] for k in rng.integers(0, len(spec.ops), size=num_ops)]
    operands = []
    for position in range(num_ops + 1):
      next_to_mul = (position > 0 and ops[position - 1] == "*") or (position < num_ops and ops[position] == "*")
      low, high = spec.mul_range if next_to_mul else spec.add_range
      operands.append(int(rng.integers(low, high + 1)))
    steps, value = solve_expression(operands, ops)
    if not self.allow_negative and any(step.split("=")[1].startswith("-") for step in steps):
      return None
    expression = " ".join([str(operands[0])] + [f"{op} {x}" for op, x in zip(ops, operands[1:])])
    question = f"What is {expression}?"
    written, boxed = steps, value
    if corrupt is not None:
      written, boxed = self._wrong_solution(operands, ops, corrupt)
    solution = " ".join(f"{step}." for step in written) + f" \\boxed{{{boxed}}}"
    return ArithProblem(expression=expression, question=question, prompt=format_prompt(question),
                        solution=solution, answer=value)

  def _wrong_solution(self, operands: list[int], ops: list[str], rng: np.random.Generator) -> tuple[list[str], int]:
    """Steps and boxed value with one step's result off by ±1 or ±2 (later steps follow from it); offsets that would
    make a written result negative are skipped when ``allow_negative`` is False (none left: the solution stays
    correct)."""
    num_steps = len(ops)
    if self.wrong_step_kind == "early_box":
      steps, value = solve_expression(operands, ops)
      if num_steps < 2:
        return steps, value
      return steps[:-1], int(steps[-2].split("=")[1])
    step = {"first": 0, "last": num_steps - 1}.get(self.wrong_step_position, int(rng.integers(0, num_steps)))
    first = int(rng.integers(0, len(_WRONG_OFFSETS)))
    for offset in _WRONG_OFFSETS[first:] + _WRONG_OFFSETS[:first]:
      steps, value = solve_expression(operands, ops, errors={step: offset})
      if self.allow_negative or not any(s.split("=")[1].startswith("-") for s in steps):
        return steps, value
    return solve_expression(operands, ops)

  def _problem(self, stream: int, index: int) -> ArithProblem:
    want_heldout = stream == _HELDOUT_STREAM
    corrupt = None
    if stream == _TRAIN_STREAM and self.wrong_step_fraction > 0:
      # Its own stream: whether (and how) problem `index` is corrupted does not depend on the problem's draws.
      corrupt = np.random.default_rng([self.seed, _CORRUPTION_STREAM, index])
      if corrupt.random() >= self.wrong_step_fraction:
        corrupt = None
    for attempt in range(_MAX_DRAWS):
      rng = np.random.default_rng([self.seed, stream, index, attempt])
      problem = self._draw(rng, corrupt)
      if problem is not None and self.is_heldout(problem.question) == want_heldout:
        return problem
    raise ValueError(f"no {'held-out' if want_heldout else 'train'} problem found in {_MAX_DRAWS} draws at "
                     f"difficulty {self.difficulty}; change heldout_fraction or set allow_negative=True.")

  def train_problem(self, index: int) -> ArithProblem:
    """Problem `index` of the (infinite) train stream: a pure function of (seed, difficulty, index)."""
    if index < 0:
      raise ValueError(f"index must be >= 0, got {index}.")
    return self._problem(_TRAIN_STREAM, int(index))

  def batch(self, step: int, num_prompts: int) -> list[ArithProblem]:
    """Train problems [step·num_prompts, (step+1)·num_prompts): the prompts of RL step `step`.

    Only the integer `step` needs checkpointing: a resumed run calling batch(step, P) gets the same problems.
    """
    if not isinstance(step, (int, np.integer)) or step < 0:
      raise ValueError(f"step must be a non-negative int, got {step!r}.")
    if not isinstance(num_prompts, (int, np.integer)) or num_prompts < 1:
      raise ValueError(f"num_prompts must be a positive int, got {num_prompts!r}.")
    start = int(step) * int(num_prompts)
    return [self.train_problem(start + k) for k in range(int(num_prompts))]

  def train_problems(self, start: int, count: int) -> list[ArithProblem]:
    """`count` consecutive train problems from index `start` (e.g. for the supervised warm start)."""
    return [self.train_problem(start + k) for k in range(count)]

  def heldout(self, num_problems: int) -> list[ArithProblem]:
    """The first `num_problems` distinct held-out problems (the evaluation set), in a seed-determined order."""
    if not isinstance(num_problems, (int, np.integer)) or num_problems < 1:
      raise ValueError(f"num_problems must be a positive int, got {num_problems!r}.")
    problems: list[ArithProblem] = []
    seen: set[str] = set()
    index = misses = 0
    while len(problems) < num_problems:
      problem = self._problem(_HELDOUT_STREAM, index)
      index += 1
      if problem.question in seen:
        misses += 1
        # Only a nearly exhausted split repeats this often in a row (coupon collector: ~n ln n draws in total).
        if misses > 1000 + 10 * len(problems):
          raise ValueError(f"the held-out split of this difficulty has fewer than {num_problems} distinct problems "
                           f"(found {len(problems)}); ask for fewer, raise heldout_fraction or use a harder level.")
        continue
      misses = 0
      seen.add(problem.question)
      problems.append(problem)
    return problems

  @staticmethod
  def reward(completion: str, problem: ArithProblem) -> float:
    """1.0 iff the completion's last `\\boxed{}` holds exactly problem.answer (see rewards.integer_reward)."""
    return integer_reward(completion, problem.answer)

  # The Task interface (capo_jax.tasks.base.Task).

  def eval_problems(self, count: int) -> list[ArithProblem]:
    """The held-out set: ``heldout(count)``."""
    return self.heldout(count)

  def score(self, completions: Sequence[str], problems: Sequence[ArithProblem]) -> np.ndarray:
    """``float32`` rewards: 1.0 iff the last `\\boxed{}` of ``completions[i]`` holds ``problems[i].answer``."""
    if len(completions) != len(problems):
      raise ValueError(f"score got {len(completions)} completions for {len(problems)} problems.")
    return np.asarray([integer_reward(c, p.answer) for c, p in zip(completions, problems)], np.float32)

  def tokenizer(self):
    """The task's subword BPE tokenizer (``build_arith_tokenizer(vocab_size=tokenizer_vocab_size)``)."""
    from capo_jax.tasks.tokenizer import build_arith_tokenizer  # pylint: disable=g-import-not-at-top
    return build_arith_tokenizer(vocab_size=self.tokenizer_vocab_size)
