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

import ftlab
from ftlab import init_from, run
from ftlab.errors import InputError
from ftlab.files import checkpoint, workdir
from ftlab.porting import export


def load_run(directory: str, step: int | None = None):
  """`(model, variables, image_size, provenance)` of a run's checkpoint: `provenance` is what
  the weight file cannot hold (`export.save`): the input convention the run trained on, its
  class names, the run and step, and the ftlab that wrote the export."""
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
  return model, variables, size, provenance(files, config, step)


def provenance(files: workdir.Workdir, config: ml_collections.ConfigDict, step: int | None):
  """The run's input convention and classes: from its summary (the convention resolved, `auto`
  included), else from its config; None where neither says (an `auto` run that never
  finished: a port then guesses, and says so)."""
  inputs = {}
  if files.summary.exists():
    inputs = json.loads(files.summary.read_text()).get('inputs', {})
  preprocess = inputs.get('preprocess') or config.dataset.preprocess
  found = checkpoint.latest_step(files.checkpoints) if step is None else step
  return {
    'preprocessing': None if preprocess == 'auto' else preprocess,
    'classes': inputs.get('classes'),
    'image_size': config.dataset.image_size,
    'run': os.path.abspath(os.fspath(files.root)),
    'step': found,
    'ftlab_version': ftlab.version(),
  }


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('run', help="the run's workdir")
  parser.add_argument('--format', required=True, choices=export.FORMATS)
  parser.add_argument('--output', required=True, help='the file to write')
  parser.add_argument('--step', type=int, default=None, help='a checkpoint step (default: newest)')
  args = parser.parse_args(argv)
  checkpoint.quiet_orbax_logs()
  try:
    model, variables, size, record = load_run(args.run, args.step)
    export.save(variables, model, args.format, args.output, image_size=size, provenance=record)
  except (InputError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(f'{args.format}: {model.depth}-layer VGG ({model.head} head) -> {args.output}')
  inputs = record['preprocessing'] or 'unknown'
  print(f'  inputs: {inputs} (recorded in {export.provenance_path(args.output)})')
  return 0


if __name__ == '__main__':
  sys.exit(main())
