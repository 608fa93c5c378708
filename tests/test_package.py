"""The installed package imports without TensorFlow, torch or transformers, and exposes its API flatly."""

import subprocess
import sys


def test_import_pulls_in_no_tensorflow_torch_or_transformers():
  code = ("import sys, capo_jax; heavy = [m for m in ('tensorflow', 'torch', 'transformers') if m in sys.modules]; "
          "print(heavy)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
  assert out.stdout.strip() == "[]", out.stdout


def test_flat_api_reaches_every_stage():
  import capo_jax  # pylint: disable=import-outside-toplevel
  for name in ("grpo_advantages", "token_logprobs", "policy_loss", "masked_transform", "trust_region_transform",
               "full_network_token_stats", "subset_acceptance", "CausalLM", "load_hf", "save_hf", "sample",
               "load_tokenizer", "extract_boxed", "preset"):
    assert callable(getattr(capo_jax, name)), name
