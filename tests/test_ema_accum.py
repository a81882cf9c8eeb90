"""Gradient accumulation and the EMA of the weights, against one big step and numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from configs import default
from ftlab import ema, errors, loop, parallel, paths, train
from ftlab.files import checkpoint
from ftlab.files.metric_writers import read_jsonl
from ftlab.plans import optim, policies
from tests import fakes
from tests.run_files import params_of

SGD = dict(name='sgd', learning_rate=0.1, momentum=0.9, schedule='constant', weight_decay=1e-3)


def setup(model, policy, opt=SGD, as_dtype=None):
  variables = fakes.random_variables(model)
  if as_dtype is not None:
    variables = jax.tree.map(lambda x: np.asarray(x, as_dtype), variables)
  plan = policies.make_plan(variables['params'], model.block_structure(), ConfigDict(policy))
  return variables, plan, optim.make(plan, ConfigDict(opt), 10)


def run(model, variables, plan, tx, data, *, num_devices=8, **options):
  spread = parallel.Spread('pmap', tuple(jax.devices()[:num_devices]))
  p_train_step, _ = train.compile_steps(spread, model=model, tx=tx, plan=plan, **options)
  kept = ema.entries(plan) if options.get('ema_decay') else None
  state = spread.replicate(train.create_train_state(variables, tx, kept))
  states = []
  for batch in data:
    state, _ = p_train_step(state, spread.shard(batch), jax.random.key(0))
    states.append(jax.device_get(spread.unreplicate(state)))
  return states


@pytest.mark.parametrize('policy', [dict(name='full'), dict(name='last_blocks', k=2)])
def test_accumulated_micro_steps_on_8_devices_equal_one_step_on_1(policy):
  """No BatchNorm: 4 micro-batches per device on 8 devices, one update on their mean
  gradient, equal the same global batch in one step on one device: the change of every leaf
  after one step agrees to 1e-5 of its size (float rounding: 3e-7 on an Intel Xeon, 1.7e-6 on
  an AMD EPYC). Over more float32 steps the two drift apart by rounding amplified by the ReLU
  network (2e-3 of the change after 3 steps on the AMD EPYC): the float64 test below shows
  there is no other difference."""
  model = fakes.tiny_vgg(head='gap')
  variables, plan, tx = setup(model, policy)
  data = fakes.image_batches(1, batch_size=64)
  accumulated = paths.flatten(run(model, variables, plan, tx, data, accum_steps=4)[-1].params)
  whole = paths.flatten(run(model, variables, plan, tx, data, num_devices=1)[-1].params)
  assert_same_change(plan, variables, accumulated, whole, 1e-5)


def assert_same_change(plan, variables, accumulated, whole, tolerance):
  start = paths.flatten(variables['params'])
  for path, trained in plan.flat_mask().items():
    change = whole[path] - start[path]
    if not trained:
      assert np.array_equal(accumulated[path], start[path]) and not change.any()
      continue
    error = np.abs(accumulated[path] - whole[path]).max()
    assert error <= tolerance * np.abs(change).max(), (path, error, np.abs(change).max())


@pytest.mark.slow
def test_accumulation_drift_is_float_rounding():
  """In float64 the accumulated run and the one-step run agree to 1e-12 of every leaf's change
  after 3 steps: the float32 drift over several steps is rounding, amplified, not a difference
  in what is computed."""
  with jax.enable_x64(True):
    model = fakes.tiny_vgg(head='gap').clone(dtype=jnp.float64)
    variables, plan, tx = setup(model, dict(name='full'), as_dtype=np.float64)
    data = [
      {k: v.astype(np.float64) if v.dtype == np.float32 else v for k, v in b.items()}
      for b in fakes.image_batches(3, batch_size=64)
    ]
    accumulated = run(model, variables, plan, tx, data, accum_steps=4)[-1].params
    whole = run(model, variables, plan, tx, data, num_devices=1)[-1].params
    assert paths.flatten(whole)['block1_conv1/kernel'].dtype == np.float64
    assert_same_change(plan, variables, paths.flatten(accumulated), paths.flatten(whole), 1e-12)


@pytest.mark.slow  # 15 s of compiles: the fast tier's budget went to the packaged datasets
def test_batch_norm_under_accumulation_is_per_micro_batch():
  """With BatchNorm each micro-batch is normalised by its own statistics and the running
  statistics take one update per micro-batch: the step equals the mean of the micro-batches'
  gradients taken in turn (numbers from the un-jitted model), not the whole batch's."""
  model = fakes.tiny_vgg(batch_norm=True, head='gap')
  variables, plan, tx = setup(model, dict(name='full'), dict(SGD, momentum=0.0, weight_decay=0.0))
  batch = fakes.image_batches(1, batch_size=16)[0]
  state = run(model, variables, plan, tx, [batch], num_devices=1, accum_steps=2)[-1]
  bound = train.bind_model(model, plan, axis_name=None)

  def loss(params, stats, micro):
    logits, new = bound.apply(
      {'params': params, 'batch_stats': stats}, micro['image'], train=True, mutable=['batch_stats']
    )
    return train.cross_entropy(logits, micro['label']).mean(), new['batch_stats']

  stats, grads = variables['batch_stats'], []
  for half in (slice(0, 8), slice(8, 16)):
    micro = {k: v[half] for k, v in batch.items()}
    g, stats = jax.grad(loss, has_aux=True)(variables['params'], stats, micro)
    grads.append(g)
  mean = jax.tree.map(lambda a, b: (a + b) / 2, *grads)
  expected = jax.tree.map(lambda w, g: w - 0.1 * g, variables['params'], mean)
  for path, x in paths.flatten(expected).items():
    np.testing.assert_allclose(paths.flatten(state.params)[path], x, rtol=1e-5, atol=1e-6)
  for path, x in paths.flatten(stats).items():
    np.testing.assert_allclose(paths.flatten(state.batch_stats)[path], x, rtol=1e-5, atol=1e-6)
  whole = run(model, variables, plan, tx, [batch], num_devices=1)[-1]
  means = 'block1_conv1_bn/mean'
  assert not np.allclose(paths.flatten(whole.batch_stats)[means], paths.flatten(stats)[means])


