"""`python -m ftlab.main --config configs/X.py[:args] --workdir DIR [--config.field=value]`.

Trains and evaluates one run (`ftlab.loop.train_and_evaluate`). A bad config value, input
file or flag stops before any compute with one line and exit code 2; a non-finite loss or a
frozen parameter that moved exits 1; SIGTERM/SIGINT checkpoints and exits 128 + the signal.
SIGUSR1 prints every thread's Python stack to stderr and the run goes on (`kill -USR1 PID`
on a run that seems stuck; `scripts/launch_local.py` does it before stopping a timed-out job).
"""

import faulthandler
import signal
import sys

from absl import app, flags
from ml_collections import config_flags

from ftlab import cli, errors, loop
from ftlab.files import checkpoint
from ftlab.plans import registry

# `--help` lists the plan language's methods (`config.policy.name`), from the registry.
__doc__ += (
  '\nconfig.policy.name is a plan expression (ftlab/plans/syntax.py) of these methods:\n'
  + registry.help_text()
  + '\n'
)

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
  'config', None, 'config file (configs/*.py[:args])', lock_config=True
)
flags.DEFINE_string('workdir', None, 'run directory: checkpoints, metrics, summary')
flags.DEFINE_bool('allow_config_change', False, "continue a workdir's run under another config")
flags.mark_flags_as_required(['config', 'workdir'])

EXIT_BAD_INPUT = errors.EXIT_BAD_INPUT  # a config or input error, found before any compute


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, with a bad config file, argument or override as one line and exit 2."""
  try:
    return cli.parse(argv, FLAGS)
  except errors.InputError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)


def run(config, workdir: str, *, allow_config_change: bool = False) -> int:
  """Runs `config` in `workdir` as the command line does; returns the exit code (0 on
  success). Typed errors become one line on stderr; anything else keeps its traceback."""
  checkpoint.quiet_orbax_logs()
  # One line each on stderr, where absl's log goes too: printed, not also logged (it read twice).
  try:
    loop.train_and_evaluate(config, workdir, allow_config_change=allow_config_change)
  except errors.InputError as e:  # typed errors only: anything else keeps its traceback
    print(f'error: {e}', file=sys.stderr)
    return EXIT_BAD_INPUT
  except (FloatingPointError, loop.FrozenParametersChanged) as e:  # the run's files stay
    print(f'error: {e}', file=sys.stderr)
    return 1
  except loop.Preempted as e:
    print(e, file=sys.stderr)
    return 128 + e.signum  # the shell's code for death by that signal
  return 0


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  # Where a stuck run waits, without stopping it (a multi-process job that hangs in a collective
  # shows which call each process is in).
  faulthandler.register(signal.SIGUSR1, all_threads=True)
  code = run(FLAGS.config, FLAGS.workdir, allow_config_change=FLAGS.allow_config_change)
  if code:
    sys.exit(code)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
