"""A self-pretrained transfer experiment on offline Fashion-MNIST, on a CPU (no ImageNet weights).

Pretrains a narrow VGG11-BN on classes 0-4, then fine-tunes on classes 5-9 from 50 labelled
images per class under four plans (training from scratch, linear probe, last block, full),
evaluates each on the full target test split (5,000 images), prints the table and writes
`results.md`, `results.json` and `results.png` in the workdir. Finished stages are skipped, so
an interrupted demo resumes. `--readme README.md` also rewrites the README's section between the
pretrain-demo-results markers. The README's first demo (real ImageNet-started weights) is
`scripts/demo.py`.

  python scripts/pretrain_demo.py --workdir workdirs/demo [--runlocal] [--readme README.md]
"""

import json
import os

import plots
import readme_section
from absl import app, flags, logging

from configs import demo
from ftlab import loop
from ftlab.files import checkpoint

FLAGS = flags.FLAGS

LABELS = {
  'scratch': 'from scratch (full, random init)',
  'linear_probe': 'linear probe (new head only)',
  'last_blocks': 'last block + head',
  'full': 'full fine-tuning',
}
MARKERS = ('<!-- pretrain-demo-results:start -->', '<!-- pretrain-demo-results:end -->')


def run_stage(workdir: str, arg: str) -> dict:
  """Runs one stage unless its summary exists; returns the summary."""
  summary_path = os.path.join(workdir, 'summary.json')
  if os.path.exists(summary_path):
    logging.info('%s: done before, skipped', workdir)
  else:
    config = demo.get_config(arg + (',runlocal' if FLAGS.runlocal else ''))
    loop.train_and_evaluate(config, workdir)
  with open(summary_path) as f:
    return json.load(f)


def results_table(source: dict, rows: list[dict]) -> str:
  lines = [
    f'Source: VGG11-BN (width 1/4) trained on Fashion-MNIST classes 0-4 for '
    f'{source["steps"]} steps, {100 * source["final_eval_accuracy"]:.1f}% on their test '
    f'images.',
    'Target: classes 5-9, 50 training images per class; accuracy on all 5,000 target test images.',
    '',
    '| plan | trainable params | trainable % | target test accuracy |',
    '|---|---:|---:|---:|',
  ]
  for r in rows:
    lines.append(
      f'| {LABELS[r["name"]]} | {r["trainable_parameters"]:,} | '
      f'{r["trainable_percent"]:.2f}% | {100 * r["final_eval_accuracy"]:.1f}% |'
    )
  return '\n'.join(lines)


def plot(rows: list[dict], path: str) -> None:
  """Each plan's target test accuracy, its trainable share written in the bar."""
  bars = [
    plots.Bar(
      LABELS[r['name']],
      100 * r['final_eval_accuracy'],
      trainable_percent=r['trainable_percent'],
      baseline=r['name'] == 'scratch',
    )
    for r in rows
  ]
  plots.accuracy_bars(bars, path, xlabel='target test accuracy (%), 50 labels per class')


def main(argv):
  del argv
  checkpoint.quiet_orbax_logs()
  root = FLAGS.workdir
  source_dir = os.path.join(root, 'source')
  source = run_stage(source_dir, 'stage=pretrain')
  rows = []
  for name in demo.PLANS:
    summary = run_stage(
      os.path.join(root, name), f'stage=finetune,policy={name},source={source_dir}'
    )
    rows.append(dict(summary, name=name))
  table = results_table(source, rows)
  with open(os.path.join(root, 'results.md'), 'w') as f:
    f.write(table + '\n')
  with open(os.path.join(root, 'results.json'), 'w') as f:
    json.dump({'source': source, 'plans': rows}, f, indent=2)
  plot(rows, os.path.join(root, 'results.png'))
  if FLAGS.readme:
    readme_section.replace(FLAGS.readme, MARKERS, table)
    # The README shows the plot too: keep a copy next to it.
    docs = os.path.join(os.path.dirname(os.path.abspath(FLAGS.readme)), 'docs')
    os.makedirs(docs, exist_ok=True)
    plot(rows, os.path.join(docs, 'pretrain_demo_results.png'))
  print(table)


def define_flags() -> None:
  """The command line (defined when run as a script, so tests can import the module)."""
  flags.DEFINE_string('workdir', 'workdirs/demo', 'where the stages run and results go')
  flags.DEFINE_bool('runlocal', False, 'seconds-long stages (smoke test)')
  flags.DEFINE_string('readme', '', 'README to update between the demo-results markers')


if __name__ == '__main__':
  define_flags()
  app.run(main)
