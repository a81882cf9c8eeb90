"""What a workdir records and refuses: the config it was started with (a rerun under another
config stops), one line per launch, each split's classes and counts; a smoke run that learns;
runs whose every update was skipped, non-finite or ill-fitting init weights, stopped with the
likely cause and the flags that fix it."""

import json
import os

import jax
import numpy as np
import pytest

from configs import default
from ftlab import errors, loop, run
from ftlab.data import sources
from ftlab.files import checkpoint
from ftlab.files.metric_writers import read_jsonl

# End to end: runs of the loop (the `not slow` tier skips them).
pytestmark = pytest.mark.slow

needs_fashion_mnist = pytest.mark.skipif(
  not os.path.isdir(sources.DEBIAN_FASHION_MNIST_DIR),
  reason='Fashion-MNIST IDX files absent: apt-get install dataset-fashion-mnist',
)


def small(steps=4, **fields):
  config = default.get_config('runlocal')
  config.num_train_steps = steps
  config.checkpoint_every_steps = config.eval_every_steps = config.log_every_steps = steps
  config.dataset.eval_split = 'test[:64]'
  for key, value in fields.items():
    section, _, field = key.rpartition('__')
    (config[section] if section else config)[field] = value
  return config


@needs_fashion_mnist
def test_rerun_under_another_config_stops_and_keeps_the_record(tmp_path):
  workdir = str(tmp_path)
  loop.train_and_evaluate(small(), workdir)
  config_json = (tmp_path / 'config.json').read_text()
  plan_txt = (tmp_path / 'plan.txt').read_text()
  changed = small(optimizer__learning_rate=0.5, model__width=0.125)
  with pytest.raises(errors.InputError) as e:
    loop.train_and_evaluate(changed, workdir)
  message = str(e.value)
  assert '\n' not in message
  assert 'model.width=0.125 (was 0.0625), optimizer.learning_rate=0.5 (was 0.01)' in message
  assert 'new --workdir' in message and '--allow_config_change' in message
  # Nothing was overwritten by what did not run.
  assert (tmp_path / 'config.json').read_text() == config_json
  assert (tmp_path / 'plan.txt').read_text() == plan_txt
  assert len(read_jsonl(tmp_path / 'launches.jsonl')) == 1
  # A shorter run is not a resume either.
  with pytest.raises(errors.InputError, match=r'num_train_steps=2 \(was 4\)'):
    loop.train_and_evaluate(small(steps=2), workdir)
  # A longer run and another cadence are what a resume may change: recorded, not refused.
  longer = small(steps=6)
  summary = loop.train_and_evaluate(longer, workdir)
  assert summary['steps'] == 6
  launches = read_jsonl(tmp_path / 'launches.jsonl')
  assert [r['first_step'] for r in launches] == [0, 4]
  assert launches[1]['changes']['num_train_steps'] == [4, 6]
  assert (tmp_path / 'config.json').read_text() == config_json  # the run's start, kept
  # Asked for explicitly, another config continues the run, and the record says so.
  lr = small(steps=8, optimizer__learning_rate=0.02)
  loop.train_and_evaluate(lr, workdir, allow_config_change=True)
  third = read_jsonl(tmp_path / 'launches.jsonl')[-1]
  assert third['first_step'] == 6 and third['changes']['optimizer.learning_rate'] == [0.01, 0.02]
  assert third['config']['optimizer']['learning_rate'] == 0.02
  # ... and the next launch compares against that launch's config, not the first.
  summary = loop.train_and_evaluate(small(steps=8, optimizer__learning_rate=0.02), workdir)
  assert summary['steps'] == 8


@needs_fashion_mnist
def test_data_record_names_every_split_s_classes_and_counts(tmp_path):
  config = small(dataset__classes=(5, 7), dataset__examples_per_class=6, batch_size=8)
  loop.train_and_evaluate(config, str(tmp_path))
  data = json.loads((tmp_path / 'data.json').read_text())
  assert data['train']['classes'] == ['Sandal', 'Sneaker']
  assert data['train']['class_counts'] == {'Sandal': 6, 'Sneaker': 6}
  assert (
    data['eval']['split'] == 'test[:64]'
    and sum(data['eval']['class_counts'].values()) == (data['eval']['examples'])
  )


