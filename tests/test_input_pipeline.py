"""The input pipeline, offline: a fake IDX Fashion-MNIST, a tiny image folder, mocked tfds.

Fake examples carry their index in pixels (0, 0) and (0, 1), so a test can name every example
a batch holds and check that each is seen exactly once.
"""

import gzip
import os
import shutil
import time

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from ftlab.data import datasets, sources
from ftlab.data import input_pipeline as ip
from ftlab.data.input_pipeline import BatchOrder

N_TRAIN, N_TEST = 100, 1001
CATALOG_NAMES = tfds.builder('fashion_mnist').info.features['label'].names  # from code, offline


def write_idx(path, array, magic):
  header = magic.to_bytes(4, 'big') + b''.join(d.to_bytes(4, 'big') for d in array.shape)
  with gzip.open(path, 'wb') as f:
    f.write(header + array.astype(np.uint8).tobytes())


def fake_images(n):
  images = np.random.RandomState(n).randint(0, 256, (n, 28, 28)).astype(np.uint8)
  images[:, 0, 0], images[:, 0, 1] = np.arange(n) % 256, np.arange(n) // 256
  return images


def labels_of(ids):
  return (np.asarray(ids) * 7) % 10  # every class, not in index order


def write_fake_fashion_mnist(idx_dir):
  os.makedirs(idx_dir, exist_ok=True)
  for prefix, n in [('train', N_TRAIN), ('t10k', N_TEST)]:
    write_idx(f'{idx_dir}/{prefix}-images-idx3-ubyte.gz', fake_images(n), 2051)
    write_idx(f'{idx_dir}/{prefix}-labels-idx1-ubyte.gz', labels_of(np.arange(n)), 2049)


def ids_of(images):
  """Example indices of 'unit'-preprocessed, unaugmented 28x28 fake images."""
  pixels = np.round(images[:, 0, :2, 0] * 255).astype(int)
  return pixels[:, 0] + 256 * pixels[:, 1]


def eval_ids(data, global_batch, process_index=0, process_count=1):
  order = BatchOrder(global_batch, process_index=process_index, process_count=process_count)
  batches = list(ip.eval_iterator(data, order, image_size=28, preprocess='unit'))
  real = np.concatenate([ids_of(b['image'])[b['mask'] == 1] for b in batches])
  return batches, real


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def test_read_idx_round_trip_and_bad_magic(tmp_path):
  images = fake_images(5)
  write_idx(tmp_path / 'i.gz', images, 2051)
  np.testing.assert_array_equal(sources.read_idx(str(tmp_path / 'i.gz'), 'images'), images)
  write_idx(tmp_path / 'l.gz', np.arange(5), 2049)
  with pytest.raises(ValueError, match='magic 2049'):
    sources.read_idx(str(tmp_path / 'l.gz'), 'images')


def test_local_fashion_mnist_matches_catalog_and_caches(fake, tmp_path):
  data = datasets.build_dataset('fashion_mnist', 'test', **fake)
  assert (data.num_examples, data.num_classes) == (N_TEST, 10)
  assert data.class_names == tuple(CATALOG_NAMES)
  catalog = tfds.builder('fashion_mnist').info.features
  assert repr(data.builder.info.features) == repr(catalog)  # same image shape, dtype, names
  batches, ids = eval_ids(data, 1024)
  np.testing.assert_array_equal(np.sort(ids), np.arange(N_TEST))
  images = np.concatenate([b['image'] for b in batches])[: len(ids)]
  np.testing.assert_allclose(images[..., 0] * 255, fake_images(N_TEST)[ids], atol=1e-3)
  labels = np.concatenate([b['label'] for b in batches])[: len(ids)]
  np.testing.assert_array_equal(labels, labels_of(ids))
  # Prepared once: with the IDX files gone, the builder still reads its prepared copy.
  idx_copy = str(tmp_path / 'idx')
  shutil.copytree(fake['fashion_mnist_dir'], idx_copy)
  data_dir = str(tmp_path / 'data')
  datasets.build_dataset('fashion_mnist', 'train', data_dir=data_dir, fashion_mnist_dir=idx_copy)
  shutil.rmtree(idx_copy)
  again = datasets.build_dataset(
    'fashion_mnist', 'train', data_dir=data_dir, fashion_mnist_dir=idx_copy
  )
  assert again.num_examples == N_TRAIN


