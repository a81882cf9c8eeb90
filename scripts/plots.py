"""The plots of ftlab's result tables (matplotlib, written as PNG), for every runner: the study
report (`scripts/study_report.py`), the sweep (`scripts/sweep.py`) and the pretrain demo
(`scripts/pretrain_demo.py`).

- `accuracy_vs_params`: accuracy against trainable parameters (log scale), one series per
  family, bars as the caller measures spread (intervals or std over seeds);
- `accuracy_bars`: one horizontal bar per plan, its spread and each seed's value;
- `heatmap`: tasks x plans, the value written in each cell.

`study_plots` draws a study report's (`study_points` are its plans on the first).
"""

from __future__ import annotations

import dataclasses
import io
import os
import textwrap
from typing import Sequence

import numpy as np

from ftlab.files import storage


@dataclasses.dataclass(frozen=True)
class Point:
  """One plan on an accuracy-against-parameters plot.

  Attributes:
    name: the annotation ('' for none).
    family: its series (the legend's entry).
    params: trainable parameters (> 0; log axis).
    accuracy: percent.
    bar: the half-height of its error bar, percent (0: none).
  """

  name: str
  family: str
  params: float
  accuracy: float
  bar: float = 0.0


@dataclasses.dataclass(frozen=True)
class Bar:
  """One plan on a bar plot: its label, mean and spread (percent), each seed's value, and
  the share of parameters it trains (percent; None to leave it out)."""

  label: str
  mean: float
  spread: float = 0.0
  seeds: Sequence[float] = ()
  trainable_percent: float | None = None
  baseline: bool = False  # drawn grey (training from scratch)


def _pyplot():
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  return plt


def _save(fig, path: str) -> None:
  """Writes the figure whole (a reader never sees half a PNG), to a local path or a remote
  workdir's (`gs://`, `s3://`: `ftlab.files.storage`), then closes it."""
  image = io.BytesIO()
  fig.savefig(image, format='png', dpi=100)
  storage.write_whole(path, image.getvalue())
  _pyplot().close(fig)


def accuracy_vs_params(
  points: Sequence[Point],
  path: str,
  *,
  xlabel: str = 'trainable parameters',
  ylabel: str = 'test accuracy (%)',
  dodge: bool = False,
  legend_outside: bool = False,
) -> None:
  """Accuracy against trainable parameters (log x), one series per family in first-seen order.

  Args:
    points: the plans; a family's points are joined in one errorbar series.
    path: the PNG to write.
    xlabel, ylabel: the axes' labels.
    dodge: shift each family sideways (x 1.08 per family), so families at the same budget keep
      their bars apart.
    legend_outside: the legend right of the axes (many series), else inside at the lower right.
  """
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(10, 5) if legend_outside else (8.5, 4.8))
  families = list(dict.fromkeys(p.family for p in points))
  for i, family in enumerate(families):
    own = [p for p in points if p.family == family]
    shift = 1.08 ** (i - (len(families) - 1) / 2) if dodge else 1.0
    xs = [shift * p.params for p in own]
    ax.errorbar(
      xs,
      [p.accuracy for p in own],
      yerr=[p.bar for p in own],
      fmt='osD^vP*Xh<>p'[i % 12],
      color=f'C{i % 10}',
      capsize=3,
      label=family,
    )
    for j, (x, p) in enumerate(zip(xs, own)):
      if p.name:
        ax.annotate(
          p.name,
          (x, p.accuracy),
          fontsize=7,
          xytext=(5 if i % 2 else -5, 4 - 9 * (j % 2)),
          ha='left' if i % 2 else 'right',
          textcoords='offset points',
        )
  ax.set_xscale('log')
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.grid(alpha=0.3)
  if families:
    if legend_outside:
      ax.legend(fontsize=8, loc='upper left', bbox_to_anchor=(1.01, 1))
    else:
      ax.legend(fontsize=7, loc='lower right')
  fig.tight_layout()
  _save(fig, path)


