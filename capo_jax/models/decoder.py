"""A Flax NNX decoder-only transformer covering Qwen2/Qwen2.5 and Llama-style checkpoints.

Block (pre-norm, as in HF `Qwen2DecoderLayer` / `LlamaDecoderLayer`):

    h   = x + o_proj(Attn(RoPE(q_proj(n₁(x))), RoPE(k_proj(n₁(x))), v_proj(n₁(x))))
    out = h + down_proj(silu(gate_proj(n₂(h))) ⊙ up_proj(n₂(h)))
    nᵢ(x) = wᵢ ⊙ x / sqrt(mean(x²) + ε)                                  (RMSNorm, computed in float32)

with grouped-query attention (N query heads share K key/value heads; `jax.nn.dot_product_attention` takes K < N
natively, softmax in float32) for prefill, training and single-token decode alike, RoPE in the HF "rotate-half"
layout, and a final RMSNorm whose output (the "hidden states") multiplies the unembedding: logits = hidden @ Wᵀ in
float32, W = `lm_head.weight` [V,H] or, when tied, the embedding table.

Padding: batches are left-padded; `attention_mask_bt` marks real tokens. A query attends to the real keys at or
before it (and to itself, so rows of pads never see an empty softmax). Positions default to cumsum(mask) - 1, so the
first real token of every row has position 0 as in HF.

Layers: the L decoder blocks are one `DecoderLayer` whose parameters carry a leading [L] axis (block i at index i),
applied by one `nnx.scan`, so the traced and compiled program holds a single block body whatever L is. The scanned
body is rematerialised in the backward pass according to `ModelConfig.remat` (a `jax.checkpoint` policy). The scans
run in NNX's tree mode (`graph=False`), which accepts a model merged outside the enclosing JAX transform (the
sampler merges once, outside its `lax.while_loop`).

Meshes: under `jax.set_mesh(mesh)` the rows of the embeddings, of every block's input and output and of the final
hidden states are pinned to the mesh's batch axes (`capo_jax.models.partitioning.constrain_rows`; a no-op without a
mesh), so that a weight split over `fsdp` is gathered per layer rather than the activations per batch.

Shared prompts (``CausalLM.shared_prefix_hidden``): when groups of G consecutive rows begin with the same P columns
(G completions of one prompt), those columns run through the blocks once per group and their keys/values, repeated
G times, precede each row's own in every block — the hidden states of the rows' other columns are unchanged, with
(B/G)·P + B·(T−P) tokens through the model instead of B·T.

KV cache: a plain pytree (`KVCache`) with k/v of shape [L,B,S,K,D], per-slot validity [B,S] and one scalar write
index shared by the batch (left padding keeps rows aligned). A call with a cache writes its T new keys/values at
slots [index, index+T), attends over all S slots with the causal + validity mask, and returns the cache with
index += T. The stacked k/v ride in the scan's carry and each block writes its [B,T,K,D] slice in place. A write past
the last slot (index + T > S) raises a ValueError when T > S or the index is concrete; under jit, where the index is
traced, the hidden states and logits of that call come back NaN instead of silently wrong.
"""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from capo_jax.models.config import ModelConfig
from capo_jax.models.partitioning import constrain_rows, embed_rows


class KVCache(NamedTuple):
  """Decoding state; a plain pytree that can be carried through `lax.while_loop`, donated and sharded.

  Attributes:
    k: [L,B,S,K,D] keys after RoPE, in the compute dtype.
    v: [L,B,S,K,D] values.
    valid: [B,S] bool, True where the slot holds a real (non-pad) token.
    index: [] int32, the slot the next token is written to (= number of slots filled so far).
  """

  k: jax.Array
  v: jax.Array
  valid: jax.Array
  index: jax.Array


class CausalLMOutput(NamedTuple):
  """logits: [B,T,V] float32 or None; hidden: [B,T,H] final normed hidden states; cache: KVCache or None."""

  logits: jax.Array | None
  hidden: jax.Array
  cache: KVCache | None


