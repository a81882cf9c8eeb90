"""The design's own test (../shared/DESIGN.md): a method is one file, an evaluator is one file.

A toy selector and a toy evaluator are defined here, registered, and run through
`ftlab.main`'s code path; nothing in the library names either. The README's policy table is the
registry's, and the README's map of the modules is the code's.
"""

import ast
import json
import os
import re

import jax
import numpy as np
import pytest

from configs import default
from ftlab import main, paths, run, train
from ftlab.evals import base
from ftlab.files.metric_writers import read_jsonl
from ftlab.plans import registry, selection
from ftlab.plans.registry import Param
from scripts import readme_tables

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, 'README.md')


class EveryOtherConv(registry.Selector):
  """Toy: the kernels of every other conv layer (from `offset`), plus the head."""

  name = 'toy_every_other_conv'
  params = (Param('offset', 0), Param('train_head', True))
  summary = 'test only: every other conv kernel + head'

  def select(self, call, ctx):
    offset = selection.value(call, 'offset', 0)
    convs = sorted(paths.layer_of(p) for p in ctx.backbone if paths.leaf_of(p) == 'kernel')
    chosen = {paths.join(layer, 'kernel') for layer in convs[offset::2]}
    return selection.whole(ctx, chosen | ctx.head_if(call))


class MeanLogit(base.Evaluator):
  """Toy: the mean logit of the current weights over the eval split (`toy/mean_logit`)."""

  name = 'toy_mean_logit'

  def __init__(self, setting):
    self.setting = setting

  @classmethod
  def build(cls, setting):
    return cls(setting) if setting.config.get('on', False) else None

  def start_stage(self, stage):
    def step(state, batch):
      variables = train.model_variables(state.params, state.batch_stats)
      logits = stage.model.apply(variables, batch['image'], train=False)
      mask = batch['mask'][:, None]
      sums = {'total': (logits * mask).sum(), 'count': mask.sum() * logits.shape[-1]}
      return jax.lax.psum(sums, 'batch')

    self._p_step = self.setting.spread.compile(step, in_kinds=('replicated', 'sharded'))
    self._batches = stage.eval_batches['eval']

  def run(self, state):
    spread, totals = self.setting.spread, []
    for batch in self._batches():
      totals.append(jax.device_get(spread.unreplicate(self._p_step(state, spread.shard(batch)))))
    mean = sum(t['total'] for t in totals) / sum(t['count'] for t in totals)
    return {'toy/mean_logit': float(mean)}

  def summary(self, metrics):
    return {'final_toy_mean_logit': metrics['toy/mean_logit']}


@pytest.fixture
def toys():
  registry.register(EveryOtherConv)
  base.register(MeanLogit)
  yield
  registry.unregister(EveryOtherConv.name)
  base.unregister(MeanLogit.name)


def toy_config():
  config = default.get_config('runlocal')
  config.num_train_steps = 4
  config.log_every_steps = config.eval_every_steps = config.checkpoint_every_steps = 2
  config.record_step_flops = False
  config.policy.name = 'toy_every_other_conv(offset=1) + l2_sp(alpha=0.01)'
  config.evals.toy_mean_logit = {'on': True}
  return config


def test_a_method_and_an_evaluator_defined_in_a_test_file_run_through_main(toys, tmp_path):
  config = toy_config()
  assert main.run(config, str(tmp_path)) == 0
  summary = json.loads((tmp_path / 'summary.json').read_text())
  assert summary['plan'] == 'toy_every_other_conv(offset=1) + l2_sp(alpha=0.01)'
  assert summary['frozen_unchanged'] and summary['frozen_leaves'] > 0
  plan = (tmp_path / 'plan.txt').read_text()
  trained = re.findall(r'^(\S+)\s+\(.*\)\s+yes\b', plan, flags=re.M)
  convs = sorted({paths.layer_of(p) for p in trained if '_conv' in p})
  assert trained and all(p.endswith('/kernel') or p.startswith('predictions') for p in trained)
  assert convs == ['block2_conv1', 'block3_conv2', 'block4_conv2', 'block5_conv2']
  rows = [r for r in read_jsonl(tmp_path / 'metrics.jsonl') if 'toy/mean_logit' in r]
  assert [r['step'] for r in rows] == [2, 4]
  assert summary['final_toy_mean_logit'] == rows[-1]['toy/mean_logit']
  # The toy evaluator's number, computed directly on the final weights, one device.
  built = run.make_run(config, str(tmp_path))  # resumes: the finished run's final state
  model, state = built.model, built.state
  logits = []
  for batch in built.data.eval_batches('eval'):
    variables = train.model_variables(state.params, state.batch_stats)
    out = model.apply(variables, batch['image'], train=False)
    logits.append(np.asarray(out)[batch['mask'] > 0])
  np.testing.assert_allclose(
    summary['final_toy_mean_logit'], np.concatenate(logits).mean(), rtol=1e-5
  )


def test_the_toys_are_open_registrations_not_listed_anywhere(toys):
  assert 'toy_every_other_conv' in registry.methods()
  assert 'toy_mean_logit' in base.evaluators()
  for module in ('ftlab/run.py', 'ftlab/loop.py', 'ftlab/train.py', 'ftlab/plans/policies.py'):
    text = open(os.path.join(ROOT, module)).read()
    assert 'toy_' not in text


