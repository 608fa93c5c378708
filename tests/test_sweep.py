"""The sweep's planning/resume logic and the report's numbers, on fake runs and synthetic metrics (no training)."""

import json
import math
import os
import sys

import numpy as np
import pytest

from experiments import report
from experiments import sweep


# ---------------------------------------------------------------------------------------------------------------
# Planning.

def test_plan_grid_order_workdirs_and_equal_budget(tmp_path):
  runs = sweep.plan(["grpo", "trust_region"], [1e-4, 5e-4], [0, 1], str(tmp_path), prompts_per_step=16,
                    group_size=8, num_steps=60, trust_region_kl=2e-3, python="PY")
  assert len(runs) == 8
  # lr-major in the order given; seeds interleaved, so consecutive runs differ in seed (two workers build two
  # warm starts at once).
  assert [(r.method, r.lr, r.seed) for r in runs[:4]] == [("grpo", 1e-4, 0), ("grpo", 1e-4, 1),
                                                           ("trust_region", 1e-4, 0), ("trust_region", 1e-4, 1)]
  r = runs[-1]
  assert r.workdir == os.path.join(str(tmp_path), "trust_region", "lr5e-4", "seed1")
  assert r.run_id == "trust_region/lr5e-4/seed1"
  assert r.argv[:4] == ("PY", "-m", "experiments.run", "--gin_file=experiments/configs/arith_grpo.gin")
  assert f"--cache_dir={os.path.join(str(tmp_path), 'cache')}" in r.argv
  params = [a.split("=", 1)[1] for a in r.argv if a.startswith("--gin_param=")]
  assert "CurvatureConfig.max_kl=0.002" in params and "CurvatureConfig.step_control='trust_region'" in params
  assert params[-2:] == ["OptimizerConfig.learning_rate=0.0005", "TrainConfig.seed=1"]
  # Equal budget: every run binds the same prompts × group × steps.
  for run in runs:
    budget = sorted(a for a in run.argv if any(f in a for f in sweep.BUDGET_FIELDS))
    assert budget == ["--gin_param=RolloutConfig.group_size=8", "--gin_param=RolloutConfig.prompts_per_step=16",
                      "--gin_param=TrainConfig.num_steps=60"]
  assert len({r.workdir for r in runs}) == 8
  shared = sweep.plan(["grpo"], [1e-4], [0], str(tmp_path / "b"), cache_dir=str(tmp_path / "cache"), python="PY")
  assert f"--cache_dir={tmp_path / 'cache'}" in shared[0].argv


def test_fmt_lr():
  assert [sweep.fmt_lr(x) for x in (1e-4, 2.5e-4, 0.001, 5e-4)] == ["1e-4", "2.5e-4", "1e-3", "5e-4"]


def test_plan_bad_input(tmp_path):
  with pytest.raises(ValueError, match="unknown method"):
    sweep.plan(["grpo", "nope"], [1e-4], [0], str(tmp_path))
  with pytest.raises(ValueError, match="sweep controls"):
    sweep.plan(["grpo"], [1e-4], [0], str(tmp_path), gin_params=["TrainConfig.num_steps=5"])
  with pytest.raises(ValueError, match="learning rates must be > 0"):
    sweep.plan(["grpo"], [0.0], [0], str(tmp_path))
  assert sweep.main(["--methods", "grpo", "--lrs", "1e-4,x", "--root", str(tmp_path)]) == 2
  assert sweep.main(["--methods", "grpo", "--lrs", "1e-4", "--root", str(tmp_path), "--parallel", "0"]) == 2
  assert sweep.main(["--methods", "grpo", "--root", str(tmp_path)]) == 2  # no --lrs
  assert sweep.main(["--runs", "grpo@1e-4", "--methods", "grpo", "--root", str(tmp_path)]) == 2  # both ways
  for bad in ("grpo", "grpo@x", "grpo@1e-4,grpo@1e-4", "nope@1e-4"):
    assert sweep.main(["--runs", bad, "--root", str(tmp_path), "--dry_run"]) == 2, bad


