"""``DatasetTask``: a Task (capo_jax.tasks.base) over local data files — MATH, MATH500, GSM8K, DeepScaleR, DeepMath.

Configured from gin, e.g.

  TrainConfig.task = @DatasetTask()
  DatasetTask.train_files = "/data/math/train-*.parquet"
  DatasetTask.eval_files = "/data/math500/test.jsonl"
  DatasetTask.max_prompt_tokens = 512

Loading. Each file (a glob expands to its sorted matches; a TFDS folder is read with ``train_split``/``eval_split``)
is read by ``capo_jax.data.readers`` and mapped record by record to ``Problem`` by ``capo_jax.data.schemas`` (schema
detected per file from its keys, or ``schema`` for all). Files are concatenated in the order given. Everything is
read and checked once, at construction: a missing file, an empty file, an unknown schema or a bad record is one
``DataError`` naming the file (and record) and the fix. Training problems whose question (whitespace-normalised) is
also in the eval set are dropped (``drop_eval_overlap``; count in ``train_dropped_overlap``), so the held-out set
never appears in the training stream.

The training stream. With N kept training problems, global position g ≥ 0 is problem perm_e[g mod N] of epoch
e = ⌊g / N⌋, where perm_e = ``epoch_permutation(seed, e, N)`` is a permutation fixed by (seed, e) alone (a SplitMix64
hash of (seed, e, index) sorted, so it is the same on every machine and numpy version). The stream is infinite;
every problem appears exactly once per epoch, and epochs are shuffled independently.

Processes. Process i of n takes the global positions g = p·n + i for its local positions p = 0, 1, 2, …, so
``train_problems(position, count)`` on process i returns global positions {(position + k)·n + i : 0 ≤ k < count}.
When every process asks for the same (position = s·c, count = c) at step s, their union is exactly the global
positions [s·c·n, (s+1)·c·n): the batch of size c·n that a single process (n = 1) gets at step s. Resuming needs only
the integer ``position``: ``train_problems`` is a pure function of (files, seed, n, i, tokenizer, max_prompt_tokens,
position, count). ``eval_problems`` is not sharded: every process sees the whole eval set, in file order.

Prompts and the tokenizer. The task is built without a tokenizer (gin cannot hold one; the trainer loads it from the
model folder), and then made prompt-ready with ``task.with_tokenizer(tokenizer)``: a copy of the task (same loaded
records, nothing re-read) whose prompts go through the tokenizer's chat template, when it has one
(``capo_jax.data.prompts.build_prompt``: ``SYSTEM_PROMPT`` as the system message, the question as the user message),
else the plain ``f"{question}\\n{instruction}\\n"``. The trainer calls ``with_tokenizer`` when a task has it. Before
that, prompts are in the plain format. ``prompt_tokenizer=`` at construction does the same in one step.

Length filtering. With a tokenizer and ``max_prompt_tokens``, problems whose prompt encodes (special tokens included,
as the trainer encodes prompts) to more than ``max_prompt_tokens`` tokens are dropped, train and eval alike; the
counts are ``train_dropped_too_long`` / ``eval_dropped_too_long`` and one log line. The stream is over the kept
problems, so a resumed run must use the same tokenizer and limit.

Reward: ``score`` is ``capo_jax.rewards.math_reward(completions, [p.answer for p in problems])``, with a
``MathVerifyPool`` (per-check limit ``reward_timeout_s``) started on the first call and reused; ``close()`` stops it
(garbage collection does too).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from collections.abc import Sequence
from typing import Any

import gin
import numpy as np

from capo_jax.data.prompts import SYSTEM_PROMPT, build_prompt, prompt_lengths
from capo_jax.data.readers import FORMATS, DataError, expand_paths, read_records
from capo_jax.data.schemas import SCHEMAS, ProblemFields, records_to_fields
from capo_jax.rewards import MathVerifyPool, math_reward
from capo_jax.tasks.base import Problem

__all__ = ["DatasetTask", "epoch_permutation"]

_LOG = logging.getLogger(__name__)
_UINT64 = np.uint64
_CACHED_EPOCHS = 4  # permutations kept per task; a batch spans at most two epochs unless it is longer than one.


def _splitmix64(x_n: np.ndarray) -> np.ndarray:
  """SplitMix64's output function on uint64 arrays (wrapping arithmetic)."""
  x_n = x_n + _UINT64(0x9E3779B97F4A7C15)
  x_n = (x_n ^ (x_n >> _UINT64(30))) * _UINT64(0xBF58476D1CE4E5B9)
  x_n = (x_n ^ (x_n >> _UINT64(27))) * _UINT64(0x94D049BB133111EB)
  return x_n ^ (x_n >> _UINT64(31))


