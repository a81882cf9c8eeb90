"""The smoke study: two tiny tasks, two plans, two seeds, one learning rate (about a minute).

  python scripts/study.py --study configs/studies/smoke.py[:seeds=N,tasks=N,lrs=A/B] \
      --workdir /tmp/smoke

`seeds` (default 2), `tasks` (1 or 2) and `lrs` (candidate rates, '/'-separated; default one,
0.05) shrink or grow it; with several rates each (task, plan) chooses on its minival (200
digits, 40 faces, held out of the training split).

It checks the study driver end to end (runs, skips, resume, report), not a result: a narrow
VGG11-BN from scratch for 10 steps on two small offline tasks from the package registries
(`ftlab/data/packaged.py`): scikit-learn's 8x8 digits (10 labels per class) and scikit-image's
faces vs non-faces (20 per class).

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
- `minival`: held out from the end of each task's (unsliced) training split ('200', '10%'),
  or a split of its own that shares nothing with train or test ('validation[:200]'); '' none;
- `baseline`: the plan every other is compared with, seed by seed ('' for none);
- `lr_source` (optional): where fixed rates came from when nothing is chosen here (another
  task's selection, a paper), printed with them in the report.
"""

import ml_collections

from configs import default

# name -> (dataset, labels per class, minival when rates are chosen)
TASKS = {'digits': ('sklearn_digits', 10, '200'), 'faces': ('skimage_faces', 20, '40')}


def get_config(arg=None):
  args = default.parse_arg(arg, seeds=2, lrs='0.05', tasks=2)
  study = ml_collections.ConfigDict()
  study.base = 'configs/default.py:runlocal'
  study.overrides = (
    ('num_train_steps', 10),
    ('eval_every_steps', 10),
    ('checkpoint_every_steps', 5),
    ('log_every_steps', 5),
    ('dataset.train_split', 'train'),
    ('dataset.eval_split', 'test'),
    ('dataset.augment', 'none'),
  )
  choose = len(args.lrs.split('/')) > 1
  study.tasks = {
    name: {
      'overrides': (('dataset.name', dataset), ('dataset.examples_per_class', shots)),
      'minival': minival if choose else '',
    }
    for name, (dataset, shots, minival) in list(TASKS.items())[: args.tasks]
  }
  study.plans = {
    'linear_probe': {'policy': 'linear_probe', 'label': 'linear probe', 'family': 'baselines'},
    'full': {'policy': 'full', 'label': 'full fine-tuning', 'family': 'baselines'},
  }
  study.seeds = tuple(range(args.seeds))
  study.learning_rates = tuple(float(lr) for lr in args.lrs.split('/'))
  study.minival = ''
  study.baseline = 'full'
  return study
