"""The plots of a study report (`scripts/study_report.py`'s dict): matplotlib, written as PNG.

- `accuracy_vs_params`: each plan's mean test accuracy over tasks against its trainable
  parameters (log scale), one series per family, bars from the per-task 95% intervals;
- `heatmap`: mean test accuracy of every (task, plan) cell.
"""

from __future__ import annotations

import numpy as np


def _pyplot():
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  return plt


def accuracy_vs_params(report: dict, path: str) -> None:
  """Mean over tasks (%) against trainable parameters, per family; the bars span the mean of
  the plan's per-task interval half-widths (nothing is drawn for a plan with no test runs)."""
  plt = _pyplot()
  cells = [c for c in report['cells'] if c['metric'] == 'test']
  fig, ax = plt.subplots(figsize=(8, 4.8))
  families = list(dict.fromkeys(p['family'] for p in report['plans']))
  for i, family in enumerate(families):
    xs, ys, bars, names = [], [], [], []
    for p in report['plans']:
      own = [c for c in cells if c['plan'] == p['plan']]
      if p['family'] != family or not own or not p['trainable_parameters']:
        continue
      xs.append(p['trainable_parameters'])
      ys.append(100 * float(np.mean([c['mean'] for c in own])))
      widths = [c['high'] - c['mean'] for c in own if c['high'] is not None]
      bars.append(100 * float(np.mean(widths)) if widths else 0.0)
      names.append(p['plan'])
    if not xs:
      continue
    ax.errorbar(xs, ys, yerr=bars, fmt='osD^vP*X'[i % 8], color=f'C{i}', capsize=3, label=family)
    for x, y, name in zip(xs, ys, names):
      ax.annotate(name, (x, y), fontsize=7, xytext=(4, 4), textcoords='offset points')
  ax.set_xscale('log')
  ax.set_xlabel('trainable parameters (median over runs; adapters for tuners)')
  ax.set_ylabel('test accuracy (%), mean over tasks')
  ax.grid(alpha=0.3)
  if families:
    ax.legend(fontsize=7, loc='lower right')
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def heatmap(report: dict, path: str) -> None:
  """Tasks (rows) × plans (columns), the cell's mean test accuracy (%) written in it."""
  plt = _pyplot()
  study = report['study']
  tasks, plans = list(study['tasks']), list(study['plans'])
  grid = np.full((len(tasks), len(plans)), np.nan)
  for c in report['cells']:
    if c['metric'] == 'test':
      grid[tasks.index(c['task']), plans.index(c['plan'])] = 100 * c['mean']
  fig, ax = plt.subplots(
    figsize=(max(4.5, 2.0 + 1.1 * len(plans)), max(2.5, 1.5 + 0.5 * len(tasks)))
  )
  image = ax.imshow(grid, cmap='viridis', aspect='auto')
  for i in range(len(tasks)):
    for j in range(len(plans)):
      text = '–' if np.isnan(grid[i, j]) else f'{grid[i, j]:.1f}'
      ax.text(j, i, text, ha='center', va='center', color='w', fontsize=8)
  ax.set_xticks(range(len(plans)), plans, rotation=45, ha='right', fontsize=8)
  ax.set_yticks(range(len(tasks)), tasks, fontsize=8)
  fig.colorbar(image, ax=ax, label='test accuracy (%)')
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
