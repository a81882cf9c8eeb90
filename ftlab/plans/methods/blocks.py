"""Block selectors: the whole network, the head alone, or chosen blocks of it.

The head is the layers a transfer task replaces (`predictions`; with the `mlp` head also its
hidden `fc`); a block is one of VGG's five conv blocks or, with the `imagenet` head, the
pretrained `fc1`/`fc2` (`fc`). The block policies train the head too unless
`train_head=False`. Surgical fine-tuning (Lee et al., ICLR 2023) is `blocks([b])`.
"""

from __future__ import annotations

from typing import Any

from ftlab.plans import registry
from ftlab.plans.registry import Call, Param, PlanError, Selector
from ftlab.plans.selection import Context, value, whole


@registry.register
class Full(Selector):
  name = 'full'
  summary = 'everything (full fine-tuning)'

  def select(self, call: Call, ctx: Context) -> dict[str, int]:
    return whole(ctx, ctx.paths)


@registry.register
class LinearProbe(Selector):
  name = 'linear_probe'
  summary = 'the new head only (`predictions`; for the `mlp` head also its hidden `fc`)'

  def select(self, call: Call, ctx: Context) -> dict[str, int]:
    return whole(ctx, ctx.head)


def _block_count(call: Call, ctx: Context) -> int:
  # `bool` is an `int` in Python: `last_blocks(True)` is refused rather than read as k=1.
  k, n = value(call, 'k', None), len(ctx.structure.blocks)
  if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= n:
    raise PlanError(f'policy {call.name}: k={k!r} is not a block count in 1..{n}')
  return k


def _with_head(blocks: list[Any], call: Call, ctx: Context) -> list[Any]:
  return blocks + [ctx.structure.head] if value(call, 'train_head', True) else blocks


@registry.register
class LastBlocks(Selector):
  name = 'last_blocks'
  params = (Param('k'), Param('train_head', True))
  summary = 'the last `k` blocks + head (with the `imagenet` head, `fc1`/`fc2` form the last block)'

  def select(self, call: Call, ctx: Context) -> dict[str, int]:
    k = _block_count(call, ctx)
    # `blocks` excludes the head, so with the `imagenet` head the last block is `fc`
    # (fc1 and fc2), the pretrained dense layers, before any conv block.
    return whole(ctx, ctx.layers(_with_head(list(ctx.structure.blocks[-k:]), call, ctx)))


@registry.register
class FirstBlocks(Selector):
  name = 'first_blocks'
  params = (Param('k'), Param('train_head', True))
  summary = 'the first `k` blocks + head'

  def select(self, call: Call, ctx: Context) -> dict[str, int]:
    k = _block_count(call, ctx)
    return whole(ctx, ctx.layers(_with_head(list(ctx.structure.blocks[:k]), call, ctx)))


@registry.register
class Blocks(Selector):
  name = 'blocks'
  params = (Param('blocks'), Param('train_head', True))
  summary = "any set of blocks, by number or name (`[1]` or `['block1']`) + head"
  paper = 'surgical fine-tuning: Lee et al., ICLR 2023'

  def select(self, call: Call, ctx: Context) -> dict[str, int]:
    by_name = {b.name: b for b in ctx.structure.blocks}
    requested = list(value(call, 'blocks', ()))
    if not requested:
      raise PlanError(f'policy blocks: blocks=[] names no block; valid: {list(by_name)}')
    chosen = []
    for b in requested:
      name = f'block{b}' if isinstance(b, int) else str(b)
      if name not in by_name:
        raise PlanError(f'policy blocks: block {b!r} does not exist; valid: {list(by_name)}')
      chosen.append(by_name[name])
    return whole(ctx, ctx.layers(_with_head(chosen, call, ctx)))