@pytest.mark.slow  # prepares the whole dataset
def test_real_debian_fashion_mnist(tmp_path):
  if not os.path.exists(
    os.path.join(sources.DEBIAN_FASHION_MNIST_DIR, 'train-images-idx3-ubyte.gz')
  ):
    pytest.skip(f'{sources.DEBIAN_FASHION_MNIST_DIR} absent: apt-get install dataset-fashion-mnist')
  train = datasets.build_dataset(
    'fashion_mnist', 'train', data_dir=str(tmp_path)
  )  # ~20 s to prepare
  test = datasets.build_dataset('fashion_mnist', 'test', data_dir=str(tmp_path))
  assert (train.num_examples, test.num_examples) == (60_000, 10_000)
  assert train.class_names[:2] == ('T-shirt/top', 'Trouser')
  assert train.class_names == tuple(CATALOG_NAMES)


def test_absent_dataset_fails_fast_with_its_name(tmp_path):
  start = time.time()
  with pytest.raises(ValueError, match="'cifar10' is not prepared.*download") as error:
    datasets.build_dataset('cifar10', 'train', data_dir=str(tmp_path))
  assert '\n' not in str(error.value)
  with pytest.raises(ValueError, match="unknown dataset 'no_such_dataset'"):
    datasets.build_dataset('no_such_dataset', 'train', data_dir=str(tmp_path))
  with pytest.raises(ValueError, match="'fashion_mnist' is not prepared.*IDX"):
    datasets.build_dataset(
      'fashion_mnist', 'train', data_dir=str(tmp_path), fashion_mnist_dir='/nope'
    )
  with pytest.raises(ValueError, match='image folder'):
    datasets.build_dataset('image_folder:/nope', 'train')
  assert time.time() - start < 60  # a hang guard: offline, nothing waits on the network


def test_mocked_catalog_dataset_exact_eval():
  # mock_data makes download_and_prepare a no-op, so download=True reads the mock offline.
  with tfds.testing.mock_data(num_examples=1001):
    data = datasets.build_dataset('cifar10', 'test', download=True)
    assert (data.num_examples, data.num_classes) == (1001, 10)
    batches = list(ip.eval_iterator(data, BatchOrder(64), image_size=32, preprocess='caffe'))
  assert len(batches) == 16 == ip.num_eval_steps(1001, 64)
  assert sum(b['mask'].sum() for b in batches) == 1001
  last = batches[-1]
  assert last['image'].shape == (64, 32, 32, 3) and last['image'].dtype == np.float32
  assert last['label'].dtype == np.int32 and last['mask'].dtype == np.float32
  assert last['mask'][:41].all() and not last['mask'][41:].any()  # 1001 = 15 * 64 + 41
  assert not last['image'][41:].any()


