"""Orbax checkpoints of the whole training state: atomic, verified on restore, exact resume.

A checkpoint at step ``n`` is the folder ``checkpoints/<n>/``: one pytree of arrays (params, optimizer state — CAPO's
included —, PRNG key, step) saved with ``orbax.checkpoint.StandardSave`` so it restores onto any sharding, a small
JSON ``meta`` record, the host loop's extra files (the bytes of ``metrics.jsonl`` at the save) and, written last,
``capo_manifest.json``: the size and sha256 of every other file of the folder.

``meta`` holds the run's config fingerprint (a resumed run must be the same experiment), the host loop's fields
(data position, ``metrics.jsonl`` offset), ``state_sha256`` — a sha256 over each leaf's path, dtype, shape and the
sha256 of its bytes, in tree order (``state_digest``), computed from the arrays in memory before they are written —,
the state's structure (leaf paths, dtypes, shapes) and the sha256 of each extra file.

Saving (``Checkpointer.save``) refuses a state whose parameters are not finite (``NonFiniteStateError``): a NaN
never reaches a checkpoint. Orbax writes into a staging folder (itself through a temporary folder), the extra files
and the manifest are added there, and the staging folder is renamed to ``<n>`` last: a run killed at any moment
(even by SIGKILL, mid-save) leaves only complete checkpoints, each with its manifest, under step names; leftovers
of an interrupted save are removed by the next one. (A checkpoint without a manifest — written by an earlier
version — is verified by ``state_sha256`` alone: damage to bytes its arrays are not read from goes unnoticed there.)

Restoring verifies the newest checkpoint (``Checkpointer.verify``): every file of the manifest present with its size
and sha256, ``meta`` readable and of this run's fingerprint, the structure equal to the run's state, Orbax's restore
succeeding, the restored arrays' sha256 equal to ``state_sha256``, the parameters finite. A failure raises
``CheckpointCorruptError`` naming the checkpoint and the file; with ``allow_fallback`` the checkpoint is moved to
``rejected_checkpoints/`` beside ``checkpoints/`` (logged) and the next older one is tried.

Several processes (``jax.distributed``): every process calls ``save`` and ``restore`` with the same state; Orbax
writes each process's shards into one checkpoint folder (a file system all of them see), process 0 alone writes
the extra files and the manifest, renames, applies retention and moves rejected checkpoints, with a barrier of all
processes around each of those steps. A state sharded over processes cannot be read whole by any of them: its
``state_sha256`` is then built from ``_checksum64`` of each leaf, computed on the devices that hold it (recorded as
``state_digest: checksum64`` in meta; it does not depend on the sharding, so such a checkpoint verifies on any mesh).

Retention is done here, not by Orbax: after a save, checkpoints beyond the newest ``max_to_keep`` are deleted (each
renamed away first, so a kill mid-delete leaves no half checkpoint under a step name), and never the newest one with
a manifest while none of the kept ones has one.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import shutil
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from capo_jax import sharding as sharding_lib

PyTree = Any

MANIFEST = "capo_manifest.json"
REJECTED_DIR = "rejected_checkpoints"
_TMP_MARKER = ".orbax-checkpoint-tmp"
_STAGING = ".staging-"


def config_fingerprint(config_text: str) -> str:
  """A stable hash of the operative config text (what decides whether two runs are the same experiment)."""
  return hashlib.sha256(config_text.encode()).hexdigest()[:16]


class CheckpointError(RuntimeError):
  """A checkpoint cannot be used or written; the message names the checkpoint (and file) and the fix."""


class CheckpointMismatchError(CheckpointError):
  """The workdir holds checkpoints of a different experiment (or of a different state layout)."""


class CheckpointCorruptError(CheckpointError):
  """A checkpoint failed verification (missing, truncated or altered file, unreadable state, checksum mismatch,
  non-finite parameters). ``step`` and ``path`` name it."""

  def __init__(self, message: str, *, step: int | None = None, path: str | None = None):
    super().__init__(message)
    self.step, self.path = step, path


class NonFiniteStateError(CheckpointError):
  """A state with non-finite parameters was about to be saved; nothing was written."""


def _leaf_bytes(leaf: Any) -> np.ndarray:
  leaf = jnp.asarray(leaf) if not isinstance(leaf, np.ndarray) else leaf
  if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    leaf = jax.random.key_data(leaf)
  return np.asarray(sharding_lib.to_host(leaf), order="C")  # (np.ascontiguousarray would make a 0-d leaf 1-d)


def _parallel(fn: Callable[[Any], Any], items: list[Any]) -> list[Any]:
  """``[fn(x) for x in items]`` on a thread pool (hashlib releases the GIL on large buffers)."""
  if len(items) < 2:
    return [fn(x) for x in items]
  with concurrent.futures.ThreadPoolExecutor(max_workers=min(len(items), os.cpu_count() or 1)) as pool:
    return list(pool.map(fn, items))


DIGEST_SHA256, DIGEST_CHECKSUM = "sha256", "checksum64"


def digest_kind(state: PyTree) -> str:
  """``DIGEST_SHA256`` when this process holds every leaf whole (one process, any mesh), else ``DIGEST_CHECKSUM``
  (a state sharded over several processes: no process can read its bytes)."""
  whole = all(not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated
              for x in jax.tree.leaves(state))
  return DIGEST_SHA256 if whole else DIGEST_CHECKSUM


def _words(x: jax.Array) -> jax.Array:
  """The bits of ``x`` as a flat uint32 array (2-byte and 1-byte elements widened, 8-byte ones split in two)."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  size = x.dtype.itemsize
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[size]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32).reshape(-1)


