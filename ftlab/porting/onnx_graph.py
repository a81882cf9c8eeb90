"""ONNX VGG graphs: weights found by walking the graph, not by initializer names.

Exporters name initializers as they like (`features.0.weight`, or `onnx::Conv_100` once
BatchNorm is folded into the convs), so the port follows the graph from its input through
the single chain a VGG is:

  (Transpose) Conv [BatchNormalization] Relu ... MaxPool   x 5 blocks
  [AveragePool | GlobalAveragePool] [Transpose] Flatten|Reshape
  (Gemm | MatMul [Add]) Relu [Dropout]  x 2, then Gemm | MatMul [Add] [Softmax]

Each MaxPool closes a block, so the conv counts per block give the depth. Weights come from
initializers, `Constant` nodes or `Identity` of either. A conv with a BatchNormalization
after it ports as the `_bn` layout (its epsilon folded into the variance, since ftlab's
BatchNorm uses 1e-5); graphs whose exporter folded BatchNorm into the convs (torch's default
in eval mode) port as the plain layout, which computes the same function. Asking for the
`_bn` layout of such a graph adds identity BatchNorm layers (mean 0, variance 1 - eps).

A pool before the flatten (torch's `AdaptiveAvgPool2d`) becomes `adaptive_pool`; an NCHW
flatten (a graph that does not transpose to NHWC first) is reordered for Flax's NHWC one. A
final Softmax is dropped: the ported model returns logits. A head that is not VGG's (a
transfer model's own dense layers, as tf2onnx exports a Keras `Sequential([vgg16, ...])`)
is left out: the conv base ports headless and the port says what was not ported.

An ONNX graph does not record its preprocessing, so the port guesses, records the guess as
one, and `preprocess` overrides it. A graph whose input is NHWC (a leading Transpose) comes from
TensorFlow (tf2onnx): a Keras model its user trained and exported, most often on
`rescale=1./255` inputs, so `unit` (keras.applications' `caffe` convention is applied by
`preprocess_input` outside the graph, to the untouched ImageNet weights: pass `caffe` for
those). An NCHW graph comes from torch: `torch`.
"""

from __future__ import annotations

import math
import os

import numpy as np

from ftlab.models import vgg
from ftlab.porting import common
from ftlab.porting.common import PortError
from ftlab.porting.onnx_walk import BN_EPSILON, DENSE_LAYERS, Chain, Layer, walk


def _tensors(chain: Chain, identity_bn: bool) -> dict[str, np.ndarray]:
  """Positional names: `block{b}_conv{i}/weight|bias`, `..._bn/...`, `fc1/weight`, ..."""
  tensors = {}
  for b, block in enumerate(chain.blocks, start=1):
    for i, layer in enumerate(block, start=1):
      name = f'block{b}_conv{i}'
      tensors.update(_weight_and_bias(name, layer))
      bn = layer.batch_norm
      if bn is None and identity_bn:
        ones = np.ones(layer.weight.shape[0], np.float32)
        # Variance 1 - eps makes sqrt(var + eps) exactly 1: the added BatchNorm is the identity.
        bn = {'scale': ones, 'bias': 0 * ones, 'mean': 0 * ones, 'var': ones - BN_EPSILON}
      tensors.update({f'{name}_bn/{k}': v for k, v in (bn or {}).items()})
  for name, layer in zip(DENSE_LAYERS, chain.dense):
    tensors.update(_weight_and_bias(name, layer))
  return tensors


def _weight_and_bias(name: str, layer: Layer) -> dict[str, np.ndarray]:
  found = {f'{name}/weight': layer.weight}
  if layer.bias is not None:
    found[f'{name}/bias'] = layer.bias
  return found


