"""The frozen-prefix activation cache: exact against the uncached run, same data order,
disk and memory alike, refused when it cannot be exact.

The data is a fake Fashion-MNIST whose examples carry their index in two pixels
(tests/test_input_pipeline.py), so a test can name the examples of every batch.
"""

import functools
import itertools

import jax
import numpy as np
import pytest
from ml_collections import ConfigDict

from ftlab import activation_cache, parallel, train
from ftlab.data import datasets, input_pipeline
from ftlab.plans import optim, policies
from tests import fakes
from tests.test_input_pipeline import eval_ids, ids_of
from tests.test_train import SGD

BATCH, EVAL_BATCH, STEPS = 16, 32, 8  # 100 training examples: step 7 starts epoch 2


def tiny(batch_norm=False, head='gap', **kw):
  return fakes.tiny_vgg(batch_norm, head, num_classes=10, width=1 / 8, **kw)


def make_plan(model, policy, shapes_only=False):
  variables = fakes.shapes(model) if shapes_only else fakes.random_variables(model)
  plan = policies.make_plan(variables['params'], model.block_structure(), ConfigDict(policy))
  return variables, plan


# A shuffle buffer smaller than the split: the buffer's order matters.
ORDER = input_pipeline.BatchOrder(BATCH, seed=0, shuffle_buffer=64)


def data_for(splits, augment='none'):
  """The run's `Data` over the fake splits: 32 px, unit preprocessing."""
  train_data, eval_data = splits
  return input_pipeline.Data(
    train_data, {'eval': eval_data}, ORDER, EVAL_BATCH, 32, 'unit', augment
  )


@pytest.fixture(scope='module')
def splits(fake):
  train_data = datasets.build_dataset('fashion_mnist', 'train', **fake)
  eval_data = datasets.build_dataset('fashion_mnist', 'test[:50]', **fake)
  return train_data, eval_data


LINEAR_PROBE, LAST_BLOCK = dict(name='linear_probe'), dict(name='last_blocks', k=1)


@pytest.mark.parametrize(
  'model,policy,start',
  [
    (tiny(), LINEAR_PROBE, 'head'),
    (tiny(), LAST_BLOCK, 'block5'),
    (tiny(batch_norm=True), dict(name='bitfit'), None),  # every bias trains
    (tiny(), dict(name='blocks', blocks=[3]), 'block3'),
    (tiny(head='imagenet'), LINEAR_PROBE, 'fc'),  # fc1/fc2 are frozen but draw dropout
    (tiny(head='imagenet', dropout_rate=0.0), LINEAR_PROBE, 'head'),
    (tiny(head='mlp'), LINEAR_PROBE, 'head'),  # the mlp head's dropout is after its fc
    (tiny(), dict(name='full'), None),
    (tiny(), dict(name='first_blocks', k=1), None),
  ],
)
def test_start_block(model, policy, start):
  _, plan = make_plan(model, policy, shapes_only=True)
  assert activation_cache.start_block(model, plan) == start


def test_prefix_then_rest_is_the_whole_model():
  model = tiny(batch_norm=True, head='imagenet')
  x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  variables, _ = make_plan(model, LINEAR_PROBE)

  @jax.jit
  def both_ways(variables, x):
    whole = model.apply(variables, x, train=False)
    pieces = {}
    for name in ('block3', 'fc', 'head'):
      prefix = model.clone(stop_block=name).apply(variables, x, train=False)
      pieces[name] = model.clone(start_block=name).apply(variables, prefix, train=False)
    return whole, pieces

  whole, pieces = both_ways(variables, x)
  for name, logits in pieces.items():
    np.testing.assert_array_equal(logits, whole, err_msg=name)
  assert model.block_names() == ('block1', 'block2', 'block3', 'block4', 'block5', 'fc', 'head')
  # The smallest boundary: the head's input after block 5's global mean.
  shape = lambda m: jax.eval_shape(functools.partial(m.apply, train=False), variables, x).shape
  assert shape(tiny(stop_block='head')) == (4, 64)
  with pytest.raises(ValueError, match="start_block 'block9' is not a block"):
    shape(model.clone(start_block='block9'))


