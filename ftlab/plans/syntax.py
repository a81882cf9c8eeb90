"""Plan expressions: the small language `config.policy.name` is written in.

  full                                   a policy by name (its arguments from config.policy)
  last_blocks(2)  last_blocks(k=2)       a policy with arguments
  bitfit | last_blocks(1)                union of the trainable sets
  fisher(0.01) & blocks([4, 5])          intersection (entry by entry for per-element masks)
  full - bitfit                          difference
  (bitfit | last_blocks(1)) + l2_sp(alpha=0.01, beta=0.01)   `+` adds modifiers to the plan
  lp_ft(probe_steps=100) + layerwise_lr_decay(0.7)            a multi-stage plan
  reselect(fisher(0.01), every=100)      a per-element mask chosen again every 100 steps
  rigl(0.01, every=100, fraction=0.3)    RigL drop-and-grow every 100 steps
  lora(8) & blocks([4, 5])               low-rank adapters on blocks 4-5's kernels (+ head)
  lp_ft(probe_steps=100) + lora(8)       a probe, then LoRA (the one set a schedule takes)

Four kinds of terms: *sets* (which parameters train, combined with | & -), *modifiers*
(learning-rate shapes and regularisers; they apply to the whole plan wherever written),
*schedules* (multi-stage plans; they stand alone, with modifiers only) and *dynamic masks*
(a per-element mask that changes during training; they stand alone, with modifiers only).
Arguments are Python literals, except the first argument of `reselect`: the per-element
policy (`fisher(...)` or `magnitude(...)`) whose scores choose each new mask. This module
only parses and checks; `ftlab.plans.policies` gives the meaning.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
from typing import Any

# name -> its parameters in positional order. Every policy of a kind takes these.
SETS = {
  'full': (),
  'linear_probe': (),
  'last_blocks': ('k', 'train_head'),
  'first_blocks': ('k', 'train_head'),
  'blocks': ('blocks', 'train_head'),
  'bitfit': ('train_head',),
  'regex': ('trainable', 'frozen'),
  'random_sparse': ('density', 'seed', 'train_head'),
  'magnitude': ('density', 'which', 'train_head'),
  'fisher': ('density', 'num_batches', 'train_head'),
  'child_tuning_f': ('p', 'train_head'),
  'child_tuning_d': ('p', 'num_batches', 'train_head'),
  'lora': ('rank', 'alpha', 'train_head'),
}
MODIFIERS = {
  'layerwise_lr_decay': ('decay',),
  'discriminative_lr': ('factor',),
  'l2_sp': ('alpha', 'beta'),
}
SCHEDULES = {
  'lp_ft': ('probe_steps', 'probe_lr_multiplier'),
  'gradual_unfreezing': ('stage_steps',),
}
DYNAMIC = {
  'reselect': ('policy', 'every', 'blocks', 'train_head'),
  'rigl': ('density', 'every', 'fraction', 'num_batches', 'seed', 'blocks', 'train_head'),
}
# Per-element policies: a LoRA adapter is a whole leaf, so these do not combine with lora().
PER_ELEMENT = ('random_sparse', 'magnitude', 'fisher', 'child_tuning_f', 'child_tuning_d')
# The per-element policies whose scores `reselect` can compute again during training.
RESELECTABLE = ('fisher', 'magnitude')
ALL = {**SETS, **MODIFIERS, **SCHEDULES, **DYNAMIC}
# Arguments a bare name may take from config.policy (the config fields predate expressions).
CONFIG_FIELDS = ('k', 'blocks', 'train_head', 'trainable', 'frozen')
OPERATORS = {ast.BitOr: '|', ast.BitAnd: '&', ast.Sub: '-'}


class PlanError(ValueError):
  """A plan that cannot be made: a bad expression, policy argument or rule, in one line."""


@dataclasses.dataclass(frozen=True)
class Call:
  """One policy, modifier or schedule with its arguments (by parameter name)."""

  name: str
  args: tuple[tuple[str, Any], ...] = ()

  def get(self, key: str, default: Any = None) -> Any:
    return dict(self.args).get(key, default)

  def __str__(self) -> str:
    text = lambda v: str(v) if isinstance(v, Call) else repr(v)
    return f'{self.name}({", ".join(f"{k}={text(v)}" for k, v in self.args)})'


@dataclasses.dataclass(frozen=True)
class SetOp:
  """`left op right` over trainable sets; op is one of | & -."""

  op: str
  left: Any
  right: Any

  def __str__(self) -> str:
    return f'({self.left} {self.op} {self.right})'


@dataclasses.dataclass(frozen=True)
class Expression:
  """A parsed plan: a set expression or a schedule, plus modifiers."""

  selection: Call | SetOp | None
  schedule: Call | None
  modifiers: tuple[Call, ...]

  def __str__(self) -> str:
    main = self.schedule or self.selection
    text = str(main)
    if isinstance(main, SetOp):
      text = text[1:-1]  # no outer parentheses
    if self.schedule and self.selection:  # lp_ft(...) + lora(...): the second stage's set
      text += f' + {self.selection}'
    return ' + '.join([text] + [str(m) for m in self.modifiers])

  def calls(self) -> list[Call]:
    """Every set term, in order."""
    out, todo = [], [self.selection] if self.selection else []
    while todo:
      node = todo.pop(0)
      if isinstance(node, SetOp):
        todo[:0] = [node.left, node.right]
      else:
        out.append(node)
    return out


def _error(text: str, message: str) -> PlanError:
  return PlanError(f'plan {text!r}: {message}')


def _unknown(name: str, text: str) -> PlanError:
  close = difflib.get_close_matches(name, ALL, n=1)
  hint = f" (did you mean '{close[0]}'?)" if close else ''
  return PlanError(f'unknown policy {name!r}{hint}; valid: {", ".join(sorted(ALL))}')


def _call(node: ast.AST, text: str, config: Any) -> Call:
  if isinstance(node, ast.Name):
    name, positional, keywords = node.id, [], []
  elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
    name, positional, keywords = node.func.id, node.args, node.keywords
  else:
    raise _error(text, f'cannot read {ast.unparse(node)!r}; write name(arg, key=value)')
  if name not in ALL:
    raise _unknown(name, text)
  params = ALL[name]
  if len(positional) > len(params):
    raise _error(text, f'{name} takes at most {len(params)} positional arguments {params}')
  args = {}
  for param, arg in zip(params, positional):
    args[param] = _argument(name, param, arg, text)
  for kw in keywords:
    if kw.arg not in params:
      raise _error(text, f'{name} has no argument {kw.arg!r}; valid: {", ".join(params) or "none"}')
    args[kw.arg] = _argument(name, kw.arg, kw.value, text)
  if isinstance(node, ast.Name) and config is not None:  # a bare name: config fields
    for field in CONFIG_FIELDS:
      value = config.get(field, None) if hasattr(config, 'get') else None
      # train_head=True is every policy's default: named only when it is switched off.
      if field in params and value is not None and not (field == 'train_head' and value):
        args[field] = list(value) if isinstance(value, tuple) else value
  return Call(name, tuple((p, args[p]) for p in params if p in args))


def _argument(name: str, param: str, node: ast.AST, text: str) -> Any:
  """A literal, or for `reselect`'s `policy` a per-element policy call."""
  if not (name == 'reselect' and param == 'policy'):
    return _literal(node, text)
  inner = _call(node, text, None)
  if inner.name not in RESELECTABLE:
    raise _error(text, f'reselect chooses by {" or ".join(RESELECTABLE)}, not {inner.name}')
  return inner


