"""timm VGG files (`.safetensors`, or `.pth`): torchvision's features with a conv head.

timm keeps torchvision's `features.*` but turns the classifier into convolutions:

  pre_logits.fc1.weight   Conv2d(512, 4096, 7) on the 7x7 block-5 map (classifier.0 reshaped)
  pre_logits.fc2.weight   Conv2d(4096, 4096, 1)
  head.fc.weight          Linear(4096, n) after a global average pool of the 1x1 map

These map onto ftlab's dense head (`fc1`, `fc2`, `predictions`) with `adaptive_pool=7`.
At 224 pixels and below the two agree exactly: timm average-pools maps smaller than 7x7 up
to 7x7, as the adaptive pool does. Above 224 timm slides fc1 over the larger map and averages
the logits' inputs, which a dense head cannot reproduce; the ported model pools to 7x7
instead (torchvision's behaviour, the one these weights were trained with).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping

import numpy as np

from ftlab.porting import common, tensor_files, torchvision

HEAD = {
  # A 7x7 conv on the 7x7 pooled map is fc1; a 1x1 conv on the resulting 1x1 map is fc2.
  'fc1': ('pre_logits.fc1', common.conv_as_dense(torchvision.POOL_SIZE)),
  'fc2': ('pre_logits.fc2', common.conv_as_dense(1)),
  'predictions': ('head.fc', common.LINEAR),
}


def is_timm(names: list[str]) -> bool:
  """Whether tensor names are timm's VGG head (torchvision's have `classifier.*`)."""
  return any(n.startswith(('pre_logits.', 'head.fc.')) for n in names)


def head_rules(arch: common.Arch) -> list[common.Rule]:
  if arch.head == 'none':
    return []
  return [
    rule
    for layer, (source, layout) in HEAD.items()
    for rule in (
      common.Rule(f'{source}.weight', f'params/{layer}/kernel', layout),
      common.Rule(f'{source}.bias', f'params/{layer}/bias'),
    )
  ]


def from_tensors(
  tensors: Mapping[str, np.ndarray],
  arch: str | None = None,
  source: str = 'state dict',
  *,
  names: Mapping[str, str] | None = None,
  allow_nonfinite: bool = False,
) -> common.Ported:
  """Ports a timm VGG state dict (canonical names -> numpy arrays).

  Args:
    tensors: the state dict, under timm's names (`torchvision.locate` finds and renames it).
    arch: `vgg16_bn` etc. to require that layout; None to infer it from the conv indices.
    source: the file, for messages.
    names: canonical name -> name in the file, for messages.
    allow_nonfinite: see `common.assemble`.

  Raises:
    PortError: the layout cannot be inferred, the tensors do not match the arch, or hold
      inf/NaN.
  """
  found = torchvision.infer_depth(tensors)
  depth, batch_norm = common.choose_depth(
    found,
    arch,
    f'{source} has conv weights at features indices {torchvision.conv_indices(tensors)}, '
    'which is no timm VGG layout',
  )
  predictions = tensors.get('head.fc.weight')
  headless = not is_timm(list(tensors))
  ported_arch = common.Arch(
    depth=depth,
    batch_norm=batch_norm,
    head='none' if headless else 'imagenet',
    width=torchvision.first_conv_width(tensors),
    num_classes=predictions.shape[0] if predictions is not None else 1000,
    adaptive_pool=0 if headless else torchvision.POOL_SIZE,
  )
  rules = torchvision.feature_rules(depth, batch_norm) + head_rules(ported_arch)
  variables = common.assemble(
    tensors,
    rules,
    ported_arch,
    ignored=torchvision.ignored,
    source=source,
    names=names,
    allow_nonfinite=allow_nonfinite,
    hint=torchvision.forced_arch_hint(found, arch),
  )
  notes = ('exact up to 224 px; above, timm averages its conv head over positions',)
  return common.Ported(
    'timm', ported_arch, variables, common.Preprocessing('torch', common.TORCHVISION_GUESS), notes
  )


def read(path: str | os.PathLike, arch: str | None = None) -> common.Ported:
  """Ports a timm VGG `.safetensors` (or `.pth`) file; see `from_tensors`."""
  located = torchvision.locate(tensor_files.read(path).tensors, source=os.fspath(path))
  ported = from_tensors(located.tensors, arch, source=os.fspath(path), names=located.names)
  return dataclasses.replace(ported, found_at=located.found_at, left_out=located.left_out)
