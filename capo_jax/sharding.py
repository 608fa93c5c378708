"""Device meshes and partition rules: the policy, its optimizer state (CAPO's included), learner batches and the KV
cache as sharded ``jax.Array``s, and the learner step jitted over them.

A mesh has three axes (``capo_jax.config.MeshConfig``):

    data    replicas: batch rows split, parameters and optimizer state replicated
    fsdp    batch rows split, parameters and optimizer state split (gathered per use inside the step)
    tensor  attention heads, MLP width and the vocabulary split (Megatron-style)

Batch rows are split over ``data × fsdp``. Parameters are named by logical axes through ``PARAM_RULES`` (a table keyed
by the parameter's path, so the model code carries no annotation), and the logical axes map to mesh axes through
``LOGICAL_AXIS_RULES``:

    parameter                                   shape          logical axes              mesh axes
    embed/embedding, lm_head/weight             [V, H]         (vocab, embed)            (tensor, fsdp)
    layers/self_attn/q_proj/kernel              [L, H, N·D]    (layers, embed, heads)    (−, fsdp, tensor)
    layers/self_attn/{k,v}_proj/kernel          [L, H, K·D]    (layers, embed, kv_heads) (−, fsdp, tensor)
    layers/self_attn/o_proj/kernel              [L, N·D, H]    (layers, heads, embed)    (−, tensor, fsdp)
    layers/mlp/{gate,up}_proj/kernel            [L, H, F]      (layers, embed, mlp)      (−, fsdp, tensor)
    layers/mlp/down_proj/kernel                 [L, F, H]      (layers, mlp, embed)      (−, tensor, fsdp)
    q/k/v biases [L, N·D | K·D]: the out axis as its kernel's; norms, o_proj/down_proj biases [L, H] or [H]: replicated

The stacked layer axis L is never split (``nnx.scan`` slices it per block). A dimension that the mesh axis does not
divide is replicated instead (e.g. K = 2 key/value heads on tensor = 4), so every mesh shape runs; the memory model
of docs/SCALING.md assumes the split shapes.

Optimizer states hold params-shaped subtrees (Adam's μ, ν); their leaves match the same rules by path suffix, and CAPO's
shadow moments (``ShadowAdamState.mu``/``nu``, [V, H]) follow the unembedding. Every other leaf (counts, CAPO's mask
statistics, trust-region scalars) is replicated.

Axis types: the mesh is built with ``AxisType.Auto``. The loss and CAPO code carry no sharding annotations, so XLA's
SPMD partitioner propagates the shardings of the step's inputs and outputs through them (with ``Explicit`` axes every
contraction over a split dimension, reshape and gather of that code would need an explicit output sharding). The one
hint inside the model pins the rows of its activations to ``data × fsdp`` under ``jax.set_mesh``
(``capo_jax.models.partitioning``): ``jit_learner_step`` traces the step under it, so every weight split over ``fsdp``
is gathered one layer at a time inside the scan. Only where a collective must be a particular one is it written out
with ``jax.shard_map``: ``vocab_parallel_top_k`` (per-shard top-K, then a merge of the T·K candidates).
"""

from __future__ import annotations

import functools
import os
import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from capo_jax.config import MESH_AXES, MeshConfig
from capo_jax.models import KVCache
from capo_jax.models.partitioning import BATCH_AXES

PyTree = Any

# Logical axis → mesh axis (None: replicated).
LOGICAL_AXIS_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": BATCH_AXES,
    "layers": None,
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "norm": None,
}

# The weights' layout while decoding (``decode_param_shardings``): the ``embed`` axis that ``fsdp`` splits for the
# learner is kept whole, so a decode step gathers no weight; heads, MLP width and the vocabulary stay split over
# ``tensor``. The sampler moves the weights into it once per call (docs/SCALING.md, "The sampler's weights").
DECODE_AXIS_RULES: dict[str, str | tuple[str, ...] | None] = {**LOGICAL_AXIS_RULES, "embed": None}