def readme_section(start: str, end: str) -> str:
  text = open(README).read()
  found = re.search(re.escape(start) + r'\n(.*?)\n' + re.escape(end), text, flags=re.S)
  assert found, f'README has no {start} ... {end} section'
  return found.group(1)


def test_readme_policy_table_is_the_registrys():
  """`python scripts/readme_tables.py` writes it; a method added without it fails here."""
  table = readme_section('<!-- policy-table:start -->', '<!-- policy-table:end -->')
  assert table == readme_tables.policy_table()


# Which ftlab units each family or spine module may import (../shared/DESIGN.md, "Which way
# imports point", with the departures README's map states): a unit is a top-level module or
# a family folder. Only main, cli and scripts sit above the loop.
ALLOWED = {
  'errors': set(),
  'paths': set(),
  'parallel': {'errors'},
  'models': {'errors', 'paths', 'models'},
  'data': {'errors', 'data'},
  'files': {'errors', 'paths', 'files'},
  'plans': {'errors', 'paths', 'models', 'plans'},
  'porting': {'errors', 'paths', 'models', 'data', 'files', 'porting'},
  'ema': {'paths', 'parallel', 'plans'},
  'train': {'errors', 'paths', 'parallel', 'plans', 'ema'},
  'scoring': {'paths', 'parallel', 'plans', 'data', 'train'},
  'activation_cache': {'errors', 'paths', 'parallel', 'plans', 'data', 'files', 'train'},
  'evals': {'errors', 'paths', 'parallel', 'data', 'files', 'train', 'ema', 'evals'},
  'init_from': {'errors', 'paths', 'models', 'files', 'plans', 'porting'},
  'run': {
    'errors',
    'paths',
    'parallel',
    'models',
    'data',
    'files',
    'plans',
    'ema',
    'train',
    'scoring',
    'activation_cache',
    'evals',
    'init_from',
  },
  'loop': {'errors', 'paths', 'parallel', 'files', 'plans', 'ema', 'train', 'evals', 'run'},
  'analysis': {
    'errors',
    'paths',
    'parallel',
    'models',
    'data',
    'files',
    'plans',
    'train',
    'init_from',
    'run',
    'analysis',
  },
  'cli': {'errors'},
  'main': {'errors', 'files', 'plans', 'cli', 'loop'},
}


def ftlab_modules():
  for folder, _, files in os.walk(os.path.join(ROOT, 'ftlab')):
    for name in files:
      if name.endswith('.py'):
        yield os.path.relpath(os.path.join(folder, name), ROOT)


def unit_of(module: str) -> str:
  """`ftlab/plans/methods/lora.py` -> `plans`; `ftlab/run.py` -> `run`."""
  parts = module[len('ftlab/') :].removesuffix('.py').split('/')
  return parts[0]


def imported_units(path: str) -> set[str]:
  """The ftlab units a module imports (at any depth of the file)."""
  found = set()
  for node in ast.walk(ast.parse(open(os.path.join(ROOT, path)).read())):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith('ftlab'):
      if node.module == 'ftlab':
        found |= {a.name for a in node.names}
      else:
        found.add(node.module.split('.')[1])
    elif isinstance(node, ast.Import):
      found |= {a.name.split('.')[1] for a in node.names if a.name.startswith('ftlab.')}
  return found


def test_imports_point_down_the_design():
  wrong = []
  for module in ftlab_modules():
    unit = unit_of(module)
    if unit == '__init__':
      continue
    extra = imported_units(module) - ALLOWED[unit] - {unit}
    if extra:
      wrong.append(f'{module} imports {sorted(extra)}')
  assert not wrong, wrong


def string_constants(path: str) -> set[str]:
  """The string literals of a module's code (docstrings left out)."""
  tree = ast.parse(open(os.path.join(ROOT, path)).read())
  docstrings = {
    id(n.body[0].value)
    for n in ast.walk(tree)
    if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef)) and ast.get_docstring(n)
  }
  return {
    n.value
    for n in ast.walk(tree)
    if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings
  }


def test_the_spine_names_no_method_and_the_loop_no_evaluator():
  methods, evaluators = set(registry.methods()), set(base.evaluators())
  for module in ('ftlab/run.py', 'ftlab/loop.py', 'ftlab/train.py'):
    named = string_constants(module) & methods
    assert not named, f'{module} names the methods {named}'
  assert not string_constants('ftlab/loop.py') & evaluators
  tree = ast.parse(open(os.path.join(ROOT, 'ftlab/loop.py')).read())
  loop_names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
  assert not {'fewshot', 'forgetting', 'classification'} & loop_names


def defines_code(path: str) -> bool:
  """Whether a module defines functions or classes (a family's `__init__` that only imports
  its rooms does not)."""
  tree = ast.parse(open(os.path.join(ROOT, path)).read())
  return any(isinstance(n, (ast.FunctionDef, ast.ClassDef)) for n in tree.body)


def test_readme_map_lists_every_module_and_only_those():
  """README's "What is where" table has one row per module file (or per family folder's
  files), so it cannot go stale."""
  table = readme_section('<!-- module-map:start -->', '<!-- module-map:end -->')
  listed = set(re.findall(r'`(ftlab/[\w/]+\.py)`', table))
  modules = {m for m in ftlab_modules() if not m.endswith('__init__.py') or defines_code(m)}
  assert sorted(modules - listed) == [], 'modules missing from the README map'
  assert sorted(listed - modules) == [], 'README map rows for modules that do not exist'
