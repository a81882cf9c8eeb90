"""The markdown table of `ftlab.analysis.combine.combine`'s results (`combine.json`).

Used by `scripts/combine.py` (which writes `combine.md` and prints it) and
`scripts/combine_demo.sh`; the library returns data, reports live here.
"""

from typing import Any, Mapping

from ftlab.analysis.ensemble import OUTPUT_ENSEMBLES


def markdown(output: Mapping[str, Any]) -> str:
  """`combine.json` as a markdown table of accuracies, with its notes."""
  arch, data = output['architecture'], output['eval']
  held_out = data['held_out_split'] if not data['held_out_is_eval_split'] else None
  classes = len(arch['dataset.classes']) or 'all'
  lines = [
    f'Runs of {arch["model.name"]} (width {arch["model.width"]:g}, {arch["model.head"]} head, '
    f'{classes} classes of {arch["dataset.name"]}); exact eval on {data["dataset"]} '
    f'`{data["eval_split"]}` ({output["results"][0]["eval"]["count"]:,} examples).',
    '',
  ]
  header = ['model', 'combines']
  if output['batch_norm']:
    header.append('BatchNorm statistics')
  if held_out:
    header.append(f'{held_out} accuracy')
  header += [f'{data["eval_split"]} accuracy', f'{data["eval_split"]} loss']
  lines.append('| ' + ' | '.join(header) + ' |')
  lines.append('|' + '---|' * (len(header) - 2 - bool(held_out)) + '---:|' * (2 + bool(held_out)))
  for r in output['results']:
    row = [r['name'], _combines(r)]
    if output['batch_norm']:
      row.append(_statistics(r, output['bn_reset_batches']))
    if held_out:
      row.append(f'{100 * r[held_out]["accuracy"]:.2f}%')
    row += [f'{100 * r["eval"]["accuracy"]:.2f}%', f'{r["eval"]["loss"]:.4f}']
    lines.append('| ' + ' | '.join(row) + ' |')
  greedy = [r for r in output['results'] if r['method'] == 'greedy_soup']
  notes = list(output['notes'])
  for r in greedy:
    tried = ', '.join(
      f'+{t["candidate"]} {100 * t["held_out_accuracy"]:.2f}% '
      f'({"kept" if t["accepted"] else "dropped"})'
      for t in r['trials']
    )
    split = held_out or data['eval_split']
    notes.append(f'Greedy soup trials ({split} accuracy of the soup with each candidate): {tried}.')
  if notes:
    lines += [''] + [f'- {n}' for n in notes]
  return '\n'.join(lines)


def _combines(result: Mapping[str, Any]) -> str:
  if result['method'] == 'run':
    return f'run ({result["plan"]}, step {result["step"]})'
  if result['method'] == 'wise':
    a, b = result['members']
    return f'(1-α)·{a} + α·{b}'
  return ', '.join(result['members'])


def _statistics(result: Mapping[str, Any], reset_batches: int) -> str:
  if result['bn_reset_applied']:
    return f'recomputed ({reset_batches} batches)'
  if result['method'] in ('run', *OUTPUT_ENSEMBLES):
    return 'stored'
  if reset_batches:
    return "stored (weights equal a run's)"
  return 'averaged (not recomputed)'
