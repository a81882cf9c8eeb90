"""A closed-form few-shot linear probe: how linearly separable a representation is.

For a few labelled examples per class, features are centred on their mean and mapped to
targets +1 (the class) / -1 (the others) by ridge regression solved in closed form; test
examples take the class of the highest score. As big_vision's few-shot evaluator
(`big_vision/evaluators/fewshot.py`, from Kolesnikov et al., "Big Transfer", 2020), which
fits the same regression on pre-logit features to track a representation during training.
Fitting takes milliseconds for 25 shots of 100 classes, so it can run at every eval.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

DEFAULT_L2_REG = 2.0**10  # big_vision's few-shot default


def first_shots(labels: np.ndarray, shots: int, num_classes: int) -> np.ndarray:
  """Positions of the first `shots` examples of each class in `labels` order, ascending.

  Raises:
    ValueError: a class has fewer than `shots` examples (names the class and its count).
  """
  labels = np.asarray(labels)
  chosen = []
  for c in range(num_classes):
    of_class = np.flatnonzero(labels == c)
    if len(of_class) < shots:
      raise ValueError(f'few-shot probe: class {c} has {len(of_class)} examples, not {shots}')
    chosen.append(of_class[:shots])
  return np.sort(np.concatenate(chosen))


def ridge_weights(x: np.ndarray, targets: np.ndarray, l2_reg: float) -> np.ndarray:
  """`argmin_W ||x W - targets||^2 + l2_reg ||W||^2`, in float64.

  Solved in the smaller of the two closed forms: `(x^T x + l2 I)^-1 x^T t` (d x d) or, with
  fewer examples than features, `x^T (x x^T + l2 I)^-1 t` (n x n); the two are equal.

  Args:
    x: features `[n, d]`.
    targets: `[n, k]`.
    l2_reg: the ridge coefficient, > 0.

  Returns:
    `W`, float64 `[d, k]`.
  """
  if not l2_reg > 0:
    raise ValueError(f'few-shot probe: l2_reg {l2_reg} must be > 0')
  x, targets = np.asarray(x, np.float64), np.asarray(targets, np.float64)
  n, d = x.shape
  if n < d:
    return x.T @ np.linalg.solve(x @ x.T + l2_reg * np.eye(n), targets)
  return np.linalg.solve(x.T @ x + l2_reg * np.eye(d), x.T @ targets)


def probe_accuracy(
  train_x: np.ndarray,
  train_y: np.ndarray,
  test_x: np.ndarray,
  test_y: np.ndarray,
  num_classes: int,
  l2_reg: float = DEFAULT_L2_REG,
) -> float:
  """Test accuracy of the ridge probe fitted on `(train_x, train_y)`.

  Args:
    train_x, test_x: features `[n, d]` and `[m, d]` (flattened if they have more axes).
    train_y, test_y: int labels `[n]`, `[m]` in [0, num_classes).
    num_classes: the number of classes.
    l2_reg: the ridge coefficient.

  Returns:
    The fraction of test examples whose highest score is their class.
  """
  train_x = np.asarray(train_x, np.float64).reshape(len(train_y), -1)
  test_x = np.asarray(test_x, np.float64).reshape(len(test_y), -1)
  mean = train_x.mean(axis=0, keepdims=True)  # centring helps (big_vision)
  targets = 2.0 * np.eye(num_classes)[np.asarray(train_y)] - 1.0
  weights = ridge_weights(train_x - mean, targets, l2_reg)
  predicted = np.argmax((test_x - mean) @ weights, axis=1)
  return float(np.mean(predicted == np.asarray(test_y)))


def probe_accuracies(
  train_x: np.ndarray,
  train_y: np.ndarray,
  test_x: np.ndarray,
  test_y: np.ndarray,
  num_classes: int,
  shots: Sequence[int],
  l2_reg: float = DEFAULT_L2_REG,
) -> dict[int, float]:
  """`probe_accuracy` for each shot count, fitted on the first `k` examples of each class
  of the training features (so the smaller sets are nested in the larger ones)."""
  found = {}
  for k in shots:
    rows = first_shots(train_y, k, num_classes)
    found[k] = probe_accuracy(train_x[rows], train_y[rows], test_x, test_y, num_classes, l2_reg)
  return found
