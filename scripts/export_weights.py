"""Writes a fine-tuned run's model in the layout another framework loads.

  python scripts/export_weights.py RUN --format torchvision|safetensors|keras_h5 --output FILE \
      [--step N]

RUN is a run's workdir (its `config.json` says the model; the newest checkpoint, or `--step`,
holds the weights). `torchvision` is a `.pth` state dict for torchvision's VGG (imagenet head
reading a 7x7 map, or no head), `safetensors` the same tensors without pickle, `keras_h5` Keras'
legacy weights layout (imagenet, gap or no head; no BatchNorm). See `ftlab/porting/export.py`.
Exit status 2, with one line, for a run or model that cannot be exported.
"""

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections

from ftlab import init_from, run
from ftlab.errors import InputError
from ftlab.files import checkpoint, workdir
from ftlab.porting import export


def load_run(directory: str, step: int | None = None):
  """`(model, variables, image_size)` of a run's checkpoint."""
  files = workdir.Workdir(directory)
  if not os.path.exists(files.config):
    raise workdir.RunError(f'{directory} holds no config.json: not an ftlab run directory')
  with open(files.config) as f:
    config = ml_collections.ConfigDict(json.load(f))
  classes = checkpoint.stored_shapes(files.checkpoints, step).get('predictions/bias', (1000,))[0]
  model = run.build_model(config.model, classes)
  size = config.dataset.image_size
  shapes = jax.eval_shape(
    lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False)
  )
  variables = {
    key: init_from.load_params(files.checkpoints, shapes[key], key=key, step=step) for key in shapes
  }
  return model, variables, size


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('run', help="the run's workdir")
  parser.add_argument('--format', required=True, choices=export.FORMATS)
  parser.add_argument('--output', required=True, help='the file to write')
  parser.add_argument('--step', type=int, default=None, help='a checkpoint step (default: newest)')
  args = parser.parse_args(argv)
  checkpoint.quiet_orbax_logs()
  try:
    model, variables, size = load_run(args.run, args.step)
    export.save(variables, model, args.format, args.output, image_size=size)
  except (InputError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(f'{args.format}: {model.depth}-layer VGG ({model.head} head) -> {args.output}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
