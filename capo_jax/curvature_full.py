"""CAPO beyond the last layer: the full-network directional model and Theorem 5.1 subset acceptance.

Source: Melo, Abate, Gal, arXiv 2510.00819 (CAPO); the derivations, this project's extensions, are in
``docs/MATH.md`` §3–§4.

The last-layer model (``capo_jax.curvature``) sees only the unembedding W, so curvature that lives in the transformer
body is invisible to it. Here the model is the whole network, along **one shared candidate update** Δθ of all
parameters (typically the optimizer's proposed update on the unmasked batch) — unlike the last-layer model, which
builds a separate direction d_t per token. Everything is a directional derivative, so the cost is a few forward-mode
passes, never a per-token gradient.

Contract for the model: a pure ``logits_fn(params, batch) -> logits_btv`` (or ``(logits_btv, hidden_bth)``, or an
object with a ``.logits`` field such as ``capo_jax.models`` outputs); position ``t`` of the logits scores
``actions_bt[:, t]`` (shift the model's outputs inside ``logits_fn``). The policy is π_t = softmax(z_t / T).

Per token (z_t the logits, a_t the sampled token, Δz_t = J_tΔθ, Δ²z_t = Δθᵀ∇²z_tΔθ, T folded into z):

    δ_t = ∇logπ(a_t)·Δθ            = Δz_t[a_t] − π_t·Δz_t                       (one ``jax.jvp``)
    F_t = Δz_tᵀ(diag π_t − π_tπ_tᵀ)Δz_t = π_t·Δz_t² − (π_t·Δz_t)²                 (expected-Fisher form)
    κ_t = Δθᵀ∇²logπ(a_t)Δθ         = Δ²z_t[a_t] − π_t·Δ²z_t − F_t              (``jax.jvp`` of ``jax.jvp``)

(the last line because d²/ds² logsumexp z(s) = π·z'' + z'ᵀ(diag π − ππᵀ)z'), and the predicted changes

    m_H(t) = A_i [δ_t + ½(δ_t² + κ_t)]     second-order change of A_i(π'_t/π_t − 1) = A_i(e^{Δlogπ_t} − 1)
    m_F(t) = ½ δ_t²   (sampled-action Fisher)   or   ½ F_t   (expected Fisher: the second-order KL(π_t ‖ π'_t)).

Δθ already contains the learning rate (it is the step itself), so there is no separate η here.

Theorem 5.1 mode (docs/MATH.md §3): split the batch into subsets b_i (prompt groups or micro-batches), propose an
update Δθ_i from each subset's gradient, accept the subsets with m_H(Δθ_i) ≥ δ_H and m_F(Δθ_i) ≤ δ_F and aggregate the
accepted gradients. This is the *theorem's* acceptance rule, a distinct mode from the released code's per-token
|m_H| < τ_H rejection ("CAPO", ``capo_jax.curvature``).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from capo_jax import curvature as last_layer
from capo_jax import validation

Array = jax.Array
PyTree = Any
LogitsFn = Callable[[PyTree, PyTree], Any]
FISHER_FORMS = ("sampled", "expected")  # m_F = ½δ_t² (sampled-action Fisher) or ½F_t (expected Fisher)


# ----------------------------------------------------------------------------------------------------------------
# Helpers shared with capo_jax.trust_region.


def upcast(x: Array) -> Array:
  """``x`` in at least float32 (bf16 → f32; f64 under ``jax.enable_x64`` stays f64, so tests can compare densely)."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def logits_of(output: Any) -> Array:
  """The logits from a ``logits_fn`` output: an array, a ``(logits, hidden)`` tuple, or an object with ``.logits``."""
  if isinstance(output, (tuple, list)):
    output = output[0]
  elif hasattr(output, "logits"):
    output = output.logits
  if output is None or not hasattr(output, "ndim") or output.ndim != 3:
    raise TypeError(
        "logits_fn must return logits [B, T, V], a (logits, hidden) tuple or an object with .logits; got "
        f"{type(output).__name__}{getattr(output, 'shape', '')}."
    )
  return output


