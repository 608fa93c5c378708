"""Shared pytest fixtures."""

import gin
import pytest


@pytest.fixture(autouse=True)
def _clear_gin_bindings():
  """``TrainConfig`` is gin-configurable: bindings parsed by one test (``experiments.run.parse_config``) would leak
  into a ``TrainConfig`` built directly by a later test in the same worker. Every test starts and ends clean."""
  gin.clear_config()
  yield
  gin.clear_config()
