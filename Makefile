# capo_jax — set-up, tests, main job, benchmarks. `make install` creates .venv in the repo root.
PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
PYTEST_ARGS ?= -n 2 --dist loadfile --no-loadscope-reorder

.PHONY: install test run demo bench bench-peers clean

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

# Issue 15: our GRPO step beside TRL's and Tunix's on one CPU shape (docs/PERFORMANCE.md, "Peers"); the peers' scratch
# virtualenvs are created on first use under ~/.cache/capo_jax/bench-envs.
bench-peers: install
	$(VPY) -m benchmarks.peers

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

# Issue 6: the miniature reproduction study (docs/results/RESULTS_MINI.md, RESULTS_64x8.md, figures) — the sweeps
# (resumable: finished runs under $(MINI_ROOT)* are skipped; delete those folders to start from scratch), then the
# reports from their output files. Measured 52.5 min on the 2-core CPU (docs/results/RESULTS_MINI.md).
MINI_ROOT ?= runs/sweep-mini
# The issue-6 studies ran on the task before it had RL headroom: every solution of the warm start correct.
CLEAN_TASK := --gin_param ArithTask.wrong_step_fraction=0.0
.PHONY: reproduce-mini reproduce-extra reproduce-size
reproduce-mini: install
	$(VPY) -m experiments.sweep $(CLEAN_TASK) --methods grpo,capo,trust_region --lrs 5e-4,1e-4 --seeds 0,1,2 \
	  --root $(MINI_ROOT) --parallel 2
	$(VPY) -m experiments.sweep $(CLEAN_TASK) --methods grpo,capo --lrs 2e-4 --seeds 0,1,2 --root $(MINI_ROOT) --parallel 2
	$(VPY) -m experiments.sweep $(CLEAN_TASK) --methods trust_region --lrs 5e-4 --seeds 0,1,2 --prompts_per_step 64 \
	  --root $(MINI_ROOT)-64 --cache_dir $(MINI_ROOT)/cache --parallel 2
	$(VPY) -m experiments.sweep $(CLEAN_TASK) --methods grpo --lrs 1e-4 --seeds 0,1,2 --prompts_per_step 64 \
	  --root $(MINI_ROOT)-64 --cache_dir $(MINI_ROOT)/cache --parallel 2
	$(VPY) -m experiments.sweep $(CLEAN_TASK) --methods drgrpo,drcapo,reinforce,reincapo --lrs 5e-4 --seeds 0,1,2 \
	  --root $(MINI_ROOT) --parallel 2
	$(VPY) -m experiments.report --root $(MINI_ROOT)-64 --out docs/results --markdown RESULTS_64x8.md --figures 64x8 \
	  --title "Results, 64 x 8 sub-study (issue 6): GRPO at 1e-4 vs the trust region at 5e-4"
	$(VPY) -m experiments.report --root $(MINI_ROOT) --out docs/results --markdown RESULTS_MINI.md --figures . \
	  --title "Results: the miniature reproduction study (issue 6, the task without RL headroom)"

# Issue 6, the extension (docs/results/RESULTS_EXTRA.md): the full-network token mask and Theorem-5.1 subset
# acceptance at both rates, Dr./Rein variants at the conservative rate, GRPO and the trust region at 5e-5 (a 10x lr
# range), and at 64 x 8 the trust region at GRPO's best stable rate. Same seeds and warm starts as reproduce-mini
# (its cache), reported together with its runs.
EXTRA_ROOT ?= runs/sweep-extra
reproduce-extra: reproduce-mini
	$(VPY) -m experiments.sweep $(CLEAN_TASK) --methods drgrpo,drcapo,reinforce,reincapo --lrs 1e-4 --seeds 0,1,2 \
	  --root $(EXTRA_ROOT) --cache_dir $(MINI_ROOT)/cache --parallel 2
	$(VPY) -m experiments.sweep $(CLEAN_TASK) --methods grpo,trust_region --lrs 5e-5 --seeds 0,1,2 \
	  --root $(EXTRA_ROOT) --cache_dir $(MINI_ROOT)/cache --parallel 2
	$(VPY) -m experiments.sweep $(CLEAN_TASK) --methods capo_fullnet,subset,subset_kl --lrs 5e-4 --seeds 0,1,2 \
	  --root $(EXTRA_ROOT) --cache_dir $(MINI_ROOT)/cache --parallel 2
	$(VPY) -m experiments.sweep $(CLEAN_TASK) --methods capo_fullnet,subset --lrs 1e-4 --seeds 0,1,2 \
	  --root $(EXTRA_ROOT) --cache_dir $(MINI_ROOT)/cache --parallel 2
	$(VPY) -m experiments.sweep $(CLEAN_TASK) --methods trust_region --lrs 1e-4 --seeds 0,1,2 --prompts_per_step 64 \
	  --root $(EXTRA_ROOT)-64 --cache_dir $(MINI_ROOT)/cache --parallel 2
	$(VPY) -m experiments.report --root $(MINI_ROOT)-64,$(EXTRA_ROOT)-64 --out docs/results \
	  --markdown RESULTS_EXTRA_64x8.md --figures extra-64x8 --make_target reproduce-extra \
	  --title "Results, 64 x 8 (issue 6): GRPO at 1e-4 vs the trust region at 1e-4 and 5e-4"
	$(VPY) -m experiments.report --root $(MINI_ROOT),$(EXTRA_ROOT) --out docs/results --markdown RESULTS_EXTRA.md \
	  --figures extra --make_target reproduce-extra \
	  --title "Results, extension (issue 6): other curvature models, Dr./Rein at 1e-4, a 10x lr range"