def tangent_like(params: PyTree, update: PyTree) -> PyTree:
  """``update`` as a ``jax.jvp`` tangent of ``params``: same tree, each leaf cast to its parameter's dtype.

  Optax may hand back float32 updates for bf16 parameters, and ``jax.jvp`` requires tangent dtypes to match;
  non-float leaves (integer buffers, RNG counters in an NNX state) get float0 zeros, which is what jvp expects.
  """
  p_struct, u_struct = jax.tree.structure(params), jax.tree.structure(update)
  if p_struct != u_struct:
    raise ValueError(
        "the update must have the same tree structure as params (pass the optimizer's update for these params); "
        f"got {u_struct} vs {p_struct}."
    )

  def leaf(p, u):
    if jnp.issubdtype(jnp.result_type(p), jnp.inexact):
      return jnp.asarray(u).astype(jnp.result_type(p))
    return np.zeros(np.shape(p), dtype=jax.dtypes.float0)

  return jax.tree.map(leaf, params, update)


def logit_jet(
    logits_fn: LogitsFn, params: PyTree, batch: PyTree, update: PyTree, *, second_order: bool
) -> tuple[Array, Array, Array | None]:
  """Logits z and their first (and second) directional derivatives along ``update``, all ≥ float32 ``[B, T, V]``.

  ``z = f(θ)``, ``Δz = J Δθ`` by one ``jax.jvp``; with ``second_order``, ``Δ²z = Δθᵀ∇²z Δθ`` by ``jax.jvp`` of
  ``jax.jvp`` (forward-over-forward: the inner jvp's tangent output is differentiated again along the same Δθ).
  """
  tangent = tangent_like(params, update)

  def f(p):
    return upcast(logits_of(logits_fn(p, batch)))

  if not second_order:
    z, dz = jax.jvp(f, (params,), (tangent,))
    return z, dz, None

  def first(p):
    return jax.jvp(f, (p,), (tangent,))

  (z, dz), (_, d2z) = jax.jvp(first, (params,), (tangent,))
  return z, dz, d2z


def expected_fisher_form(logits_btv: Array, dlogits_btv: Array, *, temperature: float = 1.0) -> Array:
  """Per-token Δz_tᵀ(diag π_t − π_tπ_tᵀ)Δz_t = π_t·Δz_t² − (π_t·Δz_t)², with π_t = softmax(z_t / T), Δz scaled by 1/T.

  This is twice the second-order KL(π_t ‖ π_{t}+Δπ_t). Returns ``[B, T]`` (≥ float32).
  """
  chex.assert_rank(logits_btv, 3)
  chex.assert_equal_shape([logits_btv, dlogits_btv])
  inv_t = 1.0 / temperature
  p_btv = jax.nn.softmax(upcast(logits_btv) * inv_t, axis=-1)
  dz_btv = upcast(dlogits_btv) * inv_t
  mean_bt = jnp.sum(p_btv * dz_btv, axis=-1)
  # Centre before squaring: Σπ(Δz − π·Δz)² equals the form but never subtracts two large nearly equal numbers.
  return jnp.sum(p_btv * jnp.square(dz_btv - mean_bt[..., None]), axis=-1)


def _token_weights(mask_bt: Array | None, shape: tuple[int, int]) -> Array:
  """Completion mask as float weights normalised to sum 1 (uniform over all positions when ``None``)."""
  if mask_bt is None:
    mask_bt = jnp.ones(shape, jnp.float32)
  if mask_bt.shape != shape:
    raise ValueError(f"completion mask has shape {mask_bt.shape}, expected [B, T] = {shape}.")
  mask_bt = upcast(jnp.asarray(mask_bt))
  return mask_bt / jnp.maximum(jnp.sum(mask_bt), 1.0)


def predicted_mean_kl(
    logits_fn: LogitsFn,
    params: PyTree,
    batch: PyTree,
    update: PyTree,
    completion_mask_bt: Array | None = None,
    *,
    temperature: float = 1.0,
) -> Array:
  """Predicted mean KL(π_θ ‖ π_{θ+Δθ}) over completion tokens, from one ``jax.jvp`` of the logits.

      KL_pred(Δθ) = ½ · (1/N) Σ_{t ∈ completion} Δz_tᵀ(diag π_t − π_tπ_tᵀ)Δz_t,    Δz_t = J_tΔθ,

  i.e. ½ ΔθᵀF̄Δθ with F̄ the mean expected Fisher of the completion tokens. Quadratic in Δθ, so scaling Δθ by s
  scales it by s². Cost: one forward-mode pass (≈ one forward + its tangent). ``completion_mask_bt=None`` averages
  over every position. Returns a scalar (≥ float32).
  """
  z, dz, _ = logit_jet(logits_fn, params, batch, update, second_order=False)
  form_bt = expected_fisher_form(z, dz, temperature=temperature)
  return 0.5 * jnp.sum(_token_weights(completion_mask_bt, form_bt.shape) * form_bt)


