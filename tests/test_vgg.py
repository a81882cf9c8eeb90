"""VGG modules: Keras names, published parameter counts, heads, widths, dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftlab import paths
from ftlab.models import vgg


def param_shapes(model, size=224):
  variables = jax.eval_shape(
    lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False)
  )
  return variables


def count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize(
  'name, expected',
  [('vgg16', 138_357_544), ('vgg19', 143_667_240), ('vgg11', 132_863_336), ('vgg13', 133_047_848)],
)
def test_published_parameter_counts(name, expected):
  # Keras/torchvision counts (torchvision for VGG11/13, same architecture).
  assert count(param_shapes(vgg.by_name(name))['params']) == expected


def test_vgg16_conv_base_count_and_keras_names():
  params = param_shapes(vgg.VGG(depth=16, head='none'))['params']
  assert count(params) == 14_714_688
  expected = [
    f'block{b}_conv{i}' for b, n in enumerate((2, 2, 3, 3, 3), 1) for i in range(1, n + 1)
  ]
  assert sorted(params) == sorted(expected)
  assert params['block1_conv1']['kernel'].shape == (3, 3, 3, 64)  # HWIO, as Keras


def test_imagenet_head_names_and_shapes():
  params = param_shapes(vgg.VGG(depth=16))['params']
  assert params['fc1']['kernel'].shape == (7 * 7 * 512, 4096)
  assert params['fc2']['kernel'].shape == (4096, 4096)
  assert params['predictions']['kernel'].shape == (4096, 1000)


def test_batch_norm_variant_matches_torchvision_layout():
  variables = param_shapes(vgg.by_name('vgg16_bn'))
  # torchvision vgg16_bn: 138,365,992 parameters (13 BN layers add 2 x channels each).
  assert count(variables['params']) == 138_365_992
  assert variables['batch_stats']['block3_conv2_bn']['mean'].shape == (256,)


@pytest.mark.parametrize(
  'head, out_shape',
  [('imagenet', (2, 7)), ('gap', (2, 7)), ('mlp', (2, 7)), ('none', (2, 1, 1, 8))],
)
def test_heads_and_width(head, out_shape):
  model = vgg.VGG(depth=11, num_classes=7, head=head, width=1 / 64)
  x = jnp.ones((2, 32, 32, 3))
  variables = model.init(jax.random.key(0), x, train=False)
  out = model.apply(variables, x, train=False)
  assert out.shape == out_shape
  params = variables['params']
  assert params['block1_conv1']['kernel'].shape == (3, 3, 3, 1)  # 64 / 64
  if head == 'imagenet':
    assert params['fc1']['kernel'].shape == (8, 64)  # 4096 / 64
  if head == 'mlp':
    assert params['fc']['kernel'].shape == (8, 4)  # 256 / 64


def test_dropout_only_in_training():
  model = vgg.VGG(depth=11, num_classes=3, head='mlp', width=1 / 16)
  x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  variables = model.init(jax.random.key(0), x, train=False)
  eval_a = model.apply(variables, x, train=False)
  np.testing.assert_array_equal(eval_a, model.apply(variables, x, train=False))
  train_a = model.apply(variables, x, train=True, rngs={'dropout': jax.random.key(2)})
  train_b = model.apply(variables, x, train=True, rngs={'dropout': jax.random.key(3)})
  assert not np.allclose(train_a, train_b)


def test_bfloat16_activations_keep_float32_params_and_logits():
  model = vgg.VGG(depth=11, num_classes=3, head='gap', width=1 / 16, dtype=jnp.bfloat16)
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  variables = model.init(jax.random.key(0), x, train=False)
  assert {p.dtype for p in jax.tree.leaves(variables)} == {jnp.dtype('float32')}
  logits = model.apply(variables, x, train=False)
  assert logits.dtype == jnp.float32
  reference = model.clone(dtype=jnp.float32).apply(variables, x, train=False)
  np.testing.assert_allclose(logits, reference, atol=0.05, rtol=0.05)
  assert not np.array_equal(logits, reference)  # the bf16 path really ran in bf16


def test_frozen_batch_norm_uses_running_statistics():
  model = vgg.VGG(depth=11, batch_norm=True, num_classes=3, head='gap', width=1 / 16)
  x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3)) * 3 + 1
  variables = model.init(jax.random.key(0), x, train=False)
  frozen = model.clone(frozen_batch_norm=('block1_conv1_bn',))
  _, new = frozen.apply(variables, x, train=True, mutable=['batch_stats'])
  stats, new_stats = variables['batch_stats'], new['batch_stats']
  np.testing.assert_array_equal(
    new_stats['block1_conv1_bn']['mean'], stats['block1_conv1_bn']['mean']
  )
  assert not np.array_equal(new_stats['block2_conv1_bn']['mean'], stats['block2_conv1_bn']['mean'])


@pytest.mark.parametrize('depth, head', [(11, 'imagenet'), (16, 'gap'), (19, 'mlp'), (13, 'none')])
def test_block_structure_covers_every_parameter_once(depth, head):
  for bn in (False, True):
    model = vgg.VGG(depth=depth, batch_norm=bn, head=head, width=1 / 16)
    params = param_shapes(model, 32)['params']
    structure = model.block_structure()
    layers = [layer for b in structure.all_blocks for layer in b.layers]
    assert len(layers) == len(set(layers))
    assert sorted(layers) == sorted(params)
    names = [b.name for b in structure.blocks]
    assert names[:5] == [f'block{i}' for i in range(1, 6)]
    assert len(structure.blocks[0].layers) == (1 if depth == 11 else 2) * (2 if bn else 1)
    assert set(paths.flatten(params)) >= {f'{l}/kernel' for l in layers if 'bn' not in l}


def test_bad_architecture_and_small_inputs_are_clear_errors():
  with pytest.raises(ValueError, match=r"unknown model 'vgg17'.*vgg16_bn"):
    vgg.by_name('vgg17')
  with pytest.raises(ValueError, match=r"VGG head 'linear' is not one of"):
    vgg.VGG(head='linear').block_structure()
  with pytest.raises(ValueError, match=r'input size 16x16 is too small.*32x32'):
    vgg.VGG(depth=11, width=1 / 16).init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)), train=False)


def test_adaptive_pool_matches_torch_semantics():
  x = jnp.arange(2 * 5 * 3 * 1, dtype=jnp.float32).reshape(2, 5, 3, 1)
  out = vgg.adaptive_avg_pool(x, 2)
  # torch AdaptiveAvgPool2d(2) on a 5x3 map: rows [0,3) and [2,5), columns [0,2) and [1,3).
  expected = np.stack(
    [
      np.stack([x[:, r0:r1, c0:c1].mean((1, 2)) for c0, c1 in ((0, 2), (1, 3))], 1)
      for r0, r1 in ((0, 3), (2, 5))
    ],
    1,
  )
  np.testing.assert_allclose(out, expected)
  np.testing.assert_array_equal(vgg.adaptive_avg_pool(x, 1)[:, 0, 0], x.mean((1, 2)))
  same = jnp.ones((1, 7, 7, 2)) * jnp.arange(49.0).reshape(1, 7, 7, 1)
  np.testing.assert_array_equal(vgg.adaptive_avg_pool(same, 7), same)  # identity at 224 px
  model = vgg.VGG(depth=11, num_classes=3, head='imagenet', width=1 / 16, adaptive_pool=7)
  params = param_shapes(model, 64)['params']
  assert params['fc1']['kernel'].shape == (7 * 7 * 32, 256)
