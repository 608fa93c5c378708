"""Where a run's numbers go: ``metrics.jsonl`` (one JSON object per row), TensorBoard events, the console.

``metrics.jsonl`` is the record the reports and plots are built from. Non-finite values are written as the JSON
tokens ``NaN``, ``Infinity`` and ``-Infinity`` (what Python's ``json`` writes and reads back; ``read_metrics`` and
``experiments/report.py`` get the float back), never as ``null``: a NaN loss stays visible as NaN.

Every checkpoint records the byte length and sha256 of the file at its save and keeps a copy of those bytes
(``capo_jax.checkpointing``). A resumed run hands them to ``restore_metrics``, which cuts the file back to exactly
the checkpoint's rows — rows written after the checkpoint by a killed run are replaced by the identical rows the
resumed run recomputes, never duplicated — or, when the file is missing, shorter or different, rebuilds it from the
checkpoint's copy; it never extends the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
from typing import Any, Callable, Mapping

import numpy as np


def _plain(value: Any) -> Any:
  """JSON-ready Python scalars/lists from numpy/jax values (non-finite floats stay floats: NaN, ±Infinity)."""
  if hasattr(value, "tolist"):
    value = np.asarray(value).tolist()
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  return value


def format_row(row: Mapping[str, Any]) -> str:
  """One ``metrics.jsonl`` line (with its newline) of ``row``: sorted keys, NaN/±Infinity as JSON tokens."""
  return json.dumps({k: _plain(v) for k, v in row.items()}, sort_keys=True) + "\n"


def read_metrics(path: str) -> list[dict[str, Any]]:
  """All rows of a ``metrics.jsonl`` file (NaN/±Infinity read back as floats); a torn last line (a run killed
  mid-write) ends the list."""
  rows = []
  with open(path, errors="replace") as f:  # undecodable bytes (a damaged file) end the list like a torn line
    for line in f:
      if not line.strip():
        continue
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        break
  return rows


def _replace_file(path: str, data: bytes) -> None:
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def restore_metrics(path: str, *, step: int, offset: int, sha256: str | None, saved_copy: bytes | None,
                    log: Callable[[str], None] = print) -> str:
  """Makes ``path`` hold exactly the rows of the checkpoint at ``step`` before a resumed run appends to it.

  Args:
    path: the run's ``metrics.jsonl``.
    step: the checkpoint's step.
    offset: the file's byte length at the checkpoint's save.
    sha256: the hex sha256 of those bytes (None for a checkpoint that did not record it: then any file at least
      ``offset`` long is trusted).
    saved_copy: the checkpoint's copy of those bytes (None if it has none).
    log: where the repair is reported.

  Returns:
    What was done: ``"truncated"`` (the file's first ``offset`` bytes are the checkpoint's; the rest is cut),
    ``"rebuilt"`` (missing, shorter or different: replaced by the checkpoint's copy) or ``"filtered"`` (no usable
    copy: the rows with ``step ≤`` the checkpoint's are kept, the loss of any earlier row reported).
  """
  data = None
  if os.path.exists(path):
    with open(path, "rb") as f:
      data = f.read()
  if data is not None and len(data) >= offset and (sha256 is None or
                                                    hashlib.sha256(data[:offset]).hexdigest() == sha256):
    with open(path, "r+b") as f:
      f.truncate(offset)
    return "truncated"
  problem = ("missing" if data is None else f"shorter ({len(data)} bytes) than" if len(data) < offset
             else "different from")
  if saved_copy is not None and (sha256 is None or hashlib.sha256(saved_copy).hexdigest() == sha256):
    _replace_file(path, saved_copy)
    num_rows = saved_copy.count(b"\n")
    log(f"metrics.jsonl was {problem} the {offset} bytes recorded by checkpoint {step}: rebuilt from the "
        f"checkpoint's copy ({num_rows} rows).")
    return "rebuilt"
  rows = [r for r in read_metrics(path) if int(r.get("step", 0)) <= step] if data is not None else []
  _replace_file(path, "".join(format_row(r) for r in rows).encode())
  log(f"metrics.jsonl was {problem} the {offset} bytes recorded by checkpoint {step}, which holds no usable copy: "
      f"kept its {len(rows)} rows with step ≤ {step}; any earlier row missing from it is lost (training resumes "
      "exactly).")
  return "filtered"


class MetricsWriter:
  """Appends rows to ``metrics.jsonl`` and scalars to TensorBoard; shows progress on the console.

  Args:
    workdir: the run folder.
    resume: append to the existing ``metrics.jsonl`` (prepared by ``restore_metrics``); False: start it empty.
    total_steps: for the progress bar.
    tensorboard: write TensorBoard event files (tensorboardX, no TensorFlow needed).
  """

  def __init__(self, workdir: str, *, resume: bool = False, total_steps: int | None = None,
               tensorboard: bool = True, initial_step: int = 0):
    self.path = os.path.join(workdir, "metrics.jsonl")
    if not resume:
      open(self.path, "w").close()
    self._file = open(self.path, "a")
    self._tb = None
    if tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      # tensorboardX warns on every NaN scalar; the console and metrics.jsonl already show it as NaN.
      logging.getLogger("tensorboardX.x2num").setLevel(logging.ERROR)
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
    self._console(row)
    line = format_row(row)
    row = json.loads(line)
    self._file.write(line)
    self._file.flush()
    step = int(row.get("step", 0))
    if self._tb is not None:
      for key, value in row.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
          self._tb.add_scalar(key, value, step)

  # What a user watches, in this order: (key, label, format).
  CONSOLE_FIELDS = (("reward_mean", "reward", "{:.3f}"), ("loss", "loss", "{:.4g}"),
                    ("eval_accuracy", "held-out pass@1", "{:.3f}"),
                    ("eval_greedy_accuracy", "greedy", "{:.3f}"), ("kl", "KL(start)", "{:.2e}"),
                    ("entropy", "entropy", "{:.3f}"), ("rejected_token_fraction", "rejected", "{:.2%}"),
                    ("grad_norm", "grad norm", "{:.3g}"), ("skipped_nonfinite", "skipped updates", "{:g}"),
                    ("step_s", "s/step", "{:.2f}"), ("eval_s", "eval s", "{:.1f}"))

  def _console(self, row: Mapping[str, Any]) -> None:
    parts = [f"step {row.get('step')}"]
    for key, label, fmt in self.CONSOLE_FIELDS:
      value = row.get(key)
      if value is None or (key == "skipped_nonfinite" and value == 0):
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
