"""Ported weights give the source framework's logits: Keras, torchvision, timm and ONNX files
made here from independent references (tests/porting_refs.py) with random weights, compared on
the same uint8 images; wrong files fail with one clear error; a port fine-tunes end to end.

Full-width models only where the equivalence must be shown at full size (Keras VGG16/VGG19,
torch VGG16 and VGG16_BN); every other test uses width 1/16.
"""

# ruff: noqa: E402 (the imports below need torch, which this module asks for first)

import pytest

from tests import fakes

torch = pytest.importorskip('torch', reason=fakes.NO_TORCH)

import functools
import hashlib
import json
import os
import subprocess
import sys
import warnings

import jax
import numpy as np
import porting_refs as refs
from safetensors.torch import save_file

from ftlab import porting
from ftlab.files import checkpoint
from ftlab.porting import PortError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION_MNIST = '/usr/share/datasets/fashion-mnist'
MAX_ABS_DIFF = 1e-4  # float32 logits, of order one (see porting_refs)
NARROW = 1 / 16
# Keras' TensorFlow backend converts tensors the NumPy 1 way; not ours to fix.
pytestmark = pytest.mark.filterwarnings('ignore:__array__ implementation:DeprecationWarning')


def images(size, n=2, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@functools.cache
def _apply_fn(arch):
  return jax.jit(functools.partial(arch.model().apply, train=False))


def ftlab_output(ported, images_uint8):
  """As a user runs a port: `model.apply(variables, preprocess(images), train=False)`."""
  return np.asarray(_apply_fn(ported.arch)(ported.variables, ported.preprocessing(images_uint8)))


def assert_matches(ours, reference):
  assert ours.shape == reference.shape
  diff = float(np.abs(ours - reference).max())
  # Logits of order one, so that the bound says something (porting_refs scales the weights).
  assert float(reference.std()) > 0.1
  assert diff <= MAX_ABS_DIFF, f'max abs difference {diff:.3g}'
  print(f'max abs diff {diff:.2e}, reference {reference.shape} std {reference.std():.2f}')


def save_safetensors(state_dict, path):
  save_file({k: v.contiguous() for k, v in state_dict.items()}, os.fspath(path))


def export_onnx(module, path, size=224, **kwargs):
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    torch.onnx.export(
      module, (torch.zeros(1, 3, size, size),), os.fspath(path), dynamo=False, **kwargs
    )


def narrow_torch(depth, batch_norm, seed=0):
  net = refs.TorchVisionVGG(depth, batch_norm, num_classes=10, width=NARROW)
  return refs.randomize_torch(net, seed)


# --- Full width: torch VGG16 and VGG16_BN, and the files made from them. -------------------


class TorchSource:
  """A full-width torchvision-layout VGG and its logits at 224 and at 96 pixels."""

  SIZES = (224, 96)

  def __init__(self, batch_norm):
    self.module = refs.randomize_torch(refs.TorchVisionVGG(16, batch_norm), seed=int(batch_norm))
    self.logits = {s: refs.torch_logits(self.module, images(s)) for s in self.SIZES}


@pytest.fixture(scope='module')
def vgg16_torch():
  return TorchSource(batch_norm=False)


@pytest.fixture(scope='module')
def vgg16_bn_torch():
  return TorchSource(batch_norm=True)


@pytest.mark.slow  # full-width VGG16
@pytest.mark.parametrize('name, suffix', [('vgg16', '.pth'), ('vgg16_bn', '.safetensors')])
def test_torchvision_full_width_matches_torch_at_224_and_96(name, suffix, request, tmp_path):
  source = request.getfixturevalue(f'{name}_torch')
  path = tmp_path / f'{name}{suffix}'
  if suffix == '.pth':
    torch.save(source.module.state_dict(), path)
  else:
    save_safetensors(source.module.state_dict(), path)
  ported = porting.read(path)
  assert (ported.format, ported.arch.name, ported.arch.width) == ('torchvision', name, 1.0)
  assert (ported.arch.adaptive_pool, ported.preprocessing.name) == (7, 'torch')
  assert porting.param_count(ported.variables) == sum(p.numel() for p in source.module.parameters())
  for size in TorchSource.SIZES:  # 96: a 3x3 block-5 map, pooled up to 7x7 as in torch
    assert_matches(ftlab_output(ported, images(size)), source.logits[size])


@pytest.mark.slow  # full-width VGG16
def test_timm_layout_full_width_matches_torch(vgg16_torch, tmp_path):
  path = tmp_path / 'vgg16.timm.safetensors'
  save_safetensors(refs.timm_state_dict(vgg16_torch.module.state_dict()), path)
  ported = porting.read(path)
  assert porting.detect_format(path) == 'timm' and ported.format == 'timm'
  assert (ported.arch.name, ported.arch.adaptive_pool) == ('vgg16', 7)
  # At 224 (and below: the narrow test runs 64 px) timm's conv head equals the dense one.
  assert_matches(ftlab_output(ported, images(224)), vgg16_torch.logits[224])


@pytest.mark.slow  # full-width VGG16
def test_onnx_full_width_with_folded_batch_norm_matches_torch(vgg16_bn_torch, tmp_path):
  path = tmp_path / 'vgg16_bn.onnx'
  export_onnx(vgg16_bn_torch.module, path)  # eval-mode export folds BatchNorm into the convs
  ported = porting.read(path)
  assert (ported.format, ported.arch.name, ported.arch.adaptive_pool) == ('onnx', 'vgg16', 7)
  assert any('folded' in note for note in ported.notes)
  assert_matches(ftlab_output(ported, images(224)), vgg16_bn_torch.logits[224])


# --- Keras applications VGG16/VGG19, saved with Keras' legacy HDF5 saver. -------------------


@pytest.fixture(scope='module')
def keras_file(tmp_path_factory):
  """(depth, include_top) -> (path, Keras' logits or features on `images(size)`), cached."""
  made = {}

  def make(depth, include_top):
    if (depth, include_top) not in made:
      import keras

      model = refs.keras_vgg(depth, include_top)
      path = tmp_path_factory.mktemp('keras') / f'vgg{depth}{"" if include_top else "_notop"}.h5'
      refs.save_keras_legacy_h5(model, path)
      size = 224 if include_top else 160  # without the top, any size
      made[depth, include_top] = path, size, refs.keras_logits(model, images(size))
      del model
      keras.backend.clear_session()
    return made[depth, include_top]

  return make


@pytest.mark.slow  # full-width Keras VGG16/19
@pytest.mark.parametrize(
  'depth, include_top, params',
  [(16, True, 138_357_544), (16, False, 14_714_688), (19, True, 143_667_240), (19, False, None)],
)
def test_keras_h5_matches_keras(depth, include_top, params, keras_file):
  path, size, reference = keras_file(depth, include_top)
  model, variables, preprocess = porting.load(path)
  assert (model.depth, model.batch_norm, model.head) == (
    depth,
    False,
    'imagenet' if include_top else 'none',
  )
  assert preprocess.name == 'caffe' and model.adaptive_pool == 0
  if params:
    assert porting.param_count(variables) == params
  assert_matches(
    np.asarray(model.apply(variables, preprocess(images(size)), train=False)), reference
  )


# --- Every torchvision layout, narrow, in each tensor-file format. ---------------------------


@pytest.mark.parametrize('depth', [11, 13, 16, 19])
@pytest.mark.parametrize('batch_norm', [False, True], ids=['plain', 'bn'])
def test_every_torchvision_layout_is_inferred_and_exact(depth, batch_norm, tmp_path):
  net = narrow_torch(depth, batch_norm)
  reference = refs.torch_logits(net, images(64))
  files = {
    'torchvision': tmp_path / 'a.pth',
    'timm': tmp_path / 'b.safetensors',
  }
  torch.save(net.state_dict(), files['torchvision'])
  save_safetensors(refs.timm_state_dict(net.state_dict()), files['timm'])
  name = f'vgg{depth}' + ('_bn' if batch_norm else '')
  for format, path in files.items():
    ported = porting.read(path)
    assert (ported.format, ported.arch.name) == (format, name)
    assert (ported.arch.width, ported.arch.num_classes) == (NARROW, 10)
    assert_matches(ftlab_output(ported, images(64)), reference)


def test_headless_torchvision_features(tmp_path):
  net = narrow_torch(13, batch_norm=True)
  path = tmp_path / 'features.safetensors'
  save_safetensors({f'features.{k}': v for k, v in net.features.state_dict().items()}, path)
  ported = porting.read(path)
  assert (ported.arch.name, ported.arch.head) == ('vgg13_bn', 'none')
  x = torch.from_numpy(ported.preprocessing(images(96))).permute(0, 3, 1, 2)
  with torch.no_grad():
    reference = net.features(x).permute(0, 2, 3, 1).numpy()
  assert_matches(ftlab_output(ported, images(96)), reference)


# --- ONNX: BatchNorm kept or folded, NCHW or NHWC graphs. ------------------------------------


def test_onnx_batch_norm_nodes_and_folded_batch_norm_as_bn(tmp_path):
  net = narrow_torch(11, batch_norm=True)
  reference = refs.torch_logits(net, images(224))
  kept, folded = tmp_path / 'kept.onnx', tmp_path / 'folded.onnx'
  export_onnx(net, kept, do_constant_folding=False)  # BatchNormalization nodes stay
  export_onnx(net, folded)
  ported = porting.read(kept)
  assert ported.arch.name == 'vgg11_bn' and 'batch_stats' in ported.variables
  assert_matches(ftlab_output(ported, images(224)), reference)
  # Asking for the _bn layout of a folded graph adds identity BatchNorm layers.
  ported = porting.read(folded, arch='vgg11_bn')
  assert ported.arch.name == 'vgg11_bn' and any('identity' in n for n in ported.notes)
  assert_matches(ftlab_output(ported, images(224)), reference)


def test_onnx_nhwc_graph_with_softmax(tmp_path):
  net = refs.NHWCWrapped(narrow_torch(16, batch_norm=False)).eval()
  path = tmp_path / 'nhwc.onnx'
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    torch.onnx.export(net, (torch.zeros(1, 224, 224, 3),), path, dynamo=False)
  # An NHWC input is taken for a Keras export trained on x/255, and said to be a guess; this
  # one wants torch's convention.
  guessed = porting.read(path).preprocessing
  assert guessed.name == 'unit' and 'NHWC' in guessed.guess
  assert 'guess' in guessed.to_json() and 'a guess' in porting.read(path).report()
  ported = porting.read(path, preprocess='torch')
  assert ported.preprocessing.guess == ''  # given, not guessed
  assert ported.arch.adaptive_pool == 0 and any('Softmax' in n for n in ported.notes)
  with torch.no_grad():
    x = torch.from_numpy(ported.preprocessing(images(224)))
    reference = torch.log(net(x)).numpy()
  logits = ftlab_output(ported, images(224))
  assert_matches(np.asarray(jax.nn.log_softmax(logits)), reference)


# --- Wrong files: one clear PortError. --------------------------------------------------------


def test_wrong_arch_lists_every_offending_tensor(tmp_path, keras_file):
  path = tmp_path / 'vgg11.pth'
  torch.save(narrow_torch(11, batch_norm=False).state_dict(), path)
  with pytest.raises(PortError) as e:
    porting.load(path, arch='vgg13')
  message = str(e.value)
  assert 'does not match vgg13' in message
  assert 'features.2.weight (expected (4, 4, 3, 3))' in message  # vgg13's block1_conv2
  assert 'unexpected (14): features.3.weight (8, 4, 3, 3)' in message
  keras_notop, _, _ = keras_file(16, False)
  with pytest.raises(PortError, match=r'missing \(6\): block3_conv4/kernel \(expected '):
    porting.load(keras_notop, arch='vgg19')


def test_missing_extra_and_misshaped_tensors_in_one_error(tmp_path):
  state = narrow_torch(11, batch_norm=True).state_dict()
  state['classifier.3.weight'] = torch.zeros(256, 100)
  state['features.2.weight'] = torch.zeros(3)  # inside the VGG, where a ReLU has no weights
  del state['features.1.running_var']
  path = tmp_path / 'bad.safetensors'
  save_safetensors(state, path)
  with pytest.raises(PortError) as e:
    porting.load(path)
  message = str(e.value)
  assert 'missing (1): features.1.running_var (expected (4,))' in message
  assert 'unexpected (1): features.2.weight (3,)' in message
  assert 'mismatch (1): classifier.3.weight expected (256, 256) found (256, 100)' in message
  assert 'num_batches_tracked' not in message  # ignored, not unexpected
  # A tensor outside the VGG is no error: the port leaves it out and says so.
  del state['features.2.weight']
  state['classifier.3.weight'] = torch.zeros(256, 256)
  state['features.1.running_var'] = torch.ones(4)
  state['extra.weight'] = torch.zeros(3)
  save_safetensors(state, path)
  ported = porting.read(path)
  assert ported.left_out == 'extra.weight' and 'extra.weight' in ported.report()


@pytest.mark.parametrize('suffix', ['.h5', '.pth', '.safetensors', '.onnx'])
def test_truncated_files(suffix, tmp_path, keras_file):
  whole = tmp_path / f'whole{suffix}'
  net = narrow_torch(11, batch_norm=False)
  if suffix == '.h5':
    whole = keras_file(16, False)[0]
  elif suffix == '.pth':
    torch.save(net.state_dict(), whole)
  elif suffix == '.safetensors':
    save_safetensors(net.state_dict(), whole)
  else:
    export_onnx(net, whole)
  data = open(whole, 'rb').read()
  cut = tmp_path / f'cut{suffix}'
  cut.write_bytes(data[: len(data) // 2])
  with pytest.raises(PortError, match='truncated or damaged'):
    porting.load(cut)


def test_non_vgg_onnx_graph(tmp_path):
  class Residual(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
      return x + torch.relu(self.conv(x))

  path = tmp_path / 'residual.onnx'
  export_onnx(Residual().eval(), path, size=32)
  with pytest.raises(PortError, match=r'not a VGG graph: tensor .* feeds 2 nodes'):
    porting.load(path)
  path = tmp_path / 'mlp.onnx'
  mlp = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10)).eval()
  export_onnx(mlp, path, size=32)
  with pytest.raises(PortError, match='not a VGG graph'):
    porting.load(path)


def test_unknown_and_unsupported_files(tmp_path):
  noise = tmp_path / 'weights.bin'
  noise.write_bytes(np.random.default_rng(0).bytes(1000))
  with pytest.raises(PortError, match='cannot tell the format'):
    porting.load(noise)
  with pytest.raises(PortError, match='no such file'):
    porting.load(tmp_path / 'absent.pth')
  # A conv layout that is no VGG's: said what was found, and no `arch=` (it cannot help).
  odd = tmp_path / 'odd.safetensors'
  save_file(
    {'features.0.weight': torch.zeros(4, 3, 3, 3), 'features.5.weight': torch.zeros(8, 4, 3, 3)},
    odd,
  )
  with pytest.raises(PortError, match=r'cannot tell which VGG this is: .*\[0, 5\]') as e:
    porting.load(odd)
  assert 'arch=' not in str(e.value) and 'another architecture' in str(e.value)
  import keras

  keras3 = tmp_path / 'model.weights.h5'  # Keras 3's own HDF5 layout, of no VGG
  keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]).save_weights(keras3)
  with pytest.raises(PortError, match=r'no Keras VGG: no layer named block') as e:
    porting.load(keras3)
  assert 'dense/* (2)' in str(e.value) and 'arch=' not in str(e.value)


