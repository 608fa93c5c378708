"""Throughput of the jitted KV-cache sampler, side by side with HF transformers ``generate``.

    python -m benchmarks.sampler --size tiny           # CPU-sized model, seconds
    python -m benchmarks.sampler --size qwen2-0.5b     # GPU: Qwen2-0.5B shape, bf16, batch 96, prompt 256, 512 new

Both samplers get the same random-init architecture (not the same weights: throughput does not depend on them), the
same random full-length prompts, plain sampling at temperature 1 (no top-k/top-p unless asked, on both sides), and no
early stop: our sampler gets no stop ids, HF gets ``eos_token_id=None``, so every row produces exactly
``--new-tokens`` tokens. Generated tokens are counted from the outputs (our completion mask; HF's output length), not
assumed. Each side is timed after a warm-up call of the same shapes (compilation / CUDA init excluded), prefill
included. Printed last: ``sampler_tokens_per_s=<x>`` (preceded by ``hf_tokens_per_s=`` and ``sampler_over_hf=``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

# The JAX and torch samplers share one GPU in the same process: stop JAX from pre-allocating 75% of it.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.6")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from capo_jax.models import CausalLM, ModelConfig  # noqa: E402
from capo_jax.sampling import sample  # noqa: E402

SIZES = {
    "tiny": dict(
        model=dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                   tie_word_embeddings=True, dtype="float32", param_dtype="float32"),
        batch=8, prompt_len=32, new_tokens=64, repeats=5, hf_repeats=3),
    "qwen2-0.5b": dict(
        model=dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
                   num_kv_heads=2, tie_word_embeddings=True, rope_theta=1e6, rms_norm_eps=1e-6, dtype="bfloat16",
                   param_dtype="bfloat16"),
        batch=96, prompt_len=256, new_tokens=512, repeats=3, hf_repeats=1),
}


def _time_ours(cfg: ModelConfig, prompts: np.ndarray, args) -> tuple[float, int]:
  """Median seconds of ``args.repeats`` timed calls after one warm-up call, and the tokens generated per call."""
  graphdef, state = nnx.split(CausalLM(cfg, rngs=nnx.Rngs(0)))
  mask = np.ones_like(prompts)

  def run(seed):
    out = sample(graphdef, state, prompts, mask, jax.random.key(seed), max_new_tokens=args.new_tokens,
                 num_samples=1, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, stop_ids=None)
    return jax.block_until_ready(out)

  run(0)  # compile
  times, tokens = [], None
  for i in range(args.repeats):
    start = time.perf_counter()
    out = run(i + 1)
    times.append(time.perf_counter() - start)
    tokens = int(np.asarray(out.completion_mask).sum())
  assert tokens == prompts.shape[0] * args.new_tokens, "the benchmark must not stop early"
  return statistics.median(times), tokens


def _time_hf(cfg: ModelConfig, prompts: np.ndarray, args) -> tuple[float, int]:
  """Median seconds of HF ``generate`` on the same shapes (torch, random init, same dtype), and tokens per call."""
  import torch
  import transformers

  device = "cuda" if torch.cuda.is_available() else "cpu"
  dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[cfg.dtype]
  hf_config = transformers.Qwen2Config(**{k: v for k, v in cfg.to_hf_dict().items() if k != "architectures"})
  torch.manual_seed(0)
  with torch.device(device):
    model = transformers.Qwen2ForCausalLM(hf_config).to(dtype).eval()
  input_ids = torch.as_tensor(prompts, dtype=torch.long, device=device)
  attention_mask = torch.ones_like(input_ids)
  gen_kwargs = dict(
      attention_mask=attention_mask, do_sample=True, temperature=args.temperature, top_k=args.top_k or None,
      top_p=args.top_p, eos_token_id=None, pad_token_id=0, max_new_tokens=args.new_tokens,
      min_new_tokens=args.new_tokens)

  def run(new_tokens):
    kwargs = dict(gen_kwargs, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    with torch.inference_mode():
      out = model.generate(input_ids, **kwargs)
    if device == "cuda":
      torch.cuda.synchronize()
    return out

  run(min(8, args.new_tokens))  # warm-up: CUDA context, kernels, allocator
  times, tokens = [], None
  for _ in range(args.hf_repeats):
    start = time.perf_counter()
    out = run(args.new_tokens)
    times.append(time.perf_counter() - start)
    tokens = int((out.shape[1] - input_ids.shape[1]) * out.shape[0])
  del model
  if device == "cuda":
    torch.cuda.empty_cache()
  return statistics.median(times), tokens


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
  parser.add_argument("--batch", type=int, help="rows (prompts, one sample each); default per size")
  parser.add_argument("--prompt-len", type=int, help="prompt tokens (no padding); default per size")
  parser.add_argument("--new-tokens", type=int, help="tokens generated per row; default per size")
  parser.add_argument("--repeats", type=int, help="timed calls of our sampler (median reported)")
  parser.add_argument("--hf-repeats", type=int, help="timed calls of HF generate (median reported)")
  parser.add_argument("--temperature", type=float, default=1.0)
  parser.add_argument("--top-k", type=int, default=0, help="0 disables (both samplers)")
  parser.add_argument("--top-p", type=float, default=1.0, help="1.0 disables (both samplers)")
  parser.add_argument("--no-hf", action="store_true", help="skip the HF transformers generate baseline")
  args = parser.parse_args(argv)
  size = SIZES[args.size]
  for name in ("batch", "prompt_len", "new_tokens", "repeats", "hf_repeats"):
    if getattr(args, name) is None:
      setattr(args, name, size[name])

  cfg = ModelConfig(**size["model"])
  rng = np.random.default_rng(0)
  prompts = rng.integers(1, cfg.vocab_size, size=(args.batch, args.prompt_len), dtype=np.int32)
  print(f"device={jax.devices()[0].device_kind} backend={jax.default_backend()} size={args.size} "
        f"batch={args.batch} prompt_len={args.prompt_len} new_tokens={args.new_tokens} dtype={cfg.dtype} "
        f"temperature={args.temperature} top_k={args.top_k} top_p={args.top_p}", flush=True)

  ours_s, ours_tokens = _time_ours(cfg, prompts, args)
  ours_tps = ours_tokens / ours_s
  print(f"sampler_seconds={ours_s:.4f} sampler_tokens={ours_tokens}", flush=True)
  if not args.no_hf:
    hf_s, hf_tokens = _time_hf(cfg, prompts, args)
    hf_tps = hf_tokens / hf_s
    print(f"hf_seconds={hf_s:.4f} hf_tokens={hf_tokens}")
    print(f"hf_tokens_per_s={hf_tps:.1f}")
    print(f"sampler_over_hf={ours_tps / hf_tps:.2f}")
  print(f"sampler_tokens_per_s={ours_tps:.1f}", flush=True)


if __name__ == "__main__":
  main()
