"""Weights back out: `scripts/export_weights.py` on a run directory.

A run's model, exported, must (1) port back to the same variables and logits (`porting.read`)
and (2) load where the other framework loads it: the torchvision export strictly into a torch
implementation of torchvision's VGG (`porting_refs`, which does not import ftlab) giving
ftlab's logits, the Keras export into a Keras applications VGG16 by `load_weights`.

The run's variables are random but scaled (He normal, random biases and BatchNorm
statistics), drawn here and not taken from a torch or Keras model, so that logits are of
order one and a 1e-5 bound says something.
"""

# ruff: noqa: E402 (the imports below need torch, which this module asks for first)

import pytest

from tests import fakes

torch = pytest.importorskip('torch', reason=fakes.NO_TORCH)

import json
import os

import export_weights
import jax
import jax.numpy as jnp
import numpy as np
import porting_refs as refs
from safetensors.torch import load_file

from configs import default
from ftlab import paths, porting, run
from ftlab.files import checkpoint
from ftlab.porting import export as export_module

MAX_ABS_DIFF = 1e-5
NARROW = 1 / 16
pytestmark = pytest.mark.filterwarnings('ignore:__array__ implementation:DeprecationWarning')


def images(size, n=2, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def scaled_random(shapes, seed=0, first_divisor=1.0):
  """Variables of `shapes` (`jax.eval_shape` of `init`): He-normal kernels (the output
  layer's /4), biases in +-0.1, BatchNorm affine and statistics; `first_divisor` scales the
  first conv down for 0-255 (caffe) inputs."""
  rng = np.random.default_rng(seed)
  flat = paths.flatten(dict(shapes))
  kernels = [k for k in flat if k.endswith('/kernel')]
  out = {}
  for name, value in sorted(flat.items()):
    shape = value.shape
    if name.endswith('/kernel'):
      scale = (2 / np.prod(shape[:-1])) ** 0.5
      scale /= first_divisor if name == kernels[0] else 4 if name == kernels[-1] else 1
      out[name] = rng.standard_normal(shape, np.float32) * np.float32(scale)
    elif name.startswith('params/') and name.endswith('_bn/scale'):
      out[name] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
    elif name.endswith('/bias'):
      out[name] = rng.uniform(-0.1, 0.1, shape).astype(np.float32)
    elif name.endswith('/mean'):
      out[name] = rng.normal(0, 0.3, shape).astype(np.float32)
    elif name.endswith('/var'):
      out[name] = rng.uniform(0.5, 2.0, shape).astype(np.float32)
    else:
      raise AssertionError(f'no random rule for {name}')
  return paths.unflatten(out)


def make_run(
  directory, name, head, *, width=NARROW, classes=10, size=64, pool=0, divisor=1.0, inputs='torch'
):
  """A run directory as `ftlab.main` leaves it: `config.json` (trained on `inputs`) and a
  step-0 checkpoint."""
  config = default.get_config()
  config.dataset.preprocess = inputs
  config.model.name, config.model.head, config.model.width = name, head, width
  config.model.adaptive_pool, config.dataset.image_size = pool, size
  os.makedirs(directory)
  with open(os.path.join(directory, 'config.json'), 'w') as f:
    json.dump(config.to_dict(), f)
  model = run.build_model(config.model, classes)
  shapes = jax.eval_shape(
    lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False)
  )
  variables = scaled_random(shapes, first_divisor=divisor)
  checkpoint.save_variables(os.path.join(directory, 'checkpoints'), variables, {})
  return model, variables


def logits(model, variables, x):
  return np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x))


def export(run_dir, format, output):
  assert export_weights.main([str(run_dir), '--format', format, '--output', str(output)]) == 0
  return output


def assert_close(ours, reference):
  assert ours.shape == reference.shape
  assert float(reference.std()) > 0.1  # order one: the bound says something
  diff = float(np.abs(ours - reference).max())
  assert diff <= MAX_ABS_DIFF, f'max abs difference {diff:.3g}'


def assert_same_variables(ported, variables):
  ours, back = paths.flatten(dict(variables)), paths.flatten(dict(ported))
  assert sorted(ours) == sorted(back)
  for name in ours:
    np.testing.assert_array_equal(np.asarray(back[name]), np.asarray(ours[name]), err_msg=name)


@pytest.mark.parametrize('name', ['vgg11', 'vgg13_bn'])
def test_torchvision_export_loads_strictly_into_torch_and_ports_back(name, tmp_path):
  model, variables = make_run(tmp_path / 'run', name, 'imagenet', pool=7)
  x = images(64)
  ours = logits(model, variables, porting.Preprocessing('torch')(x))

  path = export(tmp_path / 'run', 'torchvision', tmp_path / f'{name}.pth')
  net = refs.TorchVisionVGG(model.depth, model.batch_norm, num_classes=10, width=NARROW)
  net.load_state_dict(torch.load(path, weights_only=True), strict=True)
  assert_close(ours, refs.torch_logits(net.eval(), x))

  ported = porting.read(path)
  assert (ported.format, ported.arch.name, ported.arch.head) == ('torchvision', name, 'imagenet')
  assert_same_variables(ported.variables, variables)
  # The run's convention is recorded beside the file and read back, not guessed.
  assert (ported.preprocessing.name, ported.preprocessing.guess) == ('torch', '')
  assert_close(logits(ported.arch.model(), ported.variables, ported.preprocessing(x)), ours)
  os.remove(export_module.provenance_path(path))  # a file alone: the convention is a guess
  alone = porting.read(path).preprocessing
  assert alone.name == 'torch' and 'does not record' in alone.guess


