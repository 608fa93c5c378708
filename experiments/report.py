"""The study's report from a sweep's own output files (issue 6).

    python -m experiments.report --root runs/sweep-mini --out docs

Reads only what the runs wrote — ``<root>/<method>/lr<lr>/seed<seed>/metrics.jsonl`` and ``config.gin``, and the
sweep's ``<root>/manifest.json`` (commands, wall times, machine) — and writes

* ``<out>/<figures>/accuracy.png`` (``--figures``, default ``results``): held-out pass@1 vs completions, mean ± SEM
  over seeds, one panel per learning rate;
* ``<out>/<figures>/reward.png``: training reward (T = 1) vs completions, same layout;
* ``<out>/<figures>/rejected.png``: rejected-token fraction vs completions (methods with a mask);
* ``<out>/<figures>/curvature.png``: m_H and m_F quantiles over training (p90 line, p50–p99 band, mean over seeds);
* ``<out>/<markdown>`` (``--markdown``, default ``RESULTS.md``): the tables below, the figures, the exact commands,
  and the hand-written analysis kept in ``<out>/<figures>/ANALYSIS.md`` (included verbatim when present).

Definitions (all per (method, lr), over the seeds that have a step-0 eval):
* start / final: eval_accuracy at the first / last eval row; peak: the maximum of the seed-mean curve.
* mean ± SEM: mean over seeds ± sample std (ddof = 1) / √n (SEM undefined, shown "–", for n = 1).
* collapsed (per seed): final < ``COLLAPSE_FRACTION`` × start; the table shows "k/n".
* sample-efficiency ratio of a method at the aggressive (largest) lr against a reference GRPO curve with final
  accuracy a*: C_ref / C_method, C = the first eval's completions where the seed-mean curve reaches a* (C_ref is the
  first point where the reference reaches its own final mean, so ≤ its budget); "not reached" when the method never
  reaches a*.
* learner overhead: median learner_s over steps > 3 (after compiles) divided by GRPO's at the same lr.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import math
import os
import re
import shlex
import sys
from typing import Any, Sequence

from matplotlib import colormaps
import numpy as np  # pylint: disable=wrong-import-position

from capo_jax.plots import subplots  # pylint: disable=wrong-import-position
from capo_jax.run_logging import read_metrics  # pylint: disable=wrong-import-position

COLLAPSE_FRACTION = 0.5
_RUN_RE = re.compile(r"^lr(?P<lr>[0-9.eE+-]+)$")
_SEED_RE = re.compile(r"^seed(?P<seed>-?\d+)$")


def load_runs(root: str, *, finished_only: bool = True, skipped: list | None = None
              ) -> dict[tuple[str, float], dict[int, list[dict[str, Any]]]]:
  """``{(method, lr): {seed: rows}}`` for every ``<root>/<method>/lr<lr>/seed<seed>/metrics.jsonl``; with
  ``finished_only`` only runs whose final step's eval row exists (the others are appended to ``skipped``)."""
  runs: dict[tuple[str, float], dict[int, list]] = collections.defaultdict(dict)
  if not os.path.isdir(root):
    raise ValueError(f"sweep root {root!r} does not exist; run `python -m experiments.sweep --root {root} ...` first.")
  for method in sorted(os.listdir(root)):
    mdir = os.path.join(root, method)
    if method == "cache" or not os.path.isdir(mdir):
      continue
    for lr_name in os.listdir(mdir):
      m = _RUN_RE.match(lr_name)
      if not m:
        continue
      for seed_name in os.listdir(os.path.join(mdir, lr_name)):
        s = _SEED_RE.match(seed_name)
        path = os.path.join(mdir, lr_name, seed_name, "metrics.jsonl")
        if s and os.path.exists(path):
          rows = read_metrics(path)
          target = configured_steps(os.path.join(mdir, lr_name, seed_name, "config.gin"))
          if rows and (not finished_only or is_complete(rows, target)):
            runs[(method, float(m.group("lr")))][int(s.group("seed"))] = rows
          elif rows and skipped is not None:
            skipped.append(os.path.join(method, lr_name, seed_name))
  return dict(runs)


def configured_value(config_path: str, binding: str) -> str | None:
  """The value text of ``binding`` (e.g. ``EvalConfig.temperature``) in a run's operative ``config.gin``."""
  if not os.path.exists(config_path):
    return None
  with open(config_path) as f:
    m = re.search(rf"^{re.escape(binding)}\s*=\s*(.+?)\s*$", f.read(), re.M)
  return m.group(1) if m else None


def configured_steps(config_path: str) -> int | None:
  """``TrainConfig.num_steps`` from a run's operative ``config.gin`` (None if absent)."""
  value = configured_value(config_path, "TrainConfig.num_steps")
  return int(value) if value is not None and value.isdigit() else None


