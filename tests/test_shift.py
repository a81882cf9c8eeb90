"""Shifted test sets (`ftlab/evals/shift.py`): each corruption against an independent reference
(scipy's Gaussian filter, PIL's box resize and JPEG codec, the contrast's closed form, the
noise's statistics), the noise keyed by the example, the evaluator the same on 1 and 8 devices
and on two processes' shares, a run that records the metrics, and bad configs as one line."""

import io
import types

import jax
import numpy as np
import pytest
import scipy.ndimage
from PIL import Image

from configs import default
from ftlab import errors, loop, parallel, train
from ftlab.data import datasets, input_pipeline, preprocessing
from ftlab.evals import shift
from ftlab.evals.base import StageView
from ftlab.files.metric_writers import read_jsonl
from tests import fakes
from tests.test_input_pipeline import ids_of


def smooth_images(n=2, side=32, seed=0):
  """Photographs' kind of content: smooth gradients and a few edges, RGB in [0, 1]."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:side, 0:side] / side
  out = []
  for _ in range(n):
    a, b, c = rng.uniform(0.2, 0.8, 3)
    image = np.stack([a + 0.2 * np.sin(6 * x), b + 0.2 * y, c - 0.15 * x * y], -1)
    image[side // 4 : side // 2, side // 3 : 2 * side // 3] = rng.uniform(0, 1, 3)  # an edge
    out.append(image)
  return np.clip(np.stack(out), 0, 1).astype(np.float32)


def noise_images(n=2, side=32, seed=0):
  return np.random.default_rng(seed).uniform(size=(n, side, side, 3)).astype(np.float32)


# --- The corruptions against their references. ---------------------------------------------


def test_severity_tables_are_the_papers_and_auto_picks_by_size():
  # Written out from hendrycks/robustness, ImageNet-C/create_c/make_imagenet_c.py and
  # make_cifar_c.py, so an edit of the module's tables shows here.
  imagenet_c = {
    'gaussian_noise': (0.08, 0.12, 0.18, 0.26, 0.38),
    'gaussian_blur': (1, 2, 3, 4, 6),
    'contrast': (0.4, 0.3, 0.2, 0.1, 0.05),
    'jpeg': (25, 18, 15, 10, 7),
    'pixelate': (0.6, 0.5, 0.4, 0.3, 0.25),
  }
  cifar10_c = {
    'gaussian_noise': (0.04, 0.06, 0.08, 0.09, 0.10),
    'gaussian_blur': (0.4, 0.6, 0.7, 0.8, 1),
    'contrast': (0.75, 0.5, 0.4, 0.3, 0.15),
    'jpeg': (80, 65, 58, 50, 40),
    'pixelate': (0.95, 0.9, 0.85, 0.75, 0.65),
  }
  assert dict(shift.TABLES['imagenet_c'].constants) == imagenet_c
  assert dict(shift.TABLES['cifar10_c'].constants) == cifar10_c
  assert shift.table_for('auto', 32) == 'cifar10_c' and shift.table_for('auto', 224) == 'imagenet_c'
  # Only the blur's std has a unit of pixels: scaled with the input side.
  assert shift.constant('gaussian_blur', 5, 224, 'imagenet_c') == 6
  assert shift.constant('gaussian_blur', 5, 112, 'imagenet_c') == 3
  assert shift.constant('gaussian_blur', 5, 64, 'cifar10_c') == 2
  assert shift.constant('jpeg', 5, 112, 'imagenet_c') == 7


@pytest.mark.parametrize('severity', [1, 3, 5])
@pytest.mark.parametrize('table', ['imagenet_c', 'cifar10_c'])
def test_gaussian_blur_equals_scipy_gaussian_filter(severity, table):
  images = noise_images()
  # skimage.filters.gaussian's defaults, as ImageNet-C calls it: edges extended, 4 std.
  sigma = {'imagenet_c': (1, 2, 3, 4, 6), 'cifar10_c': (0.4, 0.6, 0.7, 0.8, 1)}[table]
  sigma = sigma[severity - 1] * 32 / {'imagenet_c': 224, 'cifar10_c': 32}[table]
  expected = scipy.ndimage.gaussian_filter(
    images.astype(np.float64), sigma=(0, sigma, sigma, 0), mode='nearest', truncate=4.0
  )
  found = shift.corrupt(images, 'gaussian_blur', severity, np.arange(2), table)
  assert found.dtype == np.float32 and found.shape == images.shape
  np.testing.assert_allclose(found, expected, atol=1e-6)


@pytest.mark.parametrize('factor', [0.3, 0.95, 0.6])
def test_contrast_is_the_closed_form(factor):
  # Values in [0.3, 0.7]: no clipping, so each channel keeps its mean and its spread around
  # the mean is scaled by the factor.
  images = 0.3 + 0.4 * noise_images()
  found = shift.contrast(images, factor)
  means = images.mean(axis=(1, 2), keepdims=True)
  np.testing.assert_allclose(found.mean(axis=(1, 2), keepdims=True), means, atol=1e-6)
  np.testing.assert_allclose(found - means, factor * (images - means), atol=1e-6)
  # With clipping: the closed form, clipped.
  bright = noise_images()
  m = bright.mean(axis=(1, 2), keepdims=True)
  np.testing.assert_allclose(shift.contrast(bright, 2.0), np.clip((bright - m) * 2 + m, 0, 1))


def pil_box_pixelate(images, small):
  """ImageNet-C's pixelate with PIL: BOX down to `small`, BOX back; float ('F') channels."""
  out = np.empty_like(images)
  side = images.shape[1]
  for b in range(len(images)):
    for c in range(3):
      image = Image.fromarray(images[b, :, :, c], mode='F')
      image = image.resize((small, small), Image.BOX).resize((side, side), Image.BOX)
      out[b, :, :, c] = np.asarray(image)
  return out


