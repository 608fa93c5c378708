"""The mesh checks of tests/test_sharding.py, run in a process of its own with 8 CPU devices.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.sharding_worker OUT.json
    XLA_FLAGS=--xla_force_host_platform_device_count=4 python -m tests.sharding_worker --distributed I 2 PORT OUT.json

(the flag must be set before jax is imported, hence a separate process: the pytest process keeps its one device).
The second form is process I of a two-process ``jax.distributed`` run on localhost (CPU collectives).
Each check computes the same thing unsharded (one device) and on meshes ``(data, fsdp, tensor)``, and records the
largest difference; tests/test_sharding.py asserts on the JSON written to OUT.json.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from capo_jax import components
from capo_jax import config as cfg_lib
from capo_jax import learner
from capo_jax import sharding
from capo_jax.checkpointing import Checkpointer
from capo_jax.models import CausalLM, ModelConfig, load_hf, save_hf
from capo_jax.ops import top_k as top_k_ops
from capo_jax.sampling import sample
from capo_jax.tasks import ArithTask

MESHES = ((8, 1, 1), (2, 4, 1), (2, 2, 2))
P_GROUPS, G, PROMPT, N = 4, 2, 4, 6  # 8 rows: a multiple of data × fsdp on every mesh
MODEL = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
# K with V < 4·K: CAPO's top-K is lax.top_k, the path every accelerator takes (ops.top_k's selection is CPU-only).
TOP_K = 20
# τ's between the clusters of this model's statistics at both compared steps (≈ 23% and 55% of the tokens rejected);
# ``capo/threshold_margin`` records how far the nearest statistic is from them.
TAU_FISHER, TAU_HESSIAN = 3e-3, 7.5e-2
# Adam's ε = 1e-6 rather than 1e-8: the key bias's gradient is rounding noise (softmax is invariant to it), and a
# first Adam step lr·g/(|g| + ε) turns noise of another summation order into a visibly different update when ε ~ |g|.
OPTIMIZER = cfg_lib.OptimizerConfig(learning_rate=3e-3, eps=1e-6)
# At ρ ≡ 1 the surrogate's value is −mean(A) = 0 for group-normalised advantages; the KL term makes the compared loss
# a function of every log-probability.
LOSS = cfg_lib.LossConfig(kl_coef=0.1)


def _mesh(shape):
  data, fsdp, tensor = shape
  return sharding.make_mesh(cfg_lib.MeshConfig(data=data, fsdp=fsdp, tensor=tensor))


def _max_diff(a, b) -> float:
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))) if np.size(x) else 0.0
             for x, y in zip(la, lb))


def _batch() -> learner.SequenceBatch:
  rng = np.random.default_rng(0)
  b = P_GROUPS * G
  tokens = rng.integers(1, MODEL.vocab_size, (b, PROMPT + N)).astype(np.int32)
  tokens[:, :PROMPT] = np.repeat(tokens[::G, :PROMPT], G, axis=0)  # G completions of each prompt, as rolled out
  attention = np.ones_like(tokens)
  attention[:G, :1] = 0  # one left-padded prompt
  lengths = rng.integers(2, N + 1, b)
  completion = (np.arange(N)[None] < lengths[:, None]).astype(np.float32)
  attention[:, PROMPT:] = completion
  rewards = rng.integers(0, 2, (P_GROUPS, G)).astype(np.float32)
  rewards[:, 0], rewards[:, 1] = 1.0, 0.0
  adv = ((rewards - rewards.mean(1, keepdims=True)) / (rewards.std(1, keepdims=True) + 1e-4)).reshape(-1)
  return learner.SequenceBatch(tokens, attention, completion, adv.astype(np.float32),
                               (-2.0 - rng.random((b, N))).astype(np.float32),
                               (-2.0 - rng.random((b, N))).astype(np.float32), np.ones((b,), np.float32))


def _train_config(curvature: cfg_lib.CurvatureConfig) -> cfg_lib.TrainConfig:
  return cfg_lib.TrainConfig(task=ArithTask(), curvature=curvature, optimizer=OPTIMIZER, loss=LOSS,
                             rollout=cfg_lib.RolloutConfig(prompts_per_step=P_GROUPS, group_size=G, max_new_tokens=N))


def _step_with_mask(graphdef, cfg: cfg_lib.TrainConfig):
  """The trainer's learner step (``components.make_learner_step``), its metrics extended by CAPO's mask and
  statistics computed from the same (params, opt_state, batch) — what the step multiplies into its loss."""
  optimizer, capo = components.build_optimizer(cfg)
  step = components.make_learner_step(cfg, graphdef, optimizer, capo)
  mask_fn = None if capo is None else components.capo_token_mask_fn(capo)

  def fn(params, opt_state, batch):
    extra = {}
    if mask_fn is not None:
      hidden, w, targets = learner.completion_hidden(graphdef, params, batch.tokens_bs, batch.attention_mask_bs, N)
      mask, kwargs, _ = mask_fn(hidden, w, targets, batch.advantages_b, learner.loss_completion_mask(batch),
                                opt_state)
      aux = kwargs["capo_aux"]
      extra = {"mask": mask, "m_fisher": aux.m_fisher, "m_hessian": aux.m_hessian}
    params, opt_state, metrics = step(params, opt_state, batch)
    return params, opt_state, dict(metrics, **extra)

  return optimizer, fn


def _all_gather_shapes(hlo_text: str) -> list[tuple[int, ...]]:
  """The output shapes of the all-gathers in a compiled program's HLO text."""
  shapes = re.findall(r"= [a-z0-9]+\[([0-9,]*)\][^ ]* all-gather(?:-start)?\(", hlo_text)
  return [tuple(int(d) for d in shape.split(",") if d) for shape in shapes]


