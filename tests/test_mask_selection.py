"""Mask scores and allocation for per-element selection (issue #25, part 2): SNIP and GPS
scores, `alloc='uniform'|'erk'` on the density selectors, structured `channels` masks and
user-supplied `indices` files, each against a numpy reimplementation on the same scores."""

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from ftlab import parallel, paths, scoring, train
from ftlab.plans import policies
from ftlab.plans.registry import PlanError
from ftlab.plans.selection import erk_counts
from tests import fakes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = fakes.tiny_vgg()
VARIABLES = MODEL.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
PARAMS = VARIABLES['params']
FLAT = {p: np.asarray(x) for p, x in paths.flatten(PARAMS).items()}
STRUCTURE = MODEL.block_structure()
HEAD = ('predictions/bias', 'predictions/kernel')
BACKBONE = [p for p in FLAT if p not in HEAD]
KERNELS = [p for p in BACKBONE if p.endswith('kernel')]


def fake_scores():
  """Fixed score arrays by kind: `gradient` rounded to one decimal (so GPS meets ties),
  `fisher` its square plus noise."""
  rng = np.random.default_rng(0)
  grads = {p: np.round(rng.normal(size=x.shape), 1).astype(np.float32) for p, x in FLAT.items()}
  fisher = {p: g * g + rng.random(g.shape, np.float32) for p, g in grads.items()}
  return {'gradient': grads, 'fisher': fisher}


SCORES = fake_scores()


def plan_for(name, scores=SCORES, params=PARAMS):
  return policies.make_plan(
    params, STRUCTURE, ConfigDict(dict(name=name)), scores_fn=lambda kind, n: scores[kind]
  )


def chosen(plan, path):
  """The boolean entry mask of one leaf."""
  if path in plan.element_levels:
    return np.asarray(plan.element_levels[path]) > 0
  return np.full(FLAT[path].shape, bool(plan.flat_mask()[path]))


def assert_count_matches_mask(plan):
  """The plan's `trainable_parameters` (`policies.trainable_count`) is its mask's count."""
  n, _ = policies.trainable_count(plan, PARAMS)
  assert n == sum(int(chosen(plan, p).sum()) for p in FLAT)


def numpy_top(scores, k):
  """The top `k` entries over the given leaves together, by a full sort (no ties expected)."""
  flat = np.concatenate([scores[p].ravel() for p in scores])
  mask = np.zeros(flat.size, bool)
  mask[np.argsort(-flat, kind='stable')[:k]] = True
  out, at = {}, 0
  for p, s in scores.items():
    out[p] = mask[at : at + s.size].reshape(s.shape)
    at += s.size
  return out


# --- SNIP. ------------------------------------------------------------------------------------


def test_snip_chooses_the_top_of_abs_weight_times_gradient():
  plan = plan_for('snip(0.05, num_batches=2)')
  reference = {p: np.abs(FLAT[p] * SCORES['gradient'][p]) for p in BACKBONE}
  k = round(0.05 * sum(s.size for s in reference.values()))
  flat = np.concatenate([reference[p].ravel() for p in BACKBONE])
  got = np.concatenate([chosen(plan, p).ravel() for p in BACKBONE])
  assert got.sum() == k
  # Equal |w * g| values may be split either way at the threshold: compare the chosen values.
  np.testing.assert_array_equal(np.sort(flat[got]), np.sort(flat)[-k:])
  assert all(chosen(plan, p).all() for p in HEAD)
  assert_count_matches_mask(plan)


@functools.lru_cache(maxsize=None)
def mean_gradient_by_pass():
  """The run's `gradient` pass (`scoring.gradient_step`, one device): summed gradients over
  2 batches of 16 divided by the count, as `Scorer.scores` does."""
  spread = parallel.Spread('pmap', jax.devices()[:1])
  scope = policies.make_plan(PARAMS, STRUCTURE, ConfigDict(dict(name='full')))
  p_step = spread.compile(
    functools.partial(scoring.gradient_step, model=MODEL, trainable_mask=scope.trainable_mask),
    in_kinds=(parallel.REPLICATED, parallel.SHARDED),
  )
  state = spread.replicate(train.TrainState(jnp.zeros((), jnp.int32), PARAMS, {}, ()))
  sums = [p_step(state, spread.shard(b)) for b in fakes.image_batches(2, seed=3)]
  total = jax.device_get(spread.unreplicate(jax.tree.map(jnp.add, *sums)))
  return {p: v / total['count'] for p, v in paths.flatten(total['grads']).items()}


