"""CurvatureConfig.mode: the full-network token mask and Theorem 5.1 subset acceptance as learner steps.

Learner level (a 1-layer CausalLM, 4 prompt groups × 3 completions, the trainer's own optax chain): the full-network
step's mask is ``full_network_token_mask(full_network_token_stats(...))`` along the chain's proposal and its gradient
is ``jax.grad(rl_loss)`` with that mask; the subset step's gradient is the mean of the accepted groups' gradients.
Trainer level: 2-step runs of each mode write the metric keys; bad combinations fail with clear errors.
"""

import dataclasses
import functools

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

from capo_jax import curvature
from capo_jax import curvature_full as cf
from capo_jax import learner
from capo_jax import components
from capo_jax import config as cfg_lib
from capo_jax.tasks import ArithTask
from capo_jax.models import CausalLM, ModelConfig
from experiments import sweep
from tests.test_trainer import _in_process, _write_gin

P, G, PROMPT, N = 4, 3, 4, 6  # prompt groups, completions per group, prompt and completion lengths
LOSS = learner.Objective(loss=cfg_lib.LossConfig(aggregation="seq-mean-token-mean"), completion_length=N)


def _tree_allclose(a, b, rtol=1e-4):
  fa, fb = ravel_pytree(a)[0], ravel_pytree(b)[0]
  scale = float(jnp.max(jnp.abs(fb)))
  np.testing.assert_allclose(np.asarray(fa), np.asarray(fb), rtol=rtol, atol=rtol * scale)


def _train_config(**kw):
  return cfg_lib.TrainConfig(task=ArithTask(), **kw)