def _literal(node: ast.AST, text: str) -> Any:
  try:
    value = ast.literal_eval(node)
  except ValueError:
    raise _error(text, f'argument {ast.unparse(node)!r} is not a literal') from None
  return list(value) if isinstance(value, tuple) else value


def _walk(node: ast.AST, text: str, config: Any) -> tuple[Any, list[Call], list[Call]]:
  """(set expression or None, schedules, modifiers) of a subtree."""
  if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
    sel_l, sch_l, mod_l = _walk(node.left, text, config)
    sel_r, sch_r, mod_r = _walk(node.right, text, config)
    if sel_l is not None and sel_r is not None:
      raise _error(text, 'combine trainable sets with | & -; + only adds modifiers')
    return sel_l if sel_l is not None else sel_r, sch_l + sch_r, mod_l + mod_r
  if isinstance(node, ast.BinOp) and type(node.op) in OPERATORS:
    sel_l, sch_l, mod_l = _walk(node.left, text, config)
    sel_r, sch_r, mod_r = _walk(node.right, text, config)
    if sch_l or sch_r:
      raise _error(
        text, 'a schedule or dynamic mask stands alone: it cannot be combined with | & -'
      )
    if sel_l is None or sel_r is None:
      raise _error(text, f'{OPERATORS[type(node.op)]} needs a trainable set on both sides')
    return SetOp(OPERATORS[type(node.op)], sel_l, sel_r), [], mod_l + mod_r
  call = _call(node, text, config)
  if call.name in MODIFIERS:
    return None, [], [call]
  if call.name in SCHEDULES or call.name in DYNAMIC:
    return None, [call], []
  return call, [], []