@pytest.mark.slow  # a compile-heavy pass or a subprocess: the whole suite runs it
def test_the_gradient_pass_is_the_mean_gradient_snip_and_gps_read():
  batches = fakes.image_batches(2, seed=3)
  images = np.concatenate([b['image'] for b in batches])
  labels = np.concatenate([b['label'] for b in batches])

  def mean_loss(p):
    logits = MODEL.apply({'params': p}, images, train=False)
    return train.cross_entropy(logits, labels).mean()

  reference = paths.flatten(jax.grad(mean_loss)(PARAMS))
  found = mean_gradient_by_pass()
  for p in reference:
    np.testing.assert_allclose(found[p], reference[p], rtol=2e-4, atol=1e-7)
  # SNIP on the real pass: the top |w * g| of the backbone.
  plan = plan_for('snip(0.02, num_batches=2)', scores={'gradient': found})
  saliency = {p: np.abs(FLAT[p] * np.asarray(found[p])) for p in BACKBONE}
  flat = np.concatenate([saliency[p].ravel() for p in BACKBONE])
  got = np.concatenate([chosen(plan, p).ravel() for p in BACKBONE])
  k = round(0.02 * flat.size)
  assert got.sum() == k and flat[got].min() >= np.sort(flat)[-k]


# --- GPS. -------------------------------------------------------------------------------------


def gps_by_loop(grads, k):
  """GPS the slow, obvious way: per output unit, the k largest |g| of its fan-in, lower index
  first among equals."""
  mask = np.zeros(grads.shape, bool)
  by_unit = np.abs(grads).reshape(-1, grads.shape[-1])
  flat_mask = mask.reshape(-1, grads.shape[-1])
  for unit in range(by_unit.shape[1]):
    order = sorted(range(by_unit.shape[0]), key=lambda i: (-by_unit[i, unit], i))
    flat_mask[order[:k], unit] = True
  return flat_mask.reshape(grads.shape)


@pytest.mark.parametrize('k', [1, 5, 40])
def test_gps_takes_the_top_k_incoming_weights_of_every_unit(k):
  plan = plan_for(f'gps({k}, num_batches=2)')
  for p in KERNELS:
    expected = gps_by_loop(SCORES['gradient'][p], k)
    np.testing.assert_array_equal(chosen(plan, p), expected, err_msg=p)
    fan_in = FLAT[p].size // FLAT[p].shape[-1]
    per_unit = chosen(plan, p).reshape(-1, FLAT[p].shape[-1]).sum(axis=0)
    assert (per_unit == min(k, fan_in)).all(), p
  # Biases train whole beside the chosen weights, as in the paper's code; the head whole.
  assert all(chosen(plan, p).all() for p in BACKBONE if p.endswith('bias'))
  assert all(chosen(plan, p).all() for p in HEAD)
  assert_count_matches_mask(plan)


def test_gps_composes_with_set_terms_and_drops_the_head_on_request():
  gps = plan_for('gps(3)')
  both = plan_for('gps(3) & blocks([4, 5])')
  weights = plan_for('gps(3, train_head=False) - bitfit(train_head=False)')
  plus = plan_for('gps(3, train_head=False) | bitfit')
  for p in FLAT:
    in_blocks = p.startswith(('block4', 'block5')) or p in HEAD
    np.testing.assert_array_equal(chosen(both, p), chosen(gps, p) & in_blocks)
    if p.endswith('bias') or p in HEAD:  # weights only: no bias, no head
      assert not chosen(weights, p).any(), p
    else:
      np.testing.assert_array_equal(chosen(weights, p), chosen(gps, p))
    # bitfit brings back the head (and its biases), and nothing else.
    np.testing.assert_array_equal(chosen(plus, p), chosen(gps, p))
  assert_count_matches_mask(both)
  assert_count_matches_mask(weights)
  assert_count_matches_mask(plus)


