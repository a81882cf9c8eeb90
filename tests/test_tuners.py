"""The tuner family beside LoRA (DoRA, SSF, (IA)^3, OFT, LoHa, LoKr) as policies: exact
freezing under SGD and AdamW, step-0 logits, merge, closed-form counts on VGG16, composition
and one-line errors. Their folds against peft's torch modules: tests/test_tuners_peft.py."""

import jax
import numpy as np
import pytest
from ml_collections import ConfigDict

from ftlab import parallel, paths, train
from ftlab.models import vgg
from ftlab.plans import optim, policies, registry, tuners
from ftlab.plans.methods import dora, lokr, oft
from ftlab.plans.syntax import PlanError
from tests import fakes
from tests.test_lora import MODEL, OPTIMIZERS, VARIABLES, conv, logits, lora_run

# One small call of each tuner; OFT's block 4 at width 1/8 (D = 9 * 32 = 288 for block4_conv1).
TUNERS = {
  'lora': ('lora(4)', ('lora_a', 'lora_b')),
  'dora': ('dora(4)', ('dora_a', 'dora_b', 'dora_dm')),
  'ssf': ('ssf', ('ssf_scale', 'ssf_shift')),
  'ia3': ('ia3', ('ia3_scale',)),
  'oft': ('oft(8)', ('oft_q',)),
  'loha': ('loha(2)', ('loha_a1', 'loha_b1', 'loha_a2', 'loha_b2')),
  'lokr': ('lokr(2)', ('lokr_w1', 'lokr_u', 'lokr_v')),
}


# The adapted parameters and plans as `run.check_plans` and `run.make_run` make them (generic
# over tuners despite the name).
tuner_run = lora_run


def test_every_tuner_is_registered_with_its_paper():
  found = tuners.all_tuners()
  for name in ('lora', *TUNERS):
    assert name in found and found[name].paper, name


@pytest.mark.parametrize('name', list(TUNERS))
def test_step_zero_logits_equal_the_loaded_models_bit_for_bit(name):
  expression, leaves = TUNERS[name]
  _, _, adapted = tuner_run(expression)
  flat = paths.flatten(adapted)
  # Every conv of the model is adapted (block1_conv1 too: OFT's block size is fitted to its D).
  assert len(tuners.counts(adapted)) == 8
  assert all(paths.join('block1_conv1', leaf) in flat for leaf in leaves)
  x = fakes.image_batches(1)[0]['image']
  before = np.asarray(logits(VARIABLES['params'], x))
  assert np.array_equal(np.asarray(logits(adapted, x)), before)
  merged = tuners.merge(adapted)
  assert set(paths.flatten(merged)) == set(paths.flatten(VARIABLES['params']))
  assert np.array_equal(
    np.asarray(MODEL.apply({**VARIABLES, 'params': merged}, x, train=False)), before
  )


# A compile of the train step each: the fast tier keeps SGD on the tuners whose fold is more
# than a product (LoRA, DoRA, OFT), the whole suite runs every tuner under SGD and AdamW.
FAST = ('lora', 'dora', 'oft')


