"""Shared pytest fixtures, XLA's cheapest compile settings and one compilation cache for the whole suite.

The test programs are tiny, so compiling them costs more than running them: every test (and every subprocess a test
starts, which inherits the environment) runs with LLVM's backend optimisation off and, on the jaxlib versions where it
was measured, XLA:CPU's classic fusion emitters instead of the MLIR ones (a learner step compiles in less than half
the time). The flags change code generation, not the operations XLA computes; results may differ from an optimised
build in the last bits (no fused multiply-adds, another summation order), which every tolerance in the suite (HF
parity, autodiff, bf16) allows.
"""

import atexit
import importlib.metadata
import os
import shutil
import tempfile

FAST_COMPILE = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true")
# XLA aborts on a flag it does not know, so this one is added only on the jaxlib line it was tried on.
if importlib.metadata.version("jaxlib").startswith("0.10."):
  FAST_COMPILE += ("--xla_cpu_use_fusion_emitters=false",)
os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""),
                                    *(f for f in FAST_COMPILE if f not in os.environ.get("XLA_FLAGS", ""))]).strip()

# One persistent compilation cache for the whole run (every xdist worker and every subprocess inherits the variable;
# the process that made the folder removes it at exit): the many tests that build the same tiny programs (the
# sampler, the evaluation, the warm start, one algorithm's step) compile each once. Not when the caller set a cache.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _CACHE_DIR = tempfile.mkdtemp(prefix="capo_jax_tests_jit_")
  atexit.register(shutil.rmtree, _CACHE_DIR, True)
  os.environ.update(JAX_COMPILATION_CACHE_DIR=_CACHE_DIR, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")

import gin  # pylint: disable=wrong-import-position
import pytest  # pylint: disable=wrong-import-position


# The slowest test files (most of their time in subprocesses and compiles), slowest first. ``make test`` hands files
# to its two workers in collection order (``--dist loadfile --no-loadscope-reorder``), so these go first and the run
# does not end with one long file on one worker while the other idles.
_SLOW_FILES_FIRST = ("test_reliability.py", "test_trainer_mesh.py", "test_sharding.py", "test_trainer.py",
                     "test_paper_configs.py", "test_trainer_curvature_models.py", "test_configs.py",
                     "test_eval_cli.py", "test_curvature_full.py", "test_micro_batches.py", "test_fused_top_k.py",
                     "test_shared_prompts.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(_SLOW_FILES_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its own order


@pytest.fixture(autouse=True)
def _clear_gin_bindings():
  """``TrainConfig`` is gin-configurable: bindings parsed by one test (``experiments.run.parse_config``) would leak
  into a ``TrainConfig`` built directly by a later test in the same worker. Every test starts and ends clean."""
  gin.clear_config()
  yield
  gin.clear_config()
