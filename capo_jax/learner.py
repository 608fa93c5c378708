"""The learner: pure, jitted steps from a fixed-shape batch of sequences to new parameters and optimizer state.

A batch row is a left-padded prompt of ``P`` columns followed by ``N`` completion columns (``S = P + N``). The model
runs once over ``tokens[:, :-1]``; the hidden state at column ``P − 1 + n`` predicts completion token ``n``. When the
rows come in groups of one prompt (``Objective.prompt_group_size``, the rollout's samples per prompt), the prompt's
columns run once per group (``completion_hidden``; docs/MATH.md §1.3, "Shared prompts"). Log-probs come from
``token_logprobs_from_hidden`` (unembedding fused in chunks: the ``[B, N, V]`` logits are never stored for the
backward pass).

The steps share that forward:

- ``make_sft_step``: the supervised warm start, mean negative log-likelihood of the target tokens.
- ``make_rl_step``: one optimizer step of the GRPO-family surrogate. A ``token_mask_fn`` (CAPO's last-layer model)
  sees the forward's hidden states and unembedding under ``stop_gradient`` and returns a 0/1 mask that
  ``policy_loss`` multiplies into the completion mask — one forward, one backward per step.
- ``make_fullnet_rl_step``: CAPO's token mask from the full-network directional model (docs/MATH.md §4)
  along the optimizer's own proposal Δθ on the unmasked batch — one forward (``jax.vjp``), two pullbacks, one
  ``jax.jvp`` (or ``jax.jvp``∘``jax.jvp``) of the completion logits.
- ``make_subset_rl_step``: Theorem 5.1 acceptance (docs/MATH.md §3) over the step's prompt groups; the optimizer steps on
  the mean gradient of the accepted groups.

All RL steps share one objective, ``rl_objective`` (surrogate, aggregation, row weights, KL tracking, the
sampler/learner agreement and mismatch corrections, metrics), of the per-token log-probabilities; ``rl_loss`` is
that objective of the parameters.

Every RL step is guarded (``guarded_update``): an update whose loss, gradient or update is not finite is skipped
inside the jitted step — parameters and optimizer state come back unchanged — and reported as the metric
``skipped_nonfinite`` (1.0 for a skipped update, else 0.0) for the host loop to count (docs/RELIABILITY.md); beside
it the metric ``prompt_group_mismatch``, the fraction of rows that break the prompt groups (those rows come back NaN,
so such a batch is always skipped).

Everything here is a function of explicit arrays and pytrees; the host loop (``experiments/run.py``) only moves data.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from capo_jax import curvature
from capo_jax import curvature_full
from capo_jax import validation
from capo_jax.config import LossConfig
from capo_jax.logprobs import token_logprobs, token_logprobs_from_hidden
from capo_jax.losses import aggregate_token_losses, policy_loss

PyTree = Any


class SequenceBatch(NamedTuple):
  """One learner batch (numpy or jax arrays).

  Attributes:
    tokens_bs: ``[B, S]`` int32, prompt (left-padded, P columns) then completion (N columns).
    attention_mask_bs: ``[B, S]`` 0/1, real tokens.
    completion_mask_bn: ``[B, N]`` 0/1, completion tokens that count in the loss (through EOS).
    advantages_b: ``[B]`` float32 (zeros for supervised batches).
    old_logprobs_bn: ``[B, N]`` float32 behaviour log-probs: of each sampled token under the distribution the
      sampler drew it from (tempered and, with top-k/top-p, filtered; ``capo_jax.rollout``). The old policy of the
      ratio when ratios are not 1; always the reference of the sampler/learner agreement metrics
      (``sampler_agreement``) and of the mismatch corrections (``mismatch_correction``).
    ref_logprobs_bn: ``[B, N]`` float32 reference log-probs (used with a KL penalty).
    row_weight_b: ``[B]`` float32, 1 for real rows, 0 for padding rows (dynamic sampling keeps shapes fixed).
  """
  tokens_bs: Any
  attention_mask_bs: Any
  completion_mask_bn: Any
  advantages_b: Any
  old_logprobs_bn: Any
  ref_logprobs_bn: Any
  row_weight_b: Any


def completion_hidden(graphdef: nnx.GraphDef, params: nnx.State, tokens_bs: jax.Array, attention_mask_bs: jax.Array,
                      completion_length: int, *, prompt_group_size: int = 1) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Runs the model; returns ``(hidden_bnh, unembedding_vh, targets_bn)`` for the last ``N`` columns.

  ``prompt_group_size`` G > 1: rows come in groups of G consecutive rows with the same prompt (the rollout's G
  completions of each prompt); the prompt's columns but its last then run once per group
  (``CausalLM.shared_prefix_hidden``: the same values, (B/G)·(P−1) + B·N tokens through the model instead of
  B·(P+N−1)). Groups are counted from row 0 with gcd(rows, G) rows each, which a contiguous slice of the batch
  aligned to its own size (a minibatch, a Theorem 5.1 subset) keeps. A row whose prompt differs from its group's
  first row comes back NaN.
  """
  model = nnx.merge(graphdef, params)
  rows, columns = tokens_bs.shape
  group = math.gcd(rows, prompt_group_size)
  prefix = columns - 1 - completion_length  # the prompt's columns before its last token
  inputs_bt, mask_bt = tokens_bs[:, :-1], attention_mask_bs[:, :-1]
  if group > 1 and prefix > 0:
    hidden_bnh = model.shared_prefix_hidden(inputs_bt, mask_bt, prefix_length=prefix, group_size=group)
  else:
    hidden_bnh = model(inputs_bt, attention_mask_bt=mask_bt, return_logits=False).hidden[:, -completion_length:]
  return hidden_bnh, model.unembedding(), tokens_bs[:, -completion_length:]


