"""A run's directory: the names of its files, and its record of what ran.

  config.json      the config the run was started with (written once, never rewritten)
  plan.txt         each stage's audit table, as the stage starts
  data.json        every split's classes and per-class counts, as first read
  launches.jsonl   one line per launch: its first step, processes, devices, config changes
  metrics.jsonl    train and eval metrics (`ftlab.files.metric_writers`), tensorboard/ beside it
  checkpoints/     Orbax steps (`ftlab.files.checkpoint`)
  activation_cache/  frozen-prefix caches on disk (`ftlab.activation_cache`)
  summary.json     the run's result, written at its end

A workdir remembers its config: a rerun under another config stops (`check_config_change`)
unless the change is one a resume may make (`RESUMABLE_CHANGES`) or is asked for, so that
`config.json` and `plan.txt` always describe what ran.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from typing import Any, Mapping, Sequence

import ml_collections
from absl import logging
from etils import epath

from ftlab.errors import InputError
from ftlab.files import checkpoint, storage

# Fields a resume may change without changing what the run computed so far (or, for
# `num_train_steps`, only extending it). Anything else is another experiment.
RESUMABLE_CHANGES = (
  'num_train_steps',
  'log_every_steps',
  'eval_every_steps',
  'checkpoint_every_steps',
  'keep_checkpoints',
  'early_stopping_patience',
  'record_step_flops',
  'parallelism',
  'multi_host',
  'eval_batch_size',
  'activation_cache',
  'activation_cache_memory_mb',
  'activation_cache_dir',
  'dataset.data_dir',
  'dataset.local_dir',
  'dataset.download',
)


class RunError(InputError):
  """A directory that is not a finished ftlab run, runs that cannot be combined, or a run that
  cannot be read back, in one line."""


class ConfigChanged(InputError):
  """A rerun into a workdir under a config its run did not start with."""


@dataclasses.dataclass(frozen=True)
class Workdir:
  """The file names of a run directory (see the module docstring): a local directory or an
  object store URL (`gs://bucket/run`; `storage.SCHEMES`).

  Raises:
    storage.UnsupportedPath: `root` is a URL of another scheme.
  """

  root: str

  def __post_init__(self):
    storage.check(self.root, 'workdir')
    # Refused before anything is written: a workdir Orbax cannot read its checkpoints back from.
    checkpoint.check_directory(self.root, 'workdir')

  def _join(self, name: str) -> epath.Path:
    return storage.path(self.root) / name

  @property
  def config(self) -> epath.Path:
    return self._join('config.json')

  @property
  def plan(self) -> epath.Path:
    return self._join('plan.txt')

  @property
  def data(self) -> epath.Path:
    return self._join('data.json')

  @property
  def launches(self) -> epath.Path:
    return self._join('launches.jsonl')

  @property
  def summary(self) -> epath.Path:
    return self._join('summary.json')

  @property
  def metrics(self) -> epath.Path:
    return self._join('metrics.jsonl')

  @property
  def tensorboard(self) -> epath.Path:
    return self._join('tensorboard')

  @property
  def checkpoints(self) -> epath.Path:
    return self._join('checkpoints')

  @property
  def activation_cache(self) -> epath.Path:
    return self._join('activation_cache')

  def activation_cache_dir(self, configured: str = '') -> str:
    """Where disk activation caches go: `configured` (`config.activation_cache_dir`), else
    `activation_cache/` here (on an object store too: there a cache is read into memory,
    not memory-mapped, and a resumed run on another machine still finds it).

    Raises:
      storage.UnsupportedPath: `configured` is a URL of an unknown scheme.
    """
    if configured:
      storage.check(configured, 'activation_cache_dir')
      return configured
    return os.fspath(self.activation_cache)


def _flat(tree: dict, prefix: str = '') -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flat(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def as_json(config: Any) -> dict:
  """A config as the JSON its record holds (tuples as lists)."""
  return json.loads(config.to_json_best_effort())


def last_config(workdir: Workdir) -> dict | None:
  """The config the workdir's run last launched with (its latest recorded change, else
  `config.json`), or None for a new workdir."""
  if not workdir.config.exists():
    return None
  # `config.json` is the first launch's; a launch that changed the config recorded the whole
  # new one, so the last such record is what the run last ran under.
  reference = json.loads(workdir.config.read_text())
  if workdir.launches.exists():
    for line in workdir.launches.read_text().splitlines():
      record = json.loads(line) if line.strip() else {}
      reference = record.get('config', reference)
  return reference


def check_config_change(config: Any, workdir: Workdir, allow: bool) -> dict[str, list]:
  """The fields in which `config` differs from the workdir's run, `{field: [old, new]}`.

  Fields ftlab added or removed since the run started are not differences.

  Raises:
    ConfigChanged: a difference a resume may not make (see `RESUMABLE_CHANGES`; a shorter
      `num_train_steps` among them), unless `allow`; one line naming every such field.
  """
  reference = last_config(workdir)
  if reference is None:
    return {}
  old, new = _flat(reference), _flat(as_json(config))
  # Both sides through JSON (`as_json`, the stored file), so tuples and lists compare alike.
  changes = {k: [old[k], new[k]] for k in sorted(old.keys() & new.keys()) if old[k] != new[k]}
  refused = {
    k: v
    for k, v in changes.items()
    # A shorter run could end before steps the record (checkpoints, metrics) already holds; a
    # longer one only extends it, though its cosine schedule from here on is the longer run's.
    if k not in RESUMABLE_CHANGES or (k == 'num_train_steps' and v[1] < v[0])
  }
  if refused and not allow:
    listed = ', '.join(f'{k}={v[1]!r} (was {v[0]!r})' for k, v in refused.items())
    raise ConfigChanged(
      f'{workdir.root} holds a run started with another config: {listed}; resuming it under '
      'this one would mix two experiments in one record. Use a new --workdir, or pass '
      '--allow_config_change to continue this run under the new config (recorded in '
      f'{workdir.launches.name})'
    )
  if changes:
    logging.warning('config changes since the last launch: %s', changes)
  return changes


def write_plan(workdir: Workdir, table: str, append: bool = False) -> None:
  """plan.txt: a stage's audit table (`policies.audit_table`); later stages are appended."""
  if append:
    storage.append_text(workdir.plan, '\n' + table + '\n')
  else:
    workdir.plan.write_text(table + '\n')
  logging.info('\n%s', table)


