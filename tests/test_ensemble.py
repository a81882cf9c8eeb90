"""Ensembles, soups and WiSE-FT: exact averages, bit-identical trivial combinations, errors."""

import functools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import demo
from ftlab import parallel, run
from ftlab.analysis import combine, ensemble, soups
from ftlab.data import sources
from ftlab.files import checkpoint, workdir
from scripts import combine_report
from tests import fakes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_fashion_mnist = pytest.mark.skipif(
  not os.path.isdir(sources.DEBIAN_FASHION_MNIST_DIR),
  reason='Fashion-MNIST IDX files absent: apt-get install dataset-fashion-mnist',
)


def tiny():
  return fakes.tiny_vgg(batch_norm=True, head='mlp')


init = fakes.random_variables


def image_batches(n, batch_size=16, seed=0, padding=0):
  return fakes.image_batches(n, batch_size, seed, padding=padding)


def evaluator(mode='pmap', num_devices=8, eval_data=(), train_data=()):
  return ensemble.ExactEval(
    tiny(),
    parallel.Spread(mode, tuple(jax.devices()[:num_devices])),
    {'eval': lambda: iter(eval_data)},
    lambda: iter(train_data),
    image_size=32,
  )


# --- Exact averages. --------------------------------------------------------------------------


@pytest.mark.parametrize('copies', [2, 3, 5, 7])
def test_mean_of_copies_is_bit_identical(copies):
  rng = np.random.RandomState(copies)
  tree = {
    'a': (rng.normal(size=1000) * 10.0 ** rng.randint(-30, 30, 1000)).astype(np.float32),
    'b': {'c': np.array([-0.0, 0.0, 1e-45, -3e38, 3.4e38, 1 / 3], np.float32)},
  }
  assert soups.trees_identical(soups.mean_tree([tree] * copies), tree)
  if copies in (3, 5, 7):
    # Why not float32 sum / N: it does not give x back.
    naive = sum([tree['a']] * copies) / np.float32(copies)
    assert not np.array_equal(naive, tree['a'])


def test_mean_and_interpolation_values():
  rng = np.random.RandomState(0)
  trees = [{'w': rng.normal(size=(3, 4)).astype(np.float32)} for _ in range(3)]
  mean = soups.mean_tree(trees)
  assert mean['w'].dtype == np.float32
  np.testing.assert_allclose(mean['w'], np.mean([t['w'] for t in trees], 0), rtol=1e-6)
  a, b = trees[:2]
  # The endpoints are the trees themselves; in between, the formula.
  assert soups.interpolate(a, b, 0.0) is a and soups.interpolate(a, b, 1) is b
  np.testing.assert_allclose(
    soups.interpolate(a, b, 0.25)['w'], 0.75 * a['w'] + 0.25 * b['w'], rtol=1e-6
  )
  np.testing.assert_allclose(
    soups.interpolate(a, b, 0.5)['w'], soups.mean_tree([a, b])['w'], rtol=1e-6
  )
  assert not soups.trees_identical({'x': np.float32(-0.0)}, {'x': np.float32(0.0)})


def test_greedy_soup_tries_in_rank_order_and_keeps_what_does_not_hurt():
  values = {'a': 1.0, 'b': 3.0, 'c': 1.2, 'd': 9.0}
  target = 1.5  # the soup's score is -|mean - target|

  def make_soup(names):
    return np.mean([values[n] for n in names])

  score = lambda soup: -abs(soup - target)
  chosen, soup, trials = soups.greedy_soup(['c', 'a', 'b', 'd'], make_soup, score)
  # c alone (0.3 away); +a: mean 1.1 (0.4 away) dropped; +b: 2.1 (0.6) dropped; +d dropped.
  assert chosen == ['c'] and soup == 1.2
  assert [t['accepted'] for t in trials] == [True, False, False, False]
  assert [t['candidate'] for t in trials] == ['c', 'a', 'b', 'd']
  # A trial scoring the same as the soup joins it ("does not drop").
  chosen, _, _ = soups.greedy_soup(['x', 'y'], lambda names: 0.0, lambda soup: 0.5)
  assert chosen == ['x', 'y']


# --- Checks. ----------------------------------------------------------------------------------


def run_config(**changes):
  config = {
    'model': {'name': 'vgg11_bn', 'width': 0.25, 'head': 'mlp', 'dtype': 'float32'},
    'dataset': {
      'name': 'fashion_mnist',
      'classes': [5, 6, 7, 8, 9],
      'image_size': 32,
      'preprocess': 'unit',
    },
  }
  for dotted, value in changes.items():
    section, key = dotted.split('__')
    config[section][key] = value
  return config