def prompt_group_mismatch(tokens_bs: jax.Array, attention_mask_bs: jax.Array, completion_length: int,
                          prompt_group_size: int) -> jax.Array:
  """``[]`` float32: the fraction of rows whose prompt differs from their group's first row — the rows that
  ``completion_hidden`` returns NaN for (groups of gcd(rows, G) rows; a real token that differs, or the mask, counts;
  a token under both rows' padding does not). 0 when rows are not grouped. A learner step reports it as the metric
  ``prompt_group_mismatch``: a batch whose rows do not come in groups of one prompt is skipped as non-finite, and
  this says why (build the batch in groups of G consecutive rows, or set ``Objective.prompt_group_size`` = 1)."""
  rows, columns = tokens_bs.shape
  group = math.gcd(rows, prompt_group_size)
  prefix = columns - 1 - completion_length
  if group <= 1 or prefix <= 0:
    return jnp.zeros([], jnp.float32)
  tokens_gqp = tokens_bs[:, :prefix].reshape(rows // group, group, prefix)
  mask_gqp = attention_mask_bs[:, :prefix].reshape(rows // group, group, prefix) > 0
  first_mask = mask_gqp[:, :1]
  same = (~first_mask | (tokens_gqp == tokens_gqp[:, :1])) & (mask_gqp == first_mask)
  return jnp.mean((~jnp.all(same, axis=-1)).astype(jnp.float32))


def _batch_group_mismatch(batch: SequenceBatch, objective: Objective) -> jax.Array:
  return prompt_group_mismatch(batch.tokens_bs, batch.attention_mask_bs, objective.completion_length,
                               objective.prompt_group_size)


def completion_logprobs(graphdef, params, tokens_bs, attention_mask_bs, completion_length: int, *,
                        temperature: float = 1.0, prompt_group_size: int = 1) -> tuple[jax.Array, jax.Array]:
  """``(logprobs_bn, entropy_bn)`` of the completion tokens under the model (float32)."""
  hidden, w, targets = completion_hidden(graphdef, params, tokens_bs, attention_mask_bs, completion_length,
                                         prompt_group_size=prompt_group_size)
  return token_logprobs_from_hidden(hidden, w, targets, temperature=temperature)


def make_sft_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, completion_length: int):
  """Jitted ``(params, opt_state, tokens, attention_mask, target_mask) -> (params, opt_state, nll)``."""

  def loss_fn(params, tokens, mask, target_mask):
    lp, _ = completion_logprobs(graphdef, params, tokens, mask, completion_length)
    m = target_mask.astype(jnp.float32)
    return -jnp.sum(lp * m) / jnp.maximum(jnp.sum(m), 1.0)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, opt_state, tokens, mask, target_mask):
    nll, grads = jax.value_and_grad(loss_fn)(params, tokens, mask, target_mask)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, nll

  return step


@dataclasses.dataclass(frozen=True)
class Objective:
  """The RL objective a learner step minimises: the loss choices of ``capo_jax.config.LossConfig`` plus what the
  rollout fixes (docs/MATH.md §1).

  Attributes:
    loss: the surrogate, aggregation, clipping, KL and entropy settings.
    completion_length: N, the completion columns of every batch row (also Dr.GRPO's normaliser).
    temperature: the sampler's temperature (log-probs are of logits / temperature, as sampled).
    ratio_one: one gradient step per batch: old log-probs = stop_gradient(current), ρ ≡ 1.
    track_kl: report the KL to the reference policy even when ``loss.kl_coef`` = 0.
    prompt_group_size: G: the batch's rows come in groups of G with the same prompt, whose columns the model then
      runs once per group (``completion_hidden``); 1: every row runs whole. The same values either way.
  """
  loss: LossConfig = dataclasses.field(default_factory=LossConfig)
  completion_length: int = 1
  temperature: float = 1.0
  ratio_one: bool = True
  track_kl: bool = True
  prompt_group_size: int = 1

  def __post_init__(self):
    if not isinstance(self.completion_length, int) or self.completion_length < 1:
      raise ValueError(f"completion_length must be a positive int, got {self.completion_length!r}.")
    if not self.temperature > 0:
      raise ValueError(f"temperature must be > 0, got {self.temperature!r}.")
    if (isinstance(self.prompt_group_size, bool) or not isinstance(self.prompt_group_size, int)
        or self.prompt_group_size < 1):
      raise ValueError(f"prompt_group_size must be a positive int, got {self.prompt_group_size!r}.")


# token_mask_fn(hidden_bnh, unembedding_vh, targets_bn, advantages_b, completion_mask_bn, opt_state)
#   -> (token_mask_bn, update_kwargs, log_metrics); inputs are stop-gradient'd. ``update_kwargs`` go to
#   ``optimizer.update`` as extra args (e.g. CAPO's ``capo_aux``), ``log_metrics`` into the step's metrics.
# A hook with an attribute ``logits_stats_fn`` — ``(z_bcv, targets_bc, valid_bc) -> pytree`` of per-position
# statistics of the completion logits (CAPO's top-K policy) — gets them from the loss's own chunked logits pass,
# as the keyword ``logits_stats`` (``rl_loss``): the step then forms h Wᵀ once, not once for the loss and once for
# the mask. Called without it (the full-network and subset steps' monitors), the hook forms its own.
TokenMaskFn = Callable[..., tuple[jax.Array, dict[str, Any], dict[str, jax.Array]]]


def loss_completion_mask(batch: SequenceBatch) -> jax.Array:
  """``[B, N]`` float32 completion mask × row weight: the tokens that count in the loss (padding rows drop out)."""
  return batch.completion_mask_bn.astype(jnp.float32) * batch.row_weight_b.astype(jnp.float32)[:, None]


def completion_logits(graphdef: nnx.GraphDef, params: nnx.State, batch: SequenceBatch,
                      completion_length: int, *, prompt_group_size: int = 1) -> jax.Array:
  """``[B, N, V]`` float32 logits of the completion positions only (``completion_hidden`` · Wᵀ): position ``n``
  scores completion token ``n``. The ``logits_fn`` of ``capo_jax.curvature_full`` for the RL steps."""
  hidden, w, _ = completion_hidden(graphdef, params, batch.tokens_bs, batch.attention_mask_bs, completion_length,
                                   prompt_group_size=prompt_group_size)
  return jnp.einsum("bnh,vh->bnv", hidden, w.astype(hidden.dtype), preferred_element_type=jnp.float32)


def sampler_agreement(logprobs_bn: jax.Array, batch: SequenceBatch) -> dict[str, jax.Array]:
  """How far the learner's log-probs of the sampled tokens are from the sampler's, over the completion tokens.

      sampler_learner_kl           = mean_t (logπ_sampler(a_t) − logπ_learner(a_t))
      sampler_learner_max_abs_diff = max_t |logπ_learner(a_t) − logπ_sampler(a_t)|

  With a_t ~ π_sampler the first is the unbiased (k1) Monte-Carlo estimate of KL(π_sampler ‖ π_learner) per token
  (docs/MATH.md §1.4); under top-k/top-p filtering it is exactly −log of the probability mass the filter kept, per
  position. At the first update of a batch both measure the sampler/learner mismatch alone (bf16 or KV-cache
  numerics, filtering); at later updates of a multi-pass step they include the policy's own change. Differences,
  never exponentials: nothing overflows (a −inf sampler log-prob gives inf, which the host loop reports).
  """
  sg = jax.lax.stop_gradient
  valid = batch.completion_mask_bn > 0
  diff = jnp.where(valid, sg(logprobs_bn).astype(jnp.float32) - batch.old_logprobs_bn.astype(jnp.float32), 0.0)
  count = jnp.maximum(jnp.sum(valid.astype(jnp.float32)), 1.0)
  return {"sampler_learner_kl": -jnp.sum(diff) / count, "sampler_learner_max_abs_diff": jnp.max(jnp.abs(diff))}


