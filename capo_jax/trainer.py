"""The RL host loop: setup, then for each step rollout → learner update → log → evaluate → checkpoint.

Everything below this loop is a jitted function of explicit pytrees (the sampler, the learner step that
``components.make_learner_step`` picks for ``CurvatureConfig.mode``, the optax chain); the loop only moves arrays,
calls the task's reward and writes logs and checkpoints. Its state is ``TrainState(params, opt_state, key, step)``,
checkpointed with Orbax together with the task's data position and the ``metrics.jsonl`` record, so a killed run
resumes exactly. The trainer imports no concrete task: ``TrainConfig.task`` is any ``capo_jax.tasks.Task``.

Reliability (docs/RELIABILITY.md):

- Inputs are checked before anything is loaded or written (``preflight``): the workdir and the warm-start cache
  writable, a ``PolicyConfig.init_from`` folder complete (config, tokenizer, safetensors headers against their file
  sizes), the workdir free of another run. ``config.gin`` is written only once the setup has succeeded, so a
  corrected rerun in the same workdir starts cleanly. A bad input raises ``InputError`` (``WorkdirError``).
- On several devices (``TrainConfig.mesh``, docs/SCALING.md) the parameters, optimizer state (CAPO's included) and
  reference are sharded by ``capo_jax.sharding``'s rules, the sampler and the learner step run on the mesh, and
  checkpoints are written and restored shard by shard. With several processes (``jax.distributed``) every process
  runs this loop on the same global arrays: it reads the step's prompts (so every process pads them alike), decodes
  the sampled completions and scores only its own rows (``sharding.process_rows``), and the rewards are gathered;
  only process 0 writes ``config.gin``, ``metrics.jsonl``, TensorBoard and plots, while every process writes its
  checkpoint shards.
- A learner update whose loss, gradient or update is not finite is skipped inside the jitted step (parameters and
  optimizer state unchanged, ``skipped_nonfinite`` in the row, a warning here); ``ReliabilityConfig.
  max_consecutive_skips`` steps in a row with a skipped update stop the run with ``DivergedError``. A checkpoint
  is never written from non-finite parameters, and every checkpoint is verified when resumed
  (``capo_jax.checkpointing``), with ``allow_fallback`` to the previous one.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Any, Callable, Collection, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
from flax import nnx

from capo_jax import components
from capo_jax import curvature
from capo_jax import learner
from capo_jax import sharding
from capo_jax.checkpointing import Checkpointer, first_nonfinite
from capo_jax.config import TrainConfig, config_fingerprint, learning_rate_schedule
from capo_jax.evaluation import Evaluator
from capo_jax.models.hf import load_hf
from capo_jax.plots import plot_run
from capo_jax.rollout import Rollout, RolloutResult
from capo_jax.run_logging import MetricsWriter, format_row, read_metrics, restore_metrics
from capo_jax.tasks.base import task_tokenizer
from capo_jax.tasks.warm_start import warm_start, warm_start_key

# Wall-clock fields: measured, so they differ between an interrupted and an uninterrupted run.
TIMING_KEYS = ("rollout_s", "learner_s", "eval_s", "step_s", "tokens_per_s", "wall_s")

# Where fault-injection hooks are called: ``fault(phase, step)`` at the start of each phase of each step.
FAULT_PHASES = ("setup", "rollout", "learner", "eval", "save")


class TrainState(NamedTuple):
  """Everything the loop carries between steps (a pytree; checkpointed whole)."""
  params: Any
  opt_state: Any
  key: jax.Array
  step: jax.Array


class InputError(ValueError):
  """A path or file the run needs is missing, unreadable or malformed; the message names it and the fix."""


class WorkdirError(InputError):
  """The workdir cannot be used (unwritable, or holding another run)."""


class DivergedError(RuntimeError):
  """``ReliabilityConfig.max_consecutive_skips`` steps in a row had a non-finite loss, gradient or update."""


def _check_writable(folder: str, what: str, fix: str) -> None:
  try:
    os.makedirs(folder, exist_ok=True)
    probe = tempfile.NamedTemporaryFile(dir=folder, prefix=".write-probe-", delete=True)
    probe.close()
  except OSError as e:
    raise WorkdirError(f"{what} {folder!r} is not writable ({e.strerror}); {fix}.") from e


def check_workdir(workdir: str) -> None:
  """Creates ``workdir`` if needed and proves it writable, before anything is written into it."""
  _check_writable(workdir, "workdir", "pass a writable --workdir")


def _written_fingerprint(config_path: str) -> str | None:
  with open(config_path) as f:
    first = f.readline()
  return first.split(":", 1)[1].strip() if first.startswith("# fingerprint:") else None


_SAFETENSORS_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
                         "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def check_safetensors_file(path: str) -> None:
  """Raises ``InputError`` naming ``path`` unless its header parses and every tensor's bytes lie inside the file
  with the size its dtype and shape need (a truncated download or a partial copy fails here, before any read)."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    prefix = f.read(8)
    if len(prefix) < 8:
      raise InputError(f"{path} is truncated ({size} bytes, no safetensors header); copy the file again.")
    header_len = int.from_bytes(prefix, "little")
    if 8 + header_len > size:
      raise InputError(f"{path} is truncated: its header needs {8 + header_len} bytes, the file holds {size}; copy "
                       "the file again.")
    try:
      header = json.loads(f.read(header_len))
      if not isinstance(header, dict):
        raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
      raise InputError(f"{path} is not a safetensors file (unreadable header: {e}).") from None
  end = 0
  for name, info in header.items():
    if name == "__metadata__":
      continue
    try:
      begin, stop = (int(x) for x in info["data_offsets"])
      count = int(np.prod([int(d) for d in info["shape"]], dtype=np.int64))
      itemsize = _SAFETENSORS_ITEMSIZE[info["dtype"]]
    except (KeyError, TypeError, ValueError):
      raise InputError(f"{path}: tensor {name!r} has a malformed header entry {info!r}.") from None
    if stop - begin != count * itemsize or begin < 0:
      raise InputError(f"{path}: tensor {name!r} ({info['dtype']} {info['shape']}) spans {stop - begin} bytes, "
                       f"needs {count * itemsize}; the file is damaged.")
    end = max(end, stop)
  if 8 + header_len + end > size:
    raise InputError(f"{path} is truncated: its tensors need {8 + header_len + end} bytes, the file holds {size}; "
                     "copy the file again.")