def _whole_row_all_gathers(step, args) -> int:
  """How many all-gathers in the compiled ``step`` produce arrays whose last axis is the whole vocabulary."""
  shapes = _all_gather_shapes(step.lower(*args).compile().as_text())
  return sum(1 for shape in shapes if shape and shape[-1] == MODEL.vocab_size)


def learner_checks(out: dict, keep: dict) -> None:
  """GRPO and CAPO: two learner steps from the same initial state (CAPO's first with the SGD fallback direction,
  its second with the moved Adam moments) on every mesh vs one device."""
  graphdef, params0 = nnx.split(CausalLM(MODEL, rngs=nnx.Rngs(0)))
  batch = _batch()
  valid = np.asarray(batch.completion_mask_bn) > 0
  algorithms = {
      "grpo": cfg_lib.CurvatureConfig(),
      "capo": cfg_lib.CurvatureConfig.from_preset("capo", top_k=TOP_K, tau_fisher=TAU_FISHER,
                                                  tau_hessian=TAU_HESSIAN),
  }
  for name, curvature in algorithms.items():
    optimizer, fn = _step_with_mask(graphdef, _train_config(curvature))
    step = jax.jit(fn, donate_argnums=(0, 1))
    keep[f"{name}/one_device"] = step
    p, o = jax.tree.map(jnp.copy, params0), optimizer.init(params0)
    ref = []
    for i in range(2):
      if i == 1:
        keep[f"{name}/one_device_state1"] = jax.device_get((p, o))
      p, o, metrics = step(p, o, batch)
      ref.append((jax.device_get(p), jax.device_get(metrics)))
    out[f"{name}/reference_loss"] = [float(m["loss"]) for _, m in ref]
    if name == "capo":
      out["capo/reference_rejected_fraction"] = [float(1 - m["mask"][valid].sum() / valid.sum()) for _, m in ref]
      out["capo/threshold_margin"] = min(
          min(float(np.min(np.abs(m["m_fisher"][valid] - TAU_FISHER))) / TAU_FISHER,
              float(np.min(np.abs(np.abs(m["m_hessian"][valid]) - TAU_HESSIAN))) / TAU_HESSIAN) for _, m in ref)
    for shape in MESHES:
      mesh = _mesh(shape)
      key = f"{name}/{shape}"
      p = sharding.shard_params(params0, mesh)
      o = sharding.init_optimizer_state(optimizer, p, mesh)
      b = sharding.shard_batch(batch, mesh)
      step = sharding.jit_learner_step(fn, mesh, p, o, b)
      keep[key] = step
      if name == "capo" and shape == (2, 2, 2):
        # CAPO's top-K of the vocabulary-split logits: all-gathers of whole [.., V] rows, with the per-shard top-K
        # (the default on a mesh whose tensor axis splits V) and with a plain top-K on the same mesh.
        out[f"{key}/whole_row_all_gathers"] = _whole_row_all_gathers(step, (p, o, b))
        real = sharding.vocab_split_mesh
        sharding.vocab_split_mesh = lambda *a, **k: None
        try:
          plain = sharding.jit_learner_step(lambda *a: fn(*a), mesh, p, o, b)  # a new function: traced anew
          out[f"{key}/whole_row_all_gathers_plain_top_k"] = _whole_row_all_gathers(plain, (p, o, b))
        finally:
          sharding.vocab_split_mesh = real
      diffs = {"loss": 0.0, "params": 0.0, "metrics": 0.0, "mask": 0.0}
      for i, (want_params, want_metrics) in enumerate(ref):
        if i == 1:
          keep[f"{key}/state1"] = jax.device_get((p, o))
        p, o, metrics = step(p, o, b)
        diffs["loss"] = max(diffs["loss"], abs(float(metrics["loss"]) - float(want_metrics["loss"])))
        diffs["params"] = max(diffs["params"], _max_diff(p, want_params))
        scalars = [k for k in want_metrics if np.ndim(want_metrics[k]) == 0 and np.isfinite(want_metrics[k])]
        diffs["metrics"] = max(diffs["metrics"], max(abs(float(metrics[k]) - float(want_metrics[k])) for k in scalars))
        if name == "capo":
          diffs["mask"] = max(diffs["mask"], _max_diff(metrics["mask"], want_metrics["mask"]))
      out.update({f"{key}/{k}": v for k, v in diffs.items() if name == "capo" or k != "mask"})
      # The state keeps the shardings it came in with (donated, no resharding between steps).
      want = sharding.param_shardings(p, mesh)
      out[f"{key}/params_keep_sharding"] = all(
          x.sharding.is_equivalent_to(s, x.ndim) for x, s in zip(jax.tree.leaves(p), jax.tree.leaves(want)))
      w = p["lm_head"]["weight"][...]
      out[f"{key}/lm_head_spec"] = str(w.sharding.spec)
      out[f"{key}/lm_head_shard_shape"] = list(w.addressable_shards[0].data.shape)
    if name == "capo":
      # Gradient accumulation on a mesh: 2 slices of 4 rows (strided), each split over the batch axes.
      sliced = dataclasses.replace(_train_config(curvature), optimizer=dataclasses.replace(OPTIMIZER, micro_batches=2))
      _, sliced_fn = _step_with_mask(graphdef, sliced)
      mesh = _mesh((2, 2, 2))
      p, b = sharding.shard_params(params0, mesh), sharding.shard_batch(batch, mesh)
      o = sharding.init_optimizer_state(optimizer, p, mesh)
      step = sharding.jit_learner_step(sliced_fn, mesh, p, o, b)
      keep["capo/micro_batches"] = step
      diffs = {"loss": 0.0, "params": 0.0, "mask": 0.0}
      for want_params, want_metrics in ref:
        p, o, metrics = step(p, o, b)
        diffs["loss"] = max(diffs["loss"], abs(float(metrics["loss"]) - float(want_metrics["loss"])))
        diffs["params"] = max(diffs["params"], _max_diff(p, want_params))
        diffs["mask"] = max(diffs["mask"], _max_diff(metrics["mask"], want_metrics["mask"]))
      out.update({f"capo/micro_batches/{k}": v for k, v in diffs.items()})


