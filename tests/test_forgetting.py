"""Forgetting: the loaded head's agreement with the loaded model, against a direct computation."""

import jax
import numpy as np
import pytest

from configs import default
from ftlab import errors, loop, paths, run
from ftlab.data import datasets, input_pipeline
from ftlab.evals import forgetting
from ftlab.files import checkpoint
from ftlab.files.metric_writers import read_jsonl
from tests.run_files import params_of

SOURCE_CLASSES = 7  # the loaded weights' own head ("ImageNet"), not the task's 10


def source_checkpoint(directory, config):
  """Random weights for the run's VGG with a 7-class head of their own, saved as a port."""
  model = run.build_model(config.model, num_classes=SOURCE_CLASSES)
  size = config.dataset.image_size
  variables = model.init(jax.random.key(3), np.zeros((1, size, size, 3)), train=False)
  checkpoint.save_variables(directory, jax.device_get(variables), {'source': 'test'})
  return jax.device_get(variables)


def config_for(tmp_path, policy):
  config = default.get_config('runlocal')
  config.policy.name = policy
  config.evals.forgetting.split = 'test[:200]'
  source = source_checkpoint(str(tmp_path / 'source'), config)
  config.init.checkpoint = str(tmp_path / 'source')
  config.init.dont_load = ('predictions/.*',)
  return config, source


def source_top1(config, params, stats, split):
  """The source head on `params`' backbone, computed directly, one device."""
  model = run.build_model(config.model, num_classes=SOURCE_CLASSES)
  order = input_pipeline.BatchOrder(50)
  batches = input_pipeline.eval_iterator(
    split, order, image_size=config.dataset.image_size, preprocess=config.dataset.preprocess
  )
  variables = {'params': params, 'batch_stats': stats}
  found = [
    np.argmax(model.apply(variables, b['image'], train=False), -1)[b['mask'] > 0] for b in batches
  ]
  return np.concatenate(found)


@pytest.mark.slow
@pytest.mark.parametrize('policy, unchanged', [('linear_probe', True), ('full', False)])
def test_agreement_is_the_source_heads_top1_against_the_loaded_model(
  tmp_path, fashion_mnist_prepared, policy, unchanged
):
  config, source = config_for(tmp_path, policy)
  summary = loop.train_and_evaluate(config, str(tmp_path / 'run'))
  rows = [r for r in read_jsonl(tmp_path / 'run' / 'metrics.jsonl') if 'forgetting/agreement' in r]
  assert [r['step'] for r in rows] == [10, 20]
  assert summary['final_source_agreement'] == rows[-1]['forgetting/agreement']
  split = datasets.build_dataset('fashion_mnist', 'test[:200]')
  final = paths.unflatten(params_of(tmp_path / 'run'))
  final['predictions'] = source['params']['predictions']
  stats = checkpoint.load_params(
    tmp_path / 'run' / 'checkpoints', source['batch_stats'], key='batch_stats'
  )
  loaded = source_top1(config, source['params'], source['batch_stats'], split)
  now = source_top1(config, final, stats, split)
  assert summary['final_source_agreement'] == pytest.approx(np.mean(now == loaded), abs=1e-9)
  if unchanged:  # a linear probe leaves the backbone, so the source function, as loaded
    assert summary['final_source_agreement'] == 1.0
  else:
    assert summary['final_source_agreement'] < 1.0


def test_forgetting_needs_loaded_weights_with_a_head(tmp_path, fashion_mnist_prepared):
  config = default.get_config('runlocal')
  config.evals.forgetting.split = 'test[:200]'
  with pytest.raises(errors.InputError, match=r'evals.forgetting: needs loaded weights'):
    loop.train_and_evaluate(config, str(tmp_path / 'run'))
  config, _ = config_for(tmp_path, 'full')
  config.model.head = 'mlp'
  with pytest.raises(forgetting.ForgettingError, match=r'the loaded head reads \d+ features'):
    forgetting.load_source_head(
      config.init.checkpoint,
      {'predictions': {'kernel': np.zeros((999, 10))}},
    )
  assert not (tmp_path / 'run').exists()
