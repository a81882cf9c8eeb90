"""torchvision VGG state dicts (`vgg11` ... `vgg19`, `_bn`) from `.pth` or `.safetensors`.

torchvision names its layers by their index in two `nn.Sequential`s:

  features.{i}.weight|bias               Conv2d (out, in, 3, 3), then ReLU, MaxPool after a block
  features.{i+1}.weight|bias|running_*   BatchNorm2d (the `_bn` variants), eps 1e-5
  classifier.0|3|6.weight|bias           Linear(25088, 4096), Linear(4096, 4096), Linear(4096, n)

`AdaptiveAvgPool2d((7, 7))` sits between the two, so the port sets `adaptive_pool=7`: fc1
sees 7x7x512 at any image size, as in torch. classifier.0 reads an NCHW flatten, which the
port reorders for Flax's NHWC flatten. `num_batches_tracked` (a BatchNorm step counter that
eval ignores) is not ported. A state dict of `features` alone ports as a headless VGG.

Files hold such a state dict in many wrappings, which `locate` sees through: a trainer's
checkpoint dict (`state_dict`, `optimizer`, `epoch`, ...), `module.` from DataParallel / DDP
and `_orig_mod.` from `torch.compile` anywhere in a name (`features.module.0.weight`), a
prefix (`backbone.features.*`, `model.vgg.*`), a `features` list split into consecutive
slices that keep torchvision's indices (`basenet.slice1.0.weight` ... `basenet.slice4.*`, as
text detectors do), or `features` saved alone (`0.weight`). Every group of tensors indexed
like an `nn.Sequential` is a candidate; the one whose conv indices are a VGG's (the most
convs, then the shortest prefix) is ported, with torchvision's or timm's head when its
siblings hold one, and the rest of the file is reported as left out.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
from typing import Mapping

import numpy as np

from ftlab import paths
from ftlab.models import vgg
from ftlab.porting import common, tensor_files

# torchvision's AdaptiveAvgPool2d before the classifier.
POOL_SIZE = 7
# Indices 1, 2, 4 and 5 are ReLU and Dropout, which hold no parameters.
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
  tensors: Mapping[str, np.ndarray],
  arch: str | None = None,
  source: str = 'state dict',
  *,
  names: Mapping[str, str] | None = None,
  allow_nonfinite: bool = False,
) -> common.Ported:
  """Ports a torchvision VGG state dict (canonical names -> numpy arrays).

  Args:
    tensors: the state dict, under torchvision's names (`locate` finds and renames it).
    arch: `vgg16_bn` etc. to require that layout; None to infer it from the conv indices.
      Width, head and class count always come from the tensors' shapes.
    source: the file, for messages.
    names: canonical name -> name in the file, for messages.
    allow_nonfinite: see `common.assemble`.

  Raises:
    PortError: the layout cannot be inferred, the tensors do not match the arch (the
      message lists the missing, unexpected and mis-shaped tensors), or hold inf/NaN.
  """
  found = infer_depth(tensors)
  depth, batch_norm = common.choose_depth(
    found,
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
  variables = common.assemble(
    tensors,
    rules,
    ported_arch,
    ignored=ignored,
    source=source,
    names=names,
    allow_nonfinite=allow_nonfinite,
    hint=forced_arch_hint(found, arch),
  )
  notes = ('num_batches_tracked not ported (eval ignores it)',) if batch_norm else ()
  return common.Ported(
    'torchvision',
    ported_arch,
    variables,
    common.Preprocessing('torch', common.TORCHVISION_GUESS),
    notes,
  )


def forced_arch_hint(found: tuple[int, bool] | None, arch: str | None) -> str:
  """The likely cause of a mismatch when `arch` asked for another VGG than the file's."""
  if not arch or found is None or common.parse_arch(arch) == found:
    return ''
  name = f'vgg{found[0]}' + ('_bn' if found[1] else '')
  return f'Likely cause: the file holds a {name}, and arch={arch!r} asks for another VGG; drop arch'


def read(path: str | os.PathLike, arch: str | None = None) -> common.Ported:
  """Ports a torchvision VGG `.pth` (read with `weights_only=True`) or `.safetensors` file.

  See `from_tensors` for `arch` and the errors raised.
  """
  located = locate(tensor_files.read(path).tensors, source=os.fspath(path))
  ported = from_tensors(located.tensors, arch, source=os.fspath(path), names=located.names)
  return dataclasses.replace(ported, found_at=located.found_at, left_out=located.left_out)


# --- Finding a torchvision-layout VGG among a file's tensors. ----------------------------------