def top_k_checks(out: dict, keep: dict) -> None:
  """CAPO's top-K on a vocabulary split over ``tensor``: XLA's own partitioning of ``lax.top_k`` / ``top_k_set``, and
  the per-shard top-K + merge of ``vocab_parallel_top_k``, against ``lax.top_k`` of the whole rows."""
  del keep
  rng = np.random.default_rng(1)
  # Integer-valued logits: many ties, so the order among equal values (lower id first) is tested too.
  vocab = 256
  logits = jnp.asarray(rng.integers(-20, 20, (8, 5, vocab)).astype(np.float32))
  want_v, want_i = jax.lax.top_k(logits, TOP_K)
  for shape in ((2, 2, 2), (1, 1, 8)):
    mesh = _mesh(shape)
    split = jax.device_put(logits, NamedSharding(mesh, P(sharding.BATCH_AXES, None, "tensor")))
    got_v, got_i = jax.jit(jax.lax.top_k, static_argnums=1)(split, TOP_K)
    out[f"top_k/{shape}/lax_top_k_exact"] = bool(np.array_equal(got_v, want_v) and np.array_equal(got_i, want_i))
    hlo = jax.jit(jax.lax.top_k, static_argnums=1).lower(split, TOP_K).compile().as_text()
    out[f"top_k/{shape}/lax_top_k_all_gathers_logits"] = "all-gather" in hlo
    set_v, set_i = jax.jit(top_k_ops.top_k_set, static_argnums=1)(split, TOP_K)
    same_set = all(set(zip(np.asarray(a).tolist(), np.asarray(b).tolist())) ==
                   set(zip(np.asarray(c).tolist(), np.asarray(d).tolist()))
                   for a, b, c, d in zip(set_v.reshape(-1, TOP_K), set_i.reshape(-1, TOP_K),
                                         want_v.reshape(-1, TOP_K), want_i.reshape(-1, TOP_K)))
    out[f"top_k/{shape}/top_k_set_same_set"] = same_set
    fn = jax.jit(lambda z: sharding.vocab_parallel_top_k(z, TOP_K, mesh))
    par_v, par_i = fn(split)
    out[f"top_k/{shape}/vocab_parallel_exact"] = bool(np.array_equal(par_v, want_v) and np.array_equal(par_i, want_i))