# ----------------------------------------------------------------------------------------------------------------
# Per-token full-network directional model (docs/MATH.md §4).


class FullNetworkTokenStats(NamedTuple):
  """Per-token full-network statistics along one shared update Δθ; every field ``[B, T]`` (≥ float32).

  ``second_bt`` (κ_t) and ``m_h_bt`` are ``None`` when computed with ``second_order=False`` (Fisher only).
  """

  logprob_bt: Array  # logπ_θ(a_t)
  delta_bt: Array  # δ_t = ∇logπ(a_t)·Δθ
  second_bt: Array | None  # κ_t = Δθᵀ∇²logπ(a_t)Δθ
  fisher_bt: Array  # F_t = Δz_tᵀ(diag π − ππᵀ)Δz_t
  m_h_bt: Array | None  # A_i[δ_t + ½(δ_t² + κ_t)]
  m_f_bt: Array  # ½δ_t² ("sampled") or ½F_t ("expected")


def full_network_token_stats(
    logits_fn: LogitsFn,
    params: PyTree,
    batch: PyTree,
    update: PyTree,
    actions_bt: Array,
    advantages_b: Array,
    *,
    second_order: bool = True,
    fisher: str = "sampled",
    temperature: float = 1.0,
) -> FullNetworkTokenStats:
  """Per-token predicted objective change m_H and policy shift m_F of the whole network along Δθ (docs/MATH.md §4).

      δ_t = Δz_t[a_t] − π_t·Δz_t,     F_t = π_t·Δz_t² − (π_t·Δz_t)²,     κ_t = Δ²z_t[a_t] − π_t·Δ²z_t − F_t
      m_H(t) = A_i [δ_t + ½(δ_t² + κ_t)],     m_F(t) = ½δ_t² (fisher="sampled") or ½F_t (fisher="expected")

  with Δz = JΔθ (one ``jax.jvp``) and Δ²z = ΔθᵀH_zΔθ (``jax.jvp`` of ``jax.jvp``). **One shared direction**: Δθ is
  the same for every token (e.g. the optimizer's update on the unmasked batch, learning rate included), whereas the
  last-layer model of docs/MATH.md §2 gives each token its own direction d_t built from that token's gradient alone.

  Cost: one forward-mode pass (a forward and its tangent) with ``second_order=False``, a forward-mode pass of a
  forward-mode pass with ``second_order=True``. Peak extra memory: the float32 ``[B, T, V]`` logits and their tangent
  (plus the second tangent with ``second_order``).

  Args:
    logits_fn: pure ``(params, batch) -> logits_btv`` (see module docstring); position t scores ``actions_bt[:, t]``.
    params: the parameters θ (any pytree, e.g. an ``nnx.State``).
    batch: whatever ``logits_fn`` needs.
    update: Δθ, same tree as ``params`` (e.g. ``inner.update(grads, opt_state, params)[0]``).
    actions_bt: ``[B, T]`` sampled token ids a_t.
    advantages_b: ``[B]`` advantages A_i.
    second_order: compute κ_t and m_H (jvp∘jvp); False computes only δ_t, F_t and m_F (one jvp).
    fisher: "sampled" (m_F = ½δ²) or "expected" (m_F = ½F_t).
    temperature: sampling temperature T of the policy softmax(z / T).

  Returns:
    ``FullNetworkTokenStats``; mask it with the completion mask before reducing.
  """
  validation.check_one_of("fisher", fisher, FISHER_FORMS)
  validation.check_temperature(temperature)
  chex.assert_rank([actions_bt, advantages_b], [2, 1])
  z, dz, d2z = logit_jet(logits_fn, params, batch, update, second_order=second_order)
  if z.shape[:2] != actions_bt.shape or advantages_b.shape[0] != z.shape[0]:
    raise ValueError(
        f"logits {z.shape} must be [B, T, V] with actions [B, T] = {actions_bt.shape} and advantages [B] = "
        f"{advantages_b.shape} (shift the model's logits inside logits_fn so position t scores action t)."
    )
  inv_t = 1.0 / temperature
  z, dz = z * inv_t, dz * inv_t
  logp_btv = jax.nn.log_softmax(z, axis=-1)
  p_btv = jnp.exp(logp_btv)

  def at_action(x_btv):
    return jnp.take_along_axis(x_btv, actions_bt[..., None].astype(jnp.int32), axis=-1)[..., 0]

  logprob_bt = at_action(logp_btv)
  dz_mean_bt = jnp.sum(p_btv * dz, axis=-1)
  delta_bt = at_action(dz) - dz_mean_bt
  fisher_bt = jnp.sum(p_btv * jnp.square(dz - dz_mean_bt[..., None]), axis=-1)
  adv_b1 = upcast(advantages_b)[:, None]
  if second_order:
    d2z = d2z * inv_t
    second_bt = at_action(d2z) - jnp.sum(p_btv * d2z, axis=-1) - fisher_bt
    m_h_bt = adv_b1 * (delta_bt + 0.5 * (jnp.square(delta_bt) + second_bt))
  else:
    second_bt = m_h_bt = None
  m_f_bt = 0.5 * (jnp.square(delta_bt) if fisher == "sampled" else fisher_bt)
  return FullNetworkTokenStats(logprob_bt, delta_bt, second_bt, fisher_bt, m_h_bt, m_f_bt)