# --- Allocation. ------------------------------------------------------------------------------


def old_global_mask(scores, density):
  """`top_fraction` as it was before `alloc`: one argpartition over all leaves."""
  flat = np.concatenate([np.asarray(s, np.float64).ravel() for s in scores.values()])
  k = int(round(density * flat.size))
  mask = np.zeros(flat.size, bool)
  mask[np.argpartition(-flat, k - 1)[:k]] = True
  out, at = {}, 0
  for p, s in scores.items():
    out[p] = mask[at : at + s.size].reshape(s.shape)
    at += s.size
  return out


@pytest.mark.parametrize('method', ['magnitude', 'fisher', 'random_sparse', 'snip'])
def test_global_alloc_is_the_default_and_unchanged_bit_for_bit(method):
  default = plan_for(f'{method}(0.05)')
  named = plan_for(f"{method}(0.05, alloc='global')")
  if method == 'magnitude':
    scores = {p: np.abs(FLAT[p].astype(np.float32)) for p in BACKBONE}
  elif method == 'fisher':
    scores = {p: SCORES['fisher'][p] for p in BACKBONE}
  elif method == 'snip':
    scores = {p: np.abs(FLAT[p] * SCORES['gradient'][p]) for p in BACKBONE}
  else:
    rng = np.random.default_rng(0)
    scores = {p: rng.random(FLAT[p].shape, np.float32) for p in BACKBONE}
  expected = old_global_mask(scores, 0.05)
  for p in BACKBONE:
    np.testing.assert_array_equal(chosen(default, p), expected[p], err_msg=p)
    np.testing.assert_array_equal(chosen(named, p), expected[p], err_msg=p)


def erk_by_sorting(shapes, density):
  """ERK counts in closed form: cap the leaves in decreasing order of their raw density
  sum/prod until eps * (largest raw density left) <= 1, then round by largest remainder."""
  sizes = {p: int(np.prod(s)) for p, s in shapes.items()}
  raw = {p: sum(s) / sizes[p] for p, s in shapes.items()}
  order = sorted(shapes, key=lambda p: -raw[p])
  target = density * sum(sizes.values())
  for j in range(len(order) + 1):
    dense, rest = order[:j], order[j:]
    eps = (target - sum(sizes[p] for p in dense)) / sum(raw[p] * sizes[p] for p in rest)
    if eps * raw[rest[0]] <= 1:
      break
  exact = {p: sizes[p] if p in dense else eps * raw[p] * sizes[p] for p in shapes}
  counts = {p: int(np.floor(x)) for p, x in exact.items()}
  short = round(density * sum(sizes.values())) - sum(counts.values())
  for p in sorted(shapes, key=lambda p: -(exact[p] - counts[p]))[:short]:
    counts[p] += 1
  return counts, set(dense)


def test_erk_counts_cap_dense_leaves_and_match_the_closed_form():
  shapes = {'a': (3, 3, 3, 4), 'b': (3, 3, 4, 8), 'c': (3, 3, 8, 64), 'd': (64, 10), 'e': (8,)}
  for density in (0.01, 0.1, 0.3, 0.9, 1.0):
    expected, dense = erk_by_sorting(shapes, density)
    got = erk_counts(shapes, density)
    assert got == expected, density
    assert sum(got.values()) == round(density * sum(np.prod(s) for s in shapes.values()))
    for p in dense:
      assert got[p] == np.prod(shapes[p])
  # The capping case: at 0.3 the bias (raw density 1), then the small kernels a (13/108) and
  # d (74/640) pass 1 in turn and are dense; b and c share the rest.
  _, dense = erk_by_sorting(shapes, 0.3)
  assert dense == {'e', 'a', 'd'}, dense
  assert erk_counts(shapes, 0.3)['c'] < np.prod(shapes['c'])