@pytest.mark.parametrize('process_count', [1, 2])
@pytest.mark.parametrize('n', [N_TEST, 961])  # 961: process 1's 480 fill 15 batches of 16
def test_exact_eval_every_example_once(fake, process_count, n):
  data = datasets.build_dataset('fashion_mnist', f'test[:{n}]', **fake)
  shares = [eval_ids(data, 64, p, process_count) for p in range(process_count)]
  for batches, _ in shares:
    assert len(batches) == 16
    assert all(b['image'].shape[0] == 64 // process_count for b in batches)
  assert sum(b['mask'].sum() for batches, _ in shares for b in batches) == n
  ids = np.concatenate([ids for _, ids in shares])
  assert len(ids) == len(set(ids)) == n  # none twice
  _, all_ids = eval_ids(datasets.build_dataset('fashion_mnist', 'test', **fake), 1024)
  np.testing.assert_array_equal(np.sort(ids), np.sort(all_ids[:n]))  # the first n of the split


def test_class_subset_is_relabelled_in_order(fake):
  classes = (7, 2, 5)
  data = datasets.build_dataset('fashion_mnist', 'test', classes=classes, **fake)
  assert data.class_names == tuple(CATALOG_NAMES[c] for c in classes)
  assert data.num_examples == np.isin(labels_of(np.arange(N_TEST)), classes).sum()
  batches, ids = eval_ids(data, 256)
  labels = np.concatenate([b['label'][b['mask'] == 1] for b in batches])
  expected = [classes.index(c) for c in labels_of(ids)]
  np.testing.assert_array_equal(labels, expected)
  with pytest.raises(ValueError, match='distinct labels'):
    datasets.build_dataset('fashion_mnist', 'test', classes=(1, 1), **fake)


def test_examples_per_class_is_a_seeded_first_n(fake):
  data = datasets.build_dataset('fashion_mnist', 'train', examples_per_class=3, seed=1, **fake)
  assert data.num_examples == 30
  _, ids = eval_ids(data, 64)
  assert np.bincount(labels_of(ids), minlength=10).tolist() == [3] * 10
  # The documented order: positions in the prepared split (tfds shuffled the IDX order when
  # it prepared it), permuted by default_rng(seed).
  _, position_ids = eval_ids(datasets.build_dataset('fashion_mnist', 'train', **fake), 128)
  order = np.random.default_rng(1).permutation(N_TRAIN)
  position_labels = labels_of(position_ids)
  expected = np.concatenate([order[position_labels[order] == c][:3] for c in range(10)])
  np.testing.assert_array_equal(data.indices, np.sort(expected))
  np.testing.assert_array_equal(ids, position_ids[np.sort(expected)])
  other = datasets.build_dataset('fashion_mnist', 'train', examples_per_class=3, seed=2, **fake)
  assert not np.array_equal(other.indices, data.indices)
  subset = datasets.build_dataset(
    'fashion_mnist', 'train', classes=(9, 0), examples_per_class=4, **fake
  )
  assert subset.num_examples == 8 and subset.num_classes == 2
  with pytest.raises(ValueError, match='fewer than 11'):
    datasets.build_dataset('fashion_mnist', 'train', examples_per_class=11, **fake)


def test_minival_is_the_disjoint_end_of_train(fake):
  train_split, minival_split = datasets.minival_split('train', '10%')
  assert (train_split, minival_split) == ('train[:-10%]', 'train[-10%:]')
  train = datasets.build_dataset('fashion_mnist', train_split, **fake)
  minival = datasets.build_dataset('fashion_mnist', datasets.minival_split('train', 7)[1], **fake)
  assert (train.num_examples, minival.num_examples) == (90, 7)
  _, train_ids = eval_ids(train, 128)
  _, minival_ids = eval_ids(minival, 128)
  full = datasets.build_dataset('fashion_mnist', 'train', **fake)
  _, all_ids = eval_ids(full, 128)
  np.testing.assert_array_equal(minival_ids, all_ids[-7:])
  assert not set(train_ids) & set(minival_ids)


def test_minival_of_its_own_and_named_eval_splits(fake):
  """`dataset.minival` naming a split (VTAB's val200) is used as given and checked not to
  overlap the training split; `dataset.eval_splits` adds named splits beside eval."""
  from configs import default
  from ftlab import errors, run

  config = default.get_config('runlocal')
  config.dataset.update(data_dir=fake['data_dir'], local_dir=fake['fashion_mnist_dir'])
  config.dataset.update(train_split='train[:50]', minival='train[60:70]', eval_split='test')
  config.dataset.eval_splits = ' tail = train[80:], head=test[:5] '
  data = run.make_data(config)
  assert list(data.evals) == ['eval', 'minival', 'tail', 'head']
  assert data.train.num_examples == 50
  sizes = {k: d.num_examples for k, d in data.evals.items()}
  assert (sizes['minival'], sizes['tail'], sizes['head']) == (10, 20, 5)
  _, minival_ids = eval_ids(data.evals['minival'], 128)
  full = datasets.build_dataset('fashion_mnist', 'train', **fake)
  np.testing.assert_array_equal(minival_ids, eval_ids(full, 128)[1][60:70])
  config.dataset.minival = 'train[40:60]'
  with pytest.raises(sources.DatasetError, match=r"shares examples 40..49 of 'train' with"):
    run.make_data(config)
  config.dataset.minival = 'train[:-10]+train[95:]'  # open ends and unions are compared too
  with pytest.raises(sources.DatasetError, match=r'shares examples 0..49'):
    run.make_data(config)
  config.dataset.minival = 'test[:10]'  # nor the eval split's: selection would see the test
  with pytest.raises(sources.DatasetError, match=r"shares examples 0..9 of 'test' with 'test'"):
    run.make_data(config)
  config.dataset.minival = 'ten'  # a word is a split name: it must be one of the dataset's
  with pytest.raises(sources.DatasetError, match=r"^dataset.minival: 'ten' is no split of 'fashi"):
    run.make_data(config)
  config.dataset.minival = ''
  config.dataset.eval_splits = 'v2=tset'  # the error names the field that chose the split
  with pytest.raises(sources.DatasetError, match=r"^dataset.eval_splits v2: 'tset' is no split"):
    run.make_data(config)
  for bad, message in [
    ('eval=test[:5]', r"names 'eval', the name of dataset.eval_split; choose another"),
    ('tail', r"entry 'tail' is not name=split"),
    ('a=test, a=train', r"names 'a' twice; one split per name"),
    ('shift=test', r"names 'shift', a name its metrics would share with the evaluator 'shift'"),
    ('train=test', r"names 'train', the name of dataset.train_split"),
    ('minival=test[:5]', r"names 'minival', the name of dataset.minival"),  # even when unset
  ]:
    config.dataset.eval_splits = bad
    with pytest.raises(errors.ConfigError, match=message):
      run.make_data(config)


def test_preprocessing_constants_by_hand():
  rgb = np.array([[[10, 20, 30], [200, 100, 0]]], np.uint8)  # [1, 2, 3]
  out = {
    mode: ip.preprocess_image(tf.constant(rgb), image_size=2, preprocess=mode).numpy()
    for mode in ip.PREPROCESSING
  }
  # resize (1, 2) -> (2, 2) repeats the row, so row 0 holds the pixels unchanged.
  r, g, b = rgb[0, 0].astype(np.float64)
  np.testing.assert_allclose(out['caffe'][0, 0], [b - 103.939, g - 116.779, r - 123.68], atol=1e-4)
  np.testing.assert_allclose(
    out['torch'][0, 0],
    [(r / 255 - 0.485) / 0.229, (g / 255 - 0.456) / 0.224, (b / 255 - 0.406) / 0.225],
    atol=1e-5,
  )
  np.testing.assert_allclose(out['unit'][0, 1], [200 / 255, 100 / 255, 0.0], atol=1e-6)
  assert all(x.shape == (2, 2, 3) and x.dtype == np.float32 for x in out.values())


def test_grey_is_tiled_to_rgb():
  grey = tf.constant(np.arange(16, dtype=np.uint8).reshape(4, 4, 1) * 10)
  out = ip.preprocess_image(grey, image_size=4, preprocess='unit').numpy()
  assert out.shape == (4, 4, 3)
  for channel in range(3):
    np.testing.assert_allclose(out[..., channel] * 255, grey.numpy()[..., 0], atol=1e-3)
  caffe = ip.preprocess_image(grey, image_size=4, preprocess='caffe').numpy()
  np.testing.assert_allclose(caffe[..., 0] - caffe[..., 2], 123.68 - 103.939, atol=1e-3)


def train_batches(data, n, **kwargs):
  kwargs = dict(global_batch=16, image_size=28, preprocess='unit', augment='resized_crop') | kwargs
  order_fields = ('global_batch', 'seed', 'shuffle_buffer', 'process_index', 'process_count')
  order_fields += ('shards',)
  order = BatchOrder(**{k: kwargs.pop(k) for k in order_fields if k in kwargs})
  return take(ip.train_iterator(data, order, **kwargs), n)


def assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x['label'], y['label'])
    np.testing.assert_array_equal(x['image'], y['image'])


