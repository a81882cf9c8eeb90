"""Optimizer from a plan: state only for trainable leaves, per-leaf lr, schedules."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from ml_collections import ConfigDict

from ftlab import paths
from ftlab.models import vgg
from ftlab.plans import optim, policies

MODEL = vgg.VGG(depth=11, num_classes=4, head='mlp', width=1 / 16)
PARAMS = MODEL.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)['params']


def opt_config(**kw):
  cfg = dict(
    name='sgd',
    learning_rate=0.1,
    momentum=0.9,
    weight_decay=0.0,
    grad_clip_norm=0.0,
    warmup_steps=0,
    schedule='constant',
  )
  cfg.update(kw)
  return ConfigDict(cfg)


def plan_for(**cfg):
  return policies.make_plan(PARAMS, MODEL.block_structure(), ConfigDict(cfg))


def state_size(state):
  return sum(x.size for x in jax.tree.leaves(state))


@pytest.mark.parametrize('name, slots', [('sgd', 1), ('adam', 2), ('adamw', 2)])
@pytest.mark.parametrize(
  'policy',
  [
    dict(name='linear_probe'),
    dict(name='last_blocks', k=2),
    dict(name='bitfit'),
    dict(name='full'),
  ],
)
def test_state_holds_slots_times_trainable(name, slots, policy):
  plan = plan_for(**policy)
  n_trainable, _ = policies.trainable_count(plan, PARAMS)
  tx = optim.make(plan, opt_config(name=name, weight_decay=1e-3, grad_clip_norm=1.0), 10)
  state = tx.init(PARAMS)
  # Besides the slots: int32 step counters (the schedule's, and Adam's own), and nothing
  # at all for frozen leaves.
  counters = [x for x in jax.tree.leaves(state) if x.dtype == jnp.int32]
  assert all(x.shape == () for x in counters)
  assert len(counters) == (2 if name != 'sgd' else 1)
  assert state_size(state) == slots * n_trainable + len(counters)


def test_frozen_updates_are_exact_zeros_and_clipping_ignores_frozen_grads():
  plan = plan_for(name='linear_probe')
  tx = optim.make(plan, opt_config(momentum=0.0, grad_clip_norm=1.0), 10)
  grads = jax.tree.map(jnp.ones_like, PARAMS)
  updates, _ = tx.update(grads, tx.init(PARAMS), PARAMS)
  mask = plan.flat_mask()
  flat = paths.flatten(updates)
  for p, u in flat.items():
    if not mask[p]:
      assert not np.any(np.asarray(u)), p
  # The clipping norm covers only the trainable gradient: sqrt(#trainable) here.
  n_trainable, _ = policies.trainable_count(plan, PARAMS)
  trainable = np.concatenate([np.ravel(flat[p]) for p in flat if mask[p]])
  np.testing.assert_allclose(np.linalg.norm(trainable), 0.1, rtol=1e-5)
  np.testing.assert_allclose(trainable, -0.1 / np.sqrt(n_trainable), rtol=1e-5)


def test_lr_multipliers_scale_plain_sgd_updates():
  plan = plan_for(name='full', lr_multipliers=[('predictions/.*', 10.0), ('fc/bias', 0.25)])
  tx = optim.make(plan, opt_config(momentum=0.0), 10)
  grads = jax.tree.map(lambda x: jnp.full_like(x, 2.0), PARAMS)
  updates = paths.flatten(tx.update(grads, tx.init(PARAMS), PARAMS)[0])
  np.testing.assert_allclose(updates['predictions/kernel'], -0.1 * 10 * 2)
  np.testing.assert_allclose(updates['fc/bias'], -0.1 * 0.25 * 2)
  np.testing.assert_allclose(updates['block1_conv1/kernel'], -0.1 * 2)


def test_weight_decay_reaches_trainable_leaves_only():
  plan = plan_for(name='linear_probe')
  tx = optim.make(plan, opt_config(name='sgd', momentum=0.0, weight_decay=0.5), 10)
  zeros = jax.tree.map(jnp.zeros_like, PARAMS)
  updates = paths.flatten(tx.update(zeros, tx.init(PARAMS), PARAMS)[0])
  np.testing.assert_allclose(
    updates['predictions/kernel'], -0.1 * 0.5 * PARAMS['predictions']['kernel'], rtol=1e-6
  )
  np.testing.assert_allclose(
    updates['fc/kernel'],  # the mlp head's hidden layer is new too
    -0.1 * 0.5 * PARAMS['fc']['kernel'],
    rtol=1e-6,
  )
  assert not np.any(updates['block5_conv2/kernel']) and not np.any(updates['block1_conv1/kernel'])


@pytest.mark.parametrize('name', ['sgd', 'adamw'])
def test_decay_groups_leaf_by_leaf(name):
  """wd_mults: the first matching rule's multiplier, unmatched leaves and frozen leaves not
  decayed; checked against w * wd * mult for every leaf (zero gradients: the update is the
  decay alone, for sgd's L2 and adamw's decoupled decay alike)."""
  plan = plan_for(name='last_blocks', k=1)
  rules = (('fc/kernel', 3.0), ('.*/kernel', 1.0), ('block5_conv1/bias', 0.5))
  cfg = opt_config(name=name, momentum=0.0, weight_decay=0.5, wd_mults=rules)
  tx = optim.make(plan, cfg, 10)
  zeros = jax.tree.map(jnp.zeros_like, PARAMS)
  updates = paths.flatten(tx.update(zeros, tx.init(PARAMS), PARAMS)[0])
  trainable = paths.flatten(plan.trainable_mask)
  checked = set()
  for path, w in paths.flatten(PARAMS).items():
    mult = 3.0 if path == 'fc/kernel' else 1.0 if path.endswith('/kernel') else 0.0
    mult = 0.5 if path == 'block5_conv1/bias' else mult
    expected = -0.1 * 0.5 * mult * np.asarray(w) if trainable[path] else np.zeros_like(w)
    np.testing.assert_allclose(updates[path], expected, rtol=1e-6, atol=0, err_msg=path)
    checked.add((trainable[path], mult))
  assert checked >= {(True, 3.0), (True, 1.0), (True, 0.5), (True, 0.0), (False, 1.0)}
  with pytest.raises(policies.PlanError, match=r"optimizer.wd_mults: regex '.*/scale' matches"):
    optim.make(plan, opt_config(weight_decay=0.5, wd_mults=(('.*/scale', 0.0),)), 10)
  with pytest.raises(policies.PlanError, match=r"\('.*', -1.0\) is not a \(regex, mult"):
    optim.make(plan, opt_config(weight_decay=0.5, wd_mults=(('.*', -1.0),)), 10)


def test_schedules():
  cos = optim.learning_rate_schedule(opt_config(schedule='cosine', warmup_steps=10), 110)
  np.testing.assert_allclose(
    [cos(0), cos(5), cos(10), cos(60), cos(110)], [0.0, 0.05, 0.1, 0.05, 0.0], atol=1e-7
  )
  const = optim.learning_rate_schedule(opt_config(schedule='constant', warmup_steps=4), 100)
  np.testing.assert_allclose(
    [const(0), const(2), const(4), const(99)], [0, 0.05, 0.1, 0.1], atol=1e-7
  )


def test_cosine_without_warmup_is_optax_warmup_cosine_bit_for_bit_without_its_warning(caplog):
  with caplog.at_level('INFO'):  # optax logs it at INFO
    cos = optim.learning_rate_schedule(opt_config(schedule='cosine', warmup_steps=0), 40)
  assert 'non-positive' not in caplog.text
  reference = optax.warmup_cosine_decay_schedule(0.0, 0.1, 0, decay_steps=40, end_value=0.0)
  steps = jnp.arange(45)
  np.testing.assert_array_equal(jax.jit(jax.vmap(cos))(steps), jax.jit(jax.vmap(reference))(steps))
  assert cos(0) == 0.1 and cos(40) == 0


def test_bad_optimizer_and_schedule_names():
  plan = plan_for(name='full')
  with pytest.raises(ValueError, match=r"unknown optimizer 'adamax'; valid: sgd, adam, adamw"):
    optim.make(plan, opt_config(name='adamax'), 10)
  with pytest.raises(ValueError, match=r"unknown schedule 'linear'; valid: cosine, constant"):
    optim.make(plan, opt_config(schedule='linear'), 10)


def test_masked_node_tree_is_optax_compatible():
  # Guards the assumption optim.make relies on: optax.partition hides other groups' leaves
  # as MaskedNode, so a multiplier tree masked the same way lines up with the updates.
  seen = []
  spy = optax.GradientTransformation(
    lambda p: optax.EmptyState(), lambda u, s, p=None: (seen.append(jax.tree.structure(u)) or u, s)
  )
  tx = optax.partition({'a': spy, 'b': optax.set_to_zero()}, {'x': 'a', 'y': 'b'})
  tx.update({'x': 1.0, 'y': 2.0}, tx.init({'x': 1.0, 'y': 2.0}))
  expected = jax.tree.structure({'x': 0.0, 'y': optax.MaskedNode()})
  assert seen == [expected]


def test_lp_ft_probe_lr_multiplier_scales_the_probe_stage_only():
  cfg = ConfigDict(dict(name='lp_ft(probe_steps=3, probe_lr_multiplier=30)'))
  probe_stage, ft_stage = policies.plan_stages(MODEL.block_structure(), cfg, 10)
  updates = []
  for stage in (probe_stage, ft_stage):
    plan = policies.make_plan(PARAMS, MODEL.block_structure(), cfg, stage=stage)
    tx = optim.make(plan, opt_config(momentum=0.0), 10)
    grads = jax.tree.map(lambda x: jnp.full_like(x, 2.0), PARAMS)
    updates.append(paths.flatten(tx.update(grads, tx.init(PARAMS), PARAMS)[0]))
  probe, ft = updates
  np.testing.assert_allclose(probe['predictions/kernel'], -0.1 * 30 * 2)
  np.testing.assert_allclose(probe['fc/kernel'], -0.1 * 30 * 2)  # the mlp head's new layer
  np.testing.assert_array_equal(probe['block1_conv1/kernel'], 0)
  np.testing.assert_allclose(ft['predictions/kernel'], -0.1 * 2)
  np.testing.assert_allclose(ft['block1_conv1/kernel'], -0.1 * 2)
  assert str(probe_stage.expression) == 'linear_probe()' and probe_stage.lr_scale == 30