@pytest.mark.parametrize('alloc', ['uniform', 'erk'])
@pytest.mark.parametrize('method', ['magnitude', 'fisher', 'random_sparse', 'snip'])
def test_uniform_and_erk_give_each_leaf_its_count_of_its_top_entries(method, alloc):
  density = 0.05
  plan = plan_for(f"{method}(density={density}, alloc='{alloc}')")
  shapes = {p: FLAT[p].shape for p in BACKBONE}
  if alloc == 'uniform':
    expected = {p: round(density * FLAT[p].size) for p in BACKBONE}
    dense = set()
  else:
    expected, dense = erk_by_sorting(shapes, density)
    total = sum(FLAT[p].size for p in BACKBONE)
    assert sum(expected.values()) == round(density * total)
    assert dense and all(p.endswith('bias') for p in dense)  # RigL: biases go dense first
  for p in BACKBONE:
    mask = chosen(plan, p)
    assert mask.sum() == expected[p], (p, mask.sum(), expected[p])
  if method == 'magnitude':  # within each leaf, the largest |w|
    for p in BACKBONE:
      mask, size = chosen(plan, p), np.abs(FLAT[p])
      if 0 < mask.sum() < mask.size:
        assert size[mask].min() >= size[~mask].max(), p
  assert all(chosen(plan, p).all() for p in HEAD)
  assert_count_matches_mask(plan)


def test_alloc_values_are_one_line_errors_before_weights_load():
  shapes = jax.eval_shape(lambda: PARAMS)
  for name, message in [
    ("magnitude(0.1, alloc='layer')", "alloc='layer'; valid: global, uniform, erk"),
    ("fisher(0.1, alloc='ERK')", "alloc='ERK'; valid"),
    ('gps(0)', 'k=0 is not a positive int'),
    ("channels(0.1, score='l2')", "score='l2'; valid: magnitude, fisher, snip"),
    ('channels(1.5)', r'density=1.5 is not a fraction in (0, 1]'),
    ("child_tuning_d(0.1, alloc='erk')", "has no argument 'alloc'"),
  ]:
    with pytest.raises(PlanError) as e:
      policies.make_plan(shapes, STRUCTURE, ConfigDict(dict(name=name)))
    assert message in str(e.value) and '\n' not in str(e.value), (name, str(e.value))


# --- Structured masks. ------------------------------------------------------------------------


@pytest.mark.parametrize('score', ['magnitude', 'fisher', 'snip'])
@pytest.mark.parametrize('density', [0.1, 0.5])
def test_channels_train_whole_filters_and_exactly_their_number(score, density):
  plan = plan_for(f"channels({density}, score='{score}', num_batches=1)")
  if score == 'magnitude':
    entries = {p: np.abs(FLAT[p]) for p in KERNELS}
  elif score == 'fisher':
    entries = {p: SCORES['fisher'][p] for p in KERNELS}
  else:
    entries = {p: np.abs(FLAT[p] * SCORES['gradient'][p]) for p in KERNELS}
  per_unit = {p: e.reshape(-1, e.shape[-1]).mean(axis=0) for p, e in entries.items()}
  n_units = sum(u.size for u in per_unit.values())
  expected = numpy_top(per_unit, round(density * n_units))
  n_chosen = 0
  for p in KERNELS:
    mask = chosen(plan, p).reshape(-1, FLAT[p].shape[-1])
    whole = mask.all(axis=0)
    assert np.array_equal(whole, mask.any(axis=0)), f'{p}: a filter is partly trained'
    np.testing.assert_array_equal(whole, expected[p], err_msg=p)
    bias = p.replace('kernel', 'bias')
    np.testing.assert_array_equal(chosen(plan, bias), whole, err_msg=bias)
    n_chosen += int(whole.sum())
  assert n_chosen == round(density * n_units)
  assert all(chosen(plan, p).all() for p in HEAD)
  assert_count_matches_mask(plan)