def sampler_checks(out: dict, keep: dict) -> None:
  """Sampling on a mesh gives the unsharded sampler's tokens for the same key."""
  del keep
  graphdef, state = nnx.split(CausalLM(MODEL, rngs=nnx.Rngs(3)))
  rng = np.random.default_rng(2)
  prompts = rng.integers(1, MODEL.vocab_size, (4, 6)).astype(np.int32)
  mask = np.ones_like(prompts)
  mask[0, :2] = 0
  key = jax.random.key(7)
  kwargs = dict(max_new_tokens=8, num_samples=2, temperature=1.0, stop_ids=(), pad_id=0)
  want = sample(graphdef, state, prompts, mask, key, **kwargs)
  for shape in ((2, 2, 2), (1, 8, 1)):
    mesh = _mesh(shape)
    placed = sharding.shard_params(state, mesh)  # the learner's layout, as the trainer holds the policy
    for weights in ("gathered", "sharded"):
      got = sample(graphdef, placed, prompts, mask, key, mesh=mesh, weights=weights, **kwargs)
      name = f"sampler/{shape}/{weights}"
      out[f"{name}/tokens_equal"] = bool(np.array_equal(got.completion_tokens, want.completion_tokens))
      out[f"{name}/logprobs"] = _max_diff(got.logprobs, want.logprobs)
      out[f"{name}/tokens_spec"] = str(got.completion_tokens.sharding.spec)
      out[f"{name}/decode_all_gathers"] = _decode_all_gathers(graphdef, placed, prompts, mask, key, mesh, weights)
  # "auto": gathered when the gathered weights fit a quarter of the device memory, else the learner's layout.
  mesh = _mesh((1, 8, 1))
  need = sharding.bytes_per_device(state, sharding.decode_param_shardings(state, mesh))
  out["sampler/gathered_bytes_per_device"] = need
  out["sampler/sharded_bytes_per_device"] = sharding.bytes_per_device(state, sharding.param_shardings(state, mesh))
  out["sampler/auto_on_cpu"] = sharding.decode_weights_layout(state, mesh)
  real_limit = sharding.device_memory_limit
  try:
    for name, limit in (("fits", 4 * need), ("too_big", 4 * need - 1)):
      sharding.device_memory_limit = lambda _, limit=limit: limit
      out[f"sampler/auto_{name}"] = sharding.decode_weights_layout(state, mesh)
  finally:
    sharding.device_memory_limit = real_limit
  # The cache of a (2, 2, 2) mesh: rows over data × fsdp, the two key/value heads over tensor.
  mesh = _mesh((2, 2, 2))
  cache = CausalLM(MODEL, rngs=nnx.Rngs(3)).init_cache(8, 16)
  out["sampler/kv_cache_spec"] = str(sharding.kv_cache_shardings(cache, mesh).k.spec)