# (regular expression searched in the "/"-joined parameter path, logical axes of the leaf). First match wins; the
# expressions are anchored at the end, so an optimizer-state leaf (``…/mu/layers/self_attn/q_proj/kernel``) matches
# the rule of its parameter.
PARAM_RULES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"(^|/)embed/embedding$", ("vocab", "embed")),
    (r"(^|/)lm_head/weight$", ("vocab", "embed")),
    (r"(^|/)shadow/(mu|nu)$", ("vocab", "embed")),  # CAPO's shadow Adam moments of the unembedding
    (r"(^|/)self_attn/q_proj/kernel$", ("layers", "embed", "heads")),
    (r"(^|/)self_attn/q_proj/bias$", ("layers", "heads")),
    (r"(^|/)self_attn/(k|v)_proj/kernel$", ("layers", "embed", "kv_heads")),
    (r"(^|/)self_attn/(k|v)_proj/bias$", ("layers", "kv_heads")),
    (r"(^|/)self_attn/o_proj/kernel$", ("layers", "heads", "embed")),
    (r"(^|/)self_attn/o_proj/bias$", ("layers", "norm")),
    (r"(^|/)mlp/(gate|up)_proj/kernel$", ("layers", "embed", "mlp")),
    (r"(^|/)mlp/(gate|up)_proj/bias$", ("layers", "mlp")),
    (r"(^|/)mlp/down_proj/kernel$", ("layers", "mlp", "embed")),
    (r"(^|/)mlp/down_proj/bias$", ("layers", "norm")),
    (r"(^|/)layers/(input_layernorm|post_attention_layernorm)/weight$", ("layers", "norm")),
    (r"(^|/)norm/weight$", ("norm",)),
)
_COMPILED_RULES = tuple((re.compile(pattern), axes) for pattern, axes in PARAM_RULES)


# ---------------------------------------------------------------------------------------------------------------
# Meshes.


def make_mesh(cfg: MeshConfig | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The ``(data, fsdp, tensor)`` mesh of ``cfg`` over ``devices`` (default: every device of every process).

  ``jax.make_mesh`` orders the devices for the hardware topology (on TPU the tensor axis lands on the fastest
  links); the axes are ``AxisType.Auto`` (module docstring).

  Raises:
    ConfigError: the axis sizes do not multiply to the number of devices.
  """
  cfg = MeshConfig() if cfg is None else cfg
  devices = list(jax.devices() if devices is None else devices)
  sizes = cfg.axis_sizes(len(devices))
  return jax.make_mesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, *, auto_detect: bool = False) -> bool:
  """``jax.distributed.initialize`` for a multi-process run; call it before any other JAX call. Returns whether it
  initialized.

  Each argument falls back to the environment (``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``,
  ``JAX_PROCESS_ID``); given (all three), they define the run (multi-node GPU, or several processes on one host).
  Otherwise ``auto_detect`` lets JAX find the cluster itself (every worker of a TPU pod slice, SLURM, Open MPI,
  Kubernetes), and without it a single process returns without initializing. On the CPU backend the cross-process
  collectives use gloo.

  Raises:
    ValueError: some but not all of the three settings are given, or an environment value is not an integer.
  """
  address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
  count = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
  index = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
  given = [x is not None for x in (address, count, index)]
  if any(given) and not all(given):
    raise ValueError("a multi-process run needs all of coordinator address, number of processes and process id "
                     f"(got address={address!r}, num_processes={count!r}, process_id={index!r}); pass all three "
                     "(flags or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID), or none with "
                     "auto_detect on a TPU pod slice or a SLURM / Open MPI job.")
  if not any(given) and not auto_detect:
    return False
  if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(address, count, index)
  return True


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  if value is None or value == "":
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"environment variable {name}={value!r} must be an integer.") from None


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array."""
  return NamedSharding(mesh, P())


# ---------------------------------------------------------------------------------------------------------------
# Partition rules.


def key_names(path) -> tuple[str, ...]:
  """The names along a pytree key path: dict keys, attribute and field names, sequence indices."""
  names = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        names.append(str(getattr(key, attr)))
        break
    else:
      names.append(str(key))
  return tuple(names)


def path_names(path) -> str:
  """A pytree key path as "a/b/c" (``key_names`` joined; nnx's trailing ``value`` dropped)."""
  names = key_names(path)
  return "/".join(names[:-1] if names and names[-1] == "value" else names)


def logical_axes(path: str) -> tuple[str | None, ...] | None:
  """The logical axes ``PARAM_RULES`` gives the leaf at ``path`` ("a/b/c"), or None when no rule matches."""
  for pattern, axes in _COMPILED_RULES:
    if pattern.search(path):
      return axes
  return None


def _mesh_axis_size(mesh: Mesh, axes: str | tuple[str, ...] | None) -> int:
  if axes is None:
    return 1
  names = (axes,) if isinstance(axes, str) else axes
  return int(np.prod([mesh.shape[name] for name in names]))


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: dict[str, str | tuple[str, ...] | None] | None = None) -> P:
  """``PartitionSpec`` of an array of ``shape`` with logical ``axes``: each logical axis → its mesh axes (``rules``,
  default ``LOGICAL_AXIS_RULES``), replicated where those mesh axes do not divide the dimension or are already used by
  an earlier dimension."""
  rules = LOGICAL_AXIS_RULES if rules is None else rules
  if len(axes) != len(shape):
    raise ValueError(f"{len(axes)} logical axes {tuple(axes)} for an array of rank {len(shape)} "
                     f"(shape {tuple(shape)}).")
  used: set[str] = set()
  spec = []
  for name, size in zip(axes, shape):
    if name is not None and name not in rules:
      raise ValueError(f"unknown logical axis {name!r}; known: {sorted(rules)}.")
    mesh_axes = None if name is None else rules[name]
    names = () if mesh_axes is None else ((mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes))
    names = tuple(n for n in names if n in mesh.shape and n not in used)
    if not names or size % _mesh_axis_size(mesh, names) or _mesh_axis_size(mesh, names) == 1:
      spec.append(None)
      continue
    used.update(names)
    spec.append(names[0] if len(names) == 1 else names)
  return P(*spec)