def test_channels_leave_batch_norm_frozen_and_compose():
  model = fakes.tiny_vgg(batch_norm=True)
  params = model.init(jax.random.key(1), jnp.zeros((1, 32, 32, 3)), train=False)['params']
  structure = model.block_structure()
  plan = policies.make_plan(params, structure, ConfigDict(dict(name='channels(0.25)')))
  flat = paths.flatten(plan.trainable_mask)
  assert not any(flat[p] for p in flat if '_bn/' in p)
  assert any(flat[p] for p in flat if p.endswith('conv1/kernel'))
  # GPS too: its candidates (planned on shapes) are the kernels and their biases, never BN.
  gps = policies.make_plan(
    jax.eval_shape(lambda: params), structure, ConfigDict(dict(name='gps(2)'))
  )
  trained = {p for p, t in paths.flatten(gps.trainable_mask).items() if t}
  assert gps.masks_pending and trained == {p for p in flat if '_bn/' not in p}
  last = policies.make_plan(
    params, structure, ConfigDict(dict(name='channels(0.25) & blocks([5])'))
  )
  trained = {p for p, t in paths.flatten(last.trainable_mask).items() if t}
  assert trained <= {p for p in flat if p.startswith('block5') or p.startswith('predictions')}


# --- User-supplied masks. ---------------------------------------------------------------------


def test_indices_files_give_exactly_the_mask_they_encode(tmp_path):
  rng = np.random.default_rng(1)
  kernel = rng.random(FLAT['block4_conv1/kernel'].shape) < 0.1
  flat_idx = np.array([0, 5, 5, FLAT['block2_conv1/bias'].size - 1], np.int64)  # a repeat
  np.savez(tmp_path / 'mask.npz', **{'block4_conv1/kernel': kernel, 'block2_conv1/bias': flat_idx})
  plan = plan_for(f"indices('{tmp_path / 'mask.npz'}')")
  bias = np.zeros(FLAT['block2_conv1/bias'].size, bool)
  bias[flat_idx] = True
  for p in BACKBONE:
    expected = {'block4_conv1/kernel': kernel, 'block2_conv1/bias': bias}.get(p)
    if expected is None:
      assert not chosen(plan, p).any(), p
    else:
      np.testing.assert_array_equal(chosen(plan, p), expected, err_msg=p)
  assert all(chosen(plan, p).all() for p in HEAD)
  assert_count_matches_mask(plan)
  assert policies.trainable_count(plan, PARAMS)[0] == kernel.sum() + 3 + sum(
    FLAT[p].size for p in HEAD
  )
  # Shapes are enough (the launch check): the same mask, nothing pending.
  shaped = policies.make_plan(
    jax.eval_shape(lambda: PARAMS),
    STRUCTURE,
    ConfigDict(dict(name=f"indices('{tmp_path / 'mask.npz'}', train_head=False)")),
  )
  assert not shaped.masks_pending
  np.testing.assert_array_equal(shaped.element_levels['block4_conv1/kernel'] > 0, kernel)
  assert not any(paths.flatten(shaped.trainable_mask)[p] for p in HEAD)


BAD_FILES = [
  ({'block4_conv1/kernal': np.ones((3, 3, 16, 32), bool)}, "did you mean 'block4_conv1/kernel'"),
  ({'block4_conv1/kernel': np.ones((3, 3, 32, 16), bool)}, 'shape is (3, 3, 16, 32)'),
  ({'block2_conv1/bias': np.array([3, 8])}, 'index 8 out of range [0, 8)'),
  ({'block2_conv1/bias': np.array([-1])}, 'index -1 out of range'),
  ({'block2_conv1/bias': np.ones(8, np.float32)}, 'dtype float32; expected bool'),
  ({'block2_conv1/kernel': np.zeros((2, 2), np.int32)}, 'flat indices are 1-D'),
]