def test_ema_keeps_changing_entries_only_and_follows_the_recurrence():
  """A sparse plan: the EMA stores each trained leaf whole and only the trained entries of
  a per-element leaf, none of a frozen leaf, and after each step equals numpy's
  ema = d * ema + (1 - d) * w on them; the averaged parameters keep the rest."""
  model = fakes.tiny_vgg(head='gap')
  policy = dict(name='random_sparse(0.2) | last_blocks(1)')
  variables, plan, tx = setup(model, policy, dict(SGD, name='adamw', learning_rate=1e-2))
  entries = ema.entries(plan)
  assert set(entries) == {p for p, t in plan.flat_mask().items() if t}
  sparse = [p for p, i in entries.items() if i is not None]
  assert sparse and all(len(entries[p]) == (plan.element_levels[p] != 0).sum() for p in sparse)
  states = run(model, variables, plan, tx, fakes.image_batches(4), ema_decay=0.9)
  expected = {
    p: ema.kept(np.asarray(x), entries.get(p))
    for p, x in paths.flatten(variables['params']).items()
    if p in entries
  }
  for state in states:
    params = paths.flatten(state.params)
    expected = {p: 0.9 * e + 0.1 * ema.kept(params[p], entries[p]) for p, e in expected.items()}
    got = paths.flatten(state.ema)
    assert got.keys() == expected.keys()
    for p in expected:
      np.testing.assert_allclose(got[p], expected[p], rtol=1e-6, atol=1e-7, err_msg=p)
  averaged = paths.flatten(ema.params_with_ema(state.params, state.ema, entries))
  for p, x in paths.flatten(state.params).items():
    if p not in entries:
      assert np.array_equal(averaged[p], x)
    elif entries[p] is not None:
      untouched = np.setdiff1d(np.arange(x.size), entries[p])
      assert np.array_equal(averaged[p].ravel()[untouched], x.ravel()[untouched])


def runlocal(steps, **overrides):
  config = default.get_config('runlocal')
  config.num_train_steps, config.ema_decay, config.accum_steps = steps, 0.8, 2
  config.update(overrides)
  return config


@pytest.mark.slow
def test_ema_is_evaluated_saved_and_resumed_bit_identical(tmp_path, fashion_mnist_prepared):
  whole = loop.train_and_evaluate(runlocal(20), str(tmp_path / 'whole'))
  params = paths.unflatten(params_of(tmp_path / 'whole'))
  loop.train_and_evaluate(runlocal(10), str(tmp_path / 'resumed'))
  resumed = loop.train_and_evaluate(runlocal(20), str(tmp_path / 'resumed'))
  assert resumed['final_ema_eval_accuracy'] == whole['final_ema_eval_accuracy']
  assert resumed['final_eval_accuracy'] == whole['final_eval_accuracy']
  rows = [r for r in read_jsonl(tmp_path / 'whole' / 'metrics.jsonl') if 'eval/ema_accuracy' in r]
  assert [r['step'] for r in rows] == [10, 20]
  # The checkpointed EMA (every parameter: the plan is full) and parameters, bit for bit.
  for key in ('ema', 'params'):
    a, b = (
      paths.flatten(checkpoint.load_params(tmp_path / r / 'checkpoints', params, key=key))
      for r in ('whole', 'resumed')
    )
    for path in a:
      np.testing.assert_array_equal(a[path], b[path], err_msg=f'{key} {path}')


@pytest.mark.parametrize(
  'override, message',
  [
    (dict(accum_steps=3), r'accum_steps=3 must divide the 4 examples each of the 8 devices'),
    (dict(ema_decay=1.0), r'ema_decay=1.0 is not in \[0, 1\)'),
  ],
)
def test_bad_step_options_are_one_line(tmp_path, override, message):
  with pytest.raises(errors.InputError, match=message):
    loop.train_and_evaluate(runlocal(20, **override), str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


def test_ema_with_a_dynamic_mask_is_refused(tmp_path):
  config = runlocal(20, ema_decay=0.9)
  config.policy.name = 'reselect(magnitude(0.1), every=5)'
  with pytest.raises(errors.InputError, match=r'ema_decay with a dynamic mask \(reselect'):
    loop.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()
