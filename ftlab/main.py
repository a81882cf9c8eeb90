"""`python -m ftlab.main --config configs/X.py[:args] --workdir DIR [--config.field=value]`."""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from ftlab import checkpoint, train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
  'config', None, 'config file (configs/*.py[:args])', lock_config=True
)
flags.DEFINE_string('workdir', None, 'run directory: checkpoints, metrics, summary')
flags.mark_flags_as_required(['config', 'workdir'])

# Exit code for a config or input error found before any compute starts.
EXIT_BAD_INPUT = 2


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  checkpoint.quiet_orbax_logs()
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except train.ConfigError as e:
    logging.error('%s', e)
    print(f'error: {e}', file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)


if __name__ == '__main__':
  app.run(main)
