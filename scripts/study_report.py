"""A study's report, from its run directories alone: `report.json`, `report.md` and plots.

  python scripts/study_report.py DIR

`DIR` is a `scripts/study.py` workdir: `DIR/study.json` (the study's config: tasks, plans,
seeds, rates, baseline, groups, labels) and `DIR/runs/<task>/<plan>/lr<lr>/seed<seed>/`, each
an ordinary ftlab run whose `summary.json` holds the numbers. Nothing else is read, so the
report is rebuilt the same from the same runs, and a partial study reports what has finished.

What it holds:
- `selection`: per (task, plan), the minival accuracy of each candidate rate (first seed) and
  the chosen rate (the best; a tie: the smaller);
- `failed`: the runs whose own process failed (`scripts/run_pool.py`) and that have not
  finished since: task, plan, lr, seed, exit code and log;
- `runs`: one row per finished run: task, plan, seed, lr, role (`test` for the chosen rate's
  seeds, `selection` for the other candidates), each accuracy the run reports (test, minival,
  the shift evaluator's mean over corruptions) and its cost fields (trainable parameters and %,
  optimizer-state bytes, the compiled step's per-device memory and FLOPs, median step time,
  wall time);
- `cells`: per (task, plan), the test accuracy's mean, sample std and 95% Student-t interval
  over seeds, with the per-seed values (`ftlab.analysis.stats.summarize`), and the same for the
  shifted accuracy where the runs measured it;
- `plans`: per plan, the mean over tasks (over groups when the tasks have groups: VTAB's
  convention, `stats.over_tasks`) once every task has the plan's test runs, and its costs
  (median over its test runs);
- `paired`: per task and metric (test, and the shifted mean when the shift evaluator ran),
  every plan against the baseline on the same seeds (the same labelled draw and head init):
  mean difference, its 95% interval and the paired t-test's p, with `distinguishable` false
  when the interval covers 0.

`report.md` says the same in tables (cells written by `study_tables`); the plots are
`accuracy_vs_params.png` (one series per family) and `heatmap.png` (tasks x plans).
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any

import numpy as np

sys.path[:0] = [p for p in (os.path.dirname(os.path.dirname(os.path.abspath(__file__))),)]

import plots  # noqa: E402
import run_pool  # noqa: E402
import study_tables  # noqa: E402

from ftlab.analysis import stats  # noqa: E402
from ftlab.errors import InputError  # noqa: E402
from ftlab.files import storage, workdir  # noqa: E402

STUDY_FILE = 'study.json'
JSON = 'report.json'
MARKDOWN = 'report.md'
RUNS = 'runs'
# The run-summary fields a report row copies: what a plan costs.
COST_FIELDS = (
  'trainable_parameters',
  'total_parameters',
  'trainable_percent',
  'optimizer_state_bytes',
  'train_step_flops',
  'step_time_sec',
  'wall_time_sec',
  'steps',
)


DELTA_RECORD = 'masked_delta.json'  # a run's masked-delta file size (scripts/study.py)
# A run's train-step costs measured after it finished, when its summary has none.
STEP_COSTS_RECORD = 'step_costs.json'


class ReportError(InputError):
  """A directory that holds no study (no `study.json`)."""


def run_directory(root: str, task: str, plan: str, lr: float, seed: int) -> str:
  """Where a study's run lives: `root/runs/<task>/<plan>/lr<lr>/seed<seed>`."""
  return os.path.join(root, RUNS, task, plan, f'lr{lr:g}', f'seed{seed}')


def learning_rates(study: dict, plan: str) -> list[float]:
  """The candidate rates of `plan`, ascending: its own `learning_rates`, else the study's."""
  return sorted(
    float(x) for x in study['plans'][plan].get('learning_rates', study['learning_rates'])
  )


def minival(study: dict, task: str) -> str:
  """The minival held out of `task`'s training split: its own `minival`, else the study's."""
  return study['tasks'][task].get('minival', study['minival'])


