"""The whole RL loop on a device mesh and across processes, through ``experiments.run``.

The embedded arithmetic task at tiny size (a 1-layer model warm-started so that every step has rewarded samples, so
losses, gradients and CAPO's mask are not trivial), CAPO, 3 steps of 8 prompts × 8 samples:

- the reference: one process, one CPU device;
- two ``jax.distributed`` processes on localhost (4 CPU devices each, CPU collectives) on the global mesh
  data = fsdp = tensor = 2, selected with ``--gin_param``: every metric of every row (rewards, loss, gradient norm,
  KL, CAPO's statistics and rejected fraction, held-out accuracy) equals the reference's within float32
  summation-order differences, the same rows are written once (by process 0), and the checkpoints are written from
  shards no process holds whole (``state_digest: checksum64``);
- that two-process checkpoint of step 2 resumed on one device: the run continues to the reference's step 3.
"""

import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import pytest

from capo_jax import config as cfg_lib
from capo_jax import trainer
from capo_jax.run_logging import read_metrics
from capo_jax.tasks import ArithTask

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The compile-time flags only shorten compiles; every run here shares them.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
TOLERANCE = 1e-5

GIN = """include 'arith_capo.gin'
PolicyConfig.hidden_size = 64
PolicyConfig.intermediate_size = 128
PolicyConfig.num_layers = 1
PolicyConfig.num_heads = 4
PolicyConfig.num_kv_heads = 2
ArithTask.tokenizer_vocab_size = 512
ArithTask.wrong_step_fraction = 0.0
WarmStartConfig.steps = 400
WarmStartConfig.batch_size = 32
TrainConfig.num_steps = 3
RolloutConfig.prompts_per_step = 8
RolloutConfig.group_size = 8
RolloutConfig.max_new_tokens = 24
EvalConfig.every = 3
EvalConfig.num_problems = 8
EvalConfig.k = 2
CheckpointConfig.every = 2
OptimizerConfig.learning_rate = 1e-3
"""
MESH = ["--gin_param=MeshConfig.data=2", "--gin_param=MeshConfig.fsdp=2", "--gin_param=MeshConfig.tensor=2"]


def _env(devices):
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}")


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _comparable(rows):
  return [{k: v for k, v in r.items() if k not in trainer.TIMING_KEYS and k != "eval_s"} for r in rows]


def _max_difference(rows_a, rows_b):
  """The largest |a − b| over every numeric field of every row; an AssertionError for differing keys or values."""
  assert len(rows_a) == len(rows_b)
  worst = 0.0
  for a, b in zip(_comparable(rows_a), _comparable(rows_b)):
    assert sorted(a) == sorted(b), set(a) ^ set(b)
    for key, value in a.items():
      if isinstance(value, (int, float)) and value is not None and b[key] is not None:
        worst = max(worst, abs(float(value) - float(b[key])))
      else:
        assert value == b[key], (a["step"], key, value, b[key])
  return worst


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("mesh_runs")
  gin_file = tmp / "tiny_mesh.gin"
  gin_file.write_text(GIN)
  cache = tmp / "cache"
  common = ["-m", "experiments.run", f"--gin_file={gin_file}", f"--cache_dir={cache}"]
  reference = subprocess.run([sys.executable, *common, f"--workdir={tmp / 'reference'}"], cwd=ROOT, env=_env(1),
                             capture_output=True, text=True, timeout=900)
  assert reference.returncode == 0, reference.stderr[-4000:]
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, *common, f"--workdir={tmp / 'two_processes'}", *MESH,
                             f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}"],
                            cwd=ROOT, env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outputs = [proc.communicate(timeout=900) for proc in procs]
  for proc, (_, err) in zip(procs, outputs):
    assert proc.returncode == 0, err[-4000:]
  return {"tmp": tmp, "gin": gin_file, "cache": cache, "stdout": [out for out, _ in outputs],
          "reference": read_metrics(tmp / "reference" / "metrics.jsonl"),
          "two_processes": read_metrics(tmp / "two_processes" / "metrics.jsonl")}