def full_network_token_mask(
    stats: FullNetworkTokenStats,
    completion_mask_bt: Array,
    *,
    tau_fisher: float,
    tau_hessian: float | None,
    hessian_rule: str = "symmetric",
) -> Array:
  """Keep-mask of the full-network model: the released CAPO rules (``capo_jax.curvature``) on the §4 statistics.

      keep_t = completion_t · [m_F(t) < τ_F] · [−τ_H < m_H(t) < τ_H]      (hessian_rule="symmetric")
      keep_t = completion_t · [m_F(t) < τ_F] · [0 ≤ m_H(t) < τ_H]         (hessian_rule="nonsymmetric")

  ``tau_hessian=None`` applies the Fisher rule only (for stats computed with ``second_order=False``).
  Returns a ``[B, T]`` float32 0/1 mask to multiply into the loss's token mask.
  """
  if tau_hessian is not None and stats.m_h_bt is None:
    raise ValueError("tau_hessian needs m_H: compute the stats with second_order=True, or pass tau_hessian=None.")
  chex.assert_equal_shape([stats.m_f_bt, completion_mask_bt])
  keep = last_layer.fisher_keep(stats.m_f_bt, tau_fisher)
  if tau_hessian is not None:
    keep &= last_layer.hessian_keep(stats.m_h_bt, tau_hessian, hessian_rule)
  return keep.astype(jnp.float32) * completion_mask_bt.astype(jnp.float32)


# ----------------------------------------------------------------------------------------------------------------
# Curvature-vector products (docs/MATH.md §4) and Theorem 5.1 subset acceptance (§3).


def hessian_vector_product(loss_fn: Callable[[PyTree], Array], params: PyTree, vector: PyTree) -> PyTree:
  """H v with H = ∇²L(θ), by forward-over-reverse: ``jax.jvp`` of ``jax.grad`` (cost ≈ 2–3 backward passes)."""
  return jax.jvp(jax.grad(loss_fn), (params,), (tangent_like(params, vector),))[1]


def fisher_vector_product(
    logits_fn: LogitsFn,
    params: PyTree,
    batch: PyTree,
    vector: PyTree,
    completion_mask_bt: Array | None = None,
    *,
    temperature: float = 1.0,
) -> PyTree:
  """F̄ v with F̄ = (1/N) Σ_t J_tᵀ(diag π_t − π_tπ_tᵀ)J_t the mean expected Fisher over completion tokens.

  ``jax.jvp`` gives Δz = Jv, the softmax Fisher is applied per token in closed form, and ``jax.vjp`` through the
  logits pulls back: F̄v = Jᵀ[w_t (diag π_t − π_tπ_tᵀ)Δz_t], w_t = mask_t / N (J of z/T, T the temperature).
  ``vᵀF̄v = 2 · predicted_mean_kl(v)``.
  """

  def f(p):
    return upcast(logits_of(logits_fn(p, batch))) / temperature

  z, pullback = jax.vjp(f, params)
  _, dz = jax.jvp(f, (params,), (tangent_like(params, vector),))
  p_btv = jax.nn.softmax(z, axis=-1)
  w_bt = _token_weights(completion_mask_bt, z.shape[:2])
  fdz_btv = p_btv * (dz - jnp.sum(p_btv * dz, axis=-1, keepdims=True))
  return pullback(w_bt[..., None] * fdz_btv)[0]


def _tree_vdot(a: PyTree, b: PyTree) -> Array:
  leaves = jax.tree.leaves(jax.tree.map(lambda x, y: jnp.vdot(upcast(x), upcast(y)), a, b))
  return sum(leaves[1:], leaves[0])