def test_train_batches_are_a_function_of_the_seed(fake):
  data = datasets.build_dataset('fashion_mnist', 'train', **fake)
  first = train_batches(data, 3, seed=3)
  assert first[0]['image'].shape == (16, 28, 28, 3) and first[0]['image'].dtype == np.float32
  assert first[0]['label'].shape == (16,) and first[0]['label'].dtype == np.int32
  assert_same_batches(first, train_batches(data, 3, seed=3))
  other = train_batches(data, 3, seed=4)
  assert not np.array_equal(first[0]['image'], other[0]['image'])


def test_order_is_reshuffled_per_seed_and_epoch(fake):
  data = datasets.build_dataset('fashion_mnist', 'train', **fake)

  def epochs(seed):
    batches = train_batches(data, 10, global_batch=20, augment='none', seed=seed)
    return np.concatenate([ids_of(b['image']) for b in batches]).reshape(2, N_TRAIN)

  first, second = epochs(seed=0)
  np.testing.assert_array_equal(np.sort(first), np.arange(N_TRAIN))  # an epoch is a permutation
  np.testing.assert_array_equal(np.sort(second), np.arange(N_TRAIN))
  assert not np.array_equal(first, second)
  assert not np.array_equal(first, epochs(seed=1)[0])


def test_resume_at_step_equals_continuing(fake):
  data = datasets.build_dataset('fashion_mnist', 'train', **fake)
  # 100 examples in batches of 16: epochs end inside steps 6 and 12.
  kwargs = dict(seed=5, shuffle_buffer=40)
  uninterrupted = train_batches(data, 14, **kwargs)
  assert_same_batches(train_batches(data, 9, start_step=5, **kwargs), uninterrupted[5:])
  assert_same_batches(train_batches(data, 1, start_step=13, **kwargs), uninterrupted[13:])


