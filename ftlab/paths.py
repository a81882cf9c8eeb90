"""Parameter paths: one spelling for every module.

A parameter is named by its pytree path joined with '/': `block1_conv1/kernel`,
`block1_conv1_bn/scale`, `predictions/bias` (torch state dicts, read by `ftlab.porting`, join
with '.'). This module turns trees into `{path: leaf}` and back, key paths into paths, names
a path's layer and leaf (`layer_of`, `leaf_of`: nothing else splits a path), matches
regex rules against whole paths (`re.fullmatch`), splits a tree by a boolean mask and merges
the parts, and keeps error messages about many names readable (a few names, and the prefixes
the rest share).
"""

from __future__ import annotations

import collections
import re
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from flax import traverse_util

SEP = '/'
PyTree = Any


def flatten(tree: PyTree) -> dict[str, Any]:
  """`{'a': {'b': x}}` -> `{'a/b': x}`, in sorted path order (nested dicts only)."""
  # Sorted so every flat view of a tree lists its leaves in one order, whatever order the
  # tree was built in: checksums, reports and the EMA's entries depend on it.
  return dict(sorted(traverse_util.flatten_dict(tree, sep=SEP).items()))


def unflatten(flat: Mapping[str, Any]) -> PyTree:
  """`{'a/b': x}` -> `{'a': {'b': x}}`: the inverse of `flatten`."""
  return traverse_util.unflatten_dict(dict(flat), sep=SEP)


def layer_of(path: str) -> str:
  """The layer a parameter belongs to: `block1_conv1/kernel` -> `block1_conv1` (its first
  segment: policies, blocks and reports group parameters by it)."""
  return path.split(SEP, 1)[0]


def leaf_of(path: str) -> str:
  """The leaf's own name: `block1_conv1/kernel` -> `kernel`, `fc/lora_a` -> `lora_a`."""
  return path.rsplit(SEP, 1)[-1]


def join(*parts: str) -> str:
  """`join('block1_conv1', 'kernel')` -> `block1_conv1/kernel`."""
  return SEP.join(parts)


def from_key_path(key_path: Sequence[Any]) -> str:
  """A `jax.tree_util` key path (dict keys, attributes, indices) -> its '/'-joined path."""
  # DictKey has `key`, GetAttrKey (NamedTuple fields, as in optax states) `name`, SequenceKey
  # `idx`; anything else is spelled as it prints.
  return SEP.join(
    str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in key_path
  )


def split(tree: PyTree, mask: PyTree) -> tuple[dict[str, Any], dict[str, Any]]:
  """`(selected, rest)`: the flat leaves of `tree` where the boolean `mask` tree is True,
  and the others. `merge(selected, rest)` is `tree` again."""
  # Indexing `flags` by the tree's paths raises a KeyError when the mask and the tree differ
  # in structure, rather than silently treating a missing leaf as frozen.
  flags, leaves = flatten(mask), flatten(tree)
  return (
    {p: x for p, x in leaves.items() if flags[p]},
    {p: x for p, x in leaves.items() if not flags[p]},
  )


def merge(*parts: Mapping[str, Any]) -> PyTree:
  """One tree from flat parts with disjoint paths (`split`'s inverse)."""
  return unflatten({p: x for part in parts for p, x in part.items()})


def compile_rules(patterns: Sequence[str], what: str, error: type = ValueError) -> list:
  """Compiled regexes; `error` names the first that is not a valid regex."""
  compiled = []
  for pattern in patterns:
    try:
      compiled.append(re.compile(pattern))
    except re.error as e:
      raise error(f'{what}: {pattern!r} is not a valid regex ({e})') from None
  return compiled


def match_rules(
  paths: Sequence[str],
  patterns: Sequence[str],
  what: str,
  *,
  error: type = ValueError,
  allow_unused: bool = False,
) -> dict[str, list[int]]:
  """For each path, the indices of the patterns that fully match it (`re.fullmatch`).

  Args:
    paths: the paths to match.
    patterns: regexes, each matched against whole paths.
    what: what the rules are, for messages (`policy regex`, `dont_load`).
    error: the exception class to raise.
    allow_unused: accept a pattern that matches no path (see `unused`).

  Raises:
    `error`: a pattern is not a valid regex, or (unless `allow_unused`) matches no path.
  """
  compiled = compile_rules(patterns, what, error)
  # `fullmatch`: a rule means the whole path; with `re.match`, `fc` would also catch every
  # leaf of `fc1` and `fc2`.
  matches = {p: [i for i, c in enumerate(compiled) if c.fullmatch(p)] for p in paths}
  missing = unused(matches, patterns)
  if missing and not allow_unused:
    example = f' (paths look like {paths[0]!r})' if paths else ''
    raise error(f'{what}: regex {", ".join(map(repr, missing))} matches no parameter{example}')
  return matches


def unused(matches: Mapping[str, list[int]], patterns: Sequence[str]) -> list[str]:
  """The patterns of `match_rules` that match no path."""
  used = {i for found in matches.values() for i in found}
  return [pattern for i, pattern in enumerate(patterns) if i not in used]


def doubled(matches: Mapping[str, list[int]]) -> list[str]:
  """The paths that more than one rule of `match_rules` matches."""
  return [p for p, found in matches.items() if len(found) > 1]


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
    # On the host: called on loaded or checkpointed arrays, to name the leaves before the run
    # starts, not inside a step.
    value = np.asarray(value)
    if not np.issubdtype(value.dtype, np.floating) or np.isfinite(value).all():
      continue
    counts = [(int(np.isinf(value).sum()), 'inf'), (int(np.isnan(value).sum()), 'NaN')]
    found[name] = ', '.join(f'{n} {what}' for n, what in counts if n)
  return found
