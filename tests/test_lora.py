"""LoRA as a policy: the fold against the two-convolution computation, its init, counts,
composition and errors. Step-0 logits and exact freezing under SGD and AdamW are tested for
every tuner, LoRA included, in tests/test_tuners.py."""

import jax
import numpy as np
import pytest
from jax import lax
from ml_collections import ConfigDict

from ftlab import init_from, paths, train
from ftlab.files import checkpoint
from ftlab.models import vgg
from ftlab.plans import policies, registry, tuners
from ftlab.plans.methods import lora
from ftlab.plans.syntax import PlanError
from tests import fakes

MODEL = vgg.VGG(depth=11, num_classes=5, head='gap', width=1 / 8, batch_norm=True)
STRUCTURE = MODEL.block_structure()
VARIABLES = fakes.random_variables(MODEL)
OPTIMIZERS = {
  'sgd': dict(name='sgd', momentum=0.9, weight_decay=1e-3, learning_rate=0.05),
  'adamw': dict(name='adamw', weight_decay=1e-2, learning_rate=1e-2),
}


def lora_call(rank, alpha):
  return registry.Call('lora', (('rank', rank), ('alpha', alpha)))


def conv(x, kernel):
  return lax.conv_general_dilated(
    x, kernel, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')
  )


def lora_run(name, params=VARIABLES['params'], seed=0, steps=None):
  """The stages, plans and adapted parameters `run.check_plans` and `run.make_run` make."""
  cfg = ConfigDict(dict(name=name))
  stages = policies.plan_stages(STRUCTURE, cfg, steps)
  shapes = tuners.plan_shapes(jax.eval_shape(lambda: params), STRUCTURE, stages)
  shaped = [policies.make_plan(shapes, STRUCTURE, cfg, stage=s) for s in stages]
  layers, tuner, call = tuners.adapted(stages, shaped)
  adapted = tuners.attach(params, layers, tuner, call, rng=jax.random.key(seed))
  plans = [policies.make_plan(adapted, STRUCTURE, cfg, stage=s) for s in stages]
  return stages, plans, adapted


def logits(params, x, batch_stats=VARIABLES['batch_stats']):
  return MODEL.apply(train.model_variables(params, batch_stats), x, train=False)


def test_conv_fold_equals_kxk_down_then_1x1_up():
  rng = np.random.RandomState(0)
  x = rng.normal(size=(2, 9, 9, 6)).astype(np.float32)
  w = rng.normal(size=(3, 3, 6, 10)).astype(np.float32) * 0.2
  a = rng.normal(size=(3, 3, 6, 4)).astype(np.float32) * 0.2
  b = rng.normal(size=(4, 10)).astype(np.float32) * 0.2
  params = {'c': {'kernel': w, 'bias': np.zeros(10, np.float32), 'lora_a': a, 'lora_b': b}}
  params['c']['lora_alpha'] = np.float32(6.0)
  folded = tuners.fold(params)
  assert set(folded['c']) == {'kernel', 'bias'}
  # peft's Conv2d LoRA: a k x k conv down to r channels, then a 1 x 1 conv up, times alpha/r.
  two_convs = conv(x, w) + 6.0 / 4 * conv(conv(x, a), b[None, None])
  np.testing.assert_allclose(conv(x, folded['c']['kernel']), two_convs, atol=1e-5, rtol=0)


def test_dense_fold_equals_numpy():
  rng = np.random.RandomState(1)
  x, w = rng.normal(size=(5, 12)), rng.normal(size=(12, 7))
  a, b = rng.normal(size=(12, 3)), rng.normal(size=(3, 7))
  params = {'d': {'kernel': w, 'lora_a': a, 'lora_b': b, 'lora_alpha': np.float32(8.0)}}
  params = jax.tree.map(lambda v: np.asarray(v, np.float32), params)
  expected = x @ w + 8.0 / 3 * (x @ a) @ b
  got = x @ np.asarray(tuners.fold(params)['d']['kernel'], np.float64)
  np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-5)


def test_adapter_init_is_pefts_kaiming_uniform_from_the_seed():
  _, _, one = lora_run('lora(4)', seed=0)
  _, _, again = lora_run('lora(4)', seed=0)
  _, _, other = lora_run('lora(4)', seed=1)
  a, b, c = (paths.flatten(t)['block3_conv1/lora_a'] for t in (one, again, other))
  assert np.array_equal(a, b) and not np.array_equal(a, c)
  bound = 1 / np.sqrt(3 * 3 * 16)  # fan_in = k * k * Cin (block3_conv1: 16 -> 32 at width 1/8)
  assert a.shape == (3, 3, 16, 4) and np.abs(a).max() <= bound and np.abs(a).max() > 0.9 * bound
  assert not paths.flatten(one)['block3_conv1/lora_b'].any()


def test_audit_counts_adapters_against_the_plain_model():
  _, (plan,), adapted = lora_run('lora(4) & blocks([4, 5])')
  flat = paths.flatten(VARIABLES['params'])
  expected = 0
  for layer in ('block4_conv1', 'block4_conv2', 'block5_conv1', 'block5_conv2'):
    k, _, cin, cout = flat[f'{layer}/kernel'].shape
    expected += 4 * (k * k * cin + cout)  # rank (k k Cin + Cout)
  head = flat['predictions/kernel'].size + flat['predictions/bias'].size
  n, total = policies.trainable_count(plan, adapted)
  assert n == expected + head
  assert total == sum(x.size for x in flat.values())  # the plain model's count
  table = policies.audit_table(plan, adapted)
  assert f'LoRA (rank 4, alpha 8): {expected:,} adapter parameters on 4 frozen kernels' in table
  assert 'block4_conv1/kernel' in table and 'block3_conv1/lora_a' not in table
  # A dense adapter: rank (in + out).
  dense = {'fc': {'kernel': np.zeros((12, 7), np.float32)}}
  assert tuners.counts(
    tuners.attach(dense, ['fc'], lora.LoRA(), lora_call(3, 8.0), rng=jax.random.key(0))
  ) == {'fc': 3 * (12 + 7)}


