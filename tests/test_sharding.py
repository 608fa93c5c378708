"""capo_jax.sharding: the mesh config, the partition rules, and the learner, CAPO, sampler and checkpoints on meshes.

In this process (one device): ``MeshConfig`` resolution and errors, the spec of every parameter of the model on a
(2, 4, 2) mesh (``AbstractMesh``: shapes only), optimizer-state and batch shardings, ``initialize_distributed``'s
argument checks.

In one subprocess with 8 CPU devices (``tests/sharding_worker.py``; ``--xla_force_host_platform_device_count=8`` must
be set before jax is imported): one GRPO and one CAPO learner step — two, in fact: CAPO's first with the SGD fallback
direction, its second with moved Adam moments — on meshes (8,1,1), (2,4,1), (2,2,2) against one device (loss, CAPO
mask, metrics, updated parameters); the global top-K of a vocabulary-split array; sampling; a checkpoint saved on one
mesh and restored onto another. In two more processes (4 CPU devices each): one CAPO step of a two-process
``jax.distributed`` run on localhost, each process feeding its own rows, against one device.
"""

import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, PartitionSpec as P

from capo_jax import config as cfg_lib
from capo_jax import sharding
from capo_jax.masked_transform import masked_transform
from capo_jax.models import CausalLM, ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESHES = ("(8, 1, 1)", "(2, 4, 1)", "(2, 2, 2)")
TOLERANCE = 1e-5  # float32, one device vs a mesh: only the summation order differs
# tests/sharding_worker.py's MODEL (V = 64, H = 32, F = 64, 2 layers, 4 heads and 2 key/value heads of width 8, untied):
# per layer q 32·32 + 32, k and v 32·16 + 16 each, o 32·32, gate/up/down 3·32·64, two norms 2·32 → 9,344; embedding
# and lm_head 2·64·32, final norm 32.
MODEL_LAYERS = 2
MODEL_PARAMETERS = MODEL_LAYERS * 9344 + 2 * 64 * 32 + 32


# ---------------------------------------------------------------------------------------------------------------
# In-process: config, rules, shardings.


def test_mesh_config_resolves_the_free_axis_and_rejects_bad_sizes():
  assert cfg_lib.MeshConfig().axis_sizes(8) == (8, 1, 1)
  assert cfg_lib.MeshConfig(data=2, fsdp=-1, tensor=2).axis_sizes(16) == (2, 4, 2)
  assert cfg_lib.MeshConfig(data=2, fsdp=4, tensor=1).axis_sizes(8) == (2, 4, 1)
  with pytest.raises(cfg_lib.ConfigError, match="at most one axis may be -1"):
    cfg_lib.MeshConfig(data=-1, fsdp=-1)
  with pytest.raises(cfg_lib.ConfigError, match=r"MeshConfig.tensor must be an integer ≥ 1 or -1"):
    cfg_lib.MeshConfig(tensor=0)
  with pytest.raises(cfg_lib.ConfigError, match="the fixed axes' product 3 must divide the device count"):
    cfg_lib.MeshConfig(tensor=3).axis_sizes(8)
  with pytest.raises(cfg_lib.ConfigError, match="data × fsdp × tensor = 4 but there are 8 devices"):
    cfg_lib.MeshConfig(data=2, fsdp=2, tensor=1).axis_sizes(8)
  with pytest.raises(cfg_lib.ConfigError, match=r"MeshConfig.decode_weights must be one of \['auto', 'gathered', "
                     r"'sharded'\], got 'replicated'"):
    cfg_lib.MeshConfig(decode_weights="replicated")


def test_make_mesh_on_this_process_uses_auto_axes():
  mesh = sharding.make_mesh(cfg_lib.MeshConfig())
  assert dict(mesh.shape) == {"data": jax.device_count(), "fsdp": 1, "tensor": 1}
  assert mesh.axis_types == (jax.sharding.AxisType.Auto,) * 3


MESH_242 = AbstractMesh((2, 4, 2), ("data", "fsdp", "tensor"))
# Every parameter of a Qwen2-style model with untied head: H = 32 (fsdp = 4 divides), N·D = 32, K·D = 16, F = 64 and
# V = 64 (tensor = 2 divides), L = 2 never split.
EXPECTED_SPECS = {
    "embed/embedding": P("tensor", "fsdp"),
    "lm_head/weight": P("tensor", "fsdp"),
    "norm/weight": P(None),
    "layers/input_layernorm/weight": P(None, None),
    "layers/post_attention_layernorm/weight": P(None, None),
    "layers/self_attn/q_proj/kernel": P(None, "fsdp", "tensor"),
    "layers/self_attn/q_proj/bias": P(None, "tensor"),
    "layers/self_attn/k_proj/kernel": P(None, "fsdp", "tensor"),
    "layers/self_attn/k_proj/bias": P(None, "tensor"),
    "layers/self_attn/v_proj/kernel": P(None, "fsdp", "tensor"),
    "layers/self_attn/v_proj/bias": P(None, "tensor"),
    "layers/self_attn/o_proj/kernel": P(None, "tensor", "fsdp"),
    "layers/mlp/gate_proj/kernel": P(None, "fsdp", "tensor"),
    "layers/mlp/up_proj/kernel": P(None, "fsdp", "tensor"),
    "layers/mlp/down_proj/kernel": P(None, "tensor", "fsdp"),
}