def test_refusals(fake, splits):
  model = tiny(head='imagenet')
  variables, probe = make_plan(model, LINEAR_PROBE, shapes_only=True)
  _, last = make_plan(tiny(), LAST_BLOCK, shapes_only=True)
  _, full = make_plan(model, dict(name='full'), shapes_only=True)
  with pytest.raises(ValueError, match="augmentation 'pad_crop' changes the images"):
    activation_cache.check(model, probe, 'fc', augment='pad_crop')
  with pytest.raises(ValueError, match='block fc before head draws dropout'):
    activation_cache.check(model, probe, 'head', augment='none')
  with pytest.raises(ValueError, match='trains block5_conv1/bias in the cached prefix'):
    activation_cache.check(tiny(), last, 'head', augment='none')
  with pytest.raises(ValueError, match=r'plan full\(\) leaves no frozen prefix to cache'):
    activation_cache.check_mode('memory', model, [full], augment='none')
  with pytest.raises(ValueError, match="augmentation 'flip'"):
    activation_cache.check_mode('memory', model, [full, probe], augment='flip')
  with pytest.raises(ValueError, match="activation_cache 'ram' is not one of"):
    activation_cache.check_mode('ram', model, [probe], augment='none')
  activation_cache.check_mode('memory', model, [probe, full], augment='none')  # lp_ft: stage 1
  activation_cache.check_mode('off', model, [full], augment='flip')
  with pytest.raises(ValueError, match="augmentation 'flip'"):
    activation_cache.prepare(
      'memory',
      model,
      probe,
      variables,
      parallel.Spread(),
      data_for(splits, augment='flip'),
      directory='/nonexistent',
    )


@pytest.mark.parametrize(
  'classes,start_step,process_count,shards',
  [((), 0, 1, 1), ((), 9, 1, 1), ((), 0, 2, 1), ((2, 5, 7), 3, 1, 1), ((), 5, 2, 2), ((), 2, 2, 4)],
)
def test_order_matches_train_iterator(fake, classes, start_step, process_count, shards):
  """Across epochs, from a resume step, per process, for a class subset and data shards."""
  data = datasets.build_dataset('fashion_mnist', 'train', classes=classes, **fake)
  steps = 3 * data.num_examples // BATCH  # three epochs
  # The example at each position of the split (tfds stores the examples shuffled).
  _, ids = eval_ids(data, EVAL_BATCH)
  for process_index in range(process_count):
    order = input_pipeline.BatchOrder(
      BATCH,
      seed=3,
      shuffle_buffer=32,
      process_index=process_index,
      process_count=process_count,
      shards=shards,
    )
    images = input_pipeline.train_iterator(
      data, order, image_size=28, preprocess='unit', augment='none', start_step=start_step
    )
    indices = input_pipeline.train_indices(data.num_examples, order, start_step=start_step)
    for _ in range(steps - start_step):
      expected = ids_of(next(images)['image'])
      np.testing.assert_array_equal(ids[next(indices)], expected)


def run(model, variables, plan, spread, train_batches, eval_batches):
  """STEPS steps, then an exact eval: per-step metrics, the final state, eval sums."""
  tx = optim.make(plan, ConfigDict(SGD), STEPS)
  p_train_step, p_eval_step = train.compile_steps(spread, model=model, tx=tx, plan=plan)
  state = spread.replicate(train.create_train_state(variables, tx))
  metrics = []
  for batch in itertools.islice(train_batches, STEPS):
    state, m = p_train_step(state, spread.shard(batch), jax.random.key(7))
    metrics.append(m)
  sums = [p_eval_step(state, spread.shard(b)) for b in eval_batches]
  sums = jax.tree.map(lambda *x: sum(x), *sums)
  return jax.device_get(spread.unreplicate((metrics, state, sums)))


def prepare(splits, model, plan, variables, spread, workdir, mode, **options):
  return activation_cache.prepare(
    mode,
    model,
    plan,
    variables,
    spread,
    data_for(splits),
    directory=str(workdir / 'activation_cache'),
    **options,
  )


