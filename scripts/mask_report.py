"""Mask reports: what each run trained, layer by layer, and how the masks of runs overlap.

  python scripts/mask_report.py RUN [RUN ...] [--output DIR]
  python scripts/mask_report.py --sweep DIR [--include rigl,reselect,...] [--readme README.md]

For every run (a workdir with checkpoints; `--sweep` finds every finished run under DIR) it
writes `RUN/mask_report.json` (`ftlab.analysis.mask_report.layer_report`: per layer the entries, the
share of them trained, the share of the run's trainable budget, the entries that changed,
‖Δθ‖ and ‖Δθ‖/‖θ₀‖ between the loaded and the final weights) and `RUN/mask_report.png`. Over
two or more runs it writes to `--output` (default: the sweep directory) `mask_overlap.json`
and `mask_overlap.png` (the Jaccard overlap of the backbone entries each run's final mask
trains, between every two runs), `mask_budget.png` (each plan's budget per layer, mean over
its runs) and `mask_report.md`; `--readme` puts that markdown between the README's
`<!-- mask-report:start -->` markers and the two plots under `docs/`.
A directory that is not a finished run is one line and exit status 2.
"""

import argparse
import json
import os
import re
import shutil
import sys

import numpy as np
import readme_section

from ftlab.analysis import mask_report
from ftlab.files import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MARKERS = ('<!-- mask-report:start -->', '<!-- mask-report:end -->')
REPORT = 'mask_report'  # RUN/mask_report.json and .png


def find_runs(sweep: str, include: list[str]) -> list[str]:
  """Finished runs (a `summary.json` beside `checkpoints/`) under `sweep`, sorted, keeping
  those whose path relative to `sweep` contains one of `include` (all when empty)."""
  found = []
  for root, dirs, files in os.walk(sweep):
    dirs.sort()
    if 'summary.json' in files and 'checkpoints' in dirs:
      rel = os.path.relpath(root, sweep)
      if not include or any(word in rel for word in include):
        found.append(root)
      dirs[:] = []
  return found


def label(run_dir: str, base: str) -> tuple[str, str]:
  """`(group, name)`: the plan's directory and the run's name relative to `base`
  (`10shot/rigl_lr0.003/seed0` -> `rigl_lr0.003`; a study's `rigl/lr0.003/seed0` ->
  `rigl_lr0.003`; a sweep's `rigl...-seed0` -> `rigl...`)."""
  rel = os.path.relpath(run_dir, base) if base else os.path.basename(os.path.normpath(run_dir))
  leaf = os.path.basename(rel)
  if re.fullmatch(r'seed\d+', leaf):
    parent = os.path.dirname(rel)
    if re.fullmatch(r'lr[0-9.e+-]+', os.path.basename(parent)):  # scripts/study.py's layout
      return f'{os.path.basename(os.path.dirname(parent))}_{os.path.basename(parent)}', rel
    return os.path.basename(parent) or rel, rel
  return re.sub(r'-seed\d+.*$', '', leaf), rel


