"""Dynamic masks: exact top-k with deterministic ties, RigL's drop-and-grow against numpy, the
count exact after every change, entries outside the mask unchanged within a period, optimizer
moments of re-masked entries reset, and one-line errors for bad arguments."""

import jax
import numpy as np
import optax
import pytest

from ftlab import parallel, paths, train
from ftlab.plans import dynamic_masks, optim, selection, syntax
from ftlab.plans.methods import rigl
from tests.test_plans import PARAMS, VARIABLES, batches, bits, opt_config, plan_for

SCOPE = ('a', 'b')


def numpy_top(scores, count):
  """The reference: rank by (-score, flat index) with np.lexsort, NaN as -inf."""
  flat = np.concatenate([np.ravel(scores[p]) for p in SCOPE]).astype(np.float32)
  flat = np.where(np.isnan(flat), -np.inf, flat)
  order = np.lexsort((np.arange(flat.size), -flat))
  chosen = np.zeros(flat.size, bool)
  chosen[order[:count]] = True
  return chosen


def flat(mask):
  return np.concatenate([np.ravel(np.asarray(mask[p])) for p in SCOPE])


def test_top_count_is_exact_with_ties_to_the_lower_index_and_nan_last():
  rng = np.random.default_rng(0)
  # Few distinct values: many ties at every boundary; NaNs and -0.0 beside 0.0.
  scores = {
    'a': rng.integers(0, 4, (6, 5)).astype(np.float32),
    'b': rng.integers(0, 4, (7,)).astype(np.float32),
  }
  scores['a'][0, :2] = np.nan
  scores['b'][:3] = [-0.0, 0.0, np.inf]
  for count in (0, 1, 5, 11, 20, 36, 37):
    expected = numpy_top(scores, count)
    compiled = flat(jax.jit(dynamic_masks.top_count, static_argnums=(1, 2))(scores, count, SCOPE))
    host = flat(selection.top_count({p: scores[p] for p in SCOPE}, count))
    assert compiled.sum() == count
    np.testing.assert_array_equal(compiled, expected)
    np.testing.assert_array_equal(host, expected)


def test_rigl_drops_smallest_trained_and_grows_largest_gradient():
  rng = np.random.default_rng(1)
  shapes = {'a': (20, 10), 'b': (50,)}
  trained = {p: rng.random(s) < 0.2 for p, s in shapes.items()}
  count = int(flat(trained).sum())
  magnitudes = {p: np.abs(rng.normal(size=s)).astype(np.float32) for p, s in shapes.items()}
  growth = {p: np.abs(rng.normal(size=s)).astype(np.float32) for p, s in shapes.items()}
  new = rigl.rigl_choice(trained, magnitudes, growth, count, 0.3, SCOPE)
  swap = round(0.3 * count)
  active, m, g = flat(trained), flat(magnitudes), flat(growth)
  dropped = np.flatnonzero(active)[np.argsort(m[active], kind='stable')[:swap]]
  grown = np.flatnonzero(~active)[np.argsort(-g[~active], kind='stable')[:swap]]
  expected = active.copy()
  expected[dropped], expected[grown] = False, True
  np.testing.assert_array_equal(flat(new), expected)
  assert flat(new).sum() == count


