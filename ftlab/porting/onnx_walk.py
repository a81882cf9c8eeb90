"""Walking an ONNX graph down the single chain of a VGG, collecting its weights.

The walk starts at the graph's one input and follows the one node that consumes the current
tensor, op by op; any branch, or any op a VGG does not hold where it stands, ends it with a
`PortError` that names the node. Weights are read from initializers, `Constant` nodes or
`Identity` of either, and kept in torch's layouts (conv OIHW, dense (out, in)).

Two things real exporters write are not branches of the network: a `Shape` node reading the
followed tensor (tf2onnx computes a Flatten's target shape from it: `Shape -> Gather -> Concat
-> Reshape`) is skipped. And once the five blocks are complete, a head that is not VGG's
(`fc1 -> fc2 -> predictions`, e.g. a transfer model's dense layers with BatchNorm folded into
`Mul`/`Add`) ends the walk there: the conv base ports alone, and `Chain.cut` says what of the
graph was not ported.
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np

from ftlab.models import vgg
from ftlab.porting.common import PortError

BN_EPSILON = 1e-5  # ftlab's BatchNorm epsilon
DENSE_LAYERS = ('fc1', 'fc2', 'predictions')
TO_NCHW, TO_NHWC = (0, 3, 1, 2), (0, 2, 3, 1)
PASS_THROUGH = ('Relu', 'Dropout', 'Identity')


@dataclasses.dataclass
class Layer:
  """A weighted layer on the chain, its weight in torch's layout (OIHW or (out, in))."""

  weight: np.ndarray
  bias: np.ndarray | None = None
  batch_norm: dict[str, np.ndarray] | None = None


@dataclasses.dataclass
class Chain:
  """What the walk found: convs per block, dense layers, and the layout facts."""

  blocks: list[list[Layer]]
  dense: list[Layer]
  pooled: bool = False  # an average pool before the flatten
  nchw_flatten: bool = True
  nhwc_input: bool = False
  softmax: bool = False
  cut: str = ''  # why and where the head was left out (the conv base ported alone)
  last_pool: str = ''  # the MaxPool node closing block 5


def _attributes(node) -> dict:
  from onnx import helper

  return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _constants(graph) -> dict[str, np.ndarray]:
  from onnx import numpy_helper

  found = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
  for node in graph.node:
    if node.op_type == 'Constant':
      value = _attributes(node)
      tensor = value.get('value')
      found[node.output[0]] = (
        numpy_helper.to_array(tensor)
        if tensor is not None
        else np.asarray(next(iter(value.values())))
      )
    elif node.op_type == 'Identity' and node.input[0] in found:
      found[node.output[0]] = found[node.input[0]]
  return found


def _check(node, expected: dict, what: str, defaults: dict) -> None:
  """Raises PortError unless each attribute of `node` (or ONNX's default for it, where the node
  leaves it out) is one of the `expected` values.

  The defaults are ONNX's, never the values a VGG needs: a Conv without `pads` pads nothing
  and a MaxPool without `strides` strides by 1, and such a graph is not a VGG.
  """
  attrs = _attributes(node)
  for key, want in expected.items():
    got = attrs.get(key, defaults.get(key))
    if isinstance(got, bytes):
      got = got.decode()
    if got not in want:
      raise PortError(
        f'not a VGG graph: {node.op_type} node {node.name!r} has {key}={got!r}'
        + ('' if key in attrs else " (ONNX's default: the node leaves it out)")
        + f'; a VGG {what} has {key} in {list(want)}'
      )


# ONNX's defaults for the attributes checked (onnx.ai operator docs: Conv, MaxPool, Flatten).
# A Conv's kernel_shape defaults to its weight's spatial shape, filled in where it is checked.
CONV_DEFAULTS = {'strides': [1, 1], 'group': 1, 'dilations': [1, 1], 'pads': [0, 0, 0, 0]}
POOL_DEFAULTS = {'strides': [1, 1], 'pads': [0, 0, 0, 0]}
FLATTEN_DEFAULTS = {'axis': 1}


