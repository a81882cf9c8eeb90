"""Checkpoints: bit-exact round trips, resume, retention, crash safety and strict init."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from ml_collections import ConfigDict

from ftlab import parallel, paths, train
from ftlab.files import checkpoint
from ftlab.models import vgg
from ftlab.plans import optim, policies

ADAM = dict(name='adam', learning_rate=0.01, schedule='constant')
SGD = dict(name='sgd', learning_rate=0.1, momentum=0.9, schedule='constant')


@functools.lru_cache(maxsize=None)
def model_and_shapes():
  # Shapes only: every value a test needs is filled in at random, so no init to run.
  model = vgg.VGG(depth=11, batch_norm=True, num_classes=5, head='gap', width=1 / 16)
  init = functools.partial(model.init, train=False)
  return model, jax.eval_shape(init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


def tx_for(policy, opt):
  model, shapes = model_and_shapes()
  plan = policies.make_plan(shapes['params'], model.block_structure(), ConfigDict(policy))
  return optim.make(plan, ConfigDict(opt), 10)


def abstract_state(tx):
  return jax.eval_shape(lambda v: train.create_train_state(v, tx), model_and_shapes()[1])


def random_like(tree, seed):
  """Numpy arrays of `tree`'s shapes and dtypes, each holding distinct random values."""
  rng = np.random.RandomState(seed)

  def fill(x):
    if np.issubdtype(x.dtype, np.integer):
      return rng.randint(1, 1000, size=x.shape).astype(x.dtype)
    return rng.normal(size=x.shape).astype(x.dtype)

  return jax.tree.map(fill, tree)


def random_state(tx, seed):
  return random_like(abstract_state(tx), seed)


def assert_bit_identical(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  flat_a, flat_b = jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)
  for (path, x), y in zip(flat_a, flat_b):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape, jax.tree_util.keystr(path)
    assert x.tobytes() == y.tobytes(), jax.tree_util.keystr(path)


def count_masked_nodes(tree):
  is_masked = lambda x: isinstance(x, optax.MaskedNode)
  return sum(is_masked(x) for x in jax.tree.leaves(tree, is_leaf=is_masked))


# --- Round trip and resume. -------------------------------------------------------------------


@pytest.mark.parametrize('layout', ['host', 'replicated'])
def test_round_trip_is_bit_identical_with_masked_optimizer_state(tmp_path, layout):
  tx = tx_for(dict(name='last_blocks', k=1), ADAM)  # frozen leaves: MaskedNode in opt_state
  state = random_state(tx, seed=1).replace(step=np.int32(7))
  assert count_masked_nodes(state.opt_state) > 0  # the case under test is present
  saved = state if layout == 'host' else parallel.Spread('shard_map').replicate(state)
  meta = {'plan': 'last_blocks(k=1)', 'config': {'optimizer': ADAM, 'sizes': [1, 2]}}
  path = checkpoint.save(tmp_path, 7, saved, meta)

  restored, restored_meta = checkpoint.restore(tmp_path, abstract_state(tx))
  assert path == tmp_path / '7'
  assert isinstance(restored, train.TrainState) and int(restored.step) == 7
  assert count_masked_nodes(restored.opt_state) == count_masked_nodes(state.opt_state)
  assert_bit_identical(restored, state)
  assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(restored))
  assert restored_meta == {**meta, 'step': 7}
  assert checkpoint.restore_meta(tmp_path) == {**meta, 'step': 7}


