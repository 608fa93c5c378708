"""The math-verify worker process: a standalone script that `MathVerifyPool` starts with a fresh interpreter.

It imports nothing from capo_jax (running it must not import jax or the trainer's modules), so a worker starts in
about the time it takes to import sympy. Protocol over the duplex connection whose file descriptor is argv[1]:

1. the parent sends a config dict: `memory_limit_bytes` (int or None), `warm_up` (bool), `sys_path` (the parent's,
   so imports resolve as they would there) and `verify_fn` (None, or a custom check pickled by reference);
2. the worker applies the address-space limit, imports and warms up, and replies `("ready", pid)`;
3. then, per check, the parent sends `(index, prediction, gold)` and the worker replies `(index, "ok", score)` or
   `(index, "error", exception name)`; `None` or a closed connection ends it.

The worker never evaluates its input: answers go only through math_verify's LaTeX parser and sympy's comparison.
"""

from __future__ import annotations

import functools
import os
import pickle
import signal
import sys

__all__ = ["serve", "verify_with_math_verify"]


@functools.lru_cache(maxsize=4096)
def _parse_answer(answer: str) -> list:
  import math_verify  # Imported lazily: the trainer process that imports this module never pays for sympy.

  return math_verify.parse(f"\\boxed{{{answer}}}", parsing_timeout=None)


def verify_with_math_verify(prediction: str, gold: str) -> float:
  """1.0 iff `math_verify` finds the answer `prediction` equivalent to the answer `gold`, else 0.0.

  Both sides are single answer expressions (no surrounding prose); each is parsed as `\\boxed{answer}` by
  `math_verify.parse` and compared by `math_verify.verify` (numeric and symbolic equivalence: `\\frac{1}{2}` ≡
  `0.5`, `\\{1,2\\}` ≡ `\\{2,1\\}`, `(1,2]` ≢ `(1,2)`, `50\\%` ≡ `0.5`). Parsed answers are cached per process, so
  a gold shared by a group of samples is parsed once. math_verify's own signal timeouts are disabled: in
  `MathVerifyPool` the process-level timeout is the one that holds. Unbounded in time and memory: call it directly
  only on trusted input.

  Raises:
    ValueError: when math_verify extracts nothing from a side (the pool records `parse_error`).
  """
  import math_verify

  gold_parsed = _parse_answer(gold)
  pred_parsed = _parse_answer(prediction)
  if not gold_parsed or not pred_parsed:
    side = "gold" if not gold_parsed else "prediction"
    raise ValueError(f"math_verify extracted nothing from the {side} answer.")
  return 1.0 if math_verify.verify(gold_parsed, pred_parsed, timeout_seconds=None) else 0.0


def _warm_up() -> None:
  """Imports math_verify and sympy and runs one check, so no check's clock includes imports; silences the loggers."""
  import logging

  for name in ("math_verify", "latex2sympy2_extended"):
    logging.getLogger(name).setLevel(logging.CRITICAL)
  verify_with_math_verify("1", "1")


def serve(fd: int) -> None:
  """Runs the worker protocol (see the module docstring) on the connection with file descriptor `fd`."""
  from multiprocessing.connection import Connection

  signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in the trainer is the parent's to handle.
  conn = Connection(fd)
  config = conn.recv()
  if config["memory_limit_bytes"] is not None:
    import resource

    limit = config["memory_limit_bytes"]
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
  sys.path[:] = config["sys_path"]  # Import math_verify (or a custom check) from where the parent would.
  verify_fn = verify_with_math_verify
  if config["verify_fn"] is not None:
    verify_fn = pickle.loads(config["verify_fn"])
  if config["warm_up"]:
    _warm_up()
  conn.send(("ready", os.getpid()))
  while True:
    try:
      message = conn.recv()
    except (EOFError, OSError):
      return
    if message is None:
      return
    index, prediction, gold = message
    try:
      reply = (index, "ok", float(verify_fn(prediction, gold)))
    except Exception as e:  # noqa: BLE001 — MemoryError and RecursionError included: the worker survives them.
      reply = (index, "error", type(e).__name__)
    conn.send(reply)


if __name__ == "__main__":
  serve(int(sys.argv[1]))