def sgd_proposal(learning_rate: float) -> Callable[[PyTree], PyTree]:
  """The SGD proposal Δθ_i = −η ∇L_i = η g_i (d_i = g_i), as a ``propose_update`` for ``subset_acceptance``."""
  return lambda loss_grads: jax.tree.map(lambda g: -learning_rate * g, loss_grads)


def optimizer_proposal(inner, opt_state, params: PyTree) -> Callable[[PyTree], PyTree]:
  """The inner optax optimizer's proposed step on one subset's loss gradient, Δθ_i = inner.update(∇L_i, state)[0].

  For Adam this is η d_i with d_i the prospective Adam direction (moments advanced by ∇L_i, bias-corrected); the
  optimizer state is *not* advanced — this is a proposal only.
  """
  return lambda loss_grads: inner.update(loss_grads, opt_state, params)[0]


class SubsetAcceptanceStats(NamedTuple):
  """Per-subset quantities of the Theorem 5.1 rule (``[S]``) and their summary."""

  m_h_s: Array  # predicted objective change g_i·Δθ_i + ½Δθ_iᵀH_iΔθ_i
  m_f_s: Array  # predicted policy shift ½Δθ_iᵀF_iΔθ_i (mean-token KL)
  accepted_s: Array  # bool: m_H ≥ δ_H and m_F ≤ δ_F
  loss_s: Array  # each subset's loss L_i(θ)
  num_accepted: Array  # int32 scalar
  accepted_fraction: Array  # float32 scalar