def test_restore_picks_the_latest_or_the_given_step_and_keeps_max_to_keep(tmp_path):
  tx = tx_for(dict(name='full'), SGD)
  states = {step: random_state(tx, seed=step) for step in (10, 20, 30, 40)}
  assert checkpoint.latest_step(tmp_path) is None
  assert checkpoint.latest_step(tmp_path / 'absent') is None
  for step, state in states.items():
    checkpoint.save(tmp_path, step, state, {'step_seen': step}, max_to_keep=3)
  assert checkpoint.all_steps(tmp_path) == [20, 30, 40]
  assert sorted(os.listdir(tmp_path)) == ['20', '30', '40']
  assert checkpoint.latest_step(tmp_path) == 40

  latest, meta = checkpoint.restore(tmp_path, abstract_state(tx))
  assert_bit_identical(latest, states[40])
  assert meta == {'step_seen': 40, 'step': 40}
  older, meta = checkpoint.restore(tmp_path, states[40], step=20)  # a target of arrays
  assert_bit_identical(older, states[20])
  assert checkpoint.restore_meta(tmp_path, step=30)['step_seen'] == 30
  with pytest.raises(FileNotFoundError, match=r'no complete checkpoint for step 10 in .*'):
    checkpoint.restore(tmp_path, abstract_state(tx), step=10)
  with pytest.raises(FileNotFoundError, match=r'^no complete checkpoint in '):
    checkpoint.restore(tmp_path / 'absent', abstract_state(tx))


def test_save_refuses_old_steps_small_max_to_keep_and_non_json_meta(tmp_path):
  state = {'w': np.ones(3, np.float32)}
  checkpoint.save(tmp_path, 5, state, {})
  with pytest.raises(ValueError, match=r'checkpoint step 5 is not newer than step 5 already in'):
    checkpoint.save(tmp_path, 5, state, {})
  with pytest.raises(ValueError, match=r'checkpoint step 3 is not newer than step 5'):
    checkpoint.save(tmp_path, 3, state, {})
  with pytest.raises(ValueError, match=r'max_to_keep=1: keep at least 2'):
    checkpoint.save(tmp_path, 6, state, {}, max_to_keep=1)
  with pytest.raises(TypeError, match=r'meta must be JSON-serialisable'):
    checkpoint.save(tmp_path, 6, state, {'x': np.float32(1)})
  assert checkpoint.all_steps(tmp_path) == [5]  # nothing was half-written by the failures
  assert sorted(os.listdir(tmp_path)) == ['5']


def test_restore_into_another_structure_is_a_clear_error(tmp_path):
  saved_tx = tx_for(dict(name='last_blocks', k=1), ADAM)
  checkpoint.save(tmp_path, 1, random_state(saved_tx, seed=0), {})
  other_tx = tx_for(dict(name='full'), SGD)  # another plan and optimizer: another opt_state
  with pytest.raises(ValueError) as e:
    checkpoint.restore(tmp_path, abstract_state(other_tx))
  message = str(e.value)
  # Long lists are summarised: the count, the prefix the paths share, the first few paths.
  trace = 'opt_state/inner_states/trainable/inner_state/0/trace'
  assert message.startswith(
    f'checkpoint {tmp_path}/1 does not match the restore target: missing (34 under {trace}/*): '
  )
  assert f'{trace}/block1_conv1/kernel (expected (3, 3, 3, 4) float32)' in message
  assert ', ... and 28 more; unexpected (21 under opt_state/inner_states/trainable/' in message
  assert (
    'opt_state/inner_states/trainable/inner_state/0/mu/block5_conv1/kernel (3, 3, 32, 32) float32'
    in message
  )
  assert message.endswith('use load_params')
  assert isinstance(e.value, checkpoint.MismatchError)
  # A shape (or dtype) change alone is caught too, not silently read into the target.
  target = abstract_state(saved_tx)
  target = target.replace(step=jax.ShapeDtypeStruct((), jnp.float32))
  with pytest.raises(
    ValueError, match=r'mismatch \(1\): step expected \(\) float32 found \(\) int32'
  ):
    checkpoint.restore(tmp_path, target)


# --- Crashes and incomplete checkpoints. --------------------------------------------------------