@pytest.mark.parametrize(
  'batch_norm,head,policy,mode,parallelism',
  [
    (False, 'gap', LINEAR_PROBE, 'memory', 'pmap'),
    (True, 'imagenet', LINEAR_PROBE, 'auto', 'pmap'),  # starts at fc, with its dropout
    (False, 'gap', LAST_BLOCK, 'memory', 'shard_map'),
    (True, 'gap', LAST_BLOCK, 'disk', 'shard_map'),
  ],
)
def test_cached_run_is_exact(
  fake, splits, tmp_path, monkeypatch, batch_norm, head, policy, mode, parallelism
):
  """Same metrics, parameters, statistics and eval as the uncached run, to the rounding of the
  cached activations.

  The cache computes each example's prefix output in the eval order's batches; the uncached
  step computes it inside its shuffled training batch. Bit for bit the same where the CPU's
  kernels give a row the same bits whatever its batch neighbours (Intel with AVX-512 here);
  elsewhere (an AMD EPYC without AVX2 here) the outputs differ in their last bits, and training
  carries that on. The bound is this very run's own sensitivity: the cache moves the run no
  more than 8 times what moving every cached activation by one ulp does (measured: 0.8 to 2.7
  times; 1e-7 to 3e-5 of each leaf's scale, BatchNorm amplifying most).
  """
  model = tiny(batch_norm, head)
  variables, plan = make_plan(model, policy)
  spread = parallel.Spread(parallelism)
  prepared = prepare(splits, model, plan, variables, spread, tmp_path, mode)
  assert (tmp_path / 'activation_cache').exists() == (mode == 'disk')
  if mode == 'disk':
    check_disk_cache(splits, model, plan, variables, spread, tmp_path, monkeypatch)
  train_data, eval_data = splits
  pipeline = dict(image_size=32, preprocess='unit')
  images = input_pipeline.train_iterator(train_data, ORDER, augment='none', **pipeline)
  uncached = run(
    model,
    variables,
    plan,
    spread,
    images,
    input_pipeline.eval_iterator(eval_data, ORDER.with_batch(EVAL_BATCH), **pipeline),
  )
  cached = run(
    prepared.model,
    variables,
    plan,
    spread,
    prepared.train_batches(0),
    prepared.eval_batches['eval'](),
  )
  nudged = run(
    prepared.model,
    variables,
    plan,
    spread,
    one_ulp_up(prepared.train_batches(0)),
    one_ulp_up(prepared.eval_batches['eval']()),
  )
  assert jax.tree.structure(uncached) == jax.tree.structure(cached)
  sensitivity = divergence(cached, nudged)
  assert sensitivity > 0  # the nudge reaches the run
  assert divergence(uncached, cached) <= 8 * sensitivity, (
    divergence(uncached, cached),
    sensitivity,
  )
  assert uncached[2]['count'] == cached[2]['count'] == 50


def one_ulp_up(batches):
  """The batches with every cached activation moved by one ulp (toward +inf)."""
  for batch in batches:
    image = np.asarray(batch['image'])
    yield {**batch, 'image': np.nextafter(image, np.inf).astype(image.dtype)}


def divergence(a, b) -> float:
  """The largest difference of two runs' leaves, each relative to the leaf's scale."""
  worst = 0.0
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    scale = np.abs(x).max()
    if scale > 0:
      worst = max(worst, float(np.abs(x - y).max() / scale))
  return worst


def check_disk_cache(splits, model, plan, variables, spread, workdir, monkeypatch):
  """The disk cache holds what the memory cache holds, and a second run (a resume) reads it;
  'auto' over its memory limit is on disk too."""
  files = sorted(p.name for p in (workdir / 'activation_cache').iterdir())
  assert len(files) == 6 and all(f.endswith(('.bin', '.json', '.labels.npy')) for f in files)
  caches = lambda mode, **kw: prepare(splits, model, plan, variables, spread, workdir, mode, **kw)

  def batches(prepared):
    train_batches = list(itertools.islice(prepared.train_batches(5), 10))
    return train_batches + list(prepared.eval_batches['eval']())

  memory = batches(caches('memory'))
  with monkeypatch.context() as m:
    m.setattr(activation_cache, 'compute', None)
    reused = batches(caches('auto', memory_limit_mb=0.0))
  for a, b in zip(memory, reused):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
