"""The plans family: what a fine-tuning run may change, and how fast.

  registry.py       the vocabulary: every method declared once (kind, parameters, paper)
  methods/          one module per method or small family: selectors (`bitfit`, `fisher`),
                    tuners (`lora`), modifiers (`l2_sp`), schedules (`lp_ft`), dynamic masks
                    (`rigl`); each registers itself
  syntax.py         plan expressions parsed and checked against the registry
  selection.py      what selectors share: entry levels, the selection context, top-k
  tuners.py         the reparameterisation protocol: adapters, `fold` into plain parameters
  policies.py       expression -> `Plan` per stage (masks, lr multipliers, gradient terms)
  optim.py          `Plan` -> optax; the readers and writers of the optimizer state
  dynamic_masks.py  the engine of masks that change during training (`remask`)

Nothing outside this family names a method; it knows the model only by its block structure.
"""

from ftlab.plans import registry, selection, syntax, tuners  # noqa: I001 (dependency order)
from ftlab.plans import policies, optim, dynamic_masks

__all__ = ['dynamic_masks', 'optim', 'policies', 'registry', 'selection', 'syntax', 'tuners']
