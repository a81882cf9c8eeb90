"""`python -m ftlab.main --config configs/X.py[:args] --workdir DIR [--config.field=value]`."""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from ftlab import loop, run
from ftlab.files import checkpoint

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
  'config', None, 'config file (configs/*.py[:args])', lock_config=True
)
flags.DEFINE_string('workdir', None, 'run directory: checkpoints, metrics, summary')
flags.DEFINE_bool('allow_config_change', False, "continue a workdir's run under another config")
flags.mark_flags_as_required(['config', 'workdir'])

# Exit code for a config or input error found before any compute starts.
EXIT_BAD_INPUT = 2


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, with a bad config file, argument or override as one line and exit 2."""
  try:
    return FLAGS(argv)
  except (flags.Error, KeyError, ValueError, AttributeError, TypeError) as e:
    print(f'error: bad --config: {run.flag_error_line(e)}', file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  checkpoint.quiet_orbax_logs()
  try:
    loop.train_and_evaluate(
      FLAGS.config, FLAGS.workdir, allow_config_change=FLAGS.allow_config_change
    )
  except run.ConfigError as e:  # typed errors only: anything else keeps its traceback
    logging.error('%s', e)
    print(f'error: {e}', file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)
  except (FloatingPointError, loop.FrozenParametersChanged) as e:  # the run's files stay
    logging.error('%s', e)
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  except loop.Preempted as e:
    logging.warning('%s', e)
    print(e, file=sys.stderr)
    sys.exit(128 + e.signum)  # the shell's code for death by that signal


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
