"""The sampler on a device mesh with the weights gathered once per call against the learner's fsdp-split layout.

    python -m benchmarks.sampler_mesh                       # CPU: 8 host devices, mesh (1, 8, 1)
    python -m benchmarks.sampler_mesh --mesh 1,4,2          # fsdp 4 × tensor 2

``capo_jax.sampling.sample(..., mesh=mesh, weights=...)``: "sharded" keeps the learner's layout (every weight split
over ``fsdp``), so each decode step all-gathers every weight again; "gathered" places them split over ``tensor`` only,
once per call (``capo_jax.sharding.decode_param_shardings``). Same model, prompts and key for both, the two layouts
alternating call by call; each call includes the placement of the weights from the learner's layout (what a
rollout pays), the prefill and ``--new-tokens`` decode steps (no stop ids). Prints the median seconds per call of each,
the tokens per second, whether the two produced the same tokens, and last ``gathered_over_sharded=<time ratio>``.
On the CPU the devices are ``--xla_force_host_platform_device_count`` host devices sharing its cores (collectives
are memory copies), so the ratio there shows the per-step collectives' overhead, not an interconnect's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def _mesh_shape(text: str) -> tuple[int, int, int]:
  parts = tuple(int(x) for x in text.split(","))
  if len(parts) != 3 or min(parts) < 1:
    raise argparse.ArgumentTypeError(f"--mesh takes data,fsdp,tensor (three positive ints), got {text!r}")
  return parts


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--mesh", type=_mesh_shape, default=(1, 8, 1), help="data,fsdp,tensor (default 1,8,1)")
  parser.add_argument("--prompts", type=int, default=16)
  parser.add_argument("--samples", type=int, default=8, help="completions per prompt")
  parser.add_argument("--prompt-len", type=int, default=32)
  parser.add_argument("--new-tokens", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=7, help="timed calls of each layout (median reported)")
  parser.add_argument("--size", default=None, help="accepted for benchmarks.run_all; ignored")
  args = parser.parse_args(argv)
  devices = args.mesh[0] * args.mesh[1] * args.mesh[2]
  if "jax" not in sys.modules and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    # CPU: enough host devices for the mesh (ignored by accelerator backends).
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"

  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from capo_jax import sharding  # pylint: disable=import-outside-toplevel
  from capo_jax.config import MeshConfig  # pylint: disable=import-outside-toplevel
  from capo_jax.models import CausalLM, ModelConfig  # pylint: disable=import-outside-toplevel
  from capo_jax.sampling import sample  # pylint: disable=import-outside-toplevel

  if jax.device_count() < devices:
    raise SystemExit(f"mesh {args.mesh} needs {devices} devices; this process has {jax.device_count()}.")
  # benchmarks/peers.py's model: vocabulary 512, width 128, MLP 256, 4 layers, tied.
  cfg = ModelConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=4, num_heads=4, num_kv_heads=2,
                    tie_word_embeddings=True, dtype="float32", param_dtype="float32")
  graphdef, state = nnx.split(CausalLM(cfg, rngs=nnx.Rngs(0)))
  mesh = sharding.make_mesh(MeshConfig(*args.mesh), devices=jax.devices()[:devices])
  learner_layout = sharding.shard_params(state, mesh)
  rng = np.random.default_rng(0)
  prompts = rng.integers(1, cfg.vocab_size, (args.prompts, args.prompt_len)).astype(np.int32)
  mask = np.ones_like(prompts)
  key = jax.random.key(0)

  def call(weights):
    out = sample(graphdef, learner_layout, prompts, mask, key, max_new_tokens=args.new_tokens,
                 num_samples=args.samples, temperature=1.0, stop_ids=(), pad_id=0, mesh=mesh, weights=weights)
    return jax.block_until_ready(out)

  layouts = ("sharded", "gathered")
  outputs = {w: call(w) for w in layouts}  # compile and warm up
  seconds = {w: [] for w in layouts}
  for _ in range(args.repeats):
    for w in layouts:
      start = time.perf_counter()
      call(w)
      seconds[w].append(time.perf_counter() - start)
  tokens = int(np.sum(np.asarray(outputs["gathered"].completion_mask)))
  same = bool(np.array_equal(np.asarray(outputs["gathered"].completion_tokens),
                             np.asarray(outputs["sharded"].completion_tokens)))
  print(f"device={jax.devices()[0].device_kind} mesh(data,fsdp,tensor)={args.mesh} rows={args.prompts}x{args.samples} "
        f"prompt={args.prompt_len} new={args.new_tokens} repeats={args.repeats}; same tokens: {same}")
  for w in layouts:
    median = statistics.median(seconds[w])
    print(f"{w:9s} {median * 1e3:9.1f} ms/call  {tokens / median:9.0f} tokens/s")
  ratios = [g / s for g, s in zip(seconds["gathered"], seconds["sharded"])]
  print(f"gathered_over_sharded={statistics.median(ratios):.3f}")
  return 0 if same else 1


if __name__ == "__main__":
  sys.exit(main())