def read_study(root: str) -> dict:
  """The study config `scripts/study.py` recorded in `root`.

  Raises:
    ReportError: `root` holds no `study.json`.
  """
  path = os.path.join(root, STUDY_FILE)
  if not storage.path(path).exists():
    raise ReportError(f'{root}: no {STUDY_FILE}; is it a scripts/study.py workdir?')
  return json.loads(storage.path(path).read_text())['study']


def _row(task: str, plan: str, lr: float, seed: int, summary: dict, records: dict) -> dict:
  """One run's report row from its summary (and its masked-delta and step-cost records, if
  any: the summary's own costs come first)."""
  accuracy = {'test': summary['final_eval_accuracy']}
  if 'final_minival_accuracy' in summary:
    accuracy['minival'] = summary['final_minival_accuracy']
  for name, value in summary.get('final_split_accuracy', {}).items():
    if name not in ('eval', 'minival'):  # `dataset.eval_splits`' named splits
      accuracy[name] = value
  shift = summary.get('final_shift', {})
  if 'mean_accuracy' in shift:
    accuracy['shift'] = shift['mean_accuracy']
  row = dict(task=task, plan=plan, seed=seed, lr=lr, accuracy=accuracy)
  summary = {**records.get('step_costs', {}), **summary}
  row.update({k: summary[k] for k in COST_FIELDS if k in summary})
  if 'train_step_memory' in summary:
    row['train_step_memory_bytes'] = summary['train_step_memory']['total']
  if 'masked_delta_bytes' in records:
    row['masked_delta_bytes'] = records['masked_delta_bytes']
  return row


def _records(directory) -> dict:
  """What the driver measured on a finished run: its masked-delta record's fields, and its
  step costs under `step_costs`."""
  found = {}
  for name, key in ((DELTA_RECORD, None), (STEP_COSTS_RECORD, 'step_costs')):
    path = os.path.join(str(directory), name)
    if storage.path(path).exists():
      record = json.loads(storage.path(path).read_text())
      found.update({key: record} if key else record)
  return found


def read_runs(root: str, study: dict) -> tuple[list[dict], list[dict]]:
  """Every finished run of the study's tasks and plans, in task, plan, lr, seed order; and
  every unfinished one whose process failed (`scripts/run_pool.py`'s record: task, plan, lr,
  seed, returncode, log)."""
  rows, failed = [], []
  for task in study['tasks']:
    for plan in study['plans']:
      for lr in learning_rates(study, plan):
        for seed in study['seeds']:
          directory = run_directory(root, task, plan, lr, int(seed))
          files = workdir.Workdir(directory)
          if storage.path(files.summary).exists():
            summary = json.loads(storage.path(files.summary).read_text())
            rows.append(_row(task, plan, lr, int(seed), summary, _records(files.root)))
          elif code := run_pool.returncode(directory):
            log = os.path.join(directory, run_pool.LOG)
            failed.append(
              dict(task=task, plan=plan, lr=lr, seed=int(seed), returncode=code, log=log)
            )
  return rows, failed


def choose(minival: dict[float, float]) -> float:
  """The rate with the best minival accuracy; a tie goes to the smaller rate."""
  return min(minival, key=lambda lr: (-minival[lr], lr))


def selection(study: dict, rows: list[dict], failed: list[dict] = ()) -> list[dict]:
  """Per (task, plan): each candidate's minival accuracy (first seed) and the chosen rate, or
  no `chosen` while a candidate has neither finished nor failed (a failed candidate, e.g. a
  diverged rate, is not chosen; every candidate failed: none)."""
  first = int(study['seeds'][0])
  out = []
  for task in study['tasks']:
    for plan in study['plans']:
      lrs = learning_rates(study, plan)
      if len(lrs) == 1:
        out.append(dict(task=task, plan=plan, minival={}, chosen=lrs[0]))
        continue
      minival = {
        r['lr']: r['accuracy']['minival']
        for r in rows
        if (r['task'], r['plan'], r['seed']) == (task, plan, first)
      }
      entry = dict(task=task, plan=plan, minival={f'{lr:g}': minival[lr] for lr in minival})
      lost = {f['lr'] for f in failed if (f['task'], f['plan'], f['seed']) == (task, plan, first)}
      if lost:
        entry['failed'] = [f'{lr:g}' for lr in sorted(lost)]
      if minival and len(minival) + len(lost) == len(lrs):
        entry['chosen'] = choose(minival)
      out.append(entry)
  return out


