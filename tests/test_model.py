"""Tests of the NNX decoder (capo_jax.models): scanned layers vs an unscanned loop, KV-cache decoding and overflow,
padding, hidden/logits contract, remat policies, dtypes.

Parity against HF transformers lives in tests/test_hf_interop.py.
"""

import functools
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from capo_jax.models import CausalLM, ModelConfig, apply, apply_rope, init_cache, rms_norm, rope_cos_sin


# One jitted forward shared by the tests, so equal shapes compile once.
APPLY = jax.jit(apply, static_argnames=("return_logits",))


def forward(model, tokens_bt, mask_bt=None, **kw):
  graphdef, state = nnx.split(model)
  return APPLY(graphdef, state, jnp.asarray(tokens_bt), attention_mask_bt=None if mask_bt is None else
               jnp.asarray(mask_bt), **kw)


def tiny_config(**kw):
  base = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
              rope_theta=10000.0)
  base.update(kw)
  return ModelConfig(**base)


@functools.lru_cache(maxsize=None)
def tiny_model(**kw):
  model = CausalLM(tiny_config(**kw), rngs=nnx.Rngs(0))
  # Non-trivial norm weights and biases, so that a wrong mapping of any of them changes the numbers.
  graphdef, state = nnx.split(model)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  leaves = [x + 0.1 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
  return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))


# Three rows with 0, 2 and 5 left pads; 9 tokens each.
TOKENS = np.array([[5, 17, 3, 88, 41, 9, 60, 2, 33],
                   [0, 0, 11, 4, 73, 25, 8, 91, 6],
                   [0, 0, 0, 0, 0, 50, 12, 7, 64]], np.int32)
MASK = (np.arange(9)[None, :] >= np.array([[0], [2], [5]])).astype(np.int32)


def test_kv_cache_decode_matches_full_forward_with_left_padding():
  """Prefill 6 tokens, then decode 3 one at a time in a lax.scan over a donated cache: every step's logits equal
  those of one full forward over the same prefix (causality: position t of the full forward sees exactly t's prefix),
  and an explicit forward over the 7-token prefix agrees too."""
  model = tiny_model()
  graphdef, state = nnx.split(model)
  prefill_len, total = 6, TOKENS.shape[1]
  full = forward(model, TOKENS, MASK).logits

  @functools.partial(jax.jit, donate_argnums=(2,))
  def prefill_and_decode(state, tokens_bt, cache):
    out = apply(graphdef, state, tokens_bt[:, :prefill_len], attention_mask_bt=MASK[:, :prefill_len], cache=cache)

    def step(cache, token_b):
      step_out = apply(graphdef, state, token_b[:, None], cache=cache)
      return step_out.cache, step_out.logits[:, 0]

    cache, step_logits_tbv = jax.lax.scan(step, out.cache, tokens_bt[:, prefill_len:].T)
    return out.logits, jnp.swapaxes(step_logits_tbv, 0, 1), cache

  cache0 = model.init_cache(batch_size=3, max_length=12)
  prefill_logits, step_logits, cache = prefill_and_decode(state, TOKENS, cache0)
  real = MASK.astype(bool)
  np.testing.assert_allclose(np.asarray(prefill_logits)[real[:, :prefill_len]],
                             np.asarray(full[:, :prefill_len])[real[:, :prefill_len]], atol=1e-5, rtol=0)
  np.testing.assert_allclose(step_logits, full[:, prefill_len:], atol=1e-5, rtol=0)
  assert int(cache.index) == total
  np.testing.assert_array_equal(cache.valid[:, :total], real)
  assert not cache.valid[:, total:].any()

  prefix = forward(model, TOKENS[:, :7], MASK[:, :7]).logits
  np.testing.assert_allclose(step_logits[:, 0], prefix[:, 6], atol=1e-5, rtol=0)


def test_left_padding_does_not_change_real_token_logits():
  """A row padded on the left gives the same logits at its real tokens as the same row alone without pads:
  default positions restart at 0 on the first real token and pads are never attended to."""
  model = tiny_model()
  padded = forward(model, TOKENS, MASK).logits
  alone = forward(model, TOKENS[2:3, 5:]).logits
  np.testing.assert_allclose(padded[2, 5:], alone[0], atol=1e-5, rtol=0)
  # Changing the pad token ids changes nothing at real positions either.
  other_pads = np.where(MASK == 1, TOKENS, 42)
  repadded = forward(model, other_pads, MASK).logits
  np.testing.assert_allclose(np.asarray(repadded)[MASK == 1], np.asarray(padded)[MASK == 1], atol=1e-6, rtol=0)


