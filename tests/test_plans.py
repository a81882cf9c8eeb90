"""The policy library: per-element masks, lr shapes, L2-SP, composition, schedules."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from ftlab import parallel, paths, scoring, train
from ftlab.models import vgg
from ftlab.plans import optim, policies, syntax
from tests import fakes

MODEL = vgg.VGG(depth=11, num_classes=5, head='gap', width=1 / 16)
VARIABLES = MODEL.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
PARAMS = VARIABLES['params']
STRUCTURE = MODEL.block_structure()
HEAD = ('predictions/bias', 'predictions/kernel')
PARAMS_SHAPES = {p: x.shape for p, x in paths.flatten(PARAMS).items()}
OPTIMIZERS = {
  'sgd_momentum': dict(name='sgd', momentum=0.9, weight_decay=1e-3, learning_rate=0.05),
  'adam': dict(name='adam', weight_decay=1e-3, learning_rate=1e-3),
  'adamw': dict(name='adamw', weight_decay=1e-2, learning_rate=1e-3),
}


def opt_config(**kw):
  return ConfigDict(dict(grad_clip_norm=1.0, warmup_steps=0, schedule='constant', **kw))


batches = fakes.image_batches


def squared_grads_by_loop(params, data):
  """The empirical Fisher's diagonal the slow, obvious way: one jax.grad per example."""

  def loss(p, image, label):
    logits = MODEL.apply({'params': p}, image[None], train=False)
    return train.cross_entropy(logits, label[None]).sum()

  grad_fn = jax.jit(jax.grad(loss))
  total = jax.tree.map(lambda x: np.zeros(x.shape, np.float64), params)
  count = 0
  for batch in data:
    for image, label in zip(batch['image'], batch['label']):
      g = grad_fn(params, image, label)
      total = jax.tree.map(lambda t, gi: t + np.square(np.asarray(gi, np.float64)), total, g)
      count += 1
  return {p: v / count for p, v in paths.flatten(total).items()}


@functools.lru_cache(maxsize=None)
def fisher_scores():
  """The run loop's computation: fisher_step spread over 8 devices, 2 batches of 16."""
  spread = parallel.Spread('pmap')
  scope = policies.make_plan(PARAMS, STRUCTURE, ConfigDict(dict(name='full')))
  p_fisher = spread.compile(
    functools.partial(
      scoring.fisher_step, model=MODEL, trainable_mask=scope.trainable_mask, chunk=2
    ),
    in_kinds=(parallel.REPLICATED, parallel.SHARDED),
  )
  state = spread.replicate(train.TrainState(jnp.zeros((), jnp.int32), PARAMS, {}, ()))
  sums = [p_fisher(state, spread.shard(b)) for b in batches(2, seed=7)]
  total = jax.device_get(spread.unreplicate(jax.tree.map(jnp.add, *sums)))
  return {p: v / total['count'] for p, v in paths.flatten(total['squared_grads']).items()}


def plan_for(name, params=PARAMS, **cfg):
  cfg = ConfigDict(dict(name=name, **cfg))
  return policies.make_plan(params, STRUCTURE, cfg, scores_fn=lambda kind, n: fisher_scores())


def levels(plan, path):
  """The entry levels of one leaf as an array (0 frozen, 1 resampled, 2 trained)."""
  if path in plan.element_levels:
    return plan.element_levels[path]
  return np.full(PARAMS_SHAPES[path], 2 if plan.flat_mask()[path] else 0, np.uint8)


def train_steps(plan, opt, steps=10, seed=0):
  """`steps` steps of the real spread step (1 device); returns (initial, final) params."""
  tx = optim.make(plan, opt_config(**opt), steps, anchor=paths.flatten(PARAMS), seed=seed)
  spread = parallel.Spread('pmap', jax.devices()[:1])
  p_train_step, _ = train.compile_steps(spread, model=MODEL, tx=tx, plan=plan)
  state = spread.replicate(train.create_train_state(VARIABLES, tx))
  for batch in batches(steps):
    state, _ = p_train_step(state, spread.shard(batch), jax.random.key(0))
  return paths.flatten(PARAMS), paths.flatten(jax.device_get(spread.unreplicate(state)).params)


