"""The pretrain demo's fine-tuning as a study: Fashion-MNIST classes 5-9 from a source model.

  python scripts/pretrain_demo.py --workdir workdirs/demo        # pretrains, then runs this
  python scripts/study.py --study configs/studies/pretrain.py:source=W/source --workdir W

The source is a narrow VGG11-BN pretrained on classes 0-4 (`configs/demo.py:stage=pretrain`,
which `scripts/pretrain_demo.py` runs first). Each plan fine-tunes it on classes 5-9 from 50
labelled images per class (each seed its own draw and head init), 150 SGD steps at
`configs/demo.py`'s rate, and is tested on all 5,000 target test images; from scratch trains
the same network from a random init. One rate, nothing chosen on minival.

Arguments: source (the pretrained run's directory; required), seeds (3), runlocal (seconds-long
runs, as `configs/demo.py:runlocal`).
"""

import ml_collections

from configs import default, demo

# name -> (plan expression, label)
PLANS = {
  'scratch': ('full', 'from scratch (full, random init)'),
  'linear_probe': ('linear_probe', 'linear probe (new head only)'),
  'last_blocks': ('last_blocks(1)', 'last block + head'),
  'full': ('full', 'full fine-tuning'),
}


def get_config(arg=None):
  args = default.parse_arg(arg, source='', seeds=3, runlocal=False)
  if not args.source:
    raise ValueError('pretrain source is empty: name the pretrained run (source=W/source)')
  base = f'configs/demo.py:stage=finetune,source={args.source}' + ',runlocal' * args.runlocal
  lr = demo.get_config(base.partition(':')[2]).optimizer.learning_rate
  study = ml_collections.ConfigDict()
  study.base = base
  study.tasks = {'fashion_mnist_5_9': {'overrides': ()}}
  study.plans = {
    name: {
      'policy': policy,
      'label': label,
      'family': 'baselines',
      # From scratch: no source weights, nothing kept fresh (they all are).
      'overrides': (('init.checkpoint', ''), ('init.dont_load', ())) if name == 'scratch' else (),
    }
    for name, (policy, label) in PLANS.items()
  }
  study.seeds = tuple(range(args.seeds))
  study.learning_rates = (lr,)
  study.minival = ''
  study.baseline = 'full'
  study.lr_source = "configs/demo.py's SGD rate for every plan"
  return study
