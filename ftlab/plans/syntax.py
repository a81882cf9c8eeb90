"""Plan expressions: the small language `config.policy.name` is written in.

  full                                   a method by name (its arguments from config.policy)
  last_blocks(2)  last_blocks(k=2)       a method with arguments
  bitfit | last_blocks(1)                union of the trainable sets
  fisher(0.01) & blocks([4, 5])          intersection (entry by entry for per-element masks)
  full - bitfit                          difference
  (bitfit | last_blocks(1)) + l2_sp(alpha=0.01, beta=0.01)   `+` adds modifiers to the plan
  lp_ft(probe_steps=100) + layerwise_lr_decay(0.7)            a multi-stage plan
  reselect(fisher(0.01), every=100)      a per-element mask chosen again every 100 steps
  lora(8) & blocks([4, 5])               low-rank adapters on blocks 4-5's kernels (+ head)
  lp_ft(probe_steps=100) + lora(8)       a probe, then LoRA (the one set a schedule takes)

The words are the registered methods (`ftlab.plans.registry`), of five kinds: *selectors* and
*tuners* are sets (which parameters train, combined with | & -), *modifiers* (learning-rate
shapes and regularisers) apply to the whole plan wherever written, *schedules* (multi-stage
plans) and *dynamic masks* (a per-element mask that changes during training) stand alone,
with modifiers only. Arguments are Python literals, except a parameter that takes another
method's call (`reselect`'s `policy`). This module only parses and checks against the
registry; `ftlab.plans.policies` gives the meaning.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
from typing import Any

from ftlab.plans import registry
from ftlab.plans.registry import Call, PlanError

__all__ = ['Call', 'Expression', 'PlanError', 'SetOp', 'parse']

# Arguments a bare name may take from config.policy (the config fields predate expressions).
CONFIG_FIELDS = ('k', 'blocks', 'train_head', 'trainable', 'frozen')
# The language is a subset of Python expressions, parsed by `ast`, so its precedence is
# Python's: `+` and `-` bind tighter than `&`, which binds tighter than `|`. Modifiers are
# collected from any depth (`_walk`), so where a `+ modifier` is written does not matter.
OPERATORS = {ast.BitOr: '|', ast.BitAnd: '&', ast.Sub: '-'}
SETS = ('selector', 'tuner')
ALONE = ('schedule', 'dynamic')  # kinds that stand alone (with modifiers)


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
      # `SetOp` parenthesises every operation, so the text is unambiguous whatever precedence
      # the user relied on: it is the plan's name and part of its key (`policies.PlanKey`).
      text = text[1:-1]  # no outer parentheses
    if self.schedule and self.selection:  # lp_ft(...) + lora(...): the second stage's set
      text += f' + {self.selection}'
    return ' + '.join([text] + [str(m) for m in self.modifiers])

  def canonical(self) -> str:
    """The expression with every method's every argument given (defaults filled in from the
    registry): `lora(8)` and `lora(8, alpha=8.0)` read the same, so a plan's identity
    (`policies.PlanKey`) does not depend on which defaults were written out."""
    full = lambda node: None if node is None else complete(node)
    return str(
      Expression(full(self.selection), full(self.schedule), tuple(map(full, self.modifiers)))
    )

  def calls(self) -> list[Call]:
    """Every set term, in order."""
    out, todo = [], [self.selection] if self.selection else []
    while todo:
      node = todo.pop(0)
      if isinstance(node, SetOp):
        # Pushed in front: the terms come out left to right, as written.
        todo[:0] = [node.left, node.right]
      else:
        out.append(node)
    return out


def complete(node: Call | SetOp) -> Call | SetOp:
  """`node` with every call's every argument given, in parameter order (`Method.arguments`);
  a call inside an argument (`reselect`'s policy) is completed too."""
  if isinstance(node, SetOp):
    return SetOp(node.op, complete(node.left), complete(node.right))
  args = registry.get(node.name).arguments(node)
  filled = ((k, complete(v) if isinstance(v, Call) else v) for k, v in args.items())
  return Call(node.name, tuple(filled))


def _error(text: str, message: str) -> PlanError:
  return PlanError(f'plan {text!r}: {message}')


def _unknown(name: str, known: dict) -> PlanError:
  close = difflib.get_close_matches(name, known, n=1)
  hint = f" (did you mean '{close[0]}'?)" if close else ''
  return PlanError(f'unknown policy {name!r}{hint}; valid: {", ".join(sorted(known))}')


def _call(node: ast.AST, text: str, config: Any, allowed: tuple[str, ...] = ()) -> Call:
  """One method call; `allowed` (for a call inside an argument) names the methods it may be."""
  if isinstance(node, ast.Name):
    name, positional, keywords = node.id, [], []
  elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
    name, positional, keywords = node.func.id, node.args, node.keywords
  else:
    raise _error(text, f'cannot read {ast.unparse(node)!r}; write name(arg, key=value)')
  known = registry.methods()
  if name not in known:
    raise _unknown(name, known)
  method = known[name]
  params = [p.name for p in method.params]
  if len(positional) > len(params):
    raise _error(text, f'{name} takes at most {len(params)} positional arguments {tuple(params)}')
  args = {}
  for param, arg in zip(method.params, positional):
    args[param.name] = _argument(name, param, arg, text)
  by_name = {p.name: p for p in method.params}
  for kw in keywords:
    if kw.arg not in by_name:
      raise _error(text, f'{name} has no argument {kw.arg!r}; valid: {", ".join(params) or "none"}')
    args[kw.arg] = _argument(name, by_name[kw.arg], kw.value, text)
  if isinstance(node, ast.Name) and config is not None:  # a bare name: config fields
    for field in CONFIG_FIELDS:
      # Only a bare name reads the config: `last_blocks(2)` says everything itself, and a config
      # field silently overriding a written argument would surprise.
      value = config.get(field, None) if hasattr(config, 'get') else None
      # train_head=True is every policy's default: named only when it is switched off.
      if field in params and value is not None and not (field == 'train_head' and value):
        # Tuples become lists (as `_literal` does), so a config's `(4, 5)` and an expression's
        # `[4, 5]` give the same call and the same plan name.
        args[field] = list(value) if isinstance(value, tuple) else value
  return Call(name, tuple((p, args[p]) for p in params if p in args))


def _argument(name: str, param: registry.Param, node: ast.AST, text: str) -> Any:
  """A literal, or for a parameter that takes a call (`reselect`'s `policy`) that call."""
  if not param.calls:
    return _literal(node, text)
  # No config for an inner call: the config's fields belong to the outer, bare method.
  inner = _call(node, text, None)
  if inner.name not in param.calls:
    raise _error(text, f'{name} chooses by {" or ".join(param.calls)}, not {inner.name}')
  return inner


def _literal(node: ast.AST, text: str) -> Any:
  try:
    value = ast.literal_eval(node)
  except ValueError:
    raise _error(text, f'argument {ast.unparse(node)!r} is not a literal') from None
  return list(value) if isinstance(value, tuple) else value


def _kind(call: Call) -> str:
  return registry.get(call.name).kind


def _walk(node: ast.AST, text: str, config: Any) -> tuple[Any, list[Call], list[Call]]:
  """(set expression or None, standalone terms, modifiers) of a subtree."""
  if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
    sel_l, alone_l, mod_l = _walk(node.left, text, config)
    sel_r, alone_r, mod_r = _walk(node.right, text, config)
    # `+` between two sets would read as a union; it is refused so that `+` always means
    # "add a modifier" and set algebra is written with | & - only.
    if sel_l is not None and sel_r is not None:
      raise _error(text, 'combine trainable sets with | & -; + only adds modifiers')
    return sel_l if sel_l is not None else sel_r, alone_l + alone_r, mod_l + mod_r
  if isinstance(node, ast.BinOp) and type(node.op) in OPERATORS:
    sel_l, alone_l, mod_l = _walk(node.left, text, config)
    sel_r, alone_r, mod_r = _walk(node.right, text, config)
    if alone_l or alone_r:
      raise _error(
        text, 'a schedule or dynamic mask stands alone: it cannot be combined with | & -'
      )
    if sel_l is None or sel_r is None:
      raise _error(text, f'{OPERATORS[type(node.op)]} needs a trainable set on both sides')
    return SetOp(OPERATORS[type(node.op)], sel_l, sel_r), [], mod_l + mod_r
  call = _call(node, text, config)
  kind = _kind(call)
  if kind == 'modifier':
    return None, [], [call]
  if kind in ALONE:
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
  selection, alone, modifiers = _walk(tree, text, config)
  if len(alone) > 1:
    raise _error(text, 'at most one schedule or dynamic mask (lp_ft, gradual_unfreezing, ...)')
  _check_tuners(text, selection, alone)
  if alone and _kind(alone[0]) == 'dynamic':  # a dynamic mask is a set that stands alone
    return Expression(alone[0], None, _check_modifiers(text, modifiers))
  if not alone and selection is None:
    raise _error(text, 'no trainable set: add one, e.g. full + l2_sp(alpha=0.01)')
  return Expression(selection, alone[0] if alone else None, _check_modifiers(text, modifiers))


def _check_tuners(text: str, selection: Any, alone: list[Call]) -> None:
  """One tuner term, not with a per-element mask; a schedule takes a set only as it says."""
  calls = Expression(selection, None, ()).calls() if selection is not None else []
  tuners = [c.name for c in calls if _kind(c) == 'tuner']
  if len(tuners) > 1:
    which = f'one {tuners[0]}(...) term' if len(set(tuners)) == 1 else 'one tuner'
    raise _error(
      text,
      f'{which} per plan ({", ".join(tuners)} given): adapters of two kinds on one kernel '
      'have no single fold',
    )
  # A tuner's adapters replace a kernel's update as a whole (`tuners.fold`); a per-element
  # mask on the same kernel would have no entries of its own to mask.
  per_element = sorted({c.name for c in calls if getattr(registry.get(c.name), 'per_element', 0)})
  if tuners and per_element:
    raise _error(
      text,
      f'{tuners[0]}(...) adds whole adapters and cannot be combined with the per-element '
      f'mask {per_element[0]}; combine it with blocks, last_blocks, first_blocks, regex, '
      'bitfit, linear_probe',
    )
  if alone and selection is not None:
    schedule = registry.get(alone[0].name)
    takers = [n for n, m in registry.of_kind('schedule').items() if m.takes_set]
    if not schedule.takes_set:
      which = f'only {" and ".join(takers)} takes one' if takers else 'none takes a set'
    elif schedule.takes_set == 'tuner' and not tuners:
      which = 'it must train ' + ' or '.join(f'{t}(...)' for t in registry.of_kind('tuner'))
    else:
      return
    raise _error(
      text,
      f'{alone[0].name} chooses its own trainable sets ({which}, e.g. lp_ft(100) + lora(8))',
    )


def _check_modifiers(text: str, modifiers: list[Call]) -> tuple[Call, ...]:
  names = [m.name for m in modifiers]
  doubled = sorted({n for n in names if names.count(n) > 1})
  if doubled:
    raise _error(text, f'modifier {doubled[0]} given twice')
  groups: dict[str, list[str]] = {}
  for name in names:
    group = registry.get(name).group
    if group:
      groups.setdefault(group, []).append(name)
  for members in groups.values():
    if len(members) > 1:
      raise _error(text, f'choose one of {" and ".join(members)}')
  return tuple(modifiers)
