"""Per-device memory of the CAPO learner step and of the rollout sampler on a device mesh: the analytic model of
docs/SCALING.md beside XLA's own memory analysis of the compiled programs, from abstract shapes (no weights are
allocated).

    python -m benchmarks.memory                          # 0.5B … 32B, 2 and 4 layers, mesh (1,4,2) of 8 CPU devices
    python -m benchmarks.memory --sizes 7b --mesh 1,8,1  # one shape, one mesh
    python -m benchmarks.memory --what both --sizes 0.5b,1.5b,7b --mesh 1,1,1/1,8,1/2,2,2/1,4,2   # several meshes
    python -m benchmarks.memory --table                  # the model alone: docs/SCALING.md's table

XLA part: the trainer's CAPO step (``components.build_optimizer`` + ``components.make_learner_step``, preset ``capo``,
remat ``full``) is jitted by ``capo_jax.sharding.jit_learner_step`` and lowered from ``jax.ShapeDtypeStruct``s carrying
their shardings on a fake 8-device CPU mesh (``--xla_force_host_platform_device_count=8``, set here before jax is
imported); ``compiled.memory_analysis()`` gives the bytes of one device. XLA:CPU computes bf16 matmuls in float32,
so the check runs in float32 throughout and the model is evaluated at 4 bytes per element too. CAPO's top-K takes the
path of GPUs and TPUs (``jax.lax.top_k``): the XLA:CPU selection path of ``capo_jax.ops.top_k`` is not what an
accelerator runs. Compiling a full-depth model would take no longer (the layers are one ``nnx.scan``), but two
shallow depths L₁ < L₂ separate what grows with depth (the per-layer slope) from what does not; the printed
full-depth figure is mem(L₁) + (L − L₁)·slope.

Model part (``memory_model``): parameters, Adam moments and gradients split by the rules of ``capo_jax.sharding``
(exact per-leaf shard sizes) and the remat-``full`` residuals L·r·S·H, plus the larger of two phases that are not
alive together: CAPO's mask (the unembedding gathered, the Adam token model, a logits chunk) and the backward pass
(one layer's gathered weights and their gradient, one block's recompute working set with the attention scores —
XLA's attention, no flash kernel —, the gathered unembedding and the gradients of it and of the embedding, a logits
chunk); and the sampler's KV cache.

Sampler part (``--what sampler``): the rollout sampler's two jitted functions (``capo_jax.sampling.sampler``:
``_prefill``, which runs the prompts into a fresh KV cache of ``prompt + completion`` slots, repeats it G times and
draws the first token, and ``_decode``, the ``lax.while_loop`` whose carry, the cache included, is donated, so its
buffers are those of one decode step plus the carried cache) lowered at full depth with the same float32 abstract
parameters on the same mesh (the cache by ``kv_cache_shardings``; the parameters in the decoding layout the sampler
places them in, ``--decode_weights``: "gathered", ``capo_jax.sharding.decode_param_shardings``, split over ``tensor``
only, its default where it fits; "sharded", the learner's layout), and set beside the parameters (in that layout)
plus the KV cache of the model. The sampler's peak is the larger of the two: the parameters and the
cache are alive in both.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import argparse  # pylint: disable=wrong-import-position
import dataclasses  # pylint: disable=wrong-import-position
import functools  # pylint: disable=wrong-import-position
import math  # pylint: disable=wrong-import-position
import time  # pylint: disable=wrong-import-position

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
from flax import nnx  # pylint: disable=wrong-import-position
from jax.sharding import AbstractMesh  # pylint: disable=wrong-import-position

from capo_jax import components, learner, sharding  # pylint: disable=wrong-import-position
from capo_jax import config as cfg_lib  # pylint: disable=wrong-import-position
from capo_jax.models import CausalLM, ModelConfig  # pylint: disable=wrong-import-position
from capo_jax.ops import chunking  # pylint: disable=wrong-import-position
from capo_jax.ops import top_k as top_k_ops  # pylint: disable=wrong-import-position
from capo_jax.sampling import sampler as sampler_lib  # pylint: disable=wrong-import-position
from capo_jax.tasks import ArithTask  # pylint: disable=wrong-import-position

GiB = 2**30
# Qwen2.5 shapes (HF config.json of each checkpoint).
SHAPES = {
    "0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
                 num_kv_heads=2, head_dim=64, tie_word_embeddings=True),
    "1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28, num_heads=12,
                 num_kv_heads=2, head_dim=128, tie_word_embeddings=True),
    "7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28,
               num_kv_heads=4, head_dim=128, tie_word_embeddings=False),
    "32b": dict(vocab_size=152064, hidden_size=5120, intermediate_size=27648, num_layers=64, num_heads=40,
                num_kv_heads=8, head_dim=128, tie_word_embeddings=False),
}
CAPO_TOP_K = 50  # the released preset's K
CAPO_TOKEN_CHUNK = 256  # masked_transform's chunk_size (tokens per chunk of the Adam token model)


@dataclasses.dataclass(frozen=True)
class Workload:
  """One learner micro-batch: ``rows`` sequences of ``prompt + completion`` tokens over the whole mesh."""
  rows: int
  prompt: int
  completion: int

  @property
  def seq(self) -> int:
    return self.prompt + self.completion


def model_config(size: str, num_layers: int | None = None, dtype: str = "float32") -> ModelConfig:
  shape = dict(SHAPES[size])
  if num_layers is not None:
    shape["num_layers"] = num_layers
  return ModelConfig(**shape, dtype=dtype, param_dtype=dtype, remat="full")


@functools.lru_cache(maxsize=None)
def _abstract_params(cfg: ModelConfig):
  return nnx.split(nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0))))


def _local_bytes(tree, mesh: AbstractMesh, bytes_per_element: int | None = None) -> int:
  """Bytes of one device's shards of ``tree`` (arrays or structs) split by ``state_shardings``' rules."""
  total = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    axes = sharding.logical_axes(sharding.path_names(path))
    shape = tuple(leaf.shape)
    local = math.prod(shape)
    if axes is not None and len(axes) == len(shape):
      spec = sharding.logical_to_spec(axes, shape, mesh)
      for part in spec:
        if part is not None:
          names = (part,) if isinstance(part, str) else part
          local //= math.prod(mesh.shape[n] for n in names)
    total += local * (bytes_per_element or jnp.dtype(leaf.dtype).itemsize)
  return total


def memory_model(size: str, mesh_sizes: tuple[int, int, int], work: Workload, *, bytes_param: int = 2,
                 bytes_compute: int = 2, num_layers: int | None = None, flash_attention: bool = False,
                 sampler_rows: int | None = None) -> dict[str, float]:
  """Per-device bytes of the CAPO learner step (and of the sampler's KV cache), by component (docs/SCALING.md).

  peak = state + saved residuals + max(CAPO phase, backward phase): CAPO's mask is computed from the forward's
  outputs and its buffers are dead before the backward pass starts.
  """
  cfg = model_config(size, num_layers)
  d, f, t = mesh_sizes
  mesh = AbstractMesh(mesh_sizes, cfg_lib.MESH_AXES)
  _, params = _abstract_params(cfg)
  params_local = _local_bytes(params, mesh, bytes_param)
  layer_params = sum(math.prod(x.shape[1:]) for path, x in jax.tree_util.tree_flatten_with_path(params)[0]
                     if sharding.path_names(path).startswith("layers/"))
  v, h, ff, n, k, hd, L = (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads,
                           cfg.resolved_head_dim, cfg.num_layers)
  rows = work.rows / (d * f)  # rows per device
  s = work.seq
  heads_local = n / t if n % t == 0 else n
  chunk = chunking.auto_chunk(work.rows, work.completion, v, None)
  unembedding = v * h / t  # elements of one device's [V/t, H] block (gathered over fsdp)
  logits_chunk = 3 * rows * chunk * v / t * 4  # the loss' [r, chunk, V/t] float32 logits, softmax, cotangent
  out = {
      "params": params_local,
      "adam_moments": 2 * params_local,
      "gradients": params_local,
      # remat "full": each scanned block keeps its input for the backward pass.
      "saved_residuals": L * rows * s * h * bytes_compute,
      # CAPO phase: W gathered over fsdp for the top-K logits, the Adam token model (~6 buffers of chunk·K·H
      # float32; the μ, ν rows are looked up where they live, no table is gathered) and a logits chunk.
      "capo_phase": unembedding * bytes_compute + 6 * CAPO_TOKEN_CHUNK * CAPO_TOP_K * h * 4 + logits_chunk,
      # Backward phase: one block's weights gathered over fsdp and their gradient before the reduction; its
      # activations (q/k/v/o, norms, MLP 3·F; ~2 copies) and the attention scores, probabilities and their cotangent
      # [r, N/t, S, S] float32 (XLA's attention; a flash kernel keeps none of them); W gathered and the full-size
      # [V/t, H] gradients through the logits and through the embedding lookup (two buffers, also when tied: they
      # are summed after) before their reduction over fsdp; a logits chunk.
      "backward_phase": layer_params / t * (bytes_compute + bytes_param)
      + 2 * rows * s * (4 * h + 3 * ff / t) * bytes_compute
      + (0 if flash_attention else 3 * rows * heads_local * s * s * 4)
      + unembedding * (bytes_compute + 2 * bytes_param)
      + logits_chunk,
  }
  out["learner_total"] = (out["params"] + out["adam_moments"] + out["gradients"] + out["saved_residuals"]
                          + max(out["capo_phase"], out["backward_phase"]))
  if sampler_rows is not None:
    kv_local = k / t if k % t == 0 else k
    out["kv_cache"] = 2 * L * sampler_rows / (d * f) * s * kv_local * hd * bytes_compute
  return out


def _mesh(mesh_sizes: tuple[int, int, int]):
  return sharding.make_mesh(cfg_lib.MeshConfig(*mesh_sizes), jax.devices()[:math.prod(mesh_sizes)])


def _totals(analysis) -> dict[str, float]:
  return {"arguments": analysis.argument_size_in_bytes, "temp": analysis.temp_size_in_bytes,
          "outputs_not_aliased": analysis.output_size_in_bytes - analysis.alias_size_in_bytes}


def xla_memory(size: str, num_layers: int, mesh_sizes: tuple[int, int, int], work: Workload) -> dict[str, float]:
  """XLA's memory analysis of the compiled CAPO step of ``size`` with ``num_layers`` layers, float32, per device."""
  cfg = model_config(size, num_layers, "float32")
  graphdef, params = _abstract_params(cfg)
  train = cfg_lib.TrainConfig(
      task=ArithTask(), curvature=cfg_lib.CurvatureConfig.from_preset("capo"),
      rollout=cfg_lib.RolloutConfig(prompts_per_step=1, group_size=work.rows, max_new_tokens=work.completion),
      optimizer=cfg_lib.OptimizerConfig(shared_prompts=False))  # every row whole: the model's worst case
  optimizer, capo = components.build_optimizer(train)
  step = components.make_learner_step(train, graphdef, optimizer, capo)
  opt_state = jax.eval_shape(optimizer.init, params)
  sds = jax.ShapeDtypeStruct
  b, s, n = work.rows, work.seq, work.completion
  batch = learner.SequenceBatch(sds((b, s), jnp.int32), sds((b, s), jnp.int32), sds((b, n), jnp.float32),
                                sds((b,), jnp.float32), sds((b, n), jnp.float32), sds((b, n), jnp.float32),
                                sds((b,), jnp.float32))
  mesh = _mesh(mesh_sizes)
  jitted = sharding.jit_learner_step(step, mesh, params, opt_state, batch)
  args = (sharding.abstract_state(params, sharding.param_shardings(params, mesh)),
          sharding.abstract_state(opt_state, sharding.state_shardings(opt_state, mesh)),
          sharding.abstract_state(batch, sharding.batch_shardings(batch, mesh)))
  start = time.perf_counter()
  cpu_path = top_k_ops._use_cpu_path  # pylint: disable=protected-access
  top_k_ops._use_cpu_path = lambda *a, **k: False  # the accelerator path (module docstring)
  try:
    analysis = jitted.lower(*args).compile().memory_analysis()
  finally:
    top_k_ops._use_cpu_path = cpu_path
  return dict(_totals(analysis), compile_seconds=time.perf_counter() - start)


def decode_shardings(params, mesh, decode_weights: str):
  """The sampler's parameter shardings for ``decode_weights`` ("gathered" or "sharded")."""
  if decode_weights == "gathered":
    return sharding.decode_param_shardings(params, mesh)
  return sharding.param_shardings(params, mesh)


def xla_sampler_memory(size: str, mesh_sizes: tuple[int, int, int], work: Workload,
                       num_samples: int, decode_weights: str = "gathered") -> dict[str, dict[str, float]]:
  """XLA's memory analysis of the sampler's compiled prefill and decode loop (full depth, float32), per device.

  ``work.rows`` sampled rows = ``work.rows / num_samples`` prompts of ``work.prompt`` tokens, each sampled
  ``num_samples`` times, ``work.completion`` new tokens; no stop ids (they are traced: the buffers do not depend on
  them) and no top-k / top-p (also traced: the sort's buffers are in the program either way).
  """
  if work.rows % num_samples:
    raise ValueError(f"sampler rows {work.rows} must be a multiple of the samples per prompt {num_samples}")
  cfg = model_config(size, None, "float32")
  graphdef, params = _abstract_params(cfg)
  mesh = _mesh(mesh_sizes)
  sds = jax.ShapeDtypeStruct
  rep = sharding.replicated(mesh)
  prompts = work.rows // num_samples
  rows = jax.sharding.NamedSharding(mesh, sharding.logical_to_spec(("batch", None), (prompts, work.prompt), mesh))
  state = sharding.abstract_state(params, decode_shardings(params, mesh, decode_weights))
  tokens = sds((prompts, work.prompt), jnp.int32, sharding=rows)
  key = sds((), jax.eval_shape(jax.random.key, 0).dtype, sharding=rep)
  sampling = sampler_lib.SamplingParams(sds((), jnp.float32, sharding=rep), sds((), jnp.int32, sharding=rep),
                                        sds((), jnp.float32, sharding=rep))
  stop_ids = sds((work.rows, 8), jnp.int32, sharding=rep)  # the sampler's stop-id bucket of 8, replicated as there
  pad = sds((), jnp.int32, sharding=rep)
  out = {}
  with jax.set_mesh(mesh):
    start = time.perf_counter()
    lowered = sampler_lib._prefill.lower(  # pylint: disable=protected-access
        graphdef, state, tokens, tokens, key, sampling, stop_ids, pad, num_samples=num_samples,
        max_new_tokens=work.completion, cache_dtype=None, mesh=mesh)
    compiled = lowered.compile()
    out["prefill"] = dict(_totals(compiled.memory_analysis()), compile_seconds=time.perf_counter() - start)
    decode_state = jax.tree.map(lambda info, sh: sds(info.shape, info.dtype, sharding=sh), lowered.out_info,
                                compiled.output_shardings)
    start = time.perf_counter()
    compiled = sampler_lib._decode.lower(  # pylint: disable=protected-access
        graphdef, state, decode_state, sampling, stop_ids, pad, mesh=mesh).compile()
    out["decode"] = dict(_totals(compiled.memory_analysis()), compile_seconds=time.perf_counter() - start)
  return out


def _gib(x: float) -> str:
  return f"{x / GiB:7.2f}"


def compare(sizes, mesh_sizes, layers, work: Workload) -> None:
  """XLA at two depths, extrapolated to full depth, beside the model at 4 bytes per element."""
  l1, l2 = layers
  print(f"mesh (data, fsdp, tensor) = {mesh_sizes}, {work.rows} rows × ({work.prompt} + {work.completion}) tokens, "
        f"float32, remat full, CAPO step; GiB per device")
  print(f"{'size':>5} {'L':>3} | {'XLA args':>8} {'XLA temp':>8} {'XLA tot':>8} | {'model':>8} {'ratio':>6} | "
        "compile s")
  for size in sizes:
    full = SHAPES[size]["num_layers"]
    at = {l: xla_memory(size, l, mesh_sizes, work) for l in (l1, l2)}
    total = {l: at[l]["arguments"] + at[l]["temp"] + at[l]["outputs_not_aliased"] for l in at}
    slope = (total[l2] - total[l1]) / (l2 - l1)
    rows = [(l, at[l]["arguments"], at[l]["temp"], total[l]) for l in (l1, l2)]
    arg_slope = (at[l2]["arguments"] - at[l1]["arguments"]) / (l2 - l1)
    temp_slope = (at[l2]["temp"] - at[l1]["temp"]) / (l2 - l1)
    rows.append((full, at[l1]["arguments"] + (full - l1) * arg_slope, at[l1]["temp"] + (full - l1) * temp_slope,
                 total[l1] + (full - l1) * slope))
    for l, args, temp, tot in rows:
      model = memory_model(size, mesh_sizes, work, bytes_param=4, bytes_compute=4, num_layers=l)["learner_total"]
      secs = f"{sum(a['compile_seconds'] for a in at.values()):.0f}" if l == full else ""
      print(f"{size:>5} {l:>3} | {_gib(args)} {_gib(temp)} {_gib(tot)} | {_gib(model)} {model / tot:6.2f} | {secs}")


HBM_GIB = {"H100-80GB": 80, "TPU v5p": 95}


def _rows_that_fit(size: str, mesh: tuple[int, int, int], work: Workload, hbm_gib: float, **kwargs) -> int:
  """The most learner rows per data×fsdp shard whose modelled peak stays within 90% of ``hbm_gib``."""
  shards = mesh[0] * mesh[1]
  fits = lambda r: memory_model(size, mesh, Workload(r * shards, work.prompt, work.completion),
                                **kwargs)["learner_total"] <= 0.9 * hbm_gib * GiB
  lo, hi = 0, 4096  # fits(lo) (or lo = 0), not fits(hi): the peak grows with the rows
  while hi - lo > 1:
    mid = (lo + hi) // 2
    lo, hi = (mid, hi) if fits(mid) else (lo, mid)
  return lo


def table(work: Workload, sampler_rows: int) -> None:
  """The model at bf16 parameters and compute for docs/SCALING.md's table."""
  layouts = {  # size: [(accelerator, devices, mesh)]
      "0.5b": [("H100-80GB", 8, (8, 1, 1)), ("TPU v5p", 4, (4, 1, 1))],
      "1.5b": [("H100-80GB", 8, (2, 4, 1)), ("TPU v5p", 4, (1, 4, 1))],
      "7b": [("H100-80GB", 8, (1, 8, 1)), ("H100-80GB", 8, (1, 4, 2)), ("TPU v5p", 8, (1, 8, 1))],
      "32b": [("H100-80GB", 16, (1, 8, 2)), ("H100-80GB", 32, (2, 8, 2)), ("TPU v5p", 16, (1, 16, 1))],
  }
  keys = ("params", "adam_moments", "gradients", "saved_residuals", "capo_phase", "backward_phase")
  print(f"bf16 params/moments/compute, remat full, {work.prompt} + {work.completion} tokens, "
        f"{work.rows} learner rows per data×fsdp shard, sampler {sampler_rows} rows per shard; GiB per device; "
        "rows that fit: learner rows per shard within 90% of HBM (XLA attention / flash attention)")
  print("| size | accelerator × devices | mesh (d, f, t) | params | Adam μ,ν | grads | residuals | CAPO phase | "
        "backward phase | learner peak | with flash attention | sampler KV cache | rows that fit |")
  print("|---|---|---|" + "---|" * 10)
  for size, layouts_of in layouts.items():
    for accel, devices, mesh in layouts_of:
      shards = mesh[0] * mesh[1]
      w = Workload(work.rows * shards, work.prompt, work.completion)
      m = memory_model(size, mesh, w, sampler_rows=sampler_rows * shards)
      flash = memory_model(size, mesh, w, flash_attention=True)["learner_total"]
      fit = _rows_that_fit(size, mesh, work, HBM_GIB[accel])
      fit_flash = _rows_that_fit(size, mesh, work, HBM_GIB[accel], flash_attention=True)
      cells = " | ".join(f"{m[k] / GiB:.1f}" for k in keys)
      print(f"| {size} | {accel} × {devices} | {mesh} | {cells} | **{m['learner_total'] / GiB:.1f}** | "
            f"{flash / GiB:.1f} | {m['kv_cache'] / GiB:.1f} | {fit} / {fit_flash} |")


def compare_sampler(sizes, mesh_sizes, work: Workload, num_samples: int, decode_weights: str = "gathered") -> None:
  """XLA's prefill and decode loop at full depth beside the model's parameters + KV cache at 4 bytes per element."""
  print(f"mesh (data, fsdp, tensor) = {mesh_sizes}, sampler: {work.rows // num_samples} prompts × {num_samples} "
        f"samples, {work.prompt} prompt + {work.completion} new tokens, float32, weights {decode_weights}; GiB per "
        "device")
  print(f"{'size':>5} | {'pre args':>8} {'pre temp':>8} {'pre out':>8} {'pre tot':>8} | {'dec args':>8} "
        f"{'dec temp':>8} {'dec tot':>8} | {'peak':>8} | {'params':>8} {'KV':>8} | compile s")
  for size in sizes:
    at = xla_sampler_memory(size, mesh_sizes, work, num_samples, decode_weights)
    pre, dec = at["prefill"], at["decode"]
    total = {k: v["arguments"] + v["temp"] + v["outputs_not_aliased"] for k, v in at.items()}
    model = memory_model(size, mesh_sizes, work, bytes_param=4, bytes_compute=4, sampler_rows=work.rows)
    _, params = _abstract_params(model_config(size, None, "float32"))
    model["params"] = sharding.bytes_per_device(params, decode_shardings(params, _mesh(mesh_sizes), decode_weights))
    secs = pre["compile_seconds"] + dec["compile_seconds"]
    print(f"{size:>5} | {_gib(pre['arguments'])} {_gib(pre['temp'])} {_gib(pre['outputs_not_aliased'])} "
          f"{_gib(total['prefill'])} | {_gib(dec['arguments'])} {_gib(dec['temp'])} {_gib(total['decode'])} | "
          f"{_gib(max(total.values()))} | {_gib(model['params'])} {_gib(model['kv_cache'])} | {secs:.0f}", flush=True)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", default=",".join(SHAPES), help="comma-separated: " + ",".join(SHAPES))
  parser.add_argument("--mesh", default="1,4,2",
                      help="data,fsdp,tensor of the XLA check (product ≤ 8); several separated by '/'")
  parser.add_argument("--what", choices=("learner", "sampler", "both"), default="learner",
                      help="the XLA check of the learner step, of the sampler (prefill + decode loop), or both")
  parser.add_argument("--layers", default="2,4", help="the two depths compiled")
  parser.add_argument("--rows", type=int, default=8, help="rows of the XLA check's batch (whole mesh)")
  parser.add_argument("--prompt", type=int, default=512)
  parser.add_argument("--completion", type=int, default=1536)
  parser.add_argument("--table", action="store_true", help="print the model's table only (no compile)")
  parser.add_argument("--table_rows", type=int, default=2, help="learner rows per data×fsdp shard in the table")
  parser.add_argument("--sampler_rows", type=int, default=16, help="sampler rows per data×fsdp shard in the table")
  parser.add_argument("--sampler_check_rows", type=int, default=64, help="sampled rows of the XLA check (whole mesh)")
  parser.add_argument("--group_size", type=int, default=8, help="samples per prompt in the sampler's XLA check")
  parser.add_argument("--decode_weights", choices=("gathered", "sharded"), default="gathered",
                      help="the sampler's parameter layout (capo_jax.sampling.sample's weights)")
  parser.add_argument("--size", default=None, help="accepted for benchmarks.run_all; ignored")
  args = parser.parse_args(argv)
  if args.table:
    table(Workload(args.table_rows, args.prompt, args.completion), args.sampler_rows)
    return
  meshes = [tuple(int(x) for x in m.split(",")) for m in args.mesh.split("/")]
  layers = tuple(int(x) for x in args.layers.split(","))
  sizes = args.sizes.split(",")
  for mesh in meshes:
    if args.what in ("learner", "both"):
      compare(sizes, mesh, layers, Workload(args.rows, args.prompt, args.completion))
    if args.what in ("sampler", "both"):
      compare_sampler(sizes, mesh, Workload(args.sampler_check_rows, args.prompt, args.completion), args.group_size,
                      args.decode_weights)


if __name__ == "__main__":
  main()
