"""Symbolic answer checking with HF `math_verify`, isolated in worker processes with a hard per-check timeout.

`math_verify` bounds its own run time with `signal.alarm`, which cannot interrupt a sympy computation stuck in C,
and a pathological answer (`10^{10^{10^{10}}}`, a thousand nested braces) can also exhaust memory or kill the
interpreter. So every check runs in a worker: a fresh interpreter running `capo_jax/rewards/math_verify_worker.py`
(started with `subprocess`, i.e. fork+exec, so it never inherits a JAX runtime and never imports jax or the trainer's
`__main__`). The parent owns each worker directly: it hands one check at a time to each over a connection and waits at
most `timeout_s` for the answer. A worker that overruns is killed (SIGKILL), one that dies is noticed when its
connection closes; either way only that worker is replaced, its check scores 0 with the reason `timeout` or
`worker_died`, and the other workers keep going. Worker start-up (importing sympy) is never charged to a check.

Typical use from the host loop (see `capo_jax.rewards.math_reward` for the full reward):

  with MathVerifyPool(timeout_s=5.0, max_workers=4) as pool:
    result = pool.check(["\\\\frac{1}{2}", "3"], ["0.5", "4"])   # result.scores == [1, 0]
"""

from __future__ import annotations

import collections
import dataclasses
import multiprocessing.connection
import pickle
import socket
import subprocess
import sys
import time
import weakref
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

from capo_jax.rewards import math_verify_worker
from capo_jax.rewards.math_verify_worker import verify_with_math_verify

__all__ = ["CheckResult", "MathVerifyPool", "verify_with_math_verify"]

VerifyFn = Callable[[str, str], float]

# Reasons a check ends with; a pool check always ends with exactly one.
VERIFIED, MISMATCH, PARSE_ERROR, TIMEOUT, WORKER_DIED = "verified", "mismatch", "parse_error", "timeout", "worker_died"


class CheckResult(NamedTuple):
  """Outcome of `MathVerifyPool.check` for N answer pairs.

  Attributes:
    scores: float32 [N] in {0, 1}.
    reasons: N strings, each one of 'verified', 'mismatch', 'parse_error' (the checker raised, e.g. an unparsable
      side), 'timeout' (killed after `timeout_s`), 'worker_died' (the worker process ended mid-check).
  """
  scores: np.ndarray
  reasons: tuple[str, ...]


@dataclasses.dataclass
class _Worker:
  process: subprocess.Popen
  conn: multiprocessing.connection.Connection
  started_at: float
  ready: bool = False
  item: int | None = None  # Index of the check in flight, if any.
  deadline: float = float("inf")

  def stop(self) -> None:
    """SIGKILLs the process (a stuck sympy call ignores anything politer) and reaps it."""
    if self.process.poll() is None:
      self.process.kill()
    try:
      self.process.wait(timeout=5.0)
    except subprocess.TimeoutExpired:
      pass
    self.conn.close()


def _stop_workers(workers: list) -> None:
  """Stops every worker in `workers` (the pool's finalizer: runs on `close`, on garbage collection and at exit)."""
  for slot, worker in enumerate(workers):
    if worker is not None:
      workers[slot] = None
      worker.stop()


