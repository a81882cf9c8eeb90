"""What every weight format shares: the architecture found in a file, the preprocessing the
weights expect, and the strict table that turns source tensors into Flax variables.

A format module reads its file into `{source name: array}`, says which VGG the names and
shapes describe (an `Arch`), and lists one `Rule` per source tensor: where it goes in the
Flax variables and how its layout differs. `assemble` checks the file against the rules
(every tensor expected, found and of the expected shape, nothing left over) and raises one
`PortError` that names every problem, before converting anything.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ftlab.models import vgg

Shape = tuple[int, ...]

# Preprocessing constants. `ftlab.input_pipeline` has the same numbers (it may not be
# imported from here: porting depends on `models` only); both follow the weight sources.
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
TORCH_MEAN_RGB = (0.485, 0.456, 0.406)
TORCH_STD_RGB = (0.229, 0.224, 0.225)
# The image size the source VGGs were trained at; shapes are planned at it.
SOURCE_IMAGE_SIZE = 224


class PortError(ValueError):
  """A weight file that cannot be read, or that does not match the requested VGG."""


@dataclasses.dataclass(frozen=True)
class Preprocessing:
  """How the source model expects its images: `caffe` (Keras) or `torch` (torchvision, timm).

  Calling it maps uint8 RGB images `[B, H, W, 3]` to the float32 input of the ported model.
  The name is the one `config.dataset.preprocess` takes.
  """

  name: str

  def __post_init__(self):
    if self.name not in ('caffe', 'torch'):
      raise ValueError(f'unknown preprocessing {self.name!r}; valid: caffe, torch')

  def __call__(self, images_BHWC: Any) -> np.ndarray:
    x = np.asarray(images_BHWC, np.float32)
    if self.name == 'caffe':
      # RGB -> BGR, then subtract the ImageNet mean on the 0-255 scale; no std.
      return x[..., ::-1] - np.asarray(CAFFE_MEAN_BGR, np.float32)
    return (x / 255.0 - np.asarray(TORCH_MEAN_RGB, np.float32)) / np.asarray(
      TORCH_STD_RGB, np.float32
    )

  def to_json(self) -> dict:
    if self.name == 'caffe':
      return {'name': 'caffe', 'channels': 'BGR', 'pixel_range': [0, 255], 'mean': CAFFE_MEAN_BGR}
    return {
      'name': 'torch',
      'channels': 'RGB',
      'pixel_range': [0, 1],
      'mean': TORCH_MEAN_RGB,
      'std': TORCH_STD_RGB,
    }


@dataclasses.dataclass(frozen=True)
class Arch:
  """The VGG a weight file describes, as `ftlab.models.vgg.VGG` attributes.

  Attributes:
    depth: 11, 13, 16 or 19.
    batch_norm: the `_bn` layout (BatchNorm after every conv).
    head: `imagenet` (fc1, fc2, predictions) or `none` (features only).
    width: channel multiplier, the first conv's channels over 64.
    num_classes: outputs of `predictions` (1000 for a headless file, unused).
    adaptive_pool: 7 for torch models (their `AdaptiveAvgPool2d((7, 7))`), 0 for Keras.
  """

  depth: int
  batch_norm: bool = False
  head: str = 'imagenet'
  width: float = 1.0
  num_classes: int = 1000
  adaptive_pool: int = 0

  @property
  def name(self) -> str:
    return f'vgg{self.depth}' + ('_bn' if self.batch_norm else '')

  def model(self) -> vgg.VGG:
    return vgg.VGG(
      depth=self.depth,
      batch_norm=self.batch_norm,
      num_classes=self.num_classes,
      head=self.head,
      width=self.width,
      adaptive_pool=self.adaptive_pool,
    )

  def to_json(self) -> dict:
    return {'name': self.name, **dataclasses.asdict(self)}


def parse_arch(name: str) -> tuple[int, bool]:
  """`'vgg16_bn'` -> (16, True); raises PortError for a name `ftlab.models.vgg` lacks."""
  try:
    model = vgg.by_name(name)
  except ValueError as e:
    raise PortError(str(e)) from None
  return model.depth, model.batch_norm


def depth_of(convs_per_block: Iterable[int]) -> int | None:
  """The VGG depth with these convolutions per block, or None."""
  convs_per_block = tuple(convs_per_block)
  return next((d for d, c in vgg.CONVS_PER_BLOCK.items() if c == convs_per_block), None)


def width_of(first_conv_channels: int) -> float:
  """The width multiplier of a VGG whose first conv has this many output channels."""
  return first_conv_channels / vgg.BLOCK_CHANNELS[0]


def choose_depth(found: tuple[int, bool] | None, arch: str | None, what: str) -> tuple[int, bool]:
  """(depth, batch_norm): the `arch` asked for, else the one found in the file.

  Raises:
    PortError: neither is known; `what` says what the file holds instead.
  """
  if arch:
    return parse_arch(arch)
  if found is None:
    raise PortError(f'cannot tell which VGG this is: {what}; pass arch= (e.g. vgg16_bn)')
  return found


def conv_layers(depth: int) -> list[tuple[int, str]]:
  """(block, layer name) of every conv, input to output: `(1, 'block1_conv1')`, ..."""
  return [
    (b, f'block{b}_conv{i}')
    for b, n in enumerate(vgg.CONVS_PER_BLOCK[depth], start=1)
    for i in range(1, n + 1)
  ]


def expected_shapes(arch: Arch) -> dict[str, Shape]:
  """'params/block1_conv1/kernel' -> shape, for every variable of the arch's model."""
  x = jnp.zeros((1, SOURCE_IMAGE_SIZE, SOURCE_IMAGE_SIZE, 3), jnp.float32)
  # Shapes only: nothing is computed, so a full VGG19 costs nothing here.
  tree = jax.eval_shape(lambda: arch.model().init(jax.random.key(0), x, train=False))
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    flat['/'.join(k.key for k in path)] = tuple(leaf.shape)
  return flat