def bits(x):
  return np.asarray(x).view(np.uint32)


ELEMENT_PLANS = [
  'random_sparse(density=0.05, seed=3)',
  "magnitude(density=0.05, which='largest')",
  "magnitude(density=0.05, which='smallest')",
  'fisher(density=0.05, num_batches=2)',
  'child_tuning_d(p=0.05, num_batches=2)',
]


@pytest.mark.parametrize('opt', list(OPTIMIZERS))
@pytest.mark.parametrize('name', ELEMENT_PLANS)
def test_masked_entries_stay_bit_identical_and_density_is_exact(name, opt):
  plan = plan_for(name)
  backbone = [p for p in plan.flat_mask() if p not in HEAD]
  chosen = {p: levels(plan, p) > 0 for p in backbone}
  n_backbone = sum(m.size for m in chosen.values())
  assert sum(int(m.sum()) for m in chosen.values()) == round(0.05 * n_backbone)
  before, after = train_steps(plan, OPTIMIZERS[opt])
  changed = {p: bits(before[p]) != bits(after[p]) for p in backbone}
  for p in backbone:
    assert not np.any(changed[p] & ~chosen[p]), f'{p}: a masked entry moved'
  realised = sum(int(c.sum()) for c in changed.values()) / n_backbone
  # A chosen entry stays put only if its every update was exactly zero (a dead unit's
  # bias under Adam); with these data none is.
  assert realised == pytest.approx(0.05, abs=0.05 * 0.02), realised
  assert all(np.any(bits(before[p]) != bits(after[p])) for p in HEAD)


@pytest.mark.slow  # many compiled steps
def test_child_tuning_f_draws_a_fresh_mask_each_step_scaled_by_one_over_p():
  plan = plan_for('child_tuning_f(p=0.3)')
  assert plan.resample_p == 0.3
  plain_sgd = dict(name='sgd', momentum=0.0, weight_decay=0.0, learning_rate=0.1)
  full = plan_for('full')
  w0, w_full = train_steps(full, plain_sgd, steps=1)
  _, w_ct = train_steps(plan, plain_sgd, steps=1)
  kernels = [p for p in w0 if p.endswith('kernel') and p not in HEAD]
  # Entries with a zero gradient (dead units) cannot move: count among those that can.
  live = np.concatenate([(w_full[p] != w0[p]).ravel() for p in kernels])
  moved = np.concatenate([(w_ct[p] != w0[p]).ravel() for p in kernels])
  assert not np.any(moved & ~live)
  assert moved[live].mean() == pytest.approx(0.3, abs=0.02)  # Bernoulli(0.3), ~12k entries
  for p in kernels:
    m = w_ct[p] != w0[p]
    # A sampled entry's step is the full plan's step divided by p (clipping sees the
    # same gradient in both); atol: float32 rounding of w + update.
    np.testing.assert_allclose(
      (w_ct[p] - w0[p])[m], (w_full[p] - w0[p])[m] / 0.3, rtol=2e-3, atol=2e-7
    )
  # Ten steps draw ten masks: far more than 30% of the entries have moved (1 - 0.7**10 = 97%
  # of those with a nonzero gradient at every step; some units are dead at some steps).
  _, w_ten = train_steps(plan, plain_sgd, steps=10)
  _, w_ten_full = train_steps(full, plain_sgd, steps=10)
  live = np.concatenate([(w_ten_full[p] != w0[p]).ravel() for p in kernels])
  moved = np.concatenate([(w_ten[p] != w0[p]).ravel() for p in kernels])
  assert 0.8 < moved[live].mean() < 0.999


def test_fisher_step_matches_per_example_gradients_and_picks_their_top_entries():
  reference = squared_grads_by_loop(PARAMS, batches(2, seed=7))
  scores = fisher_scores()
  for p in reference:
    np.testing.assert_allclose(scores[p], reference[p], rtol=2e-4, atol=1e-12)
  plan = plan_for('fisher(density=0.02, num_batches=2)')
  backbone = [p for p in reference if p not in HEAD]
  flat = np.concatenate([reference[p].ravel() for p in backbone])
  k = round(0.02 * flat.size)
  threshold = np.sort(flat)[-k]
  chosen = np.concatenate([(levels(plan, p) > 0).ravel() for p in backbone])
  assert chosen.sum() == k
  assert flat[chosen].min() >= threshold * (1 - 1e-4)  # the top-k of the numpy scores
  assert np.sort(flat[chosen])[::-1] == pytest.approx(np.sort(flat)[::-1][:k], rel=1e-4)