@pytest.mark.parametrize(
  'name, opt',
  [
    pytest.param(name, opt, marks=() if opt == 'sgd' and name in FAST else pytest.mark.slow)
    for name in TUNERS
    for opt in ('sgd', 'adamw')
  ],
)
def test_frozen_base_bit_identical_adapters_move_and_merge_matches(name, opt):
  expression, leaves = TUNERS[name]
  _, (plan,), adapted = tuner_run(f'{expression} & blocks([4, 5])')
  tx = optim.make(
    plan,
    ConfigDict(dict(grad_clip_norm=1.0, warmup_steps=0, schedule='constant', **OPTIMIZERS[opt])),
    6,
  )
  spread = parallel.Spread('pmap', jax.devices()[:1])
  p_train_step, _ = train.compile_steps(spread, model=MODEL, tx=tx, plan=plan)
  variables = {**VARIABLES, 'params': adapted}
  state = spread.replicate(train.create_train_state(variables, tx))
  for batch in fakes.image_batches(6):
    state, _ = p_train_step(state, spread.shard(batch), jax.random.key(0))
  final = jax.device_get(spread.unreplicate(state))
  before, after = paths.flatten(adapted), paths.flatten(final.params)
  mask = plan.flat_mask()
  for p in before:
    same = before[p].tobytes() == np.asarray(after[p]).tobytes()
    assert same != mask[p], p  # frozen leaves bit-identical (kernels too), trainable ones moved
  assert sorted(p for p in mask if mask[p] and not p.startswith('predictions/')) == sorted(
    f'block{b}_conv{i}/{leaf}' for b in (4, 5) for i in (1, 2) for leaf in leaves
  )
  # Merged plain parameters give the adapted model's logits (rel 1e-5 of the logits' scale).
  merged = tuners.merge(final.params)
  assert set(paths.flatten(merged)) == set(paths.flatten(VARIABLES['params']))
  x = fakes.image_batches(1, seed=7)[0]['image']
  adapted_logits = np.asarray(logits(final.params, x, final.batch_stats))
  plain = MODEL.apply({'params': merged, 'batch_stats': final.batch_stats}, x, train=False)
  np.testing.assert_allclose(plain, adapted_logits, atol=1e-5 * np.abs(adapted_logits).max())
  loaded = np.asarray(logits(VARIABLES['params'], x, final.batch_stats))
  assert np.abs(adapted_logits - loaded).max() > 1e-3


def test_ssf_and_ia3_folds_are_their_closed_forms_on_the_layer_output():
  rng = np.random.RandomState(0)
  x = rng.normal(size=(2, 7, 7, 5)).astype(np.float32)
  w = rng.normal(size=(3, 3, 5, 6)).astype(np.float32) * 0.3
  b, s, t = (rng.normal(size=6).astype(np.float32) for _ in range(3))
  layer = {'kernel': w, 'bias': b, 'ssf_scale': s, 'ssf_shift': t}
  folded = tuners.fold({'c': layer})['c']
  assert set(folded) == {'kernel', 'bias'}
  # SSF (Lian et al., eq. 2): y' = s . y + t, y the layer's output.
  expected = s * (np.asarray(conv(x, w)) + b) + t
  got = np.asarray(conv(x, folded['kernel'])) + folded['bias']
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
  folded = tuners.fold({'c': {'kernel': w, 'bias': b, 'ia3_scale': s}})['c']
  expected = s * (np.asarray(conv(x, w)) + b)  # (IA)^3: y' = l . y
  got = np.asarray(conv(x, folded['kernel'])) + folded['bias']
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_dora_direction_has_the_magnitude_per_output_channel():
  rng = np.random.RandomState(1)
  w = rng.normal(size=(3, 3, 4, 6)).astype(np.float32)
  layer = {
    'kernel': w,
    'dora_a': rng.normal(size=(3, 3, 4, 2)).astype(np.float32),
    'dora_b': rng.normal(size=(2, 6)).astype(np.float32),
    'dora_dm': rng.uniform(-0.5, 0.5, 6).astype(np.float32),
    'dora_alpha': np.float32(4.0),
  }
  folded = np.asarray(tuners.fold({'c': layer})['c']['kernel'], np.float64)
  norms = lambda k: np.sqrt((np.asarray(k, np.float64) ** 2).sum(axis=(0, 1, 2)))
  m = norms(w) + layer['dora_dm']  # the magnitude: the loaded norms plus the trained change
  v = w + 4.0 / 2 * np.einsum('hwir,ro->hwio', layer['dora_a'], layer['dora_b'])
  np.testing.assert_allclose(folded, m * v / norms(v), rtol=1e-5)
  np.testing.assert_allclose(norms(folded), m, rtol=1e-5)


def test_oft_rotation_is_orthogonal_and_keeps_the_filters_angles():
  rng = np.random.RandomState(2)
  w = rng.normal(size=(3, 3, 4, 6)).astype(np.float32)  # D = 36: block size 8 -> 9 (nearest)
  assert oft.fitted_block_size(36, 8) == 9 and oft.fitted_block_size(27, 32) == 27
  assert oft.fitted_block_size(576, 32) == 32 and oft.fitted_block_size(10, 4) == 5
  q = rng.normal(size=(4, 36)).astype(np.float32) * 0.3
  r = np.asarray(oft.rotations(q), np.float64)
  np.testing.assert_allclose(
    r @ r.transpose(0, 2, 1), np.broadcast_to(np.eye(9), r.shape), atol=1e-5
  )
  folded = np.asarray(tuners.fold({'c': {'kernel': w, 'oft_q': q}})['c']['kernel'], np.float64)
  gram = lambda k: tuners.torch_order(k).T @ tuners.torch_order(k)
  np.testing.assert_allclose(gram(folded), gram(w.astype(np.float64)), rtol=1e-4, atol=1e-4)
  assert np.abs(folded - w).max() > 0.1


