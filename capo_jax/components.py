"""From the typed configs to the jitted pieces: the optax chain (clip → CAPO's ``masked_transform`` around AdamW →
curvature trust region) and the learner step of ``CurvatureConfig.mode``.

Each function reads its own sub-config; nothing here runs a model.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import optax
from flax import nnx

from capo_jax import learner
from capo_jax.config import CurvatureConfig, OptimizerConfig, TrainConfig, learning_rate_schedule
from capo_jax.masked_transform import MaskedTransformation, masked_transform
from capo_jax.step_size import kl_target_transform
from capo_jax.trust_region import TrustRegionState, trust_region_transform


def adamw(cfg: OptimizerConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
  return optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)


def curvature_masked_transform(curvature: CurvatureConfig, inner: optax.GradientTransformation,
                               optimizer: OptimizerConfig, schedule: optax.Schedule,
                               temperature: float) -> MaskedTransformation:
  """CAPO's last-layer ``masked_transform`` around ``inner`` as ``curvature`` says: its τ's in ``mode='last_layer'``,
  τ = ∞ (statistics only) when it is there as the monitor of another mode (docs/MATH.md §2)."""
  masks = curvature.masks_last_layer
  return masked_transform(
      inner, tau_fisher=curvature.tau_fisher if masks else math.inf,
      tau_hessian=curvature.tau_hessian if masks else math.inf, hessian_rule=curvature.hessian_rule,
      learning_rate=schedule, top_k=curvature.top_k, moments=curvature.moments, temperature=temperature,
      b1=optimizer.b1, b2=optimizer.b2, eps=optimizer.eps)


def build_optimizer(cfg: TrainConfig, logits_fn: Callable | None = None
                    ) -> tuple[optax.GradientTransformation, MaskedTransformation | None]:
  """The optax chain of a run: ``clip_by_global_norm`` → (``masked_transform`` around) AdamW → (trust region).

  ``logits_fn(params, batch) -> [B, N, V]``: the completion logits the trust region (or the KL-target step size,
  docs/MATH.md §7) linearises (needed only with ``step_control != 'none'``). Returns ``(chain, the masked_transform or
  None)``.
  """
  schedule = learning_rate_schedule(cfg.optimizer, cfg.num_steps)
  core = adamw(cfg.optimizer, schedule)
  capo = None
  if cfg.curvature.needs_last_layer_pass:
    capo = core = curvature_masked_transform(cfg.curvature, core, cfg.optimizer, schedule, cfg.rollout.temperature)
  if cfg.curvature.step_control == "trust_region":
    if logits_fn is None:
      raise ValueError("step_control='trust_region' linearises the model: pass logits_fn.")
    core = trust_region_transform(core, max_kl=cfg.curvature.max_kl, logits_fn=logits_fn,
                                  completion_mask_fn=learner.loss_completion_mask,
                                  temperature=cfg.rollout.temperature)
  elif cfg.curvature.step_control == "kl_target":
    if logits_fn is None:
      raise ValueError("step_control='kl_target' linearises the model: pass logits_fn.")
    core = kl_target_transform(core, target_kl=cfg.curvature.max_kl, logits_fn=logits_fn,
                               max_scale=cfg.curvature.max_scale, min_scale=cfg.curvature.min_scale,
                               completion_mask_fn=learner.loss_completion_mask, temperature=cfg.rollout.temperature)
  parts = [optax.clip_by_global_norm(cfg.optimizer.max_grad_norm)] if cfg.optimizer.max_grad_norm else []
  return optax.chain(*parts, core), capo


def prompt_group_size(cfg: TrainConfig) -> int:
  """Rows per prompt in the learner's batches (the rollout's group size) when ``OptimizerConfig.shared_prompts``,
  else 1 (every row runs whole)."""
  return cfg.rollout.group_size if cfg.optimizer.shared_prompts else 1


def objective(cfg: TrainConfig) -> learner.Objective:
  return learner.Objective(loss=cfg.loss, completion_length=cfg.rollout.max_new_tokens,
                           temperature=cfg.rollout.temperature, ratio_one=cfg.optimizer.single_pass,
                           track_kl=cfg.loss.track_kl, prompt_group_size=prompt_group_size(cfg))


def capo_token_mask_fn(capo: MaskedTransformation) -> learner.TokenMaskFn:
  """CAPO's mask as the learner's hook. In ``make_rl_step`` its top-K policy comes from the loss's own chunked logits
  pass (``logits_stats_fn`` = ``MaskedTransformation.top_k_policy``, then ``token_mask_from_top_k``); called without
  it, ``token_mask_from_hidden`` forms the logits one time chunk at a time. Never a [B, N, V] array."""

  def fn(hidden_bnh, w_vh, targets_bn, advantages_b, completion_mask_bn, opt_state, logits_stats=None):
    if logits_stats is None:
      mask_bn, aux = capo.token_mask_from_hidden(opt_state, hidden_bnh, w_vh, targets_bn, advantages_b,
                                                 completion_mask_bn)
    else:
      mask_bn, aux = capo.token_mask_from_top_k(opt_state, hidden_bnh, logits_stats, w_vh.shape[0], advantages_b,
                                                completion_mask_bn)
    return mask_bn, {"capo_aux": aux}, dict(aux.metrics)

  fn.logits_stats_fn = capo.top_k_policy
  return fn


def make_learner_step(cfg: TrainConfig, graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation,
                      capo: MaskedTransformation | None):
  """The jitted ``(params, opt_state, batch) -> (params, opt_state, metrics)`` of ``cfg.curvature.mode`` (params and
  optimizer state donated).

  none / last_layer: ``make_rl_step`` (with the last-layer hook when a ``masked_transform`` is in the chain, and
  ``OptimizerConfig.micro_batches`` slices of gradient accumulation);
  full_network: ``make_fullnet_rl_step`` with the τ's (the last-layer pass, if any, as its monitor); subset:
  ``make_subset_rl_step`` over the ``prompts_per_step`` prompt groups.
  """
  curv = cfg.curvature
  mask_fn = capo_token_mask_fn(capo) if capo is not None else None
  obj = objective(cfg)
  pass_batch = curv.step_control != "none"
  if curv.mode == "full_network":
    return learner.make_fullnet_rl_step(
        graphdef, optimizer, obj, tau_fisher=curv.tau_fisher,
        tau_hessian=curv.tau_hessian if curv.second_order else None, second_order=curv.second_order,
        fisher=curv.fisher, hessian_rule=curv.hessian_rule, monitor_fn=mask_fn, pass_batch=pass_batch)
  if curv.mode == "subset":
    return learner.make_subset_rl_step(
        graphdef, optimizer, obj, num_subsets=cfg.rollout.prompts_per_step, delta_h=curv.subset_delta_h,
        delta_f=curv.subset_delta_f, monitor_fn=mask_fn)
  return learner.make_rl_step(graphdef, optimizer, obj, mask_fn, pass_batch=pass_batch,
                              micro_batches=cfg.optimizer.micro_batches)


def optimizer_count(opt_state: Any) -> int:
  """Updates applied so far: the count of the chain's AdamW (a skipped step leaves it unchanged)."""
  counts = [s.count for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
            if isinstance(s, optax.ScaleByAdamState)]
  if not counts:
    raise ValueError("the optimizer state holds no ScaleByAdamState.")
  return int(counts[0])


def trust_region_state(opt_state: Any) -> TrustRegionState | None:
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, TrustRegionState))
           if isinstance(s, TrustRegionState)]
  return found[0] if found else None
