"""Dynamic masks in the run loop: the count exact at every checkpoint, entries outside each
step's mask unchanged, resume bit-identical (mid-period and just before a change, RigL and
Fisher re-selection), and the run read back by the mask report and the masked-delta export."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from ftlab import loop, paths
from ftlab.analysis import mask_report, masked_delta
from ftlab.files import checkpoint
from ftlab.plans import optim
from tests.run_files import params_of, stepwise_config

pytestmark = pytest.mark.slow

RIGL = 'rigl(0.05, every=3, fraction=0.5)'
FISHER = 'reselect(fisher(0.05, num_batches=1), every=3)'


def config_for(policy, steps=8):
  config = stepwise_config(policy, steps)
  config.optimizer.name = 'adam'
  config.optimizer.learning_rate = 1e-3
  return config


@pytest.fixture(scope='module')
def rigl_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('rigl'))
  return workdir, loop.train_and_evaluate(config_for(RIGL), workdir)


def levels_at(workdir, step):
  """The entry levels in a checkpoint's optimizer state, read by the optimizer's reader."""
  stored = checkpoint.load_tree(os.path.join(workdir, 'checkpoints'), step)['opt_state']
  return {p: np.asarray(x) for p, x in optim.entry_levels(stored).items()}


def state_bytes(workdir, step=None):
  flat, _ = jax.tree_util.tree_flatten_with_path(
    checkpoint.load_tree(os.path.join(workdir, 'checkpoints'), step)
  )
  return {paths.from_key_path(kp): np.asarray(x).tobytes() for kp, x in flat}


def test_count_exact_and_unmasked_entries_still_at_every_step(rigl_run):
  workdir, summary = rigl_run
  masks = {s: levels_at(workdir, s) for s in range(1, 9)}
  counts = {s: sum(int((m == 2).sum()) for m in masks[s].values()) for s in masks}
  assert len(set(counts.values())) == 1, counts
  scope_entries = sum(m.size for m in masks[1].values())
  assert counts[1] == round(0.05 * scope_entries)
  # The mask a checkpoint holds is the one that trained its step: changed before steps 4, 7.
  same = lambda a, b: all(np.array_equal(masks[a][p], masks[b][p]) for p in masks[a])
  assert same(1, 3) and same(4, 6) and same(7, 8)
  assert not same(3, 4) and not same(6, 7)
  for step in range(2, 9):
    before, after = params_of(workdir, step=step - 1), params_of(workdir, step=step)
    for p, levels in masks[step].items():
      moved = before[p].view(np.uint32) != after[p].view(np.uint32)
      assert not np.any(moved & (levels != 2)), f'step {step}: {p} moved outside its mask'
  n_head = summary['trainable_parameters'] - counts[1]
  assert n_head > 0  # the mlp head trains whole beside the mask


@pytest.mark.parametrize('resume_at', [3, 5])  # just before a change; mid-period
def test_resume_is_bit_identical(rigl_run, tmp_path, resume_at):
  workdir, summary = rigl_run
  again = resume_from(workdir, resume_at, str(tmp_path / 'resumed'))
  assert state_bytes(str(tmp_path / 'resumed')) == state_bytes(workdir)  # params, moments, masks
  assert again['final_eval_accuracy'] == summary['final_eval_accuracy']


def resume_from(workdir, step, directory):
  """A copy of `workdir` cut back to its checkpoint `step`, resumed to the end."""
  shutil.copytree(workdir, directory)
  os.remove(os.path.join(directory, 'summary.json'))
  for s in checkpoint.all_steps(os.path.join(directory, 'checkpoints')):
    if s > step:
      shutil.rmtree(os.path.join(directory, 'checkpoints', str(s)))
  with open(os.path.join(directory, 'config.json')) as f:
    recorded = json.load(f)
  config = config_for(recorded['policy']['name'], steps=recorded['num_train_steps'])
  return loop.train_and_evaluate(config, directory)


def test_fisher_reselection_resumes_bit_identical(tmp_path):
  whole = str(tmp_path / 'whole')
  loop.train_and_evaluate(config_for(FISHER, steps=6), whole)
  resumed = str(tmp_path / 'resumed')
  resume_from(whole, 3, resumed)  # the Fisher is estimated again as the run resumes
  assert state_bytes(resumed) == state_bytes(whole)
  assert not all(
    np.array_equal(a, b) for a, b in zip(levels_at(whole, 3).values(), levels_at(whole, 4).values())
  )


def test_report_and_delta_of_a_dynamic_run(rigl_run, tmp_path, capsys):
  import export_delta
  import mask_report as report_script

  workdir, summary = rigl_run
  weights = mask_report.read_run(workdir)
  final = params_of(workdir)
  assert all(weights.final[p].tobytes() == final[p].tobytes() for p in final)
  assert sum(int(t.sum()) for t in weights.trained.values()) == summary['trainable_parameters']
  assert report_script.main([workdir]) == 0
  with open(os.path.join(workdir, 'mask_report.json')) as f:
    written = json.load(f)
  assert written['total']['trained'] == summary['trainable_parameters']
  assert written == json.loads(json.dumps(mask_report.run_report(weights)))
  out = str(tmp_path / 'delta.npz')
  report = export_delta.export(workdir, out, None)
  rebuilt = masked_delta.apply(weights.initial, masked_delta.load(out))
  assert all(rebuilt[p].tobytes() == final[p].tobytes() for p in final)
  assert report['delta_bytes'] < report['params_bytes'] < report['checkpoint_bytes']
  assert report_script.main([str(tmp_path / 'nothing')]) == 2
  assert export_delta.main([str(tmp_path / 'nothing')]) == 2
  assert 'is not a finished ftlab run' in capsys.readouterr().err
