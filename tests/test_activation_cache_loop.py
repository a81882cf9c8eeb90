"""The activation cache in the run loop: a cached run writes the metrics and parameters of
the uncached run, through stage changes and resumes, and a config it cannot serve exactly
is refused before anything is written."""

import json
import os
import shutil

import pytest

from configs import default
from ftlab import activation_cache, errors, loop
from ftlab.files import checkpoint
from tests.run_files import params_of

# End to end: runs of the loop (the `not slow` tier skips them).
pytestmark = pytest.mark.slow


def config_for(policy, cache='off', steps=8, batch_norm=False):
  config = default.get_config('runlocal')
  # Frozen BatchNorm in the prefix (running statistics) is cached exactly too.
  config.model.name = 'vgg11_bn' if batch_norm else 'vgg11'
  config.policy.name = policy
  config.dataset.augment = 'none'
  config.num_train_steps = steps
  config.checkpoint_every_steps = 1
  config.keep_checkpoints = 100
  config.log_every_steps = 1
  config.eval_every_steps = 4
  config.activation_cache = cache
  return config


def metric_lines(workdir):
  """metrics.jsonl without the timing fields."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  return [{k: v for k, v in r.items() if 'per_sec' not in k} for r in rows]


def assert_same_run(a, b, model='vgg11'):  # config_for's model without batch_norm
  assert metric_lines(a) == metric_lines(b)
  pa, pb = params_of(a, model=model), params_of(b, model=model)
  for p in pa:
    assert pa[p].tobytes() == pb[p].tobytes(), p


@pytest.fixture(scope='module')
def lp_ft_runs(tmp_path_factory):
  """lp_ft on a BN VGG: a probe stage (cached up to the head) then full fine-tuning
  (nothing to cache), uncached and with the disk cache."""
  runs = {}
  for cache in ('off', 'disk'):
    workdir = str(tmp_path_factory.mktemp(f'lp_ft_{cache}'))
    config = config_for('lp_ft(probe_steps=5)', cache, batch_norm=True)
    runs[cache] = workdir, loop.train_and_evaluate(config, workdir)
  return runs


def test_cached_schedule_equals_uncached(lp_ft_runs):
  (off, off_summary), (disk, disk_summary) = lp_ft_runs['off'], lp_ft_runs['disk']
  assert_same_run(off, disk, model='vgg11_bn')
  assert disk_summary['final_eval_accuracy'] == off_summary['final_eval_accuracy']
  assert disk_summary['frozen_checksum'] == off_summary['frozen_checksum']
  probe = disk_summary['stages'][0]['plan']
  assert disk_summary['activation_cache'] == {probe: 'head'}  # the full stage runs uncached
  assert 'activation_cache' not in off_summary
  # The probe step no longer runs the convolutions.
  probe_flops = [s['train_step_flops'] for s in (off_summary, disk_summary)]
  assert (
    disk_summary['stages'][0]['train_step_flops']
    < 0.1 * (off_summary['stages'][0]['train_step_flops'])
  ), probe_flops
  assert os.listdir(os.path.join(disk, 'activation_cache'))


@pytest.mark.parametrize('resume_at', [3, 5])  # mid-probe; at the stage boundary
def test_cached_resume_is_bit_identical(lp_ft_runs, tmp_path, resume_at):
  off, _ = lp_ft_runs['off']
  disk, _ = lp_ft_runs['disk']
  resumed = str(tmp_path / 'resumed')
  shutil.copytree(disk, resumed)  # with its disk cache, which the resume reuses
  os.remove(os.path.join(resumed, 'summary.json'))
  ckpt_dir = os.path.join(resumed, 'checkpoints')
  for step in checkpoint.all_steps(ckpt_dir):
    if step > resume_at:
      shutil.rmtree(os.path.join(ckpt_dir, str(step)))
  loop.train_and_evaluate(config_for('lp_ft(probe_steps=5)', 'disk', batch_norm=True), resumed)
  pa, pb = params_of(off, model='vgg11_bn'), params_of(resumed, model='vgg11_bn')
  for p in pa:
    assert pa[p].tobytes() == pb[p].tobytes(), p


@pytest.mark.parametrize(
  'change, message',
  [
    (dict(augment='pad_crop'), "augmentation 'pad_crop' changes the images"),
    (dict(policy='full'), 'leaves no frozen prefix'),
    (dict(cache='ram'), "activation_cache 'ram' is not one of"),
  ],
)
def test_refused_before_anything_is_written(tmp_path, change, message):
  config = config_for(change.get('policy', 'linear_probe'), change.get('cache', 'memory'))
  config.dataset.augment = change.get('augment', 'none')
  workdir = str(tmp_path / 'run')
  with pytest.raises(errors.InputError, match=message):
    loop.train_and_evaluate(config, workdir)
  assert not os.path.exists(workdir)


def test_runs_sharing_a_cache_directory_compute_a_prefix_once(tmp_path, monkeypatch):
  """A second run (another learning rate) given the first's `activation_cache_dir` reads its
  caches (the splits and frozen weights are the same) and trains as on a cache of its own.
  (Here the init is random, so another seed would have other prefix weights, and its own
  caches; runs from the same pretrained weights share them across seeds.)"""
  shared = str(tmp_path / 'shared')
  first = config_for('linear_probe', 'disk')
  first.activation_cache_dir = shared
  loop.train_and_evaluate(first, str(tmp_path / 'seed0'))
  files = sorted(os.listdir(shared))
  assert len(files) == 6 and not any('.part' in f for f in files), files  # train, eval

  second = config_for('linear_probe', 'disk')
  second.optimizer.learning_rate, second.activation_cache_dir = 3e-3, shared
  with monkeypatch.context() as m:
    m.setattr(activation_cache, 'compute', None)  # a prefix computed again would fail here
    loop.train_and_evaluate(second, str(tmp_path / 'lr3e-3'))
  assert sorted(os.listdir(shared)) == files
  assert not os.path.exists(tmp_path / 'lr3e-3' / 'activation_cache')

  own = config_for('linear_probe', 'disk')
  own.optimizer.learning_rate = 3e-3
  loop.train_and_evaluate(own, str(tmp_path / 'own'))
  assert_same_run(str(tmp_path / 'lr3e-3'), str(tmp_path / 'own'))