class _Walk:
  """The state of a walk down the chain; one method per op a VGG graph may hold."""

  def __init__(self, constants: dict[str, np.ndarray]):
    self.constants = constants
    self.chain = Chain(blocks=[[]], dense=[])
    self.layout = 'NCHW'  # of the tensor being followed
    self.flattened = False
    self.seen_weights = False

  def const(self, node, index: int, role: str) -> np.ndarray | None:
    name = node.input[index] if len(node.input) > index else ''
    if not name:
      return None
    if name not in self.constants:
      raise PortError(f'not a VGG graph: the {role} of {node.op_type} {node.name!r} is computed')
    return np.asarray(self.constants[name], np.float32)

  def step(self, node, x: str) -> None:
    """Takes in `node`, which consumes the followed tensor `x`; raises off the VGG path."""
    op = node.op_type
    if op in PASS_THROUGH:
      return
    handler = {
      'Conv': self.conv,
      'BatchNormalization': self.batch_norm,
      'MaxPool': self.max_pool,
      'AveragePool': self.average_pool,
      'GlobalAveragePool': self.average_pool,
      'Flatten': self.flatten,
      'Reshape': self.flatten,
      'Gemm': self.dense,
      'MatMul': self.dense,
      'Add': self.add_bias,
      'Transpose': self.transpose,
      'Softmax': self.softmax,
    }.get(op)
    if handler is None or not handler(node, x):
      raise PortError(
        f'not a VGG graph: unexpected {op} node {node.name!r} after {_progress(self.chain)}'
      )
    self.seen_weights = self.seen_weights or op in ('Conv', 'Gemm', 'MatMul')

  # Each handler returns False where its op cannot stand in a VGG.

  def conv(self, node, x):
    same = _attributes(node).get('auto_pad', b'NOTSET') in (b'SAME_UPPER', b'SAME_LOWER')
    conv = {'kernel_shape': ([3, 3],), 'strides': ([1, 1],), 'group': (1,), 'dilations': ([1, 1],)}
    weight, bias = self.const(node, 1, 'weight'), self.const(node, 2, 'bias')
    defaults = {
      **CONV_DEFAULTS,
      'kernel_shape': list(np.shape(weight)[2:]) if weight is not None else None,
    }
    _check(node, conv if same else {**conv, 'pads': ([1, 1, 1, 1],)}, 'conv', defaults)
    self.chain.blocks[-1].append(Layer(weight, bias))
    return not self.flattened

  def batch_norm(self, node, x):
    block = self.chain.blocks[-1]
    if not block or block[-1].batch_norm is not None:
      return False
    scale, bias, mean, var = (self.const(node, i, 'statistics') for i in range(1, 5))
    epsilon = float(_attributes(node).get('epsilon', 1e-5))
    # (x - m) / sqrt(v + eps) == (x - m) / sqrt((v + eps - 1e-5) + 1e-5): the same function.
    var = var + np.float32(epsilon - BN_EPSILON)
    block[-1].batch_norm = {'scale': scale, 'bias': bias, 'mean': mean, 'var': var}
    return True

  def max_pool(self, node, x):
    pool = {'kernel_shape': ([2, 2],), 'strides': ([2, 2],), 'pads': ([0, 0, 0, 0],)}
    _check(node, pool, 'pool', POOL_DEFAULTS)
    self.chain.blocks.append([])
    self.chain.last_pool = node.name
    return not self.flattened

  def conv_base_done(self) -> bool:
    """Five blocks closed by their MaxPools, and no conv since: a whole VGG conv base."""
    return len(self.chain.blocks) == 6 and not self.chain.blocks[-1] and not self.chain.dense

  def average_pool(self, node, x):
    self.chain.pooled = True
    return not self.flattened

  def flatten(self, node, x):
    if node.op_type == 'Flatten':
      _check(node, {'axis': (1,)}, 'flatten', FLATTEN_DEFAULTS)
    if self.flattened:
      return False
    self.flattened, self.chain.nchw_flatten = True, self.layout == 'NCHW'
    return True

  def dense(self, node, x):
    attrs = _attributes(node)
    if attrs.get('transA', 0) or attrs.get('alpha', 1.0) != 1.0:
      raise PortError(f'not a VGG graph: Gemm {node.name!r} has transA or alpha != 1')
    weight = self.const(node, 1, 'weight')
    if node.op_type == 'MatMul' or not attrs.get('transB', 0):
      weight = weight.T  # (in, out) -> torch's (out, in)
    bias = self.const(node, 2, 'bias') if node.op_type == 'Gemm' else None
    if bias is not None:
      # Gemm computes alpha * A B + beta * C; alpha is checked to be 1, beta is folded here.
      bias = bias * np.float32(attrs.get('beta', 1.0))
    self.chain.dense.append(Layer(weight, bias))
    return self.flattened

  def add_bias(self, node, x):
    # MatMul then Add: the Add's other operand is the bias.
    dense = self.chain.dense
    if not dense or dense[-1].bias is not None or len(node.input) != 2:
      return False
    dense[-1].bias = self.const(node, 1 - list(node.input).index(x), 'bias')
    return True

  def transpose(self, node, x):
    perm = tuple(_attributes(node).get('perm', ()))
    # A transpose to NCHW before any weight means the graph takes NHWC images: a TensorFlow
    # export, which is what the preprocessing guess reads.
    if perm == TO_NCHW and not self.seen_weights:
      self.chain.nhwc_input = True
    # The layout at the flatten decides whether fc1's rows need reordering (`nchw_flatten`).
    self.layout = {TO_NCHW: 'NCHW', TO_NHWC: 'NHWC'}.get(perm, self.layout)
    return True

  def softmax(self, node, x):
    self.chain.softmax = True
    return len(self.chain.dense) > 0


