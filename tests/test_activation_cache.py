"""The frozen-prefix activation cache: exact against the uncached run, same data order,
disk and memory alike, refused when it cannot be exact.

The data is a fake Fashion-MNIST whose examples carry their index in two pixels
(tests/test_input_pipeline.py), so a test can name the examples of every batch.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from configs import default
from ftlab import activation_cache, input_pipeline, optim, parallel, policies, train
from ftlab.models import vgg
from tests.test_input_pipeline import eval_ids, ids_of
from tests.test_train import SGD

BATCH, EVAL_BATCH, STEPS = 16, 32, 8  # 100 training examples: step 7 starts epoch 2


def tiny(batch_norm=False, head='gap', **kw):
  return vgg.VGG(depth=11, batch_norm=batch_norm, num_classes=10, head=head, width=1 / 8, **kw)


def random_like(shapes, seed=0):
  """Variables drawn on the host (no compile): fan-in scaled kernels, and BatchNorm
  statistics far from init's zeros and ones, so a frozen BatchNorm is no identity."""
  rng = np.random.default_rng(seed)

  def draw(path, x):
    name = '/'.join(str(getattr(k, 'key', k)) for k in path)
    if name.endswith('kernel'):
      return rng.normal(0, np.prod(x.shape[:-1]) ** -0.5, x.shape).astype(x.dtype)
    if name.endswith(('scale', 'var')):
      return (1 + 0.3 * rng.random(x.shape)).astype(x.dtype)
    return rng.normal(0, 0.1, x.shape).astype(x.dtype)  # biases, BatchNorm shift and mean

  return jax.tree_util.tree_map_with_path(draw, shapes)


def make_plan(model, policy, shapes_only=False):
  init = functools.partial(model.init, train=False)
  variables = jax.eval_shape(init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  if not shapes_only:
    variables = random_like(variables)
  plan = policies.make_plan(variables['params'], model.block_structure(), ConfigDict(policy))
  return variables, plan


def config_for(fake, mode='memory', augment='none'):
  config = default.get_config()
  config.dataset.data_dir = fake['data_dir']
  config.dataset.local_dir = fake['fashion_mnist_dir']
  config.dataset.augment = augment
  config.dataset.shuffle_buffer = 64  # smaller than the split: the buffer's order matters
  config.batch_size, config.eval_batch_size = BATCH, EVAL_BATCH
  config.activation_cache = mode
  return config


@pytest.fixture(scope='module')
def splits(fake):
  train_data = input_pipeline.build_dataset('fashion_mnist', 'train', **fake)
  eval_data = input_pipeline.build_dataset('fashion_mnist', 'test[:50]', **fake)
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
    activation_cache.check_config(config_for(fake), model, [full])
  with pytest.raises(ValueError, match="augmentation 'flip'"):
    activation_cache.check_config(config_for(fake, augment='flip'), model, [full, probe])
  with pytest.raises(ValueError, match="activation_cache 'ram' is not one of"):
    activation_cache.check_config(config_for(fake, mode='ram'), model, [probe])
  activation_cache.check_config(config_for(fake), model, [probe, full])  # lp_ft: stage 1
  activation_cache.check_config(config_for(fake, 'off', 'flip'), model, [full])
  train_data, _ = splits
  with pytest.raises(ValueError, match="augmentation 'flip'"):
    activation_cache.prepare(
      config_for(fake, augment='flip'),
      model,
      probe,
      variables,
      parallel.Spread(),
      '/nonexistent',
      train_data=train_data,
    )


@pytest.mark.parametrize(
  'classes,start_step,process_count',
  [((), 0, 1), ((), 9, 1), ((), 0, 2), ((2, 5, 7), 3, 1)],
)
def test_order_matches_train_iterator(fake, classes, start_step, process_count):
  """Across epochs, from a resume step, per process, and for a class subset."""
  data = input_pipeline.build_dataset('fashion_mnist', 'train', classes=classes, **fake)
  steps = 3 * data.num_examples // BATCH  # three epochs
  # The example at each position of the split (tfds stores the examples shuffled).
  _, ids = eval_ids(data, EVAL_BATCH)
  for process_index in range(process_count):
    common = dict(
      global_batch=BATCH,
      seed=3,
      start_step=start_step,
      shuffle_buffer=32,
      process_index=process_index,
      process_count=process_count,
    )
    images = input_pipeline.train_iterator(
      data, image_size=28, preprocess='unit', augment='none', **common
    )
    indices = input_pipeline.train_indices(data.num_examples, **common)
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


def prepare(fake, splits, model, plan, variables, spread, workdir, mode, **overrides):
  config = config_for(fake, mode)
  config.update(overrides)
  train_data, eval_data = splits
  return activation_cache.prepare(
    config,
    model,
    plan,
    variables,
    spread,
    str(workdir),
    train_data=train_data,
    eval_data={'eval': eval_data},
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
  """Same metrics, parameters, statistics and eval as the uncached run, bit for bit."""
  model = tiny(batch_norm, head)
  variables, plan = make_plan(model, policy)
  spread = parallel.Spread(parallelism)
  prepared = prepare(fake, splits, model, plan, variables, spread, tmp_path, mode)
  assert (tmp_path / 'activation_cache').exists() == (mode == 'disk')
  if mode == 'disk':
    check_disk_cache(fake, splits, model, plan, variables, spread, tmp_path, monkeypatch)
  train_data, eval_data = splits
  pipeline = dict(image_size=32, preprocess='unit')
  images = input_pipeline.train_iterator(
    train_data, global_batch=BATCH, augment='none', seed=0, shuffle_buffer=64, **pipeline
  )
  uncached = run(
    model,
    variables,
    plan,
    spread,
    images,
    input_pipeline.eval_iterator(eval_data, global_batch=EVAL_BATCH, **pipeline),
  )
  cached = run(
    prepared.model,
    variables,
    plan,
    spread,
    prepared.train_batches(0),
    prepared.eval_batches['eval'](),
  )
  assert jax.tree.structure(uncached) == jax.tree.structure(cached)
  for a, b in zip(jax.tree.leaves(uncached), jax.tree.leaves(cached)):
    np.testing.assert_array_equal(a, b)
  assert uncached[2]['count'] == 50


def check_disk_cache(fake, splits, model, plan, variables, spread, workdir, monkeypatch):
  """The disk cache holds what the memory cache holds, and a second run (a resume) reads it;
  'auto' over its memory limit is on disk too."""
  files = sorted(p.name for p in (workdir / 'activation_cache').iterdir())
  assert len(files) == 6 and all(f.endswith(('.bin', '.json', '.labels.npy')) for f in files)
  caches = lambda mode, **kw: prepare(
    fake, splits, model, plan, variables, spread, workdir, mode, **kw
  )

  def batches(prepared):
    train_batches = list(itertools.islice(prepared.train_batches(5), 10))
    return train_batches + list(prepared.eval_batches['eval']())

  memory = batches(caches('memory'))
  with monkeypatch.context() as m:
    m.setattr(activation_cache, 'compute', None)
    reused = batches(caches('auto', activation_cache_memory_mb=0.0))
  for a, b in zip(memory, reused):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