def trained(plan):
  return sorted(p for p, t in plan.flat_mask().items() if t)


def test_composition():
  _, (plan,), params = lora_run('lora(2) & blocks([4, 5])')
  assert set(tuners.counts(params)) == {
    'block4_conv1',
    'block4_conv2',
    'block5_conv1',
    'block5_conv2',
  }
  assert trained(plan) == sorted(
    [f'block{b}_conv{i}/lora_{x}' for b in (4, 5) for i in (1, 2) for x in 'ab']
    + ['predictions/bias', 'predictions/kernel']
  )
  assert (
    'block4_conv1_bn' in plan.frozen_layers
  )  # BatchNorm of adapted layers on running statistics
  _, (plan,), params = lora_run('lora(2) | bitfit')
  assert len(tuners.counts(params)) == 8  # every conv kernel of VGG11
  assert {p for p in trained(plan) if not p.endswith(('lora_a', 'lora_b'))} == {
    p for p in paths.flatten(params) if p.endswith('/bias')
  } | {'predictions/kernel'}
  _, (plan,), params = lora_run('lora(2, train_head=False) & last_blocks(1)')
  assert trained(plan) == [f'block5_conv{i}/lora_{x}' for i in (1, 2) for x in 'ab']
  stages, (probe, tune), params = lora_run(
    'lp_ft(probe_steps=3) + (lora(2) & blocks([5]))', steps=6
  )
  assert [s.start for s in stages] == [0, 3]
  assert trained(probe) == ['predictions/bias', 'predictions/kernel']
  assert trained(tune) == [
    'block5_conv1/lora_a',
    'block5_conv1/lora_b',
    'block5_conv2/lora_a',
    'block5_conv2/lora_b',
    'predictions/bias',
    'predictions/kernel',
  ]
  assert 'lora(rank=2)' in tune.name and str(stages[0].expression)
  # Without a lora term nothing changes: no adapters, the same plan.
  assert (
    tuners.plan_shapes(
      VARIABLES['params'], STRUCTURE, policies.plan_stages(STRUCTURE, ConfigDict(dict(name='full')))
    )
    is VARIABLES['params']
  )


@pytest.mark.parametrize(
  'expression, message',
  [
    ('lora(0)', r'policy lora: rank=0 is not a positive integer'),
    ('lora(4, alpha=-1)', r'alpha=-1 is not a positive number'),
    ('lora', r'rank=None'),
    (
      'lora(4) & random_sparse(0.1)',
      r'cannot be combined with the per-element mask random_sparse; combine it with blocks',
    ),
    ('lora(4) | full', r'trains block1_conv1/kernel and its LoRA adapter'),
    ('lora(4) | last_blocks(1)', r'trains block5_conv1/kernel and its LoRA adapter'),
    ('lora(4) & blocks([4]) | lora(8) & blocks([5])', r'one lora\(...\) term per plan'),
    ('gradual_unfreezing(2) + lora(4)', r'only lp_ft takes one'),
    ('lp_ft(2) + bitfit', r'it must train .*lora\(\.\.\.\)'),
    (
      "regex(trainable=['.*/lora_alpha', 'predictions/.*'], "
      "frozen=['(?!predictions/)(?!.*/lora_alpha).*']) | lora(2)",
      r'lora_alpha, LoRA.s constant scale',
    ),
  ],
)
def test_bad_lora_plans_are_one_line_errors(expression, message):
  with pytest.raises(PlanError, match=message) as info:
    lora_run(expression, steps=10)
  assert '\n' not in str(info.value)


def test_load_params_reads_a_lora_checkpoint_as_plain_parameters(tmp_path):
  _, _, adapted = lora_run('lora(3) & blocks([5])')
  flat = paths.flatten(adapted)
  flat['block5_conv1/lora_b'] = np.full(flat['block5_conv1/lora_b'].shape, 0.01, np.float32)
  adapted = paths.unflatten(flat)
  checkpoint.save_variables(str(tmp_path / 'ckpt'), {**VARIABLES, 'params': adapted}, {})
  shapes = jax.eval_shape(lambda: VARIABLES)
  loaded = {k: init_from.load_params(str(tmp_path / 'ckpt'), shapes[k], key=k) for k in shapes}
  merged = paths.flatten(tuners.merge(adapted))
  for p, x in paths.flatten(loaded['params']).items():
    np.testing.assert_array_equal(x, merged[p], err_msg=p)
  assert not np.array_equal(
    merged['block5_conv1/kernel'], paths.flatten(VARIABLES['params'])['block5_conv1/kernel']
  )
  # A plain checkpoint loads as checkpoint.load_params does.
  checkpoint.save_variables(str(tmp_path / 'plain'), VARIABLES, {})
  again = init_from.load_params(str(tmp_path / 'plain'), shapes['params'])
  assert all(
    np.array_equal(x, paths.flatten(VARIABLES['params'])[p])
    for p, x in paths.flatten(again).items()
  )
