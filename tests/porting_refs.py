"""Independent references for the porting tests: torchvision's VGG written in torch, timm's
renaming of its weights, and Keras applications VGGs saved with Keras' legacy HDF5 saver.

Nothing here imports ftlab: the references follow the source frameworks' code, so a
mistake in ftlab's tables cannot be copied into them. Weights are random but scaled (He
normal, random biases and BatchNorm statistics) so that every layer's activations, and the
logits, stay of order one: differences of 1e-4 are then meaningful.
"""

import numpy as np
import torch
from torch import nn

# torchvision's `cfgs` ('A', 'B', 'D', 'E'): channels per conv, 'M' for a max-pool.
TORCHVISION_CFGS = {
  11: [64, 'M', 128, 'M', 256, 256, 'M', 512, 512, 'M', 512, 512, 'M'],
  13: [64, 64, 'M', 128, 128, 'M', 256, 256, 'M', 512, 512, 'M', 512, 512, 'M'],
  16: [64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M', 512, 512, 512, 'M'],
  19: [
    *[64, 64, 'M', 128, 128, 'M', 256, 256, 256, 256, 'M'],
    *[512, 512, 512, 512, 'M', 512, 512, 512, 512, 'M'],
  ],
}
TORCH_MEAN, TORCH_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class TorchVisionVGG(nn.Module):
  """torchvision.models.VGG's layout and forward, with a width multiplier for tests."""

  def __init__(self, depth, batch_norm=False, num_classes=1000, width=1.0):
    super().__init__()
    layers, channels = [], 3
    for v in TORCHVISION_CFGS[depth]:
      if v == 'M':
        layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        continue
      v = max(1, round(v * width))
      layers.append(nn.Conv2d(channels, v, kernel_size=3, padding=1))
      if batch_norm:
        layers.append(nn.BatchNorm2d(v))
      layers.append(nn.ReLU(inplace=True))
      channels = v
    units = max(1, round(4096 * width))
    self.features = nn.Sequential(*layers)
    self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
    self.classifier = nn.Sequential(
      nn.Linear(channels * 7 * 7, units),
      nn.ReLU(True),
      nn.Dropout(),
      nn.Linear(units, units),
      nn.ReLU(True),
      nn.Dropout(),
      nn.Linear(units, num_classes),
    )

  def forward(self, x):
    x = self.avgpool(self.features(x))
    return self.classifier(torch.flatten(x, 1))


class NHWCWrapped(nn.Module):
  """A torch VGG taking NHWC images and flattening NHWC (a Keras-style ONNX graph)."""

  def __init__(self, net):
    super().__init__()
    self.net = net

  def forward(self, x):
    x = self.net.features(x.permute(0, 3, 1, 2))
    x = torch.flatten(x.permute(0, 2, 3, 1), 1)
    return torch.softmax(self.net.classifier(x), dim=-1)


def randomize_torch(module, seed=0):
  """He-normal weights, small random biases, BatchNorm affine and statistics; eval mode."""
  rng = np.random.default_rng(seed)

  def fill(tensor, values):
    tensor.copy_(torch.from_numpy(values.astype(np.float32)))

  weighted = [m for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
  with torch.no_grad():
    for m in module.modules():
      if isinstance(m, (nn.Conv2d, nn.Linear)):
        fan_in = m.weight[0].numel()
        # The output layer smaller: logits with a std of about 1.5.
        scale = (2 / fan_in) ** 0.5 / (4 if m is weighted[-1] else 1)
        normal = rng.standard_normal(tuple(m.weight.shape), dtype=np.float32)
        fill(m.weight, normal * np.float32(scale))
        fill(m.bias, rng.uniform(-0.1, 0.1, m.bias.shape[0]))
      elif isinstance(m, nn.BatchNorm2d):
        n = m.num_features
        fill(m.weight, rng.uniform(0.5, 1.5, n))
        fill(m.bias, rng.uniform(-0.2, 0.2, n))
        fill(m.running_mean, rng.normal(0, 0.3, n))
        fill(m.running_var, rng.uniform(0.5, 2.0, n))
        m.num_batches_tracked.fill_(123)
  return module.eval()


def torch_logits(module, images_uint8_nhwc):
  """torchvision's transforms (ToTensor, Normalize) then the module, as numpy."""
  x = torch.from_numpy(images_uint8_nhwc).permute(0, 3, 1, 2).float() / 255.0
  mean, std = torch.tensor(TORCH_MEAN).view(1, 3, 1, 1), torch.tensor(TORCH_STD).view(1, 3, 1, 1)
  with torch.no_grad():
    return module((x - mean) / std).numpy()


def timm_state_dict(state_dict):
  """timm's `_filter_fn` for torchvision VGG weights: the classifier becomes convs."""
  out = {}
  for name, value in state_dict.items():
    name = name.replace('classifier.0', 'pre_logits.fc1')
    name = name.replace('classifier.3', 'pre_logits.fc2')
    name = name.replace('classifier.6', 'head.fc')
    if name == 'pre_logits.fc1.weight':
      value = value.reshape(value.shape[0], -1, 7, 7)
    elif name == 'pre_logits.fc2.weight':
      value = value.reshape(value.shape[0], -1, 1, 1)
    out[name] = value.contiguous()
  return out


def keras_vgg(depth, include_top, seed=0):
  """Keras applications VGG16/VGG19 without downloads, random scaled weights, logits out."""
  import keras

  build = {16: keras.applications.VGG16, 19: keras.applications.VGG19}[depth]
  kwargs = {'classifier_activation': None} if include_top else {'input_shape': (None, None, 3)}
  model = build(weights=None, include_top=include_top, **kwargs)
  rng = np.random.default_rng(seed)
  first, last = True, [layer for layer in model.layers if len(layer.get_weights()) == 2][-1]
  for layer in model.layers:
    weights = layer.get_weights()
    if len(weights) != 2:
      continue
    kernel, bias = weights
    fan_in = int(np.prod(kernel.shape[:-1]))
    # Caffe inputs are on the 0-255 scale: the first conv brings them to order one, and the
    # output layer keeps the logits' std near 1.5.
    scale = (2 / fan_in) ** 0.5 / (100 if first else 4 if layer is last and include_top else 1)
    layer.set_weights(
      [
        rng.standard_normal(kernel.shape, dtype=np.float32) * np.float32(scale),
        (rng.uniform(-0.1, 0.1, bias.shape)).astype(np.float32),
      ]
    )
    first = False
  return model


def save_keras_legacy_h5(model, path):
  """Keras' own legacy saver: the layout of the keras-applications `.h5` files."""
  import h5py
  from keras.src.legacy.saving import legacy_h5_format

  with h5py.File(path, 'w') as f:
    legacy_h5_format.save_weights_to_hdf5_group(f, model)


def keras_logits(model, images_uint8_nhwc):
  """Keras' own caffe preprocessing, then the model."""
  import keras

  x = keras.applications.vgg16.preprocess_input(images_uint8_nhwc.astype(np.float32))
  return np.asarray(model.predict(x, verbose=0))
