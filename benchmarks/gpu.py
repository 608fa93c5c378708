"""The GPU check in one process: our learner steps and sampler beside HF transformers (torch) on the same shapes.

    python -m benchmarks.gpu                  # GPU: Qwen2.5-0.5B and 1.5B shapes, random init, bf16
    python -m benchmarks.gpu --size tiny      # CPU smoke run: the CPU shapes of the two benchmarks, ratios only
    bash benchmarks/gpu_check.sh              # the same on a lent device, output kept under $OUT

Nothing here is new measuring code: the learner rows are ``benchmarks.learner_step`` (``make_problem``,
``build_methods``, ``compile_method``, ``time_steps``) and the sampler rows ``benchmarks.sampler`` (``_time_ours``,
``_time_hf``); this module adds the Qwen2.5 shapes, the HF learner step, MFU and one time guard. See
docs/PERFORMANCE.md for what each row means and for the results.

Rows, per shape (``--size gpu``: 0.5B and 1.5B; ``--size tiny``: one CPU shape):

* learner ``grpo``, ``capo-last-layer``, ``fullnet-fisher``, ``fullnet-jvp-jvp``, ``trust-region``: one jitted step
  each (forward, backward, curvature statistics, Adam) on B rows × T tokens, the loss over the T − prompt completion
  columns (``--size gpu``: 8 × 1024, prompt 256, remat ``full``).
* HF learner: ``transformers.Qwen2ForCausalLM`` of the same shape (random init, same dtype) on the same tokens: forward
  with ``logits_to_keep`` = the completion columns, the same surrogate (ρ ≡ 1, seq-mean-token-mean), backward and a
  ``torch.optim.AdamW`` step (fused on CUDA); activation checkpointing on when our model rematerialises.
* top-K: CAPO's top-50 over the batch's completion positions at the shape's vocabulary, in the loss's logits chunks:
  ``jax.lax.top_k`` (the mask's path off the CPU), the elementwise selection of ``capo_jax.ops.top_k.top_k_set`` and
  ``top_k_in_rounds`` (top-16 four times), with each one's share of our GRPO step (``time_top_k``).
* sampler: ours against HF ``generate`` on the same shape (``--size gpu``: 96 rows, prompt 256, 512 new tokens, no
  early stop, plain sampling at T = 1).

Printed per row: time, ours/HF (time over time: below 1 is faster), the ratio to our GRPO step, and on a GPU the MFU:
model FLOPs over time over the peak dense bf16 FLOP/s of the detected GPU (the assumed peak is printed;
``--peak-tflops`` overrides it). Model FLOPs: 6·N·B·T for a learner step, 2·N·(generated tokens) for the sampler (a
forward pass per token; prefill not counted), N = all parameters.

Order: the learner's GRPO, CAPO and HF rows of every shape first, then the samplers, then the full-network masks and
the trust region. A time guard stops starting new measurements once ``--budget-s`` seconds have passed since start
(a measurement already running finishes) and prints what it skipped; a measurement that fails prints its error and
the run goes on; on SIGTERM (gpu_check.sh's stage limit) it stops and still prints the rows measured so far. The last
lines are ``key=value`` summaries (``*_over_hf_*``, ``capo_over_grpo_*``, ``mfu_*``, ``*tokens_per_s_*``,
``topk_*``).
"""

from __future__ import annotations

import os

# JAX and torch share the GPU in this process: stop JAX from pre-allocating 75% of it (as benchmarks.sampler does).
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.6")

import argparse  # noqa: E402
import inspect  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks import learner_step  # noqa: E402
from benchmarks import sampler as sampler_bench  # noqa: E402
from capo_jax.models import CausalLM, ModelConfig  # noqa: E402
from capo_jax.ops import chunking  # noqa: E402
from capo_jax.ops import top_k as top_k_ops  # noqa: E402