@pytest.mark.parametrize('severity', [1, 2, 3, 4, 5])
@pytest.mark.parametrize('side, table', [(32, 'cifar10_c'), (32, 'imagenet_c'), (56, 'imagenet_c')])
def test_pixelate_equals_pil_box_resize(severity, side, table):
  images = noise_images(side=side)
  factor = shift.TABLES[table].constants['pixelate'][severity - 1]
  found = shift.corrupt(images, 'pixelate', severity, np.arange(2), table)
  np.testing.assert_allclose(found, pil_box_pixelate(images, int(side * factor)), atol=1e-6)


def test_pixelate_at_half_size_is_the_2x2_block_mean():
  images = noise_images()
  blocks = images.reshape(2, 16, 2, 16, 2, 3).mean(axis=(2, 4))
  expected = blocks.repeat(2, axis=1).repeat(2, axis=2)
  np.testing.assert_allclose(shift.pixelate(images, 0.5), expected, atol=1e-6)


@pytest.mark.parametrize('severity', [1, 3, 5])
@pytest.mark.parametrize('table', ['imagenet_c', 'cifar10_c'])
def test_jpeg_is_pils_jpeg_at_the_same_quality(severity, table):
  images = smooth_images(side=64)
  quality = shift.TABLES[table].constants['jpeg'][severity - 1]
  expected = []
  for image in np.round(images * 255).astype(np.uint8):
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, 'JPEG', quality=quality)
    expected.append(np.asarray(Image.open(buffer)).astype(np.float32) / 255)
  expected = np.stack(expected)
  found = shift.corrupt(images, 'jpeg', severity, np.arange(2), table)
  assert found.shape == images.shape and found.dtype == np.float32
  # TensorFlow's codec with the accurate DCT gives PIL's pixels (what ImageNet-C saved).
  np.testing.assert_array_equal(found, expected)
  loss = np.abs(found - images).mean()
  assert loss > 0.5 / 255  # it did compress


def test_jpeg_loses_more_at_higher_severity():
  images = smooth_images(side=64)
  losses = [
    np.abs(shift.corrupt(images, 'jpeg', s, np.arange(2), 'imagenet_c') - images).mean()
    for s in (1, 3, 5)
  ]
  assert losses[0] < losses[1] < losses[2]


def test_gaussian_noise_has_the_tables_std_and_is_keyed_by_example_and_severity():
  grey = np.full((3, 64, 64, 3), 0.5, np.float32)  # 0.5 +- 6 std: nothing clipped
  examples = np.array([5, 9, -1])
  found = shift.corrupt(grey, 'gaussian_noise', 1, examples, 'imagenet_c')
  noise = found[:2] - 0.5
  n = noise[0].size
  for row in noise:
    assert abs(row.mean()) < 4 * 0.08 / np.sqrt(n)
    assert abs(row.std() - 0.08) < 0.03 * 0.08
  assert abs(np.corrcoef(noise[0].ravel(), noise[1].ravel())[0, 1]) < 4 / np.sqrt(n)
  np.testing.assert_array_equal(found[2], grey[2])  # padding is left alone
  # The same example gets the same noise in any batch, row or run; another severity draws
  # another noise.
  again = shift.corrupt(grey[[1, 0]], 'gaussian_noise', 1, examples[[1, 0]], 'imagenet_c')
  np.testing.assert_array_equal(again, found[[1, 0]])
  other = shift.corrupt(grey[:1], 'gaussian_noise', 3, examples[:1], 'imagenet_c') - 0.5
  assert abs(np.corrcoef(other.ravel(), noise[0].ravel())[0, 1]) < 4 / np.sqrt(n)
  assert abs(other.std() - 0.18) < 0.03 * 0.18
  # Clipped to [0, 1].
  dark = shift.corrupt(np.zeros((1, 8, 8, 3), np.float32), 'gaussian_noise', 5, [0], 'imagenet_c')
  assert dark.min() == 0.0 and 0 < dark.max() <= 1.0