def is_complete(rows: Sequence[dict[str, Any]], num_steps: int | None) -> bool:
  """Finished: the eval row of the final step is there (of ``num_steps`` when known, else of the last step)."""
  last = max((r.get("step", 0) for r in rows), default=0)
  target = last if num_steps is None else num_steps
  return any(r.get("step") == target and "eval_accuracy" in r for r in rows) and target > 0


def mean_sem(values: Sequence[float]) -> tuple[float, float]:
  """Mean and standard error of the mean (sample std with ddof = 1 over √n; NaN for n < 2)."""
  x = np.asarray(values, np.float64)
  if x.size == 0:
    return math.nan, math.nan
  if x.size == 1:
    return float(x[0]), math.nan
  return float(x.mean()), float(x.std(ddof=1) / math.sqrt(x.size))


def series(rows: Sequence[dict[str, Any]], key: str, *, eval_rows: bool | None = None) -> dict[int, float]:
  """completions → value of ``key`` (rows lacking it, or with None, are skipped)."""
  out = {}
  for r in rows:
    if eval_rows is not None and (("eval_accuracy" in r) != eval_rows):
      continue
    if r.get(key) is not None and r.get("completions") is not None:
      out[int(r["completions"])] = float(r[key])
  return out


def seed_curve(per_seed: dict[int, list[dict]], key: str, *, eval_rows: bool | None = None):
  """On the completions every seed has: ``(x, mean, sem, n)`` arrays (mean/SEM over seeds at each x)."""
  curves = [series(rows, key, eval_rows=eval_rows) for rows in per_seed.values()]
  curves = [c for c in curves if c]
  if not curves:
    return np.array([]), np.array([]), np.array([]), 0
  xs = sorted(set.intersection(*(set(c) for c in curves)))
  stats = [mean_sem([c[x] for c in curves]) for x in xs]
  return (np.asarray(xs), np.asarray([s[0] for s in stats]), np.asarray([s[1] for s in stats]), len(curves))


def first_reach(xs: np.ndarray, ys: np.ndarray, target: float) -> float | None:
  """The first x at which ys ≥ target (None if never)."""
  for x, y in zip(xs, ys):
    if y >= target - 1e-12:
      return float(x)
  return None


def _median_after(rows, key, skip_steps=3) -> float:
  vals = [r[key] for r in rows if "eval_accuracy" not in r and r.get(key) is not None and r.get("step", 0) > skip_steps]
  return float(np.median(vals)) if vals else math.nan


def _nanmean(values) -> float:
  x = np.asarray(values, np.float64)
  return float(np.mean(x[np.isfinite(x)])) if np.isfinite(x).any() else math.nan


def summarize(runs) -> list[dict[str, Any]]:
  """One row per (method, lr): the table's numbers (see the module docstring for the definitions)."""
  table = []
  for (method, lr), per_seed in sorted(runs.items(), key=lambda kv: (kv[0][0], kv[0][1])):
    gains, greedy, starts, finals, collapsed = [], [], [], [], []
    rejected_mean, rejected_max, learner, rollout, evals = [], [], [], [], []
    for rows in per_seed.values():
      ev = [r for r in rows if "eval_accuracy" in r]
      tr = [r for r in rows if "eval_accuracy" not in r and "reward_mean" in r]
      if ev:
        starts.append(ev[0]["eval_accuracy"])
        finals.append(ev[-1]["eval_accuracy"])
        collapsed.append(ev[-1]["eval_accuracy"] < COLLAPSE_FRACTION * ev[0]["eval_accuracy"])
        gains.append(ev[-1]["eval_accuracy"] - ev[0]["eval_accuracy"])
        if ev[-1].get("eval_greedy_accuracy") is not None:
          greedy.append(ev[-1]["eval_greedy_accuracy"])
      rej = [r.get("rejected_token_fraction") or 0.0 for r in tr]
      if rej:
        rejected_mean.append(float(np.mean(rej)))
        rejected_max.append(float(np.max(rej)))
      learner.append(_median_after(rows, "learner_s"))
      rollout.append(_median_after(rows, "rollout_s"))
      evals.append(sum(r.get("eval_s", 0.0) for r in ev))
    xs, mean, sem, n = seed_curve(per_seed, "eval_accuracy", eval_rows=True)
    last_steps = [max((r.get("step", 0) for r in rows), default=0) for rows in per_seed.values()]
    table.append({
        "method": method, "lr": lr, "seeds": len(per_seed), "steps": min(last_steps) if last_steps else 0,
        "start": mean_sem(starts), "final": mean_sem(finals), "gain": mean_sem(gains),
        "final_greedy": mean_sem(greedy),
        "peak": (float(mean.max()), float(xs[int(mean.argmax())])) if n else (math.nan, math.nan),
        "collapsed": (int(sum(collapsed)), len(collapsed)),
        "rejected_mean": mean_sem(rejected_mean), "rejected_max": mean_sem(rejected_max),
        "learner_s": _nanmean(learner), "rollout_s": _nanmean(rollout),
        "eval_s": float(np.mean(evals)) if evals else math.nan,
        "curve": (xs, mean, sem, n),
        "seed_curves": [tuple(np.asarray(v) for v in zip(*sorted(series(rows, "eval_accuracy", eval_rows=True).items())))
                        for rows in per_seed.values() if series(rows, "eval_accuracy", eval_rows=True)],
        "diag": {k: seed_curve(per_seed, k, eval_rows=False)
                 for k in ("completion_tokens_mean", "entropy", "rejected_token_fraction", "trust_region_scale",
                           "subset_accepted_fraction")},
    })
  grpo_learner = {row["lr"]: row["learner_s"] for row in table if row["method"] == "grpo"}
  for row in table:
    base = grpo_learner.get(row["lr"])
    row["overhead"] = row["learner_s"] / base if base else math.nan
  return table


