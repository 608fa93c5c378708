"""A seconds-long demo of the pure GRPO core: a softmax policy learns a 16-prompt × 32-answer verifiable task.

    python -m experiments.demo [--steps 60] [--lr 0.05]

Each step samples G answers per prompt, scores them (1 if right), turns rewards into GRPO advantages and takes one
Adam step on the clipped surrogate — the same functions the LLM trainer uses, on a one-token "completion".
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax

import capo_jax


def main(argv=None) -> float:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=60)
  parser.add_argument("--lr", type=float, default=0.05)
  parser.add_argument("--group_size", type=int, default=8)
  args = parser.parse_args(argv)
  num_prompts, num_answers, g = 16, 32, args.group_size
  answers = jax.random.randint(jax.random.PRNGKey(1), (num_prompts,), 0, num_answers)
  params = jnp.zeros((num_prompts, num_answers))
  opt = optax.adam(args.lr)
  opt_state = opt.init(params)

  @jax.jit
  def step(params, opt_state, key):
    logits_bv = jnp.repeat(params, g, axis=0)
    actions_b = jax.random.categorical(key, logits_bv)
    rewards_b = (actions_b == jnp.repeat(answers, g)).astype(jnp.float32)
    adv_b = capo_jax.grpo_advantages(rewards_b, g)

    def loss_fn(params):
      lp, ent = capo_jax.token_logprobs(jnp.repeat(params, g, axis=0)[:, None, :], actions_b[:, None])
      return capo_jax.policy_loss(lp, jax.lax.stop_gradient(lp), adv_b, jnp.ones_like(lp), entropy_bt=ent)

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, jnp.mean(rewards_b), metrics["entropy"]

  key = jax.random.PRNGKey(0)
  for i in range(args.steps):
    key, sub = jax.random.split(key)
    params, opt_state, reward, entropy = step(params, opt_state, sub)
    if i % 10 == 0 or i == args.steps - 1:
      print(f"step {i:3d}  reward_mean {float(reward):.3f}  entropy {float(entropy):.3f}")
  accuracy = float(jnp.mean(jnp.argmax(params, axis=1) == answers))
  print(f"greedy_accuracy={accuracy:.3f}")
  return accuracy


if __name__ == "__main__":
  main()
