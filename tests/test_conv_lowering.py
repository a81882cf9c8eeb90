"""`VGG(conv_lowering='matmul')` computes what XLA's convolution and max-pool compute."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from ftlab import errors, run
from ftlab.models import vgg
from ftlab.models.lowering import conv_as_matmul

EPS = float(np.finfo(np.float32).eps)


def gamma(n: int) -> float:
  """Higham's bound on the relative error of any float32 sum of `n` products: a sum of `n`
  terms in any order is within `gamma(n) * sum(|terms|)` of the exact one."""
  return n * EPS / (1 - n * EPS)


@pytest.mark.parametrize('padding', ['SAME', 'VALID', ((1, 1), (1, 1)), ((2, 0), (0, 1))])
def test_conv_as_matmul_matches_lax_conv(padding):
  """Both compute every output as the same sum of k*k*Cin products in another order, so they
  agree within twice the bound of float32 summation in any order (not a tolerance tuned to a
  CPU: XLA's convolution sums in another order on an AMD EPYC than on an Intel Xeon). The
  gradients are sums over the other axes, plus the forward difference carried through cos."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 9, 7, 5)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((3, 3, 5, 4)), jnp.float32)
  dims = ('NHWC', 'HWIO', 'NHWC')
  conv = lambda f: lambda x, w: f(x, w, (1, 1), padding, dimension_numbers=dims)
  want = conv(lax.conv_general_dilated)(x, w)
  # The sums of |terms|: the same convolution of |x| and |w|; its transpose bounds gradients.
  magnitude, transposed = jax.vjp(conv(lax.conv_general_dilated), jnp.abs(x), jnp.abs(w))
  forward_bound = 2 * gamma(3 * 3 * 5) * magnitude
  assert np.all(np.abs(conv(conv_as_matmul)(x, w) - want) <= forward_bound)
  loss = lambda f: lambda x, w: jnp.sum(jnp.sin(conv(f)(x, w)))
  got_grads = jax.grad(loss(conv_as_matmul), argnums=(0, 1))(x, w)
  want_grads = jax.grad(loss(lax.conv_general_dilated), argnums=(0, 1))(x, w)
  n, height, width, _ = want.shape
  terms = (3 * 3 * 4, n * height * width)  # products summed per entry of dx and of dw
  cos_bound, carried = transposed(jnp.abs(jnp.cos(want))), transposed(forward_bound + 2 * EPS)
  for i, (got, expected) in enumerate(zip(got_grads, want_grads)):
    bound = 2 * gamma(terms[i]) * cos_bound[i] + carried[i]
    assert np.all(np.abs(got - expected) <= bound), (i, float(np.max(np.abs(got - expected))))


def test_conv_as_matmul_falls_back_for_strides():
  x = jnp.ones((1, 8, 8, 2))
  w = jnp.ones((3, 3, 2, 3))
  args = ((2, 2), 'SAME')
  dims = {'dimension_numbers': ('NHWC', 'HWIO', 'NHWC')}
  np.testing.assert_array_equal(
    conv_as_matmul(x, w, *args, **dims), lax.conv_general_dilated(x, w, *args, **dims)
  )


# The BatchNorm variant runs in the fast tier; the plain one only in the whole suite.
@pytest.mark.parametrize('name', [pytest.param('vgg11', marks=pytest.mark.slow), 'vgg11_bn'])
def test_matmul_lowering_matches_conv_forward_and_gradients(name):
  models = {
    lowering: vgg.by_name(name, num_classes=3, head='gap', width=1 / 16, conv_lowering=lowering)
    for lowering in ('conv', 'matmul')
  }
  images = jnp.asarray(np.random.default_rng(1).random((4, 34, 33, 3)), jnp.float32)
  labels = jnp.array([0, 1, 2, 1])
  init = lambda model: jax.jit(functools.partial(model.init, train=False))
  variables = init(models['conv'])(jax.random.key(0), images)
  shapes = lambda tree: jax.tree.map(jnp.shape, tree)
  assert shapes(jax.eval_shape(init(models['matmul']), jax.random.key(0), images)) == shapes(
    variables
  )

  def loss(params, model):
    logits, _ = model.apply(
      {**variables, 'params': params}, images, train=True, mutable=['batch_stats']
    )
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))

  results = {}
  for lowering, model in models.items():
    logits = jax.jit(functools.partial(model.apply, train=False))(variables, images)
    grads = jax.jit(jax.grad(functools.partial(loss, model=model)))(variables['params'])
    results[lowering] = (logits, grads)
  np.testing.assert_allclose(results['matmul'][0], results['conv'][0], rtol=1e-5, atol=1e-5)
  got, want = (jax.tree.leaves(results[k][1]) for k in ('matmul', 'conv'))
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_auto_lowering_is_matmul_on_cpu_and_bad_value_raises():
  assert run.resolve_conv_lowering('auto') == 'matmul'  # the tests run on CPU
  with pytest.raises(ValueError, match='conv_lowering'):
    run.resolve_conv_lowering('im2col')


def test_config_chooses_the_lowering_and_a_bad_one_stops_the_run(tmp_path):
  from configs import default
  from ftlab import loop

  config = default.get_config('runlocal')
  # `auto` is resolved where the model is built (the model asks no device): matmul on CPU.
  assert run.build_model(config.model, num_classes=10).conv_lowering == 'matmul'
  config.model.conv_lowering = 'conv'
  assert run.build_model(config.model, num_classes=10).conv_lowering == 'conv'
  config.model.conv_lowering = 'im2col'
  with pytest.raises(errors.InputError, match="conv_lowering 'im2col' is not one of"):
    loop.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()