# Qwen2.5 shapes (HF config.json of each checkpoint), random init, bf16 compute and storage.
QWEN25 = {
    "0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
                 num_kv_heads=2),
    "1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28, num_heads=12,
                 num_kv_heads=2),
}
QWEN25_COMMON = dict(tie_word_embeddings=True, rope_theta=1e6, rms_norm_eps=1e-6, dtype="bfloat16",
                     param_dtype="bfloat16")
# The learner's problems, registered in benchmarks.learner_step.SIZES so that its make_problem builds them.
for _name, _shape in QWEN25.items():
  learner_step.SIZES.setdefault(f"qwen2.5-{_name}", dict(
      config=dict(_shape, **QWEN25_COMMON, remat=True), batch=8, time=1024, prompt=256, repeats=3, steps=3,
      subsets=4))

RUNS = {
    "gpu": dict(
        shapes={name: dict(learner=f"qwen2.5-{name}", sampler=dict(shape, **QWEN25_COMMON))
                for name, shape in QWEN25.items()},
        sampler=dict(batch=96, prompt_len=256, new_tokens=512, repeats=2, hf_repeats=1),
        repeats=3, steps=3, hf_steps=5),
    # The CPU shapes of the two benchmarks: learner_step's "tiny" (the main job's model) and sampler's "tiny".
    "tiny": dict(
        shapes={"tiny": dict(learner="tiny", sampler=sampler_bench.SIZES["tiny"]["model"])},
        sampler=dict(batch=8, prompt_len=32, new_tokens=64, repeats=2, hf_repeats=1),
        repeats=2, steps=2, hf_steps=2),
}
PRIMARY = ("grpo", "capo-last-layer")
SECONDARY = ("fullnet-fisher", "fullnet-jvp-jvp", "trust-region")
# Peak dense bf16 tensor FLOP/s by device-kind substring, first match wins (vendor datasheets, no sparsity).
PEAK_BF16 = (("H200", 989e12), ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("A100", 312e12))


def peak_flops(override_tflops: float | None) -> tuple[float | None, str]:
  """The peak bf16 FLOP/s assumed for MFU and a line saying where it comes from (None off a GPU)."""
  kind = jax.devices()[0].device_kind
  if override_tflops:
    return override_tflops * 1e12, f"{override_tflops:g} TFLOP/s (--peak-tflops) on {kind}"
  if jax.default_backend() != "gpu":
    return None, f"none: backend {jax.default_backend()} ({kind}), no MFU"
  for key, value in PEAK_BF16:
    if key.lower() in kind.lower():
      return value, f"{value / 1e12:g} TFLOP/s dense bf16 ({key}) on {kind}"
  return None, f"unknown GPU {kind!r}, no MFU (pass --peak-tflops)"


class Stopped(BaseException):
  """SIGTERM (gpu_check.sh's stage limit): the measurements stop and the rows measured so far are printed."""


def _on_sigterm(signum, frame):
  del signum, frame
  raise Stopped()


class Guard:
  """Runs measurements in order until ``budget_s`` has passed; records what was skipped or failed."""

  def __init__(self, budget_s: float):
    self.start, self.budget_s = time.monotonic(), budget_s
    self.skipped: list[str] = []
    self.failed: list[str] = []
    self.current = "start-up"

  def elapsed(self) -> float:
    return time.monotonic() - self.start

  def run(self, name: str, fn):
    if self.elapsed() > self.budget_s:
      self.skipped.append(name)
      print(f"-- skip {name}: time guard ({self.elapsed():.0f} s > {self.budget_s:.0f} s)", flush=True)
      return None
    begin, self.current = time.monotonic(), name
    try:
      result = fn()
    except Exception as e:  # pylint: disable=broad-except
      self.failed.append(name)
      print(f"-- FAILED {name}: {type(e).__name__}: {str(e)[:500]}", flush=True)
      return None
    print(f"-- {name}: {result['line']}  [{time.monotonic() - begin:.0f} s, at {self.elapsed():.0f} s]", flush=True)
    return result


# ----------------------------------------------------------------------------------------------------------------
# Learner rows.