def parse(text: Any, config: Any = None) -> Expression:
  """Parses a plan expression; bare names take their arguments from `config` (policy section).

  Raises:
    PlanError: a syntax error, unknown name or argument, or a misplaced term, in one line.
  """
  if not isinstance(text, str) or not text.strip():
    raise PlanError(f'policy {text!r} is empty; write e.g. full, last_blocks(2), bitfit | fc')
  try:
    tree = ast.parse(text.strip(), mode='eval').body
  except SyntaxError as e:
    raise _error(text, f'syntax error at column {e.offset}: {e.msg}') from None
  selection, schedules, modifiers = _walk(tree, text, config)
  if len(schedules) > 1:
    raise _error(text, 'at most one schedule or dynamic mask (lp_ft, gradual_unfreezing, ...)')
  _check_lora(text, selection, schedules)
  if schedules and schedules[0].name in DYNAMIC:  # a dynamic mask is a set that stands alone
    return Expression(schedules[0], None, tuple(_check_modifiers(text, modifiers)))
  if not schedules and selection is None:
    raise _error(text, 'no trainable set: add one, e.g. full + l2_sp(alpha=0.01)')
  return Expression(
    selection, schedules[0] if schedules else None, _check_modifiers(text, modifiers)
  )


def _check_lora(text: str, selection: Any, schedules: list[Call]) -> None:
  """One lora() term, not with a per-element mask; lp_ft's second stage only as LoRA."""
  calls = Expression(selection, None, ()).calls() if selection is not None else []
  names = [c.name for c in calls]
  if names.count('lora') > 1:
    raise _error(text, 'one lora(...) term per plan (one rank and alpha)')
  sparse = sorted(set(names) & set(PER_ELEMENT))
  if 'lora' in names and sparse:
    raise _error(
      text,
      f'lora(...) adds whole low-rank adapters and cannot be combined with the per-element '
      f'mask {sparse[0]}; combine it with blocks, last_blocks, first_blocks, regex, bitfit, '
      'linear_probe',
    )
  if schedules and selection is not None and (schedules[0].name != 'lp_ft' or 'lora' not in names):
    which = 'only lp_ft takes one' if schedules[0].name != 'lp_ft' else 'it must train lora(...)'
    raise _error(
      text,
      f'{schedules[0].name} chooses its own trainable sets ({which}, e.g. lp_ft(100) + lora(8))',
    )


def _check_modifiers(text: str, modifiers: list[Call]) -> tuple[Call, ...]:
  names = [m.name for m in modifiers]
  doubled = sorted({n for n in names if names.count(n) > 1})
  if doubled:
    raise _error(text, f'modifier {doubled[0]} given twice')
  if 'layerwise_lr_decay' in names and 'discriminative_lr' in names:
    raise _error(text, 'choose one of layerwise_lr_decay and discriminative_lr')
  return tuple(modifiers)