# Segments that wrappers insert into names: DataParallel / DDP, torch.compile.
WRAPPER_SEGMENTS = ('module', '_orig_mod')
# Where trainers keep the model's state dict; the first of equally good VGGs is taken from
# the earliest of these (the EMA copy only when nothing else holds a VGG).
PREFERRED_ROOTS = ('', 'state_dict', 'model', 'model_state_dict', 'net', 'network', 'ema')
INDEXED = re.compile(
  r'(?:(?P<container>.+)\.)?(?P<index>\d+)\.'
  r'(?P<param>weight|bias|running_mean|running_var|num_batches_tracked)'
)
TIMM_HEAD = ('pre_logits.fc1', 'pre_logits.fc2', 'head.fc')


def unwrap(name: str) -> str:
  """`name` without DataParallel's `module.` and torch.compile's `_orig_mod.` segments."""
  return '.'.join(s for s in name.split('.') if s not in WRAPPER_SEGMENTS)


@dataclasses.dataclass
class _Group:
  """Tensors indexed like one `nn.Sequential`: index -> param -> (unwrapped) name."""

  container: str  # '' for a Sequential saved alone; 'a.{s1,s2}' for merged slices
  entries: dict[int, dict[str, str]]
  parent: str | None  # where a head would be, for a container named `features`


def _groups(names: list[str]) -> list[_Group]:
  by_container: dict[str, dict[int, dict[str, str]]] = collections.defaultdict(dict)
  for name in names:
    if m := INDEXED.fullmatch(name):
      entry = by_container[m['container'] or ''].setdefault(int(m['index']), {})
      entry[m['param']] = name
  groups = []
  for container, entries in by_container.items():
    segments = container.split('.')
    parent = None
    if segments[-1] == 'features' or container == '':
      parent = '.'.join(segments[:-1]) if container else ''
    groups.append(_Group(container, entries, parent))
  # Slices of one Sequential under a common parent keep its indices (`slice1.0`, `slice2.12`):
  # merged in index order while their indices stay disjoint.
  siblings = collections.defaultdict(list)
  for container, entries in by_container.items():
    if '.' in container:
      siblings[container.rsplit('.', 1)[0]].append((min(entries), container, entries))
  for parent, children in siblings.items():
    merged, used = {}, []
    for _, container, entries in sorted(children):
      if not set(entries) & set(merged):
        merged.update(entries)
        used.append(container.rsplit('.', 1)[1])
    if len(used) > 1:
      groups.append(_Group(f'{parent}.{{{",".join(used)}}}', merged, None))
  return groups


def _layout(group: _Group, tensors: Mapping[str, np.ndarray]) -> tuple[int, bool] | None:
  """The largest VGG whose `features` layout starts the group: (depth, batch_norm) or None."""
  convs = sorted(
    i
    for i, params in group.entries.items()
    if 'weight' in params and tensors[params['weight']].ndim == 4
  )
  best = None
  for depth in vgg.CONVS_PER_BLOCK:
    for batch_norm in (False, True):
      layout = [i for i, _ in feature_indices(depth, batch_norm)]
      if convs[: len(layout)] != layout:
        continue
      # BatchNorm is told by its running statistics one index after each conv: a 1-d `weight`
      # alone could be any per-channel layer.
      with_bn = all('running_mean' in group.entries.get(i + 1, {}) for i in layout)
      if with_bn == batch_norm and (best is None or len(layout) > best[2]):
        best = (depth, batch_norm, len(layout))
  return best and best[:2]


def _head(group: _Group, names: set[str], tensors: Mapping[str, np.ndarray]) -> dict[str, str]:
  """Canonical name -> unwrapped name of torchvision's or timm's head beside `features`."""
  if group.parent is None:
    return {}
  at = f'{group.parent}.' if group.parent else ''
  torchvision_head = {
    f'classifier.{i}.{p}': f'{at}classifier.{i}.{p}' for i in (0, 3, 6) for p in ('weight', 'bias')
  }
  timm_head = {
    f'{layer}.{p}': f'{at}{layer}.{p}' for layer in TIMM_HEAD for p in ('weight', 'bias')
  }
  for head in (torchvision_head, timm_head):
    if all(n in names for n in head.values()):
      # Only a whole VGG head: a classifier of another shape stays with the left-out rest.
      others = [n for n in names if n.startswith(f'{at}classifier.') and n not in head.values()]
      if head is timm_head or not others:
        return head
  return {}


