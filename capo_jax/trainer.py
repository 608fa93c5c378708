"""The RL host loop: prompts → rollouts → rewards → advantages → learner steps → metrics, evals, checkpoints.

Everything below this loop is a jitted function of explicit pytrees (``capo_jax.sampling.sample``, the learner
step of ``capo_jax.learner`` that ``TrainConfig.curvature_model`` picks, the optax chain with CAPO's
``masked_transform``); the loop itself only moves arrays, decodes text, calls the reward function and writes
logs/checkpoints. Its whole state is ``TrainState(params, opt_state, key, step)``: checkpointed with Orbax
together with the data position (the task is a pure function of the step) and the byte offset of ``metrics.jsonl``,
so a killed run resumes exactly.

``TrainConfig`` holds every knob (gin-configurable: ``TrainConfig.learning_rate = 1e-4`` in a .gin file).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from typing import Any, Callable, NamedTuple

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from capo_jax import advantages as adv_lib
from capo_jax import curvature
from capo_jax import learner
from capo_jax import sequences
from capo_jax.checkpointing import Checkpointer
from capo_jax.losses import kl_divergence
from capo_jax.masked_transform import masked_transform
from capo_jax.models import CausalLM, ModelConfig
from capo_jax.models.hf import load_hf, save_hf
from capo_jax.plots import plot_run
from capo_jax.run_logging import MetricsWriter, read_metrics
from capo_jax.sampling.sampler import pad_prompts, sample
from capo_jax.tasks.arith import ArithTask
from capo_jax.tasks.tokenizer import build_arith_tokenizer
from capo_jax.trust_region import trust_region_transform

# Base estimator, loss aggregation and CAPO preset of each algorithm name.
ALGORITHMS = {
    "grpo": ("grpo", "seq-mean-token-mean", None),
    "drgrpo": ("drgrpo", "seq-mean-token-sum-norm", None),
    "reinforce": ("reinforce", "seq-mean-token-mean", None),
    "rloo": ("rloo", "seq-mean-token-mean", None),
    "capo": ("grpo", "seq-mean-token-mean", "capo"),
    "drcapo": ("drgrpo", "seq-mean-token-sum-norm", "drcapo"),
    "reincapo": ("reinforce", "seq-mean-token-mean", "reincapo"),
}

# Wall-clock fields: measured, so they differ between an interrupted and an uninterrupted run.
TIMING_KEYS = ("rollout_s", "learner_s", "eval_s", "tokens_per_s", "wall_s")

# Where CAPO's curvature model lives (``TrainConfig.curvature_model``):
#   "last_layer"    the released token mask (CAPO.md §2): ``masked_transform`` in the optax chain, ``make_rl_step``.
#   "full_network"  the token mask from the full-network directional model along the chain's own proposal Δθ
#                   (CAPO.md §4; ``learner.make_fullnet_rl_step``); CAPO-family algorithms only.
#   "subset"        Theorem 5.1 acceptance of the step's prompt groups (CAPO.md §3; ``learner.make_subset_rl_step``);
#                   any algorithm (a CAPO-family one loses its last-layer mask).
CURVATURE_MODELS = ("last_layer", "full_network", "subset")

# Fields added after runs were started with the default (arith_*) configs. gin's operative config lists every
# field, so a new field would change the config fingerprint of a run started before it existed and refuse its
# resume; a binding of one of these at its default value is left out of what the fingerprint and the workdir check
# compare (``comparable_config``).
LATER_FIELDS = ("curvature_model", "fullnet_second_order", "subset_delta_h", "subset_delta_f")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """All knobs of a run. Defaults: the embedded arithmetic task, a small Qwen2-family model, GRPO."""
  algorithm: str = "grpo"
  seed: int = 0
  # Task (the embedded default) and model.
  task_difficulty: int = 0
  task_seed: int = 0
  tokenizer_vocab_size: int = 1024
  hidden_size: int = 128
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 2
  intermediate_size: int = 384
  tie_word_embeddings: bool = False
  init_from: str | None = None  # an HF folder (config.json + safetensors + tokenizer.json) instead of the warm start
  # Supervised warm start (cached under cache_dir; reruns skip it).
  warmstart_steps: int = 600
  warmstart_batch_size: int = 64
  warmstart_learning_rate: float = 3e-3
  # Rollouts.
  num_steps: int = 60
  prompts_per_step: int = 16
  group_size: int = 8
  max_prompt_length: int = 32
  max_new_tokens: int = 32
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  dynamic_sampling: bool = False  # DAPO: drop groups whose rewards are all equal (zero advantage)
  # Optimizer.
  learning_rate: float = 1e-4
  lr_schedule: str = "constant"  # or "cosine" (with warmup_fraction)
  warmup_fraction: float = 0.0
  adam_b1: float = 0.9
  adam_b2: float = 0.999
  adam_eps: float = 1e-8
  weight_decay: float = 0.0
  max_grad_norm: float | None = 1.0
  # Learner.
  num_iterations: int = 1  # learner passes over each batch (ratios ≠ 1 when > 1)
  num_minibatches: int = 1
  loss_method: str = "clip"
  eps_low: float = 0.2
  eps_high: float | None = None
  kl_coef: float = 0.0
  entropy_coef: float = 0.0
  # CAPO (preset thresholds from the algorithm name unless overridden).
  tau_fisher: float | None = None
  tau_hessian: float | None = None
  capo_top_k: int = 50
  capo_moments: str = "real"
  curvature_monitor: bool = False  # log m_H/m_F for non-CAPO algorithms too (a CAPO mask with τ = ∞)
  trust_region_max_kl: float | None = None  # curvature trust region on the step (CAPO.md §5)
  # Which curvature model acts on the step (``CURVATURE_MODELS`` above; "full_network" and "subset" need
  # num_iterations = num_minibatches = 1). With "full_network" or "subset" the chain holds no last-layer mask; with
  # curvature_monitor it keeps the τ = ∞ last-layer pass, logged as last_layer_m_* (full_network: the unprefixed
  # m_*/rejected_* keys are the full-network statistics) or as the usual m_* keys (subset).
  curvature_model: str = "last_layer"
  # full_network: True = m_H from jax.jvp∘jax.jvp and both rules (τ_F and τ_H); False = one jax.jvp, Fisher rule
  # only (no m_H: the m_hessian_* metrics are null).
  fullnet_second_order: bool = True
  # subset (Theorem 5.1, CAPO.md §3): accept a prompt group iff m_H(Δθ_i) ≥ δ_H and m_F(Δθ_i) ≤ δ_F.
  # δ_H = ω + ½Mr²; the default 0 (ω = 0, M = 0) accepts every group whose step is predicted not to lower the
  # objective. δ_F bounds a group's predicted mean-token KL; the paper gives no value (its bound ω − C√δ_F only
  # certifies improvement when ω ≥ C√δ_F, never with ω = 0), so the default None sets no KL condition (δ_F = ∞).
  subset_delta_h: float = 0.0
  subset_delta_f: float | None = None
  # Evaluation and checkpoints.
  eval_every: int = 20
  eval_problems: int = 256
  eval_k: int = 4  # samples per held-out problem: eval_accuracy = their mean (pass@1, avg@k), plus pass@k
  eval_temperature: float = 0.6  # the paper's evaluation sampling
  eval_top_p: float = 0.95
  checkpoint_every: int = 10

  def __post_init__(self):
    if self.algorithm not in ALGORITHMS:
      raise ValueError(f"unknown algorithm {self.algorithm!r}; choose one of {sorted(ALGORITHMS)}.")
    if self.lr_schedule not in ("constant", "cosine"):
      raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}.")
    for name in ("num_steps", "prompts_per_step", "group_size", "max_new_tokens", "num_iterations",
                 "num_minibatches", "eval_every", "checkpoint_every"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}.")
    if (self.prompts_per_step * self.group_size) % self.num_minibatches:
      raise ValueError(f"num_minibatches={self.num_minibatches} must divide prompts_per_step × group_size = "
                       f"{self.prompts_per_step * self.group_size}.")
    if self.learning_rate <= 0:
      raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}.")
    if self.curvature_model not in CURVATURE_MODELS:
      raise ValueError(f"unknown curvature_model {self.curvature_model!r}; choose one of {list(CURVATURE_MODELS)}.")
    if self.curvature_model != "last_layer":
      if self.curvature_model == "full_network" and self.capo_preset is None:
        capo_family = sorted(k for k, v in ALGORITHMS.items() if v[2] is not None)
        raise ValueError(f"curvature_model='full_network' masks tokens with a CAPO preset's τ_F/τ_H: use a CAPO-family "
                         f"algorithm ({', '.join(capo_family)}), got algorithm={self.algorithm!r}.")
      if self.num_minibatches > 1 or self.num_iterations > 1:
        raise ValueError(f"curvature_model={self.curvature_model!r} with num_minibatches > 1 or num_iterations > 1 is "
                         f"not supported yet (got {self.num_minibatches} and {self.num_iterations}).")
      if self.curvature_model == "subset" and self.trust_region_max_kl is not None:
        raise ValueError("curvature_model='subset' with trust_region_max_kl is not supported yet (each group's "
                         "proposal would need its own trust-region pass).")
    if not (np.isfinite(self.subset_delta_h) and self.subset_delta_h >= 0):
      raise ValueError(f"subset_delta_h must be a finite number ≥ 0 (δ_H = ω + ½Mr²), got {self.subset_delta_h}.")
    if self.subset_delta_f is not None and not self.subset_delta_f > 0:
      raise ValueError(f"subset_delta_f must be > 0 or None (no KL condition), got {self.subset_delta_f}.")

  @property
  def capo_preset(self) -> str | None:
    return ALGORITHMS[self.algorithm][2]


class TrainState(NamedTuple):
  """Everything the loop carries between steps (a pytree; checkpointed whole)."""
  params: Any
  opt_state: Any
  key: jax.Array
  step: jax.Array


# ---------------------------------------------------------------------------------------------------------------
# Building blocks.


def model_config(cfg: TrainConfig, vocab_size: int) -> ModelConfig:
  return ModelConfig(vocab_size=vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                     num_layers=cfg.num_layers, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
                     tie_word_embeddings=cfg.tie_word_embeddings, rope_theta=10000.0, attention_bias=True)


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
  if cfg.lr_schedule == "constant":
    return optax.constant_schedule(cfg.learning_rate)
  total = cfg.num_steps * cfg.num_iterations * cfg.num_minibatches
  warmup = int(cfg.warmup_fraction * total)
  return optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, max(warmup, 1), max(total, warmup + 1), 0.0)


def capo_thresholds(cfg: TrainConfig) -> tuple[float, float]:
  """``(τ_F, τ_H)`` of the algorithm's CAPO preset, each overridden by ``tau_fisher`` / ``tau_hessian`` if set."""
  preset = curvature.preset(cfg.capo_preset)
  return (preset.tau_fisher if cfg.tau_fisher is None else cfg.tau_fisher,
          preset.tau_hessian if cfg.tau_hessian is None else cfg.tau_hessian)


