"""The learner: pure, jitted steps from a fixed-shape batch of sequences to new parameters and optimizer state.

A batch row is a left-padded prompt of ``P`` columns followed by ``N`` completion columns (``S = P + N``). The model
runs once over ``tokens[:, :-1]``; the hidden state at column ``P − 1 + n`` predicts completion token ``n``. Log-probs
come from ``token_logprobs_from_hidden`` (unembedding fused in chunks: the ``[B, N, V]`` logits are never stored for
the backward pass).

Two steps share that forward:

- ``make_sft_step``: the supervised warm start, mean negative log-likelihood of the target tokens.
- ``make_rl_step``: one optimizer step of the GRPO-family surrogate. A ``token_mask_fn`` (CAPO) sees the forward's
  hidden states and unembedding under ``stop_gradient`` and returns a 0/1 mask that ``policy_loss`` multiplies into
  the completion mask — one forward, one backward per step.

Everything here is a function of explicit arrays and pytrees; the host loop (``experiments/run.py``) only moves data.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from capo_jax.logprobs import token_logprobs_from_hidden
from capo_jax.losses import policy_loss

PyTree = Any


class SequenceBatch(NamedTuple):
  """One learner batch (numpy or jax arrays).

  Attributes:
    tokens_bs: ``[B, S]`` int32, prompt (left-padded, P columns) then completion (N columns).
    attention_mask_bs: ``[B, S]`` 0/1, real tokens.
    completion_mask_bn: ``[B, N]`` 0/1, completion tokens that count in the loss (through EOS).
    advantages_b: ``[B]`` float32 (zeros for supervised batches).
    old_logprobs_bn: ``[B, N]`` float32 behaviour log-probs (used when ratios are not 1).
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
                      completion_length: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Runs the model; returns ``(hidden_bnh, unembedding_vh, targets_bn)`` for the last ``N`` columns."""
  model = nnx.merge(graphdef, params)
  out = model(tokens_bs[:, :-1], attention_mask_bt=attention_mask_bs[:, :-1], return_logits=False)
  hidden_bnh = out.hidden[:, -completion_length:]
  return hidden_bnh, model.unembedding(), tokens_bs[:, -completion_length:]


def completion_logprobs(graphdef, params, tokens_bs, attention_mask_bs, completion_length: int, *,
                        temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """``(logprobs_bn, entropy_bn)`` of the completion tokens under the model (float32)."""
  hidden, w, targets = completion_hidden(graphdef, params, tokens_bs, attention_mask_bs, completion_length)
  return token_logprobs_from_hidden(hidden, w, targets, temperature=temperature)


def make_sft_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, completion_length: int):
  """Jitted ``(params, opt_state, tokens, attention_mask, target_mask) -> (params, opt_state, nll)``."""

  def loss_fn(params, tokens, mask, target_mask):
    lp, _ = completion_logprobs(graphdef, params, tokens, mask, completion_length)
    m = target_mask.astype(jnp.float32)
    return -jnp.sum(lp * m) / jnp.maximum(jnp.sum(m), 1.0)

  @jax.jit
  def step(params, opt_state, tokens, mask, target_mask):
    nll, grads = jax.value_and_grad(loss_fn)(params, tokens, mask, target_mask)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, nll

  return step


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """The surrogate and its extras (see ``capo_jax.policy_loss``)."""
  method: str = "clip"
  eps_low: float = 0.2
  eps_high: float | None = None
  dual_clip: float | None = None
  aggregation: str = "seq-mean-token-mean"
  max_completion_length: int | None = None
  kl_coef: float = 0.0
  kl_estimator: str = "k3"
  entropy_coef: float = 0.0
  temperature: float = 1.0
  ratio_one: bool = True  # one gradient step per batch: old log-probs = stop_gradient(current), ρ ≡ 1
  track_kl: bool = True  # report KL to the reference policy even when kl_coef = 0


# token_mask_fn(hidden_bnh, unembedding_vh, targets_bn, advantages_b, completion_mask_bn, opt_state)
#   -> (token_mask_bn, update_kwargs, log_metrics); inputs are stop-gradient'd. ``update_kwargs`` go to
#   ``optimizer.update`` as extra args (e.g. CAPO's ``capo_aux``), ``log_metrics`` into the step's metrics.
TokenMaskFn = Callable[..., tuple[jax.Array, dict[str, Any], dict[str, jax.Array]]]


def rl_loss(params, graphdef, batch: SequenceBatch, opt_state, loss_config: LossConfig, completion_length: int,
            token_mask_fn: TokenMaskFn | None = None):
  """The RL objective of one batch; returns ``(loss, (metrics, update_kwargs))``, differentiable in ``params``."""
  sg = jax.lax.stop_gradient
  hidden, w, targets = completion_hidden(graphdef, params, batch.tokens_bs, batch.attention_mask_bs,
                                         completion_length)
  lp, ent = token_logprobs_from_hidden(hidden, w, targets, temperature=loss_config.temperature)
  row_w = batch.row_weight_b.astype(jnp.float32)
  completion_mask = batch.completion_mask_bn.astype(jnp.float32) * row_w[:, None]
  token_mask, update_kwargs, mask_metrics = None, {}, {}
  if token_mask_fn is not None:
    token_mask, update_kwargs, mask_metrics = token_mask_fn(
        sg(hidden), sg(w), targets, sg(batch.advantages_b.astype(jnp.float32)), completion_mask, sg(opt_state))
  old = sg(lp) if loss_config.ratio_one else batch.old_logprobs_bn
  use_ref = loss_config.kl_coef > 0 or loss_config.track_kl
  loss, metrics = policy_loss(
      lp, old, batch.advantages_b.astype(jnp.float32), completion_mask, token_mask_bt=token_mask,
      method=loss_config.method, eps_low=loss_config.eps_low, eps_high=loss_config.eps_high,
      dual_clip=loss_config.dual_clip, aggregation=loss_config.aggregation,
      max_completion_length=loss_config.max_completion_length,
      ref_logprobs_bt=batch.ref_logprobs_bn if use_ref else None, kl_coef=loss_config.kl_coef,
      kl_estimator=loss_config.kl_estimator, entropy_bt=ent, entropy_coef=loss_config.entropy_coef)
  # Rows dropped by dynamic sampling are zero-weight padding: sequence-mean aggregations divide by all B rows, so
  # rescale to a mean over the real rows (token-mean already normalises by kept tokens).
  if loss_config.aggregation != "token-mean":
    loss = loss * row_w.shape[0] / jnp.maximum(jnp.sum(row_w), 1.0)
  metrics = dict(metrics, loss=sg(loss), **mask_metrics)
  return loss, (metrics, update_kwargs)


def make_rl_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, loss_config: LossConfig,
                 completion_length: int, token_mask_fn: TokenMaskFn | None = None, *, pass_batch: bool = False):
  """Jitted ``(params, opt_state, batch) -> (params, opt_state, metrics)``: one forward, one backward, one update.

  ``pass_batch``: also hand the batch to ``optimizer.update(..., batch=batch)`` (the curvature trust region
  linearises the model on it).
  """

  @jax.jit
  def step(params, opt_state, batch: SequenceBatch):
    (_, (metrics, update_kwargs)), grads = jax.value_and_grad(rl_loss, has_aux=True)(
        params, graphdef, batch, opt_state, loss_config, completion_length, token_mask_fn)
    if pass_batch:
      update_kwargs = dict(update_kwargs, batch=batch)
    updates, opt_state = optimizer.update(grads, opt_state, params, **update_kwargs)
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads), update_norm=optax.tree.norm(updates))
    return optax.apply_updates(params, updates), opt_state, metrics

  return step