def record_launch(
  workdir: Workdir,
  config: Any,
  plan_table: str,
  first_step: int,
  changes: dict,
  data: dict,
  *,
  processes: int,
  devices: int,
  warnings: Sequence[str] = (),
  version: str = '',
) -> None:
  """config.json, plan.txt and data.json on the first launch (never rewritten: they record
  what ran); a line in launches.jsonl on every launch, with the config's `warnings` and the
  ftlab `version` that ran it. A later launch that reads other data than the first is warned
  about."""
  storage.path(workdir.root).mkdir(parents=True, exist_ok=True)
  if not workdir.config.exists():
    workdir.config.write_text(config.to_json_best_effort(indent=2) + '\n')
  if not workdir.plan.exists():
    write_plan(workdir, plan_table)
  if not workdir.data.exists():
    workdir.data.write_text(json.dumps(data, indent=2))
  # Through JSON on both sides: the stored record has lists where `data` may hold tuples.
  elif json.loads(workdir.data.read_text()) != json.loads(json.dumps(data)):
    logging.warning('the data differ from what %s recorded at the first launch', workdir.data)
  record = {
    # Local time with its UTC offset: launches of one run on machines in other zones still order.
    'time': time.strftime('%Y-%m-%dT%H:%M:%S%z'),
    'first_step': first_step,
    'processes': processes,
    'devices': devices,
    **({'ftlab_version': version} if version else {}),
    **({'warnings': list(warnings)} if warnings else {}),
  }
  if changes:
    # The whole config, not only the changes: `last_config` can then take the newest record
    # as it is, without replaying a chain of changes.
    record.update(changes=changes, config=as_json(config))
  storage.append_text(workdir.launches, json.dumps(record) + '\n')


def write_summary(workdir: Workdir, summary: dict) -> None:
  workdir.summary.write_text(json.dumps(summary, indent=2))


def log_data(record: dict) -> None:
  """Each split's classes and counts (and an image folder's ignored files), at the start."""
  for name, found in record.items():
    counts = found['class_counts']
    classes = (
      ', '.join(f'{c} {n}' for c, n in counts.items()) if counts else ', '.join(found['classes'])
    )
    logging.info(
      'data %s (%s): %d examples, %d classes: %s',
      name,
      found['split'],
      found['examples'],
      len(found['classes']),
      classes,
    )
    if found.get('ignored_files'):
      logging.info('  ignored in the image folder: %s', ', '.join(found['ignored_files']))
    if found.get('rotated_photos'):
      logging.info('  %d photos turned upright by their EXIF orientation', found['rotated_photos'])


# Fields every combined run must share: what fixes the parameters' shapes (model) and what the
# outputs mean (label space). Older runs may lack a field; it then takes this default.
RUN_FIELDS = {
  'model.name': None,
  'model.width': None,
  'model.head': None,
  'model.adaptive_pool': 0,
  'model.dtype': 'float32',
  'dataset.name': None,
  'dataset.classes': [],
  'dataset.image_size': None,
  'dataset.preprocess': None,
}