def test_runs_of_different_architectures_or_heads_are_a_clear_error():
  same = workdir.check_compatible(
    {'a': run_config(), 'b': run_config(model__adaptive_pool=0)}  # missing means 0
  )
  assert same['model.width'] == 0.25 and same['dataset.classes'] == [5, 6, 7, 8, 9]
  with pytest.raises(ValueError) as error:
    workdir.check_compatible(
      {
        'a': run_config(),
        'b': run_config(model__width=0.5),
        'c': run_config(dataset__classes=[0, 1, 2, 3, 4], model__head='gap'),
      }
    )
  message = str(error.value)
  assert message.startswith('cannot combine runs of different architectures or heads')
  assert 'model.width (a: 0.25, b: 0.5, c: 0.25)' in message
  assert 'model.head (a: "mlp", b: "mlp", c: "gap")' in message
  assert 'dataset.classes (a: [5, 6, 7, 8, 9]' in message
  assert 'model.name' not in message
  eval_config = demo.get_config('stage=finetune')
  eval_config.dataset.image_size = 64
  with pytest.raises(ValueError, match=r'dataset.image_size is 64 in --config but 32 in the runs'):
    combine.check_eval_data(eval_config, same)
  with pytest.raises(ValueError, match='wise interpolates two runs'):
    combine.check_methods(['wise'], 3, [0.5])
  with pytest.raises(ValueError, match=r"unknown methods \['soup'\]"):
    combine.check_methods(['logits', 'soup'], 2, [])


# --- The steps, on 8 devices. -----------------------------------------------------------------


def test_output_ensemble_of_one_model_or_copies_equals_the_model():
  data = image_batches(2, batch_size=16, padding=5)
  v0, v1 = init(tiny(), 0), init(tiny(), 1)
  for mode in ('pmap', 'shard_map'):
    ev = evaluator(mode, eval_data=data)
    single = ev.evaluate(v0)
    assert single['count'] == 22  # the padding is masked out
    assert ev.evaluate_ensemble([v0], 'logits') == single, mode  # bit-identical sums
  assert ev.evaluate_ensemble([v0, v0], 'logits') == single
  # Two models: the combination computed on the host.
  apply_fn = jax.jit(functools.partial(tiny().apply, train=False))
  logits = [np.concatenate([np.asarray(apply_fn(v, b['image'])) for b in data]) for v in (v0, v1)]
  labels = np.concatenate([b['label'] for b in data])
  mask = np.concatenate([b['mask'] for b in data]).astype(bool)
  for how, scores in [
    ('logits', jax.nn.log_softmax((logits[0] + logits[1]) / 2)),
    ('probs', np.log((jax.nn.softmax(logits[0]) + jax.nn.softmax(logits[1])) / 2)),
  ]:
    result = ev.evaluate_ensemble([v0, v1], how)
    scores = np.asarray(scores)[mask]
    nll = -scores[np.arange(len(scores)), labels[mask]]
    np.testing.assert_allclose(result['loss'], nll.mean(), rtol=1e-5)
    assert result['accuracy'] == np.mean(scores.argmax(-1) == labels[mask])
    assert result['count'] == 22


def test_batch_norm_reset_averages_batch_statistics_over_devices():
  train_data = image_batches(2, batch_size=16, seed=3)
  variables = init(tiny(), 0)

  def reset(batches, num_devices=8):
    ev = evaluator(num_devices=num_devices, train_data=batches)
    return ev.reset_batch_stats(variables)['batch_stats']

  first, second = reset(train_data[:1]), reset(train_data[1:])
  both = reset(train_data)
  assert not soups.trees_identical(first, variables['batch_stats'])
  jax.tree.map(
    lambda b, x, y: np.testing.assert_allclose(b, (x + y) / 2, rtol=1e-5, atol=1e-6),
    both,
    first,
    second,
  )
  # Statistics of the global batch: the same on one device as on eight, up to summation
  # order. A mean summed in another order moves by a few ulps of its summands, not of the
  # (possibly cancelling) result, and each layer's statistics inherit the previous layer's
  # differences: so the bound scales with the leaf's largest entry. Measured: 6.3e-6 on a
  # channel mean of -0.08 whose leaf peaks at 2.57 (jax 0.10.0), i.e. 2.4e-6 of the peak.
  jax.tree.map(
    lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-5, atol=1e-5 * np.abs(y).max()),
    first,
    reset(train_data[:1], num_devices=1),
  )
  # They are the batch's own: a train-mode pass from them leaves them where they are.
  apply_fn = jax.jit(functools.partial(tiny().apply, train=True, mutable=['batch_stats']))
  _, updated = apply_fn(
    {'params': variables['params'], 'batch_stats': first},
    train_data[0]['image'],
    rngs={'dropout': jax.random.key(0)},
  )
  jax.tree.map(
    lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6),
    jax.device_get(updated['batch_stats']),
    first,
  )


# --- End to end: checkpoints, Fashion-MNIST, the command line. ---------------------------------


