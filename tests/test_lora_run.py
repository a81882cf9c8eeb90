"""LoRA end to end: a runlocal run of `lora(4) & blocks([4, 5])`, its resume, and the plain
parameters export, soups and `combine` read from its checkpoints."""

import os
import shutil

import numpy as np
import pytest

from configs import default
from ftlab import loop, parallel, paths, run
from ftlab.analysis import combine, mask_report, masked_delta
from ftlab.files import checkpoint
from ftlab.plans import tuners
from scripts import export_weights
from tests.run_files import plain_vgg11

pytestmark = pytest.mark.slow  # runs of the loop

PLAN = 'lora(4) & blocks([4, 5])'


def config_for(steps=6):
  config = plain_vgg11(default.get_config('runlocal'))
  config.policy.name = PLAN
  config.num_train_steps = steps
  config.checkpoint_every_steps = 1
  config.keep_checkpoints = 100
  config.eval_every_steps = config.log_every_steps = steps
  config.optimizer.weight_decay = 1e-3  # decays the adapters, never the frozen kernels
  return config


@pytest.fixture(scope='module')
def lora_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('lora'))
  return workdir, loop.train_and_evaluate(config_for(), workdir)


def stored_params(workdir, step=None):
  return paths.flatten(checkpoint.load_tree(os.path.join(workdir, 'checkpoints'), step)['params'])


def test_lora_run_trains_adapters_only_and_counts_them(lora_run):
  workdir, summary = lora_run
  first, last = stored_params(workdir, 1), stored_params(workdir)
  adapted = sorted(tuners.counts(paths.unflatten(last)))
  assert adapted == ['block4_conv1', 'block4_conv2', 'block5_conv1', 'block5_conv2']
  moved = sorted(p for p in last if first[p].tobytes() != last[p].tobytes())
  head = [p for p in last if p.split('/')[0] in ('fc', 'predictions')]
  assert moved == sorted([f'{layer}/lora_{x}' for layer in adapted for x in 'ab'] + head)
  adapters = sum(tuners.counts(paths.unflatten(last)).values())
  assert summary['trainable_parameters'] == adapters + sum(last[p].size for p in head)
  plain_total = sum(x.size for p, x in last.items() if not tuners.is_adapter(p))
  assert summary['total_parameters'] == plain_total
  assert summary['frozen_unchanged'] and summary['plan'] == 'lora(rank=4) & blocks(blocks=[4, 5])'
  assert 'LoRA (rank 4, alpha 8)' in open(os.path.join(workdir, 'plan.txt')).read()


def test_lora_resume_is_bit_identical(lora_run, tmp_path):
  workdir, summary = lora_run
  resumed = str(tmp_path / 'resumed')
  shutil.copytree(workdir, resumed)
  os.remove(os.path.join(resumed, 'summary.json'))
  for step in checkpoint.all_steps(os.path.join(resumed, 'checkpoints')):
    if step > 3:
      shutil.rmtree(os.path.join(resumed, 'checkpoints', str(step)))
  again = loop.train_and_evaluate(config_for(), resumed)
  a, b = stored_params(workdir), stored_params(resumed)
  assert all(a[p].tobytes() == b[p].tobytes() for p in a)
  assert again['final_eval_accuracy'] == summary['final_eval_accuracy']


def test_export_and_combine_read_plain_parameters(lora_run):
  workdir, summary = lora_run
  model, variables, size, _ = export_weights.load_run(workdir)
  assert not any(tuners.is_adapter(p) for p in paths.flatten(variables['params']))
  raw = stored_params(workdir)
  x = np.random.RandomState(0).uniform(size=(4, size, size, 3)).astype(np.float32)
  # The adapted model's logits (as the steps compute them) from the plain parameters.
  folded = model.apply(
    {'params': tuners.fold(paths.unflatten(raw))} | _stats(variables), x, train=False
  )
  plain = model.apply(variables, x, train=False)
  np.testing.assert_allclose(plain, folded, atol=1e-5, rtol=0)
  config = config_for()
  output = combine.combine(
    run.make_data(config),
    parallel.Spread(config.parallelism),
    [workdir, workdir],
    ['logits', 'uniform_soup', 'wise'],
    alphas=[0.5],
  )
  rows = {r['name']: r for r in output['results']}
  accuracy = summary['final_eval_accuracy']
  for name in (os.path.basename(workdir), 'uniform soup', 'WiSE-FT α=0.5'):
    assert rows[name]['eval']['accuracy'] == pytest.approx(accuracy, abs=1e-9), name


def _stats(variables):
  return {'batch_stats': variables['batch_stats']} if variables.get('batch_stats') else {}


def test_mask_report_reads_a_lora_run_with_its_adapters_folded(lora_run):
  """`mask_report.read_run` rebuilds the run's starting weights through the run's own function
  (adapters drawn from the run's seed, then folded: the loaded kernels, since B starts at
  zero), reads the final weights folded, and counts the adapted kernels as trained."""
  workdir, _ = lora_run
  weights = mask_report.read_run(workdir)
  config = config_for()
  model = run.build_model(config.model, num_classes=10)
  loaded = run.initial_variables(config, model, ())  # the same weights without adapters
  for p, x in paths.flatten(loaded['params']).items():
    assert weights.initial[p].tobytes() == np.asarray(x).tobytes(), p
  assert not any(tuners.is_adapter(p) for p in weights.final)
  merged = paths.flatten(tuners.merge(paths.unflatten(stored_params(workdir))))
  assert all(weights.final[p].tobytes() == np.asarray(merged[p]).tobytes() for p in merged)
  report = mask_report.run_report(weights)
  changed = {r['layer'] for r in report['layers'] if r['changed']}
  trained = {r['layer'] for r in report['layers'] if r['trained']}
  adapted = {f'block{b}_conv{i}' for b in (4, 5) for i in (1, 2)}
  assert changed == trained == adapted | {'fc', 'predictions'}
  # Unfolded (the study's delta-file column): the adapter factors as stored, on the base with
  # adapters drawn from the run's seed; the delta holds the factors and the trained leaves.
  initial, final = weights.unfolded
  stored = stored_params(workdir)
  assert set(final) == set(stored) and any(tuners.is_adapter(p) for p in final)
  assert all(final[p].tobytes() == np.asarray(stored[p]).tobytes() for p in stored)
  unfolded = masked_delta.make(initial, final)
  assert masked_delta.apply(initial, unfolded)  # checksums: rebuilt base -> the stored run
  folded = masked_delta.make(weights.initial, weights.final)
  in_leaves = {p for p, leaf in unfolded['header']['leaves'].items() if leaf['changed']}
  assert {paths.layer_of(p) for p in in_leaves} == adapted | {'fc', 'predictions'}
  assert not any(paths.leaf_of(p) == 'kernel' and paths.layer_of(p) in adapted for p in in_leaves)
  assert len(masked_delta.serialize(unfolded)) < len(masked_delta.serialize(folded)) / 2
