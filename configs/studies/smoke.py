"""The smoke study: two tiny tasks, two plans, two seeds, one learning rate (about a minute).

  python scripts/study.py --study configs/studies/smoke.py[:seeds=N,lrs=A/B] --workdir /tmp/smoke

`seeds` (default 2), `tasks` (1 or 2) and `lrs` (candidate rates, '/'-separated; default one,
0.05) shrink or grow it; with several rates each (task, plan) chooses on a 1,000-image minival.

It checks the study driver end to end (runs, skips, resume, report), not a result: a narrow
VGG11-BN from scratch for 10 steps on two halves of Fashion-MNIST's classes.

Every study config has these fields (`scripts/study.py` reads them):
- `base`: the run config every run starts from, `path[:arg]` as `--config` takes it;
- `overrides`: `((dotted.field, value), ...)` set in every run's config;
- `tasks`: `{name: {overrides, group, minival}}`: a task's dataset, label budget, image size,
  ...; `group` (optional) makes the mean over tasks a mean of group means (VTAB's convention);
  `minival` (optional) replaces the study's for this task;
- `plans`: `{name: {policy, label, family, overrides, learning_rates}}`: `policy` is a plan
  expression (`{steps}`, `{half}`, `{quarter}` of the run's steps may appear in it), `label` the
  table's name, `family` the plot's series, `overrides` run-config fields for this plan only,
  `learning_rates` (optional) its own candidates instead of the study's;
- `seeds`: each seed draws its own labelled examples and head init, the same for every plan;
- `learning_rates`: the candidates; with more than one, each (task, plan) chooses on `minival`
  (first seed), then every seed trains at the chosen rate;
- `minival`: held out from the end of each task's (unsliced) training split, '' for none;
- `baseline`: the plan every other is compared with, seed by seed ('' for none).
"""

import ml_collections

from configs import default

HALVES = {'fashion_0to4': (0, 1, 2, 3, 4), 'fashion_5to9': (5, 6, 7, 8, 9)}


def get_config(arg=None):
  args = default.parse_arg(arg, seeds=2, lrs='0.05', tasks=2)
  study = ml_collections.ConfigDict()
  study.base = 'configs/default.py:runlocal'
  study.overrides = (
    ('num_train_steps', 10),
    ('eval_every_steps', 10),
    ('checkpoint_every_steps', 5),
    ('log_every_steps', 5),
    ('dataset.eval_split', 'test[:500]'),
    ('dataset.augment', 'none'),
  )
  study.tasks = {
    name: {'overrides': (('dataset.classes', classes), ('dataset.examples_per_class', 40))}
    for name, classes in list(HALVES.items())[: args.tasks]
  }
  study.plans = {
    'linear_probe': {'policy': 'linear_probe', 'label': 'linear probe', 'family': 'baselines'},
    'full': {'policy': 'full', 'label': 'full fine-tuning', 'family': 'baselines'},
  }
  study.seeds = tuple(range(args.seeds))
  study.learning_rates = tuple(float(lr) for lr in args.lrs.split('/'))
  study.minival = ''
  if len(study.learning_rates) > 1:  # minival is carved from the whole (unsliced) train split
    study.minival = '1000'
    study.overrides += (('dataset.train_split', 'train'),)
  study.baseline = 'full'
  return study
