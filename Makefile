# capo_jax — set-up, tests, main job, benchmarks. `make install` creates .venv in the repo root.
PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
PYTEST_ARGS ?= -n 2 --dist loadfile

.PHONY: install test run demo bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q -e .
	touch $@

# Adds the `test` extra (pytest, xdist, hypothesis, torch 2.13.0 CPU for HF parity) when missing, then runs pytest.
test: install
	$(VPY) -c "import pytest, xdist, hypothesis, torch" 2>/dev/null || $(VPY) -m pip install -q -e '.[test]'
	$(VPY) -m pytest $(PYTEST_ARGS) tests

# The main job: the embedded arithmetic default with CAPO (warm start cached under runs/cache).
run: install
	$(VPY) -m experiments.run --gin_file=experiments/configs/arith_capo.gin

demo: install
	$(VPY) -m experiments.demo

bench: install
	$(VPY) -m benchmarks.run_all --size tiny

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
