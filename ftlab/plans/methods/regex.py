"""Parameters by name: `trainable` and `frozen` regexes over whole paths (`re.fullmatch`)."""

from __future__ import annotations

from ftlab.paths import doubled, match_rules
from ftlab.plans import registry
from ftlab.plans.registry import Call, Param, PlanError, Selector
from ftlab.plans.selection import Context, value, whole


@registry.register
class Regex(Selector):
  name = 'regex'
  params = (Param('trainable', ()), Param('frozen', ()))
  summary = (
    'paths (`block1_conv1/kernel`) fully matching a `trainable` rule; every path must match '
    'exactly one rule of `trainable` + `frozen`'
  )

  def select(self, call: Call, ctx: Context) -> dict[str, int]:
    rules = [(p, True) for p in value(call, 'trainable', ())]
    rules += [(p, False) for p in value(call, 'frozen', ())]
    matches = match_rules(ctx.paths, [p for p, _ in rules], 'policy regex', error=PlanError)
    # Every path must be claimed by exactly one rule: a parameter no rule mentions would
    # otherwise be frozen (or trained) silently by a default.
    uncovered = [p for p in ctx.paths if not matches[p]]
    twice = [f'{p} ({", ".join(rules[i][0] for i in matches[p])})' for p in doubled(matches)]
    if uncovered or twice:
      raise PlanError(
        'policy regex: every parameter must match exactly one rule; '
        + (f'uncovered: {", ".join(uncovered)}' if uncovered else '')
        + ('; ' if uncovered and twice else '')
        + (f'matched twice: {"; ".join(twice)}' if twice else '')
      )
    return whole(ctx, [p for p in ctx.paths if rules[matches[p][0]][1]])
