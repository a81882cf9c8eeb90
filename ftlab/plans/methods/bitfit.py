"""BitFit: the biases only (Ben Zaken et al., ACL 2022).

Every bias (conv, dense and BatchNorm shift) plus the new head: for VGG16 13,416 bias values,
about 0.01% of the parameters.
"""

from __future__ import annotations

from ftlab import paths
from ftlab.plans import registry
from ftlab.plans.registry import Call, Param, Selector
from ftlab.plans.selection import Context, whole


@registry.register
class BitFit(Selector):
  name = 'bitfit'
  params = (Param('train_head', True),)
  summary = 'every bias (conv, dense, BatchNorm shift) + head'
  paper = 'Ben Zaken et al., ACL 2022'

  def select(self, call: Call, ctx: Context) -> dict[str, int]:
    # By leaf name: Flax calls BatchNorm's shift `bias` too, so the `_bn` layers' shifts are
    # chosen with the conv and dense biases, and their scales are not.
    biases = {p for p in ctx.paths if paths.leaf_of(p) == 'bias'}
    return whole(ctx, biases | ctx.head_if(call))