def accuracy_bars(bars: Sequence[Bar], path: str, *, xlabel: str) -> None:
  """One horizontal bar per plan (mean, percent), its spread as an error bar, each seed as a
  dot above it, the mean and trainable share written inside; x from 0 to 100."""
  plt = _pyplot()
  # Labels wrapped and the height grown with the rows, so long plan descriptions leave the bars
  # their width.
  fig, ax = plt.subplots(figsize=(9, 1.0 + 0.5 * len(bars)))
  y = np.arange(len(bars))
  means = [b.mean for b in bars]
  ax.barh(y, means, color=['grey' if b.baseline else 'tab:blue' for b in bars], alpha=0.8)
  ax.errorbar(means, y, xerr=[b.spread for b in bars], fmt='none', ecolor='k', capsize=3)
  for i, b in enumerate(bars):
    ax.plot(list(b.seeds), [i + 0.25] * len(b.seeds), 'o', ms=3, color='tab:orange')
    text = f'{b.mean:.1f}%'
    if b.trainable_percent is not None:
      share = b.trainable_percent
      text += f'  ({share:.2f}% trainable)' if share < 1 else f'  ({share:.0f}% trainable)'
    ax.text(1, i, text, va='center', ha='left', color='white', fontsize=8)
  ax.set_yticks(y, [textwrap.fill(b.label, 48) for b in bars], fontsize=8)
  ax.set_xlim(0, 100)
  ax.invert_yaxis()
  ax.set_xlabel(xlabel)
  fig.tight_layout()
  _save(fig, path)


def heatmap(
  rows: Sequence[str], columns: Sequence[str], values: np.ndarray, path: str, *, label: str
) -> None:
  """`values[i, j]` (nan: missing, shown '–') in a rows x columns grid, written in each cell."""
  plt = _pyplot()
  fig, ax = plt.subplots(
    figsize=(max(4.5, 2.0 + 1.1 * len(columns)), max(2.5, 1.5 + 0.5 * len(rows)))
  )
  image = ax.imshow(values, cmap='viridis', aspect='auto')
  for i in range(len(rows)):
    for j in range(len(columns)):
      text = '–' if np.isnan(values[i, j]) else f'{values[i, j]:.1f}'
      ax.text(j, i, text, ha='center', va='center', color='w', fontsize=8)
  ax.set_xticks(range(len(columns)), columns, rotation=45, ha='right', fontsize=8)
  ax.set_yticks(range(len(rows)), rows, fontsize=8)
  fig.colorbar(image, ax=ax, label=label)
  fig.tight_layout()
  _save(fig, path)


def study_points(report: dict) -> list[Point]:
  """A study report's plans: the mean test accuracy over tasks (%) at the median trainable
  parameters, the bar the mean of the per-task 95% interval half-widths (plans without test
  runs or parameter counts are left out)."""
  cells = [c for c in report['cells'] if c['metric'] == 'test']
  points = []
  for p in report['plans']:
    own = [c for c in cells if c['plan'] == p['plan']]
    if not own or not p['trainable_parameters']:
      continue
    widths = [c['high'] - c['mean'] for c in own if c['high'] is not None]
    points.append(
      Point(
        p['plan'],
        p['family'],
        p['trainable_parameters'],
        100 * float(np.mean([c['mean'] for c in own])),
        100 * float(np.mean(widths)) if widths else 0.0,
      )
    )
  return points


STUDY_PLOTS = ('accuracy_vs_params.png', 'heatmap.png')


def study_plots(report: dict, root: str) -> None:
  """`STUDY_PLOTS` of a study report, in `root`: accuracy against trainable parameters and the
  tasks x plans heat-map."""
  accuracy_vs_params(
    study_points(report),
    os.path.join(root, STUDY_PLOTS[0]),
    xlabel='trainable parameters (median over runs; adapters for tuners)',
    ylabel='test accuracy (%), mean over tasks',
  )
  tasks, plans = list(report['study']['tasks']), list(report['study']['plans'])
  grid = np.full((len(tasks), len(plans)), np.nan)
  for c in report['cells']:
    if c['metric'] == 'test':
      grid[tasks.index(c['task']), plans.index(c['plan'])] = 100 * c['mean']
  heatmap(tasks, plans, grid, os.path.join(root, STUDY_PLOTS[1]), label='test accuracy (%)')
