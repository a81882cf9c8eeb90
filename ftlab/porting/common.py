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
import os
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ftlab import paths
from ftlab.data import preprocessing
from ftlab.errors import ConfigError, InputError
from ftlab.models import vgg

Shape = tuple[int, ...]

# The image size the source VGGs were trained at; shapes are planned at it.
SOURCE_IMAGE_SIZE = 224


class PortError(InputError):
  """A weight file that cannot be read, or that does not match the requested VGG."""


# What a weight file's format says of its input convention: only what its framework's own
# ImageNet weights use. A fine-tuned file may have been trained on anything, so the convention
# is a guess unless the file's provenance records it (`export.read_provenance`) or the user
# or a named weights entry gives it.
TORCHVISION_GUESS = "torchvision's ImageNet weights use it; the file does not record its own"
KERAS_GUESS = "Keras applications' ImageNet weights use it; the file does not record its own"


@dataclasses.dataclass(frozen=True)
class Preprocessing:
  """How the source model expects its images: `caffe`, `torch` or `unit`
  (`ftlab.data.preprocessing`).

  Calling it maps uint8 RGB images `[B, H, W, 3]` to the float32 input of the ported model.
  The name is the one `config.dataset.preprocess` takes.

  Attributes:
    name: the convention.
    guess: why this convention was chosen when the file does not say (ONNX graphs carry no
      preprocessing); '' when the format fixes it or the user gave it.
  """

  name: str
  guess: str = ''

  def __post_init__(self):
    try:
      preprocessing.check(self.name)
    except ConfigError as e:  # a port's convention is the port's error
      raise PortError(str(e)) from None

  def __call__(self, images_BHWC: Any) -> np.ndarray:
    # Cast first: `normalize` takes float32 on the 0-255 scale, and the result is float32
    # whatever integer type the images came in.
    return preprocessing.normalize(np.asarray(images_BHWC, np.float32), self.name)

  def to_json(self) -> dict:
    return {**preprocessing.describe(self.name), **({'guess': self.guess} if self.guess else {})}


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

  @classmethod
  def of(cls, model: vgg.VGG) -> Arch:
    """The architecture of a VGG module (`model()` run backwards)."""
    # Only the fields an architecture has: a model's binding (frozen BatchNorm, device axis,
    # block range) is not part of what a weight file describes.
    return cls(**{f.name: getattr(model, f.name) for f in dataclasses.fields(cls)})

  def model(self) -> vgg.VGG:
    return vgg.VGG(**dataclasses.asdict(self))

  def to_json(self) -> dict:
    return {'name': self.name, **dataclasses.asdict(self)}


def parse_arch(name: str) -> tuple[int, bool]:
  """`'vgg16_bn'` -> (16, True); raises PortError for a name `ftlab.models.vgg` lacks."""
  try:
    model = vgg.by_name(name)
  except ConfigError as e:
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
    # No `arch=` can help here: a forced layout would not match these tensors either.
    counts = ', '.join(f'VGG{d} {c}' for d, c in vgg.CONVS_PER_BLOCK.items())
    raise PortError(
      f'cannot tell which VGG this is: {what}; ftlab ports VGG11/13/16/19 (convs per block: '
      f'{counts}), with or without BatchNorm'
    )
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
  return {p: tuple(leaf.shape) for p, leaf in paths.flatten(tree).items()}


# --- Layouts: how a source tensor differs from its Flax variable. ------------------------------


@dataclasses.dataclass(frozen=True)
class Layout:
  """A source layout: the source shape for a Flax shape, the conversion to Flax, and back
  (`from_flax`, for exports: `from_flax(to_flax(w, s)) == w`)."""

  name: str
  source_shape: Callable[[Shape], Shape]
  to_flax: Callable[[np.ndarray, Shape], np.ndarray]
  from_flax: Callable[[np.ndarray], np.ndarray] = lambda w: w


SAME = Layout('same', lambda s: s, lambda w, s: w)
# torch Conv2d (out, in, kh, kw) -> Flax HWIO.
OIHW = Layout(
  'oihw',
  lambda s: (s[3], s[2], s[0], s[1]),
  lambda w, s: w.transpose(2, 3, 1, 0),
  lambda w: w.transpose(3, 2, 0, 1),
)
# torch Linear (out, in) -> Flax Dense (in, out).
LINEAR = Layout('linear', lambda s: (s[1], s[0]), lambda w, s: w.T, lambda w: w.T)


