"""Keras VGG16/VGG19 weights: legacy `.h5`, Keras 3 `.weights.h5` and `.keras` archives.

Three containers hold Keras weights:

  legacy HDF5   `vgg16_weights_tf_dim_ordering_tf_kernels[_notop].h5` (keras-applications),
                `model.save('x.h5')` (under `model_weights/`) and
                `legacy_h5_format.save_weights_to_hdf5_group`:
                  attrs['layer_names']             every layer, in model order
                  <layer>/attrs['weight_names']    its weights, in Keras' legacy order
                  <layer>/<weight name>            the arrays
  Keras 3       `model.save_weights('x.weights.h5')`:
                  layers/<key>/vars/attrs['name']  the layer's name (`block1_conv1`)
                  layers/<key>/vars/0, 1, ...      its weights, in order (kernel, bias)
                  layers/<key>/layers/...          a nested model's layers
  `.keras`      `model.save('x.keras')`: a zip archive whose `model.weights.h5` is the above

Weight names differ between Keras versions (`block1_conv1_W_1:0`, `block1_conv1/kernel:0`,
`block1_conv1/kernel`), so a layer's kernel and bias are taken by position, as Keras itself
loads them. A nested model (the Keras transfer recipe: `Sequential([vgg16, Flatten(),
Dense(...)])`) names its layers under its own name (`vgg16/block1_conv1/kernel`); `locate`
finds the VGG's layers under any such prefix and leaves the rest (a custom head) out.

Layer names are Keras' (`block1_conv1` ... `fc1`, `fc2`, `predictions`), the same as ftlab's,
and conv kernels (HWIO) and dense kernels (in, out) are Flax's layouts: the port is a table.
Keras flattens the 7x7 block-5 map without pooling, so the ported model (`adaptive_pool=0`)
takes 224x224 images with the top, any size >= 32 without; Keras' preprocessing is `caffe`.
"""

from __future__ import annotations

import collections
import contextlib
import io
import os
import re
import zipfile

import numpy as np

from ftlab import paths
from ftlab.models import vgg
from ftlab.porting import common
from ftlab.porting.common import PortError

HDF5_SIGNATURE = b'\x89HDF\r\n\x1a\n'
KERAS_ARCHIVE_WEIGHTS = 'model.weights.h5'  # inside a `.keras` zip
CONV = re.compile(r'block(\d)_conv(\d)')
DENSE_LAYERS = ('fc1', 'fc2', 'predictions')
LAYER_WEIGHT = re.compile(
  r'(?:(?P<prefix>.+)/)?(?P<layer>block\d_conv\d|fc1|fc2|predictions)/(?P<weight>kernel|bias)'
)
# Keras 1 weight names: `block1_conv1_W_1:0`, `block1_conv1_b_1:0`.
KERAS1_WEIGHT = re.compile(r'(?P<layer>.+)_(?P<kind>[Wb])(_\d+)?')


def is_hdf5(path: str | os.PathLike) -> bool:
  with open(path, 'rb') as f:
    return f.read(len(HDF5_SIGNATURE)) == HDF5_SIGNATURE


def is_keras_archive(path: str | os.PathLike) -> bool:
  """A Keras 3 `.keras` file: a zip archive holding `model.weights.h5`."""
  if not zipfile.is_zipfile(path):
    return False
  with contextlib.suppress(zipfile.BadZipFile), zipfile.ZipFile(path) as z:
    return KERAS_ARCHIVE_WEIGHTS in z.namelist()
  return False


def _attribute(group, name: str) -> list[str]:
  # Long lists are split into `name0`, `name1`, ... (HDF5's attribute size limit).
  if name in group.attrs:
    values = list(group.attrs[name])
  else:
    values, chunk = [], 0
    while f'{name}{chunk}' in group.attrs:
      values += list(group.attrs[f'{name}{chunk}'])
      chunk += 1
  return [v.decode('utf8') if isinstance(v, bytes) else str(v) for v in values]


def read_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """`{'block1_conv1/kernel': array, ...}` of any Keras weights file (see the docstring).

  A layer with a kernel and a bias gives `<layer>/kernel` and `<layer>/bias`, under the
  names of the models it is nested in (`vgg16/block1_conv1/kernel`); any other layer's
  weights keep their stored names (legacy) or positions (`var0`, Keras 3).

  Raises:
    PortError: not readable as a Keras weights file.
  """
  # Imported here: h5py is needed for Keras files only, and the other formats must not
  # require it.
  import h5py

  archive = is_keras_archive(path)
  try:
    if archive:
      with zipfile.ZipFile(path) as z:
        source = io.BytesIO(z.read(KERAS_ARCHIVE_WEIGHTS))
    else:
      source = os.fspath(path)
    with h5py.File(source, 'r') as f:
      # Keras 3 files start with `layers/` (or `vars/` for a bare layer); legacy files keep
      # their `layer_names` attribute at the top or under `model_weights/`.
      if 'layers' in f or 'vars' in f:
        tensors = _keras3_tensors(f)
      else:
        tensors = _legacy_tensors(f['model_weights'] if 'model_weights' in f else f)
  except (OSError, KeyError, ValueError, RuntimeError, zipfile.BadZipFile) as e:
    # h5py's errors for a truncated or damaged file surface here, not deep in a caller.
    what = 'a .keras archive' if archive else 'a Keras HDF5 file'
    raise PortError(f'cannot read {path} as {what} (truncated or damaged?): {e}') from None
  if not tensors:
    raise PortError(
      f'{path} is HDF5 but holds no Keras layer weights (neither a legacy `layer_names` '
      'attribute nor Keras 3 `layers/*/vars`)'
    )
  return tensors


