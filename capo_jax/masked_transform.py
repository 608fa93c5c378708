"""``capo_jax.masked_transform``: CAPO's curvature token mask as an optax transformation.

Contract — the mask is a pure function of the optimizer state and ONE forward pass, read before ONE ``jax.grad``:

    capo = capo_jax.masked_transform(optax.adamw(sched), tau_fisher=1e-4, tau_hessian=1e-2, learning_rate=sched)
    tx = optax.chain(optax.clip_by_global_norm(1.0), capo)     # composes with anything before / after it
    opt_state = tx.init(params)

    def loss_fn(params, opt_state, batch):
      out = apply(params, batch.tokens)                          # the only forward pass
      mask_bt, aux = capo.token_mask(opt_state, out.hidden, out.logits, batch.actions, batch.adv, batch.mask)
      loss, _ = policy_loss(..., token_mask_bt=mask_bt)           # rejected tokens leave the loss
      return loss, aux
    grads, aux = jax.grad(loss_fn, has_aux=True)(params, opt_state, batch)   # the only backward pass
    updates, opt_state = tx.update(grads, opt_state, params, capo_aux=aux)   # bookkeeping
    params = optax.apply_updates(params, updates)

``token_mask`` runs on ``jax.lax.stop_gradient`` of the forward's hidden states and logits: the mask is piecewise
constant, contributes no gradient, and the single backward pass is exactly the gradient of the loss with the
rejected tokens removed (including the loss's renormalisation by the kept tokens). ``update`` then runs the wrapped
optimizer on those gradients, advances the shadow Adam moments (``moments="shadow"``) with the masked batch-mean
per-row gradient carried by ``capo_aux``, and stores the mask statistics in the state for logging.

Why the mask is applied inside the loss rather than to the logit cotangents inside the transform: the mask must be
known before the backward pass, and it only needs the forward's outputs plus the optimizer's state *before* the step,
both of which the train step already holds. Masking inside the loss keeps every loss variant (clip, GSPO, CISPO, KL,
entropy, each aggregation and its renormalisation) unchanged and exact, whereas masking logit cotangents inside the
transform would have to re-derive each loss's per-token weights and normalisation. The transform stays an ordinary
``GradientTransformationExtraArgs`` over ordinary gradients, so clipping, schedules, ``optax.MultiSteps`` or weight
decay compose around it as with ``optax.masked``.

Direction model (``direction="adam"``): by default the REAL moments of the wrapped optimizer's ``ScaleByAdamState``
are read (rows gathered by token id from the unembedding leaf, found by ``unembedding_predicate``; optax's moments
are of the loss, hence the sign flip in ``curvature.adam_direction``). ``moments="shadow"`` instead keeps the
reference's own Adam moments of the unembedding (of the objective gradient, updated after each step with the masked
batch-mean per-row top-K gradient) for bit-faithful comparison. ``direction="sgd"`` needs no moments.

η: ``learning_rate`` (float, or optax schedule evaluated at this transform's update count = the wrapped optimizer's
step count) or, when None, the ``learning_rate`` hyper-parameter of an ``optax.inject_hyperparams`` inner optimizer
(its stored value is the one used by the LAST update, i.e. it lags a schedule by one step; pass ``learning_rate=`` to
be exact).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax
import optax.tree_utils as otu

from capo_jax import curvature as cv
from capo_jax import sharding
from capo_jax import validation

Array = jax.Array
UnembeddingPredicate = Callable[[tuple[str, ...], Any], bool]

METRIC_KEYS = (*cv.METRIC_KEYS, "learning_rate")
MOMENTS = ("real", "shadow")  # whose Adam moments the direction model reads
_TIED_NAMES = ("embed", "embedding", "embed_tokens")
# What probing the inner optimizer's init on a one-leaf dummy tree may raise when that optimizer needs the real params
# structure: tree-structure mismatches (ValueError), a labels/mask function reading a key, index or attribute the
# dummy lacks (LookupError, AttributeError) or an operation on the wrong kind of leaf (TypeError).
_PROBE_ERRORS = (ValueError, TypeError, LookupError, AttributeError)


class ShadowAdamState(NamedTuple):
  """The reference's shadow Adam of the unembedding: moments of the OBJECTIVE gradient, [V,H]."""

  count: Array
  mu: Array
  nu: Array


