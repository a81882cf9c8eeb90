"""The closed-form few-shot probe against numpy ridge regression written another way."""

import numpy as np
import pytest

from configs import default
from ftlab import errors, loop, parallel, train
from ftlab.data import datasets, input_pipeline
from ftlab.evals import fewshot
from ftlab.files.metric_writers import read_jsonl
from tests import fakes


def reference_accuracy(train_x, train_y, test_x, test_y, num_classes, l2_reg):
  """Ridge regression as least squares on the augmented system [x; sqrt(l2) I] W = [t; 0]."""
  mean = train_x.mean(0)
  x, t = train_x - mean, 2.0 * np.eye(num_classes)[train_y] - 1.0
  d = x.shape[1]
  augmented = np.concatenate([x, np.sqrt(l2_reg) * np.eye(d)])
  padded = np.concatenate([t, np.zeros((d, num_classes))])
  weights = np.linalg.lstsq(augmented, padded, rcond=None)[0]
  return np.mean(np.argmax((test_x - mean) @ weights, 1) == test_y), weights


@pytest.mark.parametrize('n_per_class, d', [(2, 50), (30, 8)])  # dual and primal forms
def test_probe_equals_numpy_least_squares(n_per_class, d):
  rng = np.random.default_rng(0)
  num_classes = 5
  centres = rng.normal(size=(num_classes, d)) * 2
  train_y = np.repeat(np.arange(num_classes), n_per_class)
  test_y = rng.integers(0, num_classes, 200)
  train_x = centres[train_y] + rng.normal(size=(len(train_y), d))
  test_x = centres[test_y] + rng.normal(size=(len(test_y), d))
  for l2_reg in (0.1, 1024.0):
    expected, weights = reference_accuracy(train_x, train_y, test_x, test_y, num_classes, l2_reg)
    got = fewshot.probe_accuracy(train_x, train_y, test_x, test_y, num_classes, l2_reg)
    assert got == expected
    targets = 2.0 * np.eye(num_classes)[train_y] - 1.0
    np.testing.assert_allclose(
      fewshot.ridge_weights(train_x - train_x.mean(0), targets, l2_reg), weights, atol=1e-9
    )
  assert 0.5 < got <= 1.0  # separable clusters: far above chance (0.2)


def test_shots_are_the_first_per_class_and_nested():
  labels = np.array([1, 0, 1, 2, 0, 2, 1, 0, 2])
  np.testing.assert_array_equal(fewshot.first_shots(labels, 1, 3), [0, 1, 3])
  np.testing.assert_array_equal(fewshot.first_shots(labels, 2, 3), [0, 1, 2, 3, 4, 5])
  with pytest.raises(ValueError, match='class 0 has 3 examples, not 4'):
    fewshot.first_shots(labels, 4, 3)
  rng = np.random.default_rng(1)
  x = rng.normal(size=(9, 4))
  found = fewshot.probe_accuracies(x, labels, x, labels, 3, shots=(1, 3))
  assert found[3] == fewshot.probe_accuracy(x, labels, x, labels, 3)
  assert set(found) == {1, 3}
  with pytest.raises(ValueError, match='l2_reg 0.0 must be > 0'):
    fewshot.ridge_weights(x, x, 0.0)


@pytest.mark.parametrize('head', ['gap', 'mlp', 'imagenet'])
def test_pre_logits_are_what_predictions_sees_and_blocks_are_pooled(head):
  model = fakes.tiny_vgg(batch_norm=True, head=head)
  variables = fakes.random_variables(model)
  images = fakes.image_batches(1)[0]['image']
  logits = model.apply(variables, images, train=False)
  x = fewshot.feature_fn(model, 'pre_logits')(variables, images)
  w = variables['params']['predictions']
  np.testing.assert_allclose(x @ w['kernel'] + w['bias'], logits, rtol=1e-5, atol=1e-5)
  block3 = fewshot.feature_fn(model, 'block3')(variables, images)
  maps = model.clone(stop_block='block4').apply(variables, images, train=False)
  np.testing.assert_allclose(block3, maps.mean(axis=(1, 2)), rtol=1e-6)
  with pytest.raises(ValueError, match=r"layer 'block9' is not one of \['pre_logits', 'block1'"):
    fewshot.feature_fn(model, 'block9')


