"""A tiny context-dependent MLP policy over V = 5 tokens, shared by the curvature tests (dense references stay cheap).

h_t = tanh((e[x_t] + ½ e[x_{t−1}]) W1 + b1),  z_t = h_t W2.
"""

import jax
import jax.numpy as jnp
import numpy as np

V, D = 5, 3


def init_params(key, dtype):
  k = jax.random.split(key, 4)
  return {
      "emb": jax.random.normal(k[0], (V, D), dtype),
      "w1": jax.random.normal(k[1], (D, D), dtype) / np.sqrt(D),
      "b1": 0.1 * jax.random.normal(k[2], (D,), dtype),
      "w2": jax.random.normal(k[3], (D, V), dtype),
  }


def logits_and_hidden(params, batch):
  """``(logits [B,T,V], hidden [B,T,D])``: the tuple form of the ``logits_fn`` contract."""
  e = params["emb"][batch["tokens"]]
  prev = jnp.pad(e, ((0, 0), (1, 0), (0, 0)))[:, :-1]
  h = jnp.tanh((e + 0.5 * prev) @ params["w1"] + params["b1"])
  return h @ params["w2"], h


def logits_fn(params, batch):
  """Logits only."""
  return logits_and_hidden(params, batch)[0]