def test_an_export_carries_the_runs_input_convention_back_to_a_port(tmp_path):
  """A run trained on `unit` inputs, exported in torchvision's layout: the port says `unit`
  (read from beside the file), where the format alone would have said `torch`."""
  _, variables = make_run(tmp_path / 'run', 'vgg11', 'imagenet', pool=7, inputs='unit')
  path = export(tmp_path / 'run', 'torchvision', tmp_path / 'unit.pth')
  ported = porting.read(path)
  assert (ported.preprocessing.name, ported.preprocessing.guess) == ('unit', '')
  assert ported.provenance['run'] == str(tmp_path / 'run') and ported.provenance['step'] == 0
  assert_same_variables(ported.variables, variables)


def test_safetensors_export_is_torchvision_without_pickle(tmp_path):
  model, variables = make_run(tmp_path / 'run', 'vgg16_bn', 'none')
  path = export(tmp_path / 'run', 'safetensors', tmp_path / 'features.safetensors')
  net = refs.TorchVisionVGG(16, True, width=NARROW)
  net.features.load_state_dict(
    {k.removeprefix('features.'): v for k, v in load_file(path).items()}, strict=True
  )
  x = images(64)
  with torch.no_grad():
    tensor = torch.from_numpy(porting.Preprocessing('torch')(x)).permute(0, 3, 1, 2)
    reference = net.eval().features(tensor).permute(0, 2, 3, 1).numpy()
  assert_close(logits(model, variables, porting.Preprocessing('torch')(x)), reference)
  ported = porting.read(path)
  assert (ported.arch.name, ported.arch.head) == ('vgg16_bn', 'none')
  assert_same_variables(ported.variables, variables)


@pytest.mark.parametrize('head, size', [('imagenet', 224), ('gap', 64), ('none', 64)])
def test_keras_h5_export_ports_back_exactly(head, size, tmp_path):
  model, variables = make_run(
    tmp_path / 'run', 'vgg16', head, size=size, divisor=100, inputs='caffe'
  )
  path = export(tmp_path / 'run', 'keras_h5', tmp_path / 'vgg16.h5')
  ported = porting.read(path)
  assert (ported.format, ported.arch.name, ported.arch.head) == ('keras_h5', 'vgg16', head)
  assert_same_variables(ported.variables, variables)
  assert ported.preprocessing.name == 'caffe'  # the run's, recorded beside the file
  assert ported.provenance['classes'] is None and ported.provenance['step'] == 0
  x = images(size)
  assert_close(
    logits(ported.arch.model(), ported.variables, ported.preprocessing(x)),
    logits(model, variables, porting.Preprocessing('caffe')(x)),
  )


@pytest.mark.slow  # a full-width Keras VGG16
def test_keras_h5_export_loads_into_keras_vgg16(tmp_path):
  import keras

  model, variables = make_run(tmp_path / 'run', 'vgg16', 'none', width=1.0, divisor=100)
  path = export(tmp_path / 'run', 'keras_h5', tmp_path / 'vgg16_notop.h5')
  net = keras.applications.VGG16(weights=None, include_top=False, input_shape=(None, None, 3))
  net.load_weights(str(path))
  x = images(64)
  ours = logits(model, variables, porting.Preprocessing('caffe')(x))
  assert_close(ours, refs.keras_logits(net, x))
  keras.backend.clear_session()


@pytest.mark.parametrize(
  'name, head, pool, format, message',
  [
    ('vgg11', 'mlp', 7, 'torchvision', "this model has the 'mlp' head"),
    ('vgg11', 'imagenet', 0, 'torchvision', 'fc1 reads 2x2'),
    ('vgg16_bn', 'gap', 0, 'keras_h5', 'Keras VGGs have no BatchNorm'),
    ('vgg16', 'imagenet', 0, 'keras_h5', 'model reads 64-pixel images, pooled to 2x2'),
    ('vgg16', 'imagenet', 7, 'keras_h5', 'model reads 64-pixel images, pooled to 7x7'),
  ],
)
def test_models_a_format_cannot_hold_exit_2_with_one_line(
  name, head, pool, format, message, tmp_path, capsys
):
  make_run(tmp_path / 'run', name, head, pool=pool)
  output = tmp_path / 'out' / 'weights'
  assert (
    export_weights.main([str(tmp_path / 'run'), '--format', format, '--output', str(output)]) == 2
  )
  err = capsys.readouterr().err.strip()
  assert message in err and len(err.splitlines()) == 1, err
  assert not output.exists()


def test_not_a_run_directory(tmp_path, capsys):
  args = [str(tmp_path), '--format', 'safetensors', '--output', str(tmp_path / 'x')]
  assert export_weights.main(args) == 2
  assert 'holds no config.json' in capsys.readouterr().err
