"""Distribution shift: in-distribution and corrupted test accuracy side by side.

  python scripts/study.py --study configs/studies/shift.py --workdir workdirs/shift

LP-FT (Kumar et al., ICLR 2022) claims that probing first and then fine-tuning everything
keeps the pretrained features' robustness better than fine-tuning from a random head; this
study lets its claim be checked on ftlab's offline tasks. Each run is the offline study's
(`configs/studies/offline.py`: the Keras VGG16 conv base, 10 labels per class, 40 steps at 32
px) with the shift evaluator on (`ftlab/evals/shift.py`): 300 evenly spaced test images under
five ImageNet-C-style corruptions at severities 1, 3 and 5 (CIFAR-10-C's constants, for 32 px
inputs). The report's cells show the test accuracy (all test images) and the mean over the 15
corrupted copies.

Tasks: Fashion-MNIST and the 8x8 UCI digits (the offline suite's object tasks that are not at
ceiling). Plans: linear probe, full fine-tuning, LP-FT, each at the rate the offline study uses
(Fashion-MNIST's minival choice, `configs/fewshot_lrs.json`). WiSE-FT, the other claim, is not
a training plan but an interpolation of two finished runs: `scripts/combine.py --method wise`
makes it from this study's probe and full runs (in-distribution accuracy only: the combine
tool has no shift evaluator yet).

Arguments: seeds (default 3), tasks (a '/'-separated subset of fashion_mnist/digits).
"""

from configs import default
from configs.studies import offline

TASKS = ('fashion_mnist', 'digits')
PLANS = ('linear_probe', 'full', 'lp_ft')


def get_config(arg=None):
  args = default.parse_arg(arg, seeds=3, tasks='/'.join(TASKS))
  names = [t for t in args.tasks.split('/') if t]
  unknown = [t for t in names if t not in TASKS]
  if unknown:
    raise ValueError(f'shift study tasks {unknown} are not among {"/".join(TASKS)}')
  study = offline.get_config(f'seeds={args.seeds}')
  study.overrides = study.overrides + (
    ('evals.shift.enabled', True),
    ('evals.shift.severities', (1, 3, 5)),
    # 300 evenly spaced test images per corrupted copy: 16 passes of the whole VGG16 (the
    # frozen prefix's cache holds clean images only) take ~10 ms per image on 2 cores.
    ('evals.shift.max_examples', 300),
  )
  study.tasks = {name: study.tasks[name] for name in names}
  study.plans = {name: offline.plan_entry(name, select=False) for name in PLANS}
  study.baseline = 'full'
  return study