def check_model_folder(folder: str, what: str, *, tokenizer: bool = True) -> None:
  """Raises ``InputError`` unless ``folder`` is a complete HF model folder: ``config.json`` (a JSON object), the
  safetensors weights (one file, or an index with all its shards, each checked by ``check_safetensors_file``) and,
  with ``tokenizer``, ``tokenizer.json``. ``what`` names the setting in the message."""
  if not os.path.isdir(folder):
    raise InputError(f"{what}={folder!r} is not a folder; point it at an HF model folder (config.json, "
                     "model.safetensors, tokenizer.json).")
  config_file = os.path.join(folder, "config.json")
  try:
    with open(config_file) as f:
      if not isinstance(json.load(f), dict):
        raise ValueError("not a JSON object")
  except FileNotFoundError:
    raise InputError(f"{what}={folder!r} has no config.json; point it at an HF model folder.") from None
  except (OSError, ValueError) as e:
    raise InputError(f"{config_file} is unreadable ({e}); copy the model folder again.") from None
  if tokenizer and not os.path.isfile(os.path.join(folder, "tokenizer.json")):
    raise InputError(f"{what}={folder!r} has no tokenizer.json; save the tokenizer into it "
                     "(tokenizer.save_pretrained(folder)).")
  single, index = os.path.join(folder, "model.safetensors"), os.path.join(folder, "model.safetensors.index.json")
  if os.path.isfile(single):
    shards = [single]
  elif os.path.isfile(index):
    try:
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
      shards = sorted({os.path.join(folder, name) for name in weight_map.values()})
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
      raise InputError(f"{index} is unreadable or has no weight_map ({e}).") from None
  else:
    raise InputError(f"{what}={folder!r} has no model.safetensors (nor model.safetensors.index.json); save the "
                     "weights into it as safetensors.")
  for shard in shards:
    if not os.path.isfile(shard):
      raise InputError(f"{shard} is listed in {index} but missing; copy the model folder again.")
    check_safetensors_file(shard)