def _legacy_tensors(group) -> dict[str, np.ndarray]:
  tensors = {}
  for layer in _attribute(group, 'layer_names'):
    names = _attribute(group[layer], 'weight_names')
    arrays = [np.asarray(group[layer][name]) for name in names]
    tensors.update(_named(layer, [_weight_name(n) for n in names], arrays))
  return tensors


def _weight_name(name: str) -> str:
  """`block1_conv1/kernel:0` -> `block1_conv1/kernel`; Keras 1's `block1_conv1_W_1:0` too."""
  name = name.split(':')[0]
  *parents, last = name.split('/')
  if m := KERAS1_WEIGHT.fullmatch(last):
    return '/'.join([*parents, m['layer'], 'kernel' if m['kind'] == 'W' else 'bias'])
  return name


def _keras3_tensors(root) -> dict[str, np.ndarray]:
  tensors = {}

  def visit(group, path: list[str]) -> None:
    if 'vars' in group and path:
      # Numerically: the vars are named 0, 1, ..., and as strings '10' sorts before '2'.
      arrays = [np.asarray(group['vars'][k]) for k in sorted(group['vars'], key=int)]
      tensors.update(_named('/'.join(path), [f'var{i}' for i in range(len(arrays))], arrays))
    for key, child in group.get('layers', {}).items():
      # Keras 3 keys its groups by class-derived names (`conv2d_3`); the layer's own name
      # (`block1_conv1`), which the port needs, is an attribute.
      name = child['vars'].attrs.get('name', key) if 'vars' in child else key
      visit(child, [*path, name.decode() if isinstance(name, bytes) else str(name)])

  visit(root, [])
  return tensors


def _named(layer: str, names: list[str], arrays: list[np.ndarray]) -> dict[str, np.ndarray]:
  # Kernel and bias by shape and position, not by name: the names differ across Keras
  # versions (see the module docstring), the order does not.
  if len(arrays) == 2 and arrays[0].ndim >= 2 and arrays[1].ndim == 1:
    return {f'{layer}/kernel': arrays[0], f'{layer}/bias': arrays[1]}
  return {f'{layer}/{name}': array for name, array in zip(names, arrays)}


def infer_depth(tensors: dict[str, np.ndarray]) -> tuple[tuple[int, bool] | None, tuple]:
  """((depth, False) or None, convs per block found), from the conv layer names."""
  counts = [0] * len(vgg.BLOCK_CHANNELS)
  for name in tensors:
    m = CONV.fullmatch(name.split('/')[0])
    if m and 1 <= int(m.group(1)) <= len(counts):
      block = int(m.group(1)) - 1
      counts[block] = max(counts[block], int(m.group(2)))
  depth = common.depth_of(counts)
  return ((depth, False) if depth else None), tuple(counts)


def locate(
  tensors: dict[str, np.ndarray], *, prefix: str | None = None, source: str = 'the file'
) -> common.Located:
  """Finds the Keras VGG (`block{b}_conv{i}` layers) under any model prefix.

  The group of layers under one prefix whose conv counts are a VGG's is ported, with its
  `fc1`/`fc2`/`predictions` head when all three are there; everything else in the file (a
  transfer model's own head, other models) is left out and reported.

  Raises:
    PortError: no prefix holds a VGG's conv layers (the message says what the file holds).
  """
  groups: dict[str, dict[str, str]] = collections.defaultdict(dict)
  for name in tensors:
    if m := LAYER_WEIGHT.fullmatch(name):
      groups[m['prefix'] or ''][f'{m["layer"]}/{m["weight"]}'] = name
  found = []
  for where, members in groups.items():
    # Whole path segments: `prefix='vgg'` must not select a model named `vgg16_2`.
    if prefix is not None and not (where + '/').startswith(prefix.rstrip('/') + '/'):
      continue
    (layout, counts) = infer_depth(members)
    if layout is None:
      continue
    convs = {c: n for c, n in members.items() if CONV.fullmatch(c.split('/')[0])}
    head = {c: n for c, n in members.items() if c.split('/')[0] in DENSE_LAYERS}
    last_conv = tensors.get(members.get(f'{common.conv_layers(layout[0])[-1][1]}/kernel', ''))
    if len(head) != 2 * len(DENSE_LAYERS) and not _pooled_predictions(head, last_conv, tensors):
      head = {}  # not the whole top: the VGG ports without it
    # Most convs first, then a group with a head, then the shallowest prefix; the prefix itself
    # last, so equal candidates are ordered the same way on every run.
    found.append(((-sum(counts), -len(head), where.count('/'), where), where, {**convs, **head}))
  if not found:
    raise PortError(_nothing_found(tensors, groups, source, prefix))
  found.sort()
  _, where, chosen = found[0]
  used = set(chosen.values())
  rest = [n for n in tensors if n not in used]
  return common.Located(
    tensors={c: tensors[n] for c, n in chosen.items()},
    names=dict(chosen),
    found_at=f'{where}/block*_conv*' if where else '',
    left_out=paths.prefix_counts(rest) if rest else '',
    others=tuple(f'a VGG under {w!r} (prefix={w!r} ports it)' for _, w, _ in found[1:]),
  )


