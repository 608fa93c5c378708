"""Numerical kernels shared by the model modules, with no model or RL meaning of their own.

- ``capo_jax.ops.top_k``     exact top-K over the last axis (``lax.top_k``'s result, fast on XLA:CPU)
- ``capo_jax.ops.chunking``  the time-chunking rule and loops that keep [B, T, V] arrays out of memory
"""