# --- Finished runs. ---------------------------------------------------------------------------


def checkpoint_dir(path: str) -> str:
  """A run's `checkpoints/` directory, given the run's workdir or that directory itself (a
  local path or a URL, as given).

  Raises:
    storage.UnsupportedPath: a URL of a scheme ftlab cannot read.
  """
  inner = os.path.join(path, 'checkpoints')
  return inner if storage.path(inner, 'run').is_dir() else path


def run_name(path: str) -> str:
  """`workdirs/demo/full`, `workdirs/demo/full/checkpoints` and `gs://b/full` are `full`; a
  study's run (`scripts/study.py`: `.../<plan>/lr<lr>/seed<k>`) is `<plan>_lr<lr>_seed<k>`."""
  # `normpath` drops a trailing '/', whose basename would be ''.
  path = os.path.normpath(path)
  if os.path.basename(path) == 'checkpoints':
    path = os.path.dirname(path)
  seed, parent = os.path.basename(path), os.path.dirname(path)
  lr, plan = os.path.basename(parent), os.path.basename(os.path.dirname(parent))
  if plan and re.fullmatch(r'seed\d+', seed) and re.fullmatch(r'lr[0-9.e+-]+', lr):
    return f'{plan}_{lr}_{seed}'
  return os.path.basename(path) or path


def unique_names(paths: Sequence[str]) -> list[str]:
  """Run names, with `#2`, `#3`, ... for repeats (a soup of copies of one run)."""
  seen: dict[str, int] = {}
  names = []
  for path in paths:
    name = run_name(path)
    seen[name] = seen.get(name, 0) + 1
    names.append(name if seen[name] == 1 else f'{name}#{seen[name]}')
  return names


def read_run(path: str) -> dict:
  """The config, plan and step of a run's newest checkpoint.

  The config is the one saved with the checkpoint (it wrote those weights); a run whose
  checkpoint meta has none falls back to `config.json` in its workdir.

  Raises:
    FileNotFoundError: no complete checkpoint.
    ValueError: no config anywhere, so the architecture cannot be checked.
  """
  directory = checkpoint_dir(path)
  meta = checkpoint.restore_meta(directory)
  # The checkpoint's own config first: it is the one that wrote these weights, while
  # `config.json` is the first launch's and a later launch may have changed it.
  config = meta.get('config')
  if config is None:
    for candidate in (
      storage.path(path) / 'config.json',
      storage.path(directory).parent / 'config.json',
    ):
      if candidate.exists():
        config = json.loads(candidate.read_text())
        break
  if config is None:
    raise RunError(
      f'{path}: no config in the checkpoint meta and no config.json, so its architecture is '
      'unknown; combine runs written by ftlab.loop'
    )
  # Through JSON, so tuples and lists compare alike whichever file the config came from.
  config = json.loads(json.dumps(config))
  return {'directory': directory, 'config': config, 'plan': meta.get('plan'), 'step': meta['step']}


def config_field(config: Mapping[str, Any], dotted: str, default: Any = None) -> Any:
  """`config_field(cfg, 'model.width')`; `default` where a level is missing."""
  value: Any = config
  for key in dotted.split('.'):
    if not isinstance(value, Mapping) or key not in value:
      return default
    value = value[key]
  return value


def plain(value: Any) -> Any:
  if isinstance(value, ml_collections.ConfigDict):
    value = value.to_dict()
  return json.loads(json.dumps(value))


def check_compatible(configs: Mapping[str, Mapping[str, Any]]) -> dict:
  """The architecture the runs share (`RUN_FIELDS`), or an error naming every difference.

  Args:
    configs: run name -> its config (as a dict).

  Returns:
    `RUN_FIELDS` -> the shared value.

  Raises:
    ValueError: listing each differing field with every run's value.
  """
  values = {
    field: {name: plain(config_field(c, field, d)) for name, c in configs.items()}
    for field, d in RUN_FIELDS.items()
  }
  differing = [
    f'{field} (' + ', '.join(f'{name}: {json.dumps(v)}' for name, v in by_run.items()) + ')'
    for field, by_run in values.items()
    # Compared as JSON text: values may be lists or dicts, which a set cannot hold.
    if len({json.dumps(v) for v in by_run.values()}) > 1
  ]
  if differing:
    raise RunError(
      'cannot combine runs of different architectures or heads; differing fields: '
      + '; '.join(differing)
    )
  return {field: next(iter(by_run.values())) for field, by_run in values.items()}