def build_optimizer(cfg: TrainConfig, logits_fn: Callable | None = None):
  """The optax chain: clip → (CAPO's masked_transform around) AdamW → (curvature trust region).

  The last-layer ``masked_transform`` masks with the preset's τ only for ``curvature_model="last_layer"``; otherwise
  (and for non-CAPO algorithms) it is there only with ``curvature_monitor``, with τ = ∞ (it then only logs m_H/m_F).
  Returns ``(optimizer, capo_transform or None)``.
  """
  schedule = learning_rate_schedule(cfg)
  adam = optax.adamw(schedule, b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
  capo = None
  core = adam
  last_layer_mask = cfg.capo_preset is not None and cfg.curvature_model == "last_layer"
  if last_layer_mask or cfg.curvature_monitor:
    if last_layer_mask:
      tau_fisher, tau_hessian = capo_thresholds(cfg)
    else:
      tau_fisher, tau_hessian = float("inf"), float("inf")
    capo = masked_transform(
        adam, tau_fisher=tau_fisher, tau_hessian=tau_hessian,
        learning_rate=schedule, top_k=cfg.capo_top_k, moments=cfg.capo_moments, temperature=cfg.temperature,
        b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps)
    core = capo
  if cfg.trust_region_max_kl is not None:
    core = trust_region_transform(core, max_kl=cfg.trust_region_max_kl, logits_fn=logits_fn,
                                  completion_mask_fn=lambda b: b.completion_mask_bn * b.row_weight_b[:, None],
                                  temperature=cfg.temperature)
  parts = [optax.clip_by_global_norm(cfg.max_grad_norm)] if cfg.max_grad_norm else []
  return optax.chain(*parts, core), capo


def make_learner_step(cfg: TrainConfig, graphdef, optimizer, capo, loss_config: learner.LossConfig):
  """The jitted ``(params, opt_state, batch) -> (params, opt_state, metrics)`` of ``cfg.curvature_model``.

  last_layer: ``make_rl_step`` with CAPO's (or the monitor's) last-layer hook. full_network: ``make_fullnet_rl_step``
  with the preset's τ_F/τ_H (symmetric Hessian rule, sampled-action m_F) and the monitor, if any, as ``monitor_fn``.
  subset: ``make_subset_rl_step`` over the ``prompts_per_step`` prompt groups.
  """
  mask_fn = capo_token_mask_fn(capo) if capo is not None else None
  n_new = cfg.max_new_tokens
  pass_batch = cfg.trust_region_max_kl is not None
  if cfg.curvature_model == "full_network":
    tau_fisher, tau_hessian = capo_thresholds(cfg)
    return learner.make_fullnet_rl_step(
        graphdef, optimizer, loss_config, n_new, tau_fisher=tau_fisher,
        tau_hessian=tau_hessian if cfg.fullnet_second_order else None, second_order=cfg.fullnet_second_order,
        monitor_fn=mask_fn, pass_batch=pass_batch)
  if cfg.curvature_model == "subset":
    return learner.make_subset_rl_step(
        graphdef, optimizer, loss_config, n_new, num_subsets=cfg.prompts_per_step, delta_h=cfg.subset_delta_h,
        delta_f=cfg.subset_delta_f, monitor_fn=mask_fn)
  return learner.make_rl_step(graphdef, optimizer, loss_config, n_new, mask_fn, pass_batch=pass_batch)


def capo_token_mask_fn(capo) -> learner.TokenMaskFn:
  """Adapts ``MaskedTransformation.token_mask_from_hidden`` to the learner's hook: the logits are formed one time
  chunk at a time from the hidden states, as the loss's ``token_logprobs_from_hidden`` does (no [B, N, V] array)."""

  def fn(hidden_bnh, w_vh, targets_bn, advantages_b, completion_mask_bn, opt_state):
    mask_bn, aux = capo.token_mask_from_hidden(opt_state, hidden_bnh, w_vh, targets_bn, advantages_b,
                                               completion_mask_bn)
    return mask_bn, {"capo_aux": aux}, dict(aux.metrics)

  return fn


def _atomic_dir(final: str) -> str:
  os.makedirs(os.path.dirname(final), exist_ok=True)
  return tempfile.mkdtemp(prefix=".tmp-", dir=os.path.dirname(final))


def warm_start(cfg: TrainConfig, tokenizer, task: ArithTask, cache_dir: str, log: Callable[[str], None] = print):
  """The supervised warm start (next-token NLL on worked solutions), cached as an HF folder keyed by its config.

  Returns ``(model, path)``. A rerun with the same model/task/warm-start settings loads the cached folder.
  """
  key_fields = {k: getattr(cfg, k) for k in (
      "task_difficulty", "task_seed", "tokenizer_vocab_size", "hidden_size", "num_layers", "num_heads",
      "num_kv_heads", "intermediate_size", "tie_word_embeddings", "warmstart_steps", "warmstart_batch_size",
      "warmstart_learning_rate", "max_prompt_length", "max_new_tokens", "seed")}
  digest = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:12]
  path = os.path.join(cache_dir, f"warmstart-{digest}")
  if os.path.exists(os.path.join(path, "model.safetensors")):
    log(f"warm start: cached {path}")
    return load_hf(path), path
  log(f"warm start: {cfg.warmstart_steps} supervised steps → {path}")
  model = CausalLM(model_config(cfg, len(tokenizer)), rngs=nnx.Rngs(cfg.seed))
  graphdef, params = nnx.split(model)
  steps = cfg.warmstart_steps
  schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.warmstart_learning_rate, max(1, steps // 10), max(steps, 2),
                                                cfg.warmstart_learning_rate * 0.1)
  opt = optax.adamw(schedule, weight_decay=0.0)
  opt_state = opt.init(params)
  sft_step = learner.make_sft_step(graphdef, opt, cfg.max_new_tokens)
  # Supervised problems come from far along the train stream, away from the problems RL will see first.
  offset = 10**9
  t0 = time.time()
  for i in range(steps):
    problems = task.train_problems(offset + i * cfg.warmstart_batch_size, cfg.warmstart_batch_size)
    prompts = sequences.encode_prompts(tokenizer, [p.prompt for p in problems])
    targets = sequences.encode_targets(tokenizer, [p.solution for p in problems])
    tokens, mask, target_mask = sequences.prompt_target_batch(prompts, targets, cfg.max_prompt_length,
                                                              cfg.max_new_tokens, tokenizer.pad_token_id)
    params, opt_state, nll = sft_step(params, opt_state, tokens, mask, target_mask)
    if i % 100 == 0 or i == steps - 1:
      log(f"warm start step {i}: nll {float(nll):.4f} ({time.time() - t0:.0f}s)")
  model = nnx.merge(graphdef, params)
  tmp = _atomic_dir(path)
  save_hf(model, tmp, tokenizer=tokenizer, overwrite=True)
  if os.path.exists(path):
    shutil.rmtree(path)
  os.replace(tmp, path)
  return model, path