def _one_line(error: BaseException) -> str:
  lines = [line.strip(" -") for line in str(error).strip().splitlines() if line.strip()]
  return "; ".join(lines).replace(":; ", ": ")[:600] or type(error).__name__


def _own_tokenizer(cfg: TrainConfig):
  """The task's own tokenizer (a run without ``init_from`` warm-starts a fresh model on it); ``InputError`` if none."""
  tokenizer = task_tokenizer(cfg.task)
  if tokenizer is None:
    raise InputError(f"{type(cfg.task).__name__} brings no tokenizer: set PolicyConfig.init_from to a model folder.")
  return tokenizer


def _warm_start_folder(cfg: TrainConfig, tokenizer, cache_dir: str) -> str:
  key = warm_start_key(cfg.task, cfg.policy, cfg.warm_start, cfg.rollout, cfg.seed, len(tokenizer))
  return os.path.join(cache_dir, f"warmstart-{key}")


def preflight(cfg: TrainConfig, workdir: str, cache_dir: str, fingerprint: str) -> None:
  """Every check of the run's paths, before anything is loaded or written (module docstring); ``InputError``.

  The workdir (created, writable, and not holding another run: a ``config.gin`` of another fingerprint is refused
  unless its run never wrote a metrics row — a failed start, which is replaced), then the model folder
  (``init_from``, or a cached warm start), then the warm-start cache (writable when it must be written).
  """
  check_workdir(workdir)
  config_path = os.path.join(workdir, "config.gin")
  if os.path.exists(config_path) and _written_fingerprint(config_path) != fingerprint:
    if not os.path.isdir(os.path.join(workdir, "checkpoints")) or not os.listdir(os.path.join(workdir, "checkpoints")):
      metrics = os.path.join(workdir, "metrics.jsonl")
      if os.path.exists(metrics) and read_metrics(metrics):
        raise WorkdirError(f"{workdir} holds another run's config.gin and metrics (and no checkpoint to resume); "
                           "use a new --workdir or delete that folder.")
  if cfg.policy.init_from:
    check_model_folder(cfg.policy.init_from, "PolicyConfig.init_from")
  else:
    folder = _warm_start_folder(cfg, _own_tokenizer(cfg), cache_dir)
    if os.path.exists(os.path.join(folder, "model.safetensors")):
      check_model_folder(folder, "the cached warm start", tokenizer=False)
    else:
      _check_writable(cache_dir, "cache dir", "pass a writable --cache_dir (warm starts are cached there)")


def load_policy(cfg: TrainConfig, cache_dir: str, log: Callable[[str], None], mesh=None):
  """``(tokenizer, model)``: from ``policy.init_from``, else a fresh model warm-started on the task's solutions.

  With ``mesh`` an ``init_from`` model is read straight onto it (``capo_jax.sharding.load_shardings``: each device
  reads its own block of every parameter).

  A folder that passed ``check_model_folder`` but still fails to load (shapes against config.json, tokenizer against
  the embedding, non-finite weights) raises ``InputError`` naming it.
  """
  folder = cfg.policy.init_from
  try:
    if folder:
      from capo_jax.tokenization import check_tokenizer_fits, load_tokenizer  # pylint: disable=g-import-not-at-top
      shardings = None
      if mesh is not None:
        from capo_jax.models import ModelConfig  # pylint: disable=g-import-not-at-top
        with open(os.path.join(folder, "config.json")) as f:
          shardings = sharding.load_shardings(ModelConfig.from_hf_dict(json.load(f)), mesh)
      tokenizer = load_tokenizer(folder)
      model = load_hf(folder, dtype=cfg.policy.dtype, param_dtype=cfg.policy.param_dtype, remat=cfg.policy.remat,
                      shardings=shardings)
      check_tokenizer_fits(tokenizer, model)
    else:
      tokenizer = _own_tokenizer(cfg)
      folder = _warm_start_folder(cfg, tokenizer, cache_dir)
      model, _ = warm_start(cfg.task, tokenizer, cfg.policy, cfg.warm_start, cfg.rollout, seed=cfg.seed,
                            cache_dir=cache_dir, log=log)
  except (ValueError, OSError, safetensors.SafetensorError) as e:
    if isinstance(e, InputError):
      raise
    what = "PolicyConfig.init_from" if cfg.policy.init_from else "the cached warm start"
    fix = "fix the folder or point init_from at another" if cfg.policy.init_from else "delete it to train it again"
    raise InputError(f"{what} {folder!r} cannot be loaded: {_one_line(e)}; {fix}.") from e
  bad = first_nonfinite(nnx.state(model))
  if bad is not None:
    raise InputError(f"the weights of {folder!r} hold NaN or inf (parameter {bad}); use a finite checkpoint.")
  return tokenizer, model


