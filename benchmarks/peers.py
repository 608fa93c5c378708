"""capo_jax's GRPO step side by side with TRL's and Tunix's, on one CPU shape (docs/PERFORMANCE.md, "Peers").

    python -m benchmarks.peers [--steps 12] [--skip-trl] [--skip-tunix] [--env-dir DIR]
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import time

# Each peer runs in a scratch virtualenv of its own (cached under --env-dir), never in the project's environment.
PEER_REQUIREMENTS = {
    "trl": ("torch==2.13.0", "trl==1.16.0", "transformers==5.24.0"),
    "tunix": ("google-tunix==0.1.7", "jax==0.10.2", "jaxlib==0.10.2", "flax==0.12.8"),
}
DEFAULT_ENV_DIR = os.path.join(os.path.expanduser("~"), ".cache", "capo_jax", "bench-envs")
_MARKER = ".capo-bench-installed"


def peer_env(name: str, env_dir: str, log=print) -> tuple[str | None, str]:
  """``(python of the peer's scratch env, "")``, creating and pip-installing it on first use; ``(None, reason)``
  when it cannot be made."""
  folder = pathlib.Path(env_dir) / name
  python = folder / "bin" / "python"
  wanted = "\n".join(PEER_REQUIREMENTS[name]) + "\n"
  marker = folder / _MARKER
  if python.exists() and marker.exists() and marker.read_text() == wanted:
    return str(python), ""
  log(f"{name}: creating {folder} (python -m venv, then pip install {' '.join(PEER_REQUIREMENTS[name])})")
  t0 = time.time()
  folder.parent.mkdir(parents=True, exist_ok=True)
  install_log = folder.parent / f"{name}-install.log"
  with open(install_log, "w") as out:
    steps = [[sys.executable, "-m", "venv", "--clear", str(folder)],
             [str(python), "-m", "pip", "install", "-q", "--upgrade", "pip"],
             [str(python), "-m", "pip", "install", *PEER_REQUIREMENTS[name]]]
    for command in steps:
      out.write("$ " + " ".join(command) + "\n")
      out.flush()
      if subprocess.run(command, stdout=out, stderr=subprocess.STDOUT).returncode:
        return None, f"env install failed at `{' '.join(command[2:])}` (log: {install_log})"
  marker.write_text(wanted)
  log(f"{name}: env ready in {time.time() - t0:.0f} s (log: {install_log})")
  return str(python), ""