@pytest.mark.parametrize("tied", [False, True])
def test_logits_are_hidden_times_unembedding(tied):
  model = tiny_model(tie_word_embeddings=tied)
  out = forward(model, TOKENS, MASK)
  w_vh = model.unembedding()
  assert w_vh.shape == (97, 32)
  if tied:
    assert not hasattr(model, "lm_head")
    np.testing.assert_array_equal(w_vh, model.embed.embedding[...])
  else:
    np.testing.assert_array_equal(w_vh, model.lm_head.weight[...])
    assert not np.allclose(w_vh, model.embed.embedding[...])
  np.testing.assert_allclose(out.logits, np.einsum("bth,vh->btv", out.hidden, w_vh), atol=1e-5, rtol=1e-5)
  assert out.logits.dtype == jnp.float32 and out.cache is None
  no_logits = forward(model, TOKENS, MASK, return_logits=False)
  assert no_logits.logits is None
  np.testing.assert_array_equal(no_logits.hidden, out.hidden)


def unscanned_logits(model, tokens_bt, mask_bt):
  """Reference forward: the blocks one at a time in a Python loop, block i built from slice i of the stacked
  parameters, with the causal + padding mask and default positions written out here."""
  cfg = model.config
  tokens_bt, mask_bt = jnp.asarray(tokens_bt), jnp.asarray(mask_bt, bool)
  t = tokens_bt.shape[1]
  positions_bt = jnp.maximum(jnp.cumsum(mask_bt, axis=-1) - 1, 0)
  cos, sin = rope_cos_sin(positions_bt, cfg.resolved_head_dim, cfg.rope_theta)
  allowed_b1ts = (np.tril(np.ones((t, t), bool))[None] & (mask_bt[:, None, :] | np.eye(t, dtype=bool)[None]))[:, None]
  layer_graphdef, layer_state = nnx.split(model.layers)
  x_bth = model.embed(tokens_bt)
  for i in range(cfg.num_layers):
    block = nnx.merge(layer_graphdef, jax.tree.map(lambda p: p[i], layer_state))
    x_bth, _ = block(x_bth, cos, sin, allowed_b1ts)
  return jnp.einsum("bth,vh->btv", model.norm(x_bth), model.unembedding())


def _masked_lse_loss(logits_btv):
  return jnp.mean(jax.nn.logsumexp(logits_btv, -1) * MASK)


@pytest.mark.parametrize("remat", ["none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable"])
def test_scanned_layers_equal_unscanned_reference_values_and_gradients(remat):
  """3 layers under one nnx.scan (checkpointed per `remat`) give the logits, loss and parameter gradients of the
  Python loop over the stacked blocks, at float32; the jaxpr holds one checkpoint (none for "none")."""
  model = tiny_model(num_layers=3)
  _, state = nnx.split(model)
  remat_graphdef, _ = nnx.split(CausalLM(tiny_config(num_layers=3, remat=remat), rngs=nnx.Rngs(0)))
  scanned = lambda s: _masked_lse_loss(apply(remat_graphdef, s, TOKENS, attention_mask_bt=MASK).logits)

  real = MASK == 1
  np.testing.assert_allclose(np.asarray(forward(model, TOKENS, MASK).logits)[real],
                             np.asarray(unscanned_logits(model, TOKENS, MASK))[real], atol=2e-6, rtol=0)
  l0, g0 = _reference_value_and_grad()
  l1, g1 = jax.jit(jax.value_and_grad(scanned))(state)
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(g0)[0], jax.tree.leaves(g1)):
    np.testing.assert_allclose(b, a, atol=1e-6, rtol=1e-5, err_msg=jax.tree_util.keystr(path))
  assert float(jnp.abs(g0["layers"]["mlp"]["up_proj"]["kernel"][...][2]).max()) > 1e-3
  assert str(jax.make_jaxpr(scanned)(state)).count("remat") == (remat != "none")


@functools.lru_cache(maxsize=None)
def _reference_value_and_grad():
  """Loss and gradients of the unscanned reference on the 3-layer tiny model (shared by the remat cases)."""
  graphdef, state = nnx.split(tiny_model(num_layers=3))
  reference = lambda s: _masked_lse_loss(unscanned_logits(nnx.merge(graphdef, s), TOKENS, MASK))
  value, grads = jax.jit(jax.value_and_grad(reference))(state)
  # The layer order matters: the stacked axis is the depth, not a batch of interchangeable blocks.
  flipped = nnx.State({**state, "layers": jax.tree.map(lambda p: p[::-1], state["layers"])})
  assert abs(float(reference(flipped)) - float(value)) > 1e-4
  return value, grads