def _decode_all_gathers(graphdef, state, prompts, mask, key, mesh, weights) -> list[int]:
  """The element counts of the all-gathers in the compiled decode loop of ``sample`` on ``mesh`` (per device)."""
  # pylint: disable=protected-access
  from capo_jax.sampling import sampler as sampler_lib  # pylint: disable=import-outside-toplevel
  placed = jax.device_put(state, sampler_lib.decoding_shardings(state, mesh, weights))
  params = sampler_lib.SamplingParams.create(1.0, 0, 1.0)
  stop_ids = sampler_lib._stop_ids_array((), prompts.shape[0], 2)
  rows = NamedSharding(mesh, sharding.logical_to_spec(("batch", None), prompts.shape, mesh))
  prompts, mask = jax.device_put((jnp.asarray(prompts), jnp.asarray(mask)), rows)
  pad = jnp.int32(0)
  with jax.set_mesh(mesh):
    state0 = sampler_lib._prefill(graphdef, placed, prompts, mask, key, params, stop_ids, pad, num_samples=2,
                                  max_new_tokens=8, cache_dtype=None, mesh=mesh)
    text = sampler_lib._decode.lower(graphdef, placed, state0, params, stop_ids, pad, mesh=mesh).compile().as_text()
  return [int(np.prod(shape)) for shape in _all_gather_shapes(text)]


def hf_load_checks(out: dict, keep: dict) -> None:
  """An HF folder read straight onto the (2, 2, 2) mesh (each device its own block), the trainer's reference and
  policy copies of it."""
  del keep
  graphdef, params = nnx.split(CausalLM(MODEL, rngs=nnx.Rngs(3)))
  mesh = _mesh((2, 2, 2))
  with tempfile.TemporaryDirectory() as folder:
    save_hf(nnx.merge(graphdef, params), folder, overwrite=True)
    _, loaded = nnx.split(load_hf(folder, shardings=sharding.load_shardings(MODEL, mesh)))
  want = sharding.param_shardings(params, mesh)
  out["hf_load/values"] = _max_diff(loaded, params)
  out["hf_load/shardings"] = all(jax.tree.leaves(jax.tree.map(
      lambda x, s: x.sharding.is_equivalent_to(s, x.ndim), loaded, want)))
  out["hf_load/on_mesh_keeps_placed"] = sharding.on_mesh(loaded, mesh) is loaded
  copy = sharding.copy_params(loaded, mesh)
  pointers = lambda tree: {b.data.unsafe_buffer_pointer() for x in jax.tree.leaves(tree) for b in x.addressable_shards}
  out["hf_load/copy_values"] = _max_diff(copy, loaded)
  out["hf_load/copy_new_buffers"] = not pointers(copy) & pointers(loaded)