def vgg16_convs():
  """`(Cin, Cout)` of VGG16's 13 convolutions (Simonyan & Zisserman, table 1, column D)."""
  widths = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256)]
  return widths + [(256, 512)] + [(512, 512)] * 5


# Channel splits of LoKr's `factorization` (the two factors nearest the square root).
LOKR_SPLIT = {3: (1, 3), 64: (8, 8), 128: (8, 16), 256: (16, 16), 512: (16, 32)}
# OFT(32): D = 9 Cin; block1_conv1's D = 27 < 32 is one block of 27, every other D is 32 n.
CLOSED_FORMS = {
  'dora(8)': lambda cin, cout: 8 * (9 * cin + cout) + cout,
  'ssf': lambda cin, cout: 2 * cout,
  'ia3': lambda cin, cout: cout,
  'oft': lambda cin, cout: 27 * 26 // 2 if cin == 3 else (9 * cin // 32) * 32 * 31 // 2,
  'loha(8)': lambda cin, cout: 2 * 8 * (9 * cin + cout),
  'lokr(8)': lambda cin, cout: (
    LOKR_SPLIT[cin][0] * LOKR_SPLIT[cout][0] + 8 * (9 * LOKR_SPLIT[cin][1] + LOKR_SPLIT[cout][1])
  ),
}


@pytest.mark.parametrize('expression', list(CLOSED_FORMS))
def test_counts_on_vgg16_equal_the_closed_form(expression):
  model = vgg.VGG(depth=16, num_classes=10, head='gap')
  shapes = fakes.shapes(model)['params']
  cfg = ConfigDict(dict(name=expression))
  stages = policies.plan_stages(model.block_structure(), cfg, None)
  planned = tuners.plan_shapes(shapes, model.block_structure(), stages)
  (plan,) = [policies.make_plan(planned, model.block_structure(), cfg, stage=s) for s in stages]
  counts = tuners.counts(planned)
  expected = sum(CLOSED_FORMS[expression](cin, cout) for cin, cout in vgg16_convs())
  assert len(counts) == 13 and sum(counts.values()) == expected
  head = 512 * 10 + 10
  n, total = policies.trainable_count(plan, planned)
  assert n == expected + head
  assert total == 14_719_818  # the plain VGG16 with a 10-class gap head: adapters not counted
  assert f'{expected:,} adapter parameters on 13 frozen kernels' in policies.audit_table(
    plan, planned
  )


def test_lokr_factorization():
  assert [lokr.factorization(n) for n in (256, 128, 127, 3, 512)] == [
    (16, 16),
    (8, 16),
    (1, 127),
    (1, 3),
    (16, 32),
  ]
  assert lokr.factorization(128, 4) == (4, 32) and lokr.factorization(100, 3) == (2, 50)


def test_dora_magnitude_starts_at_the_loaded_norms_and_init_follows_the_seed():
  _, _, one = tuner_run('dora(4)', seed=0)
  _, _, other = tuner_run('dora(4)', seed=1)
  flat, flat_other = paths.flatten(one), paths.flatten(other)
  kernel = np.asarray(flat['block3_conv1/kernel'], np.float64)
  assert not flat['block3_conv1/dora_dm'].any()  # m = ||W|| + dm starts at the loaded norms
  np.testing.assert_allclose(
    dora.channel_norms(kernel[None].astype(np.float32))[0],
    np.sqrt((kernel**2).sum(axis=(0, 1, 2))),
    rtol=1e-6,
  )
  assert not np.array_equal(flat['block3_conv1/dora_a'], flat_other['block3_conv1/dora_a'])
  bound = 1 / np.sqrt(3 * 3 * 16)
  assert np.abs(flat['block3_conv1/dora_a']).max() <= bound
  assert not flat['block3_conv1/dora_b'].any()


