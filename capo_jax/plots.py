"""Figures of one run from its ``metrics.jsonl`` rows.

Drawn on ``matplotlib.figure.Figure`` objects with the Agg canvas, never through pyplot: no display is needed and the
user's matplotlib backend is left as it is.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def subplots(nrows: int = 1, ncols: int = 1, **kwargs):
  """``(figure, axes)`` like ``pyplot.subplots``, on an Agg canvas of its own (no global backend state)."""
  fig = Figure(figsize=kwargs.pop("figsize", None))
  FigureCanvasAgg(fig)
  return fig, fig.subplots(nrows, ncols, **kwargs)


def _series(rows: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
  xs, ys = [], []
  for row in rows:
    if row.get(key) is not None and row.get("completions") is not None:
      xs.append(row["completions"])
      ys.append(row[key])
  return xs, ys


def plot_run(rows: Sequence[dict[str, Any]], out_dir: str, title: str = "") -> list[str]:
  """Writes accuracy/reward, rejected-fraction and m_H/m_F figures; returns the paths written."""
  os.makedirs(out_dir, exist_ok=True)
  written = []

  def save(fig, name):
    path = os.path.join(out_dir, name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    written.append(path)

  fig, ax = subplots(figsize=(6, 4))
  for key, label in (("eval_accuracy", "held-out pass@1 (sampled, avg@k)"),
                     ("eval_greedy_accuracy", "held-out greedy accuracy"), ("reward_mean", "train reward")):
    xs, ys = _series(rows, key)
    if xs:
      ax.plot(xs, ys, marker="o" if key.startswith("eval") else None, label=label)
  ax.set_xlabel("completions")
  ax.set_ylabel("accuracy / reward")
  ax.set_title(title or "accuracy and reward")
  ax.legend()
  save(fig, "accuracy.png")

  fig, ax = subplots(figsize=(6, 4))
  for key in ("rejected_token_fraction", "rejected_by_fisher", "rejected_by_hessian"):
    xs, ys = _series(rows, key)
    if xs:
      ax.plot(xs, ys, label=key)
  ax.set_xlabel("completions")
  ax.set_ylabel("fraction of completion tokens")
  ax.set_title("rejected tokens")
  if ax.get_legend_handles_labels()[0]:
    ax.legend()
  save(fig, "rejected.png")

  fig, axes = subplots(1, 2, figsize=(10, 4))
  for ax, prefix, name in ((axes[0], "m_hessian", "m_H"), (axes[1], "m_fisher", "m_F")):
    for q in ("p50", "p90", "p99"):
      xs, ys = _series(rows, f"{prefix}_{q}")
      if xs:
        ax.plot(xs, ys, label=f"{name} {q}")
    ax.set_xlabel("completions")
    ax.set_yscale("symlog", linthresh=1e-8)
    ax.set_title(f"{name} quantiles")
    if ax.get_legend_handles_labels()[0]:
      ax.legend()
  save(fig, "curvature.png")
  return written