def checkpoint_checks(out: dict, keep: dict) -> None:
  """The CAPO state after one step on mesh (2, 4, 1), saved with ``capo_jax.checkpointing.Checkpointer`` and restored
  onto (2, 2, 2) with that mesh's shardings; the next step there equals the same step from the in-memory state on
  (2, 2, 2) (bitwise), on (2, 4, 1) and on one device."""
  batch = _batch()
  params, opt_state = keep["capo/(2, 4, 1)/state1"]
  src, dst = _mesh((2, 4, 1)), _mesh((2, 2, 2))
  state = {"params": sharding.shard_params(params, src),
           "opt_state": jax.device_put(opt_state, sharding.state_shardings(opt_state, src))}
  target = {"params": sharding.param_shardings(params, dst), "opt_state": sharding.state_shardings(opt_state, dst)}
  with tempfile.TemporaryDirectory() as tmp:
    ckpt = Checkpointer(f"{tmp}/checkpoints", "fingerprint")
    ckpt.save(1, state, {"data_position": 0})
    restored, _ = ckpt.restore(sharding.abstract_state(state, target))
    ckpt.close()
  out["checkpoint/restored_values"] = _max_diff(restored, {"params": params, "opt_state": opt_state})
  out["checkpoint/restored_shardings"] = all(
      x.sharding.is_equivalent_to(s, x.ndim) for x, s in zip(jax.tree.leaves(restored), jax.tree.leaves(target)))
  out["checkpoint/restored_lm_head_spec"] = str(restored["params"]["lm_head"]["weight"][...].sharding.spec)

  p_restored, _, m_restored = keep["capo/(2, 2, 2)"](restored["params"], restored["opt_state"],
                                                     sharding.shard_batch(batch, dst))
  p_memory, _, m_memory = keep["capo/(2, 2, 2)"](jax.device_put(params, target["params"]),
                                                 jax.device_put(opt_state, target["opt_state"]),
                                                 sharding.shard_batch(batch, dst))
  p_src, _, _ = keep["capo/(2, 4, 1)"](sharding.shard_params(params, src),
                                       jax.device_put(opt_state, sharding.state_shardings(opt_state, src)),
                                       sharding.shard_batch(batch, src))
  p_one, _, _ = keep["capo/one_device"](*jax.tree.map(jnp.asarray, (params, opt_state)), batch)
  out["checkpoint/continue_vs_in_memory"] = _max_diff(p_restored, p_memory)
  out["checkpoint/continue_mask_vs_in_memory"] = _max_diff(m_restored["mask"], m_memory["mask"])
  out["checkpoint/continue_vs_source_mesh"] = _max_diff(p_restored, p_src)
  out["checkpoint/continue_vs_one_device"] = _max_diff(p_restored, p_one)


def distributed_check(process_id: int, num_processes: int, port: int, path: str) -> None:
  """One of ``num_processes`` processes (4 CPU devices each) of a ``jax.distributed`` run on localhost: one CAPO step
  on the global (2, 2, 2) mesh, each process feeding only its own rows (``process_rows``); process 0 also runs the
  step on one of its devices, on the whole batch, as the reference."""
  sharding.initialize_distributed(f"localhost:{port}", num_processes, process_id)
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  graphdef, params0 = nnx.split(CausalLM(MODEL, rngs=nnx.Rngs(0)))
  batch = _batch()
  optimizer, fn = _step_with_mask(graphdef, _train_config(cfg_lib.CurvatureConfig.from_preset(
      "capo", top_k=TOP_K, tau_fisher=TAU_FISHER, tau_hessian=TAU_HESSIAN)))
  mesh = _mesh((2, 2, 2))
  rows = sharding.process_rows(mesh, P_GROUPS * G)
  p = sharding.shard_params(params0, mesh)
  o = sharding.init_optimizer_state(optimizer, p, mesh)
  b = sharding.shard_batch(jax.tree.map(lambda x: x[rows], batch), mesh)
  p, o, metrics = sharding.jit_learner_step(fn, mesh, p, o, b)(p, o, b)
  out = {"devices": [jax.device_count(), jax.local_device_count()], "rows": [rows.start, rows.stop],
         "loss": float(metrics["loss"])}
  params = multihost_utils.process_allgather(p, tiled=True)
  if process_id == 0:
    want_p, _, want = jax.jit(fn)(params0, optimizer.init(params0), batch)
    out.update(loss_diff=abs(out["loss"] - float(want["loss"])), params_diff=_max_diff(params, want_p),
               mask_diff=_max_diff(metrics["mask"], want["mask"]))
  with open(path, "w") as f:
    json.dump(out, f)


def main(argv) -> None:
  if argv[0] == "--distributed":  # --distributed PROCESS_ID NUM_PROCESSES PORT OUT.json
    distributed_check(int(argv[1]), int(argv[2]), int(argv[3]), argv[4])
    return
  assert jax.device_count() == 8, f"expected 8 CPU devices, got {jax.device_count()}: set XLA_FLAGS first."
  out: dict = {}
  keep: dict = {}  # compiled steps and states shared by the checks (each compile is seconds)
  for check in (learner_checks, top_k_checks, sampler_checks, hf_load_checks, checkpoint_checks):
    start = time.time()
    check(out, keep)
    out[f"seconds/{check.__name__}"] = round(time.time() - start, 1)
  with open(argv[0], "w") as f:
    json.dump(out, f, indent=1)


if __name__ == "__main__":
  main(sys.argv[1:])