def _abstract_params(**overrides):
  cfg = ModelConfig(**dict(dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                                num_kv_heads=2), **overrides))
  return jax.eval_shape(lambda: nnx.split(CausalLM(cfg, rngs=nnx.Rngs(0)))[1])


def _specs_by_path(tree, specs):
  leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
  paths = [sharding.path_names(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
  return dict(zip(paths, leaves))


def test_every_parameter_gets_its_rule_spec():
  params = _abstract_params()
  assert _specs_by_path(params, sharding.param_specs(params, MESH_242)) == EXPECTED_SPECS


def test_dimensions_the_mesh_axis_does_not_divide_are_replicated():
  params = _abstract_params(vocab_size=63)  # V = 63 on tensor = 2
  got = _specs_by_path(params, sharding.param_specs(params, MESH_242))
  assert got["lm_head/weight"] == got["embed/embedding"] == P(None, "fsdp")
  # One key/value head of width 6 (K·D = 6) on tensor = 4: replicated; the 4 query heads (N·D = 24) split.
  params = _abstract_params(num_heads=4, num_kv_heads=1, head_dim=6)
  got = _specs_by_path(params, sharding.param_specs(params, AbstractMesh((1, 4, 4), ("data", "fsdp", "tensor"))))
  assert got["layers/self_attn/k_proj/kernel"] == P(None, "fsdp", None)
  assert got["layers/self_attn/q_proj/kernel"] == P(None, "fsdp", "tensor")


def test_a_parameter_without_a_rule_is_an_error_naming_it():
  params = {"adapter": {"kernel": jax.ShapeDtypeStruct((4, 4), jnp.float32)}}
  with pytest.raises(ValueError, match="no partition rule for parameter adapter/kernel"):
    sharding.param_specs(params, MESH_242)
  params = {"lm_head": {"weight": jax.ShapeDtypeStruct((4, 4, 4), jnp.float32)}}
  with pytest.raises(ValueError, match=r"lm_head/weight has shape \(4, 4, 4\) but its rule gives 2 logical axes"):
    sharding.param_specs(params, MESH_242)


def test_optimizer_state_follows_the_parameters_and_capo_shadow_moments_follow_the_unembedding():
  params = _abstract_params()
  tx = optax.chain(optax.clip_by_global_norm(1.0), masked_transform(
      optax.adamw(1e-3), tau_fisher=1e-4, tau_hessian=1e-2, learning_rate=1e-3, top_k=8, moments="shadow"))
  state = jax.eval_shape(tx.init, params)
  specs = {sharding.path_names(path): s.spec for (path, _), s in zip(
      jax.tree_util.tree_flatten_with_path(state)[0], jax.tree.leaves(sharding.state_shardings(state, MESH_242)))}
  mu = {k: v for k, v in specs.items() if "/mu/" in k}
  assert len(mu) == len(EXPECTED_SPECS)
  for path, spec in mu.items():
    assert spec == EXPECTED_SPECS[path.split("/mu/")[1]], path
  assert specs["1/shadow/mu"] == specs["1/shadow/nu"] == P("tensor", "fsdp")
  counts = [k for k in specs if k.endswith("count")]
  assert counts and all(specs[k] == P() for k in counts)
  assert all(specs[k] == P() for k in specs if "/metrics/" in k)


def test_batch_rows_split_over_data_and_fsdp_and_bad_row_counts_are_named():
  mesh = AbstractMesh((2, 2, 2), ("data", "fsdp", "tensor"))
  assert sharding.batch_spec(2) == P(("data", "fsdp"), None)
  batch = {"tokens": jax.ShapeDtypeStruct((6, 3), jnp.int32)}
  with pytest.raises(ValueError, match="tokens has 6 rows, not a multiple of data × fsdp = 4"):
    sharding.batch_shardings(batch, mesh)


def test_one_process_holds_every_row():
  mesh = sharding.make_mesh(cfg_lib.MeshConfig())
  assert sharding.process_rows(mesh, 8) == slice(0, 8)


def test_initialize_distributed_needs_all_three_settings_or_none(monkeypatch):
  for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    monkeypatch.delenv(name, raising=False)
  assert not sharding.initialize_distributed()  # one process, nothing set: nothing to do
  assert jax.process_count() == 1
  monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
  with pytest.raises(ValueError, match="needs all of coordinator address, number of processes and process id"):
    sharding.initialize_distributed(coordinator_address="localhost:1234")
  monkeypatch.setenv("JAX_PROCESS_ID", "one")
  with pytest.raises(ValueError, match="JAX_PROCESS_ID='one' must be an integer"):
    sharding.initialize_distributed()


# ---------------------------------------------------------------------------------------------------------------
# 8 CPU devices, in a subprocess.


@pytest.fixture(scope="module")
def mesh_results(tmp_path_factory):
  out = tmp_path_factory.mktemp("sharding") / "results.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
             # 8 host devices; the LLVM flags only shorten compiles (both sides of every comparison share them).
             XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
                       "--xla_llvm_disable_expensive_passes=true")
  proc = subprocess.run([sys.executable, "-m", "tests.sharding_worker", str(out)], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=1200)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(out.read_text())


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory):
  """Two ``jax.distributed`` processes on localhost with 4 CPU devices each (CPU collectives over gloo)."""
  tmp = tmp_path_factory.mktemp("distributed")
  with socket.socket() as s:  # a free port for the coordinator
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
             XLA_FLAGS="--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0 "
                       "--xla_llvm_disable_expensive_passes=true")
  procs = [subprocess.Popen([sys.executable, "-m", "tests.sharding_worker", "--distributed", str(i), "2", str(port),
                             str(tmp / f"{i}.json")], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  logs = [proc.communicate(timeout=900)[0] for proc in procs]
  for proc, log in zip(procs, logs):
    assert proc.returncode == 0, log[-4000:]
  return [json.loads((tmp / f"{i}.json").read_text()) for i in range(2)]


def test_two_process_step_equals_one_device(distributed_results):
  first, second = distributed_results
  assert first["devices"] == second["devices"] == [8, 4]
  assert sorted([first["rows"], second["rows"]]) == [[0, 4], [4, 8]]  # each process fed only its own 4 rows
  assert first["loss"] == second["loss"]  # the metrics are reduced once, the same on every process
  assert first["loss_diff"] <= TOLERANCE and first["params_diff"] <= TOLERANCE and first["mask_diff"] == 0.0


@pytest.mark.parametrize("algorithm", ["grpo", "capo"])
@pytest.mark.parametrize("mesh", MESHES)
def test_learner_step_on_a_mesh_equals_one_device(mesh_results, algorithm, mesh):
  key = f"{algorithm}/{mesh}"
  assert mesh_results[f"{key}/loss"] <= TOLERANCE
  assert mesh_results[f"{key}/params"] <= TOLERANCE
  assert mesh_results[f"{key}/metrics"] <= TOLERANCE  # every scalar metric: grad/update norms, CAPO's statistics…
  assert mesh_results[f"{key}/params_keep_sharding"]
  if algorithm == "capo":
    assert mesh_results[f"{key}/mask"] == 0.0


def test_capo_step_with_micro_batches_on_a_mesh_equals_the_one_pass_step_on_one_device(mesh_results):
  assert mesh_results["capo/micro_batches/loss"] <= TOLERANCE
  assert mesh_results["capo/micro_batches/params"] <= TOLERANCE
  assert mesh_results["capo/micro_batches/mask"] == 0.0


def test_compared_losses_are_not_trivially_zero(mesh_results):
  # (the surrogate alone is −mean(A) = 0 at ρ ≡ 1; the KL term makes the loss depend on every log-probability)
  assert all(abs(x) > 1e-3 for x in mesh_results["grpo/reference_loss"] + mesh_results["capo/reference_loss"])


def test_capo_masks_compared_are_not_trivial_and_no_statistic_sits_on_a_threshold(mesh_results):
  first, second = mesh_results["capo/reference_rejected_fraction"]
  assert 0.1 < first < 0.9 and 0.1 < second < 0.9
  assert mesh_results["capo/threshold_margin"] > 0.01  # relative distance of the nearest statistic to its τ


def test_unembedding_is_split_over_vocabulary_and_fsdp(mesh_results):
  assert mesh_results["capo/(2, 2, 2)/lm_head_spec"] == "P('tensor', 'fsdp')"
  assert mesh_results["capo/(2, 2, 2)/lm_head_shard_shape"] == [32, 16]  # [V/2, H/2]
  assert mesh_results["capo/(2, 4, 1)/lm_head_shard_shape"] == [64, 8]
  assert mesh_results["capo/(8, 1, 1)/lm_head_shard_shape"] == [64, 32]  # pure data parallelism: replicated


def test_capo_top_k_on_a_vocabulary_split_mesh_gathers_candidates_not_rows(mesh_results):
  # The step's mask and update equal one device's on (2, 2, 2) (test above); its top-K gathers T·K candidates per
  # position, where a plain top-K of the vocabulary-split logits all-gathers whole rows.
  assert mesh_results["capo/(2, 2, 2)/whole_row_all_gathers"] == 0
  assert mesh_results["capo/(2, 2, 2)/whole_row_all_gathers_plain_top_k"] >= 1


@pytest.mark.parametrize("mesh", ["(2, 2, 2)", "(1, 1, 8)"])
def test_top_k_of_a_vocabulary_split_array_is_the_global_top_k(mesh_results, mesh):
  key = f"top_k/{mesh}"
  assert mesh_results[f"{key}/lax_top_k_exact"]  # XLA's partitioning (it all-gathers the rows)
  assert mesh_results[f"{key}/top_k_set_same_set"]  # CAPO's top-K set
  assert mesh_results[f"{key}/vocab_parallel_exact"]  # per-shard top-K + merge: values, ids and order


@pytest.mark.parametrize("mesh", ["(2, 2, 2)", "(1, 8, 1)"])
@pytest.mark.parametrize("weights", ["gathered", "sharded"])
def test_sampling_on_a_mesh_gives_the_unsharded_tokens(mesh_results, mesh, weights):
  name = f"sampler/{mesh}/{weights}"
  assert mesh_results[f"{name}/tokens_equal"]
  assert mesh_results[f"{name}/logprobs"] <= TOLERANCE
  assert mesh_results[f"{name}/tokens_spec"] == ("P('fsdp',)" if mesh == "(1, 8, 1)" else "P(('data', 'fsdp'),)")
  assert mesh_results["sampler/kv_cache_spec"] == "P(None, ('data', 'fsdp'), None, 'tensor', None)"


def test_decoding_with_gathered_weights_gathers_no_weight_per_step(mesh_results):
  # The learner's layout splits every weight over fsdp, so each decode step gathers them again: on (1, 8, 1) the
  # decode loop all-gathers at least the hidden × hidden attention kernels (32 × 32 here).
  sharded = mesh_results["sampler/(1, 8, 1)/sharded/decode_all_gathers"]
  assert len(sharded) >= 2 * MODEL_LAYERS and max(sharded) >= 32 * 32
  # Gathered once per call: the decode loop has no all-gather at all on (1, 8, 1), and on (2, 2, 2) only the
  # tensor-split activations' (at most the 4 rows per data × fsdp shard × 64 vocabulary logits).
  assert mesh_results["sampler/(1, 8, 1)/gathered/decode_all_gathers"] == []
  assert max(mesh_results["sampler/(2, 2, 2)/gathered/decode_all_gathers"], default=0) <= 4 * 64
  assert max(mesh_results["sampler/(2, 2, 2)/sharded/decode_all_gathers"]) > 4 * 64


def test_auto_decode_weights_gather_when_they_fit_a_quarter_of_the_device(mesh_results):
  # The test model's float32 weights: all of them on each device when gathered, 1/8 of the fsdp-split ones otherwise.
  gathered = mesh_results["sampler/gathered_bytes_per_device"]
  sharded = mesh_results["sampler/sharded_bytes_per_device"]
  assert gathered == 4 * MODEL_PARAMETERS
  assert sharded < gathered / 4
  assert mesh_results["sampler/auto_on_cpu"] == "gathered"  # the CPU reports no memory limit
  assert mesh_results["sampler/auto_fits"] == "gathered"
  assert mesh_results["sampler/auto_too_big"] == "sharded"


def test_an_hf_folder_loads_straight_onto_the_mesh(mesh_results):
  assert mesh_results["hf_load/values"] == 0.0
  assert mesh_results["hf_load/shardings"]  # every parameter by its rule, read block by block
  assert mesh_results["hf_load/on_mesh_keeps_placed"]
  assert mesh_results["hf_load/copy_values"] == 0.0 and mesh_results["hf_load/copy_new_buffers"]


def test_checkpoint_saved_on_one_mesh_restores_on_another_and_training_continues(mesh_results):
  assert mesh_results["checkpoint/restored_values"] == 0.0
  assert mesh_results["checkpoint/restored_shardings"]
  assert mesh_results["checkpoint/restored_lm_head_spec"] == "P('tensor', 'fsdp')"
  assert mesh_results["checkpoint/continue_vs_in_memory"] == 0.0  # same mesh, same values: bitwise
  assert mesh_results["checkpoint/continue_mask_vs_in_memory"] == 0.0
  assert mesh_results["checkpoint/continue_vs_source_mesh"] <= TOLERANCE
  assert mesh_results["checkpoint/continue_vs_one_device"] <= TOLERANCE
