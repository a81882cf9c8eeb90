"""What a study is: its config (a `configs/studies/*.py` file or a `.json` of the same fields),
the check that it can run, its jobs and each job's run config.

`scripts/study.py` runs a study (the protocol, the processes, the report); this module only
reads and checks one, so tools that need a study's run configs (`scripts/fewshot_lrs.py`,
`scripts/sweep.py`, the tests) read them the way the driver does.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import sys
from typing import Iterable

import ml_collections

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [p for p in (ROOT, os.path.dirname(os.path.abspath(__file__))) if p not in sys.path]

import study_report  # noqa: E402

from ftlab.errors import InputError  # noqa: E402
from ftlab.files import storage  # noqa: E402


class StudyError(InputError):
  """A study config that cannot run: a missing or unknown field, a bad value."""


@dataclasses.dataclass(frozen=True)
class Job:
  """One run of the study."""

  task: str
  plan: str
  seed: int
  lr: float

  def directory(self, root: str) -> str:
    return study_report.run_directory(root, self.task, self.plan, self.lr, self.seed)


def load_config(spec: str, what: str) -> ml_collections.ConfigDict:
  """`get_config(arg)` of the config file `path[:arg]` (as `ml_collections.config_flags` reads
  it; a relative path is taken from the repository root when it is not found here).

  Raises:
    StudyError: no such file, no `get_config` in it, or an argument it refuses (ValueError).
  """
  path, _, arg = spec.partition(':')
  if not os.path.exists(path) and os.path.exists(os.path.join(ROOT, path)):
    path = os.path.join(ROOT, path)
  if not os.path.isfile(path):
    raise StudyError(f'{what} {spec!r}: no such file {path!r}')
  module_spec = importlib.util.spec_from_file_location(f'_ftlab_config_{abs(hash(path))}', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, 'get_config'):
    raise StudyError(f'{what} {spec!r}: {path} has no get_config(arg)')
  try:
    return module.get_config(arg or None)
  except ValueError as e:  # a config's own argument check (`default.parse_arg`, a task list)
    raise StudyError(f'{what} {spec!r}: {e}') from None


def load_study(spec: str) -> dict:
  """The study config `path[:arg]` (or a `.json` file of its fields) as plain JSON data, its
  tasks and plans in the order written (a ConfigDict iterates its keys sorted; its JSON keeps
  them as given).

  Raises:
    StudyError: no such file, no `get_config`, or a study that cannot run (`check_study`).
  """
  if spec.endswith('.json'):
    try:
      study = json.loads(storage.path(spec).read_text())
    except (OSError, json.JSONDecodeError) as e:
      raise StudyError(f'study {spec!r}: {type(e).__name__}: {e}') from None
  else:
    study = json.loads(load_config(spec, 'study').to_json())
  check_study(study, spec)
  return study


def check_study(study: dict, spec: str) -> None:
  """Raises StudyError naming the first field of `study` that cannot run."""
  for field in ('base', 'tasks', 'plans', 'seeds', 'learning_rates', 'minival', 'baseline'):
    if field not in study:
      raise StudyError(f'study {spec!r} has no field {field!r} (configs/studies/smoke.py has all)')
  for field in ('tasks', 'plans', 'seeds', 'learning_rates'):
    if not len(study[field]):
      raise StudyError(f'study {spec!r}: {field} is empty')
  seeds = [int(s) for s in study['seeds']]
  if len(set(seeds)) != len(seeds):
    raise StudyError(f'study {spec!r}: seeds {seeds} repeat a seed')
  for plan, about in study['plans'].items():
    lrs = [float(lr) for lr in about.get('learning_rates', study['learning_rates'])]
    if not lrs or any(lr <= 0 for lr in lrs) or len(set(lrs)) != len(lrs):
      raise StudyError(
        f'study {spec!r}: plan {plan!r}: learning_rates {lrs} must be distinct and > 0'
      )
    for task in study['tasks']:
      if len(lrs) > 1 and not study_report.minival(study, task):
        raise StudyError(
          f'study {spec!r}: plan {plan!r} has {len(lrs)} learning rates to choose from, but '
          f"task {task!r} has no minival split to choose on (set minival, e.g. '1000' or "
          "'10%' of the training split)"
        )
  if study['baseline'] and study['baseline'] not in study['plans']:
    raise StudyError(
      f'study {spec!r}: baseline {study["baseline"]!r} is not one of the plans '
      f'({", ".join(study["plans"])})'
    )
  for name, plan in study['plans'].items():
    if 'policy' not in plan:
      raise StudyError(f'study {spec!r}: plan {name!r} has no policy (a plan expression)')
  for kind in ('tasks', 'plans'):
    for name in study[kind]:
      if '/' in name or name in ('', '.', '..'):
        raise StudyError(f'study {spec!r}: {kind} name {name!r} cannot name a directory')


def _apply(config: ml_collections.ConfigDict, overrides: Iterable, where: str) -> None:
  """Sets each `(dotted.field, value)` of `overrides` in `config`.

  Raises:
    StudyError: a field the run config does not have, or a value of another type.
  """
  for dotted, value in overrides:
    *parents, leaf = dotted.split('.')
    node = config
    for key in parents:
      if key not in node:
        raise StudyError(f'{where}: {dotted!r} is not a field of the run config')
      node = node[key]
    if leaf not in node:
      raise StudyError(f'{where}: {dotted!r} is not a field of the run config')
    if isinstance(node[leaf], tuple) and isinstance(value, list):  # JSON has no tuples
      value = tuple(value)
    try:
      node[leaf] = value
    except TypeError as e:
      raise StudyError(f'{where}: {dotted}={value!r}: {e}') from None


def run_config(study: dict, job: Job, root: str) -> ml_collections.ConfigDict:
  """The run config of `job`: the study's base config, then the study's, the task's and the
  plan's overrides, then the plan expression, seed, learning rate, minival and shared cache.

  A plan's `policy` may use `{steps}`, `{half}` and `{quarter}` (of the run's steps), so
  schedules and dynamic masks follow the task's step count.
  """
  config = load_config(study['base'], 'base config')
  _apply(config, study.get('overrides', ()), 'overrides')
  _apply(config, study['tasks'][job.task].get('overrides', ()), f'task {job.task}')
  plan = study['plans'][job.plan]
  _apply(config, plan.get('overrides', ()), f'plan {job.plan}')
  steps = config.num_train_steps
  policy = plan['policy'].format(steps=steps, half=steps // 2, quarter=max(steps // 4, 1))
  config.policy.name = policy
  config.seed = job.seed
  config.optimizer.learning_rate = job.lr
  config.dataset.minival = study_report.minival(study, job.task)
  config.activation_cache_dir = os.path.join(root, 'activation_cache')
  return config
