"""CAPO's top-K policy from the loss's own logits pass (``logits_stats_fn`` of the learner's token-mask hook,
``MaskedTransformation.top_k_policy`` / ``token_mask_from_top_k``): the same mask, statistics and update as forming
the logits a second time (``token_mask_from_hidden``), with one unembedding matmul fewer per step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

from capo_jax import components
from capo_jax import config as cfg_lib
from capo_jax import learner
from capo_jax.models import CausalLM, ModelConfig
from capo_jax.ops import chunking
from capo_jax.tasks import ArithTask
from test_shared_prompts import ROWS, _grouped_batch

VOCAB, K = 300, 8


@pytest.fixture(scope="module")
def setup():
  model_cfg = ModelConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                          num_kv_heads=2)
  graphdef, params = nnx.split(CausalLM(model_cfg, rngs=nnx.Rngs(0)))
  batch = _grouped_batch(np.random.default_rng(0), VOCAB)
  # A dropped group (zero row weight): its positions are not "valid" for the top-K.
  batch = batch._replace(row_weight_b=batch.row_weight_b.at[4:8].set(0.0))
  return graphdef, params, batch


def _capo(learning_rate, tau_fisher=1e-4):
  """CAPO's config, optimizer and transform at the learning rate η."""
  cfg = cfg_lib.TrainConfig(
      task=ArithTask(), num_steps=4,
      rollout=cfg_lib.RolloutConfig(prompts_per_step=3, group_size=4, max_new_tokens=5),
      optimizer=cfg_lib.OptimizerConfig(learning_rate=learning_rate), loss=cfg_lib.LossConfig(track_kl=False),
      curvature=cfg_lib.CurvatureConfig(mode="last_layer", tau_fisher=tau_fisher, tau_hessian=1e-2, top_k=K))
  return (cfg, *components.build_optimizer(cfg))


def _without_logits_stats(hook):
  """The same hook without ``logits_stats_fn``: the mask forms its own logits."""
  return lambda *args: hook(*args)