@pytest.mark.parametrize(
  'name',
  [
    'rigl(0.05, every=2, fraction=0.5)',
    'reselect(magnitude(0.05), every=2, blocks=[4, 5])',
    'reselect(fisher(0.05, num_batches=2), every=2)',
  ],
)
def test_count_exact_and_unmasked_entries_still_within_each_period(name):
  """Six Adam steps (1 device), the mask changed before steps 3 and 5 as the run loop does;
  the scores of fisher and rigl here are random (the run's estimators are tested end to end)."""
  plan = plan_for(name)
  dynamic = plan.dynamic
  opt = opt_config(name='adam', learning_rate=1e-2, weight_decay=1e-3)
  tx = optim.make(plan, opt, 6, anchor=paths.flatten(PARAMS))
  spread = parallel.Spread('pmap', jax.devices()[:1])
  p_train_step, _ = train.compile_steps(spread, model=plan_model(), tx=tx, plan=plan)
  remask = dynamic_masks.compile_remask(dynamic)
  state = train.create_train_state(VARIABLES, tx)
  rng = np.random.default_rng(0)
  entered = 0
  for period, data in enumerate([batches(2, seed=s) for s in (1, 2, 3)]):
    if period:  # before steps 3 and 5
      before = dynamic_masks.current_mask(state.opt_state, dynamic.scope)
      scores = {p: rng.random(np.shape(paths.flatten(PARAMS)[p])) for p in dynamic.scope}
      new_opt_state, stats = remask(state.opt_state, state.params, scores)
      after = dynamic_masks.current_mask(new_opt_state, dynamic.scope)
      check_moments(state.opt_state, new_opt_state, before, after)
      entered += int(stats['entered'])
      state = state.replace(opt_state=new_opt_state)
    mask = {
      p: np.asarray(m)
      for p, m in dynamic_masks.current_mask(state.opt_state, dynamic.scope).items()
    }
    assert sum(int(m.sum()) for m in mask.values()) == dynamic.count
    start = paths.flatten(state.params)
    replicated = spread.replicate(state)
    for batch in data:
      replicated, _ = p_train_step(replicated, spread.shard(batch), jax.random.key(0))
    state = jax.device_get(spread.unreplicate(replicated))
    end = paths.flatten(state.params)
    for p in dynamic.scope:
      moved = bits(start[p]) != bits(end[p])
      assert not np.any(moved & ~mask[p]), f'{name}: {p} moved outside the mask'
    assert sum(int((bits(start[p]) != bits(end[p])).sum()) for p in dynamic.scope) > 0
    for p in set(start) - set(dynamic.scope) - {'predictions/bias', 'predictions/kernel'}:
      assert bits(start[p]).tobytes() == bits(end[p]).tobytes(), p  # outside the scope
  if 'magnitude' not in name:  # random scores: the mask changes
    assert entered > 0


def plan_model():
  from tests.test_plans import MODEL

  return MODEL


def adam_moments(opt_state):
  found = []
  jax.tree.map(
    lambda x: found.append(x) if isinstance(x, optax.ScaleByAdamState) else None,
    opt_state,
    is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState),
  )
  (adam,) = found
  return paths.flatten(jax.tree.map(np.asarray, adam.mu)), adam


def check_moments(old_state, new_state, before, after):
  """Moments of entries whose membership changed are zero; the others are untouched; the
  step count is kept."""
  (old_mu, old), (new_mu, new) = adam_moments(old_state), adam_moments(new_state)
  old_nu, new_nu = paths.flatten(old.nu), paths.flatten(new.nu)
  assert int(old.count) == int(new.count)
  for p in before:
    changed = np.asarray(before[p]) != np.asarray(after[p])
    for o, n in ((old_mu[p], new_mu[p]), (old_nu[p], new_nu[p])):
      n, o = np.asarray(n), np.asarray(o)
      assert np.all(n[changed] == 0)
      np.testing.assert_array_equal(n[~changed], o[~changed])


@pytest.mark.parametrize(
  'expression, message',
  [
    ('rigl(1.5, every=10, fraction=0.3)', 'density=1.5 is not a fraction in (0, 1]'),
    ('rigl(0.01, every=0, fraction=0.3)', 'every=0 is not a positive int'),
    ('rigl(0.01, every=10, fraction=0)', 'fraction=0 is not a fraction in (0, 1]'),
    ('rigl(1.0, every=10, fraction=0.3)', 'density=1.0 leaves nothing to change'),
    ('reselect(fisher(0.01), every=2.5)', 'every=2.5 is not a positive int'),
    ('reselect(bitfit, every=10)', 'reselect chooses by fisher or magnitude, not bitfit'),
    ('reselect(fisher(0.01), every=5) | bitfit', 'cannot be combined with | & -'),
    ('rigl(0.01, every=5, fraction=0.3, blocks=[9])', "blocks=[9]; valid: ['block1'"),
  ],
)
def test_bad_dynamic_plans_are_one_line_errors(expression, message):
  with pytest.raises(syntax.PlanError) as e:
    plan_for(expression)
  assert message in str(e.value) and '\n' not in str(e.value)


def test_dynamic_plan_on_shapes_checks_arguments_and_marks_the_scope():
  shapes = jax.eval_shape(lambda: PARAMS)
  with pytest.raises(syntax.PlanError, match='every=-1'):
    plan_for('rigl(0.1, every=-1, fraction=0.3)', params=shapes)
  plan = plan_for('rigl(0.1, every=4, fraction=0.3, blocks=[5])', params=shapes)
  trained = sorted(p for p, t in plan.flat_mask().items() if t)
  assert trained == sorted(
    [f'block5_conv{i}/{k}' for i in (1, 2) for k in ('bias', 'kernel')]
    + ['predictions/bias', 'predictions/kernel']
  )
  assert plan.masks_pending