# --- Layouts: how a source tensor differs from its Flax variable. ------------------------------


@dataclasses.dataclass(frozen=True)
class Layout:
  """A source layout: the source shape for a Flax shape, and the conversion to Flax."""

  name: str
  source_shape: Callable[[Shape], Shape]
  to_flax: Callable[[np.ndarray, Shape], np.ndarray]


SAME = Layout('same', lambda s: s, lambda w, s: w)
# torch Conv2d (out, in, kh, kw) -> Flax HWIO.
OIHW = Layout('oihw', lambda s: (s[3], s[2], s[0], s[1]), lambda w, s: w.transpose(2, 3, 1, 0))
# torch Linear (out, in) -> Flax Dense (in, out).
LINEAR = Layout('linear', lambda s: (s[1], s[0]), lambda w, s: w.T)


def linear_after_nchw_flatten(channels: int) -> Layout:
  """A torch Linear fed by an NCHW flatten of a `channels`-deep square map.

  Flax flattens NHWC, so the input features are reordered from (c, h, w) to (h, w, c); a
  plain transpose would load without error and give wrong logits.
  """

  def to_flax(w, s):
    side = math.isqrt(s[0] // channels)
    return w.reshape(s[1], channels, side, side).transpose(0, 2, 3, 1).reshape(s[1], -1).T

  return Layout(f'linear_nchw{channels}', lambda s: (s[1], s[0]), to_flax)


def conv_as_dense(kernel: int) -> Layout:
  """A torch Conv2d with a `kernel`-square kernel on a map of that size, as a Dense (timm)."""

  def source_shape(s):
    return (s[1], s[0] // kernel**2, kernel, kernel)

  return Layout(
    f'conv{kernel}x{kernel}', source_shape, lambda w, s: w.transpose(2, 3, 1, 0).reshape(s)
  )


@dataclasses.dataclass(frozen=True)
class Rule:
  """Source tensor `source` becomes Flax variable `target` ('params/fc1/kernel')."""

  source: str
  target: str
  layout: Layout = SAME


def assemble(
  tensors: Mapping[str, np.ndarray],
  rules: Iterable[Rule],
  arch: Arch,
  *,
  ignored: Callable[[str], bool] = lambda name: False,
  source: str = 'the file',
) -> dict:
  """Flax variables from source tensors, strictly: all problems in one error.

  Args:
    tensors: source name -> array, as read from the file.
    rules: one rule per tensor the arch needs; together they cover every variable of
      `arch.model()`.
    arch: the VGG being built.
    ignored: source names to skip without complaint (e.g. `num_batches_tracked`).
    source: how to name the file in the error.

  Returns:
    `{'params': ..., 'batch_stats': ...}` (no `batch_stats` without BatchNorm) of float32
    numpy arrays.

  Raises:
    PortError: tensors missing, left over, or of another shape; the message lists each
      with its expected and found shapes.
  """
  rules = list(rules)
  shapes = expected_shapes(arch)
  covered = sorted(r.target for r in rules)
  # A programming error, not a file error: the rules of a format module must fit the model.
  assert covered == sorted(shapes), f'rules do not cover the model: {covered} vs {sorted(shapes)}'
  wanted = {r.source: r.layout.source_shape(shapes[r.target]) for r in rules}
  missing = [f'{n} (expected {s})' for n, s in wanted.items() if n not in tensors]
  unexpected = [
    f'{n} {tuple(a.shape)}' for n, a in tensors.items() if n not in wanted and not ignored(n)
  ]
  mismatch = [
    f'{n} expected {s} found {tuple(tensors[n].shape)}'
    for n, s in wanted.items()
    if n in tensors and tuple(tensors[n].shape) != s
  ]
  problems = [
    f'{what} ({len(items)}): {", ".join(items)}'
    for what, items in [('missing', missing), ('unexpected', unexpected), ('mismatch', mismatch)]
    if items
  ]
  if problems:
    raise PortError(
      f'{source} does not match {arch.name} (head {arch.head}, width {arch.width:g}, '
      f'{arch.num_classes} classes): {"; ".join(problems)}'
    )
  variables: dict = {}
  for r in rules:
    value = r.layout.to_flax(np.asarray(tensors[r.source], np.float32), shapes[r.target])
    # Contiguous copies: transposed views would keep the whole source array alive.
    _set(variables, r.target, np.ascontiguousarray(value))
  return variables


def _set(tree: dict, path: str, value: np.ndarray) -> None:
  *parents, leaf = path.split('/')
  for key in parents:
    tree = tree.setdefault(key, {})
  tree[leaf] = value


def param_count(variables: Mapping[str, Any]) -> int:
  """Number of trainable parameters (`params` only, not BatchNorm statistics)."""
  return int(sum(np.size(x) for x in jax.tree.leaves(variables['params'])))


@dataclasses.dataclass(frozen=True)
class Ported:
  """A ported weight file.

  Attributes:
    format: `keras_h5`, `torchvision`, `timm` or `onnx`.
    arch: the VGG the weights are for; `arch.model()` builds it.
    variables: `{'params': ..., 'batch_stats': ...}` for `arch.model().apply`.
    preprocessing: maps uint8 RGB NHWC images to the model's input.
    notes: what the port did that a user may want to know (ignored tensors, folded
      BatchNorm, ...).
  """

  format: str
  arch: Arch
  variables: dict
  preprocessing: Preprocessing
  notes: tuple[str, ...] = ()