def init_cache(cfg: ModelConfig, batch_size: int, max_length: int, dtype=None) -> KVCache:
  """An empty KVCache for `cfg`: k/v zeros [L,B,S,K,D] (compute dtype unless `dtype`), no valid slot, index 0."""
  shape = (cfg.num_layers, batch_size, max_length, cfg.num_kv_heads, cfg.resolved_head_dim)
  dtype = cfg.compute_dtype if dtype is None else dtype
  return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                 valid=jnp.zeros((batch_size, max_length), bool), index=jnp.zeros((), jnp.int32))


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
  """w ⊙ x / sqrt(mean(x², -1) + ε), normalised in float32 and returned in x's dtype (as HF does)."""
  x32 = x.astype(jnp.float32)
  normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
  return weight.astype(x.dtype) * normed.astype(x.dtype)


def rope_cos_sin(positions_bt: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
  """cos/sin of the RoPE angles p·θ^(-2i/D), i < D/2, as [B,T,D/2] float32."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angles_btf = positions_bt.astype(jnp.float32)[..., None] * inv_freq
  return jnp.cos(angles_btf), jnp.sin(angles_btf)


def apply_rope(x_btnd: jax.Array, cos_btf: jax.Array, sin_btf: jax.Array) -> jax.Array:
  """Rotates pairs (x_i, x_{i+D/2}) by the angle of frequency i (HF's rotate_half layout), in float32."""
  x1, x2 = jnp.split(x_btnd.astype(jnp.float32), 2, axis=-1)
  cos, sin = cos_btf[:, :, None, :], sin_btf[:, :, None, :]
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x_btnd.dtype)


class RMSNorm(nnx.Module):

  def __init__(self, size: int, eps: float, param_dtype):
    self.weight = nnx.Param(jnp.ones((size,), param_dtype))
    self.eps = eps

  def __call__(self, x):
    return rms_norm(x, self.weight[...], self.eps)


class Linear(nnx.Linear):
  """`nnx.Linear` applied to the rows of a 2-D view of its input: [..., in] → [rows, in] · [in, out] → [..., out].

  The same values as `nnx.Linear`; what changes is the weight gradient Σ_rows xᵀ·dy, which then contracts one axis
  instead of the batch and time axes together (XLA:CPU would first transpose the activations for the latter;
  docs/PERFORMANCE.md, "Notes: predictions and outcomes").
  """

  def __call__(self, x):
    y = super().__call__(x.reshape(-1, x.shape[-1]))
    return y.reshape(*x.shape[:-1], y.shape[-1])


class Attention(nnx.Module):
  """Grouped-query self-attention with RoPE; q/k/v (and optionally o) biases."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
    self.implementation = cfg.attention_implementation
    linear = lambda i, o, bias: Linear(
        i, o, use_bias=bias, dtype=cfg.compute_dtype, param_dtype=cfg.storage_dtype,
        kernel_init=nnx.initializers.normal(cfg.initializer_range), rngs=rngs)
    h, n, k, d = cfg.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim
    self.q_proj = linear(h, n * d, cfg.attention_bias)
    self.k_proj = linear(h, k * d, cfg.attention_bias)
    self.v_proj = linear(h, k * d, cfg.attention_bias)
    self.o_proj = linear(n * d, h, cfg.attention_out_bias)

  def project(self, x_bth, cos_btf, sin_btf):
    """(q [B,T,N,D], k [B,T,K,D], v [B,T,K,D]) of x, RoPE applied to q and k."""
    b, t, _ = x_bth.shape
    q_btnd = self.q_proj(x_bth).reshape(b, t, self.num_heads, self.head_dim)
    k_btkd = self.k_proj(x_bth).reshape(b, t, self.num_kv_heads, self.head_dim)
    v_btkd = self.v_proj(x_bth).reshape(b, t, self.num_kv_heads, self.head_dim)
    return apply_rope(q_btnd, cos_btf, sin_btf), apply_rope(k_btkd, cos_btf, sin_btf), v_btkd

  def attend(self, q_btnd, keys_bskd, values_bskd, mask_b1ts):
    """o_proj of the queries' attention over S keys/values ([B,S,K,D]; mask [B,1,T,S]): [B,T,H]."""
    b, t = q_btnd.shape[:2]
    out_btnd = jax.nn.dot_product_attention(
        q_btnd, keys_bskd, values_bskd, mask=mask_b1ts, implementation=self.implementation)
    return self.o_proj(out_btnd.reshape(b, t, self.num_heads * self.head_dim))

  def __call__(self, x_bth, cos_btf, sin_btf, mask_b1ts, kv=None):
    """Returns (output [B,T,H], kv).

    kv is None (keys are the T tokens of this call) or (k_cache [L,B,S,K,D], v_cache, layer, index): the new keys and
    values are written into the stacked caches at [layer, :, index:index+T] (in place under jit) and the query
    attends over the S slots of this layer.
    """
    q_btnd, k_btkd, v_btkd = self.project(x_bth, cos_btf, sin_btf)
    if kv is None:
      keys, values = k_btkd, v_btkd
    else:
      k_cache, v_cache, layer, index = kv
      start = (layer, 0, index, 0, 0)
      k_cache = jax.lax.dynamic_update_slice(k_cache, k_btkd[None].astype(k_cache.dtype), start)
      v_cache = jax.lax.dynamic_update_slice(v_cache, v_btkd[None].astype(v_cache.dtype), start)
      keys, values = k_cache[layer].astype(q_btnd.dtype), v_cache[layer].astype(q_btnd.dtype)
      kv = (k_cache, v_cache, layer, index)
    return self.attend(q_btnd, keys, values, mask_b1ts), kv


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) ⊙ up(x))."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    linear = lambda i, o: Linear(
        i, o, use_bias=cfg.mlp_bias, dtype=cfg.compute_dtype, param_dtype=cfg.storage_dtype,
        kernel_init=nnx.initializers.normal(cfg.initializer_range), rngs=rngs)
    self.gate_proj = linear(cfg.hidden_size, cfg.intermediate_size)
    self.up_proj = linear(cfg.hidden_size, cfg.intermediate_size)
    self.down_proj = linear(cfg.intermediate_size, cfg.hidden_size)

  def __call__(self, x):
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.storage_dtype)
    self.self_attn = Attention(cfg, rngs=rngs)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.storage_dtype)
    self.mlp = MLP(cfg, rngs=rngs)

  def __call__(self, x_bth, cos_btf, sin_btf, mask_b1ts, kv=None):
    attn_out, kv = self.self_attn(self.input_layernorm(x_bth), cos_btf, sin_btf, mask_b1ts, kv)
    h_bth = x_bth + attn_out
    return h_bth + self.mlp(self.post_attention_layernorm(h_bth)), kv

  def after_keys(self, x_bth, cos_btf, sin_btf, mask_b1ts, before=None):
    """The block on x whose attention sees the keys/values ``before`` = (k, v) [B,P,K,D] (computed already, e.g. a
    shared prompt's) ahead of x's own; mask [B,1,T,P+T]. Returns (output [B,T,H], (k, v) of x's T tokens)."""
    attn = self.self_attn
    q_btnd, k_btkd, v_btkd = attn.project(self.input_layernorm(x_bth), cos_btf, sin_btf)
    keys, values = k_btkd, v_btkd
    if before is not None:
      keys = jnp.concatenate([before[0].astype(k_btkd.dtype), k_btkd], axis=1)
      values = jnp.concatenate([before[1].astype(v_btkd.dtype), v_btkd], axis=1)
    h_bth = x_bth + attn.attend(q_btnd, keys, values, mask_b1ts)
    return h_bth + self.mlp(self.post_attention_layernorm(h_bth)), (k_btkd, v_btkd)