def test_a_save_killed_before_its_final_rename_leaves_the_last_checkpoint(tmp_path, monkeypatch):
  # Orbax writes `<step>.orbax-checkpoint-tmp/` and renames it to `<step>/` last; a crash
  # anywhere before that (simulated by failing the rename) leaves only the tmp directory.
  from orbax.checkpoint._src.path import async_path

  state = {'w': np.arange(4, dtype=np.float32)}
  checkpoint.save(tmp_path, 1, state, {'n': 1})

  async def killed(*args, **kwargs):
    raise RuntimeError('killed')

  monkeypatch.setattr(async_path, 'rename', killed)
  with pytest.raises(RuntimeError, match='killed'):
    checkpoint.save(tmp_path, 2, {'w': np.zeros(4, np.float32)}, {'n': 2})
  monkeypatch.undo()
  assert sorted(os.listdir(tmp_path)) == ['1', '2.orbax-checkpoint-tmp']
  assert checkpoint.latest_step(tmp_path) == 1
  restored, meta = checkpoint.restore(tmp_path, state)
  assert meta['n'] == 1 and np.array_equal(restored['w'], state['w'])

  checkpoint.save(tmp_path, 3, state, {'n': 3})  # the next save clears the leftover
  assert sorted(os.listdir(tmp_path)) == ['1', '3']


def test_incomplete_step_directories_are_ignored(tmp_path):
  state = {'w': np.arange(4, dtype=np.float32)}
  checkpoint.save(tmp_path, 1, state, {})
  checkpoint.save(tmp_path, 2, {'w': state['w'] + 1}, {})
  # A tmp directory of a newer step, as a crash mid-save leaves it.
  (tmp_path / '3.orbax-checkpoint-tmp-1700000000' / 'state').mkdir(parents=True)
  # A final-named step without Orbax's commit marker (a non-atomic filesystem or a copy
  # that stopped half-way), here with its array files gone too.
  (tmp_path / '4' / 'state').mkdir(parents=True)
  (tmp_path / '4' / 'state' / '_METADATA').write_text('{}')
  assert checkpoint.all_steps(tmp_path) == [1, 2]
  assert checkpoint.latest_step(tmp_path) == 2
  restored, meta = checkpoint.restore(tmp_path, state)
  assert meta['step'] == 2 and np.array_equal(restored['w'], state['w'] + 1)
  with pytest.raises(FileNotFoundError, match=r'complete steps: \[1, 2\]'):
    checkpoint.restore(tmp_path, state, step=4)

  # The resumed run saves on: the tmp leftover goes, the incomplete step is not deleted
  # (it might be another Orbax version's checkpoint) and blocks only its own name. Orbax
  # counts it among the max_to_keep=3 kept steps, so step 1 goes.
  checkpoint.save(tmp_path, 3, state, {})
  assert sorted(os.listdir(tmp_path)) == ['2', '3', '4']
  assert checkpoint.latest_step(tmp_path) == 3
  with pytest.raises(ValueError, match=r'/4 exists but is not a complete checkpoint'):
    checkpoint.save(tmp_path, 4, state, {})
  # Deleting the newest complete step's marker makes it incomplete as well.
  (tmp_path / '3' / 'commit_success.txt').unlink()
  assert checkpoint.latest_step(tmp_path) == 2


# --- Initialising from another checkpoint. ------------------------------------------------------


def test_load_params_from_a_train_checkpoint_with_another_optimizer(tmp_path):
  # Stage 1 (linear probe, Adam) is saved; stage 2 (full, SGD) has another opt_state
  # structure and reads only the parameters and BatchNorm statistics.
  stage1 = random_state(tx_for(dict(name='linear_probe'), ADAM), seed=3)
  checkpoint.save(tmp_path, 100, stage1, {'plan': 'linear_probe'})
  fresh = random_like(model_and_shapes()[1], seed=4)
  params = checkpoint.load_params(tmp_path, fresh['params'])
  batch_stats = checkpoint.load_params(tmp_path, fresh['batch_stats'], key='batch_stats')
  assert_bit_identical(params, stage1.params)
  assert_bit_identical(batch_stats, stage1.batch_stats)
  stage2_tx = tx_for(dict(name='full'), SGD)
  state = train.create_train_state({'params': params, 'batch_stats': batch_stats}, stage2_tx)
  assert jax.tree.structure(state.opt_state) != jax.tree.structure(stage1.opt_state)


def small_params(seed, **shapes):
  rng = np.random.RandomState(seed)
  flat = {p: rng.normal(size=s).astype(np.float32) for p, s in shapes.items()}
  return paths.unflatten({p.replace('__', '/'): x for p, x in flat.items()})