def mismatch_correction(logprobs_bn: jax.Array, batch: SequenceBatch, loss: LossConfig
                        ) -> tuple[jax.Array | None, jax.Array | None, dict[str, jax.Array]]:
  """The rollout/learner mismatch corrections of ``loss``: ``(token_weight_bn, row_keep_b, metrics)``.

  With Δ_t = logπ_learner(a_t) − logπ_sampler(a_t) (gradient-free) over the completion tokens:

      TIS (``tis_cap`` = C):                  w_t = min(π_learner/π_sampler, C) = exp(min(Δ_t, log C))
      sequence mask (``seq_mask_max_logprob_diff`` = δ):  keep_i = [mean_t |Δ_t| ≤ δ]

  ``w_t`` multiplies token t's surrogate (``rl_objective``); ``keep_i`` is a 0/1 token mask over row i, multiplied
  into CAPO's mask like any token mask (a dropped row then counts in a sequence-mean as a row whose every token was
  rejected). Both are formed in log space: w ≤ C, and a NaN or infinite Δ drops its row (NaN ≤ δ is false).
  ``None`` for a correction that is off. Metrics: ``tis_weight_mean``, ``tis_truncated_fraction`` (tokens with
  π_learner/π_sampler > C) over the completion tokens; ``seq_mask_dropped_fraction`` over the real rows.
  """
  sg = jax.lax.stop_gradient
  valid = batch.completion_mask_bn > 0
  count = jnp.maximum(jnp.sum(valid.astype(jnp.float32)), 1.0)
  delta = jnp.where(valid, sg(logprobs_bn).astype(jnp.float32) - batch.old_logprobs_bn.astype(jnp.float32), 0.0)
  weight, keep, metrics = None, None, {}
  if loss.tis_cap is not None:
    log_cap = math.log(loss.tis_cap)
    weight = jnp.exp(jnp.minimum(delta, log_cap))
    metrics["tis_weight_mean"] = jnp.sum(jnp.where(valid, weight, 0.0)) / count
    metrics["tis_truncated_fraction"] = jnp.sum((valid & (delta > log_cap)).astype(jnp.float32)) / count
  if loss.seq_mask_max_logprob_diff is not None:
    tokens_b = jnp.sum(valid.astype(jnp.float32), axis=1)
    mean_abs_b = jnp.sum(jnp.abs(delta), axis=1) / jnp.maximum(tokens_b, 1.0)
    keep = (mean_abs_b <= loss.seq_mask_max_logprob_diff).astype(jnp.float32)
    real = batch.row_weight_b > 0
    metrics["seq_mask_dropped_fraction"] = (jnp.sum((real & (keep == 0)).astype(jnp.float32))
                                            / jnp.maximum(jnp.sum(real.astype(jnp.float32)), 1.0))
  return weight, keep, metrics


def _weighted_surrogate_correction(logprobs_bn: jax.Array, batch: SequenceBatch, kept_bn: jax.Array,
                                   weight_bn: jax.Array, objective: Objective) -> jax.Array:
  """agg((w − 1) ⊙ ℓ) for the single-pass surrogate ℓ (ρ ≡ 1), so that ``policy_loss`` + this = agg(w ⊙ ℓ) + the
  KL and entropy terms. At ρ ≡ 1 every surrogate has gradient −A_i ∇logπ(a_t); its per-token value is −A_i·ρ_t
  (clip, GSPO: ρ_t = exp(logπ − sg logπ) = 1 inside every clip range) or −A_i·logπ(a_t) (CISPO, weight clip(1) = 1)
  (docs/MATH.md §1.2). Masked slots are zeroed before any arithmetic, as in ``policy_loss``."""
  sg = jax.lax.stop_gradient
  kept = kept_bn > 0
  lp = jnp.where(kept, logprobs_bn.astype(jnp.float32), 0.0)
  adv_b = jnp.where(jnp.any(kept, axis=1), batch.advantages_b.astype(jnp.float32), 0.0)
  per_token = lp if objective.loss.surrogate == "cispo" else jnp.exp(lp - sg(lp))
  token_losses = -adv_b[:, None] * per_token * (sg(weight_bn) - 1.0)
  return aggregate_token_losses(token_losses, kept, mode=objective.loss.aggregation,
                                max_completion_length=objective.completion_length)


