"""Orbax checkpoints of the whole training state, with exact resume.

A checkpoint at step ``n`` holds one pytree of arrays (params, optimizer state — CAPO's included —, PRNG key, step,
data position) saved with ``orbax.checkpoint.StandardSave`` so it restores onto any sharding, plus a small JSON
``meta`` record: the run's config fingerprint (a resumed run must be the same experiment), the byte offset of
``metrics.jsonl`` at the save (rows written after it are replayed by the resumed run, so the file is truncated back
to it), and free-form host-loop fields.

Orbax writes each step into a temporary folder and renames it when complete, so a run killed at any moment (even by
SIGKILL, mid-save) leaves only complete checkpoints behind.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

PyTree = Any


def config_fingerprint(config_text: str) -> str:
  """A stable hash of the operative config text (what decides whether two runs are the same experiment)."""
  return hashlib.sha256(config_text.encode()).hexdigest()[:16]


class CheckpointMismatchError(RuntimeError):
  """The workdir holds checkpoints of a different experiment."""


class Checkpointer:
  """Saves/restores ``(state pytree, meta dict)`` under ``directory`` with an Orbax ``CheckpointManager``.

  Args:
    directory: the run's ``checkpoints/`` folder (created on the first save).
    fingerprint: ``config_fingerprint`` of the run's config; restoring a checkpoint with another fingerprint raises
      ``CheckpointMismatchError`` naming both, before anything is written.
    max_to_keep: newest checkpoints kept.
  """

  def __init__(self, directory: str, fingerprint: str, *, max_to_keep: int = 2):
    self.directory = os.path.abspath(directory)
    self.fingerprint = fingerprint
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=False,
                                           enable_async_checkpointing=False)
    self._manager = ocp.CheckpointManager(self.directory, options=options) if os.path.isdir(self.directory) else None
    self._options = options

  def _ensure_manager(self) -> ocp.CheckpointManager:
    if self._manager is None:
      os.makedirs(self.directory, exist_ok=True)
      self._manager = ocp.CheckpointManager(self.directory, options=self._options)
    return self._manager

  def latest_step(self) -> int | None:
    return None if self._manager is None else self._manager.latest_step()

  def check_compatible(self) -> None:
    """Raises ``CheckpointMismatchError`` when the latest checkpoint belongs to another config."""
    step = self.latest_step()
    if step is None:
      return
    meta = self.read_meta(step)
    if meta.get("fingerprint") != self.fingerprint:
      raise CheckpointMismatchError(
          f"{self.directory} holds checkpoints of a different config (fingerprint {meta.get('fingerprint')} vs this "
          f"run's {self.fingerprint}); use a new --workdir, or rerun with the config that wrote them.")

  def read_meta(self, step: int | None = None) -> dict[str, Any]:
    """The JSON ``meta`` record of the latest (or given) checkpoint."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    return dict(self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])

  def save(self, step: int, state: PyTree, meta: dict[str, Any]) -> None:
    manager = self._ensure_manager()
    meta = dict(meta, fingerprint=self.fingerprint, step=int(step))
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
    manager.wait_until_finished()

  def restore(self, abstract_state: PyTree, step: int | None = None) -> tuple[PyTree, dict[str, Any]]:
    """Restores the latest (or given) step onto the structure/shardings of ``abstract_state``."""
    self.check_compatible()
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    out = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    return out["state"], dict(out["meta"])

  def close(self) -> None:
    if self._manager is not None:
      self._manager.close()
