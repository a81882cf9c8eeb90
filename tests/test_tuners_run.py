"""The tuners beside LoRA end to end: a runlocal run of each (a few steps), what it trains and
counts, and the plain parameters export reads from its checkpoint (the adapted model's logits)."""

import os

import numpy as np
import pytest

from configs import default
from ftlab import loop, paths
from ftlab.files import checkpoint
from ftlab.plans import tuners
from scripts import export_weights
from tests.run_files import plain_vgg11

pytestmark = pytest.mark.slow  # runs of the loop

PLANS = {
  'dora(2) & blocks([4, 5])': ('dora_a', 'dora_b', 'dora_dm'),
  'oft(4) & blocks([5])': ('oft_q',),
  'ssf | bitfit': ('ssf_scale', 'ssf_shift'),
  'lokr(2) & blocks([4, 5])': ('lokr_w1', 'lokr_u', 'lokr_v'),
}


@pytest.mark.parametrize('plan', list(PLANS))
def test_run_trains_adapters_counts_them_and_exports_plain_parameters(plan, tmp_path):
  config = plain_vgg11(default.get_config('runlocal'))
  config.policy.name = plan
  config.num_train_steps = 4
  config.checkpoint_every_steps = 1
  config.keep_checkpoints = 10
  config.eval_every_steps = config.log_every_steps = 4
  workdir = str(tmp_path)
  summary = loop.train_and_evaluate(config, workdir)
  ckpt = os.path.join(workdir, 'checkpoints')
  first = paths.flatten(checkpoint.load_tree(ckpt, 1)['params'])
  last = paths.flatten(checkpoint.load_tree(ckpt)['params'])
  moved = {p for p in last if first[p].tobytes() != last[p].tobytes()}
  # Only adapters, the head (and the biases under `| bitfit`) move; every kernel stays put.
  assert {paths.leaf_of(p) for p in moved if tuners.is_adapter(p)} == set(PLANS[plan])
  head = ('fc', 'predictions')  # plain_vgg11's classifier layers (fc1, fc2, predictions)
  assert not any(p.endswith('/kernel') for p in moved if not p.startswith(head))
  counted = sum(tuners.counts(paths.unflatten(last)).values())
  trained = [p for p in last if p in moved and not tuners.is_adapter(p)]
  if 'bitfit' not in plan:
    assert summary['trainable_parameters'] == counted + sum(last[p].size for p in trained)
  assert summary['frozen_unchanged'] and np.isfinite(summary['final_eval_loss'])
  model, variables, size, _ = export_weights.load_run(workdir)
  assert not any(tuners.is_adapter(p) for p in paths.flatten(variables['params']))
  x = np.random.RandomState(0).uniform(size=(4, size, size, 3)).astype(np.float32)
  stats = {'batch_stats': variables['batch_stats']} if variables.get('batch_stats') else {}
  folded = model.apply({'params': tuners.fold(paths.unflatten(last))} | stats, x, train=False)
  plain = np.asarray(model.apply(variables, x, train=False))
  np.testing.assert_allclose(plain, folded, atol=1e-5 * np.abs(plain).max(), rtol=0)