def trained(plan):
  return sorted(p for p, t in plan.flat_mask().items() if t)


def test_composition():
  _, (plan,), params = tuner_run('ssf & blocks([5]) | bitfit')
  assert sorted(tuners.counts(params)) == ['block5_conv1', 'block5_conv2']
  assert {p for p in trained(plan) if not p.startswith('block5_conv')} == {
    p for p in paths.flatten(params) if p.endswith('/bias') and not p.startswith('block5_conv')
  } | {'predictions/kernel'}
  _, (plan,), params = tuner_run('ia3(train_head=False) & last_blocks(1)')
  assert trained(plan) == ['block5_conv1/ia3_scale', 'block5_conv2/ia3_scale']
  stages, (probe, tune), params = tuner_run(
    'lp_ft(probe_steps=3) + (oft(4) & blocks([5]))', steps=6
  )
  assert trained(probe) == ['predictions/bias', 'predictions/kernel']
  assert trained(tune) == [
    'block5_conv1/oft_q',
    'block5_conv2/oft_q',
    'predictions/bias',
    'predictions/kernel',
  ]
  _, (plan,), params = tuner_run('lokr(2) & blocks([4, 5]) - blocks([5])')
  assert sorted(tuners.counts(params)) == ['block4_conv1', 'block4_conv2']


@pytest.mark.parametrize(
  'expression, message',
  [
    ('dora(0)', r'policy dora: rank=0 is not a positive integer'),
    ('loha(2, alpha=0)', r'policy loha: alpha=0 is not a positive number'),
    ('lokr(2, factor=0)', r'policy lokr: factor=0 is not -1'),
    ('oft(1)', r'policy oft: block_size=1 is not an integer >= 2'),
    ('ssf | ia3', r'one tuner per plan \(ssf, ia3 given\)'),
    ('dora(4) & lora(4)', r'one tuner per plan'),
    ('ia3 & random_sparse(0.1)', r'cannot be combined with the per-element mask random_sparse'),
    ('ssf | full', r'trains block1_conv1/kernel and its SSF adapter'),
    ('lp_ft(2) + bitfit', r'it must train .*ssf\(...\)'),
    (
      "regex(trainable=['.*/dora_alpha', 'predictions/.*'], "
      "frozen=['(?!predictions/)(?!.*/dora_alpha).*']) | dora(2)",
      r'dora_alpha, DoRA.s constant scale',
    ),
  ],
)
def test_bad_tuner_plans_are_one_line_errors(expression, message):
  with pytest.raises(PlanError, match=message) as info:
    tuner_run(expression, steps=10)
  assert '\n' not in str(info.value)


def test_registry_lists_the_tuners_for_help_and_the_readme():
  signatures = {row[0] for row in registry.rows()}
  for expected in (
    'dora(rank, alpha=8.0, train_head=True)',
    'ssf(train_head=True)',
    'oft(block_size=32, train_head=True)',
  ):
    assert expected in signatures


def test_oft_solve_and_its_gradient_equal_numpys():
  """OFT's own elimination (no LAPACK call) against numpy's solve, and its implicit gradient
  against the gradient through `jnp.linalg.solve` (one call: the LAPACK path is fine alone)."""
  rng = np.random.RandomState(3)
  upper = np.triu(rng.normal(size=(5, 7, 7)), 1)
  skew = (upper - upper.transpose(0, 2, 1)).astype(np.float32)
  a, b = np.eye(7, dtype=np.float32) + skew, rng.normal(size=(5, 7, 7)).astype(np.float32)
  np.testing.assert_allclose(oft.solve(a, b), np.linalg.solve(a, b), rtol=1e-4, atol=1e-5)
  assert np.array_equal(oft.solve(np.broadcast_to(np.eye(7, dtype=np.float32), a.shape), b), b)
  g = rng.normal(size=(5, 7, 7)).astype(np.float32)
  ours = jax.grad(lambda a, b: (oft.solve(a, b) * g).sum(), argnums=(0, 1))(a, b)
  reference = jax.grad(lambda a, b: (jax.numpy.linalg.solve(a, b) * g).sum(), argnums=(0, 1))(a, b)
  for x, y in zip(ours, reference):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-4)
