"""Policies -> plans: masks, lr multipliers, errors, the audit table."""

import jax
import jax.numpy as jnp
import pytest
from ml_collections import ConfigDict

from ftlab import paths
from ftlab.models import vgg
from ftlab.plans import policies


def shapes(model):
  return jax.eval_shape(
    lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
  )['params']


MODEL = vgg.VGG(depth=16, batch_norm=True, num_classes=10, head='imagenet', width=1 / 16)
PARAMS = shapes(MODEL)
STRUCTURE = MODEL.block_structure()


def plan_for(**cfg):
  return policies.make_plan(PARAMS, STRUCTURE, ConfigDict(cfg))


def trainable_layers(plan):
  return sorted({p.split('/')[0] for p, t in plan.flat_mask().items() if t})


def layers_of(*blocks):
  return sorted(l for b in STRUCTURE.all_blocks if b.name in blocks for l in b.layers)


def test_full_and_linear_probe():
  assert all(plan_for(name='full').flat_mask().values())
  assert trainable_layers(plan_for(name='linear_probe')) == ['predictions']


def test_last_and_first_blocks_count_from_the_output_and_input():
  assert trainable_layers(plan_for(name='last_blocks', k=1)) == layers_of('fc', 'head')
  assert trainable_layers(plan_for(name='last_blocks', k=2)) == layers_of('block5', 'fc', 'head')
  assert trainable_layers(plan_for(name='first_blocks', k=1)) == layers_of('block1', 'head')
  no_head = plan_for(name='first_blocks', k=2, train_head=False)
  assert trainable_layers(no_head) == layers_of('block1', 'block2')


def test_blocks_by_number_or_name_is_surgical():
  plan = plan_for(name='blocks', blocks=[1, 'block4'])
  assert trainable_layers(plan) == layers_of('block1', 'block4', 'head')
  assert 'block1_conv1_bn' not in plan.frozen_layers
  assert 'block2_conv1_bn' in plan.frozen_layers


def test_bitfit_trains_biases_and_head():
  mask = plan_for(name='bitfit').flat_mask()
  trainable = {p for p, t in mask.items() if t}
  assert trainable == {p for p in mask if p.endswith('/bias')} | {'predictions/kernel'}


def test_bitfit_vgg16_bias_count_matches_reference():
  model = vgg.VGG(depth=16)
  params = jax.eval_shape(
    lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)), train=False)
  )['params']
  plan = policies.make_plan(
    params, model.block_structure(), ConfigDict({'name': 'bitfit', 'train_head': False})
  )
  assert policies.trainable_count(plan, params)[0] == 13_416  # REFERENCE.md


def test_regex_full_match_and_exact_cover():
  plan = plan_for(
    name='regex', trainable=[r'block5_.*', r'fc\d/.*', 'predictions/.*'], frozen=[r'block[1-4]_.*']
  )
  assert trainable_layers(plan) == layers_of('block5', 'fc', 'head')
  # Full match: 'block5' alone matches no path, and is reported as matching nothing.
  with pytest.raises(ValueError, match=r"regex 'block5' matches no parameter"):
    plan_for(name='regex', trainable=['block5', '.*'], frozen=[])


def test_regex_reports_uncovered_and_doubly_covered_paths():
  with pytest.raises(ValueError, match=r'uncovered: .*block1_conv1/bias.*') as e:
    plan_for(name='regex', trainable=['predictions/.*', 'fc.*'], frozen=['block[2-5].*'])
  assert 'block1_conv2/kernel' in str(e.value) and 'fc1' not in str(e.value)
  assert '\n' not in str(e.value)
  with pytest.raises(
    ValueError,
    match=r'; matched twice: predictions/bias \(predictions/\.\*, '
    r'predictions/bias\)$',
  ):
    plan_for(
      name='regex', trainable=['predictions/.*'], frozen=['(?!predictions/).*', 'predictions/bias']
    )
  with pytest.raises(ValueError, match=r"'\(' is not a valid regex"):
    plan_for(name='regex', trainable=['('], frozen=[])