def epoch_permutation(seed: int, epoch: int, size: int) -> np.ndarray:
  """``int64 [size]``: the order of epoch ``epoch``, a permutation of 0..size-1 fixed by (seed, epoch).

  perm = argsort_k h(k), h(k) = SplitMix64(base + k), base = SplitMix64(SplitMix64(seed) + epoch) (uint64,
  wrapping; ties, which need a 64-bit collision, keep index order). Pure integer arithmetic: the same on every
  platform and numpy version, so a resumed run sees the same order.
  """
  for name, value in (("seed", seed), ("epoch", epoch), ("size", size)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value < 2**63:
      raise ValueError(f"epoch_permutation: {name} must be an int in [0, 2**63), got {value!r}.")
  base_1 = _splitmix64(_splitmix64(np.array([seed], _UINT64)) + _UINT64(epoch))
  keys_n = _splitmix64(base_1 + np.arange(size, dtype=_UINT64))
  return np.argsort(keys_n, kind="stable").astype(np.int64)


def _as_paths(name: str, files: Any) -> tuple[str, ...]:
  if isinstance(files, (str, os.PathLike)):
    files = (files,)
  if not isinstance(files, Sequence) or not files or not all(isinstance(f, (str, os.PathLike)) for f in files):
    raise ValueError(f"DatasetTask.{name} must be a path or a non-empty list of paths (globs allowed), got {files!r}.")
  return tuple(os.fspath(f) for f in files)


def _question_key(question: str) -> str:
  return " ".join(question.split())


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DatasetTask:
  """A Task over local data files; see the module docstring for the stream, sharding, prompts and filtering.

  Attributes:
    train_files: training file(s): paths or globs (``.jsonl``, ``.json``, ``.parquet``, a prepared TFDS folder).
    eval_files: held-out file(s), same forms.
    file_format: one of ``readers.FORMATS`` for every file, or None to infer each from its path.
    train_split, eval_split: the TFDS splits read from TFDS folders (slicing allowed: ``"train[:90%]"``).
    schema: a key of ``schemas.SCHEMAS`` for every file, or None to detect each file's from its keys.
    seed: the shuffling seed (epoch permutations depend on (seed, epoch) only).
    num_processes, process_index: this process's shard of the stream; None means ``jax.process_count()`` /
      ``jax.process_index()``, read at construction.
    instruction: the instruction (system prompt) added to every question.
    system_role: with a chat template, put the instruction in a system message (else after the question).
    max_prompt_tokens: drop problems whose prompt is longer (in tokens; needs a tokenizer), or None to keep all.
    drop_eval_overlap: drop training problems whose question is also an eval question.
    reward_timeout_s: the reward's per-check limit in seconds (a check past it scores 0).
    prompt_tokenizer: the tokenizer prompts are built and measured with (usually set by ``with_tokenizer``).

  After construction: ``num_train`` / ``num_eval`` (kept problems), ``train_schemas`` / ``eval_schemas`` (the schema
  of each file), ``train_dropped_overlap``, ``train_dropped_too_long``, ``eval_dropped_too_long``.
  """
  train_files: str | Sequence[str]
  eval_files: str | Sequence[str]
  file_format: str | None = None
  train_split: str = "train"
  eval_split: str = "test"
  schema: str | None = None
  seed: int = 0
  num_processes: int | None = None
  process_index: int | None = None
  instruction: str = SYSTEM_PROMPT
  system_role: bool = True
  max_prompt_tokens: int | None = None
  drop_eval_overlap: bool = True
  reward_timeout_s: float = 5.0
  prompt_tokenizer: Any = dataclasses.field(default=None, repr=False, compare=False)

  def __post_init__(self):
    set_field = lambda name, value: object.__setattr__(self, name, value)  # frozen: only __post_init__ writes.
    set_field("train_files", _as_paths("train_files", self.train_files))
    set_field("eval_files", _as_paths("eval_files", self.eval_files))
    if self.file_format is not None and self.file_format not in FORMATS:
      raise ValueError(f"DatasetTask.file_format must be one of {FORMATS} or None (infer from the path), got "
                       f"{self.file_format!r}.")
    if self.schema is not None and self.schema not in SCHEMAS:
      raise ValueError(f"DatasetTask.schema must be one of {sorted(SCHEMAS)} or None (detect), got {self.schema!r}.")
    if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or not 0 <= self.seed < 2**63:
      raise ValueError(f"DatasetTask.seed must be an int in [0, 2**63), got {self.seed!r}.")
    if self.max_prompt_tokens is not None and (isinstance(self.max_prompt_tokens, bool) or not isinstance(
        self.max_prompt_tokens, (int, np.integer)) or self.max_prompt_tokens < 1):
      raise ValueError(f"DatasetTask.max_prompt_tokens must be a positive int or None, got {self.max_prompt_tokens!r}.")
    if isinstance(self.reward_timeout_s, bool) or not isinstance(self.reward_timeout_s, (int, float)) or \
        not self.reward_timeout_s > 0:
      raise ValueError(f"DatasetTask.reward_timeout_s must be a positive number, got {self.reward_timeout_s!r}.")
    if self.num_processes is None or self.process_index is None:
      import jax  # pylint: disable=import-outside-toplevel

      if self.num_processes is None:
        set_field("num_processes", jax.process_count())
      if self.process_index is None:
        set_field("process_index", jax.process_index())
    if isinstance(self.num_processes, bool) or not isinstance(self.num_processes, (int, np.integer)) or \
        self.num_processes < 1:
      raise ValueError(f"DatasetTask.num_processes must be a positive int, got {self.num_processes!r}.")
    if isinstance(self.process_index, bool) or not isinstance(self.process_index, (int, np.integer)) or \
        not 0 <= self.process_index < self.num_processes:
      raise ValueError(f"DatasetTask.process_index must be an int in [0, num_processes={self.num_processes}), got "
                       f"{self.process_index!r}.")

    train_schemas, train_fields = self._load(self.train_files, self.train_split)
    eval_schemas, eval_fields = self._load(self.eval_files, self.eval_split)
    dropped_overlap = 0
    if self.drop_eval_overlap:
      eval_questions = {_question_key(f.question) for f in eval_fields}
      kept = [f for f in train_fields if _question_key(f.question) not in eval_questions]
      dropped_overlap = len(train_fields) - len(kept)
      train_fields = kept
      if not train_fields:
        raise DataError(f"data: every training problem of {', '.join(self.train_files)} is also in the eval set "
                        f"{', '.join(self.eval_files)}; use disjoint files, or set drop_eval_overlap=False.")
    set_field("train_schemas", train_schemas)
    set_field("eval_schemas", eval_schemas)
    set_field("train_dropped_overlap", dropped_overlap)
    set_field("_train_fields", tuple(train_fields))
    set_field("_eval_fields", tuple(eval_fields))
    set_field("_pool", None)
    self._build_problems()

  def _load(self, files: tuple[str, ...], split: str) -> tuple[tuple[str, ...], list[ProblemFields]]:
    schemas: list[str] = []
    fields: list[ProblemFields] = []
    for path in expand_paths(files):
      schema, file_fields = records_to_fields(read_records(path, self.file_format, split=split), self.schema)
      schemas.append(schema)
      fields.extend(file_fields)
    return tuple(schemas), fields

  def _problems(self, fields: Sequence[ProblemFields]) -> list[Problem]:
    return [Problem(prompt=build_prompt(f.question, self.prompt_tokenizer, instruction=self.instruction,
                                        system_role=self.system_role),
                    answer=f.answer, solution=f.solution, metadata=f.metadata) for f in fields]

  def _keep_short(self, problems: list[Problem], files: tuple[str, ...]) -> tuple[list[Problem], int]:
    if self.prompt_tokenizer is None or self.max_prompt_tokens is None:
      return problems, 0
    lengths_n = prompt_lengths(self.prompt_tokenizer, [p.prompt for p in problems])
    kept = [p for p, length in zip(problems, lengths_n) if length <= self.max_prompt_tokens]
    if not kept:
      raise DataError(f"data: every prompt of {', '.join(files)} is longer than max_prompt_tokens="
                      f"{self.max_prompt_tokens} tokens (shortest {int(lengths_n.min())}); raise max_prompt_tokens.")
    return kept, len(problems) - len(kept)

  def _build_problems(self) -> None:
    """Prompts for the loaded fields with the current tokenizer, then the length filter; resets the order cache."""
    train, train_dropped = self._keep_short(self._problems(self._train_fields), self.train_files)
    evals, eval_dropped = self._keep_short(self._problems(self._eval_fields), self.eval_files)
    object.__setattr__(self, "_train", tuple(train))
    object.__setattr__(self, "_eval", tuple(evals))
    object.__setattr__(self, "train_dropped_too_long", train_dropped)
    object.__setattr__(self, "eval_dropped_too_long", eval_dropped)
    object.__setattr__(self, "_permutations", {})
    if self.prompt_tokenizer is not None and self.max_prompt_tokens is not None:
      _LOG.info("DatasetTask: kept %d train and %d eval problems; dropped %d train and %d eval prompts longer than "
                "max_prompt_tokens=%d.", len(train), len(evals), train_dropped, eval_dropped, self.max_prompt_tokens)

  def with_tokenizer(self, tokenizer) -> "DatasetTask":
    """A copy whose prompts use ``tokenizer``'s chat template (if any) and whose length filter uses its token counts.

    The loaded records are shared, not re-read. ``tokenizer`` is a transformers tokenizer (e.g.
    ``capo_jax.tokenization.load_tokenizer(model_folder)``), or None for plain prompts and no length filter.
    """
    task = copy.copy(self)
    object.__setattr__(task, "prompt_tokenizer", tokenizer)
    object.__setattr__(task, "_pool", None)  # each task starts and owns its own reward workers
    task._build_problems()  # pylint: disable=protected-access
    return task

  @property
  def num_train(self) -> int:
    """N: the training problems in the stream (after the overlap and length filters)."""
    return len(self._train)

  @property
  def num_eval(self) -> int:
    """The held-out problems (after the length filter)."""
    return len(self._eval)

  def _permutation(self, epoch: int) -> np.ndarray:
    cache = self._permutations
    if epoch not in cache:
      if len(cache) >= _CACHED_EPOCHS:
        cache.pop(next(iter(cache)))
      cache[epoch] = epoch_permutation(int(self.seed), epoch, self.num_train)
    return cache[epoch]

  def global_positions(self, position: int, count: int) -> np.ndarray:
    """``int64 [count]``: the global stream positions (position + k)·n + i behind this process's local positions."""
    for name, value in (("position", position), ("count", count)):
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"DatasetTask: {name} must be a non-negative int, got {value!r}.")
    local_k = np.arange(int(position), int(position) + int(count), dtype=np.int64)
    return local_k * int(self.num_processes) + int(self.process_index)

  def train_problems(self, position: int, count: int) -> list[Problem]:
    """This process's problems at local positions [position, position + count); a pure function of its arguments.

    Global position g is problem perm_e[g mod N] of epoch e = ⌊g / N⌋ (module docstring).
    """
    problems = []
    for g in self.global_positions(position, count).tolist():
      epoch, offset = divmod(g, self.num_train)
      problems.append(self._train[int(self._permutation(epoch)[offset])])
    return problems

  def eval_problems(self, count: int) -> list[Problem]:
    """The first ``count`` held-out problems in file order (all of them when the set is smaller)."""
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
      raise ValueError(f"DatasetTask.eval_problems: count must be a positive int, got {count!r}.")
    return list(self._eval[:int(count)])

  def score(self, completions: Sequence[str], problems: Sequence[Any]) -> np.ndarray:
    """``float32 [B]``: rewards_b[i] = 1 iff the final answer of completions[i] (its last ``\\boxed{}``) is equivalent
    to problems[i].answer, else 0 (``capo_jax.rewards.math_reward``); never raises on completion text."""
    if isinstance(completions, str):
      raise TypeError("DatasetTask.score takes a sequence of completions (one per problem), not one string.")
    if len(completions) != len(problems):
      raise ValueError(f"DatasetTask.score got {len(completions)} completions but {len(problems)} problems; repeat "
                       "each problem once per sample so they align row by row.")
    if not completions:
      return np.zeros(0, dtype=np.float32)
    if self._pool is None:
      object.__setattr__(self, "_pool", MathVerifyPool(timeout_s=float(self.reward_timeout_s)))
    return math_reward(list(completions), [p.answer for p in problems], pool=self._pool)

  def close(self) -> None:
    """Stops the reward's worker processes (if started); a later ``score`` starts new ones."""
    pool = self._pool
    object.__setattr__(self, "_pool", None)
    if pool is not None:
      pool.close()