class LearnerProblem:
  """One shape's model, batch and methods, built by ``benchmarks.learner_step``."""

  def __init__(self, size: str):
    self.cfg, self.graphdef, self.params, self.batch, self.spec = learner_step.make_problem(size, 1)
    self.methods = learner_step.build_methods(self.graphdef, self.params, 1, self.spec["subsets"],
                                              self.spec["prompt"])
    self.num_params = sum(x.size for x in jax.tree.leaves(self.params))
    self.tokens = int(np.prod(self.batch["tokens"].shape))


def time_ours(problem: LearnerProblem, method: str, repeats: int, steps: int) -> dict:
  step, init, stat_name = problem.methods[method]
  fn, opt_state = learner_step.compile_method(step, init, problem.params, problem.batch)
  runs = [learner_step.time_steps(fn, opt_state, problem.params, problem.batch, steps) for _ in range(repeats)]
  ms = statistics.median(r[0] for r in runs)
  note = "" if stat_name == "-" else f" ({stat_name}={runs[-1][1]:.3g})"
  return dict(ms=ms, line=f"{ms:.2f} ms/step{note}")


def time_top_k(problem: LearnerProblem, repeats: int, k: int = 50) -> dict:
  """CAPO's top-K over one batch's completion positions at this shape's vocabulary, one chunk of the loss's logits
  at a time (``chunking.auto_chunk``: ≤ 64 MiB of float32 per chunk), times the number of chunks: ``jax.lax.top_k``
  (what the mask runs off the CPU) beside ``top_k_set``'s selection path forced on (elementwise passes only) and
  ``top_k_in_rounds`` (four top-16s). XLA's GPU TopK kernel serves k ≤ 16; for CAPO's k = 50 it sorts the rows,
  which this row measures. Random normal logits: their order along the vocabulary, which is what a partial sort's
  cost depends on, is as random as real ones'."""
  vocab = problem.cfg.vocab_size
  _, b, t = problem.batch["tokens"].shape
  rows = b * (t - problem.spec["prompt"])
  chunk = chunking.auto_chunk(1, rows, vocab, None)
  z = jax.random.normal(jax.random.key(0), (chunk, vocab), jnp.float32)
  fns = {"lax": jax.jit(lambda z: jax.lax.top_k(z, k)),
         "select": jax.jit(lambda z: top_k_ops.top_k_set(z, k, enabled=True)),
         "rounds": jax.jit(lambda z: top_k_ops.top_k_in_rounds(z, k))}
  outs = {name: jax.block_until_ready(fn(z)) for name, fn in fns.items()}
  same = bool(jnp.all(jnp.sort(outs["lax"][1], axis=-1) == jnp.sort(outs["select"][1], axis=-1))
              & jnp.all(outs["lax"][1] == outs["rounds"][1]))
  calls = 5
  ms = {}
  for name, fn in fns.items():
    rounds = []
    for _ in range(repeats):
      start = time.perf_counter()
      for _ in range(calls):
        out = fn(z)
      jax.block_until_ready(out)
      rounds.append((time.perf_counter() - start) / calls * 1e3)
    ms[name] = statistics.median(rounds) * -(-rows // chunk)
  return dict(ms=ms, line=f"{rows} positions × V={vocab} in chunks of {chunk}: lax.top_k {ms['lax']:.2f} ms, "
                          f"selection {ms['select']:.2f} ms, rounds of 16 {ms['rounds']:.2f} ms (same: {same})")


def time_hf_learner(problem: LearnerProblem, repeats: int, steps: int) -> dict:
  """HF ``Qwen2ForCausalLM`` fwd + bwd + AdamW on the batch of ``problem`` (module docstring)."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel

  cfg, prompt = problem.cfg, problem.spec["prompt"]
  device = "cuda" if torch.cuda.is_available() else "cpu"
  dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[cfg.dtype]
  hf_config = transformers.Qwen2Config(**{k: v for k, v in cfg.to_hf_dict().items() if k != "architectures"})
  torch.manual_seed(0)
  with torch.device(device):
    model = transformers.Qwen2ForCausalLM(hf_config).to(dtype)
  remat = cfg.remat != "none"
  if remat:
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
  model.train()  # no dropout in Qwen2; checkpointing is active in training mode only
  optimizer = torch.optim.AdamW(model.parameters(), lr=learner_step.LEARNING_RATE, weight_decay=0.0,
                                **({"fused": True} if device == "cuda" else {}))
  batch = jax.tree.map(lambda x: np.array(x[0]), problem.batch)  # a writable host copy for torch
  tokens = torch.as_tensor(batch["tokens"], dtype=torch.long, device=device)
  mask = torch.as_tensor(batch["completion_mask"], device=device)
  advantages = torch.as_tensor(batch["advantages"], device=device)
  inputs, actions, keep = tokens[:, :-1], tokens[:, prompt:], tokens.shape[1] - prompt

  # logits_to_keep: the last T − prompt positions of the T − 1 inputs, i.e. the rows' completion columns (a
  # transformers without the argument computes every position's logits, which are then sliced).
  slices = "logits_to_keep" in inspect.signature(model.forward).parameters
  forward_kwargs = dict(logits_to_keep=keep) if slices else {}

  def step():
    logits = model(input_ids=inputs, use_cache=False, **forward_kwargs).logits[:, -keep:]
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, actions[..., None])[..., 0]
    ratio = torch.exp(logp - logp.detach())  # ρ ≡ 1, as our GRPO surrogate
    per_row = (ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
    loss = -(per_row * advantages).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

  def sync():
    if device == "cuda":
      torch.cuda.synchronize()

  for _ in range(2):  # warm-up: CUDA context, kernels, allocator, optimizer state
    step()
  sync()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(steps):
      step()
    sync()
    times.append((time.perf_counter() - start) / steps * 1e3)
  del model, optimizer
  if device == "cuda":
    torch.cuda.empty_cache()
  ms = statistics.median(times)
  return dict(ms=ms, line=f"{ms:.2f} ms/step (torch {torch.__version__}, transformers {transformers.__version__} on "
                          f"{device}, checkpointing {'on' if remat else 'off'}"
                          f"{'' if slices else ', logits of every position'})")


# ----------------------------------------------------------------------------------------------------------------
# Sampler rows.


def sampler_problem(model: dict, spec: dict):
  cfg = ModelConfig(**model)
  prompts = np.random.default_rng(0).integers(1, cfg.vocab_size, size=(spec["batch"], spec["prompt_len"]),
                                              dtype=np.int32)
  args = argparse.Namespace(new_tokens=spec["new_tokens"], repeats=spec["repeats"], hf_repeats=spec["hf_repeats"],
                            temperature=1.0, top_k=0, top_p=1.0)
  return cfg, prompts, args


def time_sampler(timer, model: dict, spec: dict) -> dict:
  seconds, tokens = timer(*sampler_problem(model, spec))
  return dict(s=seconds, tokens=tokens, line=f"{seconds:.3f} s for {tokens} tokens = {tokens / seconds:,.0f} tok/s")


def count_params(model: dict) -> int:
  abstract = nnx.eval_shape(lambda: CausalLM(ModelConfig(**model), rngs=nnx.Rngs(0)))
  return sum(x.size for x in jax.tree.leaves(nnx.split(abstract)[1]))


# ----------------------------------------------------------------------------------------------------------------


def hf_status(gpu: bool) -> str | None:
  """None when the HF rows can run here, else the one line that says why they are skipped."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
    import transformers  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError as e:
    return f"HF rows skipped: torch/transformers not importable ({e})"
  if gpu and not torch.cuda.is_available():
    return f"HF rows skipped: torch {torch.__version__} sees no CUDA device (HF on the CPU would not compare)"
  return None


def _fmt_ms(ms):
  return "-" if ms is None else f"{ms:10.2f} ms"


def _pct(x):
  return "-" if x is None else f"{100 * x:5.1f}%"


def _ratio(x):
  return "-" if x is None else f"{x:.3f}"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size", choices=sorted(RUNS), default="gpu")
  parser.add_argument("--shapes", default=None, help="comma-separated subset of the size's shapes")
  parser.add_argument("--budget-s", type=float, default=450.0, help="start no measurement after this many seconds")
  parser.add_argument("--repeats", type=int, default=None, help="timed rounds per learner row (median reported)")
  parser.add_argument("--steps", type=int, default=None, help="chained steps per timed round")
  parser.add_argument("--no-hf", action="store_true", help="skip the HF transformers rows")
  parser.add_argument("--peak-tflops", type=float, default=None, help="peak bf16 TFLOP/s for MFU")
  args = parser.parse_args(argv)
  run = RUNS[args.size]
  shapes = run["shapes"] if args.shapes is None else {k: run["shapes"][k] for k in args.shapes.split(",")}
  repeats, steps = args.repeats or run["repeats"], args.steps or run["steps"]
  guard = Guard(args.budget_s)
  gpu = jax.default_backend() == "gpu"
  peak, peak_line = peak_flops(args.peak_tflops)
  skip_hf = "HF rows skipped: --no-hf" if args.no_hf else hf_status(gpu)
  spec = run["sampler"]
  print(f"device={jax.devices()[0].device_kind} backend={jax.default_backend()} jax={jax.__version__} "
        f"size={args.size} shapes={','.join(shapes)} budget={args.budget_s:.0f}s repeats={repeats} steps={steps}",
        flush=True)
  print(f"peak for MFU: {peak_line}", flush=True)
  if skip_hf:
    print(skip_hf, flush=True)

  problems: dict[str, LearnerProblem] = {}

  def problem(shape):
    if shape not in problems:
      problems[shape] = LearnerProblem(shapes[shape]["learner"])
      p = problems[shape]
      print(f"   {shape}: learner {p.num_params / 1e6:.1f}M params, batch {tuple(p.batch['tokens'].shape[1:])}, "
            f"prompt {p.spec['prompt']}, dtype {p.cfg.dtype}, remat {p.cfg.remat}", flush=True)
    return problems[shape]

  results: dict[tuple[str, str], dict] = {}

  def learner_rows(methods):
    for shape in shapes:
      for method in methods:
        r = guard.run(f"{shape} learner {method}", lambda: time_ours(problem(shape), method, repeats, steps))
        if r:
          results[(shape, method)] = r
      if methods is PRIMARY:
        r = guard.run(f"{shape} top-K", lambda: time_top_k(problem(shape), repeats))
        if r:
          results[(shape, "top-k")] = r
      if methods is PRIMARY and not skip_hf:
        r = guard.run(f"{shape} learner HF", lambda: time_hf_learner(problem(shape), repeats, run["hf_steps"]))
        if r:
          results[(shape, "hf-learner")] = r

  def sampler_rows():
    for shape, where in shapes.items():
      r = guard.run(f"{shape} sampler ours", lambda: time_sampler(sampler_bench._time_ours, where["sampler"], spec))
      if r:
        results[(shape, "sampler")] = r
      if not skip_hf:
        r = guard.run(f"{shape} sampler HF generate",
                      lambda: time_sampler(sampler_bench._time_hf, where["sampler"], spec))
        if r:
          results[(shape, "hf-sampler")] = r

  signal.signal(signal.SIGTERM, _on_sigterm)
  try:
    learner_rows(PRIMARY)
    sampler_rows()
    learner_rows(SECONDARY)
  except Stopped:
    print(f"-- stopped by SIGTERM at {guard.elapsed():.0f} s during {guard.current}; the rows measured so far follow",
          flush=True)
    guard.failed.append(f"{guard.current} (SIGTERM)")

  # ---- the table and the key=value summary
  print(f"\n== results: {jax.devices()[0].device_kind}; peak for MFU: {peak_line}")
  print(f"{'shape':6s} {'row':22s} {'ours':>13s} {'HF':>13s} {'ours/HF':>8s} {'x grpo':>7s} {'MFU ours':>8s} "
        f"{'MFU HF':>8s}")
  summary = []
  for shape in shapes:
    p = problems.get(shape)
    hf = results.get((shape, "hf-learner"))
    grpo = results.get((shape, "grpo"))
    for method in PRIMARY + SECONDARY:
      r = results.get((shape, method))
      if r is None:
        continue
      over_hf = r["ms"] / hf["ms"] if hf else None
      over_grpo = r["ms"] / grpo["ms"] if grpo else None
      flops = 6 * p.num_params * p.tokens
      mfu = flops / (r["ms"] / 1e3) / peak if peak else None
      mfu_hf = flops / (hf["ms"] / 1e3) / peak if (peak and hf and method == "grpo") else None
      print(f"{shape:6s} {'learner ' + method:22s} {_fmt_ms(r['ms'])} {_fmt_ms(hf['ms'] if hf else None):>13s} "
            f"{_ratio(over_hf):>8s} {_ratio(over_grpo):>7s} {_pct(mfu):>8s} {_pct(mfu_hf):>8s}")
      key = method.replace("-", "_")
      if over_hf is not None:
        summary.append(f"{key}_over_hf_{shape}={over_hf:.3f}")
      if over_grpo is not None and method != "grpo":
        summary.append(f"{'capo' if method == 'capo-last-layer' else key}_over_grpo_{shape}={over_grpo:.3f}")
      if mfu is not None:
        summary.append(f"mfu_{key}_{shape}={mfu:.4f}")
      if mfu_hf is not None:
        summary.append(f"mfu_hf_learner_{shape}={mfu_hf:.4f}")
    top = results.get((shape, "top-k"))
    if top:
      names = ("lax", "select", "rounds")
      share = " / ".join(f"{top['ms'][n] / grpo['ms']:.3f}" if grpo else "-" for n in names)
      print(f"{shape:6s} {'top-K lax/select/rounds':22s} " + " ".join(f"{top['ms'][n]:.2f} ms" for n in names)
            + f"  x grpo {share}")
      summary += [f"topk_{n}_ms_{shape}={top['ms'][n]:.3f}" for n in names]
      summary += [f"topk_{n}_over_lax_{shape}={top['ms'][n] / top['ms']['lax']:.3f}" for n in names[1:]]
    ours, hf = results.get((shape, "sampler")), results.get((shape, "hf-sampler"))
    if ours or hf:
      n = count_params(shapes[shape]["sampler"]) if peak else 0
      row = [f"{x['s']:10.3f} s " if x else "-" for x in (ours, hf)]
      over_hf = ours["s"] / hf["s"] if (ours and hf) else None
      mfu = [2 * n * x["tokens"] / x["s"] / peak if (x and peak) else None for x in (ours, hf)]
      label = f"sampler {spec['batch']}x{spec['new_tokens']}"
      print(f"{shape:6s} {label:22s} {row[0]:>13s} {row[1]:>13s} {_ratio(over_hf):>8s} {'':>7s} {_pct(mfu[0]):>8s} "
            f"{_pct(mfu[1]):>8s}")
      if ours:
        summary.append(f"sampler_tokens_per_s_{shape}={ours['tokens'] / ours['s']:.1f}")
      if hf:
        summary.append(f"hf_tokens_per_s_{shape}={hf['tokens'] / hf['s']:.1f}")
      if over_hf is not None:
        summary.append(f"sampler_over_hf_{shape}={over_hf:.4f}")
      if mfu[0] is not None:
        summary.append(f"mfu_sampler_{shape}={mfu[0]:.4f}")
  print("ours/HF: time over time (below 1: ours is faster); x grpo: time over our GRPO step's; MFU: 6·N·B·T "
        "(learner) or 2·N·generated tokens (sampler) / time / peak")
  if skip_hf:
    print(skip_hf)
  print(f"skipped (time guard): {', '.join(guard.skipped) or 'none'}")
  print(f"failed: {', '.join(guard.failed) or 'none'}")
  print(f"total {guard.elapsed():.0f} s")
  for line in summary:
    print(line)


if __name__ == "__main__":
  main()