def test_token_mask_from_top_k_equals_token_mask_from_hidden(setup):
  graphdef, params, batch = setup
  cfg, optimizer, capo = _capo(1e-4)
  # Moments after one update of a random gradient, so the Adam direction model reads non-zero rows.
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  grads = jax.tree.unflatten(tree, [1e-3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
  opt_state = jax.jit(lambda g, p: optimizer.update(g, optimizer.init(p), p)[1])(grads, params)
  hidden, w, targets = learner.completion_hidden(graphdef, params, batch.tokens_bs, batch.attention_mask_bs, 5)
  completion = learner.loss_completion_mask(batch)
  adv = batch.advantages_b

  @jax.jit  # both paths in one compiled call: op by op they took most of the test's time
  def both(opt_state, hidden, w, targets, adv, completion):
    mask_a, aux_a = capo.token_mask_from_hidden(opt_state, hidden, w, targets, adv, completion)
    logits = jnp.einsum("bnh,vh->bnv", hidden, w, preferred_element_type=jnp.float32)
    top = capo.top_k_policy(logits, targets, completion > 0)
    mask_b, aux_b = capo.token_mask_from_top_k(opt_state, hidden, top, VOCAB, adv, completion)
    return mask_a, aux_a, mask_b, aux_b

  mask_a, aux_a, mask_b, aux_b = both(opt_state, hidden, w, targets, adv, completion)
  m_fisher = np.asarray(aux_a.m_fisher)[np.asarray(completion) > 0]
  assert m_fisher.min() > 0 and m_fisher.max() > 1.2 * m_fisher.min()  # real, token-dependent statistics
  np.testing.assert_array_equal(np.asarray(mask_b), np.asarray(mask_a))
  for a, b in zip(jax.tree.leaves(aux_a), jax.tree.leaves(aux_b)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-12)


def test_learner_step_with_the_loss_logits_is_the_same_step(setup):
  graphdef, params, batch = setup
  cfg, optimizer, capo = _capo(1e-2)
  hook = components.capo_token_mask_fn(capo)
  assert callable(hook.logits_stats_fn)
  out = []
  for fn in (hook, _without_logits_stats(hook)):
    step = learner.make_rl_step(graphdef, optimizer, components.objective(cfg), fn)
    p, _, metrics = step(jax.tree.map(jnp.copy, params), optimizer.init(params), batch)
    out.append((np.asarray(ravel_pytree(p)[0]), metrics))
  (fused, m_fused), (twice, m_twice) = out
  assert 0.0 < float(m_twice["rejected_fraction"]) < 1.0  # a real mask: some tokens kept, some rejected
  np.testing.assert_allclose(fused, twice, atol=1e-7)
  for key in ("rejected_fraction", "kept_tokens", "m_fisher_max", "m_hessian_p50", "loss", "grad_norm"):
    np.testing.assert_allclose(float(m_fused[key]), float(m_twice[key]), rtol=1e-6, err_msg=key)


def test_the_step_forms_the_logits_once(setup, monkeypatch):
  """XLA's cost analysis: the fused step has one chunk loop of [rows·c, H] × [H, V] matmuls fewer. With the logits in
  several time chunks (as at a real vocabulary: Qwen's 151,936 × 8 rows gives 13 positions per chunk) the loss's and
  the mask's chunk loops are separate, so XLA cannot merge the two matmuls itself; here the chunk is cut to c = 2
  positions (N = 5: a loop of two chunks, then one position, which XLA does merge). The cost analysis counts a loop
  body once, so the saving it shows is one chunk's matmul, 2·rows·c·H·V flops."""
  graphdef, params, batch = setup
  chunk = 2
  monkeypatch.setattr(chunking, "AUTO_CHUNK_ELEMENTS", chunk * ROWS * VOCAB)
  cfg, optimizer, capo = _capo(1e-2)
  hook = components.capo_token_mask_fn(capo)

  def flops(fn):
    step = learner.make_rl_step(graphdef, optimizer, components.objective(cfg), fn)
    cost = step.lower(params, optimizer.init(params), batch).compile().cost_analysis()
    return float((cost[0] if isinstance(cost, list) else cost)["flops"])

  chunk_matmul = 2 * ROWS * chunk * 32 * VOCAB
  saved = flops(_without_logits_stats(hook)) - flops(hook)
  assert abs(saved - chunk_matmul) < 0.01 * chunk_matmul, (saved, chunk_matmul)


def test_the_capo_step_at_qwen_vocabulary_takes_the_same_step_as_lax_top_k(monkeypatch):
  """V = 151,936 (Qwen2.5's vocabulary): the CAPO learner step compiles on the CPU with ``top_k_set``'s selection
  path (its compaction's unrolled walk over 4,748 words of flags once ran out of memory here) and takes the same
  two steps — Adam direction at the second, a real mask — as with ``jax.lax.top_k`` (the accelerators' path)."""
  from capo_jax.ops import top_k as top_k_ops  # pylint: disable=import-outside-toplevel
  vocab = 151936
  model_cfg = ModelConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                          num_kv_heads=1)
  graphdef, params = nnx.split(CausalLM(model_cfg, rngs=nnx.Rngs(0)))
  batch = _grouped_batch(np.random.default_rng(0), vocab)
  cfg, optimizer, capo = _capo(1e-3, tau_fisher=5.2e-5)  # the second step's m_F: median ≈ 5.1e-5, max ≈ 5.5e-5
  hook = components.capo_token_mask_fn(capo)
  out = {}
  for path in ("selection", "lax.top_k"):
    if path == "lax.top_k":
      monkeypatch.setattr(top_k_ops, "_use_cpu_path", lambda *args, **kwargs: False)
    step = learner.make_rl_step(graphdef, optimizer, components.objective(cfg), hook)
    p, s = jax.tree.map(jnp.copy, params), optimizer.init(params)
    for _ in range(2):
      p, s, metrics = step(p, s, batch)
    out[path] = (np.asarray(ravel_pytree(p)[0]), metrics)
  (sel, m_sel), (lax_, m_lax) = out["selection"], out["lax.top_k"]
  assert 0.1 < float(m_lax["rejected_fraction"]) < 0.9, float(m_lax["rejected_fraction"])  # a real mask
  np.testing.assert_allclose(sel, lax_, atol=1e-7)
  for key in ("rejected_fraction", "m_fisher_max", "m_hessian_p50", "loss", "grad_norm"):
    np.testing.assert_allclose(float(m_sel[key]), float(m_lax[key]), rtol=1e-6, err_msg=key)