def rl_objective(logprobs_bn: jax.Array, entropy_bn: jax.Array, batch: SequenceBatch, objective: Objective,
                 token_mask_bn: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The RL objective of one batch as a function of its per-token log-probs and entropies: ``(loss, metrics)``.

      loss = policy_loss(logπ, logπ_old, A, completion × row weight, token_mask) · B / max(Σ row weight, 1)

  (the rescale only for sequence-mean aggregations: rows dropped by dynamic sampling are zero-weight padding, so the
  loss is a mean over the real rows). ``token_mask_bn``: an extra 0/1 mask multiplied into the completion mask (the
  rejected tokens leave the loss and its normalisation). Differentiable in ``logprobs_bn`` and ``entropy_bn``;
  ρ ≡ 1 (``objective.ratio_one``) uses ``stop_gradient(logprobs_bn)`` as the old log-probs.

  The mismatch corrections of ``objective.loss`` (``mismatch_correction``) compose with that mask: the sequence
  mask multiplies into it, and with TIS the surrogate term becomes agg(w ⊙ ℓ) (KL and entropy terms unweighted).
  Metrics: ``policy_loss``'s, ``sampler_agreement``'s and the corrections'.
  """
  sg = jax.lax.stop_gradient
  row_w = batch.row_weight_b.astype(jnp.float32)
  cfg = objective.loss
  old = sg(logprobs_bn) if objective.ratio_one else batch.old_logprobs_bn
  use_ref = cfg.kl_coef > 0 or objective.track_kl
  weight_bn, keep_b, correction_metrics = mismatch_correction(logprobs_bn, batch, cfg)
  if keep_b is not None:
    row_mask = jnp.broadcast_to(keep_b[:, None], logprobs_bn.shape)
    token_mask_bn = row_mask if token_mask_bn is None else token_mask_bn * row_mask
  completion = loss_completion_mask(batch)
  loss, metrics = policy_loss(
      logprobs_bn, old, batch.advantages_b.astype(jnp.float32), completion,
      token_mask_bt=token_mask_bn, method=cfg.surrogate, eps_low=cfg.eps_low, eps_high=cfg.eps_high,
      dual_clip=cfg.dual_clip, aggregation=cfg.aggregation, max_completion_length=objective.completion_length,
      ref_logprobs_bt=batch.ref_logprobs_bn if use_ref else None, kl_coef=cfg.kl_coef,
      kl_estimator=cfg.kl_estimator, entropy_bt=entropy_bn, entropy_coef=cfg.entropy_coef)
  if weight_bn is not None:
    if not objective.ratio_one:
      raise ValueError("LossConfig.tis_cap weights the single-pass surrogate: use it with ratio_one=True.")
    kept_bn = completion if token_mask_bn is None else completion * (token_mask_bn > 0)
    loss = loss + _weighted_surrogate_correction(logprobs_bn, batch, kept_bn, weight_bn, objective)
  # Rows dropped by dynamic sampling are zero-weight padding: sequence-mean aggregations divide by all B rows, so
  # rescale to a mean over the real rows (token-mean already normalises by kept tokens).
  if cfg.aggregation != "token-mean":
    loss = loss * row_w.shape[0] / jnp.maximum(jnp.sum(row_w), 1.0)
  return loss, dict(metrics, **sampler_agreement(logprobs_bn, batch), **correction_metrics, loss=sg(loss))


def rl_loss(params, graphdef, batch: SequenceBatch, opt_state, objective: Objective,
            token_mask_fn: TokenMaskFn | None = None, token_mask_bn: jax.Array | None = None):
  """The RL objective of one batch; returns ``(loss, (metrics, update_kwargs))``, differentiable in ``params``.

  ``token_mask_fn``: CAPO's last-layer hook (see ``TokenMaskFn``); ``token_mask_bn``: an external ``[B, N]`` 0/1
  mask (e.g. the full-network one). Both multiply into the completion mask (``rl_objective``).
  """
  sg = jax.lax.stop_gradient
  hidden, w, targets = completion_hidden(graphdef, params, batch.tokens_bs, batch.attention_mask_bs,
                                         objective.completion_length, prompt_group_size=objective.prompt_group_size)
  completion = loss_completion_mask(batch)
  logits_stats_fn = getattr(token_mask_fn, "logits_stats_fn", None)
  hook_kwargs = {}
  if logits_stats_fn is None:
    lp, ent = token_logprobs_from_hidden(hidden, w, targets, temperature=objective.temperature)
  else:
    lp, ent, hook_kwargs["logits_stats"] = token_logprobs_from_hidden(
        hidden, w, targets, temperature=objective.temperature, logits_stats_fn=logits_stats_fn,
        logits_stats_inputs=(completion > 0,))
  token_mask, update_kwargs, mask_metrics = None, {}, {}
  if token_mask_fn is not None:
    token_mask, update_kwargs, mask_metrics = token_mask_fn(
        sg(hidden), sg(w), targets, sg(batch.advantages_b.astype(jnp.float32)), completion, sg(opt_state),
        **hook_kwargs)
  if token_mask_bn is not None:
    token_mask = token_mask_bn if token_mask is None else token_mask * token_mask_bn
  loss, metrics = rl_objective(lp, ent, batch, objective, token_mask)
  return loss, (dict(metrics, **mask_metrics), update_kwargs)


def make_rl_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, objective: Objective,
                 token_mask_fn: TokenMaskFn | None = None, *, pass_batch: bool = False, micro_batches: int = 1):
  """Jitted ``(params, opt_state, batch) -> (params, opt_state, metrics)``: one forward, one backward, one guarded
  update (``guarded_update``: skipped, state unchanged, when anything is non-finite).

  ``pass_batch``: also hand the batch to ``optimizer.update(..., batch=batch)`` (the curvature trust region
  linearises the model on it). ``micro_batches`` M > 1: the gradient is accumulated over M slices of the rows
  (``accumulated_rl_grads``) — the same update, with the activations of B / M rows alive at a time.
  """
  if isinstance(micro_batches, bool) or not isinstance(micro_batches, int) or micro_batches < 1:
    raise ValueError(f"micro_batches must be a positive int, got {micro_batches!r}.")

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, opt_state, batch: SequenceBatch):
    if micro_batches == 1:
      (_, (metrics, update_kwargs)), grads = jax.value_and_grad(rl_loss, has_aux=True)(
          params, graphdef, batch, opt_state, objective, token_mask_fn)
    else:
      grads, metrics, update_kwargs = accumulated_rl_grads(params, graphdef, batch, opt_state, objective,
                                                           token_mask_fn, micro_batches)
    if pass_batch:
      update_kwargs = dict(update_kwargs, batch=batch)
    params, opt_state, updates, finite = guarded_update(True, optimizer, grads, opt_state, params, metrics["loss"],
                                                        **update_kwargs)
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads), update_norm=optax.tree.norm(updates),
                   skipped_nonfinite=1.0 - finite.astype(jnp.float32),
                   prompt_group_mismatch=_batch_group_mismatch(batch, objective))
    return params, opt_state, metrics

  return step


# How ``accumulated_rl_grads`` combines the micro-batches' metrics (the rest: see there): sums, and means over the
# kept tokens (``policy_loss``'s) or over all completion tokens (``sampler_agreement``'s).
_SUMMED_METRICS = ("kept_tokens",)
_KEPT_TOKEN_METRICS = ("clip_fraction", "ratio_mean", "kl", "entropy")
_COMPLETION_TOKEN_METRICS = ("sampler_learner_kl",)


def micro_batch_rows(x: jax.Array, micro_batches: int) -> jax.Array:
  """``[B, ...] -> [M, B / M, ...]``: micro-batch m holds rows m, m + M, m + 2M, … (strided, so that on a mesh whose
  devices hold contiguous blocks of rows every device holds rows of every micro-batch)."""
  return jnp.swapaxes(x.reshape(x.shape[0] // micro_batches, micro_batches, *x.shape[1:]), 0, 1)


def join_micro_batch_rows(x: jax.Array) -> jax.Array:
  """The inverse of ``micro_batch_rows``: ``[M, B / M, ...] -> [B, ...]`` in the batch's row order."""
  return jnp.swapaxes(x, 0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def accumulated_rl_grads(params, graphdef, batch: SequenceBatch, opt_state, objective: Objective,
                         token_mask_fn: TokenMaskFn | None, micro_batches: int):
  """``(grads, metrics, update_kwargs)`` of ``rl_loss`` on ``batch``, accumulated over ``micro_batches`` slices of its
  rows (``micro_batch_rows``) in one ``lax.scan`` (docs/MATH.md §1.3, "Gradient accumulation").

  Every aggregation is a normalised sum over rows or tokens, so with w_m the normaliser of slice m (the kept tokens
  for ``token-mean``, the row weights Σ w_b for the sequence means) the batch's loss is Σ_m w_m L_m / Σ_m w_m and its
  gradient Σ_m w_m ∇L_m / Σ_m w_m — exact, because the w_m are constants of the masks. A token mask (CAPO's) must
  be a function of each row alone, which the last-layer one is. Metrics: ``loss`` combines like the loss,
  ``pg_loss`` (before the row-weight rescale) over the kept tokens for ``token-mean`` and over the slices' equal row
  counts otherwise; ``kept_tokens`` is summed; ``*_max*`` / ``*_min*`` take the max / min; the token means weight each
  slice by its tokens — kept tokens for ``policy_loss``'s, completion tokens for ``sampler_agreement``'s, completion
  tokens × row weight for the rest (CAPO's rejected fractions) — which is exact; quantiles become the weighted mean
  of the slices' quantiles. Per-row arrays in ``update_kwargs`` (CAPO's ``capo_aux``) are joined back into batch
  order; its metrics combine as above.
  """
  if batch.tokens_bs.shape[0] % micro_batches:
    raise ValueError(f"micro_batches={micro_batches} must divide the batch's {batch.tokens_bs.shape[0]} rows.")
  token_mean = objective.loss.aggregation == "token-mean"
  # Micro-batch m holds rows m, m + M, …: a run of G rows with one prompt leaves G / M of them in each slice when M
  # divides G (runs of gcd(B, G) in this batch), and no aligned runs otherwise.
  run = math.gcd(batch.tokens_bs.shape[0], objective.prompt_group_size)
  objective = dataclasses.replace(objective, prompt_group_size=run // micro_batches if run % micro_batches == 0 else 1)

  def one(acc, micro: SequenceBatch):
    (_, (metrics, update_kwargs)), grads = jax.value_and_grad(rl_loss, has_aux=True)(
        params, graphdef, micro, opt_state, objective, token_mask_fn)
    weight = metrics["kept_tokens"] if token_mean else jnp.sum(micro.row_weight_b.astype(jnp.float32))
    acc = jax.tree.map(lambda a, g: a + weight * g.astype(a.dtype), acc, grads)
    tokens = (metrics["kept_tokens"], jnp.sum(micro.completion_mask_bn > 0, dtype=jnp.float32),
              jnp.sum(loss_completion_mask(micro)))
    return acc, (metrics, update_kwargs, weight, tokens)

  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.result_type(p.dtype, jnp.float32)), params)
  micro = jax.tree.map(lambda x: micro_batch_rows(jnp.asarray(x), micro_batches), batch)
  summed, (metrics_m, kwargs_m, weight_m, (kept_m, completion_m, weighted_m)) = jax.lax.scan(one, zeros, micro)
  total = jnp.sum(weight_m)
  grads = jax.tree.map(lambda a, p: jnp.where(total > 0, a / jnp.maximum(total, 1e-30), 0.0).astype(p.dtype),
                       summed, params)
  pg_weight_m = weight_m if token_mean else jnp.ones_like(weight_m)
  combine = functools.partial(_combine_micro_metrics, loss_weight_m=weight_m, pg_weight_m=pg_weight_m,
                              kept_m=kept_m, completion_m=completion_m, token_weight_m=weighted_m)
  return grads, combine(metrics_m), _join_update_kwargs(kwargs_m, combine)


def _weighted_mean(x_m: jax.Array, w_m: jax.Array) -> jax.Array:
  total = jnp.sum(w_m)
  return jnp.where(total > 0, jnp.sum(x_m * w_m) / jnp.maximum(total, 1e-30), jnp.mean(x_m))


def _combine_micro_metrics(metrics_m: dict[str, jax.Array], *, loss_weight_m: jax.Array, pg_weight_m: jax.Array,
                           kept_m: jax.Array, completion_m: jax.Array,
                           token_weight_m: jax.Array) -> dict[str, jax.Array]:
  """One value per metric from the ``[M]`` values of the micro-batches (rules in ``accumulated_rl_grads``)."""
  out = {}
  for key, x_m in metrics_m.items():
    x_m = jnp.asarray(x_m)
    if x_m.ndim != 1:
      raise ValueError(f"metric {key!r} is not a scalar per micro-batch (shape {x_m.shape[1:]}).")
    if key == "loss":
      out[key] = _weighted_mean(x_m, loss_weight_m)
    elif key == "pg_loss":
      out[key] = _weighted_mean(x_m, pg_weight_m)
    elif key in _SUMMED_METRICS:
      out[key] = jnp.sum(x_m)
    elif key.endswith("_max") or "_max_" in key:
      out[key] = jnp.max(x_m)
    elif key.endswith("_min") or "_min_" in key:
      out[key] = jnp.min(x_m)
    elif key in _KEPT_TOKEN_METRICS:
      out[key] = _weighted_mean(x_m.astype(jnp.float32), kept_m)
    elif key in _COMPLETION_TOKEN_METRICS:
      out[key] = _weighted_mean(x_m.astype(jnp.float32), completion_m)
    else:
      out[key] = _weighted_mean(x_m.astype(jnp.float32), token_weight_m)
  return out


def _join_update_kwargs(kwargs_m: dict[str, Any], combine: Callable) -> dict[str, Any]:
  """``update_kwargs`` of the whole batch from the micro-batches' (leading [M] axis): per-row arrays joined in batch
  order, a ``metrics`` dict (CAPO's ``capo_aux.metrics``) combined by ``combine``; a scalar per micro-batch (a
  batch-level statistic) cannot be joined and raises."""

  def join(x):
    if x.ndim < 2:
      raise ValueError("a token-mask hook returned a batch-level array; micro-batches need per-row statistics.")
    return join_micro_batch_rows(x)

  def join_value(value):
    if hasattr(value, "_replace") and isinstance(getattr(value, "metrics", None), dict):
      return jax.tree.map(join, value._replace(metrics={}))._replace(metrics=combine(value.metrics))
    return jax.tree.map(join, value)

  return {key: join_value(value) for key, value in kwargs_m.items()}


# ---------------------------------------------------------------------------------------------------------------
# Full-network token mask and Theorem 5.1 subset acceptance (docs/MATH.md §3–§4).

# Prefix of the full-network statistics' metrics (``curvature.METRIC_KEYS`` of the full-network m_H / m_F): the
# unprefixed keys always mean the last-layer model's (the monitor's, in the full-network step).
FULLNET_PREFIX = "fullnet_"
# Scalars the full-network step adds besides its ``fullnet_*`` statistics (and the monitor's unprefixed keys).
FULLNET_METRIC_KEYS = ("proposal_norm",)
# Scalars the subset step adds (over the real subsets: those with at least one non-padding row).
SUBSET_METRIC_KEYS = ("subset_accepted_fraction", "subset_num_accepted", "subset_num_subsets", "subset_m_h_min",
                      "subset_m_h_p50", "subset_m_f_p50", "subset_m_f_max")


def _policy_forward(graphdef: nnx.GraphDef, objective: Objective):
  """``params, batch -> (differentiable outputs, (entropy, hidden, unembedding, targets))`` for ``jax.vjp``.

  The differentiable outputs are ``(logπ, H)`` when the entropy enters the loss, else ``logπ`` alone (the entropy then
  rides along under ``stop_gradient`` for the metrics, and the pullback skips its backward pass).
  """
  sg = jax.lax.stop_gradient
  with_entropy = bool(objective.loss.entropy_coef)

  def forward(params, batch: SequenceBatch):
    hidden, w, targets = completion_hidden(graphdef, params, batch.tokens_bs, batch.attention_mask_bs,
                                           objective.completion_length,
                                           prompt_group_size=objective.prompt_group_size)
    lp, ent = token_logprobs_from_hidden(hidden, w, targets, temperature=objective.temperature)
    out = (lp, ent) if with_entropy else lp
    return out, (sg(ent), sg(hidden), sg(w), targets)

  return forward, with_entropy


def _run_monitor(monitor_fn: TokenMaskFn | None, hidden, w, targets, batch: SequenceBatch, opt_state):
  """The last-layer hook's ``(update_kwargs, metrics)``; its mask is discarded (a τ = ∞ monitor keeps every token)."""
  if monitor_fn is None:
    return {}, {}
  sg = jax.lax.stop_gradient
  _, update_kwargs, metrics = monitor_fn(hidden, w, targets, sg(batch.advantages_b.astype(jnp.float32)),
                                         loss_completion_mask(batch), sg(opt_state))
  return update_kwargs, metrics


def fullnet_mask_metrics(stats: curvature_full.FullNetworkTokenStats, completion_mask_bn: jax.Array, *,
                         tau_fisher: float, tau_hessian: float | None,
                         hessian_rule: str = "symmetric") -> dict[str, jax.Array]:
  """``curvature.mask_metrics`` of the full-network statistics: the keys the last-layer CAPO mask logs.

  ``rejected_fraction`` / ``rejected_by_fisher`` / ``rejected_by_hessian`` over the completion tokens, quantiles
  p50/p90/p99/max of m_H and m_F over the kept ones. Fisher only (``tau_hessian=None``): ``rejected_by_hessian`` is
  0 and the ``m_hessian_*`` keys are left out (there is no m_H), so a metrics row holds null there.
  """
  valid = completion_mask_bn > 0
  f_keep = curvature.fisher_keep(stats.m_f_bt, tau_fisher)
  if tau_hessian is None:
    mask = curvature.CurvatureMask(f_keep, f_keep, jnp.ones_like(f_keep))
    out = curvature.mask_metrics(jnp.zeros_like(stats.m_f_bt), stats.m_f_bt, mask, valid)
    return {k: v for k, v in out.items() if not k.startswith("m_hessian")}
  h_keep = curvature.hessian_keep(stats.m_h_bt, tau_hessian, hessian_rule)
  mask = curvature.CurvatureMask(f_keep & h_keep, f_keep, h_keep)
  return curvature.mask_metrics(stats.m_h_bt, stats.m_f_bt, mask, valid)


class FullNetworkStepAux(NamedTuple):
  """What ``make_fullnet_rl_grads`` returns next to the masked gradient."""
  keep_bn: jax.Array  # [B, N] float32 0/1: completion × row weight × full-network rule (the mask the loss used)
  stats: curvature_full.FullNetworkTokenStats  # per-token δ_t, κ_t, F_t, m_H, m_F along the proposal
  proposal: PyTree  # Δθ: the optimizer chain's update of the unmasked gradient (its state discarded)
  metrics: dict[str, jax.Array]
  update_kwargs: dict[str, Any]  # extra args of ``optimizer.update`` (the monitor's capo_aux, the trust region's batch)


def make_fullnet_rl_grads(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, objective: Objective,
                          *, tau_fisher: float, tau_hessian: float | None,
                          second_order: bool = True, fisher: str = "sampled", hessian_rule: str = "symmetric",
                          monitor_fn: TokenMaskFn | None = None, pass_batch: bool = False):
  """``(params, opt_state, batch) -> (masked loss gradient, FullNetworkStepAux)``: CAPO's token mask from the
  full-network directional model along the optimizer's own proposal (docs/MATH.md §4). Pure; jit it (or use
  ``make_fullnet_rl_step``).

      (logπ, pullback) = jax.vjp(θ ↦ logπ_θ(a_t) over the completion positions)          one forward
      ∇L     = pullback(∂L/∂logπ)                                          unmasked gradient (rl_objective)
      Δθ     = optimizer.update(∇L, opt_state, θ)[0]                       the whole chain's proposal, state discarded
      m_H(t) = A_i [δ_t + ½(δ_t² + κ_t)],  m_F(t) = ½δ_t²                 along Δθ (``full_network_token_stats``)
      keep_t = completion_t · [m_F(t) < τ_F] · [−τ_H < m_H(t) < τ_H]       (``full_network_token_mask``)
      ∇L_keep = pullback(∂L_keep/∂logπ)                                   same residuals, rejected tokens removed

  ``∇L_keep`` is exactly ``jax.grad(rl_loss)(θ, ..., token_mask_bn=keep)``: the loss renormalises over the kept
  tokens as the last-layer CAPO mask does. One shared direction Δθ for every token (the last-layer model builds one
  d_t per token). Δθ contains the learning rate, so τ_F/τ_H apply to it directly.

  Args:
    graphdef, optimizer, objective: as ``make_rl_step``.
    tau_fisher: τ_F > 0.
    tau_hessian: τ_H > 0 (used only with ``second_order``).
    second_order: True: κ_t by ``jax.jvp``∘``jax.jvp``, m_H and the Hessian rule; False: one ``jax.jvp``, the Fisher
      rule only (no m_H).
    fisher: "sampled" (m_F = ½δ_t², CAPO's sampled-action Fisher) or "expected" (½ Δz_tᵀ(diag π − ππᵀ)Δz_t).
    hessian_rule: "symmetric" (every released run) or "nonsymmetric".
    monitor_fn: an optional last-layer hook (``TokenMaskFn``, e.g. a τ = ∞ ``masked_transform``): its mask is
      discarded, its ``update_kwargs`` go to every ``optimizer.update`` and its metrics are logged under their own
      (unprefixed) keys.
    pass_batch: also hand the batch to ``optimizer.update`` (the curvature trust region; it then scales the proposal
      too).
  """
  validation.check_positive("tau_fisher", tau_fisher)
  if second_order:
    if tau_hessian is None:
      raise ValueError("second_order=True applies the Hessian rule: pass tau_hessian (or second_order=False).")
    validation.check_positive("tau_hessian", tau_hessian)
  tau_h = tau_hessian if second_order else None
  forward, with_entropy = _policy_forward(graphdef, objective)
  completion_length = objective.completion_length
  sg = jax.lax.stop_gradient

  def logits_fn(params, batch):
    return completion_logits(graphdef, params, batch, completion_length,
                             prompt_group_size=objective.prompt_group_size)

  def grads_fn(params, opt_state, batch: SequenceBatch):
    out, pullback, (ent, hidden, w, targets) = jax.vjp(lambda p: forward(p, batch), params, has_aux=True)

    def loss_of_outputs(out_, token_mask_bn):
      lp_, ent_ = out_ if with_entropy else (out_, ent)
      return rl_objective(lp_, ent_, batch, objective, token_mask_bn)

    objective_grad = jax.grad(loss_of_outputs, has_aux=True)
    update_kwargs, monitor_metrics = _run_monitor(monitor_fn, hidden, w, targets, batch, opt_state)
    if pass_batch:
      update_kwargs = dict(update_kwargs, batch=batch)
    unmasked = pullback(objective_grad(out, None)[0])[0]
    proposal = sg(optimizer.update(unmasked, opt_state, params, **update_kwargs)[0])
    completion = loss_completion_mask(batch)
    stats = sg(curvature_full.full_network_token_stats(
        logits_fn, params, batch, proposal, targets, batch.advantages_b.astype(jnp.float32),
        second_order=second_order, fisher=fisher, temperature=objective.temperature))
    keep = curvature_full.full_network_token_mask(stats, completion, tau_fisher=tau_fisher, tau_hessian=tau_h,
                                                  hessian_rule=hessian_rule)
    cotangent, metrics = objective_grad(out, keep)
    grads = pullback(cotangent)[0]
    fullnet = fullnet_mask_metrics(stats, completion, tau_fisher=tau_fisher, tau_hessian=tau_h,
                                   hessian_rule=hessian_rule)
    metrics = dict(metrics, **{FULLNET_PREFIX + k: v for k, v in fullnet.items()}, **monitor_metrics,
                   proposal_norm=optax.tree.norm(proposal))
    return grads, FullNetworkStepAux(keep, stats, proposal, metrics, update_kwargs)

  return grads_fn


def make_fullnet_rl_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, objective: Objective,
                         **kwargs):
  """Jitted ``(params, opt_state, batch) -> (params, opt_state, metrics)`` with the full-network token mask.

  ``make_fullnet_rl_grads`` (same keyword arguments) then one real ``optimizer.update`` on the masked gradient.
  Metrics: ``rl_objective``'s (over the kept tokens), ``curvature.METRIC_KEYS`` of the full-network statistics
  prefixed ``fullnet_`` (``fullnet_mask_metrics``), ``proposal_norm`` = ‖Δθ‖, ``grad_norm`` / ``update_norm`` of the
  real step and, with a monitor, its metrics under their own keys. Cost: one forward, two pullbacks, two optimizer
  updates and one ``jax.jvp`` (``jax.jvp``∘``jax.jvp`` with ``second_order``) of the ``[B, N, V]`` completion logits.
  """
  grads_fn = make_fullnet_rl_grads(graphdef, optimizer, objective, **kwargs)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, opt_state, batch: SequenceBatch):
    grads, aux = grads_fn(params, opt_state, batch)
    params, opt_state, updates, finite = guarded_update(True, optimizer, grads, opt_state, params,
                                                        aux.metrics["loss"], **aux.update_kwargs)
    metrics = dict(aux.metrics, grad_norm=optax.tree.norm(grads), update_norm=optax.tree.norm(updates),
                   skipped_nonfinite=1.0 - finite.astype(jnp.float32),
                   prompt_group_mismatch=_batch_group_mismatch(batch, objective))
    return params, opt_state, metrics

  return step


