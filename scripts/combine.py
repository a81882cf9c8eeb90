"""Output ensembles, model soups and WiSE-FT over fine-tuned runs.

  python scripts/combine.py --checkpoints DIR [DIR ...] --method M[,M...] \
    --config configs/X.py[:args] --workdir OUT [--alpha a | --alphas a,b,c] \
    [--bn_reset_batches K] [--config.field=value ...]

Methods (`ftlab/analysis/combine.py`): `logits` and `probs` (output ensembles), `uniform_soup`,
`greedy_soup`, and `wise` (two runs: alpha 0 is the first, 1 the second). A DIR is a run's
workdir or its `checkpoints/` directory; the newest step is used. The runs must share the
architecture, head and label space. `--config` supplies the eval data (`dataset.eval_split`;
`dataset.minival`, when set, is the held-out split on which the greedy soup is chosen), the
training split for BatchNorm statistics, batch sizes and parallelism; the model comes from the
runs. Writes `OUT/combine.json` and `OUT/combine.md` and prints the table. A bad input stops
before anything is compiled, with one line and exit code 2.
"""

import sys

import jax
from absl import app, flags
from combine_report import markdown
from ml_collections import config_flags

from ftlab import cli, parallel, run
from ftlab.analysis import combine
from ftlab.errors import InputError
from ftlab.files import checkpoint, storage

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
  'config', None, 'eval data config (configs/*.py[:args])', lock_config=True
)
flags.DEFINE_list('checkpoints', [], 'run dirs; positional arguments are more run dirs')
flags.DEFINE_list('method', [], f'one or more of {", ".join(combine.METHODS)}')
flags.DEFINE_float('alpha', None, 'one WiSE-FT coefficient')
flags.DEFINE_list('alphas', [], 'WiSE-FT coefficients (default 0,0.25,0.5,0.75,1)')
flags.DEFINE_integer(
  'bn_reset_batches',
  combine.DEFAULT_BN_RESET_BATCHES,
  'training batches for fresh BatchNorm statistics of averaged weights (0: off)',
)
flags.DEFINE_string('workdir', None, 'where combine.json and combine.md go')
flags.mark_flags_as_required(['config', 'workdir'])

EXIT_BAD_INPUT = 2


def fail(message: str) -> None:
  print(f'error: {message}', file=sys.stderr)
  sys.exit(EXIT_BAD_INPUT)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, with a bad flag or config file as one line and exit 2."""
  try:
    return cli.parse(argv, FLAGS)
  except InputError as e:
    fail(str(e))


def alphas() -> list[float]:
  if FLAGS.alpha is not None and FLAGS.alphas:
    fail('give --alpha or --alphas, not both')
  if FLAGS.alpha is not None:
    return [FLAGS.alpha]
  try:
    return [float(a) for a in FLAGS.alphas] or list(combine.DEFAULT_ALPHAS)
  except ValueError as e:
    fail(f'--alphas: {e}')


def main(argv):
  checkpoint.quiet_orbax_logs()
  paths = list(FLAGS.checkpoints) + list(argv[1:])
  if 'wise' not in FLAGS.method and (FLAGS.alpha is not None or FLAGS.alphas):
    fail('--alpha and --alphas apply to --method wise only')
  config = FLAGS.config
  # As the run loop does: a multi-process job must be joined before jax touches a device.
  parallel.initialize_distributed(config.multi_host)
  try:
    spread = parallel.Spread(config.parallelism)
    output = combine.combine(
      run.make_data(config),
      spread,
      paths,
      FLAGS.method,
      alphas=alphas(),
      bn_reset_batches=FLAGS.bn_reset_batches,
      workdir=FLAGS.workdir,
    )
  except (InputError, FileNotFoundError) as e:
    fail(str(e))
  table = markdown(output)
  if jax.process_index() == 0:  # as combine.json: one writer
    (storage.path(FLAGS.workdir) / 'combine.md').write_text(table + '\n')
  print(table)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
