"""A self-pretrained transfer experiment on offline Fashion-MNIST, on a CPU (no ImageNet weights).

Pretrains a narrow VGG11-BN on classes 0-4 (`configs/demo.py:stage=pretrain`, in
`WORKDIR/source`), then runs the study `configs/studies/pretrain.py` on it through the study
driver (`scripts/study.py`): fine-tuning on classes 5-9 from 50 labelled images per class under
four plans (from scratch, linear probe, last block, full), `--seeds` seeds each, tested on all
5,000 target test images, paired with full fine-tuning. The report (`WORKDIR/report.{md,json}`
and plots) is the driver's; finished runs are skipped, so an interrupted demo resumes.
`--readme README.md` also rewrites the README's pretrain-demo-results section and its plots
under `docs/`. The README's first demo (ImageNet-derived weights, three tasks) is
`bash scripts/demo.sh`.

  python scripts/pretrain_demo.py --workdir workdirs/demo [--seeds 3] [--runlocal] \
      [--readme README.md]
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [p for p in (ROOT, os.path.dirname(os.path.abspath(__file__))) if p not in sys.path]

import readme_section  # noqa: E402
import study  # noqa: E402

from configs import demo  # noqa: E402
from ftlab import loop  # noqa: E402
from ftlab.files import checkpoint  # noqa: E402

SECTION = 'pretrain-demo-results'


def pretrain(root: str, runlocal: bool) -> str:
  """Runs the source stage in `root/source` unless it finished before; returns its directory."""
  source = os.path.join(root, 'source')
  if not os.path.exists(os.path.join(source, 'summary.json')):
    checkpoint.quiet_orbax_logs()
    loop.train_and_evaluate(demo.get_config('stage=pretrain' + ',runlocal' * runlocal), source)
  return source


def study_spec(source: str, seeds: int, runlocal: bool) -> str:
  """The fine-tuning study on `source` (`configs/studies/pretrain.py`)."""
  spec = f'configs/studies/pretrain.py:source={os.path.abspath(source)},seeds={seeds}'
  return spec + ',runlocal' * runlocal


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', default='workdirs/demo', help='the source run and the study')
  parser.add_argument('--seeds', type=int, default=3, help='fine-tuning seeds per plan')
  parser.add_argument('--runlocal', action='store_true', help='seconds-long runs (smoke test)')
  parser.add_argument(
    '--readme', default='', help=f'README to update between the {SECTION} markers'
  )
  parser.add_argument('--log_runs', action='store_true', help="show each run's own log")
  args = parser.parse_args(argv)
  if args.seeds < 1:
    parser.error(f'--seeds {args.seeds}: need 1 or more')
  if not args.log_runs:
    from absl import logging

    logging.set_verbosity(logging.WARNING)
  if args.readme:  # a README that cannot take the report fails now, not after pretraining
    try:
      readme_section.check(args.readme, study.readme_markers(SECTION))
    except OSError as e:
      print(f'error: --readme {args.readme}: {e.strerror}', file=sys.stderr)
      return 2
    except readme_section.ReadmeError as e:
      print(f'error: {e}', file=sys.stderr)
      return 2
  source = pretrain(args.workdir, args.runlocal)
  flags = ['--study', study_spec(source, args.seeds, args.runlocal), '--workdir', args.workdir]
  flags += ['--readme', args.readme, '--section', SECTION] if args.readme else []
  return study.main(flags + ['--log_runs'] * args.log_runs)


if __name__ == '__main__':
  sys.exit(main())
