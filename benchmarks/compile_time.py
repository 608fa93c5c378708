"""Compile time of the GRPO learner step as a function of depth: 2 vs 24 decoder layers of the same small width.

    python -m benchmarks.compile_time                      # hidden 64, vocabulary 512, B=8 rows of 32 + 32 tokens
    python -m benchmarks.compile_time --remat full         # the same with every scanned layer rematerialised
    python -m benchmarks.compile_time --group 1            # every row through the model whole (no shared prompts)

The step is ``capo_jax.learner.make_rl_step`` (forward, backward, optax Adam update; no token mask) on a random-init
``CausalLM``, its rows ``--group`` samples of each prompt run as the trainer runs them (each prompt's columns once per
group: a prompt scan and a row scan of the layers). For each depth the jitted step is traced and lowered
(``step.lower``) and then compiled (``.compile()``) from a cleared JAX cache, ``--repeats`` times; the minimum of each
phase is printed. Decoder layers run under ``nnx.scan`` (one over the prompts' columns, one over the rows' with
``--group`` > 1), so the program XLA compiles has one or two layer bodies whatever the depth and the ratio should stay
near 1. The last line is ``compile_24_over_2=<ratio>`` of the lower+compile seconds.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from capo_jax import learner
from capo_jax.models import CausalLM, ModelConfig

DEPTHS = (2, 24)


def _problem(num_layers: int, args):
  """``(step, params, opt_state, batch)`` of a random-init model of ``num_layers`` layers."""
  cfg = ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                    num_layers=num_layers, num_heads=4, num_kv_heads=2, rope_theta=10000.0, remat=args.remat)
  graphdef, params = nnx.split(CausalLM(cfg, rngs=nnx.Rngs(0)))
  optimizer = optax.adam(1e-4)
  opt_state = optimizer.init(params)
  objective = learner.Objective(completion_length=args.completion, prompt_group_size=args.group)
  step = learner.make_rl_step(graphdef, optimizer, objective)
  rows, length = args.batch, args.prompt + args.completion
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, args.vocab, (rows, length))
  tokens[:, :args.prompt] = np.repeat(tokens[::args.group, :args.prompt], args.group, axis=0)
  batch = learner.SequenceBatch(
      tokens_bs=jnp.asarray(tokens, jnp.int32),
      attention_mask_bs=jnp.ones((rows, length), jnp.int32),
      completion_mask_bn=jnp.ones((rows, args.completion), jnp.int32),
      advantages_b=jnp.asarray(rng.normal(size=rows), jnp.float32),
      old_logprobs_bn=jnp.zeros((rows, args.completion), jnp.float32),
      ref_logprobs_bn=jnp.zeros((rows, args.completion), jnp.float32),
      row_weight_b=jnp.ones((rows,), jnp.float32),
  )
  return step, params, opt_state, batch


def _time_compile(num_layers: int, args) -> tuple[float, float]:
  """Minimum over ``args.repeats`` of (trace + lower seconds, compile seconds), each from a cleared cache."""
  step, params, opt_state, batch = _problem(num_layers, args)
  lowers, compiles = [], []
  for _ in range(args.repeats):
    jax.clear_caches()
    start = time.perf_counter()
    lowered = step.lower(params, opt_state, batch)
    mid = time.perf_counter()
    lowered.compile()
    lowers.append(mid - start)
    compiles.append(time.perf_counter() - mid)
  return min(lowers), min(compiles)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--hidden", type=int, default=64)
  parser.add_argument("--vocab", type=int, default=512)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--prompt", type=int, default=32)
  parser.add_argument("--completion", type=int, default=32)
  parser.add_argument("--group", type=int, default=4, help="samples per prompt (rows sharing a prompt); 1: none")
  parser.add_argument("--remat", default=ModelConfig.remat,
                      help="ModelConfig.remat policy of the scanned layer body (default: the model's default)")
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--size", default="tiny", help="accepted for benchmarks.run_all; ignored")
  args = parser.parse_args(argv)
  print(f"device={jax.devices()[0].device_kind} backend={jax.default_backend()} hidden={args.hidden} "
        f"vocab={args.vocab} batch={args.batch} tokens={args.prompt}+{args.completion} remat={args.remat} "
        f"group={args.group}", flush=True)
  totals = {}
  for depth in DEPTHS:
    lower_s, compile_s = _time_compile(depth, args)
    totals[depth] = lower_s + compile_s
    print(f"layers={depth:3d} lower_s={lower_s:.3f} compile_s={compile_s:.3f} total_s={totals[depth]:.3f}", flush=True)
  print(f"compile_24_over_2={totals[24] / totals[2]:.3f}")


if __name__ == "__main__":
  main()