def prompt_ready_task(task: Any, tokenizer) -> Any:
  """The task with prompts built for ``tokenizer`` (chat template, length filter) when it needs one
  (``task.with_tokenizer``); else the task itself."""
  bind = getattr(task, "with_tokenizer", None)
  return bind(tokenizer) if callable(bind) else task


def learn(step_fn, state: TrainState, batch: learner.SequenceBatch, num_iterations: int, num_minibatches: int):
  """``num_iterations`` passes of ``num_minibatches`` learner steps over ``batch``; ``(params, opt_state, metrics)``
  with the metrics averaged over the updates, except ``skipped_nonfinite``: the number of skipped updates."""
  params, opt_state = state.params, state.opt_state
  size = batch.tokens_bs.shape[0] // num_minibatches
  all_metrics = []
  for _ in range(num_iterations):
    for m in range(num_minibatches):
      sub = jax.tree.map(lambda x: x[m * size:(m + 1) * size], batch) if num_minibatches > 1 else batch
      params, opt_state, metrics = step_fn(params, opt_state, sub)
      all_metrics.append(metrics)
  metrics = jax.tree.map(lambda *xs: jnp.mean(jnp.stack(xs)), *all_metrics)
  metrics["skipped_nonfinite"] = sum(m["skipped_nonfinite"] for m in all_metrics)
  jax.block_until_ready(params)
  return params, opt_state, metrics


# Per-step scalars of the learner's guard, sampler/learner agreement, mismatch corrections and ratio extremes.
RELIABILITY_METRIC_KEYS = ("skipped_nonfinite", "prompt_group_mismatch", "sampler_learner_kl",
                           "sampler_learner_max_abs_diff", "ratio_min", "ratio_max", "tis_weight_mean",
                           "tis_truncated_fraction", "seq_mask_dropped_fraction")


def step_row(cfg: TrainConfig, step: int, result: RolloutResult, metrics: dict[str, Any], lr: float,
             learner_s: float, opt_state: Any) -> dict[str, Any]:
  """The ``metrics.jsonl`` row of a finished step: what the rollout and the learner measured."""
  m = {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}
  fullnet = cfg.curvature.mode == "full_network"
  masking = learner.FULLNET_PREFIX if fullnet else ""
  row = {
      "step": step,
      "completions": step * cfg.rollout.batch_size,
      "reward_mean": float(result.rewards_b.mean()),
      "reward_std": float(result.rewards_b.std()),
      "kept_groups": float(result.row_weight_b.mean()),
      "completion_tokens_mean": result.num_completion_tokens / len(result.rewards_b),
      "loss": m["loss"],
      "grad_norm": m["grad_norm"],
      "update_norm": m["update_norm"],
      "lr": lr,
      "optimizer_updates": components.optimizer_count(opt_state),
      "entropy": m.get("entropy"),
      "kl": m.get("kl"),
      "clip_fraction": m.get("clip_fraction"),
      "rejected_token_fraction": m.get(masking + "rejected_fraction", 0.0),
      "rejected_by_fisher": m.get(masking + "rejected_by_fisher", 0.0),
      "rejected_by_hessian": m.get(masking + "rejected_by_hessian", 0.0),
      "rollout_s": result.seconds,
      "learner_s": learner_s,
      "step_s": result.seconds + learner_s,
      "tokens_per_s": result.num_completion_tokens / max(result.seconds + learner_s, 1e-9),
  }
  for k in curvature.METRIC_KEYS:
    if k.startswith("m_"):
      row[k] = m.get(k)
      if fullnet:
        row[learner.FULLNET_PREFIX + k] = m.get(learner.FULLNET_PREFIX + k)
  for k in (*learner.FULLNET_METRIC_KEYS, *learner.SUBSET_METRIC_KEYS, *RELIABILITY_METRIC_KEYS):
    if k in m:
      row[k] = m[k]
  tr_state = components.trust_region_state(opt_state)
  if tr_state is not None:
    row["predicted_kl"] = float(tr_state.predicted_kl)
    row["trust_region_scale"] = float(tr_state.scale)
  return row