def test_order_ignores_a_global_tensorflow_seed(fake):
  # Keras' set_random_seed (or tf.random.set_seed) elsewhere in the process must neither
  # change the data order nor break the per-epoch shuffles, and stays set afterwards.
  data = datasets.build_dataset('fashion_mnist', 'train', **fake)
  kwargs = dict(seed=5, shuffle_buffer=40, augment='none')
  unseeded = train_batches(data, 8, **kwargs)
  tf.random.set_seed(1234)
  try:
    seeded = train_batches(data, 8, **kwargs)
    resumed = train_batches(data, 2, start_step=6, **kwargs)
    assert ip.tf_context.global_seed() == 1234
  finally:
    tf.random.set_seed(None)
  assert_same_batches(seeded, unseeded)
  assert_same_batches(resumed, unseeded[6:])


def test_train_shares_are_disjoint_and_cover_an_epoch(fake):
  data = datasets.build_dataset('fashion_mnist', 'train', **fake)
  ids = []
  for process_index in range(2):
    batches = train_batches(
      data, 5, global_batch=20, augment='none', process_index=process_index, process_count=2
    )
    assert batches[0]['image'].shape[0] == 10
    ids.append(np.concatenate([ids_of(b['image']) for b in batches]))  # 50 = one epoch
  np.testing.assert_array_equal(np.sort(np.concatenate(ids)), np.arange(N_TRAIN))
  # The global batches do not depend on the process count: the two processes' rows of each
  # step, stacked, are the one-process batch, augmentation included.
  kwargs = dict(global_batch=20, augment='pad_crop', seed=3, start_step=2)
  whole = train_batches(data, 3, **kwargs)
  parts = [train_batches(data, 3, process_index=p, process_count=2, **kwargs) for p in (0, 1)]
  for step, batch in enumerate(whole):
    for key in ('image', 'label'):
      stacked = np.concatenate([parts[0][step][key], parts[1][step][key]])
      np.testing.assert_array_equal(stacked, batch[key])
  with pytest.raises(ValueError, match='not divisible'):
    ip.train_iterator(data, BatchOrder(15, process_count=2), image_size=28, preprocess='unit')
  with pytest.raises(ValueError, match='process_index 2'):
    ip.eval_iterator(data, BatchOrder(16, process_index=2), image_size=28, preprocess='unit')