def test_traced_program_size_is_flat_in_depth():
  """The jaxpr of a forward + backward has as many matmuls for 2 layers as for 6: one scanned block body."""

  def count_dots(num_layers):
    graphdef, state = nnx.split(CausalLM(tiny_config(num_layers=num_layers, remat="full"), rngs=nnx.Rngs(0)))
    loss = lambda s: _masked_lse_loss(apply(graphdef, s, TOKENS, attention_mask_bt=MASK).logits)
    return str(jax.make_jaxpr(jax.grad(loss))(state)).count("dot_general")

  two, six = count_dots(2), count_dots(6)
  assert two == six and two > 7


def test_remat_config_values():
  assert tiny_config(remat=True).remat == "full" and tiny_config(remat=False).remat == "none"
  with pytest.raises(ValueError, match="remat must be one of"):
    tiny_config(remat="everything")


def test_kv_cache_overflow_is_an_error_not_wrong_logits():
  """Writing past the last slot raises at the Python level when the shapes or a concrete index show it; under jit
  (traced index) the overflowing call returns NaN logits while the calls that fit stay exact."""
  model = tiny_model()
  with pytest.raises(ValueError, match="KV cache overflow: 9 new tokens .* 8 slots"):
    model(jnp.asarray(TOKENS), attention_mask_bt=jnp.asarray(MASK), cache=model.init_cache(3, 8))
  cache = model(jnp.asarray(TOKENS[:, :6]), attention_mask_bt=jnp.asarray(MASK[:, :6]),
                cache=model.init_cache(3, 8)).cache
  with pytest.raises(ValueError, match="KV cache overflow: 6 of 8 slots are filled and 3 new tokens"):
    model(jnp.asarray(TOKENS[:, 6:]), cache=cache)

  graphdef, state = nnx.split(model)

  @jax.jit
  def decode(state, cache, tokens_tb):
    def step(cache, token_b):
      out = apply(graphdef, state, token_b[:, None], cache=cache)
      return out.cache, out.logits[:, 0]
    return jax.lax.scan(step, cache, tokens_tb)[1]

  step_logits = np.asarray(decode(state, cache, jnp.asarray(TOKENS[:, 6:].T)))
  full = np.asarray(forward(model, TOKENS, MASK).logits)
  np.testing.assert_allclose(step_logits[:2], np.swapaxes(full[:, 6:8], 0, 1), atol=1e-5, rtol=0)
  assert np.isnan(step_logits[2]).all()


# The bf16 tolerances stated in the ModelConfig docstring: logits within 0.1 absolute of float32 (logits of scale ~1),
# gradients within 5% relative L2 error per parameter (bf16 keeps 8 mantissa bits: ~0.4% per rounding).
BF16_LOGITS_ATOL = 0.1
BF16_GRAD_RTOL = 0.05


def test_bfloat16_params_and_compute_keep_float32_logits():
  """bf16 parameters and activations (remat on), end to end: float32 logits, bf16 hidden states, gradients and cache,
  within the documented tolerances of the float32 model; bf16 compute over float32 parameters works too."""
  f32 = tiny_model()
  bf16 = CausalLM(tiny_config(dtype="bfloat16", param_dtype="bfloat16", remat="full"), rngs=nnx.Rngs(0))
  graphdef, _ = nnx.split(bf16)
  f32_graphdef, f32_state = nnx.split(f32)
  state = jax.tree.map(lambda x: x.astype(jnp.bfloat16), f32_state)
  out = APPLY(graphdef, state, TOKENS, attention_mask_bt=MASK)
  assert out.logits.dtype == jnp.float32 and out.hidden.dtype == jnp.bfloat16
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(nnx.state(bf16)))
  ref = forward(f32, TOKENS, MASK).logits
  real = MASK == 1
  err = np.abs(np.asarray(out.logits)[real] - np.asarray(ref)[real]).max()
  assert 0 < err < BF16_LOGITS_ATOL, err
  mixed_graphdef, _ = nnx.split(CausalLM(tiny_config(dtype="bfloat16"), rngs=nnx.Rngs(0)))
  mixed = APPLY(mixed_graphdef, f32_state, TOKENS, attention_mask_bt=MASK)
  assert mixed.hidden.dtype == jnp.bfloat16
  assert np.abs(np.asarray(mixed.logits)[real] - np.asarray(ref)[real]).max() < BF16_LOGITS_ATOL

  loss = lambda g, s: _masked_lse_loss(apply(g, s, TOKENS, attention_mask_bt=MASK).logits)
  grad = jax.jit(jax.grad(loss, argnums=1), static_argnums=0)
  g32, g16 = grad(f32_graphdef, f32_state), grad(graphdef, state)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(g32)[0], jax.tree.leaves(g16)):
    assert b.dtype == jnp.bfloat16
    rel = float(jnp.linalg.norm((b.astype(jnp.float32) - a).ravel()) / jnp.linalg.norm(a.ravel()))
    assert rel < BF16_GRAD_RTOL, (jax.tree_util.keystr(path), rel)
  cache = init_cache(bf16.config, 3, 10)
  assert cache.k.dtype == jnp.bfloat16 and cache.k.shape == (2, 3, 10, 2, 8)