class SubsetStepAux(NamedTuple):
  """What ``make_subset_rl_grads`` returns next to the accepted-mean gradient."""
  stats: curvature_full.SubsetAcceptanceStats  # per subset [S]: m_H, m_F, accepted (raw rule), loss
  real_s: jax.Array  # bool [S]: the subset holds at least one real (non-padding) row
  accepted_s: jax.Array  # bool [S]: real and accepted: the subsets whose gradients were averaged
  metrics: dict[str, jax.Array]
  update_kwargs: dict[str, Any]


def make_subset_rl_grads(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, objective: Objective,
                         *, num_subsets: int, delta_h: float = 0.0, delta_f: float | None = None,
                         monitor_fn: TokenMaskFn | None = None):
  """``(params, opt_state, batch) -> (mean accepted loss gradient, SubsetStepAux)``: Theorem 5.1 acceptance over
  ``num_subsets`` equal slices of the batch (rows ordered by prompt: S = prompts per step makes each subset one
  prompt's group of G completions). Pure; jit it (or use ``make_subset_rl_step``).

  For each subset b_i with loss L_i = ``rl_objective`` on b_i (from the completion logits), gradient ∇L_i and the
  chain's proposal Δθ_i = optimizer.update(∇L_i, opt_state, θ)[0] (state discarded):

      m_H(Δθ_i) = −∇L_i·Δθ_i − ½Δθ_iᵀ∇²L_iΔθ_i        predicted objective change (HVP)
      m_F(Δθ_i) = ½Δθ_iᵀF̄_iΔθ_i                         predicted mean-token KL (expected Fisher)
      accept_i  = [m_H ≥ δ_H] · [m_F ≤ δ_F] · [b_i has a real row]
      ∇L        = (1/|acc|) Σ_{i ∈ acc} ∇L_i             (zeros when nothing is accepted)

  (``curvature_full.subset_acceptance``). Subsets made only of padding rows (groups dropped by dynamic sampling) have
  a zero gradient; they are left out of the count so that the mean runs over the real accepted subsets, as
  ``rl_objective`` averages over the real rows. With every real subset accepted (and a sequence-mean aggregation)
  ∇L is the plain batch gradient.

  Args:
    graphdef, optimizer, objective: as ``make_rl_step``.
    num_subsets: S; must divide the batch.
    delta_h: δ_H ≥ 0 = ω + ½Mr² (minimum predicted improvement).
    delta_f: δ_F > 0 (maximum predicted mean-token KL of a subset's step); None: no Fisher condition (δ_F = ∞).
    monitor_fn: an optional last-layer hook (τ = ∞ ``masked_transform``) run on a full-batch forward: its mask is
      discarded, its ``update_kwargs`` go to every ``optimizer.update`` and its metrics are logged unprefixed
      (the subset rule has no per-token statistics of its own).
  """
  if num_subsets < 1:
    raise ValueError(f"num_subsets must be ≥ 1, got {num_subsets}.")
  if not (math.isfinite(delta_h) and delta_h >= 0):
    raise ValueError(f"delta_h must be a finite number ≥ 0 (δ_H = ω + ½Mr²), got {delta_h}.")
  if delta_f is not None and not delta_f > 0:
    raise ValueError(f"delta_f must be > 0 (the KL budget δ_F) or None (no Fisher condition), got {delta_f}.")
  delta_f_value = math.inf if delta_f is None else float(delta_f)
  forward, _ = _policy_forward(graphdef, objective)
  completion_length = objective.completion_length

  def logits_fn(params, batch):
    return completion_logits(graphdef, params, batch, completion_length,
                             prompt_group_size=objective.prompt_group_size)

  def surrogate(logits_bnv, sub: SequenceBatch):
    lp, ent = token_logprobs(logits_bnv, sub.tokens_bs[:, -completion_length:], temperature=objective.temperature)
    return rl_objective(lp, ent, sub, objective)[0]

  def grads_fn(params, opt_state, batch: SequenceBatch):
    # A full-batch forward (no backward) for the batch's metrics and the optional last-layer monitor.
    out, (ent, hidden, w, targets) = forward(params, batch)
    lp = out[0] if isinstance(out, tuple) else out
    _, metrics = rl_objective(lp, ent, batch, objective)
    update_kwargs, monitor_metrics = _run_monitor(monitor_fn, hidden, w, targets, batch, opt_state)
    subsets = curvature_full.split_into_subsets(batch, num_subsets)
    mean_grads, stats = curvature_full.subset_acceptance(
        logits_fn, surrogate, params, subsets,
        lambda g: optimizer.update(g, opt_state, params, **update_kwargs)[0],
        delta_h=delta_h, delta_f=delta_f_value, completion_mask_fn=loss_completion_mask,
        temperature=objective.temperature)
    real_s = jnp.any(subsets.row_weight_b > 0, axis=1)
    accepted_s = stats.accepted_s & real_s
    num_accepted = jnp.sum(accepted_s.astype(jnp.int32))
    num_real = jnp.sum(real_s.astype(jnp.int32))
    # subset_acceptance divided by every accepted subset; padding subsets add zero, so re-divide by the real ones.
    rescale = stats.num_accepted.astype(jnp.float32) / jnp.maximum(num_accepted, 1).astype(jnp.float32)
    grads = jax.tree.map(lambda g: (g * rescale.astype(g.dtype)).astype(g.dtype), mean_grads)

    def quantile(x_s, q):
      return jnp.nanquantile(jnp.where(real_s, x_s.astype(jnp.float32), jnp.nan), q)

    metrics = dict(
        metrics, **monitor_metrics,
        subset_accepted_fraction=num_accepted.astype(jnp.float32) / jnp.maximum(num_real, 1).astype(jnp.float32),
        subset_num_accepted=num_accepted.astype(jnp.float32), subset_num_subsets=num_real.astype(jnp.float32),
        subset_m_h_min=quantile(stats.m_h_s, 0.0), subset_m_h_p50=quantile(stats.m_h_s, 0.5),
        subset_m_f_p50=quantile(stats.m_f_s, 0.5), subset_m_f_max=quantile(stats.m_f_s, 1.0))
    return grads, SubsetStepAux(stats, real_s, accepted_s, metrics, update_kwargs)

  return grads_fn