def test_l2_sp_pulls_toward_the_loaded_weights_not_zero():
  plan = plan_for('full + l2_sp(alpha=0.5, beta=0.25)')
  w0 = paths.flatten(PARAMS)
  w = {p: x + 1.0 for p, x in w0.items()}  # moved away from the anchor
  lr = 0.1
  tx = optim.make(
    plan,
    opt_config(name='sgd', momentum=0.0, weight_decay=0.0, learning_rate=lr),
    10,
    anchor=w0,
  )
  params = paths.unflatten(w)
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero_grads, tx.init(params), params)
  new = paths.flatten(jax.tree.map(jnp.add, params, updates))
  for p in w:
    if p in HEAD:  # the new head: plain L2 toward zero
      expected = w[p] - lr * 0.25 * w[p]
    else:  # w - lr * alpha * (w - w0): one step toward w0
      expected = w[p] - lr * 0.5 * (w[p] - w0[p])
    np.testing.assert_allclose(new[p], expected, rtol=1e-6, atol=1e-7)
  with pytest.raises(ValueError, match='no anchor'):
    optim.make(plan, opt_config(name='sgd', learning_rate=0.1), 10)


def test_lr_shapes_follow_the_block_order():
  decay = paths.flatten(plan_for('full + layerwise_lr_decay(0.5)').lr_multipliers)
  # Blocks 1..5 then the head: the head at 1, block5 at 0.5, ..., block1 at 0.5**5.
  assert decay['predictions/kernel'] == 1.0
  assert decay['block5_conv2/kernel'] == 0.5
  assert decay['block1_conv1/bias'] == 0.5**5
  disc = paths.flatten(plan_for('full + discriminative_lr(2.0)').lr_multipliers)
  # VGG11: 8 conv layers then the head: one factor per layer going down.
  assert disc['predictions/kernel'] == 1.0
  assert disc['block5_conv2/kernel'] == 0.5
  assert disc['block5_conv1/kernel'] == 0.25
  assert disc['block1_conv1/kernel'] == 0.5**8
  both = plan_for('last_blocks(1) + layerwise_lr_decay(0.5)', lr_multipliers=[('.*/bias', 3.0)])
  flat = paths.flatten(both.lr_multipliers)
  assert flat['block5_conv1/bias'] == 1.5 and flat['block1_conv1/kernel'] == 0.0


def test_composition_by_union_intersection_and_difference():
  def trainable(plan):
    return {p for p, t in plan.flat_mask().items() if t}

  bitfit, last = plan_for('bitfit'), plan_for('last_blocks(1)')
  assert trainable(plan_for('bitfit | last_blocks(1)')) == trainable(bitfit) | trainable(last)
  assert trainable(plan_for('bitfit & last_blocks(1)')) == trainable(bitfit) & trainable(last)
  assert trainable(plan_for('full - bitfit')) == {
    p for p in PARAMS_SHAPES if not p.endswith('bias') and p not in HEAD
  }
  # Entry by entry: the Fisher top 5% of the whole backbone, kept only in blocks 4 and 5.
  fisher = plan_for('fisher(0.05, num_batches=2)')
  both = plan_for('fisher(0.05, num_batches=2) & blocks([4, 5])')
  for p in PARAMS_SHAPES:
    in_blocks = p.startswith(('block4', 'block5')) or p in HEAD
    np.testing.assert_array_equal(levels(both, p), levels(fisher, p) * in_blocks)
  # A shape-only plan (before the weights load) marks every leaf a mask might train.
  shapes = jax.eval_shape(lambda: PARAMS)
  pending = policies.make_plan(shapes, STRUCTURE, ConfigDict(dict(name='magnitude(0.01)')))
  assert pending.masks_pending and all(pending.flat_mask().values())


