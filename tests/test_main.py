"""The run loop end to end: configs, CLI, run files, resume, init-from, early stopping."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import default, demo, transfer
from ftlab import errors, loop, paths, run
from ftlab.data import sources
from ftlab.files import checkpoint
from ftlab.files.metric_writers import read_jsonl

# End to end: runs of the loop (the `not slow` tier skips them).
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_fashion_mnist = pytest.mark.skipif(
  not os.path.isdir(sources.DEBIAN_FASHION_MNIST_DIR),
  reason='Fashion-MNIST IDX files absent: apt-get install dataset-fashion-mnist',
)


def final_params(workdir, config):
  """The parameters of the newest checkpoint in `workdir`, as numpy."""
  model = run.build_model(config.model, num_classes=len(config.dataset.classes) or 10)
  size = config.dataset.image_size
  fresh = jax.eval_shape(
    lambda: model.init(jax.random.key(0), np.zeros((1, size, size, 3)), train=False)
  )
  fresh = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), fresh['params'])
  return checkpoint.load_params(os.path.join(workdir, 'checkpoints'), fresh)


def cli(workdir, config, *overrides):
  return [
    sys.executable,
    '-m',
    'ftlab.main',
    f'--config={config}',
    f'--workdir={workdir}',
    *overrides,
  ]


@needs_fashion_mnist
def test_default_runlocal_writes_every_run_file(tmp_path):
  config = default.get_config('runlocal')
  summary = loop.train_and_evaluate(config, str(tmp_path))
  assert summary['steps'] == 20 and summary['plan'] == 'full()'
  assert summary['eval_examples'] == 1000  # test[:10%], every example once
  assert json.load(open(tmp_path / 'summary.json')) == summary
  assert json.load(open(tmp_path / 'config.json'))['policy']['name'] == 'full'
  assert (tmp_path / 'plan.txt').read_text().startswith('plan: full()\npath')
  records = read_jsonl(tmp_path / 'metrics.jsonl')
  train_keys = {
    'step',
    'train/loss',
    'train/accuracy',
    'train/grad_norm',
    'train/lr',
    'train/examples_per_sec',
  }
  assert [r['step'] for r in records if 'train/loss' in r] == [5, 10, 15, 20]
  assert all(set(r) == train_keys for r in records if 'train/loss' in r)
  evals = [r for r in records if 'eval/accuracy' in r]
  assert [r['step'] for r in evals] == [10, 20]
  assert evals[-1]['eval/accuracy'] == summary['final_eval_accuracy']
  # The smoke run learns visibly in its 20 steps: chance is 0.10 (measured: 0.40).
  assert summary['final_eval_accuracy'] >= 0.3
  assert os.listdir(tmp_path / 'tensorboard')
  assert checkpoint.all_steps(tmp_path / 'checkpoints') == [10, 20]


@needs_fashion_mnist
def test_transfer_runlocal_and_demo_stages_chain(tmp_path):
  summary = loop.train_and_evaluate(
    transfer.get_config('runlocal,policy=bitfit'), str(tmp_path / 'transfer')
  )
  assert summary['plan'] == 'bitfit()' and summary['steps'] == 20
  source_dir = str(tmp_path / 'source')
  loop.train_and_evaluate(demo.get_config('stage=pretrain,runlocal'), source_dir)
  probe_config = demo.get_config(f'stage=finetune,policy=linear_probe,source={source_dir},runlocal')
  probe_dir = str(tmp_path / 'probe')
  summary = loop.train_and_evaluate(probe_config, probe_dir)
  assert summary['plan'] == 'linear_probe()'
  # The backbone came from the source run and stayed frozen; the new head trained.
  source = paths.flatten(final_params(source_dir, demo.get_config('stage=pretrain,runlocal')))
  probe = paths.flatten(final_params(probe_dir, probe_config))
  for path in source:
    head = path.startswith(('fc/', 'predictions/'))
    assert np.array_equal(source[path], probe[path]) != head, path


def test_absent_dataset_fails_before_any_run_file_with_exit_code_2(tmp_path):
  result = subprocess.run(
    cli(
      tmp_path / 'run',
      'configs/default.py:runlocal',
      '--config.dataset.name=cifar10',
      f'--config.dataset.data_dir={tmp_path / "tfds"}',
    ),
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 2
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: dataset 'cifar10' is not prepared in ") and 'download' in last
  assert result.stderr.count(last.removeprefix('error: ')) == 1  # said once, not logged too
  assert not (tmp_path / 'run').exists()  # nothing half-written


@needs_fashion_mnist
def test_exact_eval_counts_1001_examples_on_8_devices(tmp_path):
  config = default.get_config('runlocal')
  config.dataset.eval_split = 'test[:1001]'
  config.eval_batch_size = 64
  config.num_train_steps = 2
  summary = loop.train_and_evaluate(config, str(tmp_path))
  assert jax.device_count() == 8 and summary['eval_examples'] == 1001


@needs_fashion_mnist
def test_plan_change_keeps_params_and_rebuilds_optimizer(tmp_path):
  config = default.get_config('runlocal')
  config.policy.name = 'linear_probe'
  config.num_train_steps = 10
  loop.train_and_evaluate(config, str(tmp_path))
  after_probe = paths.flatten(final_params(tmp_path, config))
  config.policy.name = 'last_blocks'
  config.num_train_steps = 20
  # Another plan in the same workdir is another experiment: asked for explicitly.
  summary = loop.train_and_evaluate(config, str(tmp_path), allow_config_change=True)
  assert summary['plan'] == 'last_blocks(k=1)' and summary['steps'] == 20
  after = paths.flatten(final_params(tmp_path, config))
  assert np.array_equal(after['block4_conv1/kernel'], after_probe['block4_conv1/kernel'])
  assert not np.array_equal(after['block5_conv1/kernel'], after_probe['block5_conv1/kernel'])
  assert checkpoint.restore_meta(tmp_path / 'checkpoints')['plan'] == 'last_blocks(k=1)'


@needs_fashion_mnist
def test_init_checkpoint_of_another_shape_is_a_config_error(tmp_path):
  source = default.get_config('runlocal')
  source.num_train_steps = 1
  loop.train_and_evaluate(source, str(tmp_path / 'source'))
  config = default.get_config('runlocal')
  config.model.width = 1 / 8
  config.init.checkpoint = str(tmp_path / 'source' / 'checkpoints')
  with pytest.raises(
    errors.InputError,
    match=r'shape mismatch \(\d+\): .*block1_conv1/kernel '
    r'expected \(3, 3, 3, 8\) found \(3, 3, 3, 4\).* Likely cause: .*--config.model.width=0.0625',
  ):
    loop.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


@needs_fashion_mnist
def test_early_stopping_after_patience(tmp_path):
  config = default.get_config('runlocal')
  config.optimizer.learning_rate = 0.0  # eval accuracy never improves
  config.eval_every_steps = 2
  config.early_stopping_patience = 2
  summary = loop.train_and_evaluate(config, str(tmp_path))
  assert summary['stopped_early'] and summary['steps'] == 6
  assert summary['best_eval_step'] == 2
  assert checkpoint.latest_step(tmp_path / 'checkpoints') == 6


def test_bad_config_arguments_name_the_value():
  with pytest.raises(ValueError, match=r"unknown config argument 'polcy'; valid: .*policy"):
    transfer.get_config('polcy=bitfit')
  with pytest.raises(ValueError, match=r"demo policy 'lora' is not one of"):
    demo.get_config('stage=finetune,policy=lora')