class Evaluator:
  """Held-out accuracy, as the paper evaluates: pass@1 from samples at ``eval_temperature``/``eval_top_p``
  (``eval_accuracy`` = mean over ``eval_k`` samples of each of ``eval_problems`` problems, i.e. avg@k), plus
  ``eval_pass_at_k`` and the greedy (temperature 0) accuracy ``eval_greedy_accuracy`` on the same problems."""

  def __init__(self, cfg: TrainConfig, tokenizer, task: ArithTask):
    self.cfg, self.tokenizer, self.task = cfg, tokenizer, task
    self.problems = task.heldout(cfg.eval_problems)
    prompts = sequences.encode_prompts(tokenizer, [p.prompt for p in self.problems])
    self.tokens, self.mask = pad_prompts(prompts, pad_id=tokenizer.pad_token_id, max_length=cfg.max_prompt_length)

  def _score(self, graphdef, params, key, num_samples, temperature, top_p) -> np.ndarray:
    cfg, tok = self.cfg, self.tokenizer
    out = sample(graphdef, params, self.tokens, self.mask, key, max_new_tokens=cfg.max_new_tokens,
                 num_samples=num_samples, temperature=temperature, top_p=top_p, stop_ids=[tok.eos_token_id],
                 pad_id=tok.pad_token_id)
    texts = decode(tok, out.completion_tokens, out.completion_mask)
    scores = [self.task.reward(t, self.problems[i // num_samples]) for i, t in enumerate(texts)]
    return np.asarray(scores, np.float64).reshape(len(self.problems), num_samples)

  def __call__(self, graphdef, params, key) -> dict[str, float]:
    cfg = self.cfg
    t0 = time.time()
    sampled = self._score(graphdef, params, key, cfg.eval_k, cfg.eval_temperature, cfg.eval_top_p)
    greedy = self._score(graphdef, params, key, 1, 0.0, 1.0)
    return {
        "eval_accuracy": float(sampled.mean()),
        f"eval_pass_at_{cfg.eval_k}": float(sampled.max(axis=1).mean()),
        "eval_greedy_accuracy": float(greedy.mean()),
        "eval_s": time.time() - t0,
    }


def decode(tokenizer, tokens_rn, mask_rn) -> list[str]:
  tokens = np.asarray(tokens_rn) * np.asarray(mask_rn) + tokenizer.pad_token_id * (1 - np.asarray(mask_rn))
  return tokenizer.batch_decode(tokens, skip_special_tokens=True)


def _scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
  return {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}


# ---------------------------------------------------------------------------------------------------------------
# The loop.


def comparable_config(config_text: str) -> str:
  """The operative gin config without the bindings of ``LATER_FIELDS`` at their default values (one per line, as
  ``gin.operative_config_str`` writes them): what two runs' configs must agree on to be the same experiment."""
  defaults = {f"TrainConfig.{f.name}": repr(f.default) for f in dataclasses.fields(TrainConfig)
              if f.name in LATER_FIELDS}
  lines = []
  for line in config_text.splitlines(keepends=True):
    name, sep, value = line.partition(" = ")
    if sep and defaults.get(name.strip()) == value.strip():
      continue
    lines.append(line)
  return "".join(lines)


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


def train(cfg: TrainConfig, workdir: str, *, config_text: str = "", cache_dir: str | None = None,
          log: Callable[[str], None] = print, stop_after: int | None = None,
          after_step: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
  """Runs (or resumes) the RL job in ``workdir``; returns the rows of ``metrics.jsonl``.

  Args:
    cfg: the run's knobs.
    workdir: run folder (config.gin, metrics.jsonl, tensorboard/, checkpoints/, plots/).
    config_text: the operative gin config (saved, and fingerprinted: resuming with another config is refused).
    cache_dir: where warm starts are cached (default ``<workdir>/../cache``).
    stop_after: stop (as if killed) after this many RL steps of this invocation — for tests.
    after_step: called with the step number after its metrics row is written (fault injection in tests).
  """
  from capo_jax.checkpointing import config_fingerprint  # pylint: disable=g-import-not-at-top
  check_workdir(workdir)
  fingerprint = config_fingerprint(comparable_config(config_text) if config_text else repr(cfg))
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), fingerprint)
  ckpt.check_compatible()  # before writing anything
  resuming = ckpt.latest_step() is not None
  config_path = os.path.join(workdir, "config.gin")
  text = config_text or repr(cfg)
  if not resuming:
    if os.path.exists(config_path) and comparable_config(open(config_path).read()) != comparable_config(text):
      raise WorkdirError(f"{workdir} holds another run's config.gin (and no checkpoint to resume); use a new "
                         "--workdir or delete that folder.")
    with open(config_path, "w") as f:
      f.write(text)
  cache_dir = cache_dir or os.path.join(os.path.dirname(os.path.abspath(workdir)), "cache")

  if cfg.init_from:
    from capo_jax.tokenization import load_tokenizer  # pylint: disable=g-import-not-at-top
    tokenizer = load_tokenizer(cfg.init_from)
    model = load_hf(cfg.init_from)
  else:
    tokenizer = build_arith_tokenizer(vocab_size=cfg.tokenizer_vocab_size)
  task = ArithTask(seed=cfg.task_seed, difficulty=cfg.task_difficulty)
  if not cfg.init_from:
    model, _ = warm_start(cfg, tokenizer, task, cache_dir, log)
  graphdef, ref_params = nnx.split(model)

  estimator, aggregation, _ = ALGORITHMS[cfg.algorithm]
  p_len, n_new = cfg.max_prompt_length, cfg.max_new_tokens

  def logits_fn(params, batch: learner.SequenceBatch):
    return learner.completion_logits(graphdef, params, batch, n_new)

  optimizer, capo = build_optimizer(cfg, logits_fn)
  loss_config = learner.LossConfig(
      method=cfg.loss_method, eps_low=cfg.eps_low, eps_high=cfg.eps_high, aggregation=aggregation,
      max_completion_length=n_new, kl_coef=cfg.kl_coef, entropy_coef=cfg.entropy_coef,
      temperature=cfg.temperature, ratio_one=cfg.num_iterations == 1 and cfg.num_minibatches == 1)
  rl_step = make_learner_step(cfg, graphdef, optimizer, capo, loss_config)
  ref_logprobs_fn = jax.jit(lambda tokens, mask: learner.completion_logprobs(
      graphdef, ref_params, tokens, mask, n_new, temperature=cfg.temperature)[0])
  advantages_fn = jax.jit(lambda r: adv_lib.compute_advantages(r, cfg.group_size, estimator))
  schedule = learning_rate_schedule(cfg)
  evaluator = Evaluator(cfg, tokenizer, task)

  state = TrainState(ref_params, optimizer.init(ref_params), jax.random.PRNGKey(cfg.seed), jnp.zeros((), jnp.int32))
  metrics_offset = None
  if resuming:
    state, meta = ckpt.restore(state)
    metrics_offset = int(meta["metrics_offset"])
    log(f"resuming from step {int(state.step)} of {workdir}")
  start = int(state.step)
  writer = MetricsWriter(workdir, resume_offset=metrics_offset, total_steps=cfg.num_steps, initial_step=start)
  completions_per_step = cfg.prompts_per_step * cfg.group_size
  tok = tokenizer

  def save(state):
    ckpt.save(int(state.step), state, {"metrics_offset": writer.offset(), "data_position": int(state.step)})

  def evaluate(step: int):
    row = {"step": step, "completions": step * completions_per_step}
    row.update(evaluator(graphdef, state.params, jax.random.fold_in(jax.random.PRNGKey(cfg.seed + 1), step)))
    writer.write(row)

  try:
    if start == 0:
      evaluate(0)
    for step in range(start, cfg.num_steps):
      if stop_after is not None and step - start >= stop_after:
        return read_metrics(writer.path)
      key, rollout_key = jax.random.split(state.key)
      t0 = time.time()
      problems = task.batch(step, cfg.prompts_per_step)
      prompts = sequences.encode_prompts(tok, [p.prompt for p in problems])
      p_tokens, p_mask = pad_prompts(prompts, pad_id=tok.pad_token_id, max_length=p_len)
      out = sample(graphdef, state.params, p_tokens, p_mask, rollout_key, max_new_tokens=n_new,
                   num_samples=cfg.group_size, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                   stop_ids=[tok.eos_token_id], pad_id=tok.pad_token_id)
      texts = decode(tok, out.completion_tokens, out.completion_mask)
      rewards = np.array([task.reward(t, problems[i // cfg.group_size]) for i, t in enumerate(texts)], np.float32)
      rollout_s = time.time() - t0

      t1 = time.time()
      advantages = advantages_fn(jnp.asarray(rewards))
      row_weight = np.ones(len(rewards), np.float32)
      if cfg.dynamic_sampling:
        groups = rewards.reshape(-1, cfg.group_size)
        row_weight = np.repeat((groups.max(1) > groups.min(1)).astype(np.float32), cfg.group_size)
      tokens = jnp.concatenate([out.prompt_tokens, out.completion_tokens], axis=1)
      attention = jnp.concatenate([out.prompt_mask, out.completion_mask], axis=1)
      ref_lp = (ref_logprobs_fn(tokens, attention) if (cfg.kl_coef > 0 or loss_config.track_kl)
                else jnp.zeros_like(out.logprobs))
      batch = learner.SequenceBatch(tokens, attention, out.completion_mask, advantages, out.logprobs, ref_lp,
                                    jnp.asarray(row_weight))
      params, opt_state = state.params, state.opt_state
      step_metrics = []
      b = tokens.shape[0]
      mb = b // cfg.num_minibatches
      for _ in range(cfg.num_iterations):
        for m in range(cfg.num_minibatches):
          sub = jax.tree.map(lambda x: x[m * mb:(m + 1) * mb], batch) if cfg.num_minibatches > 1 else batch
          params, opt_state, metrics = rl_step(params, opt_state, sub)
          step_metrics.append(metrics)
      metrics = jax.tree.map(lambda *xs: jnp.mean(jnp.stack(xs)), *step_metrics)
      jax.block_until_ready(params)
      learner_s = time.time() - t1
      state = TrainState(params, opt_state, key, jnp.asarray(step + 1, jnp.int32))

      num_tokens = int(np.asarray(out.completion_mask).sum())
      m = _scalar_metrics(metrics)
      row = {
          "step": step + 1,
          "completions": (step + 1) * completions_per_step,
          "reward_mean": float(rewards.mean()),
          "reward_std": float(rewards.std()),
          "kept_groups": float(row_weight.mean()),
          "completion_tokens_mean": num_tokens / len(rewards),
          "loss": m["loss"],
          "grad_norm": m["grad_norm"],
          "update_norm": m["update_norm"],
          "lr": float(schedule(step * cfg.num_iterations * cfg.num_minibatches)),
          "entropy": m.get("entropy"),
          "kl": m.get("kl"),
          "clip_fraction": m.get("clip_fraction"),
          "rejected_token_fraction": m.get("rejected_fraction", 0.0),
          "rejected_by_fisher": m.get("rejected_by_fisher", 0.0),
          "rejected_by_hessian": m.get("rejected_by_hessian", 0.0),
          "rollout_s": rollout_s,
          "learner_s": learner_s,
          "tokens_per_s": num_tokens / max(rollout_s + learner_s, 1e-9),
      }
      for k in curvature.METRIC_KEYS:
        if k.startswith("m_"):
          row[k] = m.get(k)
          if learner.LAST_LAYER_PREFIX + k in m:  # full_network with the monitor: the last-layer statistics
            row[learner.LAST_LAYER_PREFIX + k] = m[learner.LAST_LAYER_PREFIX + k]
      for k in (*learner.FULLNET_METRIC_KEYS, *learner.SUBSET_METRIC_KEYS):
        if k in m:
          row[k] = m[k]
      if cfg.trust_region_max_kl is not None:
        tr_state = _find_trust_region_state(state.opt_state)
        row["predicted_kl"] = float(tr_state.predicted_kl)
        row["trust_region_scale"] = float(tr_state.scale)
      writer.write(row)
      done = step + 1
      if done % cfg.eval_every == 0 or done == cfg.num_steps:
        evaluate(done)
      if done % cfg.checkpoint_every == 0 or done == cfg.num_steps:
        save(state)
      if after_step is not None:
        after_step(done)
  finally:
    writer.close()
    ckpt.close()
  rows = read_metrics(os.path.join(workdir, "metrics.jsonl"))
  plot_run(rows, os.path.join(workdir, "plots"), title=f"{cfg.algorithm} lr={cfg.learning_rate:g}")
  return rows


def _find_trust_region_state(opt_state):
  from capo_jax.trust_region import TrustRegionState  # pylint: disable=g-import-not-at-top
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, TrustRegionState))
           if isinstance(s, TrustRegionState)]
  return found[0]