STORED = dict(block1_conv1__kernel=(3, 3, 3, 4), block1_conv1__bias=(4,), fc3__bias=(10,))
STORED.update(predictions__kernel=(4, 10), predictions__bias=(10,))
EXPECTED = dict(block1_conv1__kernel=(3, 3, 3, 4), block1_conv1__bias=(4,), fc1__kernel=(4, 6))
EXPECTED.update(predictions__kernel=(4, 5), predictions__bias=(5,))


def test_load_params_lists_every_mismatch_in_one_error(tmp_path):
  checkpoint.save_variables(tmp_path, {'params': small_params(0, **STORED)}, {'source': 'test'})
  with pytest.raises(ValueError) as e:
    checkpoint.load_params(tmp_path, small_params(1, **EXPECTED))
  assert str(e.value) == (
    f'checkpoint {tmp_path}/0 does not match the model (params): '
    'missing (1): fc1/kernel (expected (4, 6)); unexpected (1): fc3/bias (10,); '
    'shape mismatch (2): predictions/bias expected (5,) found (10,), '
    'predictions/kernel expected (4, 5) found (4, 10)'
  )
  # The error carries every shape on both sides, for a caller's diagnosis.
  assert e.value.found['predictions/kernel'] == (4, 10)
  assert e.value.expected['fc1/kernel'] == (4, 6)
  # A missing collection is every path missing, not a silent empty load.
  with pytest.raises(
    ValueError, match=r'\(batch_stats\): missing \(5\): block1_conv1/bias \(expected \(4,\)\)'
  ):
    checkpoint.load_params(tmp_path, small_params(1, **EXPECTED), key='batch_stats')


def test_dont_load_keeps_fresh_values_and_loads_the_rest(tmp_path):
  stored = small_params(0, **STORED)
  checkpoint.save_variables(tmp_path, {'params': stored}, {})
  expected = jax.tree.map(jnp.asarray, small_params(1, **EXPECTED))
  expected['block1_conv1'] = jax.tree.map(
    lambda x: x.astype(jnp.bfloat16), expected['block1_conv1']
  )
  # Whole paths: 'conv1/.*' names no layer here, and does not skip block1_conv1.
  loaded = checkpoint.load_params(tmp_path, expected, dont_load=[r'(conv1|predictions|fc\d)/.*'])
  assert jax.tree.structure(loaded) == jax.tree.structure(expected)
  # Loaded leaves: the stored values, cast to the expected dtype.
  for name in ('kernel', 'bias'):
    got = loaded['block1_conv1'][name]
    assert got.dtype == jnp.bfloat16
    assert np.array_equal(got, stored['block1_conv1'][name].astype(jnp.bfloat16))
  # Skipped leaves: the expected (fresh) arrays themselves.
  assert loaded['predictions']['kernel'] is expected['predictions']['kernel']
  assert loaded['fc1']['kernel'] is expected['fc1']['kernel']


def test_dont_load_that_matches_nothing_is_an_error(tmp_path):
  params = small_params(1, **EXPECTED)
  checkpoint.save_variables(tmp_path, {'params': params}, {})
  assert_bit_identical(checkpoint.load_params(tmp_path, params), params)  # exact match loads
  with pytest.raises(ValueError) as e:
    checkpoint.load_params(tmp_path, params, dont_load=['head/.*', 'predictions/.*'])
  assert str(e.value) == (
    f'checkpoint {tmp_path}/0 does not match the model (params): dont_load regexes matching '
    "no path: 'head/.*'"
  )
  assert e.value.unused_dont_load == ['head/.*']
  # fullmatch, not search: 'predictions' alone names no path.
  with pytest.raises(ValueError, match=r"matching no path: 'predictions'"):
    checkpoint.load_params(tmp_path, params, dont_load=['predictions'])
  with pytest.raises(ValueError, match=r"dont_load: '\[' is not a valid regex"):
    checkpoint.load_params(tmp_path, params, dont_load=['['])
