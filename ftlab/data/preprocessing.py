"""The input conventions pretrained weights expect: `caffe`, `torch` and `unit`.

A ported checkpoint carries its convention with it (`port.json`, `config.dataset.preprocess`):
feeding torchvision weights caffe-style inputs runs and silently loses accuracy.

  caffe   Keras applications (`keras.applications.vgg16.preprocess_input`, mode 'caffe'):
          RGB -> BGR, minus the ImageNet mean on the 0-255 scale, no std.
  torch   torchvision and timm (`transforms.Normalize`): [0, 1], minus the ImageNet mean,
          divided by its std, RGB.
  unit    x / 255, RGB: Keras models trained on `rescale=1./255` inputs (tf2onnx exports of
          them), and ftlab's own configs trained from scratch.

`normalize` is written with array operators only, so the same function serves numpy arrays
(porting, tests) and TensorFlow tensors (the input pipeline).
"""

from __future__ import annotations

from typing import Any

from ftlab.errors import ConfigError

CONVENTIONS = ('caffe', 'torch', 'unit')
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)  # 0-255 scale, BGR order (Keras applications)
TORCH_MEAN_RGB = (0.485, 0.456, 0.406)  # [0, 1] scale (torchvision's ImageNet statistics)
TORCH_STD_RGB = (0.229, 0.224, 0.225)


def check(convention: str) -> str:
  """Returns `convention`; raises ValueError naming the valid ones if it is unknown."""
  if convention not in CONVENTIONS:
    raise ConfigError(f'unknown preprocessing {convention!r}; valid: {", ".join(CONVENTIONS)}')
  return convention


def normalize(images_rgb: Any, convention: str) -> Any:
  """RGB float32 images on the 0-255 scale, `[..., 3]` -> the convention's model input.

  Args:
    images_rgb: a float32 numpy array or TensorFlow tensor, channels last, RGB, 0-255.
    convention: `caffe`, `torch` or `unit`.

  Returns:
    The same type and shape, float32.

  Raises:
    ValueError: an unknown convention.
  """
  import numpy as np

  check(convention)
  if convention == 'caffe':
    # Channels reversed first: the mean is given in BGR order, as Keras subtracts it.
    return images_rgb[..., ::-1] - np.asarray(CAFFE_MEAN_BGR, np.float32)
  if convention == 'torch':
    mean, std = np.asarray(TORCH_MEAN_RGB, np.float32), np.asarray(TORCH_STD_RGB, np.float32)
    return (images_rgb / np.float32(255.0) - mean) / std
  # float32 constants throughout, so a numpy input stays float32 (numpy promotes to a float64
  # array operand) and a TensorFlow tensor meets operands of its own dtype.
  return images_rgb / np.float32(255.0)


def describe(convention: str) -> dict:
  """The convention as data, for `port.json` and run summaries."""
  check(convention)
  if convention == 'caffe':
    return {'name': 'caffe', 'channels': 'BGR', 'pixel_range': [0, 255], 'mean': CAFFE_MEAN_BGR}
  if convention == 'torch':
    return {
      'name': 'torch',
      'channels': 'RGB',
      'pixel_range': [0, 1],
      'mean': TORCH_MEAN_RGB,
      'std': TORCH_STD_RGB,
    }
  return {'name': 'unit', 'channels': 'RGB', 'pixel_range': [0, 1]}