@pytest.mark.parametrize('shards,process_counts', [(2, (1, 2)), (4, (1, 2, 4)), (3, (1, 2))])
def test_data_shards_give_batches_that_do_not_depend_on_the_process_count(
  fake, shards, process_counts
):
  """Global batches from data shards: the processes' rows of each step, stacked, equal the
  one-process batch (augmentation included), across epochs and from a resume step."""
  data = datasets.build_dataset('fashion_mnist', 'train', **fake)
  kwargs = dict(global_batch=12, augment='pad_crop', seed=5, start_step=3, shards=shards)
  whole = train_batches(data, 12, **kwargs)  # 144 examples: past an epoch of every shard
  for count in process_counts[1:]:
    parts = [
      train_batches(data, 12, process_index=p, process_count=count, **kwargs) for p in range(count)
    ]
    for step, batch in enumerate(whole):
      for key in ('image', 'label'):
        stacked = np.concatenate([parts[p][step][key] for p in range(count)])
        np.testing.assert_array_equal(stacked, batch[key], err_msg=f'{count} processes, {step}')
  # Shard j fills rows [3j, 3j + 3) of every batch (global_batch 12 / 4 shards) with its own
  # contiguous part of the split, and an epoch of each shard holds each of its examples once.
  if shards == 4:
    _, in_order = eval_ids(data, 16)  # example ids in the split's (tfds) order
    plain = train_batches(data, 25, global_batch=12, augment='none', seed=5, shards=4)
    ids = np.stack([ids_of(b['image']) for b in plain])  # [25 steps, 12 rows]
    for j, part in enumerate(ip.parts(N_TRAIN, 4)):
      rows = ids[:, 3 * j : 3 * j + 3].reshape(-1)
      np.testing.assert_array_equal(np.sort(rows[:25]), np.sort(in_order[part]))  # one epoch
      assert set(rows) == set(in_order[part])


