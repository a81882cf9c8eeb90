"""Records a selection study's chosen learning rates in `configs/fewshot_lrs.json`.

  python scripts/study.py --study configs/studies/offline.py:full,grid,tasks=fashion_mnist,seeds=1 \
      --workdir workdirs/fewshot_select --select
  python scripts/fewshot_lrs.py workdirs/fewshot_select [--task fashion_mnist]

The offline suite's plans train at the rate Fashion-MNIST's minival chose for them
(`configs/studies/offline.py` without `grid`); this is how that choice gets into the file the
configs read. For each plan of the study whose candidates all finished on the task, the chosen
rate and every candidate's minival accuracy go under the task's labels per class
(`dataset.examples_per_class`, `"10"`, `"50"`); other plans' and other budgets' entries stay.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [p for p in (ROOT, os.path.dirname(os.path.abspath(__file__))) if p not in sys.path]

import study  # noqa: E402
import study_report  # noqa: E402

from configs import fewshot  # noqa: E402
from ftlab.errors import InputError  # noqa: E402
from ftlab.files import storage  # noqa: E402


def shots(study_config: dict, task: str, root: str) -> int:
  """The task's labels per class: its runs' `dataset.examples_per_class`, as the driver builds
  their configs (`study.run_config`: the study's base config and every override)."""
  plan = next(iter(study_config['plans']))
  job = study.Job(task, plan, int(study_config['seeds'][0]), 1.0)  # the rate changes no data
  return int(study.run_config(study_config, job, root).dataset.examples_per_class)


def record(root: str, task: str, path: str) -> dict:
  """Adds the selection of `task` in the study at `root` to the JSON file `path`; returns
  what the file now holds.

  Raises:
    InputError: no study at `root`, `task` not one of its tasks, or no plan of it whose
      selection finished.
  """
  report = study_report.build(root)  # from the run directories, as the report is
  study_config = report['study']
  if task not in study_config['tasks']:
    raise InputError(
      f'--task {task!r}: not a task of the study in {root} ({", ".join(study_config["tasks"])})'
    )
  done = [s for s in report['selection'] if s['task'] == task and s['minival'] and 'chosen' in s]
  if not done:
    raise InputError(
      f'{root}: no plan finished its selection on {task!r} (run the study with --select first)'
    )
  saved = fewshot.lr_record(path)
  budget = str(shots(study_config, task, root))
  for entry in done:
    saved['chosen'].setdefault(budget, {})[entry['plan']] = entry['chosen']
    saved['minival'].setdefault(budget, {})[entry['plan']] = entry['minival']
  storage.write_whole(path, json.dumps(saved, indent=2) + '\n')
  return saved


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('workdir', help="a study's --workdir")
  parser.add_argument('--task', default='fashion_mnist', help='the task whose choice is recorded')
  parser.add_argument('--out', default=fewshot.LEARNING_RATES_FILE, help='the JSON file to update')
  args = parser.parse_args(argv)
  try:
    saved = record(args.workdir, args.task, args.out)
  except InputError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  for budget, chosen in saved['chosen'].items():
    print(f'{budget} shots: ' + ', '.join(f'{plan} {lr:g}' for plan, lr in chosen.items()))
  return 0


if __name__ == '__main__':
  sys.exit(main())