def test_rope_and_rms_norm_hand_values():
  # D=2: the single frequency is θ^0 = 1, so (1, 0) at position p rotates to (cos p, sin p).
  cos, sin = rope_cos_sin(jnp.array([[0, 1, 2]]), head_dim=2, theta=10000.0)
  x = jnp.broadcast_to(jnp.array([1.0, 0.0]), (1, 3, 1, 2))
  np.testing.assert_allclose(apply_rope(x, cos, sin)[0, :, 0],
                             [[1, 0], [np.cos(1), np.sin(1)], [np.cos(2), np.sin(2)]], atol=1e-6)
  # D=4, θ=100: frequencies 1 and 0.1; pairs are (x0, x2) and (x1, x3).
  cos, sin = rope_cos_sin(jnp.array([[3]]), head_dim=4, theta=100.0)
  y = apply_rope(jnp.array([1.0, 2.0, 0.0, 0.0]).reshape(1, 1, 1, 4), cos, sin)[0, 0, 0]
  np.testing.assert_allclose(y, [np.cos(3), 2 * np.cos(0.3), np.sin(3), 2 * np.sin(0.3)], atol=1e-6)
  # RMSNorm: x=(3,4), mean(x²)=12.5 → x/√12.5 = (0.8485, 1.1314), times w=(1,2).
  np.testing.assert_allclose(rms_norm(jnp.array([3.0, 4.0]), jnp.array([1.0, 2.0]), 0.0),
                             [3 / np.sqrt(12.5), 8 / np.sqrt(12.5)], rtol=1e-6)


def test_config_validation_and_hf_dict_parsing():
  with pytest.raises(ValueError, match="num_kv_heads"):
    tiny_config(num_heads=4, num_kv_heads=3)
  with pytest.raises(ValueError, match="dtype"):
    tiny_config(dtype="float64")
  with pytest.raises(ValueError, match="model_type"):
    tiny_config(model_type="gpt2")
  hf = dict(model_type="qwen2", vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, rms_norm_eps=1e-5)
  with pytest.raises(ValueError, match="rope"):
    ModelConfig.from_hf_dict(hf)
  assert ModelConfig.from_hf_dict({**hf, "rope_theta": 500.0}).rope_theta == 500.0
  v5 = ModelConfig.from_hf_dict({**hf, "rope_parameters": {"rope_type": "default", "rope_theta": 123.0}})
  assert v5.rope_theta == 123.0 and v5.attention_bias and not v5.attention_out_bias and v5.head_dim is None
  with pytest.raises(ValueError, match="yarn"):
    ModelConfig.from_hf_dict({**hf, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1.0, "factor": 4.0}})
  with pytest.raises(ValueError, match="model_type 'mistral'"):
    ModelConfig.from_hf_dict({**hf, "model_type": "mistral", "rope_theta": 1.0})
  with pytest.raises(ValueError, match="'hidden_size'"):
    ModelConfig.from_hf_dict({k: v for k, v in hf.items() if k != "hidden_size"} | {"rope_theta": 1.0})
  llama = ModelConfig.from_hf_dict({**hf, "model_type": "llama", "rope_theta": 1.0, "head_dim": 6})
  assert not llama.attention_bias and not llama.attention_out_bias and llama.resolved_head_dim == 6
  assert ModelConfig.from_hf_dict(llama.to_hf_dict()) == llama


def test_importing_models_does_not_import_torch_or_tensorflow():
  code = ("import sys, capo_jax.models, capo_jax.tokenization; "
          "bad = [m for m in ('torch', 'tensorflow', 'transformers') if m in sys.modules]; assert not bad, bad")
  subprocess.run([sys.executable, "-c", code], check=True)
