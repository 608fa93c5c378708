"""The RL host loop: setup, then for each step rollout → learner update → log → evaluate → checkpoint.

Everything below this loop is a jitted function of explicit pytrees (the sampler, the learner step that
``components.make_learner_step`` picks for ``CurvatureConfig.mode``, the optax chain); the loop only moves arrays,
calls the task's reward and writes logs and checkpoints. Its state is ``TrainState(params, opt_state, key, step)``,
checkpointed with Orbax together with the task's data position and the byte offset of ``metrics.jsonl``, so a killed
run resumes exactly. The trainer imports no concrete task: ``TrainConfig.task`` is any ``capo_jax.tasks.Task``.
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from capo_jax import components
from capo_jax import curvature
from capo_jax import learner
from capo_jax.checkpointing import Checkpointer
from capo_jax.config import TrainConfig, config_fingerprint, learning_rate_schedule
from capo_jax.evaluation import Evaluator
from capo_jax.models.hf import load_hf
from capo_jax.plots import plot_run
from capo_jax.rollout import Rollout, RolloutResult
from capo_jax.run_logging import MetricsWriter, read_metrics
from capo_jax.tasks.base import task_tokenizer
from capo_jax.tasks.warm_start import warm_start

# Wall-clock fields: measured, so they differ between an interrupted and an uninterrupted run.
TIMING_KEYS = ("rollout_s", "learner_s", "eval_s", "step_s", "tokens_per_s", "wall_s")


class TrainState(NamedTuple):
  """Everything the loop carries between steps (a pytree; checkpointed whole)."""
  params: Any
  opt_state: Any
  key: jax.Array
  step: jax.Array


class WorkdirError(RuntimeError):
  """The workdir cannot be used (unwritable, or holding another run)."""


def check_workdir(workdir: str) -> None:
  """Creates ``workdir`` if needed and proves it writable, before anything is written into it."""
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = tempfile.NamedTemporaryFile(dir=workdir, prefix=".write-probe-", delete=True)
    probe.close()
  except OSError as e:
    raise WorkdirError(f"workdir {workdir!r} is not writable ({e.strerror}); pass a writable --workdir.") from e


def _written_fingerprint(config_path: str) -> str | None:
  with open(config_path) as f:
    first = f.readline()
  return first.split(":", 1)[1].strip() if first.startswith("# fingerprint:") else None


def load_policy(cfg: TrainConfig, cache_dir: str, log: Callable[[str], None]):
  """``(tokenizer, model)``: from ``policy.init_from``, else a fresh model warm-started on the task's solutions."""
  if cfg.policy.init_from:
    from capo_jax.tokenization import load_tokenizer  # pylint: disable=g-import-not-at-top
    return load_tokenizer(cfg.policy.init_from), load_hf(cfg.policy.init_from)
  tokenizer = task_tokenizer(cfg.task)
  if tokenizer is None:
    raise ValueError(f"{type(cfg.task).__name__} brings no tokenizer: set PolicyConfig.init_from to a model folder.")
  model, _ = warm_start(cfg.task, tokenizer, cfg.policy, cfg.warm_start, cfg.rollout, seed=cfg.seed,
                        cache_dir=cache_dir, log=log)
  return tokenizer, model


def prompt_ready_task(task: Any, tokenizer) -> Any:
  """The task with prompts built for ``tokenizer`` (chat template, length filter) when it needs one
  (``task.with_tokenizer``); else the task itself."""
  bind = getattr(task, "with_tokenizer", None)
  return bind(tokenizer) if callable(bind) else task


def learn(step_fn, state: TrainState, batch: learner.SequenceBatch, num_iterations: int, num_minibatches: int):
  """``num_iterations`` passes of ``num_minibatches`` learner steps over ``batch``; ``(params, opt_state, metrics)``
  with the metrics averaged over the updates."""
  params, opt_state = state.params, state.opt_state
  size = batch.tokens_bs.shape[0] // num_minibatches
  all_metrics = []
  for _ in range(num_iterations):
    for m in range(num_minibatches):
      sub = jax.tree.map(lambda x: x[m * size:(m + 1) * size], batch) if num_minibatches > 1 else batch
      params, opt_state, metrics = step_fn(params, opt_state, sub)
      all_metrics.append(metrics)
  metrics = jax.tree.map(lambda *xs: jnp.mean(jnp.stack(xs)), *all_metrics)
  jax.block_until_ready(params)
  return params, opt_state, metrics


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
  for k in (*learner.FULLNET_METRIC_KEYS, *learner.SUBSET_METRIC_KEYS):
    if k in m:
      row[k] = m[k]
  tr_state = components.trust_region_state(opt_state)
  if tr_state is not None:
    row["predicted_kl"] = float(tr_state.predicted_kl)
    row["trust_region_scale"] = float(tr_state.scale)
  return row