def rules(arch: common.Arch, nchw_flatten: bool) -> list[common.Rule]:
  found = []
  for _, layer in common.conv_layers(arch.depth):
    found += [
      common.Rule(f'{layer}/weight', f'params/{layer}/kernel', common.OIHW),
      common.Rule(f'{layer}/bias', f'params/{layer}/bias'),
    ]
    if arch.batch_norm:
      found += [
        common.Rule(f'{layer}_bn/{k}', f'{kind}/{layer}_bn/{k}')
        for k, kind in [
          ('scale', 'params'),
          ('bias', 'params'),
          ('mean', 'batch_stats'),
          ('var', 'batch_stats'),
        ]
      ]
  if arch.head == 'imagenet':
    channels = vgg.scaled(vgg.BLOCK_CHANNELS[-1], arch.width)
    for layer in DENSE_LAYERS:
      layout = common.LINEAR
      if layer == 'fc1' and nchw_flatten:
        layout = common.linear_after_nchw_flatten(channels)
      found += [
        common.Rule(f'{layer}/weight', f'params/{layer}/kernel', layout),
        common.Rule(f'{layer}/bias', f'params/{layer}/bias'),
      ]
  return found


def read(
  path: str | os.PathLike,
  arch: str | None = None,
  preprocess: str | None = None,
  *,
  allow_nonfinite: bool = False,
) -> common.Ported:
  """Ports an ONNX VGG graph, or the VGG conv base at its start.

  Args:
    path: the `.onnx` file.
    arch: `vgg16_bn` etc. to require that layout; None to infer it from the graph.
    preprocess: `caffe`, `torch` or `unit`; None to guess from the input layout (see above).
    allow_nonfinite: see `common.assemble`.

  Raises:
    PortError: unreadable file, a graph that does not start with a VGG chain, or weights
      that do not match the arch (one message lists every problem, by positional layer
      name), or inf/NaN values.
  """
  try:
    import onnx
  except ImportError:
    raise PortError(f'reading {path} needs the onnx package (pip install onnx)') from None
  try:
    graph = onnx.load(os.fspath(path)).graph
  except Exception as e:  # protobuf's DecodeError for a truncated file, among others
    raise PortError(f'cannot read {path} as ONNX (truncated or damaged?): {e}') from None
  chain = walk(graph)
  counts = tuple(len(b) for b in chain.blocks)
  # `_closed` has checked that either every conv has BatchNorm or none has, so the first
  # conv speaks for all.
  graph_bn = chain.blocks[0][0].batch_norm is not None
  depth = common.depth_of(counts)
  depth, batch_norm = common.choose_depth(
    (depth, graph_bn) if depth else None, arch, f'{path} has {counts} convs per block'
  )
  # The `_bn` layout asked of a graph whose exporter folded BatchNorm into the convs: the
  # folded convs already compute the whole function, so identity BatchNorm layers fill in.
  identity_bn = batch_norm and not graph_bn
  first, last = chain.blocks[0][0].weight, chain.blocks[-1][-1].weight
  ported_arch = common.Arch(
    depth=depth,
    batch_norm=batch_norm,
    head='imagenet' if chain.dense else 'none',
    width=common.width_of(first.shape[0]),
    # Weights are in torch's (out, in) layout here (`onnx_walk`), so shape[0] is the output.
    num_classes=chain.dense[-1].weight.shape[0] if chain.dense else 1000,
    # fc1's inputs are side x side x channels of the pooled map.
    adaptive_pool=math.isqrt(chain.dense[0].weight.shape[1] // last.shape[0])
    if chain.dense and chain.pooled
    else 0,
  )
  tensors = _tensors(chain, identity_bn)
  variables = common.assemble(
    tensors,
    rules(ported_arch, chain.nchw_flatten),
    ported_arch,
    source=os.fspath(path),
    allow_nonfinite=allow_nonfinite,
  )
  notes = []
  if identity_bn:
    notes.append('BatchNorm folded into the convs by the exporter; identity BatchNorm added')
  elif not graph_bn:
    notes.append('no BatchNormalization nodes (plain VGG, or BatchNorm folded into the convs)')
  if chain.softmax:
    notes.append("the graph's final Softmax is dropped: the model returns logits")
  guess = ''
  if preprocess is None:
    preprocess = 'unit' if chain.nhwc_input else 'torch'
    guess = (
      'an NHWC input: a Keras export, most often trained on x/255'
      if chain.nhwc_input
      else 'an NCHW input: a torch export'
    )
  found_at = f'the graph from its input to {chain.last_pool!r} (block 5)' if chain.cut else ''
  return common.Ported(
    'onnx',
    ported_arch,
    variables,
    common.Preprocessing(preprocess, guess),
    tuple(notes),
    found_at=found_at,
    left_out=chain.cut,
  )
