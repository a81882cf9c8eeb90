"""Gradual unfreezing (Howard & Ruder, ACL 2018, ULMFiT): one more block from the top per stage.

`gradual_unfreezing(stage_steps)` trains the head for `stage_steps` steps, then the last block
and the head, then one more block from the top every `stage_steps` steps; stages past the
run's end are dropped and the last one runs to the end.
"""

from __future__ import annotations

from typing import Any

from ftlab.plans import registry
from ftlab.plans.methods.lp_ft import stage_steps
from ftlab.plans.registry import Call, Param, Schedule, StageSpec


@registry.register
class GradualUnfreezing(Schedule):
  name = 'gradual_unfreezing'
  params = (Param('stage_steps'),)
  summary = 'the head, then one more block from the top every `stage_steps` steps'
  paper = 'Howard & Ruder, ACL 2018'

  def stages(
    self, call: Call, selection: Any, structure: Any, total_steps: int | None
  ) -> list[StageSpec]:
    n = stage_steps(call, 'stage_steps')
    sets = [Call('linear_probe')]
    sets += [Call('last_blocks', (('k', k),)) for k in range(1, len(structure.blocks) + 1)]
    # The last stage has no length: it runs to the end of the run, however long that is.
    return [StageSpec(s, n if i + 1 < len(sets) else None) for i, s in enumerate(sets)]