def _summary_dict(s: stats.Summary) -> dict:
  return dict(
    n=s.n,
    mean=s.mean,
    std=None if math.isnan(s.std) else s.std,
    low=None if math.isnan(s.low) else s.low,
    high=None if math.isnan(s.high) else s.high,
    values=list(s.values),
    seeds=list(s.seeds) if s.seeds else None,
  )


def _test_table(study: dict, rows: list[dict], metric: str) -> dict:
  """`{task: {plan: {seed: accuracy}}}` of the test runs that measured `metric`."""
  table: dict = {}
  for r in rows:
    if r['role'] == 'test' and metric in r['accuracy']:
      table.setdefault(r['task'], {}).setdefault(r['plan'], {})[r['seed']] = r['accuracy'][metric]
  # In the study's order, whatever order the runs were read in.
  return {
    t: {p: table[t][p] for p in study['plans'] if p in table[t]}
    for t in study['tasks']
    if t in table
  }


def _median(rows: list[dict], field: str) -> float | None:
  values = [r[field] for r in rows if r.get(field) is not None]
  return float(np.median(values)) if values else None


def build(root: str) -> dict:
  """The report of the study in `root` (see the module docstring), as a JSON-ready dict.

  Raises:
    ReportError: `root` holds no study.
  """
  study = read_study(root)
  rows, failed = read_runs(root, study)
  selected = selection(study, rows, failed)
  chosen = {(s['task'], s['plan']): s.get('chosen') for s in selected}
  seeds = {int(s) for s in study['seeds']}
  for r in rows:
    r['role'] = (
      'test' if chosen[r['task'], r['plan']] == r['lr'] and r['seed'] in seeds else ('selection')
    )
  report: dict[str, Any] = dict(study=study, selection=selected, runs=rows, failed=failed)
  cells = []
  # The test split, the shift evaluator's mean, then every named split (`dataset.eval_splits`).
  named = {k for r in rows for k in r['accuracy']} - {'test', 'minival', 'shift'}
  for metric in ('test', 'shift', *sorted(named)):
    summaries = stats.summarize_table(_test_table(study, rows, metric))
    for task, by_plan in summaries.items():
      for plan, s in by_plan.items():
        cells.append(dict(task=task, plan=plan, metric=metric, **_summary_dict(s)))
  report['cells'] = cells
  table = _test_table(study, rows, 'test')
  complete = {
    p
    for p in study['plans']
    if all(len(table.get(t, {}).get(p, {})) == len(seeds) for t in study['tasks'])
  }
  groups = {t: c['group'] for t, c in study['tasks'].items() if c.get('group')}
  means = {}
  if complete:
    full = {t: {p: v for p, v in table[t].items() if p in complete} for t in study['tasks']}
    means = stats.over_tasks(full, groups if len(groups) == len(study['tasks']) else None)
  plans = []
  for plan, about in study['plans'].items():
    tests = [r for r in rows if r['plan'] == plan and r['role'] == 'test']
    entry = dict(
      plan=plan,
      label=about.get('label') or plan,
      family=about.get('family') or 'baselines',
      complete=plan in complete,
      runs=len(tests),
    )
    if plan in means:
      entry.update(mean_over_tasks=means[plan].mean, group_means=means[plan].groups)
    for field in COST_FIELDS + ('train_step_memory_bytes', 'masked_delta_bytes'):
      entry[field] = _median(tests, field)
    entry['wall_time_sec_total'] = float(sum(r.get('wall_time_sec', 0.0) for r in tests))
    plans.append(entry)
  report['plans'] = plans
  report['paired'] = []
  baseline = study.get('baseline')
  # Test accuracy first; then the shifted mean, so a robustness claim (LP-FT's, WiSE-FT's) is
  # tested seed by seed too.
  for metric in ('test', 'shift') if baseline else ():
    for task, cells_of_task in _test_table(study, rows, metric).items():
      for plan, values in cells_of_task.items():
        base = cells_of_task.get(baseline)
        if plan == baseline or base is None or set(values) != set(base):
          continue  # compared once both have the same seeds
        c = stats.paired(values, base)
        report['paired'].append(
          dict(
            task=task,
            plan=plan,
            metric=metric,
            baseline=baseline,
            n=c.n,
            mean=c.mean,
            low=None if math.isnan(c.low) else c.low,
            high=None if math.isnan(c.high) else c.high,
            p_value=None if math.isnan(c.p_value) else c.p_value,
            distinguishable=c.distinguishable,
            text=study_tables.describe_comparison(c),
          )
        )
  return report


