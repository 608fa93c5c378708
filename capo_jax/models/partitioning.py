"""Where the decoder's activations live on a device mesh: their rows (axis 0) split over the mesh's batch axes.

The parameters' placement is a rule table outside the model (``capo_jax.sharding.PARAM_RULES``); the activations need
a hint inside it. With the batch split over ``fsdp`` and the weights split over ``fsdp`` as well, XLA's partitioner
may otherwise gather the activations' rows and keep each weight split, a layout of the same values whose memory grows
with the whole batch; pinned rows make it gather each weight instead, one layer at a time inside the scan (FSDP).

``constrain_rows`` is a no-op outside a mesh context, so single-device code is unchanged; ``capo_jax.sharding`` traces
the learner step and the sampler under ``jax.set_mesh(mesh)``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

# The mesh axes that split batch rows (``capo_jax.sharding``'s ``data`` and ``fsdp``).
BATCH_AXES = ("data", "fsdp")


def constrain_rows(x: jax.Array) -> jax.Array:
  """``x`` with axis 0 split over the batch axes of the mesh in context (``jax.set_mesh``) and every other axis
  replicated; unchanged without a mesh, or when those axes are trivial or do not divide axis 0."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not x.ndim:
    return x
  axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
  size = math.prod(mesh.shape[a] for a in axes)
  if size <= 1 or x.shape[0] % size:
    return x
  return jax.lax.with_sharding_constraint(x, PartitionSpec(axes, *([None] * (x.ndim - 1))))


def embed_rows(table_vh: jax.Array, tokens_bt: jax.Array) -> jax.Array:
  """``table_vh[tokens_bt]`` with its rows pinned like ``constrain_rows``. Under a mesh the table is first gathered
  over every axis but ``tensor`` (which keeps the vocabulary split where it divides V): a lookup into a table whose
  hidden axis is split over ``fsdp`` would give embeddings split over ``fsdp`` on the hidden axis, which XLA can only
  re-split by rows through a full copy. Values are those of a plain lookup (each vocabulary shard contributes its own
  rows, the others zeros). Without a mesh: the plain lookup."""
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty:
    vocab = "tensor" if "tensor" in mesh.axis_names and table_vh.shape[0] % mesh.shape["tensor"] == 0 else None
    table_vh = jax.lax.with_sharding_constraint(table_vh, PartitionSpec(vocab, None))
  return constrain_rows(jnp.take(table_vh, tokens_bt, axis=0))