@jax.jit
def _checksum64(x: jax.Array) -> jax.Array:
  """Two 32-bit position-weighted sums of the bits of ``x`` (uint32[2]), computed where ``x`` lives (a sharded
  array is summed per shard, then across devices; integer sums mod 2^32 do not depend on the order, so the value
  does not depend on the sharding). Word w_i at flat position i adds (w_i ⊕ 0x9E3779B1·i)·(2i+1) to the first sum and
  rot7(w_i)·(0x27D4EB2F·i | 1) + i to the second: each map of w_i is a bijection times an odd factor, so a change of
  any single word changes both sums."""
  w = _words(x)
  i = jnp.arange(w.size, dtype=jnp.uint32)
  first = jnp.sum((w ^ (i * jnp.uint32(0x9E3779B1))) * (i * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)
  rot = (w << jnp.uint32(7)) | (w >> jnp.uint32(25))
  second = jnp.sum(rot * ((i * jnp.uint32(0x27D4EB2F)) | jnp.uint32(1)) + i, dtype=jnp.uint32)
  return jnp.stack([first, second])


def state_digest(state: PyTree, kind: str = DIGEST_SHA256) -> tuple[str, list[list[Any]]]:
  """``(sha256 hex, structure)`` of a pytree of arrays: a digest of each leaf, then one sha256 over each leaf's path,
  dtype, shape and digest in tree order; ``structure`` lists ``[path, dtype, shape]`` per leaf.

  ``kind`` ``DIGEST_SHA256``: the sha256 of each leaf's bytes (leaves hashed in parallel; a leaf sharded over
  several processes is gathered first). ``DIGEST_CHECKSUM``: ``_checksum64`` of each leaf, computed on its devices
  (no leaf leaves them) — the digest of a state sharded over processes (``digest_kind``)."""
  leaves = jax.tree_util.tree_flatten_with_path(state)[0]

  def one(item):
    path, leaf = item
    if kind == DIGEST_CHECKSUM:
      words = np.asarray(_checksum64(leaf))
      dtype, shape = abstract_structure({"x": leaf})[0][1:]
      return [jax.tree_util.keystr(path), dtype, shape], f"{int(words[0]):08x}{int(words[1]):08x}"
    array = _leaf_bytes(leaf)
    entry = [jax.tree_util.keystr(path), str(array.dtype), list(array.shape)]
    return entry, hashlib.sha256(array.reshape(-1).view(np.uint8)).hexdigest()  # the bytes, without a copy

  if kind == DIGEST_CHECKSUM:
    digests = [one(item) for item in leaves]  # device computations, in the same order on every process
  else:
    digests = _parallel(one, leaves)

  h = hashlib.sha256()
  structure = []
  for entry, digest in digests:
    structure.append(entry)
    h.update(json.dumps([*entry, digest]).encode())
  return h.hexdigest(), structure


def abstract_structure(abstract_state: PyTree) -> list[list[Any]]:
  """``state_digest``'s structure of the state a run expects (from arrays or ``ShapeDtypeStruct`` leaves)."""
  out = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_state)[0]:
    dtype = leaf.dtype
    shape = list(leaf.shape)
    if jnp.issubdtype(dtype, jax.dtypes.prng_key):
      dtype, shape = jax.random.key_data(leaf).dtype, list(jax.random.key_data(leaf).shape)
    out.append([jax.tree_util.keystr(path), str(np.dtype(dtype)), shape])
  return out