def make_subset_rl_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, objective: Objective,
                        **kwargs):
  """Jitted ``(params, opt_state, batch) -> (params, opt_state, metrics)`` with Theorem 5.1 subset acceptance.

  ``make_subset_rl_grads`` (same keyword arguments) then one real ``optimizer.update`` on the mean accepted gradient.
  When no subset is accepted the theorem's aggregated step is Δθ = 0: the step is skipped (parameters and optimizer
  state unchanged; an Adam update of a zero gradient would still move along its momentum). Metrics:
  ``rl_objective``'s on the whole batch (every token), ``SUBSET_METRIC_KEYS`` (m_H/m_F quantiles over the real
  subsets; null when there is none), ``grad_norm`` / ``update_norm`` and the monitor's metrics if any. Cost per
  subset: one ``jax.linearize`` of its gradient (HVP and logit tangent) and one proposal; plus one full-batch forward.
  """
  grads_fn = make_subset_rl_grads(graphdef, optimizer, objective, **kwargs)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, opt_state, batch: SequenceBatch):
    grads, aux = grads_fn(params, opt_state, batch)
    # The whole batch's loss decides finiteness (a NaN subset is never accepted, so its gradient alone would not).
    params, opt_state, updates, finite = guarded_update(jnp.any(aux.accepted_s), optimizer, grads, opt_state,
                                                        params, aux.metrics["loss"], **aux.update_kwargs)
    metrics = dict(aux.metrics, grad_norm=optax.tree.norm(grads), update_norm=optax.tree.norm(updates),
                   skipped_nonfinite=1.0 - finite.astype(jnp.float32),
                   prompt_group_mismatch=_batch_group_mismatch(batch, objective))
    return params, opt_state, metrics

  return step