def param_specs(params: PyTree, mesh: Mesh, rules: dict[str, str | tuple[str, ...] | None] | None = None) -> PyTree:
  """The ``PartitionSpec`` of every parameter (a tree like ``params``: arrays or ``ShapeDtypeStruct``s); ``rules``:
  the logical → mesh axes (default ``LOGICAL_AXIS_RULES``, the learner's layout).

  Raises:
    ValueError: a parameter no rule of ``PARAM_RULES`` covers, or one whose rank differs from its rule's (the
      message names the path and the fix).
  """

  def spec(path, leaf):
    name = path_names(path)
    axes = logical_axes(name)
    if axes is None:
      raise ValueError(f"no partition rule for parameter {name} (shape {tuple(leaf.shape)}); add a "
                       "(path pattern, logical axes) entry to capo_jax.sharding.PARAM_RULES.")
    if len(axes) != len(leaf.shape):
      raise ValueError(f"parameter {name} has shape {tuple(leaf.shape)} but its rule gives {len(axes)} logical axes "
                       f"{axes}; fix its entry in capo_jax.sharding.PARAM_RULES.")
    return logical_to_spec(axes, leaf.shape, mesh, rules)

  return jax.tree_util.tree_map_with_path(spec, params)


def param_shardings(params: PyTree, mesh: Mesh,
                    rules: dict[str, str | tuple[str, ...] | None] | None = None) -> PyTree:
  """``NamedSharding`` of every parameter (``param_specs`` on ``mesh``)."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(params, mesh, rules),
                      is_leaf=lambda x: isinstance(x, P))


def decode_param_shardings(params: PyTree, mesh: Mesh) -> PyTree:
  """The parameters' layout for decoding (``DECODE_AXIS_RULES``): split over ``tensor`` only, whole on every device
  of the ``data`` and ``fsdp`` axes. The learner's layout splits each weight over ``fsdp`` too, and a decode step on
  it gathers every weight again for each generated token; in this one the sampler gathers them once per call."""
  return param_shardings(params, mesh, DECODE_AXIS_RULES)


def bytes_per_device(tree: PyTree, shardings: PyTree) -> int:
  """The bytes one device holds of ``tree`` (arrays or ``ShapeDtypeStruct``s) placed by ``shardings``."""

  def one(leaf, sharding):
    shard = sharding.shard_shape(tuple(leaf.shape))
    return int(np.prod(shard, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize

  return int(sum(jax.tree.leaves(jax.tree.map(one, tree, shardings))))


# ``sample(..., weights="auto")`` gathers the weights for decoding when they take at most this share of a device's
# memory (``Device.memory_stats()["bytes_limit"]``): the learner's parameters, optimizer state and batch share it.
GATHER_FOR_DECODING_MAX_SHARE = 0.25


def decode_weights_layout(params: PyTree, mesh: Mesh, weights: str = "auto") -> str:
  """``"gathered"`` or ``"sharded"``: the layout the sampler decodes with on ``mesh`` for a ``weights`` setting.

  ``"gathered"`` (``decode_param_shardings``) or ``"sharded"`` (the learner's ``param_shardings``) are returned as
  given; ``"auto"`` is ``"gathered"`` when the mesh has no ``fsdp`` split (the two layouts are then the same), or when
  the gathered weights fit in ``GATHER_FOR_DECODING_MAX_SHARE`` of the smallest device memory the mesh's devices
  report (``device_memory_limit``, the same on every process; devices that report none, e.g. the CPU, count as
  fitting); otherwise ``"sharded"``.

  Raises:
    ValueError: ``weights`` is not one of "auto", "gathered", "sharded".
  """
  if weights not in ("auto", "gathered", "sharded"):
    raise ValueError(f"weights must be 'auto', 'gathered' or 'sharded', got {weights!r}.")
  if weights != "auto":
    return weights
  if mesh.shape.get("fsdp", 1) == 1:
    return "gathered"
  limit = device_memory_limit(mesh)
  if limit is None:
    return "gathered"
  need = bytes_per_device(params, decode_param_shardings(params, mesh))
  return "gathered" if need <= GATHER_FOR_DECODING_MAX_SHARE * limit else "sharded"


@functools.lru_cache(maxsize=None)
def device_memory_limit(mesh: Mesh) -> int | None:
  """The smallest ``memory_stats()["bytes_limit"]`` of the mesh's devices; None when none reports one (CPU).

  With several processes each reads its local devices and the smallest is agreed on by one gather of a number, so that
  every process picks the same decoding layout (once per mesh: the result is cached)."""
  limits = []
  for device in mesh.local_devices:
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
      limits.append(int(stats["bytes_limit"]))
  local = min(limits) if limits else -1
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    every = np.asarray(multihost_utils.process_allgather(np.asarray([local], np.int64))).reshape(-1)
    reported = every[every > 0]
    return int(reported.min()) if reported.size else None
  return local if local > 0 else None


def state_shardings(tree: PyTree, mesh: Mesh) -> PyTree:
  """``NamedSharding`` of every leaf of any state tree (an optimizer state, a checkpointed train state): a leaf whose
  path ends like a parameter's and whose rank is its rule's is split like that parameter; every other leaf is
  replicated."""

  def sharding(path, leaf):
    shape = tuple(getattr(leaf, "shape", ()))
    axes = logical_axes(path_names(path))
    if axes is None or len(axes) != len(shape):
      return replicated(mesh)
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh))

  return jax.tree_util.tree_map_with_path(sharding, tree)


def batch_spec(ndim: int) -> P:
  """Rows (axis 0) over ``data × fsdp``, the other axes replicated."""
  return P(BATCH_AXES, *([None] * (ndim - 1))) if ndim else P()


def batch_shardings(batch: PyTree, mesh: Mesh) -> PyTree:
  """``NamedSharding`` of every leaf of a batch (rows on axis 0, e.g. a ``SequenceBatch``): rows over
  ``data × fsdp``; scalars replicated.

  Raises:
    ValueError: a leaf whose row count ``data × fsdp`` does not divide (make the batch a multiple of it).
  """
  rows_split = _mesh_axis_size(mesh, BATCH_AXES)

  def sharding(path, leaf):
    shape = tuple(getattr(leaf, "shape", ()))
    if not shape:
      return replicated(mesh)
    if shape[0] % rows_split:
      raise ValueError(f"batch leaf {path_names(path) or '<root>'} has {shape[0]} rows, not a multiple of "
                       f"data × fsdp = {rows_split}; make the rows per step a multiple of it.")
    return NamedSharding(mesh, batch_spec(len(shape)))

  return jax.tree_util.tree_map_with_path(sharding, batch)


def shard_batch(batch: PyTree, mesh: Mesh) -> PyTree:
  """A global batch from this process's rows: ``jax.make_array_from_process_local_data`` per leaf with
  ``batch_shardings``. One process: the rows are the whole batch; P processes: each passes its B/P rows
  (``process_rows`` of the global batch) and the result has B rows."""
  local = jax.tree.map(np.asarray, batch)
  num_processes = jax.process_count()

  def place(leaf, sharding):
    shape = (leaf.shape[0] * num_processes, *leaf.shape[1:]) if leaf.ndim else ()
    return jax.make_array_from_process_local_data(sharding, leaf, shape)

  global_shapes = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct((x.shape[0] * num_processes, *x.shape[1:]) if x.ndim else (), x.dtype), local)
  return jax.tree.map(place, local, batch_shardings(global_shapes, mesh))


def process_rows(mesh: Mesh, num_rows: int) -> slice:
  """The rows of a ``num_rows``-row global batch that live on this process's devices under ``batch_shardings``: the
  rows this process must load, roll out and score, and hand to ``shard_batch``. One process: every row.

  Raises:
    ValueError: this process's rows are not one contiguous range (a mesh whose batch axes interleave processes).
  """
  sharding = NamedSharding(mesh, batch_spec(1))
  starts = sorted({idx[0].start or 0 for idx in sharding.addressable_devices_indices_map((num_rows,)).values()})
  size = num_rows // _mesh_axis_size(mesh, BATCH_AXES)
  if starts != list(range(starts[0], starts[0] + size * len(starts), size)):
    raise ValueError(f"this process's rows {starts} (each {size} long) are not contiguous; build the mesh with "
                     "make_mesh so that each process holds a contiguous block of the data × fsdp axes.")
  return slice(starts[0], starts[0] + size * len(starts))


def kv_cache_shardings(cache: KVCache, mesh: Mesh) -> KVCache:
  """``NamedSharding``s of a ``KVCache`` (arrays or ``ShapeDtypeStruct``s): k/v [L, B, S, K, D] with rows over
  ``data × fsdp`` and the K key/value heads over ``tensor`` (each replicated where not divisible), ``valid`` [B, S]
  with rows split, ``index`` replicated."""
  kv = logical_to_spec(("layers", "batch", None, "kv_heads", None), cache.k.shape, mesh)
  valid = logical_to_spec(("batch", None), cache.valid.shape, mesh)
  return KVCache(k=NamedSharding(mesh, kv), v=NamedSharding(mesh, kv), valid=NamedSharding(mesh, valid),
                 index=replicated(mesh))


# ---------------------------------------------------------------------------------------------------------------
# Placing state and jitting the learner step.


def shard_params(params: PyTree, mesh: Mesh) -> PyTree:
  """A copy of ``params`` on ``mesh`` by ``param_shardings``, placed from host memory (device arrays are fetched
  first: ``jax.device_put`` would let a replicated result share its first shard's buffer with a device array, and
  donating the result to a learner step would then delete ``params``). Every process passes the whole ``params``;
  a model too large for one host is restored straight onto the mesh instead (``abstract_state`` + Orbax)."""
  return jax.device_put(jax.tree.map(np.asarray, params), param_shardings(params, mesh))


def on_mesh(params: PyTree, mesh: Mesh) -> PyTree:
  """``params`` placed by ``param_shardings``: returned as they are when every leaf already is (e.g. loaded with
  ``load_shardings``), else placed from host memory (``shard_params``, every process passing the whole value)."""
  target = param_shardings(params, mesh)
  placed = jax.tree.leaves(jax.tree.map(lambda x, s: isinstance(x, jax.Array) and x.sharding.is_equivalent_to(
      s, x.ndim), params, target))
  return params if all(placed) else shard_params(params, mesh)


def copy_params(params: PyTree, mesh: Mesh) -> PyTree:
  """A copy of ``params`` (placed by ``param_shardings``) in new buffers with the same shardings, computed on the
  devices (nothing passes through a host): the learner donates its parameters, the reference keeps its own."""
  shardings = param_shardings(params, mesh)
  return jax.jit(lambda tree: jax.tree.map(jnp.copy, tree), in_shardings=(shardings,), out_shardings=shardings)(params)


def load_shardings(model_config, mesh: Mesh) -> Callable[[tuple], NamedSharding]:
  """``capo_jax.models.load_hf``'s ``shardings`` for a model of ``model_config`` (a ``ModelConfig``) on ``mesh``:
  every device reads its own block of each parameter from the safetensors files, by ``param_shardings``, so no
  process ever holds a whole parameter it does not keep."""
  from capo_jax.models import CausalLM  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  _, abstract = nnx.split(nnx.eval_shape(lambda: CausalLM(model_config, rngs=nnx.Rngs(0))))
  table = {}
  for path, variable in nnx.to_flat_state(abstract):
    name = "/".join(str(p) for p in path)
    axes = logical_axes(name)
    if axes is None or len(axes) != len(variable.shape):
      raise ValueError(f"no partition rule of rank {len(variable.shape)} for parameter {name}; add one to "
                       "capo_jax.sharding.PARAM_RULES.")
    table[tuple(str(p) for p in path)] = NamedSharding(mesh, logical_to_spec(axes, variable.shape, mesh))
  return lambda path: table[tuple(str(p) for p in path)]


def init_optimizer_state(optimizer, params: PyTree, mesh: Mesh) -> PyTree:
  """``optimizer.init(params)`` computed directly into ``state_shardings`` (no replicated copy is ever built)."""
  abstract = jax.eval_shape(optimizer.init, params)
  return jax.jit(optimizer.init, out_shardings=state_shardings(abstract, mesh))(params)


def abstract_state(tree: PyTree, shardings: PyTree) -> PyTree:
  """``jax.ShapeDtypeStruct``s of ``tree`` (arrays or structs) carrying ``shardings``: the target of an Orbax
  restore onto a mesh, or the arguments of ``jax.jit(...).lower`` (docs/SCALING.md's memory analysis)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


class OnMesh:
  """A jitted function that is traced, lowered and called under ``jax.set_mesh(mesh)`` (so the model's activation
  hints apply). ``__call__`` and ``lower`` as the wrapped ``jax.jit`` object's."""

  def __init__(self, jitted: Callable, mesh: Mesh):
    self.jitted, self.mesh = jitted, mesh

  def __call__(self, *args):
    with jax.set_mesh(self.mesh):
      return self.jitted(*args)

  def lower(self, *args):
    with jax.set_mesh(self.mesh):
      return self.jitted.lower(*args)


def jit_learner_step(step: Callable, mesh: Mesh, params: PyTree, opt_state: PyTree, batch: PyTree) -> OnMesh:
  """``step(params, opt_state, batch) -> (params, opt_state, metrics)`` (any learner step of ``capo_jax.learner``,
  jitted or not) jitted with explicit shardings: parameters by ``param_shardings``, optimizer state by
  ``state_shardings``, batch rows over ``data × fsdp``, metrics replicated; traced under ``jax.set_mesh(mesh)``.
  Parameters and optimizer state come back with the shardings they came in with and are donated.
  ``params``/``opt_state``/``batch``: arrays or ``ShapeDtypeStruct``s (shapes only are read)."""
  p_sh, o_sh = param_shardings(params, mesh), state_shardings(opt_state, mesh)
  return OnMesh(jax.jit(step, in_shardings=(p_sh, o_sh, batch_shardings(batch, mesh)),
                        out_shardings=(p_sh, o_sh, replicated(mesh)), donate_argnums=(0, 1)), mesh)


class MeshLearnerStep:
  """A learner step on ``mesh`` for whatever batch shape it is called with: ``jit_learner_step`` once per shape
  (minibatches of one size share one compile), the batch placed by ``batch_shardings`` before each call (rows from
  the sampler, or numpy, land where the step expects them). Called as the step itself: ``(params, opt_state, batch)
  -> (params, opt_state, metrics)``."""

  def __init__(self, step: Callable, mesh: Mesh):
    self.step, self.mesh = step, mesh
    self._compiled: dict[Any, OnMesh] = {}

  def __call__(self, params: PyTree, opt_state: PyTree, batch: PyTree):
    shapes = tuple((tuple(x.shape), str(x.dtype)) for x in jax.tree.leaves(batch))
    if shapes not in self._compiled:
      self._compiled[shapes] = jit_learner_step(self.step, self.mesh, params, opt_state, batch)
    return self._compiled[shapes](params, opt_state, place_batch(batch, self.mesh))


def place_batch(batch: PyTree, mesh: Mesh) -> PyTree:
  """``batch`` (global arrays or numpy holding every row, the same on every process) with its rows split over
  ``data × fsdp`` (``batch_shardings``)."""
  return jax.device_put(batch, batch_shardings(batch, mesh))


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
  """Every leaf (the same value on every process) replicated on ``mesh``: a PRNG key, a step counter."""
  return jax.device_put(jax.tree.map(np.asarray, tree), replicated(mesh))


def to_host(x: Any) -> np.ndarray:
  """The whole value of ``x`` as numpy on this process: ``np.asarray`` when this process holds all of it (one
  process, or a replicated array), else gathered from every process (``multihost_utils.process_allgather``)."""
  if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
    return np.asarray(x)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def gather_rows(local: np.ndarray, rows: slice, num_rows: int) -> np.ndarray:
  """The ``num_rows``-row array whose rows ``rows`` are this process's ``local`` (numpy), the others gathered from
  the processes that hold them (each passing its own ``process_rows``): every process gets the same array. One
  process: ``local`` itself (it holds every row)."""
  local = np.asarray(local)
  if jax.process_count() == 1:
    return local
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  starts = np.asarray(multihost_utils.process_allgather(np.asarray([rows.start], np.int64)))
  parts = np.asarray(multihost_utils.process_allgather(local))
  out = np.zeros((num_rows, *local.shape[1:]), local.dtype)
  for start, part in zip(starts.reshape(-1), parts):
    out[int(start):int(start) + len(part)] = part
  return out


def sync(name: str) -> None:
  """A barrier of every process (no-op with one): the file system writes of process 0 are visible after it."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def is_primary() -> bool:
  """Whether this process writes the run's logs, plots and host-side files (process 0)."""
  return jax.process_index() == 0


# ---------------------------------------------------------------------------------------------------------------
# Vocabulary-parallel collectives.


def _split_leading(mesh: Mesh, shape: Sequence[int], batch_axes: tuple[str, ...]) -> tuple[str, ...] | None:
  names = tuple(a for a in batch_axes if a in mesh.shape)
  if not names or not shape or shape[0] % _mesh_axis_size(mesh, names):
    return None
  return names


def vocab_split_mesh(vocab: int, k: int, *, vocab_axis: str = "tensor"):
  """The mesh being traced under (``jax.set_mesh``) when its ``vocab_axis`` splits a vocabulary of ``vocab`` entries
  in a way ``vocab_parallel_top_k`` takes (more than one shard, dividing V, k ≤ V / shards), else None (no mesh, no
  such axis, or the rules keep V whole)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or vocab_axis not in mesh.axis_names:
    return None
  parts = mesh.shape[vocab_axis]
  if parts <= 1 or vocab % parts or not 0 < k <= vocab // parts:
    return None
  return mesh


def vocab_parallel_top_k(logits: jax.Array, k: int, mesh: Mesh, *, vocab_axis: str = "tensor",
                         batch_axes: tuple[str, ...] = BATCH_AXES) -> tuple[jax.Array, jax.Array]:
  """``jax.lax.top_k(logits, k)`` over a vocabulary split on ``vocab_axis``, with one all-gather of T·k candidates.

  Shard s of T holds the columns [s·V/T, (s+1)·V/T). Each shard takes its local top-k (``lax.top_k``: descending,
  ties by lower id) and offsets its ids by s·V/T; the T lists are all-gathered in shard order and ``lax.top_k`` of the
  T·k candidates picks the global k. Every global top-k entry is in its shard's local top-k, and among equal values a
  lower position in the gathered list is a lower id, so values, ids and their order equal ``lax.top_k`` of the whole
  row. The leading axis stays split over ``batch_axes`` when they divide it.

  Returns:
    ``(values [..., k], ids [..., k] int32)``, replicated over ``vocab_axis``.
  """
  v = logits.shape[-1]
  parts = mesh.shape[vocab_axis]
  if v % parts:
    raise ValueError(f"the vocabulary ({v}) must be a multiple of the {vocab_axis!r} axis ({parts}) to split it; pad "
                     "the unembedding to a multiple or use jax.lax.top_k on the unsplit logits.")
  if not 0 < k <= v // parts:
    raise ValueError(f"k={k} must be in [1, V/{parts} = {v // parts}] for the per-shard top-k.")
  lead = _split_leading(mesh, logits.shape, batch_axes)
  rest = [None] * (logits.ndim - 2)
  in_spec = P(lead, *rest, vocab_axis) if logits.ndim > 1 else P(vocab_axis)
  out_spec = P(lead, *rest, None) if logits.ndim > 1 else P(None)

  def local(z):
    values, ids = jax.lax.top_k(z, k)
    ids = ids.astype(jnp.int32) + jax.lax.axis_index(vocab_axis).astype(jnp.int32) * (v // parts)
    all_values = jax.lax.all_gather(values, vocab_axis, axis=z.ndim - 1, tiled=True)
    all_ids = jax.lax.all_gather(ids, vocab_axis, axis=z.ndim - 1, tiled=True)
    top_values, pos = jax.lax.top_k(all_values, k)
    return top_values, jnp.take_along_axis(all_ids, pos, axis=-1)

  return jax.shard_map(local, mesh=mesh, in_specs=in_spec, out_specs=(out_spec, out_spec), check_vma=False)(logits)