@needs_fashion_mnist
def test_every_update_skipped_is_an_error_not_a_summary(tmp_path):
  config = small(skip_nonfinite_updates=True)
  config.init.checkpoint = str(_nonfinite_source(tmp_path))
  config.init.allow_nonfinite = True  # loaded on purpose: every step's loss is NaN
  with pytest.raises(FloatingPointError) as e:
    loop.train_and_evaluate(config, str(tmp_path / 'run'))
  message = str(e.value)
  assert message.startswith('every one of the 4 steps of this run was skipped as non-finite')
  assert f'init.checkpoint={config.init.checkpoint}' in message
  assert not (tmp_path / 'run' / 'summary.json').exists()


def _fresh_variables(config, size=32):
  """The fresh variables of `config`'s model (10 classes), as numpy arrays."""
  model = run.build_model(config.model, num_classes=10)
  variables = model.init(jax.random.key(0), np.zeros((1, size, size, 3), np.float32), train=False)
  return jax.tree.map(np.array, jax.device_get(variables))


def _nonfinite_source(tmp_path):
  """Variables of runlocal's model, saved as init weights, with one inf in block2_conv1."""
  variables = _fresh_variables(small())
  variables['params']['block2_conv1']['kernel'][0, 0, 0, 0] = np.inf
  checkpoint.save_variables(tmp_path / 'inf', variables, {})
  return tmp_path / 'inf'


@needs_fashion_mnist
def test_nonfinite_init_weights_are_refused_and_a_nan_step_1_blames_them(tmp_path):
  source = _nonfinite_source(tmp_path)
  config = small()
  config.init.checkpoint = str(source)
  with pytest.raises(errors.InputError) as e:
    loop.train_and_evaluate(config, str(tmp_path / 'run'))
  assert 'non-finite values (params) in 1 array(s): block2_conv1/kernel (1 inf)' in str(e.value)
  assert '--config.init.allow_nonfinite=True' in str(e.value)
  assert not (tmp_path / 'run').exists()
  config.init.allow_nonfinite = True
  with pytest.raises(FloatingPointError) as e:
    loop.train_and_evaluate(config, str(tmp_path / 'run'))
  assert 'at step 1, before any update was applied: the initial weights' in str(e.value)
  assert f'init.checkpoint={source}' in str(e.value)


@needs_fashion_mnist
def test_init_checkpoint_that_does_not_fit_says_why_and_how_to_fix_it(tmp_path):
  # The weights of a 64 px imagenet-head model, as a port writes them (no training needed).
  source = small(model__head='imagenet', dataset__image_size=64)
  checkpoint.save_variables(tmp_path / 'source', _fresh_variables(source, size=64), {})
  init = str(tmp_path / 'source')

  def error_for(**fields):
    config = small(**fields)
    config.init.checkpoint = init
    with pytest.raises(errors.InputError) as e:
      loop.train_and_evaluate(config, str(tmp_path / 'run'))
    assert '\n' not in str(e.value) and not (tmp_path / 'run').exists()
    return str(e.value)

  # Another class count: a fresh head is the fix.
  message = error_for(model__head='imagenet', dataset__image_size=64, dataset__classes=(1, 2, 3))
  assert "the checkpoint's head has 10 classes, this task 3: keep a fresh head with " in message
  assert """--config.init.dont_load='("predictions/.*",)'""" in message
  # Another image size under a flattening head: not dont_load (it would throw fc1 away).
  message = error_for(model__head='imagenet', dataset__image_size=32)
  assert 'fc1 was built for a 2x2x32 block-5 map (64 px images' in message
  assert '--config.dataset.image_size=64' in message
  assert '--config.model.adaptive_pool=2' in message and 'dont_load' not in message
  # Another head: the flag that builds the checkpoint's.
  message = error_for(model__head='mlp', dataset__image_size=64)
  assert 'Likely cause: the checkpoint is a vgg11_bn (width 0.0625, imagenet head)' in message
  assert '--config.model.head=imagenet' in message
  # A dont_load pattern that names nothing: the layers there are.
  config = small(model__head='imagenet', dataset__image_size=64)
  config.init.checkpoint, config.init.dont_load = init, ('head/.*',)
  with pytest.raises(errors.InputError, match=r"matching no path: 'head/.\*'.* the layers: .*fc1"):
    loop.train_and_evaluate(config, str(tmp_path / 'run2'))