def train(cfg: TrainConfig, workdir: str, *, config_text: str = "", fingerprint: str | None = None,
          cache_dir: str | None = None, log: Callable[[str], None] = print, stop_after: int | None = None,
          after_step: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
  """Runs (or resumes) the RL job in ``workdir``; returns the rows of ``metrics.jsonl``.

  Args:
    cfg: the run.
    workdir: run folder (config.gin, metrics.jsonl, tensorboard/, checkpoints/, plots/).
    config_text: the operative gin config, written to ``config.gin`` (default: ``repr(cfg)``).
    fingerprint: the run's resume identity (``config.config_fingerprint`` of its explicit gin bindings; default: of
      ``repr(cfg)``): resuming a workdir that holds another fingerprint is refused before anything is touched.
    cache_dir: where warm starts are cached (default ``<workdir>/../cache``).
    stop_after: stop (as if killed) after this many RL steps of this invocation — for tests.
    after_step: called with the step number after its metrics row is written (fault injection in tests).
  """
  check_workdir(workdir)
  text = config_text or repr(cfg)
  fingerprint = fingerprint or config_fingerprint(repr(cfg))
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), fingerprint, max_to_keep=cfg.checkpoint.max_to_keep)
  ckpt.check_compatible()  # before writing anything
  resuming = ckpt.latest_step() is not None
  config_path = os.path.join(workdir, "config.gin")
  if not resuming and os.path.exists(config_path) and _written_fingerprint(config_path) != fingerprint:
    raise WorkdirError(f"{workdir} holds another run's config.gin (and no checkpoint to resume); use a new "
                       "--workdir or delete that folder.")
  cache_dir = cache_dir or os.path.join(os.path.dirname(os.path.abspath(workdir)), "cache")

  # Setup: the policy, the reference, the jitted pieces.
  tokenizer, model = load_policy(cfg, cache_dir, log)
  task = prompt_ready_task(cfg.task, tokenizer)
  graphdef, ref_params = nnx.split(model)
  params = jax.tree.map(jnp.copy, ref_params)  # the learner donates its params; the reference stays intact

  def logits_fn(params, batch: learner.SequenceBatch):
    return learner.completion_logits(graphdef, params, batch, cfg.rollout.max_new_tokens)

  optimizer, capo = components.build_optimizer(cfg, logits_fn)
  learner_step = components.make_learner_step(cfg, graphdef, optimizer, capo)
  rollout = Rollout(graphdef, task, tokenizer, cfg.rollout, cfg.loss)
  evaluator = Evaluator(task, tokenizer, cfg.eval, max_prompt_length=cfg.rollout.max_prompt_length,
                        max_new_tokens=cfg.rollout.max_new_tokens)
  schedule = learning_rate_schedule(cfg.optimizer, cfg.num_steps)

  state = TrainState(params, optimizer.init(params), jax.random.PRNGKey(cfg.seed), jnp.zeros((), jnp.int32))
  position, metrics_offset = 0, None
  if resuming:
    state, meta = ckpt.restore(state)
    metrics_offset, position = int(meta["metrics_offset"]), int(meta["data_position"])
    log(f"resuming from step {int(state.step)} of {workdir}")
  else:
    with open(config_path, "w") as f:
      f.write(f"# fingerprint: {fingerprint}\n{text}")
  start = int(state.step)
  writer = MetricsWriter(workdir, resume_offset=metrics_offset, total_steps=cfg.num_steps, initial_step=start)

  def evaluate(step: int, params) -> None:
    row = {"step": step, "completions": step * cfg.rollout.batch_size}
    row.update(evaluator(graphdef, params, jax.random.fold_in(jax.random.PRNGKey(cfg.seed + 1), step)))
    writer.write(row)

  try:
    if start == 0:
      evaluate(0, state.params)
    for step in range(start, cfg.num_steps):
      if stop_after is not None and step - start >= stop_after:
        return read_metrics(writer.path)
      key, rollout_key = jax.random.split(state.key)
      problems = task.train_problems(position, cfg.rollout.prompts_per_step)
      result = rollout(state.params, ref_params, problems, rollout_key)
      lr = float(schedule(components.optimizer_count(state.opt_state)))
      t0 = time.time()
      params, opt_state, metrics = learn(learner_step, state, result.batch, cfg.optimizer.num_iterations,
                                         cfg.optimizer.num_minibatches)
      state = TrainState(params, opt_state, key, jnp.asarray(step + 1, jnp.int32))
      position += cfg.rollout.prompts_per_step
      done = step + 1
      writer.write(step_row(cfg, done, result, metrics, lr, time.time() - t0, state.opt_state))
      if done % cfg.eval.every == 0 or done == cfg.num_steps:
        evaluate(done, state.params)
      if done % cfg.checkpoint.every == 0 or done == cfg.num_steps:
        ckpt.save(done, state, {"metrics_offset": writer.offset(), "data_position": position})
      if after_step is not None:
        after_step(done)
  finally:
    writer.close()
    ckpt.close()
    if callable(getattr(task, "close", None)):
      task.close()
  rows = read_metrics(os.path.join(workdir, "metrics.jsonl"))
  plot_run(rows, os.path.join(workdir, "plots"),
           title=f"{cfg.name} lr={cfg.optimizer.learning_rate:g}")
  return rows


def describe(cfg: TrainConfig) -> str:
  """A one-line summary of a run's method for the console."""
  c = cfg.curvature
  parts = [cfg.name, f"{cfg.loss.advantage_estimator}/{cfg.loss.aggregation}", f"lr={cfg.optimizer.learning_rate:g}",
           f"curvature={c.mode}"]
  if c.step_control != "none":
    parts.append(f"{c.step_control}(max_kl={c.max_kl:g})")
  return " ".join(parts) + f" task={type(cfg.task).__name__}"


__all__ = ["TIMING_KEYS", "TrainState", "WorkdirError", "check_workdir", "describe", "learn", "load_policy",
           "step_row", "train"]
