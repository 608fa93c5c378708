"""Symbolic answer checking with HF `math_verify`, isolated in a worker process.

`math_verify` bounds its own run time with `signal.alarm`, which only works in a process's main thread and cannot
interrupt a sympy computation stuck in C. So checks run in a `ProcessPoolExecutor` worker (a `spawn` or
`forkserver` context: never `fork` a process holding a JAX runtime). The parent waits at most `timeout_s` per
check; past that, or if the worker dies, the check scores 0, the worker is killed and a fresh one is started on
the next call. A bad completion can cost one timeout, never a hung trainer.

Typical use from the host loop:

  with MathVerifyPool(timeout_s=5.0) as pool:
    rewards_b = pool.score(completions, golds)   # float32 [B] in {0, 1}
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures.process import BrokenProcessPool
from typing import Literal

import numpy as np

from capo_jax.rewards.boxed import extract_boxed

__all__ = ["MathVerifyPool", "math_verify_reward", "math_verify_rewards", "verify_with_math_verify"]

VerifyFn = Callable[[str, str], float]


def verify_with_math_verify(prediction: str, gold: str) -> float:
  """1.0 iff `math_verify` finds `prediction` equivalent to `gold`; runs inside the worker process.

  Both sides go through `math_verify.parse` and `math_verify.verify` (numeric and symbolic equivalence, e.g.
  `\\frac{1}{2}` ≡ `0.5`). A gold without `$` or `\\boxed` is read as one LaTeX expression (`\\boxed{gold}`):
  math_verify's plain-text extraction would read '2(x+1)' as its first number, 2. math_verify's own signal timeouts
  are disabled: the pool's process-level timeout is the one that holds. Parse or verify errors score 0.
  """
  import math_verify  # Imported here so the parent process never pays for sympy.

  try:
    gold_is_marked = "$" in gold or "\\boxed" in gold
    gold_parsed = math_verify.parse(gold if gold_is_marked else f"\\boxed{{{gold}}}", parsing_timeout=None)
    if not gold_parsed and not gold_is_marked:
      gold_parsed = math_verify.parse(gold, parsing_timeout=None)
    pred_parsed = math_verify.parse(prediction, parsing_timeout=None)
    if not gold_parsed or not pred_parsed:
      return 0.0
    return 1.0 if math_verify.verify(gold_parsed, pred_parsed, timeout_seconds=None) else 0.0
  except Exception:  # noqa: BLE001 — any failure inside the grader is a wrong answer, never a crash.
    return 0.0


def _warm_up_worker() -> bool:
  """Worker initializer: imports math_verify (and sympy) before any check is timed; silences its timeout warning."""
  import logging

  import math_verify  # noqa: F401

  logging.getLogger("math_verify").setLevel(logging.ERROR)
  return True


class MathVerifyPool:
  """A reusable worker pool that scores completions against gold answers with a hard per-check timeout.

  Contract per check: score = verify_fn(prediction, gold) ∈ {0, 1}, where prediction is `\\boxed{c}` with c the
  content of the completion's last box (`require_box=True`, the default; no box scores 0 without a worker call) or
  the whole completion (`require_box=False`, math_verify's own extraction). A check that takes longer than
  `timeout_s` wall seconds, raises, or kills its worker scores 0.

  Timing: with one worker (the default) checks run in submission order and each gets exactly `timeout_s` from the
  moment the previous one finished; with several workers the clock of a queued check starts when an earlier one
  finishes, which only ever grants more time. Worker start-up (a fresh interpreter importing sympy, ~1–3 s) is
  paid once per (re)start and is not charged to any check.

  Args:
    timeout_s: wall-clock limit for one check, > 0.
    max_workers: worker processes.
    mp_context: 'spawn' or 'forkserver' ('fork' would copy a live JAX runtime into the child).
    require_box: whether only the last `\\boxed{}` of a completion is graded.
    verify_fn: the check run in the worker, `(prediction, gold) -> float`; must be picklable (a module-level
      function). Default `verify_with_math_verify`.
    startup_timeout_s: limit for starting a worker and importing math_verify.
  """

  def __init__(self, *, timeout_s: float = 5.0, max_workers: int = 1,
               mp_context: Literal["spawn", "forkserver"] = "spawn", require_box: bool = True,
               verify_fn: VerifyFn = verify_with_math_verify, startup_timeout_s: float = 120.0):
    if not isinstance(timeout_s, (int, float)) or isinstance(timeout_s, bool) or not timeout_s > 0:
      raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}.")
    if not isinstance(max_workers, int) or isinstance(max_workers, bool) or max_workers < 1:
      raise ValueError(f"max_workers must be a positive int, got {max_workers!r}.")
    if mp_context not in ("spawn", "forkserver"):
      raise ValueError(f"mp_context must be 'spawn' or 'forkserver', got {mp_context!r}; 'fork' is unsafe once JAX "
                       "has started threads.")
    if not callable(verify_fn):
      raise TypeError(f"verify_fn must be a callable (prediction, gold) -> float, got {verify_fn!r}.")
    self.timeout_s = float(timeout_s)
    self.max_workers = max_workers
    self.require_box = require_box
    self._mp_context = mp_context
    self._verify_fn = verify_fn
    self._startup_timeout_s = float(startup_timeout_s)
    self._executor: concurrent.futures.ProcessPoolExecutor | None = None
    self._closed = False
    self.num_timeouts = 0  # Checks that hit the timeout or crashed a worker since construction.
    self.num_restarts = 0  # Worker (re)starts, including the first.

  # -- lifecycle ---------------------------------------------------------------------------------------------------

  def _ensure_executor(self) -> concurrent.futures.ProcessPoolExecutor:
    if self._closed:
      raise RuntimeError("MathVerifyPool is closed; create a new one.")
    if self._executor is None:
      executor = concurrent.futures.ProcessPoolExecutor(
          max_workers=self.max_workers, mp_context=multiprocessing.get_context(self._mp_context),
          initializer=_warm_up_worker)
      self._executor = executor
      self.num_restarts += 1
      try:
        # One warm-up job per worker makes the executor start them all now, so no check's clock includes start-up.
        warm_ups = [executor.submit(_warm_up_worker) for _ in range(self.max_workers)]
        for warm_up in warm_ups:
          warm_up.result(timeout=self._startup_timeout_s)
      except Exception as e:
        self._kill_executor()
        raise RuntimeError(f"MathVerifyPool could not start a '{self._mp_context}' worker importing math_verify "
                           f"within {self._startup_timeout_s:.0f}s: {e!r}. Check `pip install math-verify`.") from e
    return self._executor

  def _kill_executor(self) -> None:
    """Hard-stops every worker (a stuck sympy call ignores polite shutdown) and drops the executor."""
    executor, self._executor = self._executor, None
    if executor is None:
      return
    # ProcessPoolExecutor has no public per-worker kill before Python 3.14 (`terminate_workers`).
    processes = list((getattr(executor, "_processes", None) or {}).values())
    for process in processes:
      if process.is_alive():
        process.kill()
    executor.shutdown(wait=False, cancel_futures=True)
    for process in processes:
      process.join(timeout=5.0)

  def close(self) -> None:
    """Stops the workers. Idempotent; the pool cannot be used afterwards."""
    if self._executor is not None:
      executor = self._executor
      processes = list((getattr(executor, "_processes", None) or {}).values())
      executor.shutdown(wait=False, cancel_futures=True)
      for process in processes:
        process.join(timeout=5.0)
      self._executor = None
      self._kill_leftovers(processes)
    self._closed = True

  @staticmethod
  def _kill_leftovers(processes) -> None:
    for process in processes:
      if process.is_alive():
        process.kill()
        process.join(timeout=5.0)

  def __enter__(self) -> "MathVerifyPool":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  # -- scoring -----------------------------------------------------------------------------------------------------

  def _prediction(self, completion: str) -> str | None:
    if not self.require_box:
      return completion
    content = extract_boxed(completion)
    return None if content is None else f"\\boxed{{{content}}}"

  def score(self, completions: Sequence[str], golds: Sequence[str]) -> np.ndarray:
    """Scores a batch: rewards_b[i] = check(completions[i], golds[i]) ∈ {0, 1}, 0 on timeout or crash.

    Args:
      completions: B decoded completions.
      golds: B gold answers as strings (LaTeX or plain, e.g. '0.5', '\\frac{1}{2}', '73').

    Returns:
      rewards_b: float32 array of shape [B].
    """
    if isinstance(completions, str) or isinstance(golds, str):
      raise TypeError("MathVerifyPool.score takes sequences of completions and golds; use math_verify_reward for one.")
    if len(completions) != len(golds):
      raise ValueError(f"MathVerifyPool.score got {len(completions)} completions but {len(golds)} golds; align them "
                       "row by row (repeat each prompt's gold once per sample).")
    for gold in golds:
      if not isinstance(gold, str):
        raise TypeError(f"gold answers must be strings (e.g. '0.5' or '\\\\frac{{1}}{{2}}'), got {gold!r}.")
    rewards_b = np.zeros(len(completions), dtype=np.float32)
    predictions = {i: self._prediction(c) for i, c in enumerate(completions)}
    todo = [i for i, prediction in predictions.items() if prediction is not None]  # No box: 0 without a worker.

    while todo:  # Each round finalises at least one check, so this ends within len(todo) rounds.
      executor = self._ensure_executor()
      futures = [(i, executor.submit(self._verify_fn, predictions[i], golds[i])) for i in todo]
      todo = []
      for k, (i, future) in enumerate(futures):
        try:
          rewards_b[i] = float(future.result(timeout=self.timeout_s))
          continue
        except (concurrent.futures.TimeoutError, BrokenProcessPool):
          # Stuck in this check, or its worker died (with one worker the running check is this one): charge it
          # 0, keep what later checks already finished, restart the workers and resubmit the rest.
          pass
        except Exception:  # noqa: BLE001 — a raising verify_fn scores 0 and keeps the pool.
          rewards_b[i] = 0.0
          continue
        self.num_timeouts += 1
        rewards_b[i] = 0.0
        for j, later in futures[k + 1:]:
          if later.done() and not later.cancelled() and later.exception() is None:
            rewards_b[j] = float(later.result())
          else:
            todo.append(j)
        self._kill_executor()
        break
    return rewards_b


def math_verify_rewards(completions: Sequence[str], golds: Sequence[str], *, pool: MathVerifyPool) -> np.ndarray:
  """Batched `math_verify_reward` through an existing pool (see `MathVerifyPool.score`)."""
  return pool.score(completions, golds)


def math_verify_reward(completion: str, gold: str, *, timeout_s: float = 5.0,
                       pool: MathVerifyPool | None = None) -> float:
  """1.0 iff the completion's last boxed answer is mathematically equivalent to `gold` under math_verify, else 0.0.

  E.g. `\\boxed{\\frac{1}{2}}` vs gold '0.5' → 1.0; vs '1/3' → 0.0. A check slower than `timeout_s` scores 0.

  Args:
    completion: a decoded completion.
    gold: the gold answer as a string.
    timeout_s: per-check wall-clock limit; ignored when `pool` is given (the pool's own limit holds).
    pool: a `MathVerifyPool` to reuse. Without one a temporary pool is started and closed (seconds of start-up),
      so the training loop should always pass one.
  """
  if not isinstance(completion, str):
    raise TypeError(f"completion must be a decoded str, got {type(completion).__name__}.")
  if pool is not None:
    return float(pool.score([completion], [gold])[0])
  with MathVerifyPool(timeout_s=timeout_s) as temporary:
    return float(temporary.score([completion], [gold])[0])