def per_seed_reach(row: dict[str, Any], target: float, c_ref: float | None) -> dict[str, Any]:
  """Each seed's completions to ``target`` on its own eval curve: how many of the seeds reach it, and the ratio
  ``c_ref / C_seed`` mean ± SEM over the seeds that reach it after their start (a seed at or above the target at its
  start has no finite ratio)."""
  curves = row.get("seed_curves") or []
  reached = [first_reach(xs, ys, target) for xs, ys in curves]
  ratios = [c_ref / c for c in reached if c and c_ref]
  return {"seeds": len(curves), "reached": sum(c is not None for c in reached),
          "completions": reached, "ratio": mean_sem(ratios) if ratios else (math.nan, math.nan)}


def sample_efficiency(table, conservative_lr: float | None = None) -> dict[str, Any]:
  """Ratios at the aggressive (largest) lr against conservative GRPO (GRPO at ``conservative_lr``, default its
  smallest lr) and the best stable GRPO (``rows``), and for every (method, lr) with the per-seed spread
  (``all_rows``, ``per_seed_reach``)."""
  lrs = sorted({row["lr"] for row in table})
  grpo = {row["lr"]: row for row in table if row["method"] == "grpo"}
  if not lrs or not grpo:
    return {}
  aggressive = lrs[-1]
  refs = {}
  if conservative_lr is None:
    refs["conservative GRPO"] = grpo[min(grpo)]
  else:
    match = [lr for lr in grpo if math.isclose(lr, conservative_lr, rel_tol=1e-6)]
    if not match:
      raise ValueError(f"--conservative_lr {conservative_lr:g}: no GRPO runs at that lr (GRPO ran at "
                       f"{', '.join(f'{lr:g}' for lr in sorted(grpo))}).")
    refs["conservative GRPO"] = grpo[match[0]]
  stable = [r for r in grpo.values() if r["collapsed"][0] == 0 and r["collapsed"][1] > 0]
  if stable:
    refs["best stable GRPO"] = max(stable, key=lambda r: r["final"][0])
  out = {"aggressive_lr": aggressive, "refs": {}, "rows": [], "all_rows": []}
  for name, ref in refs.items():
    xs, mean, _, _ = ref["curve"]
    target = ref["final"][0]
    c_ref = first_reach(xs, mean, target)
    # A reference that ends at or below its own start never "reached" anything: the ratio is undefined.
    if not c_ref:
      c_ref = None
    out["refs"][name] = {"lr": ref["lr"], "target": target, "c_ref": c_ref}
  for row in table:
    if row["lr"] != aggressive:
      continue
    xs, mean, _, _ = row["curve"]
    entry = {"method": row["method"], "collapsed": row["collapsed"]}
    for name, ref in out["refs"].items():
      c = first_reach(xs, mean, ref["target"]) if len(xs) else None
      entry[name] = (c, ref["c_ref"] / c if c and ref["c_ref"] else None)
    out["rows"].append(entry)
  for row in sorted(table, key=lambda r: (r["method"], r["lr"])):
    xs, mean, _, _ = row["curve"]
    entry = {"method": row["method"], "lr": row["lr"], "collapsed": row["collapsed"]}
    for name, ref in out["refs"].items():
      c = first_reach(xs, mean, ref["target"]) if len(xs) else None
      entry[name] = {"mean_curve": (c, ref["c_ref"] / c if c and ref["c_ref"] else None),
                     **per_seed_reach(row, ref["target"], ref["c_ref"])}
    out["all_rows"].append(entry)
  return out


# ----------------------------------------------------------------------------------------------------------------
# Figures.

def _colors(methods):
  cmap = colormaps["tab10"]
  return {m: cmap(i % 10) for i, m in enumerate(methods)}


def _panels(lrs, height=3.6):
  fig, axes = subplots(1, len(lrs), figsize=(4.6 * len(lrs), height), squeeze=False, sharey=True)
  return fig, axes[0]