def test_each_process_reads_only_its_shards(fake, monkeypatch):
  """With as many shards as processes, a process reads a contiguous 1/P of the records (a
  tfds slice), and the records it reads are the ones its batches hold."""
  data = datasets.build_dataset('fashion_mnist', 'train', **fake)
  reads = []
  read = sources.read

  def counting_read(builder, split):
    ds = read(builder, split)
    reads.append((split, int(ds.cardinality())))
    return ds

  _, in_order = eval_ids(data, 16)  # example ids in the split's (tfds) order
  monkeypatch.setattr(sources, 'read', counting_read)
  shares = ip.parts(N_TRAIN, 2)
  for p in range(2):
    reads.clear()
    batches = train_batches(
      data, 10, global_batch=10, augment='none', process_index=p, process_count=2, shards=2
    )
    assert reads == [(f'train[{shares[p][0]}:{shares[p][-1] + 1}]', N_TRAIN // 2)]
    seen = np.concatenate([ids_of(b['image']) for b in batches])
    np.testing.assert_array_equal(np.sort(seen), np.sort(in_order[shares[p]]))  # an epoch
  # A few-shot subset spread over the split: each process reads the range of its shard only.
  subset = datasets.build_dataset('fashion_mnist', 'train', examples_per_class=2, **fake)
  for p in range(2):
    reads.clear()
    batches = train_batches(
      subset, 2, global_batch=10, augment='none', process_index=p, process_count=2, shards=2
    )
    mine = subset.indices[ip.parts(subset.num_examples, 2)[p]]
    assert reads == [(f'train[{mine[0]}:{mine[-1] + 1}]', mine[-1] + 1 - mine[0])]
    assert set(np.concatenate([ids_of(b['image']) for b in batches])) == set(in_order[mine])
  with pytest.raises(ValueError, match='data shards 3: need a divisor of the global batch 10'):
    BatchOrder(10, shards=3)


def test_narrow_reads_slices_of_summed_and_sliced_splits(fake):
  """`narrow` keeps the examples, and their order, of sliced and `a+b` splits."""
  for split in ('train[10:90]+test[:30]', 'train[-40:]', 'test[5:]+train'):
    data = datasets.build_dataset('fashion_mnist', split, **fake)
    _, all_ids = eval_ids(data, 16)
    labels = np.concatenate([b['label'][b['mask'] == 1] for b in eval_ids(data, 16)[0]])
    for part in (np.arange(3, 25), np.arange(data.num_examples - 7, data.num_examples)):
      narrowed = ip.narrow(data, part)
      assert narrowed.num_examples == len(part)
      batches, ids = eval_ids(narrowed, 16)
      np.testing.assert_array_equal(ids, all_ids[part], err_msg=f'{split} {narrowed.read_split}')
      got = np.concatenate([b['label'][b['mask'] == 1] for b in batches])
      np.testing.assert_array_equal(got, labels[part])


def test_image_folder(tmp_path):
  rng = np.random.RandomState(0)
  for split, n in [('train', 4), ('test', 2)]:
    for label in ['dog', 'cat']:
      os.makedirs(tmp_path / split / label)
      for i in range(n):
        shape = (5 + i, 7, 1 if label == 'cat' else 3)  # grey cats, sizes vary
        png = tf.io.encode_png(rng.randint(0, 256, shape).astype(np.uint8))
        tf.io.write_file(str(tmp_path / split / label / f'{i}.png'), png)
  name = f'image_folder:{tmp_path}'
  train = datasets.build_dataset(name, 'train')
  assert (train.num_examples, train.class_names) == (8, ('cat', 'dog'))
  assert datasets.build_dataset(name, 'train[:50%]').num_examples == 4
  batches = list(ip.eval_iterator(train, BatchOrder(8), image_size=6, preprocess='unit'))
  assert len(batches) == 1 and batches[0]['image'].shape == (8, 6, 6, 3)
  images, labels = batches[0]['image'], batches[0]['label']
  assert sorted(labels.tolist()) == [0] * 4 + [1] * 4
  cats = images[labels == 0]
  np.testing.assert_array_equal(cats[..., 0], cats[..., 2])  # grey -> RGB
  assert not np.array_equal(images[labels == 1][..., 0], images[labels == 1][..., 2])
  batch = next(ip.train_iterator(train, BatchOrder(4), image_size=6, preprocess='torch'))
  assert batch['image'].shape == (4, 6, 6, 3)


def test_unreadable_image_in_a_folder_is_named_before_training(tmp_path):
  os.makedirs(tmp_path / 'train' / 'cat')
  png = tf.io.encode_png(np.zeros((4, 4, 3), np.uint8))
  tf.io.write_file(str(tmp_path / 'train' / 'cat' / '0.png'), png)
  (tmp_path / 'train' / 'cat' / '1.png').write_bytes(b'not an image')
  with pytest.raises(ValueError, match=r'^unreadable image .*train/cat/1\.png: '):
    datasets.build_dataset(f'image_folder:{tmp_path}', 'train')


# --- Image folders as users bring them: clutter, hidden folders, rotated photos. ------------------


def write_png(path, array):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tf.io.write_file(str(path), tf.io.encode_png(array))


def test_folder_clutter_is_ignored_alike_by_the_check_and_the_reader(tmp_path):
  rng = np.random.RandomState(0)
  image = lambda: rng.randint(0, 256, (6, 6, 3)).astype(np.uint8)
  for split, n in [('train', 3), ('test', 1)]:
    for label in ('cat', 'dog'):
      for i in range(n):
        write_png(tmp_path / split / label / f'{i}.png', image())
  finder = b'\x00\x00\x00\x01Bud1' + bytes(range(256))  # what macOS Finder writes
  clutter = {
    '.DS_Store': finder,
    'train/.DS_Store': finder,
    'train/cat/.DS_Store': finder,
    'train/cat/._0.png': finder,  # an AppleDouble file: a dotfile named like an image
    'train/dog/Thumbs.db': b'\xd0\xcf\x11\xe0',
    'train/dog/desktop.ini': b'[.ShellClassInfo]',
    'train/dog/notes.txt': b'labels checked by hand',
    'train/.ipynb_checkpoints/labels-checkpoint.ipynb': b'{}',
    'train/cat/.ipynb_checkpoints/0-checkpoint.png': b'',
    '__MACOSX/train/._cat': finder,
  }
  for name, data in clutter.items():
    os.makedirs(os.path.dirname(tmp_path / name), exist_ok=True)
    (tmp_path / name).write_bytes(data)
  write_png(tmp_path / 'train' / '.thumbnails' / '0.png', image())  # hidden, and of images
  write_png(tmp_path / 'train' / 'cat' / 'crops' / '0.png', image())  # nested: not read
  name = f'image_folder:{tmp_path}'
  train = datasets.build_dataset(name, 'train')  # decodes every image: no clutter reaches it
  assert train.class_names == ('cat', 'dog')  # no hidden folder became a class
  assert train.num_examples == 6 and train.class_counts() == {'cat': 3, 'dog': 3}
  record = train.describe()
  assert record['ignored_files'] == [
    '.DS_Store',
    '__MACOSX/',
    'train/.DS_Store',
    'train/.ipynb_checkpoints/',
    'train/.thumbnails/',
    'train/cat/.DS_Store',
    'train/cat/._0.png',
    'train/cat/.ipynb_checkpoints/',
    'train/cat/crops/',
    'train/dog/Thumbs.db',
    'train/dog/desktop.ini',
    'train/dog/notes.txt',
  ]
  # The reader reads the same six images: every one once.
  batches = list(ip.eval_iterator(train, BatchOrder(8), image_size=6, preprocess='unit'))
  assert batches[0]['mask'].sum() == 6
  # The order of examples is tfds.ImageFolder's for a clean folder (runs stay reproducible).
  clean = tmp_path / 'clean'
  shutil.copytree(tmp_path / 'train', clean / 'train', ignore=shutil.ignore_patterns('.*', '*.db'))
  shutil.rmtree(clean / 'train' / 'cat' / 'crops')
  for f in ('desktop.ini', 'notes.txt'):
    os.remove(clean / 'train' / 'dog' / f)
  ours = sources.get_builder(f'image_folder:{clean}').listing.splits['train']
  theirs = tfds.ImageFolder(str(clean))._split_examples['train']
  assert [(p, c) for p, c in ours] == [(e.image_path, e.label) for e in theirs]


@pytest.mark.parametrize('orientation', range(1, 9))
def test_exif_orientation_turns_photos_as_a_viewer_shows_them(orientation, tmp_path):
  from PIL import Image, ImageOps

  stored = np.random.RandomState(orientation).randint(0, 256, (6, 10, 3)).astype(np.uint8)
  exif = Image.Exif()
  exif[sources.EXIF_ORIENTATION] = orientation
  path = tmp_path / 'train' / 'a' / 'photo.png'  # PNG: lossless, so pixels compare exactly
  os.makedirs(path.parent)
  Image.fromarray(stored).save(path, exif=exif)
  with Image.open(path) as opened:
    shown = np.asarray(ImageOps.exif_transpose(opened))  # PIL: the reference
  train = datasets.build_dataset(f'image_folder:{tmp_path}', 'train')
  assert (train.orientation is None) == (orientation == 1)
  size = max(shown.shape[:2])
  (batch,) = ip.eval_iterator(train, BatchOrder(1), image_size=size, preprocess='unit')
  want = tf.image.resize(shown.astype(np.float32), [size, size], antialias=True) / 255
  np.testing.assert_allclose(batch['image'][0], want, atol=1e-6)
  batch = next(
    ip.train_iterator(train, BatchOrder(1), image_size=size, preprocess='unit', augment='none')
  )
  np.testing.assert_allclose(batch['image'][0], want, atol=1e-6)


def test_labels_are_read_once_per_process_until_the_files_change(fake, monkeypatch):
  builder = datasets.build_dataset('fashion_mnist', 'test', **fake).builder
  monkeypatch.setattr(sources, '_LABELS', {})  # nothing kept from other tests
  first = sources.read_labels(builder, 'test')
  reads = []
  real_read = sources.read
  monkeypatch.setattr(sources, 'read', lambda *a: reads.append(a) or real_read(*a))
  first[:] = -1  # the caller's copy: the kept labels are not changed through it
  again = sources.read_labels(builder, 'test')
  assert reads == [] and (again >= 0).all()
  assert len(sources.read_labels(builder, 'test[:5]')) == 5 and len(reads) == 1
  (path,) = builder.info.splits['test'].filepaths
  os.utime(path, ns=(1, 1))  # rewritten files are read again
  np.testing.assert_array_equal(sources.read_labels(builder, 'test'), again)
  assert len(reads) == 2