def _label(study: dict, plan: str) -> str:
  return study['plans'][plan].get('label') or plan


def selection_markdown(report: dict) -> str:
  """Minival accuracy of every (task, plan) × candidate rate; the chosen one in bold."""
  study = report['study']
  lrs = sorted({lr for plan in study['plans'] for lr in learning_rates(study, plan)})
  chosen = [s for s in report['selection'] if s['minival'] or s.get('failed')]
  if not chosen:
    fixed = ', '.join(f'{_label(study, p)} {learning_rates(study, p)[0]:g}' for p in study['plans'])
    # A study may say where its fixed rates came from (`lr_source`), e.g. another task's
    # selection.
    source = f' ({study["lr_source"]})' if study.get('lr_source') else ''
    return f'One learning rate per plan, nothing chosen on minival here{source}: {fixed}.'
  lines = [
    f'Minival accuracy (held out of each training split; seed {study["seeds"][0]}) of each '
    'candidate learning rate; the chosen one in bold:',
    '',
    '| task | plan | ' + ' | '.join(f'lr {lr:g}' for lr in lrs) + ' |',
    '|---|---|' + '---:|' * len(lrs),
  ]
  for s in chosen:
    cells = []
    for lr in lrs:
      score = s['minival'].get(f'{lr:g}')
      text = '–' if score is None else f'{100 * score:.1f}%'
      text = 'failed' if f'{lr:g}' in s.get('failed', ()) else text
      cells.append(f'**{text}**' if s.get('chosen') == lr else text)
    lines.append(f'| {s["task"]} | {_label(study, s["plan"])} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def _cell_text(cell: dict) -> str:
  summary = stats.summarize({seed: v for seed, v in zip(cell['seeds'], cell['values'])})
  return study_tables.describe(summary)


def _number(value: float | None, form: str) -> str:
  return '–' if value is None else form.format(value)


def _bytes(n: float | None) -> str:
  if n is None:
    return '–'
  for unit, size in (('GiB', 2**30), ('MiB', 2**20), ('KiB', 2**10)):
    if n >= size:
      return f'{n / size:.1f} {unit}'
  return f'{n:.0f} B'


def markdown(report: dict) -> str:
  """`report.md`: the accuracy table, the mean over tasks with costs, the paired comparisons
  and the selection table."""
  study = report['study']
  tasks = list(study['tasks'])
  cells = {(c['task'], c['plan'], c['metric']): c for c in report['cells']}
  has_shift = any(c['metric'] == 'shift' for c in report['cells'])
  others = list(dict.fromkeys(c['metric'] for c in report['cells'] if c['metric'] != 'test'))
  lines = [
    f'Test accuracy (%) per task: mean ± std over seeds ({", ".join(map(str, study["seeds"]))}), '
    '95% Student-t interval and n'
    + ('; shifted: the mean over corruptions' if has_shift else '')
    + ''.join(f"; {m}: the run's split {m!r}" for m in others if m != 'shift'),
    '',
    '| plan | ' + ' | '.join(tasks) + ' |',
    '|---|' + '---|' * len(tasks),
  ]
  for plan in study['plans']:
    texts = []
    for task in tasks:
      cell = cells.get((task, plan, 'test'))
      text = '–' if cell is None else _cell_text(cell)
      for metric in others:
        if (task, plan, metric) in cells:
          name = 'shifted' if metric == 'shift' else metric
          text += f'; {name} {_cell_text(cells[task, plan, metric])}'
      texts.append(text)
    lines.append(f'| {_label(study, plan)} | ' + ' | '.join(texts) + ' |')
  lines += [
    '',
    'Per plan: the mean over tasks'
    + (
      ' (the mean of the group means)'
      if any(t.get('group') for t in study['tasks'].values())
      else ''
    )
    + ", and costs (median over its test runs; memory is XLA's analysis of the compiled train "
    'step per device: arguments + outputs − donated + temporaries):',
    '',
    '| plan | family | mean over tasks | trainable params | trainable % | optimizer state | '
    'step memory | delta file | s / step | s / run |',
    '|---|---|---:|---:|---:|---:|---:|---:|---:|---:|',
  ]
  for p in report['plans']:
    mean = f'{100 * p["mean_over_tasks"]:.1f}' if 'mean_over_tasks' in p else 'incomplete'
    cells = [
      p['label'],
      p['family'].replace('|', '\\|'),  # a bare pipe would end the cell
      mean,
      _number(p['trainable_parameters'], '{:,.0f}'),
      _number(p['trainable_percent'], '{:.2f}%'),
      _bytes(p['optimizer_state_bytes']),
      _bytes(p['train_step_memory_bytes']),
      _bytes(p['masked_delta_bytes']),
      _number(p['step_time_sec'], '{:.3f}'),
      _number(p['wall_time_sec'], '{:.0f}'),
    ]
    lines.append('| ' + ' | '.join(cells) + ' |')
  lines += [
    '',
    "Delta file: the masked-delta file of the first seed's run (the entries it changed on the "
    'weights it started from, `scripts/export_delta.py`); a tuner stores its adapter factors '
    '(unfolded, as peft saves an adapter).',
  ]
  if any(p['runs'] and p['train_step_memory_bytes'] is None for p in report['plans']):
    lines += ['', 'Step memory "–": those runs did not record it (`record_step_flops` off).']
  for metric in dict.fromkeys(c['metric'] for c in report['paired']):
    baseline = study['baseline']
    what = 'test accuracy' if metric == 'test' else 'shifted accuracy (mean over corruptions)'
    lines += [
      '',
      f'Paired with {_label(study, baseline)} (same task, same seeds: the same labelled draw and '
      f'head init): difference in {what} points, 95% t interval, paired t-test. With few '
      'seeds and many comparisons a single p below 0.05 is weak evidence.',
      '',
      '| plan | ' + ' | '.join(tasks) + ' |',
      '|---|' + '---|' * len(tasks),
    ]
    found = {(c['task'], c['plan']): c['text'] for c in report['paired'] if c['metric'] == metric}
    for plan in study['plans']:
      if plan != baseline:
        texts = [found.get((task, plan), '–') for task in tasks]
        lines.append(f'| {_label(study, plan)} | ' + ' | '.join(texts) + ' |')
  lines += ['', selection_markdown(report)]
  if report['failed']:
    lines += ['', 'Failed runs (no summary; the same command retries them):', '']
    lines += [
      f'- {f["task"]} / {_label(study, f["plan"])}, lr {f["lr"]:g}, seed {f["seed"]}: '
      f'exit {f["returncode"]} ({f["log"]})'
      for f in report['failed']
    ]
  return '\n'.join(lines) + '\n'


def write(root: str) -> dict:
  """Builds the report of `root` and writes `report.json`, `report.md` and the plots there."""
  report = build(root)
  storage.write_whole(os.path.join(root, JSON), json.dumps(report, indent=2) + '\n')
  storage.write_whole(os.path.join(root, MARKDOWN), markdown(report))
  plots.study_plots(report, root)
  return report


def main(argv: list[str]) -> int:
  """`study_report.py DIR`: writes the report and prints `report.md`; a bad DIR is one line."""
  if len(argv) != 1 or argv[0].startswith('-'):
    print('usage: python scripts/study_report.py DIR', file=sys.stderr)
    return 2
  try:
    write(argv[0])
  except InputError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(storage.path(os.path.join(argv[0], MARKDOWN)).read_text())
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