def first_nonfinite(tree: PyTree) -> str | None:
  """The path of the first inexact leaf of ``tree`` holding NaN or ±inf (None when all are finite)."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.inexact) and not bool(jnp.all(jnp.isfinite(leaf))):
      return jax.tree_util.keystr(path)
  return None


def _file_sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def file_manifest(folder: str) -> dict[str, list[Any]]:
  """``{relative path: [size, sha256]}`` of every file under ``folder`` except the manifest itself."""
  paths = sorted(os.path.join(root, name) for root, _, files in os.walk(folder) for name in files)
  paths = [p for p in paths if os.path.relpath(p, folder) != MANIFEST]
  digests = _parallel(_file_sha256, paths)
  return {os.path.relpath(p, folder): [os.path.getsize(p), d] for p, d in zip(paths, digests)}


def _write_atomic(path: str, data: bytes) -> None:
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _first_line(error: BaseException) -> str:
  text = str(error).strip()
  return f"{type(error).__name__}: {text.splitlines()[0][:300]}" if text else type(error).__name__


class Checkpointer:
  """Saves, verifies and restores ``(state pytree, meta dict)`` checkpoints under ``directory``.

  Args:
    directory: the run's ``checkpoints/`` folder (created on the first save).
    fingerprint: ``config_fingerprint`` of the run's config; a checkpoint with another fingerprint raises
      ``CheckpointMismatchError`` naming both, before anything is written.
    max_to_keep: newest checkpoints kept (module docstring for the rule).
    log: where fallbacks and deletions are reported.
  """

  def __init__(self, directory: str, fingerprint: str, *, max_to_keep: int = 2,
               log: Callable[[str], None] = print):
    self.directory = os.path.abspath(directory)
    self.fingerprint = fingerprint
    self.max_to_keep = max_to_keep
    self.log = log
    self._ckptr = ocp.Checkpointer(ocp.CompositeCheckpointHandler())

  # -- listing ----------------------------------------------------------------------------------------------------

  def path(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def steps(self) -> list[int]:
    """Steps of the complete checkpoints (folders named by an integer; Orbax's temporary folders are not), oldest
    first."""
    if not os.path.isdir(self.directory):
      return []
    return sorted(int(n) for n in os.listdir(self.directory) if n.isdigit() and os.path.isdir(self.path(int(n))))

  def latest_step(self) -> int | None:
    steps = self.steps()
    return steps[-1] if steps else None

  def has_manifest(self, step: int) -> bool:
    return os.path.isfile(os.path.join(self.path(step), MANIFEST))

  # -- meta -------------------------------------------------------------------------------------------------------

  def read_meta(self, step: int | None = None) -> dict[str, Any]:
    """The JSON ``meta`` record of the latest (or given) checkpoint; ``CheckpointCorruptError`` if unreadable."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    try:
      out = self._ckptr.restore(self.path(step), args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
      meta = dict(out["meta"])
    except Exception as e:  # pylint: disable=broad-except  (any failure to read it means the same thing)
      raise CheckpointCorruptError(f"checkpoint {step} ({self.path(step)}): its meta record (meta/) cannot be read "
                                   f"({_first_line(e)})", step=step, path=os.path.join(self.path(step), "meta")) from e
    if not isinstance(meta, dict):
      raise CheckpointCorruptError(f"checkpoint {step}: meta/ holds {type(meta).__name__}, not a record", step=step,
                                   path=os.path.join(self.path(step), "meta"))
    return meta

  def check_compatible(self) -> None:
    """Raises ``CheckpointMismatchError`` when the newest checkpoint with a readable meta belongs to another config
    (unreadable ones are left to ``restore``'s verification)."""
    for step in reversed(self.steps()):
      try:
        meta = self.read_meta(step)
      except CheckpointCorruptError:
        continue
      if meta.get("fingerprint") != self.fingerprint:
        raise CheckpointMismatchError(
            f"{self.directory} holds checkpoints of a different config (fingerprint {meta.get('fingerprint')} vs "
            f"this run's {self.fingerprint}); use a new --workdir, or rerun with the config that wrote them.")
      return

  # -- save -------------------------------------------------------------------------------------------------------

  def save(self, step: int, state: PyTree, meta: dict[str, Any], *, files: dict[str, bytes] | None = None,
           params: PyTree | None = None) -> None:
    """Writes checkpoint ``step`` (module docstring: what it holds, in which order), then applies retention.

    Args:
      step: the step number (its folder name).
      state: the pytree of arrays.
      meta: JSON-serialisable host-loop fields.
      files: extra files of the checkpoint, ``{name: bytes}`` (e.g. ``metrics.jsonl``); their sha256 go to meta.
      params: the part of ``state`` that must be finite (default: all of it).

    Raises:
      NonFiniteStateError: ``params`` holds NaN or ±inf (nothing is written).
    """
    bad = first_nonfinite(state if params is None else params)
    if bad is not None:
      raise NonFiniteStateError(f"refusing to save checkpoint {step}: parameter {bad} is not finite (the last "
                                f"checkpoint, step {self.latest_step()}, is left as it is).")
    files = dict(files or {})
    kind = digest_kind(state)
    digest, structure = state_digest(state, kind)
    meta = dict(meta, fingerprint=self.fingerprint, step=int(step), state_sha256=digest, state_structure=structure,
                files_sha256={name: hashlib.sha256(data).hexdigest() for name, data in files.items()})
    if kind != DIGEST_SHA256:
      meta["state_digest"] = kind
    primary = sharding_lib.is_primary()
    if primary:
      os.makedirs(self.directory, exist_ok=True)
      self._remove_stale_temporaries()
    sharding_lib.sync(f"capo-checkpoint-{step}-staging")
    # The same staging name on every process (Orbax writes one checkpoint from all of them).
    staging = os.path.join(self.directory, f"{_STAGING}{step}")
    self._ckptr.save(staging, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                      meta=ocp.args.JsonSave(meta)))
    sharding_lib.sync(f"capo-checkpoint-{step}-saved")
    if primary:
      for name, data in files.items():
        with open(os.path.join(staging, name), "wb") as f:
          f.write(data)
      _write_atomic(os.path.join(staging, MANIFEST), json.dumps(file_manifest(staging), indent=0).encode())
      if os.path.exists(self.path(step)):  # a leftover of a run that resumed from an older checkpoint
        self._delete(step)
      os.replace(staging, self.path(step))  # the checkpoint appears complete, manifest included, or not at all
      self._apply_retention()
    sharding_lib.sync(f"capo-checkpoint-{step}-done")

  def _remove_stale_temporaries(self) -> None:
    for name in os.listdir(self.directory):
      if _TMP_MARKER in name or name.startswith((".deleting-", _STAGING)):
        shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

  def _delete(self, step: int) -> None:
    trash = os.path.join(self.directory, f".deleting-{step}-{time.time_ns()}")
    os.replace(self.path(step), trash)
    shutil.rmtree(trash, ignore_errors=True)

  def _apply_retention(self) -> None:
    steps = self.steps()
    keep = set(steps[-self.max_to_keep:])
    if not any(self.has_manifest(s) for s in keep):
      verified = [s for s in steps if self.has_manifest(s)]
      keep.update(verified[-1:])
    for step in steps:
      if step not in keep:
        self._delete(step)

  # -- verify and restore -----------------------------------------------------------------------------------------

  def verify_files(self, step: int) -> None:
    """Raises ``CheckpointCorruptError`` naming the first file of checkpoint ``step`` that is missing, of another
    size or sha256 than its manifest records, or not in it (nothing to check without a manifest)."""
    folder = self.path(step)
    manifest_path = os.path.join(folder, MANIFEST)
    if not os.path.exists(manifest_path):
      return  # a checkpoint of an earlier version: state_sha256 still verifies the arrays
    try:
      with open(manifest_path) as f:
        manifest = json.load(f)
      if not isinstance(manifest, dict):
        raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
      raise CheckpointCorruptError(f"checkpoint {step} ({folder}): {MANIFEST} is unreadable ({_first_line(e)})",
                                   step=step, path=manifest_path) from e
    actual = file_manifest(folder)
    for rel, expected in manifest.items():
      full = os.path.join(folder, rel)
      if rel not in actual:
        raise CheckpointCorruptError(f"checkpoint {step}: file {full} is missing", step=step, path=full)
      if list(actual[rel]) != list(expected):
        size, _ = actual[rel]
        what = (f"holds {size} bytes, {expected[0]} were saved" if size != expected[0]
                else "its bytes differ from those saved (sha256 mismatch)")
        raise CheckpointCorruptError(f"checkpoint {step}: file {full} {what}", step=step, path=full)
    extra = sorted(set(actual) - set(manifest))
    if extra:
      full = os.path.join(folder, extra[0])
      raise CheckpointCorruptError(f"checkpoint {step}: file {full} was not part of the saved checkpoint", step=step,
                                   path=full)

  def verify(self, abstract_state: PyTree, step: int, *, params_of: Callable[[PyTree], PyTree] | None = None
             ) -> tuple[PyTree, dict[str, Any]]:
    """Restores checkpoint ``step`` onto the structure/shardings of ``abstract_state`` and verifies it (module
    docstring); returns ``(state, meta)``.

    Raises:
      CheckpointCorruptError: naming the checkpoint and, where one is to blame, the file.
      CheckpointMismatchError: another config's checkpoint, or one of a different state layout.
    """
    folder = self.path(step)
    self.verify_files(step)
    meta = self.read_meta(step)
    if meta.get("fingerprint") != self.fingerprint:
      raise CheckpointMismatchError(
          f"checkpoint {step} ({folder}) belongs to a different config (fingerprint {meta.get('fingerprint')} vs "
          f"this run's {self.fingerprint}); use a new --workdir, or rerun with the config that wrote it.")
    expected = abstract_structure(abstract_state)
    saved = meta.get("state_structure")
    if saved is not None and saved != expected:
      diff = next((f"{s} saved vs {e} expected" for s, e in zip(saved, expected) if s != e),
                  f"{len(saved)} arrays saved vs {len(expected)} expected")
      raise CheckpointMismatchError(f"checkpoint {step} ({folder}) holds a different state layout ({diff}); it was "
                                    "written by another version of the code: use a new --workdir.")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    try:
      out = self._ckptr.restore(folder, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
      state = out["state"]
    except Exception as e:  # pylint: disable=broad-except  (any failure to read it means the same thing)
      raise CheckpointCorruptError(f"checkpoint {step} ({folder}): its state (state/) cannot be read "
                                   f"({_first_line(e)})", step=step, path=os.path.join(folder, "state")) from e
    if "state_sha256" in meta:
      digest, _ = state_digest(state, meta.get("state_digest", DIGEST_SHA256))
      if digest != meta["state_sha256"]:
        raise CheckpointCorruptError(f"checkpoint {step}: the arrays read from {os.path.join(folder, 'state')} "
                                     "differ from those saved (state_sha256 mismatch)", step=step,
                                     path=os.path.join(folder, "state"))
    bad = first_nonfinite(state if params_of is None else params_of(state))
    if bad is not None:
      raise CheckpointCorruptError(f"checkpoint {step}: parameter {bad} read from {os.path.join(folder, 'state')} is "
                                   "not finite", step=step, path=os.path.join(folder, "state"))
    return state, meta

  def restore(self, abstract_state: PyTree, *, allow_fallback: bool = False,
              params_of: Callable[[PyTree], PyTree] | None = None) -> tuple[PyTree, dict[str, Any]]:
    """The newest checkpoint that passes ``verify``: ``(state, meta)``.

    Without ``allow_fallback`` the newest checkpoint must pass; with it, each failing one is moved to
    ``rejected_checkpoints/`` (logged) and the next older one is tried.

    Raises:
      CheckpointCorruptError: the newest checkpoint failed (without ``allow_fallback``; the message names the
        previous one and the flag), or every checkpoint failed.
      CheckpointMismatchError: as ``verify``.
      FileNotFoundError: there is no checkpoint.
    """
    steps = self.steps()
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    for i, step in enumerate(reversed(steps)):
      try:
        return self.verify(abstract_state, step, params_of=params_of)
      except CheckpointCorruptError as e:
        older = steps[:len(steps) - 1 - i]
        if not allow_fallback:
          raise self._not_restored(e, older) from e
        rejected = self._reject(step) if sharding_lib.is_primary() else "rejected_checkpoints/"
        sharding_lib.sync(f"capo-checkpoint-{step}-rejected")
        self.log(f"checkpoint {step} failed verification ({e}); moved to {rejected}"
                 + (f"; falling back to checkpoint {older[-1]}." if older else "."))
    raise CheckpointCorruptError(f"no checkpoint in {self.directory} passed verification (all were moved to "
                                 f"{os.path.join(os.path.dirname(self.directory), REJECTED_DIR)}); rerun to start "
                                 "the run over.")

  def precheck(self, *, allow_fallback: bool = False) -> None:
    """The cheap part of ``verify`` on the newest checkpoint (its files against the manifest, its meta), so that a
    damaged one is reported before the policy is loaded. With ``allow_fallback`` nothing is checked here (``restore``
    falls back)."""
    steps = self.steps()
    if allow_fallback or not steps:
      return
    try:
      self.verify_files(steps[-1])
      self.read_meta(steps[-1])
    except CheckpointCorruptError as e:
      raise self._not_restored(e, steps[:-1]) from e

  def _not_restored(self, error: CheckpointCorruptError, older: list[int]) -> CheckpointCorruptError:
    fix = (f"rerun with --allow_fallback to resume from checkpoint {older[-1]} (the previous one), or delete "
           f"{self.path(error.step)}" if older else
           f"no older checkpoint exists: delete {self.directory} to start the run over")
    return CheckpointCorruptError(f"{error}; it was not restored. Fix: {fix}.", step=error.step, path=error.path)

  def _reject(self, step: int) -> str:
    target_dir = os.path.join(os.path.dirname(self.directory), REJECTED_DIR)
    os.makedirs(target_dir, exist_ok=True)
    target = os.path.join(target_dir, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 10**6}")
    os.replace(self.path(step), target)
    return target

  def saved_file(self, step: int, name: str, meta: dict[str, Any]) -> bytes | None:
    """The extra file ``name`` of checkpoint ``step`` when present and equal (sha256) to what ``meta`` recorded."""
    path = os.path.join(self.path(step), name)
    expected = meta.get("files_sha256", {}).get(name)
    if expected is None or not os.path.isfile(path):
      return None
    with open(path, "rb") as f:
      data = f.read()
    return data if hashlib.sha256(data).hexdigest() == expected else None

  def close(self) -> None:
    self._ckptr.close()
