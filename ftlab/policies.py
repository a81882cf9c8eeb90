"""Fine-tuning policies: which parameters may change, and how fast.

A policy turns `(params, block structure, policy config)` into a `Plan`: a boolean
trainable mask and an lr multiplier per parameter leaf. Parameter names are read
here, once; the optimizer and the step only see the resulting data.

Parameters are named by their path joined with '/', e.g. `block1_conv1/kernel`,
`block1_conv1_bn/scale`, `predictions/bias`. Regexes match a whole path
(`re.fullmatch`).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import re
from typing import Any, Callable, Iterable, Mapping

import numpy as np
from flax import traverse_util

from ftlab.models.vgg import BlockStructure

PyTree = Any
PolicyFn = Callable[[list[str], BlockStructure, Any], set[str]]


@dataclasses.dataclass(frozen=True)
class Plan:
  """What a fine-tuning run may change.

  Attributes:
    name: the policy with its arguments, e.g. `last_blocks(k=2)`.
    trainable_mask: pytree of Python bools with the structure of the params.
    lr_multipliers: pytree of floats (0.0 for frozen leaves) with the same structure.
    frozen_layers: top-level layers all of whose parameters are frozen; their BatchNorm
      layers (if any) run on running statistics during training.
  """

  name: str
  trainable_mask: PyTree
  lr_multipliers: PyTree
  frozen_layers: tuple[str, ...]

  def flat_mask(self) -> dict[str, bool]:
    return flatten(self.trainable_mask)


def flatten(tree: PyTree) -> dict[str, Any]:
  """`{'a': {'b': x}}` -> `{'a/b': x}`, in sorted path order."""
  return dict(sorted(traverse_util.flatten_dict(tree, sep='/').items()))


def unflatten(flat: Mapping[str, Any]) -> PyTree:
  return traverse_util.unflatten_dict(dict(flat), sep='/')


# --- The policies. Each returns the set of trainable paths. ---------------------------------


def _layers_of(blocks: Iterable, paths: list[str]) -> set[str]:
  layers = {layer for block in blocks for layer in block.layers}
  return {p for p in paths if p.split('/')[0] in layers}


def _with_head(blocks: list, structure: BlockStructure, cfg: Any) -> list:
  return blocks + [structure.head] if _get(cfg, 'train_head', True) else blocks


def _check_k(k: Any, structure: BlockStructure, name: str) -> int:
  n = len(structure.blocks)
  if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= n:
    raise ValueError(f'policy {name}: k={k!r} is not a block count in 1..{n}')
  return k


def full(paths, structure, cfg):
  del structure, cfg
  return set(paths)


def linear_probe(paths, structure, cfg):
  del cfg
  return _layers_of([structure.head], paths)


def last_blocks(paths, structure, cfg):
  k = _check_k(_get(cfg, 'k', None), structure, 'last_blocks')
  return _layers_of(_with_head(list(structure.blocks[-k:]), structure, cfg), paths)


def first_blocks(paths, structure, cfg):
  k = _check_k(_get(cfg, 'k', None), structure, 'first_blocks')
  return _layers_of(_with_head(list(structure.blocks[:k]), structure, cfg), paths)


def blocks(paths, structure, cfg):
  """Any set of blocks by name (`block1`, `fc`) or 1-based conv block number."""
  by_name = {b.name: b for b in structure.blocks}
  chosen = []
  requested = list(_get(cfg, 'blocks', ()))
  if not requested:
    raise ValueError(f'policy blocks: blocks=[] names no block; valid: {list(by_name)}')
  for b in requested:
    name = f'block{b}' if isinstance(b, int) else str(b)
    if name not in by_name:
      raise ValueError(f'policy blocks: block {b!r} does not exist; valid: {list(by_name)}')
    chosen.append(by_name[name])
  return _layers_of(_with_head(chosen, structure, cfg), paths)


def bitfit(paths, structure, cfg):
  """Every bias (conv, dense and BatchNorm shift) plus the new head."""
  biases = {p for p in paths if p.endswith('/bias')}
  head = _layers_of([structure.head], paths) if _get(cfg, 'train_head', True) else set()
  return biases | head


def regex(paths, structure, cfg):
  """`trainable` and `frozen` regex lists; every path must match exactly one rule."""
  del structure
  rules = [(p, True) for p in _get(cfg, 'trainable', ())]
  rules += [(p, False) for p in _get(cfg, 'frozen', ())]
  matches = match_rules(paths, [p for p, _ in rules], 'policy regex')
  uncovered = [p for p in paths if not matches[p]]
  doubled = [
    f'{p} ({", ".join(rules[i][0] for i in matches[p])})' for p in paths if len(matches[p]) > 1
  ]
  if uncovered or doubled:
    raise ValueError(
      'policy regex: every parameter must match exactly one rule; '
      + (f'uncovered: {", ".join(uncovered)}' if uncovered else '')
      + ('; ' if uncovered and doubled else '')
      + (f'matched twice: {"; ".join(doubled)}' if doubled else '')
    )
  return {p for p in paths if rules[matches[p][0]][1]}


POLICIES: dict[str, PolicyFn] = {
  'full': full,
  'linear_probe': linear_probe,
  'last_blocks': last_blocks,
  'first_blocks': first_blocks,
  'blocks': blocks,
  'bitfit': bitfit,
  'regex': regex,
}
# The config fields each policy reads (besides `name`), shown in the plan's name.
POLICY_ARGS = {
  'last_blocks': ('k',),
  'first_blocks': ('k',),
  'blocks': ('blocks',),
  'regex': ('trainable', 'frozen'),
}


# --- Rules, config access and the plan. -------------------------------------------------------


def match_rules(paths: list[str], patterns: list[str], what: str) -> dict[str, list[int]]:
  """For each path, the indices of the patterns that fully match it.

  Raises:
    ValueError: a pattern is not a valid regex, or matches no path.
  """
  compiled = []
  for pattern in patterns:
    try:
      compiled.append(re.compile(pattern))
    except re.error as e:
      raise ValueError(f'{what}: {pattern!r} is not a valid regex ({e})') from None
  matches = {p: [i for i, c in enumerate(compiled) if c.fullmatch(p)] for p in paths}
  unused = [pat for i, pat in enumerate(patterns) if not any(i in m for m in matches.values())]
  if unused:
    raise ValueError(
      f'{what}: regex {", ".join(map(repr, unused))} matches no parameter '
      f'(paths look like {paths[0]!r})'
    )
  return matches


def _get(cfg: Any, key: str, default: Any) -> Any:
  if cfg is None:
    return default
  value = cfg.get(key, default) if hasattr(cfg, 'get') else getattr(cfg, key, default)
  return default if value is None else value


def check_policy_name(name: Any) -> str:
  """Returns `name` if it is a known policy, else raises a ValueError suggesting one."""
  if name not in POLICIES:
    close = difflib.get_close_matches(str(name), POLICIES, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ''
    raise ValueError(f'unknown policy {name!r}{hint}; valid: {", ".join(sorted(POLICIES))}')
  return name


def lr_multipliers(paths: list[str], trainable: set[str], cfg: Any) -> dict[str, float]:
  """Per-path lr multipliers from `cfg.lr_multipliers`, a list of (regex, multiplier).

  Trainable paths matched by no rule get 1.0; frozen paths get 0.0. A path matched by
  two rules is an error.
  """
  rules = [(str(p), float(m)) for p, m in _get(cfg, 'lr_multipliers', ())]
  matches = match_rules(paths, [p for p, _ in rules], 'lr_multipliers')
  doubled = [p for p in paths if len(matches[p]) > 1]
  if doubled:
    raise ValueError(f'lr_multipliers: paths matched by more than one rule: {", ".join(doubled)}')
  return {
    p: (rules[matches[p][0]][1] if matches[p] else 1.0) if p in trainable else 0.0 for p in paths
  }


def make_plan(params: PyTree, structure: BlockStructure, cfg: Any) -> Plan:
  """Builds the plan that policy config `cfg` (with `cfg.name`) describes for `params`.

  Args:
    params: the model's parameter pytree (arrays or shape structs).
    structure: the model's block structure (`model.block_structure()`).
    cfg: the policy section of the config: `name` plus that policy's fields
      (`k`, `blocks`, `train_head`, `trainable`, `frozen`, `lr_multipliers`).

  Returns:
    The plan.

  Raises:
    ValueError: unknown policy, bad arguments, or a plan that trains nothing.
  """
  name = check_policy_name(_get(cfg, 'name', None))
  paths = list(flatten(params))
  trainable = POLICIES[name](paths, structure, cfg)
  args = ', '.join(f'{a}={_get(cfg, a, None)!r}' for a in POLICY_ARGS.get(name, ()))
  label = f'{name}({args})'
  if not trainable:
    raise ValueError(f'plan {label} trains no parameter; choose a policy that trains something')
  mults = lr_multipliers(paths, trainable, cfg)
  layers = sorted({p.split('/')[0] for p in paths})
  frozen_layers = tuple(
    l for l in layers if not any(p in trainable for p in paths if p.split('/')[0] == l)
  )
  return Plan(
    name=label,
    trainable_mask=unflatten({p: p in trainable for p in paths}),
    lr_multipliers=unflatten(mults),
    frozen_layers=frozen_layers,
  )


def trainable_count(plan: Plan, params: PyTree) -> tuple[int, int]:
  """(trainable, total) parameter counts."""
  mask = plan.flat_mask()
  sizes = {p: int(np.prod(x.shape)) for p, x in flatten(params).items()}
  return sum(n for p, n in sizes.items() if mask[p]), sum(sizes.values())


def audit_table(plan: Plan, params: PyTree) -> str:
  """A printable table: path, shape, trainable, lr multiplier, and totals."""
  mask, mults = plan.flat_mask(), flatten(plan.lr_multipliers)
  rows = [
    (p, str(tuple(x.shape)), 'yes' if mask[p] else 'no', f'{mults[p]:g}' if mask[p] else '-')
    for p, x in flatten(params).items()
  ]
  header = ('path', 'shape', 'trainable', 'lr_mult')
  widths = [max(len(r[i]) for r in rows + [header]) for i in range(4)]
  fmt = lambda r: '  '.join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
  n_train, n_total = trainable_count(plan, params)
  n_leaves = sum(mask.values())
  lines = [f'plan: {plan.name}', fmt(header), fmt(['-' * w for w in widths])]
  lines += [fmt(r) for r in rows]
  lines.append(
    f'trainable: {n_train:,} of {n_total:,} parameters ({100 * n_train / n_total:.4g}%), '
    f'{n_leaves} of {len(rows)} leaves'
  )
  return '\n'.join(lines)


def frozen_checksums(plan: Plan, params: PyTree) -> dict[str, str]:
  """sha256 of every frozen leaf's bytes, by path: proof that frozen parameters did not move."""
  mask = plan.flat_mask()
  return {
    p: hashlib.sha256(np.ascontiguousarray(np.asarray(x)).tobytes()).hexdigest()
    for p, x in flatten(params).items()
    if not mask[p]
  }


def combined_checksum(checksums: Mapping[str, str]) -> str:
  """One sha256 over `path:checksum` lines (sorted), for a summary."""
  lines = ''.join(f'{p}:{c}\n' for p, c in sorted(checksums.items()))
  return hashlib.sha256(lines.encode()).hexdigest()