def _pooled_predictions(head: dict, last_conv: np.ndarray | None, tensors: dict) -> bool:
  """Whether `head` is one `predictions` layer on globally pooled block-5 features (Keras'
  `include_top=False, pooling='avg'` and a Dense: ftlab's `gap` head)."""
  if set(head) != {'predictions/kernel', 'predictions/bias'} or last_conv is None:
    return False
  # A Dense right after a global average pool reads exactly the last conv's channels; after a
  # flatten it would read 7 x 7 times as many.
  return tensors[head['predictions/kernel']].shape[0] == last_conv.shape[-1]


def _nothing_found(tensors, groups, source: str, prefix: str | None) -> str:
  seen = '; '.join(
    f'{where or "top level"}: {infer_depth(members)[1]} block{{b}}_conv{{i}} per block'
    for where, members in groups.items()
  )
  counts = ', '.join(f'VGG{d} {c}' for d, c in vgg.CONVS_PER_BLOCK.items())
  under = f' under {prefix!r}' if prefix is not None else ''
  return (
    f'cannot tell which VGG this is: {source} holds {len(tensors)} weights '
    f'({paths.prefix_counts(list(tensors))}) but no Keras VGG{under}: '
    + (seen or 'no layer named block{b}_conv{i}')
    + f'; a Keras VGG has layers block1_conv1 ... with convs per block {counts}'
  )


def rules(arch: common.Arch) -> list[common.Rule]:
  """Same names and layouts on both sides: `<layer>/kernel|bias` -> `params/<layer>/...`."""
  layers = [layer for _, layer in common.conv_layers(arch.depth)]
  if arch.head == 'imagenet':
    layers += DENSE_LAYERS
  elif arch.head == 'gap':
    layers += ('predictions',)
  return [common.Rule(f'{n}/{w}', f'params/{n}/{w}') for n in layers for w in ('kernel', 'bias')]


def read(
  path: str | os.PathLike,
  arch: str | None = None,
  *,
  prefix: str | None = None,
  allow_nonfinite: bool = False,
) -> common.Ported:
  """Ports a Keras VGG weights file (any container above), with or without the top.

  Args:
    path: the `.h5`, `.weights.h5` or `.keras` file.
    arch: `vgg16`, `vgg19`, ... to require that layout; None to infer it from the layer
      names. Keras VGGs have no BatchNorm.
    prefix: port the VGG under this model name (`vgg16`) where a file holds several.
    allow_nonfinite: see `common.assemble`.

  Raises:
    PortError: unreadable file, no VGG inside, or tensors that do not match the arch (one
      message lists the missing, unexpected and mis-shaped weights), or inf/NaN values.
  """
  located = locate(read_tensors(path), prefix=prefix, source=os.fspath(path))
  tensors = located.tensors
  found, counts = infer_depth(tensors)
  depth, batch_norm = common.choose_depth(
    found, arch, f'{path} has {counts} block{{b}}_conv{{i}} layers per block'
  )
  if batch_norm:
    raise PortError(f'{path}: Keras VGG files have no BatchNorm; use arch={f"vgg{depth}"!r}')
  first = tensors.get('block1_conv1/kernel')
  predictions = tensors.get('predictions/bias')
  head = 'imagenet' if 'fc1/kernel' in tensors else 'gap' if predictions is not None else 'none'
  ported_arch = common.Arch(
    depth=depth,
    head=head,
    width=common.width_of(first.shape[-1]) if first is not None and first.ndim == 4 else 1.0,
    num_classes=predictions.shape[0] if predictions is not None else 1000,
  )
  hint = ''
  if arch and found and common.parse_arch(arch) != found:
    hint = f'Likely cause: the file holds a vgg{found[0]}, and arch={arch!r} asked for another VGG'
  variables = common.assemble(
    tensors,
    rules(ported_arch),
    ported_arch,
    source=os.fspath(path),
    names=located.names,
    allow_nonfinite=allow_nonfinite,
    hint=hint,
  )
  notes = ('a Keras 3 .keras archive (its model.weights.h5)',) if is_keras_archive(path) else ()
  return common.Ported(
    'keras_h5',
    ported_arch,
    variables,
    common.Preprocessing('caffe', common.KERAS_GUESS),
    notes + located.notes,
    found_at=located.found_at,
    left_out=located.left_out,
  )
