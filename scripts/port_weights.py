"""Ports a pretrained VGG weight file to an ftlab checkpoint that training starts from.

  python scripts/port_weights.py --input vgg16_bn-6c64b313.pth --output ported/vgg16_bn \
      [--format keras_h5|torchvision|timm|onnx] [--arch vgg16_bn] \
      [--preprocess caffe|torch|unit] [--prefix state_dict_ema] [--allow_nonfinite]

Writes, in the output directory:
  0/          the variables (params, batch_stats) as an Orbax checkpoint, read by
              `--config.init.checkpoint=DIR` (`ftlab.files.checkpoint.save_variables`);
  port.json   the source file and its sha256, format, architecture, where in the file the VGG
              was and what was left out, preprocessing (and whether it is a guess), parameter
              count, notes, and the `--config.*` flags that build the matching model.

Format, architecture and where the VGG sits in the file (a wrapper, a prefix, a larger
model) are inferred unless given; the report printed says what was ported from where. Exit
status 2 (with one line on stderr) for a file that cannot be ported (non-finite values
included) or an output directory already in use.
"""

import json
import os
import shlex
import sys

from absl import app, flags, logging

from ftlab import porting
from ftlab.errors import InputError
from ftlab.files import checkpoint
from ftlab.porting import weights

flags.DEFINE_string('input', None, 'the weight file (.h5, .pth, .safetensors, .onnx)')
flags.DEFINE_string('output', None, 'directory for the checkpoint and port.json (new)')
flags.DEFINE_enum('format', None, porting.FORMATS, 'the file format; inferred if not given')
flags.DEFINE_string('arch', None, 'vgg11 ... vgg19_bn; inferred from the file if not given')
flags.DEFINE_enum('preprocess', None, porting.PREPROCESSING, "override the format's convention")
flags.DEFINE_string('prefix', None, 'port the VGG under this name prefix (a file with several)')
flags.DEFINE_bool('allow_nonfinite', False, 'port inf/NaN values instead of refusing the file')
flags.mark_flags_as_required(['input', 'output'])
FLAGS = flags.FLAGS

EXIT_BAD_INPUT = 2


def config_flags(ported: porting.Ported, output: str) -> list[str]:
  """The `--config.*` overrides that build the ported model and start from its weights."""
  arch = ported.arch
  found = [
    f'--config.model.name={arch.name}',
    f'--config.model.width={arch.width:g}',
    # A headless port trains a new head on globally pooled block-5 features.
    f'--config.model.head={"gap" if arch.head == "none" else arch.head}',
    f'--config.model.adaptive_pool={arch.adaptive_pool}',
    f'--config.dataset.preprocess={ported.preprocessing.name}',
    f'--config.init.checkpoint={output}',
  ]
  # A new task has its own classes: keep a fresh head.
  return found + ['--config.init.dont_load=("predictions/.*",)']


def port_record(ported: porting.Ported, source: str, output: str) -> dict:
  """What port.json (and the checkpoint's meta) says about the port."""
  return {
    **ported.record(source),
    'sha256': weights.file_digest(source),
    'config_flags': config_flags(ported, output),
  }


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  checkpoint.quiet_orbax_logs()
  output = os.path.abspath(FLAGS.output)
  if checkpoint.latest_step(output) is not None:  # before the port, which may take a while
    print(f'error: {output} already holds a checkpoint; choose a new --output', file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)
  try:
    ported = porting.read(
      FLAGS.input,
      FLAGS.format,
      FLAGS.arch,
      FLAGS.preprocess,
      prefix=FLAGS.prefix,
      allow_nonfinite=FLAGS.allow_nonfinite,
    )
    record = port_record(ported, FLAGS.input, output)
    checkpoint.save_variables(output, ported.variables, record)
  except InputError as e:  # PortError, or an output directory that holds a checkpoint
    print(f'error: {e}', file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)
  with open(os.path.join(output, 'port.json'), 'w') as f:
    json.dump(record, f, indent=2)
  logging.info('ported %s (%s, %s)', FLAGS.input, ported.format, ported.arch.name)
  guess = ported.preprocessing.guess
  print(
    f'{ported.report()}\n  written to:  {output}\n'
    f'train from it with: {shlex.join(record["config_flags"])}'
    + (
      f'\n  the input convention {ported.preprocessing.name!r} is a guess ({guess}): check it, '
      'or port again with --preprocess'
      if guess
      else ''
    )
  )


if __name__ == '__main__':
  app.run(main)