class MathVerifyPool:
  """Worker processes that check answer equivalence with a hard per-check timeout; restarts only what breaks.

  Contract per check i: scores[i] = verify_fn(predictions[i], golds[i]) ∈ {0, 1} when it returns within `timeout_s`
  wall seconds of being handed to a worker; otherwise 0 with the reason in `CheckResult.reasons`. Checks are spread
  over `max_workers` workers in submission order. A worker that times out is killed (SIGKILL) and replaced; one that
  dies is replaced; either way the other workers' checks continue undisturbed. A check never starts on a worker that
  is still starting, so start-up (a fresh interpreter importing sympy) is not charged to any check. Workers start on
  the first `check` and are reused across calls.

  Each worker runs with an address-space limit (`memory_limit_mb`), so an answer that makes sympy build a gigantic
  integer fails inside that worker (a `parse_error`, or `worker_died` if the allocator aborts) instead of exhausting
  the host. Workers' stdout and stderr are discarded. Not thread-safe: one `check` at a time per pool.

  Args:
    timeout_s: wall-clock limit for one check, > 0.
    max_workers: worker processes.
    verify_fn: the check run in the worker, `(prediction, gold) -> float`, or None for `verify_with_math_verify`.
      A custom one must be a module-level function importable by a fresh interpreter given this process's
      `sys.path` (it is pickled by reference); raising means `parse_error`.
    startup_timeout_s: limit for starting a worker (and importing math_verify); past it `check` raises RuntimeError,
      since a worker that cannot start is an environment problem, not a model output.
    memory_limit_mb: address-space limit per worker in MiB, or None for no limit.
    warm_up: whether a worker imports math_verify and runs one check before taking work (only tests with a custom
      `verify_fn` turn it off).
  """

  def __init__(self, *, timeout_s: float = 5.0, max_workers: int = 1, verify_fn: VerifyFn | None = None,
               startup_timeout_s: float = 120.0, memory_limit_mb: int | None = 4096, warm_up: bool = True):
    if not isinstance(timeout_s, (int, float)) or isinstance(timeout_s, bool) or not timeout_s > 0:
      raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}.")
    if not isinstance(max_workers, int) or isinstance(max_workers, bool) or max_workers < 1:
      raise ValueError(f"max_workers must be a positive int, got {max_workers!r}.")
    if verify_fn is not None and not callable(verify_fn):
      raise TypeError(f"verify_fn must be a callable (prediction, gold) -> float or None, got {verify_fn!r}.")
    if memory_limit_mb is not None and (not isinstance(memory_limit_mb, int) or memory_limit_mb < 256):
      raise ValueError(f"memory_limit_mb must be an int >= 256 (a worker with sympy needs more) or None, "
                       f"got {memory_limit_mb!r}.")
    self.timeout_s = float(timeout_s)
    self.max_workers = max_workers
    pickled_fn = None
    if verify_fn is not None and verify_fn is not verify_with_math_verify:
      try:
        pickled_fn = pickle.dumps(verify_fn)
      except (pickle.PicklingError, AttributeError, TypeError) as e:
        raise TypeError(f"verify_fn must be a module-level function (it is pickled by reference for the worker), "
                        f"got {verify_fn!r}.") from e
    self._config = {
        "memory_limit_bytes": None if memory_limit_mb is None else memory_limit_mb * 2**20,
        "warm_up": warm_up,
        "verify_fn": pickled_fn,
        "sys_path": list(sys.path),
    }
    self._startup_timeout_s = float(startup_timeout_s)
    self._workers: list[_Worker | None] = [None] * max_workers
    self._finalizer = weakref.finalize(self, _stop_workers, self._workers)
    self._closed = False
    self.num_timeouts = 0  # Checks killed after timeout_s, since construction.
    self.num_worker_deaths = 0  # Checks whose worker died mid-check, since construction.
    self.num_restarts = 0  # Worker starts, including the first ones.

  # -- lifecycle ---------------------------------------------------------------------------------------------------

  def _start_worker(self, slot: int) -> None:
    parent_socket, child_socket = socket.socketpair()
    with child_socket:
      process = subprocess.Popen(
          [sys.executable, "-I", math_verify_worker.__file__, str(child_socket.fileno())],
          pass_fds=(child_socket.fileno(),), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
          stderr=subprocess.DEVNULL)
    conn = multiprocessing.connection.Connection(parent_socket.detach())
    self._workers[slot] = _Worker(process=process, conn=conn, started_at=time.monotonic())
    self.num_restarts += 1
    try:
      conn.send(self._config)
    except OSError:
      pass  # Died at once: noticed as a start-up failure when its connection reads EOF.

  def _replace_worker(self, slot: int) -> None:
    worker = self._workers[slot]
    if worker is not None:
      self._workers[slot] = None
      worker.stop()
    self._start_worker(slot)

  def _fail_startup(self, message: str) -> None:
    self.close()
    raise RuntimeError(message)

  def worker_pids(self) -> list[int]:
    """Process ids of the live workers (for monitoring)."""
    return [w.process.pid for w in self._workers if w is not None and w.process.poll() is None]

  def close(self) -> None:
    """Stops the workers (SIGKILL: they hold no state worth a polite exit). Idempotent; the pool is then unusable."""
    self._finalizer()
    self._closed = True

  def __enter__(self) -> "MathVerifyPool":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  # -- checking ----------------------------------------------------------------------------------------------------

  def check(self, predictions: Sequence[str], golds: Sequence[str]) -> CheckResult:
    """Checks answer pairs: scores[i] = verify_fn(predictions[i], golds[i]), 0 on error, timeout or a dead worker.

    Args:
      predictions: N answer expressions (already extracted from their completions, e.g. a box's content).
      golds: N gold answers as strings, aligned with `predictions`.

    Returns:
      A `CheckResult` (float32 scores [N] and one reason per check).
    """
    if self._closed:
      raise RuntimeError("MathVerifyPool is closed; create a new one.")
    if isinstance(predictions, str) or isinstance(golds, str):
      raise TypeError("MathVerifyPool.check takes sequences of predictions and golds, not a single string.")
    if len(predictions) != len(golds):
      raise ValueError(f"MathVerifyPool.check got {len(predictions)} predictions but {len(golds)} golds; align them "
                       "row by row (repeat each prompt's gold once per sample).")
    for name, values in (("predictions", predictions), ("golds", golds)):
      for value in values:
        if not isinstance(value, str):
          raise TypeError(f"{name} must be strings (e.g. '0.5' or '\\\\frac{{1}}{{2}}'), got {value!r}.")
    scores = np.zeros(len(predictions), dtype=np.float32)
    reasons: list[str] = [""] * len(predictions)
    pending = collections.deque(range(len(predictions)))
    sends = [0] * len(predictions)

    def finish(index: int, score: float, reason: str) -> None:
      scores[index], reasons[index] = score, reason

    if pending:
      for slot, worker in enumerate(self._workers):
        if worker is None or worker.process.poll() is not None:
          self._replace_worker(slot)
    while pending or any(w.item is not None for w in self._workers):
      for slot, worker in enumerate(self._workers):
        if not (pending and worker.ready and worker.item is None):
          continue
        index = pending.popleft()
        sends[index] += 1
        try:
          worker.conn.send((index, predictions[index], golds[index]))
        except OSError:  # The worker died while idle: the check never reached it; give it one more worker.
          self._replace_worker(slot)
          if sends[index] < 2:
            pending.appendleft(index)
          else:
            self.num_worker_deaths += 1
            finish(index, 0.0, WORKER_DIED)
          continue
        worker.item, worker.deadline = index, time.monotonic() + self.timeout_s
      self._wait_and_collect(finish)
    return CheckResult(scores, tuple(reasons))

  def _wait_and_collect(self, finish: Callable[[int, float, str], None]) -> None:
    """Waits for the first reply, death or deadline among the workers and handles each that happened."""
    deadlines = [w.deadline if w.ready else w.started_at + self._startup_timeout_s for w in self._workers]
    timeout = max(0.0, min(deadlines) - time.monotonic()) if min(deadlines) < float("inf") else None
    readable = multiprocessing.connection.wait([w.conn for w in self._workers], timeout=timeout)
    for slot, worker in enumerate(self._workers):
      if worker.conn not in readable:
        continue
      try:
        message = worker.conn.recv()
      except (EOFError, OSError):  # Its end of the connection closed: the process is gone.
        if not worker.ready:
          worker.stop()
          self._fail_startup(f"A math_verify worker exited during start-up (exit code {worker.process.returncode});"
                             " check `pip install math-verify`, and that a custom verify_fn is a module-level "
                             "function importable from this sys.path.")
        if worker.item is not None:
          self.num_worker_deaths += 1
          finish(worker.item, 0.0, WORKER_DIED)
        self._replace_worker(slot)
        continue
      if message[0] == "ready":
        worker.ready = True
        continue
      index, status, value = message
      verified = status == "ok" and value == 1.0
      finish(index, float(verified), VERIFIED if verified else MISMATCH if status == "ok" else PARSE_ERROR)
      worker.item, worker.deadline = None, float("inf")
    now = time.monotonic()
    for slot, worker in enumerate(self._workers):
      if worker.item is not None and now >= worker.deadline:
        self.num_timeouts += 1
        finish(worker.item, 0.0, TIMEOUT)
        self._replace_worker(slot)
      elif not worker.ready and now >= worker.started_at + self._startup_timeout_s:
        self._fail_startup(f"MathVerifyPool could not start a worker importing math_verify within "
                           f"{self._startup_timeout_s:.0f}s; check `pip install math-verify` (or raise "
                           "startup_timeout_s on a loaded machine).")