def eval_config():
  return demo.get_config('stage=finetune,runlocal')


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """Two checkpoints of the demo's runlocal fine-tuning model, each with its config in the meta
  as the run loop writes it: `start` (an init) and `tuned` (the init moved a little), like two
  fine-tunes of one pretrained model. No training: the properties tested hold for any weights.
  """
  root = tmp_path_factory.mktemp('runs')
  config = eval_config()
  model = run.build_model(config.model, len(config.dataset.classes))
  start = init(model, 0)
  rng = np.random.RandomState(1)
  tuned = jax.tree.map(
    lambda x: (x + 0.1 * np.std(x) * rng.normal(size=x.shape)).astype(x.dtype), start
  )
  tuned['batch_stats'] = init(model, 2)['batch_stats']
  paths = {}
  for name, variables in [('start', start), ('tuned', tuned)]:
    meta = {'plan': 'full()', 'config': config.to_dict()}
    checkpoint.save_variables(root / name / 'checkpoints', variables, meta)
    paths[name] = str(root / name)
  return paths


@pytest.mark.slow  # real data, end to end
@needs_fashion_mnist
def test_soups_and_ensemble_of_copies_reproduce_the_run(runs):
  tuned = runs['tuned']
  config = eval_config()
  config.dataset.train_split = 'train'
  config.dataset.minival = '300'  # the held-out split of the greedy soup
  output = combine.combine(
    run.make_data(config),
    parallel.Spread(config.parallelism),
    [tuned, tuned + '/checkpoints', tuned],
    ['logits', 'uniform_soup', 'greedy_soup'],
  )
  rows = {r['name']: r for r in output['results']}
  assert list(rows)[:3] == ['tuned', 'tuned#2', 'tuned#3']
  assert rows['tuned']['eval']['count'] == 492  # test[:10%], target classes only
  for name in ('logit ensemble', 'uniform soup', 'greedy soup'):
    for split in ('eval', 'minival'):
      assert rows[name][split] == rows['tuned'][split], (name, split)  # bit-identical sums
    assert not rows[name]['bn_reset_applied']
  assert rows['greedy soup']['members'] == ['tuned', 'tuned#2', 'tuned#3']  # ties join
  assert output['eval']['held_out_split'] == 'minival' and not output['bn_reset_applied']
  assert not any('optimistic' in n for n in output['notes'])
  assert '| model | combines | BatchNorm statistics | minival accuracy | test[:10%] accuracy |' in (
    combine_report.markdown(output)
  )


@pytest.mark.slow  # the CLI in a subprocess
@needs_fashion_mnist
def test_cli_wise_endpoints_and_another_architecture(runs, tmp_path):
  start, tuned = runs['start'], runs['tuned']
  base = [sys.executable, 'scripts/combine.py', '--config=configs/demo.py:stage=finetune,runlocal']

  def cli(*args):
    return subprocess.run([*base, *args], cwd=ROOT, capture_output=True, text=True, timeout=180)

  # A run of another width and label set.
  config = eval_config()
  config.model.width = 1 / 8
  config.dataset.classes = (0, 1, 2)
  variables = init(run.build_model(config.model, 3), 0)
  other = tmp_path / 'other'
  checkpoint.save_variables(other / 'checkpoints', variables, {'config': config.to_dict()})
  result = cli('--checkpoints', tuned, str(other), '--method=logits', f'--workdir={tmp_path}/bad')
  assert result.returncode == 2
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith('error: cannot combine runs of different architectures or heads')
  assert 'model.width (tuned: 0.0625, other: 0.125)' in last and 'dataset.classes' in last
  assert not (tmp_path / 'bad').exists()

  out = tmp_path / 'out'
  args = ['--method=wise,probs', '--alphas=0,0.5,1', '--bn_reset_batches=2', f'--workdir={out}']
  result = cli('--checkpoints', start, tuned, *args)
  assert result.returncode == 0, result.stderr[-2000:]
  output = json.loads((out / 'combine.json').read_text())
  rows = {r['name']: r for r in output['results']}
  assert list(rows) == [
    'start',
    'tuned',
    'WiSE-FT α=0',
    'WiSE-FT α=0.5',
    'WiSE-FT α=1',
    'probability ensemble',
  ]
  assert rows['WiSE-FT α=0']['eval'] == rows['start']['eval']
  assert rows['WiSE-FT α=1']['eval'] == rows['tuned']['eval']
  assert not rows['WiSE-FT α=0']['bn_reset_applied']
  assert rows['WiSE-FT α=0.5']['bn_reset_applied'] and output['bn_reset_applied']
  assert output['bn_reset_batches'] == 2
  table = (out / 'combine.md').read_text()
  assert table.strip() in result.stdout
  assert '| WiSE-FT α=0.5 | (1-α)·start + α·tuned | recomputed (2 batches) |' in table
  assert '| probability ensemble | start, tuned | stored |' in table
