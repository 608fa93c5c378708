"""Where a run's numbers go: ``metrics.jsonl`` (one JSON object per row), TensorBoard events, the console.

``metrics.jsonl`` is the record the reports and plots are built from. Its byte offset is saved in every checkpoint;
a resumed run truncates the file back to that offset, so rows written after the last checkpoint by a killed run are
replaced by the identical rows the resumed run recomputes, never duplicated.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any, Mapping

import numpy as np


def _plain(value: Any) -> Any:
  """JSON-safe Python scalars/lists from numpy/jax values; non-finite floats become None."""
  if hasattr(value, "tolist"):
    value = np.asarray(value).tolist()
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  return value


def read_metrics(path: str) -> list[dict[str, Any]]:
  """All rows of a ``metrics.jsonl`` file; a torn last line (a run killed mid-write) ends the list."""
  rows = []
  with open(path) as f:
    for line in f:
      if not line.strip():
        continue
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        break
  return rows


class MetricsWriter:
  """Appends rows to ``metrics.jsonl`` and scalars to TensorBoard; shows progress on the console.

  Args:
    workdir: the run folder.
    resume_offset: byte offset of ``metrics.jsonl`` saved with the checkpoint being resumed (None: start fresh).
    total_steps: for the progress bar.
    tensorboard: write TensorBoard event files (tensorboardX, no TensorFlow needed).
  """

  def __init__(self, workdir: str, *, resume_offset: int | None = None, total_steps: int | None = None,
               tensorboard: bool = True, initial_step: int = 0):
    self.path = os.path.join(workdir, "metrics.jsonl")
    if resume_offset is None:
      open(self.path, "w").close()
    else:
      with open(self.path, "a+b") as f:
        f.truncate(resume_offset)
    self._file = open(self.path, "a")
    self._tb = None
    if tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
    self._bar = None
    if sys.stderr.isatty() and total_steps:
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm(total=total_steps, initial=initial_step, dynamic_ncols=True)

  def offset(self) -> int:
    """Byte offset after the last written row (stored in checkpoints)."""
    self._file.flush()
    return os.path.getsize(self.path)

  def write(self, row: Mapping[str, Any]) -> None:
    self._console(row)  # before JSON conversion: a NaN shows as nan, never as a missing field
    row = {k: _plain(v) for k, v in row.items()}
    self._file.write(json.dumps(row, sort_keys=True) + "\n")
    self._file.flush()
    step = int(row.get("step", 0))
    if self._tb is not None:
      for key, value in row.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
          self._tb.add_scalar(key, value, step)

  # What a user watches, in this order: (key, label, format).
  CONSOLE_FIELDS = (("reward_mean", "reward", "{:.3f}"), ("eval_accuracy", "held-out pass@1", "{:.3f}"),
                    ("eval_greedy_accuracy", "greedy", "{:.3f}"), ("kl", "KL(start)", "{:.2e}"),
                    ("entropy", "entropy", "{:.3f}"), ("rejected_token_fraction", "rejected", "{:.2%}"),
                    ("grad_norm", "grad norm", "{:.3g}"), ("step_s", "s/step", "{:.2f}"), ("eval_s", "eval s", "{:.1f}"))

  def _console(self, row: Mapping[str, Any]) -> None:
    parts = [f"step {row.get('step')}"]
    for key, label, fmt in self.CONSOLE_FIELDS:
      value = row.get(key)
      if value is None:
        continue
      value = float(value)
      parts.append(f"{label} " + (fmt.format(value) if math.isfinite(value) else str(value)))
    line = "  ".join(parts)
    if self._bar is not None:
      self._bar.set_postfix_str(line, refresh=False)
      if "reward_mean" in row:  # one training row per step
        self._bar.update(1)
    else:
      print(line, flush=True)

  def close(self) -> None:
    self._file.close()
    if self._tb is not None:
      self._tb.close()
    if self._bar is not None:
      self._bar.close()