# ModelConfig.remat → `jax.checkpoint` policy of the scanned block (None: no checkpoint at all).
_REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _stacked_layers(cfg: ModelConfig, rngs: nnx.Rngs) -> DecoderLayer:
  """One `DecoderLayer` holding all L blocks: every parameter gets a leading [L] axis, block i at index i.

  The blocks are initialised one after another from the same `rngs` stream and then stacked, so a seed gives the same
  weights as L separately built blocks (random-init runs and tests keep their numbers).
  """
  layers = [DecoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_layers)]
  graphdef, _ = nnx.split(layers[0])
  return nnx.merge(graphdef, jax.tree.map(lambda *xs: jnp.stack(xs), *[nnx.state(layer) for layer in layers]))


def _checkpointed(body, remat: str):
  """``body`` rematerialised in the backward pass per ``remat`` (``ModelConfig.remat``); unchanged for "none"."""
  if remat == "none":
    return body
  # prevent_cse=False: inside a scan the loop already keeps XLA from merging the recomputation away.
  return nnx.remat(body, policy=_REMAT_POLICIES[remat], prevent_cse=False, graph=False)


def _scan_layers(layers: DecoderLayer, x_bth, cos_btf, sin_btf, mask_b1ts, remat: str):
  """x ← block_l(x) for l = 0..L-1 through one `nnx.scan` (no cache), the body checkpointed per `remat`."""

  def body(x_bth, layer):
    return constrain_rows(layer(constrain_rows(x_bth), cos_btf, sin_btf, mask_b1ts)[0])

  return nnx.scan(_checkpointed(body, remat), in_axes=(nnx.Carry, 0), out_axes=nnx.Carry, graph=False)(x_bth, layers)


