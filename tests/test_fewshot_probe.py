"""The closed-form few-shot probe against numpy ridge regression written another way."""

import numpy as np
import pytest

from ftlab import fewshot_probe


def reference_accuracy(train_x, train_y, test_x, test_y, num_classes, l2_reg):
  """Ridge regression as least squares on the augmented system [x; sqrt(l2) I] W = [t; 0]."""
  mean = train_x.mean(0)
  x, t = train_x - mean, 2.0 * np.eye(num_classes)[train_y] - 1.0
  d = x.shape[1]
  augmented = np.concatenate([x, np.sqrt(l2_reg) * np.eye(d)])
  padded = np.concatenate([t, np.zeros((d, num_classes))])
  weights = np.linalg.lstsq(augmented, padded, rcond=None)[0]
  return np.mean(np.argmax((test_x - mean) @ weights, 1) == test_y), weights


@pytest.mark.parametrize('n_per_class, d', [(2, 50), (30, 8)])  # dual and primal forms
def test_probe_equals_numpy_least_squares(n_per_class, d):
  rng = np.random.default_rng(0)
  num_classes = 5
  centres = rng.normal(size=(num_classes, d)) * 2
  train_y = np.repeat(np.arange(num_classes), n_per_class)
  test_y = rng.integers(0, num_classes, 200)
  train_x = centres[train_y] + rng.normal(size=(len(train_y), d))
  test_x = centres[test_y] + rng.normal(size=(len(test_y), d))
  for l2_reg in (0.1, 1024.0):
    expected, weights = reference_accuracy(train_x, train_y, test_x, test_y, num_classes, l2_reg)
    got = fewshot_probe.probe_accuracy(train_x, train_y, test_x, test_y, num_classes, l2_reg)
    assert got == expected
    targets = 2.0 * np.eye(num_classes)[train_y] - 1.0
    np.testing.assert_allclose(
      fewshot_probe.ridge_weights(train_x - train_x.mean(0), targets, l2_reg), weights, atol=1e-9
    )
  assert 0.5 < got <= 1.0  # separable clusters: far above chance (0.2)


def test_shots_are_the_first_per_class_and_nested():
  labels = np.array([1, 0, 1, 2, 0, 2, 1, 0, 2])
  np.testing.assert_array_equal(fewshot_probe.first_shots(labels, 1, 3), [0, 1, 3])
  np.testing.assert_array_equal(fewshot_probe.first_shots(labels, 2, 3), [0, 1, 2, 3, 4, 5])
  with pytest.raises(ValueError, match='class 0 has 3 examples, not 4'):
    fewshot_probe.first_shots(labels, 4, 3)
  rng = np.random.default_rng(1)
  x = rng.normal(size=(9, 4))
  found = fewshot_probe.probe_accuracies(x, labels, x, labels, 3, shots=(1, 3))
  assert found[3] == fewshot_probe.probe_accuracy(x, labels, x, labels, 3)
  assert set(found) == {1, 3}
  with pytest.raises(ValueError, match='l2_reg 0.0 must be > 0'):
    fewshot_probe.ridge_weights(x, x, 0.0)