def _band(ax, xs, mean, sem, color, label, **kw):
  ax.plot(xs, mean, color=color, label=label, **kw)
  if len(xs) and np.isfinite(sem).any():
    s = np.nan_to_num(sem)
    ax.fill_between(xs, mean - s, mean + s, color=color, alpha=0.2, lw=0)


def plot_metric(runs, key, path, *, eval_rows, ylabel, title, methods_filter=None, smooth=1):
  methods = sorted({m for m, _ in runs})
  lrs = sorted({lr for _, lr in runs})
  colors = _colors(methods)
  fig, axes = _panels(lrs)
  drew = False
  for ax, lr in zip(axes, lrs):
    for m in methods:
      if (m, lr) not in runs or (methods_filter and not methods_filter(m)):
        continue
      xs, mean, sem, n = seed_curve(runs[(m, lr)], key, eval_rows=eval_rows)
      if not len(xs):
        continue
      if smooth > 1 and len(xs) >= smooth:
        k = np.ones(smooth) / smooth
        mean, sem, xs = (np.convolve(mean, k, "valid"), np.convolve(np.nan_to_num(sem), k, "valid"),
                         xs[smooth - 1:])
      _band(ax, xs, mean, sem, colors[m], f"{m} (n={n})", marker="o" if eval_rows else None, ms=3)
      drew = True
    ax.set_title(f"lr {lr:g}")
    ax.set_xlabel("completions")
    ax.grid(alpha=0.3)
  axes[0].set_ylabel(ylabel)
  if drew:
    axes[-1].legend(fontsize=7)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  if drew:  # no empty figures (e.g. rejected fractions of a sweep without a masking method)
    fig.savefig(path, dpi=110)
  return drew