def _scan_layers_after_prefix(layers: DecoderLayer, prefix, rows, group_size: int, remat: str):
  """The blocks over a prefix shared by groups of ``group_size`` rows, then over each row's own tokens.

  ``prefix`` = (x [B/G,P,H], cos, sin, mask [B/G,1,P,P]) runs through the L blocks once per group, keeping each
  block's keys/values [L,B/G,P,K,D]; ``rows`` = (x [B,T,H], cos, sin, mask [B,1,T,P+T]) then runs through them with
  block l attending over its group's prefix keys/values (repeated G times) ahead of its own. Both scans are
  checkpointed per ``remat``. Returns the rows' x after the last block.
  """
  x_gph, cos_gpf, sin_gpf, mask_g1pp = prefix
  x_bth, cos_btf, sin_btf, mask_b1ts = rows

  def prefix_body(x_gph, layer):
    x_gph, kv = layer.after_keys(constrain_rows(x_gph), cos_gpf, sin_gpf, mask_g1pp)
    return constrain_rows(x_gph), kv

  def row_body(x_bth, layer, k_gpkd, v_gpkd):
    before = tuple(constrain_rows(jnp.repeat(a, group_size, axis=0)) for a in (k_gpkd, v_gpkd))
    return constrain_rows(layer.after_keys(constrain_rows(x_bth), cos_btf, sin_btf, mask_b1ts, before)[0])

  _, (k_lgpkd, v_lgpkd) = nnx.scan(_checkpointed(prefix_body, remat), in_axes=(nnx.Carry, 0),
                                   out_axes=(nnx.Carry, 0), graph=False)(x_gph, layers)
  return nnx.scan(_checkpointed(row_body, remat), in_axes=(nnx.Carry, 0, 0, 0), out_axes=nnx.Carry,
                  graph=False)(x_bth, layers, k_lgpkd, v_lgpkd)