def test_plan_cells_in_the_order_given(tmp_path, capsys):
  assert sweep.parse_pairs("kl_target@5e-4, grpo@1e-4,grpo@5e-4") == [
      ("kl_target", 5e-4), ("grpo", 1e-4), ("grpo", 5e-4)]
  runs = sweep.plan([], [], [0, 1], str(tmp_path), python="PY",
                    pairs=[("kl_target", 5e-4), ("grpo", 1e-4), ("grpo", 5e-4)])
  assert [(r.method, r.lr, r.seed) for r in runs] == [
      ("kl_target", 5e-4, 0), ("kl_target", 5e-4, 1), ("grpo", 1e-4, 0), ("grpo", 1e-4, 1), ("grpo", 5e-4, 0),
      ("grpo", 5e-4, 1)]  # no kl_target at 1e-4: only the cells named
  assert sweep.main(["--runs", "kl_target@5e-4,grpo@1e-4", "--seeds", "0", "--root", str(tmp_path),
                     "--dry_run"]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert len(lines) == 2 and "arith_kl_target.gin" in lines[0] and "learning_rate=0.0001" in lines[1]


def test_cpu_lanes():
  assert sweep.cpu_lanes([0, 1], 2) == [(0,), (1,)]
  assert sweep.cpu_lanes([3, 0, 1, 2, 4], 2) == [(0, 1), (2, 3, 4)]
  assert sweep.cpu_lanes([0, 1], 3) is None  # fewer CPUs than workers: no pinning
  assert sweep.cpu_lanes([0, 1, 2, 3], 1) is None


# ---------------------------------------------------------------------------------------------------------------
# Execution and resume, with a fake `experiments.run` (a tiny script writing metrics rows).

FAKE_RUN = r"""
import json, os, sys, time
workdir, steps, events, fail = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4] == "1"
with open(events, "a") as f:
  f.write(json.dumps({"start": workdir, "t": time.time(), "cpus": sorted(os.sched_getaffinity(0)),
                      "cache": os.environ.get("JAX_COMPILATION_CACHE_DIR")}) + "\n")
time.sleep(1.0)  # "warm start": no metrics row yet (long enough for a run started beside it to start under load)
os.makedirs(workdir, exist_ok=True)
with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
  f.write(json.dumps({"step": 0, "completions": 0, "eval_accuracy": 0.5}) + "\n")
  f.flush()
  with open(events, "a") as e:
    e.write(json.dumps({"first_row": workdir, "t": time.time()}) + "\n")
  if fail:
    sys.exit(3)
  for s in range(1, steps + 1):
    f.write(json.dumps({"step": s, "completions": 8 * s, "reward_mean": 0.5}) + "\n")
  f.write(json.dumps({"step": steps, "completions": 8 * steps, "eval_accuracy": 0.6}) + "\n")
"""


def _fake_runs(tmp_path, specs, steps=3):
  script = tmp_path / "fake_run.py"
  script.write_text(FAKE_RUN)
  events = tmp_path / "events.jsonl"
  runs = []
  for method, seed, fail in specs:
    workdir = str(tmp_path / "root" / method / "lr1e-4" / f"seed{seed}")
    runs.append(sweep.PlannedRun(method, 1e-4, seed, workdir,
                                 (sys.executable, str(script), workdir, str(steps), str(events), "1" if fail else "0")))
  return runs, events


def _events(path):
  return [json.loads(l) for l in open(path)] if os.path.exists(path) else []


def test_execute_skips_finished_reruns_unfinished_and_records_manifest(tmp_path):
  runs, events = _fake_runs(tmp_path, [("a", 0, False), ("b", 0, False), ("c", 1, True)])
  root = str(tmp_path / "root")
  # Run "a" already finished (eval row of the final step), run "b" was killed half way (no final eval row).
  os.makedirs(runs[0].workdir)
  with open(os.path.join(runs[0].workdir, "metrics.jsonl"), "w") as f:
    f.write(json.dumps({"step": 0, "eval_accuracy": 0.4}) + "\n" + json.dumps({"step": 3, "eval_accuracy": 0.7}) + "\n")
  os.makedirs(runs[1].workdir)
  with open(os.path.join(runs[1].workdir, "metrics.jsonl"), "w") as f:
    f.write(json.dumps({"step": 0, "eval_accuracy": 0.4}) + "\n" + json.dumps({"step": 2, "reward_mean": 0.1}) + "\n")
  assert sweep.is_finished(runs[0].workdir, 3) and not sweep.is_finished(runs[1].workdir, 3)

  status = sweep.execute(runs, root, num_steps=3, parallel=2, poll_s=0.05, log=lambda _: None, argv=["x"])
  assert status == {"a/lr1e-4/seed0": "skipped", "b/lr1e-4/seed0": "finished", "c/lr1e-4/seed1": "failed rc=3"}
  started = [e["start"] for e in _events(events) if "start" in e]
  assert sorted(started) == sorted([runs[1].workdir, runs[2].workdir])  # "a" was not rerun
  manifest = json.load(open(os.path.join(root, "manifest.json")))
  assert manifest["runs"]["b/lr1e-4/seed0"]["status"] == "finished"
  assert manifest["runs"]["b/lr1e-4/seed0"]["command"] == runs[1].command
  assert manifest["runs"]["c/lr1e-4/seed1"]["returncode"] == 3
  assert manifest["invocations"][0]["argv"] == ["x"] and manifest["invocations"][0]["wall_s"] > 0

  # A second invocation skips everything that finished and retries only the failed run.
  os.remove(events)
  status = sweep.execute(runs, root, num_steps=3, parallel=2, poll_s=0.05, log=lambda _: None)
  assert status["a/lr1e-4/seed0"] == status["b/lr1e-4/seed0"] == "skipped"
  assert [e["start"] for e in _events(events) if "start" in e] == [runs[2].workdir]
  assert len(json.load(open(os.path.join(root, "manifest.json")))["invocations"]) == 2


def test_execute_does_not_build_one_warm_start_twice(tmp_path):
  # Two runs of seed 0 and one of seed 1, two workers: the second seed-0 run waits for the first one's first
  # metrics row (its warm start is cached by then); the seed-1 run starts at once beside it.
  runs, events = _fake_runs(tmp_path, [("a", 0, False), ("b", 0, False), ("c", 1, False)], steps=1)
  status = sweep.execute(runs, str(tmp_path / "root"), num_steps=1, parallel=2, poll_s=0.02, log=lambda _: None,
                         compile_cache_dir=str(tmp_path / "cc"), env={k: v for k, v in os.environ.items()
                                                                     if k != "JAX_COMPILATION_CACHE_DIR"})
  assert set(status.values()) == {"finished"}
  ev = _events(events)
  # Every run got the shared compilation cache; with two CPUs or more, the two workers' CPUs never overlap.
  assert {e["cache"] for e in ev if "start" in e} == {str(tmp_path / "cc")}
  lanes = sweep.cpu_lanes(os.sched_getaffinity(0), 2)
  if lanes:
    starts = {e["start"]: set(e["cpus"]) for e in ev if "start" in e}
    assert all(cpus in ({*lanes[0]}, {*lanes[1]}) for cpus in starts.values())
    assert starts[runs[0].workdir].isdisjoint(starts[runs[2].workdir])  # a and c ran at the same time
  t = {(k, e[k]): e["t"] for e in ev for k in ("start", "first_row") if k in e}
  a, b, c = (r.workdir for r in runs)
  assert t[("start", b)] >= t[("first_row", a)]
  assert t[("start", c)] < t[("first_row", a)]


# ---------------------------------------------------------------------------------------------------------------
# The report on synthetic metrics.

def _write_run(root, method, lr, seed, evals, learner_s, rejected=0.0, m_f=1e-6):
  d = os.path.join(root, method, f"lr{sweep.fmt_lr(lr)}", f"seed{seed}")
  os.makedirs(d)
  rows = []
  for i, acc in enumerate(evals):
    step = 10 * i
    if i > 0:
      for s in range(step - 9, step + 1):
        rows.append({"step": s, "completions": 100 * s, "reward_mean": acc, "learner_s": learner_s,
                     "rollout_s": 0.1, "rejected_token_fraction": rejected, "m_hessian_p50": 1e-5 * lr / 1e-4,
                     "m_hessian_p90": 3e-5, "m_hessian_p99": 1e-4, "m_fisher_p50": m_f, "m_fisher_p90": 2 * m_f,
                     "m_fisher_p99": 5 * m_f})
    rows.append({"step": step, "completions": 100 * step, "eval_accuracy": acc, "eval_s": 1.0})
  with open(os.path.join(d, "metrics.jsonl"), "w") as f:
    f.write("\n".join(json.dumps(r) for r in rows) + "\n")


def test_report_numbers_on_synthetic_runs(tmp_path):
  root = str(tmp_path / "sweep")
  # GRPO at 1e-4 (conservative): 0.4 → 0.5; at 5e-4: collapses in 2 of 3 seeds.
  for seed, ev in enumerate([[0.4, 0.45, 0.5], [0.4, 0.46, 0.52], [0.4, 0.44, 0.48]]):
    _write_run(root, "grpo", 1e-4, seed, ev, learner_s=1.0)
  for seed, ev in enumerate([[0.4, 0.3, 0.1], [0.4, 0.2, 0.05], [0.4, 0.5, 0.3]]):
    _write_run(root, "grpo", 5e-4, seed, ev, learner_s=1.2)
  # trust_region at 5e-4: stable, reaches 0.5 after 1000 completions (step 10).
  for seed, ev in enumerate([[0.4, 0.5, 0.55], [0.4, 0.52, 0.53], [0.4, 0.51, 0.57]]):
    _write_run(root, "trust_region", 5e-4, seed, ev, learner_s=2.4)
  _write_run(root, "capo", 5e-4, 0, [0.4, 0.1, 0.0], learner_s=1.8, rejected=0.02)
  # An unfinished run (config says 60 steps, metrics stop at step 20): left out and named.
  _write_run(root, "capo", 5e-4, 1, [0.4, 0.9, 0.9], learner_s=1.8, rejected=0.02)
  with open(os.path.join(root, "capo", "lr5e-4", "seed1", "config.gin"), "w") as f:
    f.write("TrainConfig.name = 'capo'\nTrainConfig.num_steps = 60\n")
  out = str(tmp_path / "docs")
  res = report.report(root, out, ["--root", root])
  table = {(r["method"], r["lr"]): r for r in res["table"]}

  g = table[("grpo", 1e-4)]
  finals = [0.5, 0.52, 0.48]
  assert g["final"][0] == pytest.approx(0.5)
  assert g["final"][1] == pytest.approx(np.std(finals, ddof=1) / math.sqrt(3))  # = 0.02/√3
  assert g["final"][1] == pytest.approx(0.011547005, rel=1e-6)
  assert g["collapsed"] == (0, 3)
  assert g["peak"] == (pytest.approx(0.5), 2000.0)
  assert table[("grpo", 5e-4)]["collapsed"] == (2, 3)  # 0.1 and 0.05 < 0.5 × 0.4; 0.3 is not
  assert table[("trust_region", 5e-4)]["overhead"] == pytest.approx(2.0)
  assert table[("capo", 5e-4)]["rejected_mean"][0] == pytest.approx(0.02)
  assert table[("capo", 5e-4)]["seeds"] == 1
  assert math.isnan(table[("capo", 5e-4)]["final"][1])  # one seed: no SEM
  # Paired gain final − start per seed: 0.1, 0.12, 0.08 → 0.1 ± 0.02/√3.
  assert table[("grpo", 1e-4)]["gain"] == (pytest.approx(0.1), pytest.approx(0.011547005, rel=1e-6))
  # Sample efficiency at 5e-4 vs conservative GRPO (final mean 0.5, first reached at 2000 completions):
  # trust_region's mean curve is 0.51 at 1000 → ratio 2000/1000 = 2; GRPO(5e-4) never reaches 0.5.
  eff = res["efficiency"]
  assert eff["aggressive_lr"] == 5e-4
  assert eff["refs"]["conservative GRPO"]["c_ref"] == 2000.0
  rows = {e["method"]: e for e in eff["rows"]}
  assert rows["trust_region"]["conservative GRPO"] == (1000.0, 2.0)
  assert rows["grpo"]["conservative GRPO"] == (None, None)
  # Per seed: trust_region's seeds reach 0.5 at 1000, 1000, 1000 completions (0.5, 0.52, 0.51 at step 10) → 3/3,
  # ratio 2000/1000 = 2 ± 0; GRPO 5e-4's seeds 0.3/0.1, 0.2/0.05, 0.5/0.3: only seed 2 reaches 0.5, at 1000.
  every = {(e["method"], e["lr"]): e["conservative GRPO"] for e in eff["all_rows"]}
  assert every[("trust_region", 5e-4)]["reached"] == 3 and every[("trust_region", 5e-4)]["ratio"] == (2.0, 0.0)
  assert every[("grpo", 5e-4)]["completions"] == [None, None, 1000.0]
  assert every[("grpo", 5e-4)]["ratio"][0] == 2.0 and math.isnan(every[("grpo", 5e-4)]["ratio"][1])
  # The reference against itself: seeds 0.5 (2000), 0.52 (2000), 0.48 (never) → 2/3, ratio 1.
  assert every[("grpo", 1e-4)]["completions"] == [2000.0, 2000.0, None]
  assert every[("grpo", 1e-4)]["ratio"] == (1.0, 0.0)
  # A reference that never rises above its start gives no ratio.
  flat = [{"method": "grpo", "lr": 1e-4, "final": (0.4, 0.0), "collapsed": (0, 3),
           "curve": (np.array([0, 1000]), np.array([0.4, 0.4]), np.zeros(2), 3)},
          {"method": "tr", "lr": 5e-4, "final": (0.45, 0.0), "collapsed": (0, 3),
           "curve": (np.array([0, 1000]), np.array([0.45, 0.45]), np.zeros(2), 3)}]
  flat_eff = report.sample_efficiency(flat)
  assert flat_eff["refs"]["conservative GRPO"]["c_ref"] is None
  assert {e["method"]: e["conservative GRPO"] for e in flat_eff["rows"]} == {"tr": (0.0, None)}
  # The conservative reference at a named lr: GRPO at 5e-4, seed-mean final (0.1 + 0.05 + 0.3) / 3 = 0.15; the best
  # stable GRPO stays 1e-4; an lr GRPO never ran at is refused.
  named = report.sample_efficiency(res["table"], conservative_lr=5e-4)
  assert named["refs"]["conservative GRPO"]["lr"] == 5e-4
  assert named["refs"]["conservative GRPO"]["target"] == pytest.approx(0.15)
  assert named["refs"]["best stable GRPO"]["lr"] == 1e-4
  with pytest.raises(ValueError, match="no GRPO runs at that lr"):
    report.sample_efficiency(res["table"], conservative_lr=2e-4)
  # First-step m_H p50 scales with lr in the synthetic data: 5× between the lrs.
  sc = {(s["method"], s["lr"]): s for s in res["scaling"]}
  assert sc[("grpo", 5e-4)]["m_hessian_p50"] / sc[("grpo", 1e-4)]["m_hessian_p50"] == pytest.approx(5.0)
  # Exponents: synthetic m_F and m_H p90 are the same at both lrs → exponent 0.
  ex = {e["method"]: e for e in report.eta_exponents(res["scaling"])}
  assert ex["grpo"]["m_fisher_p90"] == pytest.approx(0.0) and "trust_region" not in ex
  assert report.eta_exponents([{"method": "g", "lr": 1e-4, "m_fisher_p90": 1e-8},
                               {"method": "g", "lr": 1e-3, "m_fisher_p90": 1e-6}])[0]["m_fisher_p90"] == \
      pytest.approx(2.0)

  for name in ("accuracy.png", "reward.png", "rejected.png", "curvature.png"):
    path = os.path.join(out, "results", name)
    assert os.path.getsize(path) > 1000 and open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
  md = open(os.path.join(out, "RESULTS.md")).read()
  assert "| grpo | 0.0001 | 3 | 20 | 0.400 ± 0.000 | 0.500 (2000) | 0.500 ± 0.012 | 0.100 ± 0.012 | – | 0/3 |" in md
  assert "| grpo | 0.0001 | 0.400 (0), 0.450 (1000), 0.500 (2000) | – | – | 0.000 → 0.000 | – | – |" in md
  assert "Partial sweep:** 1 run(s)" in md and "`capo/lr5e-4/seed1`" in md
  assert "| grpo | 0.0005 | 3 | 20 |" in md and "| 2/3 |" in md
  assert "| trust_region | 1000 (2.00×) |" not in md  # the efficiency row starts with method and collapse count
  assert "| trust_region | 0/3 | 1000 (2.00×) |" in md


def test_report_bad_root(tmp_path):
  assert report.main(["--root", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
  os.makedirs(tmp_path / "empty")
  with pytest.raises(ValueError, match="no finished runs"):
    report.report(str(tmp_path / "empty"), str(tmp_path))


def test_report_merges_roots_and_tabulates_robustness(tmp_path):
  core, extra = str(tmp_path / "core"), str(tmp_path / "extra")
  _write_run(core, "grpo", 1e-4, 0, [0.4, 0.45, 0.5], learner_s=1.0)
  _write_run(core, "grpo", 5e-4, 0, [0.4, 0.2, 0.1], learner_s=1.0)
  _write_run(extra, "grpo", 5e-5, 0, [0.4, 0.42, 0.43], learner_s=1.0)
  _write_run(extra, "trust_region", 5e-4, 0, [0.4, 0.5, 0.6], learner_s=1.5)
  for r, name in ((core, "core"), (extra, "extra")):
    with open(os.path.join(r, "manifest.json"), "w") as f:
      json.dump({"runs": {"grpo/x/seed0": {"method": "grpo", "lr": 1e-4, "command": f"cmd-{name}"}},
                 "invocations": [{"argv": [name], "wall_s": 60.0}]}, f)
  out = str(tmp_path / "docs")
  res = report.report(f"{core},{extra}", out, ["--root", f"{core},{extra}"], markdown="X.md",
                      make_target="reproduce-extra")
  table = {(r["method"], r["lr"]): r for r in res["table"]}
  assert set(table) == {("grpo", 5e-5), ("grpo", 1e-4), ("grpo", 5e-4), ("trust_region", 5e-4)}
  assert table[("trust_region", 5e-4)]["overhead"] == pytest.approx(1.5)
  # Conservative GRPO is now the extension's 5e-5 run (0.43 first reached at 2000 completions).
  assert res["efficiency"]["refs"]["conservative GRPO"] == {"lr": 5e-5, "target": pytest.approx(0.43),
                                                           "c_ref": 2000.0}
  md = open(os.path.join(out, "X.md")).read()
  assert "`make reproduce-extra`" in md and "cmd-core" in md and "cmd-extra" in md
  assert "2.0 min over 2 invocation(s)" in md
  assert "| method | lr 5e-05 | lr 0.0001 | lr 0.0005 |" in md
  assert "| grpo | 0.030 (± –) (0/1) | 0.100 (± –) (0/1) | -0.300 (± –) (1/1) |" in md
  assert "| trust_region | – | – | 0.200 (± –) (0/1) |" in md
  # The same run in two roots is refused with a message naming it.
  _write_run(extra, "grpo", 1e-4, 0, [0.4, 0.4, 0.4], learner_s=1.0)
  with pytest.raises(ValueError, match="appear in two sweep roots"):
    report.report(f"{core},{extra}", out)


def test_manifest_keeps_concurrent_invocations(tmp_path):
  """Two sweeps on one root (two Manifest objects, interleaved writes) both keep their runs and invocations."""
  root = str(tmp_path / "sweep")
  a, b = sweep.Manifest(root), sweep.Manifest(root)
  run_a = sweep.PlannedRun("grpo", 1e-4, 0, os.path.join(root, "grpo/lr1e-4/seed0"), ("python", "a"))
  run_b = sweep.PlannedRun("capo", 1e-4, 0, os.path.join(root, "capo/lr1e-4/seed0"), ("python", "b"))
  ia = a.add_invocation({"argv": ["a"]})
  ib = b.add_invocation({"argv": ["b"]})
  a.record(run_a, status="running")
  b.record(run_b, status="running")
  a.record(run_a, status="finished", wall_s=3.0)
  a.update_invocation(ia, wall_s=10.0)
  b.update_invocation(ib, wall_s=20.0)
  with open(os.path.join(root, "manifest.json")) as f:
    data = json.load(f)
  assert data["runs"]["grpo/lr1e-4/seed0"]["status"] == "finished"
  assert data["runs"]["capo/lr1e-4/seed0"]["status"] == "running"
  assert data["runs"]["capo/lr1e-4/seed0"]["command"] == "python b"
  assert sorted((i["argv"][0], i["wall_s"]) for i in data["invocations"]) == [("a", 10.0), ("b", 20.0)]


def test_report_reads_sampling_and_concurrency_from_the_runs(tmp_path):
  root = str(tmp_path / "sweep")
  for seed in (0, 1):
    _write_run(root, "grpo", 1e-4, seed, [0.4, 0.45, 0.5], learner_s=1.0)
    with open(os.path.join(root, "grpo", "lr1e-4", f"seed{seed}", "config.gin"), "w") as f:
      f.write("TrainConfig.num_steps = 20\nEvalConfig.temperature = 0.8\nEvalConfig.top_p = 0.9\nEvalConfig.k = 4\n")
  with open(os.path.join(root, "manifest.json"), "w") as f:
    json.dump({"runs": {}, "invocations": [{"argv": ["--parallel", "3"], "wall_s": 60.0}]}, f)
  out = str(tmp_path / "docs")
  report.report(root, out, ["--root", root])
  md = open(os.path.join(out, "RESULTS.md")).read()
  assert "T = 0.8, top-p 0.9, 4 samples per problem" in md and "T = 0.6" not in md
  assert "up to 3 runs shared the CPU at once" in md and "two concurrent runs" not in md
  assert report.concurrency_note({"invocations": [{"argv": ["--parallel=1"]}]}) == "one run at a time"


def test_plots_leave_the_users_matplotlib_backend_alone(tmp_path):
  import matplotlib  # pylint: disable=import-outside-toplevel
  from capo_jax.plots import plot_run  # pylint: disable=import-outside-toplevel
  previous = matplotlib.get_backend()
  matplotlib.use("svg")
  try:
    rows = [{"step": s, "completions": 8 * s, "reward_mean": 0.1 * s, "eval_accuracy": 0.2, "m_hessian_p50": 1e-6,
             "m_fisher_p50": 1e-9, "rejected_token_fraction": 0.01} for s in range(3)]
    written = plot_run(rows, str(tmp_path / "plots"))
    assert len(written) == 3 and all(open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n" for p in written)
    assert matplotlib.get_backend() == "svg"
  finally:
    matplotlib.use(previous)