@pytest.mark.parametrize('contents, message', BAD_FILES)
def test_bad_indices_files_are_one_line_errors_on_shapes(tmp_path, contents, message):
  np.savez(tmp_path / 'bad.npz', **contents)
  with pytest.raises(PlanError) as e:
    policies.make_plan(
      jax.eval_shape(lambda: PARAMS),
      STRUCTURE,
      ConfigDict(dict(name=f"indices('{tmp_path / 'bad.npz'}')")),
    )
  assert message in str(e.value) and '\n' not in str(e.value), str(e.value)
  assert str(tmp_path / 'bad.npz') in str(e.value)


def test_unreadable_indices_files_are_one_line_errors(tmp_path):
  (tmp_path / 'text.npz').write_text('not an archive')
  np.save(tmp_path / 'one.npy', np.ones(3, bool))
  for name, message in [
    (tmp_path / 'absent.npz', 'cannot be read as an .npz file'),
    (tmp_path / 'text.npz', 'cannot be read as an .npz file'),
    (tmp_path / 'one.npy', 'not an .npz archive'),
  ]:
    with pytest.raises(PlanError) as e:
      plan_for(f"indices('{name}')")
    assert message in str(e.value) and '\n' not in str(e.value), str(e.value)


@pytest.mark.slow  # a compile-heavy pass or a subprocess: the whole suite runs it
def test_a_bad_indices_file_stops_a_real_run_with_exit_2_before_compute(tmp_path):
  # About 7 s on 2 CPU cores (the import of jax and the dataset's metadata): slow tier.
  # runlocal's model (narrow VGG11-BN): a kernel of the wrong shape.
  np.savez(tmp_path / 'bad.npz', **{'block3_conv2/kernel': np.ones((3, 3, 3, 3), bool)})
  out = subprocess.run(
    [
      sys.executable,
      '-m',
      'ftlab.main',
      '--config=configs/default.py:runlocal',
      f'--workdir={tmp_path / "run"}',
      f"--config.policy.name=indices('{tmp_path / 'bad.npz'}')",
    ],
    cwd=ROOT,
    env={**os.environ, 'PYTHONPATH': ROOT},
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert out.returncode == 2, out.stderr[-2000:]
  assert 'Traceback' not in out.stderr
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith('error: policy indices: ') and "'block3_conv2/kernel'" in last, last
  assert not (tmp_path / 'run').exists()  # refused before anything was written or trained


@pytest.mark.parametrize(
  'expression',
  [
    'fisher(0.05, num_batches=1)',
    pytest.param('snip(0.05, num_batches=1)', marks=pytest.mark.slow),
    pytest.param('gps(3, num_batches=1)', marks=pytest.mark.slow),
  ],
)
def test_score_masks_intersected_with_blocks_choose_inside_them(expression, tmp_path):
  """The score pass differentiates only what `& blocks([4, 5])` can train; the selectors rank
  the leaves it left out last (before, the first unscored leaf was a KeyError)."""
  from configs import default
  from ftlab import run
  from tests.run_files import plain_vgg11

  config = plain_vgg11(default.get_config('runlocal'))
  config.policy.name = f'{expression} & blocks([4, 5])'
  built = run.make_run(config, str(tmp_path))
  (plan,) = [s.plan for s in built.stages]
  mask = plan.flat_mask()
  params = paths.flatten(built.variables['params'])
  trained = {
    p: int(np.count_nonzero(plan.element_levels[p])) if p in plan.element_levels else params[p].size
    for p in mask
    if mask[p]
  }
  outside = [
    p
    for p, n in trained.items()
    if n and not p.startswith(('block4', 'block5', 'fc', 'predictions'))
  ]
  assert not outside
  inside = sum(n for p, n in trained.items() if p.startswith(('block4', 'block5')))
  if expression.startswith('gps'):
    kernels = [p for p in params if p.startswith(('block4', 'block5')) and p.endswith('/kernel')]
    assert inside == sum(3 * params[p].shape[-1] + params[p].shape[-1] for p in kernels)
  else:
    # Exactly round(0.05 n) of the backbone's n entries, all in blocks 4-5.
    backbone = sum(x.size for p, x in params.items() if not p.startswith(('fc', 'predictions')))
    assert inside == round(0.05 * backbone)
