"""Writes a fine-tuned run as a masked delta: only the entries it changed, on its base weights.

  python scripts/export_delta.py RUN [--output FILE] [--step N]

RUN is a run's workdir. Its base (the weights it started from: `init.checkpoint`, the fresh
head drawn from the run's seed) is rebuilt as the run built it and referenced in the delta by
checksum; the delta holds the flat indices and final values of every changed entry (a leaf
that changed mostly, like a new head, whole). The file (default `RUN/masked_delta-<step>.npz`,
format in `ftlab/analysis/masked_delta.py`) is read back and applied to the base, and the result is
checked against the run's parameters bit for bit before the sizes are printed: the delta, the
parameters alone, and the checkpoint directory (parameters, optimizer state and masks).
Exit status 2, with one line, for a directory that is not a finished run.
"""

import argparse
import json
import os
import sys

import numpy as np

from ftlab.analysis import mask_report, masked_delta
from ftlab.files import checkpoint, workdir


def directory_bytes(path: str) -> int:
  """Total size of the files under `path`."""
  return sum(
    os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(path) for name in names
  )


def make_delta(
  run_dir: str, step: int | None = None, unfolded: bool = False
) -> tuple[dict, mask_report.RunWeights]:
  """The masked delta of `run_dir` at `step` (None: the newest) with its header's account of
  the run and its base, and the run's weights. `unfolded`: a tuner's adapter factors as their
  own leaves (as peft saves an adapter) instead of the kernels they fold into; the same delta
  for a run without adapters.

  Raises:
    mask_report.RunError: not a finished run, or its base cannot be rebuilt.
  """
  weights = mask_report.read_run(run_dir, step)
  config = workdir.read_run(run_dir)['config']
  base = (
    f'init.checkpoint={config["init"]["checkpoint"]!r}, dont_load={config["init"]["dont_load"]}, '
    f'fresh parameters from seed {config["seed"]} (ftlab.run.make_run)'
  )
  initial, final = weights.unfolded if unfolded else (weights.initial, weights.final)
  delta = masked_delta.make(
    initial,
    final,
    run=os.path.abspath(run_dir),
    step=weights.step,
    plan=weights.plan,
    base=base,
  )
  return delta, weights


def export(run_dir: str, output: str | None, step: int | None) -> dict:
  """Writes and verifies the delta of `run_dir`; returns what the script prints.

  Raises:
    mask_report.RunError: not a finished run, or its base cannot be rebuilt.
    masked_delta.DeltaError: the delta does not reproduce the run (a bug).
  """
  delta, weights = make_delta(run_dir, step)
  found = workdir.read_run(run_dir)
  output = output or os.path.join(run_dir, f'masked_delta-{weights.step}.npz')
  size = masked_delta.save(output, delta)
  rebuilt = masked_delta.apply(weights.initial, masked_delta.load(output))
  for p, x in weights.final.items():  # apply() checked the checksum; this is the plain check
    if rebuilt[p].tobytes() != np.ascontiguousarray(x).tobytes():
      raise masked_delta.DeltaError(f'{p}: the applied delta differs from the run')
  header = delta['header']
  params_bytes = sum(x.nbytes for x in weights.final.values())
  ckpt = directory_bytes(os.path.join(found['directory'], str(weights.step)))
  return dict(
    output=output,
    step=weights.step,
    plan=weights.plan,
    changed_entries=header['changed'],
    entries=header['entries'],
    delta_bytes=size,
    params_bytes=params_bytes,
    checkpoint_bytes=ckpt,
    delta_over_params=size / params_bytes,
    delta_over_checkpoint=size / ckpt,
    base_checksum=header['base_checksum'],
    verified='bit for bit',
  )


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('run', help="the run's workdir")
  parser.add_argument('--output', default=None, help='the .npz to write')
  parser.add_argument('--step', type=int, default=None, help='a checkpoint step (default: newest)')
  args = parser.parse_args(argv)
  checkpoint.quiet_orbax_logs()
  try:
    report = export(args.run, args.output, args.step)
  except mask_report.RunError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  mb = lambda n: f'{n / 2**20:.2f} MiB'
  print(
    f'{report["output"]}: {report["changed_entries"]:,} of {report["entries"]:,} entries '
    f'changed; {mb(report["delta_bytes"])}, against {mb(report["params_bytes"])} of '
    f'parameters ({100 * report["delta_over_params"]:.2f}%) and {mb(report["checkpoint_bytes"])} '
    f'for the checkpoint ({100 * report["delta_over_checkpoint"]:.2f}%); applied to its base, '
    'it gives the run bit for bit'
  )
  print(json.dumps(report, indent=2))
  return 0


if __name__ == '__main__':
  sys.exit(main())