def plot_run(report: dict, path: str) -> None:
  """Per layer: the share of the budget and of the layer's entries trained, and ‖Δθ‖/‖θ₀‖."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  layers = report['layers']
  x = np.arange(len(layers))
  fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
  top.bar(x - 0.2, [100 * r['budget_share'] for r in layers], 0.4, label='share of the budget')
  top.bar(
    x + 0.2,
    [100 * r['trained_fraction'] for r in layers],
    0.4,
    label="share of the layer's entries trained",
  )
  top.set_ylabel('%')
  top.legend(fontsize=8)
  top.set_title(f'{report["run"]}: {report["plan"]}', fontsize=8)
  bottom.bar(x, [r['relative_delta'] for r in layers], color='tab:green')
  bottom.set_ylabel('‖Δθ‖ / ‖θ₀‖')
  bottom.set_xticks(x, [r['layer'] for r in layers], rotation=60, ha='right', fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def plot_overlap(names: list[str], matrix: np.ndarray, path: str) -> None:
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  n = len(names)
  fig, ax = plt.subplots(figsize=(1.2 + 0.55 * n, 0.8 + 0.5 * n))
  image = ax.imshow(matrix, vmin=0, vmax=1, cmap='viridis')
  for i in range(n):
    for j in range(n):
      ax.text(
        j,
        i,
        f'{matrix[i, j]:.2f}',
        ha='center',
        va='center',
        fontsize=6,
        color='black' if matrix[i, j] > 0.6 else 'white',
      )
  ax.set_xticks(range(n), names, rotation=70, ha='right', fontsize=7)
  ax.set_yticks(range(n), names, fontsize=7)
  fig.colorbar(image, ax=ax, label='Jaccard overlap of trained backbone entries')
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def by_group(reports: dict[str, dict], groups: dict[str, str]) -> dict[str, dict[str, dict]]:
  """`{group: {layer: mean of each figure over the group's runs}}`."""
  out: dict[str, dict[str, dict]] = {}
  for name, report in reports.items():
    for row in report['layers']:
      out.setdefault(groups[name], {}).setdefault(row['layer'], []).append(row)
  keys = ('budget_share', 'trained_fraction', 'changed_fraction', 'relative_delta')
  return {
    g: {
      layer: {k: float(np.mean([r[k] for r in rows])) for k in keys}
      for layer, rows in layers.items()
    }
    for g, layers in out.items()
  }


def plot_budget(means: dict[str, dict[str, dict]], path: str) -> None:
  """Each group's share of the budget per layer (layers that some group trains)."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  layers = [
    l for l in next(iter(means.values())) if any(m[l]['budget_share'] > 0 for m in means.values())
  ]
  x = np.arange(len(layers))
  width = 0.8 / len(means)
  fig, ax = plt.subplots(figsize=(8, 4.2))
  for i, (group, rows) in enumerate(means.items()):
    ax.bar(
      x + (i - (len(means) - 1) / 2) * width,
      [100 * rows[l]['budget_share'] for l in layers],
      width,
      label=group,
    )
  ax.set_xticks(x, layers, rotation=45, ha='right', fontsize=8)
  ax.set_ylabel('share of the trainable budget (%)')
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def markdown(reports, groups, names, matrix, means) -> str:
  """Per-layer tables by group and the overlap summary (within and between groups)."""
  order = list(dict.fromkeys(groups[n] for n in names))
  layers = [l for l in means[order[0]] if any(means[g][l]['budget_share'] > 0 for g in order)]
  header = ['| | ' + ' | '.join(f'`{g}`' for g in order) + ' |', '|---|' + '---:|' * len(order)]
  lines = [
    "Per layer, mean over each plan's runs: share of the trainable budget / share of the "
    "layer's entries trained by the final mask / entries changed / ‖Δθ‖ / ‖θ₀‖.",
    '',
    *header,
  ]
  for l in layers:
    cells = [
      f'{100 * means[g][l]["budget_share"]:.1f}% / {100 * means[g][l]["trained_fraction"]:.2f}% / '
      f'{100 * means[g][l]["changed_fraction"]:.2f}% / {means[g][l]["relative_delta"]:.3g}'
      for g in order
    ]
    lines.append(f'| {l} | ' + ' | '.join(cells) + ' |')
  index = {g: [i for i, n in enumerate(names) if groups[n] == g] for g in order}
  lines += [
    '',
    'Jaccard overlap of the trained backbone entries (final masks), mean over pairs '
    '(diagonal: between seeds of a plan):',
    '',
    *header,
  ]
  for a in order:
    cells = []
    for b in order:
      pairs = [matrix[i, j] for i in index[a] for j in index[b] if i != j and (a != b or i < j)]
      cells.append(f'{np.mean(pairs):.3f}' if pairs else '–')
    lines.append(f'| `{a}` | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('runs', nargs='*', help='run workdirs')
  parser.add_argument('--sweep', default='', help='every finished run under this directory')
  parser.add_argument('--include', default='', help='comma-separated: keep runs whose path has one')
  parser.add_argument('--output', default='', help='where the overlap files go (default: --sweep)')
  parser.add_argument(
    '--readme', default='', help='README to update between the mask-report markers'
  )
  args = parser.parse_args(argv)
  checkpoint.quiet_orbax_logs()
  try:
    if args.readme:
      readme_section.check(args.readme, MARKERS)
    include = [w for w in args.include.split(',') if w]
    runs = args.runs + (find_runs(args.sweep, include) if args.sweep else [])
    if not runs:
      raise mask_report.RunError(f'no finished run given or found under --sweep {args.sweep!r}')
    reports, masks, groups = {}, {}, {}
    for run_dir in runs:
      weights = mask_report.read_run(run_dir)
      group, name = label(run_dir, args.sweep)
      report = mask_report.run_report(weights)
      with open(os.path.join(run_dir, f'{REPORT}.json'), 'w') as f:
        json.dump(report, f, indent=2)
      plot_run(report, os.path.join(run_dir, f'{REPORT}.png'))
      reports[name], masks[name], groups[name] = report, mask_report.chosen(weights), group
      total = report['total']
      print(
        f'{name}: {total["trained"]:,} entries trained, {total["changed"]:,} changed, '
        f'‖Δθ‖/‖θ₀‖ {total["relative_delta"]:.4g}',
        flush=True,
      )
      del weights
  except (mask_report.RunError, readme_section.ReadmeError, OSError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  if len(reports) < 2:
    return 0
  names = list(reports)
  matrix = mask_report.jaccard_matrix(masks)
  out = args.output or args.sweep or '.'
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, 'mask_overlap.json'), 'w') as f:
    json.dump({'runs': names, 'jaccard': matrix.round(6).tolist()}, f, indent=2)
  means = by_group(reports, groups)
  plot_overlap(names, matrix, os.path.join(out, 'mask_overlap.png'))
  plot_budget(means, os.path.join(out, 'mask_budget.png'))
  text = markdown(reports, groups, names, matrix, means)
  with open(os.path.join(out, 'mask_report.md'), 'w') as f:
    f.write(text + '\n')
  print(text)
  if args.readme:
    readme_section.replace(args.readme, MARKERS, text)
    docs = os.path.join(os.path.dirname(os.path.abspath(args.readme)), 'docs')
    for name in ('mask_overlap.png', 'mask_budget.png'):
      shutil.copy(os.path.join(out, name), os.path.join(docs, name))
  return 0


if __name__ == '__main__':
  sys.exit(main())