def test_two_processes_on_a_mesh_equal_one_device(runs):
  reference, distributed = runs["reference"], runs["two_processes"]
  steps = [r for r in reference if "reward_mean" in r]
  assert [r["step"] for r in steps] == [1, 2, 3]
  # Not a trivial comparison: every step has rewarded samples, a gradient, and CAPO's mask rejects tokens.
  assert all(r["reward_mean"] > 0 and r["grad_norm"] > 1e-3 for r in steps), steps
  assert any(r["rejected_token_fraction"] > 0 for r in steps)
  assert _max_difference(reference, distributed) <= TOLERANCE


def test_only_process_zero_writes_logs_and_every_process_the_checkpoint(runs):
  out_0, out_1 = runs["stdout"]
  assert "2 processes, 8 devices" in out_0 and "eval_accuracy start=" in out_0
  # Process 1 prints nothing of the run's (gloo's connection lines, from the collectives library, aside).
  assert not any(word in out_1 for word in ("→", "step ", "reward", "eval_accuracy")), out_1[-2000:]
  workdir = runs["tmp"] / "two_processes"
  assert open(workdir / "config.gin").read().count("# fingerprint:") == 1
  from capo_jax.checkpointing import Checkpointer  # pylint: disable=import-outside-toplevel
  ckpt = Checkpointer(str(workdir / "checkpoints"), "unused")
  assert ckpt.steps() == [2, 3]
  meta = ckpt.read_meta(3)
  ckpt.close()
  assert meta["state_digest"] == "checksum64"  # the state was sharded over both processes
  shard_files = {name for name in os.listdir(workdir / "checkpoints" / "3" / "state" / "array_metadatas")}
  assert shard_files == {"process_0", "process_1"}


def test_a_two_process_checkpoint_resumes_on_one_device(runs, tmp_path):
  workdir = tmp_path / "moved"
  shutil.copytree(runs["tmp"] / "two_processes", workdir)
  shutil.rmtree(workdir / "checkpoints" / "3")
  assert jax.device_count() == 1
  from experiments import run  # pylint: disable=import-outside-toplevel
  import gin  # pylint: disable=import-outside-toplevel
  gin.clear_config()
  cfg, text, fingerprint = run.parse_config([str(runs["gin"])], [])  # no mesh bindings: still the same run
  assert cfg.mesh == cfg_lib.MeshConfig()
  logs = []
  rows = trainer.train(cfg, str(workdir), config_text=text, fingerprint=fingerprint, cache_dir=str(runs["cache"]),
                       log=logs.append)
  assert any("resuming from step 2" in line for line in logs)
  assert _max_difference(runs["reference"], rows) <= TOLERANCE


def test_batch_rows_must_split_over_the_mesh(monkeypatch):
  mesh = jax.sharding.AbstractMesh((2, 2, 2), ("data", "fsdp", "tensor"))
  monkeypatch.setattr(trainer.sharding, "make_mesh", lambda cfg: mesh)
  import dataclasses  # pylint: disable=import-outside-toplevel
  cfg = cfg_lib.TrainConfig(task=ArithTask(), rollout=cfg_lib.RolloutConfig(prompts_per_step=3, group_size=2))
  with pytest.raises(trainer.InputError, match=r"batch_size .* = 6 is not a multiple of MeshConfig data × fsdp = 4"):
    trainer.run_mesh(cfg)
  cfg = dataclasses.replace(cfg, rollout=cfg_lib.RolloutConfig(prompts_per_step=4, group_size=2),
                            optimizer=cfg_lib.OptimizerConfig(num_minibatches=4))
  with pytest.raises(trainer.InputError, match=r"minibatch .* = 2 is not a multiple"):
    trainer.run_mesh(cfg)
  cfg = dataclasses.replace(cfg, optimizer=cfg_lib.OptimizerConfig(num_minibatches=2))
  assert trainer.run_mesh(cfg) is mesh


def test_partial_distributed_flags_are_one_line_and_exit_2():
  proc = subprocess.run([sys.executable, "-m", "experiments.run", "--gin_file=arith_grpo.gin",
                         "--coordinator_address=localhost:1234"], cwd=ROOT, env=_env(1), capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: a multi-process run needs all of"), proc.stderr[-2000:]
