"""The Task interface: what the trainer, the warm start and the evaluator need from a workload.

A task is three things:

- a deterministic, resumable stream of training problems: ``train_problems(position, count)`` is a pure function of
  the integer ``position`` (the number of problems consumed so far), so a checkpoint that stores the position resumes
  on exactly the same prompts;
- a held-out evaluation set: ``eval_problems(count)``;
- a reward on completion text: ``score(completions, problems) -> float32 [len(completions)]``, batch in, floats out.
  It never raises on model output.

A problem is any record with a ``prompt`` (the text the policy is conditioned on), an ``answer`` (the reference)
and, where the source has one, a worked ``solution`` (used by supervised warm starts). ``metadata`` (level, subject,
…) feeds per-group breakdowns of the evaluation. ``Problem`` below is the standard record; tasks may use their own
with the same attributes.

A task may also bring its own tokenizer (``tokenizer()``, e.g. the embedded arithmetic task's small BPE); without one,
the tokenizer comes from the model folder. The trainer imports no concrete task: a task is built from gin, e.g.

    TrainConfig.task = @ArithTask()
    ArithTask.difficulty = 0
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np


@dataclasses.dataclass(frozen=True)
class Problem:
  """One task record.

  Attributes:
    prompt: the text the policy is conditioned on (instruction and question; chat templates are applied by the task).
    answer: the reference final answer, as text (``"73"``, ``"\\frac{1}{2}"``).
    solution: a worked solution ending in ``\\boxed{answer}``, or ``""`` when the source has none.
    metadata: free-form string fields (``level``, ``subject``, ``source``, …) for evaluation breakdowns.
  """
  prompt: str
  answer: str
  solution: str = ""
  metadata: Mapping[str, str] = dataclasses.field(default_factory=dict)


class ProblemLike(Protocol):
  prompt: str
  answer: Any
  solution: str


@runtime_checkable
class Task(Protocol):
  """See the module docstring."""

  def train_problems(self, position: int, count: int) -> Sequence[ProblemLike]:
    """Problems ``[position, position + count)`` of the training stream; a pure function of its arguments."""
    ...

  def eval_problems(self, count: int) -> Sequence[ProblemLike]:
    """The first ``count`` problems of the held-out set (never in the training stream)."""
    ...

  def score(self, completions: Sequence[str], problems: Sequence[ProblemLike]) -> np.ndarray:
    """``float32 [len(completions)]`` rewards of ``completions[i]`` against ``problems[i]``; never raises on text."""
    ...


def check_task(task: Any) -> Task:
  """Returns ``task`` if it implements ``Task``; else raises ``TypeError`` naming the missing methods."""
  missing = [name for name in ("train_problems", "eval_problems", "score") if not callable(getattr(task, name, None))]
  if missing:
    raise TypeError(f"{type(task).__name__} is not a Task: it lacks {', '.join(missing)} "
                    "(see capo_jax.tasks.base.Task).")
  return task


def task_tokenizer(task: Any):
  """The task's own tokenizer (``task.tokenizer()``), or None when the task brings none."""
  factory = getattr(task, "tokenizer", None)
  return factory() if callable(factory) else None


def problem_metadata(problem: Any) -> Mapping[str, str]:
  """A problem's ``metadata`` mapping (empty when it has none)."""
  return getattr(problem, "metadata", None) or {}
