"""torchvision VGG state dicts (`vgg11` ... `vgg19`, `_bn`) from `.pth` or `.safetensors`.

torchvision names its layers by their index in two `nn.Sequential`s:

  features.{i}.weight|bias               Conv2d (out, in, 3, 3), then ReLU, MaxPool after a block
  features.{i+1}.weight|bias|running_*   BatchNorm2d (the `_bn` variants), eps 1e-5
  classifier.0|3|6.weight|bias           Linear(25088, 4096), Linear(4096, 4096), Linear(4096, n)

`AdaptiveAvgPool2d((7, 7))` sits between the two, so the port sets `adaptive_pool=7`: fc1
sees 7x7x512 at any image size, as in torch. classifier.0 reads an NCHW flatten, which the
port reorders for Flax's NHWC flatten. `num_batches_tracked` (a BatchNorm step counter that
eval ignores) is not ported. A state dict of `features` alone ports as a headless VGG.
"""

from __future__ import annotations

import os
import re
from typing import Mapping

import numpy as np

from ftlab.models import vgg
from ftlab.porting import common, tensor_files

# torchvision's AdaptiveAvgPool2d before the classifier.
POOL_SIZE = 7
CLASSIFIER = {'fc1': 'classifier.0', 'fc2': 'classifier.3', 'predictions': 'classifier.6'}
FEATURE = re.compile(r'features\.(\d+)\.weight')


def feature_indices(depth: int, batch_norm: bool) -> list[tuple[int, str]]:
  """(index in `features`, Flax layer name) of each conv, as torchvision builds the list."""
  index, found, block = 0, [], 1
  for b, layer in common.conv_layers(depth):
    if b != block:  # the previous block's MaxPool2d took one index
      index, block = index + 1, b
    found.append((index, layer))
    index += 3 if batch_norm else 2  # conv, [bn,] relu
  return found


def conv_indices(tensors: Mapping[str, np.ndarray]) -> list[int]:
  """Indices in `features` of the 4-d weights (convs; BatchNorm weights are 1-d)."""
  return sorted(
    int(m.group(1)) for n, t in tensors.items() if (m := FEATURE.fullmatch(n)) and t.ndim == 4
  )


def infer_depth(tensors: Mapping[str, np.ndarray]) -> tuple[int, bool] | None:
  """(depth, batch_norm) whose conv indices are exactly the file's, or None."""
  convs = conv_indices(tensors)
  for depth in vgg.CONVS_PER_BLOCK:
    for batch_norm in (False, True):
      if [i for i, _ in feature_indices(depth, batch_norm)] == convs:
        return depth, batch_norm
  return None


def feature_rules(depth: int, batch_norm: bool) -> list[common.Rule]:
  """Rules for `features.*`: convs (OIHW -> HWIO) and BatchNorm (params and statistics)."""
  rules = []
  for index, layer in feature_indices(depth, batch_norm):
    rules += [
      common.Rule(f'features.{index}.weight', f'params/{layer}/kernel', common.OIHW),
      common.Rule(f'features.{index}.bias', f'params/{layer}/bias'),
    ]
    if batch_norm:
      bn = f'features.{index + 1}'
      rules += [
        common.Rule(f'{bn}.weight', f'params/{layer}_bn/scale'),
        common.Rule(f'{bn}.bias', f'params/{layer}_bn/bias'),
        common.Rule(f'{bn}.running_mean', f'batch_stats/{layer}_bn/mean'),
        common.Rule(f'{bn}.running_var', f'batch_stats/{layer}_bn/var'),
      ]
  return rules


def classifier_rules(arch: common.Arch) -> list[common.Rule]:
  """Rules for `classifier.*` (none for a headless arch)."""
  if arch.head == 'none':
    return []
  last_channels = vgg.scaled(vgg.BLOCK_CHANNELS[-1], arch.width)
  layouts = {
    'fc1': common.linear_after_nchw_flatten(last_channels),
    'fc2': common.LINEAR,
    'predictions': common.LINEAR,
  }
  return [
    rule
    for layer, source in CLASSIFIER.items()
    for rule in (
      common.Rule(f'{source}.weight', f'params/{layer}/kernel', layouts[layer]),
      common.Rule(f'{source}.bias', f'params/{layer}/bias'),
    )
  ]


def first_conv_width(tensors: Mapping[str, np.ndarray]) -> float:
  first = tensors.get('features.0.weight')
  return common.width_of(first.shape[0]) if first is not None and first.ndim == 4 else 1.0


def ignored(name: str) -> bool:
  return name.endswith('.num_batches_tracked')


def from_tensors(
  tensors: Mapping[str, np.ndarray], arch: str | None = None, source: str = 'state dict'
) -> common.Ported:
  """Ports a torchvision VGG state dict (names -> numpy arrays).

  Args:
    tensors: the state dict, e.g. `tensor_files.read(path)`.
    arch: `vgg16_bn` etc. to require that layout; None to infer it from the conv indices.
      Width, head and class count always come from the tensors' shapes.
    source: the file, for messages.

  Raises:
    PortError: the layout cannot be inferred, or the tensors do not match the arch (the
      message lists every missing, unexpected and mis-shaped tensor).
  """
  depth, batch_norm = common.choose_depth(
    infer_depth(tensors),
    arch,
    f'{source} has conv weights at features indices {conv_indices(tensors)}, which is no '
    'torchvision VGG layout',
  )
  predictions = tensors.get('classifier.6.weight')
  headless = not any(n.startswith('classifier.') for n in tensors)
  ported_arch = common.Arch(
    depth=depth,
    batch_norm=batch_norm,
    head='none' if headless else 'imagenet',
    width=first_conv_width(tensors),
    num_classes=predictions.shape[0] if predictions is not None else 1000,
    adaptive_pool=0 if headless else POOL_SIZE,
  )
  rules = feature_rules(depth, batch_norm) + classifier_rules(ported_arch)
  variables = common.assemble(tensors, rules, ported_arch, ignored=ignored, source=source)
  notes = ('num_batches_tracked not ported (eval ignores it)',) if batch_norm else ()
  return common.Ported('torchvision', ported_arch, variables, common.Preprocessing('torch'), notes)


def read(path: str | os.PathLike, arch: str | None = None) -> common.Ported:
  """Ports a torchvision VGG `.pth` (read with `weights_only=True`) or `.safetensors` file.

  See `from_tensors` for `arch` and the errors raised.
  """
  return from_tensors(tensor_files.read(path), arch, source=os.fspath(path))