class _RowsInMemory:
  """The metrics writer of a process other than 0: keeps the rows (as ``metrics.jsonl`` would read back), writes
  nothing."""

  def __init__(self, rows: list[dict[str, Any]]):
    self.rows = rows

  def write(self, row) -> None:
    self.rows.append(json.loads(format_row(row)))

  def offset(self) -> int:
    return 0

  def close(self) -> None:
    pass


def run_mesh(cfg: TrainConfig):
  """The run's device mesh (``TrainConfig.mesh`` over every device of every process), or None on one device."""
  mesh = sharding.make_mesh(cfg.mesh)
  if mesh.size == 1:
    return None
  rows = mesh.shape["data"] * mesh.shape["fsdp"]
  for what, count in (("RolloutConfig.batch_size (prompts_per_step × group_size)", cfg.rollout.batch_size),
                      ("the minibatch (batch_size / OptimizerConfig.num_minibatches)",
                       cfg.rollout.batch_size // cfg.optimizer.num_minibatches)):
    if count % rows:
      raise InputError(f"{what} = {count} is not a multiple of MeshConfig data × fsdp = {rows}, which split its "
                       "rows; change prompts_per_step or the mesh (e.g. MeshConfig.tensor).")
  return mesh


def train(cfg: TrainConfig, workdir: str, *, config_text: str = "", fingerprint: str | None = None,
          cache_dir: str | None = None, log: Callable[[str], None] = print, stop_after: int | None = None,
          after_step: Callable[[int], None] | None = None, allow_fallback: bool = False,
          fault: Callable[[str, int], None] | None = None,
          fault_nan_steps: Collection[int] = ()) -> list[dict[str, Any]]:
  """Runs (or resumes) the RL job in ``workdir``; returns the rows of ``metrics.jsonl``.

  Args:
    cfg: the run.
    workdir: run folder (config.gin, metrics.jsonl, tensorboard/, checkpoints/, plots/).
    config_text: the operative gin config, written to ``config.gin`` (default: ``repr(cfg)``).
    fingerprint: the run's resume identity (``config.config_fingerprint`` of its explicit gin bindings; default: of
      ``repr(cfg)``): resuming a workdir that holds another fingerprint is refused before anything is touched.
    cache_dir: where warm starts are cached (default ``<workdir>/../cache``).
    log: where progress, warnings and repairs are reported.
    stop_after: stop (as if killed) after this many RL steps of this invocation — for tests.
    after_step: called with the step number after its metrics row is written (fault injection in tests).
    allow_fallback: resume from the newest checkpoint that passes verification, moving failing ones aside
      (``capo_jax.checkpointing``); without it a failing newest checkpoint raises ``CheckpointCorruptError``.
    fault: fault injection (tests, docs/RELIABILITY.md): called as ``fault(phase, step)`` at the start of each
      phase of ``FAULT_PHASES`` (``setup`` once per invocation, with step 0).
    fault_nan_steps: fault injection: the RL steps (1-based) whose batch gets NaN advantages, so that their loss
      and gradient are NaN.

  Raises:
    InputError / WorkdirError: a bad path or file (before anything is written).
    CheckpointMismatchError / CheckpointCorruptError: the workdir's checkpoints cannot be resumed.
    DivergedError: ``cfg.reliability.max_consecutive_skips`` steps in a row with a skipped non-finite update.
  """
  fault = fault or (lambda phase, step: None)
  text = config_text or repr(cfg)
  fingerprint = fingerprint or config_fingerprint(repr(cfg))
  cache_dir = cache_dir or os.path.join(os.path.dirname(os.path.abspath(workdir)), "cache")
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), fingerprint, max_to_keep=cfg.checkpoint.max_to_keep,
                      log=log)
  ckpt.check_compatible()  # before writing anything
  ckpt.precheck(allow_fallback=allow_fallback)
  preflight(cfg, workdir, cache_dir, fingerprint)
  mesh = run_mesh(cfg)
  primary = sharding.is_primary()
  resuming = ckpt.latest_step() is not None
  config_path = os.path.join(workdir, "config.gin")

  # Setup: the policy, the reference, the jitted pieces. Process 0 loads first (it writes a warm start to the
  # cache), the others after it, from the cache.
  fault("setup", 0)
  if primary:
    tokenizer, model = load_policy(cfg, cache_dir, log, mesh)
  sharding.sync("capo-load-policy")
  if not primary:
    tokenizer, model = load_policy(cfg, cache_dir, lambda _: None, mesh)
  task = prompt_ready_task(cfg.task, tokenizer)
  graphdef, ref_params = nnx.split(model)
  if mesh is None:
    params = jax.tree.map(jnp.copy, ref_params)  # the learner donates its params; the reference stays intact
  else:
    ref_params = sharding.on_mesh(ref_params, mesh)
    params = sharding.copy_params(ref_params, mesh)

  group = components.prompt_group_size(cfg)

  def logits_fn(params, batch: learner.SequenceBatch):
    return learner.completion_logits(graphdef, params, batch, cfg.rollout.max_new_tokens, prompt_group_size=group)

  optimizer, capo = components.build_optimizer(cfg, logits_fn)
  learner_step = components.make_learner_step(cfg, graphdef, optimizer, capo)
  rollout = Rollout(graphdef, task, tokenizer, cfg.rollout, cfg.loss, track_kl=cfg.loss.track_kl, mesh=mesh,
                    prompt_group_size=group, decode_weights=cfg.mesh.decode_weights)
  evaluator = Evaluator(task, tokenizer, cfg.eval, max_prompt_length=cfg.rollout.max_prompt_length,
                        max_new_tokens=cfg.rollout.max_new_tokens, mesh=mesh, decode_weights=cfg.mesh.decode_weights)
  schedule = learning_rate_schedule(cfg.optimizer, cfg.num_steps)

  key, step0 = jax.random.PRNGKey(cfg.seed), jnp.zeros((), jnp.int32)
  if mesh is None:
    state = TrainState(params, optimizer.init(params), key, step0)
  else:
    learner_step = sharding.MeshLearnerStep(learner_step, mesh)
    key, step0 = sharding.replicate((key, step0), mesh)
    state = TrainState(params, sharding.init_optimizer_state(optimizer, params, mesh), key, step0)
  position, consecutive = 0, 0
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  if resuming:
    state, meta = ckpt.restore(state, allow_fallback=allow_fallback, params_of=lambda s: s.params)
    position, consecutive = int(meta["data_position"]), int(meta.get("consecutive_skips", 0))
    if primary:
      restore_metrics(metrics_path, step=int(meta["step"]), offset=int(meta["metrics_offset"]),
                      sha256=meta.get("files_sha256", {}).get("metrics.jsonl"),
                      saved_copy=ckpt.saved_file(int(meta["step"]), "metrics.jsonl", meta), log=log)
    log(f"resuming from step {int(state.step)} of {workdir}")
  elif primary:
    with open(config_path, "w") as f:
      f.write(f"# fingerprint: {fingerprint}\n{text}")
  start = int(state.step)
  if primary:
    writer = MetricsWriter(workdir, resume=resuming, total_steps=cfg.num_steps, initial_step=start)
  else:
    writer = _RowsInMemory(read_metrics(metrics_path) if resuming and os.path.exists(metrics_path) else [])
  written_rows = (lambda: read_metrics(metrics_path)) if primary else (lambda: writer.rows)

  def evaluate(step: int, params) -> None:
    fault("eval", step)
    row = {"step": step, "completions": step * cfg.rollout.batch_size}
    row.update(evaluator(graphdef, params, jax.random.fold_in(jax.random.PRNGKey(cfg.seed + 1), step)))
    writer.write(row)

  def save(step: int) -> None:
    fault("save", step)
    offset = writer.offset()
    files = {}
    if primary:
      with open(metrics_path, "rb") as f:
        files["metrics.jsonl"] = f.read(offset)
    ckpt.save(step, state, {"metrics_offset": offset, "data_position": position, "consecutive_skips": consecutive},
              files=files, params=state.params)

  try:
    if start == 0:
      evaluate(0, state.params)
    for step in range(start, cfg.num_steps):
      if stop_after is not None and step - start >= stop_after:
        return written_rows()
      done = step + 1
      fault("rollout", done)
      key, rollout_key = jax.random.split(state.key)
      problems = task.train_problems(position, cfg.rollout.prompts_per_step)
      result = rollout(state.params, ref_params, problems, rollout_key)
      batch = result.batch
      if done in fault_nan_steps:
        batch = batch._replace(advantages_b=jnp.full_like(batch.advantages_b, jnp.nan))
      fault("learner", done)
      lr = float(schedule(components.optimizer_count(state.opt_state)))
      t0 = time.time()
      params, opt_state, metrics = learn(learner_step, state, batch, cfg.optimizer.num_iterations,
                                         cfg.optimizer.num_minibatches)
      step_done = jnp.asarray(done, jnp.int32) if mesh is None else sharding.replicate(np.int32(done), mesh)
      state = TrainState(params, opt_state, key, step_done)
      position += cfg.rollout.prompts_per_step
      row = step_row(cfg, done, result, metrics, lr, time.time() - t0, state.opt_state)
      writer.write(row)
      consecutive = _count_skips(cfg, done, row, consecutive, ckpt, log)
      if done % cfg.eval.every == 0 or done == cfg.num_steps:
        evaluate(done, state.params)
      if done % cfg.checkpoint.every == 0 or done == cfg.num_steps:
        save(done)
      if after_step is not None:
        after_step(done)
  finally:
    writer.close()
    ckpt.close()
    if callable(getattr(task, "close", None)):
      task.close()
  rows = written_rows()
  if primary:
    plot_run(rows, os.path.join(workdir, "plots"), title=f"{cfg.name} lr={cfg.optimizer.learning_rate:g}")
  return rows