class MaskedTransformState(NamedTuple):
  """State of ``masked_transform``: a pytree that jits, shards and round-trips through Orbax."""

  count: Array  # int32 number of updates taken (the schedule index for η)
  inner_state: optax.OptState
  shadow: ShadowAdamState | optax.EmptyState
  metrics: dict[str, Array]  # the last step's mask statistics (``METRIC_KEYS``)


class CapoAux(NamedTuple):
  """What ``token_mask`` returns next to the mask; hand it back as ``tx.update(..., capo_aux=aux)``."""

  mask_bt: Array  # final 0/1 mask: completion mask × curvature mask
  metrics: dict[str, Array]
  m_hessian: Array  # the statistics behind the mask: [B,T] token, [B] sentence, [] global
  m_fisher: Array
  hidden_bth: Array  # stop-gradient'ed forward outputs needed by the shadow-moment update
  top_k: cv.TopKPolicy
  advantages_b: Array


def _default_predicate(names: tuple[str, ...], leaf: Any) -> bool:
  del leaf
  return "lm_head" in names


def _tied_predicate(names: tuple[str, ...], leaf: Any) -> bool:
  del leaf
  return any(n in _TIED_NAMES for n in names)


def find_unembedding(tree: Any, predicate: UnembeddingPredicate | None = None) -> tuple[tuple[str, ...], Array]:
  """The [V,H] unembedding leaf of a params-shaped tree: (path names, leaf).

  ``predicate(path_names, leaf) -> bool`` selects it among the rank-2 leaves. Default: a path containing 'lm_head',
  else (tied embeddings) one containing 'embed'/'embedding'/'embed_tokens'. Exactly one leaf must match.
  """
  leaves = [(sharding.key_names(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
            if getattr(x, "ndim", None) == 2]
  predicates = [predicate] if predicate is not None else [_default_predicate, _tied_predicate]
  for pred in predicates:
    found = [(n, x) for n, x in leaves if pred(n, x)]
    if len(found) == 1:
      return found[0]
    if len(found) > 1:
      raise ValueError(f"the unembedding predicate matches {len(found)} rank-2 parameters "
                       f"({['/'.join(n) for n, _ in found]}); pass unembedding_predicate= that selects exactly one.")
  raise ValueError("no rank-2 parameter matches the unembedding predicate (default: a path containing 'lm_head', "
                   "else the tied 'embed'/'embedding' table); pass unembedding_predicate=lambda path, leaf: ... "
                   f"Rank-2 parameters seen: {['/'.join(n) for n, _ in leaves][:20]}.")


def _adam_states(inner_state: Any) -> list[optax.ScaleByAdamState]:
  return [s for _, s in otu.tree_get_all_with_path(inner_state, "ScaleByAdamState")]


def _injected(inner_state: Any, name: str) -> Array | None:
  for _, hyper in otu.tree_get_all_with_path(inner_state, "hyperparams"):
    if isinstance(hyper, dict) and name in hyper:
      return hyper[name]
  return None


def _find_own_state(opt_state: Any) -> MaskedTransformState:
  if isinstance(opt_state, MaskedTransformState):
    return opt_state
  found = [s for _, s in otu.tree_get_all_with_path(opt_state, "MaskedTransformState")]
  if len(found) != 1:
    raise ValueError(f"expected exactly one masked_transform state inside opt_state, found {len(found)}; pass the "
                     "state returned by the chain's init/update.")
  return found[0]


@dataclasses.dataclass(frozen=True)
class _Settings:
  """The validated arguments of ``masked_transform`` (see there), shared by its init, update and token_mask."""

  tau_fisher: float
  tau_hessian: float
  learning_rate: float | optax.Schedule | None
  top_k: int
  direction: str
  moments: str
  unembedding_predicate: UnembeddingPredicate | None
  hessian_rule: cv.HessianRule
  granularity: cv.Granularity
  temperature: float
  b1: float | None
  b2: float | None
  eps: float | None
  chunk_size: int

  @property
  def real_adam(self) -> bool:
    """The direction model reads the inner optimizer's own Adam moments."""
    return self.direction == "adam" and self.moments == "real"

  @property
  def shadow_adam(self) -> bool:
    """The direction model reads the reference's shadow Adam moments kept in this transform's state."""
    return self.direction == "adam" and self.moments == "shadow"


def _check_inner_state(settings: _Settings, inner_state: Any, *, at_init: bool) -> None:
  """The inner optimizer's state holds what the settings read: one Adam state (real moments), an η (no
  ``learning_rate`` given)."""
  where = "" if at_init else " (probed at construction)"
  if settings.real_adam and len(_adam_states(inner_state)) != 1:
    n = len(_adam_states(inner_state))
    raise ValueError(f"direction='adam' with moments='real' reads the inner optimizer's Adam moments, but its state "
                     f"holds {n} ScaleByAdamState{where}; wrap an Adam-family optimizer (optax.adam/adamw), or use "
                     "moments='shadow' or direction='sgd'.")
  if settings.learning_rate is None and _injected(inner_state, "learning_rate") is None:
    raise ValueError(f"no learning rate for CAPO's η{where}: pass learning_rate= (float or schedule) or wrap the "
                     "inner optimizer with optax.inject_hyperparams so its learning_rate is in the state.")


def _probe_inner_state(inner: optax.GradientTransformation) -> Any | None:
  """The inner state's shapes for a dummy one-leaf params tree, or None when the inner optimizer needs the real params
  structure (then ``_check_inner_state`` runs at init instead). Any other error is a real one and propagates."""
  try:
    return jax.eval_shape(inner.init, {"lm_head": {"weight": jax.ShapeDtypeStruct((2, 2), jnp.float32)}})
  except _PROBE_ERRORS:
    return None


def _adam_constants(settings: _Settings, inner_state: Any) -> tuple[Any, Any, Any]:
  """(b1, b2, eps) of the direction model: as given, else the inner ``inject_hyperparams`` value, else optax's."""

  def pick(given, name, default):
    if given is not None:
      return given
    injected = _injected(inner_state, name)
    return default if injected is None else injected

  return pick(settings.b1, "b1", 0.9), pick(settings.b2, "b2", 0.999), pick(settings.eps, "eps", 1e-8)


def _learning_rate(settings: _Settings, state: MaskedTransformState) -> Array:
  """η of the modelled step: the float, the schedule at this transform's update count, or the injected value."""
  if settings.learning_rate is None:
    return jnp.asarray(_injected(state.inner_state, "learning_rate"))
  if callable(settings.learning_rate):
    return jnp.asarray(settings.learning_rate(state.count))
  return jnp.asarray(settings.learning_rate)


def _direction(settings: _Settings, state: MaskedTransformState, vocab: int, hidden: int) -> cv.DirectionModel:
  """The direction model of the statistics, with the moments the settings read ([V,H] tables)."""
  if settings.direction == "sgd":
    return cv.SGDDirection()
  c1, c2, e = _adam_constants(settings, state.inner_state)
  if settings.moments == "shadow":
    sh = state.shadow
    return cv.AdamDirection(sh.mu, sh.nu, sh.count, c1, c2, e, moments_of_loss=False)
  adam = _adam_states(state.inner_state)[0]
  _, mu = find_unembedding(adam.mu, settings.unembedding_predicate)
  _, nu = find_unembedding(adam.nu, settings.unembedding_predicate)
  if mu.shape != (vocab, hidden):
    raise ValueError(f"the unembedding moments have shape {mu.shape}, expected [V,H] = {(vocab, hidden)}; the "
                     "unembedding parameter must be stored as [V,H] with logits = hidden @ W.T.")
  return cv.AdamDirection(mu, nu, adam.count, c1, c2, e, moments_of_loss=True)


def _init(settings: _Settings, inner: optax.GradientTransformationExtraArgs, params: Any) -> MaskedTransformState:
  names, w_vh = find_unembedding(params, settings.unembedding_predicate)
  validation.check_top_k(settings.top_k, w_vh.shape[0], where=f" of the unembedding {'/'.join(names)}")
  inner_state = inner.init(params)
  _check_inner_state(settings, inner_state, at_init=True)
  if settings.real_adam:
    _, mu_vh = find_unembedding(_adam_states(inner_state)[0].mu, settings.unembedding_predicate)
    if mu_vh.shape != w_vh.shape:
      raise ValueError(f"the inner Adam moments of the unembedding have shape {mu_vh.shape}, not the parameter's "
                       f"{w_vh.shape}; use moments='shadow' for an optimizer that stores factored moments.")
  if settings.shadow_adam:
    dtype = jnp.promote_types(w_vh.dtype, jnp.float32)
    shadow = ShadowAdamState(jnp.zeros([], jnp.int32), jnp.zeros(w_vh.shape, dtype), jnp.zeros(w_vh.shape, dtype))
  else:
    shadow = optax.EmptyState()
  metrics = {k: jnp.zeros([], jnp.float32) for k in METRIC_KEYS}
  return MaskedTransformState(jnp.zeros([], jnp.int32), inner_state, shadow, metrics)


def _mask_inputs(settings: _Settings, opt_state: Any, hidden_bth: Array) -> tuple[MaskedTransformState, Array, Array]:
  """This transform's state and the hidden states, both stop-gradient'ed, and η."""
  state = jax.lax.stop_gradient(_find_own_state(opt_state))
  return state, jax.lax.stop_gradient(hidden_bth), _learning_rate(settings, state)


def _mask_and_aux(settings: _Settings, stats: cv.CurvatureStatistics, eta: Array, hidden_bth: Array,
                  advantages_b: Array, completion_mask_bt: Array) -> tuple[Array, CapoAux]:
  """The shared tail of both entry points: the statistics' mask rules × the completion mask, and the ``CapoAux``."""
  mask = cv.curvature_mask(stats.m_hessian, stats.m_fisher, tau_fisher=settings.tau_fisher,
                           tau_hessian=settings.tau_hessian, hessian_rule=settings.hessian_rule)
  completion = completion_mask_bt > 0
  valid = {"token": completion, "sentence": jnp.any(completion, axis=1),
           "global": jnp.any(completion)}[settings.granularity]
  metrics = cv.mask_metrics(stats.m_hessian, stats.m_fisher, mask, valid)
  metrics["learning_rate"] = eta.astype(jnp.float32)
  final_bt = (cv.broadcast_to_tokens(mask.keep, completion.shape) & completion).astype(jnp.float32)
  return final_bt, CapoAux(final_bt, metrics, stats.m_hessian, stats.m_fisher, hidden_bth, stats.top_k,
                           jax.lax.stop_gradient(advantages_b))


def _token_mask(settings: _Settings, opt_state: Any, hidden_bth: Array, logits_btv: Array, tokens_bt: Array,
                advantages_b: Array, completion_mask_bt: Array) -> tuple[Array, CapoAux]:
  """``MaskedTransformation.token_mask``."""
  chex.assert_rank([hidden_bth, logits_btv, tokens_bt, advantages_b, completion_mask_bt], [3, 3, 2, 1, 2])
  state, hidden_bth, eta = _mask_inputs(settings, opt_state, hidden_bth)
  stats = cv.curvature_statistics(
      hidden_bth, jax.lax.stop_gradient(logits_btv), tokens_bt, jax.lax.stop_gradient(advantages_b),
      completion_mask_bt, top_k=settings.top_k, learning_rate=eta,
      direction=_direction(settings, state, logits_btv.shape[-1], hidden_bth.shape[-1]),
      granularity=settings.granularity, temperature=settings.temperature, chunk_size=settings.chunk_size)
  return _mask_and_aux(settings, stats, eta, hidden_bth, advantages_b, completion_mask_bt)


def _token_mask_from_hidden(settings: _Settings, opt_state: Any, hidden_bth: Array, unembedding_vh: Array,
                            tokens_bt: Array, advantages_b: Array,
                            completion_mask_bt: Array) -> tuple[Array, CapoAux]:
  """``MaskedTransformation.token_mask_from_hidden``."""
  chex.assert_rank([hidden_bth, unembedding_vh, tokens_bt, advantages_b, completion_mask_bt], [3, 2, 2, 1, 2])
  state, hidden_bth, eta = _mask_inputs(settings, opt_state, hidden_bth)
  stats = cv.curvature_statistics_from_hidden(
      hidden_bth, jax.lax.stop_gradient(unembedding_vh), tokens_bt, jax.lax.stop_gradient(advantages_b),
      completion_mask_bt, top_k=settings.top_k, learning_rate=eta,
      direction=_direction(settings, state, unembedding_vh.shape[0], hidden_bth.shape[-1]),
      granularity=settings.granularity, temperature=settings.temperature, chunk_size=settings.chunk_size)
  return _mask_and_aux(settings, stats, eta, hidden_bth, advantages_b, completion_mask_bt)


def _token_mask_from_top_k(settings: _Settings, opt_state: Any, hidden_bth: Array, top: cv.TopKPolicy, vocab_size: int,
                           advantages_b: Array, completion_mask_bt: Array) -> tuple[Array, CapoAux]:
  """``MaskedTransformation.token_mask_from_top_k``."""
  chex.assert_rank([hidden_bth, advantages_b, completion_mask_bt], [3, 1, 2])
  state, hidden_bth, eta = _mask_inputs(settings, opt_state, hidden_bth)
  top = jax.tree.map(jax.lax.stop_gradient, top)
  stats = cv.curvature_statistics_from_top_k(
      hidden_bth, top, vocab_size, jax.lax.stop_gradient(advantages_b), completion_mask_bt, learning_rate=eta,
      direction=_direction(settings, state, vocab_size, hidden_bth.shape[-1]), granularity=settings.granularity,
      chunk_size=settings.chunk_size)
  return _mask_and_aux(settings, stats, eta, hidden_bth, advantages_b, completion_mask_bt)


def _advance_shadow(settings: _Settings, shadow: ShadowAdamState, inner_state: Any,
                    capo_aux: CapoAux | None) -> ShadowAdamState:
  """The reference's shadow Adam step on the masked batch-mean per-row top-K gradient of the objective."""
  if capo_aux is None:
    raise ValueError("moments='shadow' updates its moments from the step's mask: call "
                     "tx.update(grads, opt_state, params, capo_aux=aux) with the aux returned by token_mask.")
  c1, c2, _ = _adam_constants(settings, inner_state)
  b, t, h = capo_aux.hidden_bth.shape
  flat = lambda x: x.reshape(b * t, *x.shape[2:])
  mask_n = flat(capo_aux.mask_bt)
  top = capo_aux.top_k
  g_vh = cv.unembedding_gradient(
      flat(capo_aux.hidden_bth), flat(top.probs_btk), flat(top.onehot_btk), flat(top.ids_btk),
      jnp.repeat(capo_aux.advantages_b, t), mask_n / jnp.maximum(jnp.sum(mask_n), 1.0), shadow.mu.shape[0],
      chunk_size=settings.chunk_size).astype(shadow.mu.dtype)
  return ShadowAdamState(
      optax.safe_increment(shadow.count),
      (1.0 - c1) * g_vh + c1 * shadow.mu,
      (1.0 - c2) * jnp.square(g_vh) + c2 * shadow.nu)


def _update(settings: _Settings, inner: optax.GradientTransformationExtraArgs, updates: optax.Updates,
            state: MaskedTransformState, params: optax.Params | None = None, *, capo_aux: CapoAux | None = None,
            **extra_args) -> tuple[optax.Updates, MaskedTransformState]:
  """The inner optimizer's update of the (already masked) gradients; the shadow moments and metrics advance."""
  inner_updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
  shadow = state.shadow
  if isinstance(shadow, ShadowAdamState):
    shadow = _advance_shadow(settings, shadow, state.inner_state, capo_aux)
  metrics = state.metrics
  if capo_aux is not None:
    metrics = {k: jnp.asarray(capo_aux.metrics[k], jnp.float32) for k in METRIC_KEYS}
  return inner_updates, MaskedTransformState(optax.safe_increment(state.count), inner_state, shadow, metrics)


class MaskedTransformation(optax.GradientTransformationExtraArgs):
  """``optax.GradientTransformationExtraArgs`` plus ``token_mask`` (see the module docstring for the contract)."""

  def token_mask(self, opt_state: Any, hidden_bth: Array, logits_btv: Array, tokens_bt: Array, advantages_b: Array,
                 completion_mask_bt: Array) -> tuple[Array, CapoAux]:
    """CAPO's final mask [B,T] (completion × curvature, float32) and the ``CapoAux`` for ``update``.

    Pure and jit-able; reads only ``opt_state`` (the whole chain's state or this transform's) and stop-gradient'ed
    forward outputs. ``logits_btv[:, t]`` / ``hidden_bth[:, t]`` must be those that sampled ``tokens_bt[:, t]``.
    """
    return _token_mask(self._settings, opt_state, hidden_bth, logits_btv, tokens_bt, advantages_b,
                       completion_mask_bt)

  def token_mask_from_hidden(self, opt_state: Any, hidden_bth: Array, unembedding_vh: Array, tokens_bt: Array,
                             advantages_b: Array, completion_mask_bt: Array) -> tuple[Array, CapoAux]:
    """``token_mask`` with the logits z = h Wᵀ formed one time chunk at a time from the final hidden states and the
    [V, H] unembedding: the same mask without a [B, T, V] array (the step's loss can then use
    ``capo_jax.token_logprobs_from_hidden`` and never hold the full logits either)."""
    return _token_mask_from_hidden(self._settings, opt_state, hidden_bth, unembedding_vh, tokens_bt, advantages_b,
                                   completion_mask_bt)

  def top_k_policy(self, logits_btv: Array, tokens_bt: Array, valid_bt: Array | None = None) -> cv.TopKPolicy:
    """The mask's top-K policy of these logits (its K and temperature; ``capo_jax.curvature.top_k_policy``): what
    ``token_mask_from_top_k`` takes, formed by the caller wherever it has the logits (e.g. one chunk at a time inside
    the loss's own logits pass, so that a step computes h Wᵀ once)."""
    return cv.top_k_policy(logits_btv, tokens_bt, self._settings.top_k, self._settings.temperature,
                           valid_bt=valid_bt)

  def token_mask_from_top_k(self, opt_state: Any, hidden_bth: Array, top: cv.TopKPolicy, vocab_size: int,
                            advantages_b: Array, completion_mask_bt: Array) -> tuple[Array, CapoAux]:
    """``token_mask`` from a ``top_k_policy`` the caller formed from the logits that sampled ``tokens_bt`` (valid at
    least where ``completion_mask_bt`` > 0): the same mask and aux as ``token_mask_from_hidden`` on those logits."""
    return _token_mask_from_top_k(self._settings, opt_state, hidden_bth, top, vocab_size, advantages_b,
                                  completion_mask_bt)


def masked_transform(
    inner: optax.GradientTransformation,
    *,
    tau_fisher: float,
    tau_hessian: float,
    learning_rate: float | optax.Schedule | None = None,
    top_k: int = 50,
    direction: str = "adam",
    moments: str = "real",
    unembedding_predicate: UnembeddingPredicate | None = None,
    hessian_rule: cv.HessianRule = "symmetric",
    granularity: cv.Granularity = "token",
    temperature: float = 1.0,
    b1: float | None = None,
    b2: float | None = None,
    eps: float | None = None,
    chunk_size: int = 256,
) -> MaskedTransformation:
  """Wraps ``inner`` so that the train step can mask CAPO-rejected tokens (docs/MATH.md §2) before its backward pass.

  Args:
    inner: the optimizer whose step is modelled (normally ``optax.adam``/``adamw``, possibly inject_hyperparams).
    tau_fisher: τ_F > 0; keep iff m_F < τ_F.
    tau_hessian: τ_H > 0; keep iff |m_H| < τ_H (symmetric) or 0 ≤ m_H < τ_H (``hessian_rule="nonsymmetric"``).
    learning_rate: η as a float or optax schedule (evaluated at the update count); None → read the inner
      ``inject_hyperparams`` state's ``learning_rate``.
    top_k: K of the last-layer model (the sampler's top_k); must be ≤ V (checked at init).
    direction: ``"adam"`` (default) or ``"sgd"`` direction model.
    moments: ``"real"`` (the inner optimizer's Adam moments) or ``"shadow"`` (the reference's own shadow Adam).
    unembedding_predicate: ``(path_names, leaf) -> bool`` selecting the [V,H] unembedding parameter
      (default: 'lm_head', else the tied 'embed'/'embedding' table).
    hessian_rule, granularity: see ``capo_jax.curvature`` (granularity "sentence"/"global" masks whole rows/batch).
    temperature: logits are divided by it before the top-K softmax (match the sampler).
    b1, b2, eps: Adam constants of the direction model; default: the inner ``inject_hyperparams`` values if any,
      else optax's (0.9, 0.999, 1e-8).
    chunk_size: tokens per chunk of the Adam token model (peak extra memory ≈ 6·chunk_size·K·H).

  Returns:
    A ``MaskedTransformation``: an ``optax.GradientTransformationExtraArgs`` whose ``update`` accepts the extra arg
    ``capo_aux`` (required with ``moments="shadow"``), plus the method ``token_mask``.
  """
  validation.check_mask_setting(tau_fisher=tau_fisher, tau_hessian=tau_hessian, hessian_rule=hessian_rule,
                                granularity=granularity, direction=direction, top_k=top_k)
  validation.check_one_of("moments", moments, MOMENTS)
  if learning_rate is not None and not callable(learning_rate):
    validation.check_positive("learning_rate", learning_rate, "CAPO's η, the step size of the modelled update")
  settings = _Settings(tau_fisher, tau_hessian, learning_rate, top_k, direction, moments, unembedding_predicate,
                       hessian_rule, granularity, temperature, b1, b2, eps, chunk_size)
  inner = optax.with_extra_args_support(inner)
  # Checked now on a dummy params tree when the inner optimizer allows it, else at init on the real params.
  probe = _probe_inner_state(inner)
  if probe is not None:
    _check_inner_state(settings, probe, at_init=False)
  tx = MaskedTransformation(functools.partial(_init, settings, inner), functools.partial(_update, settings, inner))
  tx._settings = settings  # pylint: disable=protected-access  (NamedTuple subclasses without __slots__ have a __dict__)
  return tx