# --- Which examples, on any number of processes. --------------------------------------------


def sets_for(split, process_index=0, process_count=1, batch=16, image_size=32, **kw):
  order = input_pipeline.BatchOrder(batch, process_index=process_index, process_count=process_count)
  kw = {
    'corruptions': shift.CORRUPTIONS,
    'severities': (1, 5),
    'table': 'auto',
    'preprocess': 'unit',
    **kw,
  }
  return shift.ShiftedSets(
    split,
    tuple(kw['corruptions']),
    tuple(kw['severities']),
    kw['table'],
    order,
    image_size,
    kw['preprocess'],
  )


def test_rows_carry_their_record_index_on_one_and_two_processes(fake):
  """`batches` names each row's example by its record index (fake images carry theirs in
  pixels), every example once over the processes, and a row's noise is its example's."""
  whole = datasets.build_dataset('fashion_mnist', 'test', **fake)
  # The id each record carries, in record order (tfds stores the examples shuffled).
  (every,) = input_pipeline.eval_iterator(
    whole, input_pipeline.BatchOrder(1001), image_size=28, preprocess='unit'
  )
  id_of_record = ids_of(every['image'])
  split = shift.evenly_spaced(whole, 37)
  assert split.num_examples == 37
  np.testing.assert_array_equal(split.indices, np.arange(37) * 1001 // 37)
  noise_of = {}
  for count in (1, 2):
    seen = []
    for index in range(count):
      sets = sets_for(split, index, count, batch=8 * count, image_size=28)
      for batch, examples in sets.batches():
        real = batch['mask'] > 0
        np.testing.assert_array_equal(id_of_record[examples[real]], ids_of(batch['image'])[real])
        assert (examples[~real] == -1).all()
        noisy = shift.corrupt(batch['image'], 'gaussian_noise', 3, examples)
        for row in np.flatnonzero(real):
          key = int(examples[row])
          noise_of.setdefault(key, noisy[row])
          np.testing.assert_array_equal(noisy[row], noise_of[key])
        seen.extend(examples[real])
    assert sorted(seen) == sorted(split.indices)


# --- The evaluator. -------------------------------------------------------------------------


@pytest.mark.slow  # a compile-heavy pass or a subprocess: the whole suite runs it
def test_evaluator_on_1_and_8_devices_equals_corrupting_then_normalising(fake):
  """The same metrics on 1 and 8 devices and on a second run, and they are the accuracies of
  the one-device model on the corrupted pixels normalised with the run's convention (caffe:
  a corruption after normalisation would give other images)."""
  split = datasets.build_dataset('fashion_mnist', 'test[:40]', **fake)  # 40: padded batches
  model = fakes.tiny_vgg(num_classes=10)
  variables = fakes.random_variables(model)
  sets = sets_for(split, preprocess='caffe')
  plan = types.SimpleNamespace(frozen_layers=())
  results = []
  for devices in (jax.devices()[:1], jax.devices()):
    spread = parallel.Spread('shard_map', tuple(devices))
    evaluator = shift.Shift(sets, model, spread)
    evaluator.start_stage(StageView(plan=plan, model=model, eval_batches={}))
    state = spread.replicate(train.TrainState(0, variables['params'], {}, ()))
    results += [evaluator.run(state), evaluator.run(state)]
  assert len(devices) == 8
  assert all(r == results[0] for r in results[1:])
  cells = [f'shift/{c}_{s}/accuracy' for c in shift.CORRUPTIONS for s in (1, 5)]
  assert set(results[0]) == {*cells, 'shift/clean_accuracy', 'shift/mean_accuracy'}
  assert results[0]['shift/mean_accuracy'] == pytest.approx(np.mean([results[0][k] for k in cells]))
  # One device, no spread: pixels in [0, 1] -> corrupted -> caffe -> the model.
  order = input_pipeline.BatchOrder(64)
  (batch,) = input_pipeline.eval_iterator(split, order, image_size=32, preprocess='unit')
  real = batch['mask'] > 0
  pixels, labels, examples = batch['image'][real], batch['label'][real], split.indices
  for key in ['shift/clean_accuracy', *cells]:
    name = key[len('shift/') :].split('/')[0]
    if name == 'clean_accuracy':
      corrupted = pixels
    else:
      corruption, severity = name.rsplit('_', 1)
      corrupted = shift.corrupt(pixels, corruption, int(severity), examples)
    logits = model.apply(variables, preprocessing.normalize(corrupted * 255, 'caffe'), train=False)
    assert results[0][key] == np.mean(np.argmax(logits, -1) == labels), key
  # The corruptions change the predictions: the test is not passed by a constant model.
  assert len({results[0][k] for k in ['shift/clean_accuracy', *cells]}) > 2


def runlocal(**section):
  config = default.get_config('runlocal')
  config.evals.shift.update(section)
  return config


@pytest.mark.slow
def test_run_records_the_shifted_accuracies_at_every_eval(tmp_path, fashion_mnist_prepared):
  summary = loop.train_and_evaluate(runlocal(enabled=True, severities=(1, 5)), str(tmp_path))
  rows = [r for r in read_jsonl(tmp_path / 'metrics.jsonl') if 'shift/mean_accuracy' in r]
  assert [r['step'] for r in rows] == [10, 20]
  cells = {f'{c}_{s}/accuracy' for c in shift.CORRUPTIONS for s in (1, 5)}
  assert set(summary['final_shift']) == {*cells, 'clean_accuracy', 'mean_accuracy'}
  for key, value in summary['final_shift'].items():
    assert value == rows[-1][f'shift/{key}']
  # The clean images are the classification evaluator's own examples, read the same way.
  clean = summary['final_shift']['clean_accuracy']
  assert clean == pytest.approx(summary['final_eval_accuracy'], abs=1e-3)
  assert summary['final_shift']['clean_accuracy'] > 0.2  # it learned (chance: 0.1)
  worst = min(summary['final_shift'][k] for k in cells)
  assert worst < summary['final_shift']['clean_accuracy']  # some corruption hurts


@pytest.mark.slow
def test_a_stage_on_cached_prefix_outputs_is_still_evaluated_from_images(
  tmp_path, fashion_mnist_prepared
):
  """With the activation cache on, the steps and the classification eval run the rest of the
  network on cached outputs; the shifted sets need pixels, so they run the whole model on the
  images: their clean accuracy is still the eval accuracy."""
  config = runlocal(enabled=True, corruptions=('contrast',), severities=(5,))
  config.policy.name, config.dataset.augment = 'last_blocks(1)', 'none'
  config.activation_cache = 'memory'
  summary = loop.train_and_evaluate(config, str(tmp_path))
  assert summary['activation_cache'] == {'last_blocks(k=1)': 'block5'}
  found = summary['final_shift']
  assert set(found) == {'clean_accuracy', 'contrast_5/accuracy', 'mean_accuracy'}
  assert found['clean_accuracy'] == pytest.approx(summary['final_eval_accuracy'], abs=1e-3)
  assert found['contrast_5/accuracy'] != found['clean_accuracy']


@pytest.mark.parametrize(
  'section, message',
  [
    (
      dict(corruptions=('gaussian_noise', 'fog')),
      r"^evals.shift.corruptions: 'fog' is not one of gaussian_noise, gaussian_blur, contrast, "
      r'jpeg, pixelate$',
    ),
    (dict(severities=(1, 6)), r'^evals.shift.severities: 6 is not one of 1, 2, 3, 4, 5$'),
    (dict(severities=(0,)), r'^evals.shift.severities: 0 is not one of 1, 2, 3, 4, 5$'),
    (dict(severities=(1.5,)), r'^evals.shift.severities: 1.5 is not one of 1, 2, 3, 4, 5$'),
    (dict(severities=(True,)), r'^evals.shift.severities: True is not one of 1, 2, 3, 4, 5$'),
    (dict(severities=(1.0,)), r'^evals.shift.severities: 1.0 is not one of 1, 2, 3, 4, 5$'),
    (dict(table='imagenet'), r"^evals.shift.table: 'imagenet' is not one of auto, imagenet_c"),
    (dict(max_examples=-1), r'^evals.shift.max_examples=-1: need an integer >= 0$'),
  ],
)
def test_bad_config_is_one_line_before_anything_is_written(tmp_path, section, message):
  with pytest.raises(errors.InputError, match=message) as e:
    loop.train_and_evaluate(runlocal(enabled=True, **section), str(tmp_path / 'run'))
  assert '\n' not in str(e.value)
  assert not (tmp_path / 'run').exists()


def test_off_unless_enabled():
  config = default.get_config('runlocal')
  assert not config.evals.shift.enabled
  setting = types.SimpleNamespace(config=config.evals.shift, data=None)
  assert shift.Shift.build(setting) is None