def plot_curvature(runs, path):
  methods = sorted({m for m, _ in runs})
  lrs = sorted({lr for _, lr in runs})
  colors = _colors(methods)
  fig, axes = subplots(2, len(lrs), figsize=(4.6 * len(lrs), 6.4), squeeze=False, sharey="row")
  for j, lr in enumerate(lrs):
    for i, name in enumerate(("m_hessian", "m_fisher")):
      ax = axes[i][j]
      for m in methods:
        if (m, lr) not in runs:
          continue
        curves = {q: seed_curve(runs[(m, lr)], f"{name}_{q}", eval_rows=False) for q in ("p50", "p90", "p99")}
        xs = curves["p90"][0]
        if not len(xs):
          continue
        ax.plot(xs, curves["p90"][1], color=colors[m], label=f"{m} p90")
        if len(curves["p50"][0]) == len(xs) and len(curves["p99"][0]) == len(xs):
          ax.fill_between(xs, curves["p50"][1], curves["p99"][1], color=colors[m], alpha=0.15, lw=0)
      if name == "m_fisher":
        ax.set_yscale("log")
      else:
        ax.set_yscale("symlog", linthresh=1e-6)
      ax.set_title(f"{'m_H' if name == 'm_hessian' else 'm_F'}, lr {lr:g}")
      ax.set_xlabel("completions")
      ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("m_H (signed; symlog)")
    axes[1][0].set_ylabel("m_F")
  if axes[0][-1].get_legend_handles_labels()[0]:
    axes[0][-1].legend(fontsize=7)
  fig.suptitle("per-token m_H, m_F: p90 (line), p50–p99 (band), mean over seeds\n(CAPO-family: quantiles of the "
               "tokens the mask kept)", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


# ----------------------------------------------------------------------------------------------------------------
# Markdown.

def _fmt(ms, digits=3):
  mean, sem = ms
  if not np.isfinite(mean):
    return "–"
  return f"{mean:.{digits}f} ± {sem:.{digits}f}" if np.isfinite(sem) else f"{mean:.{digits}f} (± –)"


def _pct(ms):
  mean, sem = ms
  if not np.isfinite(mean):
    return "–"
  return f"{100 * mean:.2f}%" + (f" ± {100 * sem:.2f}" if np.isfinite(sem) else "")


def curvature_scaling(runs) -> list[dict[str, Any]]:
  """m_H/m_F p50 and p90 at the FIRST RL step of each (method, lr), mean over seeds.

  At step 1 every lr of one seed starts from the same warm start and samples the same rollouts (same key), and the
  Adam model falls back to d = g; so the ratio between two lrs isolates the η scaling (m_F ∝ η², m_H ≈ η when the
  first-order term dominates).
  """
  out = []
  for (m, lr), per_seed in sorted(runs.items()):
    vals = collections.defaultdict(list)
    for rows in per_seed.values():
      first = next((r for r in rows if r.get("step") == 1 and "eval_accuracy" not in r), None)
      if first is None:
        continue
      for k in ("m_hessian_p50", "m_hessian_p90", "m_hessian_p99", "m_fisher_p50", "m_fisher_p90", "m_fisher_p99"):
        if first.get(k) is not None:
          vals[k].append(first[k])
    if vals:
      out.append({"method": m, "lr": lr, **{k: float(np.mean(v)) for k, v in vals.items()}})
  return out


def eta_exponents(scaling) -> list[dict[str, Any]]:
  """Per method with ≥ 2 lrs: log(q(η₂)/q(η₁)) / log(η₂/η₁) of the first-step quantiles (smallest vs largest lr)."""
  by_method = collections.defaultdict(list)
  for s in scaling:
    by_method[s["method"]].append(s)
  out = []
  for m, rows in sorted(by_method.items()):
    if len(rows) < 2:
      continue
    lo, hi = min(rows, key=lambda r: r["lr"]), max(rows, key=lambda r: r["lr"])
    e = {"method": m, "lr1": lo["lr"], "lr2": hi["lr"]}
    for k in ("m_hessian_p90", "m_hessian_p99", "m_fisher_p90", "m_fisher_p99"):
      a, b = lo.get(k), hi.get(k)
      if a and b and a > 0 and b > 0:
        e[k] = math.log(b / a) / math.log(hi["lr"] / lo["lr"])
    out.append(e)
  return out


def robustness_lines(table) -> list[str]:
  """Paired final − start per method (rows) and lr (columns), with collapsed seeds: accuracy over the lr range."""
  lrs = sorted({row["lr"] for row in table})
  methods = sorted({row["method"] for row in table})
  if len(lrs) < 2:
    return []
  cell = {(row["method"], row["lr"]): row for row in table}
  lines = ["### Robustness across learning rates", "",
           f"Paired final − start (mean ± SEM over seeds; collapsed seeds k/n) at each lr, {lrs[0]:g} … {lrs[-1]:g} "
           f"({lrs[-1] / lrs[0]:.0f}× range); – = not run.", "",
           "| method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |", "|---|" + "---|" * len(lrs)]
  for m in methods:
    cells = []
    for lr in lrs:
      row = cell.get((m, lr))
      cells.append("–" if row is None else f"{_fmt(row['gain'])} ({row['collapsed'][0]}/{row['collapsed'][1]})")
    lines.append(f"| {m} | " + " | ".join(cells) + " |")
  return lines + [""]


def _times(x: float) -> str:
  return f"{x:.2f}×" if np.isfinite(x) else "– (no GRPO at this lr)"


def _first_last(curve, digits) -> str:
  if curve is None or not len(curve[1]):
    return "–"
  y = curve[1]
  return f"{np.mean(y[:10]):.{digits}f} → {np.mean(y[-10:]):.{digits}f}"


def _manifest(root):
  """The sweep's manifest; for several roots (``a,b``) their union (runs keyed ``<root>:<run id>``)."""
  merged = {"runs": {}, "invocations": []}
  for r in split_roots(root):
    path = os.path.join(r, "manifest.json")
    if os.path.exists(path):
      with open(path) as f:
        m = json.load(f)
      merged["runs"].update({f"{r}:{k}": v for k, v in m.get("runs", {}).items()})
      merged["invocations"] += m.get("invocations", [])
  return merged


def split_roots(root: str) -> list[str]:
  """``--root a,b`` → ``["a", "b"]``: one report over several sweeps (e.g. a core sweep and its extension)."""
  return [r for r in root.split(",") if r]


def load_all(root: str, *, skipped: list | None = None):
  """``load_runs`` over every root of ``--root a,b``; the same (method, lr, seed) in two roots is an error."""
  runs: dict[tuple[str, float], dict[int, list]] = collections.defaultdict(dict)
  for r in split_roots(root):
    for key, per_seed in load_runs(r, skipped=skipped).items():
      clash = set(per_seed) & set(runs[key])
      if clash:
        raise ValueError(f"{key[0]} at lr {key[1]:g}, seed(s) {sorted(clash)} appear in two sweep roots of "
                         f"{root!r}; report each root on its own or remove one copy.")
      runs[key].update(per_seed)
  return dict(runs)


def sampling_settings(root: str) -> str:
  """The evaluation sampling of the runs under ``root``, read from their ``config.gin`` files."""
  seen = set()
  for r in split_roots(root):
    for folder, _, files in os.walk(r):
      if "config.gin" in files:
        path = os.path.join(folder, "config.gin")
        seen.add(tuple(configured_value(path, f"EvalConfig.{k}") for k in ("temperature", "top_p", "k")))
  if not seen:
    return "evaluation sampling not recorded in the runs' config.gin"
  return "; ".join(f"T = {t}, top-p {p}, {k} samples per problem" for t, p, k in sorted(seen, key=str))


def concurrency_note(manifest: dict) -> str:
  """How many runs shared the machine, from the sweep commands recorded in the manifest."""
  parallel = set()
  for inv in manifest.get("invocations", []):
    argv = list(inv.get("argv", []))
    value = "1"
    for i, a in enumerate(argv):
      if a.startswith("--parallel="):
        value = a.split("=", 1)[1]
      elif a == "--parallel" and i + 1 < len(argv):
        value = argv[i + 1]
    parallel.add(value)
  if not parallel:
    return "concurrency not recorded"
  if parallel == {"1"}:
    return "one run at a time"
  return (f"up to {'/'.join(sorted(parallel))} runs shared the CPU at once, so step times carry that load; "
          "benchmarks/ measures overheads side by side")


def write_markdown(root, out, table, eff, scaling, figures, argv, skipped=(), *, markdown="RESULTS.md",
                   figures_dir="results", title="Results: the miniature reproduction study (issue 6)",
                   make_target="reproduce-mini") -> str:
  manifest = _manifest(root)
  lines = [f"# {title}", "",
           f"Generated by `python -m experiments.report {shlex.join(argv)}` on "
           f"{datetime.datetime.now().isoformat(timespec='minutes')} from the runs under `{root}` "
           "(their `metrics.jsonl` and the sweep's `manifest.json`; nothing else). Regenerate everything with "
           f"`make {make_target}`.", ""]
  inv = manifest.get("invocations", [])
  if inv:
    machine = inv[-1].get("machine", {})
    total = sum(i.get("wall_s", 0.0) for i in inv)
    lines += ["## How it was run", "",
              f"- Machine: {machine.get('platform', '?')}, {machine.get('cpu_count', '?')} CPUs "
              f"({machine.get('processor', '?')}), Python {machine.get('python', '?')}.",
              f"- Sweep wall time: {total / 60:.1f} min over {len(inv)} invocation(s) of the sweep (warm starts "
              "included); sweep command(s):"]
    for i in inv:
      lines.append(f"  - `{' '.join(i.get('argv', []))}` ({i.get('wall_s', 0.0) / 60:.1f} min, started "
                   f"{i.get('start', '?')})")
    lines.append("")
  if skipped:
    lines += [f"**Partial sweep:** {len(skipped)} run(s) had not finished and are left out of every number below: "
              + ", ".join(f"`{s}`" for s in sorted(skipped)) + ".", ""]
  lines += ["## Table", "",
            f"Held-out sampled pass@1 ({sampling_settings(root)}), mean ± SEM over seeds. Collapsed: final < "
            f"{COLLAPSE_FRACTION} × start, seeds k/n. Rejected: token fraction the mask rejected (mean over steps; max "
            "over steps), mean ± SEM over seeds. Step times: medians over steps > 3, mean over seeds; overhead = "
            f"learner time / GRPO's learner time at the same lr ({concurrency_note(manifest)}). Wall = mean per-run "
            "wall time from the manifest (warm start included when the run built it).", "",
            "| method | lr | seeds | steps | start | peak (at completions) | final | final − start (paired) | "
            "final greedy | collapsed | rejected mean | rejected max | learner s/step | overhead vs GRPO | "
            "rollout s/step | wall s/run |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  runs_meta = manifest.get("runs", {})
  for row in sorted(table, key=lambda r: (r["lr"], r["method"])):
    walls = [v.get("wall_s_total") for k, v in runs_meta.items()
             if v.get("method") == row["method"] and abs(v.get("lr", -1) - row["lr"]) < 1e-15 and v.get("wall_s_total")]
    wall = f"{np.mean(walls):.0f}" if walls else "–"
    peak = f"{row['peak'][0]:.3f} ({row['peak'][1]:.0f})" if np.isfinite(row["peak"][0]) else "–"
    lines.append(
        f"| {row['method']} | {row['lr']:g} | {row['seeds']} | {row['steps']} | {_fmt(row['start'])} | {peak} | "
        f"{_fmt(row['final'])} | {_fmt(row['gain'])} | {_fmt(row['final_greedy'])} | "
        f"{row['collapsed'][0]}/{row['collapsed'][1]} | {_pct(row['rejected_mean'])} | "
        f"{_pct(row['rejected_max'])} | {row['learner_s']:.3f} | {_times(row['overhead'])} | {row['rollout_s']:.3f} | "
        f"{wall} |")
  lines.append("")
  lines += robustness_lines(table)
  lines += ["### Eval curves and collapse diagnostics", "",
            "Seed-mean held-out pass@1 at each eval point, and train-row means over the first and the last 10 steps "
            "(first → last): completion length (tokens; the limit is the config's max_new_tokens), policy entropy, "
            "rejected-token fraction, for trust-region runs the applied step scale s (effective lr ≈ s × lr), and "
            "for Theorem-5.1 subset runs the fraction of prompt groups accepted.", "",
            "| method | lr | pass@1 at eval points (completions) | length | entropy | rejected | trust-region scale | "
            "subsets accepted |",
            "|---|---|---|---|---|---|---|---|"]
  for row in sorted(table, key=lambda r: (r["lr"], r["method"])):
    xs, mean, _, _ = row["curve"]
    curve = ", ".join(f"{m:.3f} ({x:.0f})" for x, m in zip(xs, mean))
    lines.append(f"| {row['method']} | {row['lr']:g} | {curve} | " + " | ".join(
        _first_last(row["diag"].get(k), d) for k, d in (("completion_tokens_mean", 1), ("entropy", 2),
                                                        ("rejected_token_fraction", 3), ("trust_region_scale", 2),
                                                        ("subset_accepted_fraction", 2)))
        + " |")
  lines.append("")
  if eff:
    lines += ["## Sample efficiency at the aggressive learning rate", "",
              f"Completions each method at lr {eff['aggressive_lr']:g} needs for its seed-mean eval curve to reach a "
              "reference GRPO's final accuracy, and the ratio C_ref / C_method (C_ref = the completions at which the "
              "reference's own seed-mean curve first reached that accuracy). Evaluated only at eval points, so "
              "ratios are coarse.", ""]
    for name, ref in eff["refs"].items():
      if ref["c_ref"] is None:
        lines.append(f"- {name}: lr {ref['lr']:g}, final {ref['target']:.3f} — not above its own start, so the "
                     "ratio against it is undefined (shown as completions only).")
      else:
        lines.append(f"- {name}: lr {ref['lr']:g}, final {ref['target']:.3f}, first reached at {ref['c_ref']:.0f} "
                     "completions.")
    lines += ["", "| method (aggressive lr) | collapsed | " + " | ".join(
        f"to {n}'s final: completions (ratio)" for n in eff["refs"]) + " |",
              "|---|---|" + "---|" * len(eff["refs"])]
    for e in eff["rows"]:
      cells = []
      for n in eff["refs"]:
        c, ratio = e[n]
        cells.append("not reached" if c is None else f"{c:.0f} ({ratio:.2f}×)" if ratio else f"{c:.0f}")
      lines.append(f"| {e['method']} | {e['collapsed'][0]}/{e['collapsed'][1]} | " + " | ".join(cells) + " |")
    lines.append("")
    lines += ["Every method and learning rate, with the spread over seeds: each seed's own eval curve against the "
              "reference's final (seeds reaching it k/n, and the ratio C_ref / C_seed, mean ± SEM over the seeds that "
              "reach it); the seed-mean curve's ratio as above.", "",
              "| method | lr | collapsed | " + " | ".join(
                  f"to {n}'s final: seed-mean curve | seeds reaching | per-seed ratio" for n in eff["refs"]) + " |",
              "|---|---|---|" + "---|---|---|" * len(eff["refs"])]
    for e in eff["all_rows"]:
      cells = []
      for n in eff["refs"]:
        c, ratio = e[n]["mean_curve"]
        cells.append("not reached" if c is None else f"{c:.0f} ({ratio:.2f}×)" if ratio else f"{c:.0f}")
        cells.append(f"{e[n]['reached']}/{e[n]['seeds']}")
        r_mean, r_sem = e[n]["ratio"]
        cells.append("–" if math.isnan(r_mean) else f"{r_mean:.2f}×" + ("" if math.isnan(r_sem) else f" ± {r_sem:.2f}"))
      lines.append(f"| {e['method']} | {e['lr']:g} | {e['collapsed'][0]}/{e['collapsed'][1]} | " + " | ".join(cells)
                   + " |")
    lines.append("")
  if scaling:
    lines += ["## m_H / m_F at the first RL step (for the τ-scaling question)", "",
              "Mean over seeds of the per-token quantiles logged at step 1 (for CAPO-family rows: of the tokens the "
              "mask kept). Same warm start and same rollouts for every lr of a seed, so ratios between lrs isolate η.",
              "", "| method | lr | m_H p50 | m_H p90 | m_H p99 | m_F p50 | m_F p90 | m_F p99 |",
              "|---|---|---|---|---|---|---|---|"]
    for s in sorted(scaling, key=lambda r: (r["method"], r["lr"])):
      lines.append(f"| {s['method']} | {s['lr']:g} | " + " | ".join(
          f"{s.get(k, math.nan):.2e}" for k in ("m_hessian_p50", "m_hessian_p90", "m_hessian_p99", "m_fisher_p50",
                                                 "m_fisher_p90", "m_fisher_p99")) + " |")
    lines.append("")
    exps = eta_exponents(scaling)
    if exps:
      lines += ["Measured η-exponent between the smallest and largest lr of a method, log(q(η₂)/q(η₁)) / log(η₂/η₁) "
                "(1 for m_H ∝ η, 2 for m_F ∝ η²):", "",
                "| method | lrs | m_H p90 | m_H p99 | m_F p90 | m_F p99 |", "|---|---|---|---|---|---|"]
      for e in exps:
        lines.append(f"| {e['method']} | {e['lr1']:g} → {e['lr2']:g} | " + " | ".join(
            f"{e.get(k, math.nan):.2f}" for k in ("m_hessian_p90", "m_hessian_p99", "m_fisher_p90", "m_fisher_p99"))
            + " |")
      lines.append("")
  lines += ["## Figures", ""]
  for rel, caption in figures:
    lines += [f"![{caption}]({rel})", "", f"*{caption}.* Command: `python -m experiments.report {shlex.join(argv)}`.",
              ""]
  analysis = os.path.join(out, figures_dir, "ANALYSIS.md")
  if os.path.exists(analysis):
    with open(analysis) as f:
      lines += [f.read(), ""]
  lines += ["## Exact commands of the runs", "", "<details><summary>one line per run (from the manifest)</summary>", "",
            "```"]
  for run_id in sorted(runs_meta):
    lines.append(runs_meta[run_id].get("command", ""))
  lines += ["```", "", "</details>", ""]
  path = os.path.join(out, markdown)
  with open(path, "w") as f:
    f.write("\n".join(lines))
  return path


def report(root: str, out: str, argv: Sequence[str] = (), *, markdown: str = "RESULTS.md",
           figures_dir: str = "results", title: str = "Results: the miniature reproduction study (issue 6)",
           make_target: str = "reproduce-mini", conservative_lr: float | None = None) -> dict[str, Any]:
  """Writes the figures and RESULTS.md; returns ``{"table", "efficiency", "scaling", "paths"}``."""
  skipped: list[str] = []
  runs = load_all(root, skipped=skipped)
  if not runs:
    raise ValueError(f"no finished runs under {root!r}; expected <root>/<method>/lr<lr>/seed<seed>/metrics.jsonl "
                     "with the final step's eval row (run `python -m experiments.sweep --root ...` first).")
  fig_dir = os.path.join(out, figures_dir)
  os.makedirs(fig_dir, exist_ok=True)
  figures = []
  plot_metric(runs, "eval_accuracy", os.path.join(fig_dir, "accuracy.png"), eval_rows=True,
              ylabel="held-out pass@1 (T=0.6)", title="held-out accuracy vs completions (mean ± SEM over seeds)")
  figures.append((f"{figures_dir}/accuracy.png", "Held-out sampled pass@1 vs completions, mean ± SEM over seeds, per lr"))
  plot_metric(runs, "reward_mean", os.path.join(fig_dir, "reward.png"), eval_rows=False, ylabel="train reward (T=1)",
              title="training reward vs completions (5-step moving average; mean ± SEM over seeds)", smooth=5)
  figures.append((f"{figures_dir}/reward.png", "Training reward (T = 1) vs completions, 5-step moving average"))
  if plot_metric(runs, "rejected_token_fraction", os.path.join(fig_dir, "rejected.png"), eval_rows=False,
                 ylabel="rejected-token fraction", title="tokens rejected by the CAPO mask (mean ± SEM over seeds)",
                 methods_filter=lambda m: "capo" in m):
    figures.append((f"{figures_dir}/rejected.png", "Rejected-token fraction vs completions (CAPO-family methods)"))
  plot_curvature(runs, os.path.join(fig_dir, "curvature.png"))
  figures.append((f"{figures_dir}/curvature.png", "m_H and m_F quantiles over training (p90 line, p50–p99 band)"))
  table = summarize(runs)
  eff = sample_efficiency(table, conservative_lr)
  scaling = curvature_scaling(runs)
  path = write_markdown(root, out, table, eff, scaling, figures, argv, skipped, markdown=markdown,
                        figures_dir=figures_dir, title=title, make_target=make_target)
  return {"table": table, "efficiency": eff, "scaling": scaling,
          "paths": [path] + [os.path.join(out, f) for f, _ in figures]}


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  p = argparse.ArgumentParser(prog="python -m experiments.report", description=__doc__.split("\n\n")[0])
  p.add_argument("--root", required=True,
                 help="the sweep folder (experiments.sweep --root); several as a,b are reported together")
  p.add_argument("--make_target", default="reproduce-mini", help="the make target named as regenerating the report")
  p.add_argument("--out", default="docs", help="writes <out>/<markdown> and <out>/<figures>/*.png")
  p.add_argument("--markdown", default="RESULTS.md", help="the report's file name under --out")
  p.add_argument("--figures", default="results", help="the figures' folder under --out")
  p.add_argument("--title", default="Results: the miniature reproduction study (issue 6)", help="the report's title")
  p.add_argument("--conservative_lr", type=float, default=None,
                 help="the GRPO lr of the 'conservative GRPO' reference (default: GRPO's smallest lr)")
  args = p.parse_args(argv)
  try:
    result = report(args.root, args.out, argv, markdown=args.markdown, figures_dir=args.figures, title=args.title,
                    make_target=args.make_target, conservative_lr=args.conservative_lr)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  for path in result["paths"]:
    print(path)
  return 0


if __name__ == "__main__":
  sys.exit(main())