def locate(
  tensors: Mapping[str, np.ndarray], *, prefix: str | None = None, source: str = 'the file'
) -> common.Located:
  """Finds the torchvision-layout VGG among a file's tensors (see the module docstring).

  Args:
    tensors: every tensor of the file, by its name there (`tensor_files.read`).
    prefix: port only a VGG under this name prefix (`state_dict_ema`), where a file holds
      several.
    source: the file, for messages.

  Returns:
    The VGG's tensors under torchvision's names (`features.*`, `classifier.*`, or timm's
    head), with where they were and what else the file holds.

  Raises:
    PortError: no group of tensors has a VGG's conv layout (the message says what the file
      holds instead).
  """
  unwrapped = {}
  for name in tensors:
    # The first name in file order wins where a wrapped and an unwrapped copy both exist.
    unwrapped.setdefault(unwrap(name), name)
  arrays = {u: tensors[n] for u, n in unwrapped.items()}
  found = []
  for group in _groups(list(unwrapped)):
    # Whole name segments, and unwrapped like the names: `prefix='model'` must not select
    # `model_ema`, and a `module.` in the prefix must not stop a match.
    if prefix is not None and not (group.container + '.').startswith(unwrap(prefix) + '.'):
      continue
    layout = _layout(group, arrays)
    if layout is None:
      continue
    # The group may run on past the VGG (a detector's extra layers after `features`); only
    # indices up to the last conv (or its BatchNorm) belong to the port, the rest is left out.
    last = max(i for i, _ in feature_indices(*layout)) + (1 if layout[1] else 0)
    body = {
      f'features.{i}.{p}': name
      for i, params in group.entries.items()
      if i <= last
      for p, name in params.items()
    }
    head = _head(group, set(unwrapped), arrays)
    root = group.container.split('.')[0] if group.container else ''
    rank = PREFERRED_ROOTS.index(root) if root in PREFERRED_ROOTS else len(PREFERRED_ROOTS)
    # Most convs first (a whole VGG19 over a VGG16-shaped prefix of it), then a group with its
    # head, then the shallowest name, then the trainer's usual roots (the EMA copy last).
    score = (-sum(vgg.CONVS_PER_BLOCK[layout[0]]), -bool(head), group.container.count('.'), rank)
    found.append((score, group, layout, {**body, **head}))
  if not found:
    raise common.PortError(_nothing_found(arrays, source, prefix))
  found.sort(key=lambda f: f[0])
  _, group, layout, chosen = found[0]
  used = {unwrapped[n] for n in chosen.values()}
  rest = [n for n in tensors if n not in used]
  places = sorted({unwrapped[n].rsplit('.', 2)[0] for n in chosen.values()})
  others = [
    f'{f"vgg{lay[0]}" + ("_bn" if lay[1] else "")} under {g.container or "the top level"} '
    f'(prefix={g.container.split(".")[0]!r} ports it)'
    for _, g, lay, _ in found[1:]
    # Groups under the chosen root are parts of the same model (slices, a sub-list); only other
    # roots hold other VGGs worth naming.
    if g.container.split('.')[0] != group.container.split('.')[0]
  ]
  return common.Located(
    tensors={c: arrays[u] for c, u in chosen.items()},
    names={c: unwrapped[u] for c, u in chosen.items()},
    found_at=_where(places, group),
    left_out=paths.prefix_counts(rest, sep='.') if rest else '',
    others=tuple(others),
  )


def _where(places: list[str], group: _Group) -> str:
  if group.container.endswith('}'):  # merged slices
    return f'{group.container}.* (slices of one features list)'
  if not group.container:
    return 'the top level (a features list saved alone)'
  return ', '.join(f'{p}.*' for p in places)


def _nothing_found(arrays: Mapping[str, np.ndarray], source: str, prefix: str | None) -> str:
  convs = [n for n, a in arrays.items() if a.ndim == 4]
  under = f' under {prefix!r}' if prefix is not None else ''
  if not convs:
    what = 'no 4-d (conv) weights at all'
  else:
    by_group = collections.defaultdict(list)
    for name in convs:
      if m := INDEXED.fullmatch(name):
        by_group[m['container'] or '(top level)'].append(int(m['index']))
    what = '; '.join(f'convs at {c} indices {sorted(i)}' for c, i in by_group.items()) or (
      f'{len(convs)} conv weights, none indexed like an nn.Sequential ({paths.listing(convs, 3)})'
    )
  layouts = ', '.join(
    f'vgg{d}{"_bn" if bn else ""} {[i for i, _ in feature_indices(d, bn)][:4]}...'
    for d in (11, 16)
    for bn in (False, True)
  )
  return (
    f'cannot tell which VGG this is: {source} holds {len(arrays)} tensors'
    f' ({paths.prefix_counts(list(arrays), sep=".")}) but no VGG{under}: {what}. A '
    f'torchvision VGG has its convs at fixed features indices ({layouts}); is it another '
    'architecture?'
  )
