"""Ports a pretrained VGG weight file to an ftlab checkpoint that training starts from.

  python scripts/port_weights.py --input vgg16_bn-6c64b313.pth --output ported/vgg16_bn \
      [--format keras_h5|torchvision|timm|onnx] [--arch vgg16_bn] [--preprocess caffe|torch]

Writes, in the output directory:
  0/          the variables (params, batch_stats) as an Orbax checkpoint, read by
              `--config.init.checkpoint=DIR` (`ftlab.checkpoint.save_variables`);
  port.json   the source file and its sha256, format, architecture, preprocessing,
              parameter count, notes, and the `--config.*` flags that build the matching model.

Format and architecture are inferred from the file unless given. Exit status 2 (with one
line on stderr) for a file that cannot be ported or an output directory already in use.
"""

import hashlib
import json
import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

from ftlab import checkpoint, porting  # noqa: E402

flags.DEFINE_string('input', None, 'the weight file (.h5, .pth, .safetensors, .onnx)')
flags.DEFINE_string('output', None, 'directory for the checkpoint and port.json (new)')
flags.DEFINE_enum('format', None, porting.FORMATS, 'the file format; inferred if not given')
flags.DEFINE_string('arch', None, 'vgg11 ... vgg19_bn; inferred from the file if not given')
flags.DEFINE_enum('preprocess', None, ['caffe', 'torch'], "override the format's convention")
flags.mark_flags_as_required(['input', 'output'])
FLAGS = flags.FLAGS

EXIT_BAD_INPUT = 2


def sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      digest.update(chunk)
  return digest.hexdigest()


def config_flags(ported: porting.Ported, output: str) -> list[str]:
  """The `--config.*` overrides that build the ported model and start from its weights."""
  arch = ported.arch
  found = [
    f'--config.model.name={arch.name}',
    f'--config.model.width={arch.width:g}',
    f'--config.model.head={arch.head}',
    f'--config.model.adaptive_pool={arch.adaptive_pool}',
    f'--config.dataset.preprocess={ported.preprocessing.name}',
    f'--config.init.checkpoint={output}',
  ]
  # A new task has its own classes: keep a fresh head.
  return found + ['--config.init.dont_load=("predictions/.*",)']


def port_record(ported: porting.Ported, source: str, output: str) -> dict:
  """What port.json (and the checkpoint's meta) says about the port."""
  return {
    'source': os.path.abspath(source),
    'sha256': sha256(source),
    'format': ported.format,
    'arch': ported.arch.to_json(),
    'preprocessing': ported.preprocessing.to_json(),
    'param_count': porting.param_count(ported.variables),
    'notes': list(ported.notes),
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
    ported = porting.read(FLAGS.input, FLAGS.format, FLAGS.arch, FLAGS.preprocess)
    record = port_record(ported, FLAGS.input, output)
    checkpoint.save_variables(output, ported.variables, record)
  except ValueError as e:  # PortError, or an output directory that holds a checkpoint
    print(f'error: {e}', file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)
  with open(os.path.join(output, 'port.json'), 'w') as f:
    json.dump(record, f, indent=2)
  logging.info('ported %s (%s, %s)', FLAGS.input, ported.format, ported.arch.name)
  print(
    f'{ported.format} {ported.arch.name}: {record["param_count"]:,} parameters -> {output}\n'
    f'train from it with: {shlex.join(record["config_flags"])}'
  )


if __name__ == '__main__':
  app.run(main)