def subset_acceptance(
    logits_fn: LogitsFn,
    surrogate_fn: Callable[[Array, PyTree], Array],
    params: PyTree,
    subset_batches: PyTree,
    propose_update: Callable[[PyTree], PyTree],
    *,
    delta_h: float,
    delta_f: float,
    completion_mask_fn: Callable[[PyTree], Array] | None = None,
    temperature: float = 1.0,
) -> tuple[PyTree, SubsetAcceptanceStats]:
  """Theorem 5.1 subset acceptance ("theorem51" mode): accept subsets with m_H ≥ δ_H and m_F ≤ δ_F.

  For each subset b_i (S of them along the leading axis of ``subset_batches``), with L_i its loss
  (``surrogate_fn(logits_fn(θ, b_i), b_i)``), g_i = −∇L_i the objective gradient and Δθ_i = ``propose_update(∇L_i)``
  = η d_i (SGD: d_i = g_i; Adam: the prospective Adam direction):

      m_H(Δθ_i) = g_i·Δθ_i + ½ Δθ_iᵀ H_i Δθ_i  = η g_i·d_i + ½η² d_iᵀH_id_i,   H_i = ∇²(−L_i)
      m_F(Δθ_i) = ½ Δθ_iᵀ F_i Δθ_i             = ½η² d_iᵀF_id_i,              F_i = mean expected Fisher of b_i
      accept_i  = [m_H(Δθ_i) ≥ δ_H] · [m_F(Δθ_i) ≤ δ_F]
      returned  = (1/|acc|) Σ_{i accepted} ∇L_i       (zeros when nothing is accepted)

  The theorem (docs/MATH.md §3): with δ_H = ω + ½Mr², the mean of the accepted Δθ_i improves J by ≥ ω − C√δ_F. Note
  this accepts *large predicted improvements*, unlike the released code's per-token |m_H| < τ_H rejection ("CAPO").

  Implementation: one ``jax.linearize`` of θ ↦ (∇L_i, z_i) — a ``jax.jvp`` of ``jax.grad`` whose primal pass is
  reused — gives ∇L_i, then both H_iΔθ_i (the Hessian-vector product) and Δz_i = J_iΔθ_i (the logit tangent) in one
  linearised pass. ΔθᵀF_iΔθ is taken directly from Δz_i as mean_t Δz_tᵀ(diag π − ππᵀ)Δz_t, which is exactly
  Δθ·(F_iΔθ) of ``fisher_vector_product`` without the extra vjp. Subsets run in a ``lax.scan`` that sums the
  accepted gradients, so peak memory is one subset's backward pass plus two parameter-sized buffers.

  Args:
    logits_fn: pure ``(params, batch) -> logits_btv`` (module docstring).
    surrogate_fn: ``(logits_btv, subset_batch) -> scalar loss`` to *minimise* (e.g. the GRPO surrogate).
    params: θ.
    subset_batches: the subsets stacked on a leading axis ``[S, ...]`` (e.g. ``split_into_subsets``).
    propose_update: ∇L_i ↦ Δθ_i (``sgd_proposal(η)`` or ``optimizer_proposal(inner, opt_state, params)``).
    delta_h: δ_H ≥ 0, the minimum predicted improvement.
    delta_f: δ_F > 0, the maximum predicted mean-token KL.
    completion_mask_fn: ``subset_batch -> [b, T]`` mask of the tokens that enter F_i (default: every position).
    temperature: sampling temperature of the policy.

  Returns:
    ``(mean accepted loss gradient, SubsetAcceptanceStats)``; feed the gradient to the optimizer for the one real
    step.
  """
  if not np.isfinite(delta_h) or delta_h < 0:
    raise ValueError(f"delta_h must be a finite number ≥ 0 (δ_H = ω + ½Mr²), got {delta_h}.")
  if not delta_f > 0:
    raise ValueError(f"delta_f must be > 0 (the KL budget δ_F), got {delta_f}.")
  leading = {np.shape(x)[0] if np.ndim(x) else None for x in jax.tree.leaves(subset_batches)}
  if len(leading) != 1 or None in leading:
    raise ValueError(
        "subset_batches must stack the subsets on a common leading axis [S, ...] (see split_into_subsets); got "
        f"leading sizes {sorted(map(str, leading))}."
    )

  def one_subset(sum_grads, batch_i):
    def grad_and_logits(p):
      def loss(q):
        z = logits_of(logits_fn(q, batch_i))
        return surrogate_fn(z, batch_i), z

      return jax.grad(loss, has_aux=True)(p)

    (grads_i, z_i), tangent_fn = jax.linearize(grad_and_logits, params)
    loss_i = surrogate_fn(z_i, batch_i)
    update_i = propose_update(grads_i)
    h_loss_u, dz_i = tangent_fn(tangent_like(params, update_i))
    # Objective J = −L: g = −∇L and H_J = −H_L, so m_H = −∇L·Δθ − ½Δθ·(H_L Δθ).
    m_h = -_tree_vdot(grads_i, update_i) - 0.5 * _tree_vdot(update_i, h_loss_u)
    mask_bt = None if completion_mask_fn is None else completion_mask_fn(batch_i)
    form_bt = expected_fisher_form(z_i, dz_i, temperature=temperature)
    m_f = 0.5 * jnp.sum(_token_weights(mask_bt, form_bt.shape) * form_bt)
    accept = (m_h >= delta_h) & (m_f <= delta_f)
    sum_grads = jax.tree.map(lambda s, g: s + jnp.where(accept, g, 0).astype(s.dtype), sum_grads, grads_i)
    return sum_grads, (m_h, m_f, accept, upcast(jnp.asarray(loss_i)))

  zeros = jax.tree.map(lambda p: jnp.zeros(np.shape(p), jnp.result_type(p)), params)
  sum_grads, (m_h_s, m_f_s, accepted_s, loss_s) = jax.lax.scan(one_subset, zeros, subset_batches)
  num_accepted = jnp.sum(accepted_s.astype(jnp.int32))
  denom = jnp.maximum(num_accepted, 1)
  mean_grads = jax.tree.map(lambda s: (s / denom.astype(s.dtype)).astype(s.dtype), sum_grads)
  stats = SubsetAcceptanceStats(
      m_h_s, m_f_s, accepted_s, loss_s, num_accepted, num_accepted.astype(jnp.float32) / accepted_s.shape[0]
  )
  return mean_grads, stats


def split_into_subsets(batch: PyTree, num_subsets: int) -> PyTree:
  """Reshape every leaf ``[B, ...] -> [S, B/S, ...]``: with rows ordered by prompt (G completions each) and S = P
  this makes the subsets the prompt groups; with S = B / micro_batch it makes them micro-batches."""
  if num_subsets < 1:
    raise ValueError(f"num_subsets must be ≥ 1, got {num_subsets}.")

  def leaf(x):
    if np.ndim(x) == 0 or np.shape(x)[0] % num_subsets:
      raise ValueError(
          f"every batch leaf needs a leading axis divisible by num_subsets={num_subsets}; got shape {np.shape(x)}."
      )
    return jnp.reshape(x, (num_subsets, np.shape(x)[0] // num_subsets) + tuple(np.shape(x)[1:]))

  return jax.tree.map(leaf, batch)