@pytest.fixture(scope="module")
def problem():
  """A tiny model, a batch ordered by prompt group and the trainer's chain (clip → τ = ∞ monitor around AdamW)."""
  gin.clear_config()  # module fixtures run before the function-scoped clearing of tests/conftest.py
  cfg = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                    attention_bias=True)
  graphdef, params = nnx.split(CausalLM(cfg, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(0)
  b = P * G
  tokens = rng.integers(1, cfg.vocab_size, (b, PROMPT + N)).astype(np.int32)
  attention = np.ones_like(tokens)
  attention[:2, :1] = 0  # two left-padded prompts
  lengths = rng.integers(2, N + 1, b)
  completion = (np.arange(N)[None] < lengths[:, None]).astype(np.float32)
  attention[:, PROMPT:] = completion
  rewards = rng.integers(0, 2, (P, G)).astype(np.float32)
  rewards[:, 0], rewards[:, 1] = 1.0, 0.0  # every group has reward variance
  adv = ((rewards - rewards.mean(1, keepdims=True)) / (rewards.std(1, ddof=1, keepdims=True) + 1e-4)).reshape(-1)
  batch = learner.SequenceBatch(
      jnp.asarray(tokens), jnp.asarray(attention), jnp.asarray(completion), jnp.asarray(adv, jnp.float32),
      jnp.zeros((b, N)), jnp.asarray(-2.0 - rng.random((b, N)), jnp.float32), jnp.ones((b,), jnp.float32))
  curvature = cfg_lib.CurvatureConfig.from_preset("capo", mode="full_network", monitor=True, top_k=8)
  tcfg = _train_config(curvature=curvature,
                       optimizer=cfg_lib.OptimizerConfig(learning_rate=3e-3),
                       rollout=cfg_lib.RolloutConfig(prompts_per_step=P, group_size=G, max_new_tokens=N))
  optimizer, _ = components.build_optimizer(tcfg)
  return graphdef, params, batch, optimizer, jax.jit(optimizer.update)


def _loss_grad(graphdef, params, batch, state, token_mask_bn=None):
  """``jax.grad`` of ``rl_loss`` with an external token mask (all ones: the unmasked loss)."""
  if token_mask_bn is None:
    token_mask_bn = jnp.ones_like(batch.completion_mask_bn, jnp.float32)
  return _jit_loss_grad(graphdef, params, batch, state, token_mask_bn)


@functools.partial(jax.jit, static_argnums=0)  # one compile per batch shape (eager dispatch is slow)
def _jit_loss_grad(graphdef, params, batch, state, token_mask_bn):
  return jax.grad(lambda p: learner.rl_loss(p, graphdef, batch, state, LOSS, token_mask_bn=token_mask_bn)[0])(
      params)


def _moved_state(graphdef, params, batch, optimizer, update):
  """The chain's state after one real step, so that the proposal uses non-trivial Adam moments."""
  state = optimizer.init(params)
  return update(_loss_grad(graphdef, params, batch, state), state, params)[1]


def _logits_fn(graphdef):
  return lambda p, b: learner.completion_logits(graphdef, p, b, N)


def test_fullnet_mask_and_gradient_equal_direct_computation(problem):
  # make_fullnet_rl_step = this gradient + one optimizer.update (the 2-step training run below runs the step).
  graphdef, params, batch, optimizer, update = problem
  state = _moved_state(graphdef, params, batch, optimizer, update)
  completion = learner.loss_completion_mask(batch)
  targets = batch.tokens_bs[:, -N:]
  # Reference path: jax.grad of rl_loss, the chain's proposal, the full-network statistics along it.
  unmasked = _loss_grad(graphdef, params, batch, state)
  proposal = update(unmasked, state, params)[0]
  stats = jax.jit(lambda p, d: cf.full_network_token_stats(
      _logits_fn(graphdef), p, batch, d, targets, batch.advantages_b))(params, proposal)
  # Thresholds halfway between two neighbouring statistics (≈ 25% rejected by each rule): no token sits on them.
  valid = np.asarray(completion) > 0
  m_f = np.sort(np.asarray(stats.m_f_bt)[valid])
  m_h = np.sort(np.abs(np.asarray(stats.m_h_bt)[valid]))
  k = int(0.75 * len(m_f))
  tau_f, tau_h = float(m_f[k] + m_f[k + 1]) / 2, float(m_h[k] + m_h[k + 1]) / 2
  assert m_f[k] < m_f[k + 1] and m_h[k] < m_h[k + 1]
  want_keep = cf.full_network_token_mask(stats, completion, tau_fisher=tau_f, tau_hessian=tau_h)

  grads_fn = jax.jit(learner.make_fullnet_rl_grads(graphdef, optimizer, LOSS, tau_fisher=tau_f,
                                                   tau_hessian=tau_h))
  grads, aux = grads_fn(params, state, batch)
  _tree_allclose(aux.proposal, proposal, rtol=1e-2)  # Adam divides by √ν: tiny gradients amplify rounding
  np.testing.assert_array_equal(np.asarray(aux.keep_bn), np.asarray(want_keep))
  kept, total = float(jnp.sum(want_keep)), float(jnp.sum(completion))
  assert 0.3 * total < kept < 0.8 * total  # both rules bite, most tokens survive
  want = _loss_grad(graphdef, params, batch, state, want_keep)
  _tree_allclose(grads, want)
  unmasked_norm = optax.tree.norm(unmasked)
  assert abs(float(optax.tree.norm(grads)) - float(unmasked_norm)) > 1e-3 * float(unmasked_norm)  # the mask acted

  m = {k[len(learner.FULLNET_PREFIX):]: v for k, v in aux.metrics.items() if k.startswith(learner.FULLNET_PREFIX)}
  assert set(curvature.METRIC_KEYS) <= set(m) and "proposal_norm" in aux.metrics
  # The unprefixed keys belong to the last-layer model (a monitor, absent here): never the full-network statistics.
  assert not set(curvature.METRIC_KEYS) & set(aux.metrics)
  assert float(m["rejected_fraction"]) == pytest.approx(1.0 - kept / total, abs=1e-6)
  assert 0.15 < float(m["rejected_by_fisher"]) < 0.35 and 0.15 < float(m["rejected_by_hessian"]) < 0.35
  assert float(m["m_fisher_max"]) < tau_f and abs(float(m["m_hessian_max"])) < tau_h  # quantiles of kept tokens
  m = aux.metrics
  assert float(m["kept_tokens"]) == kept  # rl_objective's metrics are those of the masked loss


def test_fullnet_fisher_only_metrics():
  stats = cf.FullNetworkTokenStats(*(jnp.zeros((2, 3)),) * 4, None, jnp.array([[0.0, 2.0, 1.0], [3.0, 0.5, 9.0]]))
  completion = jnp.array([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
  out = learner.fullnet_mask_metrics(stats, completion, tau_fisher=1.5, tau_hessian=None)
  assert not any(k.startswith("m_hessian") for k in out)
  assert float(out["rejected_fraction"]) == float(out["rejected_by_fisher"]) == pytest.approx(2 / 5)
  assert float(out["rejected_by_hessian"]) == 0.0 and float(out["m_fisher_max"]) == 1.0


def test_subset_gradient_is_mean_of_accepted_group_gradients(problem):
  # make_subset_rl_step = this gradient + update_if(any accepted) (tested below; the training run runs the step).
  graphdef, params, batch, optimizer, _ = problem
  # Group 2 has zero advantages (∇L = 0, m_H = 0 < δ_H: rejected); group 3 is dynamic-sampling padding (row weight 0:
  # not a real subset, left out of the mean). Groups 0 and 1 propose improving steps (m_H > δ_H): accepted.
  adv = batch.advantages_b.at[2 * G:3 * G].set(0.0)
  row_w = batch.row_weight_b.at[3 * G:].set(0.0)
  batch = batch._replace(advantages_b=adv, row_weight_b=row_w)
  state = optimizer.init(params)
  delta_h = 1e-9
  grads_fn = jax.jit(learner.make_subset_rl_grads(graphdef, optimizer, LOSS, num_subsets=P, delta_h=delta_h))
  grads, aux = grads_fn(params, state, batch)
  np.testing.assert_array_equal(np.asarray(aux.real_s), [True, True, True, False])
  np.testing.assert_array_equal(np.asarray(aux.accepted_s), [True, True, False, False])
  assert float(aux.stats.m_h_s[2]) == 0.0 and np.all(np.asarray(aux.stats.m_h_s[:2]) > delta_h)

  def group_grad(i):
    sub = jax.tree.map(lambda x: x[i * G:(i + 1) * G], batch)
    return _loss_grad(graphdef, params, sub, state)

  per_group = [group_grad(i) for i in range(P)]
  assert float(optax.tree.norm(per_group[2])) == float(optax.tree.norm(per_group[3])) == 0.0
  want = jax.tree.map(lambda a, b: (a + b) / 2, per_group[0], per_group[1])
  _tree_allclose(grads, want)
  # With every real group accepted this is the plain batch gradient (sequence-mean aggregation, real rows only).
  full = _loss_grad(graphdef, params, batch, state)
  _tree_allclose(jax.tree.map(lambda a, b, c: (a + b + c) / 3, *per_group[:3]), full)
  m = aux.metrics
  assert float(m["subset_accepted_fraction"]) == pytest.approx(2 / 3)
  assert float(m["subset_num_accepted"]) == 2.0 and float(m["subset_num_subsets"]) == 3.0
  assert set(learner.SUBSET_METRIC_KEYS) <= set(m) and float(m["subset_m_h_min"]) == 0.0


def test_update_if_skips_the_step_when_nothing_is_accepted():
  optimizer = optax.adam(1e-2)
  params = {"w": jnp.array([1.0, -2.0])}
  state = optimizer.init(params)
  grads = {"w": jnp.array([0.5, 0.5])}
  same_params, same_state, updates = learner.update_if(jnp.array(False), optimizer, grads, state, params)
  for a, b in zip(jax.tree.leaves((same_params, same_state)), jax.tree.leaves((params, state))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert float(optax.tree.norm(updates)) == 0.0
  new_params, new_state, _ = learner.update_if(jnp.array(True), optimizer, grads, state, params)
  want_updates, want_state = optimizer.update(grads, state, params)
  np.testing.assert_allclose(new_params["w"], params["w"] + want_updates["w"])
  assert int(new_state[0].count) == int(want_state[0].count) == 1


# ---------------------------------------------------------------------------------------------------------------
# TrainConfig, the sweep presets and 2-step training runs.


def test_bad_combinations_raise_clear_errors():
  curv = cfg_lib.CurvatureConfig
  with pytest.raises(cfg_lib.ConfigError, match=r"CurvatureConfig.mode must be one of .*'full_network', 'subset'"):
    curv(mode="fullnet")
  with pytest.raises(cfg_lib.ConfigError, match="full_network.*finite tau_fisher"):
    curv(mode="full_network")
  for mode in ("full_network", "subset"):
    for bad in ({"num_minibatches": 2}, {"num_iterations": 2}):
      with pytest.raises(cfg_lib.ConfigError, match="needs one gradient step per batch"):
        _train_config(curvature=curv.from_preset("capo", mode=mode), optimizer=cfg_lib.OptimizerConfig(**bad))
  with pytest.raises(cfg_lib.ConfigError, match="not supported"):
    curv(mode="subset", step_control="trust_region", max_kl=1e-3)
  with pytest.raises(cfg_lib.ConfigError, match="needs CurvatureConfig.max_kl"):
    curv(step_control="trust_region")
  with pytest.raises(cfg_lib.ConfigError, match="subset_delta_f"):
    curv(mode="subset", subset_delta_f=0.0)
  with pytest.raises(cfg_lib.ConfigError, match="subset_delta_h"):
    curv(mode="subset", subset_delta_h=-1.0)
  # Allowed: subset with any estimator; full_network with the trust region.
  _train_config(loss=cfg_lib.LossConfig(advantage_estimator="reinforce"), curvature=curv(mode="subset"))
  _train_config(curvature=curv.from_preset("drcapo", mode="full_network", step_control="trust_region", max_kl=1e-3))


def test_build_optimizer_drops_the_last_layer_mask_outside_last_layer_mode():
  rng = np.random.default_rng(0)
  hidden = jnp.asarray(10 * rng.standard_normal((1, 4, 4)), jnp.float32)
  logits = jnp.asarray(5 * rng.standard_normal((1, 4, 16)), jnp.float32)
  params = {"lm_head": {"kernel": jnp.zeros((16, 4))}}

  def rejected(capo):
    _, aux = capo.token_mask(capo.init(params), hidden, logits, jnp.zeros((1, 4), jnp.int32), 3 * jnp.ones((1,)),
                             jnp.ones((1, 4)))
    return float(aux.metrics["rejected_fraction"])

  def built(**kw):
    return components.build_optimizer(_train_config(curvature=cfg_lib.CurvatureConfig.from_preset("capo", **kw)))[1]

  assert rejected(built(top_k=8)) > 0.0  # the released mask
  for mode in ("full_network", "subset"):
    assert built(top_k=8, mode=mode) is None
    assert rejected(built(top_k=8, mode=mode, monitor=True)) == 0.0  # τ = ∞: a monitor only


def test_fingerprint_is_of_explicit_bindings_and_the_config_version(monkeypatch):
  bindings = "include 'x.gin'\nLossConfig.advantage_estimator = 'grpo'\nOptimizerConfig.learning_rate = 1e-4\n"
  fp = cfg_lib.config_fingerprint(bindings)
  assert cfg_lib.config_fingerprint("# a comment\n\n" + bindings) == fp  # comments and blank lines do not count
  assert cfg_lib.config_fingerprint(bindings.replace("1e-4", "2e-4")) != fp
  monkeypatch.setattr(cfg_lib, "CONFIG_VERSION", cfg_lib.CONFIG_VERSION + 1)
  assert cfg_lib.config_fingerprint(bindings) != fp  # a change of defaults' meaning refuses old runs


def test_sweep_presets_bind_the_modes_at_equal_budget(tmp_path):
  methods = ["capo", "capo_fullnet", "capo_fullnet_fisher", "subset"]
  runs = sweep.plan(methods, [1e-4], [0], str(tmp_path), prompts_per_step=16, group_size=8, num_steps=60,
                    python="PY")
  params = {r.method: [a.split("=", 1)[1] for a in r.argv if a.startswith("--gin_param=")] for r in runs}
  gin_file = {r.method: r.argv[3] for r in runs}
  assert "CurvatureConfig.mode='full_network'" in params["capo_fullnet"]
  assert "CurvatureConfig.second_order=True" in params["capo_fullnet"]
  assert "CurvatureConfig.second_order=False" in params["capo_fullnet_fisher"]
  assert gin_file["capo_fullnet"] == gin_file["capo_fullnet_fisher"] == "--gin_file=experiments/configs/arith_capo.gin"
  assert "CurvatureConfig.mode='subset'" in params["subset"]
  assert gin_file["subset"] == "--gin_file=experiments/configs/arith_grpo.gin"
  for p in params.values():
    assert p[-5:-2] == ["RolloutConfig.prompts_per_step=16", "RolloutConfig.group_size=8", "TrainConfig.num_steps=60"]
  bad = dict(sweep.PRESETS, broken=("arith_grpo.gin", ("TrainConfig.num_steps=5",)))
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(sweep, "PRESETS", bad)
    with pytest.raises(ValueError, match="sweep controls"):
      sweep.plan(["broken"], [1e-4], [0], str(tmp_path))


# Evaluation on 4 problems × 4 samples: the rollout's shapes, so the sampler compiles once for both. The warm start
# only has to produce a model (the runs test plumbing, not learning).
TWO_STEPS = """
WarmStartConfig.steps = 4
TrainConfig.num_steps = 2
EvalConfig.every = 2
CheckpointConfig.every = 2
EvalConfig.num_problems = 4
EvalConfig.k = 4
"""


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("cache")


# Each mode once: full_network in its Fisher-only form with the trust region (the second-order metrics are checked at
# the learner level above) and the τ = ∞ last-layer monitor of arith_base.gin; subset with dynamic sampling and no
# monitor (its m_* keys then stay null: the subset rule has no per-token statistics).
@pytest.mark.parametrize("algorithm,extra,keys,absent", [
    ("capo", "CurvatureConfig.mode = 'full_network'\nCurvatureConfig.second_order = False\n"
     "CurvatureConfig.step_control = 'trust_region'\nCurvatureConfig.max_kl = 1e-3",
     ("rejected_by_fisher", "rejected_by_hessian", "fullnet_m_fisher_p50", "fullnet_m_fisher_p90",
      "fullnet_m_fisher_p99", "fullnet_m_fisher_max", "proposal_norm", "m_hessian_p90", "m_fisher_p90",
      "predicted_kl"),
     ("fullnet_m_hessian_p50", "fullnet_m_hessian_p90", "fullnet_m_hessian_p99", *learner.SUBSET_METRIC_KEYS)),
    ("grpo", "CurvatureConfig.mode = 'subset'\nRolloutConfig.dynamic_sampling = True\n"
     "CurvatureConfig.monitor = False",
     learner.SUBSET_METRIC_KEYS[:3], ("proposal_norm", "m_hessian_p90", "m_fisher_p90")),
], ids=["full_network", "subset"])
def test_two_step_runs_write_the_metric_keys(tmp_path, cache_dir, algorithm, extra, keys, absent):
  rows = _in_process(_write_gin(tmp_path, algorithm, TWO_STEPS + extra), tmp_path / "run", cache_dir)
  train_rows = [r for r in rows if "reward_mean" in r]
  assert [r["step"] for r in train_rows] == [1, 2]
  assert [r["step"] for r in rows if "eval_accuracy" in r] == [0, 2]
  for row in train_rows:
    missing = [k for k in keys if row.get(k) is None]
    assert not missing, missing
    assert all(row.get(k) is None for k in absent)
    assert np.isfinite(row["loss"]) and 0.0 <= row["rejected_token_fraction"] <= 1.0
    if "subset_accepted_fraction" in row:
      assert 0.0 <= row["subset_accepted_fraction"] <= 1.0
      assert row["subset_num_subsets"] == row["kept_groups"] * 4  # dynamic sampling: padding groups are not subsets


def test_skipped_subset_steps_log_the_learning_rate_the_optimizer_applies(tmp_path, cache_dir):
  # δ_H = 1e9: no group is accepted, every step is skipped and the optimizer's count stays 0. The logged lr must be
  # schedule(0) at both steps (a host-side step counter would log schedule(1) at step 2).
  extra = ("CurvatureConfig.mode = 'subset'\nCurvatureConfig.subset_delta_h = 1e9\n"
           "OptimizerConfig.schedule = 'cosine'\nOptimizerConfig.learning_rate = 1e-3")
  rows = _in_process(_write_gin(tmp_path, "grpo", TWO_STEPS + extra), tmp_path / "run", cache_dir)
  train_rows = [r for r in rows if "reward_mean" in r]
  schedule = cfg_lib.learning_rate_schedule(cfg_lib.OptimizerConfig(learning_rate=1e-3, schedule="cosine"), 2)
  assert float(schedule(1)) > 0.0 == float(schedule(0))
  assert [r["optimizer_updates"] for r in train_rows] == [0, 0]
  assert [r["lr"] for r in train_rows] == [float(schedule(0))] * 2
  assert all(r["subset_num_accepted"] == 0.0 for r in train_rows)


def test_kl_coef_adds_its_weighted_kl_to_the_loss(problem):
  # With token-mean aggregation the penalty is β · (masked token mean of k3) = β · the logged ``kl``.
  graphdef, params, batch, optimizer, _ = problem
  state = optimizer.init(params)

  def loss_and_kl(kl_coef):
    obj = learner.Objective(loss=cfg_lib.LossConfig(aggregation="token-mean", kl_coef=kl_coef), completion_length=N)
    loss, (metrics, _) = learner.rl_loss(params, graphdef, batch, state, obj)
    return float(loss), float(metrics["kl"])

  loss0, kl = loss_and_kl(0.0)
  loss1, _ = loss_and_kl(0.3)
  assert kl > 1e-3  # the batch's reference log-probs differ from the policy's
  assert loss1 - loss0 == pytest.approx(0.3 * kl, rel=1e-5)
