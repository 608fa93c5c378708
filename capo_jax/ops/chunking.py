"""Chunked loops over the time axis (and over a flat token axis) that keep large per-position arrays out of memory.

A per-position function of the vocabulary (log-probabilities, the top-K policy) needs a ``[B, T, V]`` block; with
V ≈ 150k and B·T ≈ 10⁴ that is gigabytes. The helpers here run such a function on ``[B, chunk, …]`` slices of the
time axis one at a time and put the results back together, so at most one chunk's intermediates are alive:

* ``auto_chunk`` — the one rule for the chunk length: the caller's ``chunk_size``, or the longest chunk whose float32
  ``[B, chunk, V]`` block has at most ``AUTO_CHUNK_ELEMENTS`` elements (64 MiB);
* ``map_time_chunks`` — ``fn`` over the time chunks (``lax.map``; ``remat=True`` rematerialises each chunk in the
  backward pass too), concatenated back along the time axis;
* ``pad_to_chunks`` — a flat ``[N, …]`` token axis as ``[ceil(N/chunk), chunk, …]`` for a ``lax.map``/``lax.scan``
  over token chunks.

Shared by ``capo_jax.logprobs`` and ``capo_jax.curvature``, so the loss and CAPO's mask chunk the same way.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from capo_jax import validation

Array = jax.Array

# Elements of one float32 [B, chunk, V] block when chunk_size is left to ``auto_chunk`` (64 MiB).
AUTO_CHUNK_ELEMENTS = 1 << 24


def auto_chunk(batch: int, time: int, vocab: int, chunk_size: int | None) -> int:
  """Time steps per chunk: ``min(chunk_size, time)``, or when ``chunk_size`` is None the most steps whose
  ``[batch, chunk, vocab]`` block holds ≤ ``AUTO_CHUNK_ELEMENTS`` elements (at least 1, at most ``time``)."""
  if chunk_size is not None:
    validation.check_chunk_size(chunk_size)
    return min(chunk_size, time)
  return max(1, min(time, AUTO_CHUNK_ELEMENTS // max(1, batch * vocab)))


def map_time_chunks(fn: Callable[..., Any], xs: tuple[Array, ...], chunk: int, *, remat: bool = False) -> Any:
  """``fn(*[x[:, s:s + chunk] for x in xs])`` over the time axis (axis 1 of every ``x``), concatenated back along it.

  Full chunks go through ``jax.lax.map`` (one chunk's intermediates alive at a time); a remainder shorter than
  ``chunk`` runs once at the end. ``fn`` returns a pytree of ``[B, chunk, …]`` arrays; the result has the same tree
  with ``[B, T, …]`` leaves. ``remat=True`` wraps ``fn`` in ``jax.checkpoint`` so that the backward pass also
  recomputes one chunk at a time instead of storing every chunk's intermediates.
  """
  time = xs[0].shape[1]
  num_full = time // chunk
  chunk_fn = jax.checkpoint(fn) if remat else fn
  parts = []
  if num_full:

    def one(i):
      return chunk_fn(*(jax.lax.dynamic_slice_in_dim(x, i * chunk, chunk, axis=1) for x in xs))

    out = jax.lax.map(one, jnp.arange(num_full))  # leaves [num_full, B, chunk, ...]
    parts.append(jax.tree.map(lambda y: jnp.moveaxis(y, 0, 1).reshape(y.shape[1], num_full * chunk, *y.shape[3:]),
                              out))
  if time % chunk:
    parts.append(chunk_fn(*(x[:, num_full * chunk:] for x in xs)))
  return jax.tree.map(lambda *ys: jnp.concatenate(ys, axis=1), *parts) if len(parts) > 1 else parts[0]


def pad_to_chunks(x: Array, chunk: int) -> Array:
  """A flat ``[N, …]`` axis as ``[ceil(N/chunk), chunk, …]``, zero-padded at the end."""
  n = x.shape[0]
  n_chunks = -(-n // chunk)
  pad = n_chunks * chunk - n
  x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
  return x.reshape(n_chunks, chunk, *x.shape[1:])