# Issue 6, model size (Q2, Q5): the same task with a 4-layer model (own warm starts; docs/results/RESULTS_DEEP.md),
# and the first RL step of a width-256 model at both rates (m_H / m_F at step 1 for the tau-scaling question;
# docs/results/RESULTS_WIDTH.md).
DEEP_ROOT ?= runs/sweep-deep
WIDTH_ROOT ?= runs/sweep-width256
reproduce-size: install
	$(VPY) -m experiments.sweep $(CLEAN_TASK) --methods grpo --lrs 5e-4,1e-4 --seeds 0,1,2 --root $(DEEP_ROOT) \
	  --gin_param PolicyConfig.num_layers=4 --parallel 2
	$(VPY) -m experiments.sweep $(CLEAN_TASK) --methods capo,trust_region --lrs 5e-4 --seeds 0,1,2 --root $(DEEP_ROOT) \
	  --gin_param PolicyConfig.num_layers=4 --parallel 2
	$(VPY) -m experiments.report --root $(DEEP_ROOT) --out docs/results --markdown RESULTS_DEEP.md --figures deep \
	  --make_target reproduce-size --title "Results, 4-layer model (issue 6, Q2)"
	$(VPY) -m experiments.sweep $(CLEAN_TASK) --methods grpo --lrs 1e-4,5e-4 --seeds 0,1,2 --num_steps 1 \
	  --root $(WIDTH_ROOT) --gin_param PolicyConfig.hidden_size=256 --gin_param PolicyConfig.intermediate_size=768 --parallel 2
	$(VPY) -m experiments.report --root $(WIDTH_ROOT) --out docs/results --markdown RESULTS_WIDTH.md --figures width \
	  --make_target reproduce-size --title "Results, width-256 model, first RL step only (issue 6, Q5)"

# Issue 16: the study on the task with RL headroom (docs/RESULTS.md): GRPO over a learning-rate ladder up to collapse
# (the conservative rate 1e-4 is 5x below the aggressive 5e-4), CAPO with the released and the eta-scaled tau's, the
# trust region, Theorem-5.1 subsets with the KL condition and the KL-target step size at the aggressive rate, and the
# KL-target step size at the other end of a 10x range (5e-5); the main job's budget, 64 x 8 x 40 = 20,480 completions
# per run, held-out pass@1 every 10 steps on 128 problems x 8 samples, 3 seeds, one warm start per seed (the task of
# experiments/configs/arith_base.gin). One sweep over the 27 runs, the most expensive cells first, two workers each
# pinned to one core, no reference forward (KL(start) is not logged: the report does not use it). Resumable like
# reproduce-mini.
HEADROOM_ROOT ?= runs/sweep-headroom
HEADROOM_CURVATURE := kl_target@5e-4,kl_target@5e-5,subset_kl@5e-4,trust_region@5e-4,capo@5e-4,capo_eta@5e-4
HEADROOM_RUNS ?= $(HEADROOM_CURVATURE),grpo@5e-4,grpo@2e-4,grpo@1e-4
HEADROOM_ARGS ?= --prompts_per_step 64 --num_steps 40 --seeds 0,1,2 --parallel 2 \
  --gin_param EvalConfig.every=10 --gin_param EvalConfig.num_problems=128 --gin_param LossConfig.track_kl=False
.PHONY: reproduce-headroom
reproduce-headroom: install
	$(VPY) -m experiments.sweep --runs $(HEADROOM_RUNS) --root $(HEADROOM_ROOT) $(HEADROOM_ARGS)
	$(VPY) -m experiments.report --root $(HEADROOM_ROOT) --out docs --markdown RESULTS.md \
	  --figures results/headroom --make_target reproduce-headroom \
	  --title "Results, the task with RL headroom (issue 16): GRPO's lr ladder, CAPO, trust region, KL-target step"

# Issue 16, two follow-up questions of the study (docs/results/RESULTS_HEADROOM_EXTRA.md, reported with its runs):
# does GRPO do better below 1e-4 (5e-5), and the KL-target step with delta = 5e-4 (about a GRPO step's predicted KL at
# 1e-4) at both ends of the 10x range. Same budget, seeds and warm starts (the study's cache).
HEADROOM_EXTRA_ROOT ?= runs/sweep-headroom-extra
.PHONY: reproduce-headroom-extra
reproduce-headroom-extra: reproduce-headroom
	$(VPY) -m experiments.sweep --runs kl_target_low@5e-4,kl_target_low@5e-5,grpo@5e-5 \
	  --root $(HEADROOM_EXTRA_ROOT) --cache_dir $(HEADROOM_ROOT)/cache $(HEADROOM_ARGS)
	$(VPY) -m experiments.report --root $(HEADROOM_ROOT),$(HEADROOM_EXTRA_ROOT) --out docs/results \
	  --markdown RESULTS_HEADROOM_EXTRA.md --figures headroom-extra --make_target reproduce-headroom-extra --conservative_lr 1e-4 \
	  --title "Results, the task with RL headroom (issue 16): the study with GRPO at 5e-5 and the KL-target step at delta 5e-4"
