"""Names of parameters and tensors: separator-joined paths, and how to summarise long lists of them.

A parameter of ftlab's VGG is named by its pytree path joined with '/'
(`block1_conv1/kernel`); torch state dicts join with '.' (`features.0.weight`). Error messages
about many names (a checkpoint that does not fit, a weight file with a VGG inside) stay
readable by listing a few names and the prefixes the rest share.
"""

from __future__ import annotations

import collections
from typing import Any, Iterable, Mapping, Sequence

import numpy as np


def common_prefix(names: Iterable[str], sep: str = '/') -> str:
  """The longest run of whole leading segments that every name shares, with its trailing
  separator (`'backbone.features.'`), or '' when they share none."""
  split = [n.split(sep) for n in names]
  if not split:
    return ''
  shared = []
  for segments in zip(*(s[:-1] for s in split)):  # never the whole of a name
    if len(set(segments)) != 1:
      break
    shared.append(segments[0])
  return sep.join(shared) + sep if shared else ''


def prefix_counts(names: Sequence[str], sep: str = '/', limit: int = 4) -> str:
  """`'state_dict.features.* (16), optimizer.state.* (22)'`: names grouped by their first
  segment, each group shown by its common prefix and size, largest first; single names as
  they are. At most `limit` groups, then how many more."""
  groups = collections.defaultdict(list)
  for name in names:
    groups[name.split(sep)[0]].append(name)
  shown = []
  for members in sorted(groups.values(), key=lambda m: (-len(m), m[0])):
    if len(members) == 1:
      shown.append(members[0])
    else:
      shown.append(
        f'{common_prefix(members, sep) or members[0].split(sep)[0] + sep}* ({len(members)})'
      )
  more = len(shown) - limit
  return ', '.join(shown[:limit]) + (f', and {more} more groups' if more > 0 else '')


def listing(items: Sequence[str], limit: int = 6) -> str:
  """The first `limit` items, comma-separated, then how many more."""
  more = len(items) - limit
  return ', '.join(items[:limit]) + (f', ... and {more} more' if more > 0 else '')


def nonfinite_counts(arrays: Mapping[str, Any]) -> dict[str, str]:
  """name -> '1 inf, 2 NaN' for every floating-point array holding non-finite values."""
  found = {}
  for name, value in arrays.items():
    value = np.asarray(value)
    if not np.issubdtype(value.dtype, np.floating) or np.isfinite(value).all():
      continue
    counts = [(int(np.isinf(value).sum()), 'inf'), (int(np.isnan(value).sum()), 'NaN')]
    found[name] = ', '.join(f'{n} {what}' for n, what in counts if n)
  return found