def test_pickle_with_code_is_refused(tmp_path):
  marker = tmp_path / 'pwned'

  class Payload:
    def __reduce__(self):
      return (os.system, (f'touch {marker}',))

  path = tmp_path / 'evil.pth'
  torch.save({'features.0.weight': torch.zeros(4, 3, 3, 3), 'x': Payload()}, path)
  with pytest.raises(PortError, match='could run code when loaded; refused'):
    porting.load(path)
  assert not marker.exists()


# --- The script, and a port fine-tuned through `python -m ftlab.main`. -----------------------


@pytest.mark.slow  # the script and a run in subprocesses
def test_port_script_then_fine_tune_end_to_end(tmp_path):
  source = tmp_path / 'vgg11.pth'
  torch.save(narrow_torch(11, batch_norm=False).state_dict(), source)
  ported = porting.read(source)
  out = tmp_path / 'ported'
  script = [sys.executable, os.path.join(ROOT, 'scripts', 'port_weights.py')]
  result = subprocess.run(
    [*script, f'--input={source}', f'--output={out}'],
    capture_output=True,
    text=True,
    cwd=ROOT,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr
  record = json.loads((out / 'port.json').read_text())
  assert record['sha256'] == hashlib.sha256(source.read_bytes()).hexdigest()
  assert (record['format'], record['arch']['name'], record['preprocessing']['name']) == (
    'torchvision',
    'vgg11',
    'torch',
  )
  assert record['param_count'] == porting.param_count(ported.variables)
  stored = checkpoint.load_params(out, ported.variables['params'])
  assert all(jax.tree.leaves(jax.tree.map(np.array_equal, stored, ported.variables['params'])))

  if not os.path.isdir(FASHION_MNIST):
    pytest.skip('Fashion-MNIST IDX files absent: apt-get install dataset-fashion-mnist')
  workdir = tmp_path / 'run'
  result = subprocess.run(
    [
      sys.executable,
      '-m',
      'ftlab.main',
      '--config=configs/default.py:runlocal',
      f'--workdir={workdir}',
      *record['config_flags'],  # name, width, head, adaptive_pool, preprocess, init
      '--config.policy.name=linear_probe',
      '--config.num_train_steps=4',
      '--config.dataset.eval_split=test[:64]',
    ],
    capture_output=True,
    text=True,
    cwd=ROOT,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  trained = checkpoint.load_params(workdir / 'checkpoints', ported.variables['params'])
  # The frozen backbone is the ported one, bit for bit; the new head moved.
  for layer in ('block1_conv1', 'block5_conv2', 'fc1', 'fc2'):
    assert np.array_equal(trained[layer]['kernel'], ported.variables['params'][layer]['kernel'])
  assert not np.array_equal(
    trained['predictions']['kernel'], ported.variables['params']['predictions']['kernel']
  )