def walk(graph) -> Chain:
  """Follows the graph from its one input to its output; raises PortError off the VGG path.

  Past a complete conv base, a head that is not VGG's does not raise: the walk stops after
  block 5 and `Chain.cut` describes the part of the graph left out.
  """
  constants = _constants(graph)
  consumers: dict[str, list] = {}
  for node in graph.node:
    if all(out in constants for out in node.output):
      continue  # Constant / Identity nodes that only hold weights
    for name in node.input:
      if name and name not in constants:
        consumers.setdefault(name, []).append(node)
  inputs = [i.name for i in graph.input if i.name not in constants]
  if len(inputs) != 1:
    raise PortError(f'not a VGG graph: {len(inputs)} graph inputs ({inputs}); a VGG has one')
  state, x = _Walk(constants), inputs[0]
  visited: list = []
  base_end = None  # (nodes visited, chain so far) when the conv base was complete
  while True:
    # A Shape node only feeds a Reshape's target shape: not a branch of the network.
    users = [n for n in consumers.get(x, []) if n.op_type != 'Shape']
    if not users:
      break
    try:
      if len(users) > 1:
        ops = ', '.join(f'{n.op_type} {n.name!r}' for n in users)
        raise PortError(
          f'not a VGG graph: tensor {x!r} feeds {len(users)} nodes ({ops}); a VGG is one chain'
        )
      # A snapshot of the complete conv base: should the head turn out not to be VGG's, the walk
      # falls back to it instead of failing the whole port.
      if state.conv_base_done() and base_end is None:
        base_end = (len(visited), _copy(state.chain))
      state.step(users[0], x)
    except PortError as e:
      if base_end is None:
        raise
      return _headless(base_end[1], graph, constants, visited[: base_end[0]], str(e))
    visited.append(users[0])
    x = users[0].output[0]
  chain = state.chain
  if base_end is not None and (reason := _not_vgg_head(chain)):
    return _headless(base_end[1], graph, constants, visited[: base_end[0]], reason)
  return _closed(chain)


def _not_vgg_head(chain: Chain) -> str:
  """Why the dense layers after a complete conv base are not VGG's head, or ''."""
  if not chain.dense:
    return ''
  if len(chain.dense) != len(DENSE_LAYERS):
    return f'{len(chain.dense)} dense layers, where a VGG head has {len(DENSE_LAYERS)}'
  width = chain.blocks[0][0].weight.shape[0] / vgg.BLOCK_CHANNELS[0]
  units = vgg.scaled(vgg.IMAGENET_FC_UNITS, width)
  found = [layer.weight.shape[0] for layer in chain.dense[:2]]
  if found != [units, units]:
    return f'fc1 and fc2 have {found} units, where a width-{width:g} VGG has {units}'
  return ''


def _copy(chain: Chain) -> Chain:
  return dataclasses.replace(chain, blocks=[list(b) for b in chain.blocks], dense=[])


def _headless(chain: Chain, graph, constants, kept: list, reason: str) -> Chain:
  """The conv base alone, with what of the graph was not ported."""
  kept_outputs = {n.output[0] for n in kept}  # names may be empty; outputs are unique
  rest = [n for n in graph.node if n.output[0] not in kept_outputs and n.op_type != 'Constant']
  kept_weights = {i for n in kept for i in n.input if i in constants}
  weights = {i for n in rest for i in n.input if i in constants and i not in kept_weights}
  ops = collections.Counter(n.op_type for n in rest if n.op_type != 'Identity')
  size = sum(int(np.size(constants[w])) for w in weights if np.ndim(constants[w]) >= 1)
  chain.cut = (
    f'the graph after block 5 ({chain.last_pool!r}): {len(rest)} nodes '
    f'({", ".join(f"{c} {op}" for op, c in ops.most_common())}) holding '
    f'{size:,} weights in {len(weights)} tensors; not a VGG head '
    f'({reason.removeprefix("not a VGG graph: ")})'
  )
  # The softmax belonged to the head that was left out.
  chain.softmax = False
  return _closed(chain)


def _progress(chain: Chain) -> str:
  convs = sum(len(b) for b in chain.blocks)
  return f'{convs} convs in {len(chain.blocks)} blocks and {len(chain.dense)} dense layers'


def _closed(chain: Chain) -> Chain:
  if chain.blocks[-1]:
    raise PortError(f'not a VGG graph: convs after the last MaxPool ({_progress(chain)})')
  chain.blocks.pop()
  if not chain.blocks or not all(chain.blocks):
    raise PortError(f'not a VGG graph: {_progress(chain)}; a VGG has convs in every block')
  if len(chain.dense) not in (0, len(DENSE_LAYERS)):
    raise PortError(f'not a VGG graph: {len(chain.dense)} dense layers; a VGG head has 3 or none')
  with_bn = {layer.batch_norm is not None for block in chain.blocks for layer in block}
  if len(with_bn) > 1:
    raise PortError('not a VGG graph: BatchNormalization after some convs but not all')
  return chain