def update_if(take: jax.Array, optimizer: optax.GradientTransformation, grads: PyTree, opt_state: PyTree,
              params: PyTree, **update_kwargs) -> tuple[PyTree, PyTree, PyTree]:
  """``(params, opt_state, updates)`` after one ``optimizer.update`` when ``take``, else unchanged (zero updates)."""
  updates, new_state = optimizer.update(grads, opt_state, params, **update_kwargs)
  updates = jax.tree.map(lambda u: jnp.where(take, u, jnp.zeros_like(u)), updates)
  opt_state = jax.tree.map(lambda new, old: jnp.where(take, new, old), new_state, opt_state)
  return optax.apply_updates(params, updates), opt_state, updates


def all_finite(*trees: PyTree) -> jax.Array:
  """``[]`` bool: every inexact leaf of every tree is finite (integer leaves always are)."""
  checks = [jnp.all(jnp.isfinite(x)) for tree in trees for x in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
  return jnp.all(jnp.stack(checks)) if checks else jnp.array(True)


def guarded_update(take: Any, optimizer: optax.GradientTransformation, grads: PyTree, opt_state: PyTree,
                   params: PyTree, loss: jax.Array, **update_kwargs) -> tuple[PyTree, PyTree, PyTree, jax.Array]:
  """``update_if`` that also skips a non-finite step: ``(params, opt_state, applied updates, finite)``.

  finite = [loss, every gradient and every update are finite]; the step is applied iff ``take`` and finite, else
  parameters and optimizer state are returned unchanged (``jnp.where`` per leaf, so a NaN never reaches them and the
  selection fuses with the update: no extra copy of the parameters). ``finite`` is what the host loop counts
  (``skipped_nonfinite``); a ``take`` = False step is not a non-finite one.
  """
  updates, new_state = optimizer.update(grads, opt_state, params, **update_kwargs)
  finite = all_finite(loss, grads, updates)
  apply = jnp.logical_and(take, finite)
  updates = jax.tree.map(lambda u: jnp.where(apply, u, jnp.zeros_like(u)), updates)
  opt_state = jax.tree.map(lambda new, old: jnp.where(apply, new, old), new_state, opt_state)
  return optax.apply_updates(params, updates), opt_state, updates, finite