def _count_skips(cfg: TrainConfig, step: int, row: dict[str, Any], consecutive: int, ckpt: Checkpointer,
                 log: Callable[[str], None]) -> int:
  """The new count of consecutive steps with a skipped update; warns on a skip, raises ``DivergedError`` at the
  limit."""
  skipped = row.get("skipped_nonfinite") or 0
  if not skipped:
    return 0
  consecutive += 1
  limit = cfg.reliability.max_consecutive_skips
  mismatch = row.get("prompt_group_mismatch") or 0
  cause = (f" {mismatch:.0%} of the rows hold a prompt that differs from their group's first row (the learner runs "
           "each group's prompt once: OptimizerConfig.shared_prompts); the rollout's rows must come in groups of "
           "group_size consecutive rows of one prompt, or set OptimizerConfig.shared_prompts = False."
           if mismatch else "")
  log(f"warning: step {step}: non-finite loss, gradient or update (loss={row.get('loss')}, grad_norm="
      f"{row.get('grad_norm')}); {skipped:g} update(s) skipped, parameters and optimizer state unchanged "
      f"({consecutive}/{limit} consecutive).{cause}")
  if consecutive >= limit:
    last = ckpt.latest_step()
    where = f"checkpoint {last} ({ckpt.path(last)})" if last is not None else "no checkpoint (none was saved yet)"
    raise DivergedError(
        f"stopped at step {step}: {consecutive} consecutive steps had a non-finite loss, gradient or update (loss="
        f"{row.get('loss')}). The last good state is {where}. "
        + (cause.strip() + " " if mismatch else "Lower OptimizerConfig.learning_rate, keep max_grad_norm set, or "
           "check the task's rewards; ")
        + "ReliabilityConfig.max_consecutive_skips sets the limit.")
  return consecutive


def describe(cfg: TrainConfig) -> str:
  """A one-line summary of a run's method for the console."""
  c = cfg.curvature
  parts = [cfg.name, f"{cfg.loss.advantage_estimator}/{cfg.loss.aggregation}", f"lr={cfg.optimizer.learning_rate:g}",
           f"curvature={c.mode}"]
  if c.step_control != "none":
    parts.append(f"{c.step_control}(max_kl={c.max_kl:g})")
  return " ".join(parts) + f" task={type(cfg.task).__name__}"


__all__ = ["FAULT_PHASES", "RELIABILITY_METRIC_KEYS", "TIMING_KEYS", "DivergedError", "InputError", "TrainState",
           "WorkdirError", "check_model_folder", "check_safetensors_file", "check_workdir", "describe", "learn",
           "load_policy", "preflight", "run_mesh", "step_row", "train"]