def linear_after_nchw_flatten(channels: int) -> Layout:
  """A torch Linear fed by an NCHW flatten of a `channels`-deep square map.

  Flax flattens NHWC, so the input features are reordered from (c, h, w) to (h, w, c); a
  plain transpose would load without error and give wrong logits.
  """

  def to_flax(w, s):
    side = math.isqrt(s[0] // channels)
    # Per output unit: (in) -> (c, h, w) as torch flattened it -> (h, w, c) as Flax flattens
    # -> (in), then transposed to Flax's (in, out).
    return w.reshape(s[1], channels, side, side).transpose(0, 2, 3, 1).reshape(s[1], -1).T

  def from_flax(kernel):
    inputs, units = kernel.shape
    side = math.isqrt(inputs // channels)
    return kernel.T.reshape(units, side, side, channels).transpose(0, 3, 1, 2).reshape(units, -1)

  return Layout(f'linear_nchw{channels}', lambda s: (s[1], s[0]), to_flax, from_flax)


def conv_as_dense(kernel: int) -> Layout:
  """A torch Conv2d with a `kernel`-square kernel on a map of that size, as a Dense (timm)."""

  # A k x k conv over a k x k map is a dense layer over its (h, w, c) flatten: reading the
  # conv kernel as (kh, kw, Cin, Cout) row-major is exactly the NHWC flatten's order, so no
  # permutation is needed, unlike a Linear after an NCHW flatten.
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
  names: Mapping[str, str] | None = None,
  allow_nonfinite: bool = False,
  hint: str = '',
) -> dict:
  """Flax variables from source tensors, strictly: all problems in one error.

  Args:
    tensors: source name -> array, as read from the file (or as renamed by a format's
      `locate`).
    rules: one rule per tensor the arch needs; together they cover every variable of
      `arch.model()`.
    arch: the VGG being built.
    ignored: source names to skip without complaint (e.g. `num_batches_tracked`).
    source: how to name the file in the error.
    names: source name -> the name in the file, where `locate` renamed the tensors (a
      prefix dropped); messages use the file's names.
    allow_nonfinite: accept inf and NaN values (refused by default: weights saved after a
      float16 overflow train to NaN at the first step).
    hint: the likely cause of a mismatch, appended to its message.

  Returns:
    `{'params': ..., 'batch_stats': ...}` (no `batch_stats` without BatchNorm) of float32
    numpy arrays.

  Raises:
    PortError: tensors missing, left over, or of another shape (the message counts each
      kind, lists the first names with expected and found shapes, and says the likely
      cause); or non-finite values (naming each tensor and its count of inf and NaN).
  """
  rules = list(rules)
  names = names or {}
  shown = lambda n: names.get(n, n)
  shapes = expected_shapes(arch)
  covered = sorted(r.target for r in rules)
  # A programming error, not a file error: the rules of a format module must fit the model.
  assert covered == sorted(shapes), f'rules do not cover the model: {covered} vs {sorted(shapes)}'
  # Expected source shapes come from the model's own variable shapes through each layout, so
  # a format's table never spells a shape that could disagree with `vgg.VGG`.
  wanted = {r.source: r.layout.source_shape(shapes[r.target]) for r in rules}
  missing = [f'{shown(n)} (expected {s})' for n, s in wanted.items() if n not in tensors]
  unexpected = [
    f'{shown(n)} {tuple(a.shape)}' for n, a in tensors.items() if n not in wanted and not ignored(n)
  ]
  mismatch = [
    f'{shown(n)} expected {s} found {tuple(tensors[n].shape)}'
    for n, s in wanted.items()
    if n in tensors and tuple(tensors[n].shape) != s
  ]
  problems = [
    f'{what} ({len(items)}): {paths.listing(items)}'
    for what, items in [('missing', missing), ('unexpected', unexpected), ('mismatch', mismatch)]
    if items
  ]
  if problems:
    raise PortError(
      f'{source} does not match {arch.name} (head {arch.head}, width {arch.width:g}, '
      f'{arch.num_classes} classes): {"; ".join(problems)}' + (f'. {hint}' if hint else '')
    )
  if not allow_nonfinite:
    check_finite({shown(r.source): tensors[r.source] for r in rules}, source)
  variables: dict = {}
  for r in rules:
    # float32 whatever was stored: float16 and bfloat16 files widen exactly, and ftlab's
    # parameters are float32 (`vgg.VGG.dtype` casts activations only).
    value = r.layout.to_flax(np.asarray(tensors[r.source], np.float32), shapes[r.target])
    # Contiguous copies: transposed views would keep the whole source array alive.
    _set(variables, r.target, np.ascontiguousarray(value))
  return variables


def check_finite(tensors: Mapping[str, Any], source: str) -> None:
  """Raises PortError naming every tensor with inf or NaN values, and how many."""
  bad = paths.nonfinite_counts(tensors)
  if bad:
    listed = paths.listing([f'{n} ({c})' for n, c in bad.items()])
    raise PortError(
      f'{source} holds non-finite values in {len(bad)} tensor(s): {listed}; a model '
      'loaded from them trains to NaN. Re-export the weights in float32 (a float16 save '
      'overflows beyond 65504), or pass allow_nonfinite (--allow_nonfinite) to port them anyway'
    )


def _set(tree: dict, path: str, value: np.ndarray) -> None:
  *parents, leaf = path.split('/')
  for key in parents:
    tree = tree.setdefault(key, {})
  tree[leaf] = value


def param_count(variables: Mapping[str, Any]) -> int:
  """Number of trainable parameters (`params` only, not BatchNorm statistics)."""
  return int(sum(np.size(x) for x in jax.tree.leaves(variables['params'])))


@dataclasses.dataclass(frozen=True)
class Located:
  """A VGG found inside a file that may hold more (a wrapper, a prefix, a larger model).

  Attributes:
    tensors: the VGG's tensors under the format's canonical names (`features.0.weight`,
      `block1_conv1/kernel`), ready for its rules.
    names: canonical name -> the tensor's name in the file.
    found_at: where in the file the VGG is, e.g. `state_dict.module.features.*`.
    left_out: the rest of the file, summarised (`optimizer.state.* (22)`); empty when the
      file is the VGG alone.
    others: other VGG-shaped groups in the file that were not ported, with how to port them.
  """

  tensors: dict
  names: dict
  found_at: str
  left_out: str = ''
  others: tuple[str, ...] = ()

  @property
  def notes(self) -> tuple[str, ...]:
    return tuple(f'also a VGG: {o}' for o in self.others)


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
    found_at: where in the file the ported VGG was (a name prefix, a part of a graph); ''
      when the file is a VGG and nothing else.
    left_out: what the file holds that was not ported, summarised; '' for nothing.
    provenance: what ftlab's export recorded beside the file (`export.read_provenance`: the
      run's input convention, class names, run and step), or None.
  """

  format: str
  arch: Arch
  variables: dict
  preprocessing: Preprocessing
  notes: tuple[str, ...] = ()
  found_at: str = ''
  left_out: str = ''
  provenance: dict | None = None

  def record(self, source: str) -> dict:
    """What `port.json` says about this port of the file `source` (scripts/port_weights.py
    and named weights add their own fields)."""
    return {
      'source': os.path.abspath(source),
      'format': self.format,
      'arch': self.arch.to_json(),
      'found_at': self.found_at,
      'left_out': self.left_out,
      'preprocessing': self.preprocessing.to_json(),
      'param_count': param_count(self.variables),
      'notes': list(self.notes),
      **({'provenance': self.provenance} if self.provenance else {}),
    }

  def report(self) -> str:
    """The port in a few lines: what, from where, what was left out, and the notes."""
    arch = self.arch
    head = 'no head' if arch.head == 'none' else f'{arch.head} head, {arch.num_classes} classes'
    preprocess = self.preprocessing.name
    if self.preprocessing.guess:
      preprocess += f' (a guess: {self.preprocessing.guess}; pass --preprocess if wrong)'
    lines = [
      f'ported {arch.name} ({head}, width {arch.width:g}; {self.format} format), '
      f'{param_count(self.variables):,} parameters',
      f'  from:       {self.found_at or "the whole file"}',
      f'  left out:   {self.left_out or "nothing"}',
      f'  preprocess: {preprocess}',
    ]
    lines += [f'  note:       {n}' for n in self.notes]
    return '\n'.join(lines)
