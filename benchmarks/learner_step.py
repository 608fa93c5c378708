"""Learner-step cost of GRPO vs the CAPO curvature modes, side by side on the same model, batch and optimizer.

    python -m benchmarks.learner_step --size tiny          # CPU: the main job's model, 128 rows × 64 tokens
    python -m benchmarks.learner_step --size peers --methods capo-last-layer   # CPU: benchmarks/peers.py's shape
    python -m benchmarks.learner_step --size qwen2-0.5b    # GPU: Qwen2-0.5B shape, random init, bf16, B=8×1024
    python -m benchmarks.learner_step --size qwen2-0.5b --micro-batches 12   # 96×1024, gradient accumulation

Every method is one jitted function ``(params, opt_state, batch) -> (params, opt_state, stat)`` that does the whole
learner step (forward, backward, curvature statistics, optax Adam update). Each is compiled and warmed up, then
timed in ``--repeats`` rounds of ``--steps`` chained calls per method, the methods alternating call by call (each
synchronised with ``block_until_ready``); the median ms/step is printed with the median of its per-round ratios to
GRPO and their range. The last line is ``capo_over_grpo=<ratio>`` (CAPO = the released last-layer model through
``capo_jax.masked_transform``).

Methods:
  grpo              fwd + bwd of the GRPO surrogate (ρ ≡ 1, seq-mean-token-mean) + Adam.
  capo-last-layer   the released CAPO: last-layer top-K model, token mask, one backward (``masked_transform``).
  fullnet-fisher    full-network token mask from one ``jax.jvp`` (δ_t, m_F = ½δ_t²) along the Adam proposal on the
                    unmasked batch; the masked gradient reuses the forward's ``jax.vjp`` (2 pullbacks).
  fullnet-jvp-jvp   same with m_H from ``jax.jvp``∘``jax.jvp`` (κ_t) and the symmetric Hessian rule.
  trust-region      ``trust_region_transform``: one jvp predicts the step's mean KL, the Adam step is scaled to δ.
  subset-theorem51  Theorem 5.1 acceptance over S subsets (prompt groups): per subset one ``jax.linearize`` of the
                    gradient (HVP + logit tangent), then one Adam step on the accepted mean gradient.
  grpo-whole-rows   GRPO with every row through the model whole, for sizes whose rows share prompts in groups
                    (``group``: the other methods run each prompt's columns once per group, as the trainer does).

With ``--micro-batches M > 1`` the batch is M micro-batches of B rows and every method accumulates over them in a
``lax.scan``; the full-network masks then need two passes (the Adam proposal needs the whole batch's gradient first).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from capo_jax import curvature_full as cf
from capo_jax import trust_region as tr
from capo_jax.logprobs import token_logprobs
from capo_jax.losses import policy_loss
from capo_jax.models import CausalLM, ModelConfig, apply

SIZES = {
    # CPU: the model of the README's main job (experiments/configs/arith_*.gin: vocabulary 1024, 2 layers of width
    # 128) on 16 prompts × 8 samples of 32 prompt + 32 completion tokens (the main job now uses 64 prompts per step).
    "tiny": dict(
        config=dict(vocab_size=1024, hidden_size=128, intermediate_size=384, num_layers=2, num_heads=4,
                    num_kv_heads=2, dtype="float32", param_dtype="float32"),
        batch=128, time=64, prompt=32, group=8, repeats=5, steps=3, subsets=4,
    ),
    # A smaller CPU smoke size (vocabulary 256, width 64): here CAPO's per-token K×H work is a large share of a
    # step that is itself almost free, so the ratio overstates the overhead.
    "micro": dict(
        config=dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                    num_kv_heads=2, dtype="float32", param_dtype="float32"),
        batch=8, time=64, prompt=16, repeats=7, steps=5, subsets=4,
    ),
    # The shape of benchmarks/peers.py (vocabulary 512, width 128, MLP 256, 4 layers, tied; 16 prompts × 8 samples of
    # 32 prompt + 32 completion tokens): the CAPO/GRPO ratio there, in interleaved rounds.
    "peers": dict(
        config=dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=4, num_heads=4,
                    num_kv_heads=2, tie_word_embeddings=True, dtype="float32", param_dtype="float32"),
        batch=128, time=64, prompt=32, group=8, repeats=7, steps=3, subsets=4,
    ),
    # Qwen2-0.5B shapes (random init), bf16 compute and storage.
    "qwen2-0.5b": dict(
        config=dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
                    num_kv_heads=2, tie_word_embeddings=True, dtype="bfloat16", param_dtype="bfloat16",
                    remat=True),
        batch=8, time=1024, prompt=256, repeats=5, steps=3, subsets=4,
    ),
}
LEARNING_RATE = 1e-4
TAU_FISHER, TAU_HESSIAN = 1e-4, 1e-2  # the released CAPO thresholds (docs/MATH.md §2.5)
MAX_KL = 1e-3


# ----------------------------------------------------------------------------------------------------------------
# Model, batch and the GRPO surrogate.


def make_problem(size: str, micro_batches: int, seed: int = 0):
  """Model and batch. Every row is a ``prompt``-token prompt then ``time − prompt`` completion columns, as the
  trainer's rows (``capo_jax.learner``): the learner scores the completion columns only. With ``group`` in the size
  (G samples per prompt) consecutive rows share their prompt in groups of G, as the rollout's do."""
  spec = SIZES[size]
  cfg = ModelConfig(**spec["config"])
  model = CausalLM(cfg, rngs=nnx.Rngs(seed))
  graphdef, params = nnx.split(model)
  b, t, prompt = spec["batch"], spec["time"], spec["prompt"]
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, cfg.vocab_size, (micro_batches, b, t), dtype=np.int32)
  group = spec.get("group", 1)
  tokens[..., :prompt] = np.repeat(tokens[:, ::group, :prompt], group, axis=1)
  # Completions of varying length (EOS, then padding that the mask drops) after a fixed-width prompt.
  lengths = rng.integers((t - prompt) // 2, t - prompt + 1, (micro_batches, b))
  completion = (np.arange(t - prompt)[None, None, :] < lengths[..., None]).astype(np.float32)
  rewards = rng.integers(0, 2, (micro_batches, b)).astype(np.float32)
  advantages = (rewards - rewards.mean(-1, keepdims=True)) / (rewards.std(-1, keepdims=True) + 1e-4)
  batch = {"tokens": jnp.asarray(tokens), "completion_mask": jnp.asarray(completion),
           "advantages": jnp.asarray(advantages, jnp.float32)}
  return cfg, graphdef, params, batch, spec


def make_fns(graphdef, prompt: int, group: int = 1):
  """The pure functions every method shares: logits and hidden states of the completion columns, the GRPO loss.

  As in the trainer (``capo_jax.learner.completion_hidden``), the unembedding runs only over the completion columns
  (hidden state ``prompt − 1 + n`` scores completion token ``n``), and with ``group`` G > 1 the prompt's columns but
  its last run once per group of G rows (``CausalLM.shared_prefix_hidden``); G = 1: every row runs whole.
  """

  def forward(params, mb):
    model = nnx.merge(graphdef, params)
    inputs = mb["tokens"][:, :-1]
    if group > 1:
      hidden = model.shared_prefix_hidden(inputs, jnp.ones_like(inputs), prefix_length=prompt - 1, group_size=group)
    else:
      hidden = model(inputs, return_logits=False).hidden[:, prompt - 1:]
    w = model.unembedding()
    logits = jnp.einsum("bnh,vh->bnv", hidden, w.astype(hidden.dtype), preferred_element_type=jnp.float32)
    return logits, hidden

  def logits_fn(params, mb):
    return forward(params, mb)[0]

  def actions(mb):
    return mb["tokens"][:, prompt:]

  def loss_from_logprobs(logp_bt, mb, token_mask_bt=None):
    # One gradient step per batch (the paper's aggressive regime): ρ ≡ 1, so old log-probs are the current ones.
    loss, _ = policy_loss(logp_bt, jax.lax.stop_gradient(logp_bt), mb["advantages"], mb["completion_mask"],
                          token_mask_bt=token_mask_bt)
    return loss

  def loss_from_logits(logits_btv, mb):
    return loss_from_logprobs(token_logprobs(logits_btv, actions(mb))[0], mb)

  return forward, logits_fn, actions, loss_from_logprobs, loss_from_logits


def _micro(batch, i):
  return jax.tree.map(lambda x: x[i], batch)


def accumulate(fn: Callable[[Any], tuple[Any, Any]], batch, num: int):
  """Σ over micro-batches of ``fn(mb) -> (grads, stat)``, divided by M; a plain call when M = 1."""
  if num == 1:
    return fn(_micro(batch, 0))

  def body(acc, mb):
    g, stat = fn(mb)
    return jax.tree.map(jnp.add, acc, g), stat

  g0, s0 = fn(_micro(batch, 0))
  rest = jax.tree.map(lambda x: x[1:], batch)
  acc, stats = jax.lax.scan(body, g0, rest)
  return jax.tree.map(lambda g: g / num, acc), jnp.mean(jnp.concatenate([s0[None], stats]))


# ----------------------------------------------------------------------------------------------------------------
# The methods.


def build_methods(graphdef, params, num_micro: int, subsets: int, prompt: int, group: int = 1
                  ) -> dict[str, Callable]:
  forward, logits_fn, actions, loss_from_logprobs, loss_from_logits = make_fns(graphdef, prompt, group)
  adam = optax.adam(LEARNING_RATE)

  def grad_of(mb, p):
    return jax.grad(lambda q: loss_from_logits(logits_fn(q, mb), mb))(p)

  def grpo(p, opt_state, batch):
    grads, _ = accumulate(lambda mb: (grad_of(mb, p), jnp.zeros(())), batch, num_micro)
    updates, opt_state = adam.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state, jnp.zeros(())

  whole_rows_logits_fn = make_fns(graphdef, prompt, 1)[1]

  def grpo_whole_rows(p, opt_state, batch):  # GRPO with every row through the model whole (no shared prompts)
    grads, _ = accumulate(lambda mb: (jax.grad(lambda q: loss_from_logits(whole_rows_logits_fn(q, mb), mb))(p),
                                      jnp.zeros(())), batch, num_micro)
    updates, opt_state = adam.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state, jnp.zeros(())

  def fullnet(second_order: bool):
    tau_h = TAU_HESSIAN if second_order else None

    def token_mask(p, mb, delta):
      stats = cf.full_network_token_stats(
          logits_fn, p, mb, delta, actions(mb), mb["advantages"], second_order=second_order)
      return cf.full_network_token_mask(stats, mb["completion_mask"], tau_fisher=TAU_FISHER, tau_hessian=tau_h)

    def rejected(keep, mb):
      return 1.0 - jnp.sum(keep) / jnp.maximum(jnp.sum(mb["completion_mask"]), 1.0)

    def step(p, opt_state, batch):
      if num_micro == 1:
        mb = _micro(batch, 0)
        # One forward serves both gradients: the unmasked one (for the Adam proposal Δθ) and the masked one.
        logp, pullback = jax.vjp(lambda q: token_logprobs(logits_fn(q, mb), actions(mb))[0], p)
        grads = pullback(jax.grad(loss_from_logprobs)(logp, mb))[0]
        delta, _ = adam.update(grads, opt_state, p)
        keep = token_mask(p, mb, delta)
        grads = pullback(jax.grad(loss_from_logprobs)(logp, mb, keep))[0]
        frac = rejected(keep, mb)
      else:
        grads, _ = accumulate(lambda mb: (grad_of(mb, p), jnp.zeros(())), batch, num_micro)
        delta, _ = adam.update(grads, opt_state, p)

        def masked(mb):
          keep = token_mask(p, mb, delta)
          g = jax.grad(lambda q: loss_from_logprobs(
              token_logprobs(logits_fn(q, mb), actions(mb))[0], mb, keep))(p)
          return g, rejected(keep, mb)

        grads, frac = accumulate(masked, batch, num_micro)
      updates, opt_state = adam.update(grads, opt_state, p)
      return optax.apply_updates(p, updates), opt_state, frac

    return step

  trust = tr.trust_region_transform(adam, max_kl=MAX_KL, logits_fn=logits_fn)

  def trust_region(p, tr_state, batch):
    grads, _ = accumulate(lambda mb: (grad_of(mb, p), jnp.zeros(())), batch, num_micro)
    if num_micro == 1:
      updates, tr_state = trust.update(grads, tr_state, p, batch=_micro(batch, 0))
    else:
      # The KL of the step over the whole batch = mean over micro-batches of the per-micro-batch KL (equal sizes).
      delta, inner_state = adam.update(grads, tr_state.inner_state, p)
      kl = jnp.mean(jax.lax.map(lambda mb: cf.predicted_mean_kl(logits_fn, p, mb, delta, mb["completion_mask"]),
                                batch))
      scale = tr.trust_region_scale(kl, MAX_KL)
      updates = jax.tree.map(lambda u: (u * scale).astype(u.dtype), delta)
      tr_state = tr.TrustRegionState(inner_state, kl, scale)
    return optax.apply_updates(p, updates), tr_state, tr_state.scale

  def subset_theorem51(p, opt_state, batch):
    # Subsets = the S prompt groups of each micro-batch (rows are ordered by prompt).
    subs = jax.tree.map(lambda x: x.reshape((x.shape[0] * subsets, x.shape[1] // subsets) + x.shape[2:]), batch)
    grads, stats = cf.subset_acceptance(
        logits_fn, loss_from_logits, p, subs, cf.optimizer_proposal(adam, opt_state, p),
        delta_h=0.0, delta_f=MAX_KL, completion_mask_fn=lambda b: b["completion_mask"])
    updates, opt_state = adam.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state, stats.accepted_fraction

  methods = {
      "grpo": (grpo, adam.init, "-"),
      "capo-last-layer": capo_last_layer_method(forward, actions, loss_from_logprobs, num_micro),
      "fullnet-fisher": (fullnet(False), adam.init, "rejected"),
      "fullnet-jvp-jvp": (fullnet(True), adam.init, "rejected"),
      "trust-region": (trust_region, trust.init, "scale"),
      "subset-theorem51": (subset_theorem51, adam.init, "accepted"),
      "grpo-whole-rows": (grpo_whole_rows, adam.init, "-") if group > 1 else None,
  }
  return {k: v for k, v in methods.items() if v is not None}


def capo_last_layer_method(forward, actions_fn, loss_from_logprobs, num_micro):
  """The released CAPO through ``capo_jax.masked_transform``: mask from the forward's outputs, one backward pass."""
  try:
    from capo_jax.masked_transform import masked_transform
  except ImportError:
    return None
  capo = masked_transform(optax.adam(LEARNING_RATE), tau_fisher=TAU_FISHER, tau_hessian=TAU_HESSIAN,
                          learning_rate=LEARNING_RATE)

  def step(p, opt_state, batch):
    def masked_grad(mb):
      def loss_fn(q):
        logits, hidden = forward(q, mb)
        actions = actions_fn(mb)
        keep, aux = capo.token_mask(opt_state, hidden, logits, actions, mb["advantages"], mb["completion_mask"])
        return loss_from_logprobs(token_logprobs(logits, actions)[0], mb, keep), aux

      return jax.grad(loss_fn, has_aux=True)(p)

    if num_micro == 1:
      grads, aux = masked_grad(_micro(batch, 0))
      rejected = aux.metrics["rejected_fraction"]
    else:
      # Real-moment CAPO needs capo_aux only for its logged metrics, so the micro-batch loop keeps just the rate.
      def one(mb):
        grads, aux = masked_grad(mb)
        return grads, aux.metrics["rejected_fraction"]

      grads, rejected = accumulate(one, batch, num_micro)
      aux = None
    updates, opt_state = capo.update(grads, opt_state, p, capo_aux=aux)
    return optax.apply_updates(p, updates), opt_state, rejected

  return step, capo.init, "rejected"


# ----------------------------------------------------------------------------------------------------------------
# Timing.


def compile_method(step, init, params, batch):
  """Jit, compile and warm up one method; returns the jitted step and its initial optimizer state."""
  opt_state = init(params)
  fn = jax.jit(step)
  for _ in range(2):  # compile, then one warm call
    jax.block_until_ready(fn(params, opt_state, batch))
  return fn, opt_state


def time_steps(fn, opt_state, params, batch, steps: int) -> tuple[float, float]:
  """ms per step over ``steps`` chained calls, synchronised with ``block_until_ready``; and the last statistic."""
  start = time.perf_counter()
  p, s = params, opt_state
  for _ in range(steps):
    p, s, stat = fn(p, s, batch)
  jax.block_until_ready((p, s, stat))
  return (time.perf_counter() - start) / steps * 1e3, float(stat)


def time_round(compiled: dict, params, batch, steps: int) -> tuple[dict[str, float], dict[str, float]]:
  """One round: ``steps`` chained calls of every method, the methods alternating call by call (each call
  synchronised with ``block_until_ready``), so that a change in the machine's load within the round hits every
  method alike. Returns ms per step of each method and its last statistic."""
  state = {name: (params, opt_state) for name, (_, opt_state) in compiled.items()}
  total = {name: 0.0 for name in compiled}
  stat = {}
  for _ in range(steps):
    for name, (fn, _) in compiled.items():
      p, s = state[name]
      start = time.perf_counter()
      p, s, out = jax.block_until_ready(fn(p, s, batch))
      total[name] += time.perf_counter() - start
      state[name], stat[name] = (p, s), out
  return {name: t / steps * 1e3 for name, t in total.items()}, {name: float(v) for name, v in stat.items()}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
  parser.add_argument("--micro-batches", type=int, default=1)
  parser.add_argument("--methods", default="all", help="comma-separated subset of the methods, or 'all'")
  parser.add_argument("--repeats", type=int, default=None)
  parser.add_argument("--steps", type=int, default=None)
  args = parser.parse_args(argv)

  cfg, graphdef, params, batch, spec = make_problem(args.size, args.micro_batches)
  repeats = args.repeats or spec["repeats"]
  steps = args.steps or spec["steps"]
  methods = build_methods(graphdef, params, args.micro_batches, spec["subsets"], spec["prompt"], spec.get("group", 1))
  if args.methods != "all":
    wanted = args.methods.split(",")
    unknown = set(wanted) - set(methods)
    if unknown:
      raise SystemExit(f"unknown or unavailable methods {sorted(unknown)}; available: {sorted(methods)}")
    methods = {k: methods[k] for k in ["grpo"] + [w for w in wanted if w != "grpo"]}
  b, t = batch["tokens"].shape[1:]
  n_params = sum(x.size for x in jax.tree.leaves(params))
  print(f"device={jax.devices()[0].device_kind} size={args.size} params={n_params / 1e6:.2f}M "
        f"batch={args.micro_batches}x{b}x{t} group={spec.get('group', 1)} dtype={cfg.dtype} repeats={repeats} "
        f"steps={steps}", flush=True)
  compiled = {name: compile_method(step, init, params, batch) for name, (step, init, _) in methods.items()}
  # Each method's ratio to GRPO is the median of its per-round ratios (the rounds alternate the methods call by
  # call: ``time_round``); the range of the per-round ratios is printed beside it.
  ms = {name: [] for name in methods}
  for _ in range(repeats):
    elapsed, stat = time_round(compiled, params, batch, steps)
    for name in methods:
      ms[name].append(elapsed[name])
  rounds = {name: np.array(ms[name]) / np.array(ms["grpo"]) for name in methods}
  ratio = {name: statistics.median(r) for name, r in rounds.items()}
  for name, (_, _, stat_name) in methods.items():
    note = "" if stat_name == "-" else f"  ({stat_name}={stat[name]:.3g})"
    spread = f" [{rounds[name].min():.2f}–{rounds[name].max():.2f}]" if name != "grpo" else " " * 12
    print(f"{name:18s} {statistics.median(ms[name]):9.2f} ms/step  {ratio[name]:5.2f}x grpo{spread}{note}",
          flush=True)
  if "capo-last-layer" not in ratio:
    print("capo-last-layer: capo_jax.masked_transform not available yet")
    print("capo_over_grpo=nan")
  else:
    print(f"capo_over_grpo={ratio['capo-last-layer']:.3f}")


if __name__ == "__main__":
  main()
