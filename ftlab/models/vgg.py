"""VGG 11/13/16/19 (with and without BatchNorm) in Flax linen, named like Keras.

Layer names are the Keras application names (`block1_conv1` ... `block5_conv3`,
`fc1`, `fc2`, `predictions`), so porting a weight file is a table of names.
BatchNorm variants (the torchvision `vgg*_bn` layout) add `block{b}_conv{i}_bn`
after each convolution. Nothing here knows about training, policies or devices:
the caller says which BatchNorm layers run on running statistics and over which
device axis batch statistics are averaged.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax.numpy as jnp

from ftlab import paths
from ftlab.errors import ConfigError
from ftlab.models import lowering

# Convolutions per block for each depth; channels per block for width 1.
CONVS_PER_BLOCK = {
  11: (1, 1, 2, 2, 2),
  13: (2, 2, 2, 2, 2),
  16: (2, 2, 3, 3, 3),
  19: (2, 2, 4, 4, 4),
}
BLOCK_CHANNELS = (64, 128, 256, 512, 512)
IMAGENET_FC_UNITS = 4096
MLP_HEAD_UNITS = 256
HEADS = ('imagenet', 'gap', 'mlp', 'none')
# Five 2x2 max-pools: the smallest input that keeps a 1x1 map after block 5.
MIN_INPUT_SIZE = 2 ** len(BLOCK_CHANNELS)

# torchvision's initialisation: He (fan-out) for convolutions, N(0, 0.01) for dense layers.
conv_kernel_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
dense_kernel_init = nn.initializers.normal(0.01)


def scaled(units: int, width: float) -> int:
  """Channel or unit count after the width multiplier (at least 1)."""
  # At least 1, so a tiny test width never makes a zero-sized layer.
  return max(1, int(round(units * width)))


@dataclasses.dataclass(frozen=True)
class Block:
  """A group of layers that policies treat as one unit.

  Attributes:
    name: `block1` ... `block5`, `fc` (the pretrained fc1/fc2 of the imagenet head) or `head`.
    layers: top-level module names in this block; a parameter belongs to the block whose
      layer is the first element of its path (e.g. `block1_conv1/kernel` -> `block1`).
  """

  name: str
  layers: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class BlockStructure:
  """Blocks from input to output; `head` holds the layers a transfer task replaces."""

  blocks: tuple[Block, ...]
  head: Block

  @property
  def all_blocks(self) -> tuple[Block, ...]:
    return self.blocks + ((self.head,) if self.head.layers else ())

  def block_of_layer(self) -> dict[str, str]:
    return {layer: b.name for b in self.all_blocks for layer in b.layers}


class VGG(nn.Module):
  """VGG-style network for NHWC images.

  Attributes:
    depth: 11, 13, 16 or 19.
    batch_norm: add BatchNorm after every convolution (torchvision `_bn` layout).
    num_classes: outputs of `predictions`.
    head: `imagenet` (flatten, fc1, fc2, predictions, dropout as in the original), `gap`
      (global average pool, predictions), `mlp` (flatten, fc 256, dropout, predictions) or
      `none` (return the block-5 pooled feature map, as Keras `include_top=False`).
    width: multiplier for conv channels and dense units (tests use narrow models).
    dropout_rate: dropout after each hidden dense layer of the head.
    adaptive_pool: if > 0, average-pool the block-5 map to this size (as torch's
      `AdaptiveAvgPool2d`) before the `imagenet` and `mlp` heads flatten it; torchvision's VGGs
      use 7, which makes fc1's input 7x7x512 whatever the image size.
    dtype: activation and computation dtype (parameters stay float32); logits are float32.
    axis_name: device axis over which BatchNorm batch statistics are averaged, so the
      result does not depend on how the batch is split over devices.
    frozen_batch_norm: names of BatchNorm layers that use running statistics even when
      `train=True` (layers a plan freezes keep their statistics untouched).
    start_block, stop_block: run only the blocks in [start_block, stop_block) of
      `block_names()` (None: from the first / to the end). With `start_block`, the input is
      what that block's first layer sees, i.e. the output of
      `clone(stop_block=start_block)`: a cache of a frozen prefix feeds the rest. The
      parameter-free steps between block 5 and the head's first dense layer (global mean,
      adaptive pool, flatten) belong to block 5, so that boundary is the smallest tensor.
      The parameter tree is the same whatever the range; blocks outside it are not called.
    conv_lowering: `conv` (XLA's convolution and reduce-window max-pool) or `matmul` (each
      3x3 convolution as one matrix product over image patches and max-pools as a reshape
      and max, `ftlab.models.lowering`): the same parameters and numbers to float rounding;
      `matmul` is several times faster on CPU (docs/performance.md). The model asks no
      device: whoever builds it chooses (`ftlab.run.build_model` resolves `auto`).
  """

  depth: int = 16
  batch_norm: bool = False
  num_classes: int = 1000
  head: str = 'imagenet'
  width: float = 1.0
  dropout_rate: float = 0.5
  adaptive_pool: int = 0
  dtype: Any = jnp.float32
  axis_name: str | None = None
  frozen_batch_norm: Sequence[str] = ()
  start_block: str | None = None
  stop_block: str | None = None
  conv_lowering: str = 'conv'

  def block_names(self) -> tuple[str, ...]:
    """The blocks from input to output, the valid `start_block` / `stop_block` values:
    `block1`..`block5`, `fc` (imagenet head only) and `head` (always, even with no head)."""
    # `head` is always a valid boundary, even for a model without one, so `stop_block='head'`
    # means "every block" for every head type.
    return tuple(b.name for b in self.block_structure().blocks) + ('head',)

  def stochastic_blocks(self) -> tuple[str, ...]:
    """Blocks that draw random numbers when `train=True` (dropout), so their output is not
    a function of the input alone."""
    if self.dropout_rate <= 0:
      return ()
    # Dropout sits only after the hidden dense layers of these heads; `gap` and `none` have none.
    return {'imagenet': ('fc',), 'mlp': ('head',)}.get(self.head, ())

  def _block_range(self) -> tuple[int, int]:
    names = self.block_names()
    for what, name in (('start_block', self.start_block), ('stop_block', self.stop_block)):
      if name is not None and name not in names:
        raise ConfigError(f'{what} {name!r} is not a block of this VGG; valid: {list(names)}')
    start = names.index(self.start_block) if self.start_block else 0
    stop = names.index(self.stop_block) if self.stop_block else len(names)
    if start > stop:
      raise ConfigError(
        f'start_block {self.start_block!r} comes after stop_block {self.stop_block!r}'
      )
    return start, stop

  def block_structure(self) -> BlockStructure:
    """Which top-level layers form which block, input to output."""
    check_architecture(self.depth, self.head)
    blocks = tuple(
      Block(f'block{b}', tuple(self._block_layers(b, n)))
      for b, n in enumerate(CONVS_PER_BLOCK[self.depth], start=1)
    )
    if self.head == 'imagenet':
      blocks += (Block('fc', ('fc1', 'fc2')),)
      head = Block('head', ('predictions',))
    elif self.head == 'mlp':
      head = Block('head', ('fc', 'predictions'))
    elif self.head == 'gap':
      head = Block('head', ('predictions',))
    else:
      head = Block('head', ())
    return BlockStructure(blocks, head)

  def _block_layers(self, block: int, num_convs: int) -> list[str]:
    names = []
    for i in range(1, num_convs + 1):
      names.append(f'block{block}_conv{i}')
      if self.batch_norm:
        names.append(f'block{block}_conv{i}_bn')
    return names

  @nn.compact
  def __call__(self, x_BHWC: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    check_architecture(self.depth, self.head)
    start, stop = self._block_range()
    names = self.block_names()
    runs = lambda block: start <= names.index(block) < stop
    # With a later start block the input is an activation (2-D after block 5's flatten).
    height, width = x_BHWC.shape[1:3] if runs('block1') else (MIN_INPUT_SIZE,) * 2
    if min(height, width) < MIN_INPUT_SIZE:
      raise ConfigError(
        f'input size {height}x{width} is too small for VGG: its five 2x2 pools need at '
        f'least {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE}'
      )
    if self.conv_lowering not in lowering.LOWERINGS:
      raise ConfigError(
        f'conv_lowering {self.conv_lowering!r} is not one of {list(lowering.LOWERINGS)}'
      )
    as_matmul = self.conv_lowering == 'matmul'
    # Activations in `dtype`; `nn.Conv` and `nn.Dense` keep float32 parameters and cast them
    # per call, so bfloat16 saves memory and time without losing the weights' precision.
    x = x_BHWC.astype(self.dtype)
    for b, num_convs in enumerate(CONVS_PER_BLOCK[self.depth], start=1):
      if not runs(f'block{b}'):
        continue
      channels = scaled(BLOCK_CHANNELS[b - 1], self.width)
      for i in range(1, num_convs + 1):
        name = f'block{b}_conv{i}'
        x = nn.Conv(
          channels,
          (3, 3),
          padding='SAME',
          dtype=self.dtype,
          kernel_init=conv_kernel_init,
          # None leaves Flax's default (`lax.conv_general_dilated`); the matmul lowering takes the
          # same arguments, so the parameter tree is the same either way.
          conv_general_dilated=lowering.conv_as_matmul if as_matmul else None,
          name=name,
        )(x)
        if self.batch_norm:
          bn_name = f'{name}_bn'
          x = nn.BatchNorm(
            # Per layer, from outside: a frozen layer's statistics must neither normalise with batch
            # statistics nor be updated, while the trained layers' BatchNorm trains as usual.
            use_running_average=not train or bn_name in self.frozen_batch_norm,
            # Flax's momentum is the weight of the old running value: torch's momentum=0.1.
            momentum=0.9,
            epsilon=1e-5,  # torchvision's BatchNorm2d defaults
            axis_name=self.axis_name,
            dtype=self.dtype,
            name=bn_name,
          )(x)
        x = nn.relu(x)
      x = lowering.max_pool_2x2(x) if as_matmul else nn.max_pool(x, (2, 2), strides=(2, 2))
    # The parameter-free steps after block 5 run with block 5 (see `start_block`), so a cache
    # boundary at the head holds the smallest tensor.
    if runs(f'block{len(CONVS_PER_BLOCK[self.depth])}'):
      x = self._features(x)
    return self._head(x, train, runs)

  def _features(self, x: jnp.ndarray) -> jnp.ndarray:
    """Block 5's map -> what the head's first dense layer sees (parameter-free)."""
    if self.head == 'gap':
      return jnp.mean(x, axis=(1, 2))
    if self.head == 'none':
      return x
    if self.adaptive_pool:
      x = adaptive_avg_pool(x, self.adaptive_pool)
    # The flatten order decides which fc1 rows read which pixel: ported torch weights (NCHW
    # flatten) have their fc1 rows permuted to this order (`ftlab.porting.common`).
    return x.reshape(x.shape[0], -1)  # NHWC flatten, as Keras

  def _head(self, x: jnp.ndarray, train: bool, runs: Callable[[str], bool]) -> jnp.ndarray:
    dense = lambda units, name, init=dense_kernel_init: nn.Dense(
      units, dtype=self.dtype, kernel_init=init, name=name
    )
    dropout = nn.Dropout(self.dropout_rate, deterministic=not train)
    if self.head == 'imagenet' and runs('fc'):
      for name in ('fc1', 'fc2'):
        x = dropout(nn.relu(dense(scaled(IMAGENET_FC_UNITS, self.width), name)(x)))
    if self.head == 'none' or not runs('head'):
      return x
    if self.head == 'mlp':
      x = dropout(nn.relu(dense(scaled(MLP_HEAD_UNITS, self.width), 'fc')(x)))
    # float32 logits whatever `dtype`: the softmax and its loss lose too much in bfloat16.
    return dense(self.num_classes, 'predictions')(x).astype(jnp.float32)


def adaptive_avg_pool(x_BHWC: jnp.ndarray, size: int) -> jnp.ndarray:
  """torch's `AdaptiveAvgPool2d(size)` on NHWC: bin i is [floor(i*H/size), ceil((i+1)*H/size))."""

  def bins(n):
    return [(i * n // size, -(-(i + 1) * n // size)) for i in range(size)]

  # Python loops over static bins: the bins have unequal sizes when H is not a multiple of
  # `size`, which no single reshape or reduce_window expresses. Shapes are static, so this
  # unrolls into a fixed set of slices.
  height, width = x_BHWC.shape[1:3]
  rows = [
    jnp.stack([x_BHWC[:, r0:r1, c0:c1].mean(axis=(1, 2)) for c0, c1 in bins(width)], axis=1)
    for r0, r1 in bins(height)
  ]
  return jnp.stack(rows, axis=1)


def check_architecture(depth: int, head: str) -> None:
  """Raises ValueError for a depth or head this module does not build."""
  if depth not in CONVS_PER_BLOCK:
    raise ConfigError(f'VGG depth {depth!r} is not one of {sorted(CONVS_PER_BLOCK)}')
  if head not in HEADS:
    raise ConfigError(f'VGG head {head!r} is not one of {list(HEADS)}')


def by_name(name: str, **kwargs: Any) -> VGG:
  """`vgg11` ... `vgg19`, with `_bn` for BatchNorm, e.g. `by_name('vgg16_bn', width=0.25)`."""
  base, _, suffix = name.partition('_')
  valid = [f'vgg{d}{s}' for d in CONVS_PER_BLOCK for s in ('', '_bn')]
  if (
    not base.startswith('vgg')
    or not base[3:].isdigit()
    or suffix not in ('', 'bn')
    or (int(base[3:]) not in CONVS_PER_BLOCK)
  ):
    raise ConfigError(f'unknown model {name!r}; valid: {", ".join(valid)}')
  return VGG(depth=int(base[3:]), batch_norm=suffix == 'bn', **kwargs)


def architecture_of(param_shapes: Mapping[str, Sequence[int]]) -> dict[str, Any]:
  """What a flat `params` tree's shapes say about the VGG they were made for.

  Args:
    param_shapes: '/'-joined path (`block1_conv1/kernel`) -> shape.

  Returns:
    `name` (`vgg16_bn`, or None when the conv counts per block are no VGG's), `width` (the
    first conv's channels over 64), `head` (`imagenet`, `mlp`, `gap` or `none`),
    `num_classes` (None without `predictions`) and `fc1_inputs` (the features fc1 reads, None
    without fc1): each None when the shapes do not tell.
  """
  counts = [0] * len(BLOCK_CHANNELS)
  for path in param_shapes:
    layer = paths.layer_of(path)
    if layer.startswith('block') and '_conv' in layer and not layer.endswith('_bn'):
      block, conv = layer[len('block') :].split('_conv')
      if block.isdigit() and conv.isdigit() and 1 <= int(block) <= len(counts):
        counts[int(block) - 1] = max(counts[int(block) - 1], int(conv))
  # The depth is read from the convs per block, not from the layer count: BatchNorm layers and
  # missing heads change the count but not this signature.
  depth = next((d for d, c in CONVS_PER_BLOCK.items() if c == tuple(counts)), None)
  layers = {paths.layer_of(p) for p in param_shapes}
  first = param_shapes.get('block1_conv1/kernel')
  predictions = param_shapes.get('predictions/bias')
  fc1 = param_shapes.get('fc1/kernel')
  if {'fc1', 'fc2'} <= layers:
    head = 'imagenet'
  elif 'fc' in layers:
    head = 'mlp'
  else:
    head = 'gap' if 'predictions' in layers else 'none'
  batch_norm = any(layer.endswith('_bn') for layer in layers)
  return {
    'name': f'vgg{depth}' + ('_bn' if batch_norm else '') if depth else None,
    'width': first[-1] / BLOCK_CHANNELS[0] if first is not None else None,
    'head': head,
    'num_classes': predictions[0] if predictions is not None else None,
    'fc1_inputs': fc1[0] if fc1 is not None else None,
  }