def test_audit_table_shows_entry_shares_and_dense_state():
  plan = plan_for('random_sparse(0.05) + l2_sp(alpha=0.01)')
  table = policies.audit_table(plan, PARAMS)
  assert 'plan: random_sparse(density=0.05) + l2_sp(alpha=0.01)' in table
  assert 'optimizer state is dense' in table and 'L2-SP' in table
  kernel_row = next(line for line in table.splitlines() if line.startswith('block3_conv1/kernel'))
  share = float(kernel_row.split()[-2].rstrip('%'))
  assert 4.0 < share < 6.0
  n, total = policies.trainable_count(plan, PARAMS)
  head = sum(np.prod(PARAMS_SHAPES[p]) for p in HEAD)
  assert n == round(0.05 * (total - head)) + head


def test_schedules_make_stages():
  cfg = ConfigDict(dict(name='lp_ft(probe_steps=30) + l2_sp(alpha=0.1)'))
  stages = policies.plan_stages(STRUCTURE, cfg, 100)
  assert [(s.start, s.end) for s in stages] == [(0, 30), (30, None)]
  plans = [policies.make_plan(PARAMS, STRUCTURE, cfg, stage=s) for s in stages]
  assert [p.name for p in plans] == [
    'lp_ft(probe_steps=30) [stage 1/2: linear_probe() + l2_sp(alpha=0.1)]',
    'lp_ft(probe_steps=30) [stage 2/2: full() + l2_sp(alpha=0.1)]',
  ]
  assert all('l2_sp' in p.terms for p in plans)
  gradual = policies.plan_stages(STRUCTURE, ConfigDict(dict(name='gradual_unfreezing(10)')), 35)
  assert [str(s.expression) for s in gradual] == [
    'linear_probe()',
    'last_blocks(k=1)',
    'last_blocks(k=2)',
    'last_blocks(k=3)',
  ]
  assert policies.stage_at(gradual, 9).index == 0 and policies.stage_at(gradual, 10).index == 1
  assert policies.stage_at(gradual, 35).index == 3


@pytest.mark.parametrize(
  'expression, message',
  [
    ('fisher(0.01) & lp_ft(10)', 'schedule .* cannot be combined'),
    ('bitfit + last_blocks(1)', r'\+ only adds modifiers'),
    ('l2_sp(0.1)', 'no trainable set'),
    ('random_sparse(density=2)', r'density=2 is not a fraction in \(0, 1\]'),
    ('magnitude(0.1, which="biggest")', "which='biggest'"),
    ('fisher(0.1, num_batches=0)', 'num_batches=0 is not a positive int'),
    ('last_blocks(k=1, depth=2)', "last_blocks has no argument 'depth'"),
    ('fisher(0.1', 'syntax error'),
    ('full + layerwise_lr_decay(0.7) + discriminative_lr(2.6)', 'choose one'),
    ('full + layerwise_lr_decay(1.5)', 'out of range'),
    ('lp_ft(probe_steps=0)', 'positive number of steps'),
    ('lp_ft(10, probe_lr_multiplier=0)', 'probe_lr_multiplier=0 is not a positive number'),
    ('lp_ft(10, probe_lr_multiplier="x")', "probe_lr_multiplier='x' is not a positive number"),
    ('random_sprase(0.1)', "did you mean 'random_sparse'"),
  ],
)
def test_bad_expressions_are_one_line_errors(expression, message):
  with pytest.raises(ValueError, match=message) as e:
    cfg = ConfigDict(dict(name=expression))
    for stage in policies.plan_stages(STRUCTURE, cfg, 100):
      # Shapes are enough: every argument is checked before weights or data are read.
      policies.make_plan(jax.eval_shape(lambda: PARAMS), STRUCTURE, cfg, stage=stage)
  assert '\n' not in str(e.value)


def test_bare_names_keep_reading_config_fields():
  expression = syntax.parse('last_blocks', ConfigDict(dict(k=2, train_head=True)))
  assert str(expression) == 'last_blocks(k=2)'
  assert str(syntax.parse('bitfit | fisher(0.1)')) == 'bitfit() | fisher(density=0.1)'