def test_bad_names_and_arguments_are_one_line_errors():
  with pytest.raises(
    ValueError,
    match=r"unknown policy 'lienar_probe' \(did you mean "
    r"'linear_probe'\?\); valid: bitfit, blocks",
  ):
    plan_for(name='lienar_probe')
  with pytest.raises(ValueError, match=r'last_blocks: k=7 is not a block count in 1..6'):
    plan_for(name='last_blocks', k=7)
  with pytest.raises(ValueError, match=r'k=None'):
    plan_for(name='first_blocks')
  with pytest.raises(ValueError, match=r"block 'block9' does not exist; valid: \['block1'"):
    plan_for(name='blocks', blocks=['block9'])
  with pytest.raises(ValueError, match=r'blocks=\[\] names no block'):
    plan_for(name='blocks', blocks=[])
  headless = vgg.VGG(depth=11, head='none', width=1 / 16)
  with pytest.raises(ValueError, match=r'plan linear_probe\(\) trains no parameter'):
    policies.make_plan(
      shapes(headless), headless.block_structure(), ConfigDict({'name': 'linear_probe'})
    )


def test_lr_multipliers_per_leaf():
  plan = plan_for(
    name='last_blocks', k=2, lr_multipliers=[('predictions/.*', 10.0), (r'block5_conv1/.*', 0.5)]
  )
  mults = paths.flatten(plan.lr_multipliers)
  assert mults['predictions/kernel'] == 10.0
  assert mults['block5_conv1/bias'] == 0.5 and mults['block5_conv2/bias'] == 1.0
  assert mults['block1_conv1/kernel'] == 0.0  # frozen
  with pytest.raises(ValueError, match=r'lr_multipliers: regex .*nothing.* matches no'):
    plan_for(name='full', lr_multipliers=[('nothing', 2.0)])
  with pytest.raises(ValueError, match=r'more than one rule: predictions/bias'):
    plan_for(name='full', lr_multipliers=[('predictions/.*', 2.0), ('.*/bias', 3.0)])


def test_audit_table_rows_and_totals():
  plan = plan_for(name='linear_probe')
  table = policies.audit_table(plan, PARAMS)
  lines = table.splitlines()
  assert lines[0] == 'plan: linear_probe()'
  n_leaves = len(paths.flatten(PARAMS))
  assert len(lines) == 3 + n_leaves + 1
  row = next(l for l in lines if l.startswith('predictions/kernel '))
  assert row.split() == ['predictions/kernel', '(256,', '10)', 'yes', '1']
  assert next(l for l in lines if l.startswith('fc1/kernel ')).split()[-2:] == ['no', '-']
  total = sum(x.size for x in jax.tree.leaves(PARAMS))
  assert lines[-1] == (
    f'trainable: 2,570 of {total:,} parameters ({100 * 2570 / total:.4g}%), 2 of {n_leaves} leaves'
  )


def test_frozen_checksums_see_any_bit_of_a_frozen_leaf():
  import numpy as np

  params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), PARAMS)
  plan = plan_for(name='linear_probe')
  sums = policies.frozen_checksums(plan, params)
  assert 'predictions/kernel' not in sums and 'block1_conv1/kernel' in sums
  changed = jax.tree.map(np.copy, params)
  changed['predictions']['kernel'][0, 0] = 1.0  # trainable: not covered
  assert policies.frozen_checksums(plan, changed) == sums
  changed['block3_conv1']['kernel'].view(np.uint32)[0, 0, 0, 0] ^= 1  # one bit of a frozen leaf
  other = policies.frozen_checksums(plan, changed)
  assert [p for p in sums if sums[p] != other[p]] == ['block3_conv1/kernel']
  assert policies.combined_checksum(other) != policies.combined_checksum(sums)
