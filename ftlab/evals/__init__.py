"""The evaluators' family: what a run measures at each eval, one module per evaluator.

  base.py            the protocol (`Evaluator`: build, splits, start_stage, run, summary),
                     the registry and `build`
  classification.py  loss and accuracy of each evaluated split, and of the EMA weights
  fewshot.py         the closed-form few-shot ridge probe on the current features
  forgetting.py      the loaded head on the current backbone: agreement with the loaded model
  shift.py           the eval split under ImageNet-C-style corruptions (shifted test sets)

A new evaluator is one new module here that registers itself (`@base.register`); nothing
outside this family names an evaluator.
"""

from ftlab.evals import base

__all__ = ['base']