def test_probe_during_training_on_8_devices_equals_numpy_ridge(fake):
  """`Sets.evaluate` on 8 devices: the features are the single-device ones (to rounding)
  in split order, and the accuracies are numpy's ridge solution on those features."""
  model = fakes.tiny_vgg(num_classes=10, head='mlp')
  variables = fakes.random_variables(model)
  order = input_pipeline.BatchOrder(16)
  sets = fewshot.Sets(
    train=datasets.build_dataset('fashion_mnist', 'train', examples_per_class=5, **fake),
    test=datasets.build_dataset('fashion_mnist', 'test[:200]', **fake),
    shots=(1, 5),
    layer='pre_logits',
    l2_reg=8.0,
    order=order,
    image_size=32,
    preprocess='unit',
  )
  spread = parallel.Spread('pmap')
  state = spread.replicate(train.TrainState(0, variables['params'], {}, {}))
  p_features = fewshot.compile_features(model, 'pre_logits', spread)
  features = {
    s: sets.features(p_features, state, spread, getattr(sets, s)) for s in ('train', 'test')
  }
  one_device = fewshot.feature_fn(model, 'pre_logits')
  for name, (x, labels) in features.items():
    split = getattr(sets, name)
    batches = input_pipeline.eval_iterator(split, order, image_size=32, preprocess='unit')
    expected = np.concatenate([one_device(variables, b['image'])[b['mask'] > 0] for b in batches])
    np.testing.assert_allclose(x, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(labels, split.labels)
  found = sets.evaluate(p_features, state, spread)
  (train_x, train_y), (test_x, test_y) = features['train'], features['test']
  for k in (1, 5):
    rows = fewshot.first_shots(train_y, k, 10)
    assert len(rows) == 10 * k
    expected, _ = reference_accuracy(train_x[rows], train_y[rows], test_x, test_y, 10, 8.0)
    assert found[f'{k}shot_accuracy'] == expected


def runlocal(**fewshot):
  config = default.get_config('runlocal')
  config.evals.fewshot.update(fewshot)
  return config


@pytest.mark.slow
def test_run_records_the_probe_at_every_eval(tmp_path, fashion_mnist_prepared):
  summary = loop.train_and_evaluate(runlocal(shots=(1, 5), layer='block5'), str(tmp_path))
  rows = [r for r in read_jsonl(tmp_path / 'metrics.jsonl') if 'fewshot/1shot_accuracy' in r]
  assert [r['step'] for r in rows] == [10, 20]
  assert set(summary['final_fewshot']) == {'1shot_accuracy', '5shot_accuracy'}
  assert summary['final_fewshot']['5shot_accuracy'] == rows[-1]['fewshot/5shot_accuracy']
  assert 0.1 < summary['final_fewshot']['5shot_accuracy'] <= 1.0  # chance is 0.1


@pytest.mark.parametrize(
  'fewshot, message',
  [
    (dict(shots=(0, 5)), r'evals.fewshot.shots=\(0, 5\): need positive integers'),
    (dict(shots=(5,), layer='block7'), r"few-shot probe: layer 'block7' is not one of"),
    (dict(shots=(5,), test_split='validation'), r"'validation' is no split"),
  ],
)
def test_bad_probe_config_is_one_line_before_anything_is_written(tmp_path, fewshot, message):
  with pytest.raises(errors.InputError, match=message) as e:
    loop.train_and_evaluate(runlocal(**fewshot), str(tmp_path / 'run'))
  assert '\n' not in str(e.value)
  assert not (tmp_path / 'run').exists()


@pytest.mark.slow
def test_probe_on_cached_prefix_outputs_equals_the_probe_on_images(
  tmp_path, fashion_mnist_prepared
):
  """With the activation cache on, the probe's splits are cached too and its features come
  from the rest of the network: the same accuracies as from the images."""
  results = {}
  for cache in ('off', 'disk'):
    config = runlocal(shots=(1, 5))
    config.policy.name, config.dataset.augment = 'last_blocks(1)', 'none'
    config.activation_cache = cache
    results[cache] = loop.train_and_evaluate(config, str(tmp_path / cache))
  assert results['disk']['activation_cache'] == {'last_blocks(k=1)': 'block5'}
  assert results['disk']['final_fewshot'] == results['off']['final_fewshot']
  cached = sorted(
    {p.name.split('-')[0] for p in (tmp_path / 'disk' / 'activation_cache').iterdir()}
  )
  assert cached == ['eval', 'fewshot_test', 'fewshot_train', 'train']
