"""The rollout sampler: jitted prefill + ``lax.while_loop`` decode over a donated KV cache.

Everything below :func:`sample` is two jitted pure functions of ``(graphdef, state)`` (``nnx.split`` of a
:class:`capo_jax.models.CausalLM`), so nothing under the call is Python state:

* ``prefill``: runs the P distinct prompts once through the model into a fresh cache of ``S = L_p + N`` slots, repeats
  the cache G times along the batch (rows grouped prompt-major: row ``i`` belongs to prompt ``i // G``), and draws the
  first completion token of every row from the last prompt position.
* ``decode``: a ``lax.while_loop`` that feeds the last token, draws the next one, and stops early once every row has
  emitted a stop token (or after ``max_new_tokens``). Its whole carry, the cache included, is donated
  (``donate_argnums``), so XLA updates the cache in place.

Shapes (batch, prompt length, ``max_new_tokens``, G, number of stop ids) are static: one compile per bucket. The
sampling parameters (temperature, top-k, top-p), the stop ids and the pad id are traced, so changing them never
recompiles. Use :func:`pad_prompts` to left-pad prompt batches to length buckets so real workloads hit few compiles.

Outputs per row ``r`` and completion step ``n`` (``N = max_new_tokens``)::

    tokens[r, n]   = a_n, drawn from softmax(process_logits(z_n / T, top_k, top_p)),  pad_id after the first stop
    mask[r, n]     = 1 for n <= n*_r (the first stop token, included), 0 after
    logprobs[r, n] = log softmax(z_n / T)[a_n] in float32 (0 where mask = 0)

The log-probs are those of the *untruncated* tempered policy: it is what a TRL-style learner recomputes
(``log_softmax(logits / T)``), so importance ratios compare like with like. At ``T = 0`` (greedy) they are at ``T = 1``.
Any sampling ``T``, however small, gives finite log-probs: the logits are shifted by their row maximum before the
division (``capo_jax.sampling.scale_logits``), so nothing overflows and the draw tends to the argmax; ``T`` below the
smallest normal float32 (``GREEDY_BELOW_TEMPERATURE``) is greedy like ``T = 0``.

The KV cache holds the model's compute dtype unless ``cache_dtype`` says otherwise (e.g. ``"bfloat16"`` halves the
cache of a float32 model; keys/values are rounded once when written and attention still runs in the compute dtype).
It has exactly ``L_p + N`` slots, so decoding never runs past it; the model itself rejects writes past a full cache
(``capo_jax.models.CausalLM``).

On a device mesh (``mesh=``, a ``capo_jax.sharding.make_mesh``): the parameters are placed once per call in the
decoding layout (``weights``: by default ``capo_jax.sharding.decode_param_shardings``, split over ``tensor`` only, so
that no decode step gathers a weight; the learner's ``fsdp``-split layout when they would not fit, see
``capo_jax.sharding.decode_weights_layout``), the prompt rows and every per-row array of the decode state over
``data × fsdp``, and the KV cache [L, R, S, K, D] by ``capo_jax.sharding.kv_cache_shardings`` (rows over
``data × fsdp``, key/value heads over ``tensor``), pinned with ``with_sharding_constraint`` in the prefill and in every
decode step; both are traced under ``jax.set_mesh(mesh)`` (the model's own activation hints). The tokens are those of
the unsharded sampler for the same key (the random bits do not depend on the sharding).
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import NamedTuple, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from capo_jax import sharding as sharding_lib
from capo_jax.models import KVCache
from capo_jax.models.config import DTYPES as _CACHE_DTYPES
from capo_jax.sampling.logits_processing import sample_tokens, token_logprobs_at_temperature

# Stop-id sets are padded to a multiple of this with -1 (never a token), so sets of 1..8 ids share one compile.
_STOP_IDS_BUCKET = 8


class SamplingParams(NamedTuple):
  """Traced sampling parameters (scalars). ``temperature`` 0 (or below ``GREEDY_BELOW_TEMPERATURE``): greedy;
  ``top_k <= 0`` / ``top_p >= 1``: off."""

  temperature: jax.Array
  top_k: jax.Array
  top_p: jax.Array

  @classmethod
  def create(cls, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> "SamplingParams":
    """Validated parameters from Python numbers.

    Raises:
      ValueError: temperature NaN, infinite or negative; top_p outside (0, 1].
      TypeError: top_k not an int.
    """
    if not 0.0 < float(top_p) <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], got {top_p!r}; use 1.0 to disable nucleus filtering.")
    if not math.isfinite(float(temperature)) or float(temperature) < 0.0:
      raise ValueError(f"temperature must be a finite number >= 0 (0 means greedy), got {temperature!r}.")
    if int(top_k) != top_k:
      raise TypeError(f"top_k must be an int (0 disables), got {top_k!r}.")
    return cls(jnp.asarray(temperature, jnp.float32), jnp.asarray(top_k, jnp.int32), jnp.asarray(top_p, jnp.float32))


class SampleOutput(NamedTuple):
  """What :func:`sample` returns; ``R = P·G`` rows grouped prompt-major, ``N = max_new_tokens``.

  Attributes:
    completion_tokens: [R, N] int32; ``pad_id`` after the first stop token.
    completion_mask: [R, N] int32; 1 up to and including the first stop token, 0 after.
    logprobs: [R, N] float32 ``log softmax(logits / T)`` of the emitted token (0 where the mask is 0).
    prompt_tokens: [R, L_p] int32 left-padded prompts, each repeated G times.
    prompt_mask: [R, L_p] int32, 1 on real prompt tokens.
    num_steps: [] int32, completion positions actually decoded (< N when every row stopped early).
  """

  completion_tokens: jax.Array
  completion_mask: jax.Array
  logprobs: jax.Array
  prompt_tokens: jax.Array
  prompt_mask: jax.Array
  num_steps: jax.Array


class _DecodeState(NamedTuple):
  """The while_loop carry. ``step`` = completion tokens emitted so far = the column the next one is written to."""

  step: jax.Array  # [] int32
  cache: KVCache
  last_token_r: jax.Array  # [R] token fed at the next step
  position_r: jax.Array  # [R] its RoPE position
  done_r: jax.Array  # [R] bool, a stop token has been emitted
  tokens_rn: jax.Array
  mask_rn: jax.Array
  logprobs_rn: jax.Array
  key: jax.Array


def _last_logits(model, hidden_bth: jax.Array) -> jax.Array:
  """Logits of the last position only, [B, V] float32, computed as the model computes its logits.

  The prefill asks the model for hidden states only: full [B, L_p, V] float32 logits would be 15 GB at batch 96,
  prompt 256, V = 152k, and only the last position is needed.
  """
  hidden_bh = hidden_bth[:, -1]
  return jnp.einsum("bh,vh->bv", hidden_bh, model.unembedding().astype(hidden_bh.dtype),
                    preferred_element_type=jnp.float32)


def _emit(state: _DecodeState, logits_rv, params: SamplingParams, stop_ids_re, pad_id) -> _DecodeState:
  """Draws the token of column ``state.step`` from ``logits_rv`` and writes tokens/mask/log-probs; rows that are
  already done get ``pad_id``, mask 0 and log-prob 0."""
  step_key = jax.random.fold_in(state.key, state.step)
  token_r = sample_tokens(step_key, logits_rv, params.temperature, params.top_k, params.top_p)
  logprob_r = token_logprobs_at_temperature(logits_rv, token_r, params.temperature)
  live_r = ~state.done_r
  token_r = jnp.where(live_r, token_r, pad_id).astype(jnp.int32)
  logprob_r = jnp.where(live_r, logprob_r, 0.0)
  col = state.step
  tokens_rn = jax.lax.dynamic_update_slice(state.tokens_rn, token_r[:, None], (0, col))
  mask_rn = jax.lax.dynamic_update_slice(state.mask_rn, live_r.astype(jnp.int32)[:, None], (0, col))
  logprobs_rn = jax.lax.dynamic_update_slice(state.logprobs_rn, logprob_r[:, None], (0, col))
  is_stop_r = jnp.any(token_r[:, None] == stop_ids_re, axis=-1)
  return state._replace(
      step=state.step + 1,
      last_token_r=token_r,
      done_r=state.done_r | (live_r & is_stop_r),
      tokens_rn=tokens_rn,
      mask_rn=mask_rn,
      logprobs_rn=logprobs_rn,
  )


def _constrain_cache(cache: KVCache, mesh) -> KVCache:
  """The cache pinned to ``capo_jax.sharding.kv_cache_shardings`` (unchanged without a mesh)."""
  if mesh is None:
    return cache
  return jax.lax.with_sharding_constraint(cache, sharding_lib.kv_cache_shardings(cache, mesh))


def _constrain_decode_state(s: _DecodeState, mesh) -> _DecodeState:
  """The decode state's cache and per-row arrays pinned to the mesh (rows over ``data × fsdp``; unchanged without a
  mesh)."""
  if mesh is None:
    return s
  rows = lambda x: jax.lax.with_sharding_constraint(
      x, jax.sharding.NamedSharding(mesh, sharding_lib.logical_to_spec(("batch",) + (None,) * (x.ndim - 1),
                                                                       x.shape, mesh)))
  return s._replace(cache=_constrain_cache(s.cache, mesh), last_token_r=rows(s.last_token_r),
                    position_r=rows(s.position_r), done_r=rows(s.done_r), tokens_rn=rows(s.tokens_rn),
                    mask_rn=rows(s.mask_rn), logprobs_rn=rows(s.logprobs_rn))


@functools.partial(jax.jit, static_argnames=("graphdef", "num_samples", "max_new_tokens", "cache_dtype", "mesh"))
def _prefill(graphdef, state, prompt_tokens_bp, prompt_mask_bp, key, params, stop_ids_re, pad_id, *,
             num_samples: int, max_new_tokens: int, cache_dtype: str | None, mesh=None):
  model = nnx.merge(graphdef, state)
  num_prompts, prompt_len = prompt_tokens_bp.shape
  rows = num_prompts * num_samples
  mask_bp = prompt_mask_bp.astype(bool)
  # S = L_p + N slots; the last drawn token is never fed, the spare slot keeps S round (e.g. 256 + 512 = 768).
  cache = _constrain_cache(model.init_cache(num_prompts, prompt_len + max_new_tokens, cache_dtype), mesh)
  positions_bp = jnp.maximum(jnp.cumsum(mask_bp, axis=-1, dtype=jnp.int32) - 1, 0)
  out = model(prompt_tokens_bp, positions_bp, mask_bp, cache, return_logits=False)
  logits_bv = _last_logits(model, out.hidden)
  # Prefill once per distinct prompt, then repeat: G× less prefill compute than prefilling R rows.
  repeat = lambda x, axis: jnp.repeat(x, num_samples, axis=axis, total_repeat_length=x.shape[axis] * num_samples)
  cache = KVCache(k=repeat(out.cache.k, 1), v=repeat(out.cache.v, 1), valid=repeat(out.cache.valid, 0),
                  index=out.cache.index)
  logits_rv = repeat(logits_bv, 0)
  state0 = _DecodeState(
      step=jnp.zeros((), jnp.int32),
      cache=cache,
      last_token_r=jnp.zeros((rows,), jnp.int32),
      position_r=repeat(jnp.sum(mask_bp, axis=-1, dtype=jnp.int32), 0),  # next position = number of real tokens
      done_r=jnp.zeros((rows,), bool),
      tokens_rn=jnp.full((rows, max_new_tokens), pad_id, jnp.int32),
      mask_rn=jnp.zeros((rows, max_new_tokens), jnp.int32),
      logprobs_rn=jnp.zeros((rows, max_new_tokens), jnp.float32),
      key=key,
  )
  return _constrain_decode_state(_emit(_constrain_decode_state(state0, mesh), logits_rv, params, stop_ids_re, pad_id),
                                 mesh)


@functools.partial(jax.jit, static_argnames=("graphdef", "mesh"), donate_argnames=("decode_state",))
def _decode(graphdef, state, decode_state: _DecodeState, params, stop_ids_re, pad_id, mesh=None) -> _DecodeState:
  model = nnx.merge(graphdef, state)
  max_new_tokens = decode_state.tokens_rn.shape[1]

  def cond(s: _DecodeState):
    return (s.step < max_new_tokens) & ~jnp.all(s.done_r)

  def body(s: _DecodeState):
    out = model(s.last_token_r[:, None], s.position_r[:, None], None, s.cache)
    s = s._replace(cache=out.cache, position_r=s.position_r + 1)
    return _constrain_decode_state(_emit(s, out.logits[:, 0], params, stop_ids_re, pad_id), mesh)

  return jax.lax.while_loop(cond, body, decode_state)


def _check_prompts(prompt_tokens_bp, prompt_mask_bp, vocab_size: int) -> None:
  """Host-side validation of concrete prompt arrays (skipped for tracers)."""
  chex.assert_rank([prompt_tokens_bp, prompt_mask_bp], 2)
  chex.assert_equal_shape([prompt_tokens_bp, prompt_mask_bp])
  if not jnp.issubdtype(prompt_tokens_bp.dtype, jnp.integer):
    raise TypeError(f"prompt_tokens must be integer token ids, got dtype {prompt_tokens_bp.dtype}.")
  if isinstance(prompt_tokens_bp, jax.core.Tracer) or isinstance(prompt_mask_bp, jax.core.Tracer):
    return
  mask = np.asarray(prompt_mask_bp).astype(bool)
  tokens = np.asarray(prompt_tokens_bp)
  if not mask.any(axis=-1).all():
    raise ValueError(f"prompt rows {np.flatnonzero(~mask.any(axis=-1)).tolist()} have no real token; every prompt "
                     "needs at least one token with mask 1.")
  if (np.diff(mask.astype(np.int8), axis=-1) < 0).any():
    raise ValueError("prompts must be LEFT-padded (mask 0...0 1...1 per row); use capo_jax.sampling.pad_prompts.")
  real = tokens[mask]
  if real.min() < 0 or real.max() >= vocab_size:
    raise ValueError(f"prompt token ids must lie in [0, {vocab_size}); got range [{real.min()}, {real.max()}].")


def _stop_ids_array(stop_ids, num_prompts: int, num_samples: int) -> jax.Array:
  """[R, E] int32 stop ids (E a multiple of 8, padded with -1) from a set shared by all rows ([E]), one set per prompt
  ([P, E]) or one per row ([R, E], R = P·G)."""
  if stop_ids is None:
    stop_ids = ()
  ids = np.asarray(stop_ids, dtype=np.int64)
  rows = num_prompts * num_samples
  if ids.ndim == 1:
    ids = np.broadcast_to(ids, (num_prompts, ids.shape[0]))
  if ids.ndim != 2 or ids.shape[0] not in (num_prompts, rows):
    raise ValueError(f"stop_ids must be a 1-D set shared by all rows, [num_prompts={num_prompts}, E] per prompt or "
                     f"[rows={rows}, E] per row; got shape {ids.shape}. Pad ragged sets with -1.")
  if ids.shape[0] != rows:
    ids = np.repeat(ids, num_samples, axis=0)
  width = max(_STOP_IDS_BUCKET, -(-ids.shape[1] // _STOP_IDS_BUCKET) * _STOP_IDS_BUCKET)
  padded = np.full((rows, width), -1, np.int32)
  padded[:, : ids.shape[1]] = ids
  return jnp.asarray(padded)


def sample(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    prompt_tokens: chex.Array,
    prompt_mask: chex.Array,
    key: chex.PRNGKey,
    *,
    max_new_tokens: int,
    num_samples: int = 1,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_ids: Sequence[int] | chex.Array | None = None,
    pad_id: int = 0,
    cache_dtype: str | None = None,
    mesh: jax.sharding.Mesh | None = None,
    weights: str = "auto",
) -> SampleOutput:
  """Samples ``num_samples`` (G) completions for each left-padded prompt with a KV cache.

  Args:
    graphdef, state: ``nnx.split(causal_lm)``.
    prompt_tokens: [P, L_p] int token ids, left-padded (see :func:`pad_prompts`).
    prompt_mask: [P, L_p] 0/1, 1 on real tokens.
    key: PRNG key; the output is a deterministic function of it (step n draws with ``fold_in(key, n)``).
    max_new_tokens: N, completion length (static).
    num_samples: G, completions per prompt (static); rows are prompt-major, row ``i`` ← prompt ``i // G``.
    temperature, top_k, top_p: traced sampling parameters (see :func:`process_logits`); ``temperature=0`` is greedy,
      a temperature below ``GREEDY_BELOW_TEMPERATURE`` (~1.2e-38, the smallest normal float32) is greedy too; any
      larger one samples, with finite log-probs however small it is.
    stop_ids: EOS/stop token ids: a set shared by all rows, [P, E] per prompt or [P·G, E] per row (pad ragged sets
      with -1); None or () never stops early. Up to 8 ids share one compile (traced, padded to a multiple of 8).
    pad_id: token written after a row's first stop token.
    cache_dtype: dtype of the KV cache ("float32" | "bfloat16" | "float16"; static); None: the model's compute dtype.
      Equal to the compute dtype it changes nothing.
    mesh: a ``capo_jax.sharding.make_mesh`` mesh to sample on (module docstring); None: wherever ``state`` lives.
    weights: the parameters' layout on ``mesh`` while decoding: "gathered" (split over ``tensor`` only: one gather
      of the ``fsdp`` shards per call), "sharded" (the learner's layout: every decode step gathers each weight of
      the ``fsdp`` split) or "auto" (gathered when that fits, ``capo_jax.sharding.decode_weights_layout``). The
      tokens and log-probs are the same in both.

  Returns:
    :class:`SampleOutput` with R = P·G rows.

  Raises:
    ValueError: bad lengths, prompts (not left-padded, empty rows, ids out of range), temperature (NaN, infinite or
      negative), top_p, stop_ids, pad_id, cache_dtype or weights, each named in the message.
  """
  if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}.")
  if not isinstance(num_samples, int) or num_samples < 1:
    raise ValueError(f"num_samples must be a positive int, got {num_samples!r}.")
  vocab_size = _vocab_size(graphdef, state)
  if not 0 <= int(pad_id) < vocab_size:
    raise ValueError(f"pad_id must be a token id in [0, {vocab_size}), got {pad_id!r}.")
  prompt_tokens = jnp.asarray(prompt_tokens)
  prompt_mask = jnp.asarray(prompt_mask)
  _check_prompts(prompt_tokens, prompt_mask, vocab_size)
  params = SamplingParams.create(temperature, top_k, top_p)
  if cache_dtype is not None:
    try:
      name = jnp.dtype(cache_dtype).name
    except TypeError:
      name = None
    if name not in _CACHE_DTYPES:
      raise ValueError(f"cache_dtype must be None (the model's compute dtype) or one of {_CACHE_DTYPES}, got "
                       f"{cache_dtype!r}.")
    cache_dtype = name
  if weights not in ("auto", "gathered", "sharded"):
    raise ValueError(f"weights must be 'auto', 'gathered' or 'sharded', got {weights!r}.")
  stop_ids_re = _stop_ids_array(stop_ids, prompt_tokens.shape[0], num_samples)
  pad = jnp.asarray(pad_id, jnp.int32)
  prompt_tokens, prompt_mask = prompt_tokens.astype(jnp.int32), prompt_mask.astype(jnp.int32)
  if mesh is not None:
    state = jax.device_put(state, decoding_shardings(state, mesh, weights))
    rows = jax.sharding.NamedSharding(mesh, sharding_lib.logical_to_spec(("batch", None), prompt_tokens.shape, mesh))
    prompt_tokens, prompt_mask = jax.device_put((prompt_tokens, prompt_mask), rows)
  with contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh):  # the model's activation hints
    decode_state = _prefill(graphdef, state, prompt_tokens, prompt_mask, key, params, stop_ids_re, pad,
                            num_samples=num_samples, max_new_tokens=max_new_tokens, cache_dtype=cache_dtype, mesh=mesh)
    decode_state = _decode(graphdef, state, decode_state, params, stop_ids_re, pad, mesh=mesh)
  return SampleOutput(
      completion_tokens=decode_state.tokens_rn,
      completion_mask=decode_state.mask_rn,
      logprobs=decode_state.logprobs_rn,
      prompt_tokens=jnp.repeat(prompt_tokens.astype(jnp.int32), num_samples, axis=0),
      prompt_mask=jnp.repeat(prompt_mask.astype(jnp.int32), num_samples, axis=0),
      num_steps=decode_state.step,
  )


def decoding_shardings(state: nnx.State, mesh: jax.sharding.Mesh, weights: str = "auto"):
  """The shardings :func:`sample` places ``state`` by on ``mesh`` for a ``weights`` setting ("auto", "gathered",
  "sharded"; ``capo_jax.sharding.decode_weights_layout``)."""
  if sharding_lib.decode_weights_layout(state, mesh, weights) == "gathered":
    return sharding_lib.decode_param_shardings(state, mesh)
  return sharding_lib.param_shardings(state, mesh)


def _vocab_size(graphdef: nnx.GraphDef, state: nnx.State) -> int:
  """V of the model (rows of the embedding table); reads a shape only."""
  del graphdef  # the table's path is fixed by the model contract: embed/embedding [V, H]
  return int(jax.tree.leaves(state["embed"]["embedding"])[0].shape[0])


class Sampler:
  """A thin holder of ``(graphdef, state)`` and default sampling options around :func:`sample`.

  The jitted functions are module-level, so compiled executables are shared by every ``Sampler`` of the same model
  structure; ``update_state`` swaps in new weights (e.g. after an optimizer step) without recompiling.
  """

  def __init__(self, model_or_graphdef, state: nnx.State | None = None, *, pad_id: int = 0,
               stop_ids: Sequence[int] | None = None, cache_dtype: str | None = None,
               mesh: jax.sharding.Mesh | None = None, weights: str = "auto"):
    if state is None:
      graphdef, state = nnx.split(model_or_graphdef)
    else:
      graphdef = model_or_graphdef
    self.graphdef, self.state = graphdef, state
    self.pad_id = pad_id
    self.stop_ids = stop_ids
    self.cache_dtype = cache_dtype
    self.mesh = mesh
    self.weights = weights

  def update_state(self, state: nnx.State) -> None:
    self.state = state

  def __call__(self, prompt_tokens, prompt_mask, key, *, max_new_tokens: int, num_samples: int = 1,
               temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, stop_ids=None,
               pad_id: int | None = None) -> SampleOutput:
    return sample(
        self.graphdef, self.state, prompt_tokens, prompt_mask, key,
        max_new_tokens=max_new_tokens, num_samples=num_samples, temperature=temperature, top_k=top_k, top_p=top_p,
        stop_ids=self.stop_ids if stop_ids is None else stop_ids,
        pad_id=self.pad_id if pad_id is None else pad_id,
        cache_dtype=self.cache_dtype,
        mesh=self.mesh,
        weights=self.weights,
    )


def bucket_length(length: int, multiple: int = 32) -> int:
  """The smallest multiple of ``multiple`` that is >= ``length`` (and >= ``multiple``)."""
  if multiple < 1:
    raise ValueError(f"bucket multiple must be >= 1, got {multiple}.")
  return max(multiple, -(-length // multiple) * multiple)


def pad_prompts(prompts: Sequence[Sequence[int]], *, pad_id: int = 0, multiple: int = 32,
                max_length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads token-id lists to a shared length bucket, so the sampler compiles once per bucket.

  The length is ``bucket_length(max len, multiple)`` (or ``max_length`` when given, which must fit every prompt).

  Returns:
    ``(tokens [P, L_p] int32, mask [P, L_p] int32)``, real tokens right-aligned with mask 1.
  """
  if len(prompts) == 0:
    raise ValueError("pad_prompts needs at least one prompt.")
  lengths = [len(p) for p in prompts]
  if min(lengths) == 0:
    raise ValueError(f"prompt {lengths.index(0)} is empty; every prompt needs at least one token.")
  length = bucket_length(max(lengths), multiple) if max_length is None else max_length
  if max(lengths) > length:
    raise ValueError(f"max_length={length} is shorter than the longest prompt ({max(lengths)} tokens); raise it or "
                     "truncate the prompts.")
  tokens = np.full((len(prompts), length), pad_id, np.int32)
  mask = np.zeros((len(prompts), length), np.int32)
  for i, p in enumerate(prompts):
    tokens[i, length - len(p):] = np.asarray(p, np.int32)
    mask[i, length - len(p):] = 1
  return tokens, mask