def _scan_layers_with_cache(layers: DecoderLayer, x_bth, cos_btf, sin_btf, mask_b1ts, k_cache, v_cache, index):
  """Like `_scan_layers`, with the stacked [L,B,S,K,D] caches carried: block l writes its keys/values at
  [l, :, index:index+T] (in place) and attends over its S slots. Returns (x, k_cache, v_cache)."""

  def body(carry, layer, layer_index):
    x_bth, k_cache, v_cache = carry
    x_bth, (k_cache, v_cache, _, _) = layer(constrain_rows(x_bth), cos_btf, sin_btf, mask_b1ts,
                                            (k_cache, v_cache, layer_index, index))
    return constrain_rows(x_bth), k_cache, v_cache

  num_layers = k_cache.shape[0]  # = L, checked against the config by the caller
  return nnx.scan(body, in_axes=(nnx.Carry, 0, 0), out_axes=nnx.Carry, graph=False)(
      (x_bth, k_cache, v_cache), layers, jnp.arange(num_layers, dtype=jnp.int32))


class Unembedding(nnx.Module):
  """The untied output head, stored HF-style as `weight` [V,H] (logits = hidden @ weightᵀ)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    init = nnx.initializers.normal(cfg.initializer_range)
    self.weight = nnx.Param(init(rngs.params(), (cfg.vocab_size, cfg.hidden_size), cfg.storage_dtype))


class CausalLM(nnx.Module):
  """Decoder-only LM. See the module docstring for the math; `__call__` for the calling contract.

  Parameter paths (the layers' stacked over a leading [L] axis, block i at index i): embed/embedding [V,H];
  layers/{input_layernorm,post_attention_layernorm}/weight [L,H]; layers/self_attn/{q,k,v,o}_proj/{kernel [L,in,out],
  bias [L,out]}; layers/mlp/{gate,up,down}_proj/kernel [L,in,out]; norm/weight [H]; lm_head/weight [V,H] (untied only).
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    self.embed = nnx.Embed(
        cfg.vocab_size, cfg.hidden_size, dtype=cfg.compute_dtype, param_dtype=cfg.storage_dtype,
        embedding_init=nnx.initializers.normal(cfg.initializer_range), rngs=rngs)
    self.layers = _stacked_layers(cfg, rngs)
    self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.storage_dtype)
    if not cfg.tie_word_embeddings:
      self.lm_head = Unembedding(cfg, rngs=rngs)

  def unembedding(self) -> jax.Array:
    """W [V,H] (param dtype) with logits = hidden @ Wᵀ: `lm_head.weight`, or the embedding table when tied."""
    if self.config.tie_word_embeddings:
      return self.embed.embedding[...]
    return self.lm_head.weight[...]

  def init_cache(self, batch_size: int, max_length: int, dtype=None) -> KVCache:
    """An empty cache of S = max_length slots (k/v in the compute dtype unless `dtype` is given)."""
    return init_cache(self.config, batch_size, max_length, dtype)

  def __call__(self, tokens_bt, positions_bt=None, attention_mask_bt=None, cache: KVCache | None = None, *,
               return_logits: bool = True) -> CausalLMOutput:
    """Forward pass over T new tokens.

    Args:
      tokens_bt: [B,T] int token ids (left-padded).
      positions_bt: [B,T] int RoPE positions; default cumsum(mask) - 1, offset by the real tokens already in the
        cache (Σ cache.valid per row) when a cache is given.
      attention_mask_bt: [B,T] 0/1 or bool, 1 for real tokens; default all ones.
      cache: KVCache to append to (decoding), or None for a full forward.
      return_logits: False skips the unembedding (logits=None), e.g. for a loss that fuses it in chunks.

    Returns:
      CausalLMOutput(logits [B,T,V] float32 | None, hidden [B,T,H] compute dtype, cache with index += T | None).

    Raises:
      ValueError: the T new tokens do not fit in the cache's free slots (T > S, or a concrete index + T > S).
    """
    cfg = self.config
    chex.assert_rank(tokens_bt, 2)
    b, t = tokens_bt.shape
    if attention_mask_bt is None:
      mask_bt = jnp.ones((b, t), bool)
    else:
      chex.assert_shape(attention_mask_bt, (b, t))
      mask_bt = attention_mask_bt.astype(bool)
    if positions_bt is None:
      past_b = jnp.zeros((b,), jnp.int32) if cache is None else jnp.sum(cache.valid, axis=-1, dtype=jnp.int32)
      positions_bt = jnp.maximum(past_b[:, None] + jnp.cumsum(mask_bt, axis=-1, dtype=jnp.int32) - 1, 0)
    else:
      chex.assert_shape(positions_bt, (b, t))

    # allowed[b,t,s]: query t may attend to key slot s — causal, real key, or itself (keeps pad rows finite).
    if cache is None:
      query_slot_t = jnp.arange(t)
      key_valid_bs = mask_bt
    else:
      chex.assert_shape(cache.valid, (b, None))
      chex.assert_shape([cache.k, cache.v], (cfg.num_layers, b, cache.valid.shape[1], cfg.num_kv_heads,
                                             cfg.resolved_head_dim))
      _check_cache_room(cache, t)
      query_slot_t = cache.index + jnp.arange(t)
      key_valid_bs = jax.lax.dynamic_update_slice(cache.valid, mask_bt, (0, cache.index))
    allowed_b1ts = _attention_mask(query_slot_t, key_valid_bs)

    cos_btf, sin_btf = rope_cos_sin(positions_bt, cfg.resolved_head_dim, cfg.rope_theta)
    x_bth = embed_rows(self.embed.embedding[...].astype(cfg.compute_dtype), tokens_bt)  # = self.embed(tokens_bt)
    if cache is None:
      x_bth = _scan_layers(self.layers, x_bth, cos_btf, sin_btf, allowed_b1ts, cfg.remat)
      new_cache = None
    else:
      x_bth, k_cache, v_cache = _scan_layers_with_cache(
          self.layers, x_bth, cos_btf, sin_btf, allowed_b1ts, cache.k, cache.v, cache.index)
      new_cache = KVCache(k=k_cache, v=v_cache, valid=key_valid_bs, index=cache.index + t)

    hidden_bth = constrain_rows(self.norm(x_bth))
    if cache is not None:
      # A traced index past the free slots cannot raise; poison the output so the overflow is seen, not wrong logits.
      overflow = cache.index + t > cache.valid.shape[1]
      hidden_bth = jnp.where(overflow, jnp.asarray(jnp.nan, hidden_bth.dtype), hidden_bth)
    logits_btv = None
    if return_logits:
      logits_btv = jnp.einsum('bth,vh->btv', hidden_bth, self.unembedding().astype(hidden_bth.dtype),
                              preferred_element_type=jnp.float32)
    return CausalLMOutput(logits=logits_btv, hidden=hidden_bth, cache=new_cache)


  def shared_prefix_hidden(self, tokens_bt, attention_mask_bt, *, prefix_length: int, group_size: int) -> jax.Array:
    """Final hidden states [B, T−P, H] of columns P… of rows whose first P columns repeat in groups of G rows.

    Rows gG … gG+G−1 hold the same first P columns (tokens and mask: G completions of one left-padded prompt). Those
    columns run through the blocks once per group, and each block's keys/values of them serve the group's G rows;
    columns P… run once per row. The values are those of ``self(tokens_bt, positions_bt=None,
    attention_mask_bt).hidden[:, P:]`` (the same keys, masks and default positions) with (B/G)·P + B·(T−P) tokens
    through the model instead of B·T. A row whose first P columns differ from its group's first row's (a real
    token differs, or the mask) comes back NaN, never silently wrong.

    Raises:
      ValueError: P not in [1, T), G < 1, or G does not divide B.
    """
    cfg = self.config
    chex.assert_rank(tokens_bt, 2)
    b, t = tokens_bt.shape
    chex.assert_shape(attention_mask_bt, (b, t))
    p, g = prefix_length, group_size
    if not 0 < p < t or g < 1 or b % g:
      raise ValueError(f"shared_prefix_hidden needs 0 < prefix_length < T = {t} and a group_size dividing the {b} "
                       f"rows; got prefix_length={p}, group_size={g}.")
    mask_bt = attention_mask_bt.astype(bool)
    positions_bt = jnp.maximum(jnp.cumsum(mask_bt, axis=-1, dtype=jnp.int32) - 1, 0)

    def first(a):  # each group's first row
      return a.reshape(b // g, g, *a.shape[1:])[:, 0]

    prefix_tokens, prefix_mask = first(tokens_bt[:, :p]), first(mask_bt[:, :p])
    embed = self.embed.embedding[...].astype(cfg.compute_dtype)
    head_dim, theta = cfg.resolved_head_dim, cfg.rope_theta
    prefix = (embed_rows(embed, prefix_tokens), *rope_cos_sin(first(positions_bt[:, :p]), head_dim, theta),
              _attention_mask(jnp.arange(p), prefix_mask))
    rows = (embed_rows(embed, tokens_bt[:, p:]), *rope_cos_sin(positions_bt[:, p:], head_dim, theta),
            _attention_mask(p + jnp.arange(t - p), mask_bt))
    hidden_bnh = constrain_rows(self.norm(_scan_layers_after_prefix(self.layers, prefix, rows, g, cfg.remat)))
    repeated_mask = jnp.repeat(prefix_mask, g, axis=0)
    same_tokens = ~repeated_mask | (tokens_bt[:, :p] == jnp.repeat(prefix_tokens, g, axis=0))
    same_b = jnp.all(same_tokens & (mask_bt[:, :p] == repeated_mask), axis=1)
    return jnp.where(same_b[:, None, None], hidden_bnh, jnp.asarray(jnp.nan, hidden_bnh.dtype))


def _attention_mask(query_slot_t: jax.Array, key_valid_bs: jax.Array) -> jax.Array:
  """allowed [B,1,T,S]: the query at slot ``query_slot_t[t]`` may attend to key slot s — causally, a real key
  (``key_valid_bs``) or itself (so rows of pads never see an empty softmax)."""
  key_slot_s = jnp.arange(key_valid_bs.shape[1])
  causal_ts = key_slot_s[None, :] <= query_slot_t[:, None]
  self_ts = key_slot_s[None, :] == query_slot_t[:, None]
  return (causal_ts[None] & (key_valid_bs[:, None, :] | self_ts[None]))[:, None]


def _check_cache_room(cache: KVCache, num_new: int) -> None:
  """Raises when `num_new` tokens certainly do not fit in the free slots of `cache` (shapes, or a concrete index)."""
  num_slots = cache.valid.shape[1]
  if num_new > num_slots:
    raise ValueError(f"KV cache overflow: {num_new} new tokens do not fit in a cache of {num_slots} slots; build the "
                     "cache with init_cache(..., max_length >= prompt length + new tokens).")
  if not isinstance(cache.index, jax.core.Tracer):
    index = int(cache.index)
    if index + num_new > num_slots:
      raise ValueError(f"KV cache overflow: {index} of {num_slots} slots are filled and {num_new} new tokens do not "
                       "fit; build the cache with init_cache(..., max_length >= prompt length + new tokens).")


def apply(graphdef: nnx.GraphDef, state: nnx.State, tokens_bt, positions_bt=None, attention_mask_bt=None,
          cache: KVCache | None = None, *, return_logits: bool = True) -> CausalLMOutput:
  """Pure functional call: `nnx.merge(graphdef, state)(...)`, for use inside jitted / differentiated functions.

  `graphdef, state = nnx.split(model)`; the model holds no mutable state, so nothing needs to be split back out.
  """
  model = nnx.merge(graphdef, state)
  return model(tokens_bt, positions_bt, attention_mask_bt, cache, return_logits=return_logits)
